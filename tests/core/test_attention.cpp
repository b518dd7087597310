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
#include "tests/fp_bounds.h"
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

// Attention of fp32 q (B, T, H, D), k, v (B, T, K, D) in float64 (the exact function of
// those values), the gradients of sum(o * w) w.r.t. q, k, v, and elementwise bounds on the
// error of ANY fp32 kernel computing them (dense or chunked, any block order or GEMM),
// derived op by op in the (B, H, T, .) layout (tests/fp_bounds.h; u = fp32 unit roundoff):
//   S  = c Q K^T, c = 1/sqrt(D) rounded:  E_S = gamma(D + 2) c |Q| |K|^T
//   P  = softmax(S): the kernel's rounding (softmax_error_bound) plus S's error carried
//        through, first order: P (E_S + sum_l P E_S)
//   O  = P V:        E_O = E_P |V| + gamma(T) P |V|
//   dP = dO V^T:     E_dP = gamma(D) |dO| |V|^T
//   Dl = rowsum(P dP) (dense) or rowsum(dO O) (chunked): the larger of
//        E_P |dP| + P E_dP + gamma(T) P |dP|  and  gamma(D) |dO| |O| + |dO| E_O, summed
//   dS = P (dP - Dl): E_P |dP - Dl| + P (E_dP + E_Dl) + 2u P |dP - Dl|
//   dQ = c dS K:     c (E_dS |K| + gamma(T + 2) |dS| |K|)
//   dK = c dS^T Q, dV = P^T dO, each summed over the R query heads of a kv head (R T terms):
//        c (E_dS^T |Q| + gamma(R T + 2) |dS|^T |Q|),  E_P^T |dO| + gamma(R T) P^T |dO|
// The second-order terms (products of two relative errors, each < 1e-3 here) are covered
// by a factor 1.001.
struct AttentionReference {
  torch::Tensor o, dq, dk, dv;      // exact, token-major as the kernels return them
  torch::Tensor eo, edq, edk, edv;  // bounds on |kernel - exact|
};

AttentionReference attention_reference(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                       const torch::Tensor& w, const torch::Tensor& allowed) {
  using dpo::testutil::gamma;
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), K = k.size(2), R = H / K;
  const double u = dpo::testutil::unit_roundoff(torch::kFloat32);
  const double c = 1.0 / std::sqrt(static_cast<double>(D));
  AttentionReference r;
  auto q64 = q.detach().to(torch::kFloat64).requires_grad_(true);
  auto k64 = k.detach().to(torch::kFloat64).requires_grad_(true);
  auto v64 = v.detach().to(torch::kFloat64).requires_grad_(true);
  auto qh = q64.transpose(1, 2), kh = k64.transpose(1, 2).repeat_interleave(R, 1),
       vh = v64.transpose(1, 2).repeat_interleave(R, 1);  // (B, H, T, D)
  auto S = torch::matmul(qh, kh.transpose(-1, -2)) * c;
  S = S.masked_fill(allowed.logical_not(), -INFINITY);
  auto P = torch::softmax(S, -1);
  auto Oh = torch::matmul(P, vh);
  auto w64 = w.to(torch::kFloat64);
  r.o = Oh.transpose(1, 2).detach();
  auto g = torch::autograd::grad({(Oh.transpose(1, 2) * w64).sum()}, {q64, k64, v64});
  r.dq = g[0], r.dk = g[1], r.dv = g[2];

  torch::NoGradGuard ng;
  const auto Qa = qh.detach().abs(), Ka = kh.detach().abs(), Va = vh.detach().abs();
  const auto dO = w64.transpose(1, 2), Wa = dO.abs();
  const auto Sd = S.detach(), Pd = P.detach(), Oa = Oh.detach().abs();
  const auto E_S = gamma(D + 2) * c * torch::matmul(Qa, Ka.transpose(-1, -2));
  const auto E_P = dpo::testutil::softmax_error_bound(Sd, -1) + Pd * (E_S + (Pd * E_S).sum(-1, true));
  const auto E_O = torch::matmul(E_P, Va) + gamma(T) * torch::matmul(Pd, Va);
  const auto dP = torch::matmul(dO, vh.detach().transpose(-1, -2));
  const auto E_dP = gamma(D) * torch::matmul(Wa, Va.transpose(-1, -2));
  const auto E_Dl = torch::max((E_P * dP.abs() + Pd * E_dP + gamma(T) * Pd * dP.abs()).sum(-1, true),
                               (gamma(D) * Wa * Oa + Wa * E_O).sum(-1, true));
  const auto G = dP - (Pd * dP).sum(-1, true);
  const auto dS = Pd * G;
  const auto E_dS = E_P * G.abs() + Pd * (E_dP + E_Dl) + 2 * u * Pd * G.abs();
  const auto E_dQ = c * (torch::matmul(E_dS, Ka) + gamma(T + 2) * torch::matmul(dS.abs(), Ka));
  auto per_kv = [&](const torch::Tensor& x) { return x.view({B, K, R, T, D}).sum(2); };  // (B, K, T, D)
  const auto E_dK = per_kv(c * (torch::matmul(E_dS.transpose(-1, -2), Qa) +
                                gamma(R * T + 2) * torch::matmul(dS.abs().transpose(-1, -2), Qa)));
  const auto E_dV = per_kv(torch::matmul(E_P.transpose(-1, -2), Wa) + gamma(R * T) * torch::matmul(Pd.transpose(-1, -2), Wa));
  r.eo = 1.001 * E_O.transpose(1, 2);
  r.edq = 1.001 * E_dQ.transpose(1, 2);
  r.edk = 1.001 * E_dK.transpose(1, 2);
  r.edv = 1.001 * E_dV.transpose(1, 2);
  return r;
}

// Chunked and dense on one layout, each against the float64 attention within the bound of
// its fp32 rounding: outputs and the gradients of a random linear function of them.
void compare_kernels(const AttentionLayout& L, int64_t H, int64_t K, int64_t D, uint64_t seed) {
  using dpo::testutil::expect_within;
  torch::manual_seed(seed);
  const int64_t B = L.rows, T = L.tokens;
  auto q = torch::randn({B, T, H, D}).requires_grad_(true);
  auto k = torch::randn({B, T, K, D}).requires_grad_(true);
  auto v = torch::randn({B, T, K, D}).requires_grad_(true);
  auto w = torch::randn({B, T, H, D});
  auto layout = std::make_shared<const AttentionLayout>(L);
  const torch::Tensor allowed = dpo::attention_layout_dense_mask(L);
  torch::Tensor oc = dpo::attention_chunked(q, k, v, layout);
  torch::Tensor od = dpo::attention_dense(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), allowed).transpose(1, 2);
  ASSERT_EQ(oc.sizes(), od.sizes());
  const AttentionReference ref = attention_reference(q, k, v, w, allowed);
  expect_within(oc, ref.o, ref.eo, "chunked o");
  expect_within(od, ref.o, ref.eo, "dense o");
  auto gc = torch::autograd::grad({(oc * w).sum()}, {q, k, v});
  auto gd = torch::autograd::grad({(od * w).sum()}, {q, k, v});
  const torch::Tensor want[3] = {ref.dq, ref.dk, ref.dv}, bound[3] = {ref.edq, ref.edk, ref.edv};
  const char* name[3] = {"dq", "dk", "dv"};
  for (int i = 0; i < 3; ++i) {
    expect_within(gc[i], want[i], bound[i], std::string("chunked ") + name[i]);
    expect_within(gd[i], want[i], bound[i], std::string("dense ") + name[i]);
  }
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
  // Two fp32 evaluations that differ in the attention kernel and so in the order of the
  // sums downstream: logits (#0) and LoRA gradients (tests/tiny_llama.h).
  for (size_t i = 0; i < d.size(); ++i)
    EXPECT_LT(rel_err(c[i], d[i]), dpo::testutil::llama_rel_tolerance(m->config(), 9, /*grads=*/i > 0)) << i;
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
      // The same positions in another layout: the sums run in another order (the shared row
      // is longer): the tolerance of two fp32 evaluations (tests/tiny_llama.h).
      const double tol = dpo::testutil::llama_rel_tolerance(m->config(), P + Cn + Rn);
      EXPECT_LT(rel_err(h.narrow(0, 0, P + Cn), hc), tol) << "kv " << kv;
      EXPECT_LT(rel_err(h.narrow(0, P + Cn, Rn), hr.narrow(0, P, Rn)), tol) << "kv " << kv;
    }
  }
}

}  // namespace
