"""Data sets, their download, and the batch stream the trainer reads.

Data convention (stated once, used everywhere):
- Stored: ``ImageSet.images`` is a uint8 tensor [N, C, H, W] in [0, 255], decoded once into memory.
- Served: ``BatchStream.batch(step)`` gives float32 [B, C, H, W] in [-1, 1] (x / 127.5 - 1) on the
  training device, with labels [B] long (or None).

Sources: ``digits`` (scikit-learn's bundled 8x8 digits, upscaled to 16x16, no network), ``mnist``,
``fashion-mnist`` (original idx.gz files), ``cifar10`` (the python tarball or its extracted
batches), or a path to a folder of images (class sub-folders become labels).

Neighbours, imported in one direction only: ``imagefiles`` (what a file and a folder hold, decoding),
``hostmem`` (memory limits), ``datacache`` (the on-disk cache for folders larger than memory).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import sys
import tarfile
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import hostmem
from .datacache import HostBatches, decoded_bytes, load_folder_cached
from .errors import DiffuseError
from .fsutil import atomic_open, cache_dir
from .imagefiles import GRAY_MODES, IMAGE_EXTENSIONS, STANDARD, decode_file, is_standard, peek_folder, scan_folder
from .rng import generator

MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# (file name, md5) per split; mirrors are tried in order. Same files and checksums as the usual
# distributions, so files placed by hand (or by another tool) are found and verified.
IDX_FILES = {
    "mnist": {
        "train": [("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
                  ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432")],
        "test": [("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
                 ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c")],
    },
    "fashion-mnist": {
        "train": [("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
                  ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe")],
        "test": [("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
                 ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310")],
    },
}
CIFAR10_ARCHIVE = ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")
MIRRORS = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/",
              "https://storage.googleapis.com/cvdf-datasets/mnist/"],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    "cifar10": ["https://www.cs.toronto.edu/~kriz/"],
}
DIGITS_TEST = 297  # digits has no official split: the last 297 of 1,797 are held out as "test"


@dataclass
class ImageSet:
    images: Tensor                   # [N, C, H, W] uint8 in [0, 255]
    labels: Tensor | None            # [N] long in [0, num_classes), or None
    class_names: list[str] | None
    name: str
    split: str
    on_disk: bool = False            # images is a memory-mapped on-disk cache (datacache.py) ...
    cache_path: str | None = None    # ... in this file

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else 0


# ----------------------------------------------------------------------------------------------
# Locations and downloads

def default_data_root() -> Path:
    env = os.environ.get("DIFFUSE_DATA_ROOT")
    if env:
        return Path(env).expanduser()
    return cache_dir() / "data"


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, md5: str, timeout: float = 60.0) -> None:
    """Fetch url into dest atomically; the file appears only once its MD5 matches."""
    with atomic_open(dest, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
        h = hashlib.md5()
        for chunk in iter(lambda: resp.read(1 << 20), b""):
            h.update(chunk)
            out.write(chunk)
        if h.hexdigest() != md5:                  # raising here discards the temporary file
            raise DiffuseError(f"download of {url} has md5 {h.hexdigest()}, expected {md5}")


def fetch_files(name: str, folder: Path, files: list[tuple[str, str]]) -> list[Path]:
    """Ensure each (file, md5) is in folder: verify what is there, download what is missing.

    A failed attempt (offline, say) removes the folders it created, so it leaves nothing behind."""
    new_dirs = [d for d in (folder, *folder.parents) if not d.exists()]    # deepest first
    try:
        return _fetch_files(name, folder, files)
    except BaseException:
        for d in new_dirs:
            try:
                d.rmdir()                                   # only if still empty
            except OSError:
                break
        raise


def _fetch_files(name: str, folder: Path, files: list[tuple[str, str]]) -> list[Path]:
    paths = []
    missing = [fn for fn, _ in files if not (folder / fn).is_file()]
    for fn, md5 in files:
        path = folder / fn
        if path.is_file():
            got = md5sum(path)
            if got != md5:
                raise DiffuseError(f"{path} is corrupt or not the {name} file (md5 {got}, expected {md5}); "
                                   f"delete it to download it again")
        else:
            errors = []
            for mirror in MIRRORS[name]:
                try:
                    download(mirror + fn, path, md5)
                    break
                except DiffuseError as e:
                    errors.append(str(e))
                except OSError as e:
                    errors.append(f"{mirror}: {getattr(e, 'reason', e)}")
            else:
                raise DiffuseError(
                    f"{name}: cannot download {', '.join(missing)} ({'; '.join(errors)}); "
                    f"put the file(s) in {folder}/ by hand, or point --data-root at a folder holding {name}/")
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------
# Parsers

def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (LeCun's MNIST format), gzipped or not, into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DiffuseError(f"cannot read {path}: {e}") from None
    if len(data) < 4:
        raise DiffuseError(f"{path} is not an IDX file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DiffuseError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DiffuseError(f"{path} is truncated: {body.size} bytes for shape {shape}")
    return body.reshape(shape)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 batches while refusing anything but the numpy types they contain,
    so a tampered file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "list"), ("builtins", "dict"),
               ("_codecs", "encode")}   # protocol-2 pickles written by Python 3 encode bytes with it

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")


def read_cifar_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR-10 batch -> (images [n, 3, 32, 32] uint8, labels [n] int64)."""
    import io
    try:
        d = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as e:  # noqa: BLE001 - any malformed pickle is one user-facing error
        raise DiffuseError(f"{where} is not a CIFAR-10 python batch ({e})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1 or len(labels) != len(data):
        raise DiffuseError(f"{where} has unexpected shape {data.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise DiffuseError(f"{where} has labels outside 0..{len(CIFAR10_CLASSES) - 1} "
                           f"(found {labels.min()}..{labels.max()})")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    extracted = folder / "cifar-10-batches-py"
    if all((extracted / n).is_file() for n in names):
        parts = [read_cifar_batch((extracted / n).read_bytes(), str(extracted / n)) for n in names]
    else:
        (archive,) = fetch_files("cifar10", folder, [CIFAR10_ARCHIVE])
        parts = []
        with tarfile.open(archive, "r:gz") as tar:
            for n in names:
                member = tar.extractfile(f"cifar-10-batches-py/{n}")
                if member is None:
                    raise DiffuseError(f"{archive} lacks cifar-10-batches-py/{n}")
                parts.append(read_cifar_batch(member.read(), f"{archive}:{n}"))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def load_digits_uint8(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)[:, None]   # [1797, 1, 8, 8]
    labels = d.target.astype(np.int64)
    cut = len(images) - DIGITS_TEST
    return (images[:cut], labels[:cut]) if split == "train" else (images[cut:], labels[cut:])


def _resize_uint8(images: Tensor, size: int) -> Tensor:
    """[N, C, h, w] uint8 -> [N, C, size, size] uint8: resize the shorter side, center crop."""
    n, c, h, w = images.shape
    if h == w == size:
        return images
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    out = []
    for chunk in images.split(4096):
        x = F.interpolate(chunk.float(), size=(nh, nw), mode="bilinear", antialias=nh < h, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        out.append(x[:, :, top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def _to_channels(images: Tensor, channels: int) -> Tensor:
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    # ITU-R 601-2 luma, as Pillow's convert("L").
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


def load_folder(root: Path, image_size: int | None, channels: int | None, cache: str = "memory") -> ImageSet:
    """A folder of images (class sub-folders become labels), decoded into memory, or, for
    ``cache="disk"`` (or ``"auto"`` when the decoded set would take over half the available RAM
    across this machine's ranks), into a memory-mapped on-disk uint8 cache (datacache.py)."""
    if not root.is_dir():
        raise DiffuseError(f"data folder not found: {root}")
    files, classes = scan_folder(root)
    if not files:
        raise DiffuseError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    size = image_size or peek_folder(root).default_size
    if cache == "auto":
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        need = decoded_bytes(len(files), channels or 3, size) * ranks_here
        room = hostmem.available_ram()
        cache = "disk" if room is not None and need > room // 2 else "memory"
    if cache == "disk":
        images, label_t, classes, info = load_folder_cached(root, size, channels, cache_root=cache_dir(),
                                                            log=lambda m: print(m, file=sys.stderr, flush=True))
        return ImageSet(images, label_t, classes, str(root), "train", on_disk=True, cache_path=info["path"])
    decoded, labels, modes, bad = [], [], [], 0
    for path in files:
        got = decode_file(path, size)
        if got is None:
            bad += 1
            continue
        decoded.append(got[0])
        modes.append(got[1])
        if classes is not None:
            labels.append(classes.index(path.relative_to(root).parts[0]))
    if bad:
        warnings.warn(f"skipped {bad} unreadable image file(s) under {root}", stacklevel=2)
    if not decoded:
        raise DiffuseError(f"none of the {len(files)} image files under {root} could be read")
    images = torch.from_numpy(np.stack(decoded))
    gray = all(m in GRAY_MODES for m in modes)
    images = _to_channels(images, channels or (1 if gray else 3))
    label_t = torch.tensor(labels, dtype=torch.long) if classes is not None else None
    return ImageSet(images, label_t, classes, str(root), "train")


def fingerprint(name: str, data: ImageSet) -> dict:
    """What identifies a data set across machines, stored in every checkpoint: the image count
    and, for a folder, the number, total size and a sha256 over the sorted (relative name, size)
    of its image files. Not its location (a run may move) nor mtimes (a copy changes them).
    Standard sets are fixed files verified by checksum: their name and count suffice."""
    fp = {"count": len(data)}
    if not is_standard(name):
        root = Path(name).expanduser()
        files, _ = scan_folder(root)
        h = hashlib.sha256()
        total = 0
        for p in files:
            size = p.stat().st_size
            total += size
            h.update(f"{p.relative_to(root).as_posix()}\0{size}\n".encode())
        fp.update(files=len(files), bytes=total, sha256=h.hexdigest())
    return fp


def load_dataset(name: str, root: str | Path | None = None, split: str = "train",
                 image_size: int | None = None, channels: int | None = None, cache: str = "memory") -> ImageSet:
    """Load a data set as uint8 NCHW: into memory, or for a folder and ``cache`` disk/auto
    possibly as an on-disk memmap (``load_folder``). Errors are one-line ``DiffuseError``s."""
    if split not in ("train", "test"):
        raise DiffuseError(f"unknown split {split!r}; use train or test")
    if name == "digits":
        imgs, labels = load_digits_uint8(split)
        images, class_names = torch.from_numpy(imgs), MNIST_CLASSES
        images = _resize_uint8(images, 16)
    elif name in IDX_FILES:
        folder = Path(root or default_data_root()) / name
        img_path, lbl_path = fetch_files(name, folder, IDX_FILES[name][split])
        imgs, labels = read_idx(img_path), read_idx(lbl_path).astype(np.int64)
        if imgs.ndim != 3 or labels.ndim != 1 or len(imgs) != len(labels):
            raise DiffuseError(f"{img_path} and {lbl_path} do not match ({imgs.shape} vs {labels.shape})")
        if len(labels) and labels.max() >= 10:
            raise DiffuseError(f"{lbl_path} has labels outside 0..9 (found {labels.max()})")
        images = torch.from_numpy(imgs.copy())[:, None]
        class_names = MNIST_CLASSES if name == "mnist" else FASHION_CLASSES
    elif name == "cifar10":
        imgs, labels = load_cifar10(Path(root or default_data_root()) / "cifar10", split)
        images, class_names = torch.from_numpy(imgs.copy()), CIFAR10_CLASSES
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise DiffuseError(f"unknown data set {name!r}: not one of {', '.join(STANDARD)} and no such folder")
        if split != "train":
            raise DiffuseError(f"image folders have no {split!r} split; point --ref at another folder")
        return load_folder(path, image_size, channels, cache)
    if image_size:
        images = _resize_uint8(images, image_size)
    if channels:
        images = _to_channels(images, channels)
    return ImageSet(images.contiguous(), torch.from_numpy(np.asarray(labels)).long(), class_names, name, split)


def default_flip(name: str) -> bool:
    return name not in ("digits", "mnist", "fashion-mnist")


# ----------------------------------------------------------------------------------------------
# The batch stream

# Where the training images live while a run reads them. "device": all of them on the training
# device (the default where they fit: no copies per step); "host": in CPU memory (pinned on CUDA),
# each batch gathered there and copied; "memmap": a uint8 file mapped from disk, for sets larger
# than memory. The pick is logged at the start of a run.
PLACEMENTS = ("auto", "device", "host", "memmap")
DEVICE_FRACTION = 0.25      # "auto" keeps the set on the device while it is at most this share of its memory
HOST_FRACTION = 0.5         # ... and in host memory while it is at most this share of the RAM


def total_memory(device: torch.device) -> int:
    """Bytes of memory on ``device`` (the GPU's, or for the CPU the machine's RAM, or the memory
    cgroup's limit where that is lower: a container or a Slurm job)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 << 30
    limit = hostmem.cgroup_memory_limit()
    return min(ram, limit) if limit else ram


def choose_placement(nbytes: int, device: torch.device, setting: str = "auto", *,
                     device_bytes: int | None = None, host_bytes: int | None = None,
                     device_fraction: float = DEVICE_FRACTION, host_fraction: float = HOST_FRACTION) -> tuple[str, str]:
    """(placement, why) for a uint8 set of ``nbytes``: "device" while it is at most
    ``device_fraction`` of the device's memory, else "host" (on CUDA; on the CPU host *is* the
    device) while at most ``host_fraction`` of the RAM, else "memmap". An explicit ``setting`` wins."""
    gib = nbytes / 2 ** 30
    if setting != "auto":
        if setting not in PLACEMENTS:
            raise DiffuseError(f"--data-placement must be one of {', '.join(PLACEMENTS)}, got {setting!r}")
        return setting, f"asked for ({gib:.2f} GiB of uint8 images)"
    device_bytes = total_memory(device) if device_bytes is None else device_bytes
    host_bytes = total_memory(torch.device("cpu")) if host_bytes is None else host_bytes
    if nbytes <= device_fraction * device_bytes:
        return "device", (f"{gib:.2f} GiB of uint8 images fit in {device_fraction:.0%} of the "
                          f"{device.type} memory ({device_bytes / 2 ** 30:.0f} GiB)")
    if device.type != "cpu" and nbytes <= host_fraction * host_bytes:
        return "host", (f"{gib:.2f} GiB is over {device_fraction:.0%} of the {device_bytes / 2 ** 30:.0f} GiB "
                        f"on the device: batches are gathered in pinned host memory and copied")
    return "memmap", (f"{gib:.2f} GiB is over {host_fraction if device.type != 'cpu' else device_fraction:.0%} "
                      f"of the memory: batches are gathered from a uint8 memory map on disk")


def memmap_images(images: Tensor, path: Path) -> Tensor:
    """Write uint8 [N, C, H, W] to ``path`` and return a tensor over a read-only memory map of it
    (pages are read from disk as batches touch them)."""
    with atomic_open(path, "wb") as f:
        images.numpy().tofile(f)
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=tuple(images.shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)          # torch warns that the array is read-only
        return torch.from_numpy(mm)


class BatchStream:
    """Batches for step k, a pure function of (seed, k): resumable at any step with no saved state.

    The data is read as an endless stream of epochs, each a fresh permutation seeded by
    (seed, epoch); batch k is positions [k B, (k + 1) B) of that stream, so a batch may straddle
    two epochs and no image is dropped. Where the uint8 images live is ``placement`` (see
    PLACEMENTS): on the device, conversion to float and flips happen there. An on-disk cache
    (``ImageSet.on_disk``, datacache.py) stays memory-mapped on the host and each batch is gathered
    by a prefetching thread and copied (datacache.HostBatches).

    On CUDA with the images on the device, the permutations and flips are drawn on the GPU (from
    CUDA generators seeded the same way) and batch positions are slices, so a step makes no
    host-device sync and no copy. The CPU draws are unchanged (bit-identical to earlier versions),
    and the host/memmap placements use them too, so on the CPU every placement gives the same batches.

    Under data parallelism each rank reads only its ``rows`` of every global batch; flips are drawn
    for the whole global batch and sliced, so they do not depend on the split.
    """

    def __init__(self, data: ImageSet, batch_size: int, seed: int, device: torch.device, flip: bool,
                 placement: str = "device", memmap_path: Path | None = None, rows: slice | None = None):
        self.n = len(data)
        self.batch_size = batch_size
        self.seed = seed
        self.flip = flip
        self.device = device
        # This process's rows of every global batch (data-parallel ranks take disjoint slices).
        self.rows = rows or slice(0, batch_size)
        self._host_batches = None
        if getattr(data, "on_disk", False):      # memory-mapped uint8 cache: gathered on the host, copied per batch
            placement = "disk-cache"
            self.images = data.images
            self._host_batches = HostBatches(data.images, device)
        elif placement == "device":
            self.images = data.images.to(device)
        elif placement == "host":
            self.images = data.images.pin_memory() if device.type == "cuda" else data.images
        elif placement == "memmap":
            if memmap_path is None:
                raise ValueError("memmap placement needs a memmap_path")
            self.images = memmap_images(data.images, memmap_path)
        else:
            raise ValueError(f"unknown placement {placement!r}")
        self.placement = placement
        self.labels = data.labels
        if data.labels is not None and placement in ("device", "disk-cache"):
            self.labels = data.labels.to(device)
        # where indices, permutations and flips are drawn: the GPU only when the images are there
        self.draw_device = device if placement == "device" else torch.device("cpu")
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            if self.draw_device.type == "cuda":
                g = generator(self.seed, "epoch", epoch, device=self.draw_device)
                self._perms[epoch] = torch.randperm(self.n, generator=g, device=self.draw_device)
            else:
                self._perms[epoch] = torch.randperm(self.n, generator=generator(self.seed, "epoch", epoch))
        return self._perms[epoch]

    def indices(self, step: int) -> Tensor:
        """Image indices [B] of batch ``step``: slices of one or more epochs' permutations (plain
        integer arithmetic on the host, slicing on the device: no sync)."""
        start, end = step * self.batch_size, (step + 1) * self.batch_size
        parts = []
        while start < end:
            epoch, offset = divmod(start, self.n)
            take = min(end - start, self.n - offset)
            parts.append(self._perm(epoch)[offset:offset + take])
            start += take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / self.n

    def _flips(self, step: int, b: int) -> Tensor:
        if self.draw_device.type == "cuda":
            g = generator(self.seed, "flip", step, device=self.draw_device)
            return torch.rand(b, generator=g, device=self.draw_device) < 0.5
        return torch.rand(b, generator=generator(self.seed, "flip", step)) < 0.5

    def batch(self, step: int) -> tuple[Tensor, Tensor | None]:
        """This process's rows of global batch ``step``: x [b, C, H, W] float in [-1, 1], y [b] or None."""
        idx = self.indices(step)[self.rows]
        if self._host_batches is not None:
            raw = self._host_batches.get(step, idx, lambda k: self.indices(k)[self.rows])   # on the device
            if self.labels is not None:
                idx = idx.to(self.labels.device)
        else:
            raw = self.images[idx]                                    # uint8 [b, C, H, W], gathered where it lives
        y = self.labels[idx] if self.labels is not None else None
        if self.placement in ("host", "memmap") and self.device.type == "cuda":
            # one copy per batch, from pinned memory so it is asynchronous
            raw = raw.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True) if y is not None else None
        elif self.placement in ("host", "memmap"):
            raw = raw.to(self.device)
            y = y.to(self.device) if y is not None else None
        x = raw.float().div_(127.5).sub_(1.0)                         # [b, C, H, W] in [-1, 1]
        if self.flip:
            flips = self._flips(step, self.batch_size)[self.rows]     # the global batch's draws, this rank's rows
            if flips.device != x.device:
                flips = flips.to(x.device)
            x = torch.where(flips[:, None, None, None], x.flip(-1), x)
        return x, y
