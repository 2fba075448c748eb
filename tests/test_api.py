"""The public Python API (diffuse.api, exposed lazily by ``import diffuse``): the same runs and images
as the CLI, one-line errors, the package's help text, and every snippet of docs/python.md run as is."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import pydoc
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import diffuse
from diffuse.errors import DiffuseError

from .conftest import REPO, TINY_MODEL

ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONWARNINGS": "ignore"}
TINY = {**TINY_MODEL, "steps": 2, "batch_size": 8, "sample_n": 2, "sample_steps": 1, "lr": 1e-3,
        "warmup_steps": 0, "no_progress": True}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("api")
    return {"uncond": diffuse.fit(data="digits", out=root / "uncond", **TINY),
            "cond": diffuse.fit(data="digits", out=root / "cond", class_cond=True, **TINY)}


def cli_sample(run: Path, out: Path, *flags: str) -> np.ndarray:
    r = subprocess.run([sys.executable, "-m", "diffuse", "sample", str(run), "--out", str(out), "--no-progress",
                        *flags], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    return np.load(out)["images"]


# ----------------------------------------------------------------------------------------------
# Same settings, same results as the CLI

def test_fit_trains_the_config_the_cli_resolves(runs, tmp_path):
    model = diffuse.load(runs["cond"])
    flags = ["--data", "digits", "--class-cond", "--out", str(runs["cond"]), "--base-channels", "8",
             "--channel-mult", "1,2", "--num-res-blocks", "1", "--attn-resolutions", "8", "--num-groups", "4",
             "--head-channels", "8", "--steps", "2", "--batch-size", "8", "--sample-n", "2", "--sample-steps", "1",
             "--lr", "1e-3", "--warmup-steps", "0", "--dry-run"]
    r = subprocess.run([sys.executable, "-m", "diffuse", "train", *flags], capture_output=True, text=True, env=ENV,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    dry = json.loads(r.stdout)
    api = json.loads(diffuse.train_config(data="digits", class_cond=True, out=str(runs["cond"]), **TINY).to_json())
    assert api == dry
    assert model.step == 2 and model.config.model.class_cond and model.class_names == [str(k) for k in range(10)]
    assert (model.image_size, model.channels, model.device.type) == (16, 1, "cpu")
    assert model.precision in ("fp32", "bf16") and diffuse.load(runs["cond"], precision="fp32").precision == "fp32"
    before = torch.get_num_threads()
    try:
        diffuse.load(runs["cond"], threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)          # the rest of the session keeps its threads


@pytest.mark.parametrize("kind, kw, flags", [
    ("uncond", {"seed": 3}, ["--seed", "3"]),
    ("uncond", {"seed": 1, "sampler": "ddim", "steps": 4, "eta": 0.5, "batch_size": 2},
     ["--seed", "1", "--sampler", "ddim", "--steps", "4", "--eta", "0.5", "--batch-size", "2"]),
    ("cond", {"seed": 2, "class_": [3, "7"], "guidance": 2.0, "steps": 3},
     ["--seed", "2", "--class", "3,7", "--guidance", "2", "--steps", "3"]),
])
def test_sample_equals_the_cli(runs, tmp_path, kind, kw, flags):
    images = diffuse.load(runs[kind]).sample(5, **kw)
    assert images.dtype == np.uint8 and images.shape == (5, 16, 16, 1)
    assert np.array_equal(images, cli_sample(runs[kind], tmp_path / "x.npz", "--n", "5", *flags))


def test_class_all_equals_the_cli(runs, tmp_path):
    model = diffuse.load(runs["cond"])
    images = model.sample(20, class_="all", steps=2)               # 20 // 10 = 2 of each class
    assert images.shape[0] == 20
    assert np.array_equal(images, cli_sample(runs["cond"], tmp_path / "x.npz", "--n", "20", "--class", "all",
                                             "--steps", "2"))
    grid = model.save_grid(images, tmp_path / "g.png", nrow=2, row_labels=model.class_names)
    assert grid.is_file()


def test_save_grid_writes_what_the_cli_writes(runs, tmp_path):
    model = diffuse.load(runs["uncond"])
    images = model.sample(4, steps=2)
    model.save_grid(images, tmp_path / "api.png")
    r = subprocess.run([sys.executable, "-m", "diffuse", "sample", str(runs["uncond"]), "--n", "4", "--steps", "2",
                        "--out", str(tmp_path / "cli.png"), "--no-progress"], env=ENV, capture_output=True, timeout=300)
    assert r.returncode == 0
    assert (tmp_path / "api.png").read_bytes() == (tmp_path / "cli.png").read_bytes()


def test_load_takes_a_checkpoint_a_slim_file_and_a_diffusers_folder(runs, tmp_path):
    from diffuse.export import export_diffusers, export_safetensors

    want = diffuse.load(runs["uncond"], precision="fp32").sample(3, steps=2)
    export_safetensors(runs["uncond"], tmp_path / "m.safetensors")
    export_diffusers(runs["uncond"], tmp_path / "hf")
    for source in (runs["uncond"] / "checkpoints" / "last", tmp_path / "m.safetensors", tmp_path / "hf"):
        model = diffuse.load(source, precision="fp32")
        assert model.path == source
        assert np.array_equal(model.sample(3, steps=2), want), source
    assert diffuse.load(tmp_path / "hf").checkpoint.parent.name == "imported"      # converted into the cache


# ----------------------------------------------------------------------------------------------
# FID and KID

def test_fid_kid_matches_eval_fid_between(runs, tmp_path):
    pytest.importorskip("scipy")
    from diffuse import inception
    try:
        if not inception.default_weights_path().is_file():
            pytest.skip("no Inception weights")
    except DiffuseError:
        pytest.skip("no Inception weights")
    model = diffuse.load(runs["uncond"])
    a, b = model.sample(8, seed=0, steps=2), model.sample(8, seed=100, steps=2)
    np.savez(tmp_path / "a.npz", images=a)
    np.savez(tmp_path / "b.npz", images=b)
    r = subprocess.run([sys.executable, "-m", "diffuse", "eval", "--fid-between", str(tmp_path / "a.npz"),
                        str(tmp_path / "b.npz"), "--json", "--device", "cpu"], capture_output=True, text=True,
                       env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    cli = json.loads(r.stdout)
    with pytest.warns(UserWarning):                                  # N = 8: the small-N note
        api = diffuse.fid_kid(a, b, device="cpu")
    assert api["fid"] == pytest.approx(cli["fid"], rel=1e-6) and api["kid"] == pytest.approx(cli["kid"], rel=1e-6)
    # Each reference form gives the same statistics (compared directly: a FID costs a 2048-d sqrtm,
    # 15-80 s on 2 cores).
    from diffuse.api import _reference_stats
    from diffuse.inception import load_extractor
    from PIL import Image
    (tmp_path / "b").mkdir()
    for i, img in enumerate(b):
        Image.fromarray(img[..., 0]).save(tmp_path / "b" / f"{i}.png")
    ex = load_extractor(None, "cpu")
    sets = [_reference_stats(ref, ex, None, 50)[0] for ref in (b, tmp_path / "b.npz", tmp_path / "b")]
    data = [_reference_stats(ref, ex, 16, 50) for ref in (runs["uncond"], str(runs["uncond"]), model, "digits")]
    for group in (sets, [stats for stats, _ in data]):
        for stats in group[1:]:
            assert np.allclose(stats.mu, group[0].mu, rtol=0, atol=1e-6)
            assert np.allclose(stats.sigma, group[0].sigma, rtol=0, atol=1e-6)
    assert data[0][1]["data"] == "digits" and data[0][0].n == 16 and sets[0].n == 8
    assert not np.allclose(data[0][0].mu, sets[0].mu, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# Bad input: one-line DiffuseErrors

@pytest.mark.parametrize("call, message", [
    (lambda: diffuse.fit(step=3), "unknown training setting 'step'; did you mean steps"),
    (lambda: diffuse.fit(stpes=3, out="x"), "did you mean steps"),
    (lambda: diffuse.train_config(steps="many"), "bad value 'many' for steps"),
    (lambda: diffuse.train_config(class_cond="maybe"), "bad value 'maybe' for class-cond"),
    (lambda: diffuse.train_config(overwrite=1), "overwrite must be True or False"),
    (lambda: diffuse.train_config(preset="huge"), "unknown preset 'huge'"),
    (lambda: diffuse.fit(dry_run=True), "dry_run: call diffuse.train_config(...)"),
    (lambda: diffuse.load("/no/such/run"), "no such run or checkpoint"),
    (lambda: diffuse.load(42), "path must be a run, checkpoint or model file path, got int"),
    (lambda: diffuse.load(".", precision="fp16"), "precision must be auto, fp32 or bf16"),
])
def test_bad_input_is_one_line(call, message):
    with pytest.raises(DiffuseError, match=re.escape(message)) as e:
        call()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw, message", [
    ({"n": 0}, "n must be at least 1"),
    ({"n": 2.5}, "n must be an integer"),
    ({"seed": "0"}, "seed must be an integer"),
    ({"steps": 0}, "steps must be at least 1"),
    ({"sampler": "plms"}, "unknown sampler 'plms'"),
    ({"eta": "lots"}, "eta must be a number"),
    ({"class_": 3}, "is an unconditional model"),
    ({"class_": 3.5}, "class_ must be a class index"),
    ({"guidance": 2.0}, "needs a class-conditional model"),
])
def test_bad_sample_arguments_are_one_line(runs, kw, message):
    model = diffuse.load(runs["uncond"])
    with pytest.raises(DiffuseError, match=re.escape(message)) as e:
        model.sample(**{"n": 2, "steps": 1, **kw})
    assert "\n" not in str(e.value)


def test_bad_images_and_references_are_one_line(runs, tmp_path):
    model = diffuse.load(runs["uncond"])
    for call, message in ((lambda: model.save_grid([1, 2], tmp_path / "g.png"), "must be a numpy array"),
                          (lambda: model.save_grid(np.zeros((2, 4, 4, 1), np.float32), tmp_path / "g.png"),
                           "must be uint8"),
                          (lambda: model.save_grid(np.zeros((2, 4, 4, 1), np.uint8), tmp_path / "g.jpg"),
                           "expected a file name ending in .png"),
                          (lambda: diffuse.fid_kid([1, 2], "digits"), "images must be a uint8"),
                          (lambda: diffuse.fid_kid(np.zeros((2, 4, 4, 1), np.uint8), "digits", n_ref=1),
                           "n_ref must be at least 2")):
        with pytest.raises(DiffuseError, match=re.escape(message)):
            call()


# ----------------------------------------------------------------------------------------------
# The package: light import, names, help

def test_import_diffuse_does_not_import_torch():
    code = ("import sys, diffuse, diffuse.cli; assert 'torch' not in sys.modules, 'torch'; "
            "diffuse.load; assert 'torch' in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr


def test_api_names_are_not_module_names():
    """A function named like a submodule (diffuse.train, diffuse.fid) would be replaced by the module
    the first time anything imports it."""
    modules = {m.name for m in pkgutil.iter_modules(diffuse.__path__)}
    assert "train" in modules and "fid" in modules
    assert not set(diffuse.__all__) & modules
    importlib.import_module("diffuse.fid")
    importlib.import_module("diffuse.train")
    assert callable(diffuse.fit) and callable(diffuse.fid_kid)
    assert set(diffuse.__all__) <= set(dir(diffuse))
    with pytest.raises(AttributeError):
        diffuse.sample


def test_help_says_where_to_start():
    text = pydoc.render_doc(diffuse, renderer=pydoc.plaintext)
    for start in ("docs/python.md", "diffuse.load(", "model.sample(16, seed=0)", "diffuse.fit(", "diffuse.fid_kid("):
        assert start in text


# ----------------------------------------------------------------------------------------------
# docs/python.md and the README

def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


# What the docs test changes, each a literal of docs/python.md: the page trains with real settings,
# the test with a tiny UNet, and its FID reference is 16 images instead of the whole data set.
TINY_ARGS = ", ".join(f"{k}={v!r}" for k, v in TINY.items() if k != "steps")
DOC_SUBSTITUTIONS = (("steps=2000", f"steps=2, {TINY_ARGS}"), ("steps=3000", "steps=3"), ("steps=500", "steps=2"),
                     ("fid_kid(images, run)", "fid_kid(images, run, n_ref=16)"))


@pytest.mark.slow      # 3 tiny runs, an export, Inception: 2-3 min of CPU, 7-8 min on a busy 2-core box
def test_docs_python_md_runs(tmp_path):
    """Every python block of docs/python.md, in order, in one interpreter, in an empty folder."""
    text = "\n".join(python_blocks(REPO / "docs" / "python.md"))
    for literal, tiny in DOC_SUBSTITUTIONS:
        assert literal in text, literal
        text = text.replace(literal, tiny)
    script = tmp_path / "snippets.py"
    script.write_text(text)
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=ENV,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for written in ("grid.png", "classes.png", "hf-digits/model_index.json", "runs/digits-cond/config.json",
                    "runs/digits-2nfe/config.json"):
        assert (tmp_path / written).is_file(), written
    assert "unknown training setting 'step'; did you mean steps" in r.stdout


def test_readme_tour_is_the_docs_tour():
    readme = re.search(r"## Python\n(.*?)\n## ", (REPO / "README.md").read_text(), re.S)
    assert readme, "README has a Python section"
    tour = python_blocks_text(readme.group(1))
    assert tour and tour[0] in (REPO / "docs" / "python.md").read_text()
    assert "docs/python.md" in readme.group(1)


def python_blocks_text(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)
