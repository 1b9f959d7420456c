"""Ahead-of-time compilation of Triton kernels for real GPU targets, on a machine without one.

`compile_report` lowers a kernel with triton.compile(ASTSource(...), target=GPUTarget(...))
to PTX and a cubin (Triton ships its own ptxas) and reads the resources from the cubin with
the cuobjdump that ships with Triton: registers, stack (spills land there), local memory and
shared memory. The tests compile every configuration the dispatchers can pick (each kernel
module's `aot_configs()`); the reports go into benchmarks/RESULTS.md:

    python -m ong_kernels.backends.triton._aot [--arch 90 80] [--module nmf]

prints that table (Markdown) for every module of this package, and exits non-zero when a
configuration fails to compile, spills, or needs more shared memory than SHARED_LIMIT.

Compiling needs a process whose Triton is not interpreting: under TRITON_INTERPRET=1 Triton's
own library functions (tl.cdiv, tl.sum, ...) are interpreter objects, and the first compile
that calls one patches triton.language for the interpreter, so every later compile in that
process fails (measured with triton 3.9: sm_90 compiled, then sm_80 of the same kernel
raised InterpreterError). `reports()` therefore compiles in a child process with the
interpreter off whenever the calling process interprets (the test suite does).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Shared memory a block may use (opt-in maximum): sm_80 (A100) 163 KB, sm_90 (H100) 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# The triton the launch configurations were tuned with (the Makefile's TRITON_SPEC; a test
# keeps the two equal): with it, no configuration may spill a byte. Another triton brings
# another ptxas: with triton 3.6 (the GPU machine's) 4 of the default configurations got 8 B
# of stack (review of 2026-12-06), harmless; there a spill up to SPILL_TOLERANCE is noted,
# not failed, and a larger one still fails.
PINNED_TRITON = "3.9.0"
SPILL_TOLERANCE = 64


@dataclass(frozen=True)
class Report:
    kernel: str
    arch: int
    config: str
    registers: int
    stack: int
    local: int
    shared: int
    # The SM the PTX names (".target sm_90") and the cubin's size: proof the kernel lowered
    # for the requested target (the interpreter checks neither).
    ptx_target: str = ""
    cubin_bytes: int = 0
    # From the TTIR and PTX: barriers (tl.debug_barrier), tt.dot ops and those in "ieee"
    # (fp32 FMA), and approximate float32 divisions (div.full / div.approx: up to 2 ulp).
    barriers: int = 0
    dots: int = 0
    ieee_dots: int = 0
    approx_divisions: int = 0
    triton: str = ""

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0

    def row(self) -> str:
        return (
            f"| {self.kernel} | sm_{self.arch} | {self.config} | {self.registers} | "
            f"{self.stack} | {self.local} | {self.shared} |"
        )


def _tool(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def interpreting() -> bool:
    """Whether this process's Triton runs kernels in its interpreter (TRITON_INTERPRET=1)."""
    import triton

    return bool(triton.knobs.runtime.interpret)


def compile_report(
    fn,
    signature: dict,
    constexprs: dict,
    *,
    arch: int,
    num_warps: int,
    num_stages: int = 2,
    maxnreg: int | None = None,
) -> Report:
    """Compile `fn` (a @triton.jit function) for sm_`arch` and report. Needs a process that
    does not interpret (see the module docstring); `reports()` arranges one."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if interpreting():
        raise RuntimeError(
            "compile_report: this process runs Triton's interpreter (TRITON_INTERPRET=1), "
            "whose library functions cannot be compiled; use _aot.reports(), which compiles "
            "in a child process, or unset TRITON_INTERPRET"
        )
    source = ASTSource(fn, signature, constexprs=constexprs)
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        # FP fusion (a*b+c -> FMA) is Triton's default; said explicitly, as the kernels'
        # launches do, so that triton 3.9 does not warn that TRITON_DEFAULT_FP_FUSION is unset.
        options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True}
        | ({} if maxnreg is None else {"maxnreg": maxnreg}),
    )
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run(
            [str(_tool("cuobjdump")), "--dump-resource-usage", str(cubin)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    config = ", ".join(f"{k}={v}" for k, v in constexprs.items())
    config += f", warps={num_warps}, stages={num_stages}"
    if maxnreg is not None:
        config += f", maxnreg={maxnreg}"
    return Report(
        kernel=fn.__name__,
        arch=arch,
        config=config,
        registers=int(fields.get("REG", 0)),
        stack=int(fields.get("STACK", 0)),
        local=int(fields.get("LOCAL", 0)),
        # static shared memory from the cubin + the dynamic amount Triton launches with
        shared=int(fields.get("SHARED", 0)) + int(compiled.metadata.shared),
        ptx_target=(re.findall(r"^\.target\s+(sm_\w+)", compiled.asm["ptx"], re.M) or [""])[0],
        cubin_bytes=len(compiled.asm["cubin"]),
        **_ir_counts(compiled.asm["ttir"], compiled.asm["ptx"]),
        triton=triton.__version__,
    )


def _ir_counts(ttir: str, ptx: str) -> dict:
    """Barriers and dots of the TTIR (triton 3.9 prints ttg.barrier, older ones gpu.barrier;
    an "ieee" dot prints no inputPrecision in 3.9), approximate divisions of the PTX."""
    dots = [line for line in ttir.splitlines() if re.search(r"\btt\.dot\b", line)]
    ieee = [d for d in dots if "inputPrecision" not in d or "inputPrecision = ieee" in d]
    return dict(
        barriers=len(re.findall(r"\b(?:gpu|ttg)\.barrier\b", ttir)),
        dots=len(dots),
        ieee_dots=len(ieee),
        approx_divisions=len(re.findall(r"\bdiv\.(?:full|approx)(?:\.ftz)?\.f32\b", ptx)),
    )


def _config_label(constexprs: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in constexprs.items())


def kernel_modules() -> list[str]:
    """Names of the modules of this package that expose aot_configs()."""
    import ong_kernels.backends.triton as package

    names = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        if hasattr(module, "aot_configs"):
            names.append(info.name)
    return names


def configs(module: str) -> list[dict]:
    return importlib.import_module(f"ong_kernels.backends.triton.{module}").aot_configs()


def is_default(config: dict) -> bool:
    """What the op runs unless asked otherwise: no string constexpr other than "ieee" (no
    TF32 opt-in) and no dtype constexpr other than float32 (no half-precision inputs)."""
    import triton.language as tl

    for value in config["constexprs"].values():
        if isinstance(value, str) and value != "ieee":
            return False
        if isinstance(value, tl.dtype) and value != tl.float32:
            return False
    return True


Case = tuple[str, int, int]  # (module, index into its aot_configs(), arch)


def _compile_cases(cases: list[Case]) -> dict[Case, Report | str]:
    """Compile in this process: a Report per case, or the compile error's text."""
    out: dict[Case, Report | str] = {}
    for module, index, arch in cases:
        try:
            out[(module, index, arch)] = compile_report(arch=arch, **configs(module)[index])
        except Exception as error:  # a compile error is a result of this check
            out[(module, index, arch)] = f"{type(error).__name__}: {error}"
    return out


def reports(cases: list[Case]) -> dict[Case, Report | str]:
    """A Report (or a compile error's text) per (module, config index, arch), compiled in a
    child process with the interpreter off when this process interprets."""
    if not interpreting():
        return _compile_cases(cases)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cases.json"
        path.write_text(json.dumps(cases))
        subprocess.run(
            [sys.executable, "-m", __name__, "--cases-json", str(path)], env=env, check=True
        )
        rows = json.loads(path.read_text())
    return {
        (r["module"], r["index"], r["arch"]): (
            r["error"] if "error" in r else Report(**r["report"])
        )
        for r in rows
    }


def exact_spill_budget(version: str) -> bool:
    """Whether `version` of triton is the pinned one (no spill allowed) or another (spills up
    to SPILL_TOLERANCE bytes allowed)."""
    return version.split("+")[0] == PINNED_TRITON


def problems(report: Report, triton_version: str | None = None) -> list[str]:
    """Why a report fails the AOT check (empty when it passes). The spill budget is exact
    for the pinned triton and SPILL_TOLERANCE bytes for another (`triton_version`, default
    the report's, else this process's)."""
    version = triton_version or report.triton or _installed_triton()
    budget = 0 if exact_spill_budget(version) else SPILL_TOLERANCE
    out = []
    if report.stack > budget or report.local > budget:
        out.append(
            f"spills (stack {report.stack} B, local {report.local} B; triton {version} "
            f"allows {budget} B)"
        )
    if report.shared > SHARED_LIMIT[report.arch]:
        out.append(f"shared memory {report.shared} B > {SHARED_LIMIT[report.arch]} B")
    return out


def _installed_triton() -> str:
    import triton

    return triton.__version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=[80, 90])
    parser.add_argument("--module", nargs="+", help="modules of ong_kernels.backends.triton")
    parser.add_argument(
        "--cases-json",
        metavar="FILE",
        help="compile the [module, index, arch] cases listed in FILE and write the reports "
        "back into it (how reports() compiles for an interpreting process)",
    )
    args = parser.parse_args(argv)
    if args.cases_json:
        path = Path(args.cases_json)
        cases = [tuple(c) for c in json.loads(path.read_text())]
        rows = [
            {"module": m, "index": i, "arch": a}
            | ({"error": r} if isinstance(r, str) else {"report": dataclasses.asdict(r)})
            for (m, i, a), r in _compile_cases(cases).items()
        ]
        path.write_text(json.dumps(rows))
        return 0
    header = "| kernel | arch | config | registers | stack | local | shared (B) |"
    print(header + "\n|---|---|---|---|---|---|---|")
    failed = 0
    cases = [
        (module, index, arch)
        for module in args.module or kernel_modules()
        for arch in args.arch
        for index in range(len(configs(module)))
    ]
    for (module, index, arch), report in reports(cases).items():
        if isinstance(report, str):
            failed += 1
            config = configs(module)[index]
            print(f"| {config['fn'].__name__} | sm_{arch} | {_config_label(config['constexprs'])} "
                  f"| COMPILE ERROR: {report.splitlines()[0]} | | | |")  # fmt: skip
            continue
        why = problems(report)
        failed += bool(why)
        print(report.row() + (f" **{'; '.join(why)}**" if why else ""), flush=True)
    print(f"\n{failed} failing configuration(s)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
