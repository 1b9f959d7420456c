"""The C++ beta-divergence kernel (csrc/cpu/nmf_beta_kernel.h) beyond the conformance suite:
every ISA, thread-count invariance, other V dtypes, the native call's own argument checks, and
its memory: no m x n temporary (the extra memory stays O((m + n) r))."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, run_python

from ong_kernels import _ops, nmf_plan
from ong_kernels.backends import _native

pytestmark = pytest.mark.skipif(not _native.has_cpu(), reason="the C++ extension is not built")

SHAPES = [(37, 53, 5), (1, 70, 1), (300, 45, 20), (40, 600, 7)]


def batch(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    vs, ws, hs = [], [], []
    for m, n, r in SHAPES:
        v = torch.rand(m, n, generator=gen)
        v[torch.rand(m, n, generator=gen) < 0.2] = 0
        vs.append(v.to(dtype))
        ws.append(torch.rand(m, r, generator=gen) + 0.05)
        hs.append(torch.rand(r, n, generator=gen) + 0.05)
    return vs, ws, hs


def solve(backend, vs, ws, hs, beta, max_iter=8, tol=0.0, setting=(0.01, 0.01, 0.5, True)):
    w = [t.clone() for t in ws]
    h = [t.clone() for t in hs]
    n_iter = _ops.nmf_beta_mu_(vs, w, h, max_iter, tol, beta, *setting, backend)
    return w, h, n_iter


@pytest.mark.parametrize("beta", [1.0, 0.5, 2.0])
def test_every_isa_matches_the_reference(isa, beta):
    vs, ws, hs = batch()
    expected = solve("reference", vs, ws, hs, beta)
    got = solve("cpu", vs, ws, hs, beta)
    for i in range(len(vs)):
        assert_close(got[0][i], expected[0][i], atol=1e-6, rtol=5e-4, what=f"{isa} W[{i}]")
        assert_close(got[1][i], expected[1][i], atol=1e-6, rtol=5e-4, what=f"{isa} H[{i}]")


def test_one_thread_and_a_team_give_the_same_bits():
    vs, ws, hs = batch(seed=1)
    saved = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            # one matrix at a time: a team of `threads` shares each matrix's blocks
            results.append([solve("cpu", [v], [w], [h], 1.0, 30, 1e-4) for v, w, h in
                            zip(vs, ws, hs, strict=True)])  # fmt: skip
    finally:
        torch.set_num_threads(saved)
    for one, team in zip(*results, strict=True):
        assert torch.equal(one[0][0], team[0][0]) and torch.equal(one[1][0], team[1][0])
        assert torch.equal(one[2], team[2])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_v_dtypes_are_read_as_float32(dtype):
    vs, ws, hs = batch(seed=2, dtype=dtype)
    got = solve("cpu", vs, ws, hs, 1.0)
    expected = solve("cpu", [v.float() for v in vs], ws, hs, 1.0)
    for i in range(len(vs)):
        assert torch.equal(got[0][i], expected[0][i]) and torch.equal(got[1][i], expected[1][i])


def test_native_call_refuses_bad_tables_and_losses_before_touching_anything():
    lib = _native.lib()
    v, w, h = torch.rand(5, 6), torch.rand(5, 2), torch.rand(2, 6)
    w0, h0 = w.clone(), h.clone()
    n_iter = torch.zeros(1, dtype=torch.int64)

    def call(table, **loss):
        settings = {"beta": 1.0, "alpha_w": 0.0, "alpha_h": 0.0, "l1_ratio": 0.0, **loss}
        lib.nmf_beta_cpu(table.data_ptr(), 1, 5, 0.0, settings["beta"], settings["alpha_w"],
                         settings["alpha_h"], settings["l1_ratio"], True, n_iter.data_ptr(),
                         1)  # fmt: skip

    good = nmf_plan.matrix_table([v], [w], [h])
    bad_rank = good.clone()
    bad_rank[0, 5] = 7
    null_v = good.clone()
    null_v[0, 0] = 0
    for table, loss, match in [
        (bad_rank, {}, "r must be <= min"),
        (null_v, {}, "null V, W or H"),
        (good, {"l1_ratio": 2.0}, "l1_ratio must be in"),
        (good, {"alpha_w": -1.0}, "alpha_w and alpha_h"),
        (good, {"beta": float("nan")}, "beta must be finite"),
    ]:
        with pytest.raises(ValueError, match=match):
            call(table, **loss)
    assert torch.equal(w, w0) and torch.equal(h, h0)


MEMORY_SCRIPT = """
import sys, torch
from ong_kernels import nmf_batched
from ong_kernels.nmf_groups import solve_bytes
backend = sys.argv[1]
m, n, r = 4096, 4096, 16
torch.set_num_threads(2)
nmf_batched([torch.rand(40, 300)], 4, max_iter=3, backend=backend, beta_loss=1)  # warm-up
v = torch.rand(m, n)
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
before = status("VmRSS:")
nmf_batched([v], r, max_iter=20, tol=1e-4, backend=backend, beta_loss=1)
print("GROWTH", status("VmHWM:") - before, "V", v.numel() * 4)
"""


def test_kl_solve_holds_no_m_by_n_temporary():
    proc = run_python(MEMORY_SCRIPT, "cpu")
    words = proc.stdout.split()
    growth, v_bytes = int(words[words.index("GROWTH") + 1]), int(words[words.index("V") + 1])
    # W, H, the tiles and the OpenMP threads' arenas are a few MiB (measured 6 MiB at 2048 x
    # 4096); one m x n float32 temporary would be 64 MiB, the reference kernel's peak is ~12 V.
    assert growth < 0.25 * v_bytes, f"peak RSS grew by {growth} B for a {v_bytes} B V"
