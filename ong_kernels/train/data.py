"""Datasets as device-resident tensors: CIFAR-10/100, Fashion-MNIST, and a synthetic set.

No torchvision (it does not install beside our torch here) and no DataLoader: the
datasets used here are small (CIFAR-10's training set is 150 MB as uint8), so every image
is kept on the training device as one ``uint8`` tensor of shape (N, C, H, W) and batches
are cut out of it by index. Augmentation then runs as batched tensor ops on that device
(see :mod:`ong_kernels.train.augment`), which removes the data-loading bottleneck that
dominates small-model training on CPU worker processes.

Readers:

* :func:`read_idx` - the IDX format of MNIST / Fashion-MNIST (optionally gzip-compressed).
* :func:`read_cifar_pickle` - one CIFAR "python version" batch file, read with an
  unpickler that only accepts numpy arrays and plain containers, so a tampered dataset
  file cannot run code.

A missing or corrupt dataset raises :class:`DatasetError`, which names every place looked
at and how to obtain the data.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIRS",
    "DatasetError",
    "ImageDataset",
    "load_cifar",
    "load_dataset",
    "load_fashion_mnist",
    "make_synthetic",
    "read_cifar_pickle",
    "read_idx",
]

DATASETS = ("cifar10", "cifar100", "fashion-mnist", "synthetic")

# Where the Debian/Ubuntu package `dataset-fashion-mnist` installs the four IDX files.
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
_FASHION_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
_FASHION_MNIST_HELP = (
    "install it with `apt-get install dataset-fashion-mnist` (files land in "
    "/usr/share/datasets/fashion-mnist), or download the four *-ubyte.gz files from "
    "https://github.com/zalandoresearch/fashion-mnist (data/fashion) into a folder and pass "
    "--data-dir FOLDER"
)
_CIFAR_LAYOUT = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
    100: ("cifar-100-python", ["train"], ["test"]),
}
_CIFAR_HELP = (
    "download the CIFAR-{n} python version from https://www.cs.toronto.edu/~kriz/cifar.html "
    "(cifar-{n}-python.tar.gz), extract it, and pass --data-dir pointing at the extracted "
    "'{folder}' folder or its parent"
)

# Per-channel statistics of the training sets (pixel values scaled to [0, 1]), the
# values every CIFAR / Fashion-MNIST reference implementation normalises with.
_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}


class DatasetError(RuntimeError):
    """A dataset is missing, unreadable or malformed; the message says where and what to do."""


@dataclass(frozen=True)
class ImageDataset:
    """A classification dataset held as tensors.

    Images are ``uint8`` (N, C, H, W); labels are ``int64`` (N,). ``mean``/``std`` are the
    per-channel normalisation statistics on the [0, 1] scale; ``crop_padding`` and
    ``flip`` describe the standard training augmentation for this dataset.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 4
    flip: bool = True

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise DatasetError(f"{self.name}: {split} images must be uint8 (N, C, H, W)")
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise DatasetError(f"{self.name}: {split} labels must be int64 of shape (N,)")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise DatasetError(
                    f"{self.name}: {split} labels outside [0, {self.num_classes - 1}]"
                )
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise DatasetError(f"{self.name}: train and test images differ in shape")
        if not len(self.mean) == len(self.std) == self.in_channels:
            raise DatasetError(f"{self.name}: mean/std need one value per channel")

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_x.shape[2]), int(self.train_x.shape[3])

    def to(self, device: torch.device | str) -> ImageDataset:
        """The same dataset with every tensor on ``device``."""
        return replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
        )

    def subset(self, train: int | None = None, test: int | None = None) -> ImageDataset:
        """The first ``train`` training and ``test`` test examples (None keeps all).

        Taking a prefix keeps subsets nested and identical across runs and methods; the
        datasets here are stored in shuffled order, so a prefix is class-balanced enough.
        """
        for arg, value, size in (
            ("train_subset", train, len(self.train_y)),
            ("test_subset", test, len(self.test_y)),
        ):
            if value is not None and (isinstance(value, bool) or not 0 < value <= size):
                raise ValueError(f"{arg}: expected an int in [1, {size}], got {value!r}")
        return replace(
            self,
            train_x=self.train_x[:train],
            train_y=self.train_y[:train],
            test_x=self.test_x[:test],
            test_y=self.test_y[:test],
        )


# --------------------------------------------------------------------------- IDX
# IDX type codes -> numpy big-endian dtypes (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open_maybe_gzip(path: Path):
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not) into a numpy array of its shape and type."""
    path = Path(path)
    try:
        with _open_maybe_gzip(path) as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DatasetError(f"{path}: cannot read IDX file ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path}: not an IDX file (bad magic number {raw[:4]!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DatasetError(
            f"{path}: IDX file has {len(raw)} bytes, its header {shape} implies {expected}"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def _find_fashion_mnist(data_dir: str | os.PathLike | None) -> dict[str, Path]:
    candidates = [Path(data_dir)] if data_dir is not None else [Path(d) for d in FASHION_MNIST_DIRS]
    for folder in candidates:
        found = {}
        for key, stem in _FASHION_MNIST_FILES.items():
            for name in (stem + ".gz", stem):
                if (folder / name).is_file():
                    found[key] = folder / name
                    break
        if len(found) == len(_FASHION_MNIST_FILES):
            return found
    looked = ", ".join(str(c) for c in candidates)
    names = ", ".join(s + ".gz" for s in _FASHION_MNIST_FILES.values())
    raise DatasetError(
        f"Fashion-MNIST not found: looked for {names} in {looked}; {_FASHION_MNIST_HELP}"
    )


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> ImageDataset:
    """Fashion-MNIST from ``data_dir`` or, by default, the Debian package's folder."""
    files = _find_fashion_mnist(data_dir)
    arrays = {}
    for key, path in files.items():
        try:
            arrays[key] = read_idx(path)
        except DatasetError as err:
            raise DatasetError(f"{err}; the file is corrupt: {_FASHION_MNIST_HELP}") from err
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or x.dtype != np.uint8:
            raise DatasetError(
                f"{files[f'{split}_x']}: expected uint8 images (N, H, W) and N labels, got "
                f"{x.dtype} {x.shape} and {y.shape}; {_FASHION_MNIST_HELP}"
            )
    mean, std = _STATS["fashion-mnist"]
    return ImageDataset(
        name="fashion-mnist",
        train_x=torch.from_numpy(arrays["train_x"].copy()).unsqueeze(1),
        train_y=torch.from_numpy(arrays["train_y"].astype(np.int64)),
        test_x=torch.from_numpy(arrays["test_x"].copy()).unsqueeze(1),
        test_y=torch.from_numpy(arrays["test_y"].astype(np.int64)),
        num_classes=10,
        mean=mean,
        std=std,
        # Pad 2, not CIFAR's 4: the garments are centred and nearly fill the 28x28 frame,
        # so a 4-pixel shift would crop away parts of the object.
        crop_padding=2,
        flip=True,
    )


# --------------------------------------------------------------------------- CIFAR
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only numpy arrays and builtin containers: CIFAR batches need no more."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
        }
    )

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")
        if name == "ndarray":
            return np.ndarray
        if name == "dtype":
            return np.dtype
        core = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed numpy.core
        return getattr(core.multiarray, name)


def read_cifar_pickle(path: str | os.PathLike, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python-version batch file -> (uint8 images (N, 3, 32, 32), int64 labels)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as err:
        raise DatasetError(f"{path}: cannot read CIFAR batch ({err})") from err
    if not isinstance(batch, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise DatasetError(f"{path}: missing 'data' or '{label_key}' (keys: {sorted(batch)})")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise DatasetError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(data_dir: str | os.PathLike | None, num_classes: int = 10) -> ImageDataset:
    """CIFAR-10 or CIFAR-100 from the extracted python-version folder (or its parent)."""
    if num_classes not in _CIFAR_LAYOUT:
        raise ValueError(f"num_classes: CIFAR has 10 or 100 classes, got {num_classes!r}")
    folder_name, train_files, test_files = _CIFAR_LAYOUT[num_classes]
    how = _CIFAR_HELP.format(n=num_classes, folder=folder_name)
    if data_dir is None:
        raise DatasetError(f"CIFAR-{num_classes} has no default location: {how}")
    root = Path(data_dir)
    candidates = [root, root / folder_name]
    folder = next((c for c in candidates if all((c / f).is_file() for f in train_files)), None)
    if folder is None or not all((folder / f).is_file() for f in test_files):
        looked = " and ".join(str(c) for c in candidates)
        raise DatasetError(
            f"CIFAR-{num_classes} not found: looked for {', '.join(train_files + test_files)} "
            f"in {looked}; {how}"
        )
    label_key = "labels" if num_classes == 10 else "fine_labels"

    def read(files):
        try:
            parts = [read_cifar_pickle(folder / f, label_key) for f in files]
        except DatasetError as err:
            raise DatasetError(f"{err}; the dataset looks corrupt: {how}") from err
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        return torch.from_numpy(x), torch.from_numpy(y)

    train_x, train_y = read(train_files)
    test_x, test_y = read(test_files)
    name = f"cifar{num_classes}"
    mean, std = _STATS[name]
    return ImageDataset(name, train_x, train_y, test_x, test_y, num_classes, mean, std, 4, True)


# --------------------------------------------------------------------------- synthetic
def make_synthetic(
    num_train: int = 512,
    num_test: int = 256,
    *,
    num_classes: int = 10,
    channels: int = 3,
    size: int = 16,
    seed: int = 0,
) -> ImageDataset:
    """A small learnable dataset for tests: each class is a random prototype image, each
    example its class prototype plus uniform noise (so accuracy rises above chance within an
    epoch or two), all drawn from a seeded generator."""
    for arg, value in (
        ("num_train", num_train),
        ("num_test", num_test),
        ("num_classes", num_classes),
        ("channels", channels),
        ("size", size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg}: expected a positive int, got {value!r}")
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randint(0, 256, (num_classes, channels, size, size), generator=g)

    def split(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        noise = torch.randint(-80, 81, (n, channels, size, size), generator=g)
        x = (prototypes[y] + noise).clamp_(0, 255).to(torch.uint8)
        return x, y

    train_x, train_y = split(num_train)
    test_x, test_y = split(num_test)
    xf = train_x.double() / 255
    mean = tuple(xf.mean(dim=(0, 2, 3)).tolist())
    std = tuple(xf.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    return ImageDataset(
        "synthetic", train_x, train_y, test_x, test_y, num_classes, mean, std, size // 8, True
    )


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    train_subset: int | None = None,
    test_subset: int | None = None,
    synthetic_shape: Sequence[int] = (512, 256, 3, 16),
    seed: int = 0,
) -> ImageDataset:
    """Load a dataset of :data:`DATASETS` by name, optionally cut to a prefix subset.

    ``synthetic_shape`` is (num_train, num_test, channels, size) for ``"synthetic"``.
    """
    if name == "fashion-mnist":
        ds = load_fashion_mnist(data_dir)
    elif name in ("cifar10", "cifar100"):
        ds = load_cifar(data_dir, 10 if name == "cifar10" else 100)
    elif name == "synthetic":
        n_train, n_test, channels, size = synthetic_shape
        ds = make_synthetic(n_train, n_test, channels=channels, size=size, seed=seed)
    else:
        raise ValueError(
            f"dataset: unknown dataset {name!r}; expected one of {', '.join(DATASETS)}"
        )
    return ds.subset(train_subset, test_subset)
