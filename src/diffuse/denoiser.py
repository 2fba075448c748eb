"""The one denoiser interface samplers see: D(x, sigma) -> estimate of the clean image.

Karras et al. 2022 (sec. 2, eq. 7; table 1 "VP" column) write every diffusion model as a denoiser
D(x; sigma) on the VE view x = x_0 + sigma n. An eps-prediction network trained on the discrete
VP schedule becomes one by preconditioning (Karras table 1, VP column, with discrete t):

    c_in(sigma)  = 1 / sqrt(sigma^2 + 1)          (VE sample -> VP sample x_t)
    c_noise      = t(sigma)                        (the discrete step whose sigma it is, interpolated)
    D(x; sigma)  = x - sigma * eps_theta(c_in x, t(sigma))

Future objectives (v-prediction, EDM) plug in as other wrappers with the same call signature.

Classifier-free guidance lives here too (Ho & Salimans 2022, eq. 6, in this convention):
    eps = (1 + w) eps(x, y) - w eps(x, null)
so w = 0 is plain conditional sampling. The other common convention ("guidance scale" s, as in
diffusers and Stable Diffusion) is s = 1 + w. Both passes run as one batched forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .diffusion import Schedule
from .rng import to_device


class EpsDenoiser:
    """Wraps an eps network and its schedule as D(x, sigma).

    x: [B, C, H, W] in the VE view (float32, or float64 with a float64 net); sigma: scalar tensor or [B];
    labels: [B] long or None. Returns x0_hat: [B, C, H, W] in x's dtype, clamped to [-1, 1] when ``clip_x0``.
    """

    def __init__(self, net: nn.Module, schedule: Schedule, *, labels: Tensor | None = None,
                 guidance: float = 0.0, null_label: int | None = None, clip_x0: bool = False,
                 autocast_dtype: torch.dtype | None = None, levels: dict | None = None):
        self.net = net
        self.schedule = schedule
        self.labels = labels
        self.guidance = float(guidance)
        self.null_label = null_label
        self.clip_x0 = clip_x0
        self.autocast_dtype = autocast_dtype
        self.nfe = 0                                     # network evaluations so far (one per call)
        # (float sigma, device) -> (sigma, t(sigma), c_in) as device tensors: built once per sampling
        # run (``prepare``), shareable between the batches of one run, so a call makes no host copy
        self.levels = {} if levels is None else levels
        if guidance and (labels is None or null_label is None):
            raise ValueError("guidance needs class labels and a null label")

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        """eps_theta(x_t, t) with guidance applied; x_t in the VP view, t: [B] float."""
        labels = self.labels
        if labels is not None and self.guidance != 0.0:
            null = torch.full_like(labels, self.null_label)
            x_in, t_in, y_in = torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null])
        else:
            x_in, t_in, y_in = x_t, t, labels
        with torch.autocast(x_t.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            out = self.net(x_in, t_in, y_in)
        out = out.to(x_t.dtype)                          # back from the autocast dtype
        if labels is not None and self.guidance != 0.0:
            eps_c, eps_u = out.chunk(2)
            return (1 + self.guidance) * eps_c - self.guidance * eps_u
        return out

    def prepare(self, sigmas: Tensor, device: torch.device) -> None:
        """Compute sigma, t(sigma) and c_in(sigma) = 1/sqrt(sigma^2 + 1) for every level of a
        sampling run on the CPU in float64 (the same arithmetic as per call), then move them to
        ``device`` in one non-blocking copy."""
        s = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1).cpu()
        values = [v for v in dict.fromkeys(s.tolist()) if (v, device) not in self.levels]
        if not values:
            return
        s = torch.tensor(values, dtype=torch.float64)
        t = self.schedule.sigma_to_t(s).float().double()                  # float32 values, carried in f64
        packed = to_device(torch.stack([s, t, 1 / (s ** 2 + 1).sqrt()]), device)     # [3, K]
        for k, v in enumerate(values):
            self.levels[(v, device)] = (packed[0, k], packed[1, k].float(), packed[2, k])

    def __call__(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        if isinstance(sigma, Tensor) and (sigma.ndim > 0 or sigma.device != torch.device("cpu")):
            # per-image sigmas [B] (or a device scalar): computed here, as the table would
            sigma = sigma.to(device=x.device, dtype=torch.float64)
            if sigma.ndim == 0:
                sigma = sigma.expand(x.shape[0])
            t = self.schedule.sigma_to_t(sigma).float()                 # [B] continuous timestep
            c_in = (1 / (sigma ** 2 + 1).sqrt()).to(x.dtype).view(-1, 1, 1, 1)
            sig = sigma.to(x.dtype).view(-1, 1, 1, 1)
        else:
            key = (float(sigma), x.device)                              # a host scalar: no sync
            if key not in self.levels:
                self.prepare(torch.tensor([key[0]], dtype=torch.float64), x.device)
            s, t0, c = self.levels[key]
            t = t0.expand(x.shape[0])                                   # [B] continuous timestep
            c_in, sig = c.to(x.dtype), s.to(x.dtype)
        eps = self.eps(x * c_in, t)
        self.nfe += 1
        x0 = x - sig * eps
        return x0.clamp(-1, 1) if self.clip_x0 else x0
