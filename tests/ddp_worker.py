"""Run by tests/test_distributed.py under torchrun (one process per rank); not a test module.

    ddp_worker.py train DUMP_DIR CLI_ARGS...   `diffuse train CLI_ARGS`, then each rank saves its
                                              final model and EMA to DUMP_DIR/rank{R}.safetensors
                                              (outside the run dir, which only rank 0 may write)
                                              and the steps it trained to DUMP_DIR/rank{R}.json.
                                              FAIL_RANK=r FAIL_STEP=k: rank r raises at step k.
                                              SIGTERM_AT_STEP=k: rank 1 sends SIGTERM to torchrun.
    ddp_worker.py stats OUT.npz N [ARGS...]    FID statistics of N fixed images through
                                              distributed.stats_of_images with a stand-in extractor;
                                              then `diffuse ARGS` in the same process group (one
                                              torchrun start serves two tests).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch


class ProjectionExtractor:
    """Stands in for Inception: features = a fixed random integer projection of the pixels, float32
    [N, 32]. Integer sums are exact, so features do not depend on batch shapes or thread counts and
    the test sees only the statistics' own float64 rounding."""

    def __init__(self, pixels: int, dim: int = 32):
        self.w = torch.randint(-8, 9, (pixels, dim), generator=torch.Generator().manual_seed(1))

    def describe(self) -> dict[str, str]:
        return {"name": "projection", "hash": "test", "file": "-", "resize": "none"}

    def features(self, images, batch_size: int = 50, progress=False) -> np.ndarray:
        return (images.flatten(1).long() @ self.w).float().div_(4096.0).numpy()


def fixed_images(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def train(dump: str, argv: list[str]) -> int:
    from safetensors.torch import save_file

    from diffuse import cli, data
    from diffuse import run as run_mod           # open_run builds the model there

    made = {}
    real_build = run_mod.build_training

    def build(*a, **k):
        made["model"], made["ema"], opt = real_build(*a, **k)
        return made["model"], made["ema"], opt

    run_mod.build_training = build
    drawn: list[int] = []                       # the global steps whose batch this rank drew
    real_draw = data.BatchStream.batch

    def drawing(self, step):
        drawn.append(step)
        return real_draw(self, step)

    data.BatchStream.batch = drawing
    fail_rank, fail_step = os.environ.get("FAIL_RANK"), int(os.environ.get("FAIL_STEP", "1"))
    if fail_rank is not None and os.environ["RANK"] == fail_rank:
        real_batch = data.BatchStream.batch

        def failing(self, step):
            if step == fail_step:
                raise RuntimeError(f"injected failure on rank {fail_rank}")
            return real_batch(self, step)

        data.BatchStream.batch = failing
    term_step = os.environ.get("SIGTERM_AT_STEP")
    if term_step is not None and os.environ["RANK"] == "1":
        import signal
        real_batch2 = data.BatchStream.batch

        def terminating(self, step):
            if step == int(term_step):          # as Slurm would: SIGTERM to torchrun, which passes it on
                os.kill(os.getppid(), signal.SIGTERM)
                time.sleep(2)                   # let it reach both ranks before this step ends
            return real_batch2(self, step)

        data.BatchStream.batch = terminating
    rc = cli.main(argv)
    if rc == 0 and "model" in made:
        tensors = {f"model.{k}": v.contiguous() for k, v in made["model"].state_dict().items()}
        tensors.update({f"ema.{k}": v.contiguous() for k, v in made["ema"].state_dict().items()})
        rank = os.environ.get("RANK", "0")
        save_file(tensors, os.path.join(dump, f"rank{rank}.safetensors"))
        conv = next(p for p in made["model"].parameters() if p.dim() == 4 and p.shape[1] > 1)
        with open(os.path.join(dump, f"rank{rank}.json"), "w") as f:
            json.dump({"steps": len(drawn), "last_step": max(drawn, default=-1) + 1,
                       "channels_last": not conv.is_contiguous()}, f)
    return rc


def stats(out: str, n: int, then: list[str]) -> int:
    from diffuse import cli
    from diffuse import distributed as dist

    dist.init("cpu")
    images = fixed_images(n)
    idx = dist.shard(n)
    mine = images[torch.arange(idx.start, idx.stop) % n]            # padding rows repeat real ones
    ex = ProjectionExtractor(64)
    s = dist.stats_of_images(mine, idx, n, ex, batch_size=3)
    k3 = dist.feature_stats(ex.features(mine), idx, n, keep=3)
    if dist.is_main():
        np.savez(out, mu=s.mu, sigma=s.sigma, features=s.features, n=s.n, world=dist.world(), features_k3=k3.features)
    return cli.main(then) if then else 0          # cli.main joins the same group and shuts it down


def disagreeing_probes(argv: list[str]) -> int:
    """``diffuse ARGV`` where the ranks' --precision auto probes disagree: rank 1 measures bf16
    faster, rank 0 slower (as two ranks on a loaded machine can)."""
    from diffuse import cli, device
    rank, real = int(os.environ["RANK"]), device.choose_precision

    def probed(flag, dev):
        if flag != "auto" or dev.type != "cpu":
            return real(flag, dev)
        return device.PrecisionChoice(torch.bfloat16 if rank == 1 else None, f"rank {rank}'s probe")
    device.choose_precision = probed
    return cli.main(argv)


def disagreeing_layouts(dump: str, argv: list[str]) -> int:
    """``train`` where the ranks' layout probes disagree: rank 1 measures channels_last faster,
    rank 0 not."""
    from diffuse import run as run_mod
    rank, real = int(os.environ["RANK"]), run_mod.choose_layout

    def probed(setting, dev, amp, probe=None):
        if setting is not None:
            return real(setting, dev, amp, probe)
        return rank == 1, f"rank {rank}'s probe"
    run_mod.choose_layout = probed
    return train(dump, argv)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "train":
        sys.exit(train(sys.argv[2], sys.argv[3:]))
    if mode == "layouts":
        sys.exit(disagreeing_layouts(sys.argv[2], sys.argv[3:]))
    if mode == "probes":
        sys.exit(disagreeing_probes(sys.argv[2:]))
    sys.exit(stats(sys.argv[2], int(sys.argv[3]), sys.argv[4:]))
