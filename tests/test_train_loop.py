"""The training loop end to end on tiny synthetic data: sparsity, artefacts, resume, errors."""

import csv
import json
import math
import os
import re

import pytest
import torch
from conftest import SEAM_RUN

from ong_kernels.train.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from ong_kernels.train.config import TrainConfig
from ong_kernels.train.data import make_synthetic
from ong_kernels.train.trainer import SparsityError, StopTraining, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: why


# A narrow ResNet-20 on 8x8 images (the seam tests' run, 2 epochs): ~0.3 s per epoch on 2 cores.
DATA = make_synthetic(160, 64, channels=3, size=8, seed=0)
SMALL = dict(SEAM_RUN, epochs=2, eval_batch_size=50, method="ong")


def make_config(tmp_path, name="run", **changes):
    values = {**SMALL, "run_dir": str(tmp_path / name), **changes}
    return TrainConfig(**values)


class Killed(Exception):
    """Stands in for the process dying right after an epoch's checkpoint is written."""


def kill_after(epoch):
    def callback(trainer, done, metrics):
        if done == epoch:
            raise Killed

    return callback


def all_state(trainer):
    """Model parameters and buffers plus the optimizer's momentum buffers and masks."""
    state = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    for i, p in enumerate(trainer.model.parameters()):
        for key, value in trainer.optimizer.state[p].items():
            state[f"opt.{i}.{key}"] = value
    return state


def assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), (
            f"{key} differs (max |diff| {(a[key].double() - b[key].double()).abs().max()})"
        )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted 2-epoch ONG run, shared by the tests that inspect it."""
    tmp_path = tmp_path_factory.mktemp("finished")
    trainer = Trainer(make_config(tmp_path), dataset=DATA, log=None)
    results = trainer.fit()
    return trainer, results, tmp_path / "run"


def test_exact_sparsity_every_epoch(finished):
    trainer, results, _ = finished
    params = dict(trainer.model.named_parameters())
    total = sum(m.numel() for m in trainer.masks.values())
    assert trainer.pruned_count == round(0.9 * total)  # global scope: exact
    for name, mask in trainer.masks.items():
        assert (params[name][~mask] == 0).all(), name
        assert (params[name][mask] != 0).all(), name
    assert all(row["sparsity"] == trainer.pruned_count / total for row in trainer.history)
    assert results["measured_sparsity"] == trainer.pruned_count / total
    assert results["complete"] and results["epochs_completed"] == 2


def test_losses_are_finite_and_fall(finished):
    trainer, results, _ = finished
    assert all(torch.isfinite(torch.tensor(float(v))) for v in results["final"].values())
    assert trainer.history[1]["train_loss"] < trainer.history[0]["train_loss"]


def test_dense_training_learns():
    # Catches images and labels going out of step (augmentation, sharding, batching):
    # 2 epochs lift test accuracy far above the 10% of chance (58% when written).
    data = make_synthetic(320, 64, channels=3, size=8, seed=0)
    config = TrainConfig(**{**SMALL, "method": "dense", "batch_size": 16, "run_dir": None})
    results = Trainer(config, dataset=data, log=None).fit()
    assert results["test_acc"] > 40.0


def test_run_folder_artefacts(finished):
    trainer, results, run_dir = finished
    expected = {
        "config.json",
        "metrics.csv",
        "results.json",
        "loss.png",
        "accuracy.png",
        "lr.png",
        CHECKPOINT_NAME,
    }
    assert expected <= set(os.listdir(run_dir))
    assert not [f for f in os.listdir(run_dir) if f.endswith(".tmp")]
    assert (
        TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text())) == trainer.config
    )
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[-1]["test_acc"]) == pytest.approx(results["test_acc"])
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["test_acc"] == results["test_acc"] and saved["complete"] is True
    for png in ("loss.png", "accuracy.png", "lr.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = load_checkpoint(run_dir / CHECKPOINT_NAME)  # weights_only=True inside
    assert state["epoch"] == 2 and set(state["masks"]) == set(trainer.masks)
    assert all(m.dtype == torch.bool for m in state["masks"].values())
    assert isinstance(state["rng"]["data"], torch.Tensor)


def test_resume_after_kill_is_bit_identical(finished, tmp_path):
    reference, _, _ = finished
    config = make_config(tmp_path)
    with pytest.raises(Killed):
        Trainer(config, dataset=DATA, callbacks=[kill_after(1)], log=None).fit()
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)["epoch"] == 1
    resumed = Trainer(config, dataset=DATA, resume=True, log=None)
    results = resumed.fit()
    assert results["epochs_completed"] == 2
    assert_bit_identical(all_state(resumed), all_state(reference))
    assert [r["test_acc"] for r in resumed.history] == [r["test_acc"] for r in reference.history]
    assert resumed.generator.get_state().equal(reference.generator.get_state())


def test_stop_training_leaves_a_resumable_run(tmp_path):
    def stop(trainer, epoch, metrics):
        raise StopTraining

    config = make_config(tmp_path, method="magnitude", epochs=3)
    results = Trainer(config, dataset=DATA, callbacks=[stop], log=None).fit()
    assert not results["complete"] and results["epochs_completed"] == 1
    assert not (tmp_path / "run" / "results.json").exists()
    assert Trainer(config, dataset=DATA, resume=True, log=None).fit()["epochs_completed"] == 3


def test_existing_run_is_never_overwritten(finished):
    trainer, _, run_dir = finished
    before = (run_dir / CHECKPOINT_NAME).read_bytes()
    with pytest.raises(ValueError, match=r"already holds a run.*--resume"):
        Trainer(trainer.config, dataset=DATA, log=None)
    assert (run_dir / CHECKPOINT_NAME).read_bytes() == before


def test_resume_with_changed_config_is_refused(finished):
    trainer, _, _ = finished
    changed = trainer.config.replace(lr=0.2)
    with pytest.raises(CheckpointError, match=r"different config.*lr: saved 0\.05, now 0\.2"):
        Trainer(changed, dataset=DATA, resume=True, log=None)


def test_extending_a_finished_run_equals_the_longer_run_when_the_schedule_is_constant(tmp_path):
    # The schedule does not depend on the length, so 2 epochs then 3 more must be the
    # 5-epoch run bit for bit: the extension continues the same RNG streams and state.
    whole = Trainer(make_config(tmp_path, "whole", schedule="constant", epochs=5), dataset=DATA,
                    log=None)  # fmt: skip
    whole.fit()
    short = make_config(tmp_path, "short", schedule="constant", epochs=2)
    assert Trainer(short, dataset=DATA, log=None).fit()["complete"]
    messages = []
    extended = Trainer(short.replace(epochs=5), dataset=DATA, resume=True, log=messages.append)
    results = extended.fit()
    assert results["complete"] and results["epochs_completed"] == 5
    assert_bit_identical(all_state(extended), all_state(whole))
    assert [r["test_acc"] for r in extended.history] == [r["test_acc"] for r in whole.history]
    assert results["epoch_changes"] == [{"after_epoch": 2, "epochs_before": 2, "epochs": 5}]
    assert any("epochs: 2 -> 5" in m and "does not depend" in m for m in messages), messages
    run = tmp_path / "short"
    assert json.loads((run / "results-2-epochs.json").read_text())["epochs_completed"] == 2
    assert json.loads((run / "results.json").read_text())["epochs_completed"] == 5
    assert json.loads((run / "config.json").read_text())["epochs"] == 5


def test_extending_a_cosine_run_replans_the_schedule_from_the_next_step(finished, tmp_path):
    trainer, _, run_dir = finished
    target = tmp_path / "run"
    target.mkdir()
    for name in ("config.json", CHECKPOINT_NAME, "results.json"):
        (target / name).write_bytes((run_dir / name).read_bytes())
    messages = []
    config = trainer.config.replace(run_dir=str(target), epochs=4)
    extended = Trainer(config, dataset=DATA, resume=True, log=messages.append)
    extended.setup()
    steps = extended.steps_per_epoch
    schedule = extended.scheduler.lr_lambdas[0]
    assert schedule.total_steps == 4 * steps  # the new plan, not the checkpoint's 2 epochs
    # The first step after the resume (step 2 * steps of 4 * steps) runs at the new plan's lr.
    expected = SMALL["lr"] * 0.5 * (1 + math.cos(math.pi * 2 / 4))
    assert extended.optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
    assert extended.scheduler.get_last_lr() == [extended.optimizer.param_groups[0]["lr"]]
    assert any("re-planned for 4 epochs from epoch 3" in m for m in messages), messages
    results = extended.fit()
    assert results["epochs_completed"] == 4
    assert extended.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine's end
    assert extended.history[:2] == trainer.history


def test_resume_cannot_end_before_the_epochs_already_trained(finished):
    trainer, _, _ = finished
    with pytest.raises(ValueError, match=r"epochs: .*completed 2 epochs.*--epochs 1"):
        Trainer(trainer.config.replace(epochs=1), dataset=DATA, resume=True, log=None)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "code"])
def test_corrupt_checkpoint_gives_a_clear_error(finished, tmp_path, damage):
    _, _, run_dir = finished
    target = tmp_path / "run"
    target.mkdir()
    (target / "config.json").write_bytes((run_dir / "config.json").read_bytes())
    path = target / CHECKPOINT_NAME
    data = (run_dir / CHECKPOINT_NAME).read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 10)
    else:

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {tmp_path / 'pwned'}",))

        torch.save({"model": Evil()}, path)
    config = make_config(tmp_path)
    with pytest.raises(
        CheckpointError,
        match=re.escape(f"{path}: cannot be loaded")
        + r".*to train the run again from its start: rm ",
    ):
        Trainer(config, dataset=DATA, resume=True, log=None)
    assert not (tmp_path / "pwned").exists()


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint to resume"):
        Trainer(make_config(tmp_path), dataset=DATA, resume=True, log=None)
    with pytest.raises(ValueError, match=r"resume: needs config\.run_dir"):
        Trainer(make_config(tmp_path, run_dir=None), dataset=DATA, resume=True, log=None)


def test_sparsity_violation_is_caught(tmp_path):
    trainer = Trainer(
        make_config(tmp_path, method="magnitude", run_dir=None), dataset=DATA, log=None
    )
    trainer.setup()
    assert trainer.check_sparsity() == pytest.approx(0.9, abs=1e-4)
    name, mask = next(iter(trainer.masks.items()))
    param = dict(trainer.model.named_parameters())[name]
    with torch.no_grad():
        param[~mask] = param[~mask].clone().fill_(1e-3)  # "pruned" weights come back
    with pytest.raises(SparsityError, match=re.escape(name)):
        trainer.check_sparsity()


@pytest.mark.parametrize("method", ["dense", "magnitude", "random", "snip", "synflow"])
def test_methods_and_schedules_run(tmp_path, method):
    config = make_config(
        tmp_path, method=method, epochs=2, schedule="multistep", warmup_epochs=1, run_dir=None
    )
    trainer = Trainer(config, dataset=DATA, log=None)
    results = trainer.fit()
    assert results["epochs_completed"] == 2
    expected = 0.0 if method == "dense" else trainer.pruned_count / trainer.masked_total
    assert results["measured_sparsity"] == expected
    # warm-up ends after epoch 1 at the peak lr; multistep's default milestone is epoch 1,
    # so the lr after epoch 2 is gamma * lr.
    assert trainer.history[-1]["lr"] == pytest.approx(0.1 * 0.05)


def test_divergence_is_reported(tmp_path):
    config = make_config(
        tmp_path, method="dense", lr=1e6, momentum=0.0, nesterov=False, run_dir=None, epochs=1
    )
    with pytest.raises(FloatingPointError, match=r"diverged.*lower --lr"):
        Trainer(config, dataset=DATA, log=None).fit()


def test_batch_larger_than_data(tmp_path):
    trainer = Trainer(make_config(tmp_path, batch_size=500, run_dir=None), dataset=DATA, log=None)
    with pytest.raises(ValueError, match="batch_size: 500 exceeds the 160"):
        trainer.setup()


def test_a_flipped_byte_in_tensor_data_is_detected(finished, tmp_path):
    _, _, run_dir = finished
    state = load_checkpoint(run_dir / CHECKPOINT_NAME)
    # Find a weight's bytes in the file and flip one bit in the middle of them: the zip
    # container still reads, only the checksum can tell.
    weight = state["model"]["fc.weight"].contiguous()
    raw = weight.numpy().tobytes()
    data = bytearray((run_dir / CHECKPOINT_NAME).read_bytes())
    at = data.find(raw)
    assert at >= 0
    data[at + len(raw) // 2] ^= 0x10
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checksum"):
        load_checkpoint(path)


def test_resume_removes_temp_files_a_kill_left_behind(tmp_path):
    config = make_config(tmp_path, epochs=2)
    with pytest.raises(Killed):
        Trainer(config, dataset=DATA, callbacks=[kill_after(1)], log=None).fit()
    run_dir = tmp_path / "run"
    stale = [run_dir / ".metrics.csv.abc123.tmp", run_dir / ".checkpoint.pt.xyz.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    Trainer(config, dataset=DATA, resume=True, log=None).fit()
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]
