"""Dataset readers (IDX, CIFAR pickles) on files the tests write, and batched augmentation."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ong_kernels.train import augment
from ong_kernels.train.data import (
    DatasetError,
    load_cifar,
    load_dataset,
    load_fashion_mnist,
    make_synthetic,
    read_cifar_pickle,
    read_idx,
)


# ----------------------------------------------------------------------------- IDX
def write_idx(path, array, type_code=0x08, compress=True):
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(raw)


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize(
    "dtype, code", [(np.uint8, 0x08), (np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D)]
)
def test_read_idx_round_trip(tmp_path, compress, dtype, code):
    rng = np.random.default_rng(3)
    array = (rng.integers(0, 250, size=(5, 7, 3)) - (0 if dtype == np.uint8 else 100)).astype(dtype)
    path = tmp_path / "x-idx3-ubyte"
    write_idx(path, array, code, compress)
    out = read_idx(path)
    assert out.dtype == dtype and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, array)


def test_read_idx_rejects_bad_files(tmp_path):
    good = np.arange(30, dtype=np.uint8).reshape(3, 10)
    write_idx(tmp_path / "good", good, compress=False)
    raw = (tmp_path / "good").read_bytes()
    cases = {
        "truncated": raw[:-1],
        "magic": b"\x01" + raw[1:],
        "type": raw[:2] + b"\x07" + raw[3:],
        "extra": raw + b"\x00",
        "empty": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DatasetError, match=str(tmp_path / name)):
            read_idx(tmp_path / name)
    (tmp_path / "badgz").write_bytes(gzip.compress(raw)[:20])
    with pytest.raises(DatasetError, match="badgz"):
        read_idx(tmp_path / "badgz")


def write_fashion(folder, n_train=11, n_test=5, size=6, corrupt=None):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(folder / (name + ".gz"), array)
    if corrupt:
        (folder / (corrupt + ".gz")).write_bytes(b"\x1f\x8bnot really gzip")
    return arrays


def test_fashion_mnist_from_folder(tmp_path):
    arrays = write_fashion(tmp_path)
    ds = load_fashion_mnist(tmp_path)
    assert ds.train_x.shape == (11, 1, 6, 6) and ds.train_x.dtype == torch.uint8
    assert ds.test_y.dtype == torch.int64 and ds.num_classes == 10 and ds.in_channels == 1
    np.testing.assert_array_equal(ds.train_x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test_y.numpy(), arrays["t10k-labels-idx1-ubyte"])
    sub = ds.subset(train=4, test=3)
    assert len(sub.train_y) == 4 and torch.equal(sub.test_x, ds.test_x[:3])


def test_missing_fashion_mnist_says_where_and_how(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset("fashion-mnist", tmp_path / "nowhere")
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "train-images-idx3-ubyte.gz" in msg


def test_corrupt_fashion_mnist_names_the_file(tmp_path):
    write_fashion(tmp_path, corrupt="t10k-labels-idx1-ubyte")
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\.gz.*corrupt"):
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_label_count_mismatch(tmp_path):
    write_fashion(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(3, dtype=np.uint8))
    with pytest.raises(DatasetError, match="train-images"):
        load_fashion_mnist(tmp_path)


# ----------------------------------------------------------------------------- CIFAR
def write_cifar(root, num_classes, n_per_file=4):
    rng = np.random.default_rng(num_classes)
    if num_classes == 10:
        folder, train, test, key = (
            root / "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            ["test_batch"],
            b"labels",
        )
    else:
        folder, train, test, key = root / "cifar-100-python", ["train"], ["test"], b"fine_labels"
    folder.mkdir(parents=True)
    written = {}
    for name in train + test:
        data = rng.integers(0, 256, (n_per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, num_classes, n_per_file).tolist()
        with open(folder / name, "wb") as f:
            # bytes keys, as in the real (Python 2) files
            pickle.dump({b"data": data, key: labels, b"batch_label": b"x"}, f)
        written[name] = (data, labels)
    return folder, train, test, written


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("point_at", ["parent", "folder"])
def test_cifar_pickles(tmp_path, num_classes, point_at):
    folder, train, test, written = write_cifar(tmp_path, num_classes)
    ds = load_cifar(tmp_path if point_at == "parent" else folder, num_classes)
    assert ds.train_x.shape == (4 * len(train), 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32)
    assert ds.num_classes == num_classes and ds.name == f"cifar{num_classes}"
    expected = np.concatenate([written[n][0] for n in train]).reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(ds.train_x.numpy(), expected)
    assert ds.train_y.tolist() == [label for n in train for label in written[n][1]]
    assert ds.test_y.tolist() == written[test[0]][1]


def test_cifar_reader_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f)
    with pytest.raises(DatasetError, match="refusing to load"):
        read_cifar_pickle(path, "labels")
    assert not (tmp_path / "pwned").exists()


def test_cifar_missing_and_malformed(tmp_path):
    with pytest.raises(DatasetError, match=r"cifar-10-python\.tar\.gz"):
        load_cifar(tmp_path, 10)
    with pytest.raises(DatasetError, match=r"no default location"):
        load_dataset("cifar100")
    folder, *_ = write_cifar(tmp_path, 10)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DatasetError, match=r"data_batch_3.*3072"):
        load_cifar(tmp_path, 10)
    (folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"data_batch_3.*corrupt"):
        load_cifar(tmp_path, 10)


def test_synthetic_is_seeded_and_valid():
    a = make_synthetic(30, 10, channels=2, size=5, seed=1)
    b = make_synthetic(30, 10, channels=2, size=5, seed=1)
    c = make_synthetic(30, 10, channels=2, size=5, seed=2)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert a.train_x.shape == (30, 2, 5, 5) and len(a.mean) == 2
    with pytest.raises(ValueError, match="num_train"):
        make_synthetic(0)
    with pytest.raises(ValueError, match="train_subset"):
        a.subset(train=31)


# ----------------------------------------------------------------------------- augmentation
def reference_augment(images, params, padding):
    out = []
    h, w = images.shape[2:]
    for i in range(images.shape[0]):
        padded = F.pad(images[i], (padding,) * 4)
        top, left = int(params.top[i]), int(params.left[i])
        crop = padded[:, top : top + h, left : left + w]
        out.append(crop.flip(-1) if params.flip[i] else crop)
    return torch.stack(out)


@pytest.mark.parametrize(
    "shape, padding", [((7, 3, 11, 9), 3), ((5, 1, 28, 28), 2), ((4, 2, 5, 5), 0)]
)
def test_augment_matches_per_image_reference(shape, padding):
    g = torch.Generator().manual_seed(11)
    images = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    params = augment.draw_params(shape[0], padding, True, g, torch.device("cpu"))
    out = augment.apply(images, params, padding)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, reference_augment(images, params, padding))
    assert params.top.max() <= 2 * padding and params.top.min() >= 0


def test_augment_is_seeded():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return augment.apply(images, augment.draw_params(64, 4, True, g, images.device), 4)

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))
    g = torch.Generator().manual_seed(0)
    noflip = augment.draw_params(64, 4, False, g, images.device)
    assert not noflip.flip.any() and noflip.top.unique().numel() > 1


def test_normalize():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(2, 2, 1, 3)
    out = augment.normalize(x.contiguous(), (0.2, 0.4), (0.5, 0.25))
    expected = (torch.tensor([0.0, 0.2, 1.0]) - torch.tensor([[0.2], [0.4]])) / torch.tensor(
        [[0.5], [0.25]]
    )
    torch.testing.assert_close(out[0, :, 0], expected)
    assert out.dtype == torch.float32
