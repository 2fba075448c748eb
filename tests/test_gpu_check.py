"""benchmarks/gpu_check.sh stays runnable: bash parses it, and its dry run names every stage."""

from __future__ import annotations

import os
import subprocess
import sys

from .conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_dry_run_lists_every_stage_and_writes_nothing(tmp_path):
    env = {**os.environ, "GPU_CHECK_DRY": "1", "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    p = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    for stage in ("cuda-tests", "throughput", "throughput-compile", "peers", "train", "fid", "ddp-overhead"):
        assert any(line.startswith(stage) for line in p.stdout.splitlines()), (stage, p.stdout)
    assert "-m cuda" in p.stdout and "train_throughput.py" in p.stdout and "--mfu" in p.stdout
    assert not (REPO / "gpu_check_out").exists() and not list(tmp_path.glob("gpu_check.*"))   # work dir removed


def test_without_a_gpu_it_refuses_unless_allowed(tmp_path):
    import torch
    if torch.cuda.is_available():
        return
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path)}
    env.pop("GPU_CHECK_ALLOW_CPU", None)
    env.pop("GPU_CHECK_DRY", None)
    p = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 2 and "GPU_CHECK_ALLOW_CPU" in p.stderr
