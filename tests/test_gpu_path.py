"""The GPU hot path, checked on the CPU: no host-device syncs in a training step or a sampling
step (device.HostSyncCheck), bulk per-image noise, the denoiser's sigma table."""

from __future__ import annotations

import functools

import pytest
import torch
from scipy import stats

from diffuse import generate as G
from diffuse.data import BatchStream, load_dataset
from diffuse.denoiser import Denoiser
from diffuse.device import HostSyncCheck
from diffuse.diffusion import Schedule
from diffuse.generate import Loaded, generate, sample_batch
from diffuse.models import UNet
from diffuse.objectives import VP
from diffuse.rng import ImageNoise, counter_normal, derive_seed
from diffuse.samplers import SAMPLERS, sampler_sigmas
from diffuse.train import TrainStep, build_training, fill_model_from_data

from .conftest import tiny_config

CPU = torch.device("cpu")


def _loaded(class_cond=False):
    cfg = tiny_config("unused")
    cfg.model.image_size, cfg.model.in_channels = 16, 1
    if class_cond:
        cfg.model.class_cond, cfg.model.num_classes = True, 10
    torch.manual_seed(0)
    net = UNet(cfg.model).eval().requires_grad_(False)
    return Loaded(net, cfg, {}, Schedule("cosine", 1000), None)


def test_sync_check_catches_reads_of_device_values():
    w = torch.randn(3)
    with HostSyncCheck([w]) as check:
        loss = (w * 2).sum()
        float(loss)                                   # .item() on a device value: a sync
        (w > 0).nonzero()                             # data-dependent shape: a sync
        float(torch.tensor(2.0) * 3)                  # a host value: not one
    assert check.syncs == ["_local_scalar_dense", "nonzero"]


def test_training_step_makes_no_host_sync(tmp_path):
    cfg = tiny_config(tmp_path / "r", label_dropout=0.2)
    data = load_dataset("digits")
    cfg.model.class_cond = True
    fill_model_from_data(cfg, data)
    model, ema, opt = build_training(cfg, CPU, channels_last=False)
    stream = BatchStream(data, 8, 0, CPU, flip=True)
    step = TrainStep(model, ema, opt, Schedule("cosine", 1000), cfg, device=CPU, amp=None, channels_last=False)
    x0, y = stream.batch(0)
    step(x0, y, 0)                                     # optimizer state exists from here on
    device_tensors = [*model.parameters(), *ema.parameters(), stream.images, stream.labels,
                      *[v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]]
    with HostSyncCheck(device_tensors) as check:
        for k in (1, 2):
            x0, y = stream.batch(k)
            loss, grad_norm = step(x0, y, k)
    assert check.syncs == []
    assert loss.ndim == 0 and grad_norm.ndim == 0     # returned as device tensors, read later


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_sampling_step_makes_no_host_sync(sampler):
    loaded = _loaded(class_cond=True)
    sigmas = sampler_sigmas(sampler, loaded.schedule, 3)
    noise = ImageNoise(0, range(4), CPU, bulk=True)
    labels = torch.tensor([0, 1, 2, 3])
    with HostSyncCheck([*loaded.net.parameters(), noise._keys]) as check:
        x, den = sample_batch(loaded, sampler, sigmas, noise, labels=labels, guidance=1.0)
    assert check.syncs == [] and den.nfe > 0 and x.shape == (4, 1, 16, 16)


def test_bulk_noise_is_per_image():
    """Image i's noise is the same alone, in any batch, in any position: EDM's per-image seeds."""
    batch = ImageNoise(7, range(10), bulk=True)
    draws = [batch.randn(1, 4, 4) for _ in range(3)]
    for i in (0, 3, 9):
        alone = ImageNoise(7, [i], bulk=True)
        for d in draws:
            assert torch.equal(alone.randn(1, 4, 4)[0], d[i])
    shuffled = ImageNoise(7, [9, 3, 0], bulk=True).randn(1, 4, 4)
    assert torch.equal(shuffled[1], draws[0][3])
    assert not torch.equal(draws[0][0], draws[1][0]) and not torch.equal(draws[0][0], draws[0][1])


def test_bulk_noise_is_standard_normal_and_independent():
    keys = torch.tensor([derive_seed(0, "image", i) for i in range(64)], dtype=torch.int64)
    z = counter_normal(keys, 0, 2048)                             # [64, 2048]
    assert stats.kstest(z.flatten().double().numpy(), "norm").pvalue > 1e-3
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    corr = torch.corrcoef(z[:16])                                  # rows are independent images
    assert (corr - torch.eye(16)).abs().max() < 0.1
    assert abs(float(torch.corrcoef(torch.stack([z[0], counter_normal(keys[:1], 1, 2048)[0]]))[0, 1])) < 0.1


def test_generate_with_bulk_noise_does_not_depend_on_batch_size(monkeypatch):
    monkeypatch.setattr(G, "ImageNoise", functools.partial(ImageNoise, bulk=True))
    loaded = _loaded()
    for sampler in ("ddpm", "dpmpp-2m-sde"):
        a, _ = generate(loaded, n=6, seed=3, sampler=sampler, steps=4, batch_size=6)
        b, _ = generate(loaded, n=6, seed=3, sampler=sampler, steps=4, batch_size=4)
        assert torch.equal(a, b)


def test_sigma_table_equals_the_per_call_computation():
    loaded = _loaded()
    x = torch.randn(3, 1, 16, 16)
    table = Denoiser(loaded.net, VP(loaded.schedule))
    direct = Denoiser(loaded.net, VP(loaded.schedule))
    sigmas = sampler_sigmas("dpmpp-2m", loaded.schedule, 5)
    table.prepare(sigmas, CPU)
    for s in sigmas[:-1]:
        assert torch.equal(table(x, s), direct(x, s.expand(3)))  # [B] sigmas take the per-call path
    assert len(table.levels) == len(sigmas)
