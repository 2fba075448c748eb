"""Defaults sized to the data: a folder's image size and preset come from its images."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffuse.config import default_preset_for, fit_to_size, resolve
from diffuse.data import load_dataset
from diffuse.imagefiles import peek_folder
from diffuse.models import UNet, count_parameters


def _folder(root, n, size, mode="L", sizes=None):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = sizes[i % len(sizes)] if sizes else (size, size)
        shape = (h, w) if mode == "L" else (h, w, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / f"{i:04d}.png")
    return root


def test_600_grayscale_28px_pngs_train_at_28_with_a_small_model(tmp_path):
    folder = _folder(tmp_path / "f", 600, 28)
    shape = peek_folder(folder)
    assert (shape.count, shape.sizes, shape.gray, shape.default_size) == (600, {(28, 28)}, True, 28)
    cfg = resolve(None, str(folder), None, {"data": {"name": str(folder)}, "train": {"steps": 60, "batch_size": 32}})
    assert cfg.preset == "mnist" and cfg.data.image_size == 28 and cfg.model.attn_resolutions == (7,)
    data = load_dataset(str(folder), image_size=cfg.data.image_size)
    assert data.images.shape == (600, 1, 28, 28)
    cfg.model.image_size, cfg.model.in_channels = 28, 1
    assert count_parameters(UNet(cfg.model)) < 2_000_000          # not 64px's 64.6M
    # the CLI's dry run shows the same
    out = subprocess.run([sys.executable, "-m", "diffuse", "train", "--data", str(folder), "--steps", "60",
                          "--batch-size", "32", "--dry-run"], capture_output=True, text=True, check=True).stdout
    d = json.loads(out)
    assert d["preset"] == "mnist" and d["data"]["image_size"] == 28


def test_folder_rules(tmp_path):
    # colour 32px -> cifar10-small at 32; mixed sizes -> 64px at 64; shared size over 64 -> 64
    colour = _folder(tmp_path / "c", 3, 32, "RGB")
    cfg = resolve(None, str(colour), None, {"data": {"name": str(colour)}})
    assert cfg.preset == "cifar10-small" and cfg.data.image_size == 32 and cfg.model.attn_resolutions == (16, 8)
    mixed = _folder(tmp_path / "m", 4, 0, "RGB", sizes=[(40, 40), (50, 60)])
    assert peek_folder(mixed).default_size == 64
    assert resolve(None, str(mixed), None, {"data": {"name": str(mixed)}}).preset == "64px"
    big = _folder(tmp_path / "b", 2, 96, "L")
    assert peek_folder(big).default_size == 64 and load_dataset(str(big)).images.shape[-1] == 64
    # explicit flags win: --image-size picks the preset by that size, --preset is kept
    cfg = resolve(None, str(big), None, {"data": {"name": str(big), "image_size": 16}})
    assert cfg.preset == "mnist" and cfg.data.image_size == 16 and cfg.model.attn_resolutions == (4,)
    cfg = resolve("64px", str(_folder(tmp_path / "s", 2, 28)), None, {})
    assert cfg.data.image_size == 32 and cfg.model.attn_resolutions == (8, 4)   # 28 rounded up for 4 levels
    assert default_preset_for("mnist") == "mnist" and default_preset_for("cifar10") == "cifar10-small"


def test_folder_own_size_is_kept_when_loading(tmp_path):
    folder = _folder(tmp_path / "f", 3, 20)
    assert load_dataset(str(folder)).images.shape == (3, 1, 20, 20)


@pytest.mark.parametrize("size, fitted, attn", [(28, 28, (7,)), (30, 32, (8,)), (16, 16, (4,)), (12, 12, (3,))])
def test_fit_to_size_mnist(size, fitted, attn):
    cfg = resolve("mnist", "mnist", None, {})
    assert fit_to_size(cfg, size) == fitted and cfg.model.attn_resolutions == attn


def test_a_folder_is_fitted_with_the_patch_size_it_will_train_with(tmp_path):
    """The folder's size is rounded up for the UNet's levels times the patch size, and the preset's
    attention scaled to the size its levels see (the patched 64 px UNet's two lowest levels are 8 and
    4, as the 64px preset's are 16 and 8); an --attn-resolutions on the command line still wins."""
    from diffuse.errors import DiffuseError
    gray = _folder(tmp_path / "g", 3, 20)
    data = {"name": str(gray)}
    cfg = resolve("mnist", str(gray), None, {"data": data})
    assert (cfg.data.image_size, cfg.model.attn_resolutions) == (20, (5,))          # 3 levels: a multiple of 4
    cfg = resolve("mnist", str(gray), None, {"data": data, "model": {"patch_size": 2}})
    assert (cfg.data.image_size, cfg.model.patch_size, cfg.model.attn_resolutions) == (24, 2, (3,))    # levels 12, 6, 3
    colour = _folder(tmp_path / "c", 2, 64, "RGB")
    data = {"name": str(colour)}
    assert resolve(None, str(colour), None, {"data": data}).model.attn_resolutions == (16, 8)
    cfg = resolve(None, str(colour), None, {"data": data, "model": {"patch_size": 2}})
    assert (cfg.data.image_size, cfg.model.attn_resolutions) == (64, (8, 4))
    cfg = resolve(None, str(colour), {"model": {"patch_size": 2}}, {"data": data, "model": {"attn_resolutions": (16,)}})
    assert (cfg.model.patch_size, cfg.model.attn_resolutions) == (2, (16,))
    with pytest.raises(DiffuseError, match="--patch-size must be between 1 and 8, got 0"):
        resolve(None, str(colour), None, {"data": data, "model": {"patch_size": 0}})


def test_pace_estimate_skips_the_first_step_and_reports_once(monkeypatch):
    import torch

    from diffuse import duties as T
    clock = iter([100.0, 101.0, 103.0, 103.5])
    monkeypatch.setattr(T.time, "perf_counter", lambda: next(clock))
    pace = T.PaceEstimate(0, torch.device("cpu"))
    loss = torch.tensor(1.0)
    assert pace.after_step(1, loss) is None                              # the clock starts after step 1 (100)
    assert pace.after_step(2, loss) is None and pace.after_step(3, loss) is None    # < 3 timed steps
    assert pace.after_step(4, loss) is None                              # 3 steps but 1 s (101) < 2 s
    assert pace.after_step(5, loss) == pytest.approx((103.5 - 100.0) / 4)   # 4 steps, 3 s >= 2 s
    assert pace.after_step(6, loss) is None                              # reported once
