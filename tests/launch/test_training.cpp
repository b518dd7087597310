// Integration tests of the QLoRA + DPO training path in one process: a tiny random
// Llama (NF4 or dense base) with LoRA adapters, hand-made preference batches, the
// DPO objective, AdamW, gradient accumulation, activation checkpointing, merging and
// PEFT round trips, and finally dpo::train itself with a FakeCommunicator.
//
// Legend: B pairs, R = 2B rows, T tokens per row, V vocabulary.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/autograd.h>
#include <torch/types.h>

#include "core/dpo.h"
#include "core/linear.h"
#include "core/llama.h"
#include "core/lora.h"
#include "core/safetensors.h"
#include "core/modules_to_save.h"
#include "core/optim.h"
#include "data/collate.h"
#include "data/preference_h5.h"
#include "data/tokenizer_info.h"
#include "dist/fake_communicator.h"
#include "launch/model_setup.h"
#include "launch/scoring.h"
#include "launch/train_options.h"
#include "launch/trainer.h"
#include "tests/fp_bounds.h"
#include "tests/test_util.h"
#include "tests/tiny_llama.h"

namespace dpo {
namespace {

namespace fs = std::filesystem;
using testutil::TempDir;

constexpr int64_t kBos = 1, kEos = 2, kPad = 2;  // Llama ids; pad = eos as the preference files store it

LlamaConfig tiny_config(int64_t vocab = 64) {
  LlamaConfig c = testutil::tiny_llama_config(vocab);
  c.max_position_embeddings = 128;
  return llama_config_checked(c);
}

LlamaModel tiny_model(bool nf4, uint64_t seed = 7, int64_t vocab = 64) {
  QuantOptions q;
  q.load_in_4bit = nf4;
  return llama_init_random(tiny_config(vocab), seed, q);
}

LoraConfig lora_cfg(double dropout = 0.0) {
  LoraConfig c;
  c.r = 4;
  c.alpha = 8;
  c.dropout = dropout;
  c.target_modules = {"all-linear"};
  return c;
}

/// Preference triples with varied lengths (so collated batches are right-padded).
std::vector<PreferenceExample> make_examples(int64_t n, uint64_t seed, int64_t vocab = 64) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> tok(3, static_cast<int32_t>(vocab - 1));
  std::vector<PreferenceExample> out;
  for (int64_t i = 0; i < n; ++i) {
    PreferenceExample e;
    e.index = i;
    const int64_t lp = 2 + static_cast<int64_t>(rng() % 4), lc = 1 + static_cast<int64_t>(rng() % 5),
                  lr = 1 + static_cast<int64_t>(rng() % 5);
    e.prompt.push_back(static_cast<int32_t>(kBos));
    for (int64_t k = 1; k < lp; ++k) e.prompt.push_back(tok(rng));
    for (int64_t k = 0; k < lc; ++k) e.chosen.push_back(tok(rng));
    e.chosen.push_back(static_cast<int32_t>(kEos));
    for (int64_t k = 0; k < lr; ++k) e.rejected.push_back(tok(rng));
    e.rejected.push_back(static_cast<int32_t>(kEos));
    out.push_back(std::move(e));
  }
  return out;
}

NamedLinears projections(LlamaModel& m) { return m->named_projections(); }

/// Reference (adapters off) logits, no grad.
torch::Tensor ref_logits(LlamaModel& m, const PreferenceBatch& b) {
  torch::NoGradGuard ng;
  auto named = projections(m);
  lora_set_enabled(named, false);
  torch::Tensor l = m->forward(b.input_ids, b.attention_mask);
  lora_set_enabled(named, true);
  return l;
}

/// Reference sequence log-probs as the trainer computes them in-line: (2B) fp64.
torch::Tensor ref_logps(LlamaModel& m, const PreferenceBatch& b) {
  return sequence_logps(ref_logits(m, b), b.input_ids, b.loss_mask).logps.to(torch::kFloat64);
}

/// Sets every lora_B to N(0, std) drawn from a generator seeded with `seed`.
void randomize_lora_b(LlamaModel& m, uint64_t seed, double std) {
  torch::NoGradGuard ng;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  for (auto& [name, lin] : projections(m)) {
    if (!lin->has_lora()) continue;
    torch::Tensor& B = lin->lora_B();
    B.copy_(at::randn(B.sizes(), gen, B.options()) * std);
  }
}

std::vector<torch::Tensor> lora_tensors(LlamaModel& m) {
  std::vector<torch::Tensor> out;
  for (auto& p : lora_parameters(projections(m))) out.push_back(p.second);
  return out;
}

void zero_grads(const std::vector<torch::Tensor>& ps) {
  for (auto p : ps)
    if (p.grad().defined()) p.mutable_grad() = torch::Tensor();
}

/// The grads of ps flattened into one fp64 vector (zeros for undefined grads).
torch::Tensor flat_grad(const std::vector<torch::Tensor>& ps) {
  std::vector<torch::Tensor> parts;
  for (const auto& p : ps)
    parts.push_back(p.grad().defined() ? p.grad().reshape({-1}).to(torch::kFloat64)
                                       : torch::zeros({p.numel()}, torch::kFloat64));
  return torch::cat(parts);
}

double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>();
}

// Tolerances (tests/fp_bounds.h, tests/tiny_llama.h): two fp32 evaluations of the tiny
// model that differ in the order of their sums (batch shape, padding, micro-batches) give
// logits within llama_rel_tolerance of the largest |logit|; a scored token's log-prob moves
// by at most twice a logit's error (its logit and the log-sum-exp, 1-Lipschitz in the max
// norm), a row's by its token count times that.
std::vector<double> logps_tolerance(LlamaModel& m, const PreferenceBatch& b) {
  const double scale = ref_logits(m, b).abs().max().item<double>();
  const double tol = testutil::llama_rel_tolerance(m->config(), b.input_ids.size(1)) * scale;
  const torch::Tensor counts = b.loss_mask.narrow(1, 1, b.loss_mask.size(1) - 1).ne(0).sum(1).to(torch::kFloat64);
  const torch::Tensor t = 2 * tol * counts;
  return std::vector<double>(t.data_ptr<double>(), t.data_ptr<double>() + t.numel());
}

double max_of(const std::vector<double>& v) { return *std::max_element(v.begin(), v.end()); }

// max |a - b| / max |b|
double rel_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>() / b.abs().max().item<double>();
}

// -log sigmoid(0) = log1p(exp(0)): exp(0) = 1 exactly, log1p within 1 ulp (2u); a mean of
// B equal values (B - 1 additions): gamma(B + 1) ln 2.
double ln2_bound(int64_t B) { return testutil::gamma(static_cast<double>(B + 1)) * std::log(2.0); }

/// DPO loss (mean over pairs) of the policy on b against ref.
DpoStepLoss policy_loss(LlamaModel& m, const PreferenceBatch& b, const torch::Tensor& ref, const DpoOptions& o) {
  torch::Tensor logits = m->forward(b.input_ids, b.attention_mask);
  return dpo_batch_loss(logits, b.input_ids, b.loss_mask, ref, o);
}

// ---- 1. the reference model is the policy with adapters off -------------------

TEST(Training, FreshLoraIsBitwiseTheReferenceAndBaseStaysFrozen) {
  LlamaModel base = tiny_model(/*nf4=*/true);  // no adapters at all
  LlamaModel m = tiny_model(/*nf4=*/true);
  lora_attach(projections(m), lora_cfg(), 11);
  m->train();
  base->train();
  PreferenceBatch b = collate_pairs(make_examples(3, 1), kPad);

  torch::Tensor base_logits, on, off;
  {
    torch::NoGradGuard ng;
    base_logits = base->forward(b.input_ids, b.attention_mask);
    on = m->forward(b.input_ids, b.attention_mask);
  }
  off = ref_logits(m, b);
  ASSERT_EQ(on.sizes(), base_logits.sizes());
  EXPECT_TRUE(torch::equal(on, off)) << "B = 0 must add exactly nothing: max diff " << max_abs_diff(on, off);
  EXPECT_TRUE(torch::equal(off, base_logits)) << "max diff " << max_abs_diff(off, base_logits);

  // Train a few steps: B becomes nonzero; the NF4 base must not move.
  DpoOptions o;
  AdamW opt(lora_parameters(projections(m)));
  torch::Tensor ref = ref_logps(m, b);
  for (int s = 0; s < 3; ++s) {
    DpoStepLoss l = policy_loss(m, b, ref, o);
    l.loss.backward();
    opt.step(1e-2);
    opt.zero_grad();
  }
  double bnorm = 0;
  for (auto& [name, lin] : projections(m)) bnorm += lin->lora_B().abs().sum().item<double>();
  EXPECT_GT(bnorm, 0.0);
  torch::Tensor off2 = ref_logits(m, b), on2;
  {
    torch::NoGradGuard ng;
    on2 = m->forward(b.input_ids, b.attention_mask);
  }
  EXPECT_TRUE(torch::equal(off2, base_logits)) << "adapters-off logits drifted: " << max_abs_diff(off2, base_logits);
  EXPECT_GT(max_abs_diff(on2, base_logits), 1e-4);
}

// ---- 2. first DPO step ---------------------------------------------------------

TEST(Training, FirstDpoStepIsLn2WithZeroRewards) {
  LlamaModel m = tiny_model(true);
  lora_attach(projections(m), lora_cfg(/*dropout=*/0.1), 11);  // dropout: B = 0 still adds exactly 0
  m->train();
  PreferenceBatch b = collate_pairs(make_examples(4, 2), kPad);
  DpoOptions o;
  o.beta = 0.1;
  DpoStepLoss l = policy_loss(m, b, ref_logps(m, b), o);
  EXPECT_NEAR(l.loss.item<double>(), std::log(2.0), ln2_bound(4));
  EXPECT_EQ(l.losses.size(0), 4);
  EXPECT_EQ(l.metrics.pairs, 4);
  EXPECT_EQ(l.metrics.rewards_chosen_sum, 0.0);
  EXPECT_EQ(l.metrics.rewards_rejected_sum, 0.0);
  EXPECT_EQ(l.metrics.rewards_margins_sum, 0.0);
  EXPECT_EQ(l.metrics.rewards_accuracies_sum, 0.0);  // chosen > rejected is false for ties
  EXPECT_NEAR(l.metrics.loss_sum, 4 * std::log(2.0), 4 * ln2_bound(1));  // 4 fp32 losses summed in fp64
  // The gradient is not zero (B's gradient: A x is nonzero), so training can start.
  l.loss.backward();
  EXPECT_GT(flat_grad(lora_tensors(m)).abs().max().item<double>(), 0.0);
}

// ---- 3. gradients vs finite differences ---------------------------------------

TEST(Training, LoraGradientsMatchFiniteDifferences) {
  // The model computes in fp32 only (LlamaModel refuses float64), so: fp32 forward,
  // fp64 accumulation of the loss, eps 1e-2 central differences, a loose tolerance.
  LlamaModel m = tiny_model(true);
  lora_attach(projections(m), lora_cfg(), 11);
  randomize_lora_b(m, 5, 0.3);  // B != 0: A gets gradients too
  m->eval();                      // no dropout
  PreferenceBatch b = collate_pairs(make_examples(3, 3), kPad);
  DpoOptions o;
  o.beta = 1.0;  // a larger reward scale: the loss moves more per step of eps
  torch::Tensor ref = ref_logps(m, b);
  auto params = lora_parameters(projections(m));
  zero_grads(lora_tensors(m));
  DpoStepLoss l = policy_loss(m, b, ref, o);
  l.loss.backward();
  auto loss_at = [&]() {
    torch::NoGradGuard ng;
    return policy_loss(m, b, ref, o).losses.to(torch::kFloat64).mean().item<double>();
  };
  const double eps = 1e-2;
  int checked_a = 0, checked_b = 0;
  // Per parameter: the two coordinates with the largest |grad| (well above fp32 noise).
  for (size_t pi = 0; pi < params.size(); pi += 3) {
    auto& [name, p] = params[pi];
    torch::Tensor g = p.grad().reshape({-1});
    auto top = std::get<1>(g.abs().topk(2));
    for (int64_t k = 0; k < 2; ++k) {
      const int64_t idx = top[k].item<int64_t>();
      const double analytic = g[idx].item<double>();
      torch::Tensor flat = p.detach().view({-1});
      const float orig = flat[idx].item<float>();
      flat[idx].fill_(orig + eps);
      const double lp = loss_at();
      flat[idx].fill_(orig - eps);
      const double lm = loss_at();
      flat[idx].fill_(orig);
      const double fd = (lp - lm) / (2 * eps);
      // Statistical: the fp32 model's loss carries rounding noise (uncorrelated between the
      // two evaluations: other parameter values) divided by 2 eps, and eps^2 / 6 times the
      // third derivative; neither is a worst-case bound (that would swamp the check). The
      // tolerance is a margin over the noise seen in every CPU setting (AVX-512, AVX2,
      // ATen's scalar kernels, MKL limited to AVX2): at most 0.14 of it used.
      testutil::expect_near(fd, analytic, 5e-4 + 5e-3 * std::abs(analytic), name + "[" + std::to_string(idx) + "]");
      (name.find("lora_A") != std::string::npos ? checked_a : checked_b)++;
    }
  }
  EXPECT_GT(checked_a, 0);
  EXPECT_GT(checked_b, 0);
  // And one random direction through all LoRA parameters at once.
  auto gen = at::make_generator<at::CPUGeneratorImpl>(99);
  std::vector<torch::Tensor> dirs;
  double dot = 0, dnorm2 = 0;
  for (auto& [name, p] : params) {
    dirs.push_back(at::randn(p.sizes(), gen, p.options()));
    dnorm2 += dirs.back().to(torch::kFloat64).pow(2).sum().item<double>();
  }
  for (size_t i = 0; i < params.size(); ++i) {
    dirs[i] /= std::sqrt(dnorm2);  // a unit direction: the step h is a distance
    dot += (dirs[i].to(torch::kFloat64) * params[i].second.grad().to(torch::kFloat64)).sum().item<double>();
  }
  auto shift = [&](double s) {
    torch::NoGradGuard ng;
    for (size_t i = 0; i < params.size(); ++i) params[i].second.add_(dirs[i] * s);
  };
  const double h = 1e-2;
  shift(h);
  const double lp = loss_at();
  shift(-2 * h);
  const double lm = loss_at();
  shift(h);
  testutil::expect_near((lp - lm) / (2 * h), dot, 1e-2 * std::abs(dot) + 5e-4, "random direction");  // as above
  EXPECT_GT(std::abs(dot), 1e-2);
}

// ---- 4. precomputed reference log-probs ----------------------------------------

TEST(Training, PrecomputedRefLogpsGiveTheInlineLoss) {
  LlamaModel m = tiny_model(true);
  lora_attach(projections(m), lora_cfg(), 11);
  randomize_lora_b(m, 6, 0.3);  // a policy != reference: the loss is not ln 2
  m->eval();
  auto ex = make_examples(4, 4);
  PreferenceBatch b = collate_pairs(ex, kPad);
  DpoOptions o;
  torch::Tensor inline_ref = ref_logps(m, b);
  double inline_loss;
  {
    torch::NoGradGuard ng;
    inline_loss = policy_loss(m, b, inline_ref, o).loss.item<double>();
  }
  EXPECT_GT(std::abs(inline_loss - std::log(2.0)), 1e-4);

  // Store them as a preference file would (fp64 columns), read back through collate.
  TempDir dir("dpo_training");
  const std::string h5 = dir.file("pairs.h5");
  PreferenceAttrs a;
  a.vocab_size = 64;
  a.bos_id = kBos;
  a.eos_id = kEos;
  a.pad_id = kPad;
  a.tokenizer_sha256 = std::string(64, '0');
  a.max_length = 64;
  a.max_prompt_length = 32;
  {
    PreferenceWriter w(h5, a);
    for (const auto& e : ex) w.append(e.prompt, e.chosen, e.rejected);
    w.close();
  }
  // (a) the in-line values of this batch
  std::vector<double> c(4), r(4);
  for (int64_t i = 0; i < 4; ++i) {
    c[i] = inline_ref[i].item<double>();
    r[i] = inline_ref[4 + i].item<double>();
  }
  write_ref_logps(h5, c, r);
  {
    PreferenceReader rd(h5);
    ASSERT_TRUE(rd.has_ref_logps());
    PreferenceBatch bf = collate_pairs(rd.get_batch({0, 1, 2, 3}), kPad);
    ASSERT_TRUE(bf.ref_logps.defined());
    EXPECT_TRUE(torch::equal(bf.ref_logps, inline_ref));
    torch::NoGradGuard ng;
    EXPECT_EQ(policy_loss(m, bf, bf.ref_logps, o).loss.item<double>(), inline_loss);
  }
  // (b) as dpo_dist --precompute_ref_log_probs computes them: score_examples, one
  // example per batch (other padding than the training batch), adapters off.
  LoadedModel lm;
  lm.model = m;
  lm.projections = projections(m);
  {
    PreferenceReader rd(h5);
    auto scores = score_examples(lm, rd, {0, 1, 2, 3}, /*batch_size=*/1, /*adapters=*/false);
    ASSERT_EQ(scores.size(), 4u);
    // Other batch shapes: each row within the two-evaluation tolerance of its log-prob.
    const std::vector<double> tol = logps_tolerance(m, b);
    for (int64_t i = 0; i < 4; ++i) {
      testutil::expect_near(scores[i].chosen_logps, c[i], tol[i], "chosen " + std::to_string(i));
      testutil::expect_near(scores[i].rejected_logps, r[i], tol[4 + i], "rejected " + std::to_string(i));
      c[i] = scores[i].chosen_logps;
      r[i] = scores[i].rejected_logps;
    }
  }
  write_ref_logps(h5, c, r);
  PreferenceReader rd(h5);
  PreferenceBatch bf = collate_pairs(rd.get_batch({0, 1, 2, 3}), kPad);
  torch::NoGradGuard ng;
  // The policy's log-probs are the same values (the same batch and kernels); the reference
  // moved by the tolerance above, which the loss (slope <= beta in each pair's log-ratio)
  // carries over, plus the fp32 evaluation of the pair losses (as test_dpo's
  // pair_loss_rounding: the log-ratio's 3u sum |logp|, (2 kExpUlps + 2 kLogUlps + 8) u).
  {
    const std::vector<double> tol = logps_tolerance(m, b);
    double bound = 0;
    for (int64_t i = 0; i < 4; ++i)
      bound += (o.beta * (tol[i] + tol[4 + i] + 3 * 0x1p-24 * 4 * (std::abs(c[i]) + std::abs(r[i]))) +
                (2 * testutil::kExpUlps + 2 * testutil::kLogUlps + 8) * 0x1p-24 * (1 + inline_loss)) / 4;
    testutil::expect_near(policy_loss(m, bf, bf.ref_logps, o).loss.item<double>(), inline_loss, bound, "loss");
  }
  // The adapters are back on after scoring.
  for (auto& [name, lin] : projections(m)) EXPECT_TRUE(lin->lora_enabled()) << name;
}

// ---- 5. optimisation lowers the losses -----------------------------------------

TEST(Training, AdamWStepsLowerDpoAndSftLoss) {
  PreferenceBatch b = collate_pairs(make_examples(4, 5), kPad);
  {
    LlamaModel m = tiny_model(true);
    lora_attach(projections(m), lora_cfg(), 11);
    m->train();
    DpoOptions o;
    torch::Tensor ref = ref_logps(m, b);
    AdamW opt(lora_parameters(projections(m)));
    std::vector<double> losses;
    for (int s = 0; s < 8; ++s) {
      DpoStepLoss l = policy_loss(m, b, ref, o);
      losses.push_back(l.loss.item<double>());
      l.loss.backward();
      opt.step(1e-2);
      opt.zero_grad();
    }
    EXPECT_NEAR(losses.front(), std::log(2.0), ln2_bound(4));
    // Learning checks, not rounding: the loss falls 0.69 -> 0.13 over the 8 steps and by
    // >= 0.02 at each (every CPU setting), so 0.05 and the 1e-6 slack are far from thin.
    EXPECT_LT(losses.back(), losses.front() - 0.05) << "DPO loss " << losses.front() << " -> " << losses.back();
    for (size_t i = 1; i < losses.size(); ++i) EXPECT_LT(losses[i], losses[i - 1] + 1e-6) << "step " << i;
  }
  {
    LlamaModel m = tiny_model(true);
    lora_attach(projections(m), lora_cfg(), 11);
    m->train();
    SftBatch sb = collate_sft(make_examples(4, 5), kPad);
    AdamW opt(lora_parameters(projections(m)));
    double first = 0, last = 0;
    for (int s = 0; s < 8; ++s) {
      SftLoss l = sft_loss(m->forward(sb.input_ids, sb.attention_mask), sb.input_ids, sb.loss_mask);
      ASSERT_GT(l.tokens, 0);
      torch::Tensor mean = l.nll_sum / static_cast<double>(l.tokens);
      (s == 0 ? first : last) = mean.item<double>();
      mean.backward();
      opt.step(1e-2);
      opt.zero_grad();
    }
    EXPECT_LT(last, first - 0.1) << "SFT loss " << first << " -> " << last;  // learning: 5.1 -> 2.1 here
  }
}

// ---- 6. gradient accumulation ---------------------------------------------------

TEST(Training, AccumulatedMicroBatchesEqualOneBigBatch) {
  LlamaModel m = tiny_model(true);
  lora_attach(projections(m), lora_cfg(), 11);
  randomize_lora_b(m, 8, 0.2);
  m->eval();
  auto ex = make_examples(6, 6);
  DpoOptions o;
  auto ps = lora_tensors(m);
  // Micro-batches of unequal sizes (as the last one of an epoch can be): averaging
  // each micro-batch's mean loss would weight pairs unequally; the trainer's scaling,
  // losses.sum() * world / global_pairs (world = 1), must not. Each micro-batch is
  // padded to its own longest row, the big batch to the longest of all.
  const std::vector<int64_t> sizes{1, 2, 3};
  const int64_t total = 6;
  zero_grads(ps);
  double acc_loss = 0;
  int64_t start = 0;
  for (int64_t n : sizes) {
    std::vector<PreferenceExample> mb(ex.begin() + start, ex.begin() + start + n);
    start += n;
    PreferenceBatch b = collate_pairs(mb, kPad);
    DpoStepLoss l = policy_loss(m, b, ref_logps(m, b), o);
    (l.losses.sum() * (1.0 / static_cast<double>(total))).backward();
    acc_loss += l.metrics.loss_sum;
  }
  torch::Tensor g_acc = flat_grad(ps);

  zero_grads(ps);
  PreferenceBatch big = collate_pairs(ex, kPad);
  DpoStepLoss l = policy_loss(m, big, ref_logps(m, big), o);
  l.loss.backward();
  torch::Tensor g_big = flat_grad(ps);

  // Different batch shapes reorder the sums: the policy's and the reference's log-probs each
  // within the two-evaluation tolerance (the loss's slope in each is <= beta), and the pair
  // losses' evaluation as above; the gradients within the model's tolerance for gradients
  // (a wrong scaling is off by tens of percent).
  {
    const std::vector<double> tol = logps_tolerance(m, big);
    double bound = 0;
    for (int64_t i = 0; i < total; ++i)
      bound += (2 * o.beta * (tol[i] + tol[total + i]) +
                (2 * testutil::kExpUlps + 2 * testutil::kLogUlps + 20) * 0x1p-24 * (1 + l.loss.item<double>())) / total;
    testutil::expect_near(acc_loss / total, l.loss.item<double>(), bound, "loss");
  }
  const double rel = rel_diff(g_acc, g_big);
  EXPECT_LT(rel, testutil::llama_rel_tolerance(m->config(), big.input_ids.size(1), /*grads=*/true))
      << "relative gradient difference " << rel;
  // The scaling matters: the mean of per-micro-batch means is a different gradient.
  zero_grads(ps);
  start = 0;
  for (int64_t n : sizes) {
    std::vector<PreferenceExample> mb(ex.begin() + start, ex.begin() + start + n);
    start += n;
    PreferenceBatch b = collate_pairs(mb, kPad);
    (policy_loss(m, b, ref_logps(m, b), o).loss * (1.0 / static_cast<double>(sizes.size()))).backward();
  }
  EXPECT_GT((flat_grad(ps) - g_big).norm().item<double>() / g_big.norm().item<double>(), 1e-2);
  EXPECT_GT(g_big.norm().item<double>(), 1e-4);
}

TEST(Training, RightPaddingDoesNotChangeLogpsOrGradients) {
  LlamaModel m = tiny_model(true);
  lora_attach(projections(m), lora_cfg(), 11);
  randomize_lora_b(m, 9, 0.2);
  m->eval();
  auto ex = make_examples(2, 7);
  PreferenceBatch b = collate_pairs(ex, kPad);
  // The same batch with 5 extra columns of padding.
  const int64_t R = b.input_ids.size(0), pad = 5;
  PreferenceBatch p = b;
  p.input_ids = torch::cat({b.input_ids, torch::full({R, pad}, kPad, torch::kInt64)}, 1);
  p.attention_mask = torch::cat({b.attention_mask, torch::zeros({R, pad}, torch::kInt64)}, 1);
  p.loss_mask = torch::cat({b.loss_mask, torch::zeros({R, pad}, torch::kFloat32)}, 1);
  DpoOptions o;
  auto ps = lora_tensors(m);
  zero_grads(ps);
  DpoStepLoss l1 = policy_loss(m, b, ref_logps(m, b), o);
  l1.loss.backward();
  torch::Tensor g1 = flat_grad(ps);
  zero_grads(ps);
  DpoStepLoss l2 = policy_loss(m, p, ref_logps(m, p), o);
  l2.loss.backward();
  torch::Tensor g2 = flat_grad(ps);
  // Wider rows: other GEMM shapes, the two-evaluation tolerances.
  const std::vector<double> tol = logps_tolerance(m, p);
  const int64_t B = l1.chosen_logps.size(0);
  for (int64_t i = 0; i < B; ++i) {
    testutil::expect_near(l2.chosen_logps[i].item<double>(), l1.chosen_logps[i].item<double>(), tol[i], "chosen");
    testutil::expect_near(l2.rejected_logps[i].item<double>(), l1.rejected_logps[i].item<double>(), tol[B + i], "rejected");
  }
  EXPECT_LT(rel_diff(g2, g1), testutil::llama_rel_tolerance(m->config(), p.input_ids.size(1), /*grads=*/true));
}

// ---- 7. activation checkpointing -----------------------------------------------

TEST(Training, CheckpointingGivesIdenticalGradientsWithDropout) {
  LlamaModel m = tiny_model(true);
  lora_attach(projections(m), lora_cfg(/*dropout=*/0.2), 11);
  randomize_lora_b(m, 10, 0.2);
  m->train();
  PreferenceBatch b = collate_pairs(make_examples(3, 8), kPad);
  DpoOptions o;
  torch::Tensor ref = ref_logps(m, b);
  auto ps = lora_tensors(m);
  auto grads = [&](bool ckpt, uint64_t seed) {
    m->set_gradient_checkpointing(ckpt);
    zero_grads(ps);
    torch::manual_seed(seed);
    DpoStepLoss l = policy_loss(m, b, ref, o);
    l.loss.backward();
    return std::make_pair(l.loss.item<double>(), flat_grad(ps));
  };
  auto [loss_plain, g_plain] = grads(false, 1234);
  auto [loss_ckpt, g_ckpt] = grads(true, 1234);
  auto [loss_other, g_other] = grads(false, 4321);
  m->set_gradient_checkpointing(false);
  // Exact: the recomputation replays the forward's ops on the same values and RNG state.
  EXPECT_EQ(loss_plain, loss_ckpt);
  EXPECT_TRUE(torch::equal(g_plain, g_ckpt)) << "max diff " << max_abs_diff(g_plain, g_ckpt);
  // Dropout is active (another seed, other gradients), so the comparison means something.
  EXPECT_GT(max_abs_diff(g_plain, g_other), 1e-6);
}

// ---- 8. merge and PEFT round trips ---------------------------------------------

torch::Tensor logits_of(LlamaModel& m, const PreferenceBatch& b) {
  torch::NoGradGuard ng;
  m->eval();
  return m->forward(b.input_ids, b.attention_mask);
}

TEST(Training, MergedModelSavedAndReloadedMatchesAdapterModel) {
  PreferenceBatch b = collate_pairs(make_examples(3, 9), kPad);
  TempDir dir("dpo_training");
  LlamaModel m = tiny_model(/*nf4=*/false);
  LoraConfig lc = lora_cfg();
  lora_attach(projections(m), lc, 11);
  randomize_lora_b(m, 12, 0.3);
  torch::Tensor with_adapter = logits_of(m, b);
  torch::Tensor base_only = ref_logits(m, b);
  ASSERT_GT(max_abs_diff(with_adapter, base_only), 1e-3);

  // PEFT round trip into a fresh model with the same base.
  lora_save_peft(projections(m), lc, dir.file("adapter"), "tiny");
  LlamaModel fresh = tiny_model(false);
  LoraConfig loaded = lora_load_peft(projections(fresh), dir.file("adapter"));
  EXPECT_EQ(loaded.r, lc.r);
  EXPECT_TRUE(torch::equal(logits_of(fresh, b), with_adapter));  // exact: the same values, ops and shapes

  // Merge, save as a HF model, load dense fp32.
  lora_merge(projections(m));
  EXPECT_TRUE(lora_parameters(projections(m)).empty());
  llama_save_hf(m, dir.file("merged"), torch::kFloat32, 0);
  QuantOptions q;  // dense fp32
  LlamaModel reloaded = llama_load(dir.file("merged"), q);
  // Merged weights W + s B A round once more per entry (r + 2 roundings relative to |W| +
  // s |B| |A|, test_lora), on each of the ~5 projections a logit's chain passes per layer;
  // otherwise two fp32 evaluations of the model.
  const double merge_tol = testutil::llama_rel_tolerance(m->config(), b.input_ids.size(1), false,
                                                         5.0 * m->config().num_hidden_layers * (lc.r + 2)) *
                           with_adapter.abs().max().item<double>();
  EXPECT_LT(max_abs_diff(logits_of(reloaded, b), with_adapter), merge_tol);
  EXPECT_LT(max_abs_diff(logits_of(m, b), with_adapter), merge_tol);
}

TEST(Training, PeftRoundTripOnNf4BaseIsExact) {
  PreferenceBatch b = collate_pairs(make_examples(3, 10), kPad);
  TempDir dir("dpo_training");
  LlamaModel m = tiny_model(true);
  LoraConfig lc = lora_cfg();
  lc.target_modules = {"q_proj", "v_proj", "down_proj"};
  lora_attach(projections(m), lc, 11);
  randomize_lora_b(m, 13, 0.3);
  torch::Tensor want = logits_of(m, b);
  lora_save_peft(projections(m), lc, dir.file("adapter"), "tiny");
  LlamaModel fresh = tiny_model(true);
  lora_load_peft(projections(fresh), dir.file("adapter"));
  EXPECT_TRUE(torch::equal(logits_of(fresh, b), want));  // exact: the same values, ops and shapes
  EXPECT_GT(max_abs_diff(want, ref_logits(m, b)), 1e-3);
}

// ---- 9. dpo::train in-process ---------------------------------------------------

struct TinyRun {
  TempDir dir{"dpo_training_run"};
  std::string model_dir, h5;
  int64_t vocab = 0;
};

/// The tiny config as another architecture: Mistral with head_dim != C / H, Qwen2
/// (q/k/v biases, tied embeddings as its small models), Qwen3 (q/k norms, head_dim 12).
LlamaConfig arch_config(LlamaArch a, int64_t vocab) {
  LlamaConfig c = tiny_config(vocab);
  c.arch = a;
  if (a == LlamaArch::kMistral) c.head_dim = 16;  // H * D = 64 != C = 32
  if (a == LlamaArch::kQwen2) {
    c.qkv_bias = true;
    c.tie_word_embeddings = true;
  }
  if (a == LlamaArch::kQwen3) {
    c.qk_norm = true;
    c.head_dim = 12;
  }
  return llama_config_checked(c);
}

/// A random model of `cfg` whose biases and q/k norm weights are random too
/// (transformers initializes them to 0 and 1, which would hide a wiring error).
LlamaModel random_arch_model(const LlamaConfig& cfg, uint64_t seed) {
  LlamaModel m = llama_init_random(cfg, seed, QuantOptions{});
  torch::NoGradGuard ng;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed + 1);
  for (auto& [name, p] : m->named_projections())
    if (p->has_bias()) p->set_bias(at::randn({p->out_features()}, gen) * 0.3);
  for (auto& layer : m->model->layer_list)
    if (layer->self_attn->q_norm) {
      layer->self_attn->q_norm->weight.copy_(1 + 0.2 * at::randn(layer->self_attn->q_norm->weight.sizes(), gen));
      layer->self_attn->k_norm->weight.copy_(1 + 0.2 * at::randn(layer->self_attn->k_norm->weight.sizes(), gen));
    }
  return m;
}

/// A model dir (random tiny Llama, or `arch`, + the test tokenizer) and a preference
/// file of `n` examples tokenized "with" it.
void make_run(TinyRun& run, int64_t n, std::optional<LlamaArch> arch = std::nullopt) {
  run.model_dir = run.dir.file("model");
  fs::create_directories(run.model_dir);
  fs::create_directories(run.dir.file("tok"));
  const std::string tok = train_test_tokenizer(run.dir.file("tok"), 300);
  TokenizerInfo info(tok);
  run.vocab = info.vocab_size();
  LlamaModel m = arch ? random_arch_model(arch_config(*arch, run.vocab), 21) : tiny_model(true, 21, run.vocab);
  llama_save_hf(m, run.model_dir, torch::kFloat32, 0);
  fs::copy_file(tok, run.model_dir + "/tokenizer.model");
  PreferenceAttrs a;
  a.vocab_size = run.vocab;
  a.bos_id = info.bos_id();
  a.eos_id = info.eos_id();
  a.pad_id = info.pad_id();
  a.tokenizer_sha256 = info.sha256();
  a.max_length = 64;
  a.max_prompt_length = 32;
  a.source = {"hand-made"};
  run.h5 = run.dir.file("train.h5");
  PreferenceWriter w(run.h5, a);
  for (const auto& e : make_examples(n, 77, run.vocab)) w.append(e.prompt, e.chosen, e.rejected);
  w.close();
}

TrainOptions run_options(const TinyRun& run, const std::string& out) {
  TrainOptions o = testutil::tiny_run_options(run.model_dir, run.h5, out);
  o.max_steps = 5;
  o.per_device_train_batch_size = 2;
  o.gradient_accumulation_steps = 2;
  o.per_device_eval_batch_size = 3;
  o.logging_steps = 1;
  o.save_steps = 2;
  o.learning_rate = 1e-2;
  o.lora_dropout = 0.1;
  return o;
}

std::vector<nlohmann::json> read_jsonl(const std::string& path) {
  std::ifstream in(path);
  std::vector<nlohmann::json> out;
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) out.push_back(nlohmann::json::parse(line));
  return out;
}

/// The train events (those with "loss"), in order.
std::vector<nlohmann::json> train_events(const std::string& out) {
  std::vector<nlohmann::json> ev;
  for (auto& j : read_jsonl(out + "/metrics.jsonl"))
    if (j.contains("loss")) ev.push_back(j);
  return ev;
}

TEST(Training, TrainerLoopWritesAdapterMetricsAndCheckpoints) {
  TinyRun run;
  make_run(run, 12);
  const std::string out = run.dir.file("out");
  FakeCommunicator comm;
  ASSERT_EQ(train(run_options(run, out), comm), 0);

  EXPECT_TRUE(fs::exists(out + "/adapter_model.safetensors"));
  EXPECT_TRUE(fs::exists(out + "/adapter_config.json"));
  auto cfg = nlohmann::json::parse(testutil::read_file(out + "/adapter_config.json"));
  EXPECT_EQ(cfg.at("r").get<int64_t>(), 4);
  EXPECT_EQ(cfg.at("peft_type").get<std::string>(), "LORA");
  for (const char* ck : {"checkpoint-2", "checkpoint-4", "checkpoint-5"}) {
    EXPECT_TRUE(fs::exists(out + "/" + ck + "/trainer_state.json")) << ck;
    EXPECT_TRUE(fs::exists(out + "/" + ck + "/adapter_model.safetensors")) << ck;
  }
  auto st = nlohmann::json::parse(testutil::read_file(out + "/checkpoint-4/trainer_state.json"));
  EXPECT_EQ(st.at("global_step").get<int64_t>(), 4);

  auto ev = train_events(out);
  ASSERT_EQ(ev.size(), 5u);
  for (size_t i = 0; i < ev.size(); ++i) {
    for (const char* key : {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                            "logps/rejected", "logits/chosen", "logits/rejected", "loss", "learning_rate", "grad_norm",
                            "epoch", "step"})
      EXPECT_TRUE(ev[i].contains(key)) << "event " << i << " lacks " << key;
    EXPECT_EQ(ev[i].at("step").get<int64_t>(), static_cast<int64_t>(i + 1));
    EXPECT_TRUE(std::isfinite(ev[i].at("loss").get<double>()));
  }
  // global batch 4 of 12 examples: 3 steps per epoch
  EXPECT_DOUBLE_EQ(ev[0].at("epoch").get<double>(), 1.0 / 3.0);  // one fp64 division
  // Exact zeros and ln 2: the policy is the reference bit for bit (B = 0).
  EXPECT_NEAR(ev[0].at("loss").get<double>(), std::log(2.0), ln2_bound(4));
  EXPECT_EQ(ev[0].at("rewards/chosen").get<double>(), 0.0);
  EXPECT_EQ(ev[0].at("rewards/margins").get<double>(), 0.0);
  EXPECT_DOUBLE_EQ(ev[0].at("learning_rate").get<double>(), 1e-2);  // constant schedule
  EXPECT_GT(ev[0].at("grad_norm").get<double>(), 0.0);
  EXPECT_LT(ev[0].at("logps/chosen").get<double>(), 0.0);
  // Later steps train: the reward margin moves away from 0.
  EXPECT_NE(ev[4].at("rewards/margins").get<double>(), 0.0);

  // The saved adapter loads into the base and differs from it (training happened).
  QuantOptions q;
  q.load_in_4bit = true;
  LlamaModel m = llama_load(run.model_dir, q);
  lora_load_peft(projections(m), out);
  PreferenceBatch b = collate_pairs(make_examples(2, 78, run.vocab), kPad);
  EXPECT_GT(max_abs_diff(logits_of(m, b), ref_logits(m, b)), 1e-5);
}

TEST(Training, CheckpointTrainerStateHoldsExactlyHfTrainerStateFields) {
  TinyRun run;
  make_run(run, 8);
  const std::string out = run.dir.file("out");
  FakeCommunicator comm;
  TrainOptions o = run_options(run, out);
  o.max_steps = 2;
  o.save_steps = 1;
  ASSERT_EQ(train(o, comm), 0);
  std::set<std::string> hf;
  std::istringstream fields(testutil::read_file(testutil::source_dir() + "/tests/launch/fixtures/hf_trainer_state_fields.txt"));
  for (std::string line; std::getline(fields, line);)
    if (!line.empty() && line[0] != '#') hf.insert(line);
  ASSERT_EQ(hf.size(), 20u);
  for (const std::string& dir : {out + "/checkpoint-1", out}) {
    auto st = nlohmann::json::parse(testutil::read_file(dir + "/trainer_state.json"));
    std::set<std::string> keys;
    for (auto it = st.begin(); it != st.end(); ++it) keys.insert(it.key());
    EXPECT_EQ(keys, hf) << dir;
    EXPECT_TRUE(st.at("global_step").is_number_integer());
    EXPECT_TRUE(st.at("epoch").is_number());
    EXPECT_TRUE(st.at("log_history").is_array());
    EXPECT_TRUE(st.at("stateful_callbacks").is_object());
    EXPECT_TRUE(st.at("best_metric").is_null());
  }
  // dpo_dist's own resume record sits beside it, and resuming from it works.
  EXPECT_TRUE(fs::exists(out + "/checkpoint-1/dpo_dist_state.json"));
  TrainOptions r = run_options(run, out);
  r.max_steps = 3;
  r.save_steps = 0;
  r.resume_from_checkpoint = out + "/checkpoint-1";
  EXPECT_EQ(train(r, comm), 0);
  EXPECT_EQ(nlohmann::json::parse(testutil::read_file(out + "/trainer_state.json")).at("global_step").get<int64_t>(), 3);

  // A checkpoint of dpo_dist 0.1 kept the record inside trainer_state.json ("dpo_dist",
  // with a 3-field SFT window): it still resumes.
  const std::string old = out + "/checkpoint-1";
  auto st = nlohmann::json::parse(testutil::read_file(old + "/trainer_state.json"));
  auto rec = nlohmann::json::parse(testutil::read_file(old + "/dpo_dist_state.json"));
  rec["log_window"]["sft"] = std::vector<double>{0, 0, 0};
  st["dpo_dist"] = rec;
  testutil::write_file(old + "/trainer_state.json", st.dump());
  fs::remove(old + "/dpo_dist_state.json");
  r.output_dir = run.dir.file("old_out");
  r.resume_from_checkpoint = old;
  EXPECT_EQ(train(r, comm), 0);
  EXPECT_EQ(nlohmann::json::parse(testutil::read_file(r.output_dir + "/trainer_state.json")).at("global_step").get<int64_t>(), 3);
  // Neither record: refused with a message naming the file it looked for.
  fs::remove(old + "/trainer_state.json");
  testutil::write_file(old + "/trainer_state.json", nlohmann::json{{"global_step", 1}}.dump());
  r.output_dir = run.dir.file("none_out");
  EXPECT_NE(testutil::throw_message([&] { train(r, comm); }).find("dpo_dist_state.json"), std::string::npos);
}

TEST(Training, TrainerPrecomputedReferenceGivesSameFirstStep) {
  TinyRun run;
  make_run(run, 8);
  FakeCommunicator comm;
  TrainOptions o = run_options(run, run.dir.file("inline"));
  o.max_steps = 2;
  o.save_steps = 0;
  ASSERT_EQ(train(o, comm), 0);
  EXPECT_FALSE(PreferenceReader(run.h5).has_ref_logps());

  double ref_tol = 0;  // the stored reference log-probs' tolerance, below
  TrainOptions p = run_options(run, run.dir.file("precomputed"));
  p.max_steps = 2;
  p.save_steps = 0;
  p.precompute_ref_log_probs = true;
  FakeCommunicator comm2;
  ASSERT_EQ(train(p, comm2), 0);
  {
    PreferenceReader rd(run.h5);
    ASSERT_TRUE(rd.has_ref_logps());
    RefLogps ref = read_ref_logps(run.h5);
    ASSERT_EQ(ref.chosen.size(), 8u);
    // Independent check of the stored values: the base model's sequence log-probs.
    QuantOptions q;
    q.load_in_4bit = true;
    LlamaModel m = llama_load(run.model_dir, q);
    auto ex = rd.get_batch({0, 1, 2, 3, 4, 5, 6, 7});
    PreferenceBatch b = collate_pairs(ex, rd.attrs().pad_id);
    torch::Tensor want = ref_logps(m, b);
    // Scored in other batches: the two-evaluation tolerance of each row.
    const std::vector<double> tol = logps_tolerance(m, b);
    ref_tol = max_of(tol);
    for (int64_t i = 0; i < 8; ++i) {
      testutil::expect_near(ref.chosen[i], want[i].item<double>(), tol[i], "chosen " + std::to_string(i));
      testutil::expect_near(ref.rejected[i], want[8 + i].item<double>(), tol[8 + i], "rejected " + std::to_string(i));
    }
  }
  auto a = train_events(run.dir.file("inline")), c = train_events(run.dir.file("precomputed"));
  ASSERT_EQ(a.size(), 2u);
  ASSERT_EQ(c.size(), 2u);
  // Step 1 with stored reference log-probs: the policy is the base bit for bit, the stored
  // reference within ref_tol of it; -log sigmoid(beta x) has slope beta / 2 at 0.
  const double beta = run_options(run, "").beta;
  EXPECT_NEAR(c[0].at("loss").get<double>(), std::log(2.0), beta * ref_tol + ln2_bound(4));
  // The first step's metrics differ through the reference only: its log-probs move the
  // rewards and the loss by beta ref_tol, the gradient's sigmoid factors by beta ref_tol / 2
  // relative; the rest is the same evaluation, up to the fp32 rounding of two runs.
  const double metric_tol = 2 * beta * ref_tol + testutil::llama_rel_tolerance(tiny_config(run.vocab), 64, true);
  for (const char* key : {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                          "logits/chosen", "logits/rejected", "grad_norm"}) {
    const double x = a[0].at(key).get<double>(), y = c[0].at(key).get<double>();
    testutil::expect_near(y, x, metric_tol * std::max(1.0, std::abs(x)), key);
  }
}

TEST(Training, TrainerAccumulationAndCheckpointingDoNotChangeTheRun) {
  // 10 examples, global batch 4: steps of 4, 4 and 2 pairs (the last one split
  // unevenly over the micro-batches).
  TinyRun run;
  make_run(run, 10);
  auto run_with = [&](const std::string& name, int64_t per_device, int64_t accum, bool ckpt, double dropout) {
    TrainOptions o = run_options(run, run.dir.file(name));
    o.max_steps = 3;
    o.save_steps = 0;
    o.per_device_train_batch_size = per_device;
    o.gradient_accumulation_steps = accum;
    o.gradient_checkpointing = ckpt;
    o.lora_dropout = dropout;
    FakeCommunicator comm;
    EXPECT_EQ(train(o, comm), 0);
    return train_events(run.dir.file(name));
  };
  const char* keys[] = {"loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins",
                        "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"};
  // 1 x 4 vs 2 x 2 micro-batches (no dropout: its masks depend on the batch shapes).
  auto big = run_with("big", 4, 1, false, 0.0), acc = run_with("acc", 2, 2, false, 0.0);
  ASSERT_EQ(big.size(), 3u);
  ASSERT_EQ(acc.size(), 3u);
  // Micro-batches reorder the sums: the runs' tolerance (tests/tiny_llama.h) at each step.
  const double tau = testutil::llama_rel_tolerance(tiny_config(run.vocab), 64, /*grads=*/true);
  for (size_t i = 0; i < 3; ++i)
    for (const char* k : keys) {
      const double x = big[i].at(k).get<double>(), y = acc[i].at(k).get<double>();
      testutil::expect_near(y, x, testutil::run_rel_tolerance(tau, i + 1) * std::max(1.0, std::abs(x)),
                            "step " + std::to_string(i + 1) + " " + k);
    }
  EXPECT_DOUBLE_EQ(big[2].at("epoch").get<double>(), 1.0);
  // Training moved: step 3's metrics are not the first step's.
  EXPECT_NE(big[2].at("rewards/margins").get<double>(), 0.0);
  // Activation checkpointing with LoRA dropout: the same run, bit for bit.
  auto plain = run_with("plain", 2, 2, false, 0.1), ck = run_with("ckpt", 2, 2, true, 0.1);
  ASSERT_EQ(plain.size(), 3u);
  ASSERT_EQ(ck.size(), 3u);
  for (size_t i = 0; i < 3; ++i)
    for (const char* k : keys) EXPECT_EQ(plain[i].at(k).get<double>(), ck[i].at(k).get<double>()) << "step " << i + 1 << " " << k;
  // Dropout is on: the run differs from the dropout-free one after the first update.
  EXPECT_NE(plain[2].at("loss").get<double>(), acc[2].at("loss").get<double>());
}

// A checkpoint stored in bf16 trains on the CPU with its embeddings and lm_head kept in
// bf16 (llama_table_dtype: widened a block at a time where used): the run is the run of
// the same values stored in fp32.
TEST(Training, HalfPrecisionCheckpointTrainsLikeItsFp32Widening) {
  TinyRun run;
  make_run(run, 8);
  const std::string bf16 = run.dir.file("model_bf16"), f32 = run.dir.file("model_f32");
  LlamaModel orig = llama_load(run.model_dir, QuantOptions{});
  llama_save_hf(orig, bf16, torch::kBFloat16, 0);
  LlamaModel h = llama_load(bf16, QuantOptions{});
  ASSERT_EQ(h->model->embed_tokens->weight.scalar_type(), torch::kBFloat16);
  ASSERT_EQ(h->lm_head->weight.scalar_type(), torch::kBFloat16);
  llama_save_hf(h, f32, torch::kFloat32, 0);  // the exact widening
  ASSERT_EQ(llama_load(f32, QuantOptions{})->lm_head->weight.scalar_type(), torch::kFloat32);
  auto train_on = [&](const std::string& model, const std::string& name) {
    fs::copy_file(run.model_dir + "/tokenizer.model", model + "/tokenizer.model");
    TrainOptions o = run_options(run, run.dir.file(name));
    o.model_name_or_path = model;
    o.max_steps = 3;
    o.save_steps = 0;
    FakeCommunicator comm;
    EXPECT_EQ(train(o, comm), 0);
    return train_events(run.dir.file(name));
  };
  auto a = train_on(bf16, "run_bf16"), b = train_on(f32, "run_f32");
  ASSERT_EQ(a.size(), 3u);
  ASSERT_EQ(b.size(), 3u);
  // The same values (the widening is exact); only the head's products may run in other
  // blocks of vocabulary rows: logits within 2 gamma(C) of the head's magnitudes, its
  // backward (V-term sums) within 2 gamma(V); carried through the steps as a run's
  // tolerance (tests/tiny_llama.h).
  const LlamaConfig cfg = tiny_config(run.vocab);
  const double tau = 2 * testutil::gamma(static_cast<double>(cfg.hidden_size + cfg.vocab_size));
  for (size_t i = 0; i < 3; ++i)
    for (const char* k : {"loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen"}) {
      const double x = a[i].at(k).get<double>(), y = b[i].at(k).get<double>();
      testutil::expect_near(x, y, testutil::run_rel_tolerance(tau, i + 1) * std::max(1.0, std::abs(y)),
                            "step " + std::to_string(i + 1) + " " + k);
    }
  EXPECT_NE(a[2].at("rewards/margins").get<double>(), 0.0);
}

// A short QLoRA DPO run of dpo::train on each of the other architectures (NF4 base,
// LoRA on all seven projections, biases dense): starts at ln 2, stays finite, and
// the loss on the repeated global batch goes down.
TEST(Training, TrainerRunsQloraDpoOnMistralQwen2Qwen3) {
  for (LlamaArch a : {LlamaArch::kMistral, LlamaArch::kQwen2, LlamaArch::kQwen3}) {
    SCOPED_TRACE(llama_arch_class(a));
    TinyRun run;
    make_run(run, 4, a);
    const std::string out = run.dir.file("out");
    TrainOptions o = run_options(run, out);
    o.max_steps = 6;
    o.save_steps = 0;
    o.lora_dropout = 0.0;  // the same batch every step (global batch 4 = all examples)
    FakeCommunicator comm;
    ASSERT_EQ(train(o, comm), 0);
    auto ev = train_events(out);
    ASSERT_EQ(ev.size(), 6u);
    EXPECT_NEAR(ev[0].at("loss").get<double>(), std::log(2.0), ln2_bound(4));
    for (const auto& e : ev) EXPECT_TRUE(std::isfinite(e.at("loss").get<double>()));
    EXPECT_LT(ev.back().at("loss").get<double>(), ev.front().at("loss").get<double>() - 0.01);  // learning: -0.47 or more
    // The adapter loads back into the NF4 base of that architecture.
    QuantOptions q;
    q.load_in_4bit = true;
    LlamaModel m = llama_load(run.model_dir, q);
    EXPECT_EQ(m->config().arch, a);
    lora_load_peft(projections(m), out);
  }
}

// A sliding window shorter than the data's max_length is refused before training.
TEST(Training, TrainerRefusesSlidingWindowShorterThanMaxLength) {
  TinyRun run;
  make_run(run, 4, LlamaArch::kMistral);  // preference file max_length 64
  nlohmann::json cfg = nlohmann::json::parse(testutil::read_file(run.model_dir + "/config.json"));
  cfg["sliding_window"] = 32;
  std::ofstream(run.model_dir + "/config.json") << cfg.dump(2);
  FakeCommunicator comm;
  try {
    train(run_options(run, run.dir.file("out")), comm);
    ADD_FAILURE() << "no error";
  } catch (const std::exception& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("sliding_window of 32"), std::string::npos) << msg;
    EXPECT_NE(msg.find(run.h5), std::string::npos) << msg;
  }
}

// ---- 10. modules_to_save (trainable embed_tokens / lm_head) --------------------

/// A tiny NF4 model with LoRA on every projection and trainable copies of
/// embed_tokens and lm_head, both nudged away from the base so they matter.
LlamaModel model_with_saved_modules(bool tied, uint64_t seed, std::vector<std::pair<std::string, torch::Tensor>>* params) {
  LlamaConfig c = tiny_config();
  c.tie_word_embeddings = tied;
  QuantOptions q;
  q.load_in_4bit = true;
  LlamaModel m = llama_init_random(c, 7, q);
  lora_attach(projections(m), lora_cfg(), 11);
  randomize_lora_b(m, seed, 0.05);
  auto mts = modules_to_save_attach(m, {"embed_tokens", "lm_head"});
  {
    torch::NoGradGuard ng;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed + 1);
    for (auto& [k, t] : mts) t.add_(at::randn(t.sizes(), gen) * 0.05);
  }
  *params = lora_parameters(projections(m));
  for (auto& p : mts) params->push_back(p);
  return m;
}

TEST(ModulesToSave, ReferenceUsesTheOriginalsAndGradientsFlow) {
  for (bool tied : {false, true}) {
    SCOPED_TRACE(tied ? "tied" : "untied");
    std::vector<std::pair<std::string, torch::Tensor>> params;
    LlamaModel m = model_with_saved_modules(tied, 5, &params);
    ASSERT_EQ(params.size(), lora_parameters(projections(m)).size() + (tied ? 1 : 2));
    if (tied) EXPECT_TRUE(m->saved_embed().is_same(m->saved_head()));
    EXPECT_EQ(m->saved_embed().scalar_type(), torch::kFloat32);
    LlamaConfig c = tiny_config();
    c.tie_word_embeddings = tied;
    QuantOptions q;
    q.load_in_4bit = true;
    LlamaModel base = llama_init_random(c, 7, q);  // the same base, nothing attached
    PreferenceBatch b = collate_pairs(make_examples(3, 9), kPad);
    // Reference pass (adapters and saved modules off): bitwise the base model.
    torch::Tensor ref;
    {
      torch::NoGradGuard ng;
      lora_set_enabled(projections(m), false);
      m->set_modules_to_save_enabled(false);
      ref = m->forward(b.input_ids, b.attention_mask);
      m->set_modules_to_save_enabled(true);
      lora_set_enabled(projections(m), true);
      EXPECT_TRUE(torch::equal(ref, base->forward(b.input_ids, b.attention_mask)));  // the same values and ops
    }
    // With the copies on (LoRA off) the function changes: they are used.
    {
      torch::NoGradGuard ng;
      lora_set_enabled(projections(m), false);
      EXPECT_GT(max_abs_diff(m->forward(b.input_ids, b.attention_mask), ref), 1e-3);
      lora_set_enabled(projections(m), true);
    }
    // Gradients reach the copies (and the rows of every vocabulary entry through
    // lm_head), never the frozen originals.
    SftLoss l = sft_loss(m->forward(b.input_ids, b.attention_mask), b.input_ids, b.loss_mask);
    l.nll_sum.backward();
    const torch::Tensor& head = m->saved_head();
    ASSERT_TRUE(head.grad().defined());
    EXPECT_GT(head.grad().abs().sum(1).min().item<double>(), 0.0)
        << "every lm_head row gets a gradient (softmax over the vocabulary)";
    ASSERT_TRUE(m->saved_embed().grad().defined());
    // Embedding rows of tokens in the batch get a gradient beyond the lm_head part.
    EXPECT_FALSE(m->model->embed_tokens->weight.requires_grad());
    EXPECT_FALSE(m->model->embed_tokens->weight.grad().defined());
    if (!tied) {
      EXPECT_FALSE(m->lm_head->weight.grad().defined());
      torch::Tensor ge = m->saved_embed().grad();
      const int64_t used = b.input_ids[0][0].item<int64_t>();
      EXPECT_GT(ge[used].abs().sum().item<double>(), 0.0);
      // A token that appears nowhere gets no embedding gradient.
      std::vector<bool> seen(64, false);
      auto acc = b.input_ids.accessor<int64_t, 2>();
      for (int64_t i = 0; i < b.input_ids.size(0); ++i)
        for (int64_t t = 0; t < b.input_ids.size(1); ++t) seen[acc[i][t]] = true;
      for (int64_t v = 0; v < 64; ++v)
        if (!seen[v]) {
          EXPECT_EQ(ge[v].abs().sum().item<double>(), 0.0) << v;
          break;
        }
    }
    // Finite differences on one embedding entry of a token in the batch.
    {
      torch::NoGradGuard ng;
      torch::Tensor e = m->saved_embed();
      const int64_t v = b.input_ids[0][1].item<int64_t>();
      const double g = e.grad()[v][3].item<double>(), h = 1e-2;
      auto loss_at = [&](double delta) {
        e[v][3] += delta;
        double r = sft_loss(m->forward(b.input_ids, b.attention_mask), b.input_ids, b.loss_mask).nll_sum.item<double>();
        e[v][3] -= delta;
        return r;
      };
      const double fd = (loss_at(h) - loss_at(-h)) / (2 * h);
      // Statistical, as LoraGradientsMatchFiniteDifferences: fp32 rounding noise over 2h and
      // h^2 / 6 times the third derivative; a margin over what every CPU setting shows.
      testutil::expect_near(g, fd, 2e-2 * std::max(1.0, std::abs(fd)), "embedding [v][3]");
    }
  }
}

TEST(ModulesToSave, SaveLoadAndMergeRoundTrip) {
  for (bool tied : {false, true}) {
    SCOPED_TRACE(tied ? "tied" : "untied");
    TempDir dir("dpo_mts");
    std::vector<std::pair<std::string, torch::Tensor>> params;
    LlamaModel m = model_with_saved_modules(tied, 17, &params);
    LoraConfig lc = lora_cfg();
    lc.modules_to_save = {"embed_tokens", "lm_head"};
    lc.ensure_weight_tying = tied;
    lora_save_peft(projections(m), lc, dir.file("adapter"), "tiny", modules_to_save_state(m, lc.modules_to_save));
    auto cfg = nlohmann::json::parse(testutil::read_file(dir.file("adapter") + "/adapter_config.json"));
    EXPECT_EQ(cfg.at("modules_to_save"), nlohmann::json({"embed_tokens", "lm_head"}));
    {
      SafetensorsFile f(dir.file("adapter") + "/adapter_model.safetensors");
      ASSERT_TRUE(f.has("base_model.model.model.embed_tokens.weight"));
      ASSERT_TRUE(f.has("base_model.model.lm_head.weight"));
      EXPECT_TRUE(torch::equal(f.get("base_model.model.model.embed_tokens.weight"), m->saved_embed()));
      EXPECT_TRUE(torch::equal(f.get("base_model.model.lm_head.weight"), m->saved_head()));
      EXPECT_EQ(f.get("base_model.model.lm_head.weight").scalar_type(), torch::kFloat32);
    }
    EXPECT_EQ(lora_config_load(dir.file("adapter")).modules_to_save, lc.modules_to_save);
    PreferenceBatch b = collate_pairs(make_examples(3, 19), kPad);
    torch::Tensor want = logits_of(m, b);
    // Load into a fresh base: the same function.
    LlamaConfig c = tiny_config();
    c.tie_word_embeddings = tied;
    QuantOptions q;
    q.load_in_4bit = true;
    LlamaModel fresh = llama_init_random(c, 7, q);
    LoraConfig back = lora_load_peft(projections(fresh), dir.file("adapter"));
    modules_to_save_load(fresh, back.modules_to_save, dir.file("adapter"));
    EXPECT_TRUE(torch::equal(logits_of(fresh, b), want));  // exact: the same values, ops and shapes
    // Merge (LoRA + modules) and save/reload as a plain model: base + modules. The merged
    // weights round once more (as in MergedModelSavedAndReloadedMatchesAdapterModel).
    lora_merge(projections(fresh));
    modules_to_save_merge(fresh);
    EXPECT_FALSE(fresh->saved_embed().defined());
    const double merge_tol = testutil::llama_rel_tolerance(c, b.input_ids.size(1), false,
                                                           5.0 * c.num_hidden_layers * (lc.r + 2)) *
                             want.abs().max().item<double>();
    EXPECT_LT(max_abs_diff(logits_of(fresh, b), want), merge_tol);
    llama_save_hf(fresh, dir.file("merged"), torch::kFloat32, 0);
    LlamaModel merged = llama_load(dir.file("merged"), QuantOptions{});
    EXPECT_EQ(merged->config().tie_word_embeddings, tied);
    EXPECT_TRUE(torch::equal(merged->model->embed_tokens->weight, m->saved_embed()));
    if (!tied) EXPECT_TRUE(torch::equal(merged->lm_head->weight, m->saved_head()));
    EXPECT_LT(max_abs_diff(logits_of(merged, b), want), merge_tol);
    // An adapter without the saved tensors is refused, naming the key; on a tied model the
    // one copy is read from its twin key (adapters that recorded one table only).
    LoraConfig lc2 = lc;
    lc2.modules_to_save = {"embed_tokens"};
    lora_save_peft(projections(m), lc2, dir.file("partial"), "tiny", modules_to_save_state(m, lc2.modules_to_save));
    if (tied) {
      EXPECT_NO_THROW(modules_to_save_load(fresh, {"lm_head"}, dir.file("partial")));
      EXPECT_TRUE(torch::equal(fresh->saved_head(), m->saved_embed()));
    } else {
      try {
        modules_to_save_load(fresh, {"lm_head"}, dir.file("partial"));
        ADD_FAILURE() << "no error";
      } catch (const std::exception& e) {
        EXPECT_NE(std::string(e.what()).find("base_model.model.lm_head.weight"), std::string::npos) << e.what();
      }
    }
  }
}

// Merging trained modules_to_save copies into a base whose tables are kept in bf16
// (llama_table_dtype) widens the tables first: the merged tables are the trained
// fp32 values, not their rounding.
TEST(ModulesToSave, MergeIntoHalfPrecisionTablesKeepsTheTrainedValues) {
  std::vector<std::pair<std::string, torch::Tensor>> params;
  LlamaModel m = model_with_saved_modules(false, 9, &params);
  LlamaConfig c = tiny_config();
  c.torch_dtype = torch::kBFloat16;
  LlamaModel half = llama_init_random(c, 7, QuantOptions{});
  ASSERT_EQ(half->lm_head->weight.scalar_type(), torch::kBFloat16);
  half->set_modules_to_save(m->saved_embed().detach().clone(), m->saved_head().detach().clone());
  modules_to_save_merge(half);
  EXPECT_EQ(half->lm_head->weight.scalar_type(), torch::kFloat32);
  EXPECT_TRUE(torch::equal(half->model->embed_tokens->weight, m->saved_embed()));
  EXPECT_TRUE(torch::equal(half->lm_head->weight, m->saved_head()));
}

// dpo::train with --modules_to_save: the SFT loss falls faster than with LoRA
// alone, the saved adapter holds the tables, and 2 steps + resume + 2 steps give
// the same adapter (tables, optimizer state) as 4 steps straight.
TEST(ModulesToSave, TrainerTrainsSavesAndResumesExactly) {
  TinyRun run;
  make_run(run, 4);
  auto opts = [&](const std::string& name, int64_t steps) {
    TrainOptions o = run_options(run, run.dir.file(name));
    o.stage = "sft";
    o.max_steps = steps;
    o.save_steps = 2;
    o.lora_dropout = 0.0;
    o.modules_to_save = {"embed_tokens", "lm_head"};
    return o;
  };
  {
    FakeCommunicator comm;
    ASSERT_EQ(train(opts("straight", 4), comm), 0);
  }
  {
    FakeCommunicator comm;
    ASSERT_EQ(train(opts("resumed", 2), comm), 0);
  }
  {
    TrainOptions o = opts("resumed", 4);
    o.resume_from_checkpoint = "auto";
    FakeCommunicator comm;
    ASSERT_EQ(train(o, comm), 0);
  }
  SafetensorsFile a(run.dir.file("straight") + "/adapter_model.safetensors");
  SafetensorsFile r(run.dir.file("resumed") + "/adapter_model.safetensors");
  ASSERT_TRUE(a.has("base_model.model.model.embed_tokens.weight"));
  ASSERT_TRUE(a.has("base_model.model.lm_head.weight"));
  for (const auto& n : a.names()) {
    ASSERT_TRUE(r.has(n)) << n;
    EXPECT_TRUE(torch::equal(a.get(n), r.get(n))) << n;  // exact: a resume replays the same steps
  }
  // The tables trained.
  LlamaModel base = llama_load(run.model_dir, QuantOptions{});
  EXPECT_GT(max_abs_diff(a.get("base_model.model.lm_head.weight"), base->lm_head->weight), 1e-4);
  EXPECT_GT(max_abs_diff(a.get("base_model.model.model.embed_tokens.weight"), base->model->embed_tokens->weight), 1e-4);
  // The optimizer state covers the tables.
  SafetensorsFile opt(run.dir.file("straight") + "/checkpoint-4/optimizer.safetensors");
  bool found = false;
  for (const auto& n : opt.names()) found = found || n.find("lm_head") != std::string::npos;
  EXPECT_TRUE(found);
}

}  // namespace
}  // namespace dpo
