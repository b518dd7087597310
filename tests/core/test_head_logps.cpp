// Tests of head_logps (chunked lm_head + log-softmax, recomputed in backward) against
// sequence_logps on the full logits: values, metrics and gradients, in several chunk
// sizes, bf16 hidden states, two targets read from one position (a shared prompt's
// last token predicts both answers' first tokens), bad inputs, and the extras of
// preference-loss variants: per-token weights (LD-DPO) and the WPO statistic
// (mean of log p - log sum p^2), against ATen log_softmax in double. Every fp32 result is
// compared with the float64 value of the same inputs within a bound derived from its
// operations (head_reference below, tests/fp_bounds.h).
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/autograd.h>
#include <torch/types.h>

#include "core/dpo.h"
#include "tests/fp_bounds.h"

namespace {

using torch::Tensor;

struct Targets {
  Tensor pos, tok, seq;
};

constexpr double kU = 0x1p-24;  // fp32 unit roundoff

// The float64 statistics of entries (pos, tok, seq) read from logits L = h W^T (or from h
// itself when w is undefined: h holds logits), and bounds on any fp32 evaluation of them
// (head_logps in chunks and vocabulary blocks, or sequence_logps of fp32 logits):
//   L: the product, in any order or blocking, within E_L = gamma(C) |h| |W|^T (0 when h holds
//      the logits; a -inf logit is exact);
//   log-probs: E_L carried through log-softmax, the kernel's own log-softmax and the sums
//      (fp_bounds.h: gathered_logp_sum_bound);
//   mean logits: per entry the V-mean's share of E_L and gamma(V + 1) mean |L|, per sequence
//      their mean and gamma(n + 1) of the mean |.|;
//   WPO: log p - log sum p^2 = l - (lse(2L) - 2 lse(L)): the log-prob's bound, twice the
//      log-sum-exp bound of 2L (the kernel squares its exps: twice their error), twice that of
//      L, E_L carried through each (sum q e, q = softmax(2L), and sum p e), and the 3 roundings
//      of combining; per sequence a mean as above;
//   d(sum_i c_i l_i)/dh = G W with G = c (onehot - p) per entry (summed per position): p
//      within softmax_error_bound plus E_L carried through the softmax (p (e + sum p e)),
//      onehot - p and the coefficient's rounding (4u |c|); then G W within |E_G| |W| +
//      gamma(2V) |G| |W| (V terms, and two entries at one position at most).
// coef (M): the gradient's coefficient c_i of each entry (|c| is what matters), or undefined.
// logit_rounding: a relative rounding of each logit on top (u_bf16 for a bf16 product that
// accumulates in fp32 and rounds its output to bf16).
struct HeadReference {
  Tensor logps, logps_bound, mean_logits, mean_bound, wpo, wpo_bound;  // (R) float64
  Tensor grad, grad_bound;                                             // h's shape
};

HeadReference head_reference(const Tensor& h, const Tensor& w, const Targets& tg, int64_t R, const Tensor& coef = {},
                             const Tensor& weight = {}, double logit_rounding = 0) {
  using dpo::testutil::gamma;
  HeadReference r;
  const int64_t D = h.size(-1);
  const Tensor H = h.detach().to(torch::kDouble).reshape({-1, D});
  Tensor L = H, E = torch::zeros_like(H);
  if (w.defined()) {
    const Tensor W = w.detach().to(torch::kDouble);
    L = torch::matmul(H, W.t());
    E = gamma(static_cast<double>(D)) * torch::matmul(H.abs(), W.abs().t()) + logit_rounding * L.abs();
    E = torch::where(L.isinf() | E.isnan(), torch::zeros_like(E), E);
  }
  const int64_t V = L.size(1);
  const Tensor rows = L.index_select(0, tg.pos), er = E.index_select(0, tg.pos);  // (M, V)
  const Tensor idx = tg.tok.unsqueeze(1);
  const Tensor lsm = torch::log_softmax(rows, 1);
  const Tensor l = lsm.gather(1, idx).squeeze(1);
  const Tensor n = torch::zeros({R}, torch::kDouble).index_add(0, tg.seq, torch::ones_like(l));
  const Tensor nn = n.clamp_min(1);
  auto per_seq = [&](const Tensor& x) { return torch::zeros({R}, torch::kDouble).index_add(0, tg.seq, x); };
  const Tensor wt = weight.defined() ? weight.to(torch::kDouble) : torch::ones_like(l);
  r.logps = per_seq(wt * l);
  r.logps_bound = dpo::testutil::gathered_logp_sum_bound(rows, tg.tok, tg.seq, R, torch::kFloat32, weight, er);
  // Mean logits: a finite mean only (a -inf logit makes it -inf both ways).
  const Tensor mean_v = rows.mean(1), emean = er.mean(1) + gamma(static_cast<double>(V + 1)) * rows.abs().mean(1);
  r.mean_logits = per_seq(mean_v) / nn;
  r.mean_bound = (per_seq(emean) + (n + 1) * kU / (1 - (n + 1) * kU) * per_seq(mean_v.abs())) / nn;
  // WPO.
  const Tensor lse = rows.logsumexp(1), lse2 = (2 * rows).logsumexp(1);
  const Tensor p = torch::softmax(rows, 1), q = torch::softmax(2 * rows, 1);
  const Tensor stat = l - (lse2 - 2 * lse);
  const Tensor e_l = (dpo::testutil::log_softmax_error_bound(rows, 1) + dpo::testutil::log_softmax_input_error(rows, er, 1))
                         .gather(1, idx)
                         .squeeze(1);
  const Tensor e_stat = e_l + 2 * dpo::testutil::logsumexp_error_bound(2 * rows, 1).squeeze(1) +
                        2 * dpo::testutil::logsumexp_error_bound(rows, 1).squeeze(1) + 2 * (q * er).sum(1) +
                        2 * (p * er).sum(1) + 3 * kU * (l.abs() + lse2.abs() + 2 * lse.abs());
  r.wpo = per_seq(stat) / nn;
  r.wpo_bound = (per_seq(e_stat) + (n + 1) * kU / (1 - (n + 1) * kU) * per_seq(stat.abs())) / nn;
  if (coef.defined()) {
    const Tensor c = coef.to(torch::kDouble).unsqueeze(1);  // (M, 1)
    Tensor G = -c * p;
    G.scatter_add_(1, idx, c);
    const Tensor ep = dpo::testutil::softmax_error_bound(rows, 1) + p * (er + (p * er).sum(1, true));
    const Tensor EG = c.abs() * (ep + 4 * kU);
    const Tensor Gp = torch::zeros_like(L).index_add(0, tg.pos, G);
    const Tensor EGp = torch::zeros_like(L).index_add(0, tg.pos, EG);
    const Tensor AGp = torch::zeros_like(L).index_add(0, tg.pos, G.abs());
    if (w.defined()) {
      const Tensor W = w.detach().to(torch::kDouble);
      r.grad = torch::matmul(Gp, W).view(h.sizes());
      r.grad_bound = (torch::matmul(EGp, W.abs()) + gamma(static_cast<double>(2 * V)) * torch::matmul(AGp, W.abs()))
                         .view(h.sizes());
    } else {
      r.grad = Gp.view(h.sizes());
      r.grad_bound = (EGp + kU * AGp).view(h.sizes());
    }
  }
  return r;
}

// The targets sequence_logps reads: row r, token t (mask) predicted by position t - 1.
Targets targets_of(const Tensor& ids, const Tensor& mask) {
  std::vector<int64_t> p, k, s;
  const int64_t R = ids.size(0), T = ids.size(1);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t t = 1; t < T; ++t)
      if (mask[r][t].item<double>() != 0) {
        p.push_back(r * T + t - 1);
        k.push_back(ids[r][t].item<int64_t>());
        s.push_back(r);
      }
  return {torch::tensor(p, torch::kLong), torch::tensor(k, torch::kLong), torch::tensor(s, torch::kLong)};
}

// Random hidden states (R, T, C) that require grad, a head (V, C) scaled by w_scale, token
// ids, and a mask of answer tokens from column `answer_from` on (seeded: same draws every time).
struct HeadCase {
  Tensor h, w, ids, mask;
};
HeadCase random_case(uint64_t seed, int64_t R, int64_t T, int64_t C, int64_t V, double w_scale, int64_t answer_from) {
  torch::manual_seed(seed);
  HeadCase c;
  c.h = torch::randn({R, T, C}).requires_grad_(true);
  c.w = torch::randn({V, C}) * w_scale;
  c.ids = torch::randint(0, V, {R, T}, torch::kLong);
  c.mask = torch::zeros({R, T});
  c.mask.slice(1, answer_from, T).fill_(1);
  return c;
}

// (positions per chunk, vocabulary rows per block); 0 = automatic.
class HeadLogps : public ::testing::TestWithParam<std::pair<int64_t, int64_t>> {
 protected:
  void SetUp() override {
    dpo::detail::set_head_chunk_rows(GetParam().first);
    dpo::detail::set_head_vocab_block(GetParam().second);
  }
  void TearDown() override {
    dpo::detail::set_head_chunk_rows(0);
    dpo::detail::set_head_vocab_block(0);
  }
};

TEST_P(HeadLogps, EqualsSequenceLogpsOfFullLogitsWithGradients) {
  const int64_t R = 4, T = 11, V = 300;
  auto [h, w, ids, mask] = random_case(3, R, T, 16, V, 0.5, 4);
  mask[1].slice(0, 8, 11).fill_(0);  // padding
  mask[3].fill_(0);                  // a row without answer tokens
  Tensor g = torch::randn({R});

  dpo::SeqLogps ref = dpo::sequence_logps(torch::matmul(h, w.t()), ids, mask);
  Tensor gh_ref = torch::autograd::grad({(ref.logps * g).sum()}, {h})[0];
  Targets tg = targets_of(ids, mask);
  dpo::SeqLogps got = dpo::head_logps(h, w, tg.pos, tg.tok, tg.seq, R);
  Tensor gh = torch::autograd::grad({(got.logps * g).sum()}, {h})[0];
  // Both against the float64 values of h W^T, each within its fp32 bound.
  using dpo::testutil::expect_within;
  const HeadReference want = head_reference(h, w, tg, R, g.index_select(0, tg.seq));
  expect_within(got.logps, want.logps, want.logps_bound, "head_logps logps");
  expect_within(ref.logps, want.logps, want.logps_bound, "sequence_logps logps");
  expect_within(got.mean_logits, want.mean_logits, want.mean_bound, "head_logps mean_logits");
  expect_within(ref.mean_logits, want.mean_logits, want.mean_bound, "sequence_logps mean_logits");
  EXPECT_TRUE(torch::equal(got.token_counts, ref.token_counts));
  EXPECT_EQ(got.logps[3].item<float>(), 0.0f);
  expect_within(gh, want.grad, want.grad_bound, "head_logps grad");
  expect_within(gh_ref, want.grad, want.grad_bound, "sequence_logps grad");

  // Without a weight, hidden holds the logits themselves (the full-logits path): against
  // the float64 statistics of those fp32 logits.
  Tensor logits = torch::matmul(h.detach(), w.t()).requires_grad_(true);
  const HeadReference want_l = head_reference(logits, Tensor(), tg, R, g.index_select(0, tg.seq));
  dpo::SeqLogps full = dpo::head_logps(logits, Tensor(), tg.pos, tg.tok, tg.seq, R);
  expect_within(full.logps, want_l.logps, want_l.logps_bound, "full-logits logps");
  Tensor gl = torch::autograd::grad({(full.logps * g).sum()}, {logits})[0];
  Tensor logits2 = torch::matmul(h.detach(), w.t()).requires_grad_(true);
  Tensor gl_ref = torch::autograd::grad({(dpo::sequence_logps(logits2, ids, mask).logps * g).sum()}, {logits2})[0];
  expect_within(gl, want_l.grad, want_l.grad_bound, "full-logits grad");
  expect_within(gl_ref, want_l.grad, want_l.grad_bound, "sequence_logps grad of the logits");
}

// LD-DPO weights and the WPO statistic against log_softmax in double, values and
// gradients (the gradient of entry i is scaled by its weight; WPO is detached).
TEST_P(HeadLogps, TokenWeightsAndWpoStatisticMatchLogSoftmax) {
  const int64_t R = 4, T = 9, V = 257;
  auto [h, w, ids, mask] = random_case(5, R, T, 12, V, 0.7, 3);
  mask[2].slice(0, 6, 9).fill_(0);
  Targets tg = targets_of(ids, mask);
  const int64_t M = tg.pos.numel();
  Tensor tw = torch::rand({M}, torch::kDouble);
  Tensor g = torch::randn({R});
  dpo::HeadLogpsOptions extra;
  extra.token_weight = tw;
  extra.wpo = true;
  Tensor g2 = torch::randn({R});
  dpo::SeqLogps got = dpo::head_logps(h, w, tg.pos, tg.tok, tg.seq, R, extra);
  // Both sums are differentiable: the weighted one (DPO terms) and the plain one (NLL terms).
  Tensor gh = torch::autograd::grad({(got.logps * g).sum() + (got.unweighted_logps * g2).sum()}, {h})[0];

  Tensor h2 = h.detach().clone().requires_grad_(true);
  Tensor lsm = torch::log_softmax(torch::matmul(h2, w.t()).reshape({R * T, V}).to(torch::kDouble), -1);
  Tensor lp = lsm.index_select(0, tg.pos).gather(1, tg.tok.unsqueeze(1)).squeeze(1);  // (M)
  Tensor want = torch::zeros({R}, torch::kDouble).index_add(0, tg.seq, lp * tw);
  Tensor want_plain = torch::zeros({R}, torch::kDouble).index_add(0, tg.seq, lp);
  Tensor gh_ref = torch::autograd::grad(
      {(want * g.to(torch::kDouble)).sum() + (want_plain * g2.to(torch::kDouble)).sum()}, {h2})[0];
  // Bounds of the fp32 evaluation (head_reference): the weights are rounded to fp32 and
  // multiplied in (2u of each weighted term: the product's u and the conversion's); the
  // gradient's coefficient per entry is g tw + g2.
  using dpo::testutil::expect_within;
  const Tensor gs = g.to(torch::kDouble).index_select(0, tg.seq), g2s = g2.to(torch::kDouble).index_select(0, tg.seq);
  const HeadReference bw = head_reference(h, w, tg, R, gs * tw + g2s, tw);
  const HeadReference bp = head_reference(h, w, tg, R);
  const Tensor tw_round = torch::zeros({R}, torch::kDouble).index_add(0, tg.seq, kU * (tw * lp.detach()).abs());
  // want comes from fp32 logits too (within the same bound of the float64 value): 2x.
  expect_within(got.logps, want.detach(), 2 * bw.logps_bound + tw_round, "weighted logps");
  expect_within(got.unweighted_logps, want_plain.detach(), 2 * bp.logps_bound, "unweighted logps");
  expect_within(gh, gh_ref, 2 * bw.grad_bound, "grad");
  EXPECT_FALSE(got.wpo_logps.requires_grad());
  // WPO: per sequence, mean over its tokens of log p - log sum_v p_v^2.
  Tensor lsq = (2 * lsm.detach()).logsumexp({1}).index_select(0, tg.pos);
  Tensor n = torch::zeros({R}, torch::kDouble).index_add(0, tg.seq, torch::ones({M}, torch::kDouble));
  Tensor wpo = torch::zeros({R}, torch::kDouble).index_add(0, tg.seq, lp.detach() - lsq) / n;
  expect_within(got.wpo_logps, wpo, 2 * bp.wpo_bound, "wpo");
  // Off by default: no statistic, unweighted sums.
  dpo::SeqLogps plain = dpo::head_logps(h.detach(), w, tg.pos, tg.tok, tg.seq, R);
  EXPECT_FALSE(plain.wpo_logps.defined());
  EXPECT_FALSE(plain.unweighted_logps.defined());
  Tensor unweighted = torch::zeros({R}, torch::kDouble).index_add(0, tg.seq, lp.detach());
  expect_within(plain.logps, unweighted, 2 * bp.logps_bound, "plain logps");
}

// A frozen lm_head kept in bf16/fp16 under fp32 hidden states (llama_table_dtype) gives
// what its fp32 widening gives: values, WPO statistic, gradients; and a row with a -inf
// logit (a masked vocabulary entry) still takes the exact path block by block.
TEST_P(HeadLogps, HalfPrecisionWeightEqualsItsWidening) {
  const int64_t R = 3, T = 10, C = 16, V = 700;
  for (torch::ScalarType dt : {torch::kBFloat16, torch::kFloat16}) {
    auto [h, w32, ids, mask] = random_case(8, R, T, C, V, 0.6, 3);
    Tensor w = w32.to(dt);
    Tensor h1 = h.detach().clone().requires_grad_(true), h2 = h.detach().clone().requires_grad_(true);
    Targets tg = targets_of(ids, mask);
    dpo::HeadLogpsOptions extra;
    extra.wpo = true;
    Tensor g = torch::randn({R});
    dpo::SeqLogps got = dpo::head_logps(h1, w, tg.pos, tg.tok, tg.seq, R, extra);
    dpo::SeqLogps want = dpo::head_logps(h2, w.to(torch::kFloat), tg.pos, tg.tok, tg.seq, R, extra);
    EXPECT_EQ(w.scalar_type(), dt);  // not widened in place
    // Two fp32 evaluations of the same logits (the widening is exact, the blocks differ):
    // each within the bounds of head_reference, so twice that between them.
    using dpo::testutil::expect_within;
    const std::string name = c10::toString(dt);
    const HeadReference b = head_reference(h, w.to(torch::kFloat), tg, R, g.index_select(0, tg.seq));
    expect_within(got.logps, want.logps, 2 * b.logps_bound, name + " logps");
    expect_within(got.mean_logits, want.mean_logits, 2 * b.mean_bound, name + " mean_logits");
    expect_within(got.wpo_logps, want.wpo_logps, 2 * b.wpo_bound, name + " wpo");
    Tensor gh1 = torch::autograd::grad({(got.logps * g).sum()}, {h1})[0];
    Tensor gh2 = torch::autograd::grad({(want.logps * g).sum()}, {h2})[0];
    expect_within(gh1, gh2, 2 * b.grad_bound, name + " grad");

    // Vocabulary entry 7 masked (-inf weight, column 0 of hidden > 0): logit 7 is -inf
    // at every position; each row is redone exactly and matches log_softmax in double.
    w[7][0] = -std::numeric_limits<float>::infinity();
    Tensor hd = h.detach().clone();
    hd.select(2, 0).abs_().add_(0.1);
    dpo::SeqLogps masked = dpo::head_logps(hd, w, tg.pos, tg.tok, tg.seq, R, extra);
    Tensor lsm = torch::log_softmax(torch::matmul(hd, w.to(torch::kFloat).t()).reshape({R * T, V}).to(torch::kDouble), -1);
    Tensor lp = lsm.index_select(0, tg.pos).gather(1, tg.tok.unsqueeze(1)).squeeze(1);
    Tensor want_lp = torch::zeros({R}, torch::kDouble).index_add(0, tg.seq, lp);
    EXPECT_TRUE(torch::isfinite(masked.logps).all().item<bool>());
    // want_lp is the log_softmax of fp32 logits (their product error): 2x.
    expect_within(masked.logps, want_lp, 2 * head_reference(hd, w.to(torch::kFloat), tg, R).logps_bound, name + " masked");
  }
}

INSTANTIATE_TEST_SUITE_P(ChunkRows, HeadLogps,
                         ::testing::Values(std::pair<int64_t, int64_t>{0, 0}, std::pair<int64_t, int64_t>{1, 0},
                                           std::pair<int64_t, int64_t>{3, 64}, std::pair<int64_t, int64_t>{7, 100},
                                           std::pair<int64_t, int64_t>{0, 9}));

// A row with a -inf logit (a masked vocabulary entry) takes the exact two-pass path:
// its WPO statistic is exact too; fp64 logits as input (read through fp32 chunks).
TEST(HeadLogpsMore, WpoStatisticOnTheExactPath) {
  torch::manual_seed(6);
  const int64_t V = 50;
  Tensor logits = torch::randn({1, 5, V}) * 3;
  logits[0][1][7] = -std::numeric_limits<float>::infinity();
  Tensor pos = torch::tensor({0, 1, 2, 3}, torch::kLong), tok = torch::tensor({3, 4, 5, 6}, torch::kLong);
  Tensor seq = torch::tensor({0, 0, 1, 1}, torch::kLong);
  dpo::HeadLogpsOptions extra;
  extra.wpo = true;
  dpo::SeqLogps got = dpo::head_logps(logits, Tensor(), pos, tok, seq, 2, extra);
  Tensor lsm = torch::log_softmax(logits[0].to(torch::kDouble), -1);
  auto stat = [&](int64_t p, int64_t t) { return (lsm[p][t] - (2 * lsm[p]).logsumexp(0)).item<double>(); };
  const Tensor wb = head_reference(logits, Tensor(), Targets{pos, tok, seq}, 2).wpo_bound;
  EXPECT_NEAR(got.wpo_logps[0].item<double>(), (stat(0, 3) + stat(1, 4)) / 2, wb[0].item<double>());
  EXPECT_NEAR(got.wpo_logps[1].item<double>(), (stat(2, 5) + stat(3, 6)) / 2, wb[1].item<double>());
  // log sum p^2 <= 0, so the statistic is >= log p: weights exp(w_c + w_r) can exceed 1 (TRL clamps)
  EXPECT_GE(got.wpo_logps[0].item<double>(), (lsm[0][3] + lsm[1][4]).item<double>() / 2);
}

// LD-DPO's weights: within each answer (in entry order) the first min(len chosen,
// len rejected) tokens of its pair weigh 1, the rest alpha.
TEST(HeadLogpsMore, LdTokenWeightsSplitEachAnswerAtTheShorterLength) {
  // B = 2: sequences 0, 1 chosen; 2, 3 rejected. Lengths 3, 2 | 2, 4; entries interleaved.
  Tensor seq = torch::tensor({0, 2, 0, 3, 1, 3, 0, 1, 2, 3, 3}, torch::kLong);
  Tensor w = dpo::ld_token_weights(seq, 4, 0.25);
  const std::vector<double> want{1, 1, 1, 1, 1, 1, 0.25, 1, 1, 0.25, 0.25};
  ASSERT_EQ(w.numel(), static_cast<int64_t>(want.size()));
  for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(w[i].item<double>(), want[i]) << i;
  EXPECT_THROW(dpo::ld_token_weights(seq, 3, 0.5), std::runtime_error);                                  // odd
  EXPECT_THROW(dpo::ld_token_weights(torch::tensor({0, 5}, torch::kLong), 4, 0.5), std::runtime_error);  // range
}

// answer_targets gives head_logps the entries sequence_logps reads from padded rows.
TEST(HeadLogpsMore, AnswerTargetsReproduceSequenceLogps) {
  torch::manual_seed(7);
  const int64_t R = 3, T = 8, V = 60;
  Tensor logits = torch::randn({R, T, V});
  Tensor ids = torch::randint(0, V, {R, T}, torch::kLong);
  Tensor mask = torch::zeros({R, T});
  mask.slice(1, 2, 8).fill_(1);
  mask[1].slice(0, 5, 8).fill_(0);
  const dpo::AnswerTargets t = dpo::answer_targets(ids, mask, V);
  EXPECT_EQ(t.sequences, R);
  const Targets mine = targets_of(ids, mask);
  EXPECT_TRUE(torch::equal(t.position, mine.pos));
  EXPECT_TRUE(torch::equal(t.token, mine.tok));
  EXPECT_TRUE(torch::equal(t.sequence, mine.seq));
  dpo::SeqLogps a = dpo::head_logps(logits, Tensor(), t.position, t.token, t.sequence, R);
  dpo::SeqLogps b = dpo::sequence_logps(logits, ids, mask);
  // Exact: both run the same per-position log-sum-exp (fast_lse) on the same logits and add
  // the same entries in the same order.
  EXPECT_TRUE(torch::equal(a.logps, b.logps));
  EXPECT_TRUE(torch::equal(a.token_counts, b.token_counts));
  Tensor bad = ids.clone();
  bad[0][4] = V;  // an answer token outside the vocabulary
  EXPECT_THROW(dpo::answer_targets(bad, mask, V), std::runtime_error);
}

TEST(HeadLogpsMore, OnePositionPredictsTwoSequencesAndBf16) {
  torch::manual_seed(4);
  const int64_t C = 8, V = 40;
  Tensor h = torch::randn({1, 6, C}).requires_grad_(true);
  Tensor w = torch::randn({V, C});
  // Position 2 (the prompt's last token) predicts the first token of both sequences.
  Tensor pos = torch::tensor({2, 3, 2, 4}, torch::kLong), tok = torch::tensor({5, 6, 7, 8}, torch::kLong);
  Tensor seq = torch::tensor({0, 0, 1, 1}, torch::kLong);
  dpo::SeqLogps got = dpo::head_logps(h, w, pos, tok, seq, 2);
  // Against the float64 values of h W^T (the reference's own fp32 logits carry the same
  // product error as head_logps's, so their log_softmax is within the same bound).
  const HeadReference want = head_reference(h, w, Targets{pos, tok, seq}, 2, torch::ones({4}, torch::kDouble));
  dpo::testutil::expect_within(got.logps, want.logps, want.logps_bound, "logps");
  Tensor lsm = torch::log_softmax(torch::matmul(h, w.t())[0].to(torch::kDouble), -1);
  const double want0 = (lsm[2][5] + lsm[3][6]).item<double>(), want1 = (lsm[2][7] + lsm[4][8]).item<double>();
  EXPECT_NEAR(got.logps[0].item<double>(), want0, 2 * want.logps_bound[0].item<double>());
  EXPECT_NEAR(got.logps[1].item<double>(), want1, 2 * want.logps_bound[1].item<double>());
  Tensor gh = torch::autograd::grad({got.logps.sum()}, {h})[0];
  Tensor h2 = h.detach().clone().requires_grad_(true);
  Tensor l2 = torch::log_softmax(torch::matmul(h2, w.t())[0], -1);
  Tensor gh2 = torch::autograd::grad({l2[2][5] + l2[3][6] + l2[2][7] + l2[4][8]}, {h2})[0];
  dpo::testutil::expect_within(gh, want.grad, want.grad_bound, "grad");
  dpo::testutil::expect_within(gh2, want.grad, want.grad_bound, "autograd grad");

  // bf16 hidden states and weight: logits upcast to fp32 like the model's forward.
  Tensor hb = h.detach().to(torch::kBFloat16), wb = w.to(torch::kBFloat16);
  dpo::SeqLogps b = dpo::head_logps(hb, wb, pos, tok, seq, 2);
  EXPECT_EQ(b.logps.scalar_type(), torch::kFloat32);
  Tensor lb = torch::log_softmax(torch::matmul(hb, wb.t()).to(torch::kFloat32)[0], -1);
  // Each logit: the bf16 values' products accumulated in fp32 (gamma(C) |h| |w|^T) and
  // rounded to bf16 (u_bf16 |L|): another blocking may round a logit the other way, so
  // the two sides are each within that bound of the float64 value of the bf16 inputs.
  const HeadReference wantb = head_reference(hb, wb, Targets{pos, tok, seq}, 2, Tensor(), Tensor(),
                                             dpo::testutil::unit_roundoff(torch::kBFloat16));
  dpo::testutil::expect_within(b.logps, wantb.logps, wantb.logps_bound, "bf16 logps");
  EXPECT_NEAR(b.logps[0].item<double>(), (lb[2][5] + lb[3][6]).item<double>(), 2 * wantb.logps_bound[0].item<double>());
}

TEST(HeadLogpsMore, RejectsBadInputs) {
  auto msg = [](const std::function<void()>& f) {
    try {
      f();
    } catch (const std::exception& e) {
      return std::string(e.what());
    }
    return std::string("<none>");
  };
  Tensor h = torch::randn({1, 4, 8}), w = torch::randn({10, 8});
  Tensor one = torch::tensor({1}, torch::kLong), zero = torch::tensor({0}, torch::kLong);
  EXPECT_NE(msg([&] { dpo::head_logps(h, w, one, torch::tensor({10}, torch::kLong), zero, 1); }).find("vocabulary"),
            std::string::npos);
  EXPECT_NE(msg([&] { dpo::head_logps(h, w, torch::tensor({4}, torch::kLong), one, zero, 1); }).find("position"),
            std::string::npos);
  EXPECT_NE(msg([&] { dpo::head_logps(h, w, one, one, one, 1); }).find("sequence"), std::string::npos);
  EXPECT_NE(msg([&] { dpo::head_logps(h, torch::randn({10, 7}), one, one, zero, 1); }).find("weight"),
            std::string::npos);
}

}  // namespace
