#include "core/cpo.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace dpo {

namespace {
std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& t : v) s += (s.empty() ? "" : "|") + t;
  return s;
}
}  // namespace

const std::vector<std::string>& cpo_loss_types() {
  static const std::vector<std::string> t{"sigmoid", "hinge", "ipo", "simpo", "alphapo"};
  return t;
}

CpoOptions cpo_resolve(CpoOptions o) {
  if (o.loss_type == "alphapo") {  // CPOConfig.__post_init__: syntactic sugar
    o.loss_type = "simpo";
    o.cpo_alpha = 0.0;
  }
  return o;
}

void validate_cpo_options(const CpoOptions& o) {
  const auto& t = cpo_loss_types();
  if (std::find(t.begin(), t.end(), o.loss_type) == t.end())
    throw std::runtime_error("--loss_type: '" + o.loss_type + "' is not a --stage cpo loss type (" + joined(t) + ")");
  if (!(o.beta > 0) || !std::isfinite(o.beta)) throw std::runtime_error("--beta must be > 0 for --stage cpo");
  if (!(o.label_smoothing >= 0 && o.label_smoothing < 0.5))
    throw std::runtime_error("--label_smoothing must be in [0, 0.5)");
  if (o.label_smoothing > 0 && (o.loss_type == "hinge" || o.loss_type == "ipo"))
    throw std::runtime_error("--label_smoothing applies to --loss_type sigmoid|simpo|alphapo, not " + o.loss_type);
  if (!(o.cpo_alpha >= 0) || !std::isfinite(o.cpo_alpha)) throw std::runtime_error("--cpo_alpha must be >= 0");
  if (!std::isfinite(o.simpo_gamma)) throw std::runtime_error("--simpo_gamma must be finite");
  if (!std::isfinite(o.alpha)) throw std::runtime_error("--alpha must be finite");
}

bool cpo_averages_logps(const std::string& loss_type) {
  return loss_type == "ipo" || loss_type == "simpo" || loss_type == "alphapo";
}

CpoOutput cpo_loss(const torch::Tensor& logps_c, const torch::Tensor& logps_r, const CpoOptions& o) {
  const double beta = o.beta, ls = o.label_smoothing;
  torch::Tensor rc = logps_c, rr = logps_r;
  if (o.alpha != 0.0) {
    // AlphaPO's reward r = (1 - p^(-alpha)) / alpha with p = exp(logps) (TRL:
    // chosen_probs.pow(-alpha)); p^(-alpha) = exp(-alpha * logps) here, the same value
    // without p underflowing for long summed answers.
    rc = (1 - torch::exp(-o.alpha * logps_c)) / o.alpha;
    rr = (1 - torch::exp(-o.alpha * logps_r)) / o.alpha;
  }
  torch::Tensor logits = rc - rr;
  torch::Tensor losses;
  if (o.loss_type == "simpo") {
    // SimPO Eq. (6): -log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma),
    // written as TRL does: logits - gamma/beta inside beta * (.), + label smoothing.
    logits = logits - o.simpo_gamma / beta;
    losses = -torch::log_sigmoid(beta * logits) * (1 - ls) - torch::log_sigmoid(-beta * logits) * ls;
  } else if (o.loss_type == "sigmoid") {
    // CPO Eq. (3): L_prefer = -log sigmoid(beta log pi(y_w) - beta log pi(y_l)) (+ cDPO's smoothing).
    losses = -torch::log_sigmoid(beta * logits) * (1 - ls) - torch::log_sigmoid(-beta * logits) * ls;
  } else if (o.loss_type == "hinge") {
    // SLiC's hinge (Zhao et al. 2023, arXiv 2305.10425): relu(1 - beta * logits).
    losses = torch::relu(1 - beta * logits);
  } else if (o.loss_type == "ipo") {
    // IPO (Azar et al. 2023, arXiv 2310.12036) Eq. (17) with tau = beta, no reference.
    losses = (logits - 1 / (2 * beta)).pow(2);
  } else {
    throw std::runtime_error("cpo_loss: loss_type '" + o.loss_type + "' (resolve alphapo with cpo_resolve; " +
                             joined(cpo_loss_types()) + ")");
  }
  CpoOutput out;
  out.losses = losses;
  out.chosen_rewards = (beta * rc).detach();
  out.rejected_rewards = (beta * rr).detach();
  return out;
}

}  // namespace dpo
