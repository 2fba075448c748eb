"""Data loading: real MNIST files, the downloader against a local server, CIFAR-10's format,
image folders (with a corrupt file), and the batch stream's resumability."""

from __future__ import annotations

import functools
import http.server
import pickle
import tarfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse import data as D
from diffuse.errors import DiffuseError

from .conftest import MNIST_DIR, needs_mnist


@needs_mnist
def test_mnist_from_shared_files():
    ds = D.load_dataset("mnist", MNIST_DIR.parent, "train")
    assert ds.images.shape == (60000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels.shape == (60000,) and set(ds.labels.unique().tolist()) == set(range(10))
    # The first training image of MNIST is a 5, with ink in its centre.
    assert int(ds.labels[0]) == 5 and ds.images[0, 0, 10:18, 10:18].float().mean() > 50
    test = D.load_dataset("mnist", MNIST_DIR.parent, "test")
    assert len(test) == 10000 and int(test.labels[0]) == 7


@needs_mnist
def test_mnist_resize_and_channels():
    ds = D.load_dataset("mnist", MNIST_DIR.parent, "test", image_size=32, channels=3)
    assert ds.images.shape == (10000, 3, 32, 32)
    assert torch.equal(ds.images[:, 0], ds.images[:, 2])


def _serve(folder: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@needs_mnist
def test_download_verifies_md5_from_a_local_mirror(tmp_path, monkeypatch):
    server = _serve(MNIST_DIR)
    try:
        port = server.server_address[1]
        monkeypatch.setitem(D.MIRRORS, "mnist", ["http://127.0.0.1:1/nothing/", f"http://127.0.0.1:{port}/"])
        ds = D.load_dataset("mnist", tmp_path, "test")          # first mirror refuses, second serves
        assert len(ds) == 10000
        for fn, md5 in D.IDX_FILES["mnist"]["test"]:
            assert D.md5sum(tmp_path / "mnist" / fn) == md5
        assert not list((tmp_path / "mnist").glob(".*part"))    # no temporary files left
    finally:
        server.shutdown()


@needs_mnist
def test_download_rejects_wrong_bytes(tmp_path, monkeypatch):
    fake = tmp_path / "mirror"
    fake.mkdir()
    for fn, _ in D.IDX_FILES["mnist"]["test"]:
        (fake / fn).write_bytes(b"not mnist")
    server = _serve(fake)
    try:
        monkeypatch.setitem(D.MIRRORS, "mnist", [f"http://127.0.0.1:{server.server_address[1]}/"])
        with pytest.raises(DiffuseError, match="md5"):
            D.load_dataset("mnist", tmp_path / "root", "test")
        assert not (tmp_path / "root" / "mnist" / "t10k-images-idx3-ubyte.gz").exists()
    finally:
        server.shutdown()


def test_offline_error_names_files_and_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(D.MIRRORS, "fashion-mnist", ["http://127.0.0.1:1/"])
    with pytest.raises(DiffuseError) as e:
        D.load_dataset("fashion-mnist", tmp_path, "train")
    msg = str(e.value)
    assert "train-images-idx3-ubyte.gz" in msg and str(tmp_path / "fashion-mnist") in msg
    assert "\n" not in msg


def test_offline_attempt_leaves_no_empty_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(D.MIRRORS, "mnist", ["http://127.0.0.1:1/"])
    root = tmp_path / "cache" / "data"                     # neither exists yet
    with pytest.raises(DiffuseError, match="cannot download"):
        D.load_dataset("mnist", root, "train")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()                             # folders that were there stay
    with pytest.raises(DiffuseError, match="cannot download"):
        D.load_dataset("mnist", tmp_path / "mine", "train")
    assert (tmp_path / "mine").is_dir() and list((tmp_path / "mine").iterdir()) == []


def test_corrupt_local_file_is_reported(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(DiffuseError, match="corrupt"):
        D.load_dataset("mnist", tmp_path, "test")


def test_idx_parser_on_handmade_file(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + (4).to_bytes(4, "big") + arr.tobytes()
    (tmp_path / "x.idx").write_bytes(raw)
    assert np.array_equal(D.read_idx(tmp_path / "x.idx"), arr)
    (tmp_path / "short.idx").write_bytes(raw[:-3])
    with pytest.raises(DiffuseError, match="truncated"):
        D.read_idx(tmp_path / "short.idx")


def _cifar_batch(n: int, seed: int) -> tuple[bytes, np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    return pickle.dumps({b"batch_label": b"x", b"labels": labels, b"data": data, b"filenames": []}, 2), data, labels


def _make_cifar(tmp_path: Path) -> tuple[Path, np.ndarray, list[int]]:
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    all_data, all_labels = [], []
    for i in range(1, 6):
        raw, d, l = _cifar_batch(4, i)
        (folder / f"data_batch_{i}").write_bytes(raw)
        all_data.append(d)
        all_labels += l
    raw, _, _ = _cifar_batch(3, 99)
    (folder / "test_batch").write_bytes(raw)
    return folder, np.concatenate(all_data), all_labels


def test_cifar10_extracted_batches(tmp_path):
    _, data, labels = _make_cifar(tmp_path)
    ds = D.load_dataset("cifar10", tmp_path, "train")
    assert ds.images.shape == (20, 3, 32, 32)
    assert torch.equal(ds.images, torch.from_numpy(data.reshape(-1, 3, 32, 32)))
    assert ds.labels.tolist() == labels and ds.class_names[0] == "airplane"
    assert len(D.load_dataset("cifar10", tmp_path, "test")) == 3


def test_cifar10_tarball_with_md5(tmp_path, monkeypatch):
    folder, data, _ = _make_cifar(tmp_path / "src")
    root = tmp_path / "root" / "cifar10"
    root.mkdir(parents=True)
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    monkeypatch.setattr(D, "CIFAR10_ARCHIVE", ("cifar-10-python.tar.gz", D.md5sum(archive)))
    ds = D.load_dataset("cifar10", tmp_path / "root", "train")
    assert torch.equal(ds.images, torch.from_numpy(data.reshape(-1, 3, 32, 32)))


def test_cifar_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))
    with pytest.raises(DiffuseError, match="not a CIFAR-10"):
        D.read_cifar_batch(pickle.dumps({b"data": Evil()}), "evil")


def _png(path: Path, color, size=(20, 12), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_folder_with_classes_and_a_corrupt_file(tmp_path):
    _png(tmp_path / "cats" / "a.png", (255, 0, 0))
    _png(tmp_path / "cats" / "sub" / "b.jpg", (250, 0, 0))
    _png(tmp_path / "dogs" / "c.webp", (0, 0, 255))
    (tmp_path / "dogs" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "dogs" / "notes.txt").write_text("ignored")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = D.load_dataset(str(tmp_path), image_size=8)
    assert any("skipped 1 unreadable" in str(x.message) for x in w)
    assert ds.images.shape == (3, 3, 8, 8)
    assert ds.class_names == ["cats", "dogs"] and ds.labels.tolist() == [0, 0, 1]
    assert ds.images[2, 2].float().mean() > 200 and ds.images[2, 0].float().mean() < 10   # blue dog


def test_folder_grayscale_inferred_and_crop(tmp_path):
    img = Image.new("L", (30, 10), 0)
    img.paste(255, (10, 0, 20, 10))           # white centre band, black sides
    img.save(tmp_path / "g.png")
    ds = D.load_dataset(str(tmp_path), image_size=10)
    assert ds.images.shape == (1, 1, 10, 10)
    assert ds.images.float().mean() > 250      # center crop keeps only the white band
    assert ds.labels is None


def test_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DiffuseError, match="no images"):
        D.load_dataset(str(tmp_path))
    with pytest.raises(DiffuseError, match="unknown data set"):
        D.load_dataset(str(tmp_path / "missing"))


def test_digits_embedded_split():
    train = D.load_dataset("digits")
    test = D.load_dataset("digits", split="test")
    assert train.images.shape == (1500, 1, 16, 16) and len(test) == 297
    assert train.images.max() == 255 and train.num_classes == 10


def test_batch_stream_is_a_pure_function_of_step():
    ds = D.ImageSet(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous(),
                    torch.arange(10), [str(i) for i in range(10)], "toy", "train")
    a = D.BatchStream(ds, 4, seed=3, device=torch.device("cpu"), flip=False)
    seen = torch.cat([a.indices(k) for k in range(5)])          # 20 positions = exactly 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    b = D.BatchStream(ds, 4, seed=3, device=torch.device("cpu"), flip=False)
    assert torch.equal(b.indices(3), a.indices(3))              # fresh stream, same batch
    x, y = b.batch(3)
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert torch.allclose((x[:, 0, 0, 0] + 1) * 127.5, y.float())


def test_flips_are_seeded_per_step():
    img = torch.zeros(1, 1, 2, 2, dtype=torch.uint8)
    img[..., 0] = 255
    ds = D.ImageSet(img.expand(64, 1, 2, 2).contiguous(), None, None, "toy", "train")
    s = D.BatchStream(ds, 64, seed=0, device=torch.device("cpu"), flip=True)
    x, _ = s.batch(0)
    flipped = (x[:, 0, 0, 1] > 0).float().mean()
    assert 0.25 < flipped < 0.75
    assert torch.equal(s.batch(0)[0], x)


def test_placement_threshold_decision():
    gib = 2 ** 30
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    pick = lambda n, dev, **kw: D.choose_placement(n, dev, device_bytes=16 * gib, host_bytes=64 * gib, **kw)[0]  # noqa: E731
    assert pick(4 * gib, cuda) == "device"                       # 25% of 16 GiB
    assert pick(4 * gib + 1, cuda) == "host"
    assert pick(32 * gib, cuda) == "host" and pick(32 * gib + 1, cuda) == "memmap"   # 50% of 64 GiB RAM
    assert pick(4 * gib + 1, cpu) == "memmap"                    # on the CPU, host memory is the device
    assert pick(8 * gib, cuda, device_fraction=0.5) == "device"
    assert pick(1, cuda, setting="memmap") == "memmap"
    with pytest.raises(DiffuseError, match="placement"):
        D.choose_placement(1, cpu, "disk")
    why = D.choose_placement(3 * gib, cpu, device_bytes=8 * gib, host_bytes=8 * gib)[1]
    assert "memory map" in why and "3.00 GiB" in why


def test_every_placement_gives_identical_batches(tmp_path):
    ds = D.load_dataset("digits")
    streams = [D.BatchStream(ds, 48, seed=5, device=torch.device("cpu"), flip=True, placement=p,
                             memmap_path=tmp_path / "m.u8") for p in ("device", "host", "memmap")]
    assert (tmp_path / "m.u8").stat().st_size == ds.images.numel()          # the images, as a file on disk
    for step in (0, 7, 31, 32):                                   # 31 and 32 straddle the epoch at 1500
        (xa, ya), (xb, yb), (xc, yc) = (s.batch(step) for s in streams)
        assert torch.equal(xa, xb) and torch.equal(xa, xc) and torch.equal(ya, yb) and torch.equal(ya, yc)


def test_indices_are_the_positions_of_the_epoch_stream():
    """Slicing the epochs' permutations gives exactly positions [kB, (k+1)B) of the stream
    (the original definition, checked independently here)."""
    ds = D.load_dataset("digits")
    s = D.BatchStream(ds, 700, seed=1, device=torch.device("cpu"), flip=False)
    perms = [torch.randperm(len(ds), generator=D.generator(1, "epoch", e)) for e in range(4)]
    stream = torch.cat(perms)
    for k in range(6):
        assert torch.equal(s.indices(k), stream[k * 700:(k + 1) * 700])


def test_upscale_is_bicubic_clamped_and_leaves_its_own_size_alone():
    from diffuse.images import upscale
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert upscale(x, None) is x and upscale(x, 8) is x
    y = upscale(x, 16)
    assert y.shape == (2, 3, 16, 16) and y.min() >= -1 and y.max() <= 1
    ref = torch.nn.functional.interpolate(x, size=(16, 16), mode="bicubic", align_corners=False)
    assert ref.min() < -1 or ref.max() > 1          # the kernel overshoots on this noise: the clamp matters
    assert torch.equal(y, ref.clamp(-1, 1))
    assert torch.allclose(upscale(torch.full((1, 1, 4, 4), 0.25), 12), torch.tensor(0.25))   # flat stays flat
