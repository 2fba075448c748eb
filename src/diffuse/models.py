"""The UNet noise predictor eps_theta(x_t, t, y) in the DDPM / ADM style.

Ho et al. 2020 (app. B) and Dhariwal & Nichol 2021 (ADM): a convolutional encoder-decoder with
skip connections; sinusoidal time embedding -> MLP -> injected into every residual block (added,
or as GroupNorm scale+shift); self-attention at chosen resolutions; optional class embedding with
an extra "null" class (index ``num_classes``) used for classifier-free guidance.

Input x_t: [B, C, H, W] float (any range; trained on noised [-1, 1] images); t: [B] float timestep
in [0, T-1] (fractional values are fine); y: [B] long in [0, num_classes], or None.
Output: predicted noise, [B, C, H, W], same dtype as the network's compute dtype.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0, freq_shift: float = 0.0,
                       sin_first: bool = False) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017, sec. 3.5).

    t: [B] -> [B, dim] float32: [cos(t w_i), sin(t w_i)] with w_i = max_period^(-i/(half - freq_shift)).
    ``freq_shift`` and ``sin_first`` exist for imported diffusers models (their ``freq_shift`` and
    ``flip_sin_to_cos=False``; the original DDPM code used shift 1, sin first); ours use 0 and cos first.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)] if sin_first else [torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so each residual branch starts as the identity (ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and returned in the input's dtype (as ADM's GroupNorm32).

    Under bf16 autocast the activations reaching a norm are bf16; normalising them in float32 keeps
    the statistics exact and, on the CPU, is also 2x faster than torch's bf16 channels-last kernel
    (fwd+bwd of [64, 32, 28, 28] with SiLU: 6.4 vs 14.4 ms on 2 threads, benchmarks/cpu_kernels.py).
    Same parameters and state-dict keys as nn.GroupNorm."""

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, self.weight.dtype)                 # bf16 x, fp32 weight -> fp32
        return F.group_norm(x.to(dtype), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


class Dropout(nn.Module):
    """Dropout (Srivastava et al. 2014) whose CPU masks come from NumPy's PCG64, 4 masks per 64-bit draw.

    torch's CPU RNG draws one Mersenne-Twister number per element on one thread (6 ms for a
    [8, 128, 32, 32] mask, 8% of a DDPM-UNet training step on 2 cores); PCG64 bits cost 0.9 ms.
    The PCG64 seed is drawn from torch's global generator, so masks still follow torch.manual_seed
    and are replayed by activation checkpointing (which restores that generator). The keep
    probability is quantised to 1/65536. On other devices this is F.dropout."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        return torch.where(cpu_keep_mask(x, self.p), x * (1.0 / (1.0 - self.p)), 0.0)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# (first row, global batch) while a data-parallel or accumulated step runs a slice of its batch
_batch_slice: tuple[int, int] | None = None


@contextmanager
def batch_slice(offset: int, total: int) -> Iterator[None]:
    """Within this block the network sees rows [offset, offset + B) of a batch of ``total``: CPU
    dropout draws the whole batch's mask and keeps those rows, so masks do not depend on how the
    batch is split across ranks and micro-batches (at the cost of total / B times the mask bits)."""
    global _batch_slice
    saved, _batch_slice = _batch_slice, (offset, total)
    try:
        yield
    finally:
        _batch_slice = saved


def cpu_keep_mask(x: Tensor, p: float) -> Tensor:
    """Bool mask with x's shape and memory format: False with probability p."""
    seed = int(torch.randint(0, 2**63 - 1, ()).item())
    offset, total = _batch_slice if _batch_slice is not None else (0, x.shape[0])   # x: [B, ...]
    shape = (total, *x.shape[1:])                                  # the whole batch's mask
    n = math.prod(shape)
    bits = np.random.PCG64(seed).random_raw((n + 3) // 4).view(np.int16)[:n]   # uniform int16
    drop_below = round(p * 65536) - 32768
    keep = torch.from_numpy(bits) >= drop_below
    rows = slice(offset, offset + x.shape[0])
    # Lay the mask out in x's memory order so the product needs no transpose.
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return keep.view(shape[0], shape[2], shape[3], shape[1])[rows].permute(0, 3, 1, 2)
    return keep.view(shape)[rows]


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017, eq. 1); q, k, v [B, heads, L, d] -> [B, heads, L, d].

    On the GPU: F.scaled_dot_product_attention (flash / memory-efficient kernels). On the CPU, for
    the token counts a UNet has (L <= 1024), two matmuls and a float32 softmax are faster than
    torch's CPU flash kernel, whose backward dominates at small L (fwd+bwd, bf16, 2 threads:
    L=49, d=32: 1.6 vs 10.0 ms; L=256, d=256: 2.9 vs 4.0 ms; benchmarks/cpu_kernels.py)."""
    if q.device.type != "cpu" or q.shape[-2] > 1024:
        return F.scaled_dot_product_attention(q, k, v)
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5             # [B, heads, L, L]
    probs = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))  # bf16 -> fp32
    return torch.matmul(probs.to(v.dtype), v)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, time embedding injected, GroupNorm -> SiLU -> dropout -> conv, + skip."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, groups: int, scale_shift: bool,
                 eps: float = 1e-5):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = GroupNorm32(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * c_out if scale_shift else c_out)
        self.norm2 = GroupNorm32(groups, c_out, eps=eps)
        self.dropout = Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb_proj(F.silu(emb))[:, :, None, None]            # [B, C or 2C, 1, 1]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over the H*W positions."""

    def __init__(self, channels: int, groups: int, head_channels: int, eps: float = 1e-5):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = GroupNorm32(groups, channels, eps=eps)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # Work on tokens [B, HW, C] so each head's features are unit-stride: the fused (flash)
        # CPU/GPU kernels need that, and channels_last activations give it without a copy.
        tokens = self.norm(x).flatten(2).transpose(1, 2)                           # [B, HW, C]
        qkv = F.linear(tokens, self.qkv.weight.flatten(1), self.qkv.bias)          # [B, HW, 3C]
        q, k, v = qkv.view(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # [B, heads, HW, d]
        out = attention(q, k, v)                                                    # [B, heads, HW, d]
        out = out.transpose(1, 2).reshape(b, h * w, c)                             # [B, HW, C]
        out = F.linear(out, self.proj.weight.flatten(1), self.proj.bias)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Stride-2 3x3 conv. padding 1: symmetric (ours); 0: one row/column of zeros on the bottom/right
    only (TF's "SAME" for even sizes, as the original DDPM code and diffusers' downsample_padding=0)."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: res blocks, each optionally followed by attention."""

    def __init__(self, blocks: list[ResBlock], attns: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)


class UNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.image_size <= 0 or cfg.in_channels <= 0:
            raise ValueError("ModelConfig.image_size and in_channels must be set from the data")
        patch = cfg.patch_size
        if patch < 1 or cfg.image_size % patch:
            raise ValueError(f"patch size {patch} must be >= 1 and divide the image size {cfg.image_size}")
        self.cfg = cfg
        ch, groups = cfg.base_channels, cfg.num_groups
        emb_dim = 4 * ch
        self.num_classes = cfg.num_classes if cfg.class_cond else 0

        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # +1 row: the "null" label (index num_classes) for classifier-free guidance.
        self.class_emb = nn.Embedding(self.num_classes + 1, emb_dim) if self.num_classes else None

        def res(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, c_out, emb_dim, cfg.dropout, groups, cfg.scale_shift, cfg.norm_eps)

        def attn(c: int, res_: int) -> nn.Module:
            return AttnBlock(c, groups, cfg.head_channels, cfg.norm_eps) if res_ in cfg.attn_resolutions else nn.Identity()

        # Patches stacked into channels (pixel unshuffle; Hoogeboom et al. 2023, "simple diffusion",
        # sec. 3.1): every level then runs at 1/patch of the image's size, so the convolutions cost
        # what they cost on an image patch times smaller, and the output is still at full resolution.
        self.conv_in = nn.Conv2d(cfg.in_channels * patch ** 2, ch, 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skip_channels = [ch]
        c, resolution = ch, cfg.inner_size
        for i, mult in enumerate(cfg.channel_mult):
            c_out = ch * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(res(c, c_out))
                attns.append(attn(c_out, resolution))
                c = c_out
                skip_channels.append(c)
            self.down.append(Level(blocks, attns))
            last = i == len(cfg.channel_mult) - 1
            self.downsample.append(nn.Identity() if last else Downsample(c, cfg.downsample_padding))
            if not last:
                skip_channels.append(c)
                resolution //= 2

        self.mid1 = res(c, c)
        self.mid_attn = AttnBlock(c, groups, cfg.head_channels, cfg.norm_eps)
        self.mid2 = res(c, c)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.channel_mult))):
            c_out = ch * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(res(c + skip_channels.pop(), c_out))
                attns.append(attn(c_out, resolution))
                c = c_out
            self.up.append(Level(blocks, attns))
            self.upsample.append(Upsample(c) if i > 0 else nn.Identity())
            if i > 0:
                resolution *= 2

        self.norm_out = GroupNorm32(groups, c, eps=cfg.norm_eps)
        self.conv_out = zero_init(nn.Conv2d(c, cfg.in_channels * patch ** 2, 3, padding=1))
        # Gradient checkpointing (a run-time switch, not part of the weights): residual and
        # attention blocks keep only their inputs and recompute activations in the backward pass.
        self.grad_checkpointing = False

    def _block(self, block: nn.Module, attn: nn.Module, h: Tensor, emb: Tensor) -> Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint
            # preserve_rng_state (the default) replays the same dropout masks in the recomputation
            return checkpoint(lambda a, b: attn(block(a, b)), h, emb, use_reentrant=False)
        return attn(block(h, emb))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        emb = timestep_embedding(t, self.cfg.base_channels, freq_shift=self.cfg.time_freq_shift,
                                 sin_first=self.cfg.time_sin_first)
        emb = self.time_mlp(emb.to(x.dtype))
        if self.class_emb is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.class_emb(y)
        elif y is not None:
            raise ValueError("this model is unconditional but class labels were given")

        patch = self.cfg.patch_size
        h = self.conv_in(F.pixel_unshuffle(x, patch) if patch > 1 else x)   # [B, C*P*P, H/P, W/P]
        skips = [h]
        for level, down in zip(self.down, self.downsample):
            for block, attn in zip(level.blocks, level.attns):
                h = self._block(block, attn, h, emb)
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                skips.append(h)

        h = self._block(self.mid1, self.mid_attn, h, emb)
        h = self._block(self.mid2, nn.Identity(), h, emb)

        for level, up in zip(self.up, self.upsample):
            for block, attn in zip(level.blocks, level.attns):
                h = self._block(block, attn, torch.cat([h, skips.pop()], dim=1), emb)
            h = up(h)

        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, patch) if patch > 1 else out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
