#include "core/orpo.h"

#include <cmath>
#include <stdexcept>
#include <string>

#include "core/reference_free.h"

namespace dpo {

torch::Tensor log1mexp(const torch::Tensor& x) {
  // TRL's branch point -ln 2: log1p(-e^x) is exact where e^x <= 1/2, log(-expm1 x) above.
  const double t = -0.6931471805599453;
  return torch::where(x < t, torch::log1p(-torch::exp(x)), torch::log(-torch::expm1(x)));
}

OrpoOutput orpo_loss(const torch::Tensor& avg_c, const torch::Tensor& avg_r, double beta) {
  if (!(beta > 0)) throw std::runtime_error("orpo_loss: beta must be > 0, got " + std::to_string(beta));
  // TRL: policy_*_logps.float() (fp64 stays fp64 here, for the tests' exact reference)
  const auto dt = avg_c.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  const torch::Tensor c = avg_c.to(dt), r = avg_r.to(dt);
  // ORPO Eq. (4): odds(y|x) = P(y|x) / (1 - P(y|x)), so log odds = logp - log(1 - e^logp);
  // Eq. (7): the log odds ratio log(odds(y_w|x) / odds(y_l|x)).
  const torch::Tensor log_odds = (c - r) - (log1mexp(c) - log1mexp(r));
  // Eq. (7): L_OR = -log sigmoid(log odds ratio); Eq. (6): weighted by lambda (beta).
  const torch::Tensor ratio = torch::log_sigmoid(log_odds);
  OrpoOutput o;
  o.losses = -beta * ratio;
  o.log_odds = log_odds.detach();
  o.ratio = ratio.detach();
  o.chosen_rewards = (beta * c).detach();
  o.rejected_rewards = (beta * r).detach();
  return o;
}

// ---- RefFreeMetrics (core/reference_free.h) -------------------------------------------

RefFreeMetrics RefFreeMetrics::from_vector(const std::vector<double>& v) {
  if (static_cast<int64_t>(v.size()) != kNumFields)
    throw std::runtime_error("RefFreeMetrics::from_vector: " + std::to_string(v.size()) + " values, expected " +
                             std::to_string(kNumFields));
  RefFreeMetrics m;
  double* f[] = {&m.batches,           &m.pairs,          &m.loss_sum,           &m.rewards_chosen_sum,
                 &m.rewards_rejected_sum, &m.rewards_accuracies_sum, &m.rewards_margins_sum, &m.logps_chosen_sum,
                 &m.logps_rejected_sum, &m.logits_chosen_sum, &m.logits_rejected_sum, &m.nll_sum,
                 &m.log_odds_ratio_sum, &m.log_odds_chosen_sum};
  for (int64_t i = 0; i < kNumFields; ++i) *f[i] = v[static_cast<size_t>(i)];
  return m;
}

RefFreeMetrics& RefFreeMetrics::operator+=(const RefFreeMetrics& o) {
  const std::vector<double> a = to_vector(), b = o.to_vector();
  std::vector<double> s(a.size());
  for (size_t i = 0; i < a.size(); ++i) s[i] = a[i] + b[i];
  *this = from_vector(s);
  return *this;
}

std::vector<std::pair<std::string, double>> RefFreeMetrics::averages(const std::string& p, bool orpo) const {
  std::vector<std::pair<std::string, double>> out;
  if (batches <= 0) return out;
  const double np = pairs > 0 ? pairs : NAN;
  out.emplace_back(p + "loss", loss_sum / batches);
  out.emplace_back(p + "rewards/chosen", rewards_chosen_sum / np);
  out.emplace_back(p + "rewards/rejected", rewards_rejected_sum / np);
  out.emplace_back(p + "rewards/accuracies", rewards_accuracies_sum / np);
  out.emplace_back(p + "rewards/margins", rewards_margins_sum / np);
  out.emplace_back(p + "logps/rejected", logps_rejected_sum / np);
  out.emplace_back(p + "logps/chosen", logps_chosen_sum / np);
  out.emplace_back(p + "logits/rejected", logits_rejected_sum / batches);
  out.emplace_back(p + "logits/chosen", logits_chosen_sum / batches);
  out.emplace_back(p + "nll_loss", nll_sum / batches);
  if (orpo) {
    out.emplace_back(p + "log_odds_ratio", log_odds_ratio_sum / np);
    out.emplace_back(p + "log_odds_chosen", log_odds_chosen_sum / np);
  }
  return out;
}

}  // namespace dpo
