"""The Triton NMF kernel of op nmf_mu: the whole ragged batch in a handful of launches.

Two paths, chosen per matrix by `plan` from the shapes alone (no GPU needed to test it):

* persistent (`_solve_kernel`): one program per small matrix runs every iteration and every
  stopping check, so a CIFAR ResNet-56 set is one launch for the whole solve. Small: at most
  PERSISTENT_MAX_ENTRIES entries and rank <= PERSISTENT_MAX_RANK. V is read from HBM on the
  first iteration; after that it is re-read from L2 (a ResNet-56 set is 3.4 MB of V).
* grouped (stepwise, via nmf_plan.run_stepwise): per iteration four launches over all the
  larger matrices: the r x r Gram products H H^T of every matrix, the W step of every row
  block of every matrix (numerator V H^T with the multiply/divide/eps update in its
  epilogue), W^T W, the H step. Every 10 iterations (tol > 0) one more launch computes each
  matrix's ||V - W H||_F; the stop flags stay on the device (nmf_plan.stop_rule on tensors,
  Stepper.syncs = False: the host never waits for them) and every kernel skips a stopped
  matrix.

Errors: residuals and their squares in float32, summed in float64 (not the trace identity,
whose cancellation float32 cannot carry), always with fp32 FMA products (whatever the
precision of the updates), and the grouped path's per-row-block partials summed on the host in
a fixed order: the same call stops every matrix at the same iteration. V in float16, bfloat16
or float64 is read as it is and converted to float32 in the loads (the reference computes in
float32 too); matrices of different V dtypes go to separate launches.

Device: every launch runs under the tensors' device guard (Triton launches on the current
CUDA device: `nmf_batched(..., device="cuda:1")` or a torchrun rank on cuda:k without
set_device would otherwise launch on GPU 0 with GPU-k addresses).

Precision: "ieee" (default) makes every tl.dot an fp32 FMA product, faithful to float32;
"tf32x3" (three TF32 tensor-core products, ~fp32 accuracy) and "tf32" (one, 10-bit
mantissa inputs) are opt-in and change results on a GPU only (the interpreter ignores them).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ong_kernels import nmf_plan
from ong_kernels.backends.registry import register
from ong_kernels.backends.triton import _common
from ong_kernels.nmf_plan import Matrices

PRECISIONS = ("ieee", "tf32x3", "tf32")
# Columns of the device table: nmf_plan.matrix_table's six, then the float32 scratch offsets
# of the matrix's r x r Gram product (G) and of its denominators (D, multi-block ranks only).
TABLE_COLUMNS = (*nmf_plan.TABLE_COLUMNS, "g_offset", "d_offset")

# A matrix is solved by one persistent program when V has at most this many entries (64 x 576,
# ResNet-56's largest, is 36,864; 65,536 fp32 is 256 KB) and its rank is at most 32: one
# program then does at most 4 * 65536 * 32 * 200 = 1.7 GFLOP for 200 iterations, ~3.4 ms at
# one SM's fp32 FMA peak (~0.5 TFLOP/s on H100), while the grouped path pays 4 launches of
# ~3-5 us per iteration (200 iterations: 2.4-4 ms) whatever the size. Rank 64 in one program
# spilled (40-88 bytes of stack on sm_80 at 8 warps), so ranks 33-64 take the grouped path.
PERSISTENT_MAX_ENTRIES = 65536
PERSISTENT_MAX_RANK = 32
# The rank block (RB): tl.dot needs every dimension >= 16; larger ranks than 64 loop over
# rank blocks of 64.
MIN_BLOCK = 16
MAX_RANK_BLOCK = 64
# The reduction block of every product. Triton's fp32 FMA dot holds a thread's whole K slice of
# both operands in registers: BK = 32 spilled at a [64, 64] output (255 registers + 24-232 B
# of stack on sm_90); 16 is tl.dot's minimum.
BK = 16


@dataclass(frozen=True)
class Launch:
    """How one kernel is launched: BR rows per tile (the row block of the factor being updated,
    of V for the error; unused by the Gram kernel), warps, pipeline stages, and a register cap
    for ptxas (None: ptxas chooses)."""

    br: int
    num_warps: int
    num_stages: int
    maxnreg: int | None = None


# Per rank block, spill-free choices from the AOT compile reports on sm_80 and sm_90 for all
# three precisions and V dtypes (`python -m ong_kernels.backends.triton._aot`;
# tests/kernels/test_triton_aot.py holds every one of them to no spills). Notes give what a
# bigger tile spilled (bytes of stack, triton 3.9's ptxas).
_GRAM = Launch(0, 4, 2)
# RB 64 at 4 warps: 32-72 B.
_UPDATE = {16: Launch(64, 4, 2), 32: Launch(64, 4, 2), 64: Launch(64, 8, 2)}
# 32-row tiles where a group has few 64-row tiles (below MIN_TILES: ResNet-18's W step has 64
# at rank 16, on 132 SMs): twice the programs, each half the reduction work. No spills at any
# rank block with 4 warps.
_UPDATE_NARROW = Launch(32, 4, 2)
SM_COUNT = 132  # H100 / H200 SXM: the dispatcher is a function of shapes only (tested CPU-side)
MIN_TILES = 2 * SM_COUNT
# Several rank blocks, per side (W step, H step): BR 32 spilled 16-24 B in the W step, BR 16
# with 2 stages 16 B in the H step.
_UPDATE_MULTI = (Launch(16, 8, 2), Launch(32, 8, 1))
# RB 64 with BR 64: 56-488 B; RB 32 with 2 stages: 72 B.
_ERROR = {16: Launch(64, 4, 2), 32: Launch(64, 4, 1), 64: Launch(32, 4, 1)}
# The persistent kernel runs one program per matrix (56 for ResNet-56, fewer than the SMs), so
# occupancy does not matter and registers are uncapped (255): left to itself, ptxas held it
# to 80-168 registers and spilled 8-48 B in 1 of 3 precisions at every tile shape tried.
# RB 16 at 4 warps: 16-24 B of stack at tf32x3 with checks on sm_90 (triton 3.9's ptxas);
# 8 warps hold every precision, V dtype and arch to none (tests/kernels/test_triton_aot.py).
_SOLVE = {16: Launch(32, 8, 2, maxnreg=255), 32: Launch(32, 8, 2, maxnreg=255)}


@dataclass(frozen=True)
class Config:
    """One launch group's plan: the path ("solve": persistent, "grouped": stepwise), the rank
    block RB (one_chunk: every rank of the group fits in one), and each kernel's launch
    ("solve", or "gram", "update_w", "update_h", "error")."""

    kernel: str
    rb: int
    one_chunk: bool
    launches: tuple[tuple[str, Launch], ...]

    def launch(self, name: str) -> Launch:
        return dict(self.launches)[name]


@dataclass(frozen=True)
class Group:
    """Matrices (indices into the call) that share one launch plan."""

    indices: tuple[int, ...]
    v_dtype: torch.dtype
    config: Config


def _rank_block(max_rank: int) -> int:
    return min(max(MIN_BLOCK, 1 << (max_rank - 1).bit_length()), MAX_RANK_BLOCK)


def config_for(kernel: str, max_rank: int, row_tiles: tuple[int, int] | None = None) -> Config:
    """The plan of a group whose largest rank is max_rank. row_tiles: the group's number of
    64-row tiles in the W step (sum of ceil(m / 64)) and in the H step (sum of ceil(n / 64));
    a side with fewer than MIN_TILES gets 32-row tiles. None: enough of both."""
    rb = _rank_block(max_rank)
    one_chunk = max_rank <= rb
    if kernel == "solve":
        if max_rank > PERSISTENT_MAX_RANK:
            raise ValueError(f"the persistent kernel takes ranks <= {PERSISTENT_MAX_RANK}")
        return Config(kernel, rb, one_chunk, (("solve", _SOLVE[rb]),))
    if one_chunk:
        tiles = row_tiles or (MIN_TILES, MIN_TILES)
        update_w, update_h = (_UPDATE[rb] if t >= MIN_TILES else _UPDATE_NARROW for t in tiles)
    else:
        update_w, update_h = _UPDATE_MULTI
    launches = (
        ("gram", _GRAM), ("update_w", update_w), ("update_h", update_h), ("error", _ERROR[rb]),
    )  # fmt: skip
    return Config(kernel, rb, one_chunk, launches)


def is_small(m: int, n: int, r: int) -> bool:
    return m * n <= PERSISTENT_MAX_ENTRIES and r <= PERSISTENT_MAX_RANK


def plan(shapes: Sequence[tuple[int, int, int]], dtypes: Sequence[torch.dtype]) -> list[Group]:
    """The launch groups for matrices of shapes (m, n, r) and V dtypes: per dtype, the small
    matrices in one persistent group, the others in one grouped (stepwise) group."""
    groups = []
    for dtype in dict.fromkeys(dtypes):
        for kernel in ("solve", "grouped"):
            idx = tuple(
                i
                for i, ((m, n, r), d) in enumerate(zip(shapes, dtypes, strict=True))
                if d == dtype and is_small(m, n, r) == (kernel == "solve")
            )
            if idx:
                max_rank = max(shapes[i][2] for i in idx)
                tiles = tuple(sum(math.ceil(shapes[i][side] / 64) for i in idx) for side in (0, 1))
                groups.append(Group(idx, dtype, config_for(kernel, max_rank, tiles)))
    return groups


# ----------------------------------------------------------------------------- host side


@functools.cache
def _kernels():
    """The kernel module, imported on first use (it imports triton, which reads
    TRITON_INTERPRET then)."""
    from ong_kernels.backends.triton import _nmf_kernels

    return _nmf_kernels


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {
        torch.float32: tl.float32,
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float64: tl.float64,
    }[dtype]


V_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _empty(size: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Uninitialised memory the kernels fully write before reading (the tests poison it)."""
    return torch.empty(size, dtype=dtype, device=device)


def _scratch_offsets(shapes: Sequence[tuple[int, int, int]], config: Config):
    """([G offset, D offset] per matrix, total float32 entries) of one group's scratch: the
    r x r Gram product of every matrix, and max(m, n) x r denominators only when the group
    spans several rank blocks (one_chunk keeps them in registers)."""
    offsets, total = [], 0
    for m, n, r in shapes:
        g_off = total
        total += r * r
        d_off = total
        if not config.one_chunk:
            total += max(m, n) * r
        offsets.append([g_off, d_off])
    return offsets, max(total, 1)


def _device_table(v, w, h, config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64 table [len(v), 8] on the device, float32 scratch) for one group."""
    base = nmf_plan.matrix_table(v, w, h)
    shapes = [(vi.shape[0], vi.shape[1], wi.shape[1]) for vi, wi in zip(v, w, strict=True)]
    offsets, total = _scratch_offsets(shapes, config)
    table = torch.cat([base, torch.tensor(offsets, dtype=torch.int64)], dim=1)
    scratch = _empty(total, torch.float32, v[0].device)
    return table.to(v[0].device), scratch


def _tiles(blocks: Sequence[int], device) -> tuple[torch.Tensor, int]:
    """int32 (matrix, block) pairs for `blocks[i]` blocks of matrix i; and the tile count."""
    pairs = [(i, b) for i, count in enumerate(blocks) for b in range(count)]
    return torch.tensor(pairs, dtype=torch.int32, device=device).reshape(-1), len(pairs)


def _options(launch: Launch) -> dict:
    """Launch options; FP fusion (Triton's default) said explicitly: triton 3.9 warns when
    TRITON_DEFAULT_FP_FUSION is unset and nobody asked."""
    out = dict(num_warps=launch.num_warps, num_stages=launch.num_stages, enable_fp_fusion=True)
    if launch.maxnreg is not None:
        out["maxnreg"] = launch.maxnreg
    return out


# Runtime-argument types of each kernel (for ahead-of-time compilation, `aot_configs`).
_GROUPED_ARGS = {"table": "*i64", "scratch": "*fp32", "tiles": "*i32", "active": "*i32"}
SIGNATURES = {
    "_gram_kernel": _GROUPED_ARGS,
    "_update_kernel": _GROUPED_ARGS,
    "_error_kernel": {**_GROUPED_ARGS, "err2": "*fp64", "max_blocks": "i32"},
    "_solve_kernel": {
        "table": "*i64", "scratch": "*fp32", "n_iter": "*i64", "params": "*fp64", "max_iter": "i32",
    },
}  # fmt: skip


def launch_constexprs(config: Config, v_dtype, precision: str) -> list[tuple[str, dict, Launch]]:
    """(kernel name, constexpr arguments, launch) of every launch a group with `config` makes,
    in the order the host code uses them; `aot_configs` compiles exactly these."""
    c = config
    if c.kernel == "solve":
        launch = c.launch("solve")
        common = dict(BR=launch.br, BK=BK, RB=c.rb, ONE_CHUNK=c.one_chunk)
        return [
            (
                "_solve_kernel",
                dict(CHECKS=checks, **common, PRECISION=precision, V_DTYPE=v_dtype),
                launch,
            )
            for checks in (False, True)
        ]
    gram, error = c.launch("gram"), c.launch("error")
    out = []
    for side, update in enumerate((c.launch("update_w"), c.launch("update_h"))):
        out.append(("_gram_kernel", dict(SIDE=side, RB=c.rb, BK=BK, PRECISION=precision), gram))
        constexprs = dict(SIDE=side, BR=update.br, BK=BK, RB=c.rb, ONE_CHUNK=c.one_chunk,
                          PRECISION=precision, V_DTYPE=v_dtype)  # fmt: skip
        out.append(("_update_kernel", constexprs, update))
    # The stopping error is computed in "ieee" whatever `precision` (the kernel's IEEE).
    constexprs = dict(BR=error.br, BK=BK, RB=c.rb, V_DTYPE=v_dtype)
    out.append(("_error_kernel", constexprs, error))
    return out


# One rank per rank class the dispatcher tells apart (RB 16, 32, 64, several blocks of 64).
_RANK_CLASSES = (16, 32, 64, 65)


def aot_configs() -> list[dict]:
    """Every kernel configuration the dispatcher can pick, as keyword arguments of
    _aot.compile_report (minus arch): both paths x rank classes x 64- or 32-row update tiles x
    V dtypes x precisions."""
    k = _kernels()
    seen, out = set(), []
    for kernel in ("solve", "grouped"):
        for rank in _RANK_CLASSES:
            if kernel == "solve" and rank > PERSISTENT_MAX_RANK:
                continue
            for tiles in (None, (0, 0)):  # 64-row and 32-row update tiles
                _add_configs(out, seen, k, config_for(kernel, rank, tiles))
    return out


def _add_configs(out: list, seen: set, k, config: Config) -> None:
    """Append the not yet listed launches of `config` for every V dtype and precision."""
    for dtype in V_DTYPES:
        for precision in PRECISIONS:
            for name, constexprs, launch in launch_constexprs(config, _tl_dtype(dtype), precision):
                key = (name, repr(sorted(constexprs.items())), launch)
                if key in seen:
                    continue
                seen.add(key)
                signature = {**SIGNATURES[name], **dict.fromkeys(constexprs, "constexpr")}
                entry = dict(fn=getattr(k, name), signature=signature, constexprs=constexprs,
                             num_warps=launch.num_warps, num_stages=launch.num_stages)  # fmt: skip
                if launch.maxnreg is not None:
                    entry["maxnreg"] = launch.maxnreg
                out.append(entry)


class _GroupedStepper:
    """nmf_plan.Stepper over one grouped launch plan; never syncs the host."""

    syncs = False

    def __init__(self, v, w, h, config: Config, precision: str) -> None:
        k = _kernels()
        self.k, self.config = k, config
        self.device = v[0].device
        self.n = len(v)
        self.table, self.scratch = _device_table(v, w, h, config)
        self.launches = launch_constexprs(config, _tl_dtype(v[0].dtype), precision)
        shapes = [(vi.shape[0], vi.shape[1], wi.shape[1]) for vi, wi in zip(v, w, strict=True)]
        rows = (config.launch(k).br for k in ("update_w", "update_h", "error"))
        gram, rows_w, rows_h, error, self.max_blocks = tile_lists(
            shapes, config.rb, *rows, self.device
        )
        # One iteration: G = H H^T, the W step, G = W^T W, the H step (launch_constexprs order).
        self.iteration = list(zip(self.launches[:4], (gram, rows_w, gram, rows_h), strict=True))
        self.error = (self.launches[4], error)
        self.flags = torch.ones(self.n, dtype=torch.int32, device=self.device)

    def _launch(self, spec, tiles, *args) -> None:
        name, constexprs, launch = spec
        tiles_tensor, count = tiles
        getattr(self.k, name)[(count,)](
            self.table, self.scratch, tiles_tensor, self.flags, *args,
            **constexprs, **_options(launch),
        )  # fmt: skip

    def iterate(self, n: int, active: torch.Tensor | None) -> None:
        if active is not None:
            self.flags = active.to(torch.int32)
        for _ in range(n):
            for spec, tiles in self.iteration:
                self._launch(spec, tiles)

    def errors(self) -> torch.Tensor:
        # One float64 slot per (matrix, row block), summed by torch in a fixed order: the
        # same call gives the same bits (an atomic_add per block would not).
        err2 = torch.zeros(self.n, self.max_blocks, dtype=torch.float64, device=self.device)
        self._launch(*self.error, err2, self.max_blocks)
        return err2.sum(dim=1).sqrt()

    def finish(self) -> None:
        pass  # the kernels update the op's W and H in place


def _solve(v, w, h, config: Config, max_iter: int, tol: float, precision: str) -> torch.Tensor:
    """One launch of the persistent kernel: the whole solve of every matrix; n_iter out."""
    k = _kernels()
    device = v[0].device
    table, scratch = _device_table(v, w, h, config)
    n_iter = _empty(len(v), torch.int64, device)
    params = torch.tensor([tol], dtype=torch.float64, device=device)
    checks = bool(nmf_plan.check_iterations(max_iter, tol))
    launches = launch_constexprs(config, _tl_dtype(v[0].dtype), precision)
    name, constexprs, launch = launches[int(checks)]
    getattr(k, name)[(len(v),)](
        table, scratch, n_iter, params, max_iter, **constexprs, **_options(launch),
    )  # fmt: skip
    return n_iter


# The CUDA caching allocator rounds every allocation up to 512 bytes (kMinBlockSize); the
# small per-call tensors (tables, tile lists, flags, n_iter, the stopping rule's error vectors
# and masks) are each one such block at least.
_ALLOCATION = 512
# Small tensors alive at once besides the scratch, per group: table, 4 tile lists, flags,
# error partials, initial / previous / current errors, active, n_iter, and the stopping
# rule's temporaries (~4), counted from _GroupedStepper and nmf_plan.run_stepwise.
_SMALL_TENSORS = 16


def _rounded(nbytes: int) -> int:
    return -(-nbytes // _ALLOCATION) * _ALLOCATION


def workspace(shapes: Sequence[tuple[int, int, int, torch.dtype]]) -> int:
    """Peak extra bytes on the device: V is read in place; each launch group has a float32
    scratch of the r x r Gram products and (groups whose ranks span several rank blocks only)
    max(m, n) x r denominators (_scratch_offsets, what _device_table allocates), a table,
    tile lists, flags and per-(matrix, row block) error partials; each allocation rounded up
    as the caching allocator does."""
    total = _rounded(8 * len(shapes))  # the op's n_iter
    for group in plan([s[:3] for s in shapes], [s[3] for s in shapes]):
        sub = [shapes[i][:3] for i in group.indices]
        n = len(sub)
        _, floats = _scratch_offsets(sub, group.config)
        total += _rounded(4 * floats) + _rounded(8 * 8 * n)
        if group.config.kernel == "grouped":
            c = group.config
            rows = (c.launch(k).br for k in ("update_w", "update_h", "error"))
            total += grouped_lists_bytes(sub, c.rb, *rows)
        total += _SMALL_TENSORS * _rounded(8 * n)
    return total


def _block_counts(shapes, rb: int, br_w: int, br_h: int, br_e: int) -> tuple[list[int], ...]:
    """Per matrix of ``shapes`` (m, n, r): its Gram blocks of ``rb``, W-step rows of ``br_w``,
    H-step columns of ``br_h`` and error rows of ``br_e``: the stepwise path's tiles."""
    return (
        [math.ceil(r / rb) ** 2 for _, _, r in shapes],
        [math.ceil(m / br_w) for m, _, _ in shapes],
        [math.ceil(n / br_h) for _, n, _ in shapes],
        [math.ceil(m / br_e) for m, _, _ in shapes],
    )


def tile_lists(shapes, rb: int, br_w: int, br_h: int, br_e: int, device):
    """The stepwise path's tile lists for matrices of ``shapes`` (m, n, r), as ``_tiles`` pairs
    (Gram, W step, H step, error: `_block_counts`), and the most error row blocks of one matrix
    (its partials' stride). What `grouped_lists_bytes` counts."""
    counts = _block_counts(shapes, rb, br_w, br_h, br_e)
    return (*(_tiles(c, device) for c in counts), max(counts[3]))


def grouped_lists_bytes(shapes, rb: int, br_w: int, br_h: int, br_e: int) -> int:
    """The stepwise (grouped) path's per-call lists for matrices of ``shapes`` (m, n, r): the
    float64 error partials per (matrix, error row block) and the four tile lists of
    `tile_lists` (int32 pairs), each rounded up as the caching allocator does. The beta
    kernel's too."""
    counts = _block_counts(shapes, rb, br_w, br_h, br_e)
    total = _rounded(8 * len(shapes) * max(counts[3]))
    return total + sum(_rounded(8 * sum(c)) for c in counts)


@register("nmf_mu", "triton", devices=_common.devices(), available=_common.available,
          hint=_common.HINT, workspace=workspace, precisions=PRECISIONS)  # fmt: skip
def nmf_mu_(
    v_list: Matrices,
    w_list: Matrices,
    h_list: Matrices,
    max_iter: int,
    tol: float,
    precision: str = "ieee",
) -> torch.Tensor:
    """Multiplicative-update NMF of a ragged batch with the Triton kernels, W and H updated in
    place; n_iter per matrix (int64, on the device). See the module docstring."""
    device = v_list[0].device
    with _common.on_device(device):
        return _nmf_mu(v_list, w_list, h_list, max_iter, tol, precision, device)


def _nmf_mu(v_list, w_list, h_list, max_iter, tol, precision, device) -> torch.Tensor:
    shapes = [(v.shape[0], v.shape[1], w.shape[1]) for v, w in zip(v_list, w_list, strict=True)]
    n_iter = _empty(len(v_list), torch.int64, device)
    for group in plan(shapes, [v.dtype for v in v_list]):
        idx = list(group.indices)
        v, w, h = ([lst[i] for i in idx] for lst in (v_list, w_list, h_list))
        if group.config.kernel == "solve":
            out = _solve(v, w, h, group.config, max_iter, tol, precision)
        else:
            stepper = _GroupedStepper(v, w, h, group.config, precision)
            out = nmf_plan.run_stepwise(stepper, len(v), device, max_iter, tol)
        n_iter[torch.tensor(idx, device=device)] = out
    return n_iter
