// Tests of head_logps (chunked lm_head + log-softmax, recomputed in backward) against
// sequence_logps on the full logits: values, metrics and gradients, in several chunk
// sizes, bf16 hidden states, two targets read from one position (a shared prompt's
// last token predicts both answers' first tokens), and bad inputs.
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/autograd.h>
#include <torch/types.h>

#include "core/dpo.h"

namespace {

using torch::Tensor;

double rel_err(const Tensor& a, const Tensor& b) {
  return ((a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max() / b.to(torch::kDouble).abs().max().clamp_min(1e-30))
      .item<double>();
}

struct Targets {
  Tensor pos, tok, seq;
};

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

class HeadLogps : public ::testing::TestWithParam<int64_t> {
 protected:
  void SetUp() override { dpo::detail::set_head_chunk_rows(GetParam()); }
  void TearDown() override { dpo::detail::set_head_chunk_rows(0); }
};

TEST_P(HeadLogps, EqualsSequenceLogpsOfFullLogitsWithGradients) {
  torch::manual_seed(3);
  const int64_t R = 4, T = 11, C = 16, V = 300;
  Tensor h = torch::randn({R, T, C}).requires_grad_(true);
  Tensor w = torch::randn({V, C}) * 0.5;
  Tensor ids = torch::randint(0, V, {R, T}, torch::kLong);
  Tensor mask = torch::zeros({R, T});
  mask.slice(1, 4, 11).fill_(1);
  mask[1].slice(0, 8, 11).fill_(0);  // padding
  mask[3].fill_(0);                  // a row without answer tokens
  Tensor g = torch::randn({R});

  dpo::SeqLogps ref = dpo::sequence_logps(torch::matmul(h, w.t()), ids, mask);
  Tensor gh_ref = torch::autograd::grad({(ref.logps * g).sum()}, {h})[0];
  Targets tg = targets_of(ids, mask);
  dpo::SeqLogps got = dpo::head_logps(h, w, tg.pos, tg.tok, tg.seq, R);
  Tensor gh = torch::autograd::grad({(got.logps * g).sum()}, {h})[0];
  EXPECT_LT(rel_err(got.logps, ref.logps), 1e-5);
  EXPECT_LT(rel_err(got.mean_logits, ref.mean_logits), 1e-5);
  EXPECT_TRUE(torch::equal(got.token_counts, ref.token_counts));
  EXPECT_EQ(got.logps[3].item<float>(), 0.0f);
  EXPECT_LT(rel_err(gh, gh_ref), 1e-5);

  // Without a weight, hidden holds the logits themselves (the full-logits path).
  Tensor logits = torch::matmul(h.detach(), w.t()).requires_grad_(true);
  dpo::SeqLogps full = dpo::head_logps(logits, Tensor(), tg.pos, tg.tok, tg.seq, R);
  EXPECT_LT(rel_err(full.logps, ref.logps), 1e-5);
  Tensor gl = torch::autograd::grad({(full.logps * g).sum()}, {logits})[0];
  Tensor logits2 = torch::matmul(h.detach(), w.t()).requires_grad_(true);
  Tensor gl_ref = torch::autograd::grad({(dpo::sequence_logps(logits2, ids, mask).logps * g).sum()}, {logits2})[0];
  EXPECT_LT(rel_err(gl, gl_ref), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(ChunkRows, HeadLogps, ::testing::Values(0, 1, 3, 7));

TEST(HeadLogpsMore, OnePositionPredictsTwoSequencesAndBf16) {
  torch::manual_seed(4);
  const int64_t C = 8, V = 40;
  Tensor h = torch::randn({1, 6, C}).requires_grad_(true);
  Tensor w = torch::randn({V, C});
  // Position 2 (the prompt's last token) predicts the first token of both sequences.
  Tensor pos = torch::tensor({2, 3, 2, 4}, torch::kLong), tok = torch::tensor({5, 6, 7, 8}, torch::kLong);
  Tensor seq = torch::tensor({0, 0, 1, 1}, torch::kLong);
  dpo::SeqLogps got = dpo::head_logps(h, w, pos, tok, seq, 2);
  Tensor lsm = torch::log_softmax(torch::matmul(h, w.t())[0].to(torch::kDouble), -1);
  const double want0 = (lsm[2][5] + lsm[3][6]).item<double>(), want1 = (lsm[2][7] + lsm[4][8]).item<double>();
  EXPECT_NEAR(got.logps[0].item<double>(), want0, 1e-5 * std::abs(want0));
  EXPECT_NEAR(got.logps[1].item<double>(), want1, 1e-5 * std::abs(want1));
  Tensor gh = torch::autograd::grad({got.logps.sum()}, {h})[0];
  Tensor h2 = h.detach().clone().requires_grad_(true);
  Tensor l2 = torch::log_softmax(torch::matmul(h2, w.t())[0], -1);
  Tensor gh2 = torch::autograd::grad({l2[2][5] + l2[3][6] + l2[2][7] + l2[4][8]}, {h2})[0];
  EXPECT_LT(rel_err(gh, gh2), 1e-5);

  // bf16 hidden states and weight: logits upcast to fp32 like the model's forward.
  Tensor hb = h.detach().to(torch::kBFloat16), wb = w.to(torch::kBFloat16);
  dpo::SeqLogps b = dpo::head_logps(hb, wb, pos, tok, seq, 2);
  EXPECT_EQ(b.logps.scalar_type(), torch::kFloat32);
  Tensor lb = torch::log_softmax(torch::matmul(hb, wb.t()).to(torch::kFloat32)[0], -1);
  EXPECT_NEAR(b.logps[0].item<double>(), (lb[2][5] + lb[3][6]).item<double>(), 1e-4);
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
