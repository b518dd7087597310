// sequence_logps, the DPO losses, their metrics and the SFT loss, against naive
// double-precision loops, formulas evaluated by hand (TRL's dpo_loss written out),
// and finite differences. fp32 results are compared within bounds derived from their
// operations (tests/fp_bounds.h): per row, the log-softmax of each scored position and the
// sum over the row, then what each loss and metric does with those log-probs.
#include <cmath>
#include <map>
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

std::vector<double> to_vec(const Tensor& t) {
  Tensor c = t.detach().to(torch::kCPU, torch::kDouble).contiguous().reshape({-1});
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

// Per-row statistics of the answer tokens, written out in double: token t is scored
// with the logits at t - 1.
struct Naive {
  std::vector<double> logp, mean_logit_sum;  // mean_logit_sum: sum over positions of the V-mean
  std::vector<int64_t> count;
};

Naive naive_logps(const Tensor& logits, const Tensor& ids, const Tensor& mask) {
  Tensor L = logits.detach().to(torch::kCPU, torch::kDouble).contiguous();
  Tensor I = ids.to(torch::kCPU, torch::kLong).contiguous();
  Tensor M = mask.to(torch::kCPU, torch::kDouble).contiguous();
  const int64_t R = L.size(0), T = L.size(1), V = L.size(2);
  auto l = L.accessor<double, 3>();
  auto id = I.accessor<int64_t, 2>();
  auto m = M.accessor<double, 2>();
  Naive n;
  n.logp.assign(R, 0.0);
  n.mean_logit_sum.assign(R, 0.0);
  n.count.assign(R, 0);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t t = 1; t < T; ++t) {
      if (m[r][t] == 0) continue;
      double mx = -INFINITY, s = 0, sum = 0;
      for (int64_t v = 0; v < V; ++v) mx = std::max(mx, l[r][t - 1][v]);
      for (int64_t v = 0; v < V; ++v) s += std::exp(l[r][t - 1][v] - mx), sum += l[r][t - 1][v];
      n.logp[r] += l[r][t - 1][id[r][t]] - (mx + std::log(s));
      n.mean_logit_sum[r] += sum / V;
      n.count[r] += 1;
    }
  }
  return n;
}

struct Batch {
  Tensor logits;  // (R, T, V)
  Tensor ids;     // (R, T)
  Tensor mask;    // (R, T)
};

// Rows laid out as collate does: [prompt | answer | padding]; padding ids are -100 (a
// value no kernel may read). Row 1 has no answer tokens at all.
Batch random_batch(int64_t R, int64_t T, int64_t V, uint64_t seed, torch::ScalarType dtype = torch::kFloat,
                   double scale = 3.0) {
  torch::manual_seed(seed);
  Batch b;
  b.logits = (torch::randn({R, T, V}, torch::kDouble) * scale).to(dtype);
  b.ids = torch::randint(0, V, {R, T}, torch::kLong);
  b.mask = torch::zeros({R, T}, torch::kLong);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t prompt = 1 + torch::randint(0, std::max<int64_t>(1, T / 2), {1}).item<int64_t>();
    const int64_t answer = r == 1 ? 0 : 1 + torch::randint(0, T - prompt, {1}).item<int64_t>();
    for (int64_t t = prompt; t < prompt + answer; ++t) b.mask[r][t] = 1;
    for (int64_t t = prompt + answer; t < T; ++t) b.ids[r][t] = -100;
  }
  return b;
}

// Marks token t of row r as an answer token (a valid id), e.g. for row 1 that has none.
void add_answer_token(Batch& b, int64_t r, int64_t t) {
  b.mask[r][t] = 1;
  b.ids[r][t] = 1;
}

void expect_close(const std::vector<double>& a, const std::vector<double>& b, double rtol, double atol,
                  const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], atol + rtol * std::abs(b[i])) << what << " [" << i << "]";
}

// |a[i] - b[i]| <= bound[i]
void expect_within(const std::vector<double>& a, const std::vector<double>& b, const std::vector<double>& bound,
                   const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  ASSERT_EQ(a.size(), bound.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], bound[i]) << what << " [" << i << "]";
}

constexpr double kU = 0x1p-24;  // fp32 unit roundoff

// Per row, bounds on |fp32 sequence_logps - exact| (either kernel): each scored position's
// log-softmax and the row's sum (tests/fp_bounds.h, gathered_logp_sum_bound); and on the
// mean logit: the row's n V logits summed in any order and divided by V and by n,
// gamma(n V + 2) mean |x|.
struct LogpsBounds {
  std::vector<double> logps, mean_logits;
};
LogpsBounds logps_bounds(const Tensor& logits, const Tensor& ids, const Tensor& mask) {
  const Tensor L = logits.detach().to(torch::kCPU, torch::kDouble);
  const int64_t R = L.size(0), T = L.size(1), V = L.size(2);
  std::vector<int64_t> pos, tok, seq;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t t = 1; t < T; ++t)
      if (mask[r][t].item<double>() != 0) {
        pos.push_back(r * T + t - 1);
        tok.push_back(ids[r][t].item<int64_t>());
        seq.push_back(r);
      }
  const Tensor rows = L.reshape({R * T, V}).index_select(0, torch::tensor(pos, torch::kLong));
  LogpsBounds b;
  b.logps = to_vec(dpo::testutil::gathered_logp_sum_bound(rows, torch::tensor(tok, torch::kLong),
                                                           torch::tensor(seq, torch::kLong), R));
  const Tensor abs_mean = torch::zeros({R}, torch::kDouble).index_add(0, torch::tensor(seq, torch::kLong), rows.abs().mean(1));
  const Tensor n = torch::zeros({R}, torch::kDouble).index_add(0, torch::tensor(seq, torch::kLong),
                                                                 torch::ones({static_cast<int64_t>(seq.size())}, torch::kDouble));
  const Tensor k = n * V + 2;
  b.mean_logits = to_vec(torch::where(n > 0, abs_mean / n.clamp_min(1) * k * kU / (1 - k * kU), torch::zeros_like(n)));
  return b;
}

// The fp32 evaluation error of a pair's loss from given log-probs: the log-ratio l from four
// log-probs (three subtractions: 3u sum |logp|), scaled by beta, then at most a log-sigmoid
// or sigmoid (an exp within kExpUlps, a log1p within kLogUlps), a label-smoothing mix and a
// product or two: (2 kExpUlps + 2 kLogUlps + 8) u (1 + |loss|) covers those roundings on
// values of magnitude <= 1 + |loss|.
double pair_loss_rounding(double beta, double pc, double pr, double rc, double rr, double loss) {
  using dpo::testutil::kExpUlps;
  using dpo::testutil::kLogUlps;
  return beta * 3 * kU * (std::abs(pc) + std::abs(pr) + std::abs(rc) + std::abs(rr)) +
         (2 * kExpUlps + 2 * kLogUlps + 8) * kU * (1 + std::abs(loss));
}

std::map<std::string, double> as_map(const std::vector<std::pair<std::string, double>>& v) {
  return std::map<std::string, double>(v.begin(), v.end());
}

dpo::DpoOptions options(const std::string& type, double beta = 0.1, double ls = 0.0, double rpo = 0.0) {
  dpo::DpoOptions o;
  o.loss_type = type;
  o.beta = beta;
  o.label_smoothing = ls;
  o.rpo_alpha = rpo;
  return o;
}

// TRL's dpo_loss for one pair, from its source, in double.
double trl_pair_loss(const dpo::DpoOptions& o, double pc, double pr, double rc, double rr) {
  const double l = (pc - pr) - (rc - rr), b = o.beta, ls = o.label_smoothing;
  if (o.loss_type == "sigmoid") return -log_sigmoid(b * l) * (1 - ls) - log_sigmoid(-b * l) * ls;
  if (o.loss_type == "robust") return (-log_sigmoid(b * l) * (1 - ls) + log_sigmoid(-b * l) * ls) / (1 - 2 * ls);
  if (o.loss_type == "hinge") return std::max(0.0, 1 - b * l);
  return std::pow(l - 1 / (2 * b), 2);  // ipo
}

}  // namespace

// ---- sequence_logps ---------------------------------------------------------------

TEST(SequenceLogps, MatchesNaiveDoubleLoopBothKernels) {
  Batch b = random_batch(5, 9, 11, 7);
  b.mask[3][0] = 1;  // position 0 has no predecessor: must be ignored
  const Naive n = naive_logps(b.logits, b.ids, b.mask);
  const LogpsBounds bound = logps_bounds(b.logits, b.ids, b.mask);
  for (auto k : {dpo::detail::LogpsKernel::cpu_loop, dpo::detail::LogpsKernel::aten}) {
    const auto s = dpo::detail::sequence_logps(b.logits, b.ids, b.mask, k);
    EXPECT_EQ(s.logps.scalar_type(), torch::kFloat);
    expect_within(to_vec(s.logps), n.logp, bound.logps, "logps");
    std::vector<double> mean(n.count.size());
    for (size_t r = 0; r < mean.size(); ++r) mean[r] = n.count[r] ? n.mean_logit_sum[r] / n.count[r] : 0.0;
    expect_within(to_vec(s.mean_logits), mean, bound.mean_logits, "mean_logits");
    std::vector<double> counts(n.count.begin(), n.count.end());
    expect_close(to_vec(s.token_counts), counts, 0, 0, "token_counts");  // integers: exact
    EXPECT_EQ(s.token_counts.scalar_type(), torch::kLong);
    EXPECT_EQ(s.logps[1].item<double>(), 0.0);  // row without answer tokens
    EXPECT_EQ(s.mean_logits[1].item<double>(), 0.0);
  }
}

TEST(SequenceLogps, Bf16LogitsAreUpcast) {
  Batch b = random_batch(4, 12, 40, 8, torch::kBFloat16);
  const Naive n = naive_logps(b.logits, b.ids, b.mask);  // of the bf16-rounded values
  const LogpsBounds bound = logps_bounds(b.logits, b.ids, b.mask);  // upcast exactly, then fp32
  for (auto k : {dpo::detail::LogpsKernel::cpu_loop, dpo::detail::LogpsKernel::aten}) {
    const auto s = dpo::detail::sequence_logps(b.logits, b.ids, b.mask, k);
    EXPECT_EQ(s.logps.scalar_type(), torch::kFloat);
    expect_within(to_vec(s.logps), n.logp, bound.logps, "bf16 logps");
  }
}

TEST(SequenceLogps, GradientIsOneHotMinusSoftmaxAndKernelsAgree) {
  Batch b = random_batch(4, 7, 6, 9, torch::kDouble);
  const Tensor w = torch::tensor({0.5, -1.0, 2.0, 0.25}, torch::kDouble);
  std::vector<Tensor> grads;
  for (auto k : {dpo::detail::LogpsKernel::cpu_loop, dpo::detail::LogpsKernel::aten}) {
    Tensor x = b.logits.clone().set_requires_grad(true);
    auto s = dpo::detail::sequence_logps(x, b.ids, b.mask, k);
    (s.logps * w).sum().backward();
    grads.push_back(x.grad());
  }
  // Closed form: w_r * ([v == id[r][t]] - softmax(x[r][t-1])_v) at scored positions, else 0
  // (exact zeros on both sides). Each side's softmax in fp64 is within softmax_error_bound,
  // and 1 - p and the product by w_r round once each: |w| (2 softmax bound + 4u) between them.
  Tensor expected = torch::zeros_like(b.logits);
  Tensor bound = torch::zeros_like(b.logits);
  Tensor sm = torch::softmax(b.logits, -1);
  const Tensor sm_err = dpo::testutil::softmax_error_bound(b.logits, -1, torch::kDouble);
  const double u64 = dpo::testutil::unit_roundoff(torch::kDouble);
  for (int64_t r = 0; r < 4; ++r) {
    for (int64_t t = 1; t < 7; ++t) {
      if (b.mask[r][t].item<int64_t>() == 0) continue;
      Tensor row = -sm[r][t - 1] * w[r];
      row[b.ids[r][t].item<int64_t>()] += w[r];
      expected[r][t - 1] = row;
      bound[r][t - 1] = w[r].abs() * (2 * sm_err[r][t - 1] + 4 * u64);
    }
  }
  dpo::testutil::expect_within(grads[0], expected, bound, "cpu_loop grad");
  dpo::testutil::expect_within(grads[1], expected, bound, "aten grad");
}

TEST(SequenceLogps, Fp32GradientOfFastLoopMatchesClosedForm) {
  // fp32 takes the vectorized exp path in both directions; V spans several chunks.
  Batch b = random_batch(3, 6, 1100, 19);
  const Tensor w = torch::tensor({1.5f, 2.0f, -0.5f});
  Tensor x = b.logits.clone().set_requires_grad(true);
  auto s = dpo::detail::sequence_logps(x, b.ids, b.mask, dpo::detail::LogpsKernel::cpu_loop);
  (s.logps * w).sum().backward();
  Tensor ld = b.logits.to(torch::kDouble);
  Tensor sm = torch::softmax(ld, -1);
  Tensor expected = torch::zeros_like(ld);
  // The fp32 gradient w (onehot - p): p within softmax_error_bound (fp32, V = 1100), 1 - p
  // and the product by w rounding once each (2u |w|); the fp64 closed form's own error is
  // below 1e-9 of that.
  Tensor bound = torch::zeros_like(ld);
  const Tensor sm_err = dpo::testutil::softmax_error_bound(ld, -1);
  for (int64_t r = 0; r < 3; ++r) {
    for (int64_t t = 1; t < 6; ++t) {
      if (b.mask[r][t].item<int64_t>() == 0) continue;
      Tensor row = -sm[r][t - 1] * w[r].item<double>();
      row[b.ids[r][t].item<int64_t>()] += w[r].item<double>();
      expected[r][t - 1] = row;
      bound[r][t - 1] = std::abs(w[r].item<double>()) * (sm_err[r][t - 1] + 2 * kU);
    }
  }
  dpo::testutil::expect_within(x.grad(), expected, bound, "grad");
  const Naive n = naive_logps(b.logits, b.ids, b.mask);
  expect_within(to_vec(s.logps), n.logp, logps_bounds(b.logits, b.ids, b.mask).logps, "fp32 logps, V = 1100");
}

TEST(SequenceLogps, NonFiniteLogitsFollowLogSoftmax) {
  Batch b = random_batch(2, 5, 40, 20);
  add_answer_token(b, 1, 3);
  // -inf logits (a masked-out vocabulary entry) are fine: exp(-inf) = 0.
  b.logits.select(2, 7).fill_(-INFINITY);
  b.ids.masked_fill_(b.ids.eq(7), 8);
  auto s = dpo::sequence_logps(b.logits, b.ids, b.mask);
  EXPECT_TRUE(torch::isfinite(s.logps).all().item<bool>());
  Tensor ls = torch::log_softmax(b.logits.to(torch::kDouble), -1);
  double want = 0;
  for (int64_t t = 1; t < 5; ++t) {
    if (b.mask[0][t].item<int64_t>()) want += ls[0][t - 1][b.ids[0][t].item<int64_t>()].item<double>();
  }
  EXPECT_NEAR(s.logps[0].item<double>(), want, logps_bounds(b.logits, b.ids, b.mask).logps[0]);
  // A NaN logit where a token is scored makes that row NaN, never a silent number.
  b.logits[1][2][0] = NAN;
  s = dpo::sequence_logps(b.logits, b.ids, b.mask);
  EXPECT_TRUE(std::isnan(s.logps[1].item<double>()));
}

TEST(SequenceLogps, LongSequencesAndHugeLogitsStayFinite) {
  Batch b = random_batch(3, 2048, 64, 10, torch::kFloat, 60.0);
  b.mask.fill_(1);  // the whole row is an answer: 2047 scored tokens
  b.ids = torch::randint(0, 64, {3, 2048}, torch::kLong);
  b.mask[1].fill_(0);  // and one row with none
  Tensor x = b.logits.clone().set_requires_grad(true);
  auto s = dpo::sequence_logps(x, b.ids, b.mask);
  EXPECT_TRUE(torch::isfinite(s.logps).all().item<bool>());
  EXPECT_EQ(s.logps[1].item<double>(), 0.0);
  const Naive n = naive_logps(b.logits, b.ids, b.mask);
  expect_within(to_vec(s.logps), n.logp, logps_bounds(b.logits, b.ids, b.mask).logps, "long logps");
  s.logps.sum().backward();
  EXPECT_TRUE(torch::isfinite(x.grad()).all().item<bool>());
  EXPECT_EQ(x.grad()[1].abs().sum().item<double>(), 0.0);
}

TEST(SequenceLogps, RejectsBadInputs) {
  Batch b = random_batch(2, 5, 4, 11);
  EXPECT_THROW(dpo::sequence_logps(b.logits[0], b.ids, b.mask), std::runtime_error);
  EXPECT_THROW(dpo::sequence_logps(b.logits, b.ids.narrow(1, 0, 4), b.mask), std::runtime_error);
  EXPECT_THROW(dpo::sequence_logps(b.logits, b.ids.to(torch::kFloat), b.mask), std::runtime_error);
  Tensor ids = b.ids.clone();
  Tensor mask = torch::zeros_like(b.mask);
  mask[1][3] = 1;
  ids[1][3] = 4;  // == V: outside the vocabulary at an answer token
  try {
    dpo::sequence_logps(b.logits, ids, mask);
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("input_ids[1][3]"), std::string::npos) << e.what();
  }
}

TEST(SequenceLogps, HelpersAverageAndNll) {
  Tensor lp = torch::tensor({-6.0, 0.0, -3.0});
  Tensor n = torch::tensor({3, 0, 2}, torch::kLong);
  // Exact: a correctly rounded division whose results are representable.
  expect_close(to_vec(dpo::average_by_length(lp, n)), {-2.0, 0.0, -1.5}, 0, 0, "average_by_length");
  // The sum -9 is exact, 9 / 5 rounds once in fp32.
  EXPECT_NEAR(dpo::token_mean_nll(lp, n).item<double>(), 9.0 / 5.0, kU * 9.0 / 5.0);
  EXPECT_EQ(dpo::token_mean_nll(torch::zeros({2}), torch::zeros({2}, torch::kLong)).item<double>(), 0.0);
}

// ---- dpo_loss -----------------------------------------------------------------------

TEST(DpoLoss, EveryLossTypeMatchesTrlFormulas) {
  const std::vector<double> pc{-10.0, -20.5, -3.0, -7.25}, pr{-12.0, -19.0, -3.5, -7.0};
  const std::vector<double> rc{-11.0, -20.0, -3.2, -7.25}, rr{-11.5, -19.5, -3.1, -7.0};
  auto T = [](const std::vector<double>& v) { return torch::tensor(v, torch::kDouble); };
  const std::vector<dpo::DpoOptions> cases{options("sigmoid", 0.1),         options("sigmoid", 0.5, 0.1),
                                           options("sigmoid", 2.0, 0.3),    options("robust", 0.1, 0.2),
                                           options("robust", 0.3),          options("hinge", 0.1),
                                           options("hinge", 3.0),           options("ipo", 0.1),
                                           options("ipo", 0.7)};
  for (const auto& o : cases) {
    const auto out = dpo::dpo_loss(T(pc), T(pr), T(rc), T(rr), o);
    std::vector<double> want, cr, rj;
    for (size_t i = 0; i < pc.size(); ++i) {
      want.push_back(trl_pair_loss(o, pc[i], pr[i], rc[i], rr[i]));
      cr.push_back(o.beta * (pc[i] - rc[i]));
      rj.push_back(o.beta * (pr[i] - rr[i]));
    }
    const std::string what = o.loss_type + " beta " + std::to_string(o.beta) + " ls " + std::to_string(o.label_smoothing);
    // fp64 both sides: <= 12 operations, each within 1 ulp (2u), on log-ratios formed from
    // log-probs <= 20.5 (cancellation: 4 * 20.5 u absolute, times beta <= 3 and the loss's
    // slope <= 2 |l - 1/(2 beta)| <= 11 for ipo): < 2e3 u = 2.5e-13 (1 + |loss|); 1e-12 (1 + |loss|).
    expect_close(to_vec(out.losses), want, 1e-12, 1e-12, what);
    expect_close(to_vec(out.chosen_rewards), cr, 1e-12, 1e-12, what + " chosen rewards");
    expect_close(to_vec(out.rejected_rewards), rj, 1e-12, 1e-12, what + " rejected rewards");
  }
  // A spot value worked on paper: sigmoid, beta 0.1, pair 0: l = 2 - 0.5 = 1.5,
  // loss = log(1 + exp(-0.15)).
  const auto out = dpo::dpo_loss(T(pc), T(pr), T(rc), T(rr), options("sigmoid"));
  // fp64: l = 1.5 is exact, 0.1 * 1.5 rounds once, then exp and log1p (1 ulp each, of
  // relative condition < 1 here) and a product or two on each side: gamma(8) per side.
  const double want = std::log(1 + std::exp(-0.15));
  EXPECT_NEAR(out.losses[0].item<double>(), want, 2 * dpo::testutil::gamma(8, torch::kDouble) * want);
  // ipo, beta 0.1, pair 0: (1.5 - 5)^2 = 12.25. 1 / (2 * 0.1) rounds (2u of 5), the
  // difference -3.5 (u), the square (u): |d| <= 2 * 3.5 * (10u + 3.5u) + 12.25u < 120u.
  const auto ipo = dpo::dpo_loss(T(pc), T(pr), T(rc), T(rr), options("ipo"));
  EXPECT_NEAR(ipo.losses[0].item<double>(), 12.25, 120 * dpo::testutil::unit_roundoff(torch::kDouble));
}

TEST(DpoLoss, RewardsAreDetached) {
  Tensor pc = torch::tensor({-1.0, -2.0}, torch::kDouble).set_requires_grad(true);
  Tensor pr = torch::tensor({-1.5, -2.5}, torch::kDouble).set_requires_grad(true);
  const auto out = dpo::dpo_loss(pc, pr, torch::zeros({2}), torch::zeros({2}), options("sigmoid"));
  EXPECT_TRUE(out.losses.requires_grad());
  EXPECT_FALSE(out.chosen_rewards.requires_grad());
  EXPECT_FALSE(out.rejected_rewards.requires_grad());
  EXPECT_EQ(out.chosen_rewards.scalar_type(), torch::kDouble);  // ref converted to the policy dtype
}

TEST(DpoLoss, OptionValidation) {
  auto message = [](const dpo::DpoOptions& o) {
    try {
      dpo::validate_dpo_options(o);
    } catch (const std::runtime_error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  const std::string unknown = message(options("kto_pair"));
  EXPECT_NE(unknown.find("--loss_type"), std::string::npos);
  EXPECT_NE(unknown.find("sigmoid, ipo, hinge, robust"), std::string::npos) << unknown;
  EXPECT_NE(message(options("sigmoid", 0.1, 0.5)).find("--label_smoothing"), std::string::npos);
  EXPECT_NE(message(options("robust", 0.1, -0.1)).find("--label_smoothing"), std::string::npos);
  EXPECT_NE(message(options("hinge", 0.1, 0.1)).find("--label_smoothing"), std::string::npos);
  EXPECT_NE(message(options("ipo", 0.1, 0.1)).find("--label_smoothing"), std::string::npos);
  EXPECT_NE(message(options("sigmoid", 0.0)).find("--beta"), std::string::npos);
  EXPECT_NE(message(options("sigmoid", 0.1, 0.0, -1.0)).find("--rpo_alpha"), std::string::npos);
  EXPECT_EQ(message(options("robust", 0.1, 0.49, 1.0)), "");
}

// ---- dpo_batch_loss -------------------------------------------------------------------

TEST(DpoBatchLoss, PolicyEqualsReferenceIsExactlyLn2WithZeroRewards) {
  Batch b = random_batch(8, 16, 32, 12);
  add_answer_token(b, 1, 8);  // every row has answer tokens here
  const Tensor ref = dpo::sequence_logps(b.logits, b.ids, b.mask).logps.detach();
  Tensor x = b.logits.clone().set_requires_grad(true);
  const auto out = dpo::dpo_batch_loss(x, b.ids, b.mask, ref, options("sigmoid"));
  // Exact zeros: the policy's log-probs are the reference's bit for bit (the same kernel on
  // the same logits), so every log-ratio is 0. The loss -log sigmoid(0) = log1p(exp(0)):
  // exp(0) = 1 exactly, log1p within 1 ulp (2u), then the mean of 8 equal values (7
  // additions): gamma(9) ln 2.
  const double ln2_bound = dpo::testutil::gamma(9) * std::log(2.0);
  EXPECT_NEAR(out.loss.item<float>(), std::log(2.0), ln2_bound);
  const auto m = as_map(out.metrics.averages());
  EXPECT_EQ(m.at("rewards/chosen"), 0.0);
  EXPECT_EQ(m.at("rewards/rejected"), 0.0);
  EXPECT_EQ(m.at("rewards/margins"), 0.0);
  EXPECT_EQ(m.at("rewards/accuracies"), 0.0);  // TRL: chosen > rejected, strictly
  EXPECT_NEAR(m.at("loss"), std::log(2.0), ln2_bound);
}

TEST(DpoBatchLoss, MetricsFollowTrlDefinitions) {
  const int64_t B = 3;
  Batch b = random_batch(2 * B, 10, 13, 13);
  const Tensor ref = torch::randn({2 * B}, torch::kDouble) * 2 - 15;
  const auto o = options("sigmoid", 0.2, 0.1, 0.5);
  const auto out = dpo::dpo_batch_loss(b.logits, b.ids, b.mask, ref, o);
  const Naive n = naive_logps(b.logits, b.ids, b.mask);
  const auto r = to_vec(ref);
  double loss = 0, rc = 0, rr = 0, acc = 0, margin = 0, lc = 0, lr = 0, logit_c = 0, logit_r = 0;
  double tc = 0, tr = 0, nll_sum = 0;
  for (int64_t i = 0; i < B; ++i) nll_sum -= n.logp[i], tc += n.count[i];
  for (int64_t i = B; i < 2 * B; ++i) tr += n.count[i];
  const double nll = nll_sum / tc;
  for (int64_t i = 0; i < B; ++i) {
    const double pc = n.logp[i], pr = n.logp[B + i];
    loss += trl_pair_loss(o, pc, pr, r[i], r[B + i]) + o.rpo_alpha * nll;
    const double cr = o.beta * (pc - r[i]), rj = o.beta * (pr - r[B + i]);
    rc += cr, rr += rj, acc += cr > rj, margin += cr - rj, lc += pc, lr += pr;
    logit_c += n.mean_logit_sum[i], logit_r += n.mean_logit_sum[B + i];
  }
  const auto m = as_map(out.metrics.averages("eval_"));
  ASSERT_EQ(m.size(), 10u);
  // Bounds from the rows' log-prob bounds lb (fp32 sequence_logps): a reward beta (p - r)
  // moves by beta lb plus 2u |terms| (a subtraction, a product); the sigmoid loss, whose
  // slope in l is <= beta, by beta (lb_c + lb_r) plus its fp32 evaluation; nll (a sum of B
  // log-probs <= 0 over tc tokens) by sum lb_c / tc plus gamma(B + 1) nll, and the RPO term
  // by alpha times that; each mean over B pairs sums in any order: gamma(B + 1) of the sum
  // of |terms| / B. Mean logits: each row's bound times its count, a product (u), then / tc.
  const LogpsBounds lbs = logps_bounds(b.logits, b.ids, b.mask);
  const std::vector<double>& lb = lbs.logps;
  const double g = dpo::testutil::gamma(B + 1);
  double nll_bound = g * nll;
  for (int64_t i = 0; i < B; ++i) nll_bound += lb[i] / tc;
  struct Acc {
    double err = 0, mag = 0;  // sum of the terms' bounds, sum of |terms|
    double bound(double n) const { return err / n + dpo::testutil::gamma(n + 1) * mag / n; }
  };
  Acc lossb, rcb, rrb, mb, lcb, lrb, logcb, logrb;
  double min_margin = INFINITY;
  for (int64_t i = 0; i < B; ++i) {
    const double pc = n.logp[i], pr = n.logp[B + i];
    const double li = trl_pair_loss(o, pc, pr, r[i], r[B + i]) + o.rpo_alpha * nll;
    lossb.err += o.beta * (lb[i] + lb[B + i]) + pair_loss_rounding(o.beta, pc, pr, r[i], r[B + i], li) +
                 o.rpo_alpha * nll_bound + 2 * kU * std::abs(li);
    lossb.mag += std::abs(li);
    const double cr = o.beta * (pc - r[i]), rj = o.beta * (pr - r[B + i]);
    rcb.err += o.beta * lb[i] + 2 * kU * (o.beta * (std::abs(pc) + std::abs(r[i])));
    rrb.err += o.beta * lb[B + i] + 2 * kU * (o.beta * (std::abs(pr) + std::abs(r[B + i])));
    rcb.mag += std::abs(cr), rrb.mag += std::abs(rj);
    lcb.err += lb[i], lrb.err += lb[B + i];
    lcb.mag += std::abs(pc), lrb.mag += std::abs(pr);
    const double sc = n.mean_logit_sum[i], sr = n.mean_logit_sum[B + i];  // mean logit * count
    logcb.err += lbs.mean_logits[i] * n.count[i] + kU * std::abs(sc);
    logrb.err += lbs.mean_logits[B + i] * n.count[B + i] + kU * std::abs(sr);
    logcb.mag += std::abs(sc), logrb.mag += std::abs(sr);
    min_margin = std::min(min_margin, std::abs(cr - rj));
  }
  mb.err = rcb.err + rrb.err + 2 * kU * (rcb.mag + rrb.mag);
  mb.mag = rcb.mag + rrb.mag;
  EXPECT_NEAR(m.at("eval_loss"), loss / B, lossb.bound(B));
  EXPECT_NEAR(out.loss.item<double>(), loss / B, lossb.bound(B));
  EXPECT_NEAR(m.at("eval_rewards/chosen"), rc / B, rcb.bound(B));
  EXPECT_NEAR(m.at("eval_rewards/rejected"), rr / B, rrb.bound(B));
  // A count: exact while no margin is within its rewards' error (the margins here are larger).
  EXPECT_GT(min_margin, rcb.err + rrb.err);
  EXPECT_NEAR(m.at("eval_rewards/accuracies"), acc / B, 1e-12);
  EXPECT_NEAR(m.at("eval_rewards/margins"), margin / B, mb.bound(B));
  EXPECT_NEAR(m.at("eval_logps/chosen"), lc / B, lcb.bound(B));
  EXPECT_NEAR(m.at("eval_logps/rejected"), lr / B, lrb.bound(B));
  // TRL: logits[:B][loss_mask[:B]].mean(): every (answer position, vocab entry) weighs the same.
  EXPECT_NEAR(m.at("eval_logits/chosen"), logit_c / tc, logcb.bound(tc));
  EXPECT_NEAR(m.at("eval_logits/rejected"), logit_r / tr, logrb.bound(tr));
  EXPECT_NEAR(m.at("eval_nll_loss"), nll, nll_bound);
  EXPECT_EQ(out.metrics.chosen_tokens, tc);
  EXPECT_EQ(out.metrics.pairs, B);
}

TEST(DpoBatchLoss, IpoUsesLengthAveragedLogpsForPolicyAndReference) {
  const int64_t B = 2;
  Batch b = random_batch(2 * B, 9, 7, 14);
  add_answer_token(b, 1, 7);
  const Tensor ref = torch::tensor({-30.0, -12.0, -25.0, -14.0}, torch::kDouble);  // sums
  const auto o = options("ipo", 0.5);
  const auto out = dpo::dpo_batch_loss(b.logits, b.ids, b.mask, ref, o);
  const Naive n = naive_logps(b.logits, b.ids, b.mask);
  const auto r = to_vec(ref);
  std::vector<double> want, bound;
  // ipo (l - 1/(2 beta))^2 of length-averaged log-ratios: l moves by the averaged log-prob
  // bounds lb_c / n_c + lb_r / n_r plus its fp32 evaluation (four divisions, three
  // subtractions: 7u of the magnitudes), the square by 2 |l - 1/(2 beta)| times that, plus
  // its own rounding (3u of the loss: the offset, the difference, the square).
  const std::vector<double> lb = logps_bounds(b.logits, b.ids, b.mask).logps;
  for (int64_t i = 0; i < B; ++i) {
    auto avg = [&](double s, int64_t j) { return s / n.count[j]; };
    want.push_back(trl_pair_loss(o, avg(n.logp[i], i), avg(n.logp[B + i], B + i), avg(r[i], i), avg(r[B + i], B + i)));
    const double l = avg(n.logp[i], i) - avg(n.logp[B + i], B + i) - avg(r[i], i) + avg(r[B + i], B + i);
    const double mag = std::abs(avg(n.logp[i], i)) + std::abs(avg(n.logp[B + i], B + i)) + std::abs(avg(r[i], i)) +
                       std::abs(avg(r[B + i], B + i));
    const double dl = avg(lb[i], i) + avg(lb[B + i], B + i) + 7 * kU * mag;
    bound.push_back(2 * std::abs(l - 1 / (2 * o.beta)) * dl + dl * dl + 3 * kU * want.back());
  }
  expect_within(to_vec(out.losses), want, bound, "ipo losses");
  EXPECT_NEAR(out.chosen_logps[0].item<double>(), n.logp[0] / n.count[0],
              lb[0] / n.count[0] + kU * std::abs(n.logp[0] / n.count[0]));
}

TEST(DpoBatchLoss, RpoAddsTokenWeightedChosenNll) {
  const int64_t B = 2;
  Batch b = random_batch(2 * B, 8, 9, 15);
  const Tensor ref = torch::tensor({-9.0, -10.0, -11.0, -12.0});
  const auto plain = dpo::dpo_batch_loss(b.logits, b.ids, b.mask, ref, options("sigmoid"));
  const auto rpo = dpo::dpo_batch_loss(b.logits, b.ids, b.mask, ref, options("sigmoid", 0.1, 0.0, 1.5));
  const Naive n = naive_logps(b.logits, b.ids, b.mask);
  const double nll = -(n.logp[0] + n.logp[1]) / static_cast<double>(n.count[0] + n.count[1]);
  // The sigmoid parts are the same fp32 values in both (the same kernels and inputs): the
  // difference is 1.5 nll, nll within (lb_0 + lb_1) / count plus gamma(3) nll (two log-probs
  // summed, a division), then 1.5 * nll, the addition to the loss and the subtraction round
  // once each (u of 1.5 nll, u of each loss).
  const std::vector<double> lb = logps_bounds(b.logits, b.ids, b.mask).logps;
  const double nll_bound = (lb[0] + lb[1]) / static_cast<double>(n.count[0] + n.count[1]) + dpo::testutil::gamma(3) * nll;
  std::vector<double> bound;
  for (int64_t i = 0; i < 2; ++i)
    bound.push_back(1.5 * nll_bound + kU * (1.5 * nll + std::abs(rpo.losses[i].item<double>()) +
                                            std::abs(plain.losses[i].item<double>())));
  expect_within(to_vec(rpo.losses - plain.losses), {1.5 * nll, 1.5 * nll}, bound, "rpo term");
  EXPECT_EQ(as_map(plain.metrics.averages()).count("nll_loss"), 0u);
}

TEST(DpoBatchLoss, ReferenceFreeWhenRefUndefined) {
  Batch b = random_batch(4, 8, 9, 16);
  const auto out = dpo::dpo_batch_loss(b.logits, b.ids, b.mask, Tensor(), options("sigmoid", 0.3));
  const Naive n = naive_logps(b.logits, b.ids, b.mask);
  const std::vector<double> lb = logps_bounds(b.logits, b.ids, b.mask).logps;
  // Rewards 0.3 p (a product: u) summed in fp64; the loss's slope in l is <= beta = 0.3.
  EXPECT_NEAR(out.metrics.rewards_chosen_sum, 0.3 * (n.logp[0] + n.logp[1]),
              0.3 * (lb[0] + lb[1]) + 2 * kU * 0.3 * (std::abs(n.logp[0]) + std::abs(n.logp[1])));
  const double l = n.logp[0] - n.logp[2], want = -log_sigmoid(0.3 * l);
  EXPECT_NEAR(out.losses[0].item<double>(), want,
              0.3 * (lb[0] + lb[2]) + pair_loss_rounding(0.3, n.logp[0], n.logp[2], 0, 0, want));
}

TEST(DpoBatchLoss, GradientsMatchFiniteDifferencesForEveryLossType) {
  const int64_t B = 2, T = 6, V = 5;
  Batch b = random_batch(2 * B, T, V, 17, torch::kDouble, 1.0);
  add_answer_token(b, 1, 4);
  const Tensor ref = torch::tensor({-7.0, -6.5, -6.0, -8.0}, torch::kDouble);
  const std::vector<dpo::DpoOptions> cases{options("sigmoid"), options("sigmoid", 0.5, 0.2, 0.7), options("robust", 1.0, 0.3),
                                           options("hinge", 0.1), options("ipo", 0.4), options("ipo", 0.4, 0.0, 0.5)};
  for (const auto& o : cases) {
    Tensor x = b.logits.clone().set_requires_grad(true);
    dpo::dpo_batch_loss(x, b.ids, b.mask, ref, o).loss.backward();
    const auto analytic = to_vec(x.grad());
    Tensor y = b.logits.clone();
    double* p = y.data_ptr<double>();
    std::vector<double> numeric(y.numel());
    const double h = 1e-5;
    for (int64_t i = 0; i < y.numel(); ++i) {
      const double keep = p[i];
      p[i] = keep + h;
      const double up = dpo::dpo_batch_loss(y, b.ids, b.mask, ref, o).loss.item<double>();
      p[i] = keep - h;
      const double down = dpo::dpo_batch_loss(y, b.ids, b.mask, ref, o).loss.item<double>();
      p[i] = keep;
      numeric[i] = (up - down) / (2 * h);
    }
    // fp64 central differences of a smooth loss: truncation h^2 / 6 times the third
    // derivative ~ 1e-11, rounding ~ u |f| / h ~ 1e-10 (|f| < 100): 1e-8 + 1e-6 |g| is far
    // above both.
    expect_close(analytic, numeric, 1e-6, 1e-8, "d loss / d logits, " + o.loss_type);
    double mass = 0;
    for (double g : analytic) mass += std::abs(g);
    EXPECT_GT(mass, 1e-3) << o.loss_type;  // the check compared something
  }
}

// ---- accumulation ----------------------------------------------------------------------

TEST(Accumulation, MicroBatchesSumToOneBatchKTimesLarger) {
  const int64_t k = 3, B = 2, T = 9, V = 10;
  const auto o = options("sigmoid", 0.1, 0.1);
  std::vector<Batch> micro;
  std::vector<Tensor> refs;
  for (int64_t j = 0; j < k; ++j) {
    micro.push_back(random_batch(2 * B, T, V, 100 + j));
    refs.push_back(torch::randn({2 * B}) - 20);
  }
  // The big batch: [all chosen rows; all rejected rows].
  auto big_of = [&](auto get) {
    std::vector<Tensor> c, r;
    for (int64_t j = 0; j < k; ++j) c.push_back(get(j).narrow(0, 0, B)), r.push_back(get(j).narrow(0, B, B));
    for (auto& t : r) c.push_back(t);
    return torch::cat(c, 0);
  };
  Tensor big_logits = big_of([&](int64_t j) { return micro[j].logits; }).set_requires_grad(true);
  Tensor big_ids = big_of([&](int64_t j) { return micro[j].ids; });
  Tensor big_mask = big_of([&](int64_t j) { return micro[j].mask; });
  Tensor big_ref = big_of([&](int64_t j) { return refs[j]; });

  const auto big = dpo::dpo_batch_loss(big_logits, big_ids, big_mask, big_ref, o);
  big.loss.backward();
  dpo::DpoMetrics sum;
  std::vector<Tensor> micro_x;
  for (int64_t j = 0; j < k; ++j) {
    micro_x.push_back(micro[j].logits.clone().set_requires_grad(true));
    const auto out = dpo::dpo_batch_loss(micro_x[j], micro[j].ids, micro[j].mask, refs[j], o);
    (out.loss / static_cast<double>(k)).backward();  // what the trainer does per micro-batch
    sum += out.metrics;
  }
  // Both sides compute each row's quantities from the same logits, each within its bound
  // of the exact value (so 2x between them): log-probs lb, rewards beta (lb + 3u |terms|),
  // pair losses beta (lb_c + lb_r) plus their fp32 evaluation; then sum them in fp64 in
  // other groupings (gamma_fp64 of the magnitudes). Counts, pairs and accuracies are exact
  // (the margins are far from 0: see MetricsFollowTrlDefinitions).
  std::vector<double> bound(dpo::DpoMetrics::kNumFields, 0.0);
  const double g64 = dpo::testutil::gamma(3 * 2 * B, torch::kDouble);
  for (int64_t j = 0; j < k; ++j) {
    const Naive n = naive_logps(micro[j].logits, micro[j].ids, micro[j].mask);
    const LogpsBounds lbs = logps_bounds(micro[j].logits, micro[j].ids, micro[j].mask);
    const auto r = to_vec(refs[j]);
    for (int64_t i = 0; i < B; ++i) {
      const double pc = n.logp[i], pr = n.logp[B + i];
      const double loss = trl_pair_loss(o, pc, pr, r[i], r[B + i]);
      const double rcb = o.beta * (lbs.logps[i] + 3 * kU * (std::abs(pc) + std::abs(r[i])));
      const double rrb = o.beta * (lbs.logps[B + i] + 3 * kU * (std::abs(pr) + std::abs(r[B + i])));
      bound[1] += 2 * (o.beta * (lbs.logps[i] + lbs.logps[B + i]) + pair_loss_rounding(o.beta, pc, pr, r[i], r[B + i], loss)) +
                  g64 * std::abs(loss);
      bound[2] += 2 * rcb + g64 * o.beta * std::abs(pc - r[i]);
      bound[3] += 2 * rrb + g64 * o.beta * std::abs(pr - r[B + i]);
      bound[5] += 2 * (rcb + rrb + kU * o.beta * std::abs(pc - r[i] - pr + r[B + i])) + g64 * o.beta * std::abs(pc - r[i] - pr + r[B + i]);
      bound[6] += 2 * lbs.logps[i] + g64 * std::abs(pc);
      bound[7] += 2 * lbs.logps[B + i] + g64 * std::abs(pr);
      bound[8] += 2 * (lbs.mean_logits[i] * n.count[i] + kU * std::abs(n.mean_logit_sum[i])) + g64 * std::abs(n.mean_logit_sum[i]);
      bound[9] += 2 * (lbs.mean_logits[B + i] * n.count[B + i] + kU * std::abs(n.mean_logit_sum[B + i])) +
                  g64 * std::abs(n.mean_logit_sum[B + i]);
    }
  }
  const auto sv = sum.to_vector(), bv = big.metrics.to_vector();
  expect_within(sv, bv, bound, "metric sums");
  // Averages: a sum over a count (exact): the sum's bound over the count, and the fp64 division.
  std::vector<double> with_counts = bound;
  for (int64_t i : {0, 10, 11, 13}) with_counts[i] = bv[i];
  const auto avg_bound = as_map(dpo::DpoMetrics::from_vector(with_counts).averages());
  const auto a = as_map(sum.averages()), bb = as_map(big.metrics.averages());
  const double u64 = dpo::testutil::unit_roundoff(torch::kDouble);
  for (const auto& [name, v] : bb) EXPECT_NEAR(a.at(name), v, avg_bound.at(name) + 2 * u64 * std::abs(v)) << name;
  // Gradients: the big batch's rows are the micro-batches' rows. Each entry is -g_row p_v
  // (+ g_row at the target) with the same p (one position's softmax, by the same kernel) and
  // a row gradient g_row = d loss / d logp that differs in its evaluation: the loss's
  // derivative (a sigmoid: an exp within kExpUlps and 3 more roundings) and the scaling by
  // 1 / (k B) (one rounding, or two for 1/B then 1/k): (2 kExpUlps + 5) u per side, one more
  // rounding for the product: (4 kExpUlps + 12) u |grad| between the two.
  Tensor micro_grad = big_of([&](int64_t j) { return micro_x[j].grad(); });
  const Tensor big_grad = big_logits.grad();
  dpo::testutil::expect_within(micro_grad, big_grad,
                               (4 * dpo::testutil::kExpUlps + 12) * kU * big_grad.abs().to(torch::kDouble), "grad");

  // SFT: sum of nll sums over the summed token count, the same both ways.
  double nll = 0;
  int64_t tokens = 0;
  for (int64_t j = 0; j < k; ++j) {
    const auto s = dpo::sft_loss(micro[j].logits, micro[j].ids, micro[j].mask);
    nll += s.nll_sum.item<double>();
    tokens += s.tokens;
  }
  const auto s = dpo::sft_loss(big_logits.detach(), big_ids, big_mask);
  EXPECT_EQ(tokens, s.tokens);
  // Each nll_sum is an fp32 sum of row log-probs, each within lb: 2 sum lb, plus the fp32
  // sums of 2B and 2kB rows, gamma(2kB) sum |logp| for both.
  double nll_bound = 0, mag = 0;
  for (int64_t j = 0; j < k; ++j) {
    const Naive n = naive_logps(micro[j].logits, micro[j].ids, micro[j].mask);
    const LogpsBounds lbs = logps_bounds(micro[j].logits, micro[j].ids, micro[j].mask);
    for (int64_t i = 0; i < 2 * B; ++i) nll_bound += 2 * lbs.logps[i], mag += std::abs(n.logp[i]);
  }
  nll_bound += 2 * dpo::testutil::gamma(2 * k * B) * mag;
  EXPECT_NEAR(nll / tokens, s.nll_sum.item<double>() / s.tokens, nll_bound / tokens);
}

TEST(SftLoss, CountsAnswerTokensPredictedByArgmax) {
  // Few classes, so that a good share of random predictions is right.
  Batch b = random_batch(4, 13, 3, 21);
  const auto s = dpo::sft_loss(b.logits, b.ids, b.mask);
  int64_t correct = 0, tokens = 0;
  for (int64_t r = 0; r < 4; ++r) {
    for (int64_t t = 1; t < 13; ++t) {
      if (b.mask[r][t].item<int64_t>() == 0) continue;
      ++tokens;
      int64_t best = 0;
      for (int64_t v = 1; v < 3; ++v)
        if (b.logits[r][t - 1][v].item<double>() > b.logits[r][t - 1][best].item<double>()) best = v;
      correct += best == b.ids[r][t].item<int64_t>();
    }
  }
  ASSERT_GT(tokens, 0);
  EXPECT_EQ(s.tokens, tokens);
  EXPECT_EQ(s.correct, correct);
  EXPECT_GT(correct, 0);
  EXPECT_LT(correct, tokens);
  const auto m = as_map(dpo::SftMetrics::of(s, 4).averages("eval_"));
  EXPECT_DOUBLE_EQ(m.at("eval_mean_token_accuracy"), static_cast<double>(correct) / tokens);
  // The same fp64 division of the same values (4 ulps of slack from EXPECT_DOUBLE_EQ's kind).
  EXPECT_NEAR(m.at("eval_loss"), s.nll_sum.item<double>() / tokens, 1e-12);
  // Sums reduce by addition (ranks, micro-batches) and survive the vector round trip.
  dpo::SftMetrics twice = dpo::SftMetrics::of(s, 4);
  twice += dpo::SftMetrics::of(s, 4);
  EXPECT_EQ(dpo::SftMetrics::from_vector(twice.to_vector()).correct, 2.0 * correct);
  EXPECT_THROW(dpo::SftMetrics::from_vector({1, 2, 3}), std::runtime_error);
}

TEST(SftLoss, IsTokenWeightedNllOfAnswerTokens) {
  Batch b = random_batch(3, 11, 8, 18);
  Tensor x = b.logits.clone().set_requires_grad(true);
  const auto s = dpo::sft_loss(x, b.ids, b.mask);
  const Naive n = naive_logps(b.logits, b.ids, b.mask);
  double want = 0;
  int64_t count = 0;
  for (size_t r = 0; r < n.logp.size(); ++r) want -= n.logp[r], count += n.count[r];
  EXPECT_EQ(s.tokens, count);
  // The rows' bounds plus the fp32 sum of 3 rows.
  const std::vector<double> lb = logps_bounds(b.logits, b.ids, b.mask).logps;
  EXPECT_NEAR(s.nll_sum.item<double>(), want, lb[0] + lb[1] + lb[2] + dpo::testutil::gamma(3) * std::abs(want));
  // Gradient of mean NLL = (softmax - onehot) / count at scored positions: p within
  // softmax_error_bound, then p - onehot and the scaling by 1 / count (3u of the entry).
  (s.nll_sum / static_cast<double>(s.tokens)).backward();
  Tensor sm = torch::softmax(b.logits.to(torch::kDouble), -1);
  const Tensor sm_err = dpo::testutil::softmax_error_bound(b.logits, -1);
  const int64_t r = 0;
  for (int64_t t = 1; t < 11; ++t) {
    if (b.mask[r][t].item<int64_t>() == 0) continue;
    Tensor row = sm[r][t - 1].clone();
    row[b.ids[r][t].item<int64_t>()] -= 1;
    dpo::testutil::expect_within(x.grad()[r][t - 1], row / count, sm_err[r][t - 1] / count + 3 * kU * (row / count).abs(),
                                 "grad at t " + std::to_string(t));
  }
}

TEST(DpoMetrics, VectorRoundTripAndMerge) {
  dpo::DpoMetrics m;
  auto v = m.to_vector();
  ASSERT_EQ(static_cast<int64_t>(v.size()), dpo::DpoMetrics::kNumFields);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<double>(i + 1);
  const auto m2 = dpo::DpoMetrics::from_vector(v);
  EXPECT_EQ(m2.to_vector(), v);
  EXPECT_EQ(m2.pairs, 1);
  EXPECT_EQ(m2.nll_tokens, 14);
  auto m3 = m2;
  m3 += m2;
  EXPECT_EQ(m3.loss_sum, 4);
  EXPECT_THROW(dpo::DpoMetrics::from_vector({1.0}), std::runtime_error);
  EXPECT_TRUE(dpo::DpoMetrics().averages().empty());
}
