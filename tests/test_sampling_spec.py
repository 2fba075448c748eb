"""sampling.SamplingSpec: one frozen request, one resolve, one check, shared by generate, the
training grids and FID, visualize, serve and the CLI."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from diffuse import visualize as vis
from diffuse.config import DiffusionConfig
from diffuse.diffusion import Schedule
from diffuse.errors import DiffuseError
from diffuse.generate import Loaded, generate
from diffuse.samplers import DPMPP_SDE_ETA, ETA_SAMPLERS
from diffuse.sampling import SamplingSpec, SpecError

from .conftest import tiny_loaded

LINEAR = Schedule("linear", 1000)


@pytest.fixture(scope="module")
def loaded() -> Loaded:
    return tiny_loaded()


def test_resolved_fills_the_formulations_defaults():
    vp = SamplingSpec().resolved(DiffusionConfig())
    assert (vp.sampler, vp.steps, vp.spacing, vp.eta, vp.guidance) == ("dpmpp-2m-sde", 20, "karras", DPMPP_SDE_ETA, 0.0)
    assert SamplingSpec().resolved() == vp                             # no run: the VP default
    edm = SamplingSpec().resolved(DiffusionConfig(formulation="edm"))
    assert (edm.sampler, edm.steps, edm.spacing, edm.eta) == ("heun", 35, "karras", None)
    ddim = SamplingSpec("ddim").resolved(DiffusionConfig(formulation="edm"))   # a sampler alone keeps 20 steps
    assert (ddim.steps, ddim.spacing, ddim.eta) == (20, "trailing", ETA_SAMPLERS["ddim"][0])


def test_resolved_keeps_what_was_given_and_guidance_follows_the_labels():
    given = SamplingSpec("euler", 7, "trailing", None, 0.0, False, 3)
    assert given.resolved(DiffusionConfig(formulation="edm"), conditional=True, default_guidance=2.0) == given
    assert SamplingSpec().resolved(conditional=True, default_guidance=1.5).guidance == 1.5
    assert SamplingSpec().resolved(conditional=False, default_guidance=1.5).guidance == 0.0
    assert SamplingSpec(steps=0).resolved().steps == 0                  # kept for check to refuse, not defaulted


BAD = [
    (SamplingSpec("lms", 2), "sampler", "unknown sampler 'lms'; choose one of ddpm, ddim"),
    (SamplingSpec("heun", 1001), "steps", "--steps must be between 1 and 1000 for this model, got 1001"),
    (SamplingSpec("ddim", 0), "steps", "--steps must be between 1 and 1000 for this model, got 0"),
    (SamplingSpec("ddim", 2, "log"), "spacing", "unknown spacing 'log'; choose one of trailing"),
    (SamplingSpec("ddpm", 2, "karras"), "spacing", "--spacing karras does not apply to --sampler ddpm"),
    (SamplingSpec("dpmpp-2m", 2, eta=0.5), "eta", "--eta applies to --sampler ddim or dpmpp-2m-sde only"),
    (SamplingSpec("ddim", 2, eta=1.5), "eta", "--eta for ddim must be in [0, 1]"),
    (SamplingSpec("dpmpp-2m-sde", 2, eta=float("nan")), "eta", "--eta for dpmpp-2m-sde must be in [0, 10]"),
    (SamplingSpec("ddim", 2, guidance=float("inf")), "guidance", "--guidance must be a finite number >= 0, got inf"),
    (SamplingSpec("ddim", 2, guidance=-1.0), "guidance", "--guidance must be a finite number >= 0, got -1.0"),
    (SamplingSpec("ddim", 2, guidance=2.0), "guidance", "--guidance needs a class-conditional model"),
]


@pytest.mark.parametrize("spec,field,text", BAD, ids=[t for _, _, t in BAD])
def test_check_refuses_each_bad_field_in_one_line(spec, field, text):
    with pytest.raises(SpecError) as e:
        spec.resolved().check(LINEAR, class_cond=False, conditional=False)
    assert e.value.field == field and str(e.value).startswith(text) and "\n" not in str(e.value)
    assert isinstance(e.value, DiffuseError)


def test_check_guidance_names_what_is_missing():
    spec = SamplingSpec("ddim", 2, guidance=2.0).resolved()
    with pytest.raises(SpecError, match=r"^--guidance needs --class \(a class, a list, or all\)$"):
        spec.check(LINEAR, class_cond=True, conditional=False)
    assert spec.check(LINEAR, class_cond=True, conditional=True) is spec


def test_check_names_the_config_fields_with_a_prefix():
    with pytest.raises(SpecError, match=r"^--fid-sampler 'nope' is not a sampler; choose one of"):
        SamplingSpec("nope", 2).check_sampler(1000, prefix="--fid-")
    with pytest.raises(SpecError, match=r"^--fid-steps must be between 1 and 10 for this model, got 20$"):
        SamplingSpec("ddim", 20).check_sampler(10, prefix="--fid-")


def test_spec_is_frozen_and_hashable():
    spec = SamplingSpec("ddim", 10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.steps = 20
    assert spec.replace(steps=20) == SamplingSpec("ddim", 20) and spec.steps == 10
    assert len({spec, SamplingSpec("ddim", 10)}) == 1


def test_importing_it_loads_no_torch():
    code = "import sys, diffuse.sampling; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def _serve_refusal(loaded, spec: SamplingSpec) -> tuple[list, str]:
    from fastapi.testclient import TestClient

    from diffuse.serve.app import Limits, Served, create_app
    from diffuse.serve.guard import allowed_hosts
    from diffuse.serve.jobs import Worker

    worker = Worker(torch.device("cpu"), {"m": loaded}, max_queue=1, max_batch=1)      # never started
    app = create_app({"m": Served("m", loaded, worker)}, Limits(), hosts=allowed_hosts("127.0.0.1", 8000))
    body = {k: v for k, v in dataclasses.asdict(spec).items() if v is not None and k not in ("clip_x0", "sigma_max_cap")}
    r = TestClient(app, base_url="http://127.0.0.1:8000").post("/api/generate", json={"n": 1, **body})
    assert r.status_code == 422, r.text
    (detail,) = r.json()["detail"]
    return detail["loc"], detail["msg"]


@pytest.mark.parametrize("spec,field", [(SamplingSpec("ddim", 2, eta=1.5), "eta"),
                                        (SamplingSpec("ddpm", 2, "karras"), "spacing"),
                                        (SamplingSpec("dpmpp-2m", 2, eta=0.5), "eta")])
def test_generate_visualize_and_serve_refuse_a_spec_with_the_same_message(loaded, spec, field):
    with pytest.raises(SpecError) as by_generate:
        generate(loaded, n=1, spec=spec)
    with pytest.raises(SpecError) as by_trajectory:
        vis.trajectory(loaded, n=1, spec=spec)
    with pytest.raises(SpecError) as by_interpolate:
        vis.interpolate(loaded, rows=1, frames=2, spec=spec)
    message = str(by_generate.value)
    assert str(by_trajectory.value) == str(by_interpolate.value) == message and by_generate.value.field == field
    assert _serve_refusal(loaded, spec) == (["body", field], message.replace("--", ""))
