"""Training: one step learns, exact resume, crash-safe checkpoints, Ctrl-C, early stopping."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffuse import checkpoint as ckpt_io
from diffuse.data import BatchStream, load_dataset
from diffuse.diffusion import Schedule, eps_loss, q_sample
from diffuse.errors import DiffuseError
from diffuse.train import build_model, ema_decay_at, fill_model_from_data, load_resume_config, train

from .conftest import tiny_config


def _weights(run: Path, name: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "last" / f"{name}.safetensors"))


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_one_step_lowers_loss_on_a_fixed_batch():
    cfg = tiny_config("unused")
    data = load_dataset("digits")
    fill_model_from_data(cfg, data)
    torch.manual_seed(0)
    net = build_model(cfg)
    torch.nn.init.normal_(net.conv_out.weight, std=0.02)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    sched = Schedule("cosine", 1000)
    x0, _ = BatchStream(data, 32, 0, torch.device("cpu"), False).batch(0)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (32,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    xt = q_sample(x0, t, noise, sched.alphas_cumprod)
    before = eps_loss(net(xt, t.float()), noise)
    before.backward()
    opt.step()
    with torch.no_grad():
        after = eps_loss(net(xt, t.float()), noise)
    assert after < before * 0.98, (before.item(), after.item())


@pytest.mark.parametrize("precision, channels_last", [("fp32", False), ("bf16", True)])
def test_resume_is_bit_identical(tmp_path, precision, channels_last):
    # channels_last matters: the optimizer moments come back from disk contiguous, and fused AdamW
    # pairs param and moment elements by memory position (checkpoint.match_param_layout)
    kw = dict(ckpt_every=100, precision=precision, channels_last=channels_last)
    full = train(tiny_config(tmp_path / "full", steps=6, **kw), progress=False)
    part = train(tiny_config(tmp_path / "part", steps=3, **kw), progress=False)
    cfg = load_resume_config(part, {"train": {"steps": 6}})
    train(cfg, resume=True, progress=False)
    for name in ("model", "ema"):
        a, b = _weights(full, name), _weights(part, name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}.{k} differs after resume"
    assert _losses(full) == _losses(part)
    # sample grids are written from the EMA with fixed noise: same weights, same picture
    assert (full / "final.png").read_bytes() == (part / "final.png").read_bytes()


def test_resume_keeps_the_layout_the_cpu_probe_chose(tmp_path, monkeypatch):
    # fp32 on a CPU: the probe's UNet step decides channels_last; a resume whose probe says otherwise (a
    # re-probe on a busy machine, a lost cache) keeps the run's own layout, bit-identical to a run
    # that never stopped, and says why
    from diffuse import device as D

    def probe(nhwc: float):
        monkeypatch.setattr(D, "probe_bf16", lambda **_: D.ProbeResult(100.0, 50.0, 100.0, 50.0, 40.0, nhwc))

    probe(50.0)
    kw = dict(ckpt_every=100, precision="fp32")
    full = train(tiny_config(tmp_path / "full", steps=6, **kw), progress=False)
    part = train(tiny_config(tmp_path / "part", steps=3, **kw), progress=False)
    assert json.loads((part / "config.json").read_text())["train"]["resolved_channels_last"] is True
    assert "layout channels_last: a small UNet's fp32 step measured 1.25x" in (part / "train.log").read_text()
    probe(30.0)                                                      # NCHW would win now
    train(load_resume_config(part, {"train": {"steps": 6}}), resume=True, progress=False)
    assert "layout as when the run started" in (part / "train.log").read_text()
    assert json.loads((part / "config.json").read_text())["train"]["resolved_channels_last"] is True
    a, b = _weights(full, "model"), _weights(part, "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a new run on the NCHW verdict trains in NCHW
    other = train(tiny_config(tmp_path / "other", steps=1, **kw), progress=False)
    assert json.loads((other / "config.json").read_text())["train"]["resolved_channels_last"] is False


def test_resumed_run_logs_the_same_metrics_rows(tmp_path):
    # Rows every 4 steps; the first run stops at 6, between two rows, and writes its own last row
    # there. The resumed run's rows at 8 and 10 must be those of the run that never stopped: the
    # loss is the mean over steps 5..8, not 7..8 (the window is carried in the checkpoint).
    keys = ("step", "images_seen", "epoch", "loss", "lr", "grad_norm")
    full = train(tiny_config(tmp_path / "full", steps=10, log_every=4, ckpt_every=100), progress=False)
    part = train(tiny_config(tmp_path / "part", steps=6, log_every=4, ckpt_every=100), progress=False)
    state = json.loads((part / "checkpoints" / "last" / "state.json").read_text())
    assert state["log_loss_n"] == 2 and state["log_loss_sum"] > 0
    train(load_resume_config(part, {"train": {"steps": 10}}), resume=True, progress=False)

    def rows(run):
        return {r["step"]: {k: r[k] for k in keys} for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}

    a, b = rows(full), rows(part)
    assert sorted(a) == [4, 8, 10] and sorted(b) == [4, 6, 8, 10]
    for step in a:
        assert a[step] == b[step], f"row at step {step} differs after resume: {a[step]} vs {b[step]}"
    assert b[6]["loss"] != a[8]["loss"]                     # the stop row is its own (steps 5..6)


def test_ctrl_c_writes_a_checkpoint_and_resume_matches(tmp_path, monkeypatch):
    full = train(tiny_config(tmp_path / "full", steps=5, ckpt_every=100), progress=False)
    real = BatchStream.batch

    def interrupt_at_3(self, step):
        if step == 3:
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(BatchStream, "batch", interrupt_at_3)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(run, steps=5, ckpt_every=100), progress=False)
    assert (run / "checkpoints" / "last").resolve().name == "step_0000003"
    monkeypatch.setattr(BatchStream, "batch", real)
    train(load_resume_config(run, {}), resume=True, progress=False)
    a, b = _weights(full), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_crash_while_writing_keeps_last_valid(tmp_path, monkeypatch):
    run = train(tiny_config(tmp_path / "run", steps=2, ckpt_every=100), progress=False)
    root = run / "checkpoints"
    good = (root / "last").resolve()
    real_write = ckpt_io._write_json

    def crash(path, obj):
        if path.name == "state.json":
            raise OSError("disk full (injected)")
        real_write(path, obj)

    monkeypatch.setattr(ckpt_io, "_write_json", crash)
    cfg = load_resume_config(run, {"train": {"steps": 4}})
    with pytest.raises(DiffuseError, match=r"cannot write checkpoint step_0000004 .*injected.*step_0000002\) is intact"):
        train(cfg, resume=True, progress=False)
    assert (root / "last").resolve() == good                     # still the old, complete one
    assert not (root / "step_0000004").exists()
    assert not list(root.glob(".tmp-*"))                          # the half-written one is gone
    monkeypatch.setattr(ckpt_io, "_write_json", real_write)
    train(load_resume_config(run, {"train": {"steps": 4}}), resume=True, progress=False)
    assert (root / "last").resolve().name == "step_0000004"
    assert not list(root.glob(".tmp-*"))                          # cleaned on resume


def test_keep_prunes_old_checkpoints_but_not_last(tmp_path):
    run = train(tiny_config(tmp_path / "run", steps=6, ckpt_every=1, keep=2), progress=False)
    steps = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert steps == ["step_0000005", "step_0000006"]


def test_prune_orders_step_dirs_by_number_past_seven_digits(tmp_path):
    """Step names are zero-padded to 7 digits, so step_10000000 sorts before step_9999000 as text: prune
    once deleted the newest checkpoints past step 9,999,999 and kept old ones."""
    root = tmp_path / "checkpoints"
    steps = (9_998_000, 9_999_000, 10_000_000, 10_001_000, 100_000_000)
    for step in steps:
        (root / ckpt_io.step_dir_name(step)).mkdir(parents=True)
    ckpt_io.point(root, "best", ckpt_io.step_dir_name(9_998_000))
    ckpt_io.prune(root, keep=2)
    left = {p.name for p in root.glob("step_*") if not p.is_symlink()}
    assert left == {"step_9998000", "step_10001000", "step_100000000"}       # the newest 2, and best


def test_early_stopping_keeps_best(tmp_path):
    # lr 0 never improves: patience 2 stops after the first epoch plus 2 more.
    cfg = tiny_config(tmp_path / "run", steps=10_000, batch_size=500, lr=1e-12, patience=2, ckpt_every=10_000)
    run = train(cfg, progress=False)
    log = (run / "train.log").read_text()
    assert "early stop" in log
    best = (run / "checkpoints" / "best").resolve()
    assert best.is_dir() and (best / "ema.safetensors").is_file()
    last_step = json.loads(((run / "checkpoints" / "last") / "state.json").read_text())["step"]
    assert last_step < 20


def test_resume_refuses_model_changes(tmp_path):
    run = train(tiny_config(tmp_path / "run", steps=1), progress=False)
    with pytest.raises(DiffuseError, match="cannot change base-channels"):
        load_resume_config(run, {"model": {"base_channels": 16}})


def test_out_dir_is_never_silently_overwritten(tmp_path):
    train(tiny_config(tmp_path / "run", steps=1), progress=False)
    with pytest.raises(DiffuseError, match="already holds a run"):
        train(tiny_config(tmp_path / "run", steps=1), progress=False)


def test_init_from_loads_weights_and_rejects_other_models(tmp_path):
    src = train(tiny_config(tmp_path / "src", steps=2), progress=False)
    cfg = tiny_config(tmp_path / "ft", steps=1, lr=1e-12)
    out = train(cfg, init_from=str(src), progress=False)
    # both the model and its EMA start from the source's EMA weights (the ones it samples with);
    # one step at lr ~0 leaves them there
    src_ema = _weights(src, "ema")
    for name in ("model", "ema"):
        w = _weights(out, name)
        assert all(torch.allclose(src_ema[k], w[k], atol=1e-6) for k in src_ema), name
    assert not all(torch.equal(src_ema[k], _weights(src, "model")[k]) for k in src_ema)
    other = tiny_config(tmp_path / "other", steps=1)
    other.model.base_channels = 16
    with pytest.raises(DiffuseError, match="different model"):
        train(other, init_from=str(src), progress=False)


def test_ema_warmup():
    assert ema_decay_at(0, 0.9999) == pytest.approx(0.1)
    assert ema_decay_at(10**7, 0.9999) == 0.9999


def test_train_step_takes_its_lr_and_ema_decay_from_the_plan():
    """The loop's one schedule: a plan of lr 0 and EMA decay 1 leaves weights and EMA exactly as they
    were (AdamW's update and weight decay both scale with lr), and the optimizer runs at the plan's lr."""
    from diffuse.train import Plan, TrainStep, build_training

    class Frozen(Plan):
        def lr(self, step):
            return 0.0

        def ema_decay(self, step):
            return 1.0

    cfg = tiny_config("unused")
    cfg.model.image_size, cfg.model.in_channels = 16, 1
    x0 = torch.rand(cfg.train.batch_size, 1, 16, 16) * 2 - 1
    for plan, frozen in ((Frozen(cfg), True), (None, False)):
        model, ema, opt = build_training(cfg, torch.device("cpu"), False)
        torch.nn.init.normal_(model.conv_out.weight, std=0.02)   # zero-initialised: EMA and model would match
        before = [p.detach().clone() for p in [*model.parameters(), *ema.parameters()]]
        step = TrainStep(model, ema, opt, Schedule("cosine", 1000), cfg, device=torch.device("cpu"), amp=None,
                         channels_last=False, plan=plan)
        step(x0, None, 0)
        after = [*model.parameters(), *ema.parameters()]
        assert all(torch.equal(a, b) for a, b in zip(before, after)) == frozen
        assert opt.param_groups[0]["lr"] == (0.0 if frozen else Plan(cfg).lr(0))


def test_the_loop_fits_on_one_screen_and_no_training_function_is_long():
    """The loop (train._train) stays <= 60 lines and so does every function of the training
    modules: a new feature becomes a duty or a stage of the run, not a branch inside the loop."""
    import ast

    src = Path(__file__).resolve().parents[1] / "src" / "diffuse"
    for name in ("train.py", "run.py", "duties.py"):
        tree = ast.parse((src / name).read_text())
        sizes = {f.name: f.end_lineno - f.lineno + 1 for f in ast.walk(tree)
                 if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
        assert not {f: n for f, n in sizes.items() if n > 60}, name
        if name == "train.py":
            assert sizes["_train"] <= 60


def test_a_run_ended_by_an_error_leaves_no_memmap_and_no_lock(tmp_path, monkeypatch):
    """open_run's teardown runs however the run ends: after a divergence (a DiffuseError raised
    from the loop) this rank's data memmap is gone and the run directory can be locked again."""
    from diffuse import train as T
    from diffuse.fsutil import RunLock

    real = T.weighted_mse
    monkeypatch.setattr(T, "weighted_mse", lambda out, target, weight: real(out, target, weight) * float("nan"))
    cfg = tiny_config(tmp_path / "run", steps=10, max_bad_steps=2)
    cfg.data.placement = "memmap"
    with pytest.raises(DiffuseError, match="2 consecutive steps"):
        train(cfg, progress=False)
    assert "data on memmap" in (tmp_path / "run" / "train.log").read_text()
    assert not list((tmp_path / "run").glob("data-memmap*"))
    RunLock(tmp_path / "run").acquire().release()


def test_metrics_and_artifacts(tmp_path):
    run = train(tiny_config(tmp_path / "run", steps=4, sample_every=2), progress=False)
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"step", "images_seen", "loss", "lr", "grad_norm", "img_per_sec", "wall_time"} <= rows[0].keys()
    assert rows[-1]["images_seen"] == 32
    for f in ("final.png", "loss_curve.png", "config.json", "train.log", "samples/step_0000002.png"):
        assert (run / f).is_file(), f
    assert list((run / "tb").glob("events.*"))


def test_label_dropout_rate_and_null_class():
    from diffuse.train import drop_labels
    y = torch.arange(10).repeat(2000)
    out = drop_labels(y, 0.1, 10, torch.Generator().manual_seed(0))
    dropped = out == 10
    assert abs(dropped.float().mean().item() - 0.1) < 0.01
    assert torch.equal(out[~dropped], y[~dropped])
    assert torch.equal(drop_labels(y, 0.0, 10, torch.Generator()), y)


def test_class_conditional_run_stores_class_names_and_grid_rows(tmp_path):
    from PIL import Image
    cfg = tiny_config(tmp_path / "run", steps=2, sample_n=20)
    cfg.model.class_cond = True
    run = train(cfg, progress=False)
    header = json.loads((run / "checkpoints" / "last" / "config.json").read_text())
    assert header["class_names"] == [str(i) for i in range(10)]
    assert header["config"]["model"]["num_classes"] == 10
    w = _weights(run, "ema")
    assert w["class_emb.weight"].shape[0] == 11                  # 10 classes + null
    grid = Image.open(run / "final.png")
    # 10 rows (one per class) of 2 images: 16px digits upscaled 4x, plus the name margin
    assert grid.height == (10 * (16 + 2) + 2) * 4 and grid.width > (2 * (16 + 2) + 2) * 4


def test_class_cond_needs_labels(tmp_path):
    from PIL import Image as I
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        I.new("L", (16, 16), i * 60).save(folder / f"{i}.png")
    cfg = tiny_config(tmp_path / "run", steps=1)
    cfg.data.name = str(folder)
    cfg.model.class_cond = True
    with pytest.raises(DiffuseError, match="needs labels"):
        train(cfg, progress=False)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_cpu_memory_stops_page_faults_on_reallocation():
    """After keep_freed_cpu_memory(), freed 12 MiB blocks are reused, not unmapped and faulted in
    again. The control pins glibc's default 128 KiB mmap threshold (left alone, glibc raises it
    on the fly, so whether the default faults depends on the heap layout). One process per mode:
    the setting is process-wide."""
    import subprocess
    import sys
    code = """
import ctypes, resource, sys, torch
from diffuse.train import keep_freed_cpu_memory
if sys.argv[1] == "keep":
    assert keep_freed_cpu_memory()
else:
    assert ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)      # M_MMAP_THRESHOLD: glibc's default
def step():
    xs = [torch.empty(3 << 20).fill_(1.0) for _ in range(8)]    # 8 x 12 MiB, freed together
for _ in range(3):
    step()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""
    faults = {mode: int(subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                                       check=True).stdout.split()[-1]) for mode in ("default", "keep")}
    assert faults["default"] > 10 * 8 * 500, faults        # 3,072 pages per block, faulted in each time
    assert faults["keep"] < 200, faults
