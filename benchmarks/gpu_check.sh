#!/usr/bin/env bash
# GPU check of atso-fast on a fresh CUDA machine with no network (Python 3.12, PyTorch CUDA,
# CuPy, nvcc, cmake, ninja, compute-sanitizer). In one 8-minute budget it
#   1. installs the optional wheels from .carry/wheels (if any) into /tmp/site,
#   2. builds atso_fast._C with CUDA in place (cmake directly; `pip install -e .` as fallback),
#   3. runs `pytest -m cuda tests/test_kernels.py tests/test_kernel_probabilities.py` (every kernel on CUDA against the NumPy
#      reference, and bit for bit against the CPU kernels), then the same under
#      `compute-sanitizer --tool memcheck`, and one small test under `--tool racecheck`; then
#      `pytest -m cuda tests/test_preprocess.py` (resampling on CUDA tensors vs the CPU),
#   4. runs benchmarks/bench_kernels.py and benchmarks/bench_relabel.py with --device cuda,
#      `atso-fast bench --device cuda`, the CUDA pytest-benchmark suites and, if time is left,
#      benchmarks/bench_archive.py --device cuda,
#   5. prints one summary table (and the `atso-fast bench` table).
# Steps that no longer fit the budget are reported as skipped. On a machine with no visible CUDA
# device the check stops right after machine_info (step gpu: FAIL, everything else skipped).
# Exit status: 0 when every step that ran passed, 1 otherwise.
#
# Usage, from the repository root:   bash benchmarks/gpu_check.sh
# Environment: OUT       folder for results (the device tool's $OUT; at most 8 files land
#                        there: summary.txt, the benchmark JSONs and logs.tgz with every log)
#              PYTHON    interpreter (default python3)
#              CUDA_ARCH CMAKE_CUDA_ARCHITECTURES (default: the GPU's compute capability)
#              BUDGET_S  total seconds (default 480)
#              WHEELS    wheel folder (default .carry/wheels)
#
# Optional wheels. The machine already has torch, numpy, onnx, onnxruntime, onnxscript, pytest,
# pytest-benchmark, pybind11, cmake and ninja; monai (bench_relabel, the built-in U-Net),
# nibabel and isal (archive I/O) must be carried. Fill the git-ignored folder once on a machine
# with PyPI access (about 8 MiB), then name `.carry` in the device tool's `carry` list:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .carry/wheels monai==1.6.1 nibabel==5.4.2 isal==1.9.1
#
# Add `onnx onnxruntime` to that command only to replace the machine's own versions (onnx
# 1.23.1, onnxruntime 1.30.0 there); onnxruntime-gpu and tensorrt are too large to carry (64 MiB
# limit), so those runtimes are listed as skipped. The wheels are installed with
#   pip install --no-index --no-deps --target /tmp/site .carry/wheels/*.whl
# and /tmp/site is put on PYTHONPATH.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-480}
WHEELS=${WHEELS:-.carry/wheels}
WORK=$(mktemp -d /tmp/atso-gpu-check.XXXXXX)
DEADLINE=$((SECONDS + BUDGET_S))
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

declare -a NAMES=() STATES=() TIMES=()
BUILD_OK=0

record() {  # record NAME STATE SECONDS
  NAMES+=("$1"); STATES+=("$2"); TIMES+=("$3")
  printf '== %-22s %-10s %5ss\n' "$1" "$2" "$3"
}

# step NAME MAX_S MIN_S COMMAND...: run COMMAND with a timeout of min(MAX_S, time left), log to
# $WORK/NAME.log; skipped when less than MIN_S seconds are left.
step() {
  local name=$1 max_s=$2 min_s=$3
  shift 3
  local left=$((DEADLINE - SECONDS)) limit=$max_s start=$SECONDS rc
  if ((left < min_s)); then
    record "$name" "skipped" 0
    echo "   (only ${left}s of the budget left, needs ${min_s}s)" >>"$WORK/$name.log"
    return 0
  fi
  ((left < limit)) && limit=$left
  echo "== $name (limit ${limit}s): $*"
  # bash -c so that exported shell functions work as steps too
  timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  if ((rc == 0)); then
    record "$name" "ok" $((SECONDS - start))
  elif ((rc == 124 || rc == 137)); then
    record "$name" "TIMEOUT" $((SECONDS - start))
  else
    record "$name" "FAIL($rc)" $((SECONDS - start))
  fi
  tail -n 5 "$WORK/$name.log" | sed 's/^/   /'
  return "$rc"
}

cuda_step() {  # a step that needs the CUDA build
  if ((BUILD_OK)); then
    step "$@"
  else
    record "$1" "skipped" 0
  fi
}

machine_info() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
  "$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, torch.version.cuda, torch.cuda.is_available())'
  nvcc --version | tail -n 2
  compute-sanitizer --version | head -n 2
  cmake --version | head -n 1
}

install_wheels() {
  "$PY" -m pip install --no-index --no-deps --no-compile --quiet --target /tmp/site "$WHEELS"/*.whl
}

cuda_arch() {
  local cap
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
  echo "${CUDA_ARCH:-${cap:-80;90}}"
}

gpu_count() {  # CUDA devices the driver lists (0 without a driver)
  nvidia-smi -L 2>/dev/null | grep -c '^GPU '
}

gpu_visible() {
  local n
  n=$(gpu_count)
  echo "CUDA devices: $n"
  ((n > 0)) || { echo "no CUDA device visible (nvidia-smi -L lists none): nothing to check"; return 1; }
}

build_cmake() {
  local pybind_dir
  pybind_dir=$("$PY" -m pybind11 --cmakedir) || return 1
  cmake -S . -B build/gpu-check -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DPython_EXECUTABLE="$(command -v "$PY")" -Dpybind11_DIR="$pybind_dir" \
    -DATSO_FAST_CUDA=ON -DATSO_FAST_VERSION=gpu-check -DCMAKE_CUDA_ARCHITECTURES="$(cuda_arch)" \
    -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$REPO/atso_fast" &&
    cmake --build build/gpu-check -j "$(nproc)"
}

build_pip() {
  ATSO_FAST_CUDA=1 CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=$(cuda_arch)" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
}

check_build() {
  "$PY" -c 'import sys; from atso_fast.kernels import native; i = native.build_info(); print(i)
sys.exit(0 if native.has_cuda() else f"atso_fast._C sees no CUDA device or was built without CUDA: {i}")'
}

atso_bench() {
  "$PY" -m atso_fast.cli bench --device cuda --json >"$WORK/atso_bench.json"
}

bench_table() {  # the human table of `atso-fast bench --json`
  "$PY" -c 'import json, sys; from atso_fast.bench import format_table; print(format_table(json.load(open(sys.argv[1]))))' "$1"
}

summary() {
  local i ok=1
  printf '\n%-22s %-10s %8s\n' "step" "result" "seconds"
  for i in "${!NAMES[@]}"; do
    printf '%-22s %-10s %8s\n' "${NAMES[$i]}" "${STATES[$i]}" "${TIMES[$i]}"
    [[ ${STATES[$i]} == ok || ${STATES[$i]} == skipped ]] || ok=0
  done
  printf 'total %ss of a %ss budget; logs in %s\n' "$SECONDS" "$BUDGET_S" "${OUT:-$WORK}"
  return $((1 - ok))
}

collect() {  # at most 8 files come back from $OUT
  [[ -n ${OUT:-} ]] || return 0
  mkdir -p "$OUT"
  cp "$WORK/summary.txt" "$OUT/" 2>/dev/null
  cp "$WORK"/*.json "$OUT/" 2>/dev/null
  tar czf "$OUT/logs.tgz" -C "$WORK" . 2>/dev/null
}

main() {
  local pytest_q=(-q -p no:cacheprovider)
  export PY WORK WHEELS REPO
  export -f machine_info install_wheels cuda_arch gpu_count gpu_visible build_cmake build_pip check_build atso_bench
  step machine_info 30 5 machine_info
  if ! step gpu 10 1 gpu_visible; then
    summary | tee "$WORK/summary.txt"
    collect
    return 1
  fi
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    step wheels 60 10 install_wheels && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  else
    record wheels "skipped" 0
  fi
  if step build_cmake 240 60 build_cmake || step build_pip 240 60 build_pip; then
    step check_build 60 10 check_build && BUILD_OK=1
  fi
  cuda_step pytest_cuda 120 30 "$PY" -m pytest -m cuda tests/test_kernels.py tests/test_kernel_probabilities.py "${pytest_q[@]}"
  # resampling in and back on CUDA tensors (ResampleSink) against the CPU path; its own step, as
  # it imports the io layer (nibabel, SimpleITK) that a bare device machine may lack
  cuda_step pytest_cuda_resample 90 30 "$PY" -m pytest -m cuda tests/test_preprocess.py "${pytest_q[@]}"
  cuda_step memcheck 180 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
    --error-exitcode 99 --print-limit 20 "$PY" -m pytest -m cuda tests/test_kernels.py -x "${pytest_q[@]}"
  cuda_step racecheck 90 30 compute-sanitizer --tool racecheck --error-exitcode 99 --print-limit 20 \
    "$PY" -m pytest "tests/test_kernels.py::test_constant_windows_give_constant_back[cuda]" "${pytest_q[@]}"
  cuda_step bench_kernels 90 30 "$PY" benchmarks/bench_kernels.py --device cuda --json "$WORK/bench_kernels.json"
  cuda_step bench_relabel 150 45 "$PY" benchmarks/bench_relabel.py --device cuda --json "$WORK/bench_relabel.json"
  cuda_step atso_bench 150 60 atso_bench
  cuda_step bench_suites 60 20 "$PY" -m pytest -m cuda benchmarks/test_bench_suites.py "${pytest_q[@]}" \
    --benchmark-json "$WORK/bench_suites.json"
  cuda_step bench_archive 150 120 "$PY" benchmarks/bench_archive.py --device cuda --cases 6 --rounds 1 \
    --output "$WORK/bench_archive.json"
  [[ -s $WORK/atso_bench.json ]] && bench_table "$WORK/atso_bench.json" | tee -a "$WORK/atso_bench.log"
  [[ -s $WORK/bench_archive.log ]] && tail -n 6 "$WORK/bench_archive.log"
  summary | tee "$WORK/summary.txt"
  local rc=$?
  collect
  return "$rc"
}

main "$@"
