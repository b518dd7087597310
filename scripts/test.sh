#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to a full test run: installs every
# package (apt-get and the project's venv from PyPI, idempotent), configures, builds
# and runs all ctest suites (labels: unit, mpi, e2e, slurm, netns, interop). Extra
# arguments go to ctest (e.g. -L unit).
set -euo pipefail
cd "$(dirname "$0")/.."
DPO_WITH_SLURM=1 bash scripts/setup.sh
BUILD=${DPO_BUILD_DIR:-build}
source scripts/venv.sh
source scripts/ccache_env.sh
JOBS=${DPO_JOBS:-$(nproc)}
start=$(date +%s)
cmake -G Ninja -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release ${DPO_CMAKE_ARGS:-}
cmake --build "$BUILD" -j "$JOBS"
echo "build: $(( $(date +%s) - start )) s"
cd "$BUILD"
# Unit tests run two at a time; mpi/slurm/e2e tests are RUN_SERIAL (they use every core).
ctest --output-on-failure -j "$JOBS" --timeout 1200 "$@"
# DPO_ALT_ISA=avx2 (or default, avx512): the unit label once more with libtorch's kernels
# (ATEN_CPU_CAPABILITY), MKL's and oneDNN's limited to that instruction set, so the tests'
# floating-point bounds are shown to hold on another CPU's kernels. CI sets it.
if [ -n "${DPO_ALT_ISA:-}" ]; then
  case $DPO_ALT_ISA in
    default) mkl=SSE4_2 dnnl=SSE41 ;;
    avx2) mkl=AVX2 dnnl=AVX2 ;;
    avx512) mkl=AVX512 dnnl=AVX512_CORE ;;
    *) echo "test.sh: DPO_ALT_ISA=$DPO_ALT_ISA: one of default, avx2, avx512" >&2; exit 2 ;;
  esac
  echo "unit tests again with ATEN_CPU_CAPABILITY=$DPO_ALT_ISA MKL_ENABLE_INSTRUCTIONS=$mkl ONEDNN_MAX_CPU_ISA=$dnnl"
  ATEN_CPU_CAPABILITY=$DPO_ALT_ISA MKL_ENABLE_INSTRUCTIONS=$mkl ONEDNN_MAX_CPU_ISA=$dnnl \
    ctest --output-on-failure -j "$JOBS" --timeout 1200 -L unit
fi
