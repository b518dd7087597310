// NF4 quantization: known values, bitsandbytes byte layout, double quantization,
// and the bitsandbytes checkpoint layout round trip.
#include <gtest/gtest.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <map>
#include <string>

#include "core/nf4.h"

namespace dpo {
namespace {

std::vector<uint8_t> bytes_of(const torch::Tensor& t) {
  const torch::Tensor c = t.contiguous();
  return std::vector<uint8_t>(c.data_ptr<uint8_t>(), c.data_ptr<uint8_t>() + c.numel());
}

// Dequantization written independently of nf4.cpp (torch ops, no LUT).
torch::Tensor reference_dequant(const Nf4Tensor& t, const torch::Tensor& absmax_f32) {
  const torch::Tensor p = t.packed.to(torch::kInt64);
  const torch::Tensor codes = torch::stack({p.div(16, "floor"), p.remainder(16)}, 1).reshape({-1}).slice(0, 0, t.numel());
  const torch::Tensor table = torch::tensor(std::vector<float>(kNf4Code.begin(), kNf4Code.end()));
  const torch::Tensor scale = absmax_f32.repeat_interleave(t.blocksize).slice(0, 0, t.numel());
  return (table.index_select(0, codes) * scale).reshape(t.shape);
}

int nearest_code(float x) {
  int best = 0;
  for (int k = 1; k < 16; ++k)
    if (std::fabs(x - kNf4Code[k]) < std::fabs(x - kNf4Code[best])) best = k;
  return best;
}

TEST(Nf4, CodeTableIsBitsandbytesNf4) {
  EXPECT_EQ(kNf4Code[0], -1.0f);
  EXPECT_EQ(kNf4Code[7], 0.0f);
  EXPECT_EQ(kNf4Code[15], 1.0f);
  EXPECT_FLOAT_EQ(kNf4Code[1], -0.6961928009986877f);
  EXPECT_FLOAT_EQ(kNf4Code[8], 0.07958029955625534f);
  for (int k = 1; k < 16; ++k) EXPECT_LT(kNf4Code[k - 1], kNf4Code[k]);
}

TEST(Nf4, SixteenCodesTimesAbsmaxRoundTripExactly) {
  // Two blocks of 64: codes 0..15 four times scaled by 2.5, then reversed, scaled by 0.003.
  std::vector<float> w;
  for (int rep = 0; rep < 4; ++rep)
    for (int k = 0; k < 16; ++k) w.push_back(kNf4Code[k] * 2.5f);
  for (int rep = 0; rep < 4; ++rep)
    for (int k = 15; k >= 0; --k) w.push_back(kNf4Code[k] * 0.003f);
  const torch::Tensor x = torch::tensor(w).reshape({2, 64});
  const Nf4Tensor q = nf4_quantize(x, false);
  ASSERT_EQ(q.packed.numel(), 64);
  ASSERT_EQ(q.absmax.numel(), 2);
  EXPECT_EQ(q.absmax[0].item<float>(), 2.5f);
  EXPECT_EQ(q.absmax[1].item<float>(), 0.003f);
  const auto b = bytes_of(q.packed);
  for (int j = 0; j < 8; ++j) EXPECT_EQ(b[j], ((2 * j) << 4 | (2 * j + 1))) << j;            // 0x01, 0x23, ...
  for (int j = 32; j < 40; ++j) EXPECT_EQ(b[j], ((15 - 2 * (j - 32)) << 4 | (14 - 2 * (j - 32)))) << j;  // 0xFE, ...
  EXPECT_TRUE(torch::equal(nf4_dequantize(q, torch::kFloat32), x));
}

TEST(Nf4, PackedBytesHandMadeExampleHighNibbleFirst) {
  // absmax 1: 1.0 -> 15, -1.0 -> 0, 0.0 -> 7, 0.5 -> 12 (0.4407), -0.25 -> 4 (-0.2844), 0.1 -> 8 (0.0796).
  const torch::Tensor x = torch::tensor({1.0f, -1.0f, 0.0f, 0.5f, -0.25f, 0.1f});
  const Nf4Tensor q = nf4_quantize(x, false);
  EXPECT_EQ(bytes_of(q.packed), (std::vector<uint8_t>{0xF0, 0x7C, 0x48}));
  const torch::Tensor d = nf4_dequantize(q, torch::kFloat32);
  const std::vector<float> want{1.0f, -1.0f, 0.0f, kNf4Code[12], kNf4Code[4], kNf4Code[8]};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(d[i].item<float>(), want[i]) << i;
}

TEST(Nf4, OddLengthPadsLowNibbleWithCodeOfZero) {
  const torch::Tensor x = torch::tensor({1.0f, -1.0f, 0.5f, -0.5f, 0.25f, -0.25f, 0.75f});
  const Nf4Tensor q = nf4_quantize(x, false);
  ASSERT_EQ(q.packed.numel(), 4);
  // bitsandbytes pads with 0.0 before quantizing: the last low nibble is code 7.
  EXPECT_EQ(bytes_of(q.packed)[3], (nearest_code(0.75f) << 4) | 7);
  const torch::Tensor d = nf4_dequantize(q, torch::kFloat32);
  ASSERT_EQ(d.numel(), 7);
  for (int i = 0; i < 7; ++i) EXPECT_EQ(d[i].item<float>(), kNf4Code[nearest_code(x[i].item<float>())]) << i;
}

TEST(Nf4, ZeroBlockStaysZero) {
  torch::Tensor x = torch::randn({3, 64});
  x[1].zero_();
  const Nf4Tensor q = nf4_quantize(x, false);
  EXPECT_EQ(q.absmax[1].item<float>(), 0.0f);
  // 0 * (1/0) = NaN falls through bnb's tree to code 0; dequantized: -1 * 0 = -0.
  for (uint8_t v : bytes_of(q.packed.slice(0, 32, 64))) EXPECT_EQ(v, 0x00);
  const torch::Tensor d = nf4_dequantize(q, torch::kFloat32);
  EXPECT_TRUE(torch::all(d[1] == 0).item<bool>());
  EXPECT_GT(d[0].abs().max().item<float>(), 0.0f);
}

TEST(Nf4, PartialLastBlockUsesItsOwnAbsmax) {
  const int64_t n = 64 * 3 + 10;
  torch::manual_seed(7);
  torch::Tensor x = torch::randn({n});
  x.slice(0, 192).mul_(0.01);
  const Nf4Tensor q = nf4_quantize(x, false);
  ASSERT_EQ(q.absmax.numel(), 4);
  for (int b = 0; b < 4; ++b) {
    const torch::Tensor blk = x.slice(0, b * 64, std::min<int64_t>(n, (b + 1) * 64));
    EXPECT_EQ(q.absmax[b].item<float>(), blk.abs().max().item<float>()) << b;
  }
  const torch::Tensor d = nf4_dequantize(q, torch::kFloat32);
  EXPECT_TRUE(torch::equal(d, reference_dequant(q, q.absmax)));
  // Half the widest gap between neighbouring codes (-1.0 and -0.6962) bounds the error per block.
  float widest = 0;
  for (int c = 1; c < 16; ++c) widest = std::max(widest, kNf4Code[c] - kNf4Code[c - 1]);
  const float half_gap = widest / 2;
  for (int b = 0; b < 4; ++b) {
    const auto s = torch::indexing::Slice(b * 64, std::min<int64_t>(n, (b + 1) * 64));
    const float err = (d.index({s}) - x.index({s})).abs().max().item<float>();
    EXPECT_LE(err, half_gap * q.absmax[b].item<float>() * 1.0001f) << b;
  }
}

TEST(Nf4, OneHugeValueFlushesItsBlockOnly) {
  torch::Tensor x = torch::full({128}, 0.01f);
  x[5] = 1000.0f;
  const Nf4Tensor q = nf4_quantize(x, false);
  const torch::Tensor d = nf4_dequantize(q, torch::kFloat32);
  EXPECT_EQ(d[5].item<float>(), 1000.0f);
  // 0.01 / 1000 = 1e-5 rounds to the code 0.0 in the huge value's block...
  EXPECT_EQ(d[4].item<float>(), 0.0f);
  EXPECT_EQ(d[63].item<float>(), 0.0f);
  // ... while the next block, with its own absmax, keeps 0.01 exactly (code 1.0).
  EXPECT_EQ(d[64].item<float>(), 0.01f);
}

TEST(Nf4, TiesOnThresholdsGoToTheLowerCode) {
  // With absmax 1 the scale is exactly 1, so x is compared to bnb's thresholds as is.
  const float t = 0.03979014977812767f;  // between code 7 (0.0) and code 8
  const float above = std::nextafter(t, 1.0f);
  const float t2 = -0.8480964004993439f;  // between code 0 and code 1
  const torch::Tensor x = torch::tensor({1.0f, t, above, t2, std::nextafter(t2, 0.0f), 0.0f});
  const auto b = bytes_of(nf4_quantize(x, false).packed);
  EXPECT_EQ(b[0], (15 << 4) | 7);
  EXPECT_EQ(b[1], (8 << 4) | 0);
  EXPECT_EQ(b[2], (1 << 4) | 7);
}

TEST(Nf4, RandomWeightsMapToTheNearestCode) {
  const torch::Tensor x = torch::randn({37, 91});  // 3367 values: partial last block, odd count
  const Nf4Tensor q = nf4_quantize(x, false);
  const torch::Tensor flat = x.reshape({-1});
  const auto b = bytes_of(q.packed);
  for (int64_t i = 0; i < flat.numel(); ++i) {
    const float a = q.absmax[i / 64].item<float>();
    const int code = (i % 2 == 0) ? b[i / 2] >> 4 : b[i / 2] & 15;
    // Exact: the quantizer's own scaling (one product by 1 / absmax, as bitsandbytes).
    EXPECT_EQ(code, nearest_code(flat[i].item<float>() * (1.0f / a))) << i;
  }
  EXPECT_TRUE(torch::equal(nf4_dequantize(q, torch::kFloat32), reference_dequant(q, q.absmax)));
}

TEST(Nf4, ParallelDequantizeMatchesSingleThread) {
  const torch::Tensor x = torch::randn({300, 1000});
  const Nf4Tensor q = nf4_quantize(x, true);
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const torch::Tensor one = nf4_dequantize(q, torch::kFloat32);
  at::set_num_threads(std::max(2, threads));
  const torch::Tensor many = nf4_dequantize(q, torch::kFloat32);
  at::set_num_threads(threads);
  EXPECT_TRUE(torch::equal(one, many));
  EXPECT_TRUE(torch::equal(many, reference_dequant(q, nf4_absmax_f32(q))));
}

TEST(Nf4, OtherOutputAndInputDtypes) {
  const torch::Tensor x = torch::randn({16, 64}).to(torch::kBFloat16);
  const Nf4Tensor q = nf4_quantize(x, false);
  EXPECT_EQ(q.dtype, torch::kBFloat16);
  const Nf4Tensor q32 = nf4_quantize(x.to(torch::kFloat32), false);
  EXPECT_EQ(bytes_of(q.packed), bytes_of(q32.packed));  // bf16 -> fp32 is exact
  const torch::Tensor d32 = nf4_dequantize(q, torch::kFloat32);
  EXPECT_TRUE(torch::equal(nf4_dequantize(q, torch::kBFloat16), d32.to(torch::kBFloat16)));
  EXPECT_TRUE(torch::equal(nf4_dequantize(q, torch::kFloat16), d32.to(torch::kFloat16)));
  EXPECT_THROW(nf4_quantize(x, false, 48), std::runtime_error);
  EXPECT_THROW(nf4_quantize(torch::zeros({0}), false), std::runtime_error);
}

TEST(Nf4, DynamicMapIsBitsandbytesSigned) {
  const auto& c = dynamic_map_signed();
  for (int i = 1; i < 256; ++i) EXPECT_LE(c[i - 1], c[i]);
  EXPECT_EQ(c[127], 0.0f);
  EXPECT_EQ(c[255], 1.0f);
  EXPECT_FLOAT_EQ(c[254], 0.99296875f);  // mean of the last two of linspace(0.1, 1, 65)
  EXPECT_EQ(c[0], -c[254]);
  EXPECT_FLOAT_EQ(c[128], 5.5e-7f);  // 1e-6 * (0.1 + 1) / 2: the smallest positive value (3 roundings <= 4 ulps)
  for (int i = 0; i < 127; ++i) EXPECT_EQ(c[i], -c[254 - i]) << i;
}

TEST(Nf4, DoubleQuantKeepsCodesAndBoundsAbsmaxError) {
  torch::manual_seed(20261130);
  const torch::Tensor x = torch::randn({200, 640}) * torch::rand({200, 1});  // 2000 blocks, 8 nested blocks
  const Nf4Tensor plain = nf4_quantize(x, false);
  const Nf4Tensor dq = nf4_quantize(x, true);
  ASSERT_TRUE(dq.double_quant());
  EXPECT_EQ(dq.absmax.scalar_type(), torch::kUInt8);
  EXPECT_EQ(dq.nested_absmax.numel(), 8);
  EXPECT_EQ(dq.nested_code.numel(), 256);
  EXPECT_EQ(bytes_of(plain.packed), bytes_of(dq.packed));  // values use the exact absmax
  EXPECT_FLOAT_EQ(dq.offset, plain.absmax.mean().item<float>());  // the same absmax.mean()
  const torch::Tensor a = plain.absmax;
  const torch::Tensor adq = nf4_absmax_f32(dq);
  const auto& code = dynamic_map_signed();
  const auto q = bytes_of(dq.absmax);
  for (int64_t b = 0; b < a.numel(); ++b) {
    const float na = dq.nested_absmax[b / 256].item<float>();
    EXPECT_EQ(na, (a.slice(0, b / 256 * 256, std::min<int64_t>(a.numel(), (b / 256 + 1) * 256)) - dq.offset)
                      .abs().max().item<float>());
    // The chosen 8-bit code is the nearest one to (absmax - offset) / nested_absmax.
    const float v = (a[b].item<float>() - dq.offset) * (1.0f / na);
    float best = 10.0f;
    for (float c : code) best = std::min(best, std::fabs(v - c));
    // v is the quantizer's own fp32 value (the same two operations); its midpoints
    // (upper + val) * 0.5 round once (u |mid| <= u), so the chosen code may be the farther
    // one by 2u; the two fp32 differences here round too (u each, |diff| <= 2): 6u.
    constexpr float u = 0x1p-24f;
    EXPECT_LE(std::fabs(v - code[q[b]]), best + 6 * u) << b;
    // The dynamic map is at least as fine as 1/64 near 1 -> error <= ~0.0071 * nested_absmax;
    // v carries 3u (a subtraction, 1 / na, a product), code * na and + offset round once each.
    const float ad = adq[b].item<float>();
    EXPECT_LE(std::fabs(ad - a[b].item<float>()), 0.0071f * na + 3 * u * na + 2 * u * std::fabs(ad)) << b;
  }
  // |code * adq - x| <= |code| * |adq - a| + |code * a - x| <= 0.0071 * nested_absmax + 0.1385 * a
  // (|code| <= 1; 0.1385 = half the widest NF4 code gap). The bound used to scale the first
  // term by 0.1385 too, which random data broke once in a full-suite run.
  const float err = (nf4_dequantize(dq, torch::kFloat32) - x).abs().max().item<float>();
  EXPECT_LE(err, (0.1385f * a.max().item<float>() + 0.0071f * dq.nested_absmax.max().item<float>()) * 1.001f);
}

TensorLookup lookup_of(const std::map<std::string, torch::Tensor>& m) {
  return [&m](const std::string& k) -> std::optional<torch::Tensor> {
    auto it = m.find(k);
    if (it == m.end()) return std::nullopt;
    return it->second;
  };
}

std::map<std::string, torch::Tensor> to_map(const std::vector<std::pair<std::string, torch::Tensor>>& v) {
  return std::map<std::string, torch::Tensor>(v.begin(), v.end());
}

std::string json_of(const torch::Tensor& t) {
  const auto b = bytes_of(t);
  return std::string(b.begin(), b.end());
}

TEST(Nf4Bnb, LayoutNamesShapesAndJson) {
  const Nf4Tensor q = nf4_quantize(torch::randn({4, 64}).to(torch::kFloat16), false);
  const auto v = nf4_to_bnb_tensors(q, "model.layers.0.mlp.up_proj");
  ASSERT_EQ(v.size(), 4u);
  EXPECT_EQ(v[0].first, "model.layers.0.mlp.up_proj.weight");
  EXPECT_EQ(v[0].second.sizes(), (std::vector<int64_t>{128, 1}));
  EXPECT_EQ(v[0].second.scalar_type(), torch::kUInt8);
  EXPECT_EQ(v[1].first, "model.layers.0.mlp.up_proj.weight.absmax");
  EXPECT_EQ(v[2].first, "model.layers.0.mlp.up_proj.weight.quant_map");
  EXPECT_EQ(v[2].second[7].item<float>(), 0.0f);
  EXPECT_EQ(v[3].first, "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4");
  EXPECT_EQ(json_of(v[3].second),
            "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float16\", \"shape\": [4, 64]}");
}

TEST(Nf4Bnb, NestedOffsetIsWrittenAsPythonRepr) {
  Nf4Tensor q = nf4_quantize(torch::randn({2, 64}), true);
  auto js = [&](float off) {
    q.offset = off;
    return json_of(to_map(nf4_to_bnb_tensors(q, "p")).at("p.weight.quant_state.bitsandbytes__nf4"));
  };
  const std::string head =
      "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [2, 64], "
      "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": ";
  EXPECT_EQ(js(0.1f), head + "0.10000000149011612}");
  EXPECT_EQ(js(1e-5f), head + "9.999999747378752e-06}");
  EXPECT_EQ(js(1234.5f), head + "1234.5}");
  EXPECT_EQ(js(0.0001f), head + "9.999999747378752e-05}");
  EXPECT_EQ(js(2.0f), head + "2.0}");
}

TEST(Nf4Bnb, RoundTripPlainAndDoubleQuant) {
  for (bool dq : {false, true}) {
    const Nf4Tensor q = nf4_quantize(torch::randn({48, 200}), dq);
    const auto m = to_map(nf4_to_bnb_tensors(q, "x.q_proj"));
    EXPECT_EQ(m.size(), dq ? 6u : 4u);
    const Nf4Tensor r = nf4_from_bnb(lookup_of(m), "x.q_proj");
    EXPECT_EQ(r.shape, q.shape);
    EXPECT_EQ(r.double_quant(), dq);
    EXPECT_EQ(r.offset, q.offset);
    EXPECT_EQ(bytes_of(r.packed), bytes_of(q.packed));
    EXPECT_TRUE(torch::equal(r.absmax, q.absmax));
    EXPECT_TRUE(torch::equal(nf4_dequantize(r, torch::kFloat32), nf4_dequantize(q, torch::kFloat32)));
    EXPECT_TRUE(nf4_bnb_present(lookup_of(m), "x.q_proj"));
    EXPECT_FALSE(nf4_bnb_present(lookup_of(m), "x.k_proj"));
  }
}

void expect_error(const std::map<std::string, torch::Tensor>& m, const std::string& needle1,
                  const std::string& needle2) {
  try {
    nf4_from_bnb(lookup_of(m), "p");
    ADD_FAILURE() << "no error, expected one mentioning " << needle1;
  } catch (const std::runtime_error& e) {
    const std::string w = e.what();
    EXPECT_NE(w.find(needle1), std::string::npos) << w;
    EXPECT_NE(w.find(needle2), std::string::npos) << w;
  }
}

torch::Tensor json_tensor(const std::string& s) {
  torch::Tensor t = torch::empty({static_cast<int64_t>(s.size())}, torch::kUInt8);
  std::memcpy(t.data_ptr<uint8_t>(), s.data(), s.size());
  return t;
}

TEST(Nf4Bnb, ValidationNamesTheTensor) {
  const auto good = to_map(nf4_to_bnb_tensors(nf4_quantize(torch::randn({4, 64}), false), "p"));
  const std::string qs = "p.weight.quant_state.bitsandbytes__nf4";
  {
    auto m = good;
    m.erase(qs);
    m["p.weight.quant_state.bitsandbytes__fp4"] = json_tensor(
        "{\"quant_type\": \"fp4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [4, 64]}");
    expect_error(m, "bitsandbytes__fp4", "fp4 is not supported");
  }
  {
    auto m = good;
    m[qs] = json_tensor("{\"quant_type\": \"fp4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [4, 64]}");
    expect_error(m, qs, "fp4");
  }
  {
    auto m = good;
    m[qs] = json_tensor("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [4, 128]}");
    expect_error(m, "p.weight", "needs 256");
  }
  {
    auto m = good;
    m["p.weight.absmax"] = torch::ones({5});
    expect_error(m, "p.weight.absmax", "needs 4");
  }
  // Integer fields must be JSON integers (a float such as 9.2e21 was cast to int64:
  // undefined behaviour, tests/fuzz/regressions/quant_state/nested_blocksize_9e21).
  for (const char* bad : {"\"blocksize\": 64.5, \"shape\": [4, 64]", "\"blocksize\": 9223372036854775807256, \"shape\": [4, 64]",
                          "\"blocksize\": 64, \"shape\": [4, 6.4e1]", "\"blocksize\": 64, \"shape\": 256"}) {
    auto m = good;
    m[qs] = json_tensor(std::string("{\"quant_type\": \"nf4\", \"dtype\": \"float32\", ") + bad + "}");
    expect_error(m, qs, "must be");
  }
  {
    auto m = good;
    m["p.weight.quant_map"] = torch::linspace(-1, 1, 16);
    expect_error(m, "p.weight.quant_map", "NF4 code");
  }
  {
    auto m = good;
    m.erase("p.weight.quant_map");
    expect_error(m, "p.weight.quant_map", "missing");
  }
  {
    auto m = good;
    m.erase(qs);
    expect_error(m, qs, "missing");
  }
  {
    auto m = good;
    m["p.weight"] = m["p.weight"].to(torch::kFloat32);
    expect_error(m, "p.weight", "uint8");
  }
  {
    auto m = good;
    m[qs] = json_tensor("{\"quant_type\": \"nf4\"");
    expect_error(m, qs, "invalid JSON");
  }
  {
    // Valid JSON nested 10^5 levels deep (issue 28): refused before a tree is built.
    auto m = good;
    m[qs] = json_tensor("{\"quant_type\": \"nf4\", \"x\": " + std::string(100000, '[') + std::string(100000, ']') +
                        "}");
    expect_error(m, qs, ": JSON nested deeper than 512 levels (the limit of every JSON reader here)");
  }
  {
    auto m = good;
    m["p.weight.nested_absmax"] = torch::ones({1});
    expect_error(m, "p.weight.nested_absmax", "inconsistent");
  }
}

}  // namespace
}  // namespace dpo
