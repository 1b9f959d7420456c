"""The NMF host planner shared by every backend: the ragged batch layout, the stopping rule,
n_iter, and the driver loop of backends that run iterations rather than whole solves.

The ragged batch: the op ``nmf_mu_`` takes three lists of tensors (V_i of any float dtype,
W_i (m_i, r_i) and H_i (r_i, n_i) float32, all contiguous), and a kernel that wants one
grouped launch reads them through a descriptor table (`matrix_table`): one int64 row
(V address, W address, H address, m, n, r) per matrix. Chosen over packing all matrices into
one buffer with an offsets table, because a pointer table needs no copy of the model (the
inputs stay where they are, in their own dtype: fp16/bf16 are converted in the kernels'
loads), serves the C++ and the Triton kernels alike (Triton casts the int64 to a pointer),
and lets a solve cover any subset of the matrices without repacking.

Two kinds of backend:
- whole-solve (C++ on the CPU): one native call runs every iteration and every stopping
  check; it implements `stop_rule` natively and the conformance suite holds its n_iter to the
  reference's.
- stepwise (reference, Triton): implements `Stepper` (iterate / errors) and calls
  `run_stepwise`, which owns the check schedule and the rule. `stop_rule` is plain tensor
  arithmetic, so on a GPU the flags stay on the device and the loop never syncs the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

# scikit-learn checks convergence every 10 iterations (NMF(solver="mu")).
CHECK_EVERY = 10
# A ragged batch: one tensor per matrix (V_i, W_i or H_i), the op's list arguments.
Matrices = Sequence[torch.Tensor]
# scikit-learn's EPSILON (np.finfo(np.float32).eps): an exactly-zero MU denominator becomes this.
EPS = float(torch.finfo(torch.float32).eps)
# Columns of `matrix_table`.
TABLE_COLUMNS = ("v", "w", "h", "m", "n", "r")


def check_iterations(max_iter: int, tol: float) -> list[int]:
    """Iterations after which the error is checked: 10, 20, ... below max_iter (none if tol=0).

    The check at max_iter itself is skipped: the solve ends there whatever it says, and n_iter
    is max_iter either way.
    """
    if tol <= 0:
        return []
    return list(range(CHECK_EVERY, max_iter, CHECK_EVERY))


def stop_rule(
    initial: torch.Tensor, previous: torch.Tensor, current: torch.Tensor, tol: float
) -> torch.Tensor:
    """scikit-learn's test, per matrix: (previous - current) / initial < tol.

    A matrix whose initial error is 0 is already exact and stops at its first check
    (scikit-learn would divide by zero there). Errors are float64 Frobenius norms.
    """
    safe_initial = torch.where(initial > 0, initial, torch.ones_like(initial))
    return (initial <= 0) | ((previous - current) / safe_initial < tol)


def matrix_table(
    v: Sequence[torch.Tensor], w: Sequence[torch.Tensor], h: Sequence[torch.Tensor]
) -> torch.Tensor:
    """int64 [len(v), 6] host tensor of (V, W, H addresses, m, n, r) per matrix."""
    rows = [
        [vi.data_ptr(), wi.data_ptr(), hi.data_ptr(), vi.shape[0], vi.shape[1], wi.shape[1]]
        for vi, wi, hi in zip(v, w, h, strict=True)
    ]
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), len(TABLE_COLUMNS))


def mu_flops(m: int, n: int, r: int) -> int:
    """Flops of one MU iteration: 4mnr + 4(m+n)r^2 + 2(m+n)r (benchmarks/RESULTS.md)."""
    return 4 * m * n * r + 4 * (m + n) * r * r + 2 * (m + n) * r


class Stepper(Protocol):
    """What a stepwise backend implements; `run_stepwise` drives it.

    iterate(n, active): n MU iterations of every matrix whose `active` flag is True (a bool
        tensor on the matrices' device; None = all). Inactive matrices must not change.
    errors(): ||V_i - W_i H_i||_F per matrix, float64, on the matrices' device (values of
        inactive matrices are ignored).
    finish(): write the factors back into the op's W and H tensors if the stepper worked on
        copies.
    syncs: True if the host may read the flags to stop early (the reference); a GPU stepper
        says False and runs the fixed launch plan, its kernels skipping stopped matrices.
    """

    syncs: bool

    def iterate(self, n: int, active: torch.Tensor | None) -> None: ...

    def errors(self) -> torch.Tensor: ...

    def finish(self) -> None: ...


def run_stepwise(stepper: Stepper, n_matrices: int, device, max_iter: int, tol: float):
    """Run MU to max_iter with scikit-learn's per-matrix stopping; returns n_iter (int64)."""
    n_iter = torch.full((n_matrices,), max_iter, dtype=torch.int64, device=device)
    checks = check_iterations(max_iter, tol)
    if not checks:
        stepper.iterate(max_iter, None)
        stepper.finish()
        return n_iter
    active = torch.ones(n_matrices, dtype=torch.bool, device=device)
    initial = stepper.errors()
    previous = initial
    done = 0
    for iteration in checks:
        stepper.iterate(iteration - done, active)
        done = iteration
        current = stepper.errors()
        stopping = active & stop_rule(initial, previous, current, tol)
        n_iter = torch.where(stopping, iteration, n_iter)
        active = active & ~stopping
        previous = current
        if stepper.syncs and not bool(active.any()):
            break
    else:
        stepper.iterate(max_iter - done, active)
    stepper.finish()
    return n_iter
