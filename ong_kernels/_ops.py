"""Every op's schema, once (torch.library), its argument checks and its fake implementation.

Which kernel runs is not decided here: each op has one implementation for every device
(CompositeExplicitAutograd) that asks the backend registry (ong_kernels/backends/registry.py)
for the kernel of the tensors' device and the op's `backend` argument ("auto", "reference",
"cpu", "cuda", "triton"). That keeps several kernels per device possible (Triton and CUDA C++
both serve CUDA tensors; Triton's interpreter runs on CPU tensors) and lets the public API's
`backend=` reach the kernel through the op.

Mutated tensors are marked in the schemas (Tensor(a!)), so torch.compile and
torch.library.opcheck know what each op writes. The checks below run in the fakes (meta and
FakeTensor tracing) and in every kernel before it builds (or when it misses) its cached plan,
so a kernel is never handed tensors of mixed devices, wrong dtypes or wrong shapes, whoever
calls the op. The masked SGD checks are one function (backends/_sgd_args.py) for the fake
and every kernel, raising ValueError.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ong_kernels.backends import load_all, registry
from ong_kernels.backends._sgd_args import (
    HYPER_SCHEMA,
    SgdHyper,
    check_compact_args,
    check_momentum,
    check_step_args,
)
from ong_kernels.nmf_beta import BetaLoss

NAMESPACE = "ong_kernels"
_lib = torch.library.Library(NAMESPACE, "DEF")

# cudagraph_unsafe: torch.compile's CUDA-graph trees must not capture the step (its pointer
# table and hyper-parameters are host values; the kernels refuse capture, issue 10).
_CUDAGRAPH_UNSAFE = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t)
_lib.define(
    "masked_sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
    f"Tensor?[] mask_bits, {HYPER_SCHEMA}, str backend='auto', Tensor? grad_scale=None, "
    "Tensor? found_inf=None) -> ()",
    tags=_CUDAGRAPH_UNSAFE,
)
# compact_state (ong_kernels/_bitmask.py): momentum_compact[i] holds the kept elements of params[i]
# only, offsets[i] the kept elements before each COMPACT_BLOCK. A kernel declares that it runs
# this format (`fn.compact`); for one that does not, the reference's gather/scatter runs it.
_lib.define(
    "masked_sgd_compact_step_(Tensor(a!)[] params, Tensor[] grads, "
    "Tensor(b!)[] momentum_compact, "
    f"Tensor[] mask_bits, Tensor[] offsets, {HYPER_SCHEMA}, str backend='auto', "
    "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()",
    tags=_CUDAGRAPH_UNSAFE,
)
# The ragged batch is three lists (V_i any float dtype, W_i (m_i, r_i) and H_i (r_i, n_i)
# float32, contiguous); kernels read them through a pointer table (ong_kernels/nmf_plan.py
# says why that layout and not one packed buffer). Returns n_iter per matrix (int64).
_lib.define(
    "nmf_mu_(Tensor[] v, Tensor(a!)[] w, Tensor(b!)[] h, int max_iter, float tol, "
    "str backend='auto', str precision='ieee') -> Tensor"
)

# Beta-divergence MU with scikit-learn's regularisation (ong_kernels/nmf_beta.py has the rules):
# one beta per call; alpha_h already resolved from "same"; update_h=False keeps H fixed.
_lib.define(
    "nmf_beta_mu_(Tensor[] v, Tensor(a!)[] w, Tensor(b!)[] h, int max_iter, float tol, "
    "float beta, float alpha_w=0., float alpha_h=0., float l1_ratio=0., bool update_h=True, "
    "str backend='auto') -> Tensor"
)

NMF_INPUT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_nmf_args(v, w, h) -> None:
    """V_i 2-D floating, W_i (m, r) and H_i (r, n) float32 contiguous, all on one device."""
    n = len(v)
    torch._check(n > 0, lambda: "nmf_mu_ needs at least one matrix")
    torch._check(len(w) == n and len(h) == n, lambda: "v, w and h differ in length")
    device = v[0].device
    for i in range(n):
        vi, wi, hi = v[i], w[i], h[i]
        torch._check(vi.dim() == 2, lambda: f"v[{i}] must be 2-D, got {vi.dim()}-D")
        torch._check(vi.dtype in NMF_INPUT_DTYPES, lambda: f"v[{i}] has dtype {vi.dtype}")
        for name, t in (("v", vi), ("w", wi), ("h", hi)):
            torch._check(t.device == device, lambda: f"{name}[{i}] is on {t.device}, not {device}")
            torch._check(t.is_contiguous(), lambda: f"{name}[{i}] must be contiguous")
        for name, t in (("w", wi), ("h", hi)):
            torch._check(t.dtype == torch.float32, lambda: f"{name}[{i}] must be float32")
        m, cols = vi.shape
        torch._check(
            wi.dim() == 2 and wi.shape[0] == m and hi.dim() == 2 and hi.shape[1] == cols,
            lambda: (
                f"w[{i}] {tuple(wi.shape)} and h[{i}] {tuple(hi.shape)} do not factor "
                f"v[{i}] {tuple(vi.shape)}"
            ),
        )
        torch._check(
            wi.shape[1] == hi.shape[0] and 1 <= wi.shape[1] <= min(m, cols),
            lambda: f"w[{i}] and h[{i}] need one rank in [1, min(m, n)]",
        )


def _masked_sgd_step_impl(
    params, grads, momentum_buffers, mask_bits, lr, momentum, dampening, weight_decay,
    nesterov, maximize, first_step, backend="auto", grad_scale=None, found_inf=None,
) -> None:  # fmt: skip
    """The kernel validates (the shared check_step_args) when it builds or misses its plan;
    momentum against its buffers is checked here, at every call."""
    check_momentum(momentum, len(params), momentum_buffers)
    if not params:
        check_step_args(params, grads, momentum_buffers, mask_bits)
        return
    kernel = registry.select("masked_sgd_step", params[0].device.type, backend)
    hyper = SgdHyper(lr, momentum, dampening, weight_decay, nesterov, maximize, first_step)
    kernel.fn(params, grads, momentum_buffers, mask_bits, hyper, grad_scale, found_inf)


def _masked_sgd_compact_step_impl(
    params, grads, momentum_compact, mask_bits, offsets, lr, momentum, dampening, weight_decay,
    nesterov, maximize, first_step, backend="auto", grad_scale=None, found_inf=None,
) -> None:  # fmt: skip
    check_momentum(momentum, len(params), momentum_compact, "momentum_compact")
    if not params:
        check_compact_args(params, grads, momentum_compact, mask_bits, offsets)
        return
    kernel = registry.select("masked_sgd_step", params[0].device.type, backend)
    step = getattr(kernel.fn, "compact", None)
    if step is None:  # this kernel has no compact form: the reference's gather/scatter
        step = registry.get("masked_sgd_step", "reference").fn.compact
    hyper = SgdHyper(lr, momentum, dampening, weight_decay, nesterov, maximize, first_step)
    step(params, grads, momentum_compact, mask_bits, offsets, hyper, grad_scale, found_inf)


def _nmf_mu_impl(v, w, h, max_iter, tol, backend="auto", precision="ieee") -> torch.Tensor:
    check_nmf_args(v, w, h)
    kernel = registry.select("nmf_mu", v[0].device.type, backend, precision)
    if precision == registry.IEEE:
        return kernel.fn(v, w, h, max_iter, tol)
    return kernel.fn(v, w, h, max_iter, tol, precision=precision)  # declared by the kernel


def _nmf_beta_mu_impl(
    v, w, h, max_iter, tol, beta, alpha_w=0.0, alpha_h=0.0, l1_ratio=0.0, update_h=True,
    backend="auto",
) -> torch.Tensor:  # fmt: skip
    check_nmf_args(v, w, h)
    kernel = registry.select("nmf_beta_mu", v[0].device.type, backend)
    loss = BetaLoss(float(beta), float(alpha_w), float(alpha_h), float(l1_ratio), bool(update_h))
    return kernel.fn(v, w, h, max_iter, tol, loss)


load_all()
_lib.impl("masked_sgd_step_", _masked_sgd_step_impl, "CompositeExplicitAutograd")
_lib.impl("masked_sgd_compact_step_", _masked_sgd_compact_step_impl, "CompositeExplicitAutograd")
_lib.impl("nmf_mu_", _nmf_mu_impl, "CompositeExplicitAutograd")
_lib.impl("nmf_beta_mu_", _nmf_beta_mu_impl, "CompositeExplicitAutograd")


@torch.library.register_fake(f"{NAMESPACE}::masked_sgd_step_")
def _masked_sgd_step_fake(params, grads, momentum_buffers, mask_bits, _lr, momentum, *_h) -> None:
    check_momentum(momentum, len(params), momentum_buffers)
    check_step_args(params, grads, momentum_buffers, mask_bits)


@torch.library.register_fake(f"{NAMESPACE}::masked_sgd_compact_step_")
def _masked_sgd_compact_step_fake(
    params, grads, momentum_compact, mask_bits, offsets, _lr, momentum, *_h
) -> None:
    check_momentum(momentum, len(params), momentum_compact, "momentum_compact")
    check_compact_args(params, grads, momentum_compact, mask_bits, offsets)


@torch.library.register_fake(f"{NAMESPACE}::nmf_mu_")
def _nmf_mu_fake(
    v: Sequence[torch.Tensor], w, h, max_iter, tol, backend="auto", precision="ieee"
) -> torch.Tensor:
    check_nmf_args(v, w, h)
    return v[0].new_empty((len(v),), dtype=torch.int64)


@torch.library.register_fake(f"{NAMESPACE}::nmf_beta_mu_")
def _nmf_beta_mu_fake(v: Sequence[torch.Tensor], w, h, *_settings) -> torch.Tensor:
    check_nmf_args(v, w, h)
    return v[0].new_empty((len(v),), dtype=torch.int64)


masked_sgd_step_ = torch.ops.ong_kernels.masked_sgd_step_
masked_sgd_compact_step_ = torch.ops.ong_kernels.masked_sgd_compact_step_
nmf_mu_ = torch.ops.ong_kernels.nmf_mu_
nmf_beta_mu_ = torch.ops.ong_kernels.nmf_beta_mu_
