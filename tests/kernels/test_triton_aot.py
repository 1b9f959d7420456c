"""Every Triton kernel configuration a dispatcher can pick, compiled ahead of time for sm_90
(H100/H200) and sm_80 (A100) on this GPU-less machine: no compile error, no register spills
(stack or local memory; exactly none with the pinned triton, a small tolerance with another:
the GPU machine's triton 3.6 brings its own ptxas), shared memory within the target's limit;
and, read from the TTIR and PTX, what the interpreter cannot show: exact float32 divisions,
a barrier in every update, fp32 products in the stopping error.

The configurations come from each kernel module's `aot_configs()` (every module of
ong_kernels.backends.triton that has one: a new kernel module is checked without an edit
here). Each compile takes ~0.3-3 s, so `make test` compiles the default ones (precision
"ieee", float32 inputs: what the op runs unless asked otherwise) and the `slow` marker holds
the rest (half-precision inputs, the TF32 opt-ins): run them with
`pytest -m slow tests/kernels/test_triton_aot.py`, or print the whole table with
`python -m ong_kernels.backends.triton._aot`.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

import ong_kernels.backends.triton as package  # noqa: E402
from ong_kernels.backends.triton import _aot  # noqa: E402

ARCHS = (90, 80)


def _cases() -> list:
    cases = []
    for module in _aot.kernel_modules():
        for index, config in enumerate(_aot.configs(module)):
            label = ",".join(str(v) for v in config["constexprs"].values())
            for arch in ARCHS:
                marks = [] if _aot.is_default(config) else [pytest.mark.slow]
                name = f"{module}-{config['fn'].__name__}-{label}-w{config['num_warps']}-sm{arch}"
                cases.append(pytest.param(module, index, arch, marks=marks, id=name))
    return cases


@pytest.fixture(scope="module")
def default_reports() -> dict:
    """Every default configuration of every module for every arch, compiled in one child
    process (this one interprets; see _aot's docstring for why that cannot compile)."""
    cases = [
        (module, index, arch)
        for module in _aot.kernel_modules()
        for index, config in enumerate(_aot.configs(module))
        if _aot.is_default(config)
        for arch in ARCHS
    ]
    return _aot.reports(cases)


def _report(reports: dict, module: str, index: int, arch: int) -> _aot.Report:
    key = (module, index, arch)
    report = reports[key] if key in reports else _aot.reports([key])[key]  # slow cases
    assert isinstance(report, _aot.Report), f"{module}[{index}] sm_{arch}: {report}"
    return report


def test_every_kernel_module_lists_its_configurations():
    modules = [m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")]
    assert modules, "no Triton kernel module found"
    for name in modules:
        module = importlib.import_module(f"{package.__name__}.{name}")
        assert hasattr(module, "aot_configs"), f"{name} has no aot_configs()"
        configs = module.aot_configs()
        assert configs, f"{name}.aot_configs() is empty"
        assert set(_aot.kernel_modules()) >= {name}
        for config in configs:
            required = {"fn", "signature", "constexprs", "num_warps", "num_stages"}
            assert required <= set(config) <= required | {"maxnreg"}, set(config)
    assert any(_aot.is_default(c) for m in modules for c in _aot.configs(m))


@pytest.mark.parametrize(("module", "index", "arch"), _cases())
def test_compiles_without_spills(default_reports, module, index, arch):
    report = _report(default_reports, module, index, arch)
    assert report.registers > 0, report.row()
    problems = _aot.problems(report)
    assert not problems, f"{report.row()}: {'; '.join(problems)}"


@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_lower_to_the_real_target(default_reports, arch):
    """Each kernel module's default configurations went through triton.compile with an
    explicit GPUTarget: the PTX names the requested SM and a cubin came out (the interpreter
    checks none of this)."""
    modules = set()
    for (module, _, target), report in default_reports.items():
        if target == arch:
            assert isinstance(report, _aot.Report), f"{module} sm_{arch}: {report}"
            # sm_90a: Triton targets Hopper's arch-specific features (wgmma, TMA)
            assert re.fullmatch(f"sm_{arch}a?", report.ptx_target), (module, report.ptx_target)
            assert report.cubin_bytes > 0, module
            modules.add(module)
    assert modules == set(_aot.kernel_modules())


def test_an_interpreting_process_is_refused_a_compile_with_the_reason():
    if not _aot.interpreting():
        pytest.skip("this process compiles directly (TRITON_INTERPRET is off)")
    config = next(c for c in _aot.configs("sgd") if _aot.is_default(c))
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1.*_aot\.reports"):
        _aot.compile_report(arch=90, **config)


def _nmf_reports(reports: dict, name: str) -> list:
    out = []
    for (module, index, _arch), report in reports.items():
        if module == "nmf" and _aot.configs(module)[index]["fn"].__name__ == name:
            assert isinstance(report, _aot.Report), report
            out.append(report)
    assert out, name
    return out


def test_nmf_divisions_round_to_nearest(default_reports):
    """`num / den` lowers to div.full.f32 (up to 2 ulp) on the GPU, while the interpreter and
    the reference divide exactly: the update uses tl.div_rn (div.rn.f32)."""
    for name in ("_update_kernel", "_solve_kernel", "_gram_kernel", "_error_kernel"):
        for report in _nmf_reports(default_reports, name):
            assert report.approx_divisions == 0, report.row()


def test_every_update_orders_its_reads_of_x_before_its_writes(default_reports):
    """The update reads X (the denominator) and then overwrites it from other threads: a
    barrier between them in every configuration, the one-chunk one included."""
    for name in ("_update_kernel", "_solve_kernel"):
        for report in _nmf_reports(default_reports, name):
            assert report.barriers >= 1, report.row()


def test_beta_kernels_divide_exactly_order_x_and_multiply_in_fp32(default_reports):
    """The beta kernels (nmf_beta.py): exact float32 divisions (tl.div_rn) like the reference,
    a barrier between the reads of X and its update in every update configuration, and
    only "ieee" (fp32 FMA) products: the op has no precision argument."""
    seen = set()
    for (module, index, _arch), report in default_reports.items():
        if module != "nmf_beta":
            continue
        assert isinstance(report, _aot.Report), report
        name = _aot.configs(module)[index]["fn"].__name__
        seen.add(name)
        assert report.approx_divisions == 0, report.row()
        assert report.ieee_dots == report.dots > 0, report.row()
        if name == "_beta_update_kernel":
            assert report.barriers >= 1, report.row()
    assert seen == {"_beta_update_kernel", "_beta_error_kernel"}


def test_the_stopping_error_is_fp32_under_tf32():
    """The error's products are "ieee" even when the update's are TF32: the persistent
    kernel's checks (TF32 updates, fp32 error), and the grouped error kernel (which takes no
    precision: test_triton_nmf)."""
    configs = _aot.configs("nmf")

    def index(name: str, **constexprs) -> int:
        (found,) = [
            i
            for i, c in enumerate(configs)
            if c["fn"].__name__ == name
            and all(str(c["constexprs"].get(k)) == str(v) for k, v in constexprs.items())
        ]
        return found

    solve = index("_solve_kernel", PRECISION="tf32", CHECKS=True, RB=16, V_DTYPE="fp32")
    error = index("_error_kernel", RB=64, V_DTYPE="fp32")
    reports = _aot.reports([("nmf", solve, 90), ("nmf", error, 90)])
    solve_report, error_report = reports[("nmf", solve, 90)], reports[("nmf", error, 90)]
    assert isinstance(solve_report, _aot.Report) and isinstance(error_report, _aot.Report)
    assert 0 < solve_report.ieee_dots < solve_report.dots, solve_report
    assert error_report.ieee_dots == error_report.dots > 0, error_report


def test_the_pinned_triton_is_the_makefiles():
    makefile = (Path(__file__).parents[2] / "Makefile").read_text()
    spec = re.search(r"^TRITON_SPEC \?= triton==(\S+)", makefile, re.M)
    assert spec and spec.group(1) == _aot.PINNED_TRITON


def test_spill_budget_is_exact_only_for_the_pinned_triton():
    """With the pinned triton no configuration may spill; the GPU machine's triton 3.6 gave
    4 default configurations 8 B of stack (its own ptxas): allowed there, up to a limit."""
    small = _aot.Report("k", 90, "", 128, stack=8, local=0, shared=0)
    large = _aot.Report("k", 90, "", 255, stack=_aot.SPILL_TOLERANCE + 8, local=0, shared=0)
    assert _aot.problems(small, triton_version=_aot.PINNED_TRITON)
    assert not _aot.problems(small, triton_version="3.6.0")
    assert _aot.problems(large, triton_version="3.6.0")
    assert not _aot.problems(dataclasses.replace(small, triton="3.6.0"))
    assert _aot.problems(dataclasses.replace(small, triton=_aot.PINNED_TRITON))


def test_problems_are_found():
    # The check itself can fail: a spilling or oversized report is flagged.
    spilled = _aot.Report("k", 80, "", 255, stack=8, local=0, shared=0, triton=_aot.PINNED_TRITON)
    too_big = _aot.Report("k", 90, "", 64, stack=0, local=0, shared=_aot.SHARED_LIMIT[90] + 1)
    assert _aot.problems(spilled) and _aot.problems(too_big)
    assert not _aot.problems(_aot.Report("k", 90, "", 64, stack=0, local=0, shared=1024))
