"""FusedMaskedSGD: torch.optim.SGD on masked gradients, one fused kernel per step."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.optim import Optimizer

from ong_kernels import _ops
from ong_kernels._bitmask import pack_mask
from ong_kernels._validate import check_real
from ong_kernels.backends import registry

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

    Masks live in the optimizer state (``state[p]["mask"]``), so ``state_dict()`` saves them
    and ``load_state_dict()`` restores them. Works with LR schedulers and torch.amp.GradScaler.
    """

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
    ) -> None:
        self.backend = registry.check_backend_name(backend)
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=bool(nesterov),
            maximize=bool(maximize),
        )
        _check_hyper(defaults, "FusedMaskedSGD")
        super().__init__(params, defaults)
        # The kernels read masks bit-packed (1/8 byte per weight instead of 1: the step is
        # memory-bound); derived from state[p]["mask"], so not part of the state_dict.
        self._mask_bits: dict[torch.Tensor, torch.Tensor] = {}
        if masks is not None:
            self.set_masks(masks)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in _HYPER_DEFAULTS.items():
                group.setdefault(key, value)

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
        """
        checked = self._validated_masks(masks)
        for p in self._params():
            self.state[p].pop("mask", None)
        self._mask_bits.clear()
        for p, mask in checked.items():
            self._install_mask(p, mask)

    def _install_mask(self, p: torch.Tensor, mask: torch.Tensor) -> None:
        own = torch.empty_like(p, dtype=torch.bool).copy_(mask)
        state = self.state[p]
        state["mask"] = own
        self._mask_bits[p] = pack_mask(own)
        p.masked_fill_(~own, 0)
        buf = state.get("momentum_buffer")
        if buf is not None:
            buf.masked_fill_(~own, 0)

    @property
    def masks(self) -> dict[torch.Tensor, torch.Tensor]:
        """The current masks, {parameter: bool tensor} (the optimizer's own tensors: read only)."""
        return {p: self.state[p]["mask"] for p in self._params() if "mask" in self.state.get(p, {})}

    # ------------------------------------------------------------------ state_dict

    @torch.no_grad()
    def load_state_dict(self, state_dict) -> None:
        """Load momentum buffers, hyper-parameters and masks; pruned entries are re-zeroed.

        torch's loader casts floating state to the parameter dtype, so masks are turned back
        into bool here (exact for 0/1 values) and re-applied.
        """
        self._check_state_dict_masks(state_dict)
        super().load_state_dict(state_dict)
        self._mask_bits.clear()
        for p in self._params():
            state = self.state.get(p)
            if state and "mask" in state:
                self._install_mask(p, state["mask"].to(device=p.device, dtype=torch.bool))

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

    @torch.no_grad()
    def step(self, closure=None):
        """One fused masked SGD step. Validates every group before touching any tensor."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for index, group in enumerate(self.param_groups):
            _check_hyper(group, f"param_groups[{index}]")
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("FusedMaskedSGD does not support sparse gradients")

        for group in self.param_groups:
            momentum = float(group["momentum"])
            # (device, dtype, buffers-are-new) -> tensors; normally one bucket per step.
            buckets: dict[tuple, tuple[list, list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                first = False
                if momentum != 0 and state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
                    first = True
                ps, gs, bs, ms = buckets.setdefault((p.device, p.dtype, first), ([], [], [], []))
                ps.append(p)
                gs.append(p.grad)
                if momentum != 0:
                    bs.append(state["momentum_buffer"])
                ms.append(self._mask_bits.get(p))
            for (_, _, first), (ps, gs, bs, ms) in buckets.items():
                _ops.masked_sgd_step_(
                    ps,
                    gs,
                    bs,
                    ms,
                    float(group["lr"]),
                    momentum,
                    float(group["dampening"]),
                    float(group["weight_decay"]),
                    bool(group["nesterov"]),
                    bool(group["maximize"]),
                    first,
                    self.backend,
                )
        return loss
