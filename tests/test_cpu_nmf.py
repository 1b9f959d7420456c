"""The compiled CPU NMF kernel (csrc/cpu/nmf_mu*.cpp) against the reference backend.

Beyond the conformance suite (tests/kernels/test_nmf_conformance.py, which runs this kernel
through the op), these cases cover what the whole-solve C++ kernel adds: every ISA path of
this CPU, the thread decomposition (1 and 2 threads bitwise equal, a matrix solved by the
team), the float64 trace-identity error behind per-matrix stopping, half and float64 inputs
converted inside the call, a matrix larger than L2, the native table validation and the
public nmf_batched(backend="cpu") path.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

import ong_kernels
from ong_kernels import _ops, nmf_plan
from ong_kernels.backends import _native

pytestmark = pytest.mark.skipif(not _native.has_cpu(), reason=_native.BUILD_HINT)

ODD_SHAPES = [
    (1, 70, 3), (65, 1, 2), (3, 1000, 16), (1000, 3, 16), (37, 53, 5), (1, 1, 1),
    (64, 576, 16), (33, 70, 24), (19, 130, 40), (200, 150, 70), (16, 144, 16),
]  # fmt: skip


@pytest.fixture
def threads():
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


def batch(shapes, *, seed, zero_at=None, dtype=torch.float32, low_rank=None):
    """Random non-negative V_i (in `dtype`) with random float32 starts, ranks clipped."""
    gen = torch.Generator().manual_seed(seed)
    vs, ws, hs = [], [], []
    for i, (m, n, r) in enumerate(shapes):
        r = min(r, m, n)
        if low_rank is not None and i in low_rank:
            k = low_rank[i]
            v = torch.rand(m, k, generator=gen) @ torch.rand(k, n, generator=gen)
        else:
            v = torch.rand(m, n, generator=gen)
        if i == zero_at:
            v.zero_()
        vs.append(v.to(dtype))
        ws.append(torch.rand(m, r, generator=gen) + 0.05)
        hs.append(torch.rand(r, n, generator=gen) + 0.05)
    return vs, ws, hs


def solve(backend, vs, ws, hs, max_iter, tol):
    w = [t.clone() for t in ws]
    h = [t.clone() for t in hs]
    n_iter = _ops.nmf_mu_(vs, w, h, max_iter, tol, backend)
    return w, h, n_iter


def rel_error(v, w, h) -> float:
    v64 = v.double()
    return float(torch.linalg.norm(v64 - w.double() @ h.double()) / max(v64.norm(), 1e-30))


def assert_factors_close(got, expected, *, atol=1e-6, rtol=2e-4, what=""):
    for i in range(len(got[0])):
        assert_close(got[0][i], expected[0][i], atol=atol, rtol=rtol, what=f"{what} W[{i}]")
        assert_close(got[1][i], expected[1][i], atol=atol, rtol=rtol, what=f"{what} H[{i}]")


# ----------------------------------------------------------------------------- numerics


def test_odd_shapes_match_reference_after_five_iterations(isa):
    vs, ws, hs = batch(ODD_SHAPES, seed=11, zero_at=4)
    expected = solve("reference", vs, ws, hs, 5, 0.0)
    got = solve("cpu", vs, ws, hs, 5, 0.0)
    assert got[2].tolist() == [5] * len(vs)
    # float32 rounding, compounded over 5 multiplicative updates
    assert_factors_close(got, expected, what=isa)
    # the all-zero matrix: W becomes exactly 0 after the first update (0 / den)
    assert bool((got[0][4] == 0).all())


def test_reconstruction_error_matches_after_200_iterations(isa):
    vs, ws, hs = batch(ODD_SHAPES, seed=12)
    expected = solve("reference", vs, ws, hs, 200, 0.0)
    got = solve("cpu", vs, ws, hs, 200, 0.0)
    for i, v in enumerate(vs):
        e_ref = rel_error(v, expected[0][i], expected[1][i])
        assert rel_error(v, got[0][i], got[1][i]) == pytest.approx(e_ref, rel=1e-3, abs=1e-7), i
        assert torch.isfinite(got[0][i]).all() and torch.isfinite(got[1][i]).all()


def test_matrices_stop_at_the_reference_iterations(isa):
    # Exactly low-rank matrices at higher rank converge early (their error tends to 0: the
    # float64 trace identity must not drown it in cancellation), random ones late, the
    # all-zero one at its second check; n_iter per matrix must be the reference's.
    shapes = [(40, 60, 3), (60, 40, 4), (50, 50, 6), (40, 60, 3), (30, 90, 5), (80, 20, 2)]
    vs, ws, hs = batch(shapes, seed=13, zero_at=3, low_rank={0: 2, 2: 3, 4: 1})
    expected = solve("reference", vs, ws, hs, 300, 1e-3)
    got = solve("cpu", vs, ws, hs, 300, 1e-3)
    assert got[2].tolist() == expected[2].tolist()
    assert len(set(expected[2].tolist())) >= 3, "the case should stop matrices at several checks"
    assert_factors_close(got, expected, atol=1e-5, rtol=1e-3, what=isa)


@pytest.mark.parametrize("tol", [0.0, 1e-12])
def test_no_stop_runs_max_iter(tol):
    vs, ws, hs = batch([(20, 30, 4), (7, 9, 2)], seed=14)
    for max_iter in (1, 10, 23):
        got = solve("cpu", vs, ws, hs, max_iter, tol)
        expected = solve("reference", vs, ws, hs, max_iter, tol)
        assert got[2].tolist() == [max_iter] * 2
        assert_factors_close(got, expected, atol=1e-5, rtol=1e-3, what=f"max_iter={max_iter}")


@pytest.mark.parametrize("init", ["random", "nndsvd", "nndsvda"])
def test_every_init_through_nmf_batched(init):
    gen = torch.Generator().manual_seed(15)
    weights = [torch.rand(16, 3, 3, 3, generator=gen), torch.rand(40, 70, generator=gen)]
    weights.append(torch.rand(10, 2, generator=gen) @ torch.rand(2, 30, generator=gen))
    kwargs = dict(max_iter=150, tol=1e-4, init=init, seed=3)
    got, it_got = ong_kernels.nmf.nmf_batched_with_info(weights, 4, backend="cpu", **kwargs)
    exp, it_exp = ong_kernels.nmf.nmf_batched_with_info(weights, 4, backend="reference", **kwargs)
    assert it_got == it_exp
    for i in range(len(weights)):
        assert_close(got[i][0], exp[i][0], atol=1e-5, rtol=1e-3, what=f"{init} W[{i}]")
        assert_close(got[i][1], exp[i][1], atol=1e-5, rtol=1e-3, what=f"{init} H[{i}]")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_half_and_double_inputs(dtype, isa):
    shapes = [(37, 53, 5), (3, 1000, 16), (64, 576, 16)]
    vs, ws, hs = batch(shapes, seed=16, dtype=dtype)
    # The op reads float64 V too (cast to float32 as the reference does).
    expected = solve("reference", vs, ws, hs, 5, 0.0)
    got = solve("cpu", vs, ws, hs, 5, 0.0)
    assert_factors_close(got, expected, what=f"{dtype} {isa}")
    # Mixed dtypes in one batch, through the public API (float64 is cast there).
    mixed = [vs[0].float(), vs[1].to(torch.float16), vs[2].to(dtype)]
    init = list(zip(ws, hs, strict=True))
    ranks = [w.shape[1] for w in ws]
    a = ong_kernels.nmf_batched(mixed, ranks, max_iter=5, tol=0, init=init, backend="cpu")
    b = ong_kernels.nmf_batched(mixed, ranks, max_iter=5, tol=0, init=init, backend="reference")
    for i in range(3):
        assert_close(a[i][0], b[i][0], atol=1e-6, rtol=2e-4, what=f"mixed W[{i}]")
        assert_close(a[i][1], b[i][1], atol=1e-6, rtol=2e-4, what=f"mixed H[{i}]")


def test_non_contiguous_inputs_through_nmf_batched():
    gen = torch.Generator().manual_seed(17)
    base = torch.rand(90, 70, generator=gen)
    weights = [base.t(), base[::2, 1:], torch.rand(8, 4, 3, 3, generator=gen).transpose(0, 1)]
    kwargs = dict(max_iter=20, tol=0, init="nndsvda")
    got = ong_kernels.nmf_batched(weights, 6, backend="cpu", **kwargs)
    exp = ong_kernels.nmf_batched(
        [w.contiguous() for w in weights], 6, backend="reference", **kwargs
    )
    for i in range(len(weights)):
        assert_close(got[i][0], exp[i][0], atol=1e-5, rtol=1e-3, what=f"W[{i}]")
        assert_close(got[i][1], exp[i][1], atol=1e-5, rtol=1e-3, what=f"H[{i}]")


# ----------------------------------------------------------------------------- threads


def test_one_and_two_threads_are_bitwise_equal(threads, isa):
    # (300, 400) is more than half of a thread's share: the 2-thread run solves it with the
    # whole team (row/column blocks shared out); the small ones go one per thread.
    shapes = [(300, 400, 24), (16, 144, 16), (64, 576, 16), (5, 7, 3), (97, 33, 8)]
    vs, ws, hs = batch(shapes, seed=18, low_rank={4: 2})
    results = []
    for n in (1, 2):
        threads(n)
        results.append(solve("cpu", vs, ws, hs, 60, 1e-4))
    one, two = results
    assert one[2].tolist() == two[2].tolist()
    for i in range(len(vs)):
        assert torch.equal(one[0][i], two[0][i]), f"W[{i}] differs between 1 and 2 threads"
        assert torch.equal(one[1][i], two[1][i]), f"H[{i}] differs between 1 and 2 threads"
    expected = solve("reference", vs, ws, hs, 60, 1e-4)
    assert one[2].tolist() == expected[2].tolist()
    assert_factors_close(one, expected, atol=1e-5, rtol=1e-3)


def test_matrix_larger_than_l2(threads):
    # 2048 x 4608 float32 = 37.7 MB: V streams from L3/DRAM in both sweeps, and W^T V packs
    # V panels (m >= 1024). A few iterations against the reference.
    threads(2)
    gen = torch.Generator().manual_seed(19)
    v = torch.rand(2048, 4608, generator=gen)
    w0 = torch.rand(2048, 16, generator=gen)
    h0 = torch.rand(16, 4608, generator=gen)
    expected = solve("reference", [v], [w0], [h0], 3, 0.0)
    got = solve("cpu", [v], [w0], [h0], 3, 0.0)
    assert_factors_close(got, expected, atol=1e-6, rtol=2e-4)


# ----------------------------------------------------------------------------- native API


def native_call(vs, ws, hs, *, max_iter=3, tol=0.0, table=None, dtypes=None, n_iter=None):
    lib = _native.lib()
    table = nmf_plan.matrix_table(vs, ws, hs) if table is None else table
    if dtypes is None:
        dtypes = torch.tensor([int(_native.NATIVE_DTYPES[v.dtype]) for v in vs])
    n_iter = torch.full((len(vs),), -7, dtype=torch.int64) if n_iter is None else n_iter
    lib.nmf_mu_cpu(
        table.data_ptr(), dtypes.data_ptr(), len(vs), max_iter, tol, n_iter.data_ptr(), 2
    )
    return n_iter


def test_n_iter_is_written_for_every_matrix():
    # n_iter is the kernel's one separate output: it starts poisoned.
    vs, ws, hs = batch([(5, 7, 2), (9, 4, 3), (30, 40, 5)], seed=20)
    assert native_call(vs, ws, hs, max_iter=4).tolist() == [4, 4, 4]
    vs, ws, hs = batch([(5, 7, 2), (9, 4, 3)], seed=20, zero_at=0)
    assert native_call(vs, ws, hs, max_iter=100, tol=1e-3).tolist()[0] == 20


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [(3, 0, "m, n and r must be > 0"), (4, -1, "m, n and r must be > 0"),
     (5, 9, "r must be <= min"), (0, 0, "null V")],
)  # fmt: skip
def test_native_table_is_validated_before_anything_runs(column, value, message):
    vs, ws, hs = batch([(5, 7, 2), (6, 8, 3)], seed=21)
    w_before = [w.clone() for w in ws]
    table = nmf_plan.matrix_table(vs, ws, hs)
    table[1, column] = value
    with pytest.raises(ValueError, match=message):
        native_call(vs, ws, hs, table=table)
    assert all(torch.equal(a, b) for a, b in zip(ws, w_before, strict=True)), "W was touched"


def test_native_rejects_bad_dtype_code_and_arguments():
    vs, ws, hs = batch([(5, 7, 2)], seed=22)
    with pytest.raises(ValueError, match="unknown dtype code"):
        native_call(vs, ws, hs, dtypes=torch.tensor([42]))
    with pytest.raises(ValueError, match="tol"):
        native_call(vs, ws, hs, tol=float("nan"))
    with pytest.raises(ValueError, match="max_iter"):
        native_call(vs, ws, hs, max_iter=-1)


# ----------------------------------------------------------------------------- dispatch


def test_nmf_batched_backend_cpu_end_to_end():
    gen = torch.Generator().manual_seed(23)
    weights = [torch.randn(32, 16, 3, 3, generator=gen).abs(), torch.rand(10, 64, generator=gen)]
    factors = ong_kernels.nmf_batched(weights, 8, max_iter=200, backend="cpu")
    reference = ong_kernels.nmf_batched(weights, 8, max_iter=200, backend="reference")
    assert ong_kernels.backends_available()["cpu"]
    for (w, h), (wr, hr), x in zip(factors, reference, weights, strict=True):
        v = x.reshape(x.shape[0], -1)
        assert w.dtype == h.dtype == torch.float32
        assert rel_error(v, w, h) == pytest.approx(rel_error(v, wr, hr), rel=1e-3)


def test_backend_cpu_without_extension_raises_build_hint(monkeypatch):
    monkeypatch.setattr(_native, "_C", None)
    with pytest.raises(RuntimeError, match="pip install -e"):
        ong_kernels.nmf_batched([torch.rand(4, 5)], 2, backend="cpu")


def test_auto_picks_the_cpu_kernel_when_built(monkeypatch):
    from ong_kernels.backends import registry

    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    assert registry.select("nmf_mu", "cpu").backend == "cpu"


# ----------------------------------------------------------------------------- sketch products

SKETCH_SHAPES = [(1, 70, 3), (70, 1, 1), (37, 53, 5), (300, 1100, 26), (1100, 300, 17),
                 (1000, 2100, 33), (97, 1025, 16)]  # fmt: skip


@pytest.mark.parametrize("transpose", [False, True], ids=["v_x", "vt_x"])
def test_sketch_product_matches_float64_matmul(isa, transpose, monkeypatch):
    # The randomized SVD's products on the MU tiles (nmf_init._sketch_products): odd shapes,
    # widths that are and are not a multiple of 16, several slabs and column chunks. The
    # output is allocated NaN-filled: an entry the kernel does not write fails.
    from ong_kernels.backends.cpu_nmf import sketch_product

    full = torch.full
    monkeypatch.setattr(torch, "empty", lambda *size: full(size, float("nan")))
    gen = torch.Generator().manual_seed(3)
    for m, n, w in SKETCH_SHAPES:
        v = torch.rand(m, n, generator=gen)
        x = torch.randn(m if transpose else n, w, generator=gen)
        got = sketch_product(v, x, transpose=transpose)
        v64, x64 = v.double(), x.double()
        want = (v64.T @ x64 if transpose else v64 @ x64).float()
        assert got.shape == want.shape
        inner = m if transpose else n
        assert_close(got, want, atol=1e-5 * inner**0.5, rtol=1e-4, what=f"{isa} {m}x{n} w{w}")


def test_sketch_product_is_the_same_for_one_and_two_threads(threads, isa):
    from ong_kernels.backends.cpu_nmf import sketch_product

    gen = torch.Generator().manual_seed(4)
    v = torch.rand(1000, 2100, generator=gen)  # 11 row blocks in 4 slabs, 3 column chunks
    x, q = torch.randn(2100, 26, generator=gen), torch.randn(1000, 26, generator=gen)
    results = []
    for count in (1, 2):
        threads(count)
        results.append((sketch_product(v, x), sketch_product(v, q, transpose=True)))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize(
    "v,x,transpose,message",
    [
        (torch.rand(5, 7), torch.rand(5, 2), False, "x must be 7 x w"),
        (torch.rand(5, 7), torch.rand(7, 2), True, "x must be 5 x w"),
        (torch.rand(5, 7), torch.rand(7, 0), False, "x must be 7 x w with w >= 1"),
        (torch.rand(5, 7).double(), torch.rand(7, 2), False, "must be float32"),
        (torch.rand(5, 7, 1), torch.rand(7, 2), False, "must be 2-D"),
    ],
)
def test_sketch_product_refuses_bad_operands(v, x, transpose, message):
    from ong_kernels.backends.cpu_nmf import sketch_product

    with pytest.raises(ValueError, match=message) as info:
        sketch_product(v, x, transpose=transpose)
    text = str(info.value)  # one line, naming the function
    assert text.startswith("sketch_product:") and "\n" not in text


@pytest.mark.parametrize(
    "args,message",
    [
        ((0, 5, 7, 1, 16, 1), "null"),
        ((1, 5, 7, 1, 20, 1), "multiple of 16"),
        ((1, 0, 7, 1, 16, 1), "m and n"),
        ((1, 5, 1 << 31, 1, 16, 1), "m and n"),
    ],
)
def test_native_sketch_product_checks_sizes_and_addresses(args, message):
    # Raw addresses: the native call refuses what it can check before touching memory (the
    # dummy non-null addresses are never read: every case fails a check first).
    v, m, n, x, wp, out = args
    with pytest.raises(ValueError, match=message) as info:
        _native.lib().sketch_product_cpu(v, m, n, x, wp, out, False, 1)
    assert str(info.value).startswith("sketch_product_cpu:")


def test_randomized_svd_on_the_mu_tiles_agrees_with_torch_matmul(monkeypatch):
    # The same sketch through torch's matmul (the path of every other device and dtype): the
    # singular values agree to float32 rounding, the subspaces up to sign.
    from ong_kernels import nmf_init

    gen = torch.Generator().manual_seed(5)
    for m, n in ((900, 300), (300, 900)):
        v = torch.rand(m, n, generator=gen) ** 4
        u1, s1, vh1 = nmf_init.randomized_svd(v, 8, seed=1)
        monkeypatch.setattr(
            nmf_init, "_sketch_products", lambda v: (v.__matmul__, lambda x: (x.T @ v).T)
        )
        u2, s2, vh2 = nmf_init.randomized_svd(v, 8, seed=1)
        monkeypatch.undo()
        assert_close(s1, s2, atol=1e-4, rtol=1e-4, what=f"{m}x{n} singular values")
        assert_close((u1 * u2).sum(0).abs(), torch.ones(8), atol=1e-3, rtol=0, what="U")
        assert_close((vh1 * vh2).sum(1).abs(), torch.ones(8), atol=1e-3, rtol=0, what="Vh")
