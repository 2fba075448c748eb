"""diffuse visualize: each view's numbers, through the library and the CLI, on a tiny trained run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from diffuse import visualize as vis
from diffuse.cli import main
from diffuse.data import load_dataset
from diffuse.diffusion import Schedule
from diffuse.errors import DiffuseError
from diffuse.generate import Loaded, generate, load
from diffuse.images import to_uint8
from diffuse.samplers import SAMPLERS
from diffuse.train import train

from .conftest import tiny_config

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny nets gain nothing from a second thread, and two threads spin badly on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return train(tiny_config(tmp_path_factory.mktemp("vis") / "run", steps=3, log_every=3), progress=False)


@pytest.fixture(scope="module")
def loaded(run) -> Loaded:
    return load(run, CPU)


@pytest.fixture(scope="module")
def cond_loaded(tmp_path_factory) -> Loaded:
    cfg = tiny_config(tmp_path_factory.mktemp("vis") / "cond", steps=2, log_every=2)
    cfg.model.class_cond = True
    return load(train(cfg, progress=False), CPU)


# ----------------------------------------------------------------------------------------------
# noising

@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_noising_starts_at_the_images_and_ends_in_standard_noise(schedule, tmp_path):
    strip = vis.noising(data="digits", schedule=schedule, n=8, seed=3, out=tmp_path / "n.png")
    assert strip.ts == [0, 200, 400, 600, 800, 999]
    assert strip.xt.shape == (6, 8, 1, 16, 16)
    # The rows are real training images (uint8 decoded to [-1, 1]), all different.
    train_u8 = load_dataset("digits").images
    for img in to_uint8(strip.x0):
        assert (train_u8 == img).flatten(1).all(1).any()
    assert len({tuple(to_uint8(x).flatten().tolist()) for x in strip.x0}) == 8
    # t = 0 is the least noisy step: x0 plus noise of std sqrt(beta_0) = 0.01.
    assert (strip.xt[0] - strip.x0).abs().max() < 0.06
    assert (to_uint8(strip.xt[0]).int() - to_uint8(strip.x0).int()).abs().max() <= 8
    # Every column carries exactly its t's noise: (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) ~ N(0, 1).
    for j, a in enumerate(strip.abar):
        resid = (strip.xt[j] - math.sqrt(a) * strip.x0) / math.sqrt(1 - a)
        assert resid.std().item() == pytest.approx(1.0, abs=0.06) and abs(resid.mean().item()) < 0.08
    # t = 999: sqrt(abar) x0 + sqrt(1 - abar) eps with abar < 1e-4 is N(0, 1) before quantisation.
    last = strip.xt[-1].flatten().double().numpy()
    assert abs(last.mean()) < 0.08 and abs(last.std() - 1) < 0.06
    assert stats.kstest(last, "norm").statistic < 0.04
    assert strip.abar[0] == pytest.approx(1 - Schedule(schedule).betas[0].item())
    with Image.open(tmp_path / "n.png") as im:
        assert im.width > 6 * 64 and im.height > 8 * 64                    # 16 px images upscaled x4


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_noising_at_another_T_draws_the_schedule_training_uses(schedule):
    """At T != 1000 training scales linear betas by 1000/T (improved-diffusion); the strip once drew the
    unscaled 1e-4..0.02, whose abar at T = 100 never falls below 0.36: not the process the model learns."""
    strip = vis.noising(data="digits", schedule=schedule, timesteps=100, ts=[0, 50, 99], n=2, seed=0)
    trained = Schedule(schedule, 100, 1e-3, 0.2) if schedule == "linear" else Schedule("cosine", 100)
    assert strip.abar == [float(trained.alphas_cumprod[t]) for t in (0, 50, 99)]
    assert strip.abar[-1] < 1e-4                                          # near pure noise at t = T-1


def test_noising_is_seeded(tmp_path):
    a = vis.noising(n=3, seed=1)
    b = vis.noising(n=3, seed=1, ts=[999, 0])
    c = vis.noising(n=3, seed=2)
    assert torch.equal(a.xt[0], b.xt[1]) and torch.equal(a.xt[-1], b.xt[0])
    assert not torch.equal(a.x0, c.x0)


# ----------------------------------------------------------------------------------------------
# schedules

def test_schedule_curves_match_closed_forms(tmp_path):
    curves = vis.plot_schedules(tmp_path / "s.png")
    T = 1000
    lin = curves["linear"]
    betas = np.linspace(1e-4, 0.02, T)
    np.testing.assert_allclose(lin["betas"], betas, rtol=1e-12)
    np.testing.assert_allclose(lin["alphas_cumprod"], np.cumprod(1 - betas), rtol=1e-12)
    # Nichol & Dhariwal eq. 17: abar_t = f(t + 1) / f(0) with 0-based t (the clip at 0.999 only
    # touches the very last step).
    f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
    cos = curves["cosine"]
    np.testing.assert_allclose(cos["alphas_cumprod"][:-1], f[1:-1] / f[0], rtol=1e-9)
    assert cos["betas"].max() == pytest.approx(0.999)
    for c in (lin, cos):
        abar = c["alphas_cumprod"]
        np.testing.assert_allclose(c["log_snr"], np.log(abar / (1 - abar)), rtol=1e-9, atol=1e-9)
        assert (np.diff(c["log_snr"]) < 0).all()
    assert lin["alphas_cumprod"][-1] == pytest.approx(4.04e-5, rel=0.01)
    assert (tmp_path / "s.png").stat().st_size > 10_000


# ----------------------------------------------------------------------------------------------
# interpolate

def test_slerp_endpoints_and_norm():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(3, 1, 64, 64, generator=g), torch.randn(3, 1, 64, 64, generator=g)
    alphas = torch.linspace(0, 1, 9, dtype=torch.float64)
    path = vis.slerp(z0, z1, alphas)
    assert path.shape == (3, 9, 1, 64, 64) and path.dtype == torch.float32
    assert torch.equal(path[:, 0], z0) and torch.equal(path[:, -1], z1)
    # Independent high-dimensional Gaussians are nearly orthogonal with nearly equal norms:
    # slerp stays on their sphere, while the linear midpoint shrinks by ~1/sqrt(2).
    r = z0.flatten(1).norm(dim=1)
    norms = path.flatten(2).norm(dim=2)                                    # [3, 9]
    assert ((norms / r[:, None]) - 1).abs().max() < 0.03
    lerp_mid = (0.5 * (z0 + z1)).flatten(1).norm(dim=1)
    assert ((lerp_mid / r) - 2 ** -0.5).abs().max() < 0.03
    # Exactly orthogonal, equal norm: the midpoint is (z0 + z1) / sqrt(2).
    a = torch.zeros(1, 4)
    b = torch.zeros(1, 4)
    a[0, 0], b[0, 1] = 2.0, 2.0
    mid = vis.slerp(a, b, torch.tensor([0.5], dtype=torch.float64))[0, 0]
    assert torch.allclose(mid, (a[0] + b[0]) / math.sqrt(2), atol=1e-6)
    # Parallel rows fall back to the linear path instead of dividing by sin(0).
    par = vis.slerp(a, 3 * a, torch.tensor([0.5], dtype=torch.float64))[0, 0]
    assert torch.allclose(par, 2 * a[0])


@pytest.mark.parametrize("sampler,steps", [("ddim", 4), ("ddpm", 6)])
def test_interpolation_ends_are_the_generated_images_and_the_path_is_smooth(loaded, sampler, steps):
    rows = vis.interpolate(loaded, sampler=sampler, steps=steps, rows=2, frames=6, seed=5)
    assert rows.shape == (2, 6, 1, 16, 16) and rows.dtype == torch.uint8
    ref, _ = generate(loaded, n=4, seed=5, sampler=sampler, steps=steps)
    assert torch.equal(rows[:, 0], ref[0::2]) and torch.equal(rows[:, -1], ref[1::2])
    f = rows.float()
    ends = (f[:, -1] - f[:, 0]).abs().mean()
    neighbours = (f[:, 1:] - f[:, :-1]).abs().mean(dim=(2, 3, 4))         # [2, 5]
    assert ends > 10
    assert neighbours.max() < 0.7 * ends                                  # a path, not independent draws


def test_interpolation_of_a_class_conditional_model(cond_loaded, monkeypatch):
    net, seen = cond_loaded.net, []
    forward = net.forward

    def spy(x, t, y=None):
        seen.append(y.tolist())
        return forward(x, t, y)

    monkeypatch.setattr(net, "forward", spy)
    rows = vis.interpolate(cond_loaded, sampler="ddim", steps=3, rows=2, frames=3, seed=0, labels=torch.tensor([3, 7]))
    assert seen == [[3, 3, 3, 7, 7, 7]] * 3                       # every frame of row p is class labels[p]
    ref, _ = generate(cond_loaded, n=4, seed=0, sampler="ddim", steps=3, labels=torch.tensor([3, 3, 7, 7]))
    assert torch.equal(rows[:, 0], ref[0::2]) and torch.equal(rows[:, -1], ref[1::2])


# ----------------------------------------------------------------------------------------------
# timestep-mse

def test_timestep_mse_per_t_on_the_test_split(loaded):
    r = vis.timestep_mse(loaded, ts=[999, 0, 500, 500], n=12, seed=0)
    assert r["t"] == [0, 500, 999]
    assert len(r["mse"]) == len(r["std_err"]) == 3
    assert all(math.isfinite(v) and v > 0 for v in r["mse"] + r["std_err"])
    assert r["split"] == "test" and r["n"] == 12 and r["data"] == "digits"
    assert vis.timestep_mse(loaded, ts=[0, 500, 999], n=12, seed=0)["mse"] == r["mse"]


class _ZeroNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))      # loaded.net's device comes from a parameter

    def forward(self, x, t, y=None):
        return torch.zeros_like(x)


class _AssumeBlackNet(torch.nn.Module):
    """Predicts eps as if x0 were 0: eps_hat = x_t / sqrt(1 - abar_t)."""

    def __init__(self, abar):
        super().__init__()
        self.abar = abar
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, y=None):
        a = self.abar[t.round().long()].float().view(-1, 1, 1, 1)
        return x / (1 - a).sqrt()


def test_timestep_mse_against_oracles(loaded):
    """Two predictors with known error: eps_hat = 0 has error mean(eps^2) at every t (the same
    number, since eps is shared across t), and eps_hat = x_t / sqrt(1 - abar) has error
    abar / (1 - abar) * mean(x0^2)."""
    ts = [0, 300, 999]
    zero = Loaded(_ZeroNet(), loaded.config, {}, loaded.schedule, "zero")
    r = vis.timestep_mse(zero, ts=ts, n=16, seed=4)
    assert r["mse"][0] == r["mse"][1] == r["mse"][2]
    assert r["mse"][0] == pytest.approx(1.0, abs=0.06)
    abar = loaded.schedule.alphas_cumprod
    black = Loaded(_AssumeBlackNet(abar), loaded.config, {}, loaded.schedule, "black")
    r = vis.timestep_mse(black, ts=ts, n=16, seed=4, batch_size=5)
    x0, _, _, _ = vis.held_out_images(loaded, 16, 4)
    m2 = x0.square().flatten(1).mean(1).double().mean().item()
    for t, got in zip(ts, r["mse"]):
        a = abar[t].item()
        assert got == pytest.approx(a / (1 - a) * m2, rel=2e-3)      # float32 x_t


# ----------------------------------------------------------------------------------------------
# trajectory

@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_trajectory_ends_at_the_generated_image(loaded, sampler, tmp_path):
    tr = vis.trajectory(loaded, sampler=sampler, steps=5, n=3, seed=2, first_index=1)
    ref, record = generate(loaded, n=4, seed=2, sampler=sampler, steps=5)
    assert torch.equal(tr.final, ref[1:])
    assert len(tr.t) == len(tr.sigma) == tr.xt.shape[0] == tr.x0.shape[0] == record["nfe"]
    assert tr.xt.shape[1:] == (3, 1, 16, 16)
    # the walk starts at the run's first level: t = 999 on discrete spacings, the capped Karras sigma_max else
    t_first = float(loaded.schedule.sigma_to_t(torch.tensor(record["sigma_max"], dtype=torch.float64)))
    assert tr.sigma[0] == pytest.approx(record["sigma_max"]) and tr.t[0] == pytest.approx(t_first, abs=1e-3)
    assert all(b <= a for a, b in zip(tr.sigma, tr.sigma[1:]))
    vis.save_trajectory(tr, tmp_path / "t.png", tmp_path / "t.gif", frames=3, gif_frames=4)
    with Image.open(tmp_path / "t.gif") as gif:
        assert gif.n_frames == min(4, len(tr.t)) + 1
    with Image.open(tmp_path / "t.png") as im:
        assert im.width > (min(3, len(tr.t)) + 1) * 64 and im.height > 6 * 64


def test_ddim_trajectory_last_estimate_is_the_output(loaded):
    tr = vis.trajectory(loaded, sampler="ddim", steps=4, n=2, seed=0)
    assert [round(t) for t in tr.t] == [999, 749, 499, 249]
    assert torch.equal(tr.x0[-1], tr.final)                 # the step to sigma = 0 returns x0_hat


# ----------------------------------------------------------------------------------------------
# compare-samplers

def test_compare_samplers_report(loaded, tmp_path):
    seen: dict[tuple, torch.Tensor] = {}

    def score(images, sampler, steps):
        seen[len(seen)] = images
        return {"mean_pixel": images.float().mean().item(), "n_scored": len(images), "fid": 100.0 / steps}

    rep = vis.compare_samplers(loaded, tmp_path / "cmp", steps_list=[1, 3, 2000], n=4, seed=1, score_fn=score)
    out = tmp_path / "cmp"
    cells = {(c["sampler"], c["steps"]): c for c in rep["cells"]}
    assert set(cells) == {(s, k) for s in SAMPLERS for k in (1, 3, 2000)}
    for s in SAMPLERS:
        assert "between 1 and 1000" in cells[s, 2000]["skipped"]
    for s in ("ddim", "ddpm"):
        for k in (1, 3):
            c = cells[s, k]
            assert "skipped" not in c and c["nfe"] == k
            assert c["seconds_per_batch"] > 0 and c["images_per_sec"] == pytest.approx(4 / c["seconds_per_batch"])
            assert c["scores"]["n_scored"] == 4
            assert (out / c["grid"]).is_file()
    # Same seeds in every cell: the ddim 3-step cell holds generate()'s images.
    ref, _ = generate(loaded, n=4, seed=1, sampler="ddim", steps=3)
    assert cells["ddim", 3]["scores"]["mean_pixel"] == pytest.approx(ref.float().mean().item())
    assert any(torch.equal(v, ref) for v in seen.values())
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(rep))
    assert (out / "overview.png").is_file() and (out / "time_vs_steps.png").is_file()
    assert (out / "fid_vs_nfe.png").is_file()                  # a score named fid gets its plot
    assert cells["ddim", 3]["scores"]["fid"] == pytest.approx(100 / 3)   # score_fn is told the cell

    # The markdown table: one row per cell, timings that parse as positive numbers, score columns.
    lines = (out / "report.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| sampler"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:6] == ["sampler", "steps", "NFE", "spacing", "s/batch", "images/s"]
    assert "mean_pixel" in cols and "n_scored" in cols
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[lines.index(header) + 2:]
            if line.startswith("|")]
    assert len(rows) == len(cells) and all(len(r) == len(cols) for r in rows)
    assert {(r[0], int(r[1])) for r in rows} == set(cells)
    for r in rows:
        if r[4].startswith("skipped"):
            assert int(r[1]) == 2000
            continue
        assert float(r[4].split("±")[0]) > 0 and float(r[5]) > 0
        assert float(r[cols.index("n_scored")]) == 4


def test_compare_samplers_without_score_fn_has_no_score_columns(loaded, tmp_path):
    vis.compare_samplers(loaded, tmp_path, samplers=["ddim"], steps_list=[2], n=2, repeats=2)
    header = next(line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| sampler"))
    assert header == "| sampler | steps | NFE | spacing | s/batch | images/s | grid |"
    cell = json.loads((tmp_path / "report.json").read_text())["cells"][0]
    assert len(cell["seconds_all"]) == 2 and cell["seconds_std"] is not None and cell["scores"] == {}
    assert not (tmp_path / "fid_vs_nfe.png").exists()


# ----------------------------------------------------------------------------------------------
# Errors and the CLI

def test_library_errors(loaded, tmp_path):
    with pytest.raises(DiffuseError, match="unknown sampler 'nope'"):
        vis.compare_samplers(loaded, tmp_path, samplers=["ddim", "nope"])
    with pytest.raises(DiffuseError, match="outside 0..999"):
        vis.timestep_mse(loaded, ts=[0, 1000])
    with pytest.raises(DiffuseError, match="comma-separated list of integers"):
        vis.parse_int_list("10,x", "--steps-list")
    with pytest.raises(DiffuseError, match="is a directory"):
        vis.noising(out=tmp_path)
    with pytest.raises(DiffuseError, match="looks like a file name"):
        vis.compare_samplers(loaded, tmp_path / "report.png")
    (tmp_path / "f").write_text("x")
    with pytest.raises(DiffuseError, match="is a file"):
        vis.dir_path(tmp_path / "f")
    with pytest.raises(DiffuseError, match="between 1 and 1000"):
        vis.trajectory(loaded, steps=0)


@pytest.mark.parametrize("argv,needle", [
    (["interpolate", "{missing}", "--out", "{tmp}/d"], "no such run or checkpoint"),
    (["noising", "--t", "0,two", "--out", "{tmp}/n.png"], "--t must be a comma-separated list of integers"),
    (["noising", "--t", "0,1000", "--out", "{tmp}/n.png"], "timestep 1000 is outside 0..999"),
    (["noising", "--out", "{tmp}/n.jpg"], "ending in .png"),
    (["noising", "--schedule", "quadratic", "--out", "{tmp}/n.png"], "--schedule must be linear or cosine"),
    (["schedule", "--out", "{tmp}"], "is a directory"),
    (["timestep-mse", "{run}", "--t", "5,-1", "--out", "{tmp}/m"], "timestep -1 is outside"),
    (["trajectory", "{run}", "--sampler", "nope", "--out", "{tmp}/t"], "unknown sampler 'nope'"),
    (["trajectory", "{run}", "--out", "{tmp}/t.png"], "looks like a file name"),
    (["trajectory", "{run}", "--class", "3", "--out", "{tmp}/t"], "unconditional model"),
    (["compare-samplers", "{run}", "--samplers", "ddim,nope", "--out", "{tmp}/c"], "unknown sampler 'nope'"),
    (["compare-samplers", "{run}", "--steps-list", "10,,20", "--out", "{tmp}/c"], "--steps-list must be"),
])
def test_cli_errors_are_one_line(run, tmp_path, capsys, argv, needle):
    argv = [a.format(run=run, tmp=tmp_path, missing=tmp_path / "nope") for a in argv]
    assert main(["visualize", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_cli_interpolate_and_trajectory_write_their_files(run, tmp_path, capsys):
    assert main(["visualize", "interpolate", str(run), "--out", str(tmp_path / "i"), "--rows", "2",
                 "--frames", "4", "--ddim-steps", "3", "--ddpm-steps", "4", "--seed", "3"]) == 0
    for name in ("interp.png", "interp_ddim.png"):
        with Image.open(tmp_path / "i" / name) as im:
            assert im.width > 4 * 64 and im.height > 2 * 64
    assert main(["visualize", "trajectory", str(run), "--out", str(tmp_path / "t"), "--steps", "3",
                 "--n", "2", "--sampler", "ddpm"]) == 0
    with Image.open(tmp_path / "t" / "trajectory.gif") as gif:
        assert gif.n_frames == 4
    assert "trajectory.png" in capsys.readouterr().out


def _diffuse(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "diffuse", "visualize", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600)


def test_real_cli(run, tmp_path):
    p = _diffuse("timestep-mse", run, "--t", "0,250,999", "--n", "8", "--out", tmp_path / "m")
    assert p.returncode == 0, p.stderr
    data = json.loads((tmp_path / "m" / "timestep_mse.json").read_text())
    assert data["t"] == [0, 250, 999] and len(data["mse"]) == 3 and all(math.isfinite(v) for v in data["mse"])
    assert (tmp_path / "m" / "timestep_mse.png").is_file() and "test split" in p.stdout

    p = _diffuse("compare-samplers", run, "--samplers", "ddim,ddpm", "--steps-list", "2,3", "--n", "2",
                 "--out", tmp_path / "c")
    assert p.returncode == 0, p.stderr
    md = (tmp_path / "c" / "report.md").read_text()
    assert all(f"| {s} | {k} |" in md for s in ("ddim", "ddpm") for k in (2, 3))

    p = _diffuse("noising", "--n", "2", "--out", tmp_path / "n.png")
    assert p.returncode == 0 and (tmp_path / "n.png").is_file()
    assert "999  " in p.stdout

    p = _diffuse("compare-samplers", tmp_path / "nowhere", "--out", tmp_path / "c2")
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [f"error: no such run or checkpoint: {tmp_path / 'nowhere'}"]


def test_schedule_curves_at_another_t_use_the_betas_training_uses():
    # training scales linear betas by 1000/T (config.scale_linear_betas): the view must draw those
    from diffuse.config import resolve
    from diffuse.objectives import formulation_for

    curves = vis.schedule_curves(100)
    for name in ("linear", "cosine"):
        d = resolve("digits", "digits", None, {"diffusion": {"schedule": name, "timesteps": 100}}).diffusion
        np.testing.assert_allclose(curves[name]["alphas_cumprod"], formulation_for(d).schedule.alphas_cumprod.numpy(),
                                   rtol=1e-12)
    assert curves["linear"]["betas"][-1] == pytest.approx(0.2)      # 0.02 * 1000 / 100
