"""Budget plans (budget.py and the loop's use of it): the learning rate and EMA that end with the
budget, the clock that agrees it, grids and checkpoints at fractions, resume and extension.

The loop tests run on a fake wall clock (``budget.wall_clock`` advances one second per reading),
so a budget of B seconds is exactly B steps and every figure below is exact, not timed."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch

from diffuse import budget
from diffuse.budget import (COOLDOWN_FRACTION, WARMUP_FRACTION, BudgetClock, ema_gamma, ema_std_of_gamma, lr_factor,
                            power_ema_decay)
from diffuse.checkpoint import point, read_tensors
from diffuse.config import resolve
from diffuse.train import load_resume_config, train

from .conftest import TINY_MODEL


# ----------------------------------------------------------------------------------------------
# The schedules, against their definitions

def test_lr_warms_up_holds_then_decays_linearly_to_zero_over_the_cooldown():
    w, c = WARMUP_FRACTION, COOLDOWN_FRACTION
    assert lr_factor(0.0, 0) == 0.0
    assert lr_factor(w / 2, 100) == pytest.approx(0.5)
    assert lr_factor(w, 100) == pytest.approx(1.0)
    # the peak holds until the cool-down starts...
    assert lr_factor(0.5, 100) == 1.0 and lr_factor(1 - c, 100) == pytest.approx(1.0)
    # ...which is linear from 1 to 0 over the budget's last COOLDOWN_FRACTION
    assert lr_factor(1 - c + c / 4, 100) == pytest.approx(0.75)
    assert lr_factor(1 - c / 2, 100) == pytest.approx(0.5)
    assert lr_factor(1.0, 100) == 0.0
    assert lr_factor(1.7, 100) == 0.0 and lr_factor(-1.0, 0) == 0.0      # clamped
    # --cooldown 1: the decay runs from the start; half-way through it is at half
    assert lr_factor(0.5, 100, cooldown=1.0) == pytest.approx(0.5)
    assert lr_factor(0.3, 100, cooldown=0.5) == 1.0 and lr_factor(0.75, 100, cooldown=0.5) == pytest.approx(0.5)
    # with --warmup-steps the warm-up ends at whichever comes first, those steps or the fraction
    assert lr_factor(w / 4, 9, warmup_steps=100) == pytest.approx(0.25)          # the fraction's is ahead
    assert lr_factor(w / 4, 49, warmup_steps=100) == pytest.approx(0.5)          # the steps' is ahead
    assert lr_factor(w / 4, 99, warmup_steps=100) == pytest.approx(1.0)
    # and the decay never waits for either
    assert lr_factor(0.99, 1, warmup_steps=1000) == pytest.approx((1 - 0.99) / c)


def test_cooldown_is_a_setting_and_old_budget_runs_keep_their_whole_budget_decay(tmp_path):
    from diffuse.config import Config, validate
    from diffuse.errors import DiffuseError

    cfg = budget_config(tmp_path / "run", cooldown=0.4)
    assert cfg.train.cooldown == 0.4
    stored = cfg.to_dict()
    assert Config.from_dict(stored).train.cooldown == 0.4
    # a config written before --cooldown existed decayed over all of the budget after the warm-up:
    # (1 - p) / (1 - WARMUP_FRACTION), which is this cool-down, so its resume is unchanged
    del stored["train"]["cooldown"]
    old = Config.from_dict(stored).train.cooldown
    assert old == pytest.approx(1 - WARMUP_FRACTION)
    for p in (0.1, 0.5, 0.9):
        assert lr_factor(p, 100, cooldown=old) == pytest.approx((1 - p) / (1 - WARMUP_FRACTION))
    for bad in (0.0, -0.1, 1.5):
        cfg.train.cooldown = bad
        with pytest.raises(DiffuseError, match="--cooldown must be a fraction of the budget in"):
            validate(cfg)


def test_ema_width_matches_the_edm2_values():
    # Karras et al. 2024, sec. 3.1: sigma_rel 0.05 <-> gamma 16.97, sigma_rel 0.10 <-> gamma 6.94
    assert ema_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert ema_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for std in (0.02, 0.1, 0.2, 0.28):
        assert ema_std_of_gamma(ema_gamma(std)) == pytest.approx(std, rel=1e-9)
    with pytest.raises(ValueError):
        ema_gamma(0.3)                  # wider than any tau^gamma profile (1/sqrt(12) at gamma 0)


def test_power_ema_weights_have_the_closed_form_and_the_stated_width():
    gamma, t_end = ema_gamma(0.1), 400
    # the EMA of the sequence x_tau = one-hot(tau): its entries are the weights of each step
    ema = torch.zeros(t_end, dtype=torch.float64)
    for t in range(1, t_end + 1):
        x = torch.zeros(t_end, dtype=torch.float64)
        x[t - 1] = 1
        beta = power_ema_decay(t, gamma)
        ema = beta * ema + (1 - beta) * x
    tau = torch.arange(1, t_end + 1, dtype=torch.float64)
    closed = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / t_end ** (gamma + 1)
    assert torch.allclose(ema, closed, rtol=1e-9, atol=1e-15)
    assert float(ema.sum()) == pytest.approx(1.0, abs=1e-12)
    # its spread, relative to the run's length, is the width asked for (the discrete profile
    # approaches the continuous one as t grows)
    mean = float((ema * tau).sum())
    std = math.sqrt(float((ema * (tau - mean) ** 2).sum()))
    assert std / t_end == pytest.approx(0.1, rel=0.02)
    assert power_ema_decay(1, gamma) == 0.0          # the first step's EMA is the model itself


def test_clock_counts_from_a_resumed_reading():
    ticks = iter([10.0, 12.5, 14.0])
    clock = BudgetClock(20.0, used_s=3.0, now=lambda: next(ticks))
    clock.start()
    assert clock.tick() == 5.5                  # 3 s before the resume + 2.5 s since
    clock.set_used(clock.tick())
    assert clock.used_s == 7.0 and clock.fraction == pytest.approx(0.35) and not clock.spent
    clock.set_used(25.0)
    assert clock.fraction == 1.0 and clock.spent
    with pytest.raises(ValueError):
        BudgetClock(0)


# ----------------------------------------------------------------------------------------------
# Plans chosen from what the user gave

def _resolve(train: dict, model: dict | None = None, preset: str | None = None):
    cli = {"train": train, **({"model": model} if model else {})}
    return resolve(preset, None, None, cli)


def test_time_limit_alone_is_a_budget_plan():
    cfg = _resolve({"time_limit": 15.0})
    assert (cfg.train.plan, cfg.train.steps, cfg.train.ema_std, cfg.train.size_model) == ("budget", None, 0.1, True)
    assert cfg.train.sample_steps == 20 and _resolve({"time_limit": 1.0, "sample_steps": 50}).train.sample_steps == 50
    assert _resolve({"steps": 10}).train.sample_steps == 50
    cfg = _resolve({"time_limit": 15.0, "steps": 100})          # beside --steps: a stop-only cap
    assert (cfg.train.plan, cfg.train.steps, cfg.train.ema_std) == ("steps", 100, None)
    cfg = _resolve({})
    assert (cfg.train.plan, cfg.train.steps) == ("preset", 1500)
    # a named preset or a model flag pins the model; --class-cond does not
    assert not _resolve({"time_limit": 5.0}, preset="digits").train.size_model
    assert not _resolve({"time_limit": 5.0}, model={"base_channels": 16}).train.size_model
    assert _resolve({"time_limit": 5.0}, model={"class_cond": True}).train.size_model
    assert _resolve({"time_limit": 5.0, "ema_std": 0.05}).train.ema_std == 0.05


def test_a_sized_budget_plan_doubles_the_peak_rate_and_halves_the_batch():
    from diffuse.config import PRESETS
    for data, preset in (("digits", "digits"), ("mnist", "mnist")):
        base = PRESETS[preset]["train"]
        t = resolve(None, data, None, {"train": {"time_limit": 2.0}}).train
        assert (t.lr, t.batch_size) == (base["lr"] * 2, max(32, base["batch_size"] // 2)), data
        # given flags win, each on its own
        t = resolve(None, data, None, {"train": {"time_limit": 2.0, "lr": 1e-3}}).train
        assert (t.lr, t.batch_size) == (1e-3, max(32, base["batch_size"] // 2))
        t = resolve(None, data, None, {"train": {"time_limit": 2.0, "batch_size": 100}}).train
        assert (t.lr, t.batch_size) == (base["lr"] * 2, 100)
        # the preset's own model, steps, or no time limit: the preset's rate and batch
        for given, named in (({"time_limit": 2.0}, preset), ({"steps": 10}, None), ({}, None)):
            t = resolve(named, data, None, {"train": dict(given)}).train
            assert (t.lr, t.batch_size) == (base["lr"], base["batch_size"]), (data, given, named)
    # a batch already at or below the floor is not halved below it
    t = resolve(None, "digits", None, {"train": {"time_limit": 2.0}}).train
    assert t.batch_size == 32


# ----------------------------------------------------------------------------------------------
# The loop on a fake clock: one second per reading, so a 30 s budget is 30 steps

@pytest.fixture
def fake_clock(monkeypatch):
    t = iter(float(i) for i in range(10**6))
    monkeypatch.setattr(budget, "wall_clock", lambda: next(t))


def budget_config(out, minutes=0.5, **train):
    t = {"time_limit": minutes, "batch_size": 8, "log_every": 1, "sample_n": 4,
         "out": str(out), "lr": 1e-3, "warmup_steps": 0, "keep": 0, **train}
    return resolve("digits", None, None, {"model": dict(TINY_MODEL), "train": t})


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_budget_run_follows_the_clock(tmp_path, fake_clock):
    out = train(budget_config(tmp_path / "run"), progress=False)
    rows = [r for r in _rows(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 31))            # 30 one-second steps, then the end
    # step k ran at the fraction agreed after step k-1, (k-1)/30
    for r in rows:
        assert r["lr"] == pytest.approx(1e-3 * lr_factor((r["step"] - 1) / 30, r["step"] - 1))
    assert rows[-1]["lr"] < 1e-3 * 0.2 and max(r["lr"] for r in rows) == pytest.approx(1e-3)
    # grids at each quarter of the budget (after the step that crosses it), checkpoints at each
    # fifth, both at the end
    assert sorted(p.name for p in (out / "samples").iterdir()) == [f"step_{k:07d}.png" for k in (8, 15, 23, 30)]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_")) == \
        [f"step_{k:07d}" for k in (6, 12, 18, 24, 30)]
    state = json.loads((out / "checkpoints" / "step_0000012" / "state.json").read_text())
    assert state["budget_used_s"] == 12.0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["train"]["plan"], cfg["train"]["steps"], cfg["train"]["time_limit"]) == ("budget", None, 0.5)
    assert "budget 0.5 min" in (out / "train.log").read_text()
    from diffuse.runinfo import info_text
    assert "lr 0.001 held, then decaying to 0 over the last 20% of a 0.5-min budget, power EMA of width 0.1" \
        in info_text(out)


def _restart_from(out, step):
    point(out / "checkpoints", "last", f"step_{step:07d}")


def test_resumed_budget_run_continues_the_same_plan(tmp_path, fake_clock, monkeypatch):
    whole = train(budget_config(tmp_path / "whole"), progress=False)
    part = tmp_path / "part"
    shutil.copytree(whole, part, symlinks=True)
    _restart_from(part, 12)
    t = iter(float(i) for i in range(10**6))                        # a new process: its clock starts anew
    monkeypatch.setattr(budget, "wall_clock", lambda: next(t))
    cfg = load_resume_config(part, {"train": {"out": str(part)}})
    train(cfg, resume=True, progress=False)
    for name in ("model", "ema"):
        a = read_tensors(whole / "checkpoints" / "step_0000030" / f"{name}.safetensors")
        b = read_tensors(part / "checkpoints" / "step_0000030" / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert [r["lr"] for r in _rows(part) if "loss" in r] == [r["lr"] for r in _rows(whole) if "loss" in r]


def test_time_limit_on_resume_adds_minutes(tmp_path, fake_clock):
    out = train(budget_config(tmp_path / "run"), progress=False)          # 30 s, spent
    _restart_from(out, 12)
    cfg = load_resume_config(out, {"train": {"time_limit": 0.5, "out": str(out)}})
    assert cfg.train.time_limit == pytest.approx(0.7)                    # 12 s used + 30 s more
    train(cfg, resume=True, progress=False)
    steps = [r["step"] for r in _rows(out) if "loss" in r]
    assert steps[-1] == 42
    assert json.loads((out / "config.json").read_text())["train"]["time_limit"] == pytest.approx(0.7)


# ----------------------------------------------------------------------------------------------
# What the run decides where the user left it to diffuse (measurements replaced by fakes)

def test_budget_plan_sizes_the_model_with_the_rule(tmp_path, fake_clock, monkeypatch):
    from diffuse import sizing
    cfg = budget_config(tmp_path / "run")
    cfg.train.size_model = True
    fields = sizing.ladder(16)
    params = [sizing.count_params(sizing.model_config(f, cfg, 1, 16)) for f in fields]
    # a constant rate that affords the second rung and not the third: images = rate * 30 s * 0.9
    rate = (sizing.min_images(params[1], 1) + sizing.min_images(params[2], 1)) / 2 / (30 * sizing.PLANNED_SHARE)
    real = sizing.choose
    monkeypatch.setattr(sizing, "choose", lambda *a, **k: real(*a, measure=lambda *_: rate, **k))
    out = train(cfg, progress=False)
    stored = json.loads((out / "config.json").read_text())["model"]
    assert {k: stored[k] for k in ("base_channels", "num_res_blocks")} == \
        {k: fields[1][k] for k in ("base_channels", "num_res_blocks")}
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == 1e-3     # --lr given: not sized_peak_lr's
    log = (out / "train.log").read_text()
    assert "model sized for the budget" in log and f"{params[1] / 1e6:.3f}M params" in log
    assert "the next rung" in log


def test_a_preset_that_would_take_over_a_day_becomes_a_budget_plan(tmp_path, fake_clock, monkeypatch):
    from diffuse import run as run_mod
    from diffuse import sizing
    monkeypatch.setattr(run_mod, "DEFAULT_BUDGET_MIN", 0.2)                    # 12 fake seconds
    t = {"batch_size": 8, "log_every": 1, "sample_n": 4, "sample_steps": 2, "out": str(tmp_path / "slow"),
         "keep": 0}
    cfg = resolve("digits", None, None, {"model": dict(TINY_MODEL), "train": t})
    assert cfg.train.plan == "preset" and not cfg.train.size_model      # the preset was named
    # 1,500 steps x 8 images at 0.1 img/s: 33 hours
    monkeypatch.setattr(sizing, "preset_rate", lambda *a: 0.1)
    out = train(cfg, progress=False)
    stored = json.loads((out / "config.json").read_text())["train"]
    assert (stored["plan"], stored["steps"], stored["time_limit"], stored["ema_std"]) == ("budget", None, 0.2, 0.1)
    assert [r["step"] for r in _rows(out) if "loss" in r][-1] == 12
    assert "digits preset's 1,500 steps would take about 33h20m here (0.1 img/s measured), over a day" in \
        (out / "train.log").read_text()
    # the same preset where it fits in a day keeps its steps
    monkeypatch.setattr(sizing, "preset_rate", lambda *a: 1e6)
    cfg = resolve("digits", None, None, {"model": dict(TINY_MODEL), "train": {**t, "out": str(tmp_path / "fast")}})
    cfg.train.steps = 3                                       # (as the preset's; kept short for the test)
    out = train(cfg, progress=False)
    stored = json.loads((out / "config.json").read_text())["train"]
    assert (stored["plan"], stored["steps"], stored["time_limit"]) == ("preset", 3, None)


def test_train_config_of_the_api_plans_a_budget():
    from diffuse.api import train_config
    cfg = train_config(data="digits", time_limit=3)
    assert (cfg.train.plan, cfg.train.steps, cfg.train.time_limit, cfg.train.size_model) == ("budget", None, 3.0, True)


def _rgba_folder(root, size=64, per_class=6):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for c in ("cats", "dogs"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            px = torch.randint(0, 256, (size, size, 4), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(px, "RGBA").save(root / c / f"{i}.png")
    return root


def _folder_budget(folder, out, **data):
    t = {"time_limit": 0.2, "batch_size": 8, "log_every": 1, "sample_n": 4, "sample_steps": 2, "out": str(out),
         "keep": 0}
    return resolve(None, str(folder), None, {"data": {"name": str(folder), **data},
                                             "model": {"class_cond": True}, "train": t})


def test_a_budget_too_small_for_the_images_size_trains_at_half_and_writes_at_full(tmp_path, fake_clock,
                                                                                   monkeypatch):
    from diffuse import sizing
    from diffuse.api import load
    from diffuse.runinfo import info_text
    folder = _rgba_folder(tmp_path / "pics")
    cfg = _folder_budget(folder, tmp_path / "run")
    assert (cfg.data.image_size, cfg.train.size_model, cfg.train.half_size) == (64, True, True)
    seen = []

    def fake_rate(fields, cfg_, channels, size, *rest):
        seen.append(size)
        return 1e-3                                     # no rung qualifies: the smallest at each size
    real = sizing.choose
    monkeypatch.setattr(sizing, "choose", lambda *a, **k: real(*a, measure=fake_rate, **k))
    out = train(cfg, progress=False)
    assert seen == [64, 32]                             # its own size first, then half
    stored = json.loads((out / "config.json").read_text())
    assert (stored["data"]["image_size"], stored["model"]["image_size"], stored["train"]["output_size"]) == (32, 32, 64)
    smallest_64 = sizing.count_params(sizing.model_config(sizing.ladder(64)[0], cfg, 3, 64))
    log = (out / "train.log").read_text()
    assert "(12 images, 3x32x32, written at 64 px, 2 classes)" in log
    assert (f"plan: trains at 32 px and writes its images at the folder's 64 px (bicubic): at 64 px the budget "
            f"affords {smallest_64 / 1e6:.2g}M params, {smallest_64 / 64 ** 2:.0f} per output pixel (< 250)") in log
    from PIL import Image
    assert stored["train"]["lr"] == 2e-3 and "learning rate warms up to 0.002 over 5%" in log   # sized_peak_lr
    grid = Image.open(out / "samples" / sorted(p.name for p in (out / "samples").iterdir())[-1])
    assert grid.size[0] > 2 * 64                       # four 64 px images in a row, not 32 px ones
    model = load(out, device="cpu")
    assert model.image_size == 64 and model.sample(2, seed=0, steps=2).shape == (2, 64, 64, 3)
    assert "images written at 64 px, upscaled" in info_text(out)
    # a resumed run keeps training at 32 px on the same data
    first = min(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    _restart_from(out, int(first[5:]))
    t = iter(float(i) for i in range(10**6))
    monkeypatch.setattr(budget, "wall_clock", lambda: next(t))
    train(load_resume_config(out, {"train": {"out": str(out)}}), resume=True, progress=False)
    assert json.loads((out / "config.json").read_text())["train"]["output_size"] == 64


@pytest.mark.parametrize("given, sized", [({"train": {"half_size": False}}, True),      # said no
                                          ({"data": {"image_size": 64}}, True),            # chose a size
                                          ({"data": {"image_size": 64}, "train": {"half_size": True}}, True),
                                          ({"train": {"output_size": 64, "half_size": True}}, True),
                                          ({"preset": "cifar10-small", "train": {"half_size": True}}, False)])
def test_the_images_own_size_when_the_user_said_no_or_chose_a_size_or_a_model(tmp_path, given, sized):
    folder = _rgba_folder(tmp_path / "pics", per_class=1)
    t = {"time_limit": 0.2, "out": str(tmp_path / "run"), **given.get("train", {})}
    cfg = resolve(given.get("preset"), str(folder), None,
                  {"data": {"name": str(folder), **given.get("data", {})}, "train": t})
    assert cfg.train.size_model == sized and not cfg.train.half_size


def test_an_output_size_below_the_training_size_is_one_line(tmp_path):
    from diffuse.errors import DiffuseError
    folder = _rgba_folder(tmp_path / "pics", size=16, per_class=1)
    cfg = resolve(None, str(folder), None, {"data": {"name": str(folder)}, "model": dict(TINY_MODEL),
                                            "train": {"steps": 1, "output_size": 8, "out": str(tmp_path / "run")}})
    with pytest.raises(DiffuseError, match="--output-size 8 is below the training size 16"):
        train(cfg, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_sized_plan_sets_its_peak_rate_from_the_size_unless_lr_is_given():
    from diffuse.config import SIZED_LR, sized_peak_lr
    assert sized_peak_lr(4e-4, 670_000) == SIZED_LR == 2e-3           # the colour preset's rate, doubled: raised
    assert sized_peak_lr(4e-4, 16_000_000) == pytest.approx(5e-4)      # 2e-3 / sqrt(16)
    assert sized_peak_lr(4e-4, 64_000_000) == 4e-4                     # 2.5e-4 < the plan's own: kept
    assert sized_peak_lr(4e-3, 640_000) == 4e-3                        # the digits plan keeps its 4e-3
    assert sized_peak_lr(2e-3, 1_190_000) == 2e-3                      # and the mnist plans their 2e-3
    assert _resolve({"time_limit": 5.0}).train.lr_from_size
    assert not _resolve({"time_limit": 5.0, "lr": 1e-4}).train.lr_from_size


@pytest.mark.parametrize("rate, from_plan, batch", [(10.0, True, 8),        # 270 planned images: 16 steps
                                                    (1000.0, True, 16),     # 27,000: 1,687 steps, enough
                                                    (10.0, False, 16)])     # --batch-size given: kept
def test_a_budget_that_buys_too_few_steps_halves_the_batch_again(tmp_path, fake_clock, monkeypatch, rate, from_plan,
                                                                 batch):
    from diffuse import data
    from diffuse import run as run_mod
    from diffuse import sizing
    monkeypatch.setattr(run_mod, "MIN_BUDGET_BATCH", 8)          # the tiny config's batch 16 stands for 64
    cfg = budget_config(tmp_path / "run", batch_size=16)
    cfg.train.size_model, cfg.train.batch_from_plan = True, from_plan
    measured_at = []

    def fake_rate(fields, cfg_, *rest):
        measured_at.append(cfg_.train.batch_size)
        return rate
    real = sizing.choose
    monkeypatch.setattr(sizing, "choose", lambda *a, **k: real(*a, measure=fake_rate, **k))
    drawn = []
    real_batch = data.BatchStream.batch

    def drawing(self, step):
        x, y = real_batch(self, step)
        drawn.append(x.shape[0])
        return x, y
    monkeypatch.setattr(data.BatchStream, "batch", drawing)
    out = train(cfg, progress=False)
    stored = json.loads((out / "config.json").read_text())["train"]
    log = (out / "train.log").read_text()
    assert stored["batch_size"] == batch and f"at batch {batch};" in log
    assert measured_at[-1] == batch                               # the rung chosen at the batch it trains at
    assert set(drawn) == {batch} and len(drawn) >= 30             # and what the loop trains on
    halved = "batch 8: at batch 16 the budget buys 16 steps (< 1,500)"
    assert (halved in log) == (batch == 8)


def test_the_batch_is_the_plans_unless_given():
    assert _resolve({"time_limit": 5.0}).train.batch_from_plan
    assert not _resolve({"time_limit": 5.0, "batch_size": 64}).train.batch_from_plan


def test_budget_progress_lines_end_where_the_run_ends(tmp_path, fake_clock):
    # the pace note measures real seconds, which on the fake clock's one second per step is far off;
    # every later row re-estimates the end from the budget seconds the steps took, so each line's
    # "step k/N" names the step the run ends at (30), not the pace note's guess
    out = train(budget_config(tmp_path / "run"), progress=False)
    lines = re.findall(r"^step (\d+)/(\d+) \|", (out / "train.log").read_text(), re.M)
    assert [int(k) for k, _ in lines] == list(range(1, 31))
    assert {int(n) for _, n in lines} == {30}
