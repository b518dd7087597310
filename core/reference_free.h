// The metric sums shared by the reference-free pair objectives, ORPO (core/orpo.h) and
// CPO / SimPO (core/cpo.h), under the names TRL's ORPOTrainer and CPOTrainer log.
// TRL (trl/experimental/{orpo,cpo}, v1.16) logs per micro-batch means and averages them
// over the micro-batches of a log window; here pair quantities are summed per pair and
// micro-batch quantities (loss, nll_loss, logits/*) per micro-batch, so that ranks and
// micro-batches reduce by addition. The two agree when every micro-batch holds the same
// number of pairs (TRL's loader and ours: the per-device batch size).
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace dpo {

struct RefFreeMetrics {
  double batches = 0;                 // micro-batches summed over
  double pairs = 0;                   // preference pairs summed over
  double loss_sum = 0;                // sum over micro-batches of the micro-batch loss
  double rewards_chosen_sum = 0;      // sum over pairs of beta * logps_c (AlphaPO: beta * r_c)
  double rewards_rejected_sum = 0;    // same, rejected
  double rewards_accuracies_sum = 0;  // pairs with chosen reward > rejected reward
  double rewards_margins_sum = 0;     // sum of chosen reward - rejected reward
  double logps_chosen_sum = 0;        // sum over pairs of the logps fed to the loss, chosen
  double logps_rejected_sum = 0;      // same, rejected
  double logits_chosen_sum = 0;       // sum over micro-batches of the mean logit of the chosen rows
  double logits_rejected_sum = 0;     // same, rejected
  double nll_sum = 0;                 // sum over micro-batches of the micro-batch's token-mean NLL
  double log_odds_ratio_sum = 0;      // ORPO: sum over pairs of log sigmoid(log_odds)
  double log_odds_chosen_sum = 0;     // ORPO: sum over pairs of log_odds

  static constexpr int64_t kNumFields = 14;
  std::vector<double> to_vector() const {
    return {batches,          pairs,           loss_sum,          rewards_chosen_sum, rewards_rejected_sum,
            rewards_accuracies_sum, rewards_margins_sum, logps_chosen_sum, logps_rejected_sum, logits_chosen_sum,
            logits_rejected_sum, nll_sum, log_odds_ratio_sum, log_odds_chosen_sum};
  }
  /// Inverse of to_vector; throws std::runtime_error unless v has kNumFields values.
  static RefFreeMetrics from_vector(const std::vector<double>& v);
  RefFreeMetrics& operator+=(const RefFreeMetrics& o);

  /// (name, value) pairs as TRL logs them, `prefix` ("" or "eval_") prepended: loss,
  /// rewards/{chosen,rejected,accuracies,margins}, logps/{rejected,chosen},
  /// logits/{rejected,chosen}, nll_loss, and with `orpo` log_odds_ratio, log_odds_chosen.
  /// Empty when no micro-batch was summed.
  std::vector<std::pair<std::string, double>> averages(const std::string& prefix, bool orpo) const;
};

}  // namespace dpo
