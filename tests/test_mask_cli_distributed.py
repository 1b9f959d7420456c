"""ong-mask on torch.distributed: 2 gloo ranks on the CPU give the masks of one process, bit
for bit (ties across layers and ranks included), and a rank that fails makes every rank fail
with its error instead of leaving the others waiting.

The one-process reference runs with 1 thread, as each torchrun rank does (torchrun sets
OMP_NUM_THREADS=1): the nndsvda start's LAPACK SVD rounds differently with the thread count.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import free_port, spawn_two, torchrun_two
from safetensors.torch import save_file

from ong_kernels.mask_cli import main
from ong_kernels.pruning import load_masks, stream
from ong_kernels.pruning.distributed import agree, balance, sum_counts

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 90
SOLVE = ["--rank", "3", "--max-iter", "20", "--no-progress"]

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="no gloo"
)


def tensors(nan: str | None = None) -> dict[str, torch.Tensor]:
    """A small checkpoint with ties: quantised values (magnitude ties), zero rows (ONG scores
    exactly 0: ties at a threshold of 0, in several layers), and two identical tensors (equal
    costs, so balance() gives them to different ranks: the same scores on two ranks)."""
    g = torch.Generator().manual_seed(0)

    def quantised(*shape, dtype=torch.float16):
        t = torch.randint(-6, 7, shape, generator=g).to(torch.float32) / 4
        t[: max(1, shape[0] // 3)] = 0  # zero rows
        return t.to(dtype)

    out = {
        "block0.attn.weight": quantised(23, 31),
        "block0.conv.weight": quantised(9, 5, 3, 3, dtype=torch.float32),
        "block1.attn.weight": quantised(17, 40),
        "block1.mlp.weight": quantised(40, 17, dtype=torch.float32),
        "block2.norm.weight": torch.ones(17),  # 1-D: never pruned
    }
    out["block2.attn.weight"] = out["block1.attn.weight"].clone()
    if nan is not None:
        out[nan] = out[nan].clone()
        out[nan][-1, -1] = float("nan")
    return out


def write(path: Path, nan: str | None = None) -> Path:
    save_file(tensors(nan), str(path))
    return path


def one_process(args: list[str]) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(args)
    finally:
        torch.set_num_threads(threads)


def assert_same_masks(a: Path, b: Path) -> None:
    ma, mb = load_masks(a), load_masks(b)
    assert list(ma) == list(mb)
    for name in ma:
        assert torch.equal(ma[name], mb[name]), name


def torchrun(args: list[str], *extra: str) -> subprocess.CompletedProcess:
    return torchrun_two(*extra, "-m", "ong_kernels.mask_cli", *args, timeout=TIMEOUT_S)


def test_torchrun_equals_one_process_ties_at_the_threshold(tmp_path):
    ckpt = write(tmp_path / "model.safetensors")
    # Sparsity 0.2 prunes fewer weights than there are zero scores: the threshold is 0 and
    # which zero scores are kept is decided by position across layers and ranks.
    args = [str(ckpt), "--sparsity", "0.2", *SOLVE]
    assert one_process([*args, "-o", str(tmp_path / "one.safetensors")]) == 0
    proc = torchrun([*args, "-o", str(tmp_path / "two.safetensors")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_masks(tmp_path / "one.safetensors", tmp_path / "two.safetensors")

    masks = load_masks(tmp_path / "two.safetensors")
    zero_kept = [int(m[: max(1, m.shape[0] // 3)].sum()) for m in masks.values()]
    zero_all = sum(max(1, m.shape[0] // 3) * m[0].numel() for m in masks.values())
    assert 0 < sum(zero_kept) < zero_all  # the cut went through the tied zeros
    # Rank 0 alone prints the summary: every layer once, then one line per rank.
    assert proc.stdout.count("block0.attn.weight") == 1
    assert proc.stdout.count("scoring (ong)") == 1
    assert "rank  tensors" in proc.stdout
    assert not list(tmp_path.glob(".*tmp"))


def test_torchrun_failing_rank_fails_every_rank(tmp_path):
    bad = "block1.mlp.weight"
    ckpt = write(tmp_path / "nan.safetensors", nan=bad)
    out = tmp_path / "masks.safetensors"
    # torchrun tears the job down only at its next look (every 3 s here, not 0.1 s), so the
    # other rank ends with "failed on another rank" only if it was told; had it waited, the
    # gloo timeout (--dist-timeout) would have ended it with another message. No wall-clock
    # bound: on a loaded 2-core machine the two interpreters alone took 40 s to start.
    proc = torchrun(
        [str(ckpt), "--sparsity", "0.5", *SOLVE, "--dist-timeout", "60", "-o", str(out)],
        "--monitor-interval", "3",
    )  # fmt: skip
    assert proc.returncode != 0
    err = proc.stderr
    assert err.count(f"ong-mask: error: '{bad}' contains NaN") == 1, err[-3000:]
    assert err.count(f"failed on another rank (rank {owner_of(bad)}): ValueError:") == 1, err
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))


def owner_of(name: str) -> int:
    numels = {n: t.numel() for n, t in tensors().items() if t.dim() >= 2}
    names = sorted(numels)  # safetensors stores tensors by name
    shapes = {n: t.shape for n, t in tensors().items()}
    costs = [numels[n] * min(3, shapes[n][0], numels[n] // shapes[n][0]) for n in names]
    return balance(costs, 2)[names.index(name)]


# ----------------------------------------------------------------------------- in-process ranks

CASES = {
    "ong-global": ["--sparsity", "0.6"],
    "ong-layer": ["--sparsity", "0.5", "--scope", "layer"],
    "magnitude-global": ["--sparsity", "0.5", "--method", "magnitude"],
    "magnitude-layer": ["--sparsity", "0.3", "--method", "magnitude", "--scope", "layer"],
    "one-tensor": ["--sparsity", "0.5", "--include", "block0.conv"],  # rank 1 reads nothing
}
FAILING = {  # a NaN that rank 1 alone reads: in its NMF (ong), in its mask pass (layer scope)
    "nan-ong": ["--sparsity", "0.5"],
    "nan-magnitude-layer": ["--sparsity", "0.5", "--method", "magnitude", "--scope", "layer"],
}
REFUSED = {  # every rank refuses alike: a bad argument (before any communication), or ranks
    # given different commands (found by the one comparison after the group starts)
    "bad-sparsity": (["--sparsity", "1.5"], ["--sparsity", "1.5"], "sparsity"),
    "other-args": (["--sparsity", "0.5"], ["--sparsity", "0.6"], "other arguments"),
}


def _worker(rank: int, port: int, folder: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=TIMEOUT_S // 3),
    )
    torch.set_num_threads(1)
    try:
        for case, args in {**CASES, **FAILING}.items():
            ckpt = f"{folder}/{'nan' if case in FAILING else 'model'}.safetensors"
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main([ckpt, *args, *SOLVE, "-o", f"{folder}/{case}.two.safetensors"])
            Path(f"{folder}/{case}.{rank}.txt").write_text(f"{code}\n{err.getvalue()}")
        for case, (*per_rank, _) in REFUSED.items():
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                out = f"{folder}/{case}.two.safetensors"
                code = main([f"{folder}/model.safetensors", *per_rank[rank], *SOLVE, "-o", out])
            Path(f"{folder}/{case}.{rank}.txt").write_text(f"{code}\n{err.getvalue()}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_scopes_methods_and_failures(tmp_path):
    write(tmp_path / "model.safetensors")
    bad = next(n for n, r in zip(*_names_owners(), strict=True) if r == 1)
    write(tmp_path / "nan.safetensors", nan=bad)
    spawn_two(_worker, free_port(), str(tmp_path), timeout=TIMEOUT_S)

    for case, args in CASES.items():
        for rank in range(2):
            assert (tmp_path / f"{case}.{rank}.txt").read_text().startswith("0\n"), case
        one = tmp_path / f"{case}.one.safetensors"
        assert (
            one_process([str(tmp_path / "model.safetensors"), *args, *SOLVE, "-o", str(one)]) == 0
        )
        assert_same_masks(one, tmp_path / f"{case}.two.safetensors")
    for case in FAILING:
        failed = (tmp_path / f"{case}.1.txt").read_text()
        told = (tmp_path / f"{case}.0.txt").read_text()
        assert failed.startswith("2\n") and told.startswith("2\n"), (failed, told)
        assert bad in failed and "NaN" in failed
        assert "failed on another rank (rank 1)" in told and bad in told
        assert not (tmp_path / f"{case}.two.safetensors").exists()
    for case, (*_, message) in REFUSED.items():
        for rank in range(2):
            text = (tmp_path / f"{case}.{rank}.txt").read_text()
            assert text.startswith("2\n") and message in text, (case, rank, text)
        assert not (tmp_path / f"{case}.two.safetensors").exists()


def _names_owners() -> tuple[list[str], list[int]]:
    names = sorted(n for n, t in tensors().items() if t.dim() >= 2)
    return names, [owner_of(n) for n in names]


# ----------------------------------------------------------------------------- one process


def test_owned_without_a_process_group_must_cover_every_layer():
    shapes = [(3, 4), (5,)]
    scores = [torch.arange(12.0).reshape(3, 4), torch.ones(5)]
    every = list(stream.stream_masks(lambda: iter(scores), shapes, 0.5, owned=[0, 1]))
    plain = list(stream.stream_masks(lambda: iter(scores), shapes, 0.5))
    assert all(torch.equal(a, b) for a, b in zip(every, plain, strict=True))
    with pytest.raises(ValueError, match="layer 1 is scored by 0 ranks"):
        stream.stream_masks(lambda: iter(scores[:1]), shapes, 0.5, owned=[0])
    with pytest.raises(ValueError, match="strictly increasing"):
        stream.stream_masks(lambda: iter(scores), shapes, 0.5, owned=[1, 0])
    with pytest.raises(TypeError, match="owned must be a sequence"):
        stream.stream_masks(lambda: iter(scores), shapes, 0.5, owned=3)


def test_agreement_helpers_without_a_process_group():
    assert agree(lambda: 7) == 7
    assert torch.equal(sum_counts(lambda: torch.arange(4), 4), torch.arange(4))
    with pytest.raises(ArithmeticError):
        agree(lambda: 1 / 0)


def test_owner_of_matches_the_cli_split():
    # The split the tests above rely on: a tensor on each rank, the twins on different ones.
    names, owners = _names_owners()
    assert set(owners) == {0, 1}
    assert owners[names.index("block1.attn.weight")] != owners[names.index("block2.attn.weight")]
