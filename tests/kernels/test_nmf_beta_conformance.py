"""Every registered nmf_beta_mu kernel against the reference kernel, through the op, for every
beta (2, 1, 0, 0.5, 1.5 and one above 2), with and without regularisation and in the fixed-H
mode: factors after a few iterations, n_iter per matrix under the stopping rule, and the
divergence after many iterations. V holds exact zeros (but for beta <= 0, which refuses them),
so the EPSILON rules are exercised."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from kernels.cases import interpreted, kernel_cases
from ong_kernels import _ops
from ong_kernels.nmf_beta import divergence_error

CASES = kernel_cases("nmf_beta_mu")
BETAS = [2.0, 1.0, 0.0, 0.5, 1.5, 3.0]
# (alpha_w, alpha_h, l1_ratio, update_h)
SETTINGS = [(0.0, 0.0, 0.0, True), (0.01, 0.02, 0.3, True), (0.01, 0.01, 0.0, False)]


def shapes_for(backend, device):
    # Odd sizes, 1 x n and m x 1, more rows and columns than one tile (16 x 256 on the CPU),
    # a repeated shape, a rank above 16.
    if interpreted(backend, device):
        return [(7, 13, 4), (1, 9, 3), (11, 1, 1), (9, 21, 6), (7, 13, 4)]
    return [(37, 53, 5), (1, 70, 3), (65, 1, 1), (40, 600, 7), (300, 45, 20), (37, 53, 5)]


def batch(shapes, device, beta, seed=0):
    gen = torch.Generator().manual_seed(seed)
    vs, ws, hs = [], [], []
    for m, n, r in shapes:
        r = min(r, m, n)
        v = torch.rand(m, n, generator=gen)
        if beta > 0:
            v[torch.rand(m, n, generator=gen) < 0.25] = 0
        else:
            v += 0.05
        vs.append(v.to(device))
        ws.append((torch.rand(m, r, generator=gen) + 0.05).to(device))
        hs.append((torch.rand(r, n, generator=gen) + 0.05).to(device))
    return vs, ws, hs


def run(backend, vs, ws, hs, max_iter, tol, beta, setting):
    w = [t.clone() for t in ws]
    h = [t.clone() for t in hs]
    n_iter = _ops.nmf_beta_mu_(vs, w, h, max_iter, tol, beta, *setting, backend)
    return w, h, n_iter.cpu()


@pytest.mark.parametrize(("backend", "device"), CASES)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("setting", SETTINGS)
def test_factors_match_reference_after_a_few_iterations(backend, device, beta, setting):
    shapes = shapes_for(backend, device)
    vs, ws, hs = batch(shapes, device, beta)
    expected = run("reference", vs, ws, hs, 5, 0.0, beta, setting)
    got = run(backend, vs, ws, hs, 5, 0.0, beta, setting)
    assert torch.equal(got[2], expected[2]), "n_iter"
    for i in range(len(vs)):
        assert_close(got[0][i], expected[0][i], atol=1e-6, rtol=5e-4, what=f"{backend} W[{i}]")
        assert_close(got[1][i], expected[1][i], atol=1e-6, rtol=5e-4, what=f"{backend} H[{i}]")
        if not setting[3]:
            assert torch.equal(got[1][i], hs[i]), "update_h=False must keep H"


@pytest.mark.parametrize(("backend", "device"), CASES)
@pytest.mark.parametrize("beta", BETAS)
def test_stopping_and_divergence_match_reference(backend, device, beta):
    small = interpreted(backend, device)
    shapes = shapes_for(backend, device)
    vs, ws, hs = batch(shapes, device, beta, seed=1)
    # an exactly low-rank matrix stops early, the random ones later
    gen = torch.Generator().manual_seed(2)
    vs[0] = (torch.rand(shapes[0][0], 2, generator=gen) @ torch.rand(2, shapes[0][1],
             generator=gen)).to(device) + (0.05 if beta <= 0 else 0.0)  # fmt: skip
    setting = (0.001, 0.001, 0.5, True)
    max_iter = 80 if small else 300
    expected = run("reference", vs, ws, hs, max_iter, 1e-3, beta, setting)
    got = run(backend, vs, ws, hs, max_iter, 1e-3, beta, setting)
    assert got[2].tolist() == expected[2].tolist(), "n_iter per matrix"
    for i, v in enumerate(vs):
        e_ref = float(divergence_error(v, expected[0][i], expected[1][i], beta))
        e = float(divergence_error(v, got[0][i], got[1][i], beta))
        assert e == pytest.approx(e_ref, rel=1e-3, abs=1e-6), f"matrix {i} {shapes[i]}"
        assert torch.isfinite(got[0][i]).all() and torch.isfinite(got[1][i]).all()


@pytest.mark.parametrize(("backend", "device"), CASES)
def test_matrices_solved_together_equal_each_alone(backend, device):
    shapes = shapes_for(backend, device)
    vs, ws, hs = batch(shapes, device, 1.0, seed=3)
    together = run(backend, vs, ws, hs, 40, 1e-4, 1.0, SETTINGS[1])
    for i in range(len(vs)):
        alone = run(backend, vs[i : i + 1], ws[i : i + 1], hs[i : i + 1], 40, 1e-4, 1.0,
                    SETTINGS[1])  # fmt: skip
        assert torch.equal(together[0][i], alone[0][0]), f"W[{i}]"
        assert torch.equal(together[1][i], alone[1][0]), f"H[{i}]"
