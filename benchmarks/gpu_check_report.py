"""gpu_check.sh's outputs, rebuilt from its working logs after every phase:

    python -m benchmarks.gpu_check_report --logs build/gpu_check/logs --out DIR \
        --elapsed SECONDS --total SECONDS [--dry-run]

writes DIR/summary.txt (printed last by gpu_check.sh: it must fit the 12,000 characters of
output that come back, so every section is capped), DIR/results.jsonl (every measured row:
the phases, the environment, each NMF case of bench_nmf_gpu.py, each pytest-benchmark row)
and DIR/tests_short.txt (per test phase: counts, failures and errors, the ids that passed).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

SUMMARY_LIMIT = 9000  # characters; gpu_check.sh's own lines and the file list fit beside it
TEST_PHASES = ("tests_gpu", "tests_rest", "aot")
# pytest -v: "tests/x.py::test_y[case] PASSED  [ 12%]"; -rfE: "FAILED tests/x.py::t - why"
_VERBOSE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_SHORT = re.compile(r"^(FAILED|ERROR) (\S+::\S+)(?: - (.*))?")


def phases(logs: Path) -> list[dict]:
    rows = []
    path = logs / "phases.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, status, seconds, cap = line.split("\t")
        rows.append({"phase": name, "status": status, "seconds": int(seconds), "cap": int(cap)})
    return rows


def test_results(log: Path) -> dict:
    """Per-test outcomes of a pytest -v log (a killed run has no final line: what ran is
    still named), and pytest's last summary line if it got there."""
    outcomes, why = {}, {}
    last = ""
    for line in log.read_text(errors="replace").splitlines():
        if m := _VERBOSE.match(line):
            outcomes[m.group(1)] = m.group(2)
        elif m := _SHORT.match(line):
            outcomes[m.group(2)] = m.group(1)
            why[m.group(2)] = (m.group(3) or "")[:200]
        elif re.match(r"^=+ .*(passed|failed|error|skipped|no tests ran).* =+$", line):
            last = line.strip("= ")
        elif re.match(r"^\d+ tests? collected", line) or re.match(r"^\d+/\d+ tests", line):
            last = line.strip()
    counts = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return {"outcomes": outcomes, "why": why, "counts": counts, "last": last}


def bench_rows(logs: Path) -> list[dict]:
    rows = []
    for path in sorted(logs.glob("bench_*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for b in data.get("benchmarks", []):
            stats = b.get("stats", {})
            rows.append({
                "kind": "bench", "suite": path.stem, "name": b.get("fullname", b.get("name")),
                "median_s": stats.get("median"), "iqr_s": stats.get("iqr"),
                "rounds": stats.get("rounds"), "extra_info": b.get("extra_info", {}),
            })  # fmt: skip
    return rows


def ratio_tables(logs: Path) -> str:
    """benchmarks.report's ratio tables (ours / peer; paired ratios) over every benchmark JSON
    of the run; its whole report goes to logs/report.txt."""
    from benchmarks import report

    rows = []
    for path in sorted(logs.glob("bench_*.json")):
        try:
            rows += report.load_rows(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, ValueError):
            continue
    if not rows:
        return ""
    out = [report.ratio_table(rows)]
    if any(row.paired for row in rows):
        out.append(report.paired_table(rows))
    rates = report.rates(rows)
    (logs / "report.txt").write_text(
        "\n\n".join([report.rate_table(rates), report.measurement_table(rows, rates), *out])
    )
    return "\n\n".join(out)


def ptxas(logs: Path) -> str:
    path = logs / "ptxas.txt"
    if not path.exists() or not path.stat().st_size:
        return "ptxas: no report (no CUDA build in this run)"
    text = path.read_text(errors="replace")
    registers = [int(x) for x in re.findall(r"Used (\d+) registers", text)]
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return (f"ptxas: {len(registers)} kernel reports, max {max(registers, default=0)} registers, "
            f"{sum(1 for s in spills if s)} spill lines with bytes > 0")  # fmt: skip


def nmf_rows(logs: Path) -> list[dict]:
    path = logs / "nmf_gpu.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append({"kind": "nmf", **json.loads(line)})
        except json.JSONDecodeError:
            continue
    return rows


def _flat(row: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _figures(row: dict, limit: int = 500) -> str:
    """A case's figures on one line (nested ones as `batch.figure`), cut at `limit`."""
    skip = {"kind", "case", "device", "status", "why", "trace"}
    text = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in _flat({k: v for k, v in row.items() if k not in skip}).items()
    )
    return text if len(text) <= limit else text[: limit - 3] + "..."


def build(logs: Path, elapsed: int, total: int, dry: bool) -> tuple[str, list[dict], str]:
    env = {}
    if (logs / "env.json").exists():
        env = json.loads((logs / "env.json").read_text())
    phase_rows = phases(logs)
    tests = {
        p: test_results(logs / f"{p}.log") for p in TEST_PHASES if (logs / f"{p}.log").exists()
    }
    nmf = nmf_rows(logs)
    bench = bench_rows(logs)
    results = [{"kind": "env", **env}] + [{"kind": "phase", **r} for r in phase_rows] + nmf + bench
    for name, t in tests.items():
        results.append({"kind": "tests", "phase": name, "counts": t["counts"], "last": t["last"]})

    gpu = env.get("gpu", "no GPU (dry run)" if dry else "no GPU")
    lines = [
        f"=== gpu_check{' DRY RUN' if dry else ''}: {gpu} | torch {env.get('torch', '?')} "
        f"(CUDA {env.get('cuda_runtime', '?')}) | triton {env.get('triton', '?')} | "
        f"{elapsed}s of {total}s ===",
        f"{'phase':<14} {'status':<18} {'secs':>5} {'cap':>5}",
    ]
    lines += [
        f"{r['phase']:<14} {r['status']:<18} {r['seconds']:>5} {r['cap']:>5}" for r in phase_rows
    ]
    lines.append("")
    for name, t in tests.items():
        counts = ", ".join(f"{v} {k.lower()}" for k, v in sorted(t["counts"].items()))
        lines.append(f"{name}: {counts or 'no outcomes'}{' | ' + t['last'] if t['last'] else ''}")
        bad = [(k, v) for k, v in t["outcomes"].items() if v in ("FAILED", "ERROR")]
        for test_id, outcome in bad[:15]:
            lines.append(f"  {outcome} {test_id} {t['why'].get(test_id, '')}".rstrip()[:300])
        if len(bad) > 15:
            lines.append(f"  ... {len(bad) - 15} more in tests_short.txt")
    if nmf:
        lines.append("")
        lines.append("NMF (bench_nmf_gpu.py):")
        for r in nmf:
            why = f" [{r['why'][:160]}]" if r.get("why") else ""
            lines.append(f"  {r['case']:<18} {r['status']:<7}{why} {_figures(r)}")
    ratios = ratio_tables(logs)
    if ratios:
        lines += ["", ratios[:2500]]
    lines += ["", ptxas(logs)]
    summary = "\n".join(lines)
    if len(summary) > SUMMARY_LIMIT:
        summary = summary[: SUMMARY_LIMIT - 60] + "\n... (cut; the whole summary is in logs.tgz)"
    short = []
    for name, t in tests.items():
        short.append(f"== {name}: {t['counts']} {t['last']}")
        for test_id, outcome in t["outcomes"].items():
            reason = t["why"].get(test_id, "")
            short.append(f"{outcome} {test_id}{' - ' + reason if reason else ''}")
    return summary + "\n", results, "\n".join(short) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--elapsed", type=int, default=0)
    parser.add_argument("--total", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    summary, results, short = build(args.logs, args.elapsed, args.total, args.dry_run)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.logs / "summary.txt").write_text(summary)
    (args.out / "summary.txt").write_text(summary)
    (args.out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    (args.out / "tests_short.txt").write_text(short)
    return 0


if __name__ == "__main__":
    sys.exit(main())
