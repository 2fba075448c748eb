"""The model card: README.md in the Hugging Face Hub's format (YAML front matter, a table of what
the run recorded, code that loads the folder), and the config a published folder may carry.

Everything here ends up in a folder meant to be shared, so no local path goes in: the run
directory, the data root and a folder data set's location are left out (``public_config``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..imagefiles import is_standard
from ..runlog import read_metrics

HUB_DATASETS = {"mnist": "ylecun/mnist", "fashion-mnist": "zalando-datasets/fashion_mnist",
                "cifar10": "uoft-cs/cifar10"}


def public_config(cfg: Config) -> Config:
    """``cfg`` without what only made sense on the machine that trained it: ``train.out`` and
    ``data.root`` become None and a folder data set keeps only its folder's name."""
    d = cfg.to_dict()
    d["train"]["out"] = None
    d["data"]["root"] = None
    if not is_standard(cfg.data.name):
        d["data"]["name"] = Path(cfg.data.name).name
    return Config.from_dict(d)


def run_dir_of(src: Path) -> Path | None:
    """The run directory a checkpoint directory belongs to (OUT/checkpoints/step_N), if any."""
    if src.is_dir() and src.parent.name == "checkpoints" and (src.parent.parent / "config.json").is_file():
        return src.parent.parent
    return None



def card_facts(src: Path, header: dict[str, Any], cfg: Config, weights: dict[str, torch.Tensor],
               evaluation: dict[str, Any] | None) -> dict[str, Any]:
    """Numbers for the model card, each from what the run recorded (None where it did not)."""
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
    run = run_dir_of(src)
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



def _run_table(facts: dict[str, Any], cfg: Config) -> list[str]:
    """The card's Markdown table of what the run was and what it recorded."""
    m, d, t = cfg.model, cfg.diffusion, cfg.train

    def fmt_s(s: float | None) -> str:
        if s is None:
            return "not recorded"
        return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min"

    shape = f"{m.in_channels}x{m.image_size}x{m.image_size}"
    if cfg.written_size != m.image_size:
        shape += f"; diffuse writes it upscaled to {cfg.written_size} px, a diffusers pipeline at {m.image_size}"
    rows = [("data set", f"{cfg.data.name} ({shape})"),
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
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def model_card(facts: dict[str, Any], cfg: Config, header: dict[str, Any], *, license: str = "mit",
               folder: str = ".") -> str:
    """README.md in the Hugging Face Hub's format: YAML front matter, then what the model is and how to load it."""
    m, t = cfg.model, cfg.train
    names = header.get("class_names")
    tags = ["pytorch", "diffusers", "diffuse", "ddpm", "unconditional-image-generation"
            if not m.class_cond else "class-conditional-image-generation"]
    front = ["---", "library_name: diffusers", f"license: {license}", "pipeline_tag: unconditional-image-generation",
             "tags:"] + [f"- {x}" for x in tags]
    if cfg.data.name in HUB_DATASETS:
        front += ["datasets:", f"- {HUB_DATASETS[cfg.data.name]}"]
    front.append("---")
    table = _run_table(facts, cfg)
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

