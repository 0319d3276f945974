"""Image datasets held in memory as normalised tensors, and their partitioning across clients.

Datasets are read from local files (IDX for MNIST and Fashion-MNIST, the python pickle batches for
CIFAR-10) by small numpy parsers, so nothing here needs the network or torchvision unless
`download=True`. Partitioning runs flwr-datasets partitioners on the labels alone: a partition is an
int64 array of indices into the training set, the same in every process given the data seed.
"""

from __future__ import annotations

import csv
import functools
import gzip
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

DATASET_NAMES = ("fashion-mnist", "mnist", "cifar10", "synthetic")
PARTITION_SCHEMES = ("iid", "dirichlet", "pathological")

# data_dir when none is given: looked in, and where `download=True` puts files.
DEFAULT_DATA_DIR = Path("~/.cache/fedcmd/data").expanduser()
# Debian package dataset-fashion-mnist.
SYSTEM_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")

# Per-channel mean and std of the training images scaled to [0, 1].
NORMALISATION = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are in none of the places looked at; the message says how to get them."""


@dataclass
class ImageData:
    """A whole dataset in memory: images N x C x H x W float32 (normalised), labels int64."""

    train_x: torch.Tensor = field(repr=False)
    train_y: torch.Tensor = field(repr=False)
    test_x: torch.Tensor = field(repr=False)
    test_y: torch.Tensor = field(repr=False)
    num_classes: int
    in_shape: tuple[int, int, int]
    name: str

    def __str__(self) -> str:
        c, h, w = self.in_shape
        return (
            f"{self.name}: {len(self.train_y)} train / {len(self.test_y)} test images, "
            f"{c}x{h}x{w}, {self.num_classes} classes"
        )


@dataclass(frozen=True)
class SyntheticSpec:
    """Options of the `synthetic` dataset.

    Each class has a fixed random template (N(0, 1) blocks of 4x4 pixels, so it survives pooling);
    an image is its class template plus N(0, noise^2) pixel noise, scaled to unit variance. Any
    model worth testing beats chance. `shape` may be given as "CxHxW".
    """

    num_train: int = 1000
    num_test: int = 200
    shape: tuple[int, int, int] | str = (1, 28, 28)
    num_classes: int = 10
    seed: int = 0
    noise: float = 2.0

    def __post_init__(self) -> None:
        shape = parse_shape(self.shape) if isinstance(self.shape, str) else tuple(int(s) for s in self.shape)
        if len(shape) != 3 or min(shape) <= 0:
            raise ValueError(f"synthetic shape must be three positive sizes (C, H, W), got {self.shape!r}")
        object.__setattr__(self, "shape", shape)
        if self.num_train <= 0 or self.num_test <= 0 or self.num_classes < 2 or self.noise < 0:
            raise ValueError(
                f"synthetic needs num_train > 0, num_test > 0, num_classes >= 2 and noise >= 0, got {self}"
            )


# ---------------------------------------------------------------------------------------- loading


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    download: bool = False,
    synthetic: SyntheticSpec | Mapping[str, Any] | None = None,
) -> ImageData:
    """Load dataset `name` (one of DATASET_NAMES) into memory.

    fashion-mnist: IDX files (plain or .gz) in data_dir, data_dir/FashionMNIST/raw (torchvision's
    layout), then /usr/share/datasets/fashion-mnist (Debian package dataset-fashion-mnist).
    mnist: IDX files in data_dir/MNIST/raw or data_dir. cifar10: data_dir/cifar-10-batches-py.
    data_dir defaults to ~/.cache/fedcmd/data (an empty string counts as not given). With
    download=True, files not found are fetched by torchvision into data_dir. synthetic: generated
    from `synthetic` (a SyntheticSpec, or a mapping of its field names, '-' or '_'), nothing read.
    Decoded files are cached per process, keyed on (name, resolved directory).
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    if synthetic is not None and name != "synthetic":
        raise ValueError(f"synthetic options were given but dataset is {name!r}, not 'synthetic'")
    if name == "synthetic":
        return make_synthetic(_synthetic_spec(synthetic))

    data_dir = Path(data_dir or DEFAULT_DATA_DIR).expanduser()
    directory = _find_files(name, data_dir)
    if directory is None and download:
        _download(name, data_dir)
        directory = _find_files(name, data_dir)
    if directory is None:
        raise DatasetNotFoundError(_not_found_message(name, data_dir))

    decode = _decode_cifar10 if name == "cifar10" else _decode_idx
    train_x, train_y, test_x, test_y = decode(name, str(directory.resolve()))
    mean, std = NORMALISATION[name]
    train_x, test_x = _normalise(train_x, mean, std), _normalise(test_x, mean, std)
    return ImageData(
        train_x=train_x,
        train_y=torch.from_numpy(train_y.astype(np.int64)),
        test_x=test_x,
        test_y=torch.from_numpy(test_y.astype(np.int64)),
        num_classes=10,
        in_shape=tuple(train_x.shape[1:]),
        name=name,
    )


def _candidate_dirs(name: str, data_dir: Path) -> list[Path]:
    if name == "fashion-mnist":
        return [data_dir, data_dir / "FashionMNIST" / "raw", SYSTEM_FASHION_MNIST_DIR]
    if name == "mnist":
        return [data_dir / "MNIST" / "raw", data_dir]
    return [data_dir / CIFAR10_FOLDER, data_dir]


def _idx_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _find_files(name: str, data_dir: Path) -> Path | None:
    """The first candidate directory holding all of the dataset's files."""
    for directory in _candidate_dirs(name, data_dir):
        if name == "cifar10":
            complete = all((directory / f).is_file() for f in CIFAR10_FILES)
        else:
            complete = all(_idx_file(directory, stem) is not None for stem in IDX_FILES.values())
        if complete:
            return directory
    return None


def _not_found_message(name: str, data_dir: Path) -> str:
    looked = ", ".join(str(d) for d in _candidate_dirs(name, data_dir))
    idx_names = ", ".join(f"{stem}.gz" for stem in IDX_FILES.values())
    if name == "fashion-mnist":
        how = (
            "apt-get install dataset-fashion-mnist, or put the IDX files "
            f"({idx_names}; plain or gzipped) in DATA_DIR and set data-dir, "
            "or set download=true when online"
        )
    elif name == "mnist":
        how = (
            f"put the IDX files ({idx_names}; plain or gzipped) in DATA_DIR/MNIST/raw/ "
            "(torchvision's layout) and set data-dir=DATA_DIR, or set download=true when online"
        )
    else:
        how = (
            f"put the python batches ({', '.join(CIFAR10_FILES)}) in DATA_DIR/{CIFAR10_FOLDER}/ "
            "(torchvision's layout) and set data-dir=DATA_DIR, or set download=true when online"
        )
    return f"dataset {name!r} not found (looked in: {looked}). To fix: {how}."


def _download(name: str, root: Path) -> None:
    import torchvision  # slow to import; only needed here

    dataset_class = {
        "fashion-mnist": torchvision.datasets.FashionMNIST,
        "mnist": torchvision.datasets.MNIST,
        "cifar10": torchvision.datasets.CIFAR10,
    }[name]
    root.mkdir(parents=True, exist_ok=True)
    try:
        for train in (True, False):
            dataset_class(root=str(root), train=train, download=True)
    except Exception as err:  # network errors come in many types
        raise DatasetNotFoundError(
            f"download of {name!r} into {root} failed ({err}). " + _not_found_message(name, root)
        ) from err


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file (plain or gzipped): 2 zero bytes, type code, ndim, big-endian int32 dims."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX type code {raw[2]:#04x}")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    dtype = np.dtype(dtypes[raw[2]])
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{path}: size does not match the header's shape {shape}")
    # A native-byte-order copy: writable, and usable by torch.from_numpy.
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


@functools.lru_cache(maxsize=4)
def _decode_idx(name: str, directory: str) -> tuple[np.ndarray, ...]:
    arrays = {key: read_idx(_idx_file(Path(directory), stem)) for key, stem in IDX_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{name} in {directory}: {split} images {images.shape} do not match labels {labels.shape}")
    # Cached and shared: never handed out, only copied (load_dataset normalises into new tensors).
    return tuple(arrays[key][:, None] if key.endswith("_x") else arrays[key] for key in IDX_FILES)


@functools.lru_cache(maxsize=2)
def _decode_cifar10(name: str, directory: str) -> tuple[np.ndarray, ...]:
    # The batches are pickles, as torchvision reads them: only load data_dir contents you trust.
    def read_batch(file_name: str) -> tuple[np.ndarray, np.ndarray]:
        with open(Path(directory) / file_name, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        return images, np.asarray(batch["labels"], dtype=np.int64)

    train = [read_batch(f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = read_batch("test_batch")
    return np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), test_x, test_y


def _normalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 N x C x H x W -> float32 (x / 255 - mean) / std per channel, as a new tensor."""
    x = torch.from_numpy(images).to(torch.float32).div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(mean_t).div_(std_t)


def _synthetic_spec(options: SyntheticSpec | Mapping[str, Any] | None) -> SyntheticSpec:
    if options is None or isinstance(options, SyntheticSpec):
        return options or SyntheticSpec()
    valid = {f.name for f in fields(SyntheticSpec)}
    kwargs = {}
    for key, value in options.items():
        field_name = key.replace("-", "_")
        if field_name not in valid:
            raise ValueError(f"unknown synthetic option {key!r}; valid: {', '.join(sorted(valid))}")
        kwargs[field_name] = value
    return SyntheticSpec(**kwargs)


def parse_shape(text: str) -> tuple[int, int, int]:
    """'1x28x28' -> (1, 28, 28)."""
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3:
        raise ValueError(f"image shape must look like CxHxW (e.g. 1x28x28), got {text!r}")
    return shape


def make_synthetic(spec: SyntheticSpec = SyntheticSpec()) -> ImageData:
    """Generate the synthetic dataset described by `spec` (deterministic from spec.seed)."""
    rng = np.random.default_rng(spec.seed)
    c, h, w = spec.shape
    block = 4
    coarse = rng.normal(size=(spec.num_classes, c, -(-h // block), -(-w // block)))
    templates = coarse.repeat(block, axis=2).repeat(block, axis=3)[:, :, :h, :w].astype(np.float32)
    scale = np.float32(1.0 / np.sqrt(1.0 + spec.noise**2))

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = rng.integers(spec.num_classes, size=n)
        noise = rng.normal(scale=spec.noise, size=(n, c, h, w)).astype(np.float32)
        images = (templates[labels] + noise) * scale
        return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))

    train_x, train_y = sample(spec.num_train)
    test_x, test_y = sample(spec.num_test)
    return ImageData(train_x, train_y, test_x, test_y, spec.num_classes, spec.shape, "synthetic")


# ------------------------------------------------------------------------------------ partitioning


def partition_indices(
    labels: np.ndarray | torch.Tensor | Sequence[int],
    num_partitions: int,
    scheme: str,
    *,
    seed: int,
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    min_partition_size: int = 10,
) -> list[np.ndarray]:
    """Split sample indices 0..N-1 into `num_partitions` int64 arrays with a flwr-datasets partitioner.

    iid: IidPartitioner. dirichlet: DirichletPartitioner on the label with concentration `alpha`,
    resampled until every partition has `min_partition_size` samples. pathological:
    PathologicalPartitioner with `classes_per_partition` classes each, first class of partition i
    being class i mod K ("first-deterministic", as in Li et al. 2021), the others drawn at random;
    each class is split evenly among the partitions holding it, so sizes differ. If
    num_partitions < K some classes are in no partition and their samples are left out (with a
    warning from flwr-datasets).

    The partitioners see the samples in an order permuted by `seed`, because IidPartitioner takes
    contiguous shards without shuffling and PathologicalPartitioner splits each class in order; the
    partitioners' own RNGs are seeded with `seed` too. Same seed, same partitions.
    """
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; valid schemes: {', '.join(PARTITION_SCHEMES)}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    if not 0 < num_partitions <= len(labels):
        raise ValueError(f"num_partitions must be in [1, {len(labels)}], got {num_partitions}")

    import datasets  # slow to import; needed only here
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_partition_size,
            seed=seed,
        )
    else:
        partitioner = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=classes_per_partition,
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    order = np.random.default_rng(seed).permutation(len(labels))
    partitioner.dataset = datasets.Dataset.from_dict({"label": labels[order], "index": order})
    return [
        # The arrow view is ~100x faster than the numpy or python ones here.
        partitioner.load_partition(i).with_format("arrow")["index"].to_numpy().astype(np.int64)
        for i in range(num_partitions)
    ]


def partition_report(
    labels: np.ndarray | torch.Tensor, parts: Sequence[np.ndarray], num_classes: int
) -> list[dict[str, int]]:
    """One row per partition: partition, num_samples, label_0 .. label_{K-1} (sample counts)."""
    labels = np.asarray(labels, dtype=np.int64)
    rows = []
    for partition_id, indices in enumerate(parts):
        counts = np.bincount(labels[indices], minlength=num_classes)
        row = {"partition": partition_id, "num_samples": int(len(indices))}
        row.update({f"label_{k}": int(counts[k]) for k in range(num_classes)})
        rows.append(row)
    return rows


def write_partition_report(rows: Sequence[Mapping[str, int]], path: str | Path) -> None:
    """Write partition_report rows as CSV (columns partition, num_samples, label_0, ...)."""
    if not rows:
        raise ValueError("write_partition_report: no rows")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
