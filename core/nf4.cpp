// NF4 quantization / dequantization and the bitsandbytes checkpoint layout.
// The arithmetic mirrors bitsandbytes' CUDA kernels (kQuantizeBlockwise with
// dQuantizeNF4 / dQuantize<0>, kDequantizeBlockwise) operation for operation, so
// the packed bytes and statistics are identical for the same fp32 input.
#include "core/nf4.h"
#include "core/nf4_code.h"
#include "util/json_int.h"
#include "util/json_read.h"

#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "core/cuda/nf4_kernels.h"
#include "util/tensor_str.h"

// Debian's CPU libtorch ships c10/cuda headers without their generated config:
// only a CUDA build of libtorch has cuda_cmake_macros.h.
#if defined(DPO_HAVE_CUDA) && __has_include(<c10/cuda/CUDAStream.h>) && \
    __has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#include <c10/cuda/CUDAStream.h>
#define DPO_NF4_TORCH_CUDA 1
#endif

namespace dpo {

const std::array<float, 16> kNf4Code = {DPO_NF4_CODE_VALUES};

namespace {

constexpr int64_t kNestedBlocksize = 256;  // bitsandbytes quantize_4bit: quantize_blockwise(absmax, blocksize=256)
constexpr int64_t kGrainElements = 1 << 16;  // parallel_for grain, in elements

// bitsandbytes dQuantizeNF4 is a 4-level decision tree over these 15 thresholds
// (midpoints of neighbouring codes, as the kernel's fp32 literals), each test
// `x > t` taking the upper side. Its result is exactly the number of thresholds
// that x exceeds: a tie takes the lower code, and NaN (0 * inf for an all-zero
// block) exceeds none and gives code 0. Counting is branch-free and vectorizes;
// the tree mispredicts on random weights.
constexpr float kNf4Thresholds[15] = {
    -0.8480964004993439f, -0.6106329262256622f, -0.4599952697753906f, -0.33967943489551544f,
    -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f,
    0.1202552504837513f, 0.2035212516784668f, 0.2920137718319893f, 0.3893125355243683f,
    0.5016634166240692f, 0.6427869200706482f, 0.8614784181118011f};

// codes[i] = NF4 code of x[i] * scale, for i < count (count <= 4096).
inline void nf4_codes_of(const float* x, int64_t count, float scale, int32_t* codes) {
  for (int64_t i = 0; i < count; ++i) {
    const float v = x[i] * scale;
    int32_t c = 0;
    for (int k = 0; k < 15; ++k) c += v > kNf4Thresholds[k] ? 1 : 0;
    codes[i] = c;
  }
}

// bitsandbytes dQuantize<STOCHASTIC=0>: a 7-step binary search over the 256-entry
// code, then the nearer of the two neighbours by midpoint. Reproduced step for step
// (including its initial lower/upper of -1/1) so ties resolve exactly as in bnb.
inline uint8_t dynamic_code_of(const float* code, float x) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f;
  float val = code[pivot];
  for (int i = 64; i > 0; i >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += i;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= i;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[upper_pivot];
  if (lower_pivot == 0) lower = code[lower_pivot];
  if (x > val) {
    const float midpoint = (upper + val) * 0.5f;
    return static_cast<uint8_t>(x > midpoint ? upper_pivot : pivot);
  }
  const float midpoint = (lower + val) * 0.5f;
  return static_cast<uint8_t>(x < midpoint ? lower_pivot : pivot);
}

// byte -> (code[hi], code[lo]): one 8-byte load per output pair.
struct PairLut {
  alignas(64) float v[256][2];
  PairLut() {
    for (int b = 0; b < 256; ++b) {
      v[b][0] = kNf4Code[b >> 4];
      v[b][1] = kNf4Code[b & 0x0F];
    }
  }
};
const PairLut& pair_lut() {
  static const PairLut lut;
  return lut;
}

// Four floats as one SIMD value (GCC/Clang vector extension: SSE on x86-64, NEON on ARM).
typedef float V4f __attribute__((vector_size(16)));

typedef double V2d __attribute__((vector_size(16)));

// {code[b0 hi], code[b0 lo], code[b1 hi], code[b1 lo]}: two 8-byte table loads straight
// into the two halves of a register (a vector of two doubles, bit-cast: no memory
// round trip, which would stall on store forwarding).
inline V4f lut_quad(const PairLut& lut, uint8_t b0, uint8_t b1) {
  double d0, d1;
  std::memcpy(&d0, lut.v[b0], 8);
  std::memcpy(&d1, lut.v[b1], 8);
  const V2d d = {d0, d1};
  return (V4f)d;  // a GCC/Clang vector cast between equal sizes is a bit cast
}

constexpr int64_t kStreamBytes = int64_t{32} << 20;  // 32 MiB: beyond a typical L3 slice

inline void stream_store(float* dst /* 16-byte aligned */, V4f v) {
#if defined(__SSE2__)
  _mm_stream_ps(dst, (__m128)v);
#else
  std::memcpy(dst, &v, sizeof(v));
#endif
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool valid_blocksize(int64_t b) { return b >= 32 && b <= 4096 && (b & (b - 1)) == 0; }

std::string dtype_name(torch::ScalarType t) {
  if (auto n = weight_dtype_name(t)) return *n;
  throw std::runtime_error(std::string("nf4: unsupported weight dtype ") + c10::toString(t));
}


// Python's repr(float) (what json.dumps writes for bitsandbytes' nested_offset):
// the shortest round-trip digits, fixed notation for 1e-4 <= |x| < 1e16, else
// scientific with a signed two-digit-minimum exponent.
std::string python_float_repr(double x) {
  if (std::isnan(x)) return "NaN";
  if (std::isinf(x)) return x > 0 ? "Infinity" : "-Infinity";
  if (x == 0.0) return std::signbit(x) ? "-0.0" : "0.0";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), x, std::chars_format::scientific);
  std::string sci(buf, res.ptr);  // e.g. "-1.2345e-05"
  const auto epos = sci.find('e');
  std::string mant = sci.substr(0, epos);
  const int exp10 = std::stoi(sci.substr(epos + 1));
  std::string sign;
  if (mant[0] == '-') {
    sign = "-";
    mant = mant.substr(1);
  }
  std::string digits;
  for (char c : mant)
    if (c != '.') digits += c;
  if (exp10 >= -4 && exp10 < 16) {
    std::string out;
    if (exp10 < 0) {
      out = "0." + std::string(static_cast<size_t>(-exp10 - 1), '0') + digits;
    } else if (static_cast<int>(digits.size()) <= exp10 + 1) {
      out = digits + std::string(static_cast<size_t>(exp10 + 1 - static_cast<int>(digits.size())), '0') + ".0";
    } else {
      out = digits.substr(0, static_cast<size_t>(exp10 + 1)) + "." + digits.substr(static_cast<size_t>(exp10 + 1));
    }
    return sign + out;
  }
  std::string m = digits.substr(0, 1);
  if (digits.size() > 1) m += "." + digits.substr(1);
  char ebuf[16];
  std::snprintf(ebuf, sizeof(ebuf), "e%c%02d", exp10 < 0 ? '-' : '+', std::abs(exp10));
  return sign + m + ebuf;
}



// Reads the fp32 scale of every block of a CPU Nf4Tensor through `fn(b, scale)`.
struct ScaleReader {
  const float* absmax_f32 = nullptr;
  const uint8_t* absmax_q = nullptr;
  const float* nested_absmax = nullptr;
  const float* nested_code = nullptr;
  float offset = 0.0f;
  int64_t nested_blocksize = 256;

  explicit ScaleReader(const Nf4Tensor& t) {
    if (t.double_quant()) {
      absmax_q = t.absmax.data_ptr<uint8_t>();
      nested_absmax = t.nested_absmax.data_ptr<float>();
      nested_code = t.nested_code.data_ptr<float>();
      offset = t.offset;
      nested_blocksize = t.nested_blocksize;
    } else {
      absmax_f32 = t.absmax.data_ptr<float>();
    }
  }
  // bitsandbytes: absmax = code[q] * nested_absmax (one rounding), then += offset.
  float operator()(int64_t b) const {
    if (absmax_f32) return absmax_f32[b];
    const float a = nested_code[absmax_q[b]] * nested_absmax[b / nested_blocksize];
    return a + offset;
  }
};

void check_cpu_layout(const Nf4Tensor& t, const char* what) {
  const int64_t n = t.numel();
  const int64_t nb = t.nblocks();
  auto fail = [&](const std::string& m) { throw std::runtime_error(std::string(what) + ": " + m); };
  if (!t.packed.defined() || t.packed.scalar_type() != torch::kUInt8 || !t.packed.is_contiguous() ||
      t.packed.numel() != (n + 1) / 2)
    fail("packed must be a contiguous uint8 tensor of " + std::to_string((n + 1) / 2) + " bytes for shape " +
         shape_str(t.shape));
  if (!valid_blocksize(t.blocksize)) fail("blocksize " + std::to_string(t.blocksize) + " is not a power of 2 in [32, 4096]");
  if (!t.absmax.defined() || t.absmax.numel() != nb || !t.absmax.is_contiguous())
    fail("absmax must hold " + std::to_string(nb) + " values");
  if (t.double_quant()) {
    if (t.absmax.scalar_type() != torch::kUInt8) fail("double-quantized absmax must be uint8");
    if (t.nested_blocksize <= 0) fail("nested_blocksize must be positive");
    if (t.nested_absmax.scalar_type() != torch::kFloat32 || !t.nested_absmax.is_contiguous() ||
        t.nested_absmax.numel() != ceil_div(nb, t.nested_blocksize))
      fail("nested_absmax must be fp32 with " + std::to_string(ceil_div(nb, t.nested_blocksize)) + " values");
    if (!t.nested_code.defined() || t.nested_code.scalar_type() != torch::kFloat32 ||
        !t.nested_code.is_contiguous() || t.nested_code.numel() != 256)
      fail("nested_code must be 256 fp32 values");
  } else if (t.absmax.scalar_type() != torch::kFloat32) {
    fail("absmax must be fp32");
  }
}

}  // namespace

const std::array<float, 256>& dynamic_map_signed() {
  // Computed with the same torch ops as bitsandbytes' Python (fp32 linspace, fp32
  // means, scalar multiply), so the fp32 values agree with bnb's table.
  static const std::array<float, 256> table = [] {
    constexpr int kMaxExponentBits = 7;
    std::vector<float> data;
    for (int i = 0; i < kMaxExponentBits; ++i) {
      const int64_t fraction_items = (int64_t{1} << i) + 1;  // signed: 2**(i + 7 - 7) + 1
      const torch::Tensor boundaries = torch::linspace(0.1, 1.0, fraction_items, torch::kFloat32);
      const torch::Tensor means = (boundaries.slice(0, 0, -1) + boundaries.slice(0, 1)) / 2.0;
      const int e = -(kMaxExponentBits - 1) + i;
      const torch::Tensor pos = e < 0 ? means * std::pow(10.0, e) : means * int64_t{1};
      const torch::Tensor neg = e < 0 ? means * (-std::pow(10.0, e)) : means * int64_t{-1};
      const float* p = pos.contiguous().data_ptr<float>();
      const float* q = neg.contiguous().data_ptr<float>();
      data.insert(data.end(), p, p + pos.numel());
      data.insert(data.end(), q, q + neg.numel());
    }
    data.push_back(0.0f);
    data.push_back(1.0f);
    if (data.size() != 256) throw std::logic_error("dynamic_map_signed: expected 256 values");
    std::sort(data.begin(), data.end());
    std::array<float, 256> out{};
    std::copy(data.begin(), data.end(), out.begin());
    return out;
  }();
  return table;
}

int64_t Nf4Tensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

int64_t Nf4Tensor::nblocks() const { return ceil_div(numel(), blocksize); }

int64_t Nf4Tensor::nbytes() const {
  int64_t b = 0;
  for (const auto* t : {&packed, &absmax, &nested_absmax, &nested_code})
    if (t->defined()) b += t->numel() * static_cast<int64_t>(t->element_size());
  return b;
}

Nf4Tensor nf4_quantize(const torch::Tensor& w, bool double_quant, int64_t blocksize) {
  if (!valid_blocksize(blocksize))
    throw std::runtime_error("nf4_quantize: blocksize " + std::to_string(blocksize) +
                             " is not supported (a power of 2 in [32, 4096]; bitsandbytes uses 64)");
  if (!w.defined() || !at::isFloatingType(w.scalar_type()))
    throw std::runtime_error("nf4_quantize: the weight must be a floating-point tensor");
  const int64_t n = w.numel();
  if (n == 0) throw std::runtime_error("nf4_quantize: the weight " + shape_str(w) + " is empty");

  Nf4Tensor t;
  t.shape = w.sizes().vec();
  t.blocksize = blocksize;
  t.nested_blocksize = kNestedBlocksize;
  t.dtype = w.scalar_type();
  dtype_name(t.dtype);  // refuses fp64 & co. with a message

  const torch::Tensor x = w.detach().to(torch::kCPU).to(torch::kFloat32).contiguous();
  const int64_t nb = ceil_div(n, blocksize);
  t.packed = torch::empty({(n + 1) / 2}, torch::kUInt8);
  torch::Tensor absmax = torch::empty({nb}, torch::kFloat32);

  const float* xp = x.data_ptr<float>();
  uint8_t* pp = t.packed.data_ptr<uint8_t>();
  float* ap = absmax.data_ptr<float>();
  at::parallel_for(0, nb, std::max<int64_t>(1, kGrainElements / blocksize), [&](int64_t b0, int64_t b1) {
    std::vector<int32_t> codes(static_cast<size_t>(blocksize) + 1);
    static constexpr float kZero = 0.0f;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * blocksize;
      const int64_t end = std::min(n, begin + blocksize);
      float amax = -std::numeric_limits<float>::max();
      // == fmaxf (bitsandbytes): a NaN element never replaces the running max.
      for (int64_t i = begin; i < end; ++i) amax = std::max(amax, std::fabs(xp[i]));
      ap[b] = amax;
      const float scale = 1.0f / amax;  // the kernel multiplies by the reciprocal
      const int64_t count = end - begin;
      nf4_codes_of(xp + begin, count, scale, codes.data());
      // bitsandbytes pads an odd tail with 0.0 before quantizing.
      if (count & 1) nf4_codes_of(&kZero, 1, scale, codes.data() + count);
      for (int64_t j = 0; j < (count + 1) / 2; ++j)
        pp[begin / 2 + j] = static_cast<uint8_t>((codes[2 * j] << 4) | codes[2 * j + 1]);
    }
  });

  if (!double_quant) {
    t.absmax = absmax;
  } else {
    // bitsandbytes: offset = absmax.mean(); absmax -= offset; quantize_blockwise(absmax, blocksize=256).
    t.offset = absmax.mean().item<float>();
    const std::array<float, 256>& code = dynamic_map_signed();
    t.nested_code = torch::from_blob(const_cast<float*>(code.data()), {256}, torch::kFloat32).clone();
    const int64_t nnb = ceil_div(nb, kNestedBlocksize);
    t.absmax = torch::empty({nb}, torch::kUInt8);
    t.nested_absmax = torch::empty({nnb}, torch::kFloat32);
    uint8_t* qp = t.absmax.data_ptr<uint8_t>();
    float* np = t.nested_absmax.data_ptr<float>();
    const float offset = t.offset;
    at::parallel_for(0, nnb, 16, [&](int64_t c0, int64_t c1) {
      std::vector<float> v(kNestedBlocksize);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t begin = c * kNestedBlocksize;
        const int64_t end = std::min(nb, begin + kNestedBlocksize);
        float amax = -std::numeric_limits<float>::max();
        for (int64_t b = begin; b < end; ++b) {
          v[b - begin] = ap[b] - offset;
          amax = std::fmax(amax, std::fabs(v[b - begin]));
        }
        np[c] = amax;
        const float scale = 1.0f / amax;
        for (int64_t b = begin; b < end; ++b) qp[b] = dynamic_code_of(code.data(), v[b - begin] * scale);
      }
    });
  }
  if (w.device().type() != torch::kCPU) return nf4_to(t, w.device());
  return t;
}

void nf4_dequantize_into(const Nf4Tensor& t, float* out) { nf4_dequantize_range_into(t, 0, t.numel(), out); }

void nf4_dequantize_range_into(const Nf4Tensor& t, int64_t first, int64_t last, float* out) {
  if (t.device().type() != torch::kCPU)
    throw std::runtime_error("nf4_dequantize_into: the NF4 tensor is on " + t.device().str() +
                             "; it writes host memory (use nf4_dequantize for device tensors)");
  check_cpu_layout(t, "nf4_dequantize_into");
  const int64_t n = t.numel();
  const int64_t B = t.blocksize;
  if (first < 0 || first > last || last > n || first % B != 0 || (last % B != 0 && last != n))
    throw std::runtime_error("nf4_dequantize_range_into: [" + std::to_string(first) + ", " + std::to_string(last) +
                             ") is not a range of whole blocks of " + std::to_string(B) + " in " + std::to_string(n));
  const int64_t b_first = first / B, b_last = (last + B - 1) / B;
  const uint8_t* packed = t.packed.data_ptr<uint8_t>();
  const ScaleReader scale_of(t);
  const PairLut& lut = pair_lut();
  // Outputs larger than the last-level cache are written with streaming stores:
  // no read-for-ownership of lines the matmul will re-read from DRAM anyway.
  const bool stream = (last - first) * static_cast<int64_t>(sizeof(float)) >= kStreamBytes &&
                      reinterpret_cast<uintptr_t>(out) % 16 == 0 && B % 4 == 0;
  at::parallel_for(b_first, b_last, std::max<int64_t>(1, kGrainElements / B), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float s = scale_of(b);
      const int64_t begin = b * B;
      const int64_t count = std::min(B, n - begin);
      const uint8_t* p = packed + begin / 2;
      float* o = out + (begin - first);
      const int64_t quads = count / 4;  // two bytes -> four floats -> one vector multiply
      const V4f sv = {s, s, s, s};
      if (stream) {
        for (int64_t j = 0; j < quads; ++j) stream_store(o + 4 * j, lut_quad(lut, p[2 * j], p[2 * j + 1]) * sv);
      } else {
        for (int64_t j = 0; j < quads; ++j) {
          const V4f v = lut_quad(lut, p[2 * j], p[2 * j + 1]) * sv;
          std::memcpy(o + 4 * j, &v, sizeof(v));
        }
      }
      for (int64_t i = 4 * quads; i < count; ++i)  // tail of a partial last block
        o[i] = lut.v[p[i / 2]][i & 1] * s;
    }
  });
#if defined(__SSE2__)
  if (stream) _mm_sfence();  // streaming stores are weakly ordered
#endif
}

torch::Tensor nf4_absmax_f32(const Nf4Tensor& t) {
  const Nf4Tensor c = t.device().type() == torch::kCPU ? t : nf4_to(t, torch::kCPU);
  check_cpu_layout(c, "nf4_absmax_f32");
  if (!c.double_quant()) return c.absmax.clone();
  torch::Tensor out = torch::empty({c.nblocks()}, torch::kFloat32);
  const ScaleReader scale_of(c);
  float* o = out.data_ptr<float>();
  for (int64_t b = 0; b < c.nblocks(); ++b) o[b] = scale_of(b);
  return out;
}

torch::Tensor nf4_dequantize(const Nf4Tensor& t, torch::ScalarType out) {
  if (out != torch::kFloat32 && out != torch::kBFloat16 && out != torch::kFloat16)
    throw std::runtime_error(std::string("nf4_dequantize: output dtype ") + c10::toString(out) +
                             " is not supported (float32, bfloat16, float16)");
  if (!t.packed.defined()) throw std::runtime_error("nf4_dequantize: empty Nf4Tensor");
  if (t.device().type() == torch::kCUDA) {
#ifdef DPO_HAVE_CUDA
    for (const auto* x : {&t.absmax, &t.nested_absmax, &t.nested_code})
      if (x->defined() && x->device() != t.device())
        throw std::runtime_error("nf4_dequantize: NF4 statistics are not on " + t.device().str());
    auto opts = torch::TensorOptions().dtype(out).device(t.device());
    torch::Tensor y = torch::empty(t.shape, opts);
    const torch::Tensor packed = t.packed.contiguous();
    const torch::Tensor absmax = t.absmax.contiguous();
    void* stream = nullptr;  // legacy default stream when torch has no CUDA headers
#ifdef DPO_NF4_TORCH_CUDA
    stream = c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
#endif
    const int out_type = out == torch::kFloat32 ? kDpoNf4OutF32 : out == torch::kBFloat16 ? kDpoNf4OutBF16 : kDpoNf4OutF16;
    const int err = dpo_nf4_dequantize_cuda(
        packed.data_ptr<uint8_t>(), t.double_quant() ? nullptr : absmax.data_ptr<float>(),
        t.double_quant() ? absmax.data_ptr<uint8_t>() : nullptr,
        t.double_quant() ? t.nested_absmax.contiguous().data_ptr<float>() : nullptr,
        t.double_quant() ? t.nested_code.contiguous().data_ptr<float>() : nullptr, t.offset, t.numel(),
        t.blocksize, t.nested_blocksize, out_type, y.data_ptr(), static_cast<CUstream_st*>(stream));
    if (err != 0)
      throw std::runtime_error(std::string("nf4_dequantize: dpo_nf4_dequantize_cuda: ") + dpo_cuda_error_string(err));
    return y;
#else
    throw std::runtime_error(
        "nf4_dequantize: the NF4 tensor is on " + t.device().str() +
        " but this build has no CUDA kernels (configure with the CUDA toolkit and -DDPO_WITH_CUDA=ON)");
#endif
  }
  if (t.device().type() != torch::kCPU)
    throw std::runtime_error("nf4_dequantize: unsupported device " + t.device().str());
  torch::Tensor y = torch::empty(t.shape, torch::kFloat32);
  nf4_dequantize_into(t, y.data_ptr<float>());
  return out == torch::kFloat32 ? y : y.to(out);
}

Nf4Tensor nf4_to(const Nf4Tensor& t, torch::Device device) {
  Nf4Tensor c = t;
  for (auto* x : {&c.packed, &c.absmax, &c.nested_absmax, &c.nested_code})
    if (x->defined()) *x = x->to(device);
  return c;
}

std::vector<std::pair<std::string, torch::Tensor>> nf4_to_bnb_tensors(const Nf4Tensor& t0,
                                                                       const std::string& prefix) {
  const Nf4Tensor t = t0.device().type() == torch::kCPU ? t0 : nf4_to(t0, torch::kCPU);
  check_cpu_layout(t, ("nf4_to_bnb_tensors(" + prefix + ")").c_str());
  const std::string w = prefix + ".weight";
  std::vector<std::pair<std::string, torch::Tensor>> out;
  out.emplace_back(w, t.packed.view({-1, 1}));  // bitsandbytes stores ((n + 1) // 2, 1)
  out.emplace_back(w + ".absmax", t.absmax);
  out.emplace_back(w + ".quant_map",
                   torch::from_blob(const_cast<float*>(kNf4Code.data()), {16}, torch::kFloat32).clone());
  if (t.double_quant()) {
    out.emplace_back(w + ".nested_absmax", t.nested_absmax);
    out.emplace_back(w + ".nested_quant_map", t.nested_code);
  }
  // json.dumps(QuantState.as_dict(packed=True) non-tensor items), key order as bnb inserts them.
  std::string js = "{\"quant_type\": \"nf4\", \"blocksize\": " + std::to_string(t.blocksize) + ", \"dtype\": \"" +
                   dtype_name(t.dtype) + "\", \"shape\": [";
  for (size_t i = 0; i < t.shape.size(); ++i) js += (i ? ", " : "") + std::to_string(t.shape[i]);
  js += "]";
  if (t.double_quant()) {
    js += ", \"nested_blocksize\": " + std::to_string(t.nested_blocksize) +
          ", \"nested_dtype\": \"float32\", \"nested_offset\": " + python_float_repr(static_cast<double>(t.offset));
  }
  js += "}";
  torch::Tensor bytes = torch::empty({static_cast<int64_t>(js.size())}, torch::kUInt8);
  std::memcpy(bytes.data_ptr<uint8_t>(), js.data(), js.size());
  out.emplace_back(w + ".quant_state.bitsandbytes__nf4", bytes);
  return out;
}

bool nf4_bnb_present(const TensorLookup& lookup, const std::string& prefix) {
  return lookup(prefix + ".weight.absmax").has_value();
}

Nf4Tensor nf4_from_bnb(const TensorLookup& lookup, const std::string& prefix) {
  const std::string w = prefix + ".weight";
  auto fail = [&](const std::string& name, const std::string& m) -> void {
    throw std::runtime_error("bitsandbytes 4-bit tensor " + name + ": " + m);
  };
  auto need = [&](const std::string& name) {
    auto t = lookup(name);
    if (!t) fail(name, "missing (the checkpoint has " + w + ".absmax, so it must have the whole 4-bit layout)");
    return *t;
  };

  const std::string qs_nf4 = w + ".quant_state.bitsandbytes__nf4";
  auto qs = lookup(qs_nf4);
  if (!qs) {
    if (lookup(w + ".quant_state.bitsandbytes__fp4"))
      fail(w + ".quant_state.bitsandbytes__fp4",
           "quant_type fp4 is not supported; only nf4 (re-quantize the model with bnb_4bit_quant_type=nf4)");
    fail(qs_nf4, "missing");
  }
  if (qs->scalar_type() != torch::kUInt8 || qs->dim() != 1) fail(qs_nf4, "must be a 1-D uint8 tensor of JSON bytes");
  const torch::Tensor qsb = qs->contiguous();
  const std::string js(reinterpret_cast<const char*>(qsb.data_ptr<uint8_t>()), static_cast<size_t>(qsb.numel()));
  nlohmann::json j;
  try {
    j = json_parse(js, "");
  } catch (const nlohmann::json::exception& e) {
    fail(qs_nf4, std::string("invalid JSON: ") + e.what());
  } catch (const JsonLimitError& e) {
    fail(qs_nf4, e.what());
  }
  if (!j.is_object()) fail(qs_nf4, "JSON is not an object");
  // An integer field: a JSON integer that fits int64 (get<int64_t> of a float like 9.2e21
  // is undefined behaviour: tests/fuzz/regressions/quant_state/nested_blocksize_9e21).
  auto int_field = [&](const nlohmann::json& v, const std::string& key) -> int64_t {
    if (!json_is_int64(v)) fail(qs_nf4, key + " must be an integer, got " + v.dump());
    return v.get<int64_t>();
  };

  Nf4Tensor t;
  try {
    const std::string qt = j.at("quant_type").get<std::string>();
    if (qt != "nf4") fail(qs_nf4, "quant_type \"" + qt + "\" is not supported; only nf4");
    t.blocksize = int_field(j.at("blocksize"), "blocksize");
    const std::string dt = j.at("dtype").get<std::string>();
    auto d = weight_dtype_from_name(dt);
    if (!d) fail(qs_nf4, "dtype \"" + dt + "\" is not one of float32, float16, bfloat16");
    t.dtype = *d;
    const nlohmann::json& shape = j.at("shape");
    if (!shape.is_array()) fail(qs_nf4, "shape must be a list of integers, got " + shape.dump());
    for (const auto& d : shape) t.shape.push_back(int_field(d, "shape entry"));
  } catch (const nlohmann::json::exception& e) {
    fail(qs_nf4, std::string("bad quant_state field: ") + e.what());
  }
  if (!valid_blocksize(t.blocksize)) fail(qs_nf4, "blocksize " + std::to_string(t.blocksize) + " is not supported");
  if (t.shape.empty()) fail(qs_nf4, "shape is empty");
  // The product must fit int64 before numel() forms it (tests/fuzz/regressions/quant_state:
  // [2^32, 2^32] was a signed overflow).
  int64_t prod = 1;
  for (int64_t s : t.shape) {
    if (s <= 0) fail(qs_nf4, "shape " + shape_str(t.shape) + " has a non-positive dimension");
    if (prod > (int64_t{1} << 50) / s) fail(qs_nf4, "shape " + shape_str(t.shape) + " has more than 2^50 elements");
    prod *= s;
  }
  const int64_t n = t.numel();
  const int64_t nb = t.nblocks();

  const torch::Tensor packed = need(w);
  if (packed.scalar_type() != torch::kUInt8)
    fail(w, std::string("dtype ") + c10::toString(packed.scalar_type()) +
                " is not supported (packed 4-bit data must be uint8; bnb_4bit_quant_storage other than uint8 is not read)");
  if (packed.numel() != (n + 1) / 2)
    fail(w, "has " + std::to_string(packed.numel()) + " bytes " + shape_str(packed) + ", but shape " +
                shape_str(t.shape) + " needs " + std::to_string((n + 1) / 2));
  t.packed = packed.reshape({-1}).to(torch::kCPU).contiguous().clone();

  const torch::Tensor qmap = need(w + ".quant_map");
  if (qmap.numel() != 16 || !at::isFloatingType(qmap.scalar_type()))
    fail(w + ".quant_map", "must hold 16 floating-point values, has " + shape_str(qmap));
  {
    const torch::Tensor q = qmap.to(torch::kCPU).to(torch::kFloat32).contiguous();
    // bitsandbytes writes this very fp32 table (equal bit for bit); 1e-6 (8 ulps of |code| <= 1)
    // also admits a table that went through another float format and back, never another
    // code set (NF4's codes are >= 0.07 apart).
    for (int i = 0; i < 16; ++i)
      if (std::fabs(q.data_ptr<float>()[i] - kNf4Code[i]) > 1e-6f)
        fail(w + ".quant_map", "entry " + std::to_string(i) + " = " + std::to_string(q.data_ptr<float>()[i]) +
                                   " is not the NF4 code " + std::to_string(kNf4Code[i]));
  }

  const torch::Tensor absmax = need(w + ".absmax");
  auto nested_abs = lookup(w + ".nested_absmax");
  const bool json_nested = j.contains("nested_offset") || j.contains("nested_blocksize");
  if (nested_abs.has_value() != json_nested)
    fail(nested_abs ? w + ".nested_absmax" : qs_nf4,
         "double quantization is inconsistent: nested_absmax tensor " + std::string(nested_abs ? "present" : "absent") +
             " but quant_state nested_* keys " + (json_nested ? "present" : "absent"));
  if (absmax.numel() != nb)
    fail(w + ".absmax", "has " + std::to_string(absmax.numel()) + " values, shape " + shape_str(t.shape) +
                            " with blocksize " + std::to_string(t.blocksize) + " needs " + std::to_string(nb));
  if (!json_nested) {
    if (absmax.scalar_type() != torch::kFloat32) fail(w + ".absmax", "must be float32 (no double quantization)");
    t.absmax = absmax.reshape({-1}).to(torch::kCPU).contiguous().clone();
    return t;
  }
  if (absmax.scalar_type() != torch::kUInt8) fail(w + ".absmax", "must be uint8 with double quantization");
  try {
    t.nested_blocksize = int_field(j.at("nested_blocksize"), "nested_blocksize");
    const double off = j.at("nested_offset").get<double>();
    // A float32 value in the file (tests/fuzz/regressions/quant_state: 1e300 became inf
    // and every dequantized weight with it).
    if (!(std::fabs(off) <= 3.4e38)) fail(qs_nf4, "nested_offset " + std::to_string(off) + " is not a finite float32");
    t.offset = static_cast<float>(off);
    const std::string nd = j.at("nested_dtype").get<std::string>();
    if (nd != "float32") fail(qs_nf4, "nested_dtype \"" + nd + "\" is not float32");
  } catch (const nlohmann::json::exception& e) {
    fail(qs_nf4, std::string("bad nested quant_state field: ") + e.what());
  }
  if (t.nested_blocksize <= 0) fail(qs_nf4, "nested_blocksize must be positive");
  const int64_t nnb = ceil_div(nb, t.nested_blocksize);
  if (nested_abs->scalar_type() != torch::kFloat32 || nested_abs->numel() != nnb)
    fail(w + ".nested_absmax", "must be float32 with " + std::to_string(nnb) + " values, has " +
                                   c10::toString(nested_abs->scalar_type()) + " " + shape_str(*nested_abs));
  const torch::Tensor ncode = need(w + ".nested_quant_map");
  if (ncode.scalar_type() != torch::kFloat32 || ncode.numel() != 256)
    fail(w + ".nested_quant_map", "must be 256 float32 values, has " + shape_str(ncode));
  t.absmax = absmax.reshape({-1}).to(torch::kCPU).contiguous().clone();
  t.nested_absmax = nested_abs->reshape({-1}).to(torch::kCPU).contiguous().clone();
  t.nested_code = ncode.reshape({-1}).to(torch::kCPU).contiguous().clone();
  return t;
}

}  // namespace dpo
