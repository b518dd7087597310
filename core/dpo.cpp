// The DPO losses of TRL's DPOTrainer, their metrics, and the SFT loss.
#include "core/dpo.h"
#include "util/tensor_str.h"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <stdexcept>

#include <ATen/ATen.h>

namespace dpo {
namespace {

using torch::Tensor;


}  // namespace

const std::vector<std::string>& dpo_loss_types() {
  static const std::vector<std::string> k{"sigmoid", "ipo", "hinge", "robust"};
  return k;
}

void validate_dpo_options(const DpoOptions& o) {
  if (!std::isfinite(o.beta) || o.beta <= 0) {
    throw std::runtime_error("--beta must be a finite number > 0 (TRL uses 0.1); got " + std::to_string(o.beta));
  }
  const auto& types = dpo_loss_types();
  if (std::find(types.begin(), types.end(), o.loss_type) == types.end()) {
    std::string list;
    for (const auto& t : types) list += (list.empty() ? "" : ", ") + t;
    throw std::runtime_error("--loss_type '" + o.loss_type + "' is not supported; use one of: " + list);
  }
  if (!std::isfinite(o.label_smoothing) || o.label_smoothing < 0 || o.label_smoothing >= 0.5) {
    throw std::runtime_error("--label_smoothing must be in [0, 0.5) (the robust loss divides by 1 - 2 * "
                             "label_smoothing); got " + std::to_string(o.label_smoothing));
  }
  if (o.label_smoothing > 0 && (o.loss_type == "hinge" || o.loss_type == "ipo")) {
    // TRL warns and ignores it; silently ignoring an option is worse than refusing it.
    throw std::runtime_error("--label_smoothing is not used by --loss_type " + o.loss_type +
                             "; set it to 0 or use --loss_type sigmoid or robust");
  }
  if (!std::isfinite(o.rpo_alpha) || o.rpo_alpha < 0) {
    throw std::runtime_error("--rpo_alpha must be a finite number >= 0 (0 = off); got " + std::to_string(o.rpo_alpha));
  }
}

DpoOutput dpo_loss(const Tensor& pol_c, const Tensor& pol_r, const Tensor& ref_c, const Tensor& ref_r,
                   const DpoOptions& opts) {
  validate_dpo_options(opts);
  for (const Tensor* t : {&pol_c, &pol_r, &ref_c, &ref_r}) {
    if (!t->defined() || t->dim() != 1 || t->size(0) != pol_c.size(0)) {
      throw std::runtime_error("dpo_loss: policy and reference logps must all be (B) tensors of one size; got " +
                               (t->defined() ? shape_str(*t) : std::string("undefined")) + " vs " +
                               shape_str(pol_c));
    }
  }
  const auto o = pol_c.options();
  const Tensor rc = ref_c.to(o).detach(), rr = ref_r.to(o).detach();
  const double beta = opts.beta, ls = opts.label_smoothing;
  const Tensor l = (pol_c - pol_r) - (rc - rr);
  Tensor losses;
  if (opts.loss_type == "sigmoid") {
    losses = -at::log_sigmoid(beta * l) * (1 - ls) - at::log_sigmoid(-beta * l) * ls;
  } else if (opts.loss_type == "robust") {
    losses = (-at::log_sigmoid(beta * l) * (1 - ls) + at::log_sigmoid(-beta * l) * ls) / (1 - 2 * ls);
  } else if (opts.loss_type == "hinge") {
    losses = at::relu(1 - beta * l);
  } else {  // ipo: eq. 17 of the IPO paper, beta is its tau
    losses = (l - 1 / (2 * beta)).pow(2);
  }
  DpoOutput out;
  out.losses = losses;
  out.chosen_rewards = (beta * (pol_c - rc)).detach();
  out.rejected_rewards = (beta * (pol_r - rr)).detach();
  return out;
}

// ---- metrics --------------------------------------------------------------------
std::vector<double> DpoMetrics::to_vector() const {
  return {pairs,          loss_sum,           rewards_chosen_sum, rewards_rejected_sum, rewards_accuracies_sum,
          rewards_margins_sum, logps_chosen_sum, logps_rejected_sum, logits_chosen_sum, logits_rejected_sum,
          chosen_tokens,  rejected_tokens,    nll_sum,            nll_tokens};
}

DpoMetrics DpoMetrics::from_vector(const std::vector<double>& v) {
  if (static_cast<int64_t>(v.size()) != kNumFields) {
    throw std::runtime_error("DpoMetrics::from_vector: expected " + std::to_string(kNumFields) + " values, got " +
                             std::to_string(v.size()));
  }
  DpoMetrics m;
  double* f[] = {&m.pairs,          &m.loss_sum,           &m.rewards_chosen_sum, &m.rewards_rejected_sum,
                 &m.rewards_accuracies_sum, &m.rewards_margins_sum, &m.logps_chosen_sum, &m.logps_rejected_sum,
                 &m.logits_chosen_sum, &m.logits_rejected_sum, &m.chosen_tokens, &m.rejected_tokens,
                 &m.nll_sum,        &m.nll_tokens};
  for (int64_t i = 0; i < kNumFields; ++i) *f[i] = v[i];
  return m;
}

DpoMetrics& DpoMetrics::operator+=(const DpoMetrics& o) {
  auto a = to_vector();
  const auto b = o.to_vector();
  for (int64_t i = 0; i < kNumFields; ++i) a[i] += b[i];
  *this = from_vector(a);
  return *this;
}

std::vector<std::pair<std::string, double>> DpoMetrics::averages(const std::string& prefix) const {
  std::vector<std::pair<std::string, double>> out;
  if (pairs <= 0) return out;
  auto per_token = [](double s, double n) { return n > 0 ? s / n : 0.0; };
  out.emplace_back(prefix + "loss", loss_sum / pairs);
  out.emplace_back(prefix + "rewards/chosen", rewards_chosen_sum / pairs);
  out.emplace_back(prefix + "rewards/rejected", rewards_rejected_sum / pairs);
  out.emplace_back(prefix + "rewards/accuracies", rewards_accuracies_sum / pairs);
  out.emplace_back(prefix + "rewards/margins", rewards_margins_sum / pairs);
  out.emplace_back(prefix + "logps/chosen", logps_chosen_sum / pairs);
  out.emplace_back(prefix + "logps/rejected", logps_rejected_sum / pairs);
  out.emplace_back(prefix + "logits/chosen", per_token(logits_chosen_sum, chosen_tokens));
  out.emplace_back(prefix + "logits/rejected", per_token(logits_rejected_sum, rejected_tokens));
  if (nll_tokens > 0) out.emplace_back(prefix + "nll_loss", nll_sum / nll_tokens);
  return out;
}

DpoStepLoss dpo_batch_loss(const Tensor& logits, const Tensor& input_ids, const Tensor& loss_mask,
                           const Tensor& ref_logps, const DpoOptions& opts) {
  validate_dpo_options(opts);
  check_logps_inputs(logits, input_ids, loss_mask);
  const int64_t R = logits.size(0);
  if (R % 2 != 0) {
    throw std::runtime_error("dpo_batch_loss: logits must hold 2B rows ([chosen; rejected]); got R = " +
                             std::to_string(R));
  }
  if (ref_logps.defined() && (ref_logps.dim() != 1 || ref_logps.size(0) != R)) {
    throw std::runtime_error("dpo_batch_loss: ref_logps must be (2B) = (" + std::to_string(R) +
                             ") summed reference log-probs [chosen; rejected]; got " + shape_str(ref_logps));
  }
  return dpo_batch_loss(sequence_logps(logits, input_ids, loss_mask), ref_logps, opts);
}

DpoStepLoss dpo_batch_loss(const SeqLogps& s, const Tensor& ref_logps, const DpoOptions& opts) {
  validate_dpo_options(opts);
  const int64_t R = s.logps.size(0);
  if (R % 2 != 0)
    throw std::runtime_error("dpo_batch_loss: expected 2B sequences ([chosen; rejected]); got " + std::to_string(R));
  const int64_t B = R / 2;
  if (ref_logps.defined() && (ref_logps.dim() != 1 || ref_logps.size(0) != R)) {
    throw std::runtime_error("dpo_batch_loss: ref_logps must be (2B) = (" + std::to_string(R) +
                             ") summed reference log-probs [chosen; rejected]; got " + shape_str(ref_logps));
  }
  const bool ipo = opts.loss_type == "ipo";
  Tensor all = ipo ? average_by_length(s.logps, s.token_counts) : s.logps;  // (2B)
  Tensor ref = ref_logps.defined() ? ref_logps.to(all.options()).detach() : at::zeros_like(all).detach();
  if (ipo && ref_logps.defined()) ref = average_by_length(ref, s.token_counts);

  DpoOutput d = dpo_loss(all.narrow(0, 0, B), all.narrow(0, B, B), ref.narrow(0, 0, B), ref.narrow(0, B, B), opts);
  Tensor losses = d.losses;
  Tensor nll;
  const bool rpo = opts.rpo_alpha > 0;
  if (rpo) {
    // TRL (RPO, paper v3): cross-entropy over the chosen answer tokens of this
    // micro-batch, token-weighted, added to every pair's loss. Uses the summed logps
    // even for ipo (TRL computes it from the logits).
    nll = token_mean_nll(s.logps.narrow(0, 0, B), s.token_counts.narrow(0, 0, B));
    losses = losses + opts.rpo_alpha * nll;
  }

  DpoStepLoss out;
  out.losses = losses;
  out.loss = B > 0 ? losses.mean() : losses.sum();
  out.chosen_logps = all.narrow(0, 0, B).detach();
  out.rejected_logps = all.narrow(0, B, B).detach();

  // One device->host copy of everything the metrics need.
  const Tensor counts = s.token_counts.to(all.options());
  const Tensor logit_sums = s.mean_logits * counts;  // sum over answer positions of the V-mean
  Tensor rows = at::stack({losses.detach(), d.chosen_rewards, d.rejected_rewards,
                           (d.chosen_rewards > d.rejected_rewards).to(all.scalar_type()),
                           d.chosen_rewards - d.rejected_rewards, out.chosen_logps, out.rejected_logps,
                           logit_sums.narrow(0, 0, B), logit_sums.narrow(0, B, B), counts.narrow(0, 0, B),
                           counts.narrow(0, B, B)})
                   .to(torch::kCPU, torch::kDouble)
                   .sum(1);
  const double* v = rows.data_ptr<double>();
  DpoMetrics& m = out.metrics;
  m.pairs = static_cast<double>(B);
  m.loss_sum = v[0];
  m.rewards_chosen_sum = v[1];
  m.rewards_rejected_sum = v[2];
  m.rewards_accuracies_sum = v[3];
  m.rewards_margins_sum = v[4];
  m.logps_chosen_sum = v[5];
  m.logps_rejected_sum = v[6];
  m.logits_chosen_sum = v[7];
  m.logits_rejected_sum = v[8];
  m.chosen_tokens = v[9];
  m.rejected_tokens = v[10];
  if (rpo) {
    m.nll_tokens = m.chosen_tokens;
    m.nll_sum = nll.detach().to(torch::kCPU, torch::kDouble).item<double>() * m.nll_tokens;
  }
  return out;
}

SftLoss sft_loss(const Tensor& logits, const Tensor& input_ids, const Tensor& loss_mask) {
  SeqLogps s = sequence_logps(logits, input_ids, loss_mask);
  SftLoss out;
  out.nll_sum = -s.logps.sum();
  out.tokens = s.token_counts.sum().item<int64_t>();
  if (out.tokens > 0) {
    // Token accuracy over the scored positions only: position t-1 predicts token t.
    torch::NoGradGuard no_grad;
    const int64_t R = logits.size(0), T = logits.size(1), V = logits.size(2);
    const Tensor scored = loss_mask.slice(1, 1).ne(0).nonzero().to(logits.device());  // (N, 2): row, t-1
    const Tensor flat = scored.select(1, 0) * T + scored.select(1, 1);                 // (N) into (R*T)
    const Tensor predicted = logits.reshape({R * T, V}).index_select(0, flat).argmax(-1);
    const Tensor target = input_ids.to(logits.device()).reshape({R * T}).index_select(0, flat + 1);
    out.correct = predicted.eq(target).sum().item<int64_t>();
  }
  return out;
}

SftMetrics SftMetrics::from_vector(const std::vector<double>& v) {
  if (static_cast<int64_t>(v.size()) != kNumFields)
    throw std::runtime_error("SftMetrics::from_vector: " + std::to_string(v.size()) + " values, expected " +
                             std::to_string(kNumFields));
  return {v[0], v[1], v[2], v[3]};
}

SftMetrics& SftMetrics::operator+=(const SftMetrics& o) {
  nll_sum += o.nll_sum;
  tokens += o.tokens;
  rows += o.rows;
  correct += o.correct;
  return *this;
}

SftMetrics SftMetrics::of(const SftLoss& l, int64_t rows) {
  return {l.nll_sum.item<double>(), static_cast<double>(l.tokens), static_cast<double>(rows),
          static_cast<double>(l.correct)};
}

std::vector<std::pair<std::string, double>> SftMetrics::averages(const std::string& prefix) const {
  if (tokens <= 0) return {};
  return {{prefix + "loss", nll_sum / tokens},
          {prefix + "mean_token_accuracy", correct / tokens},
          {prefix + "answer_tokens", tokens}};
}

}  // namespace dpo
