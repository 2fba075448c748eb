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


# ----------------------------------------------------------------------------------------------
# Counter-based normals: image i's k-th draw is a pure function of (its key, k, element), so a
# whole batch is drawn in one go on any device and still equals the image drawn alone.

_GAMMA = 0x9E3779B97F4A7C15              # splitmix64's increment (2^64 / golden ratio)
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _i64(v: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    return v - (1 << 64) if v >= 1 << 63 else v


def _shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic: mask the sign copies off)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(z: Tensor) -> Tensor:
    """Steele, Lea & Flood 2014 (SplitMix64's finaliser) on int64 tensors; multiplication wraps
    mod 2^64 as in C on both CPU and CUDA."""
    z = (z ^ _shr(z, 30)) * _i64(_M1)
    z = (z ^ _shr(z, 27)) * _i64(_M2)
    return z ^ _shr(z, 31)


def counter_normal(keys: Tensor, draw: int, numel: int) -> Tensor:
    """Standard normals [B, numel] float32: row b from key ``keys[b]`` (int64), draw number ``draw``.

    Element j of draw d uses SplitMix64 outputs n = d 2^40 + j and d 2^40 + numel + j of the key's
    stream (state key + (n + 1) gamma), turned into 53-bit uniforms u1, u2 and then a normal by
    Box-Muller, sqrt(-2 ln(1 - u1)) cos(2 pi u2), in float64. Every row is computed on its own, so
    a row is identical whatever else is in the batch, and the work is a few elementwise kernels."""
    if numel >= 1 << 39:
        raise ValueError(f"{numel} elements per draw is too many for the counter layout")
    n = torch.arange(2 * numel, device=keys.device, dtype=torch.int64) + (draw << 40)
    z = keys[:, None] + (n[None, :] + 1) * _i64(_GAMMA)                    # wraps mod 2^64
    u = _shr(splitmix64(z), 11).double() * 2.0 ** -53                       # [B, 2 numel] in [0, 1)
    u1, u2 = 1.0 - u[:, :numel], u[:, numel:]
    return ((-2.0 * u1.log()).sqrt() * torch.cos(2 * torch.pi * u2)).float()


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """Copy a CPU tensor to ``device`` without making the host wait: from pinned memory,
    non-blocking, on CUDA; a plain .to elsewhere."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class ImageNoise:
    """Per-image Gaussian noise streams: image i draws from its own stream (seed, i).

    ``randn(shape)`` returns [B, *shape] float32 with row b taken from stream b, so image i gets
    the same noise whatever the batch size or which images share its batch. Two ways to draw:

    - per image (the default off CUDA): one torch CPU generator per image, rows stacked and moved
      to ``device``. Unchanged since the first version, so CPU samples stay bit-identical.
    - in bulk (the default on CUDA, ``bulk=True``): ``counter_normal``, the whole batch in a few
      kernels on the device with no host round trip. A different stream from the per-image CPU
      one, so the same seed gives other images on a GPU than on the CPU (each reproducible).
    """

    def __init__(self, seed: int, indices: list[int] | range, device: str | torch.device = "cpu",
                 bulk: bool | None = None):
        self.seed = seed
        self.indices = list(indices)
        self.device = torch.device(device)
        self.bulk = self.device.type == "cuda" if bulk is None else bulk
        if self.bulk:
            keys = torch.tensor([derive_seed(seed, "image", i) for i in self.indices], dtype=torch.int64)
            self._keys = to_device(keys, self.device)
            self._draws = 0
        else:
            self._gens = [generator(seed, "image", i) for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def randn(self, *shape: int) -> Tensor:
        if self.bulk:
            numel = 1
            for d in shape:
                numel *= d
            out = counter_normal(self._keys, self._draws, numel).view(len(self), *shape)
            self._draws += 1
            return out
        rows = [torch.randn(*shape, generator=g) for g in self._gens]
        return torch.stack(rows).to(self.device)

    def randn_like(self, x: Tensor) -> Tensor:
        if x.shape[0] != len(self):
            raise ValueError(f"batch of {x.shape[0]} does not match {len(self)} noise streams")
        return self.randn(*x.shape[1:]).to(x.dtype)
