"""FusedMaskedSGD: torch.optim.SGD on masked gradients, one fused kernel per step."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.optim import Optimizer

from ong_kernels import _ops
from ong_kernels._bitmask import pack_mask, unpack_mask
from ong_kernels._validate import check_real
from ong_kernels.backends import _multi_tensor as mt
from ong_kernels.backends import registry
from ong_kernels.backends._multi_tensor import check_native_args, reference_scaled, step_key

_HYPER_DEFAULTS = dict(
    momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False
)


def _check_hyper(group: Mapping, where: str) -> None:
    """Raise a ValueError naming the first invalid hyper-parameter of a group."""
    for name in ("lr", "momentum", "dampening", "weight_decay"):
        try:
            check_real(group[name], f"{where}: {name}", minimum=0.0)
        except TypeError as exc:  # a ValueError for the optimizer, as torch.optim says
            raise ValueError(str(exc)) from None
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(f"{where}: nesterov=True requires momentum > 0 and dampening = 0")


def _layout(t: torch.Tensor) -> tuple:
    return (t.device, t.dtype, tuple(t.shape), t.stride())


@dataclass
class _Bucket:
    """Tensors of one device and first-step flag within a group, and their prepared kernel."""

    indices: list[int]
    first: bool
    plan: object  # has run(grads, hyper, grad_scale, found_inf)


@dataclass
class _GroupPlan:
    key: tuple
    params: list[torch.Tensor]
    buckets: list[_Bucket]
    has_first: bool


class _ListPlan:
    """A kernel without a prepared form (the reference): called with the lists each step."""

    def __init__(self, fn, params, grads, bufs, bits) -> None:
        check_native_args(params, grads, bufs, bits)
        self.run_scaled = reference_scaled(fn)
        self.params, self.bufs, self.bits = params, bufs, bits

    def run(self, grads, hyper, grad_scale=None, found_inf=None) -> None:
        self.run_scaled(self.params, grads, self.bufs, self.bits, hyper, grad_scale, found_inf)


class FusedMaskedSGD(Optimizer):
    """SGD with momentum whose step is one fused kernel that applies the pruning mask.

    Semantics are exactly ``torch.optim.SGD`` applied to ``grad * mask``, with the pruned
    weights zeroed when a mask is set: pruned weights and their momentum stay exactly 0
    forever, even when the gradient holds NaN/Inf at pruned positions (the kernels select,
    they never multiply). One step is one kernel call per (device, dtype) group of tensors.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        lr, momentum, dampening, weight_decay, nesterov, maximize: as ``torch.optim.SGD``.
        masks: ``{parameter: bool tensor of its shape}`` (True = kept). Parameters without a
            mask are dense. ``ong_kernels.masks_for(model, masks_by_name)`` builds it.
        backend: "auto" (the best kernel for the parameters' device), or "reference", "cpu",
            "cuda", "triton"; an explicit backend that cannot run raises at the first step.
        compact_state: keep momentum only for the kept weights of masked parameters (in
            memory order) and the masks bit-packed only: at 90% sparsity 0.525 byte per
            weight instead of 5 (float32 momentum + bool mask). The step touches kept
            entries only (pruned weights, zeroed when the mask is set, are never written
            again). ``state_dict()`` still returns dense ``momentum_buffer`` and bool
            ``mask`` entries (loadable into torch.optim.SGD), and ``load_state_dict``
            takes them. The compiled CPU kernel runs it; other devices and dtypes gather and
            scatter with PyTorch ops. Masked parameters must be contiguous or channels_last.

    Masks live in the optimizer state (``state[p]["mask"]``), so ``state_dict()`` saves them
    and ``load_state_dict()`` restores them; a state_dict without any mask (one saved by
    ``torch.optim.SGD``) keeps the current masks. ``set_masks`` replaces all masks,
    ``update_masks`` changes only the parameters it names.

    Layout changes: a parameter whose device, dtype or strides change under the optimizer
    (``model.double()``, ``.to(memory_format=torch.channels_last)``, ``.cuda()``) gets its
    mask repacked for the new layout and its momentum buffer converted (as torch's
    ``load_state_dict`` casts state); a shape change raises. The step caches the partition
    and pointer tables of each group while the parameters' and gradients' addresses, strides,
    shapes and dtypes stay the same, so a step costs the key check and the launch.

    GradScaler: ``torch.amp.GradScaler.step`` takes the fused path (the optimizer reads its
    ``grad_scale`` and ``found_inf``; the kernel unscales and skips an inf step without a host
    sync on CUDA). The scaler's inf check looks at every gradient entry, pruned ones too.
    CUDA graphs: the step refuses capture (RuntimeError); see the README.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        *,
        masks: Mapping[torch.Tensor, torch.Tensor] | None = None,
        backend: str = "auto",
        compact_state: bool = False,
    ) -> None:
        self.backend = registry.check_backend_name(backend)
        if not isinstance(compact_state, bool):
            raise TypeError(f"compact_state must be a bool, got {type(compact_state).__name__}")
        self.compact_state = compact_state
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=bool(nesterov),
            maximize=bool(maximize),
        )
        _check_hyper(defaults, "FusedMaskedSGD")
        self._reset_caches()
        super().__init__(params, defaults)
        if masks is not None:
            self.set_masks(masks)

    def _reset_caches(self) -> None:
        # The kernels read masks bit-packed (1/8 byte per weight instead of 1: the step is
        # memory-bound), packed in the memory order of the parameter's layout `_packed_for`;
        # derived from state[p]["mask"], so not part of the state_dict.
        self._mask_bits: dict[torch.Tensor, torch.Tensor] = {}
        self._packed_for: dict[torch.Tensor, tuple] = {}
        self._plans: dict[int, _GroupPlan] = {}
        self._hyper_ok: dict[int, tuple] = {}
        self._offsets: dict[torch.Tensor, torch.Tensor] = {}  # compact_state chunk offsets

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in _HYPER_DEFAULTS.items():
                group.setdefault(key, value)
        self.__dict__.setdefault("compact_state", False)
        self.__dict__.setdefault("backend", "auto")
        self._reset_caches()
        with torch.no_grad():
            for p in self._params():
                state = self.state.get(p, {})
                if "mask" in state:
                    self._install_mask(p, state["mask"])
                elif "mask_bits" in state:  # compact_state: packed in p's layout when pickled
                    self._packed_for[p] = _layout(p)
                    self._install_mask(p, unpack_mask(state["mask_bits"], p))

    def __getstate__(self):
        # torch.optim.Optimizer pickles defaults, state and param_groups only; the backend
        # and the state format travel too (the caches are rebuilt on load)
        state = super().__getstate__()
        state["backend"] = self.backend
        state["compact_state"] = self.compact_state
        return state

    def add_param_group(self, param_group: dict) -> None:
        """As torch.optim.Optimizer's, with the group's hyper-parameters checked now (not at
        the first step)."""
        if isinstance(param_group, dict):
            merged = {**self.defaults, **param_group}
            _check_hyper(merged, f"add_param_group (group {len(self.param_groups)})")
        super().add_param_group(param_group)
        self._plans.clear()

    # ------------------------------------------------------------------ masks

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _validated_masks(self, masks) -> dict[torch.Tensor, torch.Tensor]:
        if not isinstance(masks, Mapping):
            raise TypeError(
                f"masks must map parameters to bool tensors, got {type(masks).__name__} "
                "(ong_kernels.masks_for(model, masks_by_name) builds the mapping)"
            )
        known = {id(p) for p in self._params()}
        checked: dict[torch.Tensor, torch.Tensor] = {}
        for k, (param, mask) in enumerate(masks.items()):
            if isinstance(param, str):
                raise TypeError(
                    f"masks entry {k} is keyed by the name {param!r}: keys must be the "
                    "parameters themselves; ong_kernels.masks_for(model, masks_by_name) maps "
                    "names to parameters"
                )
            where = f"masks entry {k} (parameter of shape {tuple(getattr(param, 'shape', ()))})"
            if not isinstance(param, torch.Tensor) or id(param) not in known:
                raise ValueError(f"{where}: key is not a parameter of this optimizer")
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"{where}: mask must be a torch.Tensor, got {type(mask).__name__}")
            if mask.dtype != torch.bool:
                raise TypeError(f"{where}: mask must have dtype torch.bool, got {mask.dtype}")
            if mask.shape != param.shape:
                raise ValueError(
                    f"{where}: mask has shape {tuple(mask.shape)}, expected {tuple(param.shape)}"
                )
            if mask.device != param.device:
                raise ValueError(f"{where}: mask is on {mask.device}, parameter on {param.device}")
            checked[param] = mask
        return checked

    @torch.no_grad()
    def set_masks(self, masks: Mapping[torch.Tensor, torch.Tensor]) -> None:
        """Replace all masks: parameters absent from `masks` become dense.

        Every mask is validated before anything changes. The optimizer keeps its own copy (in the
        parameter's memory layout); pruned weights and their momentum are zeroed at once.
        ``update_masks`` changes only the parameters it is given.
        """
        checked = self._validated_masks(masks)
        for p in self._params():
            if p in self.state:
                self._make_dense(p)
        self._mask_bits.clear()
        self._packed_for.clear()
        self._plans.clear()
        for p, mask in checked.items():
            self._install_mask(p, mask)

    @torch.no_grad()
    def update_masks(self, masks: Mapping[torch.Tensor, torch.Tensor | None]) -> None:
        """Set the masks of the parameters in `masks` only (``None``: that parameter becomes
        dense); every other parameter keeps its mask. Validated before anything changes."""
        dense = [p for p, m in masks.items() if m is None] if isinstance(masks, Mapping) else []
        if isinstance(masks, Mapping):
            masks = {p: m for p, m in masks.items() if m is not None}
        checked = self._validated_masks(masks)
        known = {id(p) for p in self._params()}
        for p in dense:
            if not isinstance(p, torch.Tensor) or id(p) not in known:
                raise ValueError("update_masks: a key is not a parameter of this optimizer")
        self._plans.clear()
        for p in dense:
            if p in self.state:
                self._make_dense(p)
            self._mask_bits.pop(p, None)
            self._packed_for.pop(p, None)
        for p, mask in checked.items():
            self._install_mask(p, mask)

    def _install_mask(self, p: torch.Tensor, mask: torch.Tensor) -> None:
        """Own copy of `mask` in p's layout and device, its bits, pruned entries zeroed.
        compact_state: only the bits are kept, and the momentum is compacted."""
        own = torch.empty_like(p, dtype=torch.bool).copy_(mask)
        state = self.state[p]
        dense_buf = self._dense_momentum(p)
        bits = pack_mask(own)
        self._mask_bits[p] = bits
        self._packed_for[p] = _layout(p)
        p.masked_fill_(~own, 0)
        if dense_buf is not None:
            dense_buf = torch.empty_like(p).copy_(dense_buf).masked_fill_(~own, 0)
        if self.compact_state:
            state.pop("mask", None)
            state.pop("momentum_buffer", None)
            state["mask_bits"] = bits
            self._offsets[p] = mt.chunk_offsets(own, _cpu_chunk())
            if dense_buf is not None:
                state["momentum_compact"] = mt.compact(dense_buf, own)
        else:
            state["mask"] = own
            if dense_buf is not None:
                state["momentum_buffer"] = dense_buf
        self._plans.clear()

    def _dense_momentum(self, p: torch.Tensor) -> torch.Tensor | None:
        """p's momentum as a dense tensor (expanded from compact_state), or None."""
        state = self.state.get(p, {})
        if "momentum_compact" in state:
            old = self._packed_for[p]
            like = torch.empty_strided(old[2], old[3], dtype=torch.bool, device=old[0])
            return mt.expand(state["momentum_compact"], unpack_mask(state["mask_bits"], like))
        return state.get("momentum_buffer")

    def _make_dense(self, p: torch.Tensor) -> None:
        """Drop p's mask (compact momentum becomes a dense buffer)."""
        state = self.state[p]
        if "momentum_compact" in state:
            state["momentum_buffer"] = self._dense_momentum(p)
        for key in ("mask", "mask_bits", "momentum_compact"):
            state.pop(key, None)
        self._offsets.pop(p, None)

    @property
    def masks(self) -> dict[torch.Tensor, torch.Tensor]:
        """The current masks, {parameter: bool tensor} (the optimizer's own tensors: read only;
        unpacked from the bits under compact_state)."""
        out = {}
        for p in self._params():
            state = self.state.get(p, {})
            if "mask" in state:
                out[p] = state["mask"]
            elif "mask_bits" in state:
                out[p] = unpack_mask(state["mask_bits"], p)
        return out

    @torch.no_grad()
    def _follow_layout(self, p: torch.Tensor, where: str) -> None:
        """Repack p's mask and convert its momentum buffer when p's device, dtype or strides
        changed since they were made; a shape change raises (the mask cannot follow)."""
        state = self.state.get(p, {})
        old = self._packed_for.get(p)
        if old is not None and old != _layout(p):
            if old[2] != tuple(p.shape):
                raise ValueError(
                    f"{where}: the parameter's shape changed from {old[2]} to "
                    f"{tuple(p.shape)} since its mask was set; set a mask of the new shape "
                    "(update_masks) or drop it (update_masks({p: None}))"
                )
            if "mask_bits" in state:  # compact_state: unpack in the layout it was packed for
                like = torch.empty_strided(old[2], old[3], dtype=torch.bool, device=old[0])
                mask = unpack_mask(state["mask_bits"], like)
            else:
                mask = state["mask"]
            self._install_mask(p, mask.to(p.device))
        buf = state.get("momentum_buffer")
        if buf is not None and _layout(buf) != _layout(p):
            if buf.shape != p.shape:
                raise ValueError(
                    f"{where}: momentum buffer of shape {tuple(buf.shape)} for a parameter of "
                    f"shape {tuple(p.shape)}"
                )
            state["momentum_buffer"] = torch.empty_like(p).copy_(buf)

    # ------------------------------------------------------------------ state_dict

    @torch.no_grad()
    def load_state_dict(self, state_dict) -> None:
        """Load momentum buffers, hyper-parameters and masks; pruned entries are re-zeroed.

        A state_dict that holds masks replaces the masks (a parameter without one there is
        dense). A state_dict without any mask (saved by ``torch.optim.SGD``) keeps the current
        masks: they are re-applied to the loaded weights' momentum, never dropped.
        torch's loader casts floating state to the parameter dtype, so masks are turned back
        into bool here (exact for 0/1 values).
        """
        self._check_state_dict_masks(state_dict)
        has_masks = any("mask" in s for s in state_dict.get("state", {}).values())
        kept = {} if has_masks else self.masks
        super().load_state_dict(state_dict)
        self._mask_bits.clear()
        self._packed_for.clear()
        self._offsets.clear()
        self._plans.clear()
        for p in self._params():
            state = self.state.get(p)
            if state and "mask" in state:
                self._install_mask(p, state["mask"].to(device=p.device, dtype=torch.bool))
            elif p in kept:
                self._install_mask(p, kept[p])

    def state_dict(self) -> dict:
        """torch.optim.SGD's format: dense ``momentum_buffer`` (expanded under compact_state)
        and bool ``mask`` entries, so a checkpoint loads into torch.optim.SGD."""
        out = super().state_dict()
        if not self.compact_state:
            return out
        for i, p in enumerate(self._params()):
            entry = out["state"].get(i)
            if entry is None or "mask_bits" not in entry:
                continue
            entry = {k: v for k, v in entry.items() if k not in ("mask_bits", "momentum_compact")}
            if "momentum_compact" in self.state[p]:
                entry["momentum_buffer"] = self._dense_momentum(p)
            entry["mask"] = unpack_mask(self.state[p]["mask_bits"], p)
            out["state"][i] = entry
        return out

    def _check_state_dict_masks(self, state_dict) -> None:
        """Mask shapes are checked before anything is loaded (torch checks the groups)."""
        ids = [i for group in state_dict.get("param_groups", []) for i in group["params"]]
        for i, p in zip(ids, self._params(), strict=False):
            mask = state_dict.get("state", {}).get(i, {}).get("mask")
            if mask is not None and tuple(mask.shape) != tuple(p.shape):
                raise ValueError(
                    f"state_dict: mask of shape {tuple(mask.shape)} for a parameter of shape "
                    f"{tuple(p.shape)}"
                )

    # ------------------------------------------------------------------ step

    def _hyper(self, index: int, group: dict) -> tuple:
        """(lr, momentum, dampening, weight_decay, nesterov, maximize) by value, validated
        when they change (an LR scheduler changes lr: nothing is re-uploaded)."""
        values = (
            group["lr"],
            group["momentum"],
            group["dampening"],
            group["weight_decay"],
            group["nesterov"],
            group["maximize"],
        )
        if self._hyper_ok.get(index) != values:
            _check_hyper(group, f"param_groups[{index}]")
            self._hyper_ok[index] = values
        return (
            float(values[0]),
            float(values[1]),
            float(values[2]),
            float(values[3]),
            bool(values[4]),
            bool(values[5]),
        )

    @torch.no_grad()
    def step(self, closure=None):
        """One fused masked SGD step. Validates every group before touching any tensor."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hypers = [self._hyper(i, group) for i, group in enumerate(self.param_groups)]
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if torch.compiler.is_compiling():
            for group, hyper in zip(self.param_groups, hypers, strict=True):
                self._step_through_op(group, hyper, grad_scale, found_inf)
            return loss
        plans = [self._plan(i, group) for i, group in enumerate(self.param_groups)]
        for (plan, grads), hyper in zip(plans, hypers, strict=True):
            if plan is None:
                continue
            for bucket in plan.buckets:
                gs = grads if len(plan.buckets) == 1 else [grads[i] for i in bucket.indices]
                scale, inf = _on(grad_scale, found_inf, gs[0].device)
                bucket.plan.run(gs, (*hyper, bucket.first), scale, inf)
        return loss

    def _plan(self, index: int, group: dict) -> tuple[_GroupPlan | None, list]:
        """(the cached plan of a group, its gradients); the plan is rebuilt (and everything
        validated) when step_key changes."""
        params = group["params"]
        grads = [p.grad for p in params]
        if id(None) in set(map(id, grads)):
            params = [p for p, g in zip(params, grads, strict=True) if g is not None]
            if not params:
                return None, []
            grads = [p.grad for p in params]
        try:
            key = step_key(params, grads)
        except RuntimeError:  # sparse gradients have no strides: the rebuild says why
            key = None
        plan = self._plans.get(index)
        if plan is not None and key is not None and plan.key == key:
            return plan, grads
        plan = self._build_plan(index, group, params, grads, key)
        self._plans[index] = plan
        return plan, grads

    def _build_plan(self, index, group, params, grads, key) -> _GroupPlan:
        momentum = float(group["momentum"])
        for j, p in enumerate(params):
            if p.grad.is_sparse:
                raise RuntimeError("FusedMaskedSGD does not support sparse gradients")
            self._follow_layout(p, f"param_groups[{index}] parameter {j}")
        by_bucket: dict[tuple, list[int]] = {}
        for j, p in enumerate(params):
            state = self.state[p]
            first = False
            if self.compact_state and "mask_bits" in state:
                if momentum != 0 and "momentum_compact" not in state:
                    nnz = int(unpack_mask(state["mask_bits"], p).sum())
                    state["momentum_compact"] = torch.zeros(nnz, dtype=p.dtype, device=p.device)
                    first = True
                by_bucket.setdefault((p.device, first, True), []).append(j)
                continue
            if momentum != 0 and state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                first = True
            by_bucket.setdefault((p.device, first, False), []).append(j)
        buckets = []
        for (device, first, compact), idx in by_bucket.items():
            ps = [params[j] for j in idx]
            gs = [grads[j] for j in idx]
            if compact:
                buckets.append(_Bucket(idx, first, self._compact_plan(device, ps, gs, momentum)))
                continue
            bs = [self.state[p]["momentum_buffer"] for p in ps] if momentum != 0 else []
            bits = [self._mask_bits.get(p) for p in ps]
            kernel = registry.select("masked_sgd_step", device.type, self.backend)
            prepare = getattr(kernel.fn, "prepare", None)
            plan = prepare(ps, gs, bs, bits) if prepare else _ListPlan(kernel.fn, ps, gs, bs, bits)
            buckets.append(_Bucket(idx, first, plan))
        has_first = any(b.first for b in buckets)
        return _GroupPlan(None if has_first else key, params, buckets, has_first)

    def _compact_plan(self, device, ps, gs, momentum):
        """The compiled CPU kernel for float32/float64 masked parameters when the backend
        allows it; PyTorch gathers and scatters otherwise."""
        cbufs = [self.state[p]["momentum_compact"] for p in ps] if momentum != 0 else []
        kernel = registry.select("masked_sgd_step", device.type, self.backend)
        from ong_kernels.backends import cpu, reference

        native_ok = kernel.backend == "cpu" and all(p.dtype in cpu.SUPPORTED_DTYPES for p in ps)
        if native_ok:
            bits = [self._mask_bits[p] for p in ps]
            return cpu.CompactPlan(ps, gs, cbufs, bits, [self._offsets[p] for p in ps])
        masks = [unpack_mask(self._mask_bits[p], p) for p in ps]
        return mt.CompactTorchPlan(ps, gs, cbufs, masks, reference.masked_sgd_step_)

    def _step_through_op(self, group, hyper, grad_scale, found_inf) -> None:
        """The step as torch.ops.ong_kernels.masked_sgd_step_ calls (what torch.compile
        traces). GradScaler's fused path is refused there (its inf skip needs the kernel)."""
        if self.compact_state:
            raise RuntimeError(
                "FusedMaskedSGD(compact_state=True) does not run under torch.compile"
            )
        if grad_scale is not None or found_inf is not None:
            raise RuntimeError(
                "FusedMaskedSGD: GradScaler's fused path under torch.compile is not supported; "
                "step the optimizer outside the compiled region"
            )
        momentum = hyper[1]
        buckets: dict[tuple, tuple[list, list, list, list]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            first = False
            if momentum != 0 and state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                first = True
            ps, gs, bs, ms = buckets.setdefault((p.device, first), ([], [], [], []))
            ps.append(p)
            gs.append(p.grad)
            if momentum != 0:
                bs.append(state["momentum_buffer"])
            ms.append(self._mask_bits.get(p))
        for (_, first), (ps, gs, bs, ms) in buckets.items():
            _ops.masked_sgd_step_(ps, gs, bs, ms, *hyper, first, self.backend)


def _cpu_chunk() -> int:
    """Elements per chunk of the CPU kernels (the compact offsets' unit); 16384 when the
    extension is absent (the offsets are then unused: PyTorch runs compact_state)."""
    from ong_kernels.backends import _native

    return _native.lib().masked_sgd_chunk_size_cpu() if _native.has_cpu() else 16384


def _on(grad_scale, found_inf, device):
    """GradScaler's tensors on `device` (no copy when they are there already)."""
    if grad_scale is not None and grad_scale.device != device:
        grad_scale = grad_scale.to(device)
    if found_inf is not None and found_inf.device != device:
        found_inf = found_inf.to(device)
    return grad_scale, found_inf
