"""Class-conditional runs through the real CLI: --class, --guidance defaults, one-line errors, and
`diffuse eval --classifier-accuracy`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from .conftest import TINY_FLAGS
from .test_cli import diffuse


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cond") / "run"
    diffuse("train", "--class-cond", "--sample-guidance", "1.5", "--steps", 3, "--batch-size", 8,
            "--sample-n", 10, "--sample-steps", 2, "--out", out, *TINY_FLAGS)
    return out


def test_class_all_grid_labels_and_run_default_guidance(cond_run, tmp_path):
    diffuse("sample", cond_run, "--class", "all", "--n", 20, "--steps", 2, "--out", tmp_path / "a.npz")
    a = np.load(tmp_path / "a.npz")
    assert a["images"].shape == (20, 16, 16, 1)
    assert a["labels"].tolist() == [k for k in range(10) for _ in range(2)]       # one row per class
    assert json.loads(str(a["meta"]))["guidance"] == 1.5                         # the run's --sample-guidance
    diffuse("sample", cond_run, "--class", "7", "--n", 2, "--steps", 2, "--guidance", "0", "--out", tmp_path / "b.npz")
    b = np.load(tmp_path / "b.npz")
    assert b["labels"].tolist() == [7, 7] and json.loads(str(b["meta"]))["guidance"] == 0.0
    # unconditional sampling from a conditional model: the null class, no guidance
    diffuse("sample", cond_run, "--n", 2, "--steps", 2, "--out", tmp_path / "c.npz")
    assert json.loads(str(np.load(tmp_path / "c.npz")["meta"]))["guidance"] == 0.0


@pytest.mark.parametrize("args, needle", [
    (["--class", "eleven"], "unknown class 'eleven'"),
    (["--class", "10"], "out of range"),
    (["--class", "-1"], "out of range"),
    (["--guidance", "2"], "--guidance needs --class"),
])
def test_class_errors_are_one_line(cond_run, tmp_path, args, needle):
    p = diffuse("sample", cond_run, *args, "--steps", 1, "--n", 1, "--out", tmp_path / "x.png", check=False)
    err = p.stderr.strip()
    assert p.returncode != 0 and needle in err and len(err.splitlines()) == 1, err


def test_classifier_accuracy_sweep(cond_run, tmp_path, monkeypatch):
    env_cache = os.environ.get("DIFFUSE_TEST_CACHE")       # conftest shares one judge across test files
    assert env_cache
    p = diffuse("eval", cond_run, "--classifier-accuracy", "--guidance-sweep", "0,1.5", "--n-per-class", 2,
                "--steps", 2, "--json")
    res = json.loads(p.stdout)
    assert res["judge"]["test_accuracy"] > 0.9                  # the judge itself reads real digits
    assert [r["guidance"] for r in res["sweep"]] == [0.0, 1.5] and res["default_guidance"] == 1.5
    for r in res["sweep"]:
        assert r["n"] == 20 and len(r["per_class"]) == 10 and 0 <= r["accuracy"] <= 1
        assert r["accuracy"] == pytest.approx(np.mean(list(r["per_class"].values())), abs=1e-3)
    p = diffuse("eval", cond_run, "--classifier-accuracy", "--guidance-sweep", "0", "--n-per-class", 1, "--steps", 2)
    assert "<- the run's default" not in p.stdout and "guidance w" in p.stdout
    bad = diffuse("eval", cond_run, "--classifier-accuracy", "--guidance-sweep", "a,b", check=False)
    assert bad.returncode != 0 and "--guidance-sweep wants numbers" in bad.stderr
    empty = diffuse("eval", cond_run, "--classifier-accuracy", "--guidance-sweep", ",", check=False)
    assert empty.returncode != 0 and "--guidance-sweep wants numbers" in empty.stderr


def test_classifier_accuracy_needs_a_conditional_model(tmp_path):
    out = tmp_path / "u"
    diffuse("train", "--steps", 1, "--batch-size", 4, "--sample-n", 1, "--sample-steps", 1, "--out", out, *TINY_FLAGS)
    p = diffuse("eval", out, "--classifier-accuracy", check=False)
    assert p.returncode != 0 and "--classifier-accuracy needs one trained with --class-cond" in p.stderr


def test_class_labels_cycle_over_any_count(cond_run):
    """eval, visualize and compare-samplers' FID images share one rule: image i gets the i-th class
    of the cycle, whatever the count (a 16-image grid and 25 FID images cycle alike)."""
    import argparse

    import torch

    from diffuse.cli import _class_labels
    from diffuse.generate import load
    loaded = load(cond_run, torch.device("cpu"))
    args = argparse.Namespace(class_="all", guidance=None)
    assert _class_labels(args, loaded, 25).tolist() == [i % 10 for i in range(25)]
    assert args.guidance == 1.5                                  # the run's --sample-guidance
    args = argparse.Namespace(class_="3,7", guidance=0.0)
    assert _class_labels(args, loaded, 5).tolist() == [3, 7, 3, 7, 3] and args.guidance == 0.0
    args = argparse.Namespace(class_=None, guidance=None)
    assert _class_labels(args, loaded, 4) is None and args.guidance == 0.0
