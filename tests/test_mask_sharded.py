"""ong-mask on a sharded checkpoint (model-0000k-of-0000N.safetensors + the index file): one
global threshold over every shard, the same masks as the same tensors in one file, in one
process and under torchrun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file
from test_mask_cli_distributed import (
    SOLVE,
    assert_same_masks,
    one_process,
    tensors,
    torchrun,
    write,
)

from ong_kernels.mask_cli import main
from ong_kernels.pruning.checkpoint import Checkpoint

INDEX = "model.safetensors.index.json"


def shard(folder: Path, parts: int = 2) -> Path:
    """The tensors of test_mask_cli_distributed.tensors() in `parts` shards (name order
    interleaved across shards, as a shard boundary need not follow it) and the index."""
    folder.mkdir()
    all_tensors = tensors()
    names = sorted(all_tensors)
    weight_map = {}
    for k in range(parts):
        file = f"model-{k + 1:05d}-of-{parts:05d}.safetensors"
        part = {n: all_tensors[n] for n in names[k::parts]}
        save_file(part, str(folder / file))
        weight_map.update(dict.fromkeys(part, file))
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder / INDEX


@pytest.mark.parametrize(
    "extra",
    [
        ["--sparsity", "0.2"],  # ties at a threshold of 0, across shards
        ["--sparsity", "0.6", "--method", "magnitude"],
        ["--sparsity", "0.5", "--scope", "layer"],
        ["--sparsity", "0.5", "--restarts", "2"],
    ],
)
def test_sharded_equals_one_file(tmp_path, extra):
    single = write(tmp_path / "model.safetensors")
    index = shard(tmp_path / "sharded")
    assert one_process([str(single), *extra, *SOLVE, "-o", str(tmp_path / "one.out")]) == 0
    for i, source in enumerate((index, index.parent)):  # the index file, or its folder
        out = tmp_path / f"sharded{i}.out"
        assert one_process([str(source), *extra, *SOLVE, "-o", str(out)]) == 0
        assert_same_masks(tmp_path / "one.out", out)


def test_sharded_under_torchrun_equals_one_file(tmp_path):
    single = write(tmp_path / "model.safetensors")
    index = shard(tmp_path / "sharded", parts=3)
    args = ["--sparsity", "0.2", *SOLVE]
    assert one_process([str(single), *args, "-o", str(tmp_path / "one.out")]) == 0
    proc = torchrun([str(index), *args, "-o", str(tmp_path / "two.out")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_masks(tmp_path / "one.out", tmp_path / "two.out")


def _refused(capsys, args, message) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_bad_sharded_checkpoints_are_one_line(tmp_path, capsys):
    index = shard(tmp_path / "sharded")
    folder = index.parent
    out = str(tmp_path / "masks.safetensors")
    # The masks may not overwrite a shard or the index.
    shard_file = sorted(folder.glob("model-*"))[0]
    _refused(capsys, [str(index), "-o", str(shard_file)], "is the checkpoint")
    _refused(capsys, [str(index), "-o", str(index)], "is the checkpoint")
    # A dry run lists every shard's tensors in name order.
    assert main([str(folder), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert text.index("block0.attn.weight") < text.index("block1.attn.weight")
    assert "skip  block2.norm.weight" in text
    weight_map = json.loads(index.read_text())["weight_map"]
    # A shard the index names is missing; a shard holds tensors the index gives elsewhere.
    (tmp_path / "missing").mkdir()
    bad = dict(weight_map, extra="model-00009-of-00009.safetensors")
    (tmp_path / "missing" / INDEX).write_text(json.dumps({"weight_map": bad}))
    _refused(capsys, [str(tmp_path / "missing"), "-o", out], "does not exist")
    moved = dict(weight_map)
    name = next(iter(moved))
    moved[name] = next(f for f in set(moved.values()) if f != moved[name])
    index.write_text(json.dumps({"weight_map": moved}))
    _refused(capsys, [str(index), "-o", out], "list other tensors")
    index.write_text("{not json")
    _refused(capsys, [str(index), "-o", out], "is not a safetensors index")
    # A folder of shards without its index: which file is meant is not guessed.
    index.unlink()
    _refused(capsys, [str(folder), "-o", out], "holds 2 .safetensors files")


def test_checkpoint_lists_the_same_entries_sharded_or_not(tmp_path):
    one = Checkpoint.open(str(write(tmp_path / "model.safetensors")))
    many = Checkpoint.open(str(shard(tmp_path / "sharded", parts=3)))
    assert [(e.name, e.shape, e.dtype) for e in one.entries] == [
        (e.name, e.shape, e.dtype) for e in many.entries
    ]
    assert len(many.files) == 3 and len(one.files) == 1
    entry = many.entries[0]
    assert tensors()[entry.name].equal(many.read(entry))
