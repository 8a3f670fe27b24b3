#!/usr/bin/env bash
# Every GPU check of this project in one call on a lent GPU machine (BENCHMARKS.md, "TensorRT and
# CUDA kernels"): the machine's facts, the C++ kernel test (ctest label gpu), the pytest gpu tests,
# the CUDA kernel benchmark vs cuBLAS (fp16 values, then int8/int4 codes), compute-sanitizer
# memcheck over the C++ kernel test and racecheck over its --quick subset, and the CPU kernels on
# the machine's own (AVX-512) host CPU.
#
# It uses the machine's python3 (a CUDA build of torch) with this checkout on PYTHONPATH, and the
# libraries built here by `make plugins` (carry build/plugins). Steps run in order of value, each
# under its own time limit, all inside DEADLINE seconds; a failing step does not stop the next.
# Logs and JSON go to $OUT (default /tmp/se-gpu); the last lines printed are the summary.
#
#   OUT=/tmp/se-gpu DEADLINE=420 bash bench/gpu_session.sh
#   STEPS="ctest_gpu pytest_gpu bench_cuda" bash bench/gpu_session.sh     # a subset, in this order
#   BENCH_ARGS="--shapes 4096x11008 --batches 1 16" bash bench/gpu_session.sh   # a smaller benchmark grid
set -u
OUT=${OUT:-/tmp/se-gpu}
DEADLINE=${DEADLINE:-420}
PY=${PY:-python3}
mkdir -p "$OUT"
export OUT PY PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
LOG=$OUT/gpu_session.log
SUMMARY=""

STEPS=${STEPS:-facts ctest_gpu pytest_gpu bench_cuda bench_cuda_quant memcheck racecheck cpu_kernels}

step() {  # step NAME LIMIT_S COMMAND...: runs COMMAND under min(LIMIT_S, time left), logs, records rc
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  local left=$((DEADLINE - SECONDS))
  if ((left < 15)); then
    SUMMARY+="$name: skipped (deadline)\n"
    return
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (limit ${limit} s)" | tee -a "$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc, $((SECONDS - t0)) s" | tee -a "$LOG"
  SUMMARY+="$name: rc=$rc, $((SECONDS - t0)) s\n"
}

facts() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version | tail -n 2
  lscpu | grep -E 'Model name|^CPU\(s\)'
  grep -o -m1 -w 'avx512f' /proc/cpuinfo || echo "no avx512f"
  $PY -c "import tensorrt; print('tensorrt', tensorrt.__version__)" 2>&1 | tail -n 1
  ldconfig -p | grep -E 'libnvinfer' || echo "no libnvinfer on the loader path"
  command -v trtexec || echo "no trtexec"
  $PY -c "from se_export import kernels; print('CPU kernel ISA:', kernels.isa())"
}

cpu_kernels() {
  $PY bench/kernel_speed.py --shapes 4096x11008 --batches 1 512 --sparsities 0.5 0.7 0.9 --values fp32 \
    --out "$OUT/cpu_kernels_avx512.json"
  SE_KERNELS_ISA=avx2 $PY bench/kernel_speed.py --shapes 4096x11008 --batches 1 --sparsities 0.5 0.7 0.9 \
    --values fp32 --out "$OUT/cpu_kernels_avx2.json"
}

export -f facts cpu_kernels

step facts 60 bash -c facts
step ctest_gpu ${CTEST_LIMIT:-150} build/plugins/test_cuda_kernels
step pytest_gpu 200 $PY -m pytest -q -m gpu -p no:cacheprovider tests/backends/test_cuda_gpu.py
BENCH_ARGS=${BENCH_ARGS:---shapes 4096x11008 11008x4096 2048x8192 8192x2048 576x1536 1536x576}
step bench_cuda ${BENCH_LIMIT:-240} bash -c "set -o pipefail; $PY bench/cuda_kernels.py --out $OUT/cuda_kernels.json \
  $BENCH_ARGS | tee $OUT/cuda_kernels.md"
step bench_cuda_quant ${QUANT_LIMIT:-150} bash -c "set -o pipefail; $PY bench/cuda_kernels.py --shapes 4096x11008 \
  --batches 1 512 --sparsities 0.5 0.7 --formats bitmap --values fp16 int8 int4 --out $OUT/cuda_quant.json \
  | tee $OUT/cuda_quant.md"
SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
step memcheck ${MEMCHECK_LIMIT:-200} "$SANITIZER" --tool memcheck --leak-check full --error-exitcode 3 build/plugins/test_cuda_kernels
step racecheck ${RACECHECK_LIMIT:-90} "$SANITIZER" --tool racecheck --error-exitcode 3 build/plugins/test_cuda_kernels --quick
step cpu_kernels 150 bash -c cpu_kernels

echo
grep -E "passed|failed|error|FAIL|ERROR SUMMARY|GPU kernel checks|Error" "$LOG" | grep -v "^===" | tail -n 25
echo
cat "$OUT/cuda_kernels.md" 2>/dev/null | tail -n 80
echo
printf "%b" "$SUMMARY"
