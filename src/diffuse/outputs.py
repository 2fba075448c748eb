"""Output paths, checked before any work starts.

A command that samples for minutes and then cannot write its result has thrown the minutes away.
Every command that writes calls one of these first: the form is right (a known file extension,
or a directory), and the place is writable, which is tested by creating (and at once removing)
an unnamed file there, because permission bits alone do not tell (root ignores them; a read-only
mount or a full quota does not show in them). Nothing is created: a missing directory is tested
at its nearest existing parent, where it would be made.

Errors read like ``cannot write /sys/x.png: permission denied`` (no Python exception names).
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from .errors import DiffuseError


def _reason(e: OSError) -> str:
    return (e.strerror or os.strerror(e.errno or errno.EIO)).lower()


def _probe_dir(where: Path, target: Path) -> None:
    """Raise unless a file can be created in ``where`` (an existing directory) on the way to ``target``."""
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        raise DiffuseError(f"cannot write {target}: {_reason(e)}") from None


def _existing_parent(path: Path, target: Path) -> Path:
    """The nearest existing ancestor of ``path``; it must be a directory."""
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if not p.is_dir():
        raise DiffuseError(f"cannot write {target}: {p} is not a directory")
    return p


def check_file(path: str | Path, suffixes: tuple[str, ...], flag: str = "--out") -> Path:
    """An output file: one of ``suffixes`` (lower-case, with the dot), not a directory, writable."""
    path = Path(path)
    if path.is_dir():
        raise DiffuseError(f"{flag} {path} is a directory; expected a file name ending in {' or '.join(suffixes)}")
    if path.suffix.lower() not in suffixes:
        raise DiffuseError(f"{flag} {path}: expected a file name ending in {' or '.join(suffixes)}")
    if path.exists() and not os.access(path, os.W_OK):
        raise DiffuseError(f"cannot write {path}: permission denied")
    _probe_dir(_existing_parent(path.parent, path), path)
    return path


def check_dir(path: str | Path, flag: str = "--out") -> Path:
    """An output directory (existing or to be created): not a file, and writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DiffuseError(f"{flag} {path} is a file; expected a directory")
    _probe_dir(_existing_parent(path, path), path)
    return path


def check_sample_out(out: str | Path) -> Path:
    """``diffuse sample --out``: a .png grid, an .npz of arrays, or a directory of PNGs, checked
    before any model is loaded."""
    out = Path(out)
    if out.suffix == "" or out.is_dir():
        return check_dir(out)
    if out.suffix.lower() in (".png", ".npz"):
        return check_file(out, (".png", ".npz"))
    raise DiffuseError(f"--out {out}: use a .png (grid), a .npz (arrays) or a directory (one PNG per image)")
