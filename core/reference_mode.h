// The reference model of DPO: the policy's own base weights with every LoRA adapter
// and every modules_to_save copy switched off (PEFT's `with model.disable_adapter():`).
// ReferenceModeGuard is the one place that switches them: the trainer's reference pass,
// --precompute_ref_log_probs, dpo_score --reference and the benchmarks all go through it.
// Header-only: dpo_lora and dpo_llama do not depend on each other; a user links both.
#pragma once
#include "core/llama.h"
#include "core/lora.h"

namespace dpo {

/// Adapters and modules_to_save off for the guard's lifetime, back on when it ends (an
/// exception included). Switching them consumes no random numbers, so dropout streams are
/// unaffected. Not nestable: the end of an inner guard would switch the policy back on.
class ReferenceModeGuard {
 public:
  ReferenceModeGuard(const LlamaModel& model, const NamedLinears& adapters) : model_(model), adapters_(adapters) {
    lora_set_enabled(adapters_, false);
    model_->set_modules_to_save_enabled(false);  // the original embeddings / lm_head
  }
  ~ReferenceModeGuard() {
    lora_set_enabled(adapters_, true);
    model_->set_modules_to_save_enabled(true);
  }
  ReferenceModeGuard(const ReferenceModeGuard&) = delete;
  ReferenceModeGuard& operator=(const ReferenceModeGuard&) = delete;

 private:
  LlamaModel model_;  // a holder: shares the module
  const NamedLinears& adapters_;
};

}  // namespace dpo
