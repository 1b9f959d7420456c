"""Configuration, schedules, tables, and the ong-train / ong-sweep command lines."""

import dataclasses
import json
import math

import pytest
import torch

from ong_kernels.train import cli
from ong_kernels.train.config import PRESETS, TrainConfig, preset
from ong_kernels.train.report import format_table, mean_std
from ong_kernels.train.schedule import LRSchedule, make_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: why


TINY = [
    "--dataset", "synthetic", "--synthetic-shape", "96", "40", "1", "8", "--width", "0.25",
    "--batch-size", "32", "--eval-batch-size", "40", "--device", "cpu", "--no-progress",
]  # fmt: skip


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(model="vgg16"), "model"),
        (dict(dataset="mnist"), "dataset"),
        (dict(sparsity=1.0), "sparsity"),
        (dict(sparsity=0.0), "sparsity"),
        (dict(sparsity=float("nan")), "sparsity"),
        (dict(epochs=0), "epochs"),
        (dict(batch_size=True), "batch_size"),
        (dict(lr=-0.1), "lr"),
        (dict(momentum=0.0), "nesterov"),
        (dict(milestones=[5, 3]), "milestones"),
        (dict(milestones=[200]), "milestones"),
        (dict(warmup_epochs=200), "warmup_epochs"),
        (dict(scope="block"), "scope"),
        (dict(amp="fp16"), "amp"),
        (dict(synthetic_shape=[1, 2, 3]), "synthetic_shape"),
    ],
)
def test_config_rejects_bad_values_by_name(changes, field):
    with pytest.raises((ValueError, TypeError), match=f"^{field}:"):
        TrainConfig(**changes)


def test_subset_zero_means_all_as_in_the_main_job():
    config = TrainConfig(train_subset=0, test_subset=0)
    assert config.train_subset is None and config.test_subset is None
    with pytest.raises(ValueError, match=r"^train_subset:"):
        TrainConfig(train_subset=-1)


def test_config_round_trips_and_rejects_unknown_keys():
    config = TrainConfig(method="snip", sparsity=0.95, milestones=[3, 7], epochs=10)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match=r"unknown field.*colour"):
        TrainConfig.from_dict({"colour": "red"})
    assert TrainConfig(method="dense", sparsity=0.9).sparsity == 0.0
    assert TrainConfig(epochs=200).resolved_milestones() == [100, 150]
    assert (
        TrainConfig(method="ong", sparsity=0.95, seed=3).run_name()
        == "resnet20-fashion-mnist-ong-0.95-seed3"
    )


def test_presets_are_the_papers_settings():
    assert set(PRESETS) == {
        f"{model}-{data}"
        for model, data in [
            ("resnet56", "cifar10"),
            ("resnet18", "cifar10"),
            ("resnet34", "cifar10"),
            ("resnet18", "cifar100"),
            ("resnet34", "cifar100"),
        ]
    }
    for name in PRESETS:
        config = TrainConfig(**preset(name))
        assert (config.epochs, config.batch_size, config.lr, config.momentum) == (
            200,
            128,
            0.1,
            0.9,
        )
        assert config.nesterov
        assert config.weight_decay == (5e-4 if config.dataset == "cifar100" else 1e-4)
    with pytest.raises(ValueError, match="preset"):
        preset("resnet50-imagenet")


# ----------------------------------------------------------------------------- schedules
def test_schedules_match_their_formulas():
    total, warm = 100, 10
    cos = LRSchedule("cosine", total, warmup_steps=warm)
    lin = LRSchedule("linear", total)
    step = LRSchedule("multistep", total, milestones=[30, 60], gamma=0.2)
    for s in range(total):
        t = (s - warm) / (total - warm)
        expected = (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * t))
        assert cos(s) == pytest.approx(expected, abs=1e-12)
        assert lin(s) == pytest.approx(1 - s / total, abs=1e-12)
        assert step(s) == pytest.approx(0.2 ** ((s >= 30) + (s >= 60)), abs=1e-12)
    assert LRSchedule("constant", 5)(4) == 1.0
    with pytest.raises(ValueError, match="warmup_steps"):
        LRSchedule("cosine", 10, warmup_steps=10)


def test_scheduler_state_survives_weights_only_load(tmp_path):
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = make_scheduler(opt, "multistep", epochs=4, steps_per_epoch=3, milestones=[2], gamma=0.5)
    for _ in range(7):
        opt.step()
        sched.step()
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    opt2 = torch.optim.SGD([param], lr=0.1)
    sched2 = make_scheduler(opt2, "cosine", epochs=1, steps_per_epoch=1)
    sched2.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert sched2.get_last_lr() == sched.get_last_lr() == [0.05]
    assert sched2.lr_lambdas[0].kind == "multistep" and sched2.last_epoch == 7


# ----------------------------------------------------------------------------- tables
def test_format_table_and_mean_std():
    table = format_table(
        [{"a": 1.234, "b": "x"}, {"a": 10.0, "b": "long"}], [("a", "A"), ("b", "B")]
    )
    assert table.splitlines() == [
        "| A     | B    |",
        "|-------|------|",
        "| 1.23  | x    |",
        "| 10.00 | long |",
    ]
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_std([5.0]) == (5.0, None)  # one value has no spread


# ----------------------------------------------------------------------------- ong-train
def test_every_option_has_help():
    for parser in (cli.build_train_parser(), cli.build_sweep_parser()):
        for action in parser._actions:
            assert action.help, f"{parser.prog} {action.option_strings} has no help"
        parser.format_help()  # %-formatting in help strings must not break


# A value per option, different from the field's default, written as on a command line.
NON_DEFAULT = {
    "model": ["resnet32"], "dataset": ["synthetic"], "data_dir": ["/data"],
    "train_subset": ["100"], "test_subset": ["50"], "synthetic_shape": ["8", "4", "1", "6"],
    "width": ["0.5"], "method": ["snip"], "sparsity": ["0.8"], "scope": ["erk"],
    "prune_batches": ["3"], "method_kwargs": ['{"min_density": 0.01}'], "epochs": ["12"],
    "batch_size": ["64"], "eval_batch_size": ["100"], "lr": ["0.05"], "momentum": ["0.5"],
    "nesterov": [], "weight_decay": ["0.001"], "schedule": ["multistep"],
    "milestones": ["4", "8"], "gamma": ["0.5"], "warmup_epochs": ["1"], "seed": ["7"],
    "device": ["cpu"], "amp": ["off"], "channels_last": ["on"], "compile": [], "progress": [],
    "cut_phases": ["2"], "retrain_epochs": ["1"], "retrain_schedule": ["allr"],
}  # fmt: skip


def test_options_are_generated_from_every_config_field():
    # Every TrainConfig field but run_dir (ong-train's own --run-dir) is an option of
    # ong-train, and of ong-sweep unless swept; each parses to a value TrainConfig takes.
    fields = [f for f in dataclasses.fields(TrainConfig) if f.name != "run_dir"]
    assert {f.name for f in fields} == set(NON_DEFAULT)
    defaults = TrainConfig().to_dict()
    argv = []
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        if isinstance(defaults[f.name], bool):  # --no-X flips a True default, --X a False one
            flag = flag if not defaults[f.name] else "--no-" + flag[2:]
        argv += [flag, *NON_DEFAULT[f.name]]
    given = vars(cli.build_train_parser().parse_args(argv))
    config = TrainConfig.from_dict({**defaults, **{f.name: given[f.name] for f in fields}})
    for f in fields:
        value = getattr(config, f.name)
        assert value != defaults[f.name], f"{f.name}: parsed {value!r}, the default"
    sweep_dests = {a.dest for a in cli.build_sweep_parser()._actions}
    swept = {"method", "sparsity", "seed"}
    assert {f.name for f in fields} - swept <= sweep_dests and not swept & sweep_dests


def test_train_cli_runs_resumes_and_prints_table(tmp_path, capsys):
    run = tmp_path / "run"
    args = [
        *TINY,
        "--method",
        "magnitude",
        "--sparsity",
        "0.8",
        "--epochs",
        "1",
        "--run-dir",
        str(run),
    ]
    assert cli.train_main(args) == 0
    out = capsys.readouterr().out
    assert "| method" in out and "| magnitude | 0.8" in out and str(run) in out
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "magnitude" and config["sparsity"] == 0.8 and config["epochs"] == 1
    # Running again into the same folder is refused; --resume as is reports the finished
    # run; --resume with another setting is refused, with more epochs it extends the run
    # and says what that does to the schedule.
    assert cli.train_main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert cli.train_main(["--resume", "--run-dir", str(run), "--no-progress"]) == 0
    assert "| magnitude" in capsys.readouterr().out
    assert cli.train_main(["--resume", "--run-dir", str(run), "--lr", "0.2"]) == 1
    assert "different config (lr: saved" in capsys.readouterr().err
    assert cli.train_main(["--resume", "--run-dir", str(run), "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 1 -> 2: the cosine lr schedule is re-planned" in out
    assert (
        "| magnitude | 0.8" in out and json.loads((run / "config.json").read_text())["epochs"] == 2
    )
    assert cli.train_main(["--resume", "--run-dir", str(run), "--epochs", "1"]) == 2
    assert "completed 2 epochs" in capsys.readouterr().err


def test_train_cli_default_run_dir_and_preset_override(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [
        "--preset",
        "resnet56-cifar10",
        "--model",
        "resnet20",
        "--epochs",
        "1",
        *TINY,
        "--method",
        "dense",
    ]
    assert cli.train_main(args) == 0
    config = json.loads(
        (tmp_path / "runs" / "resnet20-synthetic-dense-seed0" / "config.json").read_text()
    )
    assert config["weight_decay"] == 1e-4 and config["nesterov"] is True  # from the preset
    assert config["model"] == "resnet20" and config["dataset"] == "synthetic"  # overridden


@pytest.mark.parametrize(
    "args, code, message",
    [
        ([*TINY, "--epochs", "0"], 2, "epochs:"),
        ([*TINY, "--method", "ong", "--method-kwargs", '{"colour": 1}'], 2, "colour"),
        (
            [*TINY[2:], "--dataset", "fashion-mnist", "--data-dir", "/nonexistent/fm"],
            1,
            "/nonexistent/fm",
        ),
        (["--resume"], 2, "--resume needs --run-dir"),
    ],
)
def test_train_cli_errors(tmp_path, capsys, args, code, message):
    if "--resume" not in args:
        args = [*args, "--run-dir", str(tmp_path / "run")]
    assert cli.train_main(args) == code
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_train_cli_argparse_errors(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.train_main(["--method-kwargs", "[1]"])
    assert exit_.value.code == 2 and "JSON object" in capsys.readouterr().err


# ----------------------------------------------------------------------------- ong-sweep
def test_sweep_writes_table_and_plot_and_reuses_runs(tmp_path, capsys):
    out = tmp_path / "sweep"
    # --workers 2: the runs train in two spawned processes; the rerun below is in-process.
    args = [*TINY, "--epochs", "1", "--methods", "dense", "random", "--workers", "2",
            "--sparsities", "0.5", "0.8", "--seeds", "0", "1", "--out-dir", str(out)]  # fmt: skip
    assert cli.sweep_main(args) == 0
    printed = capsys.readouterr().out
    md = (out / "results.md").read_text()
    assert "Command: `ong-sweep" in md and md.strip() in printed
    rows = [line for line in md.splitlines() if line.startswith("| ") and "method" not in line]
    assert len(rows) == 1 + 2  # dense once, random at two sparsities
    assert all(" ± " in row and "| 2 " in row for row in rows)  # two seeds each
    assert (out / "accuracy_vs_sparsity.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert {(r["method"], r["sparsity"]) for r in summary["rows"]} == {
        ("dense", 0.0), ("random", 0.5), ("random", 0.8)
    }  # fmt: skip
    assert len(list(out.glob("*/results.json"))) == 6
    # A second invocation trains nothing: every run is reused.
    assert cli.sweep_main(args) == 0
    assert capsys.readouterr().out.count("finished earlier, reusing") == 6


def test_sweep_rejects_bad_plans(tmp_path, capsys):
    assert cli.sweep_main([*TINY, "--sparsities", "0.5", "0.5", "--out-dir", str(tmp_path)]) == 2
    assert "must not repeat" in capsys.readouterr().err
    assert cli.sweep_main([*TINY, "--workers", "0", "--out-dir", str(tmp_path)]) == 2
    assert "workers:" in capsys.readouterr().err
    assert (
        cli.sweep_main(
            [*TINY, "--methods", "ong", "--sparsities", "1.5", "--out-dir", str(tmp_path)]
        )
        == 2
    )
    assert "sparsity:" in capsys.readouterr().err


def test_sweep_refuses_to_reuse_runs_made_with_other_settings(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = [*TINY, "--methods", "random", "--sparsities", "0.5", "--out-dir", str(out)]
    assert cli.sweep_main([*args, "--epochs", "1", "--lr", "0.1"]) == 0
    capsys.readouterr()
    # Same folder, other settings: the finished run must not be relabelled as the new one.
    assert cli.sweep_main([*args, "--epochs", "2", "--lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "epochs: saved 1, now 2" in err and "lr: saved 0.1, now 0.01" in err
    assert "--rerun-changed" in err
    # Asked to, it trains the changed runs into a new folder and reports only those.
    assert cli.sweep_main([*args, "--epochs", "2", "--lr", "0.01", "--rerun-changed"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["runs"]) == 1 and summary["runs"][0]["epochs"] == 2
    assert summary["runs"][0]["lr"] == 0.01
    # ...and a third invocation with the new settings reuses that folder.
    assert cli.sweep_main([*args, "--epochs", "2", "--lr", "0.01"]) == 0
    assert "finished earlier, reusing" in capsys.readouterr().out
    # Settings that compute the same thing are not differences.
    assert cli.sweep_main([*args, "--epochs", "1", "--lr", "0.1", "--amp", "off"]) == 0
    assert "finished earlier, reusing" in capsys.readouterr().out


def test_no_arguments_prints_help_instead_of_training(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.train_main([]) == 2
    captured = capsys.readouterr()
    assert "usage: ong-train" in captured.out and "example" in captured.out
    assert not (tmp_path / "runs").exists()


def test_help_names_the_real_run_folder_and_what_weights_left_counts(tmp_path):
    text = "".join(cli.build_train_parser().format_help().split())  # argparse wraps at "-"
    config = TrainConfig(method="ong", sparsity=0.9, seed=3)
    assert config.run_name() == "resnet20-fashion-mnist-ong-0.9-seed3"
    assert "<model>-<dataset>-<method>-<sparsity>-seed<N>" in text
    headers = dict(cli.RESULT_COLUMNS)
    assert "BN" in headers["remaining"] and "bias" in headers["remaining"]


def test_progress_bars_are_off_when_not_a_terminal(tmp_path, capfd):
    # pytest's captured stderr is not a terminal: --progress must not fill it with \r.
    args = [a for a in TINY if a != "--no-progress"]
    assert cli.train_main([*args, "--epochs", "1", "--run-dir", str(tmp_path / "r")]) == 0
    assert "\r" not in capfd.readouterr().err


def test_interrupt_hint_matches_what_will_work(tmp_path, capsys, monkeypatch):
    from ong_kernels.train.trainer import Trainer

    def interrupt(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", interrupt)  # Ctrl-C before the first checkpoint
    run = tmp_path / "run"
    assert cli.train_main([*TINY, "--epochs", "1", "--run-dir", str(run)]) == 130
    err = capsys.readouterr().err
    assert "--resume" not in err and "run the same command again" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "tpu"], "device:"),
        (["--batch-size", "1"], "batch_size:"),
    ],
)
def test_device_and_batch_errors_are_one_line(tmp_path, capsys, args, message):
    assert cli.train_main([*TINY, "--epochs", "1", *args, "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_run_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "afile"
    path.write_text("x")
    assert cli.train_main([*TINY, "--epochs", "1", "--run-dir", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}" in err and "not a folder" in err and len(err.strip().splitlines()) == 1


def test_a_full_disk_is_one_line_and_the_run_stays_resumable(tmp_path, capsys, monkeypatch):
    from ong_kernels.train import checkpoint

    run = tmp_path / "run"
    args = [*TINY, "--method", "random", "--sparsity", "0.5", "--run-dir", str(run)]
    assert cli.train_main([*args, "--epochs", "2"]) == 0
    capsys.readouterr()
    real_save = torch.save

    def full_disk(obj, f):
        real_save(obj, f)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 526528")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    run2 = tmp_path / "run2"
    assert cli.train_main([*TINY, "--epochs", "1", "--run-dir", str(run2)]) == 1
    err = capsys.readouterr().err
    assert f"{run2 / 'checkpoint.pt'}: cannot write" in err and "Traceback" not in err
    assert not [p for p in run2.iterdir() if p.name.endswith(".tmp")]
