// PEFT's modules_to_save for the embedding table and lm_head: trainable full
// copies (fp32, on the model's device) that replace the frozen originals while
// enabled, saved in adapter_model.safetensors next to the LoRA tensors under
// PEFT's keys (base_model.model.model.embed_tokens.weight,
// base_model.model.lm_head.weight), loaded, merged into the base, and trained
// with the adapters (one optimizer, one gradient sync buffer).
//
// Tied embeddings (tie_word_embeddings): one copy serves both the input table and
// lm_head, as PEFT does with ensure_weight_tying=True; it is written under the key
// of every module named, and the merged model stays tied.
//
// The reference pass uses the original tables (LlamaModel::set_modules_to_save_enabled
// false), as PEFT's disable_adapter() does.
//
// Legend: V vocab_size, C hidden_size.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include <torch/types.h>

#include "core/llama.h"

namespace dpo {

/// The modules an adapter records for `modules` on a model with `tied` embeddings: a tied
/// model's one trainable copy serves both tables, so it is recorded as both
/// ("embed_tokens", "lm_head"), as PEFT's ensure_weight_tying saves and loads it (PEFT
/// 0.22 fails on a tied adapter that holds only one of the two keys). Untied: `modules`.
std::vector<std::string> modules_to_save_recorded(const std::vector<std::string>& modules, bool tied);

/// Installs trainable fp32 copies of `modules` ("embed_tokens", "lm_head"; empty =
/// none) initialised from the model's current tables, enabled. Returns the distinct
/// trainable tensors (V, C) with the PEFT key of the first module each serves (for
/// the optimizer and gradient sync). Throws for unknown or repeated names.
std::vector<std::pair<std::string, torch::Tensor>> modules_to_save_attach(LlamaModel& model,
                                                                          const std::vector<std::string>& modules);
/// (PEFT key, tensor) of every module in `modules`, for lora_save_peft (a tied
/// model's single copy appears under each key named).
std::vector<std::pair<std::string, torch::Tensor>> modules_to_save_state(const LlamaModel& model,
                                                                         const std::vector<std::string>& modules);
/// Reads the `modules` tensors from dir/adapter_model.safetensors into the model's
/// copies (attaching them first when missing; in place otherwise, so an optimizer
/// keeps its references). On a tied model a key the file lacks is read from its twin
/// (adapters written with one key before modules_to_save_recorded). Missing keys, wrong
/// shapes, and different values under the two keys of a tied model throw naming the file
/// and key.
void modules_to_save_load(LlamaModel& model, const std::vector<std::string>& modules, const std::string& dir);
/// Writes the copies into the base tables (converted to their dtype) and removes
/// them: the model then computes what the adapter model computed.
void modules_to_save_merge(LlamaModel& model);

}  // namespace dpo
