// The TRL 1.x loss family (exo_pair, nca_pair, bco_pair, sppo_hard, aot,
// aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm, sft) and loss mixtures:
// values against the formulas written out here in double precision (from TRL
// v1.9.0's DPOTrainer._compute_loss), gradients against finite differences, the
// global-batch (sorting) terms, and option validation.
//
// Most comparisons run in fp64 on both sides: a formula of <= 20 operations, each within
// 1 ulp (2u, u = 2^-53) whatever the kernel (Sleef u10 or glibc), of relative condition
// <= 50 on these inputs (log-ratios formed from log-probs <= 20, beta <= 2), is within
// 2000u = 2.2e-13 (1 + |value|) of the exact value: the 1e-12 and 1e-10 tolerances hold
// with that margin on any CPU. The fp32 test derives its bound from each term's slope.
#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/autograd.h>
#include <torch/types.h>

#include "core/dpo.h"
#include "tests/fp_bounds.h"

namespace {

using torch::Tensor;

double log_sigmoid(double x) { return x >= 0 ? -std::log1p(std::exp(-x)) : x - std::log1p(std::exp(x)); }
double sigmoid(double x) { return 1 / (1 + std::exp(-x)); }

std::vector<double> to_vec(const Tensor& t) {
  Tensor c = t.detach().to(torch::kCPU, torch::kDouble).contiguous().reshape({-1});
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}
Tensor T(const std::vector<double>& v) { return torch::tensor(v, torch::kDouble); }

struct Pairs {
  std::vector<double> pc, pr, rc, rr;  // policy / reference logps, chosen / rejected
  std::vector<double> lc, lr;          // answer lengths
  size_t size() const { return pc.size(); }
};

Pairs sample_pairs() {
  Pairs p;
  p.pc = {-10.0, -20.5, -3.0, -7.25, -15.0, -4.0};
  p.pr = {-12.0, -19.0, -3.5, -7.0, -14.0, -9.5};
  p.rc = {-11.0, -20.0, -3.2, -7.3, -15.6, -4.4};
  p.rr = {-11.5, -19.5, -3.1, -7.05, -13.7, -8.95};  // no ties in any sorted quantity
  p.lc = {5, 12, 2, 4, 9, 3};
  p.lr = {7, 10, 3, 4, 8, 6};
  return p;
}

struct Opts {
  double beta = 0.1, ls = 0.0, tau = 0.05;
  double delta = 0.0;  // bco_pair's running reward mean
};

// TRL 1.x's per_sequence_loss for one loss type, written out in double.
std::vector<double> formula(const std::string& type, const Pairs& p, const Opts& o) {
  const size_t n = p.size();
  const double b = o.beta, e = o.ls;
  std::vector<double> out(n);
  std::vector<double> cl(n), rl(n), d(n);
  for (size_t i = 0; i < n; ++i) {
    cl[i] = p.pc[i] - p.rc[i];  // chosen_logratios
    rl[i] = p.pr[i] - p.rr[i];  // rejected_logratios
    d[i] = cl[i] - rl[i];       // delta_score
  }
  if (type == "aot" || type == "aot_unpaired") {
    std::vector<double> a(n), c(n);
    for (size_t i = 0; i < n; ++i) {
      a[i] = type == "aot" ? p.pc[i] - p.pr[i] : cl[i];
      c[i] = type == "aot" ? p.rc[i] - p.rr[i] : rl[i];
    }
    std::sort(a.begin(), a.end());
    std::sort(c.begin(), c.end());
    for (size_t j = 0; j < n; ++j) {
      const double x = a[j] - c[j];
      out[j] = -log_sigmoid(b * x) * (1 - e) - log_sigmoid(-b * x) * e;
    }
    return out;
  }
  for (size_t i = 0; i < n; ++i) {
    const double z = b * d[i];
    double v;
    if (type == "sigmoid") v = -log_sigmoid(z) * (1 - e) - log_sigmoid(-z) * e;
    else if (type == "hinge") v = std::max(0.0, 1 - z);
    else if (type == "robust") v = (-(1 - e) * log_sigmoid(z) + e * log_sigmoid(-z)) / (1 - 2 * e);
    else if (type == "ipo") v = std::pow(cl[i] / std::max(1.0, p.lc[i]) - rl[i] / std::max(1.0, p.lr[i]) - 1 / (2 * b), 2);
    else if (type == "exo_pair")
      v = sigmoid(z) * (log_sigmoid(z) - std::log(1 - e)) + sigmoid(-z) * (log_sigmoid(-z) - std::log(e));
    else if (type == "nca_pair") v = -log_sigmoid(b * cl[i]) - 0.5 * log_sigmoid(-b * cl[i]) - 0.5 * log_sigmoid(-b * rl[i]);
    else if (type == "bco_pair") v = -log_sigmoid(b * cl[i] - o.delta) - log_sigmoid(-(b * rl[i] - o.delta));
    else if (type == "sppo_hard") v = std::pow(cl[i] - 0.5 / b, 2) + std::pow(rl[i] + 0.5 / b, 2);
    else if (type == "apo_zero") v = (1 - sigmoid(b * cl[i])) + sigmoid(b * rl[i]);
    else if (type == "apo_down") v = sigmoid(b * cl[i]) + (1 - sigmoid(z));
    else if (type == "discopop") {
      const double m = sigmoid(z / o.tau);
      v = -log_sigmoid(z) * (1 - m) + std::exp(-z) * m;
    } else if (type == "sigmoid_norm")
      v = -log_sigmoid(b * (cl[i] / std::max(1.0, p.lc[i]) - rl[i] / std::max(1.0, p.lr[i])));
    else throw std::runtime_error("no formula for " + type);
    out[i] = v;
  }
  return out;
}

double sum(const std::vector<double>& v) { return std::accumulate(v.begin(), v.end(), 0.0); }

dpo::DpoOptions options(const std::string& type, const Opts& o) {
  dpo::DpoOptions d;
  d.loss_type = type;
  d.beta = o.beta;
  d.label_smoothing = o.ls;
  d.discopop_tau = o.tau;
  d.bco_delta = o.delta;
  return d;
}

const std::vector<std::string> kPairTypes{"sigmoid",   "hinge", "robust",   "ipo",      "exo_pair",
                                          "nca_pair",  "bco_pair", "sppo_hard", "aot", "aot_unpaired",
                                          "apo_zero",  "apo_down", "discopop", "sigmoid_norm"};

Opts opts_for(const std::string& type, double beta) {
  Opts o;
  o.beta = beta;
  if (type == "exo_pair") o.ls = 1e-3;  // EXO needs epsilon > 0
  if (type == "robust" || type == "aot" || type == "aot_unpaired") o.ls = 0.1;
  if (type == "bco_pair") o.delta = 0.07;  // a running reward mean != 0
  return o;
}

dpo::PairLogps pair_tensors(const Pairs& p, bool grad) {
  dpo::PairLogps t{T(p.pc), T(p.pr), T(p.rc), T(p.rr), T(p.lc), T(p.lr)};
  if (grad) {
    t.pol_c.set_requires_grad(true);
    t.pol_r.set_requires_grad(true);
  }
  return t;
}

TEST(DpoLossFamily, EveryTermMatchesTrlFormula) {
  const Pairs p = sample_pairs();
  for (const auto& type : kPairTypes) {
    for (double beta : {0.1, 0.5, 2.0}) {
      const Opts o = opts_for(type, beta);
      const auto got = to_vec(dpo::dpo_loss_term(type, pair_tensors(p, false), options(type, o)));
      const auto want = formula(type, p, o);
      ASSERT_EQ(got.size(), want.size());
      for (size_t i = 0; i < want.size(); ++i)
        EXPECT_NEAR(got[i], want[i], 1e-12 * std::max(1.0, std::abs(want[i]))) << type << " beta " << beta << " [" << i << "]";
    }
  }
  // Spot values worked on paper (beta 0.1, pair 0: chosen log-ratio 1, rejected -0.5, delta 1.5):
  const auto at0 = [&](const std::string& type, Opts o) {
    return dpo::dpo_loss_term(type, pair_tensors(p, false), options(type, o))[0].item<double>();
  };
  // fp64, values ~1: each side's exp, log1p / division and <= 6 more roundings, of relative
  // condition < 2 here: gamma(16) per side, 2 gamma(16) |value| between them (7e-15 ~ 1).
  const auto near = [](double v) { return 2 * dpo::testutil::gamma(16, torch::kDouble) * std::abs(v); };
  const double bco = std::log1p(std::exp(-0.1)) + std::log1p(std::exp(-0.05));
  EXPECT_NEAR(at0("bco_pair", {}), bco, near(bco));
  Opts d;
  d.delta = 0.3;  // rewards 0.1 and -0.05 shifted by delta: -log s(-0.2) - log s(0.35)
  const double bco_d = std::log1p(std::exp(0.2)) + std::log1p(std::exp(-0.35));
  EXPECT_NEAR(at0("bco_pair", d), bco_d, near(bco_d));
  // 1 - 0.1 / 0.1 and 0.5 / 0.1 round (~ 10u of 5 each), squared into 36.5: < 300u.
  EXPECT_NEAR(at0("sppo_hard", {}), std::pow(1 - 5, 2) + std::pow(-0.5 + 5, 2), 300 * 0x1p-53 * 36.25);
  const double apo_zero = 1 - sigmoid(0.1) + sigmoid(-0.05), apo_down = sigmoid(0.1) + 1 - sigmoid(0.15);
  EXPECT_NEAR(at0("apo_zero", {}), apo_zero, near(apo_zero));
  EXPECT_NEAR(at0("apo_down", {}), apo_down, near(apo_down));
}

// The fp32 terms within their rounding: each log-prob is rounded to fp32 and enters one
// subtraction (2u |x| each), which moves term j by sum_x |d term_j / d x| 2u |x| (the slopes
// by central differences of the double formula); the term's own evaluation (an exp within
// kExpUlps, a log within kLogUlps, <= 10 more roundings) adds (2 kExpUlps + 2 kLogUlps + 10)
// u (1 + |term|).
TEST(DpoLossFamily, Float32TermsWithinTheirRoundingOfTheDoubleFormula) {
  const Pairs p = sample_pairs();
  constexpr double u = 0x1p-24;
  for (const auto& type : kPairTypes) {
    const Opts o = opts_for(type, 0.1);
    dpo::PairLogps t = pair_tensors(p, false);
    for (Tensor* x : {&t.pol_c, &t.pol_r, &t.ref_c, &t.ref_r}) *x = x->to(torch::kFloat);
    const auto got = to_vec(dpo::dpo_loss_term(type, t, options(type, o)));
    const auto want = formula(type, p, o);
    std::vector<double> bound(want.size());
    for (size_t j = 0; j < want.size(); ++j)
      bound[j] = (2 * dpo::testutil::kExpUlps + 2 * dpo::testutil::kLogUlps + 10) * u * (1 + std::abs(want[j]));
    for (std::vector<double> Pairs::*field : {&Pairs::pc, &Pairs::pr, &Pairs::rc, &Pairs::rr})
      for (size_t i = 0; i < p.size(); ++i) {
        const double x = (p.*field)[i], h = 1e-6 * std::max(1.0, std::abs(x));
        Pairs up = p, down = p;
        (up.*field)[i] += h;
        (down.*field)[i] -= h;
        const auto fu = formula(type, up, o), fd = formula(type, down, o);
        for (size_t j = 0; j < want.size(); ++j) bound[j] += std::abs(fu[j] - fd[j]) / (2 * h) * 2 * u * std::abs(x);
      }
    for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i], want[i], bound[i]) << type << " [" << i << "]";
  }
}

TEST(DpoLossFamily, GradientsMatchFiniteDifferencesOfTheFormula) {
  const Pairs p = sample_pairs();
  for (const auto& type : kPairTypes) {
    for (double beta : {0.1, 1.0}) {
      const Opts o = opts_for(type, beta);
      dpo::PairLogps t = pair_tensors(p, true);
      dpo::dpo_loss_term(type, t, options(type, o)).sum().backward();
      const auto gc = to_vec(t.pol_c.grad()), gr = to_vec(t.pol_r.grad());
      const double h = 1e-6;
      double mass = 0;
      for (size_t i = 0; i < p.size(); ++i) {
        for (int side = 0; side < 2; ++side) {
          Pairs up = p, down = p;
          (side == 0 ? up.pc : up.pr)[i] += h;
          (side == 0 ? down.pc : down.pr)[i] -= h;
          const double fd = (sum(formula(type, up, o)) - sum(formula(type, down, o))) / (2 * h);
          const double an = side == 0 ? gc[i] : gr[i];
          // fp64 central differences (h = 1e-6) of smooth terms: truncation h^2 / 6 times the
          // third derivative (< 100 here) ~ 2e-11, rounding ~ 10 u |f| / h < 1e-8: 1e-6 is above both.
          EXPECT_NEAR(an, fd, 1e-6 + 1e-6 * std::abs(fd)) << type << " beta " << beta << (side ? " d/dpol_r[" : " d/dpol_c[") << i << "]";
          mass += std::abs(an);
        }
      }
      EXPECT_GT(mass, 1e-4) << type;  // the comparison compared something
    }
  }
}

TEST(DpoLossFamily, DpoLossTakesOneNewTypeWithRewards) {
  const Pairs p = sample_pairs();
  const auto out = dpo::dpo_loss(T(p.pc), T(p.pr), T(p.rc), T(p.rr), options("nca_pair", Opts{}));
  const auto want = formula("nca_pair", p, Opts{});
  for (size_t i = 0; i < p.size(); ++i) {
    EXPECT_NEAR(out.losses[i].item<double>(), want[i], 1e-12);
    EXPECT_NEAR(out.chosen_rewards[i].item<double>(), 0.1 * (p.pc[i] - p.rc[i]), 1e-12);
  }
  EXPECT_THROW(dpo::dpo_loss(T(p.pc), T(p.pr), T(p.rc), T(p.rr), options("sigmoid,hinge", Opts{})), std::runtime_error);
  EXPECT_THROW(dpo::dpo_loss(T(p.pc), T(p.pr), T(p.rc), T(p.rr), options("sft", Opts{})), std::runtime_error);
}

// ---- dpo_batch_loss: logits -> loss, for every type and for mixtures -----------------

struct Batch {
  Tensor logits, ids, mask;
};

// [chosen; rejected] rows of [prompt | answer | padding]; every row has an answer.
Batch random_batch(int64_t B, int64_t Tn, int64_t V, uint64_t seed) {
  torch::manual_seed(seed);
  Batch b;
  b.logits = torch::randn({2 * B, Tn, V}, torch::kDouble);
  b.ids = torch::randint(0, V, {2 * B, Tn}, torch::kLong);
  b.mask = torch::zeros({2 * B, Tn}, torch::kLong);
  for (int64_t r = 0; r < 2 * B; ++r) {
    const int64_t prompt = 1 + r % 2, answer = 1 + (r * 7) % (Tn - prompt);
    for (int64_t t = prompt; t < prompt + answer; ++t) b.mask[r][t] = 1;
    for (int64_t t = prompt + answer; t < Tn; ++t) b.ids[r][t] = -100;
  }
  return b;
}

// Summed answer log-probs and lengths per row, by a plain double loop.
void naive(const Batch& b, std::vector<double>& logp, std::vector<double>& len) {
  auto l = b.logits.accessor<double, 3>();
  auto id = b.ids.accessor<int64_t, 2>();
  auto m = b.mask.accessor<int64_t, 2>();
  const int64_t R = b.logits.size(0), Tn = b.logits.size(1), V = b.logits.size(2);
  logp.assign(R, 0);
  len.assign(R, 0);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t t = 1; t < Tn; ++t) {
      if (!m[r][t]) continue;
      double mx = -INFINITY, s = 0;
      for (int64_t v = 0; v < V; ++v) mx = std::max(mx, l[r][t - 1][v]);
      for (int64_t v = 0; v < V; ++v) s += std::exp(l[r][t - 1][v] - mx);
      logp[r] += l[r][t - 1][id[r][t]] - mx - std::log(s);
      len[r] += 1;
    }
  }
}

// The mixture's mean loss over the micro-batch, by the formulas: sum_k w_k mean(term_k).
double mixture_formula(const Batch& b, const std::vector<double>& ref, const std::vector<std::string>& types,
                       const std::vector<double>& weights, const Opts& o, double* nll_out = nullptr) {
  std::vector<double> logp, len;
  naive(b, logp, len);
  const size_t B = logp.size() / 2;
  Pairs p;
  double nll_num = 0, nll_den = 0;
  for (size_t i = 0; i < B; ++i) {
    p.pc.push_back(logp[i]);
    p.pr.push_back(logp[B + i]);
    p.rc.push_back(ref[i]);
    p.rr.push_back(ref[B + i]);
    p.lc.push_back(len[i]);
    p.lr.push_back(len[B + i]);
    nll_num -= logp[i];
    nll_den += len[i];
  }
  const double nll = nll_num / nll_den;
  if (nll_out) *nll_out = nll;
  double total = 0;
  for (size_t k = 0; k < types.size(); ++k) {
    const double w = weights.empty() ? 1.0 : weights[k];
    total += w * (types[k] == "sft" ? nll : sum(formula(types[k], p, o)) / B);
  }
  return total;
}

TEST(DpoLossFamily, BatchLossOfEveryTypeMatchesFormulaAndFiniteDifferences) {
  const int64_t B = 3, Tn = 6, V = 5;
  const Batch b = random_batch(B, Tn, V, 21);
  const std::vector<double> ref{-7.0, -6.5, -5.0, -6.0, -8.0, -4.5};
  std::vector<std::string> types = kPairTypes;
  types.push_back("sft");
  for (const auto& type : types) {
    if (type == "ipo") continue;  // ipo alone keeps its TRL 0.x form: test_dpo covers it
    const Opts o = opts_for(type, 0.5);
    const dpo::DpoOptions d = options(type, o);
    Tensor x = b.logits.clone().set_requires_grad(true);
    const auto out = dpo::dpo_batch_loss(x, b.ids, b.mask, T(ref), d);
    const double want = mixture_formula(b, ref, {type}, {}, o);
    EXPECT_NEAR(out.loss.item<double>(), want, 1e-10 * std::max(1.0, std::abs(want))) << type;
    EXPECT_NEAR(out.metrics.loss_sum / B, want, 1e-10 * std::max(1.0, std::abs(want))) << type;
    out.loss.backward();
    const auto an = to_vec(x.grad());
    Tensor y = b.logits.clone();
    double* py = y.data_ptr<double>();
    const double h = 1e-5;
    double mass = 0;
    for (int64_t i = 0; i < y.numel(); ++i) {
      const double keep = py[i];
      py[i] = keep + h;
      const double up = dpo::dpo_batch_loss(y, b.ids, b.mask, T(ref), d).loss.item<double>();
      py[i] = keep - h;
      const double down = dpo::dpo_batch_loss(y, b.ids, b.mask, T(ref), d).loss.item<double>();
      py[i] = keep;
      // fp64 central differences, h = 1e-5: truncation ~ h^2 / 6 times the third derivative ~ 1e-11, rounding
      // ~ u |loss| / h ~ 1e-10: 1e-7 + 1e-6 |g| is above both.
      EXPECT_NEAR(an[i], (up - down) / (2 * h), 1e-7 + 1e-6 * std::abs(an[i])) << type << " logit " << i;
      mass += std::abs(an[i]);
    }
    EXPECT_GT(mass, 1e-3) << type;
  }
}

TEST(DpoLossFamily, StepOneOfEveryTypeAtPolicyEqualsReference) {
  // Step 1 of training: LoRA B = 0, so the policy's logps are the reference's.
  const Batch b = random_batch(4, 7, 6, 22);
  std::vector<double> logp, len;
  naive(b, logp, len);
  std::vector<std::string> types = kPairTypes;
  types.push_back("sft");
  for (const auto& type : types) {
    const Opts o = opts_for(type, 0.1);
    const auto out = dpo::dpo_batch_loss(b.logits, b.ids, b.mask, T(logp), options(type, o));
    const auto m = out.metrics.averages();
    std::map<std::string, double> mm(m.begin(), m.end());
    EXPECT_NEAR(mm.at("rewards/chosen"), 0.0, 1e-12) << type;
    EXPECT_NEAR(mm.at("rewards/margins"), 0.0, 1e-12) << type;
    if (type == "ipo") continue;
    EXPECT_NEAR(mm.at("loss"), mixture_formula(b, logp, {type}, {}, o), 1e-10) << type;
  }
  // e.g. bco_pair at zero rewards: 2 ln 2; apo_zero: 1; sppo_hard: 2 (0.5/beta)^2
  auto loss_of = [&](const std::string& t) {
    Opts o = opts_for(t, 0.1);
    o.delta = 0;  // a fresh run's bco_pair: no reward mean yet
    return dpo::dpo_batch_loss(b.logits, b.ids, b.mask, T(logp), options(t, o)).loss.item<double>();
  };
  EXPECT_NEAR(loss_of("bco_pair"), 2 * std::log(2.0), 1e-12);
  EXPECT_NEAR(loss_of("apo_zero"), 1.0, 1e-12);
  EXPECT_NEAR(loss_of("sppo_hard"), 2 * 25.0, 1e-9);
  EXPECT_NEAR(loss_of("discopop"), 0.5 * std::log(2.0) + 0.5, 1e-12);
}

TEST(DpoLossFamily, MixturesAreTheWeightedSumOfTheirTerms) {
  const int64_t B = 3;
  const Batch b = random_batch(B, 7, 6, 23);
  const std::vector<double> ref{-7.0, -6.5, -5.0, -6.0, -8.0, -4.5};
  struct Case {
    std::string types;
    std::vector<double> weights;
  };
  const std::vector<Case> cases{{"sigmoid,bco_pair,sft", {0.8, 0.2, 1.0}},  // TRL's MPO recipe
                                {"sigmoid,bco_pair,sft", {}},
                                {"ipo,hinge", {0.5, 2.0}},
                                {"exo_pair,aot,apo_down", {1.0, 0.3, -0.5}},
                                {"discopop,sigmoid_norm,nca_pair,sppo_hard", {0.1, 0.2, 0.3, 0.4}}};
  for (const auto& c : cases) {
    Opts o;
    o.beta = 0.3;
    if (c.types.find("exo") != std::string::npos) o.ls = 0.01;
    dpo::DpoOptions d = options(c.types, o);
    d.loss_weights = c.weights;
    const auto terms = dpo::dpo_loss_terms(d);
    std::vector<std::string> names;
    for (const auto& t : terms) names.push_back(t.type);
    double nll = 0;
    const double want = mixture_formula(b, ref, names, c.weights, o, &nll);
    Tensor x = b.logits.clone().set_requires_grad(true);
    const auto out = dpo::dpo_batch_loss(x, b.ids, b.mask, T(ref), d);
    EXPECT_NEAR(out.loss.item<double>(), want, 1e-10 * std::max(1.0, std::abs(want))) << c.types;
    // and the weighted sum of the single-type batch losses (ipo through the mixture's per-token form)
    double parts = 0;
    for (const auto& t : terms) {
      if (t.type == "ipo" || t.type == "aot") continue;
      dpo::DpoOptions one = options(t.type, o);
      if (one.loss_type != "exo_pair" && one.loss_type != "sigmoid" && one.loss_type != "aot") one.label_smoothing = 0;
      parts += t.weight * dpo::dpo_batch_loss(b.logits, b.ids, b.mask, T(ref), one).loss.item<double>();
    }
    if (c.types == "sigmoid,bco_pair,sft") {
      EXPECT_NEAR(out.loss.item<double>(), parts, 1e-10) << c.types;
      // the sft term logs TRL's nll_loss (the chosen answers' token-mean NLL)
      const auto m = out.metrics.averages();
      std::map<std::string, double> mm(m.begin(), m.end());
      EXPECT_NEAR(mm.at("nll_loss"), nll, 1e-10);
    }
    // gradient of the mixture = weighted sum of the terms' gradients (through autograd)
    out.loss.backward();
    Tensor g_mix = x.grad().clone();
    Tensor g_sum = torch::zeros_like(g_mix);
    for (const auto& t : terms) {
      Tensor z = b.logits.clone().set_requires_grad(true);
      dpo::DpoOptions one = options(t.type + ",sft", o);  // a mixture with weight 0 on sft: the term alone
      one.loss_weights = {t.weight, 0.0};
      if (!(t.type == "exo_pair" || t.type == "sigmoid" || t.type == "aot" || t.type == "robust")) one.label_smoothing = 0;
      dpo::dpo_batch_loss(z, b.ids, b.mask, T(ref), one).loss.backward();
      g_sum += z.grad();
    }
    EXPECT_LT((g_mix - g_sum).abs().max().item<double>(), 1e-12) << c.types;
  }
}

// ---- the global-batch terms ------------------------------------------------------------

TEST(DpoLossFamily, GlobalTermsEqualTheBatchFormulaAndAutograd) {
  const Pairs p = sample_pairs();
  for (const std::string types : {"aot", "aot_unpaired", "aot,aot_unpaired"}) {
    Opts o;
    o.beta = 0.7;
    o.ls = 0.05;
    dpo::DpoOptions d = options(types, o);
    if (types == "aot,aot_unpaired") d.loss_weights = {0.25, 2.0};
    const auto g = dpo::dpo_global_terms(p.pc, p.pr, p.rc, p.rr, d);
    double want = 0;
    dpo::PairLogps t = pair_tensors(p, true);
    Tensor total = torch::zeros({}, torch::kDouble);
    for (const auto& term : dpo::dpo_loss_terms(d)) {
      want += term.weight * sum(formula(term.type, p, o));
      total = total + term.weight * dpo::dpo_loss_term(term.type, t, d).sum();
    }
    EXPECT_NEAR(g.loss_sum, want, 1e-12) << types;
    total.backward();
    const auto gc = to_vec(t.pol_c.grad()), gr = to_vec(t.pol_r.grad());
    for (size_t i = 0; i < p.size(); ++i) {
      EXPECT_NEAR(g.grad_c[i], gc[i], 1e-12) << types << " [" << i << "]";
      EXPECT_NEAR(g.grad_r[i], gr[i], 1e-12) << types << " [" << i << "]";
    }
  }
}

TEST(DpoLossFamily, GlobalTermsDoNotDependOnThePairOrder) {
  // Without ties the order in which the pairs arrive does not matter. (Ties keep their
  // order: the trainer gathers in the global batch's order whatever the world size.)
  std::mt19937_64 rng(5);
  std::normal_distribution<double> nd(-10, 3);
  Pairs p;
  for (int i = 0; i < 40; ++i) {
    p.pc.push_back(nd(rng));
    p.pr.push_back(nd(rng));
    p.rc.push_back(nd(rng));
    p.rr.push_back(nd(rng));
  }
  std::vector<size_t> perm(p.pc.size());
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  Pairs q = p;
  for (size_t i = 0; i < perm.size(); ++i) {
    q.pc[i] = p.pc[perm[i]];
    q.pr[i] = p.pr[perm[i]];
    q.rc[i] = p.rc[perm[i]];
    q.rr[i] = p.rr[perm[i]];
  }
  for (const std::string types : {"aot", "aot_unpaired"}) {
    const auto d = options(types, Opts{});
    const auto a = dpo::dpo_global_terms(p.pc, p.pr, p.rc, p.rr, d);
    const auto b = dpo::dpo_global_terms(q.pc, q.pr, q.rc, q.rr, d);
    // fp64: the same per-rank terms summed in another order: gamma(40) sum |t| < 1e-14 |sum|
    // (all terms > 0); each pair's gradient is the same formula of its rank: ~ 1 ulp apart.
    EXPECT_NEAR(a.loss_sum, b.loss_sum, 1e-12 * std::abs(a.loss_sum)) << types;
    for (size_t i = 0; i < perm.size(); ++i) {
      EXPECT_NEAR(b.grad_c[i], a.grad_c[perm[i]], 1e-14) << types;
      EXPECT_NEAR(b.grad_r[i], a.grad_r[perm[i]], 1e-14) << types;
    }
  }
}

TEST(DpoLossFamily, SkipGlobalTermsLeavesOnlyTheLocalOnes) {
  const Batch b = random_batch(3, 7, 6, 24);
  const std::vector<double> ref{-7.0, -6.5, -5.0, -6.0, -8.0, -4.5};
  dpo::DpoOptions mix = options("sigmoid,aot", Opts{});
  mix.loss_weights = {0.5, 2.0};
  mix.skip_global_terms = true;
  dpo::DpoOptions one = options("sigmoid", Opts{});
  const auto a = dpo::dpo_batch_loss(b.logits, b.ids, b.mask, T(ref), mix);
  const auto s = dpo::dpo_batch_loss(b.logits, b.ids, b.mask, T(ref), one);
  // fp64: the mixture's 0.5 * terms (an exact scaling) averaged as the plain loss is.
  EXPECT_NEAR(a.loss.item<double>(), 0.5 * s.loss.item<double>(), 1e-14);
  EXPECT_TRUE(dpo::dpo_has_global_terms(mix));
  EXPECT_FALSE(dpo::dpo_has_global_terms(one));
  // only global terms: a zero loss that still back-propagates (to zero)
  dpo::DpoOptions only = options("aot", Opts{});
  only.skip_global_terms = true;
  Tensor x = b.logits.clone().set_requires_grad(true);
  const auto z = dpo::dpo_batch_loss(x, b.ids, b.mask, T(ref), only);
  EXPECT_EQ(z.loss.item<double>(), 0.0);
  z.loss.backward();
  EXPECT_EQ(x.grad().abs().sum().item<double>(), 0.0);
}

// ---- options -------------------------------------------------------------------------------

std::string message(const dpo::DpoOptions& o) {
  try {
    dpo::validate_dpo_options(o);
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

// BCO's delta: the mean of every reward (chosen and rejected) of the steps so far.
TEST(DpoLossFamily, BcoRunningMeanIsTheMeanOfAllRewardsSoFar) {
  dpo::BcoRunningMean m;
  EXPECT_EQ(m.mean(), 0.0);  // a fresh run: no shift at step 1
  m.add(0.4, -0.2, 2);       // step 1: rewards of 2 pairs summed
  EXPECT_DOUBLE_EQ(m.mean(), 0.2 / 4);
  m.add(1.0, 0.6, 3);  // step 2: 3 pairs
  EXPECT_DOUBLE_EQ(m.mean(), (0.2 + 1.6) / 10);
  EXPECT_EQ(m.count, 10.0);
}

// WPO and LD-DPO from logits (dpo_batch_loss reads them through head_logps), against
// TRL's formulas written out with log_softmax in double: LD-DPO weighs the policy's
// answer tokens past the shorter answer by alpha (the reference is summed as given);
// WPO multiplies each pair's DPO loss by min(1, exp(w_c + w_r)), w = mean over the
// answer of log p - log sum p^2, detached; the sft term is not weighted. Gradients too.
TEST(DpoLossFamily, WpoAndLdDpoMatchTheirFormulas) {
  torch::manual_seed(11);
  const int64_t B = 3, R = 2 * B, T = 10, V = 40;
  Tensor logits0 = torch::randn({R, T, V}, torch::kDouble) * 2;
  Tensor ids = torch::randint(0, V, {R, T}, torch::kLong);
  Tensor mask = torch::zeros({R, T});
  const std::vector<int64_t> len{4, 2, 5, 3, 5, 2};  // answer lengths: chosen 0..2, rejected 0..2
  for (int64_t r = 0; r < R; ++r) mask[r].slice(0, T - len[r], T).fill_(1);
  Tensor ref = torch::tensor(std::vector<double>{-9.0, -4.5, -12.0, -7.0, -11.0, -5.5}, torch::kDouble);
  for (const std::string types : {"sigmoid", "sigmoid,sft", "bco_pair"}) {
    for (int variant = 0; variant < 3; ++variant) {  // 0 WPO, 1 LD-DPO, 2 both
      dpo::DpoOptions o;
      o.loss_type = types;
      o.beta = 0.5;
      o.use_weighting = variant != 1;
      o.ld_alpha = variant != 0 ? 0.3 : 1.0;
      Tensor logits = logits0.clone().requires_grad_(true);
      dpo::DpoStepLoss got = dpo::dpo_batch_loss(logits, ids, mask, ref, o);
      Tensor g = torch::autograd::grad({got.loss}, {logits})[0];

      Tensor lg = logits0.clone().requires_grad_(true);
      Tensor lsm = torch::log_softmax(lg, -1);
      std::vector<Tensor> pol(R), wpo(R), plain(R);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t pair = r % B, lp = std::min(len[pair], len[B + pair]);
        pol[r] = torch::zeros({}, torch::kDouble);
        plain[r] = torch::zeros({}, torch::kDouble);
        wpo[r] = torch::zeros({}, torch::kDouble);
        for (int64_t k = 0; k < len[r]; ++k) {
          const int64_t t = T - len[r] + k;
          Tensor l = lsm[r][t - 1][ids[r][t].item<int64_t>()];
          pol[r] = pol[r] + (o.ld_alpha != 1.0 && k >= lp ? o.ld_alpha : 1.0) * l;
          plain[r] = plain[r] + l;
          wpo[r] = wpo[r] + (l - (2 * lsm[r][t - 1]).logsumexp(0)).detach() / static_cast<double>(len[r]);
        }
      }
      Tensor loss = torch::zeros({}, torch::kDouble);
      Tensor nll = -(plain[0] + plain[1] + plain[2]) / static_cast<double>(len[0] + len[1] + len[2]);
      for (int64_t i = 0; i < B; ++i) {
        const Tensor c = pol[i] - ref[i], rj = pol[B + i] - ref[B + i];
        Tensor term = types == "bco_pair" ? -torch::log_sigmoid(o.beta * c) - torch::log_sigmoid(-o.beta * rj)
                                          : -torch::log_sigmoid(o.beta * (c - rj));
        if (o.use_weighting) term = term * torch::exp(wpo[i] + wpo[B + i]).clamp_max(1.0);
        if (types == "sigmoid,sft") term = term + nll;
        loss = loss + term / static_cast<double>(B);
      }
      Tensor g_ref = torch::autograd::grad({loss}, {lg}, {}, /*retain_graph=*/true)[0];  // kept for the slopes below
      const std::string what = types + " variant " + std::to_string(variant);
      // head_logps works in fp32 whatever the logits (fp64 logits are read through fp32:
      // u |x| each). Bounds, first order: each sequence's log-prob lb_r (tests/fp_bounds.h,
      // gathered_logp_sum_bound with that input error; the LD weights round once more) and
      // WPO statistic wb_r (per token the log-prob's bound, twice the log-sum-exp bounds of 2x
      // and x, the inputs' rounding through them (5u max |x|) and 3 roundings; a mean), carried
      // to the loss by its slopes |d loss / d logp_r| (autograd on the double reference) and
      // |term_i| w_i / B per unit of w_c + w_r, plus each pair's fp32 evaluation.
      const std::vector<Tensor> seq_vars = [&] {
        std::vector<Tensor> v(pol);
        v.insert(v.end(), plain.begin(), plain.end());
        return v;
      }();
      const auto slopes = torch::autograd::grad({loss}, seq_vars, {}, /*retain_graph=*/false, false, /*allow_unused=*/true);
      auto slope = [&](size_t j) { return slopes[j].defined() ? std::abs(slopes[j].item<double>()) : 0.0; };
      constexpr double u = 0x1p-24;
      using dpo::testutil::kExpUlps;
      using dpo::testutil::kLogUlps;
      std::vector<int64_t> pos, tok, seq;
      std::vector<double> wts;
      for (int64_t r = 0; r < R; ++r) {
        const int64_t pair = r % B, lp = std::min(len[pair], len[B + pair]);
        for (int64_t k = 0; k < len[r]; ++k) {
          const int64_t t = T - len[r] + k;
          pos.push_back(r * T + t - 1), tok.push_back(ids[r][t].item<int64_t>()), seq.push_back(r);
          wts.push_back(o.ld_alpha != 1.0 && k >= lp ? o.ld_alpha : 1.0);
        }
      }
      const Tensor rows = logits0.reshape({R * T, V}).index_select(0, torch::tensor(pos));
      const Tensor in_err = u * rows.abs();
      const Tensor tk = torch::tensor(tok), sq = torch::tensor(seq);
      const auto lb_w = to_vec(dpo::testutil::gathered_logp_sum_bound(rows, tk, sq, R, torch::kFloat32,
                                                                        torch::tensor(wts, torch::kDouble), in_err));
      const auto lb_p = to_vec(dpo::testutil::gathered_logp_sum_bound(rows, tk, sq, R, torch::kFloat32, Tensor(), in_err));
      const Tensor lsm_rows = torch::log_softmax(rows, 1);
      const Tensor e_tok = (dpo::testutil::log_softmax_error_bound(rows, 1) +
                            dpo::testutil::log_softmax_input_error(rows, in_err, 1)).gather(1, tk.unsqueeze(1)).squeeze(1);
      const Tensor e_stat = e_tok + 2 * dpo::testutil::logsumexp_error_bound(2 * rows, 1).squeeze(1) +
                            2 * dpo::testutil::logsumexp_error_bound(rows, 1).squeeze(1) + 5 * u * rows.abs().amax(1) +
                            3 * u * (lsm_rows.gather(1, tk.unsqueeze(1)).squeeze(1).abs() + 3 * rows.logsumexp(1).abs());
      std::vector<double> wb(R, 0.0);
      for (size_t e = 0; e < pos.size(); ++e) wb[seq[e]] += e_stat[e].item<double>() / len[seq[e]];
      double loss_bound = 0;
      std::vector<double> weight(B, 1.0), dslope(R, 0.0);
      for (int64_t i = 0; i < B; ++i) {
        const double pc = pol[i].item<double>(), pr = pol[B + i].item<double>();
        const double rc = ref[i].item<double>(), rr = ref[B + i].item<double>();
        const double c = pc - rc, rj = pr - rr;
        const double term = types == "bco_pair" ? -std::log(1 / (1 + std::exp(-o.beta * c))) - std::log(1 / (1 + std::exp(o.beta * rj)))
                                                : -std::log(1 / (1 + std::exp(-o.beta * (c - rj))));
        if (o.use_weighting) weight[i] = std::min(1.0, std::exp(wpo[i].item<double>() + wpo[B + i].item<double>()));
        const double dw = o.use_weighting ? wb[i] + wb[B + i] + (2 * kExpUlps + 2) * u : 0.0;
        const double eval = (2 * kExpUlps + 2 * kLogUlps + 12) * u * (1 + term + o.beta * (std::abs(pc) + std::abs(pr) + std::abs(rc) + std::abs(rr)));
        loss_bound += (term * weight[i] * dw + eval) / B;
        // The gradient's coefficient d loss / d logp: the second derivative of -log sigmoid is
        // <= beta^2 / 4, and the weight and the derivative's own evaluation add relative errors.
        const double curv = o.beta * o.beta / 4 * weight[i] / B;
        const double both = types == "bco_pair" ? 0.0 : 1.0;
        dslope[i] = curv * (lb_w[i] + both * lb_w[B + i]) + slope(i) * (dw + (2 * kExpUlps + 6) * u);
        dslope[B + i] = curv * (lb_w[B + i] + both * lb_w[i]) + slope(B + i) * (dw + (2 * kExpUlps + 6) * u);
      }
      for (int64_t r = 0; r < R; ++r) loss_bound += slope(r) * lb_w[r] + slope(R + r) * lb_p[r];
      loss_bound += dpo::testutil::gamma(B + 1) * std::abs(loss.item<double>());
      EXPECT_NEAR(got.loss.item<double>(), loss.item<double>(), loss_bound) << what;
      // Gradient entries c_e ([v == token] - p_v) at each scored position, c_e = slope_r w_e
      // (+ the nll slope): p within softmax_error_bound plus the inputs' rounding through the
      // softmax, 4u for the difference and the products; c_e within w_e dslope_r.
      const Tensor sm_err = dpo::testutil::softmax_error_bound(rows, 1);
      const Tensor p_in = torch::softmax(rows, 1) * (in_err + (torch::softmax(rows, 1) * in_err).sum(1, true));
      Tensor g_bound = torch::zeros_like(logits0);
      for (size_t e = 0; e < pos.size(); ++e) {
        const int64_t r = seq[e];
        const double c = slope(r) * wts[e] + slope(R + r);
        g_bound.view({R * T, V})[pos[e]] += c * (sm_err[e] + p_in[e] + 4 * u) + wts[e] * dslope[r];
      }
      dpo::testutil::expect_within(g, g_ref, g_bound, what + " grad");
      for (int64_t i = 0; i < B; ++i) {  // the policy logps fed to the loss (and the rewards) are LD-weighted
        EXPECT_NEAR(got.chosen_logps[i].item<double>(), pol[i].item<double>(), lb_w[i]) << what;
        EXPECT_NEAR(got.rejected_logps[i].item<double>(), pol[B + i].item<double>(), lb_w[B + i]) << what;
      }
    }
  }
  // The data have weights != 1: WPO changed the loss (the comparison above is not vacuous).
  dpo::DpoOptions plain_o, wpo_o;
  plain_o.beta = wpo_o.beta = 0.5;
  wpo_o.use_weighting = true;
  EXPECT_NE(dpo::dpo_batch_loss(logits0, ids, mask, ref, plain_o).loss.item<double>(),
            dpo::dpo_batch_loss(logits0, ids, mask, ref, wpo_o).loss.item<double>());
  // From precomputed log-probs without the statistic, --use_weighting is refused.
  dpo::SeqLogps bare = dpo::sequence_logps(logits0, ids, mask);
  EXPECT_THROW(dpo::dpo_batch_loss(bare, ref, wpo_o), std::runtime_error);
}

TEST(DpoLossFamily, OptionValidationNamesTheOption) {
  EXPECT_EQ(message(options("sigmoid,bco_pair,sft", Opts{})), "");
  EXPECT_EQ(message(options(" sigmoid , sft ", Opts{})), "");
  const std::string unknown = message(options("sigmoid,dpop", Opts{}));
  EXPECT_NE(unknown.find("'dpop'"), std::string::npos) << unknown;
  EXPECT_NE(unknown.find("discopop"), std::string::npos) << unknown;
  EXPECT_NE(message(options("sigmoid,,sft", Opts{})).find("empty entry"), std::string::npos);
  auto w = options("sigmoid,sft", Opts{});
  w.loss_weights = {1.0};
  EXPECT_NE(message(w).find("--loss_weights has 1 value(s) for 2 loss type(s)"), std::string::npos) << message(w);
  w.loss_weights = {1.0, NAN};
  EXPECT_NE(message(w).find("--loss_weights"), std::string::npos);
  EXPECT_NE(message(options("exo_pair", Opts{})).find("--label_smoothing > 0"), std::string::npos);
  Opts ls;
  ls.ls = 0.1;
  EXPECT_NE(message(options("bco_pair,hinge", ls)).find("--label_smoothing is not used"), std::string::npos);
  EXPECT_EQ(message(options("bco_pair,aot", ls)), "");  // aot uses it
  Opts tau;
  tau.tau = 0;
  EXPECT_NE(message(options("discopop", tau)).find("--discopop_tau"), std::string::npos);
  auto ld = options("sigmoid", Opts{});
  ld.ld_alpha = 1.5;
  EXPECT_NE(message(ld).find("--ld_alpha must be in [0, 1]"), std::string::npos) << message(ld);
  ld.ld_alpha = 0.5;
  EXPECT_EQ(message(ld), "");
  ld.loss_type = "sigmoid,aot";
  EXPECT_NE(message(ld).find("--ld_alpha cannot be combined with --loss_type aot"), std::string::npos) << message(ld);
  auto wpo = options("aot_unpaired", Opts{});
  wpo.use_weighting = true;
  EXPECT_NE(message(wpo).find("--use_weighting cannot be combined"), std::string::npos) << message(wpo);
  const auto terms = dpo::dpo_loss_terms(options("apo_zero,sft", Opts{}));
  ASSERT_EQ(terms.size(), 2u);
  EXPECT_EQ(terms[1].type, "sft");
  EXPECT_EQ(terms[1].weight, 1.0);
}

}  // namespace
