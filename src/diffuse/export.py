"""Share a model: diffusers folders out and in, and the slim weights file.

Three conversions, none of which imports diffusers (its folders are JSON + safetensors):

- ``export_diffusers``: a run's EMA weights as a ``UNet2DModel`` + ``DDPMScheduler`` folder that
  ``DDPMPipeline`` / ``DDIMPipeline.from_pretrained`` load, with a model card (README.md) and a grid.
- ``export_safetensors``: one slim file (EMA weights, config in the metadata) that every command
  taking a run accepts (``generate.load``).
- ``import_diffusers``: the reverse, into a diffuse checkpoint directory.

How our UNet (models.UNet) is a UNet2DModel, checked numerically in tests/test_export.py:

    ours                                  UNet2DModel
    timestep_embedding [cos, sin]         Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)
    time_mlp.0 / .2                       time_embedding.linear_1 / linear_2
    class_emb (K + 1 rows, null last)     class_embedding, num_class_embeds = K + 1
    down.i.blocks.j (ResBlock)            down_blocks.i.resnets.j (emb_proj -> time_emb_proj, skip -> conv_shortcut)
    down.i.attns.j (AttnBlock)            down_blocks.i.attentions.j (AttnDownBlock2D at levels with attention):
                                          norm -> group_norm; qkv [3C, C, 1, 1] -> to_q, to_k, to_v [C, C]
                                          (q, k, v are consecutive thirds, heads contiguous within each);
                                          proj -> to_out.0
    downsample.i.conv                     down_blocks.i.downsamplers.0.conv (downsample_padding 1)
    mid1, mid_attn, mid2                  mid_block.resnets.0, attentions.0, resnets.1 (attn_norm_num_groups
                                          set: diffusers drops this GroupNorm in scale_shift mode otherwise)
    up.i.blocks.j / attns.j, upsample.i   up_blocks.i.resnets.j / attentions.j, upsamplers.0.conv
    norm_out, conv_out                    conv_norm_out, conv_out
    scale_shift True / False              resnet_time_scale_shift "scale_shift" / "default"
    GroupNorm eps (norm_eps)              norm_eps (1e-5 for every diffuse preset)

What UNet2DModel cannot express, refused by name: one attention head size per model (our
``head_channels`` gives every attention block max(1, C // head_channels) heads, so levels of
different widths may get different head sizes); a mid block without attention (diffusers'
``add_attention=False``; ours always has it); attention at a level on the way down but not up.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file

from . import __version__
from . import checkpoint as ckpt_io
from .config import Config, ModelConfig
from .diffusion import Schedule
from .errors import DiffuseError
from .fsutil import atomic_write, exchange, fsync_dir
from .objectives import default_sampling
from .outputs import check_dir, check_file

DIFFUSERS_VERSION = "0.30.0"      # written as _diffusers_version: the oldest diffusers these folders target
EXPORT_FORMAT = "diffuse-export"
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SUPPORTED_PREDICTIONS = ("eps",)   # what DiffusionConfig.prediction can be today
HUB_DATASETS = {"mnist": "ylecun/mnist", "fashion-mnist": "zalando-datasets/fashion_mnist",
                "cifar10": "uoft-cs/cifar10"}
UNET_FILE = "diffusion_pytorch_model.safetensors"


# ----------------------------------------------------------------------------------------------
# Configs

def _level_has_attention(m: ModelConfig) -> list[bool]:
    return [m.image_size // 2 ** i in m.attn_resolutions for i in range(len(m.channel_mult))]


def attention_head_dim(m: ModelConfig) -> int | None:
    """UNet2DModel's one ``attention_head_dim`` for our attention blocks, or a DiffuseError.

    Ours: heads = max(1, C // head_channels), head size C / heads, per block. UNet2DModel: heads =
    C // d for one d (or d = None: one head per block, of size C). So the export needs every
    attention block (the levels with attention and the mid block) to share a head size, or all to
    have one head."""
    chans = sorted({m.base_channels * k for k, a in zip(m.channel_mult, _level_has_attention(m)) if a}
                   | {m.base_channels * m.channel_mult[-1]})
    heads = {c: max(1, c // m.head_channels) for c in chans}
    for c, h in heads.items():
        if c % h:
            raise DiffuseError(f"cannot export: attention at {c} channels has {h} heads, which do not divide it")
    sizes = {c // h for c, h in heads.items()}
    if len(sizes) == 1:
        return sizes.pop()
    if all(h == 1 for h in heads.values()):
        return None
    detail = ", ".join(f"{c} channels: {h} x {c // h}" for c, h in heads.items())
    raise DiffuseError(f"cannot export the attention blocks as UNet2DModel: their head sizes differ ({detail}; "
                       f"head_channels {m.head_channels}) and UNet2DModel has one attention_head_dim")


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def unet_config(cfg: Config) -> dict[str, Any]:
    """UNet2DModel's config.json for our model config (without the ``_diffuse`` record)."""
    m = cfg.model
    attn = _level_has_attention(m)
    n = len(m.channel_mult)
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": m.image_size,
        "in_channels": m.in_channels,
        "out_channels": m.in_channels,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "freq_shift": _number(m.time_freq_shift),
        "flip_sin_to_cos": not m.time_sin_first,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if attn[i] else "UpBlock2D" for i in reversed(range(n))],
        "block_out_channels": [m.base_channels * k for k in m.channel_mult],
        "layers_per_block": m.num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": m.downsample_padding,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": m.dropout,
        "act_fn": "silu",
        "attention_head_dim": attention_head_dim(m),
        "norm_num_groups": m.num_groups,
        "attn_norm_num_groups": m.num_groups,
        "norm_eps": m.norm_eps,
        "resnet_time_scale_shift": "scale_shift" if m.scale_shift else "default",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": m.num_classes + 1 if m.class_cond else None,
    }


def diffusers_betas(name: str, timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """The float32 betas diffusers' DDPMScheduler computes for a named schedule (its formulas,
    repeated so that export needs no diffusers): linear is a float32 linspace, squaredcos_cap_v2
    Python-float64 betas_for_alpha_bar cast to float32."""
    if name == "linear":
        return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float32)
    if name == "squaredcos_cap_v2":
        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - abar((i + 1) / timesteps) / abar(i / timesteps), 0.999)
                             for i in range(timesteps)], dtype=torch.float32)
    raise ValueError(name)


def _training_schedule(d, schedule: str | None = None, start: float | None = None, end: float | None = None,
                       zero_snr: bool | None = None) -> Schedule:
    """The run's discrete VP schedule (with zero terminal SNR where the run uses it)."""
    zero = getattr(d, "zero_terminal_snr", False) if zero_snr is None else zero_snr
    kw = {"zero_terminal_snr": True} if zero else {}
    return Schedule(schedule or d.schedule, d.timesteps, d.beta_start if start is None else start,
                    d.beta_end if end is None else end, **kw)


def _prediction_type(d) -> str:
    formulation = getattr(d, "formulation", "vp")
    if formulation != "vp":
        raise DiffuseError(f"cannot export: the {formulation} formulation (preconditioning of a continuous sigma) "
                           "has no DDPMScheduler equivalent; vp runs export")
    pred = d.prediction or "eps"
    if pred not in PREDICTION_TYPES:
        raise DiffuseError(f"cannot export: objective {pred!r} has no diffusers prediction_type")
    return PREDICTION_TYPES[pred]


def scheduler_config(cfg: Config) -> dict[str, Any]:
    """DDPMScheduler's config: betas equal to float32(ours) exactly, by name where diffusers' own
    formula gives exactly those (our cosine does), else as ``trained_betas`` (our float64 linear
    linspace differs from diffusers' float32 one in about a third of the entries, by 1 ulp; a
    zero-terminal-SNR schedule is written rescaled, ending at beta = 1)."""
    d = cfg.diffusion
    prediction = _prediction_type(d)
    ours = _training_schedule(d).betas.float()
    name = {"linear": "linear", "cosine": "squaredcos_cap_v2"}[d.schedule]
    exact = torch.equal(diffusers_betas(name, d.timesteps, d.beta_start, d.beta_end), ours)
    return {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": d.timesteps,
        "beta_start": d.beta_start,
        "beta_end": d.beta_end,
        "beta_schedule": name,
        "trained_betas": None if exact else [float(b) for b in ours],
        "variance_type": "fixed_small",          # our DDPM sampler's posterior variance beta~_t
        "clip_sample": True,                      # as `diffuse sample` (--clip, on by default)
        "clip_sample_range": 1.0,
        "prediction_type": prediction,
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "timestep_spacing": "trailing",           # our ddpm/ddim default spacing
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,          # already in trained_betas when the run uses it
    }


# ----------------------------------------------------------------------------------------------
# Parameter names

_RULES = [  # (our prefix pattern, diffusers prefix), applied to whole dotted prefixes
    (r"time_mlp\.0\.", "time_embedding.linear_1."),
    (r"time_mlp\.2\.", "time_embedding.linear_2."),
    (r"class_emb\.", "class_embedding."),
    (r"down\.(\d+)\.blocks\.(\d+)\.", r"down_blocks.\1.resnets.\2."),
    (r"down\.(\d+)\.attns\.(\d+)\.", r"down_blocks.\1.attentions.\2."),
    (r"downsample\.(\d+)\.conv\.", r"down_blocks.\1.downsamplers.0.conv."),
    (r"mid1\.", "mid_block.resnets.0."),
    (r"mid_attn\.", "mid_block.attentions.0."),
    (r"mid2\.", "mid_block.resnets.1."),
    (r"up\.(\d+)\.blocks\.(\d+)\.", r"up_blocks.\1.resnets.\2."),
    (r"up\.(\d+)\.attns\.(\d+)\.", r"up_blocks.\1.attentions.\2."),
    (r"upsample\.(\d+)\.conv\.", r"up_blocks.\1.upsamplers.0.conv."),
    (r"norm_out\.", "conv_norm_out."),
    (r"conv_in\.", "conv_in."),
    (r"conv_out\.", "conv_out."),
]
_RESNET_LEAF = {"emb_proj": "time_emb_proj", "skip": "conv_shortcut"}
# diffusers < 0.15 (and folders converted from them) named the attention weights differently
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def to_diffusers(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> UNet2DModel's. Pure renames and reshapes, so values are bit-identical."""
    out: dict[str, torch.Tensor] = {}
    for key, w in weights.items():
        for pat, rep in _RULES:
            m = re.match(pat, key)
            if m:
                prefix, leaf = m.expand(rep), key[m.end():]
                break
        else:
            raise DiffuseError(f"cannot export parameter {key!r}: no UNet2DModel counterpart")
        if ".attentions." in prefix:
            kind, param = leaf.split(".")
            if kind == "norm":
                out[f"{prefix}group_norm.{param}"] = w
            elif kind == "qkv":                                  # [3C, C, 1, 1] or [3C] -> 3 x [C, C] / [C]
                parts = w.reshape(3, w.shape[0] // 3, *w.shape[1:2])
                for name, part in zip(("to_q", "to_k", "to_v"), parts):
                    out[f"{prefix}{name}.{param}"] = part.clone()
            elif kind == "proj":                                 # [C, C, 1, 1] -> [C, C]
                out[f"{prefix}to_out.0.{param}"] = w.reshape(w.shape[0], *w.shape[1:2]).clone()
            else:
                raise DiffuseError(f"cannot export parameter {key!r}")
        else:
            head, _, param = leaf.rpartition(".")
            out[prefix + ".".join(filter(None, (_RESNET_LEAF.get(head, head), param)))] = w
    return out


def from_diffusers(weights: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """UNet2DModel's state dict -> ours (the inverse of ``to_diffusers``), checked against ``model``'s
    parameter names and shapes; a one-line DiffuseError names the first mismatch."""
    ours = {k: v.shape for k, v in model.state_dict().items()}
    theirs: dict[str, str] = {}
    for key in ours:
        theirs_key = _their_names(key)
        for t in theirs_key:
            theirs[t] = key
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, w in weights.items():
        for old, new in _OLD_ATTENTION.items():
            key = re.sub(rf"\.attentions\.(\d+)\.{old}\.", rf".attentions.\1.{new}.", key)
        if key not in theirs:
            raise DiffuseError(f"UNet2DModel parameter {key!r} has no counterpart in the diffuse model")
        target = theirs[key]
        if target.endswith((".qkv.weight", ".qkv.bias")):
            pending.setdefault(target, {})[key.split(".")[-2]] = w
            continue
        if target.endswith(".proj.weight"):
            w = w.reshape(*w.shape, 1, 1)
        out[target] = w
    for target, parts in pending.items():
        if set(parts) != {"to_q", "to_k", "to_v"}:
            raise DiffuseError(f"attention {target.rsplit('.', 2)[0]}: missing one of to_q, to_k, to_v")
        qkv = torch.cat([parts["to_q"], parts["to_k"], parts["to_v"]])
        out[target] = qkv.reshape(*qkv.shape, 1, 1) if target.endswith("weight") else qkv
    missing = [k for k in ours if k not in out]
    if missing:
        raise DiffuseError(f"the UNet2DModel weights lack {_their_names(missing[0])[0]!r} "
                           f"({len(missing)} parameter(s) missing)")
    for k, shape in ours.items():
        if tuple(out[k].shape) != tuple(shape):
            raise DiffuseError(f"UNet2DModel parameter for {k} is {tuple(out[k].shape)}, expected {tuple(shape)}")
    return out


def _their_names(key: str) -> list[str]:
    """The UNet2DModel name(s) of one of our parameters (three for a fused qkv)."""
    probe = torch.zeros(3, 3, 1, 1) if key.endswith("qkv.weight") else torch.zeros(3)
    return list(to_diffusers({key: probe}))


# ----------------------------------------------------------------------------------------------
# Reading the source run

def _load_source(path: str | Path) -> tuple[Path, dict[str, Any], Config, dict[str, torch.Tensor]]:
    src = ckpt_io.resolve(path)
    header = ckpt_io.read_header(src)
    cfg = Config.from_dict(header["config"])
    weights = ckpt_io.read_tensors(src / "ema.safetensors" if src.is_dir() else src)
    weights = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    return src, header, cfg, weights


def _run_dir(src: Path) -> Path | None:
    """The run directory a checkpoint directory belongs to (OUT/checkpoints/step_N), if any."""
    if src.is_dir() and src.parent.name == "checkpoints" and (src.parent.parent / "config.json").is_file():
        return src.parent.parent
    return None


def _prepare_out(out: Path, overwrite: bool, marker: str) -> Path:
    """A fresh temporary sibling of ``out`` to write into; ``_finish`` moves it into place.
    A non-empty ``out`` is refused unless --overwrite, and even then only if it holds ``marker``
    (a previous export/import), so no unrelated folder is ever deleted."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise DiffuseError(f"{out} already exists and is not empty; choose another OUTDIR or pass --overwrite")
        if not (out / marker).is_file():
            raise DiffuseError(f"refusing to --overwrite {out}: it does not look like an earlier output (no {marker})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _finish(tmp: Path, out: Path) -> None:
    """Put the finished folder at ``out``. Replacing an earlier output swaps the two in one step
    (fsutil.exchange), so ``out`` never names nothing; where the file system cannot exchange, the
    old folder is parked beside it first (recoverable by hand if the process dies between renames)."""
    if out.exists():
        if exchange(tmp, out):                  # out <-> tmp: tmp now holds the old folder
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            trash = out.parent / f".old-{out.name}-{os.getpid()}"
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, out)
    fsync_dir(out.parent)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# Export

def export_diffusers(source: str | Path, out: str | Path, *, overwrite: bool = False,
                     eval_json: str | Path | None = None, license: str = "mit",
                     grid_device: torch.device | None = None) -> dict[str, Any]:
    """Write ``out``: model_index.json, unet/, scheduler/, README.md (model card), samples.png.
    Returns a summary {out, params, scheduler, card}."""
    out = check_dir(out, "OUTDIR")
    src, header, cfg, weights = _load_source(source)
    unet_cfg = unet_config(cfg)                  # refusals happen here, before anything is written
    sched_cfg = scheduler_config(cfg)
    evaluation = _read_eval(eval_json) if eval_json else None
    mapped = to_diffusers(weights)
    unet_cfg["_diffuse"] = {"format": EXPORT_FORMAT, "version": 1, "diffuse_version": __version__,
                            "step": header.get("step"), "class_names": header.get("class_names"),
                            "null_class": cfg.model.num_classes if cfg.model.class_cond else None,
                            "config": cfg.to_dict()}
    tmp = _prepare_out(out, overwrite, "model_index.json")
    try:
        _write_json(tmp / "model_index.json", {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                                              "scheduler": ["diffusers", "DDPMScheduler"],
                                              "unet": ["diffusers", "UNet2DModel"]})
        (tmp / "unet").mkdir()
        (tmp / "scheduler").mkdir()
        _write_json(tmp / "unet" / "config.json", unet_cfg)
        save_file({k: v.contiguous() for k, v in mapped.items()}, str(tmp / "unet" / UNET_FILE), metadata={"format": "pt"})
        _write_json(tmp / "scheduler" / "scheduler_config.json", sched_cfg)
        grid_from = _copy_grid(src, cfg, header, tmp / "samples.png", grid_device)
        facts = card_facts(src, header, cfg, weights, evaluation)
        facts["grid_from"] = grid_from
        (tmp / "README.md").write_text(model_card(facts, cfg, header, license=license))
        _finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "params": facts["params"],
            "betas": "trained_betas" if sched_cfg["trained_betas"] else sched_cfg["beta_schedule"]}


def _copy_grid(src: Path, cfg: Config, header: dict[str, Any], dest: Path, device: torch.device | None) -> str:
    """The run's own grid of the exported step if there is one, else 16 fresh EMA samples
    (`diffuse sample`'s default sampler and steps for the run's formulation)."""
    run, step = _run_dir(src), header.get("step")
    if run is not None and step is not None and (run / "samples" / f"step_{step:07d}.png").is_file():
        shutil.copyfile(run / "samples" / f"step_{step:07d}.png", dest)
        return f"the run's grid at step {step:,} (DDIM, {cfg.train.sample_steps} steps)"
    from .generate import cycle_labels, generate, load
    from .images import save_grid
    loaded = load(src, device or torch.device("cpu"))
    labels = cycle_labels(range(cfg.model.num_classes), 16) if cfg.model.class_cond else None
    sampler, steps = default_sampling(cfg.diffusion)
    images, _ = generate(loaded, n=16, seed=0, sampler=sampler, steps=steps, labels=labels,
                         guidance=cfg.train.sample_guidance if labels is not None else 0.0)
    save_grid(images, dest, nrow=4)
    return (f"16 images drawn at export ({sampler}, {steps} steps, seed 0"
            + (", classes cycled" if labels is not None else "") + ")")


def _read_eval(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DiffuseError(f"--eval {p}: not a readable JSON file from `diffuse eval --json` ({e})") from None
    if not isinstance(d, dict) or not ({"fid", "sweep", "classifier_accuracy"} & set(d)):
        raise DiffuseError(f"--eval {p}: expected the output of `diffuse eval --json` (no fid or accuracy in it)")
    return d


def card_facts(src: Path, header: dict[str, Any], cfg: Config, weights: dict[str, torch.Tensor],
               evaluation: dict[str, Any] | None) -> dict[str, Any]:
    """Numbers for the model card, each from what the run recorded (None where it did not)."""
    from .train import read_metrics

    facts: dict[str, Any] = {"params": sum(v.numel() for v in weights.values()), "step": header.get("step"),
                             "images_seen": None, "train_seconds": None, "hardware": None, "final_loss": None,
                             "fid": None, "accuracy": None}
    if src.is_dir() and (src / "state.json").is_file():
        try:
            state = json.loads((src / "state.json").read_text())
            facts["images_seen"] = state.get("images_seen")
            facts["train_seconds"] = state.get("train_seconds")
        except json.JSONDecodeError:
            pass
    if facts["images_seen"] is None and facts["step"] is not None:
        facts["images_seen"] = facts["step"] * cfg.train.batch_size
    run = _run_dir(src)
    if run is not None:
        rows = [r for r in read_metrics(run / "metrics.jsonl") if facts["step"] is None or r.get("step", 0) <= facts["step"]]
        losses = [r for r in rows if "loss" in r]
        if losses:
            facts["final_loss"] = {"loss": losses[-1]["loss"], "step": losses[-1]["step"]}
        fids = [r for r in rows if "fid" in r]
        if fids:
            best = min(fids, key=lambda r: r["fid"])
            facts["fid"] = {"fid": best["fid"], "n": best.get("fid_n"), "n_ref": best.get("fid_ref_n"),
                            "step": best["step"], "how": f"{cfg.train.fid_sampler} {cfg.train.fid_steps} steps, "
                                                         "measured during training (best of the run)"}
        log = run / "train.log"
        if log.is_file():
            for line in log.read_text().splitlines():
                if line.startswith("diffuse train |"):
                    parts = [p.strip() for p in line.split("|")]
                    hw = [p for p in parts if p.split(" ")[0] in ("cpu", "cuda", "mps")]
                    facts["hardware"] = hw[0] if hw else None
    if evaluation:
        if "fid" in evaluation:
            facts["fid"] = {"fid": evaluation["fid"], "n": evaluation.get("n"), "n_ref": evaluation.get("n_ref"),
                            "step": evaluation.get("step"),
                            "how": f"{evaluation.get('sampler')} {evaluation.get('steps')} steps, `diffuse eval`"}
        acc = evaluation.get("classifier_accuracy", evaluation if "sweep" in evaluation else None)
        if acc and acc.get("sweep"):
            facts["accuracy"] = acc
    return facts


CONDITIONAL_SNIPPET = '''\
import torch
from diffusers import DDIMScheduler, UNet2DModel

folder = "{folder}"
unet = UNet2DModel.from_pretrained(folder, subfolder="unet").eval()
scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
scheduler.set_timesteps(50)
null = unet.config.num_class_embeds - 1  # the last class index means "no class"
labels = torch.tensor([{label}] * 8)  # 8 images of class {label}
w = {guidance}  # guidance weight: eps = (1 + w) eps(x, y) - w eps(x, null); 0 = plain conditional
generator = torch.Generator().manual_seed(0)
size = unet.config.sample_size
x = torch.randn(len(labels), unet.config.in_channels, size, size, generator=generator)
with torch.no_grad():
    for t in scheduler.timesteps:
        y = torch.cat([labels, torch.full_like(labels, null)])
        eps_c, eps_u = unet(torch.cat([x, x]), t, class_labels=y).sample.chunk(2)
        x = scheduler.step((1 + w) * eps_c - w * eps_u, t, x, use_clipped_model_output=True).prev_sample
images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)   # [8, C, H, W]
'''

UNCONDITIONAL_SNIPPET = '''\
import torch
from diffusers import DDIMPipeline

pipe = DDIMPipeline.from_pretrained("{folder}")
images = pipe(batch_size=16, num_inference_steps=50, eta=0.0, use_clipped_model_output=True,
              generator=torch.Generator().manual_seed(0)).images  # a list of PIL images
images[0].save("sample.png")
'''


def model_card(facts: dict[str, Any], cfg: Config, header: dict[str, Any], *, license: str = "mit",
               folder: str = ".") -> str:
    """README.md in the Hugging Face Hub's format: YAML front matter, then what the model is and how to load it."""
    m, d, t = cfg.model, cfg.diffusion, cfg.train
    names = header.get("class_names")
    tags = ["pytorch", "diffusers", "diffuse", "ddpm", "unconditional-image-generation"
            if not m.class_cond else "class-conditional-image-generation"]
    front = ["---", "library_name: diffusers", f"license: {license}", "pipeline_tag: unconditional-image-generation",
             "tags:"] + [f"- {x}" for x in tags]
    if cfg.data.name in HUB_DATASETS:
        front += ["datasets:", f"- {HUB_DATASETS[cfg.data.name]}"]
    front.append("---")

    def fmt_s(s: float | None) -> str:
        if s is None:
            return "not recorded"
        return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min"

    rows = [("data set", f"{cfg.data.name} ({m.in_channels}x{m.image_size}x{m.image_size})"),
            ("preset", cfg.preset),
            ("parameters", f"{facts['params']:,}"),
            ("UNet", f"base {m.base_channels}, channel mult {','.join(map(str, m.channel_mult))}, "
                     f"{m.num_res_blocks} res blocks/level, attention at "
                     f"{','.join(map(str, m.attn_resolutions)) or 'the middle only'}, dropout {m.dropout}"),
            ("diffusion", f"{d.schedule} betas, T = {d.timesteps}, predicts {d.prediction or 'eps'}"),
            ("training steps", "not recorded" if facts["step"] is None else f"{facts['step']:,}"),
            ("images seen", "not recorded" if facts["images_seen"] is None else f"{facts['images_seen']:,}"
             f" (batch {t.batch_size})"),
            ("training time", fmt_s(facts["train_seconds"])),
            ("hardware", facts["hardware"] or "not recorded"),
            ("final loss", "not recorded" if not facts["final_loss"] else
             f"{facts['final_loss']['loss']:.4f} (MSE on eps, mean of the last log interval, step "
             f"{facts['final_loss']['step']:,})")]
    f = facts.get("fid")
    rows.append(("FID", "not measured" if not f else
                 f"{f['fid']:.2f} at N = {f['n']:,} generated images" + (f" vs N_ref = {f['n_ref']:,}" if f.get('n_ref') else "")
                 + f" ({f['how']}; FID is biased upward at small N)"))
    acc = facts.get("accuracy")
    if m.class_cond:
        if acc:
            best = max(acc["sweep"], key=lambda r: r["accuracy"])
            rows.append(("class accuracy", ", ".join(f"w={r['guidance']:g}: {r['accuracy'] * 100:.1f}%" for r in acc["sweep"])
                         + f" (judged by a CNN with {acc['judge']['test_accuracy'] * 100:.1f}% on real test images;"
                           f" best w={best['guidance']:g})"))
        else:
            rows.append(("class accuracy", "not measured"))
    table = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]

    body = [f"# {cfg.data.name} diffusion model ({cfg.preset} preset), trained with diffuse", "",
            "A DDPM-family image diffusion model trained from scratch with diffuse "
            "and exported to diffusers' `UNet2DModel` + `DDPMScheduler` (EMA weights, fp32).", "",
            "![samples](samples.png)", "", f"*Samples: {facts.get('grid_from', 'samples.png')}.*", "", *table, ""]
    if m.class_cond and names:
        body += ["Classes (`class_labels`): " + ", ".join(f"{i} = {n}" for i, n in enumerate(names))
                 + f"; {len(names)} = no class (the null label used for classifier-free guidance).", ""]
    body += ["## Use with diffusers", "", "`\".\"` below is this folder; once uploaded, use the Hub repository id "
             "instead (`USER/NAME`).", ""]
    if m.class_cond:
        body += ["`DDPMPipeline` and `DDIMPipeline` pass no class labels, so draw a class with the UNet and "
                 "scheduler directly (classifier-free guidance with weight `w`; diffusers' guidance scale is 1 + w):",
                 "", "```python", CONDITIONAL_SNIPPET.format(folder=folder, label=0, guidance=t.sample_guidance).rstrip(),
                 "```", ""]
    else:
        body += ["```python", UNCONDITIONAL_SNIPPET.format(folder=folder).rstrip(), "```", "",
                 "`use_clipped_model_output=True` with the scheduler's `clip_sample` makes this the DDIM sampler "
                 "diffuse runs (`diffuse sample --sampler ddim --steps 50`); `DDPMPipeline` works as well.", ""]
    body += ["## Use with diffuse", "", "```bash",
             "diffuse import . imported && diffuse sample imported --n 64 --out samples.png", "```", "",
             "## Files", "",
             "- `unet/` — `UNet2DModel` config and weights (`config.json` keeps diffuse's own config under `_diffuse`)",
             "- `scheduler/` — `DDPMScheduler` config: the training noise schedule (`trained_betas` when diffusers' "
             "named schedule would round differently), `clip_sample` and trailing timestep spacing as diffuse samples",
             "- `samples.png` — the sample grid above", ""]
    return "\n".join(front + [""] + body)


def export_safetensors(source: str | Path, out: str | Path, *, precision: str = "fp32",
                       overwrite: bool = False) -> dict[str, Any]:
    """One file: the EMA weights with the checkpoint header (config, class names) as metadata.

    precision bf16 stores the tensors that autocast runs in bf16 (conv and linear weights and
    biases) as bf16 and keeps GroupNorm and embedding tables in fp32, so sampling the file with
    ``--precision bf16`` gives exactly the images the run gives with ``--precision bf16``."""
    if precision not in ("fp32", "bf16"):
        raise DiffuseError(f"--precision must be fp32 or bf16, got {precision!r}")
    out = check_file(out, (".safetensors",), "OUT")
    src, header, cfg, weights = _load_source(source)
    if out.exists() and not overwrite:
        raise DiffuseError(f"{out} already exists; choose another name or pass --overwrite")

    def keep_fp32(name: str) -> bool:
        return name.startswith(("class_emb.", "norm_out.")) or re.search(r"\.norm\d?\.", name) is not None

    tensors = {k: (v if precision == "fp32" or keep_fp32(k) else v.to(torch.bfloat16)).contiguous()
               for k, v in weights.items()}
    full = {**header, "precision": precision, "exported_from": str(src)}
    meta = {"format": ckpt_io.FORMAT, "format_version": str(ckpt_io.FORMAT_VERSION), "config": json.dumps(full)}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, save(tensors, metadata=meta))
    return {"out": str(out), "bytes": out.stat().st_size, "precision": precision,
            "params": sum(v.numel() for v in weights.values())}


# ----------------------------------------------------------------------------------------------
# Import

_UNET_FIXED = {  # option: accepted values (anything else has no diffuse equivalent)
    "center_input_sample": (False,), "time_embedding_type": ("positional",), "mid_block_type": ("UNetMidBlock2D",),
    "mid_block_scale_factor": (1,), "downsample_type": ("conv",), "upsample_type": ("conv",),
    "act_fn": ("silu", "swish"), "add_attention": (True,), "class_embed_type": (None,),
}
_UNET_KNOWN = set(_UNET_FIXED) | {
    "sample_size", "in_channels", "out_channels", "freq_shift", "flip_sin_to_cos", "down_block_types", "up_block_types",
    "block_out_channels", "layers_per_block", "downsample_padding", "dropout", "attention_head_dim", "norm_num_groups",
    "attn_norm_num_groups", "norm_eps", "resnet_time_scale_shift", "num_class_embeds", "time_embedding_dim",
    "num_train_timesteps"}
# Scheduler options that only steer sampling: diffuse's samplers take their own flags instead.
_SAMPLING_ONLY = {"variance_type", "clip_sample", "clip_sample_range", "thresholding", "dynamic_thresholding_ratio",
                  "sample_max_value", "timestep_spacing", "steps_offset", "set_alpha_to_one", "skip_prk_steps"}
_SCHED_KNOWN = _SAMPLING_ONLY | {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                                 "prediction_type", "rescale_betas_zero_snr"}


def _read_json(path: Path, folder: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DiffuseError(f"{folder} is not a diffusers UNet2DModel + DDPMScheduler folder: "
                           f"{path.relative_to(folder)} is missing")
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DiffuseError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise DiffuseError(f"{path} must hold a JSON object")
    return d


def model_config_from_unet(u: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig for a UNet2DModel config, or a one-line DiffuseError naming the option."""
    def bad(option: str, why: str) -> DiffuseError:
        return DiffuseError(f"unet/config.json: {option} = {json.dumps(u.get(option))} {why}")

    if u.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise DiffuseError(f"unet/config.json describes a {u.get('_class_name')}, not a UNet2DModel")
    for k in u:
        if not k.startswith("_") and k not in _UNET_KNOWN:
            raise bad(k, "is an option diffuse does not know")
    for k, allowed in _UNET_FIXED.items():
        if k in u and u[k] not in allowed:
            raise bad(k, f"is not supported (diffuse: {json.dumps(allowed[0])})")
    boc = list(u.get("block_out_channels", (224, 448, 672, 896)))
    down = list(u.get("down_block_types", ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")))
    up = list(u.get("up_block_types", ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")))
    n = len(boc)
    if len(down) != n or len(up) != n:
        raise bad("down_block_types", "and up_block_types must each have one entry per block_out_channels")
    for i, b in enumerate(down):
        if b not in ("DownBlock2D", "AttnDownBlock2D"):
            raise bad("down_block_types", f"has {b}; diffuse has DownBlock2D and AttnDownBlock2D")
    for b in up:
        if b not in ("UpBlock2D", "AttnUpBlock2D"):
            raise bad("up_block_types", f"has {b}; diffuse has UpBlock2D and AttnUpBlock2D")
    attn = [b == "AttnDownBlock2D" for b in down]
    if attn != [b == "AttnUpBlock2D" for b in reversed(up)]:
        raise bad("up_block_types", "put attention at other levels than down_block_types; diffuse's levels have "
                  "attention on both paths or on neither")
    base = boc[0]
    if any(c % base for c in boc):
        raise bad("block_out_channels", "are not multiples of the first entry")
    if u.get("time_embedding_dim") not in (None, 4 * base):
        raise bad("time_embedding_dim", f"is not 4 x block_out_channels[0] = {4 * base}")
    size = u.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise bad("sample_size", "is not square; diffuse models square images")
        size = size[0]
    if not isinstance(size, int) or size < 1:
        raise bad("sample_size", "must be an image size")
    if u.get("out_channels", 3) != u.get("in_channels", 3):
        raise bad("out_channels", f"differs from in_channels ({u.get('in_channels', 3)}): diffuse predicts noise "
                  "of the image's shape (no learned variance)")
    groups = u.get("norm_num_groups", 32)
    shift = u.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise bad("resnet_time_scale_shift", "is not supported (diffuse: default or scale_shift)")
    attn_groups = u.get("attn_norm_num_groups")
    if attn_groups is None and shift == "scale_shift":
        raise bad("attn_norm_num_groups", "with resnet_time_scale_shift scale_shift means a mid-block attention "
                  "without GroupNorm, which diffuse's attention always has")
    if attn_groups not in (None, groups):
        raise bad("attn_norm_num_groups", f"differs from norm_num_groups ({groups})")
    d = u.get("attention_head_dim", 8)
    attn_chans = [c for c, a in zip(boc, attn) if a] + [boc[-1]]
    if d is None:
        head_channels = max(attn_chans)                       # one head everywhere
    else:
        if any(c % d or c < d for c in attn_chans):
            raise bad("attention_head_dim", f"does not divide the attention blocks' channels {sorted(set(attn_chans))}")
        head_channels = d
    classes = u.get("num_class_embeds")
    if classes is not None and ("_diffuse" not in u or u["_diffuse"].get("null_class") != classes - 1):
        raise bad("num_class_embeds", "is set but the folder does not say which class is the null (no-class) label "
                  "diffuse needs for guidance (only diffuse's own exports do)")
    mult = tuple(c // base for c in boc)
    return ModelConfig(
        base_channels=base, channel_mult=mult, num_res_blocks=int(u.get("layers_per_block", 2)),
        attn_resolutions=tuple(size // 2 ** i for i, a in enumerate(attn) if a), dropout=float(u.get("dropout", 0.0)),
        num_groups=groups, head_channels=head_channels, scale_shift=shift == "scale_shift",
        class_cond=classes is not None, image_size=size, in_channels=int(u.get("in_channels", 3)),
        num_classes=classes - 1 if classes is not None else 0, norm_eps=float(u.get("norm_eps", 1e-5)),
        time_freq_shift=float(u.get("freq_shift", 0)), time_sin_first=not u.get("flip_sin_to_cos", True),
        downsample_padding=int(u.get("downsample_padding", 1)))


@dataclasses.dataclass
class DiffusionConfigProbe:
    """The fields ``_training_schedule`` reads, for trying candidate schedules."""
    timesteps: int
    schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    zero_terminal_snr: bool = False


def _float32_decimal(x: float) -> float:
    """The shortest decimal that rounds to float32(x): 1e-4 for the float32 stored as 9.99999974738e-05."""
    import numpy as np
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def diffusion_config_from_scheduler(s: dict[str, Any]) -> dict[str, Any]:
    """Our DiffusionConfig fields for a DDPMScheduler config, or a one-line DiffuseError."""
    def bad(option: str, why: str) -> DiffuseError:
        return DiffuseError(f"scheduler/scheduler_config.json: {option} = {json.dumps(s.get(option))} {why}")

    if s.get("_class_name", "DDPMScheduler") not in ("DDPMScheduler", "DDIMScheduler"):
        raise DiffuseError(f"scheduler/scheduler_config.json describes a {s.get('_class_name')}; diffuse imports "
                           "DDPMScheduler (or DDIMScheduler) folders")
    for k in s:
        if not k.startswith("_") and k not in _SCHED_KNOWN:
            raise bad(k, "is an option diffuse does not know")
    from . import config as config_module
    supported = getattr(config_module, "PREDICTIONS", SUPPORTED_PREDICTIONS)
    has_zero_snr = "zero_terminal_snr" in {f.name for f in dataclasses.fields(config_module.DiffusionConfig)}
    zero = bool(s.get("rescale_betas_zero_snr"))
    if zero and not has_zero_snr:
        raise bad("rescale_betas_zero_snr", "is not supported (diffuse's schedules keep their last beta)")
    if str(s.get("variance_type", "fixed_small")).startswith("learned"):
        raise bad("variance_type", "needs a learned variance, which diffuse's models do not predict")
    pred = {v: k for k, v in PREDICTION_TYPES.items()}.get(s.get("prediction_type", "epsilon"))
    if pred not in supported:
        raise bad("prediction_type", f"is not supported (diffuse: {', '.join(PREDICTION_TYPES[p] for p in supported)})")
    extra = {"zero_terminal_snr": zero} if has_zero_snr else {}
    T = int(s.get("num_train_timesteps", 1000))
    start, end = float(s.get("beta_start", 1e-4)), float(s.get("beta_end", 0.02))
    trained = s.get("trained_betas")
    name = s.get("beta_schedule", "linear")
    if trained is not None:
        given = torch.tensor(trained, dtype=torch.float32)
        if zero:
            raise bad("rescale_betas_zero_snr", "together with trained_betas is not supported")
        cands = [("cosine", start, end), ("linear", start, end),
                 ("linear", _float32_decimal(trained[0]), _float32_decimal(trained[-1]))]
        probe = DiffusionConfigProbe(T)
        for sched, a, b in cands:
            for z in ((False, True) if has_zero_snr else (False,)):
                if len(trained) == T and 0 < a < b < 1 and \
                        torch.equal(_training_schedule(probe, sched, a, b, z).betas.float(), given):
                    return {"schedule": sched, "timesteps": T, "beta_start": a, "beta_end": b, "prediction": pred,
                            **({"zero_terminal_snr": z} if has_zero_snr else {})}
        raise DiffuseError("scheduler/scheduler_config.json: trained_betas match neither a linear nor the cosine "
                           "schedule (diffuse's two)")
    if name == "linear":
        return {"schedule": "linear", "timesteps": T, "beta_start": start, "beta_end": end, "prediction": pred, **extra}
    if name == "squaredcos_cap_v2":
        return {"schedule": "cosine", "timesteps": T, "beta_start": start, "beta_end": end, "prediction": pred, **extra}
    raise bad("beta_schedule", "has no diffuse equivalent (diffuse has linear and squaredcos_cap_v2, i.e. cosine)")


def import_diffusers(folder: str | Path, out: str | Path, *, overwrite: bool = False,
                     data: str | None = None) -> dict[str, Any]:
    """Write a diffuse checkpoint directory (ema.safetensors + config.json, and model_config.json
    for fine-tuning) from a UNet2DModel + DDPMScheduler folder. Returns a summary."""
    from .config import validate, validate_resolution
    from .models import UNet

    folder, out = Path(folder), check_dir(out, "OUTDIR")
    if not folder.is_dir():
        raise DiffuseError(f"{folder} is not a directory (expected a diffusers folder with unet/ and scheduler/)")
    index_path = folder / "model_index.json"
    if index_path.is_file():
        index = _read_json(index_path, folder)
        unet_ref, sched_ref = index.get("unet"), index.get("scheduler")
        if not unet_ref or list(unet_ref)[-1] != "UNet2DModel":
            raise DiffuseError(f"{index_path}: its unet is {unet_ref}, not a UNet2DModel")
        if not sched_ref or list(sched_ref)[-1] not in ("DDPMScheduler", "DDIMScheduler"):
            raise DiffuseError(f"{index_path}: its scheduler is {sched_ref}, not a DDPMScheduler")
    u = _read_json(folder / "unet" / "config.json", folder)
    s = _read_json(folder / "scheduler" / "scheduler_config.json", folder)
    model = model_config_from_unet(u)
    diffusion = diffusion_config_from_scheduler(s)
    wfile = folder / "unet" / UNET_FILE
    if not wfile.is_file():
        others = sorted(p.name for p in (folder / "unet").glob("diffusion_pytorch_model*"))
        raise DiffuseError(f"{wfile} is missing" + (f" (found {', '.join(others)}: diffuse reads only the fp32 "
                                                   f".safetensors file, not pickles)" if others else ""))
    try:
        theirs = load_file(str(wfile))
    except (SafetensorError, OSError, ValueError) as e:
        raise DiffuseError(f"cannot read {wfile}: {e}") from None

    cfg = Config(preset="imported")
    cfg.model = model
    for k, v in diffusion.items():
        setattr(cfg.diffusion, k, v)
    mine = u.get("_diffuse") if isinstance(u.get("_diffuse"), dict) else None
    header_extra: dict[str, Any] = {}
    if mine and mine.get("format") == EXPORT_FORMAT:
        # Our own export: its full config is used when it maps to exactly what the folder says
        # (otherwise someone edited the folder, and the folder wins).
        try:
            stored = Config.from_dict(mine["config"])
            same = ({k: v for k, v in unet_config(stored).items() if not k.startswith("_")}
                    == {k: v for k, v in u.items() if not k.startswith("_")}
                    and {k: v for k, v in scheduler_config(stored).items() if not k.startswith("_")}
                    == {k: v for k, v in s.items() if not k.startswith("_")})
        except (DiffuseError, KeyError, TypeError, ValueError):
            same = False
        if same:
            cfg = stored
            header_extra = {"step": mine.get("step"), "class_names": mine.get("class_names")}
    if data is not None:
        cfg.data.name = data
    elif cfg.preset == "imported":
        cfg.data.name = "unknown"
    if cfg.preset == "imported":
        cfg.data.image_size, cfg.data.channels = model.image_size, model.in_channels
    try:
        validate(cfg)
        validate_resolution(cfg.model)
        net = UNet(cfg.model)
    except (DiffuseError, ValueError, RuntimeError) as e:
        raise DiffuseError(f"{folder}: the model cannot be built in diffuse ({e})") from None
    weights = from_diffusers(theirs, net)
    ckpt_io.load_weights_into(net, weights, wfile)                         # shapes and names, strictly

    header = {"format": ckpt_io.FORMAT, "format_version": ckpt_io.FORMAT_VERSION, "diffuse_version": __version__,
              **({"step": header_extra["step"]} if header_extra.get("step") is not None else {}),
              "class_names": header_extra.get("class_names"), "params": sum(v.numel() for v in weights.values()),
              "data": cfg.data.name, "imported_from": str(folder.resolve())}
    tmp = _prepare_out(out, overwrite, "ema.safetensors")
    try:
        meta = {"format": ckpt_io.FORMAT, "format_version": str(ckpt_io.FORMAT_VERSION),
                "config": json.dumps({**header, "config": cfg.to_dict()})}
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "ema.safetensors"), metadata=meta)
        _write_json(tmp / "config.json", {**header, "config": cfg.to_dict()})
        arch = {k: v for k, v in cfg.to_dict()["model"].items() if k not in ("image_size", "in_channels", "num_classes")}
        _write_json(tmp / "model_config.json", {"model": arch, "diffusion": cfg.to_dict()["diffusion"]})
        _finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "params": header["params"], "config": cfg, "own_export": bool(header_extra)}
