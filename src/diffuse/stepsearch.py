"""A few-step noise-level schedule searched on the teacher's own trajectories (no training).

GITS: Chen, Zhou, Liu, Wang, Cai & Chen 2024, "On the trajectory regularity of ODE-based diffusion
sampling" (ICML), sec. 4: sample a batch of probability-flow ODE trajectories finely with the
teacher, score every coarse jump between two levels of a fine grid by the error one solver step
makes against the fine trajectory, and find by dynamic programming the K-jump path from the top
level to sigma = 0 with the smallest summed error. The result is K + 1 noise levels for the
existing samplers: with them a K-call sampler follows the teacher's trajectories where a
fixed spacing (Karras, uniform) wastes its few steps.

Conventions: the VE view (samplers.py), sigmas float64 decreasing to 0; images [B, C, H, W].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .samplers import Denoiser, karras_sigmas, prior, sample_dpmpp_2m


@torch.no_grad()
def teacher_trajectories(denoiser: Denoiser, z: Tensor, grid: Tensor) -> tuple[Tensor, Tensor]:
    """Solve the probability-flow ODE from standard-normal z [B, C, H, W] over ``grid`` (float64
    [G + 1], decreasing, grid[-1] = 0) with DPM-Solver++(2M) (second order; G calls).
    Returns (xs [G + 1, B, C, H, W]: the point at each level, xs[G] the image; d [G, B, C, H, W]:
    the denoiser's x0 estimate at each level but the last)."""
    xs, ds = [], []

    def keep(i: int, x: Tensor, x0: Tensor, sigma: float) -> None:
        xs.append(x.clone())
        ds.append(x0.clone())

    out = sample_dpmpp_2m(denoiser, prior(z, grid), grid, callback=keep)
    return torch.stack([*xs, out]), torch.stack(ds)


def jump_costs(xs: Tensor, ds: Tensor, grid: Tensor) -> Tensor:
    """cost[i, j] (float64 [G + 1, G + 1], inf where j <= i): the mean over the batch of the RMS
    per-pixel error of one DDIM (= Euler) jump from level i to level j, started on the fine
    trajectory:  x_hat_j = (s_j / s_i) x_i + (1 - s_j / s_i) d_i  against x_j  (GITS, eq. 7, with
    the first-order step as the coarse solver). Nothing new is evaluated: d_i is the fine run's."""
    G = len(grid) - 1
    cost = torch.full((G + 1, G + 1), math.inf, dtype=torch.float64)
    for i in range(G):
        ratio = (grid[i + 1:] / grid[i]).to(xs.dtype).view(-1, 1, 1, 1, 1)          # [G - i, 1, 1, 1, 1]
        jumped = ratio * xs[i] + (1 - ratio) * ds[i]                                   # [G - i, B, C, H, W]
        err = (jumped - xs[i + 1:]).double().square().flatten(2).mean(2).sqrt().mean(1)   # [G - i]
        cost[i, i + 1:] = err
    return cost


def cheapest_path(cost: Tensor, k: int) -> list[int]:
    """The indices 0 = n_0 < n_1 < ... < n_k = G of the k-jump path through ``cost`` [G + 1, G + 1]
    with the smallest summed cost (dynamic programming, O(k G^2))."""
    G = cost.shape[0] - 1
    if not 1 <= k <= G:
        raise ValueError(f"need 1 <= k <= {G} jumps on a grid of {G + 1} levels, got {k}")
    best = torch.full((k + 1, G + 1), math.inf, dtype=torch.float64)      # best[m, j]: m jumps from 0 to j
    back = torch.zeros((k + 1, G + 1), dtype=torch.long)
    best[0, 0] = 0.0
    for m in range(1, k + 1):
        total = best[m - 1].unsqueeze(1) + cost                            # [from, to]
        best[m], back[m] = total.min(0)
    path = [G]
    for m in range(k, 0, -1):
        path.append(int(back[m, path[-1]]))
    return path[::-1]


def search_sigmas(denoiser: Denoiser, z: Tensor, sigma_min: float, sigma_max: float, k: int,
                  grid_levels: int = 64) -> tuple[Tensor, dict]:
    """k + 1 noise levels (float64, decreasing, ending at 0) for a k-call sampler, searched on the
    trajectories from z: a Karras grid (rho = 7) of ``grid_levels`` levels from sigma_max to
    sigma_min, then 0; the cheapest k-jump path through it. Returns (sigmas, facts: the path's
    summed cost and the Karras path's on the same trajectories, for the record)."""
    grid = torch.cat([karras_sigmas(sigma_min, sigma_max, grid_levels), torch.zeros(1, dtype=torch.float64)])
    xs, ds = teacher_trajectories(denoiser, z, grid)
    cost = jump_costs(xs, ds, grid)
    path = cheapest_path(cost, k)
    # The fixed spacing it replaces: k Karras levels from the same sigma_max, as a path on this grid
    # (the nearest grid level each), for the facts only.
    karras = karras_sigmas(sigma_min, sigma_max, k)
    near = sorted({int((grid[:-1] - s).abs().argmin()) for s in karras.tolist()}) + [len(grid) - 1]
    karras_cost = sum(float(cost[a, b]) for a, b in zip(near, near[1:]))
    chosen = sum(float(cost[a, b]) for a, b in zip(path, path[1:]))
    return grid[path].clone(), {"searched_cost": chosen, "karras_cost": karras_cost, "grid_levels": grid_levels,
                                "trajectories": int(z.shape[0])}
