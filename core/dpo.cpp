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
  // The first four keep their order: error messages have always listed them so.
  static const std::vector<std::string> k{"sigmoid",   "ipo",      "hinge",     "robust",   "exo_pair",
                                          "nca_pair",  "bco_pair", "sppo_hard", "aot",      "aot_unpaired",
                                          "apo_zero",  "apo_down", "discopop",  "sigmoid_norm", "sft"};
  return k;
}

bool dpo_is_global_term(const std::string& type) { return type == "aot" || type == "aot_unpaired"; }

namespace {

std::string join(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& t : v) out += (out.empty() ? "" : ", ") + t;
  return out;
}

// Split at commas; whitespace around names is ignored, empty names are errors.
std::vector<std::string> split_types(const std::string& list) {
  std::vector<std::string> out;
  size_t b = 0;
  while (true) {
    const size_t e = list.find(',', b);
    std::string t = list.substr(b, e == std::string::npos ? std::string::npos : e - b);
    const size_t f = t.find_first_not_of(" \t"), l = t.find_last_not_of(" \t");
    t = f == std::string::npos ? "" : t.substr(f, l - f + 1);
    if (t.empty()) {
      throw std::runtime_error("--loss_type '" + list + "' has an empty entry; give loss types separated by commas, "
                               "e.g. sigmoid,bco_pair,sft");
    }
    out.push_back(t);
    if (e == std::string::npos) break;
    b = e + 1;
  }
  return out;
}

bool uses_label_smoothing(const std::string& t) {
  return t == "sigmoid" || t == "robust" || t == "exo_pair" || t == "aot" || t == "aot_unpaired";
}

}  // namespace

std::vector<DpoLossTerm> dpo_loss_terms(const DpoOptions& o) {
  const auto names = split_types(o.loss_type);
  const auto& types = dpo_loss_types();
  for (const auto& n : names) {
    if (std::find(types.begin(), types.end(), n) == types.end()) {
      throw std::runtime_error("--loss_type '" + n + "' is not supported; use one of: " + join(types) +
                               " (or a comma-separated mixture of them)");
    }
  }
  if (!o.loss_weights.empty() && o.loss_weights.size() != names.size()) {
    throw std::runtime_error("--loss_weights has " + std::to_string(o.loss_weights.size()) + " value(s) for " +
                             std::to_string(names.size()) + " loss type(s) in --loss_type " + o.loss_type +
                             "; give one weight per loss type (or none: 1 each)");
  }
  std::vector<DpoLossTerm> out;
  for (size_t i = 0; i < names.size(); ++i) {
    const double w = o.loss_weights.empty() ? 1.0 : o.loss_weights[i];
    if (!std::isfinite(w)) {
      throw std::runtime_error("--loss_weights: weight " + std::to_string(i + 1) + " (for " + names[i] +
                               ") must be a finite number");
    }
    out.push_back({names[i], w});
  }
  return out;
}

bool dpo_has_global_terms(const DpoOptions& o) {
  for (const auto& t : dpo_loss_terms(o))
    if (dpo_is_global_term(t.type)) return true;
  return false;
}

void validate_dpo_options(const DpoOptions& o) {
  if (!std::isfinite(o.beta) || o.beta <= 0) {
    throw std::runtime_error("--beta must be a finite number > 0 (TRL uses 0.1); got " + std::to_string(o.beta));
  }
  const auto terms = dpo_loss_terms(o);
  if (!std::isfinite(o.label_smoothing) || o.label_smoothing < 0 || o.label_smoothing >= 0.5) {
    throw std::runtime_error("--label_smoothing must be in [0, 0.5) (the robust loss divides by 1 - 2 * "
                             "label_smoothing); got " + std::to_string(o.label_smoothing));
  }
  bool smoothing_used = false, exo = false;
  for (const auto& t : terms) {
    smoothing_used |= uses_label_smoothing(t.type);
    exo |= t.type == "exo_pair";
  }
  if (o.label_smoothing > 0 && !smoothing_used) {
    // TRL warns and ignores it; silently ignoring an option is worse than refusing it.
    throw std::runtime_error("--label_smoothing is not used by --loss_type " + o.loss_type +
                             "; set it to 0 or use a loss type that uses it (sigmoid, robust, exo_pair, aot, "
                             "aot_unpaired)");
  }
  if (exo && o.label_smoothing <= 0) {
    throw std::runtime_error("--loss_type exo_pair needs --label_smoothing > 0 (its epsilon; the EXO paper "
                             "recommends 1e-3)");
  }
  if (!std::isfinite(o.rpo_alpha) || o.rpo_alpha < 0) {
    throw std::runtime_error("--rpo_alpha must be a finite number >= 0 (0 = off); got " + std::to_string(o.rpo_alpha));
  }
  if (!std::isfinite(o.discopop_tau) || o.discopop_tau <= 0) {
    throw std::runtime_error("--discopop_tau must be a finite number > 0 (the DiscoPOP paper uses 0.05); got " +
                             std::to_string(o.discopop_tau));
  }
  if (!std::isfinite(o.ld_alpha) || o.ld_alpha < 0 || o.ld_alpha > 1) {
    throw std::runtime_error("--ld_alpha must be in [0, 1] (1 = off; the LD-DPO paper uses 0.3-0.8); got " +
                             std::to_string(o.ld_alpha));
  }
  if (!std::isfinite(o.bco_delta)) throw std::runtime_error("bco_pair's running reward mean is not finite");
  if (o.use_weighting || o.ld_alpha != 1.0) {
    for (const auto& t : terms) {
      if (dpo_is_global_term(t.type)) {
        throw std::runtime_error(std::string(o.use_weighting ? "--use_weighting" : "--ld_alpha") +
                                 " cannot be combined with --loss_type " + t.type +
                                 " (its batch-wide sort reads plain summed log-probs); drop one of them");
      }
    }
  }
}

namespace {

// Sorted values of a (B) tensor; differentiable (the gradient goes back to each
// element's original position). Stable, so equal values keep their order.
Tensor sorted(const Tensor& t) { return std::get<0>(at::sort(t, /*stable=*/true, /*dim=*/0, /*descending=*/false)); }

// (B) log-ratio divided by the answer lengths when they are given (TRL 1.x's ipo /
// sigmoid_norm: clamp(min=1)).
Tensor per_token(const Tensor& logratio, const Tensor& len) {
  if (!len.defined()) return logratio;
  return logratio / len.to(logratio.options()).clamp_min(1);
}

}  // namespace

Tensor dpo_loss_term(const std::string& type, const PairLogps& p, const DpoOptions& opts) {
  for (const Tensor* t : {&p.pol_c, &p.pol_r, &p.ref_c, &p.ref_r}) {
    if (!t->defined() || t->dim() != 1 || t->size(0) != p.pol_c.size(0)) {
      throw std::runtime_error("dpo_loss: policy and reference logps must all be (B) tensors of one size; got " +
                               (t->defined() ? shape_str(*t) : std::string("undefined")) + " vs " +
                               shape_str(p.pol_c));
    }
  }
  const auto o = p.pol_c.options();
  const Tensor rc = p.ref_c.to(o).detach(), rr = p.ref_r.to(o).detach();
  const double beta = opts.beta, ls = opts.label_smoothing;
  const Tensor chosen_lr = p.pol_c - rc, rejected_lr = p.pol_r - rr;  // TRL: chosen/rejected_logratios
  const Tensor l = (p.pol_c - p.pol_r) - (rc - rr);                   // TRL 1.x: delta_score
  if (type == "sigmoid") {
    // cDPO label smoothing (TRL <= 0.x; TRL 1.x's sigmoid has none: identical at ls = 0)
    return -at::log_sigmoid(beta * l) * (1 - ls) - at::log_sigmoid(-beta * l) * ls;
  }
  if (type == "robust") return (-at::log_sigmoid(beta * l) * (1 - ls) + at::log_sigmoid(-beta * l) * ls) / (1 - 2 * ls);
  if (type == "hinge") return at::relu(1 - beta * l);
  if (type == "ipo") {
    // eq. 17 of the IPO paper, beta is its tau; per-token log-ratios when lengths are given
    const Tensor d = per_token(chosen_lr, p.len_c) - per_token(rejected_lr, p.len_r);
    return (d - 1 / (2 * beta)).pow(2);
  }
  if (type == "exo_pair") {
    // EXO (eq. 16), K = 2: KL(softmax(beta * scores) || [1 - eps, eps])
    const double eps = ls;
    const Tensor z = beta * l;
    return at::sigmoid(z) * (at::log_sigmoid(z) - std::log1p(-eps)) +
           at::sigmoid(-z) * (at::log_sigmoid(-z) - std::log(eps));
  }
  if (type == "nca_pair") {
    const Tensor cr = beta * chosen_lr, rj = beta * rejected_lr;
    return -at::log_sigmoid(cr) - 0.5 * at::log_sigmoid(-cr) - 0.5 * at::log_sigmoid(-rj);
  }
  if (type == "bco_pair") {
    // BCO's reward shift delta: the running mean of the rewards (opts.bco_delta, as TRL <= 0.29)
    const double d = opts.bco_delta;
    return -at::log_sigmoid(beta * chosen_lr - d) - at::log_sigmoid(-(beta * rejected_lr - d));
  }
  if (type == "sppo_hard") return (chosen_lr - 0.5 / beta).pow(2) + (rejected_lr + 0.5 / beta).pow(2);
  if (type == "aot" || type == "aot_unpaired") {
    const Tensor d = type == "aot" ? sorted(p.pol_c - p.pol_r) - sorted(rc - rr) : sorted(chosen_lr) - sorted(rejected_lr);
    return -at::log_sigmoid(beta * d) * (1 - ls) - at::log_sigmoid(-beta * d) * ls;
  }
  if (type == "apo_zero") return (1 - at::sigmoid(beta * chosen_lr)) + at::sigmoid(beta * rejected_lr);
  if (type == "apo_down") return at::sigmoid(beta * chosen_lr) + (1 - at::sigmoid(beta * l));
  if (type == "discopop") {
    const Tensor z = beta * l;
    const Tensor m = at::sigmoid(z / opts.discopop_tau);
    return -at::log_sigmoid(z) * (1 - m) + at::exp(-z) * m;
  }
  if (type == "sigmoid_norm") {
    return -at::log_sigmoid(beta * (per_token(chosen_lr, p.len_c) - per_token(rejected_lr, p.len_r)));
  }
  throw std::runtime_error("dpo_loss: loss type '" + type + "' has no per-pair formula (use one of: " +
                           join(dpo_loss_types()) + ", but not sft)");
}

DpoOutput dpo_loss(const Tensor& pol_c, const Tensor& pol_r, const Tensor& ref_c, const Tensor& ref_r,
                   const DpoOptions& opts) {
  validate_dpo_options(opts);
  const auto terms = dpo_loss_terms(opts);
  if (terms.size() != 1 || terms[0].type == "sft") {
    throw std::runtime_error("dpo_loss: takes one loss type other than sft; got '" + opts.loss_type +
                             "' (mixtures and sft go through dpo_batch_loss)");
  }
  PairLogps p{pol_c, pol_r, ref_c, ref_r, Tensor(), Tensor()};
  DpoOutput out;
  out.losses = dpo_loss_term(terms[0].type, p, opts);
  const auto o = pol_c.options();
  out.chosen_rewards = (opts.beta * (pol_c - ref_c.to(o))).detach();
  out.rejected_rewards = (opts.beta * (pol_r - ref_r.to(o))).detach();
  return out;
}

DpoGlobalTerms dpo_global_terms(const std::vector<double>& pc, const std::vector<double>& pr,
                                const std::vector<double>& rc, const std::vector<double>& rr, const DpoOptions& opts) {
  validate_dpo_options(opts);
  const size_t n = pc.size();
  if (pr.size() != n || rc.size() != n || rr.size() != n) {
    throw std::runtime_error("dpo_global_terms: the four log-prob vectors must have one length");
  }
  DpoGlobalTerms out;
  out.grad_c.assign(n, 0.0);
  out.grad_r.assign(n, 0.0);
  const double beta = opts.beta, ls = opts.label_smoothing;
  auto log_sigmoid = [](double x) { return x >= 0 ? -std::log1p(std::exp(-x)) : x - std::log1p(std::exp(x)); };
  auto sigmoid = [](double x) { return x >= 0 ? 1 / (1 + std::exp(-x)) : std::exp(x) / (1 + std::exp(x)); };
  // f(d) = -log σ(βd)(1-ε) - log σ(-βd)ε;  f'(d) = -β(1-ε)σ(-βd) + βεσ(βd)
  auto f = [&](double d) { return -log_sigmoid(beta * d) * (1 - ls) - log_sigmoid(-beta * d) * ls; };
  auto df = [&](double d) { return -beta * (1 - ls) * sigmoid(-beta * d) + beta * ls * sigmoid(beta * d); };
  // Positions of a stable ascending sort: order[j] = index of the j-th smallest.
  auto order_of = [&](const std::vector<double>& v) {
    std::vector<size_t> idx(n);
    for (size_t i = 0; i < n; ++i) idx[i] = i;
    std::stable_sort(idx.begin(), idx.end(), [&](size_t a, size_t b) { return v[a] < v[b]; });
    return idx;
  };
  for (const auto& t : dpo_loss_terms(opts)) {
    if (!dpo_is_global_term(t.type)) continue;
    std::vector<double> a(n), b(n);  // the two sorted quantities; d_j = a_(j) - b_(j)
    for (size_t i = 0; i < n; ++i) {
      if (t.type == "aot") {
        a[i] = pc[i] - pr[i];  // policy log-ratio chosen vs rejected
        b[i] = rc[i] - rr[i];  // reference log-ratio
      } else {
        a[i] = pc[i] - rc[i];  // chosen log-ratio to the reference
        b[i] = pr[i] - rr[i];  // rejected log-ratio
      }
    }
    const auto oa = order_of(a), ob = order_of(b);
    for (size_t j = 0; j < n; ++j) {
      const double d = a[oa[j]] - b[ob[j]];
      out.loss_sum += t.weight * f(d);
      const double g = t.weight * df(d);
      // aot: a = pc - pr (b has no policy term); aot_unpaired: a = pc - rc, b = pr - rr.
      out.grad_c[oa[j]] += g;
      if (t.type == "aot") out.grad_r[oa[j]] -= g;
      else out.grad_r[ob[j]] -= g;
    }
  }
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
  if (!opts.use_weighting && opts.ld_alpha == 1.0)
    return dpo_batch_loss(sequence_logps(logits, input_ids, loss_mask), ref_logps, opts);
  // WPO / LD-DPO need head_logps's extras: the same log-probs, read at the answer positions.
  const AnswerTargets t = answer_targets(input_ids, loss_mask, logits.size(2));
  return dpo_batch_loss(head_logps(logits, Tensor(), t.position, t.token, t.sequence, t.sequences,
                                   policy_logps_options(opts, t.sequence, t.sequences)),
                        ref_logps, opts);
}

HeadLogpsOptions policy_logps_options(const DpoOptions& opts, const Tensor& target_sequence, int64_t sequences) {
  HeadLogpsOptions h;
  h.wpo = opts.use_weighting;
  if (opts.ld_alpha != 1.0) h.token_weight = ld_token_weights(target_sequence, sequences, opts.ld_alpha);
  return h;
}

namespace {
// WPO's per-pair weights min(1, exp(w_c + w_r)) (TRL's policy_weights), detached.
Tensor wpo_weights(const SeqLogps& s, int64_t B, const torch::TensorOptions& o) {
  if (!s.wpo_logps.defined() || s.wpo_logps.numel() != 2 * B)
    throw std::runtime_error("dpo_batch_loss: --use_weighting needs the policy's WPO statistic (head_logps with wpo)");
  const Tensor w = s.wpo_logps.to(o).detach();
  return at::exp(w.narrow(0, 0, B) + w.narrow(0, B, B)).clamp_max(1.0);
}
}  // namespace

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
  const auto terms = dpo_loss_terms(opts);
  // "ipo" alone keeps its TRL 0.x form: every log-prob (and so the rewards and the
  // logps/* metrics) length-averaged. Everything else follows TRL 1.x: summed log-probs.
  const bool ipo = terms.size() == 1 && terms[0].type == "ipo";
  Tensor all = ipo ? average_by_length(s.logps, s.token_counts) : s.logps;  // (2B)
  Tensor ref = ref_logps.defined() ? ref_logps.to(all.options()).detach() : at::zeros_like(all).detach();
  if (ipo && ref_logps.defined()) ref = average_by_length(ref, s.token_counts);

  const Tensor pol_c = all.narrow(0, 0, B), pol_r = all.narrow(0, B, B);
  const Tensor ref_c = ref.narrow(0, 0, B), ref_r = ref.narrow(0, B, B);
  // The chosen answers' token-mean NLL of this micro-batch: TRL's RPO term and "sft"
  // loss type. Uses the summed logps even for ipo (TRL computes it from the logits).
  Tensor nll;
  bool sft_term = false;
  for (const auto& t : terms) sft_term |= t.type == "sft";
  const bool rpo = opts.rpo_alpha > 0;
  // Under LD-DPO the NLL stays the plain per-token cross-entropy (TRL reads it from the logits).
  const Tensor& nll_logps = s.unweighted_logps.defined() ? s.unweighted_logps : s.logps;
  if (rpo || sft_term) nll = token_mean_nll(nll_logps.narrow(0, 0, B), s.token_counts.narrow(0, 0, B));

  Tensor losses;
  if (ipo) {
    losses = dpo_loss(pol_c, pol_r, ref_c, ref_r, opts).losses;
    if (opts.use_weighting) losses = losses * wpo_weights(s, B, all.options());
  } else {
    const Tensor counts = s.token_counts.to(all.options());
    PairLogps p{pol_c, pol_r, ref_c, ref_r, counts.narrow(0, 0, B), counts.narrow(0, B, B)};
    const Tensor pw = opts.use_weighting ? wpo_weights(s, B, all.options()) : Tensor();
    for (const auto& t : terms) {
      if (opts.skip_global_terms && dpo_is_global_term(t.type)) continue;
      // TRL 1.x: loss = sum_k weight_k * mean(per_sequence_loss_k); sft's scalar is
      // expanded to every pair, so the mean over pairs gives it back.
      Tensor term = t.type == "sft" ? nll.expand({B}) : dpo_loss_term(t.type, p, opts);
      if (pw.defined() && t.type != "sft") term = term * pw;  // WPO weights the preference terms
      const Tensor weighted = t.weight == 1.0 ? term : term * t.weight;
      losses = losses.defined() ? losses + weighted : weighted;
    }
    if (!losses.defined()) losses = at::zeros_like(pol_c) + 0 * pol_c;  // every term is global: added by the caller
  }
  const Tensor chosen_rewards = (opts.beta * (pol_c - ref_c)).detach();
  const Tensor rejected_rewards = (opts.beta * (pol_r - ref_r)).detach();
  if (rpo) {
    // TRL (RPO, paper v3): cross-entropy over the chosen answer tokens of this
    // micro-batch, token-weighted, added to every pair's loss.
    losses = losses + opts.rpo_alpha * nll;
  }

  DpoStepLoss out;
  out.losses = losses;
  out.loss = B > 0 ? losses.mean() : losses.sum();
  out.chosen_logps = pol_c.detach();
  out.rejected_logps = pol_r.detach();
  out.policy_logps = s.logps;

  // One device->host copy of everything the metrics need.
  const Tensor counts = s.token_counts.to(all.options());
  const Tensor logit_sums = s.mean_logits * counts;  // sum over answer positions of the V-mean
  Tensor rows = at::stack({losses.detach(), chosen_rewards, rejected_rewards,
                           (chosen_rewards > rejected_rewards).to(all.scalar_type()),
                           chosen_rewards - rejected_rewards, out.chosen_logps, out.rejected_logps,
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
  if (nll.defined()) {
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
