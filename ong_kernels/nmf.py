"""nmf_batched: multiplicative-update NMF of many matrices of different shapes in one call.

The public entry points only. The rules of an input (views, checks, per-matrix settings,
Solver) are in nmf_rules.py, the starts in nmf_init.py, the solve in groups in nmf_groups.py;
the iterations run in one op (ong_kernels::nmf_mu_) per group over the whole ragged batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch

from ong_kernels.nmf_groups import Streaming, solve_all
from ong_kernels.nmf_rules import INITS, Factors, Solver, as_matrix

__all__ = ["INITS", "Factors", "Solver", "Streaming", "as_matrix", "nmf_batched",
           "nmf_batched_with_info"]  # fmt: skip


def nmf_batched(
    weights: Sequence[torch.Tensor] | Iterable[torch.Tensor],
    rank: int | Sequence[int],
    *,
    max_iter: int = 200,
    tol: float = 1e-4,
    init: str | Sequence[Factors] = "random",
    seed: int | Sequence[int] = 0,
    backend: str = "auto",
    device: str | torch.device | None = None,
    memory_budget: int | None = None,
    progress: bool = False,
    precision: str = "ieee",
    names: Sequence[str] | None = None,
    beta_loss: str | float = "frobenius",
    alpha_W: float = 0.0,
    alpha_H: float | str = "same",
    l1_ratio: float = 0.0,
    update_h: bool = True,
) -> list[Factors]:
    """Factorise every matrix V_i ~= W_i H_i with Lee-Seung multiplicative updates, together.

    Args:
        weights: non-negative tensors of any shapes, all on one device (a sequence, or any
            iterable such as a generator reading a checkpoint; not a mapping: pass its
            values); each is viewed as (shape[0], prod(shape[1:])) (a conv weight is
            out x in*kh*kw, a 1-D tensor 1 x n). Any finite non-negative float input is
            solved, subnormal entries included: a matrix whose largest entry is outside
            [2^-40, 2^40] is solved as V / 4^j and its factors scaled by 2^j (exact;
            multiplicative updates are scale-equivariant; the scaling is applied by
            exponent steps, never as one unrepresentable factor), so it neither overflows to
            NaN nor underflows to zeros.
        rank: one int for all, or one per matrix; clipped to min(m, n) per matrix.
        max_iter: iterations per matrix (>= 1).
        tol: a matrix stops when (previous_error - error) / initial_error < tol, checked every
            10 iterations (scikit-learn's rule); 0 runs exactly max_iter iterations.
        init: "random" (|N(0,1)| * sqrt(mean(V)/r), seeded), "nndsvd", "nndsvda" (NNDSVD
            of a randomized truncated SVD, seeded, as scikit-learn's; the exact SVD where
            it is not dearer: nmf_init.use_exact_svd), or one (W0, H0) pair per matrix
            (scikit-learn's init="custom"; they are copied, never modified).
        seed: one int for every matrix, or one per matrix: the seed of matrix i's random
            start or randomized SVD (a fresh CPU generator per matrix, as scikit-learn's
            random_state per call). A matrix's start depends only on itself, its rank and
            its seed, so k restarts of V are nmf_batched([V] * k, r, seed=[s0, ..., sk-1]),
            equal bit for bit to k single calls: by construction on the "reference" and
            "cpu" backends (each matrix runs its own operations, whatever else shares the
            call, on any CPU vendor); the Triton kernel is checked for it in its
            interpreter only, not yet on a GPU.
        backend: "auto" (the best kernel for the inputs' device), or one of "reference"
            (PyTorch matmuls, one matrix at a time), "cpu" (the C++ solve), "cuda", "triton";
            ong_kernels.backends_available() says which can run here. An explicit backend
            that cannot run raises; ONG_KERNELS_BACKEND sets one when this is "auto".
        device: where to compute (default: the inputs' device). With `device`,
            `memory_budget`, `progress` or an iterator as `weights`, the matrices stream:
            consecutive matrices are moved to `device` in groups whose cost
            (nmf_groups.group_bytes, with the selected kernel's workspace) fits
            `memory_budget`, each group solved by one op call, its factors moved back to
            the inputs' device before the next group is read. The factors are identical to
            one unbudgeted call on `device`.
        memory_budget: bytes a group may use on `device` (default: 80% of its free memory).
            A matrix that alone needs more is a ValueError saying how much it needs: before
            any work for a sequence, when the iterator reaches it otherwise.
        progress: show a tqdm bar (weights done, matrices, ETA) while streaming.
        precision: "ieee" (float32 products, every backend), or with the triton backend on a
            GPU the opt-in "tf32x3" / "tf32" (TF32 tensor-core products; benchmarks/RESULTS.md
            has their effect on ONG masks).
        names: optional label per matrix (e.g. parameter names) for error messages:
            "'layer1.0.conv1.weight' contains NaN" instead of "weights[3] contains NaN".
        beta_loss: the divergence minimised, one for the call: "frobenius" (2, the default),
            "kullback-leibler" (1), "itakura-saito" (0, refuses a V with zeros, as
            scikit-learn) or any real beta; scikit-learn's MU rules for it
            (ong_kernels/nmf_beta.py), and `tol` reads its divergence
            (sqrt(2 D_beta(V | W H)), scikit-learn's reconstruction error). Any loss but
            the plain Frobenius one solves V as given (no 4^-j scaling), in float32: a V
            whose largest entry is outside float32's normal range is refused.
        alpha_W, alpha_H, l1_ratio: scikit-learn's regularisation (>= 1.2 semantics): W's
            penalty alpha_W * n * (l1_ratio |W|_1 + (1 - l1_ratio) / 2 |W|_F^2), H's the same
            with alpha_H and m; alpha_H="same" takes alpha_W.
        update_h: False keeps H fixed and solves W only (scikit-learn's transform); needs
            `init` as (W0, H) pairs.

    Returns:
        [(W_i, H_i)]: float32 factors on the inputs' device (float64 for a float64 matrix
        whose largest entry is outside float32's normal range [2^-126, 3.4e38]: float32
        cannot hold its factors), W_i (m_i, r_i), H_i (r_i, n_i),
        always detached (the solve is not differentiable; inputs that require grad are read
        as data).

    The update order and epsilon rule are scikit-learn's NMF(solver="mu"): for the Frobenius
    loss W <- W * (V H^T) / (W H H^T), then H <- H * (W^T V) / (W^T W H), and a denominator
    that is exactly 0 becomes float32 eps (op nmf_mu_); any other beta, a penalty or a fixed H
    run op nmf_beta_mu_ (nmf_beta.py). All matrices advance together in one op call.
    """
    solver = Solver(max_iter, tol, init, seed, backend, precision, beta_loss, alpha_W, alpha_H,
                    l1_ratio, update_h)  # fmt: skip
    streaming = Streaming(device, memory_budget, progress)
    factors, _ = solve_all(weights, rank, solver, streaming, names)
    return factors


def nmf_batched_with_info(weights, rank, **settings) -> tuple[list[Factors], list[int]]:
    """nmf_batched (the same keyword arguments) that also returns the number of iterations
    each matrix ran."""
    names = settings.pop("names", None)
    streamed = {f.name for f in dataclasses.fields(Streaming)}
    streaming = Streaming(**{k: v for k, v in settings.items() if k in streamed})
    solver = Solver(**{k: v for k, v in settings.items() if k not in streamed})
    return solve_all(weights, rank, solver, streaming, names)
