"""Export to / import from diffusers, the model card and the slim file, with diffusers as the oracle.

Weights are random (every layer, including the ones diffuse zero-initialises), so a mapping
error shows up as an output difference; the sampler tests also check that the images are not
saturated, so clipping cannot make two wrong samplers agree.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from diffuse import checkpoint as ckpt_io
from diffuse import export as ex
from diffuse.diffusion import Schedule
from diffuse.export import card as card_mod
from diffuse.config import PRESETS, Config, resolve, validate_resolution
from diffuse.errors import DiffuseError
from diffuse.generate import generate, load, sample_batch
from diffuse.models import UNet
from diffuse.rng import generator
from diffuse.samplers import sampler_sigmas

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Every preset at narrow widths: same levels, blocks, attention placement and heads per attention
# block (head_channels scaled with the width), so the same diffusers structure is exercised.
TINY_PRESETS = {
    "digits": ({"base_channels": 8, "head_channels": 16, "num_groups": 4}, 16, 1),
    "mnist": ({"base_channels": 8, "head_channels": 8, "num_groups": 4}, 28, 1),
    "cifar10-ddpm": ({"base_channels": 8, "head_channels": 16, "num_groups": 4}, 32, 3),
    "cifar10-small": ({"base_channels": 12, "head_channels": 8, "num_groups": 4}, 32, 3),
    "64px": ({"base_channels": 8, "head_channels": 8, "num_groups": 4}, 64, 3),
}

# google/ddpm-cifar10-32's unet/config.json and scheduler_config.json (written out: no download)
GOOGLE_UNET = {"act_fn": "silu", "attention_head_dim": None, "block_out_channels": [128, 256, 256, 256],
               "center_input_sample": False, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                                                  "DownBlock2D"],
               "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
               "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
               "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
               "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
GOOGLE_SCHEDULER = {"beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": True,
                    "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_small"}


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread is as fast, and a second one only adds OpenMP spinning
    when the machine is busy (40x slower per forward at a load of 10 on 2 cores)."""
    torch.set_num_threads(1)
    yield


def tiny_preset(name: str, class_cond: bool = False) -> Config:
    model, size, channels = TINY_PRESETS[name]
    cfg = resolve(name, None, None, {"model": {**model, "class_cond": class_cond}})
    cfg.model.image_size, cfg.model.in_channels = size, channels
    cfg.model.num_classes = 10 if class_cond else 0
    validate_resolution(cfg.model)
    return cfg


def random_net(cfg: Config, seed: int = 0) -> UNet:
    """A UNet with every parameter random (zero-initialised layers too), in eval mode."""
    torch.manual_seed(seed)
    net = UNet(cfg.model).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 1 and "norm" in name:           # GroupNorm: scale around 1, shift around 0
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif not p.abs().sum():                        # zero-initialised in diffuse: make them matter
                p.normal_(0, 0.05)
    return net


def trained_net(cfg: Config, steps: int = 40, seed: int = 0) -> UNet:
    """About a second of eps-prediction training on the digits, so that samples are blobs with
    grey levels rather than the saturated noise a random network draws (80% of pixels unclipped
    after 40 steps, 4% without training)."""
    from diffuse.data import load_dataset
    from diffuse.diffusion import Schedule, eps_loss, q_sample

    torch.manual_seed(seed)
    net = UNet(cfg.model)
    data = load_dataset("digits").images.float() / 127.5 - 1                 # [N, 1, 16, 16] in [-1, 1]
    d = cfg.diffusion
    abar = Schedule(d.schedule, d.timesteps, d.beta_start, d.beta_end).alphas_cumprod
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    k = cfg.model.num_classes
    for _ in range(steps):
        idx = torch.randint(0, len(data), (32,))
        t = torch.randint(0, d.timesteps, (32,))
        noise = torch.randn(32, *data.shape[1:])
        y = torch.randint(0, k + 1, (32,)) if cfg.model.class_cond else None
        loss = eps_loss(net(q_sample(data[idx], t, noise, abar), t.float(), y), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def write_checkpoint(path: Path, cfg: Config, net: UNet, class_names: list[str] | None = None, step: int = 7) -> Path:
    """A checkpoint directory (ema.safetensors + config.json), as training writes one."""
    path.mkdir(parents=True)
    header = {"format": ckpt_io.FORMAT, "format_version": ckpt_io.FORMAT_VERSION, "diffuse_version": "test",
              "step": step, "class_names": class_names, "config": cfg.to_dict()}
    meta = {"format": ckpt_io.FORMAT, "format_version": "1", "config": json.dumps(header)}
    ckpt_io._save_tensors(path / "ema.safetensors", ckpt_io.weights_of(net), meta)
    (path / "config.json").write_text(json.dumps(header))
    return path


def diffusers_unet(cfg: Config) -> UNet2DModel:
    return UNet2DModel(**{k: v for k, v in ex.unet_config(cfg).items() if not k.startswith("_")}).eval()


class FixedNoise:
    """The noise-source interface of rng.ImageNoise, returning one given starting tensor."""

    def __init__(self, z: torch.Tensor):
        self.z = z

    def randn(self, *shape):
        return self.z.clone()


# ----------------------------------------------------------------------------------------------
# The mapping, per preset

@pytest.mark.parametrize("preset", list(TINY_PRESETS))
def test_every_preset_exports_and_unet2dmodel_computes_our_output(preset):
    assert set(TINY_PRESETS) == set(PRESETS)
    cond = preset in ("mnist", "cifar10-small")                 # two presets also class-conditional
    cfg = tiny_preset(preset, class_cond=cond)
    net = random_net(cfg)
    theirs = diffusers_unet(cfg)
    theirs.load_state_dict(ex.to_diffusers(net.state_dict()), strict=True)
    m = cfg.model
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, m.in_channels, m.image_size, m.image_size, generator=gen)
    t = torch.tensor([0.0, 417.25, 999.0])                      # fractional t: the embedding, not a table
    y = torch.tensor([0, 7, 10]) if cond else None              # 10: the null class
    with torch.no_grad():
        ours, ref = net(x, t, y), theirs(x, t, class_labels=y).sample
    assert ours.abs().mean() > 0.05                             # not a degenerate (zero) output
    torch.testing.assert_close(ref, ours, rtol=0, atol=2e-5 * float(ours.abs().max()))
    # and back: bit-identical weights
    back = ex.from_diffusers(theirs.state_dict(), net)
    assert all(torch.equal(back[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("preset", list(PRESETS))
def test_full_size_presets_have_a_unet2dmodel_config(preset):
    cfg = resolve(preset, None, None, {})
    cfg.model.image_size = {"digits": 16, "mnist": 28}.get(preset, 64 if preset == "64px" else 32)
    cfg.model.in_channels = 1 if preset in ("digits", "mnist") else 3
    u = ex.unet_config(cfg)
    heads = {"digits": 48, "mnist": 32, "cifar10-ddpm": 256, "cifar10-small": 64, "64px": 64}
    assert u["attention_head_dim"] == heads[preset]
    assert u["resnet_time_scale_shift"] == ("default" if preset == "cifar10-ddpm" else "scale_shift")
    assert u["attn_norm_num_groups"] == u["norm_num_groups"]


def test_schedules_become_diffusers_betas_exactly():
    for schedule, named in (("cosine", True), ("linear", False)):
        cfg = tiny_preset("digits")
        cfg.diffusion.schedule = schedule
        s = ex.scheduler_config(cfg)
        theirs = DDPMScheduler.from_config(s).betas
        ours = Schedule(schedule, 1000, 1e-4, 0.02).betas.float()
        assert torch.equal(theirs, ours), schedule
        assert (s["trained_betas"] is None) == named
        # diffusers' own linear schedule (a float32 linspace) is not ours: the reason for trained_betas
        if schedule == "linear":
            assert not torch.equal(DDPMScheduler(beta_schedule="linear").betas, ours)


def test_mid_attention_norm_needs_attn_norm_num_groups_in_scale_shift_mode():
    """Why the export always sets attn_norm_num_groups: without it diffusers builds the mid-block
    attention with no GroupNorm in scale_shift mode, so our weights have nowhere to go."""
    cfg = tiny_preset("digits")
    u = {k: v for k, v in ex.unet_config(cfg).items() if not k.startswith("_")}
    assert u["resnet_time_scale_shift"] == "scale_shift"
    mapped = ex.to_diffusers(random_net(cfg).state_dict())
    assert "mid_block.attentions.0.group_norm.weight" in mapped
    bare = UNet2DModel(**{**u, "attn_norm_num_groups": None})
    assert "mid_block.attentions.0.group_norm.weight" not in bare.state_dict()
    UNet2DModel(**u).load_state_dict(mapped, strict=True)


def test_what_unet2dmodel_cannot_express_is_refused_by_name():
    cfg = tiny_preset("digits")
    cfg.model.base_channels, cfg.model.num_groups, cfg.model.head_channels = 48, 8, 32
    cfg.model.attn_resolutions = (16,)               # 48 channels: 1 head of 48; mid 96: 3 heads of 32
    with pytest.raises(DiffuseError, match="head sizes differ .*one attention_head_dim"):
        ex.unet_config(cfg)


def test_patches_and_a_shifted_schedule_are_refused_by_name():
    cfg = tiny_preset("digits")
    cfg.model.patch_size = 2
    with pytest.raises(DiffuseError, match=r"sees the image as 2x2 patches \(--patch-size\), which UNet2DModel"):
        ex.unet_config(cfg)
    cfg = tiny_preset("digits")
    cfg.diffusion.snr_shift = 0.25
    with pytest.raises(DiffuseError, match=r"SNR is shifted \(--snr-shift 0.25\)"):
        ex.scheduler_config(cfg)


# ----------------------------------------------------------------------------------------------
# Sampling through diffusers' own pipelines

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny unconditional model on the linear schedule (trained_betas) and on the cosine one."""
    torch.set_num_threads(1)                   # module scope: set up before the per-test fixture
    out = {}
    for schedule in ("linear", "cosine"):
        root = tmp_path_factory.mktemp(schedule)
        cfg = tiny_preset("digits")
        cfg.diffusion.schedule = schedule
        cfg.model.attn_resolutions = (8,)
        ckpt = write_checkpoint(root / "ckpt", cfg, trained_net(cfg))
        ex.export_diffusers(ckpt, root / "hf")
        out[schedule] = (ckpt, root / "hf")
    return out


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_diffusers_pipelines_draw_our_samplers_images(exported, schedule, sampler):
    """DDIMPipeline (eta 0) and DDPMPipeline from the exported folder, given our per-image noise
    streams as their generators, give our ddim / ddpm images (10 steps, trailing spacing, x0
    clipped) to within 1e-4 of the [0, 1] pixel range (measured: at most 7e-7; diffusers keeps abar
    in float32, we in float64)."""
    ckpt, folder = exported[schedule]
    n, steps, seed = 4, 10, 5
    loaded = load(ckpt, torch.device("cpu"))
    ours, _ = generate(loaded, n=n, seed=seed, sampler=sampler, steps=steps, clip_x0=True)
    gens = [generator(seed, "image", i) for i in range(n)]
    if sampler == "ddim":
        pipe = DDIMPipeline.from_pretrained(folder)
        theirs = pipe(batch_size=n, generator=gens, num_inference_steps=steps, eta=0.0,
                      use_clipped_model_output=True, output_type="np").images
    else:
        pipe = DDPMPipeline.from_pretrained(folder)
        theirs = pipe(batch_size=n, generator=gens, num_inference_steps=steps, output_type="np").images
    theirs = torch.from_numpy(theirs).permute(0, 3, 1, 2)                        # [n, C, H, W] in [0, 1]
    # the float images, not the uint8 ones, so rounding cannot hide a difference
    from diffuse.rng import ImageNoise
    x, _ = sample_batch(loaded, sampler, sampler_sigmas(sampler, loaded.schedule, steps), ImageNoise(seed, range(n)))
    ours_f = ((x + 1) / 2).clamp(0, 1)
    assert (ours_f - theirs).abs().max() < 1e-4
    assert torch.equal(((ours_f * 255).round()).to(torch.uint8), ours)          # generate = these images
    assert (ours_f - 0.5).abs().lt(0.49).float().mean() > 0.5                  # mostly not clipped to 0/1
    assert ours_f.std() > 0.1


def test_unconditional_snippet_runs(exported, tmp_path, monkeypatch):
    _, folder = exported["linear"]
    code = card_mod.UNCONDITIONAL_SNIPPET.format(folder=folder)
    assert card_mod.UNCONDITIONAL_SNIPPET.format(folder="my-model") in (REPO / "docs" / "export.md").read_text()
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "snippet", "exec"), {})
    from PIL import Image
    img = Image.open(tmp_path / "sample.png")
    assert img.size == (16, 16) and len(set(img.tobytes())) > 10


def test_conditional_snippet_runs_and_draws_our_images(tmp_path):
    cfg = tiny_preset("digits", class_cond=True)
    cfg.model.attn_resolutions = (8,)
    names = [f"c{i}" for i in range(10)]
    ckpt = write_checkpoint(tmp_path / "ckpt", cfg, trained_net(cfg), class_names=names)
    ex.export_diffusers(ckpt, tmp_path / "hf")
    u = json.loads((tmp_path / "hf" / "unet" / "config.json").read_text())
    assert u["num_class_embeds"] == 11 and u["_diffuse"]["class_names"] == names and u["_diffuse"]["null_class"] == 10
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "10 = no class" in card and card_mod.CONDITIONAL_SNIPPET.format(folder=".", label=0, guidance=1.0) in card
    docs = (REPO / "docs" / "export.md").read_text()
    assert card_mod.CONDITIONAL_SNIPPET.format(folder="my-model", label=3, guidance=1.0) in docs

    code = card_mod.CONDITIONAL_SNIPPET.format(folder=tmp_path / "hf", label=3, guidance=1.5)
    scope: dict = {}
    exec(compile(code, "snippet", "exec"), scope)
    theirs = scope["images"]
    z = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))   # the snippet's noise
    loaded = load(ckpt, torch.device("cpu"))
    x, _ = sample_batch(loaded, "ddim", sampler_sigmas("ddim", loaded.schedule, 50), FixedNoise(z),
                        labels=torch.full((8,), 3), guidance=1.5)
    ours = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert (ours.int() - theirs.int()).abs().max() <= 1                        # at most one grey level
    assert (ours == theirs).float().mean() > 0.99


# ----------------------------------------------------------------------------------------------
# Import

def test_round_trip_export_import_is_bit_identical(exported, tmp_path):
    for schedule, (ckpt, folder) in exported.items():
        r = ex.import_diffusers(folder, tmp_path / schedule)
        assert r["own_export"]
        src, dst = ckpt_io.read_tensors(ckpt / "ema.safetensors"), ckpt_io.read_tensors(tmp_path / schedule / "ema.safetensors")
        assert src.keys() == dst.keys() and all(torch.equal(src[k], dst[k]) for k in src)
        a = json.loads((ckpt / "config.json").read_text())
        b = json.loads((tmp_path / schedule / "config.json").read_text())
        assert a["config"] == b["config"] and b["step"] == a["step"]
        assert ex.unet_config(Config.from_dict(b["config"])) == {k: v for k, v in json.loads(
            (folder / "unet" / "config.json").read_text()).items() if k != "_diffuse"}


def test_import_folder_saved_by_diffusers_google_ddpm_cifar10_config(tmp_path):
    """A random UNet2DModel of google/ddpm-cifar10-32's config, saved by diffusers itself: sin-first
    embedding with freq_shift 1, bottom/right downsample padding, norm_eps 1e-6, one head."""
    torch.manual_seed(0)
    unet = UNet2DModel(**GOOGLE_UNET).eval()
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**GOOGLE_SCHEDULER)).save_pretrained(tmp_path / "hf")
    r = ex.import_diffusers(tmp_path / "hf", tmp_path / "imp", data="cifar10")
    m = r["config"].model
    assert (m.norm_eps, m.time_freq_shift, m.time_sin_first, m.downsample_padding) == (1e-6, 1, True, 0)
    assert (m.base_channels, m.channel_mult, m.attn_resolutions, m.scale_shift) == (128, (1, 2, 2, 2), (16,), False)
    loaded = load(tmp_path / "imp", torch.device("cpu"))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([10.0, 600.0])
    with torch.no_grad():
        ours, ref = loaded.net(x, t), unet(x, t).sample
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-5 * float(ref.abs().max()))
    images, rec = generate(loaded, n=2, seed=0, sampler="ddim", steps=2)
    assert images.shape == (2, 3, 32, 32) and images.float().std() > 1


def test_fine_tune_from_an_imported_diffusers_model(tmp_path):
    """train --config OUT/model_config.json --init-from OUT on the digits data, from a tiny
    diffusers-made model with the original DDPM's variants (sin first, shift 1, padding 0)."""
    torch.manual_seed(0)
    tiny = {**GOOGLE_UNET, "block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
            "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "in_channels": 1,
            "out_channels": 1, "sample_size": 16, "layers_per_block": 1}
    DDPMPipeline(unet=UNet2DModel(**tiny), scheduler=DDPMScheduler(**GOOGLE_SCHEDULER)).save_pretrained(tmp_path / "hf")
    ex.import_diffusers(tmp_path / "hf", tmp_path / "imp")
    from diffuse.train import train
    overrides = json.loads((tmp_path / "imp" / "model_config.json").read_text())
    cfg = resolve("digits", None, overrides, {"train": {"steps": 1, "batch_size": 4, "lr": 1e-12, "warmup_steps": 0,
                                                        "sample_n": 2, "sample_steps": 1, "out": str(tmp_path / "ft")}})
    out = train(cfg, init_from=str(tmp_path / "imp"), progress=False)
    src = ckpt_io.read_tensors(tmp_path / "imp" / "ema.safetensors")
    dst = ckpt_io.read_tensors(out / "checkpoints" / "last" / "model.safetensors")
    assert all(torch.allclose(src[k], dst[k], atol=1e-6) for k in src)


def _save_folder(root: Path, unet: dict, sched: dict) -> Path:
    torch.manual_seed(0)
    DDPMPipeline(unet=UNet2DModel(**unet), scheduler=DDPMScheduler(**sched)).save_pretrained(root)
    return root


@pytest.mark.parametrize("edit, needle", [
    (lambda u, s: u.update(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"]), "CrossAttnDownBlock2D"),
    (lambda u, s: u.update(add_attention=False), "add_attention"),
    (lambda u, s: u.update(up_block_types=["UpBlock2D", "UpBlock2D"]), "attention at other levels"),
    (lambda u, s: u.update(resnet_time_scale_shift="scale_shift"), "mid-block attention without GroupNorm"),
    (lambda u, s: u.update(num_class_embeds=10), r"null \(no-class\) label"),
    (lambda u, s: u.update(out_channels=2), "learned variance|out_channels"),
    (lambda u, s: s.update(beta_schedule="scaled_linear"), "beta_schedule"),
    (lambda u, s: s.update(prediction_type="flow"), "prediction_type"),
    (lambda u, s: s.update(trained_betas=[0.5] * 1000), "trained_betas"),
    (lambda u, s: s.update(rescale_betas_zero_snr=True), "zero-terminal-snr needs --objective v"),
])
def test_import_refuses_what_diffuse_cannot_express(tmp_path, edit, needle):
    unet = {**GOOGLE_UNET, "block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
            "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "sample_size": 8}
    sched = dict(GOOGLE_SCHEDULER)
    folder = _save_folder(tmp_path / "hf", unet, sched)
    u = json.loads((folder / "unet" / "config.json").read_text())
    s = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    edit(u, s)
    (folder / "unet" / "config.json").write_text(json.dumps(u))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(s))
    with pytest.raises(DiffuseError, match=needle):
        ex.import_diffusers(folder, tmp_path / "imp")
    assert not (tmp_path / "imp").exists()


@pytest.mark.parametrize("prediction_type, objective", [("v_prediction", "v"), ("sample", "x0")])
def test_import_takes_v_and_x0_prediction_as_the_objective(tmp_path, prediction_type, objective):
    """diffusers' prediction_type becomes diffuse's --objective (objectives.py), and it samples."""
    unet = {**GOOGLE_UNET, "block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
            "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "sample_size": 8}
    folder = _save_folder(tmp_path / "hf", unet, {**GOOGLE_SCHEDULER, "prediction_type": prediction_type})
    ex.import_diffusers(folder, tmp_path / "imp")
    loaded = load(tmp_path / "imp", torch.device("cpu"))
    assert loaded.config.diffusion.prediction == objective
    images, _ = generate(loaded, n=2, seed=0, sampler="ddim", steps=3, batch_size=2, device=torch.device("cpu"))
    assert images.shape == (2, 3, 8, 8) and images.dtype == torch.uint8


# ----------------------------------------------------------------------------------------------
# The slim file, the card, the CLI

def test_slim_file_samples_identically_to_the_run(exported, tmp_path):
    ckpt, _ = exported["cosine"]
    run = load(ckpt, torch.device("cpu"))
    for precision, amp in (("fp32", None), ("bf16", torch.bfloat16)):
        path = tmp_path / f"slim-{precision}.safetensors"
        assert ex.export_safetensors(ckpt, path, precision=precision)["precision"] == precision
        slim = load(path, torch.device("cpu"))
        assert slim.config.to_dict() == run.config.to_dict() and slim.header["step"] == run.header["step"]
        a, _ = generate(run, n=3, seed=1, sampler="dpmpp-2m", steps=4, amp=amp)
        b, _ = generate(slim, n=3, seed=1, sampler="dpmpp-2m", steps=4, amp=amp)
        assert torch.equal(a, b), precision
    fp32, bf16 = (tmp_path / "slim-fp32.safetensors").stat().st_size, (tmp_path / "slim-bf16.safetensors").stat().st_size
    assert bf16 < 0.6 * fp32


def test_model_card_reports_the_run(tmp_path):
    from diffuse.train import train
    from tests.conftest import tiny_config
    run = train(tiny_config(tmp_path / "run", steps=2, fid_every=None), progress=False)
    with open(run / "metrics.jsonl", "a") as f:                 # as --fid-every would have logged it
        f.write(json.dumps({"step": 2, "fid": 123.4, "kid": 0.1, "kid_std": 0.01, "fid_n": 500, "fid_ref_n": 1000}) + "\n")
    ex.export_diffusers(run, tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: diffusers" in front and "license: mit" in front and "- diffuse" in front
    loss = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "loss" in l][-1]["loss"]
    assert f"| final loss | {loss:.4f}" in card
    assert "| images seen | 16 (batch 8) |" in card and "| training steps | 2 |" in card
    assert "| FID | 123.40 at N = 500 generated images vs N_ref = 1,000" in card
    assert re.search(r"\| hardware \| cpu", card) and "| preset | digits |" in card
    assert (tmp_path / "hf" / "samples.png").read_bytes() == (run / "final.png").read_bytes()


def test_exported_folder_carries_no_local_path(tmp_path):
    """The folder is meant to be published as is: the run directory, the data root and where a
    folder data set lived stay on the machine (only the data folder's own name goes out)."""
    cfg = tiny_preset("digits")
    cfg.train.out = str(tmp_path / "private-7f3a" / "runs" / "mine")
    cfg.data.root = "/home/private-7f3a/datasets"
    cfg.data.name = "/home/private-7f3a/pictures/handwriting"
    ckpt = write_checkpoint(tmp_path / "ckpt", cfg, random_net(cfg))
    ex.export_diffusers(ckpt, tmp_path / "hf")
    texts = {p.relative_to(tmp_path / "hf").as_posix(): p.read_text()
             for p in (tmp_path / "hf").rglob("*") if p.suffix in (".json", ".md")}
    assert {"README.md", "model_index.json", "unet/config.json", "scheduler/scheduler_config.json"} <= set(texts)
    assert [name for name, text in texts.items() if "private-7f3a" in text] == []
    stored = json.loads(texts["unet/config.json"])["_diffuse"]["config"]
    assert stored["train"]["out"] is None and stored["data"]["root"] is None
    assert stored["data"]["name"] == "handwriting" and "# handwriting diffusion model" in texts["README.md"]


def test_model_card_takes_fid_and_class_accuracy_from_eval_json(tmp_path):
    cfg = tiny_preset("mnist", class_cond=True)
    cfg.data.name = "mnist"
    evaluation = {"fid": 12.345, "n": 10000, "n_ref": 60000, "sampler": "dpmpp-2m", "steps": 20, "step": 7,
                  "classifier_accuracy": {"judge": {"data": "mnist", "test_accuracy": 0.991},
                                          "sweep": [{"guidance": 0.0, "accuracy": 0.9, "n": 100},
                                                    {"guidance": 2.0, "accuracy": 0.985, "n": 100}]}}
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    net = random_net(cfg)
    facts = ex.card_facts(tmp_path, {"step": 7}, cfg, net.state_dict(), ex._read_eval(tmp_path / "eval.json"))
    card = ex.model_card(facts, cfg, {"class_names": [str(i) for i in range(10)]})
    assert "| FID | 12.35 at N = 10,000 generated images vs N_ref = 60,000 (dpmpp-2m 20 steps" in card
    assert "w=0: 90.0%, w=2: 98.5% (judged by a CNN with 99.1% on real test images; best w=2)" in card
    assert "- ylecun/mnist" in card and "class-conditional-image-generation" in card
    assert "0 = 0, 1 = 1" in card and "10 = no class" in card
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DiffuseError, match="expected the output of `diffuse eval --json`"):
        ex._read_eval(tmp_path / "bad.json")


def _cli(capsys, *args) -> tuple[int, str, str]:
    """``diffuse ARGS`` in this process (the same main() the console script runs): rc, stdout, stderr."""
    from diffuse.cli import main
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:                     # argparse usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_export_import_and_bad_input(exported, tmp_path, capsys):
    ckpt, folder = exported["cosine"]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    for args, needle in (((ckpt, tmp_path / "busy"), "not empty; choose another OUTDIR or pass --overwrite"),
                         ((ckpt, tmp_path / "busy", "--overwrite"), "does not look like an earlier output"),
                         ((ckpt, tmp_path / "x", "--format", "zip"), "invalid choice: 'zip'"),
                         ((ckpt, tmp_path / "x.safetensors", "--format", "diffusers"), "names a .safetensors file"),
                         ((ckpt, tmp_path / "x", "--precision", "bf16"), "--precision applies to --format safetensors")):
        rc, _, err = _cli(capsys, "export", *args)
        assert rc != 0 and needle in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x" and not (tmp_path / "x").exists()
    rc, _, err = _cli(capsys, "import", ckpt, tmp_path / "imp")
    assert rc == 1 and "is not a diffusers UNet2DModel + DDPMScheduler folder: unet/config.json is missing" in err
    rc, out, err = _cli(capsys, "export", ckpt, tmp_path / "m.safetensors")
    assert rc == 0 and "wrote" in out, err
    rc, out, err = _cli(capsys, "sample", tmp_path / "m.safetensors", "--n", "2", "--steps", "2", "--out",
                        tmp_path / "s.png", "--no-progress")
    assert rc == 0 and "wrote 2 images" in out, err
    rc, out, err = _cli(capsys, "visualize", "trajectory", tmp_path / "m.safetensors", "--out", tmp_path / "v",
                        "--n", "1", "--steps", "2")
    assert rc == 0 and (tmp_path / "v" / "trajectory.png").is_file(), err
    rc, _, err = _cli(capsys, "sample", folder, "--n", "1")
    assert rc == 1 and "is a diffusers folder; convert it first with `diffuse import" in err
    rc, out, err = _cli(capsys, "import", folder, tmp_path / "imp")
    assert rc == 0 and "restored from the export" in out, err
    rc, out, err = _cli(capsys, "info", tmp_path / "imp")
    assert rc == 0 and "parameters" in out, err
    rc, out, err = _cli(capsys, "export", ckpt, folder, "--overwrite")       # an earlier export may be replaced
    assert rc == 0, err


def test_export_refuses_the_other_formats_options_before_reading_the_run(tmp_path):
    """export() (what `diffuse export` calls) picks the format by OUT and refuses, in one line and
    before the run is read (here there is none), what only the other format takes."""
    from diffuse.export import export
    missing = tmp_path / "no-run"
    with pytest.raises(DiffuseError, match="--eval and --license describe a diffusers folder"):
        export(missing, tmp_path / "m.safetensors", license="apache-2.0")
    with pytest.raises(DiffuseError, match="names a .safetensors file"):
        export(missing, tmp_path / "m.safetensors", format="diffusers")
    with pytest.raises(DiffuseError, match="--precision applies to --format safetensors"):
        export(missing, tmp_path / "folder", precision="bf16")
