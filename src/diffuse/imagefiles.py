"""Image files on disk: what a data name means, which files a folder holds, and how one file is
decoded. No torch and no numpy at import (both are imported where used), so ``config`` can read a
folder's defaults and the on-disk cache's decode workers start light.

Decoding convention (the data convention of ``data.py``, before it becomes a tensor): every file
gives uint8 [3, S, S] RGB in [0, 255], its mode normalised to "L" or "RGB" as a person would see
the image (``normalise_mode``), resized on the shorter side (bicubic) and center-cropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

STANDARD = ("digits", "mnist", "fashion-mnist", "cifar10")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_IMAGE_PIXELS = 64 * 2 ** 20      # larger images are refused (decompression bombs): 64 MP, 8192^2
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
FOLDER_MAX_OWN_SIZE = 64      # a folder's images keep their own size up to this; larger (or mixed) go to 64


def is_standard(name: str) -> bool:
    return name in STANDARD


def scan_folder(root: Path) -> tuple[list[Path], list[str] | None]:
    """(image files under ``root`` in sorted order, class names or None). Hidden files and folders
    are skipped; class sub-folders become labels only when every image sits in one."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    subdirs = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    top_level = [p for p in files if len(p.relative_to(root).parts) == 1]
    classes = subdirs if subdirs and not top_level else None
    return files, classes


@dataclass
class FolderShape:
    """What a folder's image headers say, read without decoding the pixels."""
    count: int                      # readable image files
    sizes: set[tuple[int, int]]     # distinct (width, height)
    gray: bool                      # every image is single-channel

    @property
    def default_size(self) -> int:
        """The folder's default training size: the images' own (shorter side) when they all share
        one size of at most FOLDER_MAX_OWN_SIZE pixels, else 64."""
        if len(self.sizes) == 1:
            own = min(next(iter(self.sizes)))
            if own <= FOLDER_MAX_OWN_SIZE:
                return own
        return 64

    @property
    def channels(self) -> int:
        return 1 if self.gray else 3


def files_shape(files: list[Path]) -> FolderShape:
    """Sizes and modes of ``files`` from their headers (Pillow opens lazily: no decoding);
    unreadable files are left out of the count."""
    from PIL import Image, UnidentifiedImageError

    sizes, gray, count = set(), True, 0
    for path in files:
        try:
            with Image.open(path) as im:
                sizes.add(im.size)
                gray = gray and im.mode in GRAY_MODES
                count += 1
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError):
            continue
    return FolderShape(count, sizes, gray and count > 0)


def peek_folder(root: Path) -> FolderShape:
    """``files_shape`` of the images ``scan_folder`` finds under ``root``."""
    return files_shape(scan_folder(root)[0])


def normalise_mode(im):
    """Any Pillow image -> "L" or "RGB" as a person would see it: EXIF orientation applied, 16-bit
    gray scaled to 8 bits (not clipped to white), transparency composited on white, palette and
    CMYK converted. Animated files give their first frame."""
    import numpy as np
    from PIL import Image, ImageOps
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im).astype(np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "1":
        return im.convert("L")
    if im.mode == "F":
        return Image.fromarray(np.clip(np.nan_to_num(np.asarray(im)), 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("L" if im.mode in ("LA", "La") else "RGB")
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")                     # 1, CMYK, YCbCr, LAB, HSV, ...
    return im


def decode_file(path: Path, size: int) -> tuple[np.ndarray, str] | None:
    """One image file -> (uint8 [3, size, size] RGB, its mode after ``normalise_mode``: "L" or
    "RGB"), resized on the shorter side (bicubic) and center-cropped; None if unreadable or larger
    than MAX_IMAGE_PIXELS (a decompression bomb is refused before a pixel is decoded).
    ``data.load_folder`` and the on-disk cache both decode through here."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                return None
            im.load()
            im = normalise_mode(im)
            mode = im.mode
            im = im.convert("RGB")
            w, h = im.size
            scale = size / min(w, h)
            im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1), mode
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError):
        return None
