"""The real CLI, through subprocess: train, sample, info, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import TINY_FLAGS

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def diffuse(*args, cwd=None, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "diffuse", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, env=ENV, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"diffuse {' '.join(map(str, args))} failed:\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    diffuse("train", "--steps", 4, "--batch-size", 8, "--sample-n", 4, "--sample-steps", 2, "--log-every", 2,
            "--out", out, *TINY_FLAGS)
    return out


def test_train_writes_a_run(run):
    for f in ("config.json", "final.png", "loss_curve.png", "metrics.jsonl", "train.log"):
        assert (run / f).is_file()
    assert (run / "checkpoints" / "last" / "ema.safetensors").is_file()
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["base_channels"] == 8 and cfg["train"]["steps"] == 4
    start = (run / "train.log").read_text().splitlines()[0]
    assert f"| {len(os.sched_getaffinity(0))} threads |" in start            # --threads default: the affinity mask


def test_sample_png_npz_and_folder(run, tmp_path):
    diffuse("sample", run, "--n", 6, "--steps", 3, "--out", tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").size[0] > 16
    diffuse("sample", run, "--n", 5, "--steps", 3, "--sampler", "ddpm", "--out", tmp_path / "a.npz", "--batch-size", 2)
    arr = np.load(tmp_path / "a.npz")
    assert arr["images"].shape == (5, 16, 16, 1) and arr["images"].dtype == np.uint8
    meta = json.loads(str(arr["meta"]))
    assert meta["sampler"] == "ddpm" and meta["seed"] == 0 and meta["nfe"] == 3
    diffuse("sample", run, "--n", 3, "--steps", 3, "--sampler", "ddpm", "--out", tmp_path / "b.npz")
    assert np.array_equal(np.load(tmp_path / "b.npz")["images"], arr["images"][:3])   # per-image seeds
    diffuse("sample", run / "checkpoints" / "last" / "ema.safetensors", "--n", 2, "--steps", 2,
            "--out", tmp_path / "dir")
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["000000.png", "000001.png"]


def test_info(run):
    p = diffuse("info", run)
    assert "step         4" in p.stdout and "digits" in p.stdout and "parameters" in p.stdout
    assert "attention at 8x8 and in the middle block" in p.stdout          # TINY_FLAGS: --attn-resolutions 8
    info = json.loads(diffuse("info", run, "--json").stdout)
    assert info["step"] == 4 and info["params"] > 0


def test_resume_extends_a_run(run, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, symlinks=True)
    diffuse("train", "--resume", copy, "--steps", 6)
    assert json.loads(diffuse("info", copy, "--json").stdout)["step"] == 6


@pytest.mark.parametrize("args,needle", [
    (["train", "--preset", "nope"], "unknown preset 'nope'"),
    (["train", "--data", "no-such-set"], "unknown data set 'no-such-set'"),
    (["train", "--steps", "-5"], "--steps must be a positive integer"),
    (["train", "--steps", "ten"], "expected an integer"),
    (["train", "--schedule", "quadratic"], "--schedule must be linear or cosine"),
    (["train", "--num-groups", "5"], "must divide"),
    (["train", "--config", "missing.json"], "config file not found"),
    (["train", "--resume", "missing-run"], "not a run directory"),
    (["train", "--patch-size", "0"], "--patch-size must be between 1 and 8, got 0"),
    (["train", "--patch-size", "3"], "image size 16 is not divisible by 12 (needed by 3 UNet levels and 3x3 patches)"),
    (["train", "--snr-shift", "-1"], "--snr-shift must be positive, got -1"),
    (["sample", "missing-run"], "no such run or checkpoint"),
    (["info", "notes.txt"], "is not a checkpoint"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line(args, needle, tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    p = diffuse(*args, cwd=tmp_path, check=False)
    assert p.returncode != 0
    err = p.stderr.strip()
    assert needle in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_a_patched_run_on_a_shifted_schedule_trains_samples_and_says_so(tmp_path):
    """--patch-size and --snr-shift through the real CLI: stored in the run, used by sample, shown by info."""
    out = tmp_path / "patched"
    diffuse("train", "--steps", 2, "--batch-size", 8, "--sample-n", 4, "--sample-steps", 2, "--log-every", 1,
            "--out", out, *TINY_FLAGS, "--patch-size", 2, "--snr-shift", 0.25)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model"]["patch_size"], cfg["diffusion"]["snr_shift"]) == (2, 0.25)
    diffuse("sample", out, "--n", 3, "--steps", 2, "--out", tmp_path / "s.npz")
    assert np.load(tmp_path / "s.npz")["images"].shape[:3] == (3, 16, 16)      # NHWC, the full size
    info = diffuse("info", out).stdout
    assert "2x2 patches" in info and "SNR x 0.25" in info


def test_folder_without_images_and_wrong_model_checkpoint(run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    p = diffuse("train", "--data", empty, "--out", tmp_path / "x", check=False)
    assert p.returncode != 0 and "no images" in p.stderr and "Traceback" not in p.stderr
    p = diffuse("train", "--init-from", run, "--steps", 1, "--out", tmp_path / "y", check=False)
    assert "holds a different model" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = diffuse("sample", run, "--class", "3", check=False)
    assert "unconditional model" in p.stderr
    p = diffuse("sample", run, "--steps", "5000", "--out", tmp_path / "z.png", check=False)
    assert "--steps must be between 1 and 1000" in p.stderr
    p = diffuse("sample", run, "--out", tmp_path / "z.gif", "--steps", "1", "--n", "1", check=False)
    assert ".png (grid), a .npz" in p.stderr


def test_debug_shows_traceback(tmp_path):
    p = diffuse("train", "--preset", "nope", "--debug", cwd=tmp_path, check=False)
    assert "Traceback" in p.stderr
