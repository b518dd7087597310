// Fuzzes the Llama config.json reader (core/llama.h): strict JSON + every field check.
// Checked: a config that is accepted is valid (llama_config_checked accepts it again)
// and survives a round trip through llama_config_to_json unchanged.
#include <torch/types.h>

#include <nlohmann/json.hpp>

#include "core/llama.h"
#include "core/safetensors.h"
#include "tests/fuzz/fuzz_common.h"

namespace {
void same(const char* field, double a, double b) {
  if (!(a == b) && !(a != a && b != b))
    fuzz::fail(std::string("round trip changed ") + field + ": " + std::to_string(a) + " -> " + std::to_string(b));
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  fuzz::expect_clean("llama_config", [&] {
    const dpo::LlamaConfig c = dpo::llama_config_from_json(dpo::json_parse_strict(text, "config.json"));
    const dpo::LlamaConfig again = dpo::llama_config_checked(c);
    same("head_dim (checked twice)", c.head_dim, again.head_dim);
    const nlohmann::json out = dpo::llama_config_to_json(c);
    dpo::LlamaConfig r;
    try {
      r = dpo::llama_config_from_json(dpo::json_parse_strict(out.dump(), "written config.json"));
    } catch (const std::exception& e) {
      fuzz::fail(std::string("config written by llama_config_to_json is refused: ") + e.what());
    }
    same("hidden_size", c.hidden_size, r.hidden_size);
    same("intermediate_size", c.intermediate_size, r.intermediate_size);
    same("num_hidden_layers", c.num_hidden_layers, r.num_hidden_layers);
    same("num_attention_heads", c.num_attention_heads, r.num_attention_heads);
    same("num_key_value_heads", c.num_key_value_heads, r.num_key_value_heads);
    same("head_dim", c.head_dim, r.head_dim);
    same("rms_norm_eps", c.rms_norm_eps, r.rms_norm_eps);
    same("rope_theta", c.rope_theta, r.rope_theta);
    same("rope_scaling.type", static_cast<int>(c.rope_scaling.type), static_cast<int>(r.rope_scaling.type));
    same("rope_scaling.factor", c.rope_scaling.factor, r.rope_scaling.factor);
    same("vocab_size", c.vocab_size, r.vocab_size);
    same("max_position_embeddings", c.max_position_embeddings, r.max_position_embeddings);
    same("tie_word_embeddings", c.tie_word_embeddings, r.tie_word_embeddings);
    same("torch_dtype", static_cast<int>(c.torch_dtype), static_cast<int>(r.torch_dtype));
    same("bos_token_id", c.bos_token_id, r.bos_token_id);
    same("eos_token_id", c.eos_token_id, r.eos_token_id);
    same("pad_token_id", c.pad_token_id.value_or(-7), r.pad_token_id.value_or(-7));
  });
  return 0;
}
