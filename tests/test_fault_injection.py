"""Fault injection: `diffuse train` killed with SIGKILL at 20 seeded random moments, resumed each time.

One chain of processes trains a tiny model with a checkpoint every step. Each process is killed,
then the next one resumes the run (the kill count is across the chain, so start-up, about 2-3 s
of importing torch, is paid 20 times, not 20 x 20). Half the kills land at a random moment of
training, half inside a checkpoint write: ``DIFFUSE_TEST_PAUSE_IN_CKPT`` makes the writer pause at
each stage, and the test kills when a ``.tmp-*`` directory appears plus a random delay. After
every kill: ``last`` names a complete checkpoint, every ``step_*`` directory is complete, ``last``
never moves backwards (nothing that was the only copy is deleted), and the next process resumes
from exactly the step ``last`` named. At the end the weights are bit-identical to a run that was
never interrupted. SIGTERM (a clean stop with a checkpoint) and a second trainer on the same run
directory (refused in one line) are exercised in the same chain.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import TINY_FLAGS

KILLS = 10
STEPS = 60
BASE_FLAGS = [*TINY_FLAGS, "--steps", str(STEPS), "--batch-size", "8", "--ckpt-every", "1", "--keep", "2",
         "--log-every", "1", "--sample-every", "1000000", "--sample-n", "4", "--sample-steps", "2",
         "--precision", "fp32", "--device", "cpu", "--lr", "1e-3", "--warmup-steps", "0", "--no-progress"]
FILES = ("ema.safetensors", "model.safetensors", "state.safetensors", "config.json", "state.json")


def _image_folder(root: Path) -> Path:
    """16 small gray PNGs: a data set that loads without importing scikit-learn (start-up is
    most of this test's time)."""
    from PIL import Image
    root.mkdir()
    for i in range(16):
        Image.new("L", (16, 16), 15 * i).save(root / f"{i:02d}.png")
    return root


def _start(args: list[str], pause: float = 0.02) -> subprocess.Popen:
    env = {**os.environ, "DIFFUSE_TEST_PAUSE_IN_CKPT": str(pause)}
    return subprocess.Popen([sys.executable, "-m", "diffuse", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _headers(run: Path) -> int:
    log = run / "train.log"
    return log.read_text().count("diffuse train |") if log.is_file() else 0


def _wait_started(proc: subprocess.Popen, run: Path, before: int, timeout: float = 120) -> bool:
    """Until this process has written its header (training is about to start); False if it exited."""
    end = time.monotonic() + timeout
    while _headers(run) <= before:
        if proc.poll() is not None:
            return False
        assert time.monotonic() < end, "trainer did not start"
        time.sleep(0.01)
    return True


def _wait_for_write(proc: subprocess.Popen, root: Path, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < end:
        try:
            if any(p.name.startswith(".tmp-") for p in root.iterdir()):
                return
        except FileNotFoundError:
            pass
        time.sleep(0.002)


def _last_step(root: Path) -> int | None:
    """The step `last` names, after checking it and every real step directory are complete."""
    for d in root.glob("step_*"):
        assert all((d / f).is_file() for f in FILES), f"{d.name} is under a real name but incomplete"
    if not (root / "last").is_symlink():
        return None
    target = (root / "last").resolve()
    assert target.is_dir() and all((target / f).is_file() for f in FILES), f"`last` names a half checkpoint {target}"
    step = json.loads((target / "state.json").read_text())["step"]
    assert target.name == f"step_{step:07d}"
    return step


def _weights(run: Path) -> dict[str, torch.Tensor]:
    last = run / "checkpoints" / "last"
    return {f"{n}.{k}": v for n in ("model", "ema") for k, v in load_file(str(last / f"{n}.safetensors")).items()}


@pytest.mark.slow
def test_sigkill_at_10_random_moments_then_resume_is_bit_identical(tmp_path):
    rng = random.Random(20261201)
    ref, run = tmp_path / "reference", tmp_path / "run"
    flags = [*BASE_FLAGS, "--data", str(_image_folder(tmp_path / "imgs")), "--image-size", "16"]
    root = run / "checkpoints"

    kills, expected_resumes, last_seen = 0, [], None
    # the first process: a second trainer on the same run directory is refused while it runs
    proc = _start([*flags, "--out", str(run)], pause=0.3)
    assert _wait_started(proc, run, 0)
    second = subprocess.run([sys.executable, "-m", "diffuse", "train", "--resume", str(run)],
                            capture_output=True, text=True)
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert re.fullmatch(r"error: \S+ is in use by another diffuse process \(pid \d+\); .*\n", second.stderr), second.stderr

    while kills < KILLS:
        in_write = kills % 2 == 0
        if in_write:
            _wait_for_write(proc, root)
            time.sleep(rng.uniform(0, 0.12))
        else:
            time.sleep(rng.uniform(0, 0.6))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        else:
            pytest.fail(f"the trainer finished before kill {kills + 1}: {proc.stderr.read()[-500:]}")
        step = _last_step(root)
        if last_seen is not None:
            assert step is not None and step >= last_seen, f"kill {kills}: `last` went from {last_seen} to {step}"
        last_seen = step
        headers = _headers(run)
        if step is None:                          # killed before the first checkpoint: start over
            (run / "train.log").unlink()          # --overwrite empties the run directory anyway
            headers, expected_resumes = 0, []
            proc = _start([*flags, "--out", str(run), "--overwrite"])
        else:
            expected_resumes.append(step)
            proc = _start(["--resume", str(run), "--no-progress"])
        if not _wait_started(proc, run, headers):
            pytest.fail(f"the resumed trainer exited early: {proc.stderr.read()[-500:]}")

    # SIGTERM: a clean stop that writes a checkpoint of the step it reached
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    stopped = int(re.findall(r"interrupted at step (\d+); checkpoint", (run / "train.log").read_text())[-1])
    assert _last_step(root) == stopped
    expected_resumes.append(stopped)
    final = subprocess.run([sys.executable, "-m", "diffuse", "train", "--resume", str(run), "--no-progress"],
                           capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-1000:]

    resumed = [int(s) for s in re.findall(r"resumed from step (\d+)", (run / "train.log").read_text())]
    assert resumed == expected_resumes                     # always the newest complete checkpoint
    assert _last_step(root) == STEPS and not [p for p in root.iterdir() if p.name.startswith(".")]
    # the same command, never interrupted (in this process: one start-up fewer)
    from diffuse import cli
    assert cli.main(["train", *flags, "--out", str(ref)]) == 0
    a, b = _weights(ref), _weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"weights differ after {KILLS} kills"
    assert kills == KILLS
