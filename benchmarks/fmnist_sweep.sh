#!/bin/bash
# The multi-seed table of benchmarks/RESULTS.md: ResNet-20 on Fashion-MNIST, 7 methods x
# 3 sparsities x 3 seeds, sized for ~1 hour on a shared 2-core CPU. One torch thread and
# nice 19 so that it does not starve other work on the machine. Run from the repository root
# after `make install data`; writes results/fmnist_sweep/{results.md,summary.json,*.png}.
# Re-running continues an interrupted sweep (finished runs are reused when their config
# matches).
set -euo pipefail
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
exec nice -n 19 .venv/bin/python -c "
import sys, torch
torch.set_num_threads(1)
from ong_kernels.train.cli import sweep_main
sys.exit(sweep_main(sys.argv[1:]))
" --methods dense ong magnitude random snip grasp synflow --sparsities 0.9 0.95 0.98 --seeds 0 1 2 \
  --out-dir results/fmnist_sweep --data-dir /usr/share/datasets/fashion-mnist \
  --model resnet20 --dataset fashion-mnist --train-subset 3000 --test-subset 2000 \
  --batch-size 64 --epochs 3 --lr 0.1 --device cpu --no-progress
