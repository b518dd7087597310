// Blockwise 4-bit NormalFloat (NF4) quantization, byte-for-byte compatible with
// bitsandbytes (quantize_4bit / dequantize_4bit, quant_type "nf4"), including
// double quantization of the absmax values (compress_statistics) and the
// bitsandbytes 4-bit checkpoint layout that transformers reads and writes.
//
// Legend: n = elements of the weight, B = blocksize (64), nb = ceil(n / B)
// blocks, NB = nested blocksize (256), nnb = ceil(nb / NB) nested blocks.
//
// Format (what bitsandbytes' CUDA kernel kQuantizeBlockwise<NF4> produces):
//   - the weight is flattened row-major and cut into blocks of B values (the last
//     block may be partial);
//   - absmax[b] = max |w| over block b (fp32);
//   - each value is mapped to a 4-bit code by w * (1 / absmax[b]) (a multiply by
//     the fp32 reciprocal, as the kernel does) and bitsandbytes' decision tree
//     (dQuantizeNF4): thresholds are the midpoints of neighbouring codes and a
//     value exactly on a threshold takes the LOWER code (the tree tests `x > t`);
//   - two codes per byte, the FIRST value in the HIGH nibble; with an odd n the
//     last byte's low nibble holds the code of 0.0 (7), as bitsandbytes pads
//     with 0.0 before quantizing;
//   - an all-zero block has absmax 0, and 0 * (1/0) = NaN falls through the tree
//     to code 0 (-1.0): it dequantizes to -0.0 * ... = 0 (bitsandbytes does the same).
//   Dequantization: w = kNf4Code[q] * absmax[b] in fp32.
//
// Double quantization: offset = mean(absmax); (absmax - offset) is quantized with
// 8-bit blockwise dynamic quantization (bitsandbytes create_dynamic_map(signed=True),
// blocks of NB = 256, nested_absmax per block, nearest code by bitsandbytes'
// dQuantize binary search); absmax[b] = nested_code[q[b]] * nested_absmax[b / NB] + offset.
#pragma once
#include <array>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <torch/types.h>

namespace dpo {

/// Looks a tensor up by its checkpoint name; std::nullopt when absent.
using TensorLookup = std::function<std::optional<torch::Tensor>(const std::string&)>;

/// The 16 NF4 values (bitsandbytes get_4bit_type("nf4")); code 7 is 0.0.
extern const std::array<float, 16> kNf4Code;

/// bitsandbytes create_dynamic_map(signed=True): 256 sorted fp32 values in [-1, 1].
const std::array<float, 256>& dynamic_map_signed();

/// A weight in NF4. Tensors live on one device (CPU, or CUDA for dequantization there).
struct Nf4Tensor {
  torch::Tensor packed;         // (ceil(n/2)) uint8, two codes per byte, first value in the high nibble
  torch::Tensor absmax;         // (nb) fp32; or (nb) uint8 codes into nested_code when double-quantized
  torch::Tensor nested_absmax;  // (nnb) fp32, only when double-quantized (else undefined)
  torch::Tensor nested_code;    // (256) fp32 dynamic map, only when double-quantized (else undefined)
  float offset = 0.0f;          // mean(absmax) subtracted before double quantization
  std::vector<int64_t> shape;   // shape of the original weight, e.g. {O, I}
  int64_t blocksize = 64;       // B
  int64_t nested_blocksize = 256;  // NB
  /// dtype of the weight that was quantized (bitsandbytes' quant_state "dtype").
  torch::ScalarType dtype = torch::kFloat32;

  bool double_quant() const { return nested_absmax.defined(); }
  int64_t numel() const;
  int64_t nblocks() const;
  torch::Device device() const { return packed.device(); }
  /// Bytes held (packed + statistics).
  int64_t nbytes() const;
};

/// Quantizes w (any float dtype, any shape, CPU or CUDA; quantization runs on the
/// CPU and the result is moved back to w's device). blocksize: 32..4096, power of 2.
Nf4Tensor nf4_quantize(const torch::Tensor& w, bool double_quant, int64_t blocksize = 64);

/// Dequantizes to a new tensor of `shape` and dtype `out` (fp32, bf16 or fp16) on
/// t's device (CUDA: needs a build with DPO_HAVE_CUDA, else throws).
torch::Tensor nf4_dequantize(const Nf4Tensor& t, torch::ScalarType out);

/// Dequantizes a CPU Nf4Tensor into `out` (numel() floats, row-major). Multithreaded.
void nf4_dequantize_into(const Nf4Tensor& t, float* out);
/// Elements [begin, end) of the flattened weight into `out` (end - begin floats):
/// begin a multiple of blocksize, end too or end == numel() (whole quantization blocks).
void nf4_dequantize_range_into(const Nf4Tensor& t, int64_t begin, int64_t end, float* out);

/// The per-block absmax as fp32 (nb), undoing double quantization if present (CPU).
torch::Tensor nf4_absmax_f32(const Nf4Tensor& t);

/// A copy of t on `device` (tensors moved; metadata kept).
Nf4Tensor nf4_to(const Nf4Tensor& t, torch::Device device);

/// The bitsandbytes 4-bit checkpoint tensors for module prefix p:
///   p.weight (ceil(n/2), 1) U8, p.weight.absmax, p.weight.quant_map (16) F32,
///   [p.weight.nested_absmax, p.weight.nested_quant_map,]
///   p.weight.quant_state.bitsandbytes__nf4 (U8 bytes of the JSON of QuantState.as_dict:
///   quant_type, blocksize, dtype, shape[, nested_blocksize, nested_dtype, nested_offset]).
/// Tensors are on the CPU.
std::vector<std::pair<std::string, torch::Tensor>> nf4_to_bnb_tensors(const Nf4Tensor& t,
                                                                       const std::string& prefix);

/// True when `prefix.weight.absmax` is present (the bitsandbytes 4-bit layout).
bool nf4_bnb_present(const TensorLookup& lookup, const std::string& prefix);

/// Reads the bitsandbytes 4-bit layout for module prefix p (see nf4_to_bnb_tensors).
/// Validates everything (quant_type nf4 — fp4 is refused —, blocksize, shapes, dtypes,
/// sizes against the JSON shape, the quant_map); errors name the offending tensor.
/// Tensors are cloned to the CPU (the lookup may hand out mmap views).
Nf4Tensor nf4_from_bnb(const TensorLookup& lookup, const std::string& prefix);

}  // namespace dpo
