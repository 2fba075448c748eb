"""The step-schedule search (diffuse.stepsearch, GITS) against closed forms and brute force.

Gaussian data N(0, s^2) in the VE view: D*(x, sigma) = s^2 / (s^2 + sigma^2) x, and the
probability-flow ODE keeps x / sqrt(s^2 + sigma^2) fixed, so every trajectory and every jump's
error is known exactly."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from diffuse.rng import ImageNoise
from diffuse.samplers import karras_sigmas, prior, sample_ddim
from diffuse.stepsearch import cheapest_path, jump_costs, search_sigmas, teacher_trajectories

S = 0.5


def gaussian_denoiser(x, sigma):
    sigma = float(sigma)
    return S ** 2 / (S ** 2 + sigma ** 2) * x


def _grid(levels=12, top=80.0, bottom=0.002):
    return torch.cat([karras_sigmas(bottom, top, levels), torch.zeros(1, dtype=torch.float64)])


def test_jump_costs_are_the_closed_form_error_of_a_ddim_jump():
    grid = _grid()
    z = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # the exact trajectory through every level (x / sqrt(s^2 + sigma^2) fixed), and the exact denoiser on it
    xs = torch.stack([z * math.sqrt(S ** 2 + float(s) ** 2) for s in grid])
    ds = torch.stack([gaussian_denoiser(xs[i], grid[i]) for i in range(len(grid) - 1)])
    cost = jump_costs(xs, ds, grid)
    rms = xs.square().flatten(2).mean(2).sqrt()                       # [G + 1, B]
    for i, j in [(0, 1), (0, 12), (3, 7), (10, 11), (11, 12)]:
        si, sj = float(grid[i]), float(grid[j])
        coef = sj / si + (1 - sj / si) * S ** 2 / (S ** 2 + si ** 2) - math.sqrt((S ** 2 + sj ** 2) / (S ** 2 + si ** 2))
        assert float(cost[i, j]) == pytest.approx(abs(coef) * float(rms[i].mean()), rel=1e-9), (i, j)
    assert torch.isinf(cost[5, 5]) and torch.isinf(cost[7, 3])


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_cheapest_path_is_the_brute_force_optimum(k):
    g = torch.Generator().manual_seed(k)
    G = 7
    cost = torch.rand(G + 1, G + 1, generator=g, dtype=torch.float64)
    cost = torch.where(torch.ones(G + 1, G + 1).triu(1).bool(), cost, math.inf)
    best = min((sum(float(cost[a, b]) for a, b in zip(p, p[1:])), p)
               for inner in itertools.combinations(range(1, G), k - 1) for p in [(0, *inner, G)])
    path = cheapest_path(cost, k)
    assert tuple(path) == best[1] and len(path) == k + 1


def test_cheapest_path_refuses_impossible_counts():
    cost = torch.zeros(4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="1 <= k <= 3"):
        cheapest_path(cost, 4)


def test_teacher_trajectories_record_every_level_and_end_at_the_image():
    grid = _grid(levels=40)
    z = torch.randn(32, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    xs, ds = teacher_trajectories(gaussian_denoiser, z, grid)
    assert xs.shape == (41, 32, 1, 4, 4) and ds.shape == (40, 32, 1, 4, 4)
    assert torch.equal(xs[0], prior(z, grid))
    # 40 second-order steps follow the exact trajectory closely: x / sqrt(s^2 + sigma^2) is conserved
    scale = xs[0] / math.sqrt(S ** 2 + float(grid[0]) ** 2)
    assert torch.allclose(xs[-1] / S, scale, rtol=0.02, atol=1e-3)


def test_searched_levels_beat_karras_for_a_few_ddim_steps():
    """On Gaussian data with the exact denoiser, 4 DDIM steps on the searched levels land nearer the
    data's std than 4 on Karras levels from the same sigma_max (both from the same noise)."""
    z = torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigmas, facts = search_sigmas(gaussian_denoiser, z, 0.002, 80.0, 4, grid_levels=48)
    assert len(sigmas) == 5 and sigmas[-1] == 0 and bool((sigmas.diff() < 0).all())
    assert facts["searched_cost"] <= facts["karras_cost"]
    karras = torch.cat([karras_sigmas(0.002, 80.0, 4), torch.zeros(1, dtype=torch.float64)])
    fresh = torch.randn(4096, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    noise = ImageNoise(0, range(4096))

    def std_error(sig):
        out = sample_ddim(gaussian_denoiser, prior(fresh, sig), sig, noise=noise)
        return abs(float(out.std()) / S - 1)
    assert std_error(sigmas) < 0.7 * std_error(karras), (std_error(sigmas), std_error(karras))    # 0.27 vs 0.47
