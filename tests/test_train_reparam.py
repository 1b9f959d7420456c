"""The reparametrisation methods DNW, DPF, STR, CS and DST (ong_kernels.train.reparam):
formulas written out here, not taken from the code."""

import math
import textwrap
from types import SimpleNamespace

import pytest
import torch
from conftest import SEAM_RUN, assert_one_line_cli_error, run_two_gloo_ranks, train_until_killed

from ong_kernels.pruning import methods as M
from ong_kernels.pruning.allocation import kept_counts, pruned_total
from ong_kernels.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from ong_kernels.train.cli import train_main
from ong_kernels.train.config import TrainConfig
from ong_kernels.train.data import make_synthetic
from ong_kernels.train.reparam import CLASSES, binary_step, boundary_shift, cs_beta
from ong_kernels.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = make_synthetic(160, 64, channels=3, size=8, seed=0)
SMALL = SEAM_RUN
REPARAM = ("dnw", "dpf", "str", "cs", "dst")


def make_config(tmp_path=None, name="run", **changes):
    values = {**SMALL, **changes}
    if tmp_path is not None:
        values["run_dir"] = str(tmp_path / name)
    return TrainConfig(**values)


class _Host:
    """The part of the trainer a reparametrisation reads, over a few loose tensors."""

    def __init__(self, method, shapes=((4, 3, 3, 3), (6, 4), (5,)), seed=0, **settings):
        g = torch.Generator().manual_seed(seed)
        self.params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.5) for s in shapes]
        self.targets = [(f"p{i}", p) for i, p in enumerate(self.params)]
        self.masked_total = sum(p.numel() for p in self.params)
        self.sizes = torch.tensor([p.numel() for p in self.params])
        self.config = make_config(method=method, method_kwargs=settings)
        self.steps_per_epoch = 5
        self.device = torch.device("cpu")
        self.optimizer = SimpleNamespace(param_groups=[{"lr": 0.05}])
        self.sparsifier = CLASSES[method](self, M.resolve_settings(method, settings))
        self.sparsifier._start()


def _randomise_theta(sp, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in sp.theta.values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.3)


def sort_top_k(ws, sparsity):
    flat = torch.cat([w.abs().reshape(-1) for w in ws])
    n = flat.numel()
    order = sorted(range(n), key=lambda i: (-float(flat[i]), i))
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[: n - round(sparsity * n)]] = True
    return [k.view(w.shape) for k, w in zip(keep.split([w.numel() for w in ws]), ws, strict=True)]


# ----------------------------------------------------------------------------- formulas


def test_dnw_forward_uses_the_global_top_k_and_the_gradient_goes_straight_through():
    host = _Host("dnw")
    sp = host.sparsifier
    w0 = [p.detach().clone() for p in host.params]
    keep = sort_top_k(w0, 0.9)
    sp.before_forward()
    for p, w, k in zip(host.params, w0, keep, strict=True):
        assert torch.equal(p.detach(), w * k)
    g = [torch.randn(p.shape) for p in host.params]
    for p, gi in zip(host.params, g, strict=True):
        p.grad = gi.clone()
    sp.after_backward()
    for p, w, gi in zip(host.params, w0, g, strict=True):
        assert torch.equal(p.detach(), w)  # dense weights back
        assert torch.equal(p.grad, gi)  # straight through, pruned weights too


def per_layer_top_k(ws, counts):
    """Each layer's ``counts[i]`` largest |w| (ties by position), by a sort."""
    return [sort_top_k([w], 1 - c / w.numel())[0] for w, c in zip(ws, counts, strict=True)]


@pytest.mark.parametrize("scope", ["layer", "erk"])
def test_dnw_forward_follows_a_per_layer_scope(scope):
    host = _Host("dnw", shapes=((8, 3, 3, 3), (16, 8), (40,)))
    host.config = host.config.replace(scope=scope)
    sp = host.sparsifier
    w0 = [p.detach().clone() for p in host.params]
    numels = [w.numel() for w in w0]
    if scope == "layer":
        counts = [n - round(0.9 * n) for n in numels]
    else:  # ERK's counts (allocation.kept_counts, tested against RigL's definition)
        counts = kept_counts([tuple(w.shape) for w in w0], 0.9, "erk", 0.0)
        assert counts != [n - round(0.9 * n) for n in numels]  # not the layer split
    assert sum(numels) - sum(counts) == pruned_total([w.shape for w in w0], 0.9, scope, 0.0)
    sp.before_forward()
    for p, w, k in zip(host.params, w0, per_layer_top_k(w0, counts), strict=True):
        assert torch.equal(p.detach(), w * k)


def test_str_cs_dst_forward_against_direct_formulas():
    s = _Host("str", seed=2).sparsifier
    _randomise_theta(s)
    for name, p in s.host.targets:
        w, th = p.detach(), s.theta[name].detach()
        want = torch.sign(w) * torch.clamp(w.abs() - 1 / (1 + torch.exp(-th)), min=0)
        assert torch.allclose(s.effective(name, w), want, rtol=0, atol=1e-7)
    c = _Host("cs", seed=3, mask_initial=-0.1, beta_final=50.0).sparsifier
    _randomise_theta(c)
    c.iteration = 7  # of T = 20
    beta = 50.0 ** (7 / 20)
    for name, p in c.host.targets:
        w, m = p.detach(), c.theta[name].detach()
        want = w / (1 + torch.exp(-beta * m)) * (1 + math.exp(0.1))
        assert torch.allclose(c.effective(name, w), want, rtol=1e-6, atol=1e-7)
    d = _Host("dst", seed=4).sparsifier
    _randomise_theta(d)
    for name, p in d.host.targets:
        w, t = p.detach(), d.theta[name].detach()
        want = w.clone()
        for row in range(w.shape[0]):
            want[row][w[row].abs() <= t[row]] = 0
        assert torch.equal(d.effective(name, w), want)


def test_dst_surrogate_gradient_is_the_piecewise_definition():
    x = torch.tensor([-1.5, -1.0, -0.7, -0.4, -0.2, 0.0, 0.1, 0.4, 0.41, 0.9, 1.0, 1.2])
    x.requires_grad_()
    y = binary_step(x)
    assert torch.equal(y.detach(), (x.detach() > 0).float())
    y.backward(torch.full_like(x, 3.0))
    want = [0.0 if abs(v) > 1 else 0.4 if abs(v) > 0.4 else 2 - 4 * abs(v) for v in x.tolist()]
    assert torch.allclose(x.grad, 3.0 * torch.tensor(want), rtol=0, atol=1e-6)


def test_cs_beta_at_start_middle_and_end():
    assert cs_beta(200.0, 0, 20) == 1.0
    assert cs_beta(200.0, 10, 20) == pytest.approx(math.sqrt(200.0), rel=1e-12)
    assert cs_beta(200.0, 20, 20) == pytest.approx(200.0, rel=1e-12)
    c = _Host("cs").sparsifier  # 4 epochs x 5 steps
    assert c.total_iterations == 20
    for it, want in ((0, 1.0), (10, math.sqrt(200.0)), (20, 200.0)):
        c.iteration = it
        assert c.beta() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("method", ["str", "cs", "dst"])
def test_gradients_to_weights_and_thresholds_are_the_chain_rule_with_the_penalty(method):
    host = _Host(method, seed=5)
    sp = host.sparsifier
    _randomise_theta(sp, seed=6)
    sp.iteration = 3
    w0 = [p.detach().clone() for p in host.params]
    g = [torch.randn(p.shape) for p in host.params]
    # Direct: the loss sum(G * f(w, theta)) + penalty, differentiated by autograd.
    ws = [w.clone().requires_grad_() for w in w0]
    th = {n: t.detach().clone().requires_grad_() for n, t in sp.theta.items()}
    lam = M.resolve_settings(method, {}).penalty  # fixed: no controller
    loss = 0
    for (name, _), w, gi in zip(host.targets, ws, g, strict=True):
        t = th[name]
        if method == "str":
            f = torch.sign(w) * torch.relu(w.abs() - torch.sigmoid(t))
            loss = loss + 0.5 * lam * t.pow(2)
        elif method == "cs":
            beta = 200.0 ** (3 / 20)
            f = w * torch.sigmoid(beta * t) * 2.0
            loss = loss + lam * torch.sigmoid(beta * t).sum()
        else:
            f = w * binary_step(w.abs() - t.view(-1, *([1] * (w.dim() - 1))))
            loss = loss + lam * torch.exp(-t).sum()
        loss = loss + (gi * f).sum()
    loss.backward()
    sp.before_forward()
    for p, gi in zip(host.params, g, strict=True):
        p.grad = gi.clone()
    sp.after_backward()
    for p, w, w_direct in zip(host.params, w0, ws, strict=True):
        assert torch.equal(p.detach(), w)
        assert torch.allclose(p.grad, w_direct.grad, rtol=1e-6, atol=1e-7)
    for name, t in sp.theta.items():
        assert torch.allclose(t.grad, th[name].grad, rtol=1e-5, atol=1e-8)


def _margins(sp):
    ws = sp.weights()
    pairs = zip(sp.names, ws, strict=True)
    return torch.cat([sp.margin(n, w.double()).double().reshape(-1) for n, w in pairs])


def test_boundary_shift_is_the_midpoint_and_prunes_ties_together():
    m = torch.tensor([0.5, -1.0, 0.25, 0.25, 2.0, 0.25, -3.0], dtype=torch.float64)
    # sorted: -3, -1, .25, .25, .25, .5, 2
    assert float(boundary_shift(m, 2)) == pytest.approx((-1.0 + 0.25) / 2)
    assert float(boundary_shift(m, 3)) == pytest.approx((0.25 + 0.5) / 2)  # 5 pruned: a tie
    assert float(boundary_shift(m, 5)) == pytest.approx((0.25 + 0.5) / 2)
    assert int((m <= boundary_shift(m, 0)).sum()) == 0
    assert int((m <= boundary_shift(m, 7)).sum()) == 7


@pytest.mark.parametrize("method", ["str", "cs", "dst"])
def test_projection_prunes_round_target_n_of_the_methods_own_mask(method):
    host = _Host(method, seed=7)
    sp = host.sparsifier
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():  # weights, logits and thresholds on coarse grids: many ties
        for p in host.params:
            p.copy_(torch.randint(-8, 9, p.shape, generator=g).float() / 16)
            if method == "str":  # a threshold in (0, 1) always prunes w = 0: none here
                p.copy_(torch.where(p == 0, 1 / 16, p))
        for t in sp.theta.values():
            if method == "cs":
                t.copy_(torch.randint(-4, 5, t.shape, generator=g).float() / 8)
            elif method == "str":
                t.copy_(torch.randint(-40, -10, t.shape, generator=g).float() / 10)
            else:
                t.copy_(torch.randint(0, 5, t.shape, generator=g).float() / 16)
    n = host.masked_total
    exact = tied = 0
    for target in (0.0, 0.05, 0.2, 0.37, 0.5, 0.73, 0.9, 0.98, 0.5, 0.1):
        before = _margins(sp)
        k = round(target * n)
        order = before.sort().values
        # the tie rule: every margin equal to the k-th smallest is pruned with it
        want = 0 if k == 0 else int((before <= order[k - 1]).sum())
        exact, tied = exact + (want == k), tied + (want > k)
        sp.project(target)
        after = _margins(sp)
        pruned = sum(int((~m).sum()) for m in sp.masks_of(sp.weights()))
        assert pruned == want, (target, pruned, want)
        assert pruned == int((after <= 0).sum())  # the margin's sign is the mask
        # one shift for every margin (STR: of every threshold not clamped to (0, 1))
        shift = before - after
        if method == "str":
            taus = torch.cat([torch.sigmoid(t.detach()).reshape(1) for t in sp.theta.values()])
            shift = shift[torch.repeat_interleave(taus > 1e-6, host.sizes)]
        assert torch.allclose(shift, shift[:1].expand_as(shift), rtol=0, atol=1e-6)
    assert exact >= 1 and tied >= 1  # both cases were exercised


def test_dpf_mask_changes_every_16_iterations_and_not_in_between():
    used = []  # the mask each iteration's forward used
    trainer = Trainer(make_config(method="dpf", epochs=4), dataset=DATA, log=None)
    trainer.setup()
    sp = trainer.sparsifier
    oracle = {}
    forward = sp.before_forward

    def spy():
        it = sp.iteration
        forward()
        for (name, p), w in zip(trainer.targets, sp.saved, strict=True):  # masked weights
            assert torch.equal(p.detach(), w if sp.mask is None else w * sp.mask[name])
        used.append(None if sp.mask is None else {n: m.clone() for n, m in sp.mask.items()})
        if it == 16:  # recomputed from the dense weights after iteration 16
            oracle[it] = sort_top_k(sp.saved, sp.current)

    sp.before_forward = spy
    trainer.fit()
    assert len(used) == 20
    changed = [i for i in range(1, 20) if not _same(used[i], used[i - 1])]
    # GMP cuts after epochs 1, 2, 3 (iterations 5, 10, 15), the refresh after iteration 16.
    assert changed == [5, 10, 15, 16]
    assert all(torch.equal(a, b) for a, b in zip(used[16].values(), oracle[16], strict=True))


def _same(a, b):
    if a is None or b is None:
        return a is b
    return all(torch.equal(a[n], b[n]) for n in a)


# ----------------------------------------------------------------------------- runs


@pytest.mark.parametrize("method", REPARAM)
def test_folded_model_equals_the_reparametrised_forward_with_exact_zeros(method):
    trainer = Trainer(make_config(method=method, epochs=2), dataset=DATA, log=None)
    trainer.setup()
    sp = trainer.sparsifier
    x = DATA.test_x[:16].float()
    x = trainer._normalize(x.to(trainer.device))
    trainer.train_epoch(1)  # a few steps: theta and the latent weights move
    sp.epoch_end(1)  # as the trainer does (DPF cuts here)
    if method == "cs":  # its soft mask sigma(beta m) is binary only in the limit: at the
        # last beta with logits away from 0, sigma(200 m) < 4e-44 where m <= -0.5
        sp.iteration = sp.total_iterations
        with torch.no_grad():
            for m in sp.theta.values():
                m.copy_(torch.where(m > 0, m.clamp(min=0.5), m.clamp(max=-0.5)))
    sp.before_forward()  # the params now hold the reparametrised weights
    reparam = {n: p.detach().clone() for n, p in trainer.targets}
    with torch.no_grad():
        for (_, p), w in zip(trainer.targets, sp.saved, strict=True):
            p.copy_(w)
    sp.saved = None
    sp.epoch_end(2)  # export (no DPF cut after epoch 2 of 2)
    trainer.model.eval()
    folded_out = trainer.model(x)
    exported = {n: p.detach().clone() for n, p in trainer.targets}
    with torch.no_grad():
        for name, p in trainer.targets:
            p.copy_(reparam[name])
    reparam_out = trainer.model(x)
    if method == "cs":
        assert torch.allclose(folded_out, reparam_out, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(folded_out, reparam_out)
    masks = sp.masks_of([sp.latent[n] for n in sp.names])
    for name, k in zip(sp.names, masks, strict=True):
        assert (exported[name][~k] == 0).all()
        assert (exported[name][k] != 0).all()


@pytest.mark.parametrize("method", REPARAM)
def test_every_run_ends_exact_and_every_checkpoint_exports_plain_weights(tmp_path, method):
    cfg = make_config(tmp_path, method=method, retrain_epochs=1)
    zeros_per_epoch = {}

    def record(trainer, epoch, metrics):
        state = load_checkpoint(trainer.run_dir / CHECKPOINT_NAME)
        zeros_per_epoch[epoch] = sum(int((state["model"][n] == 0).sum()) for n in trainer.masks)

    trainer = Trainer(cfg, dataset=DATA, callbacks=[record], log=None)
    results = trainer.fit()
    n = trainer.masked_total
    assert results["pruned_weights"] == round(0.9 * n)
    assert results["measured_sparsity"] == round(0.9 * n) / n
    records = [c for c in results["method_cuts"] if "fold" not in c]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    for r in records[:-1]:  # the checkpoint's model holds the method's zeros, exactly
        assert zeros_per_epoch[r["epoch"]] == round(r["sparsity"] * n)
    fold = results["method_cuts"][-1]
    assert fold["fold"] is True
    assert results["sparsity_before_cut"] == fold["sparsity_reached"]
    if method in ("dnw", "dpf"):
        assert fold["sparsity_reached"] == round(0.9 * n) / n
    else:  # the projection puts every epoch's mask at its target (float32: +-1 weight)
        for r in records:
            assert abs(r["sparsity"] - round(r["target"] * n) / n) <= 1 / n, r
        assert abs(fold["sparsity_reached"] - round(0.9 * n) / n) <= 1 / n
    assert results["epochs_completed"] == 5


def _state(trainer):
    state = {f"model.{k}": v.clone() for k, v in trainer.model.state_dict().items()}
    for i, s in trainer.optimizer.state_dict()["state"].items():
        for key, value in s.items():
            if isinstance(value, torch.Tensor):
                state[f"opt.{i}.{key}"] = value.clone()
    return state


@pytest.mark.parametrize("method", REPARAM)
def test_resume_after_sigkill_is_bit_identical(tmp_path, method):
    kwargs = {"refresh_interval": 3} if method == "dpf" else {}
    cfg = make_config(tmp_path, method=method, method_kwargs=kwargs, epochs=3, retrain_epochs=1)
    reference = Trainer(cfg.replace(run_dir=None), dataset=DATA, log=None)
    ref = reference.fit()
    train_until_killed(cfg, 2)
    saved = load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)
    assert saved["epoch"] == 2 and "latent" in saved["method_state"]
    resumed = Trainer(cfg, dataset=DATA, resume=True, log=None)
    results = resumed.fit()
    a, b = _state(resumed), _state(reference)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["test_acc"] for r in resumed.history] == [r["test_acc"] for r in reference.history]
    assert results["method_cuts"] == ref["method_cuts"]
    assert results["final_cut"] == ref["final_cut"]


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--method", "cs", "--beta-final", "1"], "beta_final: expected a number > 1"),
        (["--method", "dst", "--penalty=-1e-4"], "penalty: expected a number > 0"),
        (["--method", "str", "--ramp", "0"], "ramp: expected a number in (0, 1]"),
        (["--method", "dpf", "--refresh-interval", "0"], "refresh_interval: expected an int >= 1"),
        (["--method", "dpf", "--epochs", "3", "--pruning-interval", "2"], "pruning_interval"),
        (["--method", "dnw", "--penalty", "1"], "--penalty: method 'dnw'"),
        (["--method", "str", "--method-kwargs", '{"s_initial": "x"}'], "s_initial: expected"),
        (["--method", "dst", "--method-kwargs", '{"beta_final": 2}'], "no setting 'beta_final'"),
        (["--method", "str", "--scope", "erk"], "scope: method 'str' ranks every"),
        (["--method", "cs", "--scope", "layer"], "scope: method 'cs' ranks every"),
        (["--method", "dst", "--scope", "layer"], "scope: method 'dst' ranks every"),
    ],
)
def test_bad_settings_are_one_line_errors_before_any_work(tmp_path, capsys, argv, message):
    argv = [*argv, "--run-dir", str(tmp_path / "r"), "--dataset", "synthetic"]
    assert_one_line_cli_error(lambda: train_main(argv), tmp_path / "r", capsys, message)


def test_penalty_help_gives_each_method_its_default():
    from ong_kernels.train.cli import build_train_parser

    text = " ".join(build_train_parser().format_help().split())
    assert "default: str 5e-4, cs 1e-8, dst 5e-6" in text
    for name in REPARAM:
        M.spec(name).settings()  # the defaults are valid
    assert M.resolve_settings("cs", {}).penalty == 1e-8
    assert M.resolve_settings("dst", {}).penalty == 5e-6


# ----------------------------------------------------------------------------- torchrun

DDP_WORKER = textwrap.dedent(
    """
    import os, sys, torch
    from ong_kernels.train.config import TrainConfig
    from ong_kernels.train.trainer import Trainer

    out, method = sys.argv[1], sys.argv[2]
    config = TrainConfig(
        model="resnet20", dataset="synthetic", synthetic_shape=[128, 40, 3, 8], width=0.25,
        epochs=3, batch_size=32, eval_batch_size=16, lr=0.05, method=method, sparsity=0.9,
        progress=False, device="cpu", run_dir=os.path.join(out, "run"),
    )
    trainer = Trainer(config, log=None)
    results = trainer.fit()
    torch.save(
        {"state": trainer.model.state_dict(), "masks": trainer.masks,
         "theta": {k: v.detach() for k, v in trainer.sparsifier.theta.items()},
         "cuts": results["method_cuts"], "world": results["world_size"]},
        os.path.join(out, f"rank{os.environ['RANK']}.pt"),
    )
    """
)


@pytest.mark.parametrize("method", ["dnw", "dst"])
def test_two_gloo_ranks_end_identical(tmp_path, method):
    # The swap, theta's SGD and the projection see only all-reduced gradients and identical
    # weights, so both ranks hold the same latent weights, thresholds and masks throughout.
    run_two_gloo_ranks(tmp_path, DDP_WORKER, str(tmp_path), method)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["world"] == r1["world"] == 2
    assert r0["cuts"] == r1["cuts"]
    for key in ("state", "masks", "theta"):
        assert r0[key].keys() == r1[key].keys()
        for name in r0[key]:
            assert torch.equal(r0[key][name], r1[key][name]), (key, name)
    n = sum(m.numel() for m in r0["masks"].values())
    assert sum(int((~m).sum()) for m in r0["masks"].values()) == round(0.9 * n)
