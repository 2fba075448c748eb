"""benchmarks/emoji_set.py, the colour development set's builder, on a tarball made here in the
package's layout (the real package is never fetched in tests)."""

from __future__ import annotations

import io
import json
import sys
import tarfile

import numpy as np
from PIL import Image

from .conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import emoji_set  # noqa: E402


def _png(rgba: tuple[int, int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (64, 64), rgba).save(buf, "PNG")
    return buf.getvalue()


def _tarball(path, emoji: list[dict], images: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in {"package/emoji.json": json.dumps(emoji).encode(),
                           **{emoji_set.IMAGE_DIR + k: v for k, v in images.items()}}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_builds_class_folders_by_category_with_skin_variations(tmp_path):
    emoji = [
        {"image": "a.png", "category": "Smileys & Emotion", "has_img_google": True},
        {"image": "b.png", "category": "People & Body", "has_img_google": True,
         "skin_variations": {"1F3FB": {"image": "b-1.png", "has_img_google": True},
                             "1F3FC": {"image": "b-2.png", "has_img_google": False}}},
        {"image": "c.png", "category": "Flags", "has_img_google": False},      # not drawn by Google
        {"image": "d.png", "category": "Flags", "has_img_google": True},       # listed, not shipped
    ]
    colours = {"a.png": (255, 0, 0, 255), "b.png": (0, 255, 0, 128), "b-1.png": (0, 0, 255, 0),
               "b-2.png": (9, 9, 9, 255), "c.png": (1, 1, 1, 255)}
    tgz = tmp_path / "pkg.tgz"
    _tarball(tgz, emoji, {k: _png(v) for k, v in colours.items()})
    counts = emoji_set.build(tgz, tmp_path / "set")
    assert counts == {"smileys-emotion": 1, "people-body": 2}
    files = sorted(p.relative_to(tmp_path / "set").as_posix() for p in (tmp_path / "set").rglob("*.png"))
    assert files == ["people-body/b-1.png", "people-body/b.png", "smileys-emotion/a.png"]
    # the bytes are the package's own: RGBA, alpha kept for the data loader to composite
    im = np.asarray(Image.open(tmp_path / "set" / "people-body" / "b.png"))
    assert im.shape == (64, 64, 4) and tuple(im[0, 0]) == (0, 255, 0, 128)


def test_slug_is_a_plain_folder_name():
    assert emoji_set.slug("People & Body") == "people-body"
    assert emoji_set.slug("Travel & Places") == "travel-places"
