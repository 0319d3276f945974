import csv
import gzip
import pickle
import struct
import sys
import types

import numpy as np
import pytest
import torch

from fedcmd import data as D
from fedcmd.models import build_model

SCHEMES = D.PARTITION_SCHEMES


def write_idx(path, array, compress):
    array = np.asarray(array, dtype=np.uint8)
    payload = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    payload += array.tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)


def write_idx_dataset(directory, num_train=12, num_test=6, compress=True, seed=0):
    """Small random IDX files with the real names; returns the raw arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_x": rng.integers(0, 256, (num_train, 28, 28)),
        "train_y": np.arange(num_train) % 10,
        "test_x": rng.integers(0, 256, (num_test, 28, 28)),
        "test_y": (np.arange(num_test) + 3) % 10,
    }
    for key, stem in D.IDX_FILES.items():
        write_idx(directory / stem, arrays[key], compress)
    return arrays


def write_cifar10(directory, per_batch=4, seed=0):
    rng = np.random.default_rng(seed)
    folder = directory / D.CIFAR10_FOLDER
    folder.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "data": rng.integers(0, 256, (per_batch, 3072)).astype(np.uint8),
            "labels": rng.integers(0, 10, per_batch).tolist(),
            "batch_label": name,
        }
        (folder / name).write_bytes(pickle.dumps(batch))
        written[name] = batch
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    return written


# ------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, compress):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a-idx3-ubyte", array, compress)
    path = tmp_path / ("a-idx3-ubyte.gz" if compress else "a-idx3-ubyte")
    np.testing.assert_array_equal(D.read_idx(path), array)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="magic"):
        D.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x00")
    with pytest.raises(ValueError, match="size"):
        D.read_idx(tmp_path / "short")


def test_fashion_mnist_from_generated_idx(tmp_path):
    raw = write_idx_dataset(tmp_path, compress=True)
    data = D.load_dataset("fashion-mnist", tmp_path)
    assert data.name == "fashion-mnist" and data.num_classes == 10 and data.in_shape == (1, 28, 28)
    assert data.train_x.shape == (12, 1, 28, 28) and data.test_x.shape == (6, 1, 28, 28)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    (mean,), (std,) = D.NORMALISATION["fashion-mnist"]
    expected = (raw["train_x"][:, None] / 255.0 - mean) / std
    np.testing.assert_allclose(data.train_x.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(data.test_y.numpy(), raw["test_y"])
    before = D._decode_idx.cache_info().hits
    D.load_dataset("fashion-mnist", str(tmp_path))
    assert D._decode_idx.cache_info().hits == before + 1


def test_mnist_from_torchvision_layout(tmp_path):
    raw = write_idx_dataset(tmp_path / "MNIST" / "raw", num_train=10, num_test=5, compress=False)
    data = D.load_dataset("mnist", tmp_path)
    assert data.train_x.shape == (10, 1, 28, 28) and data.test_x.shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(data.train_y.numpy(), raw["train_y"])
    (mean,), (std,) = D.NORMALISATION["mnist"]
    assert data.train_x.min().item() >= (0 - mean) / std - 1e-5
    assert data.train_x.max().item() <= (1 - mean) / std + 1e-5


def test_cifar10_from_pickle_batches(tmp_path):
    batches = write_cifar10(tmp_path, per_batch=4)
    data = D.load_dataset("cifar10", tmp_path)
    assert data.in_shape == (3, 32, 32) and data.num_classes == 10
    assert data.train_x.shape == (20, 3, 32, 32) and data.test_x.shape == (4, 3, 32, 32)
    train_labels = sum((batches[f"data_batch_{i}"]["labels"] for i in range(1, 6)), [])
    np.testing.assert_array_equal(data.train_y.numpy(), train_labels)
    mean, std = D.NORMALISATION["cifar10"]
    first = batches["data_batch_1"]["data"][0].reshape(3, 32, 32) / 255.0
    expected = (first - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    np.testing.assert_allclose(data.train_x[0].numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    not (D.SYSTEM_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist(tmp_path):
    data = D.load_dataset("fashion-mnist", tmp_path)  # empty data_dir: falls through to /usr/share
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.train_y).tolist() == [6000] * 10
    assert abs(data.train_x.mean().item()) < 0.01 and abs(data.train_x.std().item() - 1) < 0.01


def test_missing_data_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "not-installed")
    with pytest.raises(D.DatasetNotFoundError) as err:
        D.load_dataset("fashion-mnist", tmp_path)
    assert isinstance(err.value, FileNotFoundError)
    message = str(err.value)
    for needle in ("apt-get install dataset-fashion-mnist", "train-images-idx3-ubyte.gz"):
        assert needle in message
    assert "data-dir" in message and "download=true" in message
    with pytest.raises(D.DatasetNotFoundError, match="MNIST/raw"):
        D.load_dataset("mnist", tmp_path)
    with pytest.raises(D.DatasetNotFoundError, match="cifar-10-batches-py"):
        D.load_dataset("cifar10", tmp_path)


def test_incomplete_files_count_as_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "not-installed")
    write_idx_dataset(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(D.DatasetNotFoundError):
        D.load_dataset("fashion-mnist", tmp_path)


def fake_torchvision(fetch):
    """A stand-in for torchvision whose dataset classes call `fetch(root, train)`."""

    class FakeDataset:
        def __init__(self, root, train, download=False):
            assert download
            fetch(root, train)

    datasets = types.SimpleNamespace(MNIST=FakeDataset, FashionMNIST=FakeDataset, CIFAR10=FakeDataset)
    return types.SimpleNamespace(datasets=datasets)


def test_download_fetches_into_data_dir(tmp_path, monkeypatch):
    def fetch(root, train):
        if train:
            write_idx_dataset(tmp_path / "MNIST" / "raw", num_train=8, num_test=4)

    monkeypatch.setitem(sys.modules, "torchvision", fake_torchvision(fetch))
    with pytest.raises(D.DatasetNotFoundError):
        D.load_dataset("mnist", tmp_path)
    data = D.load_dataset("mnist", tmp_path, download=True)
    assert data.train_x.shape == (8, 1, 28, 28)


def test_failed_download_says_what_to_do(tmp_path, monkeypatch):
    def fetch(root, train):
        raise OSError("network is unreachable")

    monkeypatch.setitem(sys.modules, "torchvision", fake_torchvision(fetch))
    with pytest.raises(D.DatasetNotFoundError, match="network is unreachable.*cifar-10-batches-py"):
        D.load_dataset("cifar10", tmp_path, download=True)


def test_unknown_dataset_names_valid_ones():
    with pytest.raises(ValueError, match="fashion-mnist, mnist, cifar10, synthetic"):
        D.load_dataset("imagenet")


def test_synthetic_shapes_and_determinism():
    spec = {"num-train": 50, "num-test": 20, "shape": "3x16x12", "num-classes": 4, "seed": 1}
    a = D.load_dataset("synthetic", synthetic=spec)
    b = D.load_dataset("synthetic", synthetic=D.SyntheticSpec(50, 20, (3, 16, 12), 4, seed=1))
    c = D.load_dataset("synthetic", synthetic={**spec, "seed": 2})
    assert a.train_x.shape == (50, 3, 16, 12) and a.test_x.shape == (20, 3, 16, 12)
    assert a.in_shape == (3, 16, 12) and a.num_classes == 4 and a.train_y.dtype == torch.int64
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)


def test_synthetic_option_errors():
    with pytest.raises(ValueError, match="num_rows"):
        D.load_dataset("synthetic", synthetic={"num_rows": 5})
    with pytest.raises(ValueError, match="CxHxW"):
        D.load_dataset("synthetic", synthetic={"shape": "28x28"})
    with pytest.raises(ValueError, match="not 'synthetic'"):
        D.load_dataset("mnist", synthetic={"num_train": 5})


def test_synthetic_is_learnable():
    data = D.load_dataset("synthetic", synthetic={"num_train": 500, "num_test": 200, "seed": 0})
    torch.manual_seed(0)
    model = build_model("mlp", data.in_shape, data.num_classes)
    # Plain SGD by hand: building a torch.optim optimiser first imports torch._dynamo (~2 s).
    for _ in range(3):
        for start in range(0, 500, 50):
            model.zero_grad()
            batch = slice(start, start + 50)
            torch.nn.functional.cross_entropy(model(data.train_x[batch]), data.train_y[batch]).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.05 * p.grad
    with torch.no_grad():
        accuracy = (model(data.test_x).argmax(1) == data.test_y).float().mean().item()
    assert accuracy > 0.5  # chance is 0.1


# -------------------------------------------------------------------------------- partitioning


@pytest.fixture(scope="module")
def labels():
    return np.random.default_rng(0).integers(0, 10, 600)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partitions_cover_without_overlap_and_are_deterministic(labels, scheme):
    parts = D.partition_indices(labels, 10, scheme, seed=3)
    again = D.partition_indices(torch.from_numpy(labels), 10, scheme, seed=3)
    other = D.partition_indices(labels, 10, scheme, seed=4)
    assert len(parts) == 10 and all(p.dtype == np.int64 for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    assert all(np.array_equal(p, q) for p, q in zip(parts, again))
    assert not all(np.array_equal(p, q) for p, q in zip(parts, other))


def test_iid_partitions_are_even_and_shuffled(labels):
    parts = D.partition_indices(labels, 7, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert not np.array_equal(np.concatenate(parts), np.arange(len(labels)))


def test_dirichlet_is_skewed_and_respects_min_size(labels):
    def mean_top_class_share(parts):
        return np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts])

    skewed = D.partition_indices(labels, 5, "dirichlet", seed=0, alpha=0.1, min_partition_size=20)
    assert min(len(p) for p in skewed) >= 20
    iid = D.partition_indices(labels, 5, "iid", seed=0)
    assert mean_top_class_share(skewed) > mean_top_class_share(iid) + 0.2


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_has_at_most_k_classes(labels, k):
    parts = D.partition_indices(labels, 10, "pathological", seed=0, classes_per_partition=k)
    classes = [set(labels[p].tolist()) for p in parts]
    assert all(len(c) <= k for c in classes)
    assert set().union(*classes) == set(range(10))  # first-deterministic: every class used


def test_pathological_with_fewer_partitions_than_classes_drops_samples(labels):
    with pytest.warns(UserWarning, match="will NOT be used"):
        parts = D.partition_indices(labels, 3, "pathological", seed=0, classes_per_partition=2)
    assert all(len(set(labels[p].tolist())) <= 2 for p in parts)
    assert sum(len(p) for p in parts) < len(labels)


def test_unknown_scheme_names_valid_ones(labels):
    with pytest.raises(ValueError, match="iid, dirichlet, pathological"):
        D.partition_indices(labels, 2, "shards", seed=0)


def test_partition_report_and_csv(tmp_path, labels):
    parts = D.partition_indices(labels, 4, "dirichlet", seed=0)
    rows = D.partition_report(labels, parts, 10)
    assert [r["partition"] for r in rows] == [0, 1, 2, 3]
    for row, part in zip(rows, parts):
        assert row["num_samples"] == len(part) == sum(row[f"label_{k}"] for k in range(10))
    path = tmp_path / "out" / "partitions.csv"
    D.write_partition_report(rows, path)
    with path.open() as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == ["partition", "num_samples"] + [f"label_{k}" for k in range(10)]
    assert [int(r["num_samples"]) for r in read] == [len(p) for p in parts]
