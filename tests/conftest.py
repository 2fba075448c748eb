"""Shared fixtures: tiny configs that train in well under a second per step on a CPU."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from diffuse.config import Config, resolve

REPO = Path(__file__).resolve().parents[1]

# One cache for the whole session (judge classifiers, FID reference statistics): tests never touch
# the user's cache, and the judge is trained once even when several files need it. Set before any
# test module builds its subprocess environment.
# The folder is removed when the session ends (pytest_sessionfinish), unless it was given.
_OWN_CACHE = None
if "DIFFUSE_TEST_CACHE" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="diffuse-test-cache-")
    os.environ["DIFFUSE_TEST_CACHE"] = os.environ["DIFFUSE_CACHE"] = _OWN_CACHE
    # --precision auto follows a timing probe; measure it once for the session and keep it, so every
    # test (and every CLI subprocess, which shares this cache) sees one decision even on a busy machine.
    from diffuse.device import probe_bf16
    torch.set_num_threads(2)
    probe_bf16(store=True)
SHARED_DATA = Path(os.environ.get("DIFFUSE_TEST_DATA", REPO.parent / "shared" / "data"))
MNIST_DIR = SHARED_DATA / "mnist"

needs_mnist = pytest.mark.skipif(not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
                                 reason=f"MNIST files not found under {MNIST_DIR}")

TINY_MODEL = {"base_channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (8,),
              "num_groups": 4, "head_channels": 8}
TINY_FLAGS = ["--base-channels", "8", "--channel-mult", "1,2", "--num-res-blocks", "1",
              "--attn-resolutions", "8", "--num-groups", "4", "--head-channels", "8"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield


def tiny_config(out: Path | str, **train) -> Config:
    t = {"steps": 4, "batch_size": 8, "log_every": 1, "sample_n": 4, "sample_steps": 2, "out": str(out),
         "lr": 1e-3, "warmup_steps": 0, **train}
    return resolve("digits", None, None, {"model": dict(TINY_MODEL), "train": t})


def tiny_loaded():
    """An untrained 8x8 one-channel UNet (seed 0) as a loaded model on the linear schedule, for
    sampling tests; its zero-initialised output layer is randomised so the output depends on x."""
    from diffuse.diffusion import Schedule
    from diffuse.generate import Loaded
    from diffuse.models import UNet

    cfg = resolve("digits", None, None, {"model": {"base_channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1,
                                                   "attn_resolutions": (), "num_groups": 4}})
    cfg.model.image_size, cfg.model.in_channels = 8, 1
    torch.manual_seed(0)
    net = UNet(cfg.model)
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)
    return Loaded(net.eval(), cfg, {}, Schedule("linear", 1000), "test")


@pytest.fixture(scope="session")
def served_runs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny trained runs for the serve tests (2 steps each): class-conditional and unconditional."""
    from diffuse.train import train

    root = tmp_path_factory.mktemp("served")
    runs = {}
    for name, cond in (("cond", True), ("uncond", False)):
        cfg = tiny_config(root / name, steps=2, sample_n=2, sample_steps=1)
        cfg.model.class_cond = cond
        runs[name] = Path(train(cfg, progress=False))
    return runs
