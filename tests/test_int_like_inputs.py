"""Integer-like values are ints, names are strings, and an option the method does not read is
refused (issue 29 row 7): np.int64 (what np.arange gives) and 0-d integer tensors work wherever
an int does; names=[1] is a TypeError; `ong-train --method dense --sparsity 0.9` is refused
instead of training a dense network silently."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ong_kernels
from ong_kernels._validate import check_int, check_seed
from ong_kernels.train import cli
from ong_kernels.train.config import TrainConfig


@pytest.mark.parametrize("value", [np.int64(3), np.int32(3), np.uint8(3), torch.tensor(3)])
def test_check_int_takes_integer_like_values_as_python_ints(value):
    assert check_int(value, "rank", 1) == 3 and type(check_int(value, "rank", 1)) is int
    assert type(check_seed(value)) is int


@pytest.mark.parametrize(
    "value", [True, np.bool_(True), 3.0, np.float64(3.0), torch.tensor([3]), torch.tensor(3.0),
              torch.tensor(True), "3"],
)  # fmt: skip
def test_check_int_still_refuses_what_is_not_an_int(value):
    with pytest.raises(TypeError, match="rank must be an int"):
        check_int(value, "rank")


def test_nmf_batched_takes_numpy_and_tensor_ints():
    v = [torch.rand(6, 7), torch.rand(5, 4)]
    expected = ong_kernels.nmf_batched(v, [3, 2], seed=[4, 5], max_iter=10)
    ranks, seeds = np.arange(3, 1, -1), np.arange(4, 6)  # np.int64 entries
    for got in (
        ong_kernels.nmf_batched(v, list(ranks), seed=list(seeds), max_iter=np.int64(10)),
        ong_kernels.nmf_batched(v, [torch.tensor(3), 2], seed=[torch.tensor(4), 5], max_iter=10),
    ):
        for (w, h), (w1, h1) in zip(got, expected, strict=True):
            assert torch.equal(w, w1) and torch.equal(h, h1)
    ((w, _),) = ong_kernels.nmf_batched([v[0]], np.int64(2), seed=np.int64(4), max_iter=5)
    assert w.shape == (6, 2)


def test_prune_takes_numpy_ints():
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4))
    result = ong_kernels.prune(model, "ong", 0.5, seed=np.int64(1), rank=np.int64(2), max_iter=5)
    assert sum(int((~m).sum()) for m in result.masks.values()) == 36


def test_names_must_be_strings():
    with pytest.raises(TypeError, match=r"names\[1\] must be a str, got int"):
        ong_kernels.nmf_batched([torch.rand(3, 4), torch.rand(2, 2)], 2, names=["a", 1])
    with pytest.raises(TypeError, match="names must be a list of strings"):
        ong_kernels.nmf_batched([torch.rand(3, 4)], 2, names="a")


def test_train_config_stores_plain_ints():
    cfg = TrainConfig(seed=np.int64(3), epochs=torch.tensor(2), milestones=[np.int64(1)])
    assert type(cfg.seed) is int and type(cfg.epochs) is int and type(cfg.milestones[0]) is int
    json.dumps(cfg.to_dict())  # config.json: np.int64 is not JSON


def test_options_a_method_ignores_are_named():
    from ong_kernels.train.config import unused_options

    assert unused_options("dense", {"sparsity": 0.9, "scope": "layer"}) == ["--sparsity", "--scope"]
    assert unused_options("dense", {"sparsity": 0.0}) == []
    assert unused_options("ong", {"prune_batches": 2}) == ["--prune-batches"]
    assert unused_options("snip", {"prune_batches": 2, "sparsity": 0.5}) == []


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--method", "dense", "--sparsity", "0.9"], "--sparsity"),
        (["--method", "dense", "--method-kwargs", '{"rank": 4}'], "--method-kwargs"),
        (["--method", "magnitude", "--prune-batches", "4"], "--prune-batches"),
    ],
)
def test_ong_train_refuses_an_option_the_method_ignores(tmp_path, capsys, argv, flag):
    run = tmp_path / "run"
    tiny = ["--dataset", "synthetic", "--synthetic-shape", "64", "32", "1", "8", "--epochs", "1",
            "--batch-size", "32", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert cli.train_main([*argv, "--run-dir", str(run), *tiny]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err and "silently ignored" in err
    assert not run.exists()


def test_ong_sweep_warns_once_about_an_option_no_method_reads(tmp_path, capsys, monkeypatch):
    # A warning, not a refusal: re-running a sweep's command with fewer --methods (to extend
    # its table) keeps options only the dropped methods read.
    monkeypatch.setattr(cli, "run_sweep", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    argv = ["--methods", "dense", "--sparsities", "0.5", "--prune-batches", "2"]
    cli.sweep_main([*argv, "--out-dir", str(tmp_path / "s"), "--dataset", "synthetic"])
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "warning" in x]
    assert "--sparsities, --prune-batches: not used by --methods dense" in line
    cli.sweep_main(["--methods", "dense", "snip", "--sparsities", "0.5", "--prune-batches", "2",
                    "--out-dir", str(tmp_path / "s"), "--dataset", "synthetic"])  # fmt: skip
    assert "warning" not in capsys.readouterr().err
