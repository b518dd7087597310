// ORPO and CPO / SimPO / AlphaPO formulas (core/orpo.h, core/cpo.h) against closed forms
// evaluated here in long double, independently of the code (no log1mexp branch, no
// torch), and their gradients against the closed-form derivative and central finite
// differences. Everything runs in fp64.
//
// Bounds (u = 2^-53, Higham ch. 3; ATen's fp64 exp / log1p / expm1 / log are Sleef u10
// or glibc, <= 1 ulp = 2u; we allow kExpUlps for exp anyway):
//  * log1mexp(x): log1p(-e^x) for x < -ln 2, log(-expm1 x) otherwise. Each branch is one
//    exp-like call (<= kExpUlps ulps) then one log-like call whose condition number is
//    |y / ((1 + y) log1p(y))| <= 1.45 (y = -e^x in (-1/2, 0)) or 1 / |log z| <= 1.45
//    (z = -expm1 x in (0, 1/2]): relative error <= (2 kExpUlps * 1.45 + 2 kLogUlps + 1) u.
//  * log_odds = (c - r) - (l(c) - l(r)): each of l(c), l(r) carries the error above, three
//    subtractions add u times their operands: |err| <= e_l (|l(c)| + |l(r)|) + 3u S,
//    S = |c| + |r| + |l(c)| + |l(r)|.
//  * the ORPO loss -beta log sigmoid(x) has slope beta sigmoid(-x) <= beta in x; its own
//    evaluation (exp, log1p, two multiplies) adds (2 kExpUlps + 6) u |loss|.
//  * CPO losses: the same slope argument; each input log-prob is exact (given), the
//    margin c - r adds u |c - r| (AlphaPO: exp and a divide per reward, kExpUlps + 3 ulps
//    of |r|), every loss evaluation (2 kExpUlps + 8) u |loss| + slope * input error.
//  * finite differences: central, step h: truncation <= h^2 |f'''| / 6 (|f'''| taken
//    from a second difference of the closed-form derivative, x 2 for its own error), and
//    rounding <= 2 e_f / (2h) with e_f the loss bound above.
#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/cpo.h"
#include "core/orpo.h"
#include "core/reference_free.h"
#include "tests/fp_bounds.h"

namespace dpo {
namespace {

using LD = long double;
constexpr double kU = 0x1p-53;
using testutil::kExpUlps;
using testutil::kLogUlps;

torch::Tensor t64(std::vector<double> v) { return torch::tensor(v, torch::kFloat64); }

// long double (64-bit mantissa) and the C library, not torch: the reference. Each form is
// used where it has no cancellation (log1p for e^x small, expm1 for x near 0); the
// switch point need not be the code's.
LD l1m(LD x) { return x < -1 ? std::log1p(-std::exp(x)) : std::log(-std::expm1(x)); }
LD logsig(LD x) { return -std::log1p(std::exp(-x)); }
LD sig(LD x) { return 1.0L / (1.0L + std::exp(-x)); }

const double kLogOneMinusExpRel = (2 * kExpUlps * 1.45 + 2 * kLogUlps + 1) * kU;

TEST(Orpo, Log1mexpMatchesClosedFormOnBothBranches) {
  const std::vector<double> xs{-40.0, -5.0, -1.0, -0.6931471805599453 - 1e-3, -0.6931471805599453 + 1e-3, -0.3,
                               -1e-3, -1e-9};
  const torch::Tensor got = log1mexp(t64(xs));
  for (size_t i = 0; i < xs.size(); ++i) {
    const LD want = l1m(xs[i]);
    EXPECT_NEAR(got[i].item<double>(), static_cast<double>(want), kLogOneMinusExpRel * std::fabs((double)want))
        << "x = " << xs[i];
  }
}

struct OrpoCase {
  double c, r, beta;
};
const std::vector<OrpoCase> kOrpo{{-0.3, -1.7, 0.1}, {-2.5, -0.9, 0.1}, {-0.05, -0.04, 1.0}, {-12.0, -3.0, 0.5},
                                  {-0.7, -0.69, 0.25}};

LD orpo_log_odds(LD c, LD r) { return (c - r) - (l1m(c) - l1m(r)); }
double orpo_loss_bound(const OrpoCase& k, LD loss) {
  const double lc = std::fabs((double)l1m(k.c)), lr = std::fabs((double)l1m(k.r));
  const double S = std::fabs(k.c) + std::fabs(k.r) + lc + lr;
  const double e_x = kLogOneMinusExpRel * (lc + lr) + 3 * kU * S;
  return k.beta * e_x + (2 * kExpUlps + 6) * kU * std::fabs((double)loss);
}

TEST(Orpo, LossLogOddsAndRewardsMatchClosedForm) {
  for (const auto& k : kOrpo) {
    const OrpoOutput o = orpo_loss(t64({k.c}), t64({k.r}), k.beta);
    const LD lo = orpo_log_odds(k.c, k.r);
    const LD loss = -k.beta * logsig(lo);  // ORPO Eq. (7) times lambda
    const double b = orpo_loss_bound(k, loss);
    EXPECT_NEAR(o.losses.item<double>(), (double)loss, b) << k.c << " " << k.r;
    const double lc = std::fabs((double)l1m(k.c)), lr = std::fabs((double)l1m(k.r));
    const double e_x = kLogOneMinusExpRel * (lc + lr) + 3 * kU * (std::fabs(k.c) + std::fabs(k.r) + lc + lr);
    EXPECT_NEAR(o.log_odds.item<double>(), (double)lo, e_x);
    EXPECT_NEAR(o.ratio.item<double>(), (double)logsig(lo), e_x + (2 * kExpUlps + 4) * kU * std::fabs((double)logsig(lo)));
    // rewards: beta * avg logps, one rounding
    EXPECT_NEAR(o.chosen_rewards.item<double>(), k.beta * k.c, kU * std::fabs(k.beta * k.c));
    EXPECT_NEAR(o.rejected_rewards.item<double>(), k.beta * k.r, kU * std::fabs(k.beta * k.r));
  }
  // A known point worked by hand: c = r gives log_odds 0, loss beta ln 2.
  const OrpoOutput z = orpo_loss(t64({-1.0}), t64({-1.0}), 0.1);
  EXPECT_EQ(z.log_odds.item<double>(), 0.0);
  EXPECT_NEAR(z.losses.item<double>(), 0.1 * std::log(2.0), 4 * kExpUlps * kU);
  EXPECT_THROW(orpo_loss(t64({-1.0}), t64({-1.0}), 0.0), std::runtime_error);
}

// d/dc [-beta log sigmoid(lo)] = -beta sigmoid(-lo) / (1 - e^c), d/dr = +beta sigmoid(-lo) / (1 - e^r).
LD orpo_dc(LD c, LD r, LD beta) { return -beta * sig(-orpo_log_odds(c, r)) / (1 - std::exp(c)); }
LD orpo_dr(LD c, LD r, LD beta) { return beta * sig(-orpo_log_odds(c, r)) / (1 - std::exp(r)); }

TEST(Orpo, GradientMatchesClosedFormAndFiniteDifferences) {
  for (const auto& k : kOrpo) {
    torch::Tensor c = t64({k.c}).requires_grad_(), r = t64({k.r}).requires_grad_();
    orpo_loss(c, r, k.beta).losses.sum().backward();
    const double gc = c.grad().item<double>(), gr = r.grad().item<double>();
    const LD wc = orpo_dc(k.c, k.r, k.beta), wr = orpo_dr(k.c, k.r, k.beta);
    // the autograd chain: ~12 roundings of its factors plus the exp/log calls, each relative
    const double rel = (4 * kExpUlps + 16) * kU;
    EXPECT_NEAR(gc, (double)wc, rel * std::fabs((double)wc) + 1e-300) << k.c << " " << k.r;
    EXPECT_NEAR(gr, (double)wr, rel * std::fabs((double)wr) + 1e-300);
    // central finite differences
    const double h = 1e-5, s = 1e-3;
    auto f = [&](double cc, double rr) { return orpo_loss(t64({cc}), t64({rr}), k.beta).losses.item<double>(); };
    const double fd_c = (f(k.c + h, k.r) - f(k.c - h, k.r)) / (2 * h);
    const double fd_r = (f(k.c, k.r + h) - f(k.c, k.r - h)) / (2 * h);
    const double d3c = std::fabs((double)((orpo_dc(k.c + s, k.r, k.beta) - 2 * wc + orpo_dc(k.c - s, k.r, k.beta)) / (s * s)));
    const double d3r = std::fabs((double)((orpo_dr(k.c, k.r + s, k.beta) - 2 * wr + orpo_dr(k.c, k.r - s, k.beta)) / (s * s)));
    const double e_f = orpo_loss_bound(k, -k.beta * logsig(orpo_log_odds(k.c, k.r))) + 4 * kU;
    EXPECT_NEAR(fd_c, (double)wc, 2 * h * h * d3c / 6 + 2 * e_f / (2 * h)) << k.c << " " << k.r;
    EXPECT_NEAR(fd_r, (double)wr, 2 * h * h * d3r / 6 + 2 * e_f / (2 * h)) << k.c << " " << k.r;
  }
}

// ---- CPO -------------------------------------------------------------------------------

LD cpo_closed(const CpoOptions& o, LD c, LD r) {
  if (o.alpha != 0) {
    c = (1 - std::pow(std::exp(c), (LD)-o.alpha)) / o.alpha;  // AlphaPO: (1 - p^-alpha) / alpha
    r = (1 - std::pow(std::exp(r), (LD)-o.alpha)) / o.alpha;
  }
  LD m = c - r;
  const LD b = o.beta, ls = o.label_smoothing;
  if (o.loss_type == "simpo") m -= o.simpo_gamma / b;
  if (o.loss_type == "sigmoid" || o.loss_type == "simpo") return -logsig(b * m) * (1 - ls) - logsig(-b * m) * ls;
  if (o.loss_type == "hinge") return std::max((LD)0, 1 - b * m);
  if (o.loss_type == "ipo") return (m - 1 / (2 * b)) * (m - 1 / (2 * b));
  return NAN;
}

std::vector<CpoOptions> cpo_cases() {
  std::vector<CpoOptions> v;
  auto add = [&](std::string t, double beta, double ls, double gamma, double alpha) {
    CpoOptions o;
    o.loss_type = std::move(t);
    o.beta = beta;
    o.label_smoothing = ls;
    o.simpo_gamma = gamma;
    o.alpha = alpha;
    v.push_back(o);
  };
  add("sigmoid", 0.1, 0.0, 0.5, 0.0);
  add("sigmoid", 0.5, 0.2, 0.5, 0.0);
  add("hinge", 0.1, 0.0, 0.5, 0.0);
  add("ipo", 0.5, 0.0, 0.5, 0.0);
  add("simpo", 2.0, 0.0, 0.5, 0.0);
  add("simpo", 2.5, 0.1, 1.2, 0.0);
  add("simpo", 2.0, 0.0, 0.5, 0.25);   // alphapo's formula
  add("sigmoid", 0.1, 0.0, 0.5, -0.3);  // alpha works with every loss type
  return v;
}

double cpo_bound(const CpoOptions& o, LD c, LD r, LD loss) {
  // input error of the margin m, then slope * e_m + the loss's own evaluation
  double e_m = kU * (std::fabs((double)c) + std::fabs((double)r));
  double mag = std::fabs((double)(c - r));
  if (o.alpha != 0) {
    const double rc = std::fabs((double)((1 - std::exp(-o.alpha * c)) / o.alpha)), rr = std::fabs((double)((1 - std::exp(-o.alpha * r)) / o.alpha));
    const double ec = std::exp(-o.alpha * (double)c) / std::fabs(o.alpha), er = std::exp(-o.alpha * (double)r) / std::fabs(o.alpha);
    e_m = (kExpUlps * 2 + 3) * kU * (ec + er + rc + rr) + kU * std::fabs(o.alpha * (double)c) * ec * 2 +
          kU * std::fabs(o.alpha * (double)r) * er * 2;
    mag = rc + rr;
  }
  e_m += kU * (mag + std::fabs(o.simpo_gamma / o.beta));
  double slope = o.beta;  // sigmoid, simpo, hinge
  if (o.loss_type == "ipo") slope = 2 * std::fabs((double)(c - r) - 1 / (2 * o.beta)) + 1;
  return slope * e_m + (2 * kExpUlps + 8) * kU * std::fabs((double)loss) + 4 * kU;
}

TEST(Cpo, EveryLossTypeMatchesClosedForm) {
  const std::vector<double> cs{-0.4, -1.3, -2.0}, rs{-1.1, -0.6, -2.0};
  for (const auto& o : cpo_cases()) {
    validate_cpo_options(o);
    const CpoOutput out = cpo_loss(t64(cs), t64(rs), o);
    for (size_t i = 0; i < cs.size(); ++i) {
      const LD want = cpo_closed(o, cs[i], rs[i]);
      EXPECT_NEAR(out.losses[i].item<double>(), (double)want, cpo_bound(o, cs[i], rs[i], want))
          << o.loss_type << " alpha " << o.alpha << " pair " << i;
      const LD rc = o.alpha != 0 ? (1 - std::exp(-o.alpha * (LD)cs[i])) / o.alpha : (LD)cs[i];
      EXPECT_NEAR(out.chosen_rewards[i].item<double>(), (double)(o.beta * rc),
                  (2 * kExpUlps + 4) * kU * std::fabs((double)(o.beta * rc)) + 1e-300);
    }
  }
  // Hand-worked points: sigmoid at equal log-probs is ln 2; ipo at margin 0 is 1/(2 beta)^2;
  // simpo at equal averages is -log sigmoid(-gamma) = log(1 + e^gamma).
  CpoOptions o;
  EXPECT_NEAR(cpo_loss(t64({-1.0}), t64({-1.0}), o).losses.item<double>(), std::log(2.0), 4 * kExpUlps * kU);
  o.loss_type = "ipo";
  o.beta = 0.5;
  EXPECT_EQ(cpo_loss(t64({-1.0}), t64({-1.0}), o).losses.item<double>(), 1.0);
  o.loss_type = "simpo";
  o.beta = 2.0;
  EXPECT_NEAR(cpo_loss(t64({-1.0}), t64({-1.0}), o).losses.item<double>(), std::log1p(std::exp(0.5)), 4 * kExpUlps * kU);
}

TEST(Cpo, GradientsMatchFiniteDifferences) {
  const double c0 = -0.8, r0 = -1.4, h = 1e-5;
  for (const auto& o : cpo_cases()) {
    if (o.loss_type == "hinge") continue;  // piecewise linear: its slope is -beta or 0, checked below
    torch::Tensor c = t64({c0}).requires_grad_(), r = t64({r0}).requires_grad_();
    cpo_loss(c, r, o).losses.sum().backward();
    auto f = [&](LD cc, LD rr) { return cpo_closed(o, cc, rr); };
    // derivative of the long-double closed form by a tiny central step (its rounding is
    // 2^-64 / h): the reference; the code's gradient within the chain's relative rounding.
    const LD k = 1e-7L;
    const LD dc = (f(c0 + k, r0) - f(c0 - k, r0)) / (2 * k), dr = (f(c0, r0 + k) - f(c0, r0 - k)) / (2 * k);
    const double trunc = 1e-12;  // k^2 |f'''| / 6 with |f'''| < 10^2 for these smooth losses at |m| < 3
    const double rel = (4 * kExpUlps + 16) * kU;
    EXPECT_NEAR(c.grad().item<double>(), (double)dc, rel * std::fabs((double)dc) + trunc + 1e-18L / k) << o.loss_type << " " << o.alpha;
    EXPECT_NEAR(r.grad().item<double>(), (double)dr, rel * std::fabs((double)dr) + trunc + 1e-18L / k) << o.loss_type << " " << o.alpha;
    // and the fp64 code's own central differences
    auto g = [&](double cc, double rr) { return cpo_loss(t64({cc}), t64({rr}), o).losses.item<double>(); };
    const double e_f = cpo_bound(o, c0, r0, f(c0, r0));
    EXPECT_NEAR((g(c0 + h, r0) - g(c0 - h, r0)) / (2 * h), (double)dc, 1e2 * h * h / 6 + e_f / h) << o.loss_type;
  }
  CpoOptions hinge;
  hinge.loss_type = "hinge";
  torch::Tensor c = t64({-0.8}).requires_grad_(), r = t64({-1.4}).requires_grad_();
  cpo_loss(c, r, hinge).losses.sum().backward();  // 1 - 0.1 * 0.6 > 0: the linear piece
  EXPECT_EQ(c.grad().item<double>(), -0.1);
  EXPECT_EQ(r.grad().item<double>(), 0.1);
}

TEST(Cpo, OptionsResolveAndValidate) {
  CpoOptions a;
  a.loss_type = "alphapo";
  const CpoOptions r = cpo_resolve(a);
  EXPECT_EQ(r.loss_type, "simpo");
  EXPECT_EQ(r.cpo_alpha, 0.0);
  EXPECT_TRUE(cpo_averages_logps("simpo"));
  EXPECT_TRUE(cpo_averages_logps("ipo"));
  EXPECT_TRUE(cpo_averages_logps("alphapo"));
  EXPECT_FALSE(cpo_averages_logps("sigmoid"));
  EXPECT_FALSE(cpo_averages_logps("hinge"));
  CpoOptions bad;
  bad.loss_type = "robust";
  EXPECT_THROW(validate_cpo_options(bad), std::runtime_error);
  bad.loss_type = "hinge";
  bad.label_smoothing = 0.1;
  EXPECT_THROW(validate_cpo_options(bad), std::runtime_error);
  bad = CpoOptions{};
  bad.beta = 0;
  EXPECT_THROW(validate_cpo_options(bad), std::runtime_error);
  bad = CpoOptions{};
  bad.cpo_alpha = -1;
  EXPECT_THROW(validate_cpo_options(bad), std::runtime_error);
}

TEST(RefFreeMetrics, AveragesUnderTrlNames) {
  RefFreeMetrics m;
  m.batches = 2;
  m.pairs = 4;
  m.loss_sum = 3;
  m.rewards_chosen_sum = -0.4;
  m.rewards_rejected_sum = -0.8;
  m.rewards_accuracies_sum = 3;
  m.rewards_margins_sum = 0.4;
  m.logps_chosen_sum = -4;
  m.logps_rejected_sum = -8;
  m.logits_chosen_sum = 0.2;
  m.logits_rejected_sum = 0.4;
  m.nll_sum = 5;
  m.log_odds_ratio_sum = -2;
  m.log_odds_chosen_sum = 6;
  RefFreeMetrics twice = m;
  twice += RefFreeMetrics::from_vector(m.to_vector());
  auto orpo = twice.averages("eval_", true);
  std::map<std::string, double> v(orpo.begin(), orpo.end());
  EXPECT_EQ(v.size(), 12u);
  EXPECT_EQ(v.at("eval_loss"), 1.5);
  EXPECT_EQ(v.at("eval_rewards/chosen"), -0.1);
  EXPECT_EQ(v.at("eval_rewards/accuracies"), 0.75);
  EXPECT_EQ(v.at("eval_rewards/margins"), 0.1);
  EXPECT_EQ(v.at("eval_logps/rejected"), -2);
  EXPECT_EQ(v.at("eval_logits/chosen"), 0.1);
  EXPECT_EQ(v.at("eval_nll_loss"), 2.5);
  EXPECT_EQ(v.at("eval_log_odds_ratio"), -0.5);
  EXPECT_EQ(v.at("eval_log_odds_chosen"), 1.5);
  EXPECT_EQ(m.averages("", false).size(), 10u);
  EXPECT_TRUE(RefFreeMetrics{}.averages("", true).empty());
  EXPECT_THROW(RefFreeMetrics::from_vector({1, 2}), std::runtime_error);
}

}  // namespace
}  // namespace dpo
