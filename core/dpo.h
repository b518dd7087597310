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
  /// One loss type (dpo_loss_types()) or a comma-separated mixture, e.g.
  /// "sigmoid,bco_pair,sft" (TRL's MPO recipe): loss = sum_k weight_k * mean(term_k).
  std::string loss_type = "sigmoid";
  /// Weights of the mixture's terms, one per loss type; empty = 1 each (TRL's default).
  std::vector<double> loss_weights;
  /// Label noise in [0, 0.5): cDPO (sigmoid), robust, exo_pair (its epsilon, > 0),
  /// aot and aot_unpaired use it.
  double label_smoothing = 0.0;
  /// Weight of the RPO term (mean NLL of the chosen answers); 0 = off.
  double rpo_alpha = 0.0;
  /// DiscoPOP's temperature tau (> 0), used by loss_type discopop.
  double discopop_tau = 0.05;
  /// bco_pair's reward shift delta: the running mean of the rewards (chosen and rejected)
  /// of the training steps so far, all ranks (BcoRunningMean; 0 for a fresh run).
  double bco_delta = 0.0;
  /// WPO (--use_weighting): every pair's loss (not sft / the RPO term) times
  /// min(1, exp(w_c + w_r)), w = SeqLogps::wpo_logps (the policy's, detached).
  bool use_weighting = false;
  /// LD-DPO (--ld_alpha) in [0, 1]: the policy's answer tokens past the shorter answer
  /// of the pair weigh alpha in its log-probs (ld_token_weights); 1 = off (TRL: None).
  double ld_alpha = 1.0;
  /// Set by a caller that adds the global-batch terms (aot, aot_unpaired) itself
  /// through dpo_global_terms: dpo_batch_loss then leaves them out of `losses`.
  bool skip_global_terms = false;
};

/// The loss types dpo_loss accepts, in the order error messages list them.
const std::vector<std::string>& dpo_loss_types();

/// One term of a loss mixture.
struct DpoLossTerm {
  std::string type;
  double weight = 1.0;
};
/// opts.loss_type split at commas, paired with opts.loss_weights (validated).
std::vector<DpoLossTerm> dpo_loss_terms(const DpoOptions& opts);
/// True when a term sorts over the batch (aot, aot_unpaired): its loss couples all
/// pairs of a batch, so a trainer computes it over the whole global batch.
bool dpo_is_global_term(const std::string& type);
bool dpo_has_global_terms(const DpoOptions& opts);

/// Throws std::runtime_error naming the option (--beta, --loss_type, --loss_weights,
/// --label_smoothing, --rpo_alpha, --discopop_tau, --ld_alpha, --use_weighting) and the valid values.
void validate_dpo_options(const DpoOptions& opts);

/// Per-pair inputs of one loss term, all (B) tensors of the policy's dtype/device.
struct PairLogps {
  torch::Tensor pol_c, pol_r;  // policy logps of the chosen / rejected answers
  torch::Tensor ref_c, ref_r;  // reference logps (detached)
  /// Answer token counts; "ipo" and "sigmoid_norm" divide the log-ratios by them
  /// (clamped to >= 1, as TRL 1.x). Undefined: those terms use the log-ratios as given.
  torch::Tensor len_c, len_r;
};

/// One term of TRL 1.x's DPOTrainer._compute_loss (not "sft"), per pair (B) (for
/// aot/aot_unpaired: per position of the sorted batch). Differentiable w.r.t. the
/// policy logps. docs/objective.md has every formula and its paper.
torch::Tensor dpo_loss_term(const std::string& type, const PairLogps& p, const DpoOptions& opts);

/// The global-batch terms (aot, aot_unpaired) of opts over N pairs gathered from every
/// micro-batch and rank: the SUM over the N sorted positions of sum_k weight_k *
/// term_k, and its derivative w.r.t. every pair's policy logps (for a backward of
/// sum_i grad_c[i] * pol_c[i] + grad_r[i] * pol_r[i]). Ties keep their order (stable
/// sort); the trainer passes the pairs in the global batch's order (rank by rank, each
/// rank's slice is contiguous), so the result does not depend on the world size.
struct DpoGlobalTerms {
  double loss_sum = 0;
  std::vector<double> grad_c, grad_r;  // (N)
};
DpoGlobalTerms dpo_global_terms(const std::vector<double>& pol_c, const std::vector<double>& pol_r,
                                const std::vector<double>& ref_c, const std::vector<double>& ref_r,
                                const DpoOptions& opts);

/// Per-pair DPO losses and the (detached) implicit rewards.
struct DpoOutput {
  torch::Tensor losses;            // (B) differentiable w.r.t. the policy logps
  torch::Tensor chosen_rewards;    // (B) detached: beta * (pol_c - ref_c)
  torch::Tensor rejected_rewards;  // (B) detached: beta * (pol_r - ref_r)
};

/// TRL's DPOTrainer.dpo_loss for ONE loss type (not a mixture, not "sft"; no RPO
/// term), with l = (pol_c - pol_r) - (ref_c - ref_r). The reference tensors are
/// converted to the policy's dtype and device. For "ipo" (and "sigmoid_norm") pass
/// length-averaged logps (average_by_length).
DpoOutput dpo_loss(const torch::Tensor& pol_c,  // (B) policy logps of the chosen answers
                   const torch::Tensor& pol_r,  // (B) policy logps of the rejected answers
                   const torch::Tensor& ref_c,  // (B) reference logps, chosen
                   const torch::Tensor& ref_r,  // (B) reference logps, rejected
                   const DpoOptions& opts);

/// bco_pair's running reward mean (TRL <= 0.29 RunningMoments.mean, BCO's delta): the mean
/// of every reward (beta * log-ratio, chosen and rejected) of the training steps so far,
/// over all ranks. A step's loss uses the mean of the steps before it (so it does not
/// depend on the micro-batch split or the world size); kept in checkpoints.
struct BcoRunningMean {
  double reward_sum = 0, count = 0;
  double mean() const { return count > 0 ? reward_sum / count : 0.0; }
  /// Adds a step's rewards (global sums over all ranks): 2 * pairs values.
  void add(double rewards_chosen_sum, double rewards_rejected_sum, double pairs) {
    reward_sum += rewards_chosen_sum + rewards_rejected_sum;
    count += 2 * pairs;
  }
};

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
  double nll_sum = 0;                 // RPO or sft term: sum of chosen-token NLLs
  double nll_tokens = 0;              // RPO or sft term: chosen tokens counted in nll_sum (0 = off)

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
  /// (2B) [chosen; rejected] summed policy logps from sequence_logps, still attached to
  /// the logits: a caller adding dpo_global_terms back-propagates its coefficients here.
  torch::Tensor policy_logps;
  DpoMetrics metrics;            // sums over this micro-batch
};

/// TRL's concatenated_forward + get_batch_loss_metrics on one micro-batch:
/// sequence_logps of the policy logits, (ipo alone: divided by the answer lengths),
/// dpo_loss against ref_logps, plus rpo_alpha * token_mean_nll(chosen rows) added to
/// every pair's loss (TRL's RPO: the NLL is token-weighted within the micro-batch).
/// A mixture (several loss types, or one new type) follows TRL 1.x's _compute_loss:
/// per-pair loss = sum_k weight_k * term_k with summed log-probs ("ipo" and
/// "sigmoid_norm" terms divide by the answer lengths themselves, "sft" is the
/// micro-batch's token-mean chosen NLL given to every pair).
/// ref_logps: SUMMED reference log-probs, (2B) = [chosen; rejected], as
/// sequence_logps(reference logits).logps or the HDF5 /ref_logps columns; for ipo
/// they are divided by the same answer lengths here. Undefined = reference-free
/// (reference logps taken as 0).
DpoStepLoss dpo_batch_loss(const torch::Tensor& logits,     // (2B, T, V) policy logits
                           const torch::Tensor& input_ids,  // (2B, T)
                           const torch::Tensor& loss_mask,  // (2B, T) nonzero at answer tokens
                           const torch::Tensor& ref_logps,  // (2B) or undefined
                           const DpoOptions& opts);

/// head_logps's extras the policy's log-probs need under opts (for head_logps entries of
/// 2B sequences): LD-DPO token weights when ld_alpha != 1, the WPO statistic when
/// use_weighting. The reference's log-probs never take them (TRL: plain sums).
HeadLogpsOptions policy_logps_options(const DpoOptions& opts, const torch::Tensor& target_sequence, int64_t sequences);

/// The same from per-sequence log-probs already computed ([chosen; rejected], 2B
/// entries, e.g. by head_logps): everything after sequence_logps. With
/// opts.use_weighting, policy.wpo_logps must be defined (head_logps with wpo).
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
