"""Files that are never half-written, run directories that only diffuse may delete, one trainer
per run directory.

- ``atomic_open`` / ``atomic_write``: write to a temporary file beside the target, fsync, then
  ``os.replace`` it into place and fsync the directory. A reader (or a crash at any instant) sees
  the old file or the new one, never a mixture. Every file diffuse writes for keeps goes through
  here (run config, checkpoints, sample ``.npz``, FID statistics, judge classifiers, downloads).
- ``exchange``: swap two directory entries in one step (Linux ``renameat2(RENAME_EXCHANGE)``), so
  a checkpoint directory can be replaced without a moment in which its name holds nothing.
- ``MARKER``: the file diffuse puts in every run directory it creates; ``--overwrite`` deletes
  only directories holding it.
- ``cache_dir``: where diffuse keeps what it can rebuild (downloads, FID statistics, judge
  classifiers, the precision probe, decoded image folders).
- ``RunLock``: an advisory ``fcntl.flock`` on ``RUN/.lock`` held for a training run's life. The
  kernel drops it when the process dies however it dies, so a stale lock never blocks.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

from .errors import DiffuseError

MARKER = ".diffuse-run"
LOCK_NAME = ".lock"


def cache_dir() -> Path:
    """diffuse's cache (downloads, FID statistics, judge classifiers): $DIFFUSE_CACHE, else
    $XDG_CACHE_HOME/diffuse, else ~/.cache/diffuse."""
    env = os.environ.get("DIFFUSE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "diffuse"


def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (renames, new files) durable; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def building(path: str | Path) -> Iterator[Path]:
    """``with building(p) as tmp: ...`` for files written in place (a memory map, another
    library's writer): ``tmp`` is a hidden sibling; on success it is fsynced and renamed over p in
    one step, on an error removed, so p is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_open(p, "w") as f: ...`` writes p all at once or not at all.

    The data goes to a hidden ``.NAME.*.part`` beside p (``building``); on leaving the block without
    an error it is fsynced and renamed over p. On an error the temporary is removed and p is as
    before. The file gets the usual permissions (0666 less the umask), not mkstemp's 0600."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files; mode {mode!r}")
    with building(path) as tmp:
        with open(tmp, mode) as f:
            yield f


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Replace ``path`` with ``data`` (str is written as UTF-8) atomically and durably."""
    with atomic_open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


# ----------------------------------------------------------------------------------------------
# Atomic exchange of two names

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


def exchange(a: str | Path, b: str | Path) -> bool:
    """Atomically swap the entries ``a`` and ``b`` (both must exist). False where the platform or
    file system cannot (not Linux, old glibc, NFS, ...): the caller then needs another plan."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


# ----------------------------------------------------------------------------------------------
# Run directories: the marker and the lock

def mark_run_dir(path: str | Path) -> None:
    """Record that diffuse made this directory (so ``--overwrite`` may delete it)."""
    atomic_write(Path(path) / MARKER, "This directory is a diffuse run; `diffuse train --overwrite` may delete it.\n")


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


class RunLock:
    """Exclusive advisory lock on ``RUN/.lock`` (``fcntl.flock``), for a training run's life.

    ``acquire()`` fails at once, with the holder's pid, when another process holds it; a lock left
    by a killed process is gone with that process (flock locks belong to open files), so it never
    blocks. A no-op where fcntl does not exist (Windows)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:          # not POSIX: no advisory locks
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DiffuseError(f"{self.path.parent} is in use by another diffuse process (pid {holder}); "
                                   f"wait for it to finish or stop it first") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)            # closing the file drops the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
