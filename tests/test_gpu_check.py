"""benchmarks/gpu_check.sh --dry-run: the whole GPU check on this machine (no GPU), each
phase's command in a cheap form (collect-only pytest, the interpreter), with the real plan's
phases, caps and outputs: what the first GPU lease will run must work the first time."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
# The device runner's limits: 8 files come back from $OUT (2 folders deep at most); one
# command runs 10 minutes at most; the script's own target is 6 minutes, build included.
MAX_FILES = 8
TARGET_S = 360


def _plan(stdout: str) -> dict[str, int]:
    return {
        m[1]: int(m[2]) for m in re.finditer(r"^\[gpu_check\]\s+(\w+)\s+cap\s+(\d+)s", stdout, re.M)
    }


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils timeout")  # fmt: skip
def test_dry_run_keeps_the_leases_limits(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, GPU_CHECK_CAPS="aot=5")
    env.pop("TRITON_INTERPRET", None)  # the script sets it for its dry run
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=900, check=False)  # fmt: skip
    stdout = done.stdout
    assert done.returncode == 0, stdout[-4000:] + done.stderr[-2000:]
    # The plan is printed first, with every phase's cap; the total fits the target.
    plan = _plan(stdout)
    assert list(plan)[:4] == ["env", "build", "tests_gpu", "nmf"], plan
    assert plan["aot"] == 5
    total = int(re.search(r"plan, (\d+)s in all", stdout)[1])
    assert total <= TARGET_S - 20
    # At most 8 files in $OUT, nothing deeper, no temporary left behind.
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= MAX_FILES, files
    assert {p.name for p in files} == {
        "summary.txt",
        "results.jsonl",
        "tests_short.txt",
        "logs.tgz",
    }
    # Every phase ran within its cap (plus timeout's kill grace), the one capped below the
    # 10 s minimum was reported skipped, not failed; the summary is the last thing printed.
    summary = (out / "summary.txt").read_text()
    status = r"ok|skipped \(time\)|partial \(time\)|FAILED rc=\d+|TIMEOUT \d+s"
    rows = dict(re.findall(rf"^(\w+)\s+({status})\s", summary, re.M))
    assert set(rows) == set(plan), rows
    assert rows["aot"] == "skipped (time)"
    assert all(v in ("ok", "skipped (time)", "partial (time)") for v in rows.values()), rows
    for name, secs, cap in re.findall(r"^(\w+)\s+\S.*?\s+(\d+)\s+(\d+)$", summary, re.M):
        assert int(secs) <= int(cap) + 6, (name, secs, cap)
    assert stdout.rstrip().endswith(summary.rstrip())
    assert "NMF (bench_nmf_gpu.py):" in summary and "resnet56" in summary
    assert len(summary) < 12_000
    # The test phases collected their files (a wrong path or marker would fail here).
    assert re.search(r"tests_gpu: .*\d+ tests collected", summary), summary


def test_report_of_a_killed_phase_names_what_ran(tmp_path):
    """What the GPU run will hand back when its test phase is killed mid-run: the pytest -v
    lines name every test that ended, failures are listed, nested NMF figures are flattened,
    and every row lands in results.jsonl."""
    import json

    from benchmarks import gpu_check_report

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "phases.tsv").write_text("env\tok\t3\t20\ntests_gpu\tTIMEOUT 130s\t130\t130\n")
    (logs / "tests_gpu.log").write_text(
        "tests/a.py::test_x[cuda] PASSED [  1%]\n"
        "tests/a.py::test_y[triton-cuda] FAILED [  2%]\n"
        "tests/b.py::test_z PASSED [  3%]\n"
    )
    nmf = {"case": "correctness", "status": "FAIL", "why": "n_iter", "bf16": {"error_gap": 0.5}}
    (logs / "nmf_gpu.jsonl").write_text(json.dumps(nmf) + "\n")
    (logs / "env.json").write_text(json.dumps({"gpu": "NVIDIA H100", "triton": "3.6.0"}))
    out = tmp_path / "out"
    assert gpu_check_report.main(["--logs", str(logs), "--out", str(out), "--total", "340"]) == 0
    summary = (out / "summary.txt").read_text()
    assert "tests_gpu      TIMEOUT 130s" in summary
    assert "tests_gpu: 1 failed, 2 passed" in summary
    assert "FAILED tests/a.py::test_y[triton-cuda]" in summary
    assert "bf16.error_gap=0.5" in summary and "NVIDIA H100" in summary
    kinds = [json.loads(line)["kind"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert kinds == ["env", "phase", "phase", "nmf", "tests"]
    assert "PASSED tests/b.py::test_z" in (out / "tests_short.txt").read_text()
