// One DPO micro-batch as the trainer, dpo_score and the benchmarks compute it, in its
// two layouts: TRL's padded rows (full logits, dense attention) and the packed batch
// (data/collate: shared prompt, padding-free row) -> the model's hidden states over
// that attention layout -> answer log-probs by the chunked lm_head (core/logps). The
// reference log-probs come from the same model with its adapters off
// (core/reference_mode.h). Also the FLOP count of a step, for train_mfu and the
// benchmark. The objectives (launch/objective.h) call these.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include <torch/types.h>

#include "core/attention.h"
#include "core/dpo.h"
#include "core/llama.h"
#include "core/lora.h"
#include "data/collate.h"

namespace dpo {

/// How a DPO micro-batch is laid out and scored (every combination gives the same
/// log-probs within fp32 rounding; docs/architecture.md).
struct DpoStepOptions {
  bool share_prompt = true;   // --prefix_sharing: [prompt; chosen; rejected] per pair
  bool padding_free = true;   // --padding_free: all pairs of the micro-batch in one row
  bool chunked_logps = true;  // lm_head + log-softmax in chunks of scored positions only
};

/// A PackedPairs moved to the model's device, with its attention layout.
struct ModelBatch {
  torch::Tensor input_ids;                        // (rows, T)
  std::shared_ptr<const AttentionLayout> layout;  // (rows, T)
  torch::Tensor target_position, target_token, target_sequence;  // (M) int64, CPU
  int64_t sequences = 0;                          // 2B
};
ModelBatch model_batch(const PackedPairs& p, const torch::Device& device);

/// Log-probs of the 2B answers ([chosen; rejected]), differentiable w.r.t. the adapters
/// when grad mode is on. chunked: core/logps head_logps on the hidden states; else the
/// full (rows, T, V) logits are built first (as TRL does) and read at the targets.
SeqLogps model_answer_logps(LlamaModel& model, const ModelBatch& b, bool chunked, const HeadLogpsOptions& extra = {});

/// TRL's path: sequence_logps of the full logits of padded rows [chosen; rejected]
/// (all on the model's device). Differentiable when grad mode is on.
SeqLogps padded_answer_logps(LlamaModel& model, const torch::Tensor& ids, const torch::Tensor& mask,
                             const torch::Tensor& loss_mask);

/// The reference model's summed answer log-probs, (2B) fp64, no grad: the policy with
/// `adapters` and modules_to_save off. Packed layout ...
torch::Tensor reference_logps(LlamaModel& model, const NamedLinears& adapters, const ModelBatch& b, bool chunked);
/// ... or padded rows (padded_answer_logps).
torch::Tensor reference_logps(LlamaModel& model, const NamedLinears& adapters, const torch::Tensor& ids,
                              const torch::Tensor& mask, const torch::Tensor& loss_mask);

/// The model a DPO micro-batch runs on: the policy, and its reference with `adapters` off.
struct DpoModel {
  LlamaModel model{nullptr};
  const NamedLinears* adapters = nullptr;
  torch::Device device{torch::kCPU};
  bool gradient_checkpointing = false;  // for the FLOP count only
};

/// One DPO micro-batch's loss in TRL's layout: two padded rows per pair, full logits.
/// The reference log-probs are the examples' (/ref_logps) or a reference pass. Adds the
/// TRL-counted tokens and the executed FLOPs (either may be null); ref_out (optional)
/// receives the reference log-probs used (2B).
DpoStepLoss dpo_padded_loss(const DpoModel& m, const std::vector<PreferenceExample>& ex, int64_t pad_id,
                            const DpoOptions& opts, int64_t* tokens, double* flops, torch::Tensor* ref_out = nullptr);
/// The same in the packed layout of `so` (--prefix_sharing / --padding_free).
DpoStepLoss dpo_packed_loss(const DpoModel& m, const std::vector<PreferenceExample>& ex, int64_t pad_id,
                            const DpoStepOptions& so, const DpoOptions& opts, int64_t* tokens, double* flops,
                            torch::Tensor* ref_out = nullptr);

/// Executed FLOPs of one micro-batch (matmuls only: projections, lm_head, attention
/// scores and values) for: reference forward (when `reference`), policy forward,
/// backward w.r.t. activations only (frozen base; LoRA ignored), + one more forward of
/// the layers with gradient checkpointing. dense_attention: every (query, key) pair of
/// a row is computed; else only the pairs the layout lets a query see.
double dpo_step_flops(const LlamaConfig& cfg, const PackedPairs& p, const DpoStepOptions& o, bool dense_attention,
                      bool reference, bool checkpointing);

/// Best fp32 GFLOP/s of an n x n x n matmul (a warm-up, then the best of `iters`).
double measure_matmul_gflops(int64_t n, int iters);

}  // namespace dpo
