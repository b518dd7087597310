// Tests of core/attention: the chunked kernel against the dense (B, H, T, T) kernel
// on the same layouts (right padding, a shared prompt, packed pairs, GQA, segments
// longer than one query block), forward and gradients; layout checks; and the model:
// a [prompt; chosen; rejected] row with the rejected positions restarting after the
// prompt gives the hidden states of the two separate rows.
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/autograd.h>
#include <torch/types.h>

#include "core/attention.h"
#include "core/llama.h"
#include "core/lora.h"
#include "tests/test_util.h"
#include "tests/tiny_llama.h"

namespace {

using dpo::AttentionLayout;
using dpo::AttentionSegment;

using dpo::testutil::throw_message;

AttentionLayout make_layout(int64_t B, int64_t T, std::vector<AttentionSegment> segs) {
  AttentionLayout L;
  L.rows = B;
  L.tokens = T;
  L.segments = std::move(segs);
  L.position_ids = torch::arange(T, torch::kLong).unsqueeze(0).expand({B, T}).contiguous();
  return L;
}

double rel_err(const torch::Tensor& a, const torch::Tensor& b) {
  return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item<double>();
}

// Chunked vs dense on one layout: outputs and the gradients of a random linear function of them.
void compare_kernels(const AttentionLayout& L, int64_t H, int64_t K, int64_t D, uint64_t seed) {
  torch::manual_seed(seed);
  const int64_t B = L.rows, T = L.tokens;
  auto q = torch::randn({B, T, H, D}).requires_grad_(true);
  auto k = torch::randn({B, T, K, D}).requires_grad_(true);
  auto v = torch::randn({B, T, K, D}).requires_grad_(true);
  auto w = torch::randn({B, T, H, D});
  auto layout = std::make_shared<const AttentionLayout>(L);
  torch::Tensor oc = dpo::attention_chunked(q, k, v, layout);
  torch::Tensor od = dpo::attention_dense(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          dpo::attention_layout_dense_mask(L))
                         .transpose(1, 2);
  ASSERT_EQ(oc.sizes(), od.sizes());
  EXPECT_LT(rel_err(oc, od), 1e-5);
  auto gc = torch::autograd::grad({(oc * w).sum()}, {q, k, v});
  auto gd = torch::autograd::grad({(od * w).sum()}, {q, k, v});
  for (int i = 0; i < 3; ++i) EXPECT_LT(rel_err(gc[i], gd[i]), 1e-5) << "grad " << i;
}

TEST(AttentionChunked, RightPaddedRowsMatchDense) {
  auto L = dpo::attention_layout_from_mask(
      torch::tensor({{1, 1, 1, 1, 1, 1, 1}, {1, 1, 1, 0, 0, 0, 0}, {0, 0, 0, 0, 0, 0, 0}}, torch::kLong));
  ASSERT_TRUE(L.has_value());
  EXPECT_EQ(L->segments.size(), 2u);  // the empty row has none
  compare_kernels(*L, 4, 4, 8, 1);
}

TEST(AttentionChunked, SharedPromptPackedPairsAndGqaMatchDense) {
  // Row 0: [prompt 0..9; chosen 10..19; rejected 20..32; padding 33..36].
  // Row 1: two packed pairs (prompt, chosen, rejected each) and a trailing pad.
  auto L = make_layout(2, 37, {{0, 0, 10, -1}, {0, 10, 20, 0}, {0, 20, 33, 0},
                               {1, 0, 6, -1}, {1, 6, 9, 3}, {1, 9, 15, 3},
                               {1, 15, 20, -1}, {1, 20, 28, 6}, {1, 28, 36, 6}});
  compare_kernels(L, 4, 2, 16, 2);  // GQA: 2 query heads per kv head
  compare_kernels(L, 6, 1, 8, 3);   // one kv head
}

TEST(AttentionChunked, SegmentsLongerThanOneQueryBlock) {
  const int64_t P = dpo::kAttentionQueryBlock + 37, A = dpo::kAttentionQueryBlock + 5;
  // A grandchild too: its queries see two ancestors.
  auto L = make_layout(1, P + 2 * A + 7, {{0, 0, P, -1}, {0, P, P + A, 0}, {0, P + A, P + 2 * A, 0},
                                          {0, P + 2 * A, P + 2 * A + 7, 2}});
  compare_kernels(L, 2, 1, 32, 4);
}

TEST(AttentionChunked, DenseMaskOfASharedPrompt) {
  auto L = make_layout(1, 6, {{0, 0, 2, -1}, {0, 2, 4, 0}, {0, 4, 5, 0}});
  auto m = dpo::attention_layout_dense_mask(L)[0][0];
  auto expect = torch::tensor({{1, 0, 0, 0, 0, 0},
                               {1, 1, 0, 0, 0, 0},
                               {1, 1, 1, 0, 0, 0},
                               {1, 1, 1, 1, 0, 0},
                               {1, 1, 0, 0, 1, 0},    // rejected: prompt + itself, not chosen
                               {0, 0, 0, 0, 0, 1}},   // padding: only itself
                              torch::kBool);
  EXPECT_TRUE(torch::equal(m, expect)) << m;
}

TEST(AttentionLayout, RefusesBadLayouts) {
  EXPECT_NE(throw_message([] { dpo::attention_layout_check(make_layout(1, 5, {{0, 0, 6, -1}})); }).find("outside"),
            std::string::npos);
  EXPECT_NE(throw_message([] { dpo::attention_layout_check(make_layout(1, 5, {{0, 0, 3, -1}, {0, 2, 4, -1}})); })
                .find("overlaps"),
            std::string::npos);
  EXPECT_NE(throw_message([] { dpo::attention_layout_check(make_layout(2, 5, {{0, 0, 2, -1}, {1, 2, 4, 0}})); })
                .find("same row"),
            std::string::npos);
  EXPECT_NE(throw_message([] { dpo::attention_layout_check(make_layout(1, 5, {{0, 0, 2, 1}, {0, 2, 4, -1}})); })
                .find("earlier"),
            std::string::npos);
  EXPECT_FALSE(dpo::attention_layout_from_mask(torch::tensor({{0, 1, 1}}, torch::kLong)).has_value());
}

// ---- the model --------------------------------------------------------------

dpo::LlamaModel tiny_model(int64_t kv_heads) {
  dpo::LlamaConfig cfg = dpo::testutil::tiny_llama_config(50);  // initializer 0.2: attention far from uniform
  cfg.intermediate_size = 48;
  cfg.num_key_value_heads = kv_heads;
  return dpo::llama_init_random(cfg, 9, dpo::QuantOptions{});
}

TEST(AttentionModel, ChunkedEqualsDenseLogitsAndLoraGrads) {
  dpo::LlamaModel m = tiny_model(2);
  auto proj = m->named_projections();
  dpo::LoraConfig lc;
  lc.target_modules = {"q_proj", "v_proj"};
  lc.dropout = 0;  // the two runs must see the same function
  dpo::lora_attach(proj, lc, 3);
  for (auto& p : dpo::lora_parameters(proj)) {
    torch::NoGradGuard ng;
    p.second.normal_(0, 0.1);
  }
  torch::manual_seed(5);
  auto ids = torch::randint(0, 50, {3, 9}, torch::kLong);
  auto mask = torch::tensor({{1, 1, 1, 1, 1, 1, 1, 1, 1}, {1, 1, 1, 1, 0, 0, 0, 0, 0}, {1, 1, 1, 1, 1, 1, 1, 0, 0}},
                            torch::kLong);
  auto run = [&](dpo::AttentionKernel kern) {
    m->set_attention_kernel(kern);
    for (auto& p : dpo::lora_parameters(proj)) p.second.mutable_grad() = torch::Tensor();
    torch::Tensor logits = m->forward(ids, mask);
    (logits * mask.unsqueeze(-1)).pow(2).sum().backward();
    std::vector<torch::Tensor> out{logits * mask.unsqueeze(-1)};
    for (auto& p : dpo::lora_parameters(proj)) out.push_back(p.second.grad().clone());
    return out;
  };
  auto d = run(dpo::AttentionKernel::kDense);
  auto c = run(dpo::AttentionKernel::kChunked);
  for (size_t i = 0; i < d.size(); ++i) EXPECT_LT(rel_err(c[i], d[i]), 1e-5) << i;
}

TEST(AttentionModel, SharedPromptRowEqualsSeparateRows) {
  for (int64_t kv : {4, 1}) {
    dpo::LlamaModel m = tiny_model(kv);
    torch::NoGradGuard ng;
    torch::manual_seed(6);
    const int64_t P = 5, Cn = 4, Rn = 6;
    auto prompt = torch::randint(0, 50, {P}, torch::kLong), chosen = torch::randint(0, 50, {Cn}, torch::kLong),
         rejected = torch::randint(0, 50, {Rn}, torch::kLong);
    auto shared_ids = torch::cat({prompt, chosen, rejected}).unsqueeze(0);
    AttentionLayout L = make_layout(1, P + Cn + Rn, {{0, 0, P, -1}, {0, P, P + Cn, 0}, {0, P + Cn, P + Cn + Rn, 0}});
    L.position_ids = torch::cat({torch::arange(P + Cn, torch::kLong), torch::arange(P, P + Rn, torch::kLong)}).unsqueeze(0);
    for (auto kern : {dpo::AttentionKernel::kChunked, dpo::AttentionKernel::kDense}) {
      m->set_attention_kernel(kern);
      auto h = m->hidden_states(shared_ids, std::make_shared<const AttentionLayout>(L))[0];  // (T, C)
      auto hc = m->hidden_states(torch::cat({prompt, chosen}).unsqueeze(0), torch::ones({1, P + Cn}, torch::kLong))[0];
      auto hr = m->hidden_states(torch::cat({prompt, rejected}).unsqueeze(0), torch::ones({1, P + Rn}, torch::kLong))[0];
      EXPECT_LT(rel_err(h.narrow(0, 0, P + Cn), hc), 1e-5) << "kv " << kv;
      EXPECT_LT(rel_err(h.narrow(0, P + Cn, Rn), hr.narrow(0, P, Rn)), 1e-5) << "kv " << kv;
    }
  }
}

}  // namespace
