"""torchrun + DDP on CPU (gloo, 2 processes on loopback): the split of the global batch changes
nothing but float rounding; resume across world sizes; sharded sampling and FID statistics; a
failing rank ends the job.

Tolerance: 2 ranks x 8 against 1 process x 16 (and --grad-accum 2) differ only in the order of
the float32 sums in the batch reductions (each rank's conv/GroupNorm weight gradients over 8
images, then the all-reduce): after 6 AdamW steps at lr 1e-3 the weights agree to 1e-6; masks
or draws that depended on the split give ~1e-4 (seen: 6.6e-5 with per-micro-batch dropout
masks). A 2-rank run killed and resumed on 2 ranks is bit-identical to an uninterrupted one;
EMA weights are bit-identical across ranks; a --patience early stop is the same step on every
rank and on one process. Every test here shares one set of runs (module
fixtures), started with torchrun (python -m torch.distributed.run --standalone), 1 thread per rank.
"""

from __future__ import annotations

import json
import os
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
STEPS = "6"
FLAGS = [*TINY_FLAGS, "--batch-size", "16", "--log-every", "1", "--ckpt-every", "1", "--keep", "0",
         "--sample-n", "4", "--sample-steps", "2",
         "--lr", "1e-3", "--warmup-steps", "0", "--dropout", "0.1", "--class-cond", "--flip",
         "--precision", "fp32", "--no-channels-last", "--no-progress"]
# the layout pinned too: a rank's probe runs on 1 thread, the reference's on 2, and may choose differently
TRAIN = dict(batch_size=16, lr=1e-3, warmup_steps=0, precision="fp32", channels_last=False)


def torchrun(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFUSE_DIST_TIMEOUT": "60", **(env or {})}
    e["PYTHONPATH"] = os.pathsep.join([str(HERE.parent / "src"), str(HERE.parent), e.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def single_config(out: Path, **train_kw):
    cfg = tiny_config(out, steps=int(STEPS), **{**TRAIN, **train_kw})
    cfg.model.dropout, cfg.model.class_cond, cfg.data.flip = 0.1, True, True
    return cfg


def weights(run: Path, name: str, ckpt: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / ckpt / f"{name}.safetensors"))


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
    # U: 2 ranks x 8, STEPS steps; each rank dumps its final model and EMA.
    r["U_out"] = ok(torchrun(WORKER, "train", str(r["dump"]), "train", "--out", str(tmp / "U"), "--steps", STEPS,
                             *FLAGS))
    # A: 2 ranks killed as Slurm does (SIGTERM to torchrun during step 1): an agreed stop, a checkpoint ...
    killed = torchrun(WORKER, "train", str(tmp), "train", "--out", str(tmp / "A"), "--steps", STEPS, *FLAGS,
                      env={"SIGTERM_AT_STEP": "1"})
    assert killed.returncode != 0 and "interrupted at step" in (tmp / "A" / "train.log").read_text(), killed.stderr
    # ... resumed on 2 ranks, with a time limit that stops it (agreed) after one more step ...
    ok(torchrun("-m", "diffuse", "train", "--resume", str(tmp / "A"), "--time-limit", "0.00001", "--no-progress"))
    # ... and finished on 1 process
    train(load_resume_config(tmp / "A", {"train": {"time_limit": 100.0}}), resume=True, progress=False)
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
    assert [x["step"] for x in rows] == list(range(1, int(STEPS) + 1))
    # the logged loss is the global batch's mean, as one process logs it
    assert np.allclose([x["loss"] for x in rows], [x["loss"] for x in c_rows], rtol=1e-5)


def test_ema_identical_on_both_ranks_and_only_rank0_wrote(runs):
    tmp, dump = runs["tmp"], runs["dump"]
    r0, r1 = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    assert identical(r0, r1), "ranks disagree on the weights or the EMA"
    assert identical({k[4:]: v for k, v in r0.items() if k.startswith("ema.")}, weights(tmp / "U", "ema"))
    log = (tmp / "U" / "train.log").read_text()
    assert log.count("diffuse train |") == 1 and "2 ranks x 8 images x 1 micro-batch" in log
    assert log.count(f"finished at step {STEPS}") == 1
    assert runs["U_out"].stdout.count("done:") == 1
    assert sorted(p.name for p in (tmp / "U").iterdir()) == [".diffuse-run", ".lock", "checkpoints", "config.json", "final.png",
                                                           "loss_curve.png", "metrics.jsonl", "samples", "tb", "train.log"]


def test_killed_and_resumed_two_rank_run_continues_identically(runs):
    tmp = runs["tmp"]
    log = (tmp / "A" / "train.log").read_text()
    killed_at = int(log.split("interrupted at step ")[1].split(";")[0])
    timed_out_at = int(log.split("min reached at step ")[1].split(";")[0])
    assert 1 <= killed_at and killed_at + 1 == timed_out_at < int(STEPS) and log.count("resumed from step") == 2
    step = f"step_{timed_out_at:07d}"
    for name in ("model", "ema"):
        # killed at k, resumed on 2 ranks: step k + 1 is bit for bit the uninterrupted run's
        a, u = weights(tmp / "A", name, step), weights(tmp / "U", name, step)
        assert identical(a, u), f"2-rank resume: {name} differs at {step}"
        # and that 2-rank checkpoint, finished on one process, ends where the 2-rank run ends
        assert max_diff(weights(tmp / "A", name), weights(tmp / "U", name)) < TOL
    steps = [json.loads(x)["step"] for x in (tmp / "A" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, int(STEPS) + 1))


SAMPLE = ["sample", "-n", "5", "--sampler", "ddpm", "--steps", "3", "--class", "all", "--seed", "3", "--no-progress",
          "--precision", "fp32"]       # pinned: each process's auto probe measures its own load


@pytest.fixture(scope="module")
def sharded(runs):
    """One torchrun start: FID statistics of 7 images (odd: rank 1 computes a padding image), then
    `diffuse sample` of run C, in the same process group."""
    tmp = runs["tmp"]
    ok(torchrun(WORKER, "stats", str(tmp / "s.npz"), "7", *SAMPLE, str(tmp / "C"), "--out", str(tmp / "two.npz")))
    return tmp


def test_distributed_sampling_gives_the_same_images(sharded):
    assert cli.main([*SAMPLE, str(sharded / "C"), "--out", str(sharded / "one.npz")]) == 0
    two, one = np.load(sharded / "two.npz"), np.load(sharded / "one.npz")
    assert one["images"].shape[0] == 10                  # --class all: 10 classes x 1
    assert np.array_equal(two["images"], one["images"]) and np.array_equal(two["labels"], one["labels"])


def test_ranks_sample_in_one_precision_when_their_probes_disagree(runs):
    """--precision auto measures bf16 on each rank; when rank 0 finds it slower and rank 1 faster,
    both shards must still be drawn in one precision (bf16, the rule training uses), so the job's
    images equal one process's --precision bf16 images. Without the agreement rank 0's half comes
    out in fp32 and differs."""
    tmp, auto = runs["tmp"], [a for a in SAMPLE if a not in ("--precision", "fp32")]
    ok(torchrun(WORKER, "probes", *auto, "--precision", "auto", str(tmp / "C"), "--out", str(tmp / "probes.npz")))
    assert cli.main([*auto, "--precision", "bf16", str(tmp / "C"), "--out", str(tmp / "bf16.npz")]) == 0
    assert cli.main([*auto, "--precision", "fp32", str(tmp / "C"), "--out", str(tmp / "fp32.npz")]) == 0
    got, bf16, fp32 = (np.load(tmp / f"{k}.npz")["images"] for k in ("probes", "bf16", "fp32"))
    assert not np.array_equal(bf16[:5], fp32[:5])              # the precisions do give different images here
    assert np.array_equal(got, bf16)


def test_ranks_train_in_rank_0s_layout_when_their_probes_disagree(tmp_path):
    """Rank 1's probe prefers channels_last, rank 0's NCHW: both train in rank 0's NCHW, and the
    run records it. (The weights alone would not show a disagreement: DDP averages the gradients.)"""
    flags = [a for a in FLAGS if a != "--no-channels-last"]
    ok(torchrun(WORKER, "layouts", str(tmp_path), "train", "--out", str(tmp_path / "L"), "--steps", "1", *flags))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["channels_last"] for r in ranks] == [False, False]
    assert json.loads((tmp_path / "L" / "config.json").read_text())["train"]["resolved_channels_last"] is False
    assert "rank 0's probe" in (tmp_path / "L" / "train.log").read_text()


def test_distributed_fid_statistics_equal_one_process(sharded):
    n = 7
    got = np.load(sharded / "s.npz")
    assert int(got["world"]) == 2 and int(got["n"]) == n
    feats = ProjectionExtractor(64).features(fixed_images(n))
    ref = fid.stats_from_features(feats)
    np.testing.assert_allclose(got["mu"], ref.mu, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got["sigma"], ref.sigma, rtol=1e-10, atol=1e-14)
    assert np.array_equal(got["features"], ref.features)          # the KID rows, gathered in order
    # and the numbers a user sees: FID against another set. 7 images in 64 dimensions give a sigma
    # of rank 6, and the matrix square root of a singular product amplifies sigma's 1e-10 agreement:
    # on an AMD Zen 4 (family 25) the two FIDs differ by 4.1e-9 relative (old and new code alike),
    # on Zen 5 by less than 1e-9; a wrong reduction would be off by orders of magnitude more.
    other = fid.stats_from_features(ProjectionExtractor(64).features(fixed_images(12)[5:]))
    a = fid.frechet_distance(got["mu"], got["sigma"], other.mu, other.sigma)
    b = fid.frechet_distance(ref.mu, ref.sigma, other.mu, other.sigma)
    assert a == pytest.approx(b, rel=1e-7) and b > 0.01
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


def test_patience_early_stop_is_agreed_across_ranks(tmp_path):
    """--patience 2 under torchrun, epochs of 2 steps (32 images, batch 16), --steps 1000: the
    epoch loss every rank decides from is the all-reduced global one, so both ranks stop after the
    same step, well before --steps, with exit code 0, at the step one process stops at.

    The halves disagree here: each rank's own epoch loss (its 8 images a step) rises at epoch 2 on
    rank 0 and falls on rank 1, so a per-rank decision sends one rank into save()'s collectives
    while the other trains on; seen: both ranks time out in gloo (DIFFUSE_DIST_TIMEOUT) and torchrun
    exits 1 (with --patience 1: rank 0 stops at step 4, rank 1 fails "Connection closed by peer").
    One process against 2 ranks: the epoch losses differ by float32 rounding (~1e-7); the
    closest comparison here is 3e-3 from the 1e-4 threshold, so the stop step is asserted equal."""
    from PIL import Image
    from sklearn.datasets import load_digits

    images = tmp_path / "images"
    images.mkdir()
    for i, im in enumerate(load_digits().images[:32]):                       # 8x8, values 0..16
        Image.fromarray((im * 255 / 16).astype(np.uint8), "L").save(images / f"{i:03d}.png")
    flags = ["--data", str(images), *TINY_FLAGS, "--batch-size", "16", "--steps", "1000", "--patience", "2",
             "--log-every", "2", "--lr", "1e-3", "--warmup-steps", "0", "--dropout", "0", "--precision", "fp32",
             "--sample-n", "4", "--sample-steps", "2", "--no-progress"]
    dump = tmp_path / "dump"
    dump.mkdir()
    ok(torchrun(WORKER, "train", str(dump), "train", "--out", str(tmp_path / "P"), *flags))
    log = (tmp_path / "P" / "train.log").read_text()
    assert log.count("early stop: no loss improvement for 2 epochs at step ") == 1, log
    stop = int(log.split("early stop: no loss improvement for 2 epochs at step ")[1].split(";")[0])
    assert 4 <= stop <= 40 and stop % 2 == 0                                # well before --steps 1000
    # every rank trained exactly `stop` steps and ended with the same weights
    per_rank = [json.loads((dump / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [{k: r[k] for k in ("steps", "last_step")} for r in per_rank] == [{"steps": stop, "last_step": stop}] * 2
    assert identical(load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors")))
    state = json.loads((tmp_path / "P" / "checkpoints" / "last" / "state.json").read_text())
    assert (state["step"], state["bad_epochs"]) == (stop, 2)
    # the stop is the one the logged (global) epoch losses call for: --log-every 2 = one row an epoch
    rows = [json.loads(x) for x in (tmp_path / "P" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == list(range(2, stop + 1, 2)) and [x["epoch"] for x in rows] == list(
        range(1, stop // 2 + 1))
    best, bad, history = float("inf"), 0, []
    for x in rows:
        best, bad = (x["loss"], 0) if x["loss"] < best - 1e-4 else (best, bad + 1)
        history.append(bad)
    assert history[-1] == 2 and 2 not in history[:-1] and state["best_loss"] == pytest.approx(best, rel=1e-6)
    assert any(a == 1 and b == 0 for a, b in zip(history, history[1:]))      # a bad epoch, then a reset
    # one process, the same global batch: the same epoch losses, the same stop and the same best checkpoint
    assert cli.main(["train", "--out", str(tmp_path / "Q"), *flags]) == 0
    one = [json.loads(x) for x in (tmp_path / "Q" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in one] == [x["step"] for x in rows]
    assert np.allclose([x["loss"] for x in one], [x["loss"] for x in rows], rtol=1e-5)
    assert f"early stop: no loss improvement for 2 epochs at step {stop};" in (tmp_path / "Q" / "train.log").read_text()
    assert os.readlink(tmp_path / "P" / "checkpoints" / "best") == os.readlink(tmp_path / "Q" / "checkpoints" / "best")


def test_batch_split_and_flag_errors(tmp_path, capsys):
    from diffuse.errors import DiffuseError
    from diffuse.train import batch_split

    s = batch_split(16, 2, 1, 2)
    assert (s.per_rank, s.rows, s.describe()) == (8, slice(8, 16), " (2 ranks x 4 images x 2 micro-batches)")
    with pytest.raises(DiffuseError, match=r"divisible by the number of ranks times --grad-accum \(1 x 3\)"):
        train(tiny_config(tmp_path / "x", batch_size=16, grad_accum=3), progress=False)
    assert not (tmp_path / "x").exists()                 # refused before anything is written
    for flags, msg in ((["--grad-accum", "0"], "--grad-accum must be a positive integer"),
                       (["--data-cache", "ram"], "--data-cache must be auto, memory or disk")):
        assert cli.main(["train", "--dry-run", *flags]) == 1
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err


@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_dropout_masks_do_not_depend_on_the_split(channels_last):
    from diffuse.models import Dropout, batch_slice

    x = torch.randn(8, 6, 4, 4)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    drop = Dropout(0.3).train()
    torch.manual_seed(5)
    whole = drop(x)
    parts = []
    for start in (0, 2, 6):                               # uneven slices, each replaying the seed
        stop = {0: 2, 2: 6, 6: 8}[start]
        torch.manual_seed(5)
        with batch_slice(start, 8):
            parts.append(drop(x[start:stop]))
    assert torch.equal(torch.cat(parts), whole)
    torch.manual_seed(5)
    assert not torch.equal(drop(x[2:6]), whole[2:6])      # without batch_slice the masks differ
