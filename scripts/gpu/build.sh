#!/usr/bin/env bash
# Builds dpo_dist for NVIDIA GPUs against the CUDA libtorch of a Python torch install
# (docs/gpu.md), with the other dependencies from the bundle of scripts/gpu/bundle.sh:
#
#   scripts/gpu/build.sh [BUILD_DIR] [TARGET...]     (default: build-gpu, every target)
#
# Environment (all optional):
#   PYTHON=python3            the Python whose torch provides libtorch (torch.utils.cmake_prefix_path)
#   DPO_TORCH_DIR=DIR         a libtorch to use instead (the directory holding TorchConfig.cmake)
#   DPO_BUNDLE=DIR            the dependency bundle (default .gpu_bundle; DPO_BUNDLE=none: system packages)
#   CUDA_HOME=/usr/local/cuda the toolkit (nvcc); DPO_CUDA_ARCHS=90 (sm_90: H100/H200)
#   DPO_NCCL_HOME=DIR         NCCL (include/nccl.h, lib/libnccl.so*); default: the pip package
#                             nvidia-nccl-cu* that torch itself loads, else the CUDA toolkit's
#   DPO_JOBS=N                parallel compile jobs (default: all cores)
# The libstdc++ ABI of libtorch must be the new one (_GLIBCXX_USE_CXX11_ABI=1: torch >= 2.7
# wheels, libtorch "cxx11-abi" archives), as Debian's HDF5/Boost/sentencepiece are built with it.
set -euo pipefail
src=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build=${1:-$src/build-gpu}
shift || true
PYTHON=${PYTHON:-python3}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
say() { echo "gpu/build: $*"; }
die() {
  echo "gpu/build: error: $*" >&2
  exit 1
}

# ---- libtorch ------------------------------------------------------------------------------
if [ -n "${DPO_TORCH_DIR:-}" ]; then
  torch_cmake=$DPO_TORCH_DIR
  abi=${DPO_TORCH_CXX11_ABI:-1}
  torch_desc="libtorch at $torch_cmake"
else
  command -v "$PYTHON" >/dev/null || die "$PYTHON not found (set PYTHON, or DPO_TORCH_DIR to a libtorch)"
  info=$("$PYTHON" -c 'import torch
print(torch.utils.cmake_prefix_path)
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(torch.__version__, torch.version.cuda or "cpu")') || die "$PYTHON cannot import torch (pip install torch, or set DPO_TORCH_DIR)"
  torch_cmake=$(sed -n 1p <<<"$info")/Torch
  abi=$(sed -n 2p <<<"$info")
  torch_desc="torch $(sed -n 3p <<<"$info") from $PYTHON"
fi
[ -f "$torch_cmake/TorchConfig.cmake" ] || die "no TorchConfig.cmake in $torch_cmake"
[ "$abi" = 1 ] || die "$torch_desc uses the old libstdc++ ABI (_GLIBCXX_USE_CXX11_ABI=0); the Debian libraries need the new one: use torch >= 2.7 or a cxx11-abi libtorch"

# ---- CUDA + NCCL ---------------------------------------------------------------------------
nvcc=$CUDA_HOME/bin/nvcc
[ -x "$nvcc" ] || nvcc=$(command -v nvcc || true)
[ -n "$nvcc" ] && [ -x "$nvcc" ] || die "nvcc not found (set CUDA_HOME)"
cuda_root=$(cd "$(dirname "$nvcc")/.." && pwd)
nccl_home=${DPO_NCCL_HOME:-}
if [ -z "$nccl_home" ] && [ -z "${DPO_TORCH_DIR:-}" ]; then
  nccl_home=$("$PYTHON" -c 'import os, nvidia.nccl as n; print(os.path.dirname(n.__file__) if n.__file__ else list(n.__path__)[0])' 2>/dev/null || true)
fi
[ -n "$nccl_home" ] || nccl_home=$cuda_root
nccl_inc=$nccl_home/include
nccl_lib=$(ls "$nccl_home"/lib/libnccl.so "$nccl_home"/lib/libnccl.so.2 "$nccl_home"/lib64/libnccl.so "$nccl_home"/lib64/libnccl.so.2 \
  "$nccl_home"/lib/x86_64-linux-gnu/libnccl.so 2>/dev/null | head -n 1 || true)
nccl_args=()
if [ -f "$nccl_inc/nccl.h" ] && [ -n "$nccl_lib" ]; then
  # The pip package ships only libnccl.so.2 (no unversioned link): name the file itself.
  nccl_args=("-DNCCL_INCLUDE_DIR=$nccl_inc" "-DNCCL_LIBRARY=$nccl_lib")
  nccl_desc="NCCL $nccl_lib"
else
  nccl_desc="NCCL not found under $nccl_home (the NCCL backend is left out)"
fi

# libtorch's CMake looks for NVTX3 and otherwise for libnvToolsExt, which CUDA >= 12.9 no
# longer ships: point it at the toolkit's header-only nvtx3.
nvtx_args=()
[ -d "$cuda_root/include/nvtx3" ] && nvtx_args=("-Dnvtx3_dir=$cuda_root/include")

# ---- the other dependencies ----------------------------------------------------------------
bundle_args=()
prefix_path=$(cd "$torch_cmake/.." && pwd)
if [ "${DPO_BUNDLE:-}" != none ]; then
  # shellcheck source=scripts/gpu/env.sh
  source "$src/scripts/gpu/env.sh" "${DPO_BUNDLE:-$src/.gpu_bundle}"
  bundle_args=("${DPO_BUNDLE_CMAKE_ARGS[@]}")
  prefix_path="$prefix_path;$DPO_BUNDLE_PREFIX"
fi

say "$torch_desc (C++11 ABI), nvcc $("$nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), sm_${DPO_CUDA_ARCHS:-90}, $nccl_desc"
say "dependencies: ${DPO_BUNDLE:-bundle $src/.gpu_bundle}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
cmake -G Ninja -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release \
  "-DCMAKE_PREFIX_PATH=$prefix_path" "-DTorch_DIR=$torch_cmake" \
  "-DCMAKE_CUDA_COMPILER=$nvcc" "-DCUDAToolkit_ROOT=$cuda_root" "-DCMAKE_CUDA_ARCHITECTURES=${DPO_CUDA_ARCHS:-90}" \
  "-DCMAKE_CXX_FLAGS=-D_GLIBCXX_USE_CXX11_ABI=$abi" \
  "${nccl_args[@]}" "${nvtx_args[@]}" "${bundle_args[@]}" ${DPO_CMAKE_ARGS:-}
ninja -C "$build" -j "${DPO_JOBS:-$(nproc)}" "$@"
say "built in $build"
