// Tests of the packed DPO micro-batch (data/collate collate_packed + launch/dpo_step):
// every layout (shared prompt or not, padding-free or not), log-prob path (chunked
// head or full logits) and attention kernel (chunked or dense) gives the TRL path's
// log-probs, loss, rewards and LoRA gradients (separate padded rows, full logits,
// dense attention) within fp32 rounding; the packed layout itself, index by index.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/autograd.h>
#include <torch/types.h>

#include "core/dpo.h"
#include "core/llama.h"
#include "core/lora.h"
#include "core/reference_mode.h"
#include "data/collate.h"
#include "launch/dpo_step.h"
#include "runtime/tensor_cache.h"
#include "runtime/threads.h"
#include "tests/fp_bounds.h"
#include "tests/tiny_llama.h"

namespace {

dpo::PreferenceExample example(std::vector<int32_t> p, std::vector<int32_t> c, std::vector<int32_t> r) {
  dpo::PreferenceExample e;
  e.prompt = std::move(p);
  e.chosen = std::move(c);
  e.rejected = std::move(r);
  return e;
}

TEST(CollatePacked, SharedPromptOneRowIndexByIndex) {
  // pair 0: prompt [1 10 11], chosen [20 21], rejected [30]; pair 1: prompt [1 12], chosen [22], rejected [31 32]
  std::vector<dpo::PreferenceExample> ex{example({1, 10, 11}, {20, 21}, {30}), example({1, 12}, {22}, {31, 32})};
  dpo::PackedPairs p = dpo::collate_packed(ex, 0, /*share_prompt=*/true, /*one_row=*/true);
  EXPECT_TRUE(torch::equal(p.input_ids, torch::tensor({{1, 10, 11, 20, 21, 30, 1, 12, 22, 31, 32}}, torch::kLong)));
  EXPECT_TRUE(torch::equal(p.position_ids, torch::tensor({{0, 1, 2, 3, 4, 3, 0, 1, 2, 2, 3}}, torch::kLong)));
  ASSERT_EQ(p.segments.size(), 6u);
  const std::vector<std::vector<int64_t>> segs{{0, 0, 3, -1}, {0, 3, 5, 0}, {0, 5, 6, 0},
                                               {0, 6, 8, -1}, {0, 8, 9, 3}, {0, 9, 11, 3}};
  for (size_t i = 0; i < segs.size(); ++i) {
    EXPECT_EQ(p.segments[i].row, segs[i][0]) << i;
    EXPECT_EQ(p.segments[i].begin, segs[i][1]) << i;
    EXPECT_EQ(p.segments[i].end, segs[i][2]) << i;
    EXPECT_EQ(p.segments[i].parent, segs[i][3]) << i;
  }
  // chosen 20 <- pos 2 (prompt's last), 21 <- 3; rejected 30 <- 2; pair 1: 22 <- 7, 31 <- 7, 32 <- 9.
  EXPECT_TRUE(torch::equal(p.target_position, torch::tensor({2, 3, 2, 7, 7, 9}, torch::kLong)));
  EXPECT_TRUE(torch::equal(p.target_token, torch::tensor({20, 21, 30, 22, 31, 32}, torch::kLong)));
  EXPECT_TRUE(torch::equal(p.target_sequence, torch::tensor({0, 0, 2, 1, 3, 3}, torch::kLong)));
  EXPECT_EQ(p.trl_tokens, (2 * 3 + 2 + 1) + (2 * 2 + 1 + 2));
  EXPECT_EQ(p.computed_tokens, 11);
  EXPECT_FALSE(p.ref_logps.defined());

  // Separate padded rows: the plain layout, targets at t - 1 of each row.
  dpo::PackedPairs q = dpo::collate_packed(ex, 7, false, false);
  EXPECT_TRUE(torch::equal(q.input_ids, torch::tensor({{1, 10, 11, 20, 21}, {1, 10, 11, 30, 7}, {1, 12, 22, 7, 7},
                                                       {1, 12, 31, 32, 7}}, torch::kLong)));
  EXPECT_TRUE(torch::equal(q.target_position, torch::tensor({2, 3, 7, 11, 16, 17}, torch::kLong)));
  EXPECT_TRUE(torch::equal(q.target_sequence, torch::tensor({0, 0, 2, 1, 3, 3}, torch::kLong)));
  EXPECT_EQ(q.computed_tokens, 20);
}

dpo::LlamaModel tiny_model(int64_t kv_heads) {
  dpo::LlamaConfig cfg = dpo::testutil::tiny_llama_config(97);
  cfg.intermediate_size = 48;
  cfg.num_key_value_heads = kv_heads;
  cfg.initializer_range = 0.1;
  return dpo::llama_init_random(cfg, 21, dpo::QuantOptions{});
}

std::vector<dpo::PreferenceExample> random_pairs(int64_t n, int64_t V) {
  std::vector<dpo::PreferenceExample> out;
  for (int64_t i = 0; i < n; ++i) {
    auto seq = [&](int64_t len) {
      std::vector<int32_t> v;
      for (int64_t t = 0; t < len; ++t) v.push_back(static_cast<int32_t>(torch::randint(3, V, {1}).item<int64_t>()));
      return v;
    };
    auto p = seq(4 + torch::randint(0, 9, {1}).item<int64_t>());
    p[0] = 1;
    out.push_back(example(p, seq(1 + torch::randint(0, 8, {1}).item<int64_t>()),
                          seq(1 + torch::randint(0, 8, {1}).item<int64_t>())));
  }
  return out;
}

double rel_err(const torch::Tensor& a, const torch::Tensor& b) {
  return ((a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max() / b.to(torch::kDouble).abs().max().clamp_min(1e-30))
      .item<double>();
}

struct Outcome {
  torch::Tensor logps;  // [chosen; rejected]
  std::vector<double> metrics;
  std::vector<torch::Tensor> grads;
};

TEST(DpoStep, EveryLayoutAndKernelEqualsTheTrlPath) {
  for (int64_t kv : {4, 2}) {
    for (bool ckpt : {false, true}) {
      torch::manual_seed(7 + kv);
      dpo::LlamaModel m = tiny_model(kv);
      auto named = m->named_projections();
      dpo::LoraConfig lc;
      lc.target_modules = {"q_proj", "v_proj", "down_proj"};
      lc.dropout = 0;
      dpo::lora_attach(named, lc, 5);
      {
        torch::NoGradGuard ng;
        for (auto& p : dpo::lora_parameters(named)) p.second.normal_(0, 0.05);
      }
      m->set_gradient_checkpointing(ckpt);
      m->train();
      const auto params = dpo::lora_parameters(named);
      const auto ex = random_pairs(3, 97);
      dpo::DpoOptions opts;
      opts.rpo_alpha = 0.5;  // exercises the chosen token counts too

      auto finish = [&](dpo::DpoStepLoss l) {
        for (auto& p : params) p.second.mutable_grad() = torch::Tensor();
        l.loss.backward();
        Outcome o;
        o.logps = torch::cat({l.chosen_logps, l.rejected_logps});
        o.metrics = l.metrics.to_vector();
        for (auto& p : params) o.grads.push_back(p.second.grad().clone());
        return o;
      };
      auto reference_of = [&](auto&& fn) {
        torch::NoGradGuard ng;
        dpo::lora_set_enabled(named, false);
        torch::Tensor r = fn();
        dpo::lora_set_enabled(named, true);
        return r.to(torch::kFloat64);
      };

      // The TRL path.
      m->set_attention_kernel(dpo::AttentionKernel::kDense);
      dpo::PreferenceBatch b = dpo::collate_pairs(ex, 0);
      torch::Tensor ref = reference_of([&] {
        return dpo::sequence_logps(m->forward(b.input_ids, b.attention_mask), b.input_ids, b.loss_mask).logps;
      });
      Outcome want = finish(dpo::dpo_batch_loss(m->forward(b.input_ids, b.attention_mask), b.input_ids, b.loss_mask, ref, opts));

      // Every layout is another fp32 evaluation of the same model (other shapes, kernels and
      // sums): each logit within llama_rel_tolerance of the largest |logit| (tests/tiny_llama.h;
      // T: the longest row of either layout), each scored token's log-prob within twice that
      // (its logit and the log-sum-exp), a sequence's within its token count times that: t_r.
      // The metrics' sums move by what they do with those log-probs (policy and reference
      // each by t_r): the loss by beta (slope) on four log-probs and alpha on the RPO nll,
      // rewards by beta on two, logps by t_r; mean logits by the logits' tolerance per token;
      // the counts and accuracies are exact (no margin is within its error here).
      const int64_t B = static_cast<int64_t>(ex.size());
      const int64_t T_max = std::max<int64_t>(b.input_ids.size(1), dpo::collate_packed(ex, 0, true, true).input_ids.size(1));
      double logit_scale;
      {
        torch::NoGradGuard ng;
        logit_scale = m->forward(b.input_ids, b.attention_mask).abs().max().item<double>();
      }
      const double logit_tol = dpo::testutil::llama_rel_tolerance(m->config(), T_max) * logit_scale;
      const torch::Tensor counts = b.loss_mask.narrow(1, 1, b.loss_mask.size(1) - 1).ne(0).sum(1).to(torch::kFloat64);
      const torch::Tensor t_row = 2 * logit_tol * counts;  // (2B) [chosen; rejected]
      const double tc_sum = t_row.narrow(0, 0, B).sum().item<double>(), tr_sum = t_row.narrow(0, B, B).sum().item<double>();
      const double chosen_tokens = counts.narrow(0, 0, B).sum().item<double>();
      const double rejected_tokens = counts.narrow(0, B, B).sum().item<double>();
      const double beta = opts.beta, alpha = opts.rpo_alpha;
      std::vector<double> metric_tol(dpo::DpoMetrics::kNumFields, 0.0);
      metric_tol[1] = 2 * beta * (tc_sum + tr_sum) * 2 + alpha * B * tc_sum / chosen_tokens;  // loss_sum
      metric_tol[2] = 2 * beta * tc_sum;                                                        // rewards chosen
      metric_tol[3] = 2 * beta * tr_sum;                                                        // rewards rejected
      metric_tol[5] = metric_tol[2] + metric_tol[3];                                           // margins
      metric_tol[6] = tc_sum, metric_tol[7] = tr_sum;                                          // logps
      metric_tol[8] = logit_tol * chosen_tokens, metric_tol[9] = logit_tol * rejected_tokens;  // logit sums
      metric_tol[12] = tc_sum;                                                                  // nll_sum
      const double grad_tol = dpo::testutil::llama_rel_tolerance(m->config(), T_max, /*grads=*/true);

      for (int bits = 0; bits < 16; ++bits) {
        dpo::DpoStepOptions so{(bits & 1) != 0, (bits & 2) != 0, (bits & 4) != 0};
        m->set_attention_kernel((bits & 8) ? dpo::AttentionKernel::kChunked : dpo::AttentionKernel::kDense);
        dpo::PackedPairs p = dpo::collate_packed(ex, 0, so.share_prompt, so.padding_free);
        dpo::ModelBatch mb = dpo::model_batch(p, torch::kCPU);
        torch::Tensor r = reference_of([&] { return dpo::model_answer_logps(m, mb, so.chunked_logps).logps; });
        Outcome got = finish(dpo::dpo_batch_loss(dpo::model_answer_logps(m, mb, so.chunked_logps), r, opts));
        const std::string what = "kv " + std::to_string(kv) + " ckpt " + std::to_string(ckpt) + " variant " + std::to_string(bits);
        dpo::testutil::expect_within(r, ref, t_row, what + " reference logps");
        dpo::testutil::expect_within(got.logps, want.logps, t_row, what + " logps");
        // + the fp32 / fp64 rounding of the sums themselves (gamma(2B + 1) of the magnitudes)
        const double g = dpo::testutil::gamma(2 * B + 1);
        for (size_t i = 0; i < want.metrics.size(); ++i)
          dpo::testutil::expect_near(got.metrics[i], want.metrics[i], metric_tol[i] + g * std::abs(want.metrics[i]),
                                     what + " metric " + std::to_string(i));
        for (size_t i = 0; i < want.grads.size(); ++i)
          EXPECT_LT(rel_err(got.grads[i], want.grads[i]), grad_tol) << what << " grad " << i;
      }
    }
  }
}

// The objectives' micro-batch functions (dpo_padded_loss, dpo_packed_loss) are the
// steps above, exactly; ReferenceModeGuard switches the adapters back on when its scope
// ends, an exception included.
TEST(DpoStep, MicroLossesAreTheStepsAndTheGuardRestores) {
  torch::manual_seed(11);
  dpo::LlamaModel m = tiny_model(2);
  auto named = m->named_projections();
  dpo::LoraConfig lc;
  lc.target_modules = {"q_proj", "v_proj"};
  lc.dropout = 0;
  dpo::lora_attach(named, lc, 5);
  {
    torch::NoGradGuard ng;
    for (auto& p : dpo::lora_parameters(named)) p.second.normal_(0, 0.05);
  }
  const auto ex = random_pairs(2, 97);
  const dpo::DpoOptions opts;
  const dpo::DpoModel dm{m, &named, torch::kCPU, false};

  m->set_attention_kernel(dpo::AttentionKernel::kDense);
  dpo::PreferenceBatch b = dpo::collate_pairs(ex, 0);
  torch::Tensor ref;
  {
    torch::NoGradGuard ng;
    dpo::lora_set_enabled(named, false);
    ref = dpo::sequence_logps(m->forward(b.input_ids, b.attention_mask), b.input_ids, b.loss_mask).logps.to(torch::kFloat64);
    dpo::lora_set_enabled(named, true);
  }
  int64_t tokens = 0;
  double flops = 0;
  torch::Tensor ref_used;
  dpo::DpoStepLoss padded = dpo::dpo_padded_loss(dm, ex, 0, opts, &tokens, &flops, &ref_used);
  EXPECT_TRUE(torch::equal(ref_used, ref));
  EXPECT_TRUE(torch::equal(padded.losses,
                           dpo::dpo_batch_loss(m->forward(b.input_ids, b.attention_mask), b.input_ids, b.loss_mask, ref, opts)
                               .losses));
  EXPECT_EQ(tokens, dpo::collate_packed(ex, 0, false, false).trl_tokens);
  EXPECT_GT(flops, 0);

  m->set_attention_kernel(dpo::AttentionKernel::kChunked);
  const dpo::DpoStepOptions so;
  dpo::ModelBatch mb = dpo::model_batch(dpo::collate_packed(ex, 0, so.share_prompt, so.padding_free), torch::kCPU);
  torch::Tensor pref = dpo::reference_logps(m, named, mb, so.chunked_logps);
  dpo::DpoStepLoss packed = dpo::dpo_packed_loss(dm, ex, 0, so, opts, nullptr, nullptr, &ref_used);
  EXPECT_TRUE(torch::equal(ref_used, pref));
  EXPECT_TRUE(torch::equal(packed.losses, dpo::dpo_batch_loss(dpo::model_answer_logps(m, mb, true), pref, opts).losses));

  // The policy differs from the reference (B != 0), and the guard restores it on a throw.
  const torch::Tensor policy = dpo::model_answer_logps(m, mb, true).logps.detach();
  EXPECT_FALSE(torch::equal(policy.to(torch::kFloat64), pref));
  try {
    dpo::ReferenceModeGuard reference(m, named);
    EXPECT_FALSE(m->modules_to_save_enabled());
    throw std::runtime_error("inside");
  } catch (const std::runtime_error&) {
  }
  EXPECT_TRUE(m->modules_to_save_enabled());
  EXPECT_TRUE(torch::equal(dpo::model_answer_logps(m, mb, true).logps.detach(), policy));
}

TEST(DpoStep, FlopsShrinkWithSharingAndPacking) {
  dpo::LlamaConfig cfg;
  cfg.hidden_size = 64;
  cfg.intermediate_size = 128;
  cfg.num_hidden_layers = 2;
  cfg.num_attention_heads = 4;
  cfg.vocab_size = 1000;
  std::vector<dpo::PreferenceExample> ex{example(std::vector<int32_t>(50, 5), std::vector<int32_t>(10, 6), std::vector<int32_t>(30, 7)),
                                         example(std::vector<int32_t>(20, 5), std::vector<int32_t>(5, 6), std::vector<int32_t>(5, 7))};
  dpo::DpoStepOptions trl{false, false, false}, all{};
  const double f_trl = dpo::dpo_step_flops(cfg, dpo::collate_packed(ex, 0, false, false), trl, true, true, false);
  const double f_all = dpo::dpo_step_flops(cfg, dpo::collate_packed(ex, 0, true, true), all, false, true, false);
  const double f_noref = dpo::dpo_step_flops(cfg, dpo::collate_packed(ex, 0, true, true), all, false, false, false);
  EXPECT_GT(f_trl, 2.0 * f_all);  // 4 rows x 80 padded tokens vs 170 tokens, and 1/20 of the head
  EXPECT_LT(f_noref, f_all);
  EXPECT_GT(f_noref, 0.5 * f_all);
}

}  // namespace

namespace {
TEST(Threads, NoOversubscriptionWhateverTheBinding) {
  EXPECT_EQ(dpo::auto_threads(32, 32, 8), 4);  // mpirun --bind-to none: the node divided
  EXPECT_EQ(dpo::auto_threads(8, 32, 4), 8);   // srun --cpus-per-task 8: this rank's own cores
  EXPECT_EQ(dpo::auto_threads(16, 32, 8), 4);  // --bind-to socket: 4 ranks share a 16-core socket
  EXPECT_EQ(dpo::auto_threads(1, 32, 2), 1);   // --bind-to core
  EXPECT_EQ(dpo::auto_threads(2, 2, 4), 1);    // more ranks than cores: one thread each
  EXPECT_EQ(dpo::auto_threads(2, 2, 1), 2);    // alone
}
}  // namespace

namespace {
TEST(TensorCache, ReusesFreedBlocksAndNeverRaisesThePeak) {
  ASSERT_TRUE(dpo::install_tensor_cache());
  dpo::tensor_cache_set_enabled(true);
  dpo::tensor_cache_release();
  const auto s0 = dpo::tensor_cache_stats();
  { torch::Tensor a = torch::full({1 << 20}, 1.0f); }  // 4 MiB: mapped, then cached
  const auto s1 = dpo::tensor_cache_stats();
  EXPECT_EQ(s1.misses - s0.misses, 1);
  EXPECT_EQ(s1.cached_bytes, 4 << 20);
  {
    torch::Tensor b = torch::empty({1 << 20});  // the same size: the cached block
    EXPECT_EQ(dpo::tensor_cache_stats().hits - s1.hits, 1);
    b.fill_(2.0f);
    EXPECT_EQ(b.sum().item<float>(), 2.0f * (1 << 20));
    torch::Tensor c = torch::empty({3 << 20});  // 12 MiB: nothing fits, nothing to evict
    EXPECT_EQ(dpo::tensor_cache_stats().misses - s1.misses, 1);
  }
  {
    // 16 MiB: the 12 MiB block grows by 4 MiB (mremap: its pages move along), after the
    // 4 MiB block is unmapped to make room for what the growth adds.
    torch::Tensor d = torch::full({4 << 20}, 3.0f);
    const auto s2 = dpo::tensor_cache_stats();
    EXPECT_EQ(s2.cached_bytes, 0);
    EXPECT_EQ(s2.evictions - s1.evictions, 1);
    EXPECT_EQ(s2.resized - s1.resized, 1);
    EXPECT_EQ(d.sum().item<float>(), 3.0f * (4 << 20));
  }
  {
    // 6 MiB: nothing within 1/8; the 16 MiB block is cut to 6 MiB (its tail unmapped).
    const auto before = dpo::tensor_cache_stats();
    torch::Tensor e = torch::full({(6 << 20) / 4}, 4.0f);
    const auto s4 = dpo::tensor_cache_stats();
    EXPECT_EQ(s4.resized - before.resized, 1);
    EXPECT_EQ(s4.evictions, before.evictions);
    EXPECT_EQ(s4.cached_bytes, 0);
    EXPECT_EQ(s4.live_bytes - before.live_bytes, 6 << 20);
    EXPECT_EQ(e.sum().item<float>(), 4.0f * ((6 << 20) / 4));
  }
  const auto s3 = dpo::tensor_cache_stats();
  EXPECT_LE(s3.peak_mapped_bytes, s3.peak_live_bytes);  // live + cached never above the live peak
  dpo::tensor_cache_release();
  EXPECT_EQ(dpo::tensor_cache_stats().cached_bytes, 0);
  dpo::tensor_cache_set_enabled(false);
  { torch::Tensor e = torch::empty({1 << 20}); }
  EXPECT_EQ(dpo::tensor_cache_stats().misses, s3.misses);  // bypassed
  dpo::tensor_cache_set_enabled(true);
  { torch::Tensor small = torch::empty({1000}); }  // < 1 MiB: the default allocator
  EXPECT_EQ(dpo::tensor_cache_stats().misses, s3.misses);
}
}  // namespace
