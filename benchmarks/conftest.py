"""Shared machinery of the benchmark suites (pytest-benchmark).

What every ``benchmarks/bench_*.py`` file gets from here:

* collection: files named ``bench_*.py`` are collected (pytest's default pattern is
  ``test_*.py``), so a new suite only has to follow the name;
* a ``device`` fixture argument is parametrised over the devices this machine has (the CPU,
  and CUDA when ``torch.cuda.is_available()``), unless the test parametrises it itself;
* the ``measure`` fixture: times a callable (synchronising CUDA so that the kernel, not the
  launch, is timed) and labels the result with the columns ``benchmarks/report.py`` groups
  by: ``kernel``, ``provider`` (``ours...`` for ours, anything else is a peer), ``workload``
  and the device, plus optional ``flops`` / ``bytes`` of work that the report turns into a
  floor with the rates measured in the same run;
* machine information in the JSON (device names, library versions, compiled backends).

Every benchmark test carries ``@pytest.mark.benchmark``; ``make test`` never runs them.
"""

from __future__ import annotations

import os
import platform
import time
import warnings
from collections.abc import Callable
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import torch
from _pytest.python import path_matches_patterns
from pytest_benchmark.logger import PytestBenchmarkWarning


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    """Collect ``bench_*.py`` files, unless pytest's own rules already collect this one."""
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path) or path_matches_patterns(
        file_path, parent.config.getini("python_files")
    ):
        return None  # pytest's python plugin collects it; collecting it here would run it twice
    return pytest.Module.from_parent(parent, path=file_path)


def _cpu_seconds() -> tuple[float, float, float] | None:
    """(wall clock, busy CPU-seconds of the whole machine, CPU-seconds of this process)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None  # not Linux: no machine-wide accounting
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait (steal counts: lost time)
    own = os.times()
    return (
        time.monotonic(),
        busy / os.sysconf("SC_CLK_TCK"),
        own.user + own.system + own.children_user + own.children_system,
    )


# Other work on the machine skews every CPU number (an OpenMP kernel whose threads share
# cores with another process can run 50x slower: measured on the shared 2-core box), so the
# JSON records how busy the machine was, and the report prints it.
_AT_START: dict[str, Any] = {}


def pytest_configure(config: pytest.Config) -> None:
    # pyproject turns warnings into errors; pytest-benchmark's notes ("no benchmarks have been
    # run" when a -k selects none) are not failures of ours. It warns after pytest's own
    # warning contexts have closed, so an ini filter does not reach it: a global one does.
    warnings.filterwarnings("default", category=PytestBenchmarkWarning)
    _AT_START["cpu"] = _cpu_seconds()
    # pytest-benchmark writes --benchmark-json only at the very end and does not create its
    # folder: a missing build/ would throw away the whole run.
    json_path = config.getoption("benchmark_json", None)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)


def bench_devices() -> list[torch.device]:
    """The devices benchmarks run on: always the CPU, plus the GPU when there is one."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda", torch.cuda.current_device()))
    return devices


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "device" not in metafunc.fixturenames:
        return
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0] if marker.args else marker.kwargs.get("argnames", "")
        if "device" in (names.replace(" ", "").split(",") if isinstance(names, str) else names):
            return  # the test chose its devices itself
    metafunc.parametrize("device", bench_devices(), ids=lambda d: d.type)


@cache
def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (platform.processor() is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    """A human-readable name of the device, with the thread count for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _other_cores_busy() -> float | None:
    """Average number of cores that other processes kept busy since the session started."""
    start, end = _AT_START.get("cpu"), _cpu_seconds()
    if start is None or end is None or end[0] <= start[0]:
        return None
    foreign = (end[1] - start[1]) - (end[2] - start[2])
    return max(0.0, foreign / (end[0] - start[0]))


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    import ong_kernels

    machine_info["ong"] = {
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "scikit-learn": _version("scikit-learn"),
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "other_cores_busy": _other_cores_busy(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "backends_available": ong_kernels.backends_available(),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_batch(
    model_name: str, channels: int, size: int, batch: int, device: torch.device
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(model, x, y): the trainer's ``model_name`` for 10 classes (torch seed 0) on ``device``
    and one random batch of ``batch`` images (seed 1), for the per-step cost benchmarks."""
    from ong_kernels.train.models import build_model

    torch.manual_seed(0)
    model = build_model(model_name, in_channels=channels, num_classes=10).to(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, channels, size, size, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    return model, x, y


def seconds(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of one ``fn()``, the device synchronised before and after."""
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def report_against_step(
    benchmark, *, kernel: str, workload: str, device: torch.device, med: dict[str, float],
    costs: dict[str, str], tail: str = "",
) -> None:  # fmt: skip
    """Records and prints per-step costs against a training step: ``med`` holds medians in
    seconds (``med["step"]`` is the step); each ``costs`` key gets ``<key>_over_step`` in the
    report and its label, time and share of the step in the printed line, then ``tail``."""
    ratios = {f"{k}_over_step": med[k] / med["step"] for k in costs}
    threads = torch.get_num_threads()
    benchmark.extra_info.update(
        kernel=kernel,
        provider="ours",
        workload=workload,
        device=device.type,
        device_name=device_name(device),
        threads=threads,
        **{f"{k}_median_s": v for k, v in med.items()},
        **ratios,
    )
    shares = ", ".join(
        f"{label} {med[k] * 1e3:.2f} ms ({100 * ratios[f'{k}_over_step']:.1f}%)"
        for k, label in costs.items()
    )
    print(
        f"\n{workload} ({device_name(device)}, {threads} threads): step "
        f"{med['step'] * 1e3:.1f} ms; {shares}{tail}"
    )


@pytest.fixture
def measure(benchmark) -> Callable[..., Any]:
    """Time ``fn`` and label the result for the report; returns what ``fn`` returned.

    ``measure(fn, kernel=, provider=, workload=, device=, rounds=None, warmup_rounds=0,
    flops=None, bytes=None, **extra_info)``. ``rounds=None`` lets pytest-benchmark calibrate
    (at least 5 rounds, about 1 s); an int runs exactly that many rounds of one call each
    (``benchmark.pedantic``), for calls that take seconds. ``device`` is where ``fn`` computes
    (a CPU peer in a GPU run says "cpu"). ``flops`` / ``bytes`` are the work of one call.
    """

    def run(
        fn: Callable[[], Any],
        *,
        kernel: str,
        provider: str,
        workload: str,
        device: torch.device | str,
        rounds: int | None = None,
        warmup_rounds: int = 0,
        flops: float | None = None,
        bytes: float | None = None,  # shadows the builtin: it is the report's column name
        **extra_info: Any,
    ) -> Any:
        device = torch.device(device)
        if rounds is not None and rounds < 1:
            raise ValueError(f"rounds: expected None or an int >= 1, got {rounds}")
        if warmup_rounds < 0:
            raise ValueError(f"warmup_rounds: expected an int >= 0, got {warmup_rounds}")

        def timed() -> Any:
            out = fn()
            _synchronize(device)
            return out

        benchmark.group = f"{kernel}:{workload}"
        benchmark.extra_info.update(
            kernel=kernel,
            provider=provider,
            workload=workload,
            device=device.type,
            device_name=device_name(device),
            **extra_info,
        )
        if flops is not None:
            benchmark.extra_info["flops"] = float(flops)
        if bytes is not None:
            benchmark.extra_info["bytes"] = float(bytes)
        if rounds is None:
            for _ in range(warmup_rounds):  # pedantic() warms up itself; benchmark() does not
                timed()
            _synchronize(device)
            return benchmark(timed)
        _synchronize(device)  # nothing queued before the first timed call
        return benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)

    return run
