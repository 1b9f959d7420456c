"""The backend registry: explicit request, environment override, measured default, and the
errors of a request that cannot be met."""

from __future__ import annotations

import pytest
import torch

import ong_kernels
from ong_kernels.backends import _native, registry


@pytest.fixture
def fake_kernels(monkeypatch):
    """A private registry with a kernel that is never available, for the error paths."""
    kernels = dict(registry._KERNELS)
    monkeypatch.setattr(registry, "_KERNELS", kernels)
    registry.register(
        "nmf_mu",
        "cuda",
        devices=("cuda",),
        available=lambda: False,
        hint="HOW TO GET IT",
        workspace=lambda shapes: 0,
    )(lambda *a: None)
    registry.register(
        "masked_sgd_step", "triton", devices=("cuda", "cpu"), available=lambda: False, hint="HINT"
    )(lambda *a: None)
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    return kernels


def test_an_nmf_kernel_must_declare_its_workspace(fake_kernels):
    with pytest.raises(ValueError, match="must declare its workspace model"):
        registry.register("nmf_mu", "triton", devices=("cuda",))(lambda *a: None)


def test_every_op_has_a_reference_that_serves_any_device():
    for op in registry.OPS:
        kernel = registry.get(op, "reference")
        assert kernel.serves("cpu") and kernel.serves("cuda") and kernel.serves("mps")
        assert kernel.available()


def test_auto_picks_the_first_available_of_the_default_order(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    for op in registry.OPS:
        chosen = registry.select(op, "cpu")
        order = registry.DEFAULT_ORDER[op]["cpu"]
        runnable = [
            b for b in order if (op, b) in registry._KERNELS and registry.get(op, b).available()
        ]
        assert chosen.backend == runnable[0]
        assert registry.select(op, "mps").backend == "reference"  # no order for mps


def test_explicit_unavailable_backend_fails_loudly_with_the_hint(fake_kernels):
    with pytest.raises(RuntimeError, match="not available here; HOW TO GET IT"):
        registry.select("nmf_mu", "cuda", "cuda")
    # auto on the same device falls back instead (to the reference here)
    assert registry.select("nmf_mu", "cuda").backend in ("triton", "reference")


def test_backend_that_does_not_serve_the_device_is_refused(fake_kernels):
    with pytest.raises(ValueError, match="does not run on cpu tensors"):
        registry.select("nmf_mu", "cpu", "cuda")


def test_unknown_and_unregistered_backends(fake_kernels):
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        registry.select("nmf_mu", "cpu", "fastest")
    fake_kernels.pop(("nmf_mu", "cuda"))
    with pytest.raises(RuntimeError, match="has no cuda kernel for nmf_mu"):
        registry.select("nmf_mu", "cuda", "cuda")


def test_environment_override(fake_kernels, monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, "reference")
    assert registry.select("masked_sgd_step", "cpu").backend == "reference"
    assert registry.select("nmf_mu", "cpu").backend == "reference"
    # per op; an explicit argument beats the environment
    monkeypatch.setenv(registry.ENV_VAR, "nmf_mu=reference")
    assert registry.requested_from_env("masked_sgd_step") is None
    assert registry.select("nmf_mu", "cpu").backend == "reference"
    # an environment request that cannot be met is as loud as an argument
    monkeypatch.setenv(registry.ENV_VAR, "masked_sgd_step=triton")
    with pytest.raises(RuntimeError, match=f"{registry.ENV_VAR}='triton'.*HINT"):
        registry.select("masked_sgd_step", "cpu")
    monkeypatch.setenv(registry.ENV_VAR, "nmf_mu=warp")
    with pytest.raises(ValueError, match=f"{registry.ENV_VAR} \\(for nmf_mu\\)"):
        registry.select("nmf_mu", "cpu")


def test_backend_argument_reaches_the_kernel(monkeypatch):
    """nmf_batched(backend=...) and FusedMaskedSGD(backend=...) run the kernel they name."""
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    calls = []
    for op in registry.OPS:
        kernel = registry.get(op, "reference")

        def spy(*args, _fn=kernel.fn, _op=op):
            calls.append(_op)
            return _fn(*args)

        monkeypatch.setitem(
            registry._KERNELS, (op, "reference"), registry.Kernel(**{**kernel.__dict__, "fn": spy})
        )
    ong_kernels.nmf_batched([torch.rand(4, 5)], 2, max_iter=2, backend="reference")
    p = torch.nn.Parameter(torch.randn(3))
    opt = ong_kernels.FusedMaskedSGD([p], lr=0.1, backend="reference")
    p.grad = torch.randn(3)
    opt.step()
    assert calls == ["nmf_mu", "masked_sgd_step"]


def test_public_entry_points_refuse_unrunnable_backends_before_any_work(fake_kernels):
    v = torch.rand(4, 5)
    with pytest.raises(ValueError, match="does not run on cpu tensors"):
        ong_kernels.nmf_batched([v], 2, backend="cuda")
    with pytest.raises(ValueError, match="backend must be"):
        ong_kernels.FusedMaskedSGD([torch.nn.Parameter(torch.randn(3))], lr=0.1, backend="gpu")


def test_backends_available_reads_the_registry(fake_kernels):
    available = ong_kernels.backends_available()
    assert set(available) == set(registry.BACKENDS)
    assert available["reference"] is True
    assert available["cpu"] == _native.has_cpu()
    assert ong_kernels.backends_available("nmf_mu")["cuda"] is False


def test_missing_cuda_build_says_how_to_build(monkeypatch):
    """Whatever this build has: a module without CUDA kernels gives the rebuild hint."""

    class CpuOnlyModule:
        with_cuda = False

    monkeypatch.setattr(_native, "_C", CpuOnlyModule())
    assert not _native.has_cuda_build() and not _native.has_cuda()
    with pytest.raises(RuntimeError, match="rebuild on a machine with nvcc"):
        _native.cuda_lib()
    monkeypatch.setattr(_native, "_C", None)
    with pytest.raises(RuntimeError, match=r"pip install -e \."):
        _native.lib()
