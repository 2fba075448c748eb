"""CUDA: training, resume, every sampler, CFG, FID features against the CPU, and no host syncs.

Marked ``cuda``: skipped where no GPU is visible (CI, the project's CPU machines); run first by
benchmarks/gpu_check.sh on a GPU machine. Comparisons with the CPU use tolerances: kernels differ.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from diffuse import generate as G
from diffuse import inception
from diffuse.data import BatchStream, load_dataset
from diffuse.diffusion import Schedule
from diffuse.errors import DiffuseError
from diffuse.generate import Loaded, generate, sample_batch
from diffuse.models import UNet
from diffuse.rng import ImageNoise
from diffuse.samplers import SAMPLERS, sampler_sigmas
from diffuse.train import TrainStep, build_training, fill_model_from_data, load_resume_config, train

from .conftest import tiny_config

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def _loaded(device, class_cond=False):
    cfg = tiny_config("unused")
    cfg.model.image_size, cfg.model.in_channels = 16, 1
    if class_cond:
        cfg.model.class_cond, cfg.model.num_classes = True, 10
    torch.manual_seed(0)
    net = UNet(cfg.model).to(device).eval().requires_grad_(False)
    return Loaded(net, cfg, {}, Schedule("cosine", 1000), Path("<test>"))


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_a_few_training_steps_learn_and_log(tmp_path):
    run = train(tiny_config(tmp_path / "r", steps=20, device="cuda", lr=2e-3), progress=False)
    losses = _losses(run)
    assert len(losses) == 20 and all(l == l for l in losses)           # finite
    assert sum(losses[-5:]) < sum(losses[:5])
    assert (run / "final.png").is_file()
    assert "cuda" in (run / "train.log").read_text().splitlines()[0]


def test_resume_matches_the_uninterrupted_run(tmp_path):
    # cuDNN autotuning may pick other kernels in another process, so equality is to a tolerance
    kw = dict(ckpt_every=100, device="cuda", precision="fp32")
    full = train(tiny_config(tmp_path / "full", steps=6, **kw), progress=False)
    part = train(tiny_config(tmp_path / "part", steps=3, **kw), progress=False)
    train(load_resume_config(part, {"train": {"steps": 6}}), resume=True, progress=False)
    assert _losses(full) == pytest.approx(_losses(part), rel=1e-3)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_matches_the_cpu(sampler, monkeypatch):
    # the same bulk noise stream on both devices, so the images can be compared
    monkeypatch.setattr(G, "ImageNoise", functools.partial(ImageNoise, bulk=True))
    a, rec = generate(_loaded(CPU), n=4, seed=1, sampler=sampler, steps=6, batch_size=4)
    b, _ = generate(_loaded(CUDA), n=4, seed=1, sampler=sampler, steps=6, batch_size=4, device=CUDA)
    assert rec["nfe"] > 0 and (a.int() - b.int()).abs().max() <= 2                  # uint8 levels


def test_cfg_matches_the_cpu(monkeypatch):
    monkeypatch.setattr(G, "ImageNoise", functools.partial(ImageNoise, bulk=True))
    labels = torch.tensor([0, 3, 7, 9])
    a, _ = generate(_loaded(CPU, True), n=4, seed=2, steps=5, labels=labels, guidance=2.0)
    b, _ = generate(_loaded(CUDA, True), n=4, seed=2, steps=5, labels=labels, guidance=2.0, device=CUDA)
    assert (a.int() - b.int()).abs().max() <= 2


def test_fid_features_cpu_vs_cuda():
    try:
        if not inception.default_weights_path().is_file():
            pytest.skip("no Inception weights")
    except DiffuseError:
        pytest.skip("no Inception weights")
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fa = inception.load_extractor(None, CPU).features(images)
    fb = inception.load_extractor(None, CUDA).features(images)
    fa, fb = torch.as_tensor(fa), torch.as_tensor(fb)
    assert ((fa - fb).abs().max() / fa.abs().max()) < 1e-3


def test_training_step_makes_no_host_sync(tmp_path):
    cfg = tiny_config(tmp_path / "r", label_dropout=0.2)
    cfg.model.class_cond = True
    data = load_dataset("digits")
    fill_model_from_data(cfg, data)
    model, ema, opt = build_training(cfg, CUDA, channels_last=True)
    stream = BatchStream(data, 8, 0, CUDA, flip=True)
    step = TrainStep(model, ema, opt, Schedule("cosine", 1000), cfg, device=CUDA, amp=torch.bfloat16,
                     channels_last=True)
    step(*stream.batch(0), 0)                                   # first step: allocations, autotuning
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k in (1, 2):
            loss, _ = step(*stream.batch(k), k)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


@pytest.mark.parametrize("sampler", ["dpmpp-2m", "ddpm", "dpmpp-2m-sde", "heun"])
def test_sampling_makes_no_host_sync(sampler):
    loaded = _loaded(CUDA, class_cond=True)
    sigmas = sampler_sigmas(sampler, loaded.schedule, 4)
    labels = torch.tensor([0, 1, 2, 3])
    sample_batch(loaded, sampler, sigmas, ImageNoise(0, range(4), CUDA), labels=labels, guidance=1.0)  # warm-up
    torch.cuda.synchronize()
    noise = ImageNoise(0, range(4), CUDA)
    torch.cuda.set_sync_debug_mode("error")
    try:
        x, _ = sample_batch(loaded, sampler, sigmas, noise, labels=labels, guidance=1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.device.type == "cuda" and torch.isfinite(x).all().item()
