"""torchrun + DDP on CPU (gloo, 2 processes on loopback): the split of the global batch changes
nothing but float rounding; resume across world sizes; sharded sampling and FID statistics; a
failing rank ends the job.

Tolerance: 2 ranks x 8 against 1 process x 16 (and --grad-accum 2) differ only in the order of
the float32 sums in the batch reductions (each rank's conv/GroupNorm weight gradients over 8
images, then the all-reduce) : after 4 AdamW steps at lr 1e-3 the weights agree to 1e-6 (seen:
~1.5e-8); masks or draws that depended on the split give ~1e-4 (seen: 6.6e-5 with per-slice
dropout masks). A 2-rank run stopped and resumed on 2 ranks is bit-identical to an uninterrupted
one; EMA weights are bit-identical across ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffuse import cli, fid
from diffuse.train import load_resume_config, train

from .conftest import TINY_FLAGS, tiny_config
from .ddp_worker import ProjectionExtractor, fixed_images

HERE = Path(__file__).resolve().parent
WORKER = str(HERE / "ddp_worker.py")
TOL = 1e-6
FLAGS = [*TINY_FLAGS, "--batch-size", "16", "--log-every", "1", "--sample-n", "4", "--sample-steps", "2",
         "--lr", "1e-3", "--warmup-steps", "0", "--dropout", "0.1", "--class-cond", "--flip",
         "--precision", "fp32", "--no-progress"]
TRAIN = dict(batch_size=16, lr=1e-3, warmup_steps=0, precision="fp32")


def torchrun(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFUSE_DIST_TIMEOUT": "60", **(env or {})}
    e["PYTHONPATH"] = os.pathsep.join([str(HERE.parent / "src"), str(HERE.parent), e.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def single_config(out: Path, **train_kw):
    cfg = tiny_config(out, steps=4, **{**TRAIN, **train_kw})
    cfg.model.dropout, cfg.model.class_cond, cfg.data.flip = 0.1, True, True
    return cfg


def weights(run: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "last" / f"{name}.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2-rank runs (uninterrupted; stopped at step 1 and resumed) and their 1-process references."""
    tmp = tmp_path_factory.mktemp("ddp")
    r = {"tmp": tmp, "dump": tmp / "dump"}
    r["dump"].mkdir()
    # U: 2 ranks x 8, 4 steps; each rank dumps its final model and EMA.
    r["U_out"] = ok(torchrun(WORKER, "train", str(r["dump"]), "train", "--out", str(tmp / "U"), "--steps", "4", *FLAGS))
    # A: 2 ranks, an agreed time-limit stop after step 1 ...
    ok(torchrun("-m", "diffuse", "train", "--out", str(tmp / "A"), "--steps", "4", "--time-limit", "0.00001", *FLAGS))
    shutil.copytree(tmp / "A", tmp / "B", symlinks=True)
    # ... resumed on 2 ranks (A) and on 1 process (B)
    ok(torchrun("-m", "diffuse", "train", "--resume", str(tmp / "A"), "--time-limit", "100", "--no-progress"))
    train(load_resume_config(tmp / "B", {"train": {"time_limit": 100.0, "out": str(tmp / "B")}}), resume=True,
          progress=False)
    # one process, batch 16; and with --grad-accum 2 (two micro-batches of 8)
    train(single_config(tmp / "C"), progress=False)
    train(single_config(tmp / "E", grad_accum=2), progress=False)
    return r


def test_two_ranks_equal_one_process_and_grad_accum(runs):
    tmp = runs["tmp"]
    for name in ("model", "ema"):
        c = weights(tmp / "C", name)
        assert max_diff(weights(tmp / "U", name), c) < TOL, "2 ranks x 8 differs from 1 process x 16"
        assert max_diff(weights(tmp / "E", name), c) < TOL, "--grad-accum 2 differs from batch 16"
    rows = [json.loads(x) for x in (tmp / "U" / "metrics.jsonl").read_text().splitlines()]
    c_rows = [json.loads(x) for x in (tmp / "C" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2, 3, 4]
    # the logged loss is the global batch's mean, as one process logs it
    assert np.allclose([x["loss"] for x in rows], [x["loss"] for x in c_rows], rtol=1e-5)


def test_ema_identical_on_both_ranks_and_only_rank0_wrote(runs):
    tmp, dump = runs["tmp"], runs["dump"]
    r0, r1 = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    assert identical(r0, r1), "ranks disagree on the weights or the EMA"
    assert identical({k[4:]: v for k, v in r0.items() if k.startswith("ema.")}, weights(tmp / "U", "ema"))
    log = (tmp / "U" / "train.log").read_text()
    assert log.count("diffuse train |") == 1 and "2 ranks x 8 images x 1 micro-batch" in log
    assert log.count("finished at step 4") == 1
    assert runs["U_out"].stdout.count("done:") == 1
    assert sorted(p.name for p in (tmp / "U").iterdir()) == ["checkpoints", "config.json", "final.png",
                                                           "loss_curve.png", "metrics.jsonl", "samples", "tb", "train.log"]


def test_stopped_and_resumed_two_rank_run_continues_identically(runs):
    tmp = runs["tmp"]
    log = (tmp / "A" / "train.log").read_text()
    assert "time limit" in log and "resumed from step" in log
    stopped_at = int(log.split("resumed from step ")[1].split()[0])
    assert 1 <= stopped_at < 4
    for name in ("model", "ema"):
        assert identical(weights(tmp / "A", name), weights(tmp / "U", name)), f"2-rank resume: {name} differs"
        # the 2-rank checkpoint resumed on one process continues the same run
        assert max_diff(weights(tmp / "B", name), weights(tmp / "U", name)) < TOL
    steps = [json.loads(x)["step"] for x in (tmp / "A" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_distributed_sampling_gives_the_same_images(runs, tmp_path):
    run = runs["tmp"] / "C"
    args = ["sample", str(run), "-n", "5", "--sampler", "ddpm", "--steps", "3", "--class", "all",
            "--seed", "3", "--no-progress"]
    ok(torchrun("-m", "diffuse", *args, "--out", str(tmp_path / "two.npz")))
    assert cli.main([*args, "--out", str(tmp_path / "one.npz")]) == 0
    two, one = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    assert one["images"].shape[0] == 10                  # --class all: 10 classes x 1
    assert np.array_equal(two["images"], one["images"]) and np.array_equal(two["labels"], one["labels"])


def test_distributed_fid_statistics_equal_one_process(tmp_path):
    n = 7                                                # odd: rank 1 computes one padding image
    ok(torchrun(WORKER, "stats", str(tmp_path / "s.npz"), str(n)))
    got = np.load(tmp_path / "s.npz")
    assert int(got["world"]) == 2 and int(got["n"]) == n
    feats = ProjectionExtractor(64).features(fixed_images(n))
    ref = fid.stats_from_features(feats)
    np.testing.assert_allclose(got["mu"], ref.mu, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got["sigma"], ref.sigma, rtol=1e-10, atol=1e-14)
    assert np.array_equal(got["features"], ref.features)          # the KID rows, gathered in order
    # and the numbers a user sees: FID against another set
    other = fid.stats_from_features(ProjectionExtractor(64).features(fixed_images(12)[5:]))
    a = fid.frechet_distance(got["mu"], got["sigma"], other.mu, other.sigma)
    b = fid.frechet_distance(ref.mu, ref.sigma, other.mu, other.sigma)
    assert a == pytest.approx(b, rel=1e-9) and b > 0.01
    # the KID subsample path (n > kept rows): the same seeded choice of global indices
    k3 = fid.stats_from_features(feats, keep=3).features
    assert np.array_equal(got["features_k3"], k3)


def test_one_failing_rank_ends_the_job_with_its_error(tmp_path):
    r = torchrun(WORKER, "train", str(tmp_path), "train", "--out", str(tmp_path / "F"), "--steps", "4",
                 *FLAGS, env={"FAIL_RANK": "1", "FAIL_STEP": "1"}, timeout=150)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "injected failure on rank 1" in out
    assert "[rank 1] error: RuntimeError" in out
