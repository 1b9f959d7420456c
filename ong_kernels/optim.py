"""FusedMaskedSGD: torch.optim.SGD on masked gradients, one fused kernel per step.

The optimizer's shape is torch's optim/sgd.py: `step()` gathers each group's lists
(`_gather_group`) and calls one op, torch.ops.ong_kernels.masked_sgd_step_ (or
masked_sgd_compact_step_ for compact_state), eager and compiled alike. The op's kernel keeps
the prepared pointer tables (backends/_multi_tensor.py PlanCache); the optimizer keeps only
its state and, per group, the lists it hands the op and its checked hyper-parameters. The
lists are reused while the group's parameters keep their addresses and layouts and the
optimizer's state holds the same objects (`state_snapshot`: `state.clear()`, a new state
dict, a buffer deleted or replaced all rebuild them); the hyper-parameters while the group's
values are equal (a group holding a tensor, such as a tensor lr that schedulers change in
place, is read every step).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.optim import Optimizer
from torch.optim import optimizer as _torch_optimizer

from ong_kernels import _ops
from ong_kernels._bitmask import block_offsets, compact, expand, pack_mask, unpack_mask
from ong_kernels._layout import Layout, dense_layout, layout_of
from ong_kernels._validate import check_real
from ong_kernels.backends import registry
from ong_kernels.backends._host import grads_of, layout_key, state_snapshot, state_unchanged
from ong_kernels.backends._sgd_args import SgdHyper, check_compact_args, check_step_args

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


class ParamMask:
    """One parameter's mask, and the only copy of it: the bits in the memory order of
    `layout` (the parameter's layout when they were packed), and for compact_state the
    block offsets and kept count of the compact momentum format (ong_kernels/_bitmask.py).
    Everything the step needs is derived here, when the mask is set or repacked."""

    def __init__(self, mask: torch.Tensor, like: torch.Tensor, compact_state: bool) -> None:
        own = torch.empty_like(like, dtype=torch.bool).copy_(mask)
        self.layout: Layout = layout_of(like)
        self.bits = pack_mask(own)
        self.offsets = block_offsets(own) if compact_state else None
        self.kept = int(own.sum()) if compact_state else None

    def bool_mask(self) -> torch.Tensor:
        """The mask as a bool tensor in the layout it was packed for."""
        return unpack_mask(self.bits, self.layout)

    def fits(self, p: torch.Tensor) -> bool:
        return self.layout == layout_of(p)


@dataclass
class _Call:
    """One op call of a group: tensors of one device and one format."""

    compact: bool
    indices: list[int] | None  # into the group's params with gradients; None: all of them
    params: list[torch.Tensor]
    bufs: list[torch.Tensor]
    bits: list[torch.Tensor | None]
    offsets: list[torch.Tensor]
    first: bool
    device: torch.device


@dataclass
class _GroupLists:
    key: tuple | None  # None: not reusable (buffers were created for this step)
    calls: list[_Call]


def _hooked_step(step):
    """`step` behind torch.optim.Optimizer.profile_hook_step (the profiler's record_function
    range and the step pre/post hooks, global and per optimizer) whenever there is something
    for it to do: a profiler running, a hook registered, or torch.compile tracing. Otherwise
    `step` is called directly: the wrapper's record_function costs ~17 us per step on the
    2-core CPU (issue 17 measured 145 -> 126 us over 62 tiny tensors), a fused step's whole
    host-time budget."""
    full = Optimizer.profile_hook_step(step)

    @functools.wraps(step)
    def wrapper(self, *args, **kwargs):
        if type(self).step is not wrapper:  # a subclass's step, which torch wrapped itself
            return step(self, *args, **kwargs)
        if (
            torch._C._autograd._profiler_enabled()
            or self._optimizer_step_pre_hooks
            or self._optimizer_step_post_hooks
            or _torch_optimizer._global_optimizer_pre_hooks
            or _torch_optimizer._global_optimizer_post_hooks
            or torch.compiler.is_compiling()
        ):
            return full(self, *args, **kwargs)
        return step(self, *args, **kwargs)

    # Optimizer._patch_step_function leaves a step marked hooked (a subclass's own step is
    # wrapped by torch as usual)
    wrapper.hooked = True
    return wrapper


class FusedMaskedSGD(Optimizer):
    """SGD with momentum whose step is one fused kernel that applies the pruning mask.

    Semantics are exactly ``torch.optim.SGD`` applied to ``grad * mask``, with the pruned
    weights zeroed when a mask is set: pruned weights and their momentum stay exactly 0
    forever, even when the gradient holds NaN/Inf at pruned positions (the kernels select,
    they never multiply). One step is one op call per (device, format) of a group, and one
    kernel launch per dtype in it.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        lr, momentum, dampening, weight_decay, nesterov, maximize: as ``torch.optim.SGD``
            (lr 1e-3 by default, as there; a tensor lr is read at every step, so schedulers
            that change it in place are followed).
        masks: ``{parameter: bool tensor of its shape}`` (True = kept). Parameters without a
            mask are dense. ``ong_kernels.masks_for(model, masks_by_name)`` builds it.
        backend: "auto" (the best kernel for the parameters' device), or "reference", "cpu",
            "cuda", "triton"; an explicit backend that cannot run raises at the first step.
        compact_state: keep momentum only for the kept weights of masked parameters (in
            memory order) and the masks bit-packed only: at 90% sparsity 0.525 byte per
            weight instead of 5 (float32 momentum + bool mask). The step touches kept
            entries only (pruned weights, zeroed when the mask is set, are never written
            again); its trajectory is dense mode's bit for bit, in every dtype.
            ``state_dict()`` still returns dense ``momentum_buffer`` and bool ``mask``
            entries (loadable into torch.optim.SGD), and ``load_state_dict`` takes them. The
            compiled CPU kernel runs float32/float64; other devices and dtypes gather and
            scatter with PyTorch ops. Masked parameters must be contiguous or channels_last.

    Masks are the optimizer's own (``masks`` returns them); ``state_dict()`` saves them as
    bool ``mask`` entries and ``load_state_dict()`` restores them; a state_dict without any
    mask (one saved by ``torch.optim.SGD``) keeps the current masks. ``set_masks`` replaces
    all masks, ``update_masks`` changes only the parameters it names.

    Layout changes: a parameter whose device, dtype or strides change under the optimizer
    (``model.double()``, ``.to(memory_format=torch.channels_last)``, ``.cuda()``) gets its
    mask repacked for the new layout and its momentum converted (as torch's
    ``load_state_dict`` casts state); a shape change raises.

    GradScaler: ``torch.amp.GradScaler.step`` takes the fused path (the optimizer reads its
    ``grad_scale`` and ``found_inf`` and hands them to the op; the CUDA and CPU kernels
    unscale and skip an inf step without a host sync). The scaler's inf check looks at every
    gradient entry, pruned ones too. CUDA graphs: the step refuses capture (RuntimeError).
    Each op call validates its tensors before it touches any of them; with several calls
    (param groups, devices, state formats) all are validated before the first runs, so a
    refused tensor leaves every parameter and state as it was.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
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
        self._masks: dict[torch.Tensor, ParamMask] = {}
        self._lists: dict[int, _GroupLists] = {}
        self._state_seen = None  # state_snapshot of self.state when the lists were built
        self._hyper_ok: dict[int, tuple] = {}
        super().__init__(params, defaults)
        if masks is not None:
            self.set_masks(masks)

    def __setstate__(self, state):
        # pickle/deepcopy bring "masks" (see __getstate__); torch's load_state_dict calls this
        # with state and param_groups only, and then load_state_dict sets the masks
        masks = state.pop("masks", None)
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in _HYPER_DEFAULTS.items():
                group.setdefault(key, value)
        self.__dict__.setdefault("compact_state", False)
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("_masks", {})
        if masks is not None:
            self._masks = masks
        self._lists = {}
        self._state_seen = None
        self._hyper_ok = {}

    def __getstate__(self):
        # torch.optim.Optimizer pickles defaults, state and param_groups only; the masks, the
        # backend and the state format travel too (the step's lists are rebuilt on load)
        state = super().__getstate__()
        state["backend"] = self.backend
        state["compact_state"] = self.compact_state
        state["masks"] = self._masks
        return state

    def add_param_group(self, param_group: dict) -> None:
        """As torch.optim.Optimizer's, with the group's hyper-parameters checked now (not at
        the first step)."""
        if isinstance(param_group, dict):
            merged = {**self.defaults, **param_group}
            _check_hyper(merged, f"add_param_group (group {len(self.param_groups)})")
        super().add_param_group(param_group)
        if "_lists" in self.__dict__:  # (torch's __init__ adds the groups before ours exist)
            self._forget_lists()

    def _forget_lists(self) -> None:
        """Drop the cached call lists (and the references they and the state snapshot hold)."""
        self._lists.clear()
        self._state_seen = None

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
            if self.compact_state and not dense_layout(param):
                raise ValueError(
                    f"{where}: compact_state needs contiguous or channels_last parameters, got "
                    f"strides {param.stride()}"
                )
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
        for p in list(self._masks):
            if p not in checked:
                self._make_dense(p)
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
        for p in dense:
            self._make_dense(p)
        for p, mask in checked.items():
            self._install_mask(p, mask)

    def _install_mask(self, p: torch.Tensor, mask: torch.Tensor) -> None:
        """p's ParamMask from `mask` (any layout, p's device), pruned weights zeroed, the
        momentum moved into the state format (compact under compact_state) and masked."""
        dense_buf = self._dense_momentum(p)  # read with the old mask, before it is replaced
        entry = ParamMask(mask, p, self.compact_state)
        own = entry.bool_mask()
        p.masked_fill_(~own, 0)
        state = self.state[p]
        state.pop("momentum_buffer", None)
        state.pop("momentum_compact", None)
        if dense_buf is not None:
            dense_buf = torch.empty_like(p).copy_(dense_buf).masked_fill_(~own, 0)
            if self.compact_state:
                state["momentum_compact"] = compact(dense_buf, own)
            else:
                state["momentum_buffer"] = dense_buf
        self._masks[p] = entry
        self._forget_lists()

    def _dense_momentum(self, p: torch.Tensor) -> torch.Tensor | None:
        """p's momentum as a dense tensor (expanded from compact_state with p's current
        ParamMask, in the layout it was packed for), or None."""
        state = self.state.get(p, {})
        if "momentum_compact" in state:
            return expand(state["momentum_compact"], self._masks[p].bool_mask())
        return state.get("momentum_buffer")

    def _make_dense(self, p: torch.Tensor) -> None:
        """Drop p's mask (compact momentum becomes a dense buffer)."""
        if p not in self._masks:
            return
        state = self.state.get(p)
        if state and "momentum_compact" in state:
            state["momentum_buffer"] = self._dense_momentum(p)
            del state["momentum_compact"]
        del self._masks[p]
        self._forget_lists()

    @property
    def masks(self) -> dict[torch.Tensor, torch.Tensor]:
        """The current masks, {parameter: bool tensor} (unpacked from the optimizer's bits:
        changing them changes nothing; use set_masks / update_masks)."""
        return {p: m.bool_mask() for p, m in self._masks.items()}

    @torch.no_grad()
    def _follow_layout(self, p: torch.Tensor, where: str) -> None:
        """Repack p's mask and convert its momentum when p's device, dtype or strides changed
        since they were made; a shape change raises (the mask cannot follow)."""
        entry = self._masks.get(p)
        if entry is not None and not entry.fits(p):
            if entry.layout.shape != tuple(p.shape):
                raise ValueError(
                    f"{where}: the parameter's shape changed from {entry.layout.shape} to "
                    f"{tuple(p.shape)} since its mask was set; set a mask of the new shape "
                    "(update_masks) or drop it (update_masks({p: None}))"
                )
            self._install_mask(p, entry.bool_mask().to(p.device))
        state = self.state.get(p, {})
        buf = state.get("momentum_buffer")
        if buf is not None and layout_of(buf) != layout_of(p):
            if buf.shape != p.shape:
                raise ValueError(
                    f"{where}: momentum buffer of shape {tuple(buf.shape)} for a parameter of "
                    f"shape {tuple(p.shape)}"
                )
            state["momentum_buffer"] = torch.empty_like(p).copy_(buf)
        buf = state.get("momentum_compact")
        if buf is not None and (buf.device != p.device or buf.dtype != p.dtype):
            state["momentum_compact"] = buf.to(p.device, p.dtype)

    # ------------------------------------------------------------------ state_dict

    @torch.no_grad()
    def load_state_dict(self, state_dict) -> None:
        """Load momentum buffers, hyper-parameters and masks; pruned entries are re-zeroed.

        Takes this optimizer's state_dict (either state format), a dense FusedMaskedSGD's
        and torch.optim.SGD's. A state_dict that holds masks replaces the masks (a parameter
        without one there is dense). A state_dict without any mask (saved by
        ``torch.optim.SGD``) keeps the current masks: they are re-applied to the loaded
        momentum, never dropped. torch's loader casts floating state to the parameter dtype,
        so masks are turned back into bool here (exact for 0/1 values).
        """
        self._check_state_dict_masks(state_dict)
        has_masks = any("mask" in s for s in state_dict.get("state", {}).values())
        kept = {} if has_masks else self.masks
        super().load_state_dict(state_dict)
        self._masks = {}
        self._forget_lists()
        loaded = {}
        for p in self._params():
            state = self.state.get(p)
            if state and "mask" in state:
                loaded[p] = state.pop("mask").to(device=p.device, dtype=torch.bool)
            elif p in kept:
                loaded[p] = kept[p]
        for p, mask in loaded.items():
            self._install_mask(p, mask)

    def state_dict(self) -> dict:
        """torch.optim.SGD's format: dense ``momentum_buffer`` (expanded under compact_state)
        and bool ``mask`` entries, so a checkpoint loads into torch.optim.SGD."""
        out = super().state_dict()
        for i, p in enumerate(self._params()):
            entry = self._masks.get(p)
            if entry is None:
                continue
            saved = dict(out["state"].get(i, {}))  # torch's entry is self.state[p] itself
            if "momentum_compact" in saved:
                del saved["momentum_compact"]
                saved["momentum_buffer"] = self._dense_momentum(p)
            saved["mask"] = entry.bool_mask()
            out["state"][i] = saved
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
            if mask is not None and self.compact_state and not dense_layout(p):
                raise ValueError(
                    f"state_dict: parameter {i} has strides {p.stride()}; compact_state needs "
                    "contiguous or channels_last parameters"
                )

    # ------------------------------------------------------------------ step

    def _hyper(self, index: int, group: dict) -> SgdHyper:
        """The group's hyper-parameters (first_step False), validated when they change (an LR
        scheduler changes lr: nothing is re-uploaded). A group holding a tensor (a tensor lr,
        which torch's schedulers and `group["lr"].mul_()` change in place: the same tensor
        object compares equal to itself whatever it holds) is read and checked every step
        (``.item()``: a host sync for a CUDA tensor)."""
        values = (
            group["lr"],
            group["momentum"],
            group["dampening"],
            group["weight_decay"],
            group["nesterov"],
            group["maximize"],
        )
        cached = self._hyper_ok.get(index)
        if cached is not None and cached[0] is not None:
            try:
                if cached[0] == values:
                    return cached[1]
            except RuntimeError:  # a multi-element tensor put in the group: checked below
                pass
        _check_hyper(group, f"param_groups[{index}]")
        lr, momentum, dampening, weight_decay, nesterov, maximize = values
        hyper = SgdHyper(
            lr=float(lr),
            momentum=float(momentum),
            dampening=float(dampening),
            weight_decay=float(weight_decay),
            nesterov=bool(nesterov),
            maximize=bool(maximize),
            first_step=False,
        )
        tensor = any(isinstance(v, torch.Tensor) for v in values)
        self._hyper_ok[index] = (None if tensor else values, hyper)
        return hyper

    @_hooked_step
    @torch.no_grad()
    def step(self, closure=None):
        """One fused masked SGD step: per group, `_gather_group` and one op call per (device,
        format). Every group's hyper-parameters are validated before any tensor is touched."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hypers = [self._hyper(i, group) for i, group in enumerate(self.param_groups)]
        compiling = torch.compiler.is_compiling()
        if not compiling and self._lists and not state_unchanged(self.state, self._state_seen):
            self._forget_lists()  # the state was reset or edited since the lists were built
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        steps = []
        for index, (group, hyper) in enumerate(zip(self.param_groups, hypers, strict=True)):
            grads, calls = self._gather_group(index, group, hyper.momentum)
            for call in calls:
                gs = grads if call.indices is None else [grads[i] for i in call.indices]
                steps.append((index, call, gs, hyper))
        if not compiling and self._state_seen is None:  # lists (re)built: the state they saw
            self._state_seen = state_snapshot(self.state)
        done = 0
        try:
            if len(steps) > 1:
                # Each op validates its own tensors before it writes; with several calls
                # (groups, devices, formats) every one is validated first, so a bad tensor in
                # a later group leaves the earlier groups unstepped too. One call (the usual
                # case) pays the op's check only.
                for index, call, gs, _ in steps:
                    _check_call(call, gs, f"param_groups[{index}]")
            for _, call, gs, hyper in steps:
                self._run_call(call, gs, hyper, grad_scale, found_inf)
                done += 1
        except (ValueError, RuntimeError):
            # The calls that did not run: the zero momentum their first step created goes
            # again, so the next step is still a first step (torch SGD's buf = grad).
            for _, call, _, _ in steps[done:]:
                if call.first:
                    name = "momentum_compact" if call.compact else "momentum_buffer"
                    for p in call.params:
                        self.state[p].pop(name, None)
                        if not self.state[p]:
                            del self.state[p]
            raise
        return loss

    def _run_call(self, call: _Call, grads: list, hyper: SgdHyper, grad_scale, found_inf):
        scale, inf = grad_scale, found_inf
        if scale is not None or inf is not None:
            scale, inf = _on(scale, inf, call.device)
        # the op's schema lists SgdHyper's fields in order (_sgd_args.HYPER_SCHEMA)
        h = hyper._replace(first_step=True) if call.first else hyper
        if call.compact:
            _ops.masked_sgd_compact_step_.default(
                call.params, grads, call.bufs, call.bits, call.offsets, *h, self.backend,
                scale, inf,
            )  # fmt: skip
        else:
            _ops.masked_sgd_step_.default(
                call.params, grads, call.bufs, call.bits, *h, self.backend, scale, inf
            )

    def _gather_group(self, index: int, group: dict, momentum: float) -> tuple[list, list[_Call]]:
        """torch's `_init_group` (not named so: dynamo runs a method of that name eagerly and
        wants a constant back): the gradients of the group's parameters that have one, and
        the op calls. The calls are reused while those parameters' addresses and layouts and
        the state stay the same (a mask change, or a state reset or edit that `step` sees,
        clears them); under torch.compile they are built fresh (tracing has no addresses)."""
        params = group["params"]
        grads = grads_of(params)
        if grads is None:  # some parameters have no gradient: they are not stepped
            params = [p for p in params if p.grad is not None]
            grads = [p.grad for p in params]
        if not params:
            return [], []
        if torch.compiler.is_compiling():
            return grads, self._build_calls(index, params, momentum)
        key = (layout_key(params, True), momentum != 0)
        cached = self._lists.get(index)
        if cached is not None and cached.key == key:
            return grads, cached.calls
        for j, p in enumerate(params):
            self._follow_layout(p, f"param_groups[{index}] parameter {j}")
        calls = self._build_calls(index, params, momentum)
        reusable = not any(c.first for c in calls)
        self._lists[index] = _GroupLists(key if reusable else None, calls)
        self._state_seen = None  # the state changed (new buffers, converted layouts) or may have
        return grads, calls

    def _build_calls(self, index: int, params: list, momentum: float) -> list[_Call]:
        """Split params (with gradients) by device, state format and first step; create the
        momentum of parameters that have none yet (zeros, as torch.optim.SGD's first step)."""
        by_call: dict[tuple, list[int]] = {}
        for j, p in enumerate(params):
            state = self.state[p]
            entry = self._masks.get(p)
            compact_ = self.compact_state and entry is not None
            name = "momentum_compact" if compact_ else "momentum_buffer"
            first = momentum != 0 and state.get(name) is None
            if first:
                state[name] = (
                    torch.zeros(entry.kept, dtype=p.dtype, device=p.device)
                    if compact_
                    else torch.zeros_like(p, memory_format=torch.preserve_format)
                )
            by_call.setdefault((p.device, compact_, first), []).append(j)
        calls = []
        for (device, compact_, first), idx in by_call.items():
            ps = [params[j] for j in idx]
            name = "momentum_compact" if compact_ else "momentum_buffer"
            entries = [self._masks.get(p) for p in ps]
            calls.append(
                _Call(
                    compact=compact_,
                    indices=None if len(by_call) == 1 else idx,
                    params=ps,
                    bufs=[self.state[p][name] for p in ps] if momentum != 0 else [],
                    bits=[None if e is None else e.bits for e in entries],
                    offsets=[e.offsets for e in entries] if compact_ else [],
                    first=first,
                    device=device,
                )
            )
        return calls


def _check_call(call: _Call, grads: list, where: str) -> None:
    """The op's own tensor check (backends/_sgd_args.py) of one call, before any call runs."""
    try:
        if call.compact:
            check_compact_args(call.params, grads, call.bufs, call.bits, call.offsets)
        else:
            check_step_args(call.params, grads, call.bufs, call.bits)
    except (ValueError, TypeError, NotImplementedError) as err:
        raise type(err)(f"{where}: {err}") from None


def _on(grad_scale, found_inf, device):
    """GradScaler's tensors on `device` (no copy when they are there already)."""
    if grad_scale is not None and grad_scale.device != device:
        grad_scale = grad_scale.to(device)
    if found_inf is not None and found_inf.device != device:
        found_inf = found_inf.to(device)
    return grad_scale, found_inf
