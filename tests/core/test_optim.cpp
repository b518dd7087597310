// AdamW against a hand-written double-precision reference and torch::optim::AdamW,
// its state round trip, and clip_grad_norm against hand-computed norms.
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/optim/adamw.h>
#include <torch/types.h>

#include "core/optim.h"
#include "tests/fp_bounds.h"

namespace {

using torch::Tensor;

std::vector<double> to_vec(const Tensor& t) {
  Tensor c = t.detach().to(torch::kCPU, torch::kDouble).contiguous().reshape({-1});
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

// torch.optim.AdamW written out in double, one parameter, with a running bound (dp, dm,
// dv) on how far an fp32 implementation of the same steps may be from it (first-order
// error analysis, u = 2^-24): the constants (1 - lr wd, beta1, 1 - beta1, beta2, 1 - beta2,
// sqrt(bc2), eps, lr / bc1) are rounded to fp32 (u each), and each operation rounds once:
//   x = p (1 - lr wd)                 dx = dp + 2u |x|
//   m = b1 m + (1 - b1) g             dm' = b1 dm + 2u b1 |m| + 2u (1 - b1) |g| + u |m'|
//   v = b2 v + (1 - b2) g g           dv' = b2 dv + 2u b2 v + 3u (1 - b2) g^2 + u v'
//   s = sqrt(v)                       ds = dv / (2 s) + u s
//   d = s / sqrt(bc2) + eps           dd = (ds + 2u s) / sqrt(bc2) + u eps + u d
//   q = m / d                         dq = (dm + |m| dd / d) / d + u |q|
//   p' = x - (lr / bc1) q             dp' = dx + (lr / bc1) (dq + 2u |q|) + u |p'|
// That covers the fused loop (FMA-contracted or not), ATen's mul_/add_/addcmul_/addcdiv_
// and torch::optim::AdamW alike: the same operations in the same dependency order.
struct RefAdamW {
  explicit RefAdamW(std::vector<double> init) : p(std::move(init)), dp(p.size(), 0.0) {}
  std::vector<double> p, m, v;
  std::vector<double> dp, dm, dv;  // bounds on |fp32 - this|
  int64_t k = 0;
  void step(const std::vector<double>& g, double lr, double b1, double b2, double eps, double wd) {
    constexpr double u = 0x1p-24;
    if (m.empty()) m.assign(p.size(), 0.0), v.assign(p.size(), 0.0), dm.assign(p.size(), 0.0), dv.assign(p.size(), 0.0);
    ++k;
    for (size_t i = 0; i < p.size(); ++i) {
      const double m0 = m[i], v0 = v[i];
      p[i] *= 1 - lr * wd;
      m[i] = b1 * m[i] + (1 - b1) * g[i];
      v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
      const double bc1 = 1 - std::pow(b1, k), bc2 = 1 - std::pow(b2, k);
      const double s = std::sqrt(v[i]);
      const double denom = s / std::sqrt(bc2) + eps;
      const double q = m[i] / denom;
      const double dx = dp[i] + 2 * u * std::abs(p[i]);
      dm[i] = b1 * dm[i] + 2 * u * b1 * std::abs(m0) + 2 * u * (1 - b1) * std::abs(g[i]) + u * std::abs(m[i]);
      dv[i] = b2 * dv[i] + 2 * u * b2 * v0 + 3 * u * (1 - b2) * g[i] * g[i] + u * v[i];
      const double ds = (s > 0 ? dv[i] / (2 * s) : std::sqrt(dv[i])) + u * s;
      const double dd = (ds + 2 * u * s) / std::sqrt(bc2) + u * eps + u * denom;
      const double dq = (dm[i] + std::abs(m[i]) * dd / denom) / denom + u * std::abs(q);
      p[i] -= lr / bc1 * q;
      dp[i] = dx + lr / bc1 * (dq + 2 * u * std::abs(q)) + u * std::abs(p[i]);
    }
  }
};

// |a[i] - b[i]| <= bound[i]
void expect_within(const std::vector<double>& a, const std::vector<double>& b, const std::vector<double>& bound,
                   const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], bound[i]) << what << " [" << i << "]";
}

}  // namespace

TEST(AdamW, MatchesHandReferenceOverSeveralStepsWithWeightDecay) {
  torch::manual_seed(1);
  dpo::AdamWOptions o;
  o.beta1 = 0.9;
  o.beta2 = 0.95;
  o.eps = 1e-6;
  o.weight_decay = 0.1;
  Tensor a = torch::randn({7, 5});
  Tensor n = torch::randn({5});  // a norm weight: HF exempts it from weight decay
  dpo::AdamW opt({{"layers.0.self_attn.q_proj.lora_A.weight", a}, {"layers.0.input_layernorm.weight", n}}, o);
  RefAdamW ra{to_vec(a)}, rn{to_vec(n)};
  const double lrs[] = {1e-2, 5e-3, 2e-2, 0.0, 1e-3, 3e-2};
  for (double lr : lrs) {
    Tensor ga = torch::randn({7, 5}), gn = torch::randn({5}) * 1e-3;
    a.mutable_grad() = ga;
    n.mutable_grad() = gn;
    opt.step(lr);
    ra.step(to_vec(ga), lr, o.beta1, o.beta2, o.eps, o.weight_decay);
    rn.step(to_vec(gn), lr, o.beta1, o.beta2, o.eps, 0.0);
  }
  expect_within(to_vec(a), ra.p, ra.dp, "decayed param");
  expect_within(to_vec(n), rn.p, rn.dp, "norm param (no decay)");
  const auto st = opt.state();
  ASSERT_EQ(st.size(), 6u);
  EXPECT_EQ(st[0].first, "layers.0.self_attn.q_proj.lora_A.weight.exp_avg");
  expect_within(to_vec(st[0].second), ra.m, ra.dm, "exp_avg");
  expect_within(to_vec(st[1].second), ra.v, ra.dv, "exp_avg_sq");
  EXPECT_EQ(st[2].first, "layers.0.self_attn.q_proj.lora_A.weight.step");
  EXPECT_EQ(st[2].second.item<int64_t>(), 6);
}

TEST(AdamW, MatchesTorchOptimAdamW) {
  torch::manual_seed(2);
  Tensor init = torch::randn({64, 33});
  Tensor p_ours = init.clone(), p_torch = init.clone().set_requires_grad(true);
  dpo::AdamWOptions o;
  o.weight_decay = 0.05;
  dpo::AdamW ours({{"w", p_ours}}, o);
  torch::optim::AdamW theirs({p_torch}, torch::optim::AdamWOptions(1e-2).weight_decay(0.05));
  RefAdamW ref(to_vec(init));
  for (int s = 0; s < 8; ++s) {
    Tensor g = torch::randn({64, 33});
    p_ours.mutable_grad() = g.clone();
    p_torch.mutable_grad() = g.clone();
    ours.step(1e-2);
    theirs.step();
    ref.step(to_vec(g), 1e-2, o.beta1, o.beta2, o.eps, 0.05);
  }
  // Both within the fp32 bound of the same steps in double.
  expect_within(to_vec(p_ours), ref.p, ref.dp, "ours");
  expect_within(to_vec(p_torch), ref.p, ref.dp, "torch::optim::AdamW");
}

TEST(AdamW, AtenPathMatchesFusedLoop) {
  // A non-contiguous parameter takes the ATen path (the one CUDA tensors use).
  torch::manual_seed(3);
  Tensor base = torch::randn({6, 9});
  Tensor p_loop = base.t().contiguous();  // (9, 6) contiguous
  Tensor p_aten = base.clone().t();       // (9, 6) non-contiguous view
  ASSERT_FALSE(p_aten.is_contiguous());
  dpo::AdamWOptions o;
  o.weight_decay = 0.01;
  dpo::AdamW a({{"w", p_loop}}, o), b({{"w", p_aten}}, o);
  RefAdamW ref(to_vec(p_loop));
  for (int s = 0; s < 4; ++s) {
    Tensor g = torch::randn({9, 6});
    p_loop.mutable_grad() = g.clone();
    p_aten.mutable_grad() = g.clone();
    a.step(3e-3 * (s + 1));
    b.step(3e-3 * (s + 1));
    ref.step(to_vec(g), 3e-3 * (s + 1), o.beta1, o.beta2, o.eps, 0.01);
  }
  // Both within the fp32 bound of the same steps in double.
  expect_within(to_vec(p_loop), ref.p, ref.dp, "fused loop");
  expect_within(to_vec(p_aten), ref.p, ref.dp, "aten path");
}

TEST(AdamW, ParamWithoutGradIsSkipped) {
  Tensor a = torch::ones({3}), b = torch::ones({3});
  dpo::AdamW opt({{"a", a}, {"b", b}});
  a.mutable_grad() = torch::full({3}, 0.5);
  opt.step(0.1);
  EXPECT_EQ(opt.step_count(0), 1);
  EXPECT_EQ(opt.step_count(1), 0);
  EXPECT_TRUE(torch::equal(b, torch::ones({3})));
  // First Adam step moves by lr * m_hat / (sqrt(v_hat) + eps) = lr * g / (|g| + eps): 0.1
  // less lr eps / |g| = 2e-9, within the fp32 bound of that step.
  RefAdamW ref({1.0});
  ref.step({0.5}, 0.1, 0.9, 0.999, 1e-8, 0.0);
  EXPECT_NEAR(a[0].item<double>(), ref.p[0], ref.dp[0]);
  EXPECT_NEAR(ref.p[0], 1.0 - 0.1, 3e-9);
}

TEST(AdamW, ZeroGrad) {
  Tensor a = torch::ones({3});
  dpo::AdamW opt({{"a", a}});
  a.mutable_grad() = torch::full({3}, 2.0);
  const void* storage = a.grad().data_ptr();
  opt.zero_grad();
  ASSERT_TRUE(a.grad().defined());
  EXPECT_EQ(a.grad().data_ptr(), storage);  // kept in place
  EXPECT_EQ(a.grad().abs().sum().item<double>(), 0.0);
  opt.zero_grad(/*set_to_none=*/true);
  EXPECT_FALSE(a.grad().defined());
}

TEST(AdamW, StateRoundTripContinuesIdentically) {
  torch::manual_seed(4);
  Tensor x1 = torch::randn({4, 4}), y1 = torch::randn({2});
  dpo::AdamWOptions o;
  o.weight_decay = 0.02;
  dpo::AdamW first({{"x", x1}, {"y", y1}}, o);
  std::vector<Tensor> grads;
  for (int s = 0; s < 5; ++s) grads.push_back(torch::randn({4, 4})), grads.push_back(torch::randn({2}));
  for (int s = 0; s < 3; ++s) {
    x1.mutable_grad() = grads[2 * s];
    y1.mutable_grad() = grads[2 * s + 1];
    first.step(1e-2);
  }
  // "Checkpoint": params and optimizer state; a fresh optimizer resumes from them.
  Tensor x2 = x1.clone(), y2 = y1.clone();
  auto saved = first.state();
  std::reverse(saved.begin(), saved.end());  // order must not matter
  dpo::AdamW second({{"x", x2}, {"y", y2}}, o);
  second.load_state(saved);
  EXPECT_EQ(second.step_count(0), 3);
  for (int s = 3; s < 5; ++s) {
    x1.mutable_grad() = grads[2 * s];
    y1.mutable_grad() = grads[2 * s + 1];
    x2.mutable_grad() = grads[2 * s].clone();
    y2.mutable_grad() = grads[2 * s + 1].clone();
    first.step(1e-2);
    second.step(1e-2);
  }
  // Exact: the same fused loop on the same values (a resume is bit-exact).
  EXPECT_TRUE(torch::equal(x1, x2));
  EXPECT_TRUE(torch::equal(y1, y2));
}

TEST(AdamW, LoadStateNamesTheBadKey) {
  Tensor x = torch::zeros({4, 4});
  dpo::AdamW opt({{"x", x}});
  auto good = opt.state();
  auto expect_error = [&](std::vector<std::pair<std::string, Tensor>> st, const std::string& needle) {
    try {
      opt.load_state(st);
      FAIL() << "no error for " << needle;
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  auto missing = good;
  missing.erase(missing.begin() + 1);
  expect_error(missing, "x.exp_avg_sq");
  auto shape = good;
  shape[0].second = torch::zeros({16});
  expect_error(shape, "x.exp_avg");
  auto extra = good;
  extra.emplace_back("z.exp_avg", torch::zeros({1}));
  expect_error(extra, "z.exp_avg");
  // A failed load changes nothing.
  auto nonzero = good;
  nonzero[0].second = torch::ones({4, 4});
  nonzero.emplace_back("bogus", torch::zeros({1}));
  expect_error(nonzero, "bogus");
  EXPECT_EQ(opt.state()[0].second.abs().sum().item<double>(), 0.0);
}

TEST(AdamW, HfWeightDecayRule) {
  EXPECT_TRUE(dpo::hf_weight_decays("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
  EXPECT_TRUE(dpo::hf_weight_decays("model.layers.3.mlp.down_proj.lora_B.weight"));
  EXPECT_FALSE(dpo::hf_weight_decays("model.layers.0.input_layernorm.weight"));
  EXPECT_FALSE(dpo::hf_weight_decays("model.layers.0.post_attention_layernorm.weight"));
  EXPECT_FALSE(dpo::hf_weight_decays("model.norm.weight"));
  EXPECT_FALSE(dpo::hf_weight_decays("score.bias"));
}

TEST(AdamW, RejectsBadOptions) {
  Tensor x = torch::zeros({2});
  dpo::AdamWOptions o;
  o.beta1 = 1.0;
  EXPECT_THROW(dpo::AdamW({{"x", x}}, o), std::runtime_error);
  EXPECT_THROW(dpo::AdamW({{"x", x}, {"x", x}}), std::runtime_error);
  dpo::AdamW opt({{"x", x}});
  EXPECT_THROW(opt.step(-1.0), std::runtime_error);
}

TEST(ClipGradNorm, HandComputedNorm) {
  Tensor a = torch::zeros({2}), b = torch::zeros({1}), c = torch::zeros({3});
  a.mutable_grad() = torch::tensor({3.0f, 4.0f});
  b.mutable_grad() = torch::tensor({12.0f});
  // c has no grad: skipped.
  const double norm = dpo::clip_grad_norm({a, b, c}, 1.0);
  EXPECT_EQ(norm, 13.0);  // exact: integer squares summed in double, sqrt(169)
  // Each grad times the coefficient rounded to fp32: 2u.
  const double coef = 1.0 / (13.0 + 1e-6), g2 = dpo::testutil::gamma(2);
  EXPECT_NEAR(a.grad()[0].item<double>(), 3 * coef, g2 * 3 * coef);
  EXPECT_NEAR(a.grad()[1].item<double>(), 4 * coef, g2 * 4 * coef);
  EXPECT_NEAR(b.grad()[0].item<double>(), 12 * coef, g2 * 12 * coef);
  // The clipped norm is (just under) max_norm: 13 / (13 + 1e-6), from grads within 2u.
  EXPECT_NEAR(dpo::clip_grad_norm({a, b}, 0.0), 13 * coef, g2 * 13 * coef);
}

TEST(ClipGradNorm, NoClipBelowMaxOrWhenDisabled) {
  Tensor a = torch::zeros({2});
  a.mutable_grad() = torch::tensor({3.0f, 4.0f});
  // Exact: 9 + 16 in double, sqrt(25).
  EXPECT_EQ(dpo::clip_grad_norm({a}, 5.1), 5.0);
  EXPECT_EQ(dpo::clip_grad_norm({a}, 0.0), 5.0);
  EXPECT_EQ(dpo::clip_grad_norm({a}, -1.0), 5.0);
  EXPECT_EQ(a.grad()[0].item<float>(), 3.0f);
  EXPECT_EQ(a.grad()[1].item<float>(), 4.0f);
}

TEST(ClipGradNorm, NonFiniteIsReportedNotApplied) {
  Tensor a = torch::zeros({2}), b = torch::zeros({2});
  a.mutable_grad() = torch::tensor({1.0f, std::numeric_limits<float>::quiet_NaN()});
  b.mutable_grad() = torch::tensor({100.0f, 0.0f});
  EXPECT_TRUE(std::isnan(dpo::clip_grad_norm({a, b}, 1.0)));
  EXPECT_EQ(b.grad()[0].item<float>(), 100.0f);  // not scaled
  a.mutable_grad() = torch::tensor({1.0f, std::numeric_limits<float>::infinity()});
  EXPECT_TRUE(std::isinf(dpo::clip_grad_norm({a, b}, 1.0)));
  EXPECT_EQ(b.grad()[0].item<float>(), 100.0f);
}

TEST(ClipGradNorm, LargeRandomMatchesDoubleAndAtenPath) {
  torch::manual_seed(5);
  Tensor a = torch::zeros({300, 200}), b = torch::zeros({200, 300});
  a.mutable_grad() = torch::randn({300, 200});
  Tensor gb = torch::randn({300, 200});
  b.mutable_grad() = gb.t();  // non-contiguous: ATen path
  double sq = 0;
  for (double x : to_vec(a.grad())) sq += x * x;
  for (double x : to_vec(b.grad())) sq += x * x;
  Tensor a0 = a.grad().clone(), b0 = b.grad().clone();
  const double norm = dpo::clip_grad_norm({a, b}, 2.0);
  // Squares of fp32 values are exact in double; 120000 of them summed in any order (threads,
  // ATen's reduction): gamma_fp64(n) sq; the sqrt halves that and rounds once.
  const double n = 2 * 60000;
  EXPECT_NEAR(norm, std::sqrt(sq), (dpo::testutil::gamma(n, torch::kDouble) / 2 + 0x1p-53) * std::sqrt(sq));
  const double coef = 2.0 / (norm + 1e-6), g2 = dpo::testutil::gamma(2);
  // Each grad times the coefficient rounded to fp32 (the ATen path: the product in fp32): 2u.
  dpo::testutil::expect_within(a.grad(), a0.to(torch::kDouble) * coef, g2 * (a0.to(torch::kDouble) * coef).abs(), "a");
  dpo::testutil::expect_within(b.grad(), b0.to(torch::kDouble) * coef, g2 * (b0.to(torch::kDouble) * coef).abs(), "b");
}
