"""FID and KID of image sets, and cached statistics of the real data.

Fréchet Inception Distance (Heusel et al. 2017, "GANs trained by a two time-scale update rule",
eq. 6), between Gaussians fitted to the pool3 features of two image sets:

    FID = ||mu_1 - mu_2||^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2))

mu is the feature mean and Sigma the covariance (N - 1 denominator), both float64. The trace term
is computed by eigendecomposition: Sigma_1 Sigma_2 is similar to the symmetric PSD matrix
A = Sigma_1^(1/2) Sigma_2 Sigma_1^(1/2), so Tr((Sigma_1 Sigma_2)^(1/2)) = sum_i sqrt(lambda_i(A)).
Two symmetric eigendecompositions take 1.7 s for d = 2048 on 2 CPU cores against 10 s for
scipy's general sqrtm, and agree with it to 1e-15 relative (tested); ``method="sqrtm"`` keeps the
reference code's route (retry with eps I on a non-finite result, drop an imaginary part whose
diagonal is below 1e-3, an error above).

Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs", sec. 3 and app. D):
the unbiased estimator of MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3,
d = 2048, computed on ``subsets`` random pairs of subsets of ``subset_size`` images each; reported
as mean and standard deviation over subsets.

Bias: FID estimated from N images is biased upward, roughly by a constant / N (Chong & Forsyth
2020, "Effectively unbiased FID"), so FIDs are comparable only at equal N, and a small-N FID is
not the 50k number papers report. KID is unbiased, and its std says how much to trust it.

Images reach Inception as described in ``inception.py`` (uint8, gray repeated to RGB, TF1
bilinear resize to 299, (x - 128) / 128).

Reference statistics (``reference_stats``) come from ``data.load_dataset``'s uint8 images, with no
flips or other augmentation, and are cached in ``cache_dir()/fid/`` as ``.npz`` (mu, sigma, a seeded
subsample of up to ``KID_KEEP`` features for KID) beside a ``.json`` of their key: data set, its
folder fingerprint, split, N, subset seed, image size, channels, resize and the extractor's file
hash. The file name carries a digest of the key, and a cached file is used only when its stored
key is equal.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from .data import cache_dir
from .errors import DiffuseError
from .fsutil import atomic_open, atomic_write
from .inception import InceptionExtractor

KID_KEEP = 5000           # features kept with a statistics file, for KID (a seeded subsample)
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
USUAL_N = 50_000          # the N papers report FID at; below it, warn that FID reads high
CACHE_VERSION = 1
SUBSET_SEED = 0           # which N images of a data set a reference uses (seeded, sorted)
STATS_FORMAT = "diffuse-fid-stats"


# ----------------------------------------------------------------------------------------------
# Statistics and distances

@dataclass
class Stats:
    mu: np.ndarray                       # [D] float64
    sigma: np.ndarray                    # [D, D] float64, N - 1 denominator
    n: int                               # images the statistics summarise
    features: np.ndarray | None = None   # [k, D] float32, k <= KID_KEEP: a seeded subsample, for KID
    meta: dict[str, Any] = field(default_factory=dict)   # extractor, source, seeds, cache key, ...


def stats_from_features(features: np.ndarray, meta: dict[str, Any] | None = None, keep: int = KID_KEEP,
                        seed: int = 0) -> Stats:
    """Mean and covariance in float64 (centred, accumulated in chunks), plus up to ``keep`` features."""
    f = np.asarray(features)
    if f.ndim != 2 or len(f) < 2:
        raise DiffuseError(f"statistics need at least 2 images, got features of shape {f.shape}")
    n, d = f.shape
    mu = f.mean(0, dtype=np.float64)
    sigma = np.zeros((d, d))
    for start in range(0, n, 4096):
        c = f[start:start + 4096].astype(np.float64) - mu
        sigma += c.T @ c
    sigma /= n - 1
    kept = f if n <= keep else f[np.sort(np.random.default_rng(seed).choice(n, keep, replace=False))]
    return Stats(mu, sigma, n, np.ascontiguousarray(kept, np.float32), dict(meta or {}))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    import scipy.linalg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # "matrix is singular" notes; handled below
        out = scipy.linalg.sqrtm(a)
    return out[0] if isinstance(out, tuple) else out


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """Tr((S1 S2)^(1/2)) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))) for symmetric PSD S1, S2."""
    w, v = np.linalg.eigh(s1)
    scale = max(1.0, float(np.abs(w).max()))
    if w.min() < -1e-6 * scale:
        raise DiffuseError(f"Sigma has a negative eigenvalue ({w.min():.3g}): the statistics are not a valid "
                           f"covariance matrix")
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    a = root @ s2 @ root
    ev = np.linalg.eigvalsh((a + a.T) / 2)
    if ev.min() < -1e-6 * max(1.0, float(np.abs(ev).max())):
        raise DiffuseError(f"Sigma has a negative eigenvalue ({ev.min():.3g}): the statistics are not a valid "
                           f"covariance matrix")
    return float(np.sqrt(np.clip(ev, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, method: str = "eigh") -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64 (see the module docstring).
    method: "eigh" (default, fast) or "sqrtm" (scipy's general matrix square root)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise DiffuseError(f"statistics of different shapes: mu {mu1.shape} vs {mu2.shape}, "
                           f"sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    if method == "eigh":
        return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_product(s1, s2))
    if method != "sqrtm":
        raise ValueError(f"unknown method {method!r}")
    covmean = _sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = _sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise DiffuseError(f"sqrt(Sigma1 Sigma2) has an imaginary part of {np.abs(covmean.imag).max():.3g}: "
                               f"the statistics are not valid covariance matrices")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between samples x [m, d] and y [n, d] with k(a, b) = (a.b / d + 1)^3.

    Gram matrices are float32 products (features are O(1)), the kernel and sums float64;
    the diagonal terms k(x_i, x_i) are left out of the within-set means."""
    m, n, d = len(x), len(y), x.shape[1]
    x32, y32 = np.asarray(x, np.float32), np.asarray(y, np.float32)
    kxx = (( x32 @ x32.T).astype(np.float64) / d + 1) ** 3
    kyy = ((y32 @ y32.T).astype(np.float64) / d + 1) ** 3
    kxy = ((x32 @ y32.T).astype(np.float64) / d + 1) ** 3
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kid(f1: np.ndarray, f2: np.ndarray, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
        seed: int = 0) -> tuple[float, float]:
    """KID: mean and std of ``polynomial_mmd2`` over random subset pairs (sampled without replacement,
    size min(subset_size, len(f1), len(f2))). When that size is both sets whole, one pair suffices."""
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise DiffuseError(f"KID needs at least 2 images per set, got {len(f1)} and {len(f2)}")
    if m == len(f1) == len(f2):
        return polynomial_mmd2(f1, f2), 0.0
    rng = np.random.default_rng(seed)
    values = [polynomial_mmd2(f1[rng.choice(len(f1), m, replace=False)], f2[rng.choice(len(f2), m, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


# ----------------------------------------------------------------------------------------------
# Statistics files

def save_stats(path: str | Path, stats: Stats) -> Path:
    """Write stats as .npz (mu, sigma, n, features, meta as JSON) atomically."""
    path = Path(path)
    if path.suffix != ".npz":
        raise DiffuseError(f"statistics files end in .npz, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {"mu": stats.mu, "sigma": stats.sigma, "n": np.int64(stats.n),
                              "meta": np.array(json.dumps({"format": STATS_FORMAT, **stats.meta}))}
    if stats.features is not None:
        arrays["features"] = stats.features
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def _open_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DiffuseError(f"no such file: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file is one user-facing error
        raise DiffuseError(f"{path} is not a readable .npz file ({type(e).__name__}: {e})") from None


def stats_from_arrays(z: dict[str, np.ndarray], where: str) -> Stats:
    if "mu" not in z or "sigma" not in z:
        raise DiffuseError(f"{where} is not a statistics file (no 'mu' and 'sigma' arrays)")
    if not all(z[k].dtype.kind in "fiu" for k in ("mu", "sigma")):
        raise DiffuseError(f"{where}: mu and sigma must be numeric arrays, got {z['mu'].dtype} and {z['sigma'].dtype}")
    mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise DiffuseError(f"{where}: mu or sigma holds NaN or inf")
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise DiffuseError(f"{where}: mu {mu.shape} and sigma {sigma.shape} are not a mean and its covariance")
    meta: dict[str, Any] = {}
    if "meta" in z:
        try:
            meta = json.loads(str(z["meta"]))
        except json.JSONDecodeError:
            raise DiffuseError(f"{where}: its meta record is not JSON") from None
        if not isinstance(meta, dict):
            raise DiffuseError(f"{where}: its meta record is not a JSON object")
    feats = z.get("features")
    if feats is not None and (feats.ndim != 2 or feats.shape[1] != mu.shape[0]):
        raise DiffuseError(f"{where}: features {feats.shape} do not match mu {mu.shape}")
    try:
        n = int(z["n"]) if "n" in z else int(meta.get("n", 0))
    except (TypeError, ValueError, AttributeError):
        raise DiffuseError(f"{where}: n is not a count") from None
    return Stats(mu, sigma, n, None if feats is None else feats.astype(np.float32), meta)


def load_stats(path: str | Path) -> Stats:
    """Read a statistics .npz (ours, or any with ``mu`` and ``sigma``, e.g. pytorch-fid's)."""
    path = Path(path)
    z = _open_npz(path)
    if "mu" not in z or "sigma" not in z:
        raise DiffuseError(f"{path} holds no statistics (arrays mu and sigma); it has: {', '.join(z) or 'nothing'}")
    return stats_from_arrays(z, str(path))


# ----------------------------------------------------------------------------------------------
# Image sets

def images_from_array(arr: np.ndarray, where: str) -> Tensor:
    """uint8 NHWC (C = 1 or 3) or NHW -> uint8 tensor [N, C, H, W]."""
    if arr.dtype != np.uint8:
        raise DiffuseError(f"{where}: images must be uint8 in [0, 255], got {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3) or len(arr) == 0:
        raise DiffuseError(f"{where}: expected images as uint8 [N, H, W, C] with C = 1 or 3, got shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()


def load_image_folder(root: Path) -> Tensor:
    """Every image under root (sorted, recursive) as uint8 [N, C, H, W]: gray files stay 1-channel
    unless some file is colour; all must have one size (FID compares sets, it does not crop)."""
    from PIL import Image, UnidentifiedImageError

    from .data import scan_folder
    files, _ = scan_folder(root)
    if not files:
        raise DiffuseError(f"no images found under {root}")
    arrays, sizes = [], set()
    for p in files:
        try:
            with Image.open(p) as im:
                im = im.convert("L") if im.mode in ("1", "L", "LA", "I", "I;16", "F") else im.convert("RGB")
                a = np.asarray(im, np.uint8)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            raise DiffuseError(f"cannot read image {p} ({e})") from None
        arrays.append(a[..., None] if a.ndim == 2 else a)
        sizes.add(a.shape[:2])
    if len(sizes) > 1:
        raise DiffuseError(f"images under {root} have {len(sizes)} different sizes, e.g. {sorted(sizes)[:2]}; "
                           f"FID needs one size per set")
    if any(a.shape[-1] == 3 for a in arrays):
        arrays = [np.repeat(a, 3, -1) if a.shape[-1] == 1 else a for a in arrays]
    return images_from_array(np.stack(arrays), str(root))


def load_set(path: str | Path) -> Tensor | Stats:
    """An image set for --fid-between: a folder of images, an .npz of ``images`` (uint8 NHWC, as
    ``diffuse sample --out X.npz`` writes), or a statistics .npz (``mu``, ``sigma``)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return load_image_folder(path)
    if path.suffix.lower() != ".npz":
        raise DiffuseError(f"{path}: expected a folder of images, or an .npz of images or statistics")
    z = _open_npz(path)
    if "mu" in z and "sigma" in z:
        return stats_from_arrays(z, str(path))
    if "images" in z:
        return images_from_array(z["images"], str(path))
    raise DiffuseError(f"{path} has neither images (an 'images' array) nor statistics ('mu', 'sigma'); "
                       f"it has: {', '.join(z) or 'nothing'}")


# ----------------------------------------------------------------------------------------------
# Comparing sets

def extractor_record(stats: Stats) -> dict[str, Any] | None:
    return stats.meta.get("extractor")


def check_compatible(a: Stats, b: Stats, names: tuple[str, str] = ("A", "B")) -> None:
    """Refuse to compare statistics from different weights or preprocessing; warn when one has no record."""
    ea, eb = extractor_record(a), extractor_record(b)
    if ea is None or eb is None:
        which = names[0] if ea is None else names[1]
        warnings.warn(f"{which} records no extractor (not written by diffuse); assuming the same Inception "
                      f"weights and preprocessing", stacklevel=2)
        return
    for k, what in (("hash", "weights"), ("resize", "resize methods")):
        if ea.get(k) != eb.get(k):
            raise DiffuseError(f"{names[0]} and {names[1]} were computed with different Inception {what} "
                               f"({ea.get(k)} vs {eb.get(k)}); recompute one of them")


def compare(a: Stats, b: Stats, *, kid_subsets: int = KID_SUBSETS, kid_subset_size: int = KID_SUBSET_SIZE,
            seed: int = 0, names: tuple[str, str] = ("A", "B")) -> dict[str, Any]:
    """{fid, kid, kid_std, n, n_ref, extractor}; KID is None when either side kept no features."""
    check_compatible(a, b, names)
    out: dict[str, Any] = {"fid": frechet_distance(a.mu, a.sigma, b.mu, b.sigma), "kid": None, "kid_std": None}
    if a.features is not None and b.features is not None:
        out["kid"], out["kid_std"] = kid(a.features, b.features, kid_subsets, kid_subset_size, seed)
    out.update(n=a.n, n_ref=b.n, extractor=extractor_record(a) or extractor_record(b))
    return out


def stats_of_images(images: Tensor, extractor: InceptionExtractor, *, batch_size: int = 50,
                    progress: bool | Callable[[int], None] = False, meta: dict[str, Any] | None = None) -> Stats:
    feats = extractor.features(images, batch_size=batch_size, progress=progress)
    return stats_from_features(feats, {"extractor": extractor.describe(), "n": len(feats), **(meta or {})})


def fid_of_images(images: Tensor, ref: Stats, extractor: InceptionExtractor, *, batch_size: int = 50,
                  progress: bool | Callable[[int], None] = False, kid_subsets: int = KID_SUBSETS,
                  kid_subset_size: int = KID_SUBSET_SIZE) -> dict[str, Any]:
    """FID and KID of uint8 images [N, C, H, W] against reference statistics.

    For the training loop: load the extractor once (``inception.load_extractor``) and the
    reference once (``reference_stats``); each call then costs N Inception passes and the KID."""
    gen = stats_of_images(images, extractor, batch_size=batch_size, progress=progress)
    return compare(gen, ref, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                   names=("the generated images", "the reference"))


def small_n_note(n: int) -> str | None:
    """The caveat to print beside a FID from fewer than USUAL_N images (None at or above it)."""
    if n >= USUAL_N:
        return None
    return (f"FID from N={n:,} images is biased upward (it falls as N grows; papers use N={USUAL_N:,}); "
            f"compare FIDs only at equal N")


# ----------------------------------------------------------------------------------------------
# Reference statistics, cached


def folder_fingerprint(root: Path) -> str:
    """sha256 over (relative path, size, mtime) of a folder's images: changes when its files do."""
    from .data import scan_folder
    files, _ = scan_folder(root)
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def reference_key(data: str, split: str, n: int | None, *, extractor_hash: str, resize: str,
                  image_size: int | None = None, channels: int | None = None) -> dict[str, Any]:
    """Everything reference statistics depend on; the cache is keyed on all of it."""
    from .data import is_standard
    if is_standard(data):
        name, fingerprint = data, None
    else:
        path = Path(data).expanduser().resolve()
        if not path.is_dir():
            raise DiffuseError(f"unknown data set {data!r}: not one of digits, mnist, fashion-mnist, cifar10, "
                               f"and no such folder")
        name, fingerprint = str(path), folder_fingerprint(path)
    return {"format": "diffuse-fid-reference", "version": CACHE_VERSION, "data": name, "fingerprint": fingerprint,
            "split": split, "n": n if n is not None else "all", "subset_seed": SUBSET_SEED,
            "image_size": image_size, "channels": channels, "resize": resize, "extractor": extractor_hash}


def reference_path(key: dict[str, Any], root: Path | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(key["data"]).name if key["fingerprint"] else key["data"])[:40]
    return (root or cache_dir()) / "fid" / f"{slug}-{key['split']}-n{key['n']}-{key['resize']}-{digest}.npz"


def _read_cached(path: Path, key: dict[str, Any]) -> Stats | None:
    sidecar = path.with_suffix(".json")
    if not (path.is_file() and sidecar.is_file()):
        return None
    try:
        if json.loads(sidecar.read_text(errors="replace")) != key:
            return None
        return load_stats(path)
    except (OSError, json.JSONDecodeError, DiffuseError) as e:
        warnings.warn(f"ignoring unreadable cached statistics {path} ({e}); recomputing", stacklevel=3)
        return None


def reference_stats(data: str, split: str = "train", n: int | None = None, *, extractor: InceptionExtractor,
                    data_root: str | Path | None = None, image_size: int | None = None, channels: int | None = None,
                    batch_size: int = 50, progress: bool = False, cache: bool = True) -> Stats:
    """Statistics of a real data set as ``data.load_dataset`` gives it (uint8, no augmentation).

    n: how many images (a seeded random subset, so class-sorted folders are sampled evenly);
    None = the whole split. Cached under ``cache_dir()/fid/`` unless ``cache=False``."""
    from .data import load_dataset
    if n is not None and n < 2:
        raise DiffuseError(f"reference N must be at least 2, got {n}")
    key = reference_key(data, split, n, extractor_hash=extractor.hash, resize=extractor.resize,
                        image_size=image_size, channels=channels)
    path = reference_path(key)
    if cache:
        hit = _read_cached(path, key)
        if hit is not None:
            hit.meta["cache"] = str(path)
            return hit
    ds = load_dataset(data, data_root, split, image_size, channels)
    images = ds.images
    if n is not None and n < len(images):
        idx = np.sort(np.random.default_rng(SUBSET_SEED).permutation(len(images))[:n])
        images = images[torch.from_numpy(idx)]
    if progress:
        from tqdm import tqdm
        with tqdm(total=len(images), unit="img", desc=f"reference {data}:{split}", file=sys.stderr,
                  disable=not sys.stderr.isatty()) as bar:
            feats = extractor.features(images, batch_size=batch_size, progress=bar.update)
    else:
        feats = extractor.features(images, batch_size=batch_size)
    stats = stats_from_features(feats, {"extractor": extractor.describe(), "n": len(feats), "reference": key})
    if cache:
        save_stats(path, stats)
        atomic_write(path.with_suffix(".json"), json.dumps(key, indent=2, sort_keys=True))
        stats.meta["cache"] = str(path)
    return stats
