"""Ahead-of-time compilation of Triton kernels for real GPU targets, on a machine without one.

`compile_report` lowers a kernel with triton.compile(ASTSource(...), target=GPUTarget(...))
to PTX and a cubin (Triton ships its own ptxas) and reads the resources from the cubin with
the cuobjdump that ships with Triton: registers, stack (spills land there), local memory and
shared memory. The tests compile every configuration the dispatchers can pick (each kernel
module's `aot_configs()`); the reports go into benchmarks/RESULTS.md:

    python -m ong_kernels.backends.triton._aot [--arch 90 80] [--module nmf]

prints that table (Markdown) for every module of this package, and exits non-zero when a
configuration fails to compile, spills, or needs more shared memory than SHARED_LIMIT.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import pkgutil
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Shared memory a block may use (opt-in maximum): sm_80 (A100) 163 KB, sm_90 (H100) 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@dataclass(frozen=True)
class Report:
    kernel: str
    arch: int
    config: str
    registers: int
    stack: int
    local: int
    shared: int

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


@functools.cache
def _compiled_module(name: str):
    """A fresh copy of kernel module `name` whose @triton.jit functions are real JITFunctions,
    imported with the interpreter off (under TRITON_INTERPRET=1 the module's kernels are
    InterpretedFunctions, which triton.compile cannot lower)."""
    import triton

    spec = importlib.util.find_spec(name)
    module = importlib.util.module_from_spec(spec)
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = False
        spec.loader.exec_module(module)
    return module


def compilable(fn):
    """`fn` itself, or its compiled-mode twin when the interpreter wrapped it."""
    if hasattr(fn, "cache_key"):  # a JITFunction
        return fn
    return getattr(_compiled_module(fn.fn.__module__), fn.__name__)


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
    """Compile `fn` (a @triton.jit function, not interpreted) for sm_`arch` and report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = compilable(fn)
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


def problems(report: Report) -> list[str]:
    """Why a report fails the AOT check (empty when it passes)."""
    out = []
    if report.spills:
        out.append(f"spills (stack {report.stack} B, local {report.local} B)")
    if report.shared > SHARED_LIMIT[report.arch]:
        out.append(f"shared memory {report.shared} B > {SHARED_LIMIT[report.arch]} B")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=[80, 90])
    parser.add_argument("--module", nargs="+", help="modules of ong_kernels.backends.triton")
    args = parser.parse_args(argv)
    header = "| kernel | arch | config | registers | stack | local | shared (B) |"
    print(header + "\n|---|---|---|---|---|---|---|")
    failed = 0
    for module in args.module or kernel_modules():
        for arch in args.arch:
            for config in configs(module):
                try:
                    report = compile_report(arch=arch, **config)
                except Exception as error:  # a compile error is a result of this check
                    failed += 1
                    name = config["fn"].__name__
                    print(f"| {name} | sm_{arch} | {_config_label(config['constexprs'])} | "
                          f"COMPILE ERROR: {type(error).__name__} | | | |")  # fmt: skip
                    continue
                why = problems(report)
                failed += bool(why)
                print(report.row() + (f" **{'; '.join(why)}**" if why else ""), flush=True)
    print(f"\n{failed} failing configuration(s)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
