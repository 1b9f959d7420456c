"""Ahead-of-time compilation of Triton kernels for real GPU targets, on a machine without one.

`compile_report` lowers a kernel with triton.compile(ASTSource(...), target=GPUTarget(...))
to PTX and a cubin (Triton ships its own ptxas) and reads the resources from the cubin with
the cuobjdump that ships with Triton: registers, stack (spills land there), local memory and
shared memory. The tests compile every configuration the dispatchers can pick; the reports go
into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import re
import subprocess
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


def compile_report(
    fn, signature: dict, constexprs: dict, *, arch: int, num_warps: int, num_stages: int = 2
) -> Report:
    """Compile `fn` (a @triton.jit function, not interpreted) for sm_`arch` and report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn, signature, constexprs=constexprs)
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
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
