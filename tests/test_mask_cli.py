"""ong-mask on a generated transformer-shaped safetensors checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ong_kernels import load_masks, masks_for, prune
from ong_kernels.mask_cli import main, parse_bytes


class Block(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.up_proj = nn.Linear(d, f)
        self.down_proj = nn.Linear(f, d)
        self.input_layernorm = nn.LayerNorm(d)


class Tiny(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 24, f: int = 40, layers: int = 2) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, f) for _ in range(layers))
        self.norm = nn.LayerNorm(d)


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    tensors = {n: p.detach().clone() for n, p in model.named_parameters()}
    tensors["position_ids"] = torch.arange(12).reshape(3, 4)  # int: skipped with a note
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return model, path


PRUNED = [
    f"layers.{i}.{p}.weight" for i in range(2) for p in ("q_proj", "k_proj", "up_proj", "down_proj")
]


@pytest.mark.parametrize("method", ["ong", "magnitude"])
def test_masks_equal_prune_and_apply(checkpoint, tmp_path, method, capsys):
    model, path = checkpoint
    out = tmp_path / "masks.safetensors"
    args = [
        str(path),
        "--method",
        method,
        "--sparsity",
        "0.6",
        "--rank",
        "3",
        "--max-iter",
        "15",
        "--memory-budget",
        "300KB",
        "--no-progress",
        "-o",
        str(out),
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "position_ids" in captured.err and "not floating" in captured.err
    assert "sparsity" in captured.out and "peak MiB" in captured.out
    masks = load_masks(out)
    assert sorted(masks) == sorted(PRUNED)  # safetensors lists names sorted
    n = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == n - round(0.6 * n)
    extra = {"rank": 3, "max_iter": 15} if method == "ong" else {}
    ref = prune(copy.deepcopy(model), method, 0.6, include=PRUNED, **extra)
    for name in PRUNED:
        assert torch.equal(ref.masks[name], masks[name]), name
    # Apply to a model built from the same checkpoint.
    fresh = Tiny()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items()})
    for p, m in masks_for(fresh, masks).items():
        with torch.no_grad():
            p.mul_(m)
    w = dict(fresh.named_parameters())
    assert int((w[PRUNED[0]] != 0).sum()) <= int(masks[PRUNED[0]].sum())


def test_layer_scope_include_exclude(checkpoint, tmp_path):
    _, path = checkpoint
    out = tmp_path / "m.safetensors"
    assert (
        main(
            [
                str(path),
                "--method",
                "magnitude",
                "--scope",
                "layer",
                "--sparsity",
                "0.5",
                "--include",
                r"layers\.0\.",
                "--exclude",
                "k_proj",
                "--no-progress",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    masks = load_masks(out)
    assert sorted(masks) == [
        "layers.0.down_proj.weight",
        "layers.0.q_proj.weight",
        "layers.0.up_proj.weight",
    ]
    for m in masks.values():
        assert m.numel() - int(m.sum()) == round(0.5 * m.numel())


def test_dry_run_missing_corrupt(checkpoint, tmp_path, capsys):
    _, path = checkpoint
    out = tmp_path / "never.safetensors"
    assert main([str(path), "--dry-run", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    assert "prune layers.0.q_proj.weight" in text
    assert "skip  embed_tokens.weight" in text and "skip  layers.0.up_proj.bias" in text
    assert main([str(tmp_path / "nope.safetensors"), "-o", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert main([str(bad), "-o", str(out)]) == 2
    assert "not a readable safetensors" in capsys.readouterr().err
    assert main([str(path), "--memory-budget", "1KB", "--no-progress", "-o", str(out)]) == 2
    assert "needs" in capsys.readouterr().err


def test_parse_bytes():
    assert parse_bytes("8GB") == 8 * 10**9
    assert parse_bytes("256MiB") == 256 * 2**20
    assert parse_bytes("1.5GB") == 1_500_000_000
    with pytest.raises(Exception, match="memory budget"):
        parse_bytes("lots")
