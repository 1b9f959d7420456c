"""Every op's schema, once (torch.library), with its fake implementation and device kernels.

masked_sgd_step_ takes masks bit-packed (ong_kernels._bitmask.pack_mask: one bit per weight
in memory order, None for a dense tensor), which is what the kernels read.

Mutated tensors are marked in the schemas (Tensor(a!)), so torch.compile and
torch.library.opcheck know what each op writes. Device kernels:
  CPU  -> compiled C++ (backends.cpu) when built, else the reference
  CUDA -> compiled CUDA (backends.cuda) when built with CUDA, else the reference
  other devices (meta aside) -> the reference (CompositeExplicitAutograd)
"""

from __future__ import annotations

import torch

from ong_kernels.backends import _native, reference

NAMESPACE = "ong_kernels"
_lib = torch.library.Library(NAMESPACE, "DEF")

_lib.define(
    "masked_sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
    "Tensor?[] mask_bits, float lr, float momentum, float dampening, float weight_decay, "
    "bool nesterov, bool maximize, bool first_step) -> ()"
)
_lib.define(
    "nmf_mu_(Tensor[] v, Tensor(a!)[] w, Tensor(b!)[] h, int max_iter, float tol) -> Tensor"
)

_lib.impl("masked_sgd_step_", reference.masked_sgd_step_, "CompositeExplicitAutograd")
_lib.impl("nmf_mu_", reference.nmf_mu_, "CompositeExplicitAutograd")

if _native.has_cpu():
    from ong_kernels.backends import cpu as _cpu

    _lib.impl("masked_sgd_step_", _cpu.masked_sgd_step_, "CPU")

if _native.has_cuda_build():
    from ong_kernels.backends import cuda as _cuda

    _lib.impl("masked_sgd_step_", _cuda.masked_sgd_step_, "CUDA")


@torch.library.register_fake(f"{NAMESPACE}::masked_sgd_step_")
def _masked_sgd_step_fake(params, grads, momentum_buffers, mask_bits, *_hyper) -> None:
    torch._check(len(grads) == len(params), lambda: "grads and params differ in length")
    torch._check(
        len(momentum_buffers) in (0, len(params)),
        lambda: "momentum_buffers must be empty or one per param",
    )
    torch._check(len(mask_bits) == len(params), lambda: "mask_bits and params differ in length")


@torch.library.register_fake(f"{NAMESPACE}::nmf_mu_")
def _nmf_mu_fake(v, w, h, max_iter, tol) -> torch.Tensor:
    torch._check(len(v) == len(w) == len(h), lambda: "v, w and h differ in length")
    return v[0].new_empty((len(v),), dtype=torch.int64)


masked_sgd_step_ = torch.ops.ong_kernels.masked_sgd_step_
nmf_mu_ = torch.ops.ong_kernels.nmf_mu_
