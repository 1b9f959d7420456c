"""The sparsifier seam and the methods that act during training: GMP, BIMP, GSM, LC and
BIMP's final cut. Schedules are written out by hand here, not recomputed from the code."""

import math

import pytest
import torch
from conftest import SEAM_RUN, assert_one_line_cli_error, train_until_killed

from ong_kernels import FusedMaskedSGD
from ong_kernels.pruning import methods as M
from ong_kernels.pruning.allocation import kept_counts
from ong_kernels.train.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from ong_kernels.train.cli import train_main
from ong_kernels.train.config import TrainConfig
from ong_kernels.train.data import make_synthetic
from ong_kernels.train.sparsifiers import top_keep
from ong_kernels.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = make_synthetic(160, 64, channels=3, size=8, seed=0)
SMALL = SEAM_RUN


def make_config(tmp_path=None, name="run", **changes):
    values = {**SMALL, **changes}
    if tmp_path is not None:
        values["run_dir"] = str(tmp_path / name)
    return TrainConfig(**values)


def weights_and_momentum(trainer):
    state = {f"model.{k}": v.clone() for k, v in trainer.model.state_dict().items()}
    for i in range(len(list(trainer.model.parameters()))):
        for key, value in trainer.optimizer.state_dict()["state"].get(i, {}).items():
            if isinstance(value, torch.Tensor):
                state[f"opt.{i}.{key}"] = value.clone()
    return state


def assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------- schedules


def assert_plan(got, want):
    assert [e for e, _ in got] == [e for e, _ in want]
    assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-12)


def test_gmp_cut_epochs_and_sparsities_follow_the_cubic_schedule():
    # n = epochs // interval - 1 cuts at t * interval, s_f (1 - (1 - t/n)^3).
    assert_plan(
        M.gmp_plan(4, 1, 0.9),
        [(1, 0.9 * (1 - (2 / 3) ** 3)), (2, 0.9 * (1 - (1 / 3) ** 3)), (3, 0.9)],
    )
    assert_plan(
        M.gmp_plan(10, 2, 0.5),
        [(2, 0.5 * (1 - 0.75**3)), (4, 0.5 * (1 - 0.5**3)), (6, 0.5 * (1 - 0.25**3)), (8, 0.5)],
    )
    assert M.gmp_plan(2, 1, 0.98) == [(1, 0.98)]
    assert M.gmp_plan(7, 3, 0.9) == [(3, 0.9)]  # 7 // 3 - 1 = 1 cut
    with pytest.raises(ValueError, match="pruning_interval"):
        M.gmp_plan(3, 2, 0.9)


def test_bimp_cut_epochs_and_sparsities():
    # n = (epochs - budget) // interval cuts at budget + t * interval to 1 - (1-s)^((t+1)/n)
    assert_plan(
        M.bimp_plan(6, 2, 1, 0.9),
        [(2, 1 - 0.1**0.25), (3, 1 - 0.1**0.5), (4, 1 - 0.1**0.75), (5, 0.9)],
    )
    assert_plan(M.bimp_plan(10, None, 2, 0.75), [(5, 0.5), (7, 0.75)])
    with pytest.raises(ValueError, match="train_budget"):
        M.bimp_plan(4, 4, 1, 0.9)
    with pytest.raises(ValueError, match="pruning_interval"):
        M.bimp_plan(4, 2, 3, 0.9)


def test_imp_phases_counts():
    assert M.imp_phase_sparsities(0.9, 1) == [0.9]
    assert M.imp_phase_sparsities(0.75, 2) == pytest.approx([0.5, 0.75])
    n = 1000
    counts = [M.goal_count(s, n) for s in M.imp_phase_sparsities(0.875, 3)]
    assert counts == [500, 750, 875]


# ----------------------------------------------------------------------------- selection


def sort_oracle(scores, sparsity):
    """Keep the N - round(s N) highest of the concatenation, ties by position (stable)."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    n = flat.numel()
    k = n - round(sparsity * n)
    order = sorted(range(n), key=lambda i: (-float(flat[i]), i))
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[:k]] = True
    return [
        part.view(s.shape)
        for part, s in zip(keep.split([s.numel() for s in scores]), scores, strict=False)
    ]


@pytest.mark.parametrize("seed", range(4))
def test_global_top_k_equals_a_sort_oracle_with_ties_by_position(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 5), (7,), (2, 3, 3), (1, 1)]
    # Few distinct values: many ties, across layers too.
    scores = [torch.randint(0, 4, s, generator=g).float() / 4 for s in shapes]
    scores[1][2] = -math.inf
    for sparsity in (0.1, 0.37, 0.5, 0.9):
        got = top_keep(scores, sparsity, floor=False)
        want = sort_oracle(scores, sparsity)
        for a, b in zip(got, want, strict=False):
            assert torch.equal(a, b), sparsity


# ----------------------------------------------------------------------------- GSM and LC


class _Host:
    """The part of the trainer a GSM/LC hook reads."""

    def __init__(self, params, sparsity, wd):
        self.targets = [(f"p{i}", p) for i, p in enumerate(params)]
        self.config = make_config(method="gsm", sparsity=sparsity, weight_decay=wd, epochs=2)


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((4, 6), (10,), (3, 3))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    return params


def test_gsm_moves_only_the_top_k_by_their_gradient_and_the_rest_by_decay_alone():
    from ong_kernels.train.sparsifiers import Gsm

    params = _params(0)
    lr, wd, s = 0.1, 0.01, 0.75
    w0 = [p.detach().clone() for p in params]
    g0 = [p.grad.clone() for p in params]
    keep = sort_oracle([(w * g).abs() for w, g in zip(w0, g0, strict=False)], s)
    Gsm(_Host(params, s, wd), None).after_backward()
    FusedMaskedSGD(params, lr=lr, weight_decay=wd).step()
    for p, w, g, k in zip(params, w0, g0, keep, strict=False):
        moved = w - lr * (g + wd * w)
        decayed = w - lr * wd * w
        assert torch.allclose(p[k], moved[k], rtol=0, atol=1e-7)
        assert torch.allclose(p[~k], decayed[~k], rtol=0, atol=1e-7)
    assert sum(int(k.sum()) for k in keep) == 43 - round(0.75 * 43)  # 24 + 10 + 9 weights


def test_lc_decays_only_outside_the_top_k_by_magnitude():
    from ong_kernels.train.sparsifiers import Lc

    params = _params(1)
    lr, wd, s = 0.1, 0.05, 0.6
    w0 = [p.detach().clone() for p in params]
    g0 = [p.grad.clone() for p in params]
    keep = sort_oracle([w.abs() for w in w0], s)
    Lc(_Host(params, s, wd), None).after_backward()
    FusedMaskedSGD(params, lr=lr, weight_decay=wd).step()
    for p, w, g, k in zip(params, w0, g0, keep, strict=False):
        assert torch.allclose(p[k], (w - lr * g)[k], rtol=0, atol=1e-6)
        assert torch.allclose(p[~k], (w - lr * (g + wd * w))[~k], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- runs


def _record_masks(store):
    def callback(trainer, epoch, metrics):
        store[epoch] = {n: m.clone() for n, m in trainer.masks.items()}
        params = dict(trainer.model.named_parameters())
        opt = trainer.optimizer.state_dict()["state"]
        index = {id(p): i for i, p in enumerate(trainer.model.parameters())}
        for name, mask in trainer.masks.items():
            p = params[name]
            assert (p[~mask] == 0).all(), (epoch, name)
            buf = opt.get(index[id(p)], {}).get("momentum_buffer")
            if buf is not None:
                assert (buf[~mask] == 0).all(), (epoch, name)

    return callback


@pytest.mark.parametrize("compact", [False, True])
def test_gmp_counts_after_every_cut_and_pruned_weights_and_momentum_stay_zero(compact):
    class CompactTrainer(Trainer):
        def _make_optimizer(self):
            opt = super()._make_optimizer()
            return FusedMaskedSGD(
                self.model.parameters(), lr=opt.defaults["lr"], momentum=0.9, nesterov=True,
                weight_decay=opt.defaults["weight_decay"], compact_state=True,
                masks=opt.masks,
            )  # fmt: skip

    masks = {}
    cls = CompactTrainer if compact else Trainer
    trainer = cls(
        make_config(method="gmp"), dataset=DATA, callbacks=[_record_masks(masks)], log=None
    )
    results = trainer.fit()
    n = trainer.masked_total
    plan = dict(M.gmp_plan(4, 1, 0.9))
    for epoch in (1, 2, 3, 4):
        pruned = sum(int((~m).sum()) for m in masks[epoch].values())
        assert pruned == round(plan.get(epoch, 0.9) * n), epoch
    for a, b in ((1, 2), (2, 3), (3, 4)):  # a pruned weight never comes back
        for name in masks[a]:
            assert not (masks[b][name] & ~masks[a][name]).any()
    assert [c["pruned"] for c in results["method_cuts"]] == [
        round(s * n) for _, s in M.gmp_plan(4, 1, 0.9)
    ]
    assert results["sparsity_before_cut"] == round(0.9 * n) / n
    assert results["final_cut"][0]["changed"] is False


def test_gmp_allow_recovering_keeps_exact_counts():
    masks = {}
    trainer = Trainer(
        make_config(method="gmp", method_kwargs={"allow_recovering": True}),
        dataset=DATA,
        callbacks=[_record_masks(masks)],
        log=None,
    )
    trainer.fit()
    n = trainer.masked_total
    for epoch, s in M.gmp_plan(4, 1, 0.9):
        assert sum(int((~m).sum()) for m in masks[epoch].values()) == round(s * n)


@pytest.mark.parametrize("scope", ["layer", "erk"])
@pytest.mark.parametrize("method", ["gmp", "bimp", "dnw", "dpf"])
def test_magnitude_cut_methods_follow_the_scope_per_layer(method, scope):
    """Every cut, and the run's end, holds the scope's per-layer counts (kept_counts)."""
    masks = {}
    kwargs = {"train_budget": 1} if method == "bimp" else {}
    cfg = make_config(method=method, scope=scope, method_kwargs=kwargs)
    trainer = Trainer(cfg, dataset=DATA, callbacks=[_record_masks(masks)], log=None)
    results = trainer.fit()  # checks exact zeros against the masks after every epoch
    shapes = [tuple(p.shape) for _, p in trainer.targets]
    floor = 0.0 if method == "dnw" else None
    want = kept_counts(shapes, 0.9, scope, floor)
    final = masks[cfg.epochs]
    assert [int(m.sum()) for m in final.values()] == want
    assert results["pruned_weights"] == sum(math.prod(s) for s in shapes) - sum(want)
    for c in results["method_cuts"]:
        if "sparsity" in c and method in ("gmp", "bimp"):
            assert c["pruned"] == sum(math.prod(s) for s in shapes) - sum(
                kept_counts(shapes, c["sparsity"], scope, None)
            )


def test_bimp_lr_per_iteration_follows_the_budgeted_cyclic_schedule():
    # 6 epochs x 5 steps, budget 2, interval 1: linear 1 -> 0 over steps 0-9, then cycles
    # over epochs [2,3), [3,4), [4,5), [5,6): 5 steps each, rise 1 step (10% of 5 -> 1):
    # 0, then 1, 0.75, 0.5, 0.25.
    lrs = []

    class Spy(Trainer):
        def _build_optimizer_and_schedule(self):
            super()._build_optimizer_and_schedule()
            self.optimizer.register_step_pre_hook(
                lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"])
            )

    cfg = make_config(method="bimp", epochs=6, lr=0.1, method_kwargs={"train_budget": 2})
    results = Spy(cfg, dataset=DATA, log=None).fit()
    budget = [0.1 * (1 - i / 10) for i in range(10)]
    cycle = [0.0, 0.1, 0.075, 0.05, 0.025]
    assert lrs == pytest.approx(budget + cycle * 4, abs=1e-12)
    n = results["prunable_weights"]
    assert [c["pruned"] for c in results["method_cuts"]] == [
        round((1 - 0.1 ** ((t + 1) / 4)) * n) for t in range(4)
    ]
    assert [c["epoch"] for c in results["method_cuts"]] == [2, 3, 4, 5]


def test_bimp_allr_scales_the_last_cycle():
    cfg = make_config(method="bimp", epochs=4, method_kwargs={"train_budget": 2, "allr": True})
    trainer = Trainer(cfg, dataset=DATA, log=None)
    results = trainer.fit()
    last = results["method_cuts"][-1]
    d, p = last["norm_drop"], last["fraction_cut"]
    floor = min((4 - 3) / 2, 1.0)
    assert last["peak_lr_factor"] == min(max(d / math.sqrt(p), floor), 1.0)
    assert trainer.schedule.cycles[-1][3] == last["peak_lr_factor"]


def test_gsm_and_lc_end_exactly_sparse_through_the_final_cut_with_retraining():
    for method in ("gsm", "lc"):
        cfg = make_config(method=method, epochs=2, retrain_epochs=1, cut_phases=2)
        trainer = Trainer(cfg, dataset=DATA, log=None)
        results = trainer.fit()
        n = trainer.masked_total
        assert results["epochs_completed"] == results["budget_epochs"] == 4
        assert [c["pruned"] for c in results["final_cut"]] == [
            round(s * n) for s in M.imp_phase_sparsities(0.9, 2)
        ]
        assert results["measured_sparsity"] == round(0.9 * n) / n
        assert results["sparsity_before_cut"] < 0.01  # dense until the cut
        assert results["test_acc_after_cut"] is not None


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_one_shot_final_cut_is_a_no_op(scope):
    # Per-layer rounding leaves a layer-scope mask a few weights off round(s N): the cut
    # must keep the method's own masks all the same.
    config = make_config(method="magnitude", epochs=1, scope=scope, retrain_epochs=1)
    trainer = Trainer(config, dataset=DATA, log=None)
    trainer.setup()
    masks = {n: m.clone() for n, m in trainer.masks.items()}
    results = trainer.fit()
    assert all(torch.equal(masks[n], trainer.masks[n]) for n in masks)
    cut = results["final_cut"][0]
    assert cut["changed"] is False
    assert cut["test_acc_before"] == cut["test_acc_after"] == trainer.history[0]["test_acc"]
    assert results["epochs_completed"] == results["budget_epochs"] == 2


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize(
    "method,kwargs,kill_at",
    [
        ("gmp", {}, 2),  # between two cuts
        ("bimp", {"train_budget": 2}, 3),  # between two cuts, mid-cycle
        ("gsm", {}, 1),  # during GSM
    ],
)
def test_resume_after_sigkill_is_bit_identical(tmp_path, method, kwargs, kill_at):
    cfg = make_config(tmp_path, method=method, method_kwargs=kwargs, retrain_epochs=1)
    reference = Trainer(
        make_config(method=method, method_kwargs=kwargs, retrain_epochs=1), dataset=DATA, log=None
    )
    ref_results = reference.fit()
    train_until_killed(cfg, kill_at)
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)["epoch"] == kill_at
    resumed = Trainer(cfg, dataset=DATA, resume=True, log=None)
    results = resumed.fit()
    assert_bit_identical(weights_and_momentum(resumed), weights_and_momentum(reference))
    assert [r["test_acc"] for r in resumed.history] == [r["test_acc"] for r in reference.history]
    assert results["method_cuts"] == ref_results["method_cuts"]
    assert results["final_cut"] == ref_results["final_cut"]


def test_changed_method_setting_is_refused_on_resume(tmp_path):
    cfg = make_config(tmp_path, method="gmp", epochs=2)

    def stop(trainer, epoch, metrics):
        from ong_kernels.train.trainer import StopTraining

        raise StopTraining

    Trainer(cfg, dataset=DATA, callbacks=[stop], log=None).fit()
    changed = cfg.replace(method_kwargs={"allow_recovering": True})
    with pytest.raises(CheckpointError, match="method_kwargs"):
        Trainer(changed, dataset=DATA, resume=True, log=None)
    with pytest.raises(ValueError, match="epochs: a gmp run cannot change its length"):
        Trainer(cfg.replace(epochs=4), dataset=DATA, resume=True, log=None)


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--method", "gmp", "--pruning-interval", "0"], "pruning_interval: expected an int >= 1"),
        (["--method", "gmp", "--epochs", "3", "--pruning-interval", "2"], "pruning_interval"),
        (["--method", "ong", "--pruning-interval", "2"], "--pruning-interval: method 'ong'"),
        (["--method", "bimp", "--train-budget", "0"], "train_budget: expected"),
        (["--method", "gmp", "--method-kwargs", '{"rank": 8}'], "has no setting 'rank'"),
        (["--method", "gsm", "--retrain-epochs", "-1"], "retrain_epochs"),
        (["--method", "gsm", "--cut-phases", "0"], "cut_phases"),
        (["--method", "gsm", "--cut-phases", "2"], "cut_phases"),
        (["--method", "gsm", "--retrain-schedule", "cosine"], "retrain-schedule"),
        (["--method", "gsm", "--scope", "layer"], "scope: method 'gsm' ranks every"),
        (["--method", "lc", "--scope", "erk"], "scope: method 'lc' ranks every"),
    ],
)
def test_bad_method_options_are_one_line_errors_before_any_work(tmp_path, capsys, argv, message):
    argv = [*argv, "--run-dir", str(tmp_path / "r"), "--dataset", "synthetic"]
    assert_one_line_cli_error(lambda: train_main(argv), tmp_path / "r", capsys, message)


def test_generated_options_set_method_kwargs(tmp_path):
    from ong_kernels.train.cli import build_sweep_parser, build_train_parser

    ns = build_train_parser().parse_args(
        ["--method", "gmp", "--pruning-interval", "2", "--allow-recovering"]
    )
    assert vars(ns)["setting__pruning_interval"] == 2
    assert vars(ns)["setting__allow_recovering"] is True
    help_text = build_sweep_parser().format_help()
    for name in ("--train-budget", "--allr", "--pruning-interval", "--allow-recovering"):
        assert name in help_text


def test_every_setting_is_documented_with_a_source():
    for name in M.METHODS:
        s = M.spec(name)
        if s.settings is None:
            continue
        for f in __import__("dataclasses").fields(s.settings):
            meta = f.metadata["setting"]
            assert meta.help and meta.source, (name, f.name)
        s.settings()  # the defaults are valid


def test_sweep_gives_each_method_the_settings_it_takes():
    from ong_kernels.train.sweep import plan_runs

    base = make_config(method="dense")
    configs = plan_runs(
        base, ["ong", "gmp", "bimp"], [0.9], [0], {"pruning_interval": 1, "rank": 4}
    )
    kwargs = {c.method: c.method_kwargs for c in configs}
    assert kwargs == {
        "ong": {"rank": 4},
        "gmp": {"pruning_interval": 1},
        "bimp": {"pruning_interval": 1},
    }
    with pytest.raises(
        ValueError, match="no method of ong, magnitude has the setting 'pruning_interval'"
    ):
        plan_runs(base, ["ong", "magnitude"], [0.9], [0], {"pruning_interval": 1})


def test_sweep_runs_the_stable_methods_reuses_them_and_refuses_changed_settings(tmp_path, capsys):
    from ong_kernels.train.cli import sweep_main

    out = tmp_path / "sweep"
    args = [
        "--dataset", "synthetic", "--synthetic-shape", "96", "40", "1", "8", "--width", "0.25",
        "--batch-size", "32", "--eval-batch-size", "40", "--device", "cpu", "--no-progress",
        "--epochs", "2", "--methods", "magnitude", "gmp", "bimp", "gsm", "--sparsities", "0.9",
        "--pruning-interval", "1", "--out-dir", str(out),
    ]  # fmt: skip
    assert sweep_main(args) == 0
    printed = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in printed.splitlines() if "| " in line}
    assert {"magnitude", "gmp", "bimp", "gsm"} <= set(rows)
    assert "sparsity before final cut" in rows["method"] and "| epochs" in rows["method"]
    assert "| 0.9000 " in rows["gmp"]  # measured sparsity: exact
    gmp = __import__("json").loads(
        (out / "resnet20-synthetic-gmp-0.9-seed0/results.json").read_text()
    )
    assert gmp["config"]["method_kwargs"] == {"pruning_interval": 1}
    assert sweep_main(args) == 0  # everything reused
    assert printed.count("reusing") == 0 and capsys.readouterr().out.count("reusing") == 4
    assert sweep_main([*args, "--allow-recovering"]) == 2
    assert "method_kwargs" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["magnitude", "snip"])
def test_one_shot_methods_train_through_the_seam_as_the_plain_loop(method):
    # The loop before the seam, written out: prune, then per step draw, forward, backward,
    # FusedMaskedSGD step, scheduler step. The seam's run must end bit-identical.
    import torch.nn.functional as F

    from ong_kernels.train import augment

    cfg = make_config(method=method, epochs=2, warmup_epochs=1)
    plain = Trainer(cfg, dataset=DATA, log=None)
    plain.setup()
    data, gen, bsz = plain.data, plain.generator, cfg.batch_size
    for _ in range(cfg.epochs):
        plain.model.train()
        order = torch.randperm(len(data.train_y), generator=gen)
        for step in range(plain.steps_per_epoch):
            idx = order[step * bsz : (step + 1) * bsz]
            params = augment.draw_params(bsz, data.crop_padding, data.flip, gen, plain.device)
            x = plain._normalize(augment.apply(data.train_x[idx], params, data.crop_padding))
            loss = F.cross_entropy(plain.model(x), data.train_y[idx])
            plain.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            plain.optimizer.step()
            plain.scheduler.step()
        plain.evaluate()
    seam = Trainer(cfg, dataset=DATA, log=None)
    seam.fit()
    assert_bit_identical(weights_and_momentum(seam), weights_and_momentum(plain))


@pytest.mark.parametrize("nesterov,momentum", [(True, 0.9), (False, 0.9), (False, 0.0)])
def test_gmp_recovering_decay_equals_sgd_with_zero_gradient(nesterov, momentum):
    # allow_recovering evolves pruned weights as SGD with zero loss gradient would, through
    # one 2x2 transfer matrix: compare with torch.optim.SGD over steps of changing lr.
    from types import SimpleNamespace

    from ong_kernels.train.sparsifiers import Gmp

    w = torch.nn.Parameter(torch.randn(50, generator=torch.Generator().manual_seed(0)))
    w0 = w.detach().clone()
    wd = 5e-3
    sgd = torch.optim.SGD([w], lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    gmp = Gmp.__new__(Gmp)
    gmp.recovering, gmp.transfer = True, [1.0, 0.0, 0.0, 1.0]
    config = SimpleNamespace(weight_decay=wd, momentum=momentum, nesterov=nesterov)
    gmp.host = SimpleNamespace(config=config, optimizer=sgd)
    for lr in (0.1, 0.3, 0.05, 0.2, 0.2, 0.01):
        sgd.param_groups[0]["lr"] = lr
        w.grad = torch.zeros_like(w)
        sgd.step()
        gmp.after_step()
    t0, t1 = gmp.transfer[0], gmp.transfer[1]
    assert t1 != 0 or momentum == 0
    # Momentum starts at 0 at a cut (BIMP's prune_momentum), so w = t0 * w0.
    assert torch.allclose(w.detach().double(), w0.double() * t0, rtol=1e-6, atol=0)
