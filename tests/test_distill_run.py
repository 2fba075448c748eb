"""`diffuse distill` as a run: a tiny teacher distilled through the CLI and the API, the student an
ordinary run (sample, info, export, serve's model list default to its NFE), exact resume, the
consistency sampler's noise levels, and a one-line error for every bad input."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffuse import budget, cli
from diffuse.checkpoint import point, read_tensors
from diffuse.config import resolve
from diffuse.diffusion import Schedule
from diffuse.samplers import KARRAS_SIGMA_MAX_CAP, karras_sigmas, sampler_sigmas
from diffuse.train import train

from .conftest import TINY_MODEL


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "teacher"
    cfg = resolve("digits", None, None, {"model": dict(TINY_MODEL), "train": {
        "steps": 8, "batch_size": 8, "log_every": 4, "sample_n": 4, "sample_steps": 2, "out": str(out), "lr": 1e-3}})
    return train(cfg, progress=False)


def _distill(teacher, out, *flags):
    code = cli.main(["distill", str(teacher), "--out", str(out), "--batch-size", "8", "--log-every", "1",
                     "--no-progress", *map(str, flags)])
    assert code == 0
    return out


def _error(args, capsys) -> str:
    capsys.readouterr()
    try:
        code = cli.main(list(map(str, args)))
    except SystemExit as e:                          # argparse's usage errors
        code = e.code
    assert code != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "student"
    return _distill(teacher, out, "--steps", 6, "--nfe", 2, "--ckpt-every", 3, "--keep", 0)


def test_the_student_is_an_ordinary_run_that_records_its_teacher(student, teacher, capsys):
    cfg = json.loads((student / "config.json").read_text())
    d = cfg["distill"]
    assert (d["method"], d["nfe"], d["teacher_step"]) == ("ect", 2, 8)
    assert d["teacher"] == str((teacher / "checkpoints" / "last").resolve())
    assert cfg["train"]["lr"] == pytest.approx(1e-4)                 # a tenth of the teacher's
    assert cfg["train"]["steps"] == 6
    rows = [json.loads(x) for x in (student / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert (student / "final.png").is_file() and (student / "checkpoints" / "step_0000003").is_dir()
    assert "distill: ect consistency tuning for 2 network calls" in (student / "train.log").read_text()
    # the start line names the command that ran and whose network it tunes
    head = (student / "train.log").read_text().splitlines()[0]
    assert head.startswith("diffuse distill | ") and "| the teacher's model |" in head and "preset" not in head
    capsys.readouterr()
    assert cli.main(["info", str(student)]) == 0
    out = capsys.readouterr().out
    assert "distilled    ect consistency tuning for 2 network calls per image, from " in out
    assert "tuning       4 stages, ln sigma ~ N(0.5, 2^2), x_r from the data (consistency training)\n" in out


def test_info_says_an_older_student_was_tuned_with_ects_values(student):
    from diffuse.runinfo import run_info, run_lines

    info = run_info(student)
    assert "tuning       4 stages, ln sigma ~ N(0.5, 2^2), x_r from the data (consistency training)" in run_lines(info)
    info["config"]["distill"].update(ect_stages=None, ect_p_mean=None)     # as stored before they were recorded
    assert ("tuning       8 stages, ln sigma ~ N(-1.1, 2^2), x_r from the data (consistency training) (ECT's "
            "CIFAR-10 values: stored before diffuse recorded its own)") in run_lines(info)
    info["config"]["distill"].update(ect_target="teacher")
    assert any(line.endswith("x_r from the teacher's ODE step (consistency distillation) (ECT's CIFAR-10 values: "
                             "stored before diffuse recorded its own)") for line in run_lines(info))
    info["config"]["distill"].update(method=None)                          # a diffusion run: no such line
    assert not any(line.startswith("tuning") for line in run_lines(info))


def test_the_student_starts_from_the_teachers_ema_and_moves(student, teacher):
    ema = read_tensors(teacher / "checkpoints" / "last" / "ema.safetensors")
    start = read_tensors(student / "checkpoints" / "step_0000003" / "model.safetensors")
    assert set(ema) == set(start)
    moved = [k for k in ema if not torch.equal(ema[k], start[k])]
    # three steps at lr 1e-4 move the weights a little; a fresh initialisation would differ by O(1)
    change = math.sqrt(sum(float((start[k] - ema[k]).square().sum()) for k in ema)
                       / sum(float(ema[k].square().sum()) for k in ema))
    assert moved and change < 0.1, (len(moved), change)


def test_default_out_is_named_after_the_teacher_method_and_nfe(teacher):
    from diffuse.runs import distill_config
    assert distill_config(teacher, None, method="ect", nfe=4).train.out == str(Path("runs") / "teacher-ect4")


def test_sample_defaults_to_the_students_nfe(student, tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert cli.main(["sample", str(student), "--n", "3", "--out", str(out)]) == 0
    meta = json.loads(np.load(out)["meta"].item())
    assert (meta["sampler"], meta["steps"], meta["nfe"]) == ("consistency", 2, 2)
    assert cli.main(["sample", str(student), "--n", "3", "--steps", "1", "--out", str(out)]) == 0
    one = np.load(out)
    assert json.loads(one["meta"].item())["nfe"] == 1 and one["images"].shape == (3, 16, 16, 1)


def test_the_api_distils_loads_and_samples(teacher, student, tmp_path):
    import diffuse
    model = diffuse.load(student)
    a, b = model.sample(2, seed=3), model.sample(2, seed=3)
    assert a.shape == (2, 16, 16, 1) and np.array_equal(a, b)
    out = diffuse.fit_distilled(teacher, tmp_path / "api", nfe=1, steps=2, batch_size=8, no_progress=True)
    assert diffuse.load(out).config.distill.nfe == 1
    with pytest.raises(diffuse.DiffuseError, match="unknown setting 'warmup_steps'"):
        diffuse.fit_distilled(teacher, tmp_path / "bad", warmup_steps=3)
    with pytest.raises(diffuse.DiffuseError, match="distill.ect_target must be data or teacher, got 'both'"):
        diffuse.fit_distilled(teacher, tmp_path / "bad", target="both")
    assert not (tmp_path / "bad").exists()


def test_samplers_that_do_not_fit_the_model_are_refused(student, teacher, capsys):
    err = _error(["sample", student, "--sampler", "dpmpp-2m"], capsys)
    assert "a distilled run samples with --sampler consistency" in err
    err = _error(["sample", teacher, "--sampler", "consistency"], capsys)
    assert "--sampler consistency needs a consistency-tuned run" in err
    err = _error(["sample", student, "--spacing", "trailing"], capsys)
    assert "walks geometric or karras levels" in err


def _resumes_bit_identically(run: Path, part: Path) -> Path:
    """Copy ``run`` (6 steps, checkpoints at 3 and 6) to ``part``, resume it from step 3, and assert
    that its step-6 model and EMA equal the uninterrupted run's bit for bit. Returns ``part``."""
    shutil.copytree(run, part, symlinks=True)
    point(part / "checkpoints", "last", "step_0000003")
    assert cli.main(["distill", "--resume", str(part), "--no-progress"]) == 0
    for name in ("model", "ema"):
        a = read_tensors(run / "checkpoints" / "step_0000006" / f"{name}.safetensors")
        b = read_tensors(part / "checkpoints" / "step_0000006" / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name
    return part


def test_resumed_distillation_is_bit_identical(student, tmp_path):
    _resumes_bit_identically(student, tmp_path / "part")


def test_bad_inputs_are_one_line_errors(student, teacher, tmp_path, capsys):
    assert "is itself a distilled run" in _error(["distill", student, "--out", tmp_path / "x"], capsys)
    assert "no such run or checkpoint" in _error(["distill", tmp_path / "nothing", "--out", tmp_path / "y"], capsys)
    assert "--nfe for ect must be between 1 and 8, got 9" in _error(
        ["distill", teacher, "--out", tmp_path / "z", "--nfe", 9], capsys)
    assert "invalid choice" in _error(["distill", teacher, "--method", "sfd"], capsys)
    assert "is not a distilled run" in _error(["distill", "--resume", teacher], capsys)
    assert "name the teacher run" in _error(["distill"], capsys)
    assert "drop the teacher argument" in _error(["distill", teacher, "--resume", student], capsys)
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()     # refused before any write


def test_export_to_diffusers_is_refused_and_safetensors_keeps_the_nfe(student, tmp_path, capsys):
    assert "ConsistencyModelPipeline" in _error(["export", student, tmp_path / "hf"], capsys)
    assert not (tmp_path / "hf").exists()
    f = tmp_path / "student.safetensors"
    assert cli.main(["export", str(student), str(f)]) == 0
    out = tmp_path / "s.npz"
    assert cli.main(["sample", str(f), "--n", "2", "--out", str(out)]) == 0
    assert json.loads(np.load(out)["meta"].item())["nfe"] == 2


def test_budget_distillation_follows_the_clock(teacher, tmp_path, monkeypatch):
    """--time-limit makes a budget plan: on a fake clock (1 s per reading) 0.2 min is 12 steps, and
    ECT's stage, like the learning rate, follows the fraction of the budget used."""
    t = iter(float(i) for i in range(10**6))
    monkeypatch.setattr(budget, "wall_clock", lambda: next(t))
    seen = []
    from diffuse import distill as distill_math
    real = distill_math.ConsistencyStep.__call__

    def spy(self, x0, step, progress, f=None, teacher=None):
        seen.append(progress)
        return real(self, x0, step, progress, f, teacher)
    monkeypatch.setattr(distill_math.ConsistencyStep, "__call__", spy)
    out = _distill(teacher, tmp_path / "b", "--time-limit", 0.2)
    cfg = json.loads((out / "config.json").read_text())["train"]
    assert (cfg["plan"], cfg["time_limit"], cfg["steps"]) == ("budget", 0.2, None)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][-1] == 12
    assert seen == sorted(seen) and seen[0] < 0.2 and seen[-1] > 0.8


def test_a_class_conditional_student_samples_a_class(tmp_path, capsys):
    t = tmp_path / "t"
    cfg = resolve("digits", None, None, {"model": {**TINY_MODEL, "class_cond": True}, "train": {
        "steps": 2, "batch_size": 8, "sample_n": 4, "sample_steps": 2, "out": str(t)}})
    train(cfg, progress=False)
    s = _distill(t, tmp_path / "s", "--steps", 2)
    out = tmp_path / "c.npz"
    assert cli.main(["sample", str(s), "--n", "2", "--class", "3", "--out", str(out)]) == 0
    assert list(np.load(out)["labels"]) == [3, 3]


def test_guidance_is_distilled_from_the_guided_teachers_step(tmp_path, capsys, monkeypatch):
    """--distill-guidance W on a class-conditional teacher: the target's x_r is the teacher's ODE step under
    guidance W (its null class for the unconditional half), recorded in the run; the student then
    samples at its own default (no further guidance) and refuses --guidance in one line."""
    from diffuse import distill
    t = tmp_path / "t"
    cfg = resolve("digits", None, None, {"model": {**TINY_MODEL, "class_cond": True}, "train": {
        "steps": 2, "batch_size": 8, "sample_n": 4, "sample_steps": 2, "out": str(t), "sample_guidance": 1.5}})
    train(cfg, progress=False)
    seen = []
    real = distill.teacher_step

    def spy(den, x_t, sigma_t, sigma_r):
        seen.append((den.guidance, den.null_label, den.labels is not None))
        return real(den, x_t, sigma_t, sigma_r)
    monkeypatch.setattr(distill, "teacher_step", spy)
    s = _distill(t, tmp_path / "s", "--steps", 2, "--distill-guidance", 2)
    assert seen == [(2.0, 10, True)] * 2
    run_cfg = json.loads((s / "config.json").read_text())
    assert (run_cfg["distill"]["guidance"], run_cfg["distill"]["ect_target"]) == (2.0, "teacher")
    assert run_cfg["train"]["sample_guidance"] == 0.0
    out = tmp_path / "c.npz"
    assert cli.main(["sample", str(s), "--n", "2", "--class", "3", "--out", str(out)]) == 0
    assert json.loads(np.load(out)["meta"].item())["guidance"] == 0.0
    assert "guidance 2 distilled into it; sample it without --guidance" in _error(
        ["sample", s, "--n", 2, "--class", 3, "--guidance", 1, "--out", tmp_path / "g.npz"], capsys)
    capsys.readouterr()
    assert cli.main(["info", str(s)]) == 0
    assert "per image, guidance 2 distilled, from " in capsys.readouterr().out
    # refusals, each before anything is written
    assert "use it with --target teacher" in _error(
        ["distill", t, "--distill-guidance", 2, "--target", "data", "--out", tmp_path / "x1"], capsys)
    assert "--distill-guidance is a setting of --method ect" in _error(
        ["distill", t, "--method", "gits", "--distill-guidance", 2, "--out", tmp_path / "x2"], capsys)
    assert "distill.guidance must be a finite number >= 0, got -1.0" in _error(
        ["distill", t, "--distill-guidance", -1, "--out", tmp_path / "x3"], capsys)
    assert "drop --distill-guidance" in _error(["distill", "--resume", s, "--distill-guidance", 3], capsys)
    assert not any((tmp_path / f"x{i}").exists() for i in (1, 2, 3))


def test_guidance_needs_a_class_conditional_teacher(teacher, tmp_path, capsys):
    assert "--distill-guidance needs a class-conditional teacher" in _error(
        ["distill", teacher, "--distill-guidance", 2, "--out", tmp_path / "x"], capsys)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("nfe,levels", [(1, [10.0]), (2, [10.0, 10 / 3.7]), (4, [10.0, 10 / 3.7, 10 / 3.7 ** 2, 10 / 3.7 ** 3])])
def test_consistency_levels_start_at_10_and_fall_by_3_7_per_call(nfe, levels):
    for schedule in (Schedule("cosine", 1000), Schedule("linear", 1000)):
        sig = sampler_sigmas("consistency", schedule, nfe)
        assert sig.dtype == torch.float64 and sig[-1] == 0
        assert sig[:-1].tolist() == pytest.approx(levels, rel=1e-12)


@pytest.mark.parametrize("nfe", [7, 8])
def test_many_consistency_calls_stay_above_sigma_min(nfe):
    """3.7^7 > 10 / 0.002: past 6 calls the ratio shrinks to (top / sigma_min)^(1/n), so no call is
    spent at sigma_min, where f(x, sigma_min) = x changes nothing."""
    from types import SimpleNamespace
    edm = SimpleNamespace(sigma_min=0.002, sigma_max=80.0)          # EDM's range: the lowest sigma_min diffuse has
    sig = sampler_sigmas("consistency", edm, nfe)[:-1]
    assert edm.sigma_min == pytest.approx(0.002) and float(sig[0]) == 10.0
    assert float(sig[-1]) == pytest.approx(10 * (0.002 / 10) ** ((nfe - 1) / nfe), rel=1e-9)
    assert float(sig[-1]) > 2 * edm.sigma_min and (sig.diff() < 0).all()


@pytest.mark.parametrize("nfe", [1, 2, 4])
def test_consistency_karras_levels_are_the_top_nfe_of_nfe_plus_one(nfe):
    """--spacing karras (the levels before geometric became the default): n calls at the top n of
    n + 1 Karras levels from the capped sigma_max, never at sigma_min."""
    s = Schedule("cosine", 1000)
    sig = sampler_sigmas("consistency", s, nfe, "karras")
    top = min(s.sigma_max, KARRAS_SIGMA_MAX_CAP)
    expected = karras_sigmas(s.sigma_min, top, nfe + 1)[:-1]
    assert torch.equal(sig[:-1], expected) and sig[-1] == 0 and len(sig) == nfe + 1
    assert float(sig[-2]) > s.sigma_min * 1.5


def test_distill_through_the_real_cli(teacher, tmp_path):
    """The installed entry point, as a user runs it: distil, then sample the student's default."""
    out = tmp_path / "cli-student"
    p = subprocess.run([sys.executable, "-m", "diffuse", "distill", str(teacher), "--out", str(out), "--steps", "2",
                        "--batch-size", "8", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert f"done: {out}" in p.stdout
    p = subprocess.run([sys.executable, "-m", "diffuse", "sample", str(out), "--n", "4", "--out", str(tmp_path / "g.png")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "consistency, 2 NFE" in p.stdout, p.stderr


# ----------------------------------------------------------------------------------------------
# --method gits: the teacher's noise levels searched, no training

@pytest.fixture(scope="module")
def gits(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("gits") / "g"
    assert cli.main(["distill", str(teacher), "--method", "gits", "--nfe", "3", "--out", str(out), "--no-progress"]) == 0
    return out


def test_gits_writes_a_run_with_the_searched_levels(gits, teacher, tmp_path, capsys):
    d = json.loads((gits / "config.json").read_text())["distill"]
    assert (d["method"], d["nfe"], d["sampler"]) == ("gits", 3, "dpmpp-2m-sde")
    sig = d["sigmas"]
    assert len(sig) == 4 and sig[-1] == 0 and all(a > b for a, b in zip(sig, sig[1:])) and sig[0] <= 80.0
    assert d["search"]["searched_cost"] <= d["search"]["karras_cost"] + 1e-12 and d["search"]["trajectories"] == 256
    assert "gits: 3 levels searched on 256 trajectories" in (gits / "train.log").read_text()
    # the teacher's weights, unchanged
    a = read_tensors(teacher / "checkpoints" / "last" / "ema.safetensors")
    b = read_tensors(gits / "checkpoints" / "last" / "ema.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the same search again gives the same levels
    again = tmp_path / "again"
    assert cli.main(["distill", str(teacher), "--method", "gits", "--nfe", "3", "--out", str(again), "--no-progress"]) == 0
    assert json.loads((again / "config.json").read_text())["distill"]["sigmas"] == sig
    capsys.readouterr()
    assert cli.main(["info", str(gits)]) == 0
    assert "gits searched noise levels for dpmpp-2m-sde for 3 network calls" in capsys.readouterr().out


def test_gits_levels_are_the_default_for_any_one_call_per_step_sampler(gits, tmp_path):
    sig = json.loads((gits / "config.json").read_text())["distill"]["sigmas"]
    out = tmp_path / "s.npz"
    cases = [((), ("dpmpp-2m-sde", "learned", 3)), (("--sampler", "ddim"), ("ddim", "learned", 3)),
             (("--steps", "5"), ("dpmpp-2m-sde", "karras", 5))]
    for flags, expected in cases:
        assert cli.main(["sample", str(gits), "--n", "2", "--out", str(out), *flags]) == 0
        meta = json.loads(np.load(out)["meta"].item())
        assert (meta["sampler"], meta["spacing"], meta["nfe"]) == expected, flags
    from diffuse.generate import load, settle
    from diffuse.sampling import SamplingSpec
    spec = settle(load(gits, torch.device("cpu")), SamplingSpec(), False)
    assert spec.sigmas(None).tolist() == sig


def test_gits_refusals(gits, teacher, tmp_path, capsys):
    assert "no training to resume" in _error(["distill", "--resume", gits], capsys)
    assert "no training to resume" in _error(["train", "--resume", gits], capsys)
    assert "searched noise levels do not travel" in _error(["export", gits, tmp_path / "hf"], capsys)
    assert "--nfe for gits must be between 1 and 10, got 11" in _error(
        ["distill", teacher, "--method", "gits", "--nfe", 11, "--out", tmp_path / "x"], capsys)
    assert "needs a consistency-tuned run" in _error(["sample", gits, "--sampler", "consistency"], capsys)
    bad = tmp_path / "bad"
    shutil.copytree(gits, bad, symlinks=True)
    for f in (bad / "config.json", bad / "checkpoints" / "last" / "config.json"):
        header = json.loads(f.read_text())
        header.get("config", header)["distill"]["sigmas"] = [80.0, 1.0, 2.0, 0.0]    # not decreasing
        f.write_text(json.dumps(header))
    assert "distill.sigmas must be 4 finite decreasing noise levels" in _error(["sample", bad], capsys)


def test_serve_lists_each_models_own_default_and_generates_with_it(student, teacher):
    """The page selects each model's own sampler and NFE (a student: consistency at 2), and a
    request with them gives the student's images with its NFE."""
    pytest.importorskip("fastapi")
    from diffuse.generate import load
    from .test_serve_api import make_client
    cpu = torch.device("cpu")
    client, worker = make_client({"student": load(student, cpu), "teacher": load(teacher, cpu)})
    try:
        by = {m["name"]: m for m in client.get("/api/models").json()["models"]}
        assert (by["student"]["default_sampler"], by["student"]["default_steps"]) == ("consistency", 2)
        assert by["student"]["distilled"].startswith("ect consistency tuning for 2 network calls")
        assert (by["teacher"]["default_sampler"], by["teacher"]["default_steps"], by["teacher"]["distilled"]) == \
            ("dpmpp-2m-sde", 20, None)
        body = client.post("/api/generate", json={"model": "student", "n": 2, "steps": 2, "sampler": "consistency",
                                                  "format": "json"}).json()
        assert (body["sampler"], body["nfe"], len(body["images"])) == ("consistency", 2, 2)
        r = client.post("/api/generate", json={"model": "teacher", "n": 2, "steps": 2, "sampler": "consistency"})
        assert r.status_code == 422 and "consistency-tuned run" in r.text
    finally:
        worker.stop()


def test_a_student_gets_the_default_cooldown_whatever_its_teacher_used(teacher, tmp_path):
    from diffuse.budget import COOLDOWN_FRACTION
    from diffuse.runs import distill_config
    old = tmp_path / "old-teacher"
    shutil.copytree(teacher, old, symlinks=True)
    ckpt = (old / "checkpoints" / "last").resolve()
    header = json.loads((ckpt / "config.json").read_text())
    del header["config"]["train"]["cooldown"]                  # a teacher stored before --cooldown existed
    (ckpt / "config.json").write_text(json.dumps(header))
    cfg = distill_config(old, tmp_path / "s", steps=3, time_limit=1.0)
    assert cfg.train.cooldown == COOLDOWN_FRACTION != 1 - budget.WARMUP_FRACTION


def test_a_new_student_records_diffuses_tuning_settings_and_an_old_one_resumes_with_ects(student, tmp_path,
                                                                                         monkeypatch):
    """A new student stores distill.TUNING_DEFAULTS and trains with them; a student stored before
    the fields existed resumes with ECT's own (8 stages, lognormal mean -1.1), as it was tuned."""
    from diffuse import distill
    d = json.loads((student / "config.json").read_text())["distill"]
    assert (d["ect_stages"], d["ect_p_mean"]) == (distill.TUNING_DEFAULTS["stages"], distill.TUNING_DEFAULTS["p_mean"])
    assert (d["ect_stages"], d["ect_p_mean"]) != (distill.ECTSettings().stages, distill.ECTSettings().p_mean)
    used = []
    init = distill.ConsistencyStep.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        used.append((self.settings.stages, self.settings.p_mean))
    monkeypatch.setattr(distill.ConsistencyStep, "__init__", spy)
    for name, drop in (("new", False), ("old", True)):
        part = tmp_path / name
        shutil.copytree(student, part, symlinks=True)
        point(part / "checkpoints", "last", "step_0000003")
        if drop:
            cfg = json.loads((part / "config.json").read_text())
            del cfg["distill"]["ect_stages"], cfg["distill"]["ect_p_mean"]
            (part / "config.json").write_text(json.dumps(cfg))
        assert cli.main(["distill", "--resume", str(part), "--no-progress"]) == 0
    assert used == [(4, 0.5), (8, -1.1)]
    assert distill.tuning_settings(None, None) == distill.ECTSettings()


@pytest.fixture(scope="module")
def distilled_from_the_teacher(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "cd"
    return _distill(teacher, out, "--steps", 6, "--target", "teacher", "--ckpt-every", 3, "--keep", 0)


def test_the_teacher_target_steps_with_the_frozen_teachers_ode(distilled_from_the_teacher, student, teacher,
                                                               tmp_path, monkeypatch):
    """--target teacher is recorded; each step's x_r is the teacher's ODE step, made by the
    teacher's EMA weights (loaded frozen, not the moving student); the student it makes differs from
    the data-target one of the same seed; a new student defaults to the data target."""
    from diffuse import distill
    assert json.loads((distilled_from_the_teacher / "config.json").read_text())["distill"]["ect_target"] == "teacher"
    assert json.loads((student / "config.json").read_text())["distill"]["ect_target"] == "data"
    a = read_tensors(student / "checkpoints" / "step_0000006" / "model.safetensors")
    b = read_tensors(distilled_from_the_teacher / "checkpoints" / "step_0000006" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    calls = []
    real = distill.teacher_step

    def spy(den, x_t, sigma_t, sigma_r):
        calls.append({k: v.detach().clone() for k, v in den.net.state_dict().items()})
        assert not any(p.requires_grad for p in den.net.parameters()) and not den.net.training
        return real(den, x_t, sigma_t, sigma_r)
    monkeypatch.setattr(distill, "teacher_step", spy)
    _distill(teacher, tmp_path / "again", "--steps", 3, "--target", "teacher")
    ema = read_tensors(Path(json.loads((distilled_from_the_teacher / "config.json").read_text())["distill"]["teacher"])
                       / "ema.safetensors")
    assert len(calls) == 3 and all(torch.equal(c[k], ema[k]) for c in calls for k in ema)


def test_a_teacher_target_distillation_resumes_exactly_and_needs_its_teacher(distilled_from_the_teacher, teacher,
                                                                             tmp_path, capsys):
    part = _resumes_bit_identically(distilled_from_the_teacher, tmp_path / "part")
    # the teacher moved away: a resume says so in one line and leaves the student as it was
    gone = tmp_path / "gone"
    shutil.copytree(distilled_from_the_teacher, gone, symlinks=True)
    cfg = json.loads((gone / "config.json").read_text())
    cfg["distill"]["teacher"] = str(tmp_path / "nowhere" / "checkpoints" / "step_0000008")
    (gone / "config.json").write_text(json.dumps(cfg))
    point(gone / "checkpoints", "last", "step_0000003")
    before = sorted(p.name for p in (gone / "checkpoints").iterdir())
    assert "is gone; a distillation with --target teacher needs it" in _error(
        ["distill", "--resume", gone, "--no-progress"], capsys)
    assert sorted(p.name for p in (gone / "checkpoints").iterdir()) == before
    assert "drop --target" in _error(["distill", "--resume", part, "--target", "data"], capsys)
    assert "--target is a setting of --method ect" in _error(
        ["distill", teacher, "--method", "gits", "--target", "teacher", "--out", tmp_path / "g"], capsys)
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("field,value,says", [("ect_stages", 0, "distill.ect_stages must be a whole number from 1"),
                                              ("ect_stages", 2.5, "bad value 2.5 for ect-stages"),
                                              ("ect_p_mean", float("nan"), "distill.ect_p_mean must be a finite")])
def test_bad_tuning_settings_in_a_config_are_refused(student, tmp_path, field, value, says, capsys):
    part = tmp_path / "bad"
    shutil.copytree(student, part, symlinks=True)
    cfg = json.loads((part / "config.json").read_text())
    cfg["distill"][field] = value
    (part / "config.json").write_text(json.dumps(cfg))
    assert says in _error(["distill", "--resume", part, "--no-progress"], capsys)
