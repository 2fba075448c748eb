"""Evaluation as a library: FID and KID of a model's samples against a reference set, or between
two image sets, with the TF Inception-v3 (2015-12-05) pool3 features (fid.py, inception.py).

``diffuse eval`` (through ``evaluate_run``), FID during training (``FidDuringTraining``) and
``visualize compare-samplers --fid-n`` all call ``evaluate``; ``eval --fid-between`` calls
``compare_sets``, ``eval --classifier-accuracy`` ``accuracy_sweep``. Image i of an
evaluation draws its noise from stream (spec.seed, i) (generate.py), so FIDs of one model differ
only by the weights and the settings. Under torchrun every rank samples and featurises its block of
the N images and the float64 statistics are all-reduced (distributed.stats_of_images).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import distributed as dist
from . import fid
from .config import Config
from .errors import DiffuseError
from .generate import Loaded, class_labels, generate_shard, labels_and_guidance, nfe_bar
from .objectives import Formulation
from .rng import derive_seed
from .sampling import SamplingSpec


def parse_ref(spec: str) -> tuple[str, str]:
    """DATA[:split] -> (data, split); a split suffix is only recognised as :train or :test."""
    for split in ("train", "test"):
        if spec.endswith(f":{split}"):
            return spec[:-len(split) - 1], split
    return spec, "train"


def ref_line(ref: dict[str, Any]) -> str:
    """A reference's description (``reference``'s second value) in one line."""
    where = ref.get("stats") or f"{ref['data']}:{ref['split']}"
    cache = f" (cached in {ref['cache']})" if ref.get("cache") else ""
    return f"{where}, N={ref['n']:,}{cache}"


def reference(ref: str | None, cfg: Config, extractor, *, ref_n: int | None = None, data_root: str | None = None,
              batch_size: int = 50, progress: bool = False) -> tuple[fid.Stats, dict[str, Any]]:
    """FID reference statistics for a run and their description: ``ref`` a data set[:split] or a
    statistics .npz; None = the run's training data, train split, loaded as training loaded it (no
    augmentation; cached by fid.reference_stats), at the size the run writes (train.output_size).
    ``ref_n``: a seeded subset (None: the whole split)."""
    if ref and Path(ref).suffix == ".npz":
        stats, desc = fid.load_stats(ref), {"stats": ref}
    else:
        data, split = parse_ref(ref or cfg.data.name)
        same = data == cfg.data.name
        stats = fid.reference_stats(data, split, ref_n, extractor=extractor,
                                    data_root=data_root or (cfg.data.root if same else None),
                                    image_size=cfg.written_size if same else None,
                                    channels=cfg.data.channels if same else None,
                                    batch_size=batch_size, progress=progress)
        desc = {"data": data, "split": split, "cache": stats.meta.get("cache")}
    desc["n"] = stats.n
    return stats, desc


def evaluate(loaded: Loaded, n: int, spec: SamplingSpec, *, reference: fid.Stats, extractor,
             labels=None, batch_size: int = 50, stats_batch_size: int = 50, device: torch.device | None = None,
             amp: torch.dtype | None = None, progress: Callable[[int], None] | None = None,
             stats_progress: bool = False, save_stats: str | Path | None = None,
             note: dict[str, Any] | None = None) -> dict[str, Any]:
    """FID and KID of n images from ``loaded`` sampled with ``spec`` (None fields: the run's
    defaults; labels [n] long or None) against ``reference``.

    Returns {fid, kid, kid_std, n, n_ref, extractor, seconds} and the settings it sampled with
    (sampler, steps, spacing, nfe, eta, guidance, clip_x0, seeds, and ``note``'s entries, which
    are also recorded in the statistics' meta). ``save_stats``: also write the generated set's
    statistics there (rank 0). ``progress`` counts network evaluations."""
    t0 = time.perf_counter()
    images, idx, record = generate_shard(loaded, n=n, spec=spec, batch_size=batch_size, labels=labels,
                                         device=device, amp=amp, progress=progress)
    sample = {k: record[k] for k in ("sampler", "steps", "spacing", "nfe", "eta", "guidance", "clip_x0")}
    sample["seeds"] = {"seed": record["seed"], "first_index": 0, "count": n,
                       "rule": "image i draws its noise from stream (seed, i)"}
    sample.update(note or {})
    gen = dist.stats_of_images(images, idx, n, extractor, batch_size=stats_batch_size, progress=stats_progress,
                               meta={"source": str(loaded.source)})
    gen.meta.update(sample=sample, checkpoint=str(loaded.source), step=loaded.header.get("step"))
    result = fid.compare(gen, reference, names=("the generated images", "the reference"))
    if save_stats and dist.is_main():
        fid.save_stats(save_stats, gen)
    result.update(sample, seconds=time.perf_counter() - t0)
    return result


def evaluate_run(loaded: Loaded, n: int, spec: SamplingSpec, *, class_: str | None = None, ref: str | None = None,
                 ref_n: int | None = None, data_root: str | None = None, inception_weights: str | None = None,
                 resize: str = "tf-bilinear", batch_size: int = 50, save_stats: str | Path | None = None,
                 device: torch.device | None = None, amp: torch.dtype | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """``diffuse eval RUN``: ``evaluate`` of n images, image i of class i of the --class ``class_``
    cycle (generate.labels_and_guidance, which also settles spec.guidance), against ``ref``
    (``reference``: None is the run's training data, train split; rank 0 fills the cache first).
    Returns evaluate's dict without the time, plus ref (its description), checkpoint and step."""
    from .inception import load_extractor      # looked up when called: tests stand a counter in for it

    labels, guidance = labels_and_guidance(loaded, class_, spec.guidance, n)
    spec = spec.replace(guidance=guidance).resolved(loaded.config)
    extractor = load_extractor(inception_weights, device, resize)
    with dist.main_first():                  # rank 0 fills the statistics cache, the others read it
        ref_stats, ref_desc = reference(ref, loaded.config, extractor, ref_n=ref_n, data_root=data_root,
                                        batch_size=batch_size, progress=progress)
    with nfe_bar(spec, len(dist.shard(n)), batch_size, f"{spec.sampler} sampling", not progress) as bar:
        result = evaluate(loaded, n, spec, reference=ref_stats, extractor=extractor, labels=labels,
                          batch_size=batch_size, stats_batch_size=batch_size, device=device, amp=amp,
                          progress=bar.update, stats_progress=progress, save_stats=save_stats,
                          note={"class": class_})
    result.pop("seconds")
    result.update(ref=ref_desc, checkpoint=str(loaded.source), step=loaded.header.get("step"))
    return result


def check_save_stats(path: str | None) -> None:
    """--save-stats: a writable FILE.npz, refused in one line before any sampling or Inception."""
    if path:
        from .outputs import check_file
        if Path(path).suffix != ".npz":
            raise DiffuseError(f"--save-stats {path}: statistics files end in .npz")
        check_file(path, (".npz",), "--save-stats")


def fid_score_fn(loaded: Loaded, n: int, *, reference: fid.Stats, extractor, labels=None, guidance: float = 0.0,
                 seed: int = 0, batch_size: int = 50, device=None, amp=None) -> Callable[..., dict[str, float]]:
    """For ``visualize.compare_samplers``: score(images, sampler, steps) -> {fid, kid} of n images
    of the same seeds (the cell's batch is their first few) sampled with that cell's settings."""
    def score(images, sampler: str, steps: int) -> dict[str, float]:
        r = evaluate(loaded, n, SamplingSpec(sampler, steps, guidance=guidance, seed=seed), reference=reference,
                     extractor=extractor, labels=labels, batch_size=batch_size, stats_batch_size=batch_size,
                     device=device, amp=amp)
        return {"fid": r["fid"], "kid": r["kid"]}
    return score


def compare_sets(a: str | Path, b: str | Path, extractor: Callable[[], Any], *, batch_size: int = 50,
                 progress: bool = False, save_stats: str | Path | None = None) -> dict[str, Any]:
    """FID and KID between two sets, each a folder of images, an .npz of uint8 NHWC 'images' or a
    statistics .npz (fid.load_set). ``extractor()`` gives the Inception extractor, called only when
    a set holds images. ``save_stats``: write A's statistics there. Returns fid.compare's dict + a, b."""
    names = (str(a), str(b))
    extractor = functools.cache(extractor)          # loaded once, for either set or both
    sets = [fid.load_set(p) for p in names]
    stats = [s if isinstance(s, fid.Stats) else
             fid.stats_of_images(s, extractor(), batch_size=batch_size, progress=progress, meta={"source": p})
             for s, p in zip(sets, names)]
    result = fid.compare(*stats, names=names)
    result.update(a=names[0], b=names[1])
    if save_stats and dist.is_main():
        fid.save_stats(save_stats, stats[0])
    return result


class FidDuringTraining:
    """FID of EMA samples against the training data, for ``--fid-every``.

    The extractor and the reference statistics (``--fid-ref-n`` real training images, no
    augmentation, cached by fid.reference_stats) are prepared once, before training starts, so a
    missing Inception file fails the run at once. Image i of every measurement draws its noise
    from stream (seed, i) of its own seed, so FIDs along a run differ only by the weights, and no
    training RNG is consumed. Under torchrun every rank samples and featurises its block of the
    N images and the statistics are all-reduced in float64 (distributed.feature_stats): the same
    FID as one process, to float64 rounding, in 1 / world of the time.
    """

    def __init__(self, cfg: Config, device: torch.device):
        from .inception import load_extractor

        t = cfg.train
        self.spec = SamplingSpec(t.fid_sampler, t.fid_steps, seed=derive_seed(t.seed, "fid"))
        self.spec.check_sampler(cfg.diffusion.timesteps, prefix="--fid-")     # before the reference statistics
        self.cfg, self.device = cfg, device
        self.extractor = load_extractor(None, device, "tf-bilinear")
        with dist.main_first():                     # rank 0 fills the statistics cache, the others read it
            self.ref, _ = reference(None, cfg, self.extractor, ref_n=t.fid_ref_n or None)   # eval's default

    def __call__(self, ema: nn.Module, formulation: Formulation, class_names: list[str] | None,
                 amp: torch.dtype | None) -> dict[str, Any]:
        t = self.cfg.train
        loaded = Loaded(ema, self.cfg, {"class_names": class_names}, formulation.schedule, Path("<training EMA>"),
                        formulation)
        labels = class_labels(loaded, "all" if class_names else None, t.fid_n)   # with the run's guidance
        was_training = ema.training
        ema.eval()
        try:
            return evaluate(loaded, t.fid_n, self.spec, reference=self.ref, extractor=self.extractor, labels=labels,
                            batch_size=min(t.fid_n, 250), device=self.device, amp=amp)
        finally:
            ema.train(was_training)


def check_fid_between(run: str | None, between, *, n: int | None, classifier_accuracy: bool) -> None:
    """One-line refusals for eval's mutually exclusive inputs, before any work."""
    if bool(run) == bool(between):
        raise DiffuseError("give a RUN to evaluate, or --fid-between A B (not both)")
    if classifier_accuracy and between:
        raise DiffuseError("--classifier-accuracy judges a RUN's samples; it does not apply to --fid-between")
    if n is not None and between:
        raise DiffuseError("--n applies to a RUN; --fid-between uses the sets as they are")


def result_lines(result: dict[str, Any], save_stats: str | None = None) -> list[str]:
    """``diffuse eval``'s text report of an ``evaluate`` (with ref) or ``compare_sets`` result."""
    kid = "n/a (no features stored)" if result["kid"] is None else f"{result['kid']:.5f} ± {result['kid_std']:.5f}"
    ex = result["extractor"] or {}
    lines = [f"FID  {result['fid']:.3f}   (N={result['n']:,} vs N_ref={result['n_ref']:,})",
             f"KID  {kid}",
             f"extractor  {ex.get('name', '?')} ({ex.get('hash', '?')[:17]}, {ex.get('resize', '?')})"]
    if "a" in result:
        lines.insert(0, f"A {result['a']}  vs  B {result['b']}")
    else:
        s = result["seeds"]
        lines += [f"samples    {result['sampler']}, {result['steps']} steps, guidance {result['guidance']}, "
                  f"class {result['class'] or 'none'}; seeds ({s['seed']}, i) for i in [0, {s['count']})",
                  f"reference  {ref_line(result['ref'])}"]
    if save_stats:
        lines.append(f"statistics saved to {save_stats}")
    return lines


def parse_guidances(text: str) -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0] for --guidance-sweep: numbers >= 0, at least one."""
    try:
        guidances = [float(v) for v in text.split(",") if v.strip()]
        if not guidances:
            raise ValueError
    except ValueError:
        raise DiffuseError(f"--guidance-sweep wants numbers like 0,1,2, got {text!r}") from None
    if any(w < 0 for w in guidances):
        raise DiffuseError(f"--guidance-sweep wants guidance values >= 0, got {text!r}")
    return guidances


def class_accuracy(loaded: Loaded, spec: SamplingSpec, guidances: list[float], *, n_per_class: int = 100,
                   data_root: str | None = None, batch_size: int = 250, device: torch.device | None = None,
                   amp: torch.dtype | None = None, progress: Callable[[int], None] | None = None,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Class accuracy of a class-conditional run's samples per guidance w, judged by a small
    classifier trained once on the real training split (cached; classifier.load_or_train)."""
    from . import classifier

    cfg = loaded.config
    if not cfg.model.class_cond:
        raise DiffuseError(f"{loaded.source} is an unconditional model; --classifier-accuracy needs one "
                           "trained with --class-cond")
    judge = classifier.load_or_train(cfg.data.name, data_root or cfg.data.root, cfg.written_size,
                                     cfg.model.in_channels, device=device, log=log or (lambda m: None))
    sweep = classifier.guidance_sweep(loaded, judge, guidances, n_per_class=n_per_class, sampler=spec.sampler,
                                      steps=spec.steps, spacing=spec.spacing, seed=spec.seed, batch_size=batch_size,
                                      device=device, amp=amp, progress=progress)
    return {"judge": {"data": cfg.data.name, "test_accuracy": round(judge.test_accuracy, 4)},
            "checkpoint": str(loaded.source), "step": loaded.header.get("step"),
            "default_guidance": cfg.train.sample_guidance, "sweep": sweep}


def accuracy_sweep(loaded: Loaded, spec: SamplingSpec, sweep: str, *, n_per_class: int = 100,
                   data_root: str | None = None, batch_size: int = 250, device: torch.device | None = None,
                   amp: torch.dtype | None = None, progress: bool = False,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``diffuse eval --classifier-accuracy``: ``class_accuracy`` at each guidance of ``sweep``
    ("0,0.5,1", ``parse_guidances``) with a bar over its network evaluations; ``spec`` is resolved."""
    guidances = parse_guidances(sweep)
    with nfe_bar(spec, n_per_class * len(loaded.class_names or ()), batch_size, "guidance sweep", not progress,
                 times=len(guidances)) as bar:
        return class_accuracy(loaded, spec, guidances, n_per_class=n_per_class, data_root=data_root,
                              batch_size=batch_size, device=device, amp=amp, progress=bar.update, log=log)


def accuracy_lines(out: dict[str, Any], spec: SamplingSpec, n_per_class: int) -> list[str]:
    """The text table of a ``class_accuracy`` result."""
    judge = out["judge"]
    lines = [f"class accuracy of {out['checkpoint']} (step {out['step']}): {n_per_class} images per class, "
             f"{spec.sampler} {spec.steps} steps, seeds ({spec.seed}, i)",
             f"judge: a small CNN trained on {judge['data']} train, {judge['test_accuracy'] * 100:.2f}% on the "
             "real test split",
             f"{'guidance w':>10}  {'accuracy':>8}  {'worst class':<16} seconds"]
    for r in out["sweep"]:
        worst = min(r["per_class"], key=r["per_class"].get)
        mark = "  <- the run's default" if r["guidance"] == out["default_guidance"] else ""
        cell = f"{worst} {r['per_class'][worst] * 100:.0f}%"
        lines.append(f"{r['guidance']:>10g}  {r['accuracy'] * 100:>7.1f}%  {cell:<16} {r['seconds']:.0f}{mark}")
    return lines
