"""A small judge classifier: does a class-conditional model draw the class it was asked for?

Trained once per (data set, image size, channels) on the real training split, checked on the
real test split, and cached as safetensors + JSON under the cache dir. ``guidance_sweep`` then
generates images per class at several guidance values and reports the fraction the classifier
labels as the class that was asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as tensors_to_bytes
from torch import Tensor, nn

from .data import ImageSet, cache_dir, load_dataset
from .errors import DiffuseError
from .fsutil import atomic_write
from .objectives import DEFAULT_VP_SAMPLER
from .rng import generator

ARCH_VERSION = 1


class JudgeNet(nn.Module):
    """Three conv blocks (conv-GN-ReLU x2, pool) and a linear head. Input [B, C, H, W] in [-1, 1]."""

    def __init__(self, channels: int, num_classes: int, width: int = 32):
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.ReLU(),
                                 nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.ReLU())
        self.features = nn.Sequential(block(channels, width), nn.MaxPool2d(2),
                                      block(width, 2 * width), nn.MaxPool2d(2),
                                      block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@dataclass
class Judge:
    net: JudgeNet
    class_names: list[str]
    test_accuracy: float
    key: dict[str, Any]

    @torch.no_grad()
    def predict(self, images_uint8: Tensor, batch_size: int = 512) -> Tensor:
        """uint8 [N, C, H, W] -> predicted class [N] long."""
        self.net.eval()
        device = next(self.net.parameters()).device
        out = []
        for chunk in images_uint8.split(batch_size):
            x = chunk.to(device).float().div(127.5).sub(1)
            out.append(self.net(x).argmax(1).cpu())
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def _to_float(images: Tensor) -> Tensor:
    return images.float().div(127.5).sub(1)


def fit(train: ImageSet, test: ImageSet, *, epochs: int = 3, batch_size: int = 128, lr: float = 2e-3,
        seed: int = 0, device: torch.device = torch.device("cpu"),
        log: Callable[[str], None] | None = None) -> tuple[JudgeNet, float]:
    """Train a JudgeNet with AdamW + light random shifts; returns (net, accuracy on ``test``)."""
    if train.labels is None or not train.num_classes:
        raise DiffuseError(f"{train.name} has no labels to train a classifier on")
    torch.manual_seed(seed)
    net = JudgeNet(train.channels, train.num_classes).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    n = len(train)
    steps = max(400, epochs * n // batch_size)     # small sets (digits) still get enough updates
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    images, labels = train.images.to(device), train.labels.to(device)
    g = generator(seed, "judge")
    net.train()
    for step in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=g).to(device)
        x = _to_float(images[idx])
        # random shifts of up to 2 pixels so the judge is not fooled by small misplacements
        dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        loss = F.cross_entropy(net(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step + 1) % max(1, steps // 5) == 0:
            log(f"judge classifier step {step + 1}/{steps} loss {loss.item():.3f}")
    judge = Judge(net, train.class_names or [], 0.0, {})
    acc = (judge.predict(test.images) == test.labels).float().mean().item()
    return net, acc


def _read_cached(weights: Path, meta_path: Path, key: dict, channels: int, device: torch.device) -> "Judge | None":
    """The cached judge if its metadata matches ``key``; None (retrain) when it is for other
    settings; a one-line error when the cache is corrupt or not what it claims (safetensors and
    JSON only: nothing in it can run code)."""
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict) or meta.get("key") != key:
            return None
        names, acc = meta["class_names"], meta["test_accuracy"]
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)) \
                or not isinstance(acc, (int, float)):
            raise TypeError("class_names or test_accuracy has the wrong type")
        net = JudgeNet(channels, len(names)).to(device)
        net.load_state_dict(load_file(str(weights)))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, RuntimeError,
            SafetensorError) as e:
        raise DiffuseError(f"the cached judge classifier {weights} is corrupt ({type(e).__name__}: {e}); "
                           f"delete it and it is retrained") from None
    return Judge(net, names, float(acc), key)


def load_or_train(data_name: str, root: str | None, image_size: int, channels: int, *,
                  device: torch.device = torch.device("cpu"), seed: int = 0,
                  log: Callable[[str], None] | None = None) -> Judge:
    """The cached judge for this data set and image format, training it on first use."""
    key = {"data": data_name, "image_size": image_size, "channels": channels, "arch": ARCH_VERSION, "seed": seed}
    tag = f"{Path(data_name).name}-{image_size}px-{channels}ch-a{ARCH_VERSION}-s{seed}"
    folder = cache_dir() / "classifiers"
    weights, meta_path = folder / f"{tag}.safetensors", folder / f"{tag}.json"
    train = load_dataset(data_name, root, "train", image_size, channels)
    if train.labels is None:
        raise DiffuseError(f"{data_name} has no labels, so there is no classifier to judge class accuracy")
    if weights.is_file() and meta_path.is_file():
        cached = _read_cached(weights, meta_path, key, channels, device)
        if cached is not None:
            return cached
    try:
        test = load_dataset(data_name, root, "test", image_size, channels)
    except DiffuseError:
        # folders have no test split: hold out every 10th image
        keep = torch.arange(len(train)) % 10 != 0
        test = ImageSet(train.images[~keep], train.labels[~keep], train.class_names, train.name, "held-out")
        train = ImageSet(train.images[keep], train.labels[keep], train.class_names, train.name, "train")
    if log:
        log(f"training the judge classifier for {data_name} (once; cached in {folder})")
    net, acc = fit(train, test, seed=seed, device=device, log=log)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(weights, tensors_to_bytes({k: v.cpu().contiguous() for k, v in net.state_dict().items()}))
    atomic_write(meta_path, json.dumps({"key": key, "class_names": train.class_names, "test_accuracy": acc}, indent=2))
    return Judge(net, list(train.class_names or []), acc, key)


@torch.no_grad()
def confident_fraction(judge: Judge, images: Tensor, threshold: float = 0.9, batch_size: int = 512) -> float:
    """Fraction of images (uint8 [N, C, H, W]) whose top class the judge gives probability >= threshold: a
    label-free quality score for unconditional samples (legible digits are confidently classified)."""
    judge.net.eval()
    device = next(judge.net.parameters()).device
    top = [judge.net(c.to(device).float().div(127.5).sub(1)).softmax(1).amax(1).cpu() for c in images.split(batch_size)]
    return float((torch.cat(top) >= threshold).float().mean()) if top else 0.0


def accuracy_by_class(judge: Judge, images: Tensor, labels: Tensor) -> dict[str, Any]:
    """Fraction of images the judge assigns to the class they were generated for, overall and per class."""
    pred = judge.predict(images)
    hit = (pred == labels.cpu()).float()
    per_class = {judge.class_names[k]: round(hit[labels.cpu() == k].mean().item(), 4)
                 for k in labels.unique().tolist()}
    return {"accuracy": round(hit.mean().item(), 4), "per_class": per_class, "n": len(labels)}


def guidance_sweep(loaded, judge: Judge, guidances: list[float], *, n_per_class: int = 100,
                   sampler: str = DEFAULT_VP_SAMPLER, steps: int = 20, spacing: str | None = None, seed: int = 0,
                   batch_size: int = 250, device: torch.device | None = None, amp: torch.dtype | None = None,
                   progress: Callable[[int], None] | None = None,
                   log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """For each guidance w: n_per_class images of every class, judged. ``loaded`` is a
    generate.Loaded class-conditional model. Image i of the sweep uses noise stream (seed, i) for
    every w, so the columns differ only by guidance."""
    from .generate import generate

    names = loaded.class_names
    if not loaded.config.model.class_cond or not names:
        raise DiffuseError(f"{loaded.source} is an unconditional model: class accuracy needs one trained "
                           "with --class-cond")
    if list(names) != list(judge.class_names):
        raise DiffuseError(f"the model's classes ({', '.join(names)}) differ from the data set's "
                           f"({', '.join(judge.class_names)})")
    labels = torch.arange(len(names)).repeat_interleave(n_per_class)
    results = []
    for w in guidances:
        images, record = generate(loaded, n=len(labels), seed=seed, sampler=sampler, steps=steps, spacing=spacing,
                                  batch_size=batch_size, labels=labels, guidance=w, device=device, amp=amp,
                                  progress=progress)
        res = {"guidance": w, **accuracy_by_class(judge, images, labels), "sampler": sampler, "steps": steps,
               "nfe": record["nfe"], "seed": seed, "seconds": record["seconds"]}
        if log:
            log(f"guidance {w:g}: {res['accuracy'] * 100:.1f}% of {res['n']} images judged as the class asked for")
        results.append(res)
    return results
