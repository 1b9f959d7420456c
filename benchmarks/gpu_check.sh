#!/usr/bin/env bash
# One command for a GPU machine, sized to one short device lease (issue 27): builds
# ong_kernels with CUDA, runs the GPU-relevant tests, the Triton NMF cases, the masked-SGD
# benchmark cases, compute-sanitizer on tiny calls, then the rest of the suite while time is
# left, and prints the summary LAST (the part of the output that surely comes back).
#
#   bash benchmarks/gpu_check.sh             # from anywhere inside the checkout
#   bash benchmarks/gpu_check.sh --dry-run   # here, without a GPU: the same phases, caps and
#                                            # outputs, each phase's command in a cheap form
#
# Time: at most GPU_CHECK_TOTAL_S (default 340 s: a 6-minute target with margin) of wall time,
# build included. Phases run in order, each under `timeout` with its own cap, cut to what is
# left of the total; a phase that no longer fits is reported "skipped (time)", which is not a
# failure. A phase that fails or times out does not stop the next ones.
#
# Output: at most 5 files in $OUT (the device runner's folder: only 8 files come back; default
# build/gpu_check/out), rewritten after EVERY phase (written to a temporary name, then renamed),
# so a run killed from outside loses at most the running phase:
#   summary.txt       what is printed last: phases, test counts and failures, NMF cases, SGD
#                     ratios, ptxas (benchmarks/gpu_check_report.py)
#   results.jsonl     every measured row: phases, NMF cases, pytest-benchmark rows, environment
#   tests_short.txt   per test phase: counts, every failure / error, every test id that passed
#   logs.tgz          every log of build/gpu_check/logs (build, pytest -v, benchmarks, sanitizer)
# Working files stay in build/gpu_check/logs (build/gpu_check_dry/logs for --dry-run).
#
# Build (measured on the 2-core Xeon that has no GPU: nvcc 13 compiles masked_sgd.cu for
# sm_80 + sm_90 + compute_90 in ~4 s of CPU; the whole extension, CPU ISAs included, in ~2
# min of the 2 contended cores): built on the GPU machine, not prebuilt here, because the
# GPU machine's Python (3.12) and torch (2.11, which _C_host builds against) differ from
# this one's (3.11, 2.13): a wheel made here would not import there. Cap 150 s.
#
# Environment: PYTHON (default python3: the machine's interpreter; nothing is downloaded),
# GPU_CHECK_TOTAL_S, GPU_CHECK_CAPS ("phase=seconds ..." overrides of the caps below),
# NMF_CASES (a subset of bench_nmf_gpu.py's cases).
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; fi
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
WORK="$ROOT/build/gpu_check"
if ((DRY)); then WORK="$ROOT/build/gpu_check_dry"; fi # never the real run's logs (its tests run this)
LOGS="$WORK/logs"
OUT_DIR="${OUT:-$WORK/out}"
rm -rf "$LOGS"
mkdir -p "$LOGS" "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-python3}"
if ((DRY)) && [[ -z "${PYTHON:-}" && -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; fi
TOTAL_S="${GPU_CHECK_TOTAL_S:-340}"
RESERVE_S=10 # kept for the last publish and the summary
START_S=$SECONDS
export LOGS PY DRY
# The dry run uses no GPU, even on a GPU machine (the real run's test phase runs it):
# Triton's interpreter runs the kernels on CPU tensors.
if ((DRY)); then export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""; fi

# No download can succeed there: pip fails at once instead of retrying an index, and installs
# into the system interpreter (PEP 668 would refuse an "externally managed" one).
export PIP_NO_INDEX=1 PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONUNBUFFERED=1 # a phase killed by its timeout still leaves its log

# The plan: name, cap (s), optional (a timeout there is "partial", not a failure), what.
# Order of value: the build; the tests that exercise GPU code (a killed run still names what
# passed: -v); the NMF cases issue 9 waits for; the SGD cases; the sanitizer; the rest.
PLAN=(
  "env 20 0 versions, GPU"
  "build 150 0 pip install -e . with CUDA (ptxas report)"
  "tests_gpu 130 0 conformance on cuda, test_triton_nmf, optimizer safety"
  "nmf 120 0 benchmarks/bench_nmf_gpu.py cases in order"
  "sgd_paired 35 0 bench_optim: ours vs fused (paired) + bandwidth, cuda"
  "sgd_providers 45 0 bench_optim: every provider, cuda"
  "memcheck 60 1 compute-sanitizer memcheck: tiny NMF (3 paths) + SGD step"
  "synccheck 40 1 compute-sanitizer synccheck: the persistent kernel"
  "sgd_sizes 40 1 bench_optim: 1000 tensors, 100M params, cuda"
  "tests_rest 300 1 the rest of the test suite (not slow)"
  "aot 120 1 tests/kernels/test_triton_aot.py with this machine's triton"
)
cap_of() { # phase name -> cap (GPU_CHECK_CAPS overrides)
  local item
  for item in ${GPU_CHECK_CAPS:-}; do
    if [[ "${item%%=*}" == "$1" ]]; then echo "${item#*=}"; return; fi
  done
  for item in "${PLAN[@]}"; do
    read -r name cap _ <<<"$item"
    if [[ "$name" == "$1" ]]; then echo "$cap"; return; fi
  done
}

: >"$LOGS/phases.tsv"
FAILED=0

publish() { # everything into $OUT, each file under a temporary name first
  local tmp="$OUT_DIR/.publishing"
  mkdir -p "$tmp"
  timeout 60 "$PY" -m benchmarks.gpu_check_report --logs "$LOGS" --out "$tmp" \
    --elapsed $((SECONDS - START_S)) --total "$TOTAL_S" $( ((DRY)) && echo --dry-run) \
    >"$LOGS/report_stderr.txt" 2>&1 ||
    { echo "gpu_check_report failed (see logs.tgz: report_stderr.txt)" >"$tmp/summary.txt";
      cat "$LOGS/phases.tsv" >>"$tmp/summary.txt"; }
  tar -czf "$tmp/logs.tgz" -C "$WORK" logs 2>/dev/null || true
  local f
  for f in "$tmp"/*; do mv -f "$f" "$OUT_DIR/$(basename "$f")"; done
  rmdir "$tmp" 2>/dev/null || true
}

# run_phase NAME CMD...: run CMD under timeout (the phase cap cut to what is left), output to
# $LOGS/NAME.log, record how it went, publish.
run_phase() {
  local name=$1 optional=0 item
  shift
  for item in "${PLAN[@]}"; do
    read -r n _ opt _ <<<"$item"
    if [[ "$n" == "$name" ]]; then optional=$opt; fi
  done
  local cap left limit log="$LOGS/$name.log"
  cap=$(cap_of "$name")
  left=$((TOTAL_S - RESERVE_S - (SECONDS - START_S)))
  limit=$((cap < left ? cap : left))
  if ((limit < 10)); then
    echo "[gpu_check] $name: skipped, ${left}s left" | tee "$log"
    printf '%s\tskipped (time)\t0\t%s\n' "$name" "$cap" >>"$LOGS/phases.tsv"
    publish
    return 0
  fi
  echo "[gpu_check] $name: start, limit ${limit}s (cap ${cap}s), $((SECONDS - START_S))s elapsed"
  if declare -F "$1" >/dev/null; then set -- bash -uo pipefail -c "$1 \"\$@\"" "$1" "${@:2}"; fi
  local t0=$SECONDS rc=0
  timeout --kill-after=5 "$limit" "$@" >"$log" 2>&1 || rc=$?
  local status=ok
  if ((rc == 124 || rc == 137)); then
    if ((optional)); then status="partial (time)"; else status="TIMEOUT ${limit}s"; FAILED=1; fi
  elif ((rc != 0)); then
    status="FAILED rc=$rc"
    FAILED=1
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" $((SECONDS - t0)) "$cap" >>"$LOGS/phases.tsv"
  echo "[gpu_check] $name: $status in $((SECONDS - t0))s"
  publish
}

# -------------------------------------------------------------------------------- the phases
# Each runs in a child bash (timeout runs programs, not functions).

env_phase() {
  set +e
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  echo "python: $("$PY" --version 2>&1)"
  nvcc --version | tail -n 2
  cmake --version | head -n 1
  command -v compute-sanitizer || echo "compute-sanitizer: not on PATH"
  "$PY" - <<'EOF'
import importlib.util, json, os, torch
info = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    info["gpu"] = torch.cuda.get_device_name()
    info["capability"] = list(torch.cuda.get_device_capability())
for name in ("triton", "pybind11", "pytest", "pytest_benchmark", "hypothesis", "sklearn",
             "ninja", "numpy", "safetensors"):
    spec = importlib.util.find_spec(name)
    info[name] = "MISSING" if spec is None else "present"
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    pass
print(json.dumps(info))
with open(os.path.join(os.environ["LOGS"], "env.json"), "w") as f:
    json.dump(info, f)
dry = os.environ.get("DRY") == "1"
raise SystemExit(0 if (dry or torch.cuda.is_available()) else "no CUDA device visible to torch")
EOF
}

build_phase() {
  if ((DRY)); then
    "$PY" -c "import ong_kernels; print('dry run: the checkout as installed:', ong_kernels.backends_available())"
    return
  fi
  # ONG_PTXAS_VERBOSE=1: ptxas prints registers / spills per kernel (setup.py -> CMake).
  # _C_host has never been built against torch 2.11: if it breaks the build, build without
  # it (the optimizer's host keys then stay in Python).
  ONG_PTXAS_VERBOSE=1 ONG_WITH_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -v -e . ||
    { echo "build with _C_host failed: retrying with ONG_WITH_HOST=0";
      ONG_WITH_HOST=0 ONG_PTXAS_VERBOSE=1 ONG_WITH_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -v -e .; }
  "$PY" -c "from ong_kernels.backends import _host; print('_C_host:', _host.has_host_module())"
  # A build that quietly skipped CUDA is a failure here.
  "$PY" -c "import ong_kernels as o; b = o.backends_available(); print(b); assert b['cuda'], b"
}

GPU_TESTS="tests/kernels/test_masked_sgd_conformance.py tests/kernels/test_nmf_conformance.py tests/test_triton_nmf.py tests/test_optim_safety.py"
# pytest: -v names every test as it ends (a killed phase still says what passed), -rfE lists
# failures and errors at the end, junit XML for the record.
pytest_phase() { # phase-name args...
  local name=$1
  shift
  if ((DRY)); then
    "$PY" -m pytest "$@" --collect-only -q -p no:cacheprovider
  else
    "$PY" -m pytest "$@" -v -rfE -p no:cacheprovider --junitxml="$LOGS/$name.xml"
  fi
}
tests_gpu_phase() {
  # shellcheck disable=SC2086 # a list of files
  pytest_phase tests_gpu $GPU_TESTS -m "not slow"
}
tests_rest_phase() {
  local ignore=() f
  for f in $GPU_TESTS tests/kernels/test_triton_aot.py; do ignore+=("--ignore=$f"); done
  pytest_phase tests_rest tests "${ignore[@]}" -m "not slow"
}
aot_phase() {
  pytest_phase aot tests/kernels/test_triton_aot.py -m "not slow"
}

nmf_phase() {
  local budget=$(($1 - 10))
  if ((DRY)); then
    "$PY" -m benchmarks.bench_nmf_gpu --out "$LOGS" --dry-run --cases resnet56
  else
    # shellcheck disable=SC2086 # NMF_CASES is a list of case names
    "$PY" -m benchmarks.bench_nmf_gpu --out "$LOGS" --budget "$budget" ${NMF_CASES:+--cases $NMF_CASES}
  fi
}

sgd_phase() { # phase-name pytest -k expression
  local name=$1 select=$2
  if ((DRY)); then
    "$PY" -m pytest benchmarks/bench_optim.py -m benchmark -k "$select" --collect-only -q \
      -p no:cacheprovider
  else
    "$PY" -m pytest benchmarks/bench_optim.py -m benchmark -k "cuda and ($select)" -q \
      -p no:cacheprovider --benchmark-json="$LOGS/bench_$name.json" \
      --benchmark-columns=median,iqr,rounds
  fi
}

sanitizer_phase() { # tool, then benchmarks.gpu_sanitize arguments
  local tool=$1 sanitizer
  shift
  if ((DRY)); then
    echo "dry run: the sanitized program without compute-sanitizer ($tool), two cases"
    "$PY" -m benchmarks.gpu_sanitize --only persistent sgd
    return
  fi
  sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
  if [[ -z "$sanitizer" ]]; then echo "compute-sanitizer not found"; return 1; fi
  # Without the caching allocator every tensor is its own allocation, so memcheck sees an
  # access past a tensor's end (inside a cached block it would not).
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" --error-exitcode 1 \
    --print-limit 20 "$PY" -m benchmarks.gpu_sanitize "$@"
}
export -f env_phase build_phase pytest_phase tests_gpu_phase tests_rest_phase aot_phase \
  nmf_phase sgd_phase sanitizer_phase
export GPU_TESTS

echo "[gpu_check] $( ((DRY)) && echo "DRY RUN: ")plan, ${TOTAL_S}s in all, outputs in $OUT_DIR:"
for item in "${PLAN[@]}"; do
  read -r name cap opt what <<<"$item"
  printf '[gpu_check]   %-14s cap %4ss%s  %s\n' "$name" "$(cap_of "$name")" \
    "$( ((opt)) && echo " (optional)" || echo "           ")" "$what"
done

run_phase env env_phase
run_phase build build_phase
grep -E "ptxas info|bytes stack frame|spill" "$LOGS/build.log" >"$LOGS/ptxas.txt" 2>/dev/null || true
run_phase tests_gpu tests_gpu_phase
nmf_cap=$(cap_of nmf)
nmf_left=$((TOTAL_S - RESERVE_S - (SECONDS - START_S)))
run_phase nmf nmf_phase $((nmf_cap < nmf_left ? nmf_cap : nmf_left))
run_phase sgd_paired sgd_phase sgd_paired "paired or bandwidth"
run_phase sgd_providers sgd_phase sgd_providers "test_masked_sgd_step and not paired and not sizes"
run_phase memcheck sanitizer_phase memcheck
run_phase synccheck sanitizer_phase synccheck --only persistent
run_phase sgd_sizes sgd_phase sgd_sizes "sizes"
run_phase tests_rest tests_rest_phase
run_phase aot aot_phase

echo
echo "[gpu_check] files in $OUT_DIR: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
cat "$OUT_DIR/summary.txt"
exit "$FAILED"
