"""FusedMaskedSGD against torch.optim.SGD on masked gradients, over random sequences of
step / state_dict / load_state_dict / set_masks / update_masks / dtype and layout changes,
in both state formats (issue 17)."""

from __future__ import annotations

import copy

import torch
from conftest import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

import ong_kernels

SHAPES = [(4, 3, 3, 3), (7, 5), (11,)]
HYPER = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
OPS = ["step", "step", "step", "roundtrip", "load_torch", "set_masks", "update", "drop",
       "double", "channels_last"]  # fmt: skip


class Twin:
    """Ours and the oracle (torch.optim.SGD on where(mask, grad, 0)) on equal weights."""

    def __init__(self, compact: bool, gen: torch.Generator) -> None:
        self.gen = gen
        self.ours_p = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
        self.ref_p = [torch.nn.Parameter(p.detach().clone()) for p in self.ours_p]
        self.masks = {0: self.random_mask(0), 1: self.random_mask(1)}  # by index; 2 dense
        self.ours = ong_kernels.FusedMaskedSGD(
            self.ours_p, masks=self.by_param(), compact_state=compact, **HYPER
        )
        self.ref = torch.optim.SGD(self.ref_p, foreach=False, **HYPER)
        self.apply_to_ref()

    def random_mask(self, i):
        return torch.rand(SHAPES[i], generator=self.gen) < 0.4

    def by_param(self):
        return {self.ours_p[i]: m for i, m in self.masks.items()}

    def apply_to_ref(self):
        """Setting a mask zeroes the pruned weights and their momentum (ours does it too)."""
        with torch.no_grad():
            for i, m in self.masks.items():
                q = self.ref_p[i]
                q.masked_fill_(~m, 0)
                buf = self.ref.state.get(q, {}).get("momentum_buffer")
                if buf is not None:
                    buf.masked_fill_(~m, 0)

    def run(self, op: str) -> None:
        if op == "step":
            for i, (p, q) in enumerate(zip(self.ours_p, self.ref_p, strict=True)):
                g = torch.randn(p.shape, generator=self.gen, dtype=torch.float64)
                if i in self.masks:
                    p.grad = torch.where(self.masks[i], g, float("nan")).to(p.dtype)
                    q.grad = torch.where(self.masks[i], g, 0.0).to(q.dtype)
                else:
                    p.grad, q.grad = g.to(p.dtype), g.to(q.dtype)
            self.ours.step()
            self.ref.step()
        elif op == "roundtrip":  # into a fresh optimizer of the other state format
            fresh = ong_kernels.FusedMaskedSGD(
                self.ours_p, compact_state=not self.ours.compact_state, **HYPER
            )
            fresh.load_state_dict(copy.deepcopy(self.ours.state_dict()))
            self.ours = fresh
        elif op == "load_torch":  # torch SGD's state_dict has no masks: ours keep theirs
            self.ours.load_state_dict(copy.deepcopy(self.ref.state_dict()))
        elif op == "set_masks":
            self.masks = {0: self.random_mask(0), 2: self.random_mask(2)}
            self.ours.set_masks(self.by_param())
            self.apply_to_ref()
        elif op == "update":
            self.masks[1] = self.random_mask(1)
            self.ours.update_masks({self.ours_p[1]: self.masks[1]})
            self.apply_to_ref()
        elif op == "drop" and self.masks:
            i = min(self.masks)
            del self.masks[i]
            self.ours.update_masks({self.ours_p[i]: None})
        elif op == "double":
            dtype = torch.float64 if self.ours_p[0].dtype == torch.float32 else torch.float32
            for p, q in zip(self.ours_p, self.ref_p, strict=True):
                p.data, q.data = p.data.to(dtype), q.data.to(dtype)
                state = self.ref.state.get(q, {})
                if "momentum_buffer" in state:
                    state["momentum_buffer"] = state["momentum_buffer"].to(dtype)
        elif op == "channels_last":
            p = self.ours_p[0]
            fmt = (
                torch.contiguous_format
                if p.is_contiguous(memory_format=torch.channels_last)
                else torch.channels_last
            )
            p.data = p.data.contiguous(memory_format=fmt)

    def check(self, what: str) -> None:
        ours_masks = self.ours.masks
        for i, (p, q) in enumerate(zip(self.ours_p, self.ref_p, strict=True)):
            assert_close(p.detach().double(), q.detach().double(), atol=1e-5, rtol=1e-4,
                         what=f"{what}: param {i}")  # fmt: skip
            if i in self.masks:
                assert torch.equal(ours_masks[p], self.masks[i]), f"{what}: mask {i}"
                assert not bool(p.detach()[~self.masks[i]].any()), f"{what}: pruned {i}"
            else:
                assert p not in ours_masks, f"{what}: param {i} should be dense"


@settings(max_examples=12, deadline=None)
@given(
    compact=st.booleans(),
    ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
)
def test_random_sequences_match_torch_sgd(compact, ops, seed):
    twin = Twin(compact, torch.Generator().manual_seed(seed))
    for k, op in enumerate([*ops, "step"]):
        twin.run(op)
        twin.check(f"after {ops[: k + 1]}")
