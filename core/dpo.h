// The training objective that needs no model: the DPO losses of TRL's DPOTrainer
// (sigmoid with label smoothing, robust, hinge, IPO, + the RPO NLL term), their
// metrics under TRL's names as reducible sums, and the SFT loss. The per-sequence
// log-probs they consume come from core/logps.h. docs/objective.md has the formulas.
//
// Legend: B = preference pairs in a micro-batch, R = rows (R = 2B for a DPO batch:
// the B chosen rows first, then the B rejected rows, as TRL's concatenated_forward),
// T = tokens per row (prompt + answer + padding), V = vocabulary size.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <torch/types.h>

#include "core/logps.h"

namespace dpo {

/// The DPO objective's options (names as DPOConfig / the dpo_dist command line).
struct DpoOptions {
  /// Temperature of the implicit reward; > 0 (IPO: the regulariser tau).
  double beta = 0.1;
  /// sigmoid | ipo | hinge | robust.
  std::string loss_type = "sigmoid";
  /// cDPO / robust DPO label noise in [0, 0.5); only sigmoid and robust use it.
  double label_smoothing = 0.0;
  /// Weight of the RPO term (mean NLL of the chosen answers); 0 = off.
  double rpo_alpha = 0.0;
};

/// The loss types dpo_loss accepts, in the order error messages list them.
const std::vector<std::string>& dpo_loss_types();

/// Throws std::runtime_error naming the option (--beta, --loss_type,
/// --label_smoothing, --rpo_alpha) and the valid values.
void validate_dpo_options(const DpoOptions& opts);

/// Per-pair DPO losses and the (detached) implicit rewards.
struct DpoOutput {
  torch::Tensor losses;            // (B) differentiable w.r.t. the policy logps
  torch::Tensor chosen_rewards;    // (B) detached: beta * (pol_c - ref_c)
  torch::Tensor rejected_rewards;  // (B) detached: beta * (pol_r - ref_r)
};

/// TRL's DPOTrainer.dpo_loss for the loss types above (no RPO term), with
/// l = (pol_c - pol_r) - (ref_c - ref_r). The reference tensors are converted to the
/// policy's dtype and device. For "ipo" pass length-averaged logps (average_by_length).
DpoOutput dpo_loss(const torch::Tensor& pol_c,  // (B) policy logps of the chosen answers
                   const torch::Tensor& pol_r,  // (B) policy logps of the rejected answers
                   const torch::Tensor& ref_c,  // (B) reference logps, chosen
                   const torch::Tensor& ref_r,  // (B) reference logps, rejected
                   const DpoOptions& opts);

/// Metrics of one or more micro-batches as SUMS + counts, so that micro-batches and
/// ranks reduce by addition (to_vector / from_vector: one buffer for an allreduce)
/// and averages() gives the logged values under TRL's names.
struct DpoMetrics {
  double pairs = 0;                   // number of preference pairs summed over
  double loss_sum = 0;                // sum of per-pair losses (incl. the RPO term)
  double rewards_chosen_sum = 0;      // sum of beta * (pol_c - ref_c)
  double rewards_rejected_sum = 0;    // sum of beta * (pol_r - ref_r)
  double rewards_accuracies_sum = 0;  // number of pairs with chosen reward > rejected reward
  double rewards_margins_sum = 0;     // sum of chosen reward - rejected reward
  double logps_chosen_sum = 0;        // sum of policy logps (length-averaged for ipo), chosen
  double logps_rejected_sum = 0;      // same, rejected
  double logits_chosen_sum = 0;       // sum over chosen answer positions of the mean logit over V
  double logits_rejected_sum = 0;     // same, rejected
  double chosen_tokens = 0;           // answer tokens of the chosen rows
  double rejected_tokens = 0;         // answer tokens of the rejected rows
  double nll_sum = 0;                 // RPO only: sum of chosen-token NLLs
  double nll_tokens = 0;              // RPO only: chosen tokens counted in nll_sum (0 = RPO off)

  static constexpr int64_t kNumFields = 14;
  /// The fields in declaration order (for one allreduce of kNumFields doubles).
  std::vector<double> to_vector() const;
  /// Inverse of to_vector; throws if v.size() != kNumFields.
  static DpoMetrics from_vector(const std::vector<double>& v);
  DpoMetrics& operator+=(const DpoMetrics& o);

  /// (name, value) pairs, names as TRL logs them with `prefix` prepended ("" or
  /// "eval_"): loss, rewards/chosen, rewards/rejected, rewards/accuracies,
  /// rewards/margins, logps/chosen, logps/rejected, logits/chosen, logits/rejected,
  /// and nll_loss when nll_tokens > 0. Pair metrics are means over pairs, logits/* and
  /// nll_loss are means over answer tokens. Empty when pairs == 0.
  std::vector<std::pair<std::string, double>> averages(const std::string& prefix = "") const;
};

/// Everything one DPO micro-batch contributes.
struct DpoStepLoss {
  torch::Tensor loss;            // () mean of `losses`: call backward() on this
  torch::Tensor losses;          // (B) per-pair loss incl. rpo_alpha * nll, differentiable
  torch::Tensor chosen_logps;    // (B) detached policy logps as fed to the loss
  torch::Tensor rejected_logps;  // (B) detached, same
  DpoMetrics metrics;            // sums over this micro-batch
};

/// TRL's concatenated_forward + get_batch_loss_metrics on one micro-batch:
/// sequence_logps of the policy logits, (ipo: divided by the answer lengths),
/// dpo_loss against ref_logps, plus rpo_alpha * token_mean_nll(chosen rows) added to
/// every pair's loss (TRL's RPO: the NLL is token-weighted within the micro-batch).
/// ref_logps: SUMMED reference log-probs, (2B) = [chosen; rejected], as
/// sequence_logps(reference logits).logps or the HDF5 /ref_logps columns; for ipo
/// they are divided by the same answer lengths here. Undefined = reference-free
/// (reference logps taken as 0).
DpoStepLoss dpo_batch_loss(const torch::Tensor& logits,     // (2B, T, V) policy logits
                           const torch::Tensor& input_ids,  // (2B, T)
                           const torch::Tensor& loss_mask,  // (2B, T) nonzero at answer tokens
                           const torch::Tensor& ref_logps,  // (2B) or undefined
                           const DpoOptions& opts);

/// The same from per-sequence log-probs already computed ([chosen; rejected], 2B
/// entries, e.g. by head_logps): everything after sequence_logps.
DpoStepLoss dpo_batch_loss(const SeqLogps& policy, const torch::Tensor& ref_logps, const DpoOptions& opts);

/// The SFT (causal LM) loss parts: as HF's loss on labels with -100 outside the
/// answers, but as a sum + a count so the caller divides by the token count of the
/// whole optimizer step (all micro-batches, all ranks).
struct SftLoss {
  torch::Tensor nll_sum;  // () differentiable: sum over answer tokens of -log p
  int64_t tokens = 0;     // answer tokens in nll_sum
  int64_t correct = 0;    // answer tokens whose argmax prediction is the token
};
SftLoss sft_loss(const torch::Tensor& logits,     // (R, T, V)
                 const torch::Tensor& input_ids,  // (R, T)
                 const torch::Tensor& loss_mask); // (R, T)

/// SFT metrics of micro-batches as SUMS (reduce by addition, like DpoMetrics).
/// averages(): "loss" (token-mean NLL), "mean_token_accuracy" (TRL SFTTrainer's name:
/// answer tokens predicted by argmax / answer tokens), "answer_tokens".
struct SftMetrics {
  double nll_sum = 0, tokens = 0, rows = 0, correct = 0;
  static constexpr int64_t kNumFields = 4;
  std::vector<double> to_vector() const { return {nll_sum, tokens, rows, correct}; }
  /// Throws std::runtime_error unless v has kNumFields values.
  static SftMetrics from_vector(const std::vector<double>& v);
  SftMetrics& operator+=(const SftMetrics& o);
  /// The SftLoss of one micro-batch of `rows` rows.
  static SftMetrics of(const SftLoss& l, int64_t rows);
  std::vector<std::pair<std::string, double>> averages(const std::string& prefix) const;
};


}  // namespace dpo
