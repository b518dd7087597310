// LoRA adapters on the named projections of a model (the Llama model hands out
// its seven projections per layer as {"model.layers.<i>.self_attn.q_proj", FrozenLinear}),
// and the PEFT on-disk format: adapter_model.safetensors with keys
// `base_model.model.<name>.lora_A.weight` (r, I) / `.lora_B.weight` (O, r), plus
// adapter_config.json (PEFT LoraConfig.to_dict, sorted keys, indent 2).
//
// Legend: I = in_features, O = out_features, r = LoRA rank.
// y = W x + scaling * B (A dropout(x)), scaling = alpha / r (alpha / sqrt(r) with rsLoRA).
#pragma once
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <torch/types.h>

#include "core/linear.h"

namespace dpo {

/// The seven linear projections of a Llama decoder layer ("all-linear").
inline const std::vector<std::string>& lora_all_linear_modules() {
  static const std::vector<std::string> k{"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  return k;
}

struct LoraConfig {
  /// Rank r of A (r, I) and B (O, r).
  int64_t r = 8;
  /// lora_alpha: scaling = alpha / r.
  double alpha = 16;
  /// Dropout on the adapter's input (training mode only).
  double dropout = 0.05;
  /// Projection names (q_proj ... down_proj) or "all-linear".
  std::vector<std::string> target_modules{"q_proj", "v_proj"};
  /// Rank-stabilized LoRA: scaling = alpha / sqrt(r).
  bool use_rslora = false;
  /// PEFT modules_to_save: "embed_tokens" and/or "lm_head", trained as full copies
  /// (core/modules_to_save.h) and saved next to the adapters under
  /// lora_modules_to_save_key(name).
  std::vector<std::string> modules_to_save;
  /// PEFT's ensure_weight_tying (written when the model ties its embeddings and
  /// modules_to_save is set: one trainable copy serves embed_tokens and lm_head).
  bool ensure_weight_tying = false;
};

/// The modules modules_to_save may name.
inline const std::vector<std::string>& lora_saveable_modules() {
  static const std::vector<std::string> k{"embed_tokens", "lm_head"};
  return k;
}

/// PEFT's key of a saved module in adapter_model.safetensors (get_peft_model_state_dict
/// drops "modules_to_save.default"): "base_model.model.model.embed_tokens.weight",
/// "base_model.model.lm_head.weight". Throws for other names.
inline std::string lora_modules_to_save_key(const std::string& module) {
  if (module == "embed_tokens") return "base_model.model.model.embed_tokens.weight";
  if (module == "lm_head") return "base_model.model.lm_head.weight";
  throw std::runtime_error("modules_to_save: \"" + module + "\" is not supported (embed_tokens, lm_head)");
}

/// target_modules with "all-linear" expanded and duplicates dropped (order kept).
/// Throws for names other than the seven projections.
inline std::vector<std::string> lora_expand_targets(const std::vector<std::string>& targets) {
  std::vector<std::string> out;
  auto add = [&](const std::string& t) {
    for (const auto& o : out)
      if (o == t) return;
    out.push_back(t);
  };
  for (const auto& t : targets) {
    if (t == "all-linear") {
      for (const auto& m : lora_all_linear_modules()) add(m);
      continue;
    }
    bool known = false;
    for (const auto& m : lora_all_linear_modules()) known = known || m == t;
    if (!known)
      throw std::runtime_error("lora target module \"" + t +
                               "\" is unknown (use q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj or all-linear)");
    add(t);
  }
  return out;
}

/// Throws std::runtime_error naming the field when cfg is unusable.
inline void lora_config_validate(const LoraConfig& cfg) {
  if (cfg.r <= 0) throw std::runtime_error("lora_r must be positive, got " + std::to_string(cfg.r));
  if (!(cfg.alpha > 0) || !std::isfinite(cfg.alpha))
    throw std::runtime_error("lora_alpha must be a positive number, got " + std::to_string(cfg.alpha));
  if (!(cfg.dropout >= 0.0 && cfg.dropout < 1.0))
    throw std::runtime_error("lora_dropout must be in [0, 1), got " + std::to_string(cfg.dropout));
  if (cfg.target_modules.empty()) throw std::runtime_error("lora_target_modules is empty");
  lora_expand_targets(cfg.target_modules);
  for (size_t i = 0; i < cfg.modules_to_save.size(); ++i) {
    lora_modules_to_save_key(cfg.modules_to_save[i]);
    for (size_t k = 0; k < i; ++k)
      if (cfg.modules_to_save[k] == cfg.modules_to_save[i])
        throw std::runtime_error("modules_to_save names \"" + cfg.modules_to_save[i] + "\" twice");
  }
}

/// alpha / r, or alpha / sqrt(r) with use_rslora (PEFT LoraLayer.update_layer).
inline double lora_scaling(const LoraConfig& cfg) {
  return cfg.use_rslora ? cfg.alpha / std::sqrt(static_cast<double>(cfg.r)) : cfg.alpha / static_cast<double>(cfg.r);
}

/// Named projections, e.g. {"model.layers.0.self_attn.q_proj", FrozenLinear}.
using NamedLinears = std::vector<std::pair<std::string, FrozenLinear>>;

/// "model.layers.0.self_attn.q_proj" -> "q_proj".
std::string lora_module_type(const std::string& name);
/// True when cfg's target_modules select `name`.
bool lora_targets(const LoraConfig& cfg, const std::string& name);
/// PEFT key of A or B: "base_model.model." + name + ".lora_A.weight" (which = 'A' or 'B').
std::string lora_peft_key(const std::string& name, char which);

/// Adds adapters to the targeted projections, in the order of `named`, all drawn
/// from one CPU generator seeded with `seed` (same seed -> same adapters on every
/// rank). Throws if a target module type matches none of the names. Returns the
/// number of adapted projections.
int64_t lora_attach(const NamedLinears& named, const LoraConfig& cfg, uint64_t seed);
/// Switches every adapter on/off (off: the reference model, same base weights).
void lora_set_enabled(const NamedLinears& named, bool enabled);
/// (PEFT key, parameter) for every adapter, A then B, in the order of `named`.
/// The tensors are the live parameters (for the optimizer / gradient sync).
std::vector<std::pair<std::string, torch::Tensor>> lora_parameters(const NamedLinears& named);

/// adapter_config.json's content for cfg (PEFT LoraConfig.to_dict keys).
std::string lora_config_json(const LoraConfig& cfg, const std::string& base_model_name_or_path);
/// Writes dir/adapter_model.safetensors and dir/adapter_config.json (each to a
/// temporary file renamed into place; dir is created). The adapted modules must be
/// exactly those cfg targets, with rank cfg.r. `saved_modules` (PEFT key -> tensor,
/// see core/modules_to_save.h) are written next to the adapters; their keys must be
/// those of cfg.modules_to_save.
void lora_save_peft(const NamedLinears& named, const LoraConfig& cfg, const std::string& dir,
                    const std::string& base_model_name_or_path,
                    const std::vector<std::pair<std::string, torch::Tensor>>& saved_modules = {});
/// Reads and validates dir/adapter_config.json (PEFT LoRA; unsupported features
/// such as DoRA, rank_pattern, bias != "none" or regex target_modules are refused).
LoraConfig lora_config_load(const std::string& dir);
/// Loads a PEFT adapter into `named` (attaching adapters where missing) and returns
/// its config. Every targeted module must have both keys with shapes (r, I)/(O, r);
/// missing/extra keys, shape or rank mismatches throw, naming the key and file.
/// The keys of cfg.modules_to_save are left to modules_to_save_load.
LoraConfig lora_load_peft(const NamedLinears& named, const std::string& dir);
/// Folds every adapter into its base (dense W + scaling * B @ A) and removes it.
void lora_merge(const NamedLinears& named);

}  // namespace dpo
