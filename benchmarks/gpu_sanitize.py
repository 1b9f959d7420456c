"""What gpu_check.sh runs under compute-sanitizer: one tiny NMF solve on each Triton path
(persistent, grouped one-chunk, grouped with several rank blocks, with stopping checks) and
one masked SGD step per GPU backend (mixed dtypes, masks, momentum, a misaligned tensor),
each compared with the reference. Tiny on purpose: memcheck slows kernels ~10-100x and
instruments every launch of the process.

    compute-sanitizer --tool memcheck --error-exitcode 1 python -m benchmarks.gpu_sanitize
    compute-sanitizer --tool synccheck --error-exitcode 1 python -m benchmarks.gpu_sanitize \
        --only persistent

Without a GPU it runs on CPU tensors under Triton's interpreter (gpu_check.sh --dry-run).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():  # before ong_kernels imports any Triton code
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ong_kernels import _ops
from ong_kernels._bitmask import pack_mask
from ong_kernels.backends import registry
from ong_kernels.backends.triton import nmf as tnmf

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (name, shapes (m, n, r)): one launch group each on a GPU; the interpreter gets them smaller.
NMF_CASES = {
    "persistent": [(20, 30, 4), (64, 9, 3)],
    "grouped": [(300, 260, 8), (270, 300, 24)],
    "rank-blocks": [(90, 100, 80)],
}


def _close(got, want, what: str) -> None:
    if not torch.allclose(got, want, atol=1e-5, rtol=1e-3):
        raise SystemExit(f"{what}: differs from the reference by {(got - want).abs().max()}")


def nmf_case(name: str, shapes) -> None:
    if DEVICE == "cpu":  # the interpreter: a few hundred times smaller, same paths
        shapes = [(max(r + 2, m // 10), max(r + 2, n // 10), r) for m, n, r in shapes]
        tnmf.PERSISTENT_MAX_ENTRIES = 0 if name != "persistent" else 10**6
    gen = torch.Generator().manual_seed(0)
    vs = [torch.rand(m, n, generator=gen).to(DEVICE) for m, n, _ in shapes]
    ws = [torch.rand(m, r, generator=gen).add_(0.05).to(DEVICE) for m, _, r in shapes]
    hs = [torch.rand(r, n, generator=gen).add_(0.05).to(DEVICE) for _, n, r in shapes]
    out = {}
    for backend in ("triton", "reference"):
        w, h = [t.clone() for t in ws], [t.clone() for t in hs]
        n_iter = _ops.nmf_mu_(vs, w, h, 11, 1e-9, backend)  # a stopping check at 10
        out[backend] = (w, h, n_iter.cpu())
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    assert out["triton"][2].tolist() == out["reference"][2].tolist(), out
    for i in range(len(shapes)):
        _close(out["triton"][0][i], out["reference"][0][i], f"nmf {name} W[{i}]")
        _close(out["triton"][1][i], out["reference"][1][i], f"nmf {name} H[{i}]")
    print(f"nmf {name}: {len(shapes)} matrices, n_iter {out['triton'][2].tolist()}: ok")


def sgd_case() -> None:
    gen = torch.Generator().manual_seed(1)
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    sizes = [4099, 1, 1000, 37]
    params = [
        torch.randn(n, generator=gen).to(DEVICE, d) for n, d in zip(sizes, dtypes, strict=True)
    ]
    params[0] = torch.randn(sizes[0] + 1, generator=gen).to(DEVICE)[1:]  # misaligned
    grads = [torch.randn(p.numel(), generator=gen).to(DEVICE, p.dtype) for p in params]
    bufs = [torch.randn(p.numel(), generator=gen).to(DEVICE, p.dtype) for p in params]
    bits = [pack_mask((torch.rand(p.numel(), generator=gen) < 0.5).to(DEVICE)) for p in params]
    bits[2] = None
    hyper = (0.05, 0.9, 0.0, 1e-3, True, False, False)
    want = [p.clone() for p in params], [b.clone() for b in bufs]
    _ops.masked_sgd_step_(want[0], grads, want[1], bits, *hyper, "reference")
    for backend in ("triton", "cuda"):
        kernel = registry.get("masked_sgd_step", backend)
        if not (kernel.serves(DEVICE) and kernel.available()):
            print(f"sgd {backend}: not available here")
            continue
        got = [p.clone() for p in params], [b.clone() for b in bufs]
        _ops.masked_sgd_step_(got[0], grads, got[1], bits, *hyper, backend)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        for i in range(len(params)):
            for a, b, what in ((got[0][i], want[0][i], "param"), (got[1][i], want[1][i], "buf")):
                tol = 1e-2 if a.dtype in (torch.float16, torch.bfloat16) else 1e-5
                if not torch.allclose(a.double(), b.double(), atol=tol, rtol=tol):
                    raise SystemExit(f"sgd {backend} {what} {i} differs from the reference")
        print(f"sgd {backend}: {len(params)} tensors: ok")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=[*NMF_CASES, "sgd"], nargs="+")
    args = parser.parse_args(argv)
    for name in args.only or [*NMF_CASES, "sgd"]:
        if name == "sgd":
            sgd_case()
        else:
            nmf_case(name, NMF_CASES[name])
    return 0


if __name__ == "__main__":
    sys.exit(main())
