"""Every registered nmf_mu kernel against the reference kernel, through the op.

Each case builds a fresh random ragged batch, runs the op once with backend="reference" and
once with the kernel under test from the same starting factors, and compares factors, n_iter
and reconstruction errors. The starting factors are the op's in/out tensors, so a kernel that
skips a matrix leaves its start in place and fails the comparison.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from kernels.cases import interpreted, kernel_cases, ragged_batch
from ong_kernels import _ops
from ong_kernels.nmf_init import initial_factors

CASES = kernel_cases("nmf_mu")


def run(backend, vs, ws, hs, max_iter, tol):
    w = [t.clone() for t in ws]
    h = [t.clone() for t in hs]
    n_iter = _ops.nmf_mu_(vs, w, h, max_iter, tol, backend)
    return w, h, n_iter.cpu()


def rel_error(v, w, h) -> float:
    v64 = v.double().cpu()
    return float(
        torch.linalg.norm(v64 - w.double().cpu() @ h.double().cpu())
        / max(float(torch.linalg.norm(v64)), 1e-30)
    )


def shapes_for(backend, device):
    # Odd sizes, a 1 x n and an m x 1 matrix, skinny both ways, ranks clipped to min(m, n),
    # repeated shapes (which the reference batches), and a rank above 16.
    if interpreted(backend, device):
        return [(7, 13, 4), (1, 9, 3), (11, 1, 2), (3, 40, 5), (40, 3, 8), (7, 13, 4), (9, 21, 6)]
    return [
        (37, 53, 5), (1, 70, 3), (65, 1, 2), (3, 1000, 16), (1000, 3, 16), (37, 53, 5),
        (64, 576, 16), (33, 70, 24), (19, 130, 40),
    ]  # fmt: skip


@pytest.mark.parametrize(("backend", "device"), CASES)
def test_factors_match_reference_after_a_few_iterations(backend, device):
    shapes = shapes_for(backend, device)
    vs, ws, hs = ragged_batch(shapes, device, zero_at=2)
    expected = run("reference", vs, ws, hs, 5, 0.0)
    got = run(backend, vs, ws, hs, 5, 0.0)
    assert torch.equal(got[2], expected[2]), "n_iter"
    for i in range(len(vs)):
        # float32 rounding, compounded over 5 multiplicative updates
        assert_close(got[0][i], expected[0][i], atol=1e-6, rtol=2e-4, what=f"{backend} W[{i}]")
        assert_close(got[1][i], expected[1][i], atol=1e-6, rtol=2e-4, what=f"{backend} H[{i}]")


@pytest.mark.parametrize(("backend", "device"), CASES)
def test_reconstruction_error_matches_after_many_iterations(backend, device):
    iters = 60 if interpreted(backend, device) else 200
    shapes = shapes_for(backend, device)
    vs, ws, hs = ragged_batch(shapes, device, seed=1)
    expected = run("reference", vs, ws, hs, iters, 0.0)
    got = run(backend, vs, ws, hs, iters, 0.0)
    for i, v in enumerate(vs):
        e_ref, e = rel_error(v, expected[0][i], expected[1][i]), rel_error(v, got[0][i], got[1][i])
        assert e == pytest.approx(e_ref, rel=1e-3, abs=1e-7), f"matrix {i} {shapes[i]}"
        assert torch.isfinite(got[0][i]).all() and torch.isfinite(got[1][i]).all()


@pytest.mark.parametrize(("backend", "device"), CASES)
@pytest.mark.parametrize("init", ["random", "nndsvd", "nndsvda"])
def test_per_matrix_stopping_matches_reference(backend, device, init):
    # An exactly low-rank matrix converges fast, a random one slowly, an all-zero one at the
    # first check: each must stop at the reference's iteration and keep that iteration's factors.
    small = interpreted(backend, device)
    gen = torch.Generator().manual_seed(5)
    m, n = (12, 15) if small else (40, 60)
    easy = torch.rand(m, 2, generator=gen) @ torch.rand(2, n, generator=gen)
    hard = torch.rand(m, n, generator=gen)
    other = torch.rand(n, m, generator=gen)
    vs = [t.to(device) for t in (easy, hard, torch.zeros(m, n), other)]
    factors = initial_factors(vs, [3, 3, 3, 4], init, seed=2)
    ws = [w for w, _ in factors]
    hs = [h for _, h in factors]
    max_iter = 120 if small else 400
    expected = run("reference", vs, ws, hs, max_iter, 1e-3)
    got = run(backend, vs, ws, hs, max_iter, 1e-3)
    assert got[2].tolist() == expected[2].tolist(), "n_iter per matrix"
    assert len(set(expected[2].tolist())) > 1, "the case should stop matrices at different checks"
    for i in range(len(vs)):
        assert_close(got[0][i], expected[0][i], atol=1e-5, rtol=1e-3, what=f"{backend} W[{i}]")
        assert_close(got[1][i], expected[1][i], atol=1e-5, rtol=1e-3, what=f"{backend} H[{i}]")


@pytest.mark.parametrize(("backend", "device"), CASES)
@pytest.mark.parametrize("dtype", [d for d in _ops.NMF_INPUT_DTYPES if d != torch.float32])
def test_non_float32_inputs_are_read_as_they_are(backend, device, dtype):
    # Every V dtype the op's schema accepts (_ops.NMF_INPUT_DTYPES), read in place.
    shapes = shapes_for(backend, device)[:4]
    vs, ws, hs = ragged_batch(shapes, device, dtype=dtype, seed=3)
    expected = run("reference", vs, ws, hs, 4, 0.0)
    got = run(backend, vs, ws, hs, 4, 0.0)
    for i in range(len(vs)):
        assert_close(got[0][i], expected[0][i], atol=1e-6, rtol=2e-4, what=f"{dtype} W[{i}]")
        assert_close(got[1][i], expected[1][i], atol=1e-6, rtol=2e-4, what=f"{dtype} H[{i}]")


@pytest.mark.parametrize(("backend", "device"), CASES)
def test_op_passes_opcheck(backend, device):
    vs, ws, hs = ragged_batch([(5, 7, 2), (3, 4, 2)], device)
    torch.library.opcheck(_ops.nmf_mu_, (vs, ws, hs, 3, 0.0, backend))
