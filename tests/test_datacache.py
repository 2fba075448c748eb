"""The on-disk uint8 cache for folders larger than memory: same images as the in-memory path,
built once in parallel, keyed by the files, and batches identical to the in-memory stream."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse import datacache, hostmem
from diffuse.data import BatchStream, load_dataset
from diffuse.train import train

from .conftest import tiny_config


def _folder(root, n=30, size=(20, 14), mode="RGB"):
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(d / f"{i:03d}.png")
    (root / "c1" / "broken.png").write_bytes(b"not a png")         # skipped by both paths
    return root


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_disk_cache_holds_the_in_memory_images(tmp_path, monkeypatch, mode):
    monkeypatch.setenv("DIFFUSE_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "imgs", mode=mode)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        mem = load_dataset(str(root), image_size=12, cache="memory")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        disk = load_dataset(str(root), image_size=12, cache="disk")
    assert disk.on_disk and not mem.on_disk
    assert disk.images.shape == mem.images.shape == (30, 3 if mode == "RGB" else 1, 12, 12)
    assert torch.equal(disk.images, mem.images)
    assert torch.equal(disk.labels, mem.labels) and disk.class_names == mem.class_names == ["c0", "c1", "c2"]


@pytest.mark.filterwarnings("ignore:skipped 1 unreadable")
def test_cache_is_built_once_in_parallel_and_keyed_by_the_files(tmp_path):
    root = _folder(tmp_path / "imgs", n=12)
    cache = tmp_path / "cache"
    images, _, _, info = datacache.load_folder_cached(root, 8, 3, cache_root=cache, workers=2)
    assert info["built"] and info["images_per_sec"] > 0
    again, _, _, info2 = datacache.load_folder_cached(root, 8, 3, cache_root=cache, workers=2)
    assert not info2["built"] and info2["path"] == info["path"] and torch.equal(again, images)
    serial, _, _, info3 = datacache.load_folder_cached(root, 8, 3, cache_root=tmp_path / "c1", workers=1)
    assert torch.equal(serial, images)                      # the parallel decode is the serial one
    # changing one file (its size or mtime) makes a new cache instead of reading a stale one
    f = root / "c0" / "000.png"
    Image.fromarray(np.zeros((14, 20, 3), np.uint8)).save(f)
    os.utime(f, ns=(1, 1))
    fresh, _, _, info4 = datacache.load_folder_cached(root, 8, 3, cache_root=cache, workers=1)
    assert info4["built"] and info4["path"] != info["path"]
    assert fresh[0].sum() == 0 and not torch.equal(fresh, images)


def test_batches_from_the_disk_cache_equal_the_in_memory_stream(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSE_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "imgs", n=21)
    with pytest.warns(UserWarning):
        mem, disk = (load_dataset(str(root), image_size=8, cache=c) for c in ("memory", "disk"))
    dev = torch.device("cpu")
    a = BatchStream(mem, 8, 5, dev, flip=True, rows=slice(4, 8))
    b = BatchStream(disk, 8, 5, dev, flip=True, rows=slice(4, 8))
    for step in [0, 1, 2, 3, 7, 2]:                        # sequential (prefetched) and out of order
        (xa, ya), (xb, yb) = a.batch(step), b.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.shape == (4, 3, 8, 8)

    # and a run trains from it (the header names the cache; weights move)
    cfg = tiny_config(tmp_path / "run", steps=2, batch_size=4, sample_n=2)
    cfg.data.name, cfg.data.image_size, cfg.data.cache = str(root), 8, "disk"
    with pytest.warns(UserWarning):
        run = train(cfg, progress=False)
    assert "on-disk uint8 cache" in (run / "train.log").read_text()
    assert (run / "checkpoints" / "last" / "model.safetensors").is_file()


def _cgroup_tree(tmp_path, *, v1=None, v2=None, parent_v2=None):
    """A fake /proc and /sys/fs/cgroup: this process in cgroup 'job/step' (v1 memory and/or v2)."""
    proc, fs = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal: 25165824 kB\nMemAvailable: 20971520 kB\n")   # 20 GiB
    (proc / "self" / "cgroup").write_text("4:memory:/job/step\n3:cpu,cpuacct:/job/step\n0::/job/step\n")
    if v1 is not None:
        d = fs / "memory" / "job" / "step"
        d.mkdir(parents=True)
        (d / "memory.limit_in_bytes").write_text(f"{v1[0]}\n")
        (d / "memory.usage_in_bytes").write_text(f"{v1[1]}\n")
        (d / "memory.stat").write_text(f"cache 9\ntotal_inactive_file {v1[2]}\n")
    for rel, vals in (("job/step", v2), ("job", parent_v2)):
        if vals is not None:
            d = fs / rel
            d.mkdir(parents=True, exist_ok=True)
            (d / "memory.max").write_text(f"{vals[0]}\n")
            (d / "memory.current").write_text(f"{vals[1]}\n")
            (d / "memory.stat").write_text(f"anon 5\ninactive_file {vals[2]}\n")
    return proc, fs


GiB = 1 << 30


def test_available_ram_honours_memory_cgroups(tmp_path):
    # No limit anywhere: /proc/meminfo's MemAvailable.
    proc, fs = _cgroup_tree(tmp_path / "none", v1=((1 << 63) - 4096, GiB, 0), v2=("max", GiB, 0))
    assert hostmem.cgroup_memory_left(proc, fs) is None
    assert hostmem.available_ram(proc, fs) == 20 * GiB
    # v1 limit 2 GiB, 1.5 GiB used of which 0.5 GiB is inactive page cache: 1 GiB left.
    proc, fs = _cgroup_tree(tmp_path / "v1", v1=(2 * GiB, 3 * GiB // 2, GiB // 2))
    assert hostmem.available_ram(proc, fs) == GiB
    assert hostmem.cgroup_memory_limit(proc, fs) == 2 * GiB
    # v2: the leaf is unlimited, its parent (the job) holds 3 GiB with 1 GiB used: the parent decides.
    proc, fs = _cgroup_tree(tmp_path / "v2", v2=("max", GiB, 0), parent_v2=(3 * GiB, GiB, 0))
    assert hostmem.available_ram(proc, fs) == 2 * GiB
    assert hostmem.cgroup_memory_limit(proc, fs) == 3 * GiB
    # At (or past) the limit: no room, which is not "unknown".
    proc, fs = _cgroup_tree(tmp_path / "full", v2=(GiB, 2 * GiB, 0))
    assert hostmem.available_ram(proc, fs) == 0
    (proc / "meminfo").unlink()
    assert hostmem.available_ram(proc, fs) == 0
    proc, fs = _cgroup_tree(tmp_path / "unknown")
    (proc / "meminfo").unlink()
    assert hostmem.available_ram(proc, fs) is None


def test_auto_cache_goes_to_disk_under_a_container_memory_limit(tmp_path, monkeypatch):
    """What decides --data-cache auto is the room the cgroup leaves, not the host's free memory."""
    root = _folder(tmp_path / "imgs")
    monkeypatch.setenv("DIFFUSE_CACHE", str(tmp_path / "cache"))
    proc, fs = _cgroup_tree(tmp_path / "cg", v2=(30_000, 20_000, 0))               # 10 kB left
    real = hostmem.available_ram
    monkeypatch.setattr(hostmem, "available_ram", lambda: real(proc, fs))
    assert load_dataset(str(root), None, "train", image_size=16, channels=3, cache="auto").on_disk
    proc, fs = _cgroup_tree(tmp_path / "cg2", v2=(100 * GiB, GiB, 0))
    monkeypatch.setattr(hostmem, "available_ram", lambda: real(proc, fs))
    assert not load_dataset(str(root), None, "train", image_size=16, channels=3, cache="auto").on_disk


def test_cpu_memory_for_data_placement_is_the_cgroup_limit_where_lower(monkeypatch):
    from diffuse import data
    ram = data.total_memory(torch.device("cpu"))
    monkeypatch.setattr(hostmem, "cgroup_memory_limit", lambda: GiB)
    assert data.total_memory(torch.device("cpu")) == min(ram, GiB)
    assert data.choose_placement(GiB // 2, torch.device("cpu"))[0] == "memmap"      # over 25% of the 1 GiB
    monkeypatch.setattr(hostmem, "cgroup_memory_limit", lambda: None)
    assert data.total_memory(torch.device("cpu")) == ram
