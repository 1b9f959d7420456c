"""DistributedDataParallel: 2 gloo processes on CPU, launched by torchrun as users would."""

import textwrap

import pytest
import torch
import torch.distributed as dist
from conftest import run_two_gloo_ranks

import ong_kernels
import ong_kernels.pruning.methods

# Each rank trains, then saves its final model and masks so the test can compare ranks.
WORKER = textwrap.dedent(
    """
    import os, sys, torch
    from ong_kernels.train.config import TrainConfig
    from ong_kernels.train.trainer import Trainer

    out, method = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    config = TrainConfig(
        model="resnet20", dataset="synthetic", synthetic_shape=[128, 40, 3, 8], width=0.25,
        epochs=2 if method == "ong" else 3, batch_size=32, eval_batch_size=16, lr=0.05,
        method=method, sparsity=0.9, progress=False, device="cpu",
        run_dir=os.path.join(out, "run"),
    )
    trainer = Trainer(config, log=None)
    results = trainer.fit()
    torch.save(
        {"state": trainer.model.state_dict(), "masks": trainer.masks,
         "world": results["world_size"], "history": trainer.history,
         "pruned": [c["pruned"] for c in results["method_cuts"]], "total": trainer.masked_total},
        os.path.join(out, f"rank{rank}.pt"),
    )
    """
)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
@pytest.mark.parametrize("method", ["ong", "gmp", "bimp"])
def test_two_gloo_ranks_end_identical(tmp_path, method):
    # GMP and BIMP cut during training (3 epochs: cuts after epochs 1 and 2): the masks of
    # every cut are the same on both ranks and hold the scheduled counts.
    run_two_gloo_ranks(tmp_path, WORKER, str(tmp_path), method, timeout=240)

    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2
    assert r0["masks"].keys() == r1["masks"].keys() and r0["masks"]
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
    assert r0["pruned"] == r1["pruned"]
    if method == "gmp":
        plan = ong_kernels.pruning.methods.gmp_plan(3, 1, 0.9)
        assert r0["pruned"] == [round(s * r0["total"]) for _, s in plan]
    if method == "bimp":
        plan = ong_kernels.pruning.methods.bimp_plan(3, None, 1, 0.9)
        assert r0["pruned"] == [round(s * r0["total"]) for _, s in plan]
    assert r0["state"].keys() == r1["state"].keys()
    for name in r0["state"]:
        assert torch.equal(r0["state"][name], r1["state"][name]), f"{name} differs between ranks"
    # Evaluation is reduced over ranks, so both report the same numbers.
    assert [h["test_acc"] for h in r0["history"]] == [h["test_acc"] for h in r1["history"]]
    # Only rank 0 wrote the run folder, and its checkpoint holds the same model.
    run = tmp_path / "run"
    assert (run / "results.json").is_file() and (run / "checkpoint.pt").is_file()
    saved = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], r0["state"][k]) for k in saved)
