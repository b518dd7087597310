// NF4 dequantization on the GPU (see core/nf4.h for the format): one thread per
// packed byte (two outputs), grid-stride. The per-block absmax is recomputed per
// byte from the (possibly double-quantized) statistics: a few cached loads,
// cheaper than a second pass. No torch headers here: raw pointers + stream.
//
// Legend: n = elements, B = blocksize, NB = nested blocksize.
#include "core/cuda/nf4_kernels.h"
#include "core/nf4_code.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace {

__constant__ float kCode[16] = {DPO_NF4_CODE_VALUES};

__device__ __forceinline__ float block_scale(int64_t b, const float* absmax_f32, const uint8_t* absmax_q,
                                             const float* nested_absmax, const float* nested_code,
                                             float offset, int64_t nested_blocksize) {
  if (absmax_f32 != nullptr) return __ldg(absmax_f32 + b);
  // bitsandbytes: dequantize_blockwise(absmax_q) (a multiply), then += offset (an add):
  // two roundings, so no fused multiply-add here.
  float a = __fmul_rn(__ldg(nested_code + __ldg(absmax_q + b)), __ldg(nested_absmax + b / nested_blocksize));
  return __fadd_rn(a, offset);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

template <typename T>
__global__ void nf4_dequant_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax_f32,
                                   const uint8_t* __restrict__ absmax_q, const float* __restrict__ nested_absmax,
                                   const float* __restrict__ nested_code, float offset, int64_t n,
                                   int64_t blocksize, int64_t nested_blocksize, T* __restrict__ out) {
  const int64_t nbytes = (n + 1) / 2;
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < nbytes;
       j += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = 2 * j;  // both values of a byte share a block (B is even)
    const float s = block_scale(i / blocksize, absmax_f32, absmax_q, nested_absmax, nested_code, offset,
                                nested_blocksize);
    const uint8_t q = __ldg(packed + j);
    out[i] = from_float<T>(__fmul_rn(kCode[q >> 4], s));
    if (i + 1 < n) out[i + 1] = from_float<T>(__fmul_rn(kCode[q & 0x0F], s));
  }
}

template <typename T>
cudaError_t launch(const uint8_t* packed, const float* absmax_f32, const uint8_t* absmax_q,
                   const float* nested_absmax, const float* nested_code, float offset, int64_t n,
                   int64_t blocksize, int64_t nested_blocksize, void* out, cudaStream_t stream) {
  const int64_t nbytes = (n + 1) / 2;
  const int threads = 256;
  int64_t blocks = (nbytes + threads - 1) / threads;
  if (blocks > 65535 * 16) blocks = 65535 * 16;  // grid-stride covers the rest
  if (blocks < 1) blocks = 1;
  nf4_dequant_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      packed, absmax_f32, absmax_q, nested_absmax, nested_code, offset, n, blocksize, nested_blocksize,
      static_cast<T*>(out));
  return cudaGetLastError();
}

}  // namespace

extern "C" int dpo_nf4_dequantize_cuda(const uint8_t* packed, const float* absmax_f32, const uint8_t* absmax_q,
                                       const float* nested_absmax, const float* nested_code, float offset,
                                       int64_t n, int64_t blocksize, int64_t nested_blocksize, int out_type,
                                       void* out, CUstream_st* stream) {
  if (n <= 0) return 0;
  if (blocksize <= 0 || blocksize % 2 != 0 || nested_blocksize <= 0) return static_cast<int>(cudaErrorInvalidValue);
  if (absmax_f32 == nullptr && (absmax_q == nullptr || nested_absmax == nullptr || nested_code == nullptr))
    return static_cast<int>(cudaErrorInvalidValue);
  switch (out_type) {
    case kDpoNf4OutF32:
      return static_cast<int>(launch<float>(packed, absmax_f32, absmax_q, nested_absmax, nested_code, offset, n,
                                            blocksize, nested_blocksize, out, stream));
    case kDpoNf4OutBF16:
      return static_cast<int>(launch<__nv_bfloat16>(packed, absmax_f32, absmax_q, nested_absmax, nested_code,
                                                    offset, n, blocksize, nested_blocksize, out, stream));
    case kDpoNf4OutF16:
      return static_cast<int>(launch<__half>(packed, absmax_f32, absmax_q, nested_absmax, nested_code, offset,
                                             n, blocksize, nested_blocksize, out, stream));
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" const char* dpo_cuda_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}
