// libtorch's CUDA half, loaded only when a process asks for CUDA.
//
// Why: the torch wheel's libtorch is one CUDA build for every machine. Linking
// libtorch_cuda.so (and through it cuBLAS, cuDNN, cuFFT, cuSPARSE, NCCL) into every
// process costs ~260 MB of resident memory per rank before the first tensor (measured:
// 118 MB -> 379 MB for a minimal libtorch program; docs/benchmarks.md), on CPU-only
// machines too. So the tools link libtorch_cpu (+ c10_cuda, a few hundred KB, for our own
// kernels) and load libtorch_cuda.so from beside libtorch_cpu.so the first time CUDA is
// wanted: its static initializers then register the CUDA kernels and hooks exactly as at
// program start (libtorch's own `-Wl,--no-as-needed` exists to make that load happen).
//
// Every "is CUDA there?" question of the project goes through torch_cuda_available():
// torch::cuda::is_available() alone answers false until the library is loaded.
#pragma once
#include <string>

namespace dpo {

/// Loads libtorch_cuda.so (once per process; later calls return the first answer).
/// Returns false, with the reason in *why when given, where this libtorch has no CUDA
/// half or it cannot be loaded (a missing CUDA library names itself).
bool load_torch_cuda(std::string* why = nullptr);

/// load_torch_cuda() && torch::cuda::is_available() (a visible device).
bool torch_cuda_available();

/// Why CUDA is not usable here, for error messages: the load error, or "no CUDA device is
/// visible to this process" where the library loaded but there is no device.
std::string torch_cuda_unavailable_reason();

}  // namespace dpo
