"""The figures: titled with what was trained, integer epoch ticks, an lr curve."""

from conftest import run_python

from ong_kernels.train import plots


def history(epochs):
    return [
        {"epoch": e, "train_loss": 1.0 / e, "test_loss": 1.2 / e, "train_acc": 50.0 + e,
         "test_acc": 48.0 + e, "lr": 0.1 / e}
        for e in range(1, epochs + 1)
    ]  # fmt: skip


def test_history_figures_are_titled_with_integer_epochs_and_an_lr_curve(tmp_path):
    title = "resnet20 on fashion-mnist, ong at 90% sparsity"
    figs = plots.history_figures(history(3), title=title)
    assert set(figs) == {"loss", "accuracy", "lr"}
    for fig in figs.values():
        (ax,) = fig.axes
        assert fig.get_suptitle() == title or ax.get_title() == title
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
        assert ticks and all(float(t).is_integer() for t in ticks)
    lines = figs["lr"].axes[0].get_lines()
    assert list(lines[0].get_ydata()) == [0.1, 0.05, 0.1 / 3]
    plots.plot_history(history(3), tmp_path / "loss.png", tmp_path / "accuracy.png", title=title,
                       lr_path=tmp_path / "lr.png")  # fmt: skip
    for name in ("loss.png", "accuracy.png", "lr.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_sweep_figure_is_titled():
    rows = [
        {"method": "dense", "sparsity": 0.0, "test_acc_mean": 90.0, "test_acc_std": 0.5},
        {"method": "ong", "sparsity": 0.9, "test_acc_mean": 88.0, "test_acc_std": 0.4},
    ]
    fig = plots.sweep_figure(rows, title="resnet20 on fashion-mnist")
    assert fig.axes[0].get_title() == "resnet20 on fashion-mnist"


def test_kernels_pruning_and_trainer_import_without_the_train_extra():
    code = (
        "import sys; sys.modules['matplotlib'] = None; sys.modules['tqdm'] = None\n"
        "import ong_kernels, ong_kernels.pruning\n"
        "import ong_kernels.train.cli, ong_kernels.train.main_job\n"
        "from ong_kernels.train import plots\n"
        "try:\n    plots.sweep_figure([])\nexcept ImportError as e:\n    print(e)\n"
    )
    out = run_python(code)
    assert "pip install 'ong_kernels[train]'" in out.stdout
