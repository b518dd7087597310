// CPO (Xu et al. 2024, "Contrastive Preference Optimization", arXiv 2401.08417) and its
// reference-free relatives SimPO (Meng et al. 2024, arXiv 2405.14734) and AlphaPO
// (arXiv 2501.03884) as TRL's CPOTrainer computes them (trl/experimental/cpo, v1.16,
// cpo_loss + concatenated_forward + get_batch_loss_metrics): the loss of a micro-batch
// is mean(per-pair loss) + cpo_alpha * the token-mean NLL of its chosen answers.
// docs/objective.md has the formulas. The metrics' sums are core/reference_free.h.
//
// Legend: B = preference pairs.
#pragma once
#include <string>
#include <vector>

#include <torch/types.h>

namespace dpo {

/// CPOConfig's loss options (names and defaults as TRL's).
struct CpoOptions {
  double beta = 0.1;             // temperature (ipo: the regulariser tau)
  std::string loss_type = "sigmoid";  // sigmoid | hinge | ipo | simpo (alphapo: cpo_resolve)
  double label_smoothing = 0.0;  // sigmoid and simpo only, in [0, 0.5)
  double cpo_alpha = 1.0;        // weight of the chosen answers' NLL (0: not computed, logged as 0)
  double simpo_gamma = 0.5;      // SimPO's target reward margin (loss_type simpo)
  double alpha = 0.0;            // AlphaPO's reward shape; 0 = the log-prob reward
};

/// The loss types --stage cpo accepts, in the order error messages list them.
const std::vector<std::string>& cpo_loss_types();
/// CPOConfig.__post_init__: "alphapo" is simpo with cpo_alpha 0; the rest unchanged.
CpoOptions cpo_resolve(CpoOptions o);
/// Throws std::runtime_error naming the option (--beta, --loss_type, --label_smoothing,
/// --cpo_alpha, --alpha) and its valid values.
void validate_cpo_options(const CpoOptions& o);
/// True when the loss reads log-probs averaged over the answer tokens (TRL:
/// average_log_prob = loss_type in [ipo, simpo]; alphapo resolves to simpo), else sums.
bool cpo_averages_logps(const std::string& loss_type);

struct CpoOutput {
  torch::Tensor losses;            // (B) differentiable w.r.t. the logps
  torch::Tensor chosen_rewards;    // (B) detached: beta * logps_c, or beta * r_c (alpha != 0)
  torch::Tensor rejected_rewards;  // (B) detached, same
};

/// TRL's CPOTrainer.cpo_loss for resolved options (cpo_resolve): per-pair loss of the
/// policy logps as the loss type reads them (cpo_averages_logps). No NLL term.
CpoOutput cpo_loss(const torch::Tensor& logps_c,  // (B) policy logps, chosen
                   const torch::Tensor& logps_r,  // (B) policy logps, rejected
                   const CpoOptions& o);

}  // namespace dpo
