// --stage orpo and --stage cpo (every loss type) through dpo::train on the learnable
// preference task of test_loss_training.cpp (chosen answers from token band [100, 130),
// rejected from [130, 160)): the logged loss falls, the eval reward accuracy rises, every
// metric TRL's ORPOTrainer / CPOTrainer logs is present under its name, and no reference
// pass is made. Also: the objective's evaluation of a micro-batch equals TRL's formulas
// recomputed here in float64 from the same model's logits (log_softmax + gather, the NLL
// tokens as TRL picks them), within the fp32 log-softmax's derived bound.
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "core/llama.h"
#include "core/lora.h"
#include "data/collate.h"
#include "data/preference_h5.h"
#include "data/tokenizer_info.h"
#include "dist/fake_communicator.h"
#include "launch/cli.h"
#include "launch/model_setup.h"
#include "launch/objective.h"
#include "launch/rng_state.h"
#include "launch/train_options.h"
#include "launch/trainer.h"
#include "tests/fp_bounds.h"
#include "tests/launch/band_task.h"
#include "tests/test_util.h"
#include "tests/tiny_llama.h"

namespace dpo {
namespace {

namespace fs = std::filesystem;

// Different answer lengths within a pair: the averages and the padding matter.
using Task = testutil::BandTask;
Task& task() {
  static Task* t = testutil::make_band_task("dpo_orpo_cpo", 32, /*equal_answer_lengths=*/false);
  return *t;
}

std::vector<nlohmann::json> events(const std::string& out) {
  std::ifstream in(out + "/metrics.jsonl");
  std::vector<nlohmann::json> ev;
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) ev.push_back(nlohmann::json::parse(line));
  return ev;
}

struct Case {
  std::string stage, loss_type;
  double beta;
  double alpha = 0;
};

class RefFreeTrains : public ::testing::TestWithParam<Case> {};

TEST_P(RefFreeTrains, LossFallsAccuracyRisesMetricsUnderTrlNames) {
  const Case k = GetParam();
  Task& t = task();
  testutil::TempDir out("dpo_orpo_cpo_out");
  TrainOptions o = testutil::tiny_run_options(t.model_dir, t.train_h5, out.path());
  o.stage = k.stage;
  o.loss_type = k.loss_type;
  o.beta = k.beta;
  o.alpha = k.alpha;
  o.eval_file = t.train_h5;
  o.max_steps = 80;
  o.per_device_train_batch_size = 4;
  o.per_device_eval_batch_size = 8;
  o.logging_steps = 10;
  o.eval_steps = 80;
  o.save_steps = 0;
  o.learning_rate = 5e-3;
  o.lora_dropout = 0.0;
  FakeCommunicator comm;
  ASSERT_EQ(train(o, comm), 0);
  std::vector<nlohmann::json> tr, ev;
  for (auto& e : events(out.path())) (e.contains("eval_loss") ? ev : tr).push_back(e);
  ASSERT_EQ(ev.size(), 2u);
  ASSERT_GE(tr.size(), 8u);
  std::vector<std::string> names{"loss",          "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                 "rewards/margins", "logps/chosen", "logps/rejected",   "logits/chosen",
                                 "logits/rejected", "nll_loss"};
  if (k.stage == "orpo") {
    names.push_back("log_odds_ratio");
    names.push_back("log_odds_chosen");
  }
  for (const auto& n : names) {
    EXPECT_TRUE(tr[0].contains(n)) << n;
    EXPECT_TRUE(ev[0].contains("eval_" + n)) << n;
    EXPECT_TRUE(std::isfinite(ev[1].value("eval_" + n, NAN))) << n;
  }
  // Learning checks (statistical, not rounding): eval accuracy starts at 0.34-0.47 and
  // ends at 0.875 (cpo sigmoid: SUMMED log-probs of answers of different lengths) to 1.0
  // (measured, one thread); the last window's loss is about half the first's.
  const double l0 = tr.front().at("loss").get<double>(), l1 = tr.back().at("loss").get<double>();
  EXPECT_LT(l1, 0.9 * l0) << k.stage << "/" << k.loss_type;
  EXPECT_GE(ev[1].at("eval_rewards/accuracies").get<double>(), 0.8) << k.stage << "/" << k.loss_type;
  EXPECT_GT(ev[1].at("eval_rewards/margins").get<double>(), ev[0].at("eval_rewards/margins").get<double>());
  if (k.loss_type == "alphapo") EXPECT_EQ(ev[1].at("eval_nll_loss").get<double>(), 0.0);  // cpo_alpha 0
}

INSTANTIATE_TEST_SUITE_P(EveryStage, RefFreeTrains,
                         ::testing::Values(Case{"orpo", "sigmoid", 0.1}, Case{"cpo", "sigmoid", 0.1},
                                           Case{"cpo", "hinge", 0.1}, Case{"cpo", "ipo", 0.5},
                                           Case{"cpo", "simpo", 2.0}, Case{"cpo", "alphapo", 2.0, 0.25}),
                         [](const ::testing::TestParamInfo<Case>& i) { return i.param.stage + "_" + i.param.loss_type; });

// The objective's evaluation of one micro-batch of 4 pairs against TRL's formulas in
// float64 on the same fp32 logits. The only difference is the fp32 log-softmax of
// sequence_logps (its fp64 sums of the per-token values): per sequence within
// testutil::gathered_logp_sum_bound (e_s), so an average within e_s / n, the NLL within
// sum e_s / N; ORPO's log odds move by e_c / (1 - p_c) + e_r / (1 - p_r) (its slope
// 1 / (1 - e^c)), the loss by beta times that (log sigmoid's slope <= 1) plus the NLL's;
// the fp32 tail (log1mexp, log_sigmoid, a mean of 4, the sum) adds gamma(2 kExpUlps + 16)
// of the magnitudes. logits/* are means of the same fp32 logits: gamma(n) relative to
// the mean of |x|.
TEST(RefFreeObjective, EvaluateEqualsTrlFormulasInFloat64) {
  Task& t = task();
  PreferenceReader data(t.train_h5);
  LoadedModel lm;
  lm.model = llama_init_random(llama_config_checked(testutil::tiny_llama_config(t.vocab)), 9, QuantOptions{});
  lm.projections = lm.model->named_projections();
  LoraConfig lc;
  lc.target_modules = {"q_proj", "v_proj"};
  lc.dropout = 0;
  lora_attach(lm.projections, lc, 5);
  {
    torch::NoGradGuard ng;
    for (auto& p : lora_parameters(lm.projections)) p.second.normal_(0, 0.05);
  }
  FakeCommunicator comm;
  const RankGenerators rng = default_rank_generators(torch::kCPU);
  const int64_t B = 4;
  std::vector<PreferenceExample> ex;
  for (int64_t i = 0; i < B; ++i) ex.push_back(data.get(i));
  PreferenceBatch b = collate_pairs(ex, data.attrs().pad_id);

  for (const std::string stage : {"orpo", "cpo"}) {
    TrainOptions o = testutil::tiny_run_options(t.model_dir, t.train_h5, "/nonexistent");
    o.stage = stage;
    o.beta = 0.3;
    o.loss_type = stage == "cpo" ? "simpo" : "sigmoid";
    o.simpo_gamma = 0.4;
    o.cpo_alpha = 0.7;
    auto obj = make_objective(ObjectiveEnv{o, lm, comm, rng});
    EXPECT_FALSE(obj->needs_reference());
    lm.model->eval();
    torch::NoGradGuard ng;
    const auto got_v = obj->averages(obj->evaluate(data, 0, B, B), "eval_");
    std::map<std::string, double> got(got_v.begin(), got_v.end());

    const torch::Tensor logits = lm.model->forward(b.input_ids, b.attention_mask);  // (2B, T, V) fp32
    const int64_t T = logits.size(1);
    const torch::Tensor x = logits.to(torch::kFloat64);
    const torch::Tensor tok = b.input_ids.narrow(1, 1, T - 1);
    const torch::Tensor lp = torch::log_softmax(x.narrow(1, 0, T - 1), -1).gather(2, tok.unsqueeze(2)).squeeze(2);
    const torch::Tensor ans = b.loss_mask.narrow(1, 1, T - 1).to(torch::kFloat64);
    const torch::Tensor att = b.attention_mask.narrow(1, 1, T - 1).to(torch::kFloat64);
    const torch::Tensor n_ans = ans.sum(1), sum_ans = (lp * ans).sum(1), avg = sum_ans / n_ans;
    // per-sequence error bounds of the fp32 sums (answers; chosen prompt + answer)
    auto seq_bound = [&](const torch::Tensor& mask) {
      const torch::Tensor sel = mask.nonzero();  // (M, 2): row, position
      const torch::Tensor rows = logits.narrow(1, 0, T - 1).index({sel.select(1, 0), sel.select(1, 1)});
      const torch::Tensor tk = tok.index({sel.select(1, 0), sel.select(1, 1)});
      return testutil::gathered_logp_sum_bound(rows, tk, sel.select(1, 0), mask.size(0));
    };
    const torch::Tensor e_ans = seq_bound(ans), e_avg = e_ans / n_ans;
    const double g_tail = testutil::gamma(2 * testutil::kExpUlps + 16);
    double want_loss, want_nll, e_loss, e_nll;
    if (stage == "orpo") {
      // TRL: NLL over every attended token of the chosen rows after the first (prompt too)
      const torch::Tensor att_c = att.narrow(0, 0, B);
      want_nll = -(lp.narrow(0, 0, B) * att_c).sum().item<double>() / att_c.sum().item<double>();
      e_nll = seq_bound(att_c).sum().item<double>() / att_c.sum().item<double>() + g_tail * std::fabs(want_nll);
      const torch::Tensor c = avg.narrow(0, 0, B), r = avg.narrow(0, B, B);
      const torch::Tensor lo = (c - r) - (torch::log(-torch::expm1(c)) - torch::log(-torch::expm1(r)));
      const torch::Tensor e_lo = e_avg.narrow(0, 0, B) / (-torch::expm1(c)) + e_avg.narrow(0, B, B) / (-torch::expm1(r));
      const torch::Tensor ratio = torch::log_sigmoid(lo);
      want_loss = want_nll - o.beta * ratio.mean().item<double>();
      e_loss = e_nll + o.beta * e_lo.mean().item<double>() + g_tail * (std::fabs(want_loss) + o.beta * ratio.abs().mean().item<double>());
      EXPECT_NEAR(got.at("eval_log_odds_chosen"), lo.mean().item<double>(), e_lo.mean().item<double>() + g_tail * lo.abs().mean().item<double>());
      EXPECT_NEAR(got.at("eval_log_odds_ratio"), ratio.mean().item<double>(), e_lo.mean().item<double>() + g_tail * ratio.abs().mean().item<double>());
      const double lg = x.narrow(0, 0, B).narrow(1, 0, T - 1).mean().item<double>();
      const double n = static_cast<double>(B * (T - 1) * x.size(2));
      EXPECT_NEAR(got.at("eval_logits/chosen"), lg, testutil::gamma(n) * x.narrow(0, 0, B).narrow(1, 0, T - 1).abs().mean().item<double>());
    } else {
      // TRL CPO: simpo reads averaged logps; NLL over the chosen answers only
      want_nll = -sum_ans.narrow(0, 0, B).sum().item<double>() / n_ans.narrow(0, 0, B).sum().item<double>();
      e_nll = e_ans.narrow(0, 0, B).sum().item<double>() / n_ans.narrow(0, 0, B).sum().item<double>() + g_tail * std::fabs(want_nll);
      const torch::Tensor m = avg.narrow(0, 0, B) - avg.narrow(0, B, B) - o.simpo_gamma / o.beta;
      const torch::Tensor losses = -torch::log_sigmoid(o.beta * m);
      want_loss = losses.mean().item<double>() + o.cpo_alpha * want_nll;
      e_loss = o.beta * (e_avg.narrow(0, 0, B) + e_avg.narrow(0, B, B)).mean().item<double>() + o.cpo_alpha * e_nll +
               g_tail * (std::fabs(want_loss) + losses.mean().item<double>());
      const double lg = x.narrow(0, 0, B).mean().item<double>();  // every position, the last included
      const double n = static_cast<double>(B * T * x.size(2));
      EXPECT_NEAR(got.at("eval_logits/chosen"), lg, testutil::gamma(n) * x.narrow(0, 0, B).abs().mean().item<double>());
    }
    EXPECT_NEAR(got.at("eval_loss"), want_loss, e_loss) << stage;
    EXPECT_NEAR(got.at("eval_nll_loss"), want_nll, e_nll) << stage;
    EXPECT_NEAR(got.at("eval_logps/chosen"), avg.narrow(0, 0, B).mean().item<double>(), e_avg.narrow(0, 0, B).mean().item<double>() + g_tail * avg.narrow(0, 0, B).abs().mean().item<double>()) << stage;
    EXPECT_NEAR(got.at("eval_rewards/margins"), o.beta * (avg.narrow(0, 0, B) - avg.narrow(0, B, B)).mean().item<double>(),
                o.beta * (e_avg.narrow(0, 0, B) + e_avg.narrow(0, B, B)).mean().item<double>() +
                    g_tail * o.beta * avg.abs().mean().item<double>()) << stage;
  }
}

// The options of the two stages: TRL's defaults, and one-line errors for every
// combination that does not apply.
TEST(RefFreeOptions, DefaultsAndOneLineErrors) {
  auto parse = [](std::vector<std::string> extra) {
    Cli c("dpo_dist", "");
    add_train_options(c);
    std::vector<std::string> s{"dpo_dist", "--model_name_or_path", "m", "--train_file", "t.h5", "--output_dir", "o"};
    s.insert(s.end(), extra.begin(), extra.end());
    std::vector<const char*> p;
    for (auto& x : s) p.push_back(x.c_str());
    c.parse(static_cast<int>(p.size()), p.data());
    return train_options_from(c);
  };
  auto error = [&](std::vector<std::string> extra) -> std::string {
    try {
      parse(std::move(extra));
    } catch (const CliError& e) {
      return e.what();
    }
    return "";
  };
  const TrainOptions orpo = parse({"--stage", "orpo"});
  EXPECT_EQ(orpo.beta, 0.1);  // ORPOConfig.beta (lambda)
  EXPECT_FALSE(orpo.padding_free);
  EXPECT_FALSE(orpo.prefix_sharing);
  const TrainOptions cpo = parse({"--stage", "cpo"});
  EXPECT_EQ(cpo.beta, 0.1);
  EXPECT_EQ(cpo.loss_type, "sigmoid");
  EXPECT_EQ(cpo.cpo_alpha, 1.0);
  EXPECT_EQ(cpo.simpo_gamma, 0.5);
  EXPECT_EQ(cpo.alpha, 0.0);
  EXPECT_NO_THROW(parse({"--stage", "cpo", "--loss_type", "simpo", "--simpo_gamma", "1.0", "--alpha", "0.2"}));
  EXPECT_NE(error({"--stage", "cpo", "--loss_type", "robust"}).find("not a --stage cpo loss type"), std::string::npos);
  EXPECT_NE(error({"--stage", "cpo", "--simpo_gamma", "1"}).find("--simpo_gamma applies to --stage cpo with --loss_type simpo"),
            std::string::npos);
  EXPECT_NE(error({"--simpo_gamma", "1"}).find("applies to --stage cpo only"), std::string::npos);
  EXPECT_NE(error({"--stage", "orpo", "--cpo_alpha", "0.5"}).find("--cpo_alpha applies to --stage cpo only"), std::string::npos);
  EXPECT_NE(error({"--stage", "orpo", "--loss_type", "hinge"}).find("does not apply to --stage orpo"), std::string::npos);
  EXPECT_NE(error({"--stage", "orpo", "--rpo_alpha", "1"}).find("--rpo_alpha applies to --stage dpo"), std::string::npos);
  EXPECT_NE(error({"--stage", "cpo", "--precompute_ref_log_probs"}).find("applies to --stage dpo"), std::string::npos);
  EXPECT_NE(error({"--stage", "cpo", "--loss_type", "alphapo", "--cpo_alpha", "1"}).find("alphapo sets it to 0"),
            std::string::npos);
  EXPECT_NE(error({"--stage", "cpo", "--loss_type", "hinge", "--label_smoothing", "0.1"}).find("--label_smoothing"),
            std::string::npos);
  EXPECT_NE(error({"--stage", "orpo", "--beta", "0"}).find("--beta must be > 0"), std::string::npos);
  EXPECT_NE(error({"--stage", "kto"}).find("--stage"), std::string::npos);
}

}  // namespace
}  // namespace dpo
