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


def test_script_is_executable_in_git_and_on_disk():
    """Committed with its run bit (git mode 100755), so ./benchmarks/gpu_check.sh works after a clone."""
    line = subprocess.run(["git", "ls-files", "-s", "benchmarks/gpu_check.sh"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout
    assert line.split()[0] == "100755", line
    assert os.access(SCRIPT, os.X_OK)


def test_docs_run_it_one_way():
    """Every line in README.md, docs/ and benchmarks/ that runs the script says `bash benchmarks/gpu_check.sh`:
    no ./ or sh form, no bare path as a command (alone on its line or after VAR=value); other mentions
    name it inside a sentence or a table."""
    import re
    texts = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "benchmarks").glob("*.md")), SCRIPT]
    runs = 0
    for path in texts:
        for line in path.read_text().splitlines():
            for m in re.finditer(r"benchmarks/gpu_check\.sh", line):
                before = line[:m.start()]
                if before.endswith("bash "):
                    runs += 1
                    continue
                command = before.lstrip("# ") == "" or before.endswith(("./", "sh ", "$ ")) or re.search(r"\w=\S*\s+$", before)
                assert not command, (path.name, line)
    assert runs >= 4
