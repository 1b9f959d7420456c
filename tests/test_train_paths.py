"""The trainer's CPU paths that CUDA turns on by default: bf16 autocast, channels_last, and
torch.compile (here on CPU, so CI exercises them without a GPU)."""

import pytest
import torch

from ong_kernels.train.config import TrainConfig
from ong_kernels.train.data import make_synthetic
from ong_kernels.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: why


DATA = make_synthetic(96, 40, channels=3, size=8, seed=0)
TINY = dict(model="resnet20", dataset="synthetic", width=0.25, epochs=1, batch_size=32,
            eval_batch_size=40, lr=0.05, method="magnitude", sparsity=0.8, progress=False,
            device="cpu")  # fmt: skip


def fit(**changes):
    trainer = Trainer(TrainConfig(**{**TINY, **changes}), dataset=DATA, log=None)
    return trainer, trainer.fit()


@pytest.mark.parametrize(("amp", "channels_last"), [("bf16", "off"), ("off", "on"), ("bf16", "on")])
def test_bf16_autocast_and_channels_last_on_cpu(amp, channels_last):
    trainer, results = fit(amp=amp, channels_last=channels_last)
    assert results["amp_bf16"] is (amp == "bf16")
    assert results["channels_last"] is (channels_last == "on")
    assert torch.isfinite(torch.tensor(results["final"]["train_loss"]))
    # Exact sparsity survives both paths (checked every epoch too: SparsityError otherwise).
    assert results["measured_sparsity"] == pytest.approx(0.8, abs=1e-3)
    conv = trainer.model.conv1.weight
    if channels_last == "on":
        assert conv.is_contiguous(memory_format=torch.channels_last)
    # The same run in fp32 / contiguous lands near it: the paths compute the same model.
    _, reference = fit()
    assert abs(results["final"]["train_loss"] - reference["final"]["train_loss"]) < 0.5


def test_trainer_compile_path_on_cpu_matches_eager(monkeypatch):
    # The trainer's --compile path (dynamo + AOTAutograd over ResNet-20's forward and
    # backward). aot_eager skips inductor's C++ codegen, which took 77 s here for this
    # model; the inductor test below compiles a small step instead.
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend="aot_eager"))
    eager, eager_results = fit()
    compiled, compiled_results = fit(compile=True)
    assert compiled.train_model is not compiled.model  # the compiled wrapper trained
    assert compiled_results["measured_sparsity"] == eager_results["measured_sparsity"]
    for (name, a), b in zip(eager.model.state_dict().items(), compiled.model.state_dict().values(),
                            strict=True):  # fmt: skip
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=name)


def test_inductor_compiled_masked_training_step_on_cpu():
    # One whole step - forward, loss, backward, FusedMaskedSGD's fused op - compiled by
    # inductor on CPU, against the same step run eagerly.
    from torch import nn

    from ong_kernels import FusedMaskedSGD

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 6 * 6, 7))
        masks = {p: torch.rand(p.shape) > 0.7 for p in model.parameters() if p.dim() > 1}
        opt = FusedMaskedSGD(model.parameters(), lr=0.05, momentum=0.9, masks=masks)
        return model, opt, masks

    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 7, (4,))

    def step(model, opt):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    model_e, opt_e, _ = make()
    model_c, opt_c, masks = make()
    compiled = torch.compile(step)
    for _ in range(3):
        le, lc = step(model_e, opt_e), compiled(model_c, opt_c)
        torch.testing.assert_close(lc, le, rtol=1e-4, atol=1e-5)
    for p_e, p_c in zip(model_e.parameters(), model_c.parameters(), strict=True):
        torch.testing.assert_close(p_c, p_e, rtol=1e-4, atol=1e-5)
        if p_c in masks:
            assert not p_c[~masks[p_c]].any()  # pruned weights stay exactly 0
