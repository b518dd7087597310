// Fuzzes the PEFT adapter_config.json reader (core/lora.h, lora_config_load).
// Checked: an accepted config has a positive rank, finite alpha, dropout in [0, 1)
// and target modules, and the adapter_config.json written for it (lora_config_json)
// is accepted again with the same values.
#include <torch/types.h>

#include <cmath>

#include "core/lora.h"
#include "tests/fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string dir = fuzz::scratch_dir() + "/adapter";
  const std::string again_dir = fuzz::scratch_dir() + "/adapter_again";
  static const bool made = [&] {
    std::filesystem::create_directories(dir);
    std::filesystem::create_directories(again_dir);
    return true;
  }();
  (void)made;
  fuzz::write_scratch("adapter/adapter_config.json", data, size);
  fuzz::expect_clean("lora_config_load", [&] {
    const dpo::LoraConfig c = dpo::lora_config_load(dir);
    if (c.r <= 0) fuzz::fail("accepted rank " + std::to_string(c.r));
    if (!std::isfinite(c.alpha)) fuzz::fail("accepted a non-finite lora_alpha");
    if (!(c.dropout >= 0 && c.dropout < 1)) fuzz::fail("accepted lora_dropout " + std::to_string(c.dropout));
    if (c.target_modules.empty()) fuzz::fail("accepted an empty target_modules");
    const std::string text = dpo::lora_config_json(c, "base");
    fuzz::write_scratch("adapter_again/adapter_config.json", reinterpret_cast<const uint8_t*>(text.data()), text.size());
    dpo::LoraConfig r;
    try {
      r = dpo::lora_config_load(again_dir);
    } catch (const std::exception& e) {
      fuzz::fail(std::string("adapter_config.json written by lora_config_json is refused: ") + e.what());
    }
    if (r.r != c.r || r.alpha != c.alpha || r.dropout != c.dropout || r.use_rslora != c.use_rslora ||
        r.target_modules != c.target_modules)
      fuzz::fail("adapter_config.json round trip changed a value");
  });
  return 0;
}
