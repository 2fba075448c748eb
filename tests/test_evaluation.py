"""evaluation.py: FID/KID of a model's samples or between sets, the library behind eval and
FID during training."""

import numpy as np
import pytest

from diffuse import evaluation, fid, train
from diffuse.generate import Loaded, generate
from diffuse.sampling import SamplingSpec

from .conftest import tiny_loaded

META = {"extractor": {"name": "test", "hash": "h", "resize": "tf-bilinear"}}


class PixelFeatures:
    """A stand-in extractor: the first 16 pixel values as features (deterministic, no Inception)."""

    def describe(self):
        return dict(META["extractor"])

    def features(self, images, batch_size=50, progress=False):
        return images.reshape(len(images), -1)[:, :16].double().numpy() / 255


@pytest.fixture(scope="module")
def loaded() -> Loaded:
    return tiny_loaded()


def test_compare_sets_of_statistics_needs_no_extractor_and_saves_a(tmp_path):
    rng = np.random.default_rng(3)
    a = fid.Stats(rng.normal(size=4), np.diag(rng.uniform(0.5, 2, 4)), 100, None, META)
    b = fid.Stats(rng.normal(size=4), np.diag(rng.uniform(0.5, 2, 4)), 50, None, META)
    fid.save_stats(tmp_path / "a.npz", a)
    fid.save_stats(tmp_path / "b.npz", b)

    def no_extractor():
        raise AssertionError("statistics need no Inception network")

    r = evaluation.compare_sets(tmp_path / "a.npz", tmp_path / "b.npz", no_extractor, save_stats=tmp_path / "s.npz")
    assert r["fid"] == pytest.approx(fid.frechet_distance(a.mu, a.sigma, b.mu, b.sigma), rel=1e-12)
    assert (r["n"], r["n_ref"], r["a"], r["b"]) == (100, 50, str(tmp_path / "a.npz"), str(tmp_path / "b.npz"))
    np.testing.assert_array_equal(fid.load_stats(tmp_path / "s.npz").mu, a.mu)


def test_evaluate_is_generate_then_statistics_then_compare(loaded):
    ex = PixelFeatures()
    ref = fid.stats_from_features(np.random.default_rng(0).uniform(size=(40, 16)), dict(META))
    spec = SamplingSpec("ddim", 3, seed=5)
    r = evaluation.evaluate(loaded, 12, spec, reference=ref, extractor=ex, batch_size=5)
    images, _ = generate(loaded, n=12, seed=5, sampler="ddim", steps=3, batch_size=12)
    want = fid.compare(fid.stats_from_features(ex.features(images), dict(META)), ref)
    assert r["fid"] == pytest.approx(want["fid"], rel=1e-12) and r["kid"] == pytest.approx(want["kid"], rel=1e-12)
    assert (r["sampler"], r["steps"], r["spacing"], r["eta"], r["n"], r["n_ref"]) == ("ddim", 3, "trailing", 0.0, 12, 40)
    assert r["seeds"]["seed"] == 5 and r["seconds"] > 0


def test_fid_during_training_is_the_evaluation_one():
    assert train.FidDuringTraining is evaluation.FidDuringTraining
