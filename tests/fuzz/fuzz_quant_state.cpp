// Fuzzes the bitsandbytes 4-bit checkpoint reader (core/nf4.h, nf4_from_bnb): the
// quant_state JSON (quant_type, blocksize, dtype, shape, nested_*) against the tensors
// next to it.
// Input: [flags][n][JSON...]. The harness quantizes a real weight of n + 1 values
// (double quantization when flags bit 0 is set) with nf4_quantize, takes its
// bitsandbytes tensors from nf4_to_bnb_tensors, and replaces the quant_state JSON by
// the input's JSON; flags bit 1 drops .nested_absmax, bit 2 renames the state to
// bitsandbytes__fp4. So the fuzzer explores JSON that disagrees with real tensors.
// Checked: an accepted state dequantizes to numel() finite values.
#include <torch/types.h>

#include <cmath>
#include <map>

#include "core/nf4.h"
#include "tests/fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const uint8_t flags = data[0];
  const int64_t n = 1 + data[1];  // 1..256 values: up to 5 blocks of 64, 2 nested blocks
  const std::string json(reinterpret_cast<const char*>(data + 2), size - 2);

  torch::manual_seed(n);
  const torch::Tensor w = torch::randn({n});
  const dpo::Nf4Tensor q = dpo::nf4_quantize(w, /*double_quant=*/(flags & 1) != 0, 64);
  std::map<std::string, torch::Tensor> tensors;
  for (auto& [name, t] : dpo::nf4_to_bnb_tensors(q, "m")) tensors[name] = t;
  std::string state = "m.weight.quant_state.bitsandbytes__nf4";
  if (flags & 2) tensors.erase("m.weight.nested_absmax");
  if (flags & 4) {
    tensors.erase(state);
    state = "m.weight.quant_state.bitsandbytes__fp4";
  }
  torch::Tensor bytes = torch::empty({static_cast<int64_t>(json.size())}, torch::kUInt8);
  if (!json.empty()) std::memcpy(bytes.data_ptr<uint8_t>(), json.data(), json.size());
  tensors[state] = bytes;

  const dpo::TensorLookup lookup = [&](const std::string& name) -> std::optional<torch::Tensor> {
    auto it = tensors.find(name);
    if (it == tensors.end()) return std::nullopt;
    return it->second;
  };
  fuzz::expect_clean("nf4_from_bnb", [&] {
    if (!dpo::nf4_bnb_present(lookup, "m")) fuzz::fail("absmax present but nf4_bnb_present says no");
    const dpo::Nf4Tensor t = dpo::nf4_from_bnb(lookup, "m");
    if (t.numel() <= 0 || t.numel() > 2 * q.packed.numel()) fuzz::fail("accepted numel " + std::to_string(t.numel()));
    const torch::Tensor d = dpo::nf4_dequantize(t, torch::kFloat32);
    if (d.numel() != t.numel()) fuzz::fail("dequantized size differs from numel()");
    if (!torch::isfinite(d).all().item<bool>()) fuzz::fail("dequantized values are not finite");
  });
  return 0;
}
