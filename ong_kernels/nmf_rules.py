"""The rules of an NMF input, in one place: how a weight becomes a matrix, what is checked, how
per-matrix settings (rank, seed, init pairs) are read, and the solver's settings.

nmf.py (the public call), nmf_groups.py (the grouping through a compute device) and pruning
all use these; this module imports none of them, so there is no import circle and one name
per concept:

* ``matrix_shape`` / ``as_matrix``: a weight of shape (s0, s1, ...) is the (s0, s1 * ...)
  matrix; a 1-D tensor is (1, n).
* ``label``: what an error calls matrix i: its name when the caller gave names (a parameter
  or checkpoint tensor name), else ``weights[i]``.
* ``check_tensor_arg``: the cheap checks (type, dtype, shape, device) that read no data;
  ``check_values``: the one pass over the data (NaN, Inf, negative) that also returns the
  largest entry, which ``kernel_input`` uses to keep the solve in float32 range and
  ``factor_dtype`` to choose float64 factors where float32 cannot hold them.
* ``rank_for`` / ``seed_for`` / ``PerMatrix``: an int for every matrix or one per matrix.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ong_kernels._validate import (
    FLOAT_DTYPES,
    check_int,
    check_real,
    check_seed,
    check_tensor,
)
from ong_kernels.backends import registry
from ong_kernels.nmf_beta import BetaLoss, checked_loss

Factors = tuple[torch.Tensor, torch.Tensor]

INITS = ("random", "nndsvd", "nndsvda")
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)  # 2^-126, float32's smallest normal
# The solve stays in float32 when V's largest entry lies in [2^-40, 2^40]: a product of the
# update, e.g. W (H H^T) ~ max(V)^2 * n, then stays far inside [2^-126, 2^128) for any n below
# 2^40. A matrix outside is solved as V / 4^j (max in [1, 4)) and its factors multiplied by
# 2^j: multiplicative updates are scale-equivariant (NMF(cV) = (sqrt(c) W, sqrt(c) H)) and
# scaling by a power of two is exact in the normal range, so this changes no bit there.
# The factor 4^-j is applied by exponent steps (`scale_by_power_of_two`), never formed as one
# float: for a float32 subnormal V (max < 2^-126) it is above 2^128, inf in float32.
SAFE_MAX_LOG2 = 40


# ----------------------------------------------------------------------------- views


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """(m, n) of the matrix a weight of `shape` is factorised as."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 1:
        return 1, shape[0]
    m = shape[0]
    return m, (math.prod(shape[1:]) if m else 0)


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """The (shape[0], prod(shape[1:])) view NMF factorises; a 1-D tensor is (1, n)."""
    return t.reshape(matrix_shape(t.shape))


def scale_exponent(largest: float) -> int:
    """j such that V / 4^j has its largest entry in [1, 4), or 0 when V needs no scaling.

    Exact exponent arithmetic (math.frexp), so it holds down to float64's smallest subnormal:
    largest = mantissa * 2^e with mantissa in [0.5, 1), floor(log2(largest)) = e - 1."""
    if largest == 0 or abs(math.log2(largest)) <= SAFE_MAX_LOG2:
        return 0
    return (math.frexp(largest)[1] - 1) // 2


def scale_by_power_of_two(t: torch.Tensor, exponent: int) -> torch.Tensor:
    """t *= 2^exponent in place, in steps whose factor is a normal number of t's dtype (at most
    2^±126 for float32): each step is exact while the results stay normal, and no step's
    factor overflows to inf or underflows to 0, whatever the exponent."""
    # 126 for float32 and bfloat16, 1022 for float64: 2^-step is the smallest normal.
    step = -math.frexp(torch.finfo(t.dtype).smallest_normal)[1] + 1
    while exponent:
        e = max(-step, min(step, exponent))
        t.mul_(2.0**e)
        exponent -= e
    return t


def factor_dtype(dtype: torch.dtype, largest: float | None) -> torch.dtype:
    """The dtype of V's factors: float32, except for a float64 V whose largest entry is
    outside float32's normal range [2^-126, 3.4e38]: float32 cannot hold such factors
    (W H ~ 1e-100 needs entries ~1e-50, below float32's smallest subnormal), so they are
    float64, computed from the float32 solve of V / 4^j."""
    if dtype != torch.float64 or not largest:
        return torch.float32
    return torch.float32 if FLOAT32_TINY <= largest <= FLOAT32_MAX else torch.float64


def kernel_input(t: torch.Tensor, largest: float) -> tuple[torch.Tensor, int]:
    """(the contiguous matrix the NMF op takes, the scale exponent j of scale_exponent).

    float32, float16 and bfloat16 are passed as they are (the kernels convert in their loads:
    no float32 copy of a half-precision model); float64 is cast to float32. A matrix that
    needs scaling (see SAFE_MAX_LOG2) is divided by 4^j, exactly: in float32 (a float64 V in
    float64, then cast: one rounding).
    """
    mat = as_matrix(t)
    j = scale_exponent(largest)
    if j:  # a copy: the caller's tensor is never written
        mat = mat.to(torch.float64 if mat.dtype == torch.float64 else torch.float32, copy=True)
        scale_by_power_of_two(mat, -2 * j)
    if mat.dtype == torch.float64:
        mat = mat.to(torch.float32)
    return mat.contiguous(), j


def unscaled_factors(w: torch.Tensor, h: torch.Tensor, j: int, dtype: torch.dtype) -> Factors:
    """The solve's factors of V / 4^j as factors of V: (2^j W, 2^j H) in `dtype`
    (factor_dtype), exactly."""
    if dtype != w.dtype:
        w, h = w.to(dtype), h.to(dtype)
    if j:
        scale_by_power_of_two(w, j)
        scale_by_power_of_two(h, j)
    return w, h


# ----------------------------------------------------------------------------- checks


def label(index: int, names: Sequence[str] | None) -> str:
    """What errors call matrix `index`: its name when the caller gave names (a parameter or
    checkpoint tensor: 'layer1.0.conv1.weight'), else weights[i]."""
    if names is not None and index < len(names):
        return repr(names[index])
    return f"weights[{index}]"


def check_names(names) -> None:
    """names is None or a list/tuple of strings (the labels errors use)."""
    if names is None:
        return
    if not is_per_matrix(names):
        raise TypeError(f"names must be a list of strings, got {type(names).__name__}")
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"names[{i}] must be a str, got {type(name).__name__}")


def check_sequence(weights) -> Sequence:
    """`weights` as a sequence, or the TypeError saying what to pass instead."""
    if isinstance(weights, Mapping):
        raise TypeError(
            f"weights must be a sequence of tensors, got a {type(weights).__name__} (a mapping):"
            " pass its values, e.g. list(weights.values()), and names=list(weights) to name "
            "the matrices in errors"
        )
    if isinstance(weights, (torch.Tensor, str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(
            f"weights must be a sequence of tensors (wrap a single tensor in a list), "
            f"got {type(weights).__name__}"
        )
    if len(weights) == 0:
        raise ValueError("weights is empty: pass at least one tensor")
    return weights


def check_tensor_arg(t, what: str, device: torch.device | None) -> torch.Tensor:
    """The checks that read no data: a dense float tensor with an entry, on `device` when
    given. Returns it detached (the factors never carry autograd history)."""
    check_tensor(t, what, dtypes=FLOAT_DTYPES)
    if t.dim() == 0 or t.numel() == 0:
        raise ValueError(f"{what} has shape {tuple(t.shape)}: need at least one entry")
    if device is not None and t.device != device:
        raise ValueError(
            f"{what} is on {t.device} but weights[0] is on {device}: put all matrices on one device"
        )
    return t.detach()


def check_values(t: torch.Tensor, what: str, *, float32_range: bool = False) -> float:
    """One pass over `t` (torch.aminmax: NaN propagates into the min and max); returns its
    largest entry. Raises when `t` holds NaN, Inf or a negative entry, or (float32_range, for
    a custom start that is used as float32) a float64 entry above float32's range. The precise
    message (where the first NaN is) costs a second pass only on the error path."""
    lo, hi = (float(x) for x in torch.aminmax(t.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise ValueError(f"{what} contains NaN or Inf (first at index {bad})")
    if lo < 0:
        raise ValueError(
            f"{what} contains negative entries (min {lo:.3g}); NMF factorises a non-negative "
            "matrix, e.g. pass weight.abs()"
        )
    if float32_range and hi > FLOAT32_MAX:
        raise ValueError(
            f"{what} has entries above the float32 range (max {hi:.3g} > {FLOAT32_MAX:.3g}); "
            "the starting factors are float32: rescale them first"
        )
    return hi


# ----------------------------------------------------------------------------- per matrix


def is_per_matrix(value) -> bool:
    """A value given one entry per matrix (a list or tuple), not one for all."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, torch.Tensor))


def check_count(value, what: str, count: int, exact: bool = True) -> None:
    """A per-matrix `value` (rank, seed, init pairs, names) has `count` entries (`exact`) or
    at least `count` (an iterator's matrices so far)."""
    if is_per_matrix(value) and (len(value) != count if exact else len(value) < count):
        noun = "(W, H) pairs" if what == "init" else "entries"
        more = "there are" if exact else "weights has at least"
        raise ValueError(f"{what} has {len(value)} {noun} but {more} {count} matrices")


def rank_for(rank, index: int, m: int, n: int) -> int:
    """Matrix `index`'s rank (an int for all, or rank[index]), clipped to min(m, n)."""
    if is_per_matrix(rank):
        check_count(rank, "rank", index + 1, exact=False)
        r = check_int(rank[index], f"rank[{index}]", 1)
    else:
        r = check_int(rank, "rank", 1)
    return min(r, m, n)


def check_seeds(seed) -> int | tuple[int, ...]:
    """One seed for every matrix, or one per matrix (a list/tuple of ints), checked."""
    if is_per_matrix(seed):
        if len(seed) == 0:
            raise ValueError("seed is an empty list: pass one int, or one per matrix")
        return tuple(check_seed(s, f"seed[{i}]") for i, s in enumerate(seed))
    return check_seed(seed)


def seed_for(seed, index: int) -> int:
    """Matrix `index`'s seed: the one seed, or seed[index]."""
    if is_per_matrix(seed):
        check_count(seed, "seed", index + 1, exact=False)
        return seed[index]
    return seed


def check_init(init) -> None:
    """init is one of INITS or a sequence of (W0, H0) pairs (checked against shapes later)."""
    if isinstance(init, str):
        if init not in INITS:
            raise ValueError(
                f"init must be one of {INITS} or a sequence of (W0, H0) pairs, got {init!r}"
            )
    elif not isinstance(init, Sequence):
        raise TypeError(
            f"init must be a string or a sequence of (W0, H0) pairs, got {type(init).__name__}"
        )


def check_init_pair(pair, index: int, m: int, n: int, r: int) -> Factors:
    """init[index], a (W0, H0) pair of shapes (m, r) and (r, n), finite and non-negative."""
    if not (isinstance(pair, Sequence) and len(pair) == 2):
        raise TypeError(f"init[{index}] must be a (W0, H0) pair")
    for part, t, shape in ((0, pair[0], (m, r)), (1, pair[1], (r, n))):
        what = f"init[{index}][{part}] ({'W0' if part == 0 else 'H0'})"
        check_tensor(t, what)
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{what} has shape {tuple(t.shape)}, expected {shape} (rank clipped to "
                f"min(m, n) = {r})"
            )
        check_tensor(t, what, dtypes=FLOAT_DTYPES)
        check_values(t, what, float32_range=True)
    return pair[0], pair[1]


@dataclass(frozen=True)
class Solver:
    """nmf_batched's solver settings (documented there), passed along whole from the public
    entry points (nmf_batched, ong_scores, ong-mask) to the grouping and the op."""

    max_iter: int = 200
    tol: float = 1e-4
    init: str | Sequence[Factors] = "random"
    seed: int | Sequence[int] = 0
    backend: str = "auto"
    precision: str = "ieee"
    # The loss (ong_kernels/nmf_beta.py): scikit-learn's beta_loss, alpha_W, alpha_H,
    # l1_ratio; update_h=False keeps each init pair's H fixed (scikit-learn's transform).
    beta_loss: str | float = "frobenius"
    alpha_W: float = 0.0
    alpha_H: float | str = "same"
    l1_ratio: float = 0.0
    update_h: bool = True

    def checked(self) -> Solver:
        """Self with tol as a float and a per-matrix seed as a tuple; a ValueError/TypeError
        naming the first bad setting."""
        check_int(self.max_iter, "max_iter", 1)
        tol = check_real(self.tol, "tol", minimum=0.0)
        seed = check_seeds(self.seed)
        check_init(self.init)
        registry.check_backend_name(self.backend)  # precision: where the kernel is selected
        loss = self.loss()
        if not loss.update_h and isinstance(self.init, str):
            raise ValueError(
                "update_h=False needs init as (W0, H) pairs: H is the fixed factor W is solved for"
            )
        if self.precision != registry.IEEE and not loss.is_frobenius():
            raise ValueError(
                f"precision={self.precision!r} serves the plain Frobenius solve only (beta_loss 2,"
                " no alpha_W/alpha_H, update_h=True)"
            )
        return dataclasses.replace(self, tol=tol, seed=seed)

    def loss(self) -> BetaLoss:
        """The checked loss settings (a ValueError/TypeError naming a bad one)."""
        return checked_loss(self.beta_loss, self.alpha_W, self.alpha_H, self.l1_ratio,
                            self.update_h)  # fmt: skip

    @property
    def op(self) -> str:
        """The op that solves this loss: nmf_mu (plain Frobenius, today's kernels) or
        nmf_beta_mu."""
        return "nmf_mu" if self.loss().is_frobenius() else "nmf_beta_mu"

    def kwargs(self) -> dict:
        """The settings as nmf_batched's keyword arguments (init pairs not copied)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def check_counts(self, count: int) -> None:
        """The per-matrix settings (seed, init pairs) have one entry per matrix."""
        check_count(self.seed, "seed", count)
        if not isinstance(self.init, str):
            check_count(self.init, "init", count)
