"""How close STR, CS and DST land to --sparsity before the final cut, with the default
calibration (no penalty touched): ResNet-20 on Fashion-MNIST, the first TRAIN images,
6 epochs, batch 128, lr 0.1 cosine, weight decay 1e-4 (the main job's recipe).

    python benchmarks/reparam_calibration.py OUT_DIR [TRAIN] [EPOCHS] [METHODS...] [GOALS...]

Prints one line per run: method, goal, sparsity reached before the cut, its distance to
the goal in points, test accuracy before and after the exact cut (no retraining), and the
per-epoch (epoch, sparsity, target) trace of the method's mask.
"""

import json
import sys
import time

import torch

from ong_kernels.train.config import TrainConfig
from ong_kernels.train.data import load_dataset
from ong_kernels.train.trainer import Trainer

GOALS = (0.9, 0.98)


def main(argv):
    out = argv[0]
    train = int(argv[1]) if len(argv) > 1 else 6000
    epochs = int(argv[2]) if len(argv) > 2 else 6
    methods = [m for m in argv[3:] if not m.startswith("0.")] or ["str", "cs", "dst"]
    goals = [float(m) for m in argv[3:] if m.startswith("0.")] or GOALS
    data = load_dataset("fashion-mnist", "/usr/share/datasets/fashion-mnist")
    for method in methods:
        for goal in goals:
            cfg = TrainConfig(
                model="resnet20", dataset="fashion-mnist", train_subset=train, test_subset=2000,
                epochs=epochs, batch_size=128, lr=0.1, momentum=0.9, nesterov=True,
                weight_decay=1e-4, schedule="cosine", method=method, sparsity=goal, seed=0,
                device="cpu", progress=False, run_dir=f"{out}/{method}-{goal}",
            )  # fmt: skip
            start = time.perf_counter()
            r = Trainer(cfg, dataset=data, log=None).fit()
            trace = [(c.get("epoch"), round(c.get("sparsity", 0), 4),
                      round(c["target"], 4) if "target" in c else None)
                     for c in r["method_cuts"] if "fold" not in c]  # fmt: skip
            reached = r["sparsity_before_cut"]
            print(
                f"{method} goal {goal}: reached {reached:.4f} ({100 * (reached - goal):+.2f} pt), "
                f"final {r['measured_sparsity']:.4f}, test acc before cut "
                f"{r['test_acc_before_cut']:.2f} after cut {r['test_acc']:.2f}, "
                f"{time.perf_counter() - start:.0f}s, trace {json.dumps(trace)}",
                flush=True,
            )


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
