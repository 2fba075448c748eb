"""The colour development set: Google's Noto emoji as class folders (64x64 RGBA PNGs, one folder per category).

    python benchmarks/emoji_set.py --out runs/emoji            # npm pack (once, cached), then build the folders
    python benchmarks/emoji_set.py --out runs/emoji --tgz FILE  # from a tarball you already have

Source: the npm package ``emoji-datasource-google`` (version 16.0.0; the images are Apache-2.0). Its
``package/emoji.json`` lists every emoji with its ``image`` (file name under ``package/img/google/64/``),
its ``category`` and ``skin_variations`` (each with its own ``image``); ``has_img_google`` says whether
Google draws it. Every drawn image, skin variations included, becomes one file in the folder of its
category (10 categories, about 3,800 images). The tarball is fetched with ``npm pack`` (npm checks the
registry's integrity hash) into diffuse's cache directory and reused; the images are never committed.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

PACKAGE = "emoji-datasource-google"
VERSION = "16.0.0"
IMAGE_DIR = "package/img/google/64/"


def slug(category: str) -> str:
    """'People & Body' -> 'people-body': a folder name that is the same on every file system."""
    return re.sub(r"[^a-z0-9]+", "-", category.lower()).strip("-")


def fetch(cache: Path) -> Path:
    """The package tarball in ``cache`` (``npm pack`` on first use)."""
    tgz = cache / f"{PACKAGE}-{VERSION}.tgz"
    if not tgz.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(["npm", "pack", f"{PACKAGE}@{VERSION}"], cwd=cache, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise SystemExit(f"error: npm pack {PACKAGE}@{VERSION} failed "
                             f"({getattr(e, 'stderr', '') or e}); pass --tgz with a copy of the package") from None
    return tgz


def entries(emoji: list[dict]) -> list[tuple[str, str]]:
    """(image file name, category) of every image Google draws, skin variations included."""
    out = []
    for e in emoji:
        if e.get("has_img_google", True):
            out.append((e["image"], e["category"]))
        for v in (e.get("skin_variations") or {}).values():
            if v.get("has_img_google", True):
                out.append((v["image"], e["category"]))
    return out


def build(tgz: Path, out: Path) -> Counter:
    """Write ``out/<category>/<image>.png`` for every entry; returns the count per folder. Re-running
    rewrites the same files (a partial folder from an interrupted run is completed)."""
    with tarfile.open(tgz, "r:gz") as tar:
        emoji = json.load(tar.extractfile("package/emoji.json"))
        members = {m.name: m for m in tar.getmembers() if m.name.startswith(IMAGE_DIR) and m.isfile()}
        counts: Counter = Counter()
        for image, category in entries(emoji):
            member = members.get(IMAGE_DIR + image)
            if member is None:                      # listed but not shipped at 64 px
                continue
            folder = out / slug(category)
            folder.mkdir(parents=True, exist_ok=True)
            data = tar.extractfile(member).read()
            (folder / image).write_bytes(data)
            counts[folder.name] += 1
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder to build (class folders inside)")
    ap.add_argument("--tgz", default=None, help="the package tarball (default: npm pack into diffuse's cache)")
    args = ap.parse_args(argv)
    if args.tgz:
        tgz = Path(args.tgz)
    else:
        from diffuse.fsutil import cache_dir
        tgz = fetch(cache_dir() / "downloads")
    counts = build(tgz, Path(args.out))
    print(json.dumps({"out": args.out, "images": sum(counts.values()), "classes": dict(sorted(counts.items()))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
