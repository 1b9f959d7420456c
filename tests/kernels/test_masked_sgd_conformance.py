"""Every registered masked_sgd_step kernel against the reference kernel, through the op."""

from __future__ import annotations

import pytest
import torch
from conftest import STEP_TOLERANCES, assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.cases import interpreted, kernel_cases
from ong_kernels import _ops
from ong_kernels._bitmask import pack_mask

CASES = kernel_cases("masked_sgd_step")


def poisoned_inputs(sizes, device, dtype, momentum, density, gen):
    params = [torch.randn(n, generator=gen).to(device, dtype) for n in sizes]
    grads = [torch.randn(n, generator=gen).to(device, dtype) for n in sizes]
    bufs = [torch.randn(n, generator=gen).to(device, dtype) for n in sizes] if momentum else []
    masks = [
        (torch.rand(n, generator=gen) < density).to(device) if i % 3 != 2 else None
        for i, n in enumerate(sizes)
    ]
    # garbage in grads at pruned positions, and in pruned weights/buffers, which the step must
    # overwrite with exact zeros
    for i, m in enumerate(masks):
        if m is not None:
            grads[i][~m] = float("nan")
            params[i][~m] = 1e30 if dtype != torch.float16 else 6e4
            if bufs:
                bufs[i][~m] = float("inf")
    return params, grads, bufs, masks


def assert_half_step(got, ref, exact, atol, rtol, what):
    """A float16/bfloat16 step within the tolerance of the float64 step plus twice the
    reference's own error there (flash-attention's idiom): the reference rounds after every
    PyTorch op, the kernels once in float32, so under cancellation (momentum * buf ~ -g)
    they differ by an ulp of the operands, far above any tolerance on the result."""
    assert not bool(torch.isnan(got).any()), f"{what}: NaN"
    err = (got.double() - exact).abs()
    bound = atol + rtol * exact.abs() + 2 * (ref.double() - exact).abs()
    bad = err > bound
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} entries beyond the bound, worst {float((err - bound).max()):.3g}"
    )


@pytest.mark.parametrize(("backend", "device"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@settings(max_examples=20, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 70_000), min_size=1, max_size=6),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    dampening=st.sampled_from([0.0, 0.25]),
    weight_decay=st.sampled_from([0.0, 5e-4, 0.1]),
    nesterov=st.booleans(),
    maximize=st.booleans(),
    first_step=st.booleans(),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**20),
)
def test_matches_reference(
    backend, device, dtype, sizes, momentum, dampening, weight_decay, nesterov, maximize,
    first_step, density, seed,
):  # fmt: skip
    if interpreted(backend, device):
        sizes = [min(s, 3000) for s in sizes]
    if nesterov and (momentum == 0 or dampening != 0):
        nesterov = False
    gen = torch.Generator().manual_seed(seed)
    params, grads, bufs, masks = poisoned_inputs(sizes, device, dtype, momentum, density, gen)
    expected = [t.clone() for t in params], [t.clone() for t in bufs]
    hyper = (0.05, momentum, dampening, weight_decay, nesterov, maximize, first_step)
    bits = [None if m is None else pack_mask(m) for m in masks]
    _ops.masked_sgd_step_(expected[0], grads, expected[1], bits, *hyper, "reference")
    exact = None
    if dtype in (torch.float16, torch.bfloat16):
        # the float64 step of the same inputs: half types are judged against it (below)
        exact = [t.double() for t in params], [t.double() for t in bufs]
        grads64 = [g.double() for g in grads]
        _ops.masked_sgd_step_(exact[0], grads64, exact[1], bits, *hyper, "reference")
    _ops.masked_sgd_step_(params, grads, bufs, bits, *hyper, backend)
    atol, rtol = STEP_TOLERANCES[dtype]
    for i in range(len(sizes)):
        pairs = [("param", params[i], expected[0][i], exact and exact[0][i])]
        if bufs:
            pairs.append(("buf", bufs[i], expected[1][i], exact and exact[1][i]))
        for what, got, ref, ref64 in pairs:
            if ref64 is None:
                assert_close(got, ref, atol=atol, rtol=rtol, what=f"{backend} {what} {i}")
            else:
                assert_half_step(got, ref, ref64, atol, rtol, f"{backend} {what} {i}")
        if masks[i] is not None:
            assert bool((params[i][~masks[i]] == 0).all())
            if bufs:
                assert bool((bufs[i][~masks[i]] == 0).all())


@pytest.mark.parametrize(("backend", "device"), CASES)
def test_op_passes_opcheck(backend, device):
    params = [torch.randn(5, 3, device=device), torch.randn(4, device=device)]
    grads = [torch.randn_like(p) for p in params]
    bufs = [torch.randn_like(p) for p in params]
    masks = [pack_mask(torch.rand(5, 3, device=device) > 0.5), None]
    torch.library.opcheck(
        _ops.masked_sgd_step_,
        (params, grads, bufs, masks, 0.1, 0.9, 0.0, 1e-4, True, False, False, backend),
    )


def run_both(backend, params, grads, bufs, masks, hyper, scale=None):
    """The op with `backend` and with the reference on clones; compare and check pruned 0.
    Returns the number of tensors compared."""
    expected = [t.clone() for t in params], [t.clone() for t in bufs]
    bits = [None if m is None else pack_mask(m) for m in masks]
    _ops.masked_sgd_step_(expected[0], grads, expected[1], bits, *hyper, "reference")
    _ops.masked_sgd_step_(params, grads, bufs, bits, *hyper, backend)
    for i, p in enumerate(params):
        atol, rtol = STEP_TOLERANCES[p.dtype]
        assert_close(p, expected[0][i], atol=atol, rtol=rtol, what=f"{backend} param {i}")
        if bufs:
            assert_close(bufs[i], expected[1][i], atol=atol, rtol=rtol, what=f"{backend} buf {i}")
        if masks[i] is not None:
            assert not bool(p[~masks[i]].any())
            if bufs:
                assert not bool(bufs[i][~masks[i]].any())
    return len(params)


HYPER = (0.05, 0.9, 0.0, 5e-4, True, False, False)

# (name, sizes, density): the cases every kernel must pass (issue 10).
SIZE_CASES = [
    ("one-element", [1], 1.0),
    ("278011", [278_011], 0.1),
    ("1000-tiny", [(7 * k) % 13 + 1 for k in range(1000)], 0.5),
    # more tensors than any one pointer table of a kernel-argument design holds (apex: 110):
    # ours live in device memory, so one launch takes them all
    ("2100-tensors", [(k % 5) + 3 for k in range(2100)], 0.4),
    ("all-kept", [4099, 17], 1.0),
    ("all-pruned", [4099, 17], 0.0),
]


@pytest.mark.parametrize(("backend", "device"), CASES)
@pytest.mark.parametrize(("name", "sizes", "density"), SIZE_CASES, ids=[c[0] for c in SIZE_CASES])
def test_sizes_and_densities(backend, device, name, sizes, density):
    gen = torch.Generator().manual_seed(len(sizes))
    params, grads, bufs, masks = poisoned_inputs(sizes, device, torch.float32, 0.9, density, gen)
    if name == "all-kept":
        masks = [None if m is None else torch.ones_like(m) for m in masks]
    assert run_both(backend, params, grads, bufs, masks, HYPER) == len(sizes)
    # the poisoned inputs (NaN gradients, 1e30 weights at pruned positions) left no trace
    assert all(bool(torch.isfinite(p).all()) for p in params)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """t's values in a view one element into a fresh buffer: 4 B (fp32), 2 B (half) or 8 B
    (double) off the allocation's alignment, so the CUDA kernel's 16/8/32-B vector path
    must fall back to scalar code."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:]
    out.copy_(t)
    return out


@pytest.mark.parametrize(("backend", "device"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("which", ["all", "param", "grad", "buf"])
def test_misaligned_tensors(backend, device, dtype, which):
    """Views that start one element into their storage (`torch.randn(n + 1)[1:]`), every
    tensor or one of param / grad / buffer (the others aligned), next to aligned tensors."""
    gen = torch.Generator().manual_seed(17)
    sizes = [4099, 33, 1]
    params, grads, bufs, masks = poisoned_inputs(sizes, device, dtype, 0.9, 0.5, gen)
    for i in range(2):  # the last tensor stays aligned
        if which in ("all", "param"):
            params[i] = _misaligned(params[i])
        if which in ("all", "grad"):
            grads[i] = _misaligned(grads[i])
        if which in ("all", "buf"):
            bufs[i] = _misaligned(bufs[i])
    assert params[0].storage_offset() == (1 if which in ("all", "param") else 0)
    hyper = (0.05, 0.9, 0.25, 5e-4, False, False, False)
    if dtype == torch.float16:  # judged as in test_matches_reference: against float64
        expected = [p.clone() for p in params], [b.clone() for b in bufs]
        exact = [p.double() for p in params], [b.double() for b in bufs]
        bits = [None if m is None else pack_mask(m) for m in masks]
        _ops.masked_sgd_step_(expected[0], grads, expected[1], bits, *hyper, "reference")
        grads64 = [g.double() for g in grads]
        _ops.masked_sgd_step_(exact[0], grads64, exact[1], bits, *hyper, "reference")
        _ops.masked_sgd_step_(params, grads, bufs, bits, *hyper, backend)
        atol, rtol = STEP_TOLERANCES[dtype]
        for i in range(len(sizes)):
            assert_half_step(params[i], expected[0][i], exact[0][i], atol, rtol, f"param {i}")
            assert_half_step(bufs[i], expected[1][i], exact[1][i], atol, rtol, f"buf {i}")
    else:
        assert run_both(backend, params, grads, bufs, masks, hyper) == len(sizes)


@pytest.mark.parametrize(("backend", "device"), [("reference", "cpu"), *CASES])
@pytest.mark.parametrize("compact", [False, True], ids=["dense", "compact"])
@pytest.mark.parametrize(
    ("momentum", "with_buffers", "argument"),
    [(0.9, False, "momentum=0.9"), (0.0, True, "momentum=0")],
    ids=["momentum-no-buffers", "buffers-no-momentum"],
)
def test_momentum_and_buffers_come_together(
    backend, device, compact, momentum, with_buffers, argument
):
    """Every kernel once decided momentum differently (CPU and Triton from momentum != 0, CUDA
    and the reference from the buffers): momentum without buffers wrote through address 0,
    buffers without momentum stepped differently. The op refuses both, naming the argument,
    before any tensor changes; twice, so that a cached plan is no way around it."""
    from ong_kernels._bitmask import block_offsets
    from ong_kernels._bitmask import compact as to_compact

    gen = torch.Generator().manual_seed(23)
    sizes = [300, 17]
    params, grads, bufs, masks = poisoned_inputs(sizes, device, torch.float32, 0.9, 1.0, gen)
    masks = [(torch.rand(n, generator=gen) < 0.5).to(device) for n in sizes]
    bits = [pack_mask(m) for m in masks]
    good = (0.05, 0.9, 0.0, 0.0, False, False, False)
    bad = (0.05, momentum, 0.0, 0.0, False, False, False)
    if compact:
        cbufs = [to_compact(b, m) for b, m in zip(bufs, masks, strict=True)]
        offsets = [block_offsets(m) for m in masks]
        step = _ops.masked_sgd_compact_step_
        lists = (cbufs, bits, offsets)
        bad_lists = (cbufs if with_buffers else [], bits, offsets)
        name = "momentum_compact"
    else:
        step = _ops.masked_sgd_step_
        lists = (bufs, bits)
        bad_lists = (bufs if with_buffers else [], bits)
        name = "momentum_buffers"
    step(params, grads, *lists, *good, backend)  # a plan for these tensors is cached now
    before = [p.clone() for p in params], [b.clone() for b in lists[0]]
    for _ in range(2):
        with pytest.raises(ValueError, match=rf"{argument}.*{name}|{name}.*{argument}"):
            step(params, grads, *bad_lists, *bad, backend)
    for got, want in zip(params + list(lists[0]), before[0] + before[1], strict=True):
        assert torch.equal(got, want), "a refused step changed a tensor"


@pytest.mark.parametrize(("backend", "device"), CASES)
def test_mixed_dtypes_in_one_call(backend, device):
    gen = torch.Generator().manual_seed(3)
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16] * 2
    params, grads, bufs, masks = [], [], [], []
    for k, dtype in enumerate(dtypes):
        p, g, b, m = poisoned_inputs([300 + 37 * k], device, dtype, 0.9, 0.3, gen)
        params += p
        grads += g
        bufs += b
        masks += [m[0]]
    assert run_both(backend, params, grads, bufs, masks, HYPER) == len(dtypes)
    assert [p.dtype for p in params] == dtypes and [b.dtype for b in bufs] == dtypes
    assert all(bool(torch.isfinite(p).all()) for p in params)


@pytest.mark.parametrize(("backend", "device"), CASES)
@pytest.mark.parametrize("inf", [False, True])
def test_grad_scaler_values_through_the_op(backend, device, inf):
    """GradScaler's fused path: scaled gradients and the scale give the unscaled step; a
    nonzero found_inf changes nothing (read by the kernel)."""
    gen = torch.Generator().manual_seed(5)
    sizes = [1000, 33, 4096]
    params, grads, bufs, masks = poisoned_inputs(sizes, device, torch.float32, 0.9, 0.5, gen)
    bits = [None if m is None else pack_mask(m) for m in masks]
    expected = [t.clone() for t in params], [t.clone() for t in bufs]
    if not inf:
        _ops.masked_sgd_step_(expected[0], grads, expected[1], bits, *HYPER, "reference")
    scale = torch.full((1,), 1024.0, device=device)
    found = torch.full((1,), 1.0 if inf else 0.0, device=device)
    scaled = [g * 1024.0 for g in grads]
    _ops.masked_sgd_step_(params, scaled, bufs, bits, *HYPER, backend, scale, found)
    for i in range(len(sizes)):
        assert_close(params[i], expected[0][i], atol=1e-6, rtol=1e-5, what=f"param {i}")
        assert_close(bufs[i], expected[1][i], atol=1e-6, rtol=1e-5, what=f"buf {i}")


# ----------------------------------------------------------------------------- every CPU ISA


CPU_HYPERS = [
    (0.05, 0.9, 0.0, 5e-4, True, False, False),
    (0.05, 0.9, 0.0, 5e-4, True, False, True),  # first step
    (0.1, 0.5, 0.25, 0.0, False, True, False),  # dampening, maximize, no weight decay
    (0.1, 0.0, 0.0, 0.1, False, False, False),  # no momentum
]


def _compact_inputs(params, bufs, masks):
    from ong_kernels._bitmask import block_offsets, compact

    cbufs = [compact(b, m) for b, m in zip(bufs, masks, strict=True)] if bufs else []
    offsets = [block_offsets(m) for m in masks]
    return cbufs, offsets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hyper", CPU_HYPERS, ids=["nesterov", "first", "damp-max", "plain"])
@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
def test_every_isa_dense_and_compact(isa, dtype, hyper, density):
    """The CPU kernel under each ISA: dense against the reference, and compact_state against
    the same ISA's dense step bit for bit (the odd sizes cross the 8/16-lane groups, the
    chunk boundary at 16384 and the scalar tails)."""
    from ong_kernels._bitmask import expand

    gen = torch.Generator().manual_seed(int(density * 10) + len(isa))
    sizes = [1, 7, 9, 33, 16_385, 40_003]
    momentum = hyper[1]
    masks = [torch.rand(n, generator=gen) < density for n in sizes]  # every tensor masked
    # as the optimizer leaves them: pruned weights and momentum 0; NaN gradients there
    params = [
        torch.randn(n, generator=gen).to(dtype) * m for n, m in zip(sizes, masks, strict=True)
    ]
    grads = [
        torch.where(m, torch.randn(n, generator=gen).to(dtype), float("nan"))
        for n, m in zip(sizes, masks, strict=True)
    ]
    bufs = [torch.randn(n, generator=gen).to(dtype) * m for n, m in zip(sizes, masks, strict=True)]
    bufs = bufs if momentum else []
    twins = [p.clone() for p in params]
    cbufs, offsets = _compact_inputs(twins, bufs, masks)
    assert run_both("cpu", params, grads, bufs, masks, hyper) == len(sizes)
    bits = [pack_mask(m) for m in masks]
    _ops.masked_sgd_compact_step_(twins, grads, cbufs, bits, offsets, *hyper, "cpu")
    for i in range(len(sizes)):
        assert torch.equal(twins[i], params[i]), f"{isa} {dtype}: compact param {i}"
        if bufs:
            got = expand(cbufs[i], masks[i])
            assert torch.equal(got, bufs[i]), f"{isa} {dtype}: compact momentum {i}"


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("path", ["vector", "setbits"])
@pytest.mark.parametrize("hyper", CPU_HYPERS[:3], ids=["nesterov", "first", "damp-max"])
def test_both_x86_compact_spans_are_dense_mode(isa, path, hyper):
    """Each x86 ISA's compact span is chosen by timing at first use (AVX-512: vector
    expand/compress or the set-bit loop; AVX2: the block loop from 1/12 kept or the set-bit
    loop up to 1/2 kept); each one, forced, is the dense step bit for bit."""
    from ong_kernels._bitmask import expand
    from ong_kernels.backends import _native

    if not _native.has_cpu():
        pytest.skip("needs the compiled CPU kernels")
    lib = _native.lib()
    wanted = lib.Isa.__members__[isa]
    if lib.best_isa().value < wanted.value:
        pytest.skip(f"needs a CPU with {isa}")
    active = lib.active_isa()
    lib.set_isa(wanted)
    chosen = lib.masked_sgd_compact_path_cpu()
    gen = torch.Generator().manual_seed(11)
    sizes = [70, 16_449, 40_001, 9_000]  # 64-weight blocks, 16-lane groups and scalar tails
    # kept fractions on both sides of the AVX2 thresholds (1/12 and 1/2): every loop runs
    kept = [0.3, 0.3, 0.05, 0.7]
    masks = [torch.rand(n, generator=gen) < k for n, k in zip(sizes, kept, strict=True)]
    params = [torch.randn(n, generator=gen) * m for n, m in zip(sizes, masks, strict=True)]
    grads = [torch.randn(n, generator=gen) for n in sizes]
    bufs = [torch.randn(n, generator=gen) * m for n, m in zip(sizes, masks, strict=True)]
    twins = [p.clone() for p in params]
    cbufs, offsets = _compact_inputs(twins, bufs, masks)
    bits = [pack_mask(m) for m in masks]
    try:
        lib.set_masked_sgd_compact_path_cpu(path)
        assert lib.masked_sgd_compact_path_cpu() == path
        _ops.masked_sgd_step_(params, grads, bufs, bits, *hyper, "cpu")
        _ops.masked_sgd_compact_step_(twins, grads, cbufs, bits, offsets, *hyper, "cpu")
    finally:
        lib.set_masked_sgd_compact_path_cpu(chosen)
        lib.set_isa(active)
    for i in range(len(sizes)):
        assert torch.equal(twins[i], params[i]), f"{path}: param {i}"
        assert torch.equal(expand(cbufs[i], masks[i]), bufs[i]), f"{path}: momentum {i}"
