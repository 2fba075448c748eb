"""Reliability: each gap found by reading the code, closed and shown by a test that failed before.

Crash-safe checkpoint replace, the non-finite-step guard, --overwrite only on marked directories,
the run-directory lock, atomic writes through one helper, validated loaded configs, refused bad
values, data fingerprints on resume, CUDA RNG restore, full hashes, disk full. (Hostile files and
bad input: tests/test_hostile_inputs.py; kills: tests/test_fault_injection.py.)
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffuse import checkpoint as ckpt_io
from diffuse import fsutil
from diffuse import train as T
from diffuse.config import resolve
from diffuse.errors import DiffuseError
from diffuse.train import build_training, load_resume_config, train

from .conftest import REPO, TINY_MODEL, tiny_config

CPU = torch.device("cpu")


def _parts():
    """A tiny model, its EMA and a fused AdamW that has taken one step (so it has moments)."""
    cfg = tiny_config("unused")
    cfg.model.image_size, cfg.model.in_channels = 16, 1
    model, ema, opt = build_training(cfg, CPU, False)
    model(torch.randn(2, 1, 16, 16), torch.zeros(2)).square().mean().backward()
    opt.step()
    return cfg, model, ema, opt


def _complete(d: Path) -> bool:
    return d.is_dir() and all((d / f).is_file() for f in
                              ("ema.safetensors", "model.safetensors", "state.safetensors", "config.json", "state.json"))


# ----------------------------------------------------------------------------------------------
# Gap 1: replacing a checkpoint directory had a window with no complete copy under its name

class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (BaseException: no except clause catches it)."""


def test_replacing_a_checkpoint_survives_a_crash_at_every_point(tmp_path, monkeypatch):
    cfg, model, ema, opt = _parts()

    def save(root):
        return ckpt_io.save_checkpoint(root, 3, model=model, ema=ema, optimizer=opt, config=cfg.to_dict(),
                                       state={"step": 3})

    mutating = [(os, "rename"), (os, "replace"), (os, "symlink"), (os, "unlink"), (shutil, "rmtree")]
    k, finished = 0, False
    while not finished:
        k += 1
        root = tmp_path / f"try{k}" / "checkpoints"
        save(root)                                  # step 3 exists and `last` names it
        calls = [0]

        def dying(fn):
            def wrapped(*a, **kw):
                calls[0] += 1
                if calls[0] == k:
                    raise Killed
                return fn(*a, **kw)
            return wrapped

        with monkeypatch.context() as m:
            for mod, name in mutating:
                m.setattr(mod, name, dying(getattr(mod, name)))
            m.setattr(ckpt_io, "exchange", dying(getattr(ckpt_io, "exchange", fsutil.exchange)), raising=False)
            try:
                save(root)                          # resume, then stop at the same step: a re-write
                finished = True
            except Killed:
                pass
        # at every instant `last` names a complete checkpoint of step 3...
        assert _complete((root / "last").resolve()), f"crash at mutating call {k} left `last` without a checkpoint"
        # ...and what the next --resume tidies up keeps it
        ckpt_io.clean_temporaries(root)
        assert _complete((root / "last").resolve()) and (root / "last").resolve().name == "step_0000003"
        assert not [p for p in root.iterdir() if p.name.startswith(".")]
    assert k >= 4                                   # several distinct crash points were tried


def test_parked_copy_is_put_back_when_exchange_is_unavailable(tmp_path, monkeypatch):
    """Where renameat2 cannot exchange (NFS, not Linux), a crash between parking the old copy and
    renaming the new one leaves `.old-step_N-*`: the next resume puts it back, never deletes it."""
    cfg, model, ema, opt = _parts()
    root = tmp_path / "checkpoints"
    kw = dict(model=model, ema=ema, optimizer=opt, config=cfg.to_dict(), state={"step": 3})
    ckpt_io.save_checkpoint(root, 3, **kw)
    monkeypatch.setattr(ckpt_io, "exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise Killed                            # after the old copy was parked
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Killed):
        ckpt_io.save_checkpoint(root, 3, **kw)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not (root / "step_0000003").exists() and list(root.glob(".old-step_0000003-*"))
    ckpt_io.clean_temporaries(root)
    assert _complete((root / "last").resolve()) and not list(root.glob(".old-*"))


# ----------------------------------------------------------------------------------------------
# Gap 2: one NaN reached the weights, the optimizer moments and the EMA

def _snapshot(model, ema, opt):
    return ([p.detach().clone() for p in model.parameters()], [p.detach().clone() for p in ema.parameters()],
            [{k: v.clone() for k, v in st.items()} for st in opt.state.values()])


def test_a_non_finite_step_is_skipped_leaving_weights_moments_and_ema(monkeypatch):
    from diffuse.diffusion import Schedule
    cfg, model, ema, opt = _parts()
    step = T.TrainStep(model, ema, opt, Schedule("cosine", 1000), cfg, device=CPU, amp=None, channels_last=False)
    x0 = torch.rand(cfg.train.batch_size, 1, 16, 16) * 2 - 1   # TrainStep takes (its rows of) the global batch
    step(x0, None, 0)
    before = _snapshot(model, ema, opt)
    real = T.weighted_mse
    monkeypatch.setattr(T, "weighted_mse", lambda out, target, weight: real(out, target, weight) * float("nan"))
    step(x0, None, 1)
    after = _snapshot(model, ema, opt)
    for a, b in zip(before[0] + before[1], after[0] + after[1]):
        assert torch.equal(a, b)                    # weights and EMA untouched, bit for bit
    for sa, sb in zip(before[2], after[2]):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)   # moments and AdamW's step count too
    monkeypatch.setattr(T, "weighted_mse", real)
    step(x0, None, 2)                               # a finite step trains again
    assert not all(torch.equal(a, b) for a, b in zip(before[0], model.parameters()))


def test_bad_steps_are_counted_and_a_run_of_them_stops_with_the_last_checkpoint_intact(tmp_path, monkeypatch):
    real = T.weighted_mse
    poisoned = {"from": 10**9, "at": set()}
    calls = [0]

    def loss(out, target, weight):
        k = calls[0]
        calls[0] += 1
        bad = k in poisoned["at"] or k >= poisoned["from"]
        return real(out, target, weight) * (float("nan") if bad else 1.0)

    monkeypatch.setattr(T, "weighted_mse", loss)
    poisoned["at"] = {1}
    run = train(tiny_config(tmp_path / "counted", steps=4, ckpt_every=100), progress=False)
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["bad_steps"] for r in rows] == [0, 1, 0, 0] and rows[1]["loss"] is None
    assert "skipped 1 step(s) with a non-finite loss" in (run / "train.log").read_text()
    assert json.loads((run / "checkpoints/last/state.json").read_text())["bad_steps"] == 1
    assert all(torch.isfinite(v).all() for v in load_file(str(run / "checkpoints/last/model.safetensors")).values())

    calls[0], poisoned["at"], poisoned["from"] = 0, set(), 2
    out = tmp_path / "diverged"
    with pytest.raises(DiffuseError, match=r"3 consecutive steps had a non-finite loss.*step_0000004.*intact"):
        train(tiny_config(out, steps=50, ckpt_every=2, max_bad_steps=3), progress=False)
    root = out / "checkpoints"
    assert (root / "last").resolve().name == "step_0000004"      # nothing saved after the stop
    w2, w4 = load_file(str(root / "step_0000002/model.safetensors")), load_file(str(root / "step_0000004/model.safetensors"))
    assert all(torch.equal(w2[k], w4[k]) for k in w2)              # steps 3-4 were skipped: same weights
    assert "consecutive steps had a non-finite" in (out / "train.log").read_text()


# ----------------------------------------------------------------------------------------------
# Gap 3: --overwrite removed any directory with a config.json

def test_overwrite_removes_only_a_directory_diffuse_made(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(DiffuseError, match="refusing to --overwrite.*did not make it"):
        train(tiny_config(foreign, steps=1), overwrite=True, progress=False)
    assert (foreign / "thesis.tex").read_text() == "years of work"
    run = train(tiny_config(tmp_path / "run", steps=1), progress=False)
    assert fsutil.is_run_dir(run)
    (run / "old.txt").write_text("x")
    train(tiny_config(run, steps=1), overwrite=True, progress=False)
    assert not (run / "old.txt").exists() and fsutil.is_run_dir(run)


# ----------------------------------------------------------------------------------------------
# Gap 4: two processes could train into one run directory

def test_a_run_directory_takes_one_trainer_and_a_stale_lock_does_not_block(tmp_path):
    run = train(tiny_config(tmp_path / "run", steps=1), progress=False)
    with fsutil.RunLock(run):                       # another trainer holds it
        with pytest.raises(DiffuseError, match=r"in use by another diffuse process \(pid \d+\)"):
            train(load_resume_config(run, {"train": {"steps": 2}}), resume=True, progress=False)
        with pytest.raises(DiffuseError, match="in use"):
            train(tiny_config(run, steps=1), overwrite=True, progress=False)
    assert _complete((run / "checkpoints" / "last").resolve())  # the refused --overwrite deleted nothing
    # a trainer killed while holding the lock leaves the file, not the lock
    code = f"from diffuse.fsutil import RunLock; import os, signal; RunLock({str(run)!r}).acquire(); os.kill(os.getpid(), signal.SIGKILL)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    assert (run / ".lock").read_text().strip() != str(os.getpid())
    train(load_resume_config(run, {"train": {"steps": 2}}), resume=True, progress=False)


# ----------------------------------------------------------------------------------------------
# Gap 5: writes that were not atomic; one helper for all of them

def test_an_interrupted_sample_npz_write_keeps_the_old_file(tmp_path, monkeypatch):
    from diffuse.images import save_images
    out = tmp_path / "s.npz"
    imgs = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    save_images(imgs, out)
    good = out.read_bytes()

    def dies_midway(f, **arrays):
        (open(f, "wb") if isinstance(f, (str, Path)) else f).write(b"PK\x03\x04 half a zip")
        raise OSError(errno.EIO, "I/O error (injected)")

    monkeypatch.setattr(np, "savez", dies_midway)
    with pytest.raises(OSError, match="injected"):
        save_images(imgs, out)
    assert out.read_bytes() == good and not list(tmp_path.glob(".*.part"))
    monkeypatch.undo()
    save_images(imgs, out, meta=json.dumps({"seed": 1}))      # sample's record goes in the same single write
    with np.load(out) as z:
        assert json.loads(str(z["meta"])) == {"seed": 1} and z["images"].shape == (2, 8, 8, 1)


def test_one_atomic_write_helper_serves_every_file_written():
    """No near-copies of temp-file-and-replace outside fsutil (checkpoint.point swaps a symlink)."""
    offenders = []
    for path in sorted((REPO / "src" / "diffuse").rglob("*.py")):
        if path.name == "fsutil.py":
            continue
        text = path.read_text()
        for pattern in ("mkstemp", 'with_suffix(".tmp")', ".part\")", "os.replace("):
            n = text.count(pattern) - (1 if (path.name, pattern) == ("checkpoint.py", "os.replace(") else 0)
            if n > 0:
                offenders.append(f"{path.name}: {pattern}")
        if re.search(r"\(out / \"config\.json\"\)\.write_text|meta_path\.write_text", text):
            offenders.append(f"{path.name}: write_text of a file others read")
    assert not offenders, offenders


def test_atomic_open_leaves_the_old_file_on_error_and_sets_normal_permissions(tmp_path):
    p = tmp_path / "f.json"
    fsutil.atomic_write(p, "old")
    with pytest.raises(RuntimeError):
        with fsutil.atomic_open(p, "w") as f:
            f.write("new, half")
            raise RuntimeError
    assert p.read_text() == "old" and [q.name for q in tmp_path.iterdir()] == ["f.json"]
    assert p.stat().st_mode & 0o777 == 0o666 & ~fsutil._umask()


# ----------------------------------------------------------------------------------------------
# Gap 6: a loaded config was not validated

@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    return train(tiny_config(tmp_path_factory.mktemp("small") / "run", steps=1), progress=False)


def test_of_several_bad_values_validate_reports_the_earliest_stage():
    # config.validate runs finite, limits, model, diffusion, train, data in that order.
    from diffuse.config import Config, validate
    cfg = Config()
    validate(cfg)                                       # the defaults pass
    cfg.data.placement, cfg.train.lr, cfg.diffusion.timesteps, cfg.model.dropout = "nowhere", -1.0, 1, 2.0
    cfg.model.base_channels, cfg.train.ema_decay = 10_000, float("nan")
    for message, fix in [("--ema-decay must be a finite number", lambda: setattr(cfg.train, "ema_decay", 0.9)),
                         ("--base-channels 10000 is too large", lambda: setattr(cfg.model, "base_channels", 32)),
                         ("--dropout must be in", lambda: setattr(cfg.model, "dropout", 0.1)),
                         ("--timesteps must be at least 2", lambda: setattr(cfg.diffusion, "timesteps", 1000)),
                         ("--lr must be positive", lambda: setattr(cfg.train, "lr", 1e-4)),
                         ("--data-placement must be", lambda: setattr(cfg.data, "placement", "auto"))]:
        with pytest.raises(DiffuseError, match=re.escape(message)):
            validate(cfg)
        fix()
    validate(cfg)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["config"]["model"].update(head_channels=3), "head-channels 3 splits the 16-channel"),
    (lambda c: c["config"]["model"].update(image_size=0), "not a trained model's"),
    (lambda c: c["config"]["model"].update(in_channels=7), "not a trained model's"),
    (lambda c: c["config"]["model"].update(channel_mult=[1, 2, 2, 2, 2, 2]), "not divisible by 32"),
    (lambda c: c["config"]["model"].update(num_groups=5), "num-groups 5 must divide"),
    (lambda c: c["config"]["model"].update(base_channels="wide"), "bad value 'wide' for base-channels"),
    (lambda c: c["config"]["model"].update(dropout=None), "dropout cannot be null"),
    (lambda c: c["config"]["diffusion"].update(timesteps=-5), "timesteps must be at least 2"),
    (lambda c: c["config"]["diffusion"].update(prediction="score"), "--objective must be one of"),
    (lambda c: c["config"].update(extra={"x": 1}), "unknown section 'extra'"),
    (lambda c: c["config"]["model"].update(wings=2), "unknown setting model.wings"),
    (lambda c: c.update(config=[1, 2]), "config must be a JSON object"),
    (lambda c: c.update(format_version="1"), "format_version must be an integer"),
    (lambda c: c.update(class_names="0123"), "class_names must be a list"),
])
def test_generate_load_refuses_a_hand_edited_config_in_one_line(small_run, tmp_path, edit, message):
    from diffuse.generate import load
    ckpt = tmp_path / "ckpt"
    shutil.copytree((small_run / "checkpoints" / "last").resolve(), ckpt)
    header = json.loads((ckpt / "config.json").read_text())
    edit(header)
    (ckpt / "config.json").write_text(json.dumps(header))
    with pytest.raises(DiffuseError, match=message):
        load(ckpt, CPU)


# ----------------------------------------------------------------------------------------------
# Gap 7: values accepted that gave wrong results or late crashes

def _resolve(**sections):
    return resolve("digits", None, None, {k: v for k, v in sections.items()})


@pytest.mark.parametrize("overrides, message", [
    ({"model": {**TINY_MODEL, "head_channels": 0}}, "head-channels must be at least 1"),
    ({"model": {**TINY_MODEL, "base_channels": 10, "num_groups": 2, "head_channels": 3}}, "head-channels 3 splits the 20-channel middle"),
    ({"model": {"class_cond": True}, "train": {"label_dropout": 0.0}}, "class-cond needs --label-dropout > 0"),
    ({"diffusion": {"schedule": "linear", "timesteps": 100, "beta_start": 1e-4, "beta_end": 0.02}}, "alpha-bar_T = 0.364"),
    ({"diffusion": {"schedule": "linear", "timesteps": 10}}, "use --schedule cosine for small T"),
    ({"diffusion": {"prediction": "score"}}, "--objective must be one of"),
])
def test_values_that_trained_wrongly_or_crashed_late_are_refused(overrides, message):
    with pytest.raises(DiffuseError, match=message):
        _resolve(**overrides)


def test_head_channels_that_do_not_divide_a_level_fail_before_training(tmp_path):
    # the middle attention (30 channels, 10 heads of 3) is fine; the 16px level's 10 channels
    # would be split into 3 heads: a RuntimeError at the first forward before the check
    cfg = tiny_config(tmp_path / "run", steps=1)
    m = cfg.model
    m.base_channels, m.channel_mult, m.attn_resolutions, m.num_groups, m.head_channels = 10, (1, 3), (16,), 2, 3
    with pytest.raises(DiffuseError, match="head-channels 3 splits the 10-channel attention at 16px"):
        train(cfg, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_linear_betas_scale_with_the_number_of_steps():
    from diffuse.config import linear_abar_T
    for steps in (100, 250, 1000, 4000):
        d = _resolve(diffusion={"schedule": "linear", "timesteps": steps}).diffusion
        assert d.beta_start == pytest.approx(1e-4 * 1000 / steps) and d.beta_end == pytest.approx(0.02 * 1000 / steps)
        assert linear_abar_T(d.beta_start, d.beta_end, steps) < 1e-4     # x_T is pure noise, as sampling assumes
    d = _resolve(diffusion={"schedule": "linear", "timesteps": 100, "beta_end": 0.15}).diffusion
    assert d.beta_end == 0.15 and d.beta_start == pytest.approx(1e-3)    # explicit values are kept


def test_eta_and_guidance_out_of_range_are_refused(small_run):
    from diffuse.generate import generate, load
    loaded = load(small_run, CPU)
    for kw, message in [({"sampler": "ddim", "eta": -0.1}, "eta for ddim must be in"),
                        ({"eta": 10.5}, "eta for dpmpp-2m-sde must be in"),
                        ({"sampler": "ddim", "eta": float("nan")}, "eta"),
                        ({"guidance": float("inf")}, "guidance must be a finite"), ({"n": 10**12}, "--n must be between")]:
        with pytest.raises(DiffuseError, match=message):
            generate(loaded, steps=2, **{"n": 1, **kw})


def _cifar_batch(labels):
    return pickle.dumps({b"data": np.zeros((len(labels), 3072), np.uint8), b"labels": list(labels)}, protocol=2)


def test_cifar_labels_are_range_checked(tmp_path):
    from diffuse.data import load_dataset
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(_cifar_batch([0, 9] if i < 5 else [3, 10]))
    with pytest.raises(DiffuseError, match="labels outside 0..9"):
        load_dataset("cifar10", tmp_path, "train")


# ----------------------------------------------------------------------------------------------
# Gap 8: resume refused a moved data folder yet missed a changed one; CUDA RNG not restored

def _folder(path: Path, n: int) -> Path:
    from PIL import Image
    path.mkdir(parents=True)
    for i in range(n):
        Image.new("L", (16, 16), 10 * i).save(path / f"{i:03d}.png")
    return path


def test_resume_follows_moved_data_and_refuses_changed_data(tmp_path):
    data = _folder(tmp_path / "a" / "imgs", 8)
    cfg = tiny_config(tmp_path / "run", steps=1)
    cfg.data.name, cfg.data.image_size = str(data), 16
    run = train(cfg, progress=False)
    moved = tmp_path / "b" / "imgs"
    shutil.copytree(data, moved)                    # a copy gets new mtimes: same data all the same
    train(load_resume_config(run, {"data": {"name": str(moved)}, "train": {"steps": 2}}), resume=True, progress=False)
    from PIL import Image
    Image.new("L", (16, 16), 255).save(moved / "new.png")
    with pytest.raises(DiffuseError, match=r"changed since this run started \(8 images then, 9 now\)"):
        train(load_resume_config(run, {"data": {"name": str(moved)}, "train": {"steps": 3}}), resume=True, progress=False)
    (moved / "new.png").unlink()
    (moved / "000.png").write_bytes((moved / "000.png").read_bytes() + b"\0")   # same count, other bytes
    with pytest.raises(DiffuseError, match=r"changed.*bytes then"):
        train(load_resume_config(run, {"data": {"name": str(moved)}, "train": {"steps": 3}}), resume=True, progress=False)
    with pytest.raises(DiffuseError, match="cannot change name"):                 # a folder is not mnist
        load_resume_config(run, {"data": {"name": "mnist"}})


def test_cuda_rng_states_are_restored(monkeypatch):
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.setdefault("s", list(states)))
    tensors = {"rng.torch": torch.get_rng_state(), "rng.cuda.0": torch.tensor([1], dtype=torch.uint8),
               "rng.cuda.1": torch.tensor([2], dtype=torch.uint8)}
    ckpt_io.restore_rng(tensors, Path("ckpt"))
    assert [int(s[0]) for s in restored["s"]] == [1, 2]


# ----------------------------------------------------------------------------------------------
# Gap 9: hashes and torch.load

def test_inception_weights_need_the_full_sha256_not_its_prefix(tmp_path, monkeypatch):
    from diffuse import inception
    forged = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    forged.write_bytes(b"not the weights")
    # a file whose digest merely starts with the published 8 hex digits (2^32 tries to make one)
    monkeypatch.setattr(inception, "file_hash", lambda p, algo: "6726825d" + "0" * 56 if algo == "sha256" else "0")
    with pytest.raises(DiffuseError, match="not a known FID Inception weights file"):
        inception.identify_weights(forged)
    real = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
    monkeypatch.setattr(inception, "file_hash", lambda p, algo: real if algo == "sha256" else "0")
    assert inception.identify_weights(forged) == ("state_dict", f"sha256:{real}")


def test_torch_is_required_at_a_version_whose_weights_only_load_is_safe():
    text = (REPO / "pyproject.toml").read_text()
    (spec,) = re.findall(r'"torch>=([\d.]+)"', text)
    assert tuple(map(int, spec.split("."))) >= (2, 6)
    assert tuple(map(int, torch.__version__.split("+")[0].split(".")[:2])) >= (2, 6)


# ----------------------------------------------------------------------------------------------
# Disk full

def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_during_a_checkpoint_is_a_clear_error_and_keeps_the_previous_one(tmp_path, monkeypatch):
    """On a real 3 MiB tmpfs where this test may mount one (root), else an injected ENOSPC."""
    mnt = tmp_path / "small"
    mounted = _tmpfs(mnt, "3m")
    try:
        if not mounted:
            real = ckpt_io._save_tensors
            monkeypatch.setattr(ckpt_io, "_save_tensors", lambda path, *a, **k: (
                _ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device", str(path)))
                if "step_0000003" in str(path) else real(path, *a, **k))
        run = mnt / "run"
        with pytest.raises(DiffuseError, match="(no space left|No space left)") as e:
            train(tiny_config(run, steps=400, ckpt_every=1, keep=0, sample_every=10**6), progress=False)
        assert "\n" not in str(e.value) and "intact" in str(e.value)
        root = run / "checkpoints"
        last = (root / "last").resolve()
        assert _complete(last)
        newest = max(int(p.name[5:]) for p in root.glob("step_*"))
        assert int(last.name[5:]) == newest                        # lost nothing before the failed write
        assert all(_complete(p) for p in root.glob("step_*")) and not list(root.glob(".tmp-*"))
        # free the space and go on from there
        for p in sorted(root.glob("step_*"))[:-1]:
            shutil.rmtree(p)
        monkeypatch.undo()
        train(load_resume_config(run, {"train": {"steps": newest + 1, "keep": 1}}), resume=True, progress=False)
        assert (root / "last").resolve().name == f"step_{newest + 1:07d}"
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)])
