"""Print the ratio tables of pytest-benchmark JSON files and append their rows to a CSV.

    python -m benchmarks.report build/bench.json [MORE.json ...] [--csv PATH | --no-csv]

Several files (e.g. one per suite, as gpu_check.sh writes them) are reported as one run.

Rows are labelled by ``benchmarks/conftest.py``'s ``measure`` fixture (extra_info: kernel,
provider, workload, device, flops, bytes). Providers whose name starts with ``ours`` are
ours; every other provider of the same kernel and workload is a peer.

Three tables (four when a benchmark recorded paired ratios):
1. rates: fp32 matmul GFLOP/s and memory GB/s per device, from the ``matmul`` and
   ``bandwidth`` benchmarks of the same run;
2. every measurement: median, p20-p80 spread, rounds, and the floor = max(flops / matmul
   rate, bytes / best bandwidth) of the device it ran on, with median / floor;
3. ratios: ours / each peer per workload (below 1: ours is faster);
4. paired ratios: benchmarks that timed ours and a peer alternately, call by call, record
   the median (p20, p80) of the per-pair ratios as extra_info "paired" = {"ours", "peer",
   "kernel", "pairs", "median", "p20", "p80"}; slow drift of a shared machine cancels there.

The CSV gets one row per measurement with fixed columns (CSV_COLUMNS), so runs on different
machines and commits accumulate in one file; times are in seconds.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CSV_COLUMNS = [
    "kernel",
    "provider",
    "workload",
    "median",
    "p20",
    "p80",
    "device_name",
    "torch_version",
    "commit",
]
RATE_KERNELS = ("matmul", "bandwidth")  # measured to derive floors, not compared


@dataclass(frozen=True)
class Row:
    kernel: str
    provider: str
    workload: str
    device: str
    device_name: str
    median: float
    p20: float
    p80: float
    rounds: int
    flops: float | None
    bytes: float | None
    torch_version: str
    commit: str
    paired: dict | None = None

    @property
    def ours(self) -> bool:
        return self.provider.startswith("ours")


def _label_fallback(bench: dict) -> dict:
    """Labels for a benchmark that did not go through ``measure`` (best effort, never guessed
    numbers): kernel from the file name, provider/workload from its parameters."""
    path = bench["fullname"].split("::", 1)[0]
    stem = Path(path).stem
    params = bench.get("params") or {}
    return {
        "kernel": stem.removeprefix("bench_"),
        "provider": str(params.get("provider", bench["name"].split("[", 1)[0])),
        "workload": str(params.get("workload", bench.get("param") or "-")),
        "device": str(params.get("device", "-")),
        "device_name": "-",
    }


def run_info(data: dict) -> tuple[str, str]:
    """(torch version, commit id with "-dirty" when the tree had changes) of one JSON file."""
    torch_version = (data.get("machine_info", {}).get("ong") or {}).get("torch", "unknown")
    commit_info = data.get("commit_info") or {}
    commit = commit_info.get("id") or "unknown"
    if commit_info.get("dirty"):
        commit += "-dirty"
    return torch_version, commit


def load_rows(data: dict) -> list[Row]:
    """One Row per benchmark of a pytest-benchmark JSON document (``--benchmark-json``)."""
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError("not a pytest-benchmark JSON file: no 'benchmarks' list")
    torch_version, commit = run_info(data)
    rows = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info") or {}
        labels = _label_fallback(bench)
        for key in labels:
            if key in info:
                labels[key] = str(info[key])
        samples = bench["stats"].get("data")
        if not samples:
            raise ValueError(
                f"{bench['fullname']}: no per-round data; write the file with "
                "--benchmark-json (which includes it) or --benchmark-save-data"
            )
        p20, median, p80 = np.percentile(np.asarray(samples, dtype=np.float64), [20, 50, 80])
        rows.append(
            Row(
                **labels,
                median=float(median),
                p20=float(p20),
                p80=float(p80),
                rounds=len(samples),
                flops=info.get("flops"),
                bytes=info.get("bytes"),
                torch_version=torch_version,
                commit=commit,
                paired=info.get("paired"),
            )
        )
    return rows


def rates(rows: list[Row]) -> dict[str, dict[str, float]]:
    """device_name -> {"flop/s": best matmul rate, "byte/s": best bandwidth, and each
    bandwidth provider's own "<provider> byte/s"} from the matmul and bandwidth benchmarks."""
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        r = out.setdefault(row.device_name, {}) if row.kernel in RATE_KERNELS else {}
        if row.kernel == "matmul" and row.flops:
            r["flop/s"] = max(r.get("flop/s", 0.0), row.flops / row.median)
        elif row.kernel == "bandwidth" and row.bytes:
            r[f"{row.provider} byte/s"] = row.bytes / row.median
            r["byte/s"] = max(r.get("byte/s", 0.0), row.bytes / row.median)
    return out


def floor(row: Row, device_rates: dict[str, dict[str, float]]) -> float | None:
    """The roofline bound of a row: max(flops / flop rate, bytes / bandwidth), or None."""
    r = device_rates.get(row.device_name, {})
    bounds = []
    if row.flops and "flop/s" in r:
        bounds.append(row.flops / r["flop/s"])
    if row.bytes and "byte/s" in r:
        bounds.append(row.bytes / r["byte/s"])
    return max(bounds) if bounds else None


def fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def table(headers: list[str], body: list[list[str]]) -> str:
    if not body:
        return f"{'  '.join(headers)}\n(none)"
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(out)


def rate_table(device_rates: dict[str, dict[str, float]]) -> str:
    body = []
    for name, r in device_rates.items():
        bandwidths = [
            f"{k.removesuffix(' byte/s')} {v / 1e9:.1f}" for k, v in r.items() if " " in k
        ]
        body.append(
            [
                name,
                f"{r['flop/s'] / 1e9:.1f}" if "flop/s" in r else "not measured",
                ", ".join(bandwidths) or "not measured",
            ]
        )
    return table(["device", "fp32 matmul GFLOP/s", "memory GB/s"], body)


def measurement_table(rows: list[Row], device_rates: dict[str, dict[str, float]]) -> str:
    body = []
    for row in sorted(rows, key=lambda r: (r.kernel, r.workload, not r.ours, r.median)):
        if row.kernel in RATE_KERNELS:
            continue
        f = floor(row, device_rates)
        body.append(
            [
                row.kernel,
                row.workload,
                row.provider,
                row.device,
                fmt_time(row.median),
                f"{fmt_time(row.p20)} - {fmt_time(row.p80)}",
                str(row.rounds),
                fmt_time(f) if f else "-",
                f"{row.median / f:.1f}x" if f else "-",
            ]
        )
    headers = ["kernel", "workload", "provider", "device", "median", "p20 - p80", "rounds"]
    return table([*headers, "floor", "median/floor"], body)


def ratio_table(rows: list[Row]) -> str:
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        if row.kernel not in RATE_KERNELS:
            groups.setdefault((row.kernel, row.workload), []).append(row)
    body = []
    for (kernel, workload), members in sorted(groups.items()):
        for ours in sorted((r for r in members if r.ours), key=lambda r: r.provider):
            for peer in sorted((r for r in members if not r.ours), key=lambda r: r.median):
                ratio = ours.median / peer.median
                verdict = f"{1 / ratio:.2f}x faster" if ratio < 1 else f"{ratio:.2f}x slower"
                body.append(
                    [
                        kernel,
                        workload,
                        f"{ours.provider} ({ours.device})",
                        f"{peer.provider} ({peer.device})",
                        f"{ratio:.3f}",
                        verdict,
                    ]
                )
    return table(["kernel", "workload", "ours", "peer", "ours/peer", "ours is"], body)


def paired_table(rows: list[Row]) -> str:
    body = [
        [
            row.paired["kernel"],
            row.workload,
            f"{row.paired['ours']} ({row.device})",
            f"{row.paired['peer']} ({row.device})",
            f"{row.paired['median']:.3f}",
            f"{row.paired['p20']:.3f} - {row.paired['p80']:.3f}",
            str(row.paired["pairs"]),
        ]
        for row in sorted(rows, key=lambda r: (r.kernel, r.workload, r.device))
        if row.paired
    ]
    headers = ["kernel", "workload", "ours", "peer", "paired ours/peer", "p20 - p80", "pairs"]
    return table(headers, body)


def csv_rows(rows: list[Row]) -> list[list[str]]:
    return [
        [
            r.kernel,
            r.provider,
            r.workload,
            f"{r.median:.6g}",
            f"{r.p20:.6g}",
            f"{r.p80:.6g}",
            r.device_name,
            r.torch_version,
            r.commit,
        ]
        for r in rows
    ]


def append_csv(path: Path, lines: list[list[str]]) -> None:
    """Append to ``path`` (header written when the file is new; a different header is an error)."""
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), None)
        if header != CSV_COLUMNS:
            raise ValueError(f"--csv: {path} has columns {header}, expected {CSV_COLUMNS}")
        new = False
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        new = True
    with path.open("a", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(CSV_COLUMNS)
        writer.writerows(lines)


def describe_run(path: Path, data: dict) -> str:
    """One line per JSON file: versions, commit, and how busy the machine was."""
    torch_version, commit = run_info(data)
    info = data.get("machine_info", {}).get("ong") or {}
    line = f"{path}: torch {torch_version}, commit {commit}"
    # Measured from /proc/stat over the run (the load average lags by a minute: it still
    # showed 3.1 at the start of a run during which others used 0.01 cores).
    other, cpus = info.get("other_cores_busy"), info.get("cpu_count")
    if other is not None and cpus:
        line += f"; other processes kept {other:.2f} of {cpus} cores busy during the run"
        # More than a tenth of the cores taken by others shows up in the CPU numbers.
        if other > 0.1 * cpus:
            line += " - BUSY MACHINE: CPU numbers are skewed"
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "json", type=Path, nargs="+", help="pytest-benchmark --benchmark-json file(s)"
    )
    parser.add_argument(
        "--csv",
        type=Path,
        default=Path("build/bench_history.csv"),
        help="CSV to append the rows to (default: %(default)s)",
    )
    parser.add_argument("--no-csv", action="store_true", help="print only, append nothing")
    args = parser.parse_args(argv)

    rows = []
    for path in args.json:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            file_rows = load_rows(data)
        except (OSError, json.JSONDecodeError, ValueError) as exc:
            parser.error(f"json: cannot use {path}: {exc}")
        if not file_rows:
            parser.error(f"json: {path} holds no benchmarks (did they all fail or skip?)")
        rows += file_rows
        print(describe_run(path, data))
    device_rates = rates(rows)
    print()
    print(rate_table(device_rates))
    print()
    print(measurement_table(rows, device_rates))
    print()
    print(ratio_table(rows))
    if any(row.paired for row in rows):
        print()
        print(paired_table(rows))
    if not args.no_csv:
        try:
            append_csv(args.csv, csv_rows(rows))
        except ValueError as exc:
            parser.error(str(exc))
        print(f"\nappended {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
