"""The diffusers mapping, both ways: our config and parameter names as UNet2DModel's and
DDPMScheduler's (export), and their configs as ours (import). Pure functions of configs and
state dicts; nothing here reads or writes a file, and nothing imports diffusers.

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

import json
import math
import re
from typing import Any

import torch

from ..config import PREDICTIONS, Config, DiffusionConfig, ModelConfig
from ..diffusion import Schedule
from ..errors import DiffuseError

DIFFUSERS_VERSION = "0.30.0"      # written as _diffusers_version: the oldest diffusers these folders target
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


# ----------------------------------------------------------------------------------------------
# Our configs as theirs (export)

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
    if m.patch_size != 1:
        raise DiffuseError(f"cannot export: the model sees the image as {m.patch_size}x{m.patch_size} patches "
                           "(--patch-size), which UNet2DModel has no layer for; share the run itself or the "
                           "slim file (diffuse export RUN OUT.safetensors)")
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


def _training_schedule(d: DiffusionConfig, schedule: str | None = None, start: float | None = None,
                       end: float | None = None, zero_snr: bool | None = None) -> Schedule:
    """The run's discrete VP schedule (with zero terminal SNR where the run uses it)."""
    return Schedule(schedule or d.schedule, d.timesteps, d.beta_start if start is None else start,
                    d.beta_end if end is None else end,
                    zero_terminal_snr=d.zero_terminal_snr if zero_snr is None else zero_snr)


def _prediction_type(d: DiffusionConfig) -> str:
    if d.formulation != "vp":
        raise DiffuseError(f"cannot export: the {d.formulation} formulation (preconditioning of a continuous sigma) "
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
    if d.snr_shift != 1.0:
        raise DiffuseError(f"cannot export: the schedule's SNR is shifted (--snr-shift {d.snr_shift:g}), which "
                           "diffusers' named beta schedules do not express; share the run itself or the slim file")
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
# Parameter names (both ways)

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
# Their configs as ours (import)

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
    zero = bool(s.get("rescale_betas_zero_snr"))
    if str(s.get("variance_type", "fixed_small")).startswith("learned"):
        raise bad("variance_type", "needs a learned variance, which diffuse's models do not predict")
    pred = {v: k for k, v in PREDICTION_TYPES.items()}.get(s.get("prediction_type", "epsilon"))
    if pred not in PREDICTIONS:
        raise bad("prediction_type",
                  f"is not supported (diffuse: {', '.join(PREDICTION_TYPES[p] for p in PREDICTIONS)})")
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
        probe = DiffusionConfig(timesteps=T)
        for sched, a, b in cands:
            for z in (False, True):
                if len(trained) == T and 0 < a < b < 1 and \
                        torch.equal(_training_schedule(probe, sched, a, b, z).betas.float(), given):
                    return {"schedule": sched, "timesteps": T, "beta_start": a, "beta_end": b, "prediction": pred,
                            "zero_terminal_snr": z}
        raise DiffuseError("scheduler/scheduler_config.json: trained_betas match neither a linear nor the cosine "
                           "schedule (diffuse's two)")
    ours = {"linear": "linear", "squaredcos_cap_v2": "cosine"}.get(name)
    if ours is not None:
        return {"schedule": ours, "timesteps": T, "beta_start": start, "beta_end": end, "prediction": pred,
                "zero_terminal_snr": zero}
    raise bad("beta_schedule", "has no diffuse equivalent (diffuse has linear and squaredcos_cap_v2, i.e. cosine)")

