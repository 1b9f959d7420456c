"""The Triton kernel of op nmf_beta_mu: beta-divergence multiplicative updates with
scikit-learn's regularisation and fixed-H mode (the rules: ong_kernels/nmf_beta.py), the whole
ragged batch in a handful of launches per iteration.

It follows scikit-learn's `_multiplicative_update_w` / `_multiplicative_update_h`
(sklearn/decomposition/_nmf.py) as the reference kernel (reference_beta.py, its oracle) does,
but never materialises W H: as the C++ kernel (csrc/cpu/nmf_beta_kernel.h), each program forms
W H one BR x BN tile at a time in registers, fused with V * (W H)^(beta - 2), (W H)^(beta - 1)
and the two products into the numerator and the denominator (_nmf_beta_kernels.py), so the
extra memory is O((m + n) r) on top of V, W and H (`workspace`).

Stepwise (nmf_plan.run_stepwise, Stepper.syncs = False), as the Frobenius kernel's grouped
path (nmf.py): per iteration one launch for the W step of every row block of every matrix and
one for the H step of every column block (unless update_h is False), each preceded for beta = 2
by the Frobenius kernels' Gram launch (H H^T, W^T W). Every 10 iterations (tol > 0) one more
launch computes each matrix's D_beta(V | W H) per row block, in float64; the host sums the
partials in a fixed order and applies nmf_plan.stop_rule to sqrt(2 D_beta) on the device (the
error and rule of the CPU beta kernel), and every kernel skips a stopped matrix.

One beta per call, so one KIND per call (_nmf_beta_kernels: FRO, KL, IS, OTHER); matrices of
different V dtypes (float32, float16, bfloat16, float64: read as they are, converted to float32
in the loads) go to separate launches. Products are fp32 FMA ("ieee") only: the op has no
precision argument, so the registry refuses any other (registry.select).

Device: every launch runs under the tensors' device guard (_common.on_device), as nmf.py.

Not done: the H step of a tall matrix has few programs (Fashion-MNIST, 60000 x 784: 25
column blocks of 32 for 132 SMs, each walking all 60000 rows); splitting the walk over
programs (split-K, partial sums reduced before the update) is the next step for such shapes.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ong_kernels import nmf_plan
from ong_kernels.backends.registry import register
from ong_kernels.backends.triton import _common
from ong_kernels.backends.triton import nmf as tnmf
from ong_kernels.nmf_beta import EPS, TINY, BetaLoss
from ong_kernels.nmf_plan import Matrices

# The per-matrix float32 coefficients the kernels read (_nmf_beta_kernels.NCOEF columns).
COEF_COLUMNS = (
    "l1_w", "l2_w", "l1_h", "l2_h", "e_num", "e_den", "gamma",
    "floor_num", "floor_den", "zero_w", "zero_h", "beta",
)  # fmt: skip
KINDS = {"fro": 0, "kl": 1, "is": 2, "other": 3}


def kind_of(beta: float) -> str:
    return {2.0: "fro", 1.0: "kl", 0.0: "is"}.get(float(beta), "other")


# Rank blocks as the Frobenius kernel (nmf.py: MIN_BLOCK, MAX_RANK_BLOCK): one block of 16, 32
# or 64 holds the whole rank in registers; a larger rank loops over blocks of 64, its sums in
# scratch, with no upper limit (the Frobenius kernel has none either).
MIN_BLOCK = tnmf.MIN_BLOCK
MAX_RANK_BLOCK = tnmf.MAX_RANK_BLOCK


@dataclass(frozen=True)
class Launch:
    """How one kernel is launched: BR rows of the factor per program (of V for the error), BN
    columns of the walk per tile, warps, pipeline stages."""

    br: int
    bn: int
    num_warps: int
    num_stages: int


# Block sizes, from the AOT compile reports (`python -m ong_kernels.backends.triton._aot
# --module nmf_beta`, triton 3.9's ptxas; tests/kernels/test_triton_aot.py holds every one to
# no spills on sm_80 and sm_90). Registers per thread (sm_80 / sm_90) of the largest rank block
# in brackets; what bigger tiles spilled in the notes. All with 1 pipeline stage: 2 stages
# added 20-50 registers per thread for nothing a stepwise kernel without measurements can
# claim. BN is the walk's tile and the K of the two accumulating products, so it sets the
# operand slices a thread holds (as nmf.py's BK): 32 where it fits, 16 for OTHER, whose float64
# powers (exp2 / log2 from libdevice) take ~70 registers more.
# - wide, one rank block: 64 rows, 8 warps. FRO / KL / IS BN 32 (128 / 184 / 212 at RB 64 on
#   sm_80); OTHER BN 16 (254 / 254 at RB 64; BN 32 spilled 344-384 B of stack).
_WIDE = Launch(64, 32, 8, 1)
_WIDE_OTHER = Launch(64, 16, 8, 1)
# - narrow (a side with fewer than MIN_TILES 64-row tiles, as nmf.py: twice the programs):
#   32 rows, 4 warps, BN 32 up to RB 32 (KL 165, IS 166), BN 16 at RB 64 (KL / IS 168 / 168;
#   BN 32 reached 255 registers on sm_80, 0-144 B from spilling), and OTHER BN 16 (254).
_NARROW = {16: Launch(32, 32, 4, 1), 32: Launch(32, 32, 4, 1), 64: Launch(32, 16, 4, 1)}
_NARROW_OTHER = Launch(32, 16, 4, 1)
# - several rank blocks of 64 (sums through scratch): 64 rows, 8 warps, BN 16 (FRO 224, KL
#   208, IS 236, OTHER 255 / 249); BN 32 spilled 32-144 B (IS, KL on sm_80 with 32 rows).
_MULTI = Launch(64, 16, 8, 1)
# - the stopping error: 32 rows x 32 columns, 4 warps (KL 168, OTHER 166); its terms are float64.
_ERROR = Launch(32, 32, 4, 1)
SM_COUNT = tnmf.SM_COUNT
MIN_TILES = tnmf.MIN_TILES


@dataclass(frozen=True)
class Config:
    """One launch group's plan: the loss KIND, the rank block RB (one_chunk: every rank of the
    group fits in one) and the launches of the W step, the H step and the error kernel."""

    kind: str
    rb: int
    one_chunk: bool
    update_w: Launch
    update_h: Launch
    error: Launch


@dataclass(frozen=True)
class Group:
    indices: tuple[int, ...]
    v_dtype: torch.dtype
    config: Config


def _update_launch(kind: str, rb: int, one_chunk: bool, tiles: int) -> Launch:
    if not one_chunk:
        return _MULTI
    if tiles >= MIN_TILES:
        return _WIDE_OTHER if kind == "other" else _WIDE
    return _NARROW_OTHER if kind == "other" else _NARROW[rb]


def config_for(kind: str, max_rank: int, row_tiles: tuple[int, int] | None = None) -> Config:
    """The plan of a group whose largest rank is max_rank. row_tiles: the group's number of
    64-row tiles in the W step (sum of ceil(m / 64)) and in the H step (sum of ceil(n / 64));
    a side with fewer than MIN_TILES gets 32-row tiles. None: enough of both."""
    rb = min(max(MIN_BLOCK, 1 << (max_rank - 1).bit_length()), MAX_RANK_BLOCK)
    one_chunk = max_rank <= rb
    tiles = row_tiles or (MIN_TILES, MIN_TILES)
    update_w, update_h = (_update_launch(kind, rb, one_chunk, t) for t in tiles)
    return Config(kind, rb, one_chunk, update_w, update_h, _ERROR)


def plan(shapes: Sequence[tuple[int, int, int]], dtypes: Sequence[torch.dtype],
         beta: float) -> list[Group]:  # fmt: skip
    """One launch group per V dtype (every matrix of a dtype in one grouped launch)."""
    groups = []
    for dtype in dict.fromkeys(dtypes):
        idx = tuple(i for i, d in enumerate(dtypes) if d == dtype)
        max_rank = max(shapes[i][2] for i in idx)
        tiles = tuple(sum(math.ceil(shapes[i][side] / 64) for i in idx) for side in (0, 1))
        groups.append(Group(idx, dtype, config_for(kind_of(beta), max_rank, tiles)))
    return groups


# ----------------------------------------------------------------------------- host side


@functools.cache
def _kernels():
    """The kernel module, imported on first use (it imports triton)."""
    from ong_kernels.backends.triton import _nmf_beta_kernels

    return _nmf_beta_kernels


def _empty(size: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Uninitialised memory the kernels fully write before reading (the tests poison it)."""
    return torch.empty(size, dtype=dtype, device=device)


def _scratch_offsets(shapes: Sequence[tuple[int, int, int]], config: Config):
    """([G offset, D offset] per matrix, total float32 entries) of one group's scratch: the
    r x r Gram product (beta = 2 only), and max(m, n) x 2r numerator and denominator sums only
    when the group spans several rank blocks (one_chunk keeps them in registers)."""
    offsets, total = [], 0
    for m, n, r in shapes:
        g_off = total
        if config.kind == "fro":
            total += r * r
        d_off = total
        if not config.one_chunk:
            total += max(m, n) * 2 * r
        offsets.append([g_off, d_off])
    return offsets, max(total, 1)


def _coefficients(shapes, loss: BetaLoss) -> list[list[float]]:
    """COEF_COLUMNS per matrix, in float64 here (float32 in the table, as the C++ kernel casts
    its Rules): scikit-learn's scaled penalties, the loss's exponents, and its rules as
    thresholds (nmf_beta's docstring: W H raised to EPS for beta < 2 in the numerator and
    beta < 1 in the denominator; W zeroed below float64's eps for beta < 1, H for beta <= 1)."""
    b = loss.beta
    rows = []
    for m, n, _ in shapes:
        l1_w, l1_h, l2_w, l2_h = loss.regularization(m, n)
        floors = [EPS if b < 2 else 0.0, EPS if b < 1 else 0.0]  # num's, den's W H
        zeros = [TINY if b < 1 else 0.0, TINY if b <= 1 else 0.0]  # W, H
        rows.append([l1_w, l2_w, l1_h, l2_h, b - 2, b - 1, loss.gamma, *floors, *zeros, b])
    return rows


def _tiles(blocks: Sequence[int], device) -> tuple[torch.Tensor, int]:
    """int32 (matrix, block) pairs for `blocks[i]` blocks of matrix i; and the tile count."""
    pairs = [(i, b) for i, count in enumerate(blocks) for b in range(count)]
    return torch.tensor(pairs, dtype=torch.int32, device=device).reshape(-1), len(pairs)


def _options(launch: Launch) -> dict:
    """Launch options; FP fusion (Triton's default) said explicitly, as nmf.py does."""
    return dict(num_warps=launch.num_warps, num_stages=launch.num_stages, enable_fp_fusion=True)


_ARGS = {"table": "*i64", "scratch": "*fp32", "coef": "*fp32", "tiles": "*i32", "active": "*i32"}
SIGNATURES = {
    "_beta_update_kernel": _ARGS,
    "_beta_error_kernel": {**_ARGS, "err2": "*fp64", "max_blocks": "i32"},
}


def launch_constexprs(config: Config, v_dtype) -> list[tuple[str, dict, Launch]]:
    """(kernel name, constexprs, launch) of the update (W step, H step) and error launches of
    a group, in that order; `aot_configs` compiles exactly these. The Gram launches of beta = 2
    are the Frobenius kernel's (`gram_constexprs`, compiled with nmf.py's configurations)."""
    c, kind = config, KINDS[config.kind]
    out = []
    for side, update in enumerate((c.update_w, c.update_h)):
        constexprs = dict(KIND=kind, SIDE=side, BR=update.br, BN=update.bn, RB=c.rb,
                          ONE_CHUNK=c.one_chunk, V_DTYPE=v_dtype)  # fmt: skip
        out.append(("_beta_update_kernel", constexprs, update))
    constexprs = dict(KIND=kind, BR=c.error.br, BN=c.error.bn, V_DTYPE=v_dtype)
    out.append(("_beta_error_kernel", constexprs, c.error))
    return out


def gram_constexprs(config: Config, side: int) -> dict:
    """The Frobenius Gram kernel's constexprs for beta = 2 (nmf.py's grouped Gram launch)."""
    return dict(SIDE=side, RB=config.rb, BK=tnmf.BK, PRECISION="ieee")


# One rank per rank class the dispatcher tells apart (RB 16, 32, 64, several blocks of 64).
_RANK_CLASSES = (16, 32, 64, 65)


def aot_configs() -> list[dict]:
    """Every configuration the dispatcher can pick, as keyword arguments of
    _aot.compile_report (minus arch): kinds x rank classes x V dtypes."""
    k = _kernels()
    seen, out = set(), []
    # 64- and 32-row update tiles (tiles None: wide; (0, 0): narrow)
    for kind, rank, tiles, dtype in itertools.product(
        KINDS, _RANK_CLASSES, (None, (0, 0)), tnmf.V_DTYPES
    ):
        config = config_for(kind, rank, tiles)
        for name, constexprs, launch in launch_constexprs(config, tnmf._tl_dtype(dtype)):
            key = (name, repr(sorted(constexprs.items())), launch)
            if key in seen:
                continue
            seen.add(key)
            signature = {**SIGNATURES[name], **dict.fromkeys(constexprs, "constexpr")}
            out.append(dict(fn=getattr(k, name), signature=signature, constexprs=constexprs,
                            num_warps=launch.num_warps, num_stages=launch.num_stages))  # fmt: skip
    return out


class _BetaStepper:
    """nmf_plan.Stepper over one launch group; never syncs the host."""

    syncs = False

    def __init__(self, v, w, h, config: Config, loss: BetaLoss) -> None:
        self.k, self.config, self.loss = _kernels(), config, loss
        self.device = v[0].device
        self.n = len(v)
        shapes = [(vi.shape[0], vi.shape[1], wi.shape[1]) for vi, wi in zip(v, w, strict=True)]
        base = nmf_plan.matrix_table(v, w, h)
        offsets, total = _scratch_offsets(shapes, config)
        self.table = torch.cat([base, torch.tensor(offsets, dtype=torch.int64)], dim=1).to(
            self.device
        )
        self.scratch = _empty(total, torch.float32, self.device)
        self.coef = torch.tensor(_coefficients(shapes, loss), dtype=torch.float32).to(self.device)
        self.launches = launch_constexprs(config, tnmf._tl_dtype(v[0].dtype))
        self.gram, rows_w, rows_h, self.error_tiles, self.max_blocks = tnmf.tile_lists(
            shapes, config.rb, config.update_w.br, config.update_h.br, config.error.br,
            self.device,
        )  # fmt: skip
        self.rows = (rows_w, rows_h)
        self.flags = torch.ones(self.n, dtype=torch.int32, device=self.device)

    def _launch(self, spec, tiles, *args) -> None:
        name, constexprs, launch = spec
        tiles_tensor, count = tiles
        getattr(self.k, name)[(count,)](
            self.table, self.scratch, self.coef, tiles_tensor, self.flags, *args,
            **constexprs, **_options(launch),
        )  # fmt: skip

    def _gram(self, side: int) -> None:
        """G = H H^T (side 0) or W^T W (side 1) of every matrix: the Frobenius Gram kernel,
        whose table columns and scratch layout (G offset) are this table's."""
        tiles, count = self.gram
        tnmf._kernels()._gram_kernel[(count,)](
            self.table, self.scratch, tiles, self.flags,
            **gram_constexprs(self.config, side), **tnmf._options(tnmf._GRAM),
        )  # fmt: skip

    def iterate(self, n: int, active: torch.Tensor | None) -> None:
        if active is not None:
            self.flags = active.to(torch.int32)
        sides = (0, 1) if self.loss.update_h else (0,)
        for _ in range(n):
            for side in sides:
                if self.config.kind == "fro":
                    self._gram(side)
                self._launch(self.launches[side], self.rows[side])

    def errors(self) -> torch.Tensor:
        # One float64 slot per (matrix, row block), summed by torch in a fixed order.
        err2 = torch.zeros(self.n, self.max_blocks, dtype=torch.float64, device=self.device)
        self._launch(self.launches[2], self.error_tiles, err2, self.max_blocks)
        return torch.sqrt(2 * err2.sum(dim=1).clamp(min=0))

    def finish(self) -> None:
        pass  # the kernels update the op's W and H in place


# Small tensors alive at once besides the scratch, per group: table, coefficients, 4 tile
# lists, flags, error partials, initial / previous / current errors, active, n_iter, and the
# stopping rule's temporaries (~4), counted from _BetaStepper and nmf_plan.run_stepwise.
_SMALL_TENSORS = 17


def workspace(shapes: Sequence[tuple[int, int, int, torch.dtype]]) -> int:
    """Peak extra bytes on the device: V is read in place; each launch group has a float32
    scratch (the r x r Gram of beta = 2, max(m, n) x 2r sums when the ranks span several rank
    blocks: `_scratch_offsets`), a table, coefficients, tile lists, flags and per-(matrix, row
    block) error partials; each allocation rounded up as the caching allocator does. No
    m x n temporary. The Gram's kind is not known here (one workspace per kernel), so it is
    always counted."""
    r_ = tnmf._rounded
    total = r_(8 * len(shapes))  # the op's n_iter
    for group in plan([s[:3] for s in shapes], [s[3] for s in shapes], 2.0):
        sub = [shapes[i][:3] for i in group.indices]
        n = len(sub)
        c = group.config
        _, floats = _scratch_offsets(sub, c)
        total += r_(4 * floats) + r_(8 * 8 * n) + r_(4 * len(COEF_COLUMNS) * n)
        total += tnmf.grouped_lists_bytes(sub, c.rb, c.update_w.br, c.update_h.br, c.error.br)
        total += _SMALL_TENSORS * r_(8 * n)
    return total


@register("nmf_beta_mu", "triton", devices=_common.devices(), available=_common.available,
          hint=_common.HINT, workspace=workspace)  # fmt: skip
def nmf_beta_mu_(
    v_list: Matrices, w_list: Matrices, h_list: Matrices, max_iter: int, tol: float,
    loss: BetaLoss,
) -> torch.Tensor:  # fmt: skip
    """Beta-divergence MU of a ragged batch with the Triton kernels, W (and H unless
    loss.update_h is False) updated in place; n_iter per matrix (int64, on the device). See
    the module docstring."""
    device = v_list[0].device
    with _common.on_device(device):
        shapes = [(v.shape[0], v.shape[1], w.shape[1]) for v, w in zip(v_list, w_list,
                                                                       strict=True)]  # fmt: skip
        n_iter = _empty(len(v_list), torch.int64, device)
        for group in plan(shapes, [v.dtype for v in v_list], loss.beta):
            idx = list(group.indices)
            v, w, h = ([lst[i] for i in idx] for lst in (v_list, w_list, h_list))
            stepper = _BetaStepper(v, w, h, group.config, loss)
            out = nmf_plan.run_stepwise(stepper, len(v), device, max_iter, tol)
            n_iter[torch.tensor(idx, device=device)] = out
        return n_iter
