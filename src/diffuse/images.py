"""Image conversion and writing: [-1, 1] float tensors <-> uint8, grids, PNG/NPZ output."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from .errors import DiffuseError


def to_uint8(x: Tensor) -> Tensor:
    """[B, C, H, W] float in [-1, 1] -> uint8 in [0, 255] (round to nearest, clamp), on CPU."""
    return ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def upscale(x: Tensor, size: int | None) -> Tensor:
    """x float [B, C, h, h] in [-1, 1] -> [B, C, size, size]: bicubic, clamped back to [-1, 1] (the
    cubic kernel overshoots at edges); ``x`` itself when ``size`` is None or already h. How a run
    trained below its output size (``train.output_size``, docs/budgets.md) writes its images."""
    if size is None or x.shape[-1] == size:
        return x
    return torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bicubic",
                                           align_corners=False).clamp(-1, 1)


def make_grid(images: Tensor, nrow: int | None = None, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """uint8 [N, C, H, W] -> uint8 [rows*(H+p)+p, cols*(W+p)+p, C] (C is 1 or 3), row-major."""
    n, c, h, w = images.shape
    cols = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), pad_value, np.uint8)
    arr = images.permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, col = divmod(i, cols)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = arr[i]
    return grid


def to_pil(arr: np.ndarray, scale: int = 1) -> Image.Image:
    """HWC uint8 -> PIL image, nearest-upscaled by ``scale`` so tiny images stay visible."""
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    return img


def display_scale(image_size: int) -> int:
    """Upscale factor so small images (MNIST, digits) are legible in a grid PNG."""
    return max(1, 64 // image_size)


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None, row_labels: list[str] | None = None,
              scale: int | None = None) -> None:
    """Write uint8 [N, C, H, W] as one PNG grid; optional labels down the left edge, one per row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(images, nrow, row_labels, scale).save(path)


def png_bytes(img: Image.Image) -> bytes:
    """PIL image -> PNG file bytes; deterministic for the same pixels (no timestamps in PNG)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def grid_image(images: Tensor, nrow: int | None = None, row_labels: list[str] | None = None,
               scale: int | None = None) -> Image.Image:
    """uint8 [N, C, H, W] -> the PIL grid ``save_grid`` writes (upscaled, optionally row-labelled)."""
    arr = make_grid(images, nrow)
    img = to_pil(arr, scale or display_scale(images.shape[-1]))
    if row_labels:
        img = img.convert("RGB")
        rows = len(row_labels)
        margin = 8 + 7 * max(len(s) for s in row_labels)
        canvas = Image.new("RGB", (img.width + margin, img.height), (255, 255, 255))
        canvas.paste(img, (margin, 0))
        draw = ImageDraw.Draw(canvas)
        row_h = img.height / rows
        for r, label in enumerate(row_labels):
            draw.text((4, int(r * row_h + row_h / 2 - 5)), label, fill=(0, 0, 0))
        img = canvas
    return img


def save_images(images: Tensor, out: str | Path, labels: Tensor | None = None, nrow: int | None = None,
                row_labels: list[str] | None = None, first_index: int = 0, meta: str | None = None) -> Path:
    """Write uint8 [N, C, H, W] by the output's form: ``.png`` grid, ``.npz`` arrays (plus ``meta``,
    a JSON string, when given; written once, atomically), or a folder."""
    out = Path(out)
    if out.suffix.lower() == ".png":
        save_grid(images, out, nrow=nrow, row_labels=row_labels)
    elif out.suffix.lower() == ".npz":
        out.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"images": images.permute(0, 2, 3, 1).numpy()}        # uint8 NHWC
        if labels is not None:
            arrays["labels"] = labels.cpu().numpy()
        if meta is not None:
            arrays["meta"] = np.array(meta)
        from .fsutil import atomic_open
        with atomic_open(out, "wb") as f:
            np.savez(f, **arrays)
    elif out.suffix == "":
        out.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            name = f"{first_index + i:06d}"
            if labels is not None:
                name += f"_class{int(labels[i])}"
            to_pil(img.permute(1, 2, 0).numpy()).save(out / f"{name}.png")
    else:
        raise DiffuseError(f"--out {out}: use a .png (grid), a .npz (arrays) or a directory (one PNG per image)")
    return out
