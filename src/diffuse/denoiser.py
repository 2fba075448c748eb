"""The one denoiser interface samplers see: D(x, sigma) -> estimate of the clean image.

Karras et al. 2022 (sec. 2, eq. 7; table 1) write every diffusion model as a denoiser D(x; sigma) on
the VE view x = x_0 + sigma n, with the network F wrapped by a preconditioning (their eq. 7):

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))

Which c_* a run uses is its formulation (``objectives``: eps / x0 / v prediction on a VP schedule,
or EDM); this wrapper only applies them, runs the network under autocast, and guides. Build one
for a run with ``objectives.make_denoiser``.

Classifier-free guidance lives here too (Ho & Salimans 2022, eq. 6, in this convention):
    F = (1 + w) F(x, y) - w F(x, null)
so w = 0 is plain conditional sampling. D is affine in F with the same coefficients for both
passes, so guiding F is guiding D (and eps, x0 or v alike). The other common convention
("guidance scale" s, as in diffusers and Stable Diffusion) is s = 1 + w. Both passes run as one
batched forward.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor, nn

from .rng import to_device

DenoiserFn = Callable[[Tensor, Tensor | float], Tensor]    # (x [B, C, H, W], sigma) -> [B, C, H, W]


class Preconditioning(Protocol):
    """c_skip, c_out, c_in, c_noise at VE noise levels sigma [B] float64 (each [B], float64), and
    the noise range the run's samplers walk."""

    sigma_min: float
    sigma_max: float

    def __call__(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]: ...


class Denoiser:
    """Wraps a network and its preconditioning as D(x, sigma).

    x: [B, C, H, W] in the VE view (float32, or float64 with a float64 net); sigma: scalar tensor or [B];
    labels: [B] long or None. Returns x0_hat: [B, C, H, W] in x's dtype, clamped to [-1, 1] when ``clip_x0``.
    """

    def __init__(self, net: nn.Module, precond: Preconditioning, *, labels: Tensor | None = None,
                 guidance: float = 0.0, null_label: int | None = None, clip_x0: bool = False,
                 autocast_dtype: torch.dtype | None = None, levels: dict | None = None):
        self.net = net
        self.precond = precond
        self.labels = labels
        self.guidance = float(guidance)
        self.null_label = null_label
        self.clip_x0 = clip_x0
        self.autocast_dtype = autocast_dtype
        self.nfe = 0                                     # network evaluations so far (one per call)
        # (float sigma, device) -> (c_skip, c_out, c_in, c_noise) as device tensors: built once per
        # sampling run (``prepare``), shareable between the batches of one run, so a call makes no host copy
        self.levels = {} if levels is None else levels
        if guidance and (labels is None or null_label is None):
            raise ValueError("guidance needs class labels and a null label")

    @property
    def sigma_min(self) -> float:
        return self.precond.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.precond.sigma_max

    def forward(self, x_in: Tensor, c_noise: Tensor) -> Tensor:
        """F(x_in, c_noise) with guidance applied; x_in the network's input (c_in x), c_noise: [B] float."""
        labels = self.labels
        if labels is not None and self.guidance != 0.0:
            null = torch.full_like(labels, self.null_label)
            x_in, t_in, y_in = torch.cat([x_in, x_in]), torch.cat([c_noise, c_noise]), torch.cat([labels, null])
        else:
            t_in, y_in = c_noise, labels
        with torch.autocast(x_in.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            out = self.net(x_in, t_in, y_in)
        out = out.to(x_in.dtype)                         # back from the autocast dtype
        if labels is not None and self.guidance != 0.0:
            out_c, out_u = out.chunk(2)
            return (1 + self.guidance) * out_c - self.guidance * out_u
        return out

    def prepare(self, sigmas: Tensor, device: torch.device) -> None:
        """Compute c_skip, c_out, c_in and c_noise for every level of a sampling run on the CPU in
        float64 (the same arithmetic as per call), then move them to ``device`` in one non-blocking copy."""
        s = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1).cpu()
        values = [v for v in dict.fromkeys(s.tolist()) if (v, device) not in self.levels]
        if not values:
            return
        c_skip, c_out, c_in, c_noise = self.precond(torch.tensor(values, dtype=torch.float64))
        packed = to_device(torch.stack([c_skip, c_out, c_in, c_noise.float().double()]), device)     # [4, K]
        for k, v in enumerate(values):
            self.levels[(v, device)] = (packed[0, k], packed[1, k], packed[2, k], packed[3, k].float())

    def __call__(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        if isinstance(sigma, Tensor) and (sigma.ndim > 0 or sigma.device != torch.device("cpu")):
            # per-image sigmas [B] (or a device scalar): computed here, as the table would
            sigma = sigma.to(device=x.device, dtype=torch.float64)
            if sigma.ndim == 0:
                sigma = sigma.expand(x.shape[0])
            c_skip, c_out, c_in, c_noise = self.precond(sigma)
            c_skip, c_out, c_in = (c.to(x.dtype).view(-1, 1, 1, 1) for c in (c_skip, c_out, c_in))
            c_noise = c_noise.float()                                    # [B]
        else:
            key = (float(sigma), x.device)                              # a host scalar: no sync
            if key not in self.levels:
                self.prepare(torch.tensor([key[0]], dtype=torch.float64), x.device)
            c_skip, c_out, c_in, c_noise = self.levels[key]
            c_skip, c_out, c_in = c_skip.to(x.dtype), c_out.to(x.dtype), c_in.to(x.dtype)
            c_noise = c_noise.expand(x.shape[0])                        # [B]
        out = self.forward(x * c_in, c_noise)
        self.nfe += 1
        x0 = c_skip * x + c_out * out
        return x0.clamp(-1, 1) if self.clip_x0 else x0


# ----------------------------------------------------------------------------------------------
# The parametrisation: f(x, sigma) = (eps / sigma) x + (1 - eps / sigma) D(x, sigma)

class ConsistencyFunction:
    """A consistency function built on a denoiser D (a teacher's at initialisation, then the student's):

        f(x, sigma) = r x + (1 - r) D(x, sigma),      r = sigma_min / sigma.

    This is CM's f = c_skip x + c_out F (eq. 5) with c_skip = sigma_min / sigma and c_out F =
    (1 - sigma_min / sigma) D. Why this c_skip rather than iCT's sd^2 / ((sigma - eps)^2 + sd^2):
    - The boundary holds bit-exactly for any finite D, whatever the run's formulation: at sigma =
      sigma_min, r = sigma_min / sigma_min = 1 exactly in IEEE arithmetic, so f = 1 x + 0 D = x.
      D alone does not meet it in general (an x0-predicting VP run's D(x, eps) is the network's
      output), and a VP teacher's D is not defined below its schedule's sigma_min, so ECT's choice
      (f = D with EDM's c_skip(0) = 1, c_out(0) = 0, boundary at sigma = 0) does not carry over.
    - Built on the teacher's D it is the teacher's own one-step Euler (= DDIM) jump from sigma to
      sigma_min along the probability-flow ODE (``samplers.sample_euler``: r x + (1 - r) x0): the
      student starts where the teacher would land in one step, exact to first order near the
      boundary, and f - D = r (x - D) = sigma_min eps_hat, so f ~ D for sigma >> sigma_min: ECT's
      "start from the teacher". iCT's c_skip, sized for training from scratch, would instead mix a
      fraction sd^2 / (sigma^2 + sd^2) of the noisy input back in around sigma ~ sd.
    - Nothing is lost in capacity: for sigma > sigma_min any f is reached by D = (f - r x) / (1 - r).

    x: [B, C, H, W] float32 or float64; sigma: a float, a 0-d tensor, or [B] (any float dtype) in
    [sigma_min, sigma_max] (not checked: that would cost a host sync per call). Returns x's dtype.
    """

    def __init__(self, denoiser: DenoiserFn, sigma_min: float, sigma_max: float):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        self.denoiser, self.sigma_min, self.sigma_max = denoiser, float(sigma_min), float(sigma_max)

    def __call__(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        if isinstance(sigma, Tensor) and (sigma.ndim > 0 or sigma.device.type != "cpu"):
            # per-image sigmas or a device scalar (as Denoiser): on the device, no host sync
            r = (self.sigma_min / sigma.to(device=x.device, dtype=torch.float64)).to(x.dtype)
            r = r.view(-1, *([1] * (x.ndim - 1)))                              # [B or 1, 1, 1, 1]
        else:
            r = self.sigma_min / float(sigma)                                   # a host scalar
        return r * x + (1 - r) * self.denoiser(x, sigma)
