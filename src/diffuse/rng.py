"""Seeding: every random draw in diffuse comes from a generator derived from named integers.

Training step k draws its timesteps, noise, flips and label dropout from a generator seeded by
(seed, k), so resuming at step k reproduces the uninterrupted run bit for bit without saving RNG
state. Sampling gives each image its own stream seeded by (seed, index), so the first k images
are identical whatever the number of images or the batch size (EDM's habit).
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of ints/strings; different tuples give unrelated seeds."""
    h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def generator(*parts: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


class ImageNoise:
    """Per-image Gaussian noise streams: image i draws from its own generator (seed, i).

    ``randn(shape)`` returns [B, *shape] with row b taken from stream b, always drawn on the CPU
    in float32 (so results match across devices and batch sizes), then moved to ``device``.
    """

    def __init__(self, seed: int, indices: list[int] | range, device: str | torch.device = "cpu"):
        self.seed = seed
        self.indices = list(indices)
        self.device = torch.device(device)
        self._gens = [generator(seed, "image", i) for i in self.indices]

    def __len__(self) -> int:
        return len(self._gens)

    def randn(self, *shape: int) -> Tensor:
        rows = [torch.randn(*shape, generator=g) for g in self._gens]
        return torch.stack(rows).to(self.device)

    def randn_like(self, x: Tensor) -> Tensor:
        if x.shape[0] != len(self):
            raise ValueError(f"batch of {x.shape[0]} does not match {len(self)} noise streams")
        return self.randn(*x.shape[1:]).to(x.dtype)
