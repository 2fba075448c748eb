"""The small things a new user trips over: output paths checked before any work, no flag
prefixes, help text on every argument, --threads, where attention is, the noising view's
schedule, checkpoint file modes, and the test session's own temporary cache."""

from __future__ import annotations

import argparse
import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from diffuse import checkpoint as ckpt_io
from diffuse import threads
from diffuse import visualize as vis
from diffuse.cli import attention_where, build_parser, main
from diffuse.config import resolve
from diffuse.diffusion import Schedule
from diffuse.errors import DiffuseError
from diffuse.outputs import check_dir, check_file

from .conftest import REPO


def _sys_is_unwritable() -> bool:
    try:
        with tempfile.TemporaryFile(dir="/sys"):
            return False
    except OSError:
        return True


needs_unwritable_sys = pytest.mark.skipif(not (os.path.isdir("/sys") and _sys_is_unwritable()),
                                          reason="needs an unwritable /sys (Linux)")


# ----------------------------------------------------------------------------------------------
# Output paths, checked before any work

@needs_unwritable_sys
@pytest.mark.parametrize("argv, shown", [
    (["sample", "no-such-run", "--out", "/sys/x.png"], "/sys/x.png"),
    (["sample", "no-such-run", "--out", "/sys/pngs"], "/sys/pngs"),
    (["eval", "no-such-run", "--save-stats", "/sys/s.npz"], "/sys/s.npz"),
    (["visualize", "noising", "--out", "/sys/n.png"], "/sys/n.png"),
    (["visualize", "schedule", "--out", "/sys/s.png"], "/sys/s.png"),
    (["visualize", "trajectory", "no-such-run", "--out", "/sys/vis"], "/sys/vis"),
    (["visualize", "compare-samplers", "no-such-run", "--out", "/sys/vis"], "/sys/vis"),
    (["train", "--out", "/sys/run", "--data", "no-such-folder"], "/sys/run"),
])
def test_unwritable_output_fails_first_in_plain_words(argv, shown, capsys):
    # The run (or data) does not exist either: the output error coming first shows the check runs
    # before anything is loaded, sampled or trained.
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: cannot write {shown}: permission denied"


@pytest.mark.parametrize("argv, message", [
    (["sample", "no-such-run", "--out", "x.jpgg"], "use a .png (grid), a .npz (arrays) or a directory"),
    (["eval", "no-such-run", "--save-stats", "s.json"], "statistics files end in .npz"),
    (["visualize", "noising", "--out", "n.jpg"], "expected a file name ending in .png"),
])
def test_unknown_output_extension_fails_first(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_output_checks_create_nothing_and_name_the_blocker(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(DiffuseError, match=f"cannot write {blocker}/x.png: {blocker} is not a directory"):
        check_file(blocker / "x.png", (".png",))
    with pytest.raises(DiffuseError, match="is a file; expected a directory"):
        check_dir(blocker)
    (tmp_path / "d.png").mkdir()
    with pytest.raises(DiffuseError, match="is a directory"):
        check_file(tmp_path / "d.png", (".png",))
    deep = tmp_path / "new" / "deeper" / "run"
    assert check_dir(deep) == deep and not (tmp_path / "new").exists()      # checked, not created
    assert check_file(tmp_path / "new" / "g.png", (".png",)).suffix == ".png"
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------------------------
# The parser: no prefixes, help everywhere

def _parsers(p: argparse.ArgumentParser, name: str = "diffuse"):
    yield name, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


@pytest.mark.parametrize("argv", [
    ["sample", "RUN", "--step", "10"],
    ["train", "--step", "10"],
    ["eval", "RUN", "--save", "x.npz"],
    ["visualize", "noising", "--out", "n.png", "--sched", "cosine"],
])
def test_flag_prefixes_are_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_every_parser_refuses_prefixes_and_every_argument_has_help():
    missing = []
    for name, parser in _parsers(build_parser()):
        assert parser.allow_abbrev is False, name
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {action.option_strings or action.dest}")
    assert not missing, f"arguments without help text: {missing}"


# ----------------------------------------------------------------------------------------------
# Threads

def test_threads_default_to_the_affinity_mask():
    assert threads.available_cores() == len(os.sched_getaffinity(0))
    try:
        assert threads.set_threads(None) == threads.available_cores() == torch.get_num_threads()
        assert threads.set_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(2)
    with pytest.raises(DiffuseError, match="--threads must be a positive integer"):
        threads.set_threads(0)


def test_busy_machine_is_named():
    assert threads.busy_note(cores=2, demand=0.3) is None
    assert threads.busy_note(cores=8, demand=3.0) is None
    note = threads.busy_note(cores=2, demand=1.6)
    assert note.startswith("machine busy: other processes use 1.6 of 2 cores") and "--threads 1" in note


def test_cpu_demand_reads_our_cores_busy_share_from_proc_stat(tmp_path, monkeypatch):
    # two readings a window apart: our cores (cpu0, cpu1) gained 75 ticks, 25 of them busy
    # (user+nice+system+irq+softirq+steal; idle+iowait are idle): 1/3 of 2 cores in use by others.
    # cpu2 is not in our affinity mask and the "cpu" total line is not summed.
    proc = tmp_path / "stat"
    readings = iter(["cpu  100 0 0 100 0 0 0 0 0 0\ncpu0 50 0 0 50 0 0 0 0 0 0\ncpu1 50 0 0 50 0 0 0 0 0 0\n"
                     "cpu2 0 0 0 0 0 0 0 0 0 0\n",
                     "cpu  130 0 0 170 0 0 0 0 0 0\ncpu0 60 0 0 90 0 0 0 0 0 0\ncpu1 55 5 5 55 5 0 0 0 0 0\n"
                     "cpu2 900 0 0 0 0 0 0 0 0 0\n"])
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1})       # cpu2 is not ours
    monkeypatch.setattr("time.sleep", lambda s: proc.write_text(next(readings)))
    proc.write_text(next(readings))
    assert threads.cpu_demand(path=str(proc)) == pytest.approx(2 * 25 / 75)
    assert threads.cpu_demand(path=str(tmp_path / "missing")) is None


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs /proc/stat")
def test_a_process_that_just_ended_does_not_count_as_busy():
    # The 1-minute load average remembers work that has ended (the install before `make demo`);
    # the measured demand does not: busy while spinners run on every core, idle right after.
    cores = threads.available_cores()
    if threads.cpu_demand(window=0.5) > 0.5:
        pytest.skip("other work keeps this machine's cores busy: nothing to contrast with")
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(1.0)
        during = threads.cpu_demand(window=0.5)
    finally:
        for p in spin:
            p.kill()
            p.wait()
    after = threads.cpu_demand(window=0.5)
    assert during >= max(1.0, cores / 2) and threads.busy_note(cores, during) is not None
    assert after < during / 2


def test_others_demand_is_our_cores_busy_time_less_our_own():
    # 200 ticks over 2 cores at 100 Hz: 1 s of wall; 150 busy ticks: 1.5 core-seconds, 0.5 of them ours
    assert threads.others_demand((100, 1000, 1.0), (250, 1200, 1.5), cores=2, hz=100) == pytest.approx(1.0)
    # our CPU time read above the ticks' (10 ms granularity): nobody else, never below 0
    assert threads.others_demand((100, 1000, 1.0), (150, 1200, 1.6), cores=2, hz=100) == 0.0
    assert threads.others_demand(None, (1, 2, 0.0)) is None
    assert threads.others_demand((1, 2, 0.0), (1, 2, 0.0)) is None                  # no tick passed


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs /proc/stat")
def test_cpu_marks_see_a_spinner_and_not_our_own_work():
    if threads.cpu_demand(window=0.5) > 0.5:
        pytest.skip("other work keeps this machine's cores busy: nothing to contrast with")
    mark = threads.cpu_mark()
    deadline = time.perf_counter() + 0.5
    while time.perf_counter() < deadline:                   # our own work: one core, not someone else's
        pass
    ours = threads.others_demand(mark, threads.cpu_mark())
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        mark = threads.cpu_mark()
        time.sleep(0.5)
        theirs = threads.others_demand(mark, threads.cpu_mark())
    finally:
        spin.kill()
        spin.wait()
    assert ours < 0.25 and theirs > 0.75


@pytest.mark.parametrize("demand, preset, expect", [(1e4, None, "PASSIVE"), (0.1, None, None),
                                                    (1e4, "ACTIVE", "ACTIVE")])
def test_busy_machine_lets_idle_openmp_threads_sleep(demand, preset, expect):
    # A fresh interpreter (libgomp reads OMP_WAIT_POLICY once, when torch loads): the policy is set
    # only on a busy machine, before torch is imported, and never over the user's own choice.
    code = ("import sys; import diffuse.threads as t; t.cpu_demand = lambda *a, **k: %r\n"
            "t.prefer_passive_wait(); assert 'torch' not in sys.modules\n"
            "import os; print(os.environ.get('OMP_WAIT_POLICY'))" % demand)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(expect)
    assert threads.prefer_passive_wait({}) is False                # here torch is loaded already: too late


def test_train_rejects_zero_threads(capsys):
    assert main(["train", "--threads", "0", "--dry-run"]) == 1
    assert "--threads must be a positive integer" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Small truths

def test_info_says_where_attention_is():
    cfg = resolve("digits", None, None, {})
    assert cfg.model.attn_resolutions == ()
    from diffuse.models import AttnBlock, UNet
    cfg.model.image_size, cfg.model.in_channels = 16, 1
    assert isinstance(UNet(cfg.model).mid_attn, AttnBlock)           # what the text below claims
    assert attention_where((), 16) == "attention in the middle block only"
    assert attention_where((16, 8), 32) == "attention at 16x16, 8x8 and in the middle block"


def test_noising_uses_the_presets_schedule_unless_told():
    digits = vis.noising(data="digits", n=2, ts=[400])
    assert digits.schedule == "cosine" and digits.preset == "digits"
    assert digits.abar == [pytest.approx(float(Schedule("cosine", 1000).alphas_cumprod[400]))]
    linear = vis.noising(data="digits", schedule="linear", n=2, ts=[400])
    assert linear.schedule == "linear"
    assert linear.abar == [pytest.approx(float(Schedule("linear", 1000).alphas_cumprod[400]))]


def test_checkpoint_files_get_the_umasks_mode(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    old = os.umask(0o022)
    try:
        path = ckpt_io.save_checkpoint(tmp_path / "checkpoints", 1, model=model, ema=model, optimizer=opt,
                                       config={}, state={})
    finally:
        os.umask(old)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()}
    assert set(modes) >= {"ema.safetensors", "model.safetensors", "state.safetensors"}
    assert all(m == 0o644 for m in modes.values()), modes


def test_the_session_cache_is_removed_at_the_end(tmp_path):
    # A pytest session of one fast test, with its own TMPDIR: afterwards no diffuse-test-cache-*.
    env = {k: v for k, v in os.environ.items() if k not in ("DIFFUSE_TEST_CACHE", "DIFFUSE_CACHE")}
    env["TMPDIR"] = str(tmp_path)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/test_diffusion.py::test_linear_betas_endpoints_and_spacing"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert [q.name for q in Path(tmp_path).iterdir() if q.name.startswith("diffuse-test-cache-")] == []
