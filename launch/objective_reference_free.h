// Internal to objective_orpo.cpp and objective_cpo.cpp: what the reference-free pair
// objectives share. Both follow TRL's ORPOTrainer / CPOTrainer (trl/experimental, v1.16):
// TRL's layout (two padded rows per pair, [chosen; rejected], full logits, dense
// attention), no reference pass, and a micro-batch loss that is a MEAN over the
// micro-batch (its NLL is token-weighted within the micro-batch, not over the step), so
// the step's loss is the mean over the global step's micro-batches, as HF's Trainer
// divides each micro-batch's loss by the accumulation steps and DDP averages the ranks.
// A stage implements pair_loss (the formula of core/orpo.h or core/cpo.h on the logits).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "core/logps.h"
#include "core/reference_free.h"
#include "data/collate.h"
#include "launch/dpo_step.h"
#include "launch/objective.h"

namespace dpo {

/// One micro-batch's loss and metric sums.
struct RefFreeLoss {
  torch::Tensor loss;  // () the micro-batch's mean loss, differentiable
  RefFreeMetrics metrics;
};

class RefFreeObjective : public Objective {
 public:
  RefFreeObjective(const ObjectiveEnv& env, std::string stage, std::string title)
      : Objective(RefFreeMetrics::kNumFields), env_(env), stage_(std::move(stage)), title_(std::move(title)) {
    // TRL's padded rows take the dense kernel, as DPO's padded path (trainer.cpp picks it
    // from --padding_free / --prefix_sharing, which these stages set off).
    env.model.model->set_attention_kernel(AttentionKernel::kDense);
  }
  std::string title() const override { return title_; }
  bool needs_reference() const override { return false; }

  /// The stage's formula on one micro-batch's policy logits; B pairs, rows [chosen; rejected].
  virtual RefFreeLoss pair_loss(const torch::Tensor& logits,     // (2B, T, V)
                                const torch::Tensor& ids,        // (2B, T)
                                const torch::Tensor& attention,  // (2B, T) int64
                                const torch::Tensor& answers,    // (2B, T) float, 1 on answer tokens
                                int64_t B) = 0;

  std::vector<double> step(const PreferenceReader& data, const std::vector<std::vector<int64_t>>& micro_batches,
                           int64_t /*global_examples*/, StepCounters* c) override {
    // The global step's micro-batches: each one's mean loss weighs 1 / their number.
    double local = 0;
    for (const auto& mb : micro_batches) local += mb.empty() ? 0.0 : 1.0;
    const double global = env_.comm.allreduce_sum(local);
    const double scale = global > 0 ? static_cast<double>(env_.comm.world_size()) / global : 0.0;
    RefFreeMetrics met;
    for (const auto& idx : micro_batches) {
      if (idx.empty()) continue;
      std::vector<PreferenceExample> ex;
      for (int64_t i : idx) ex.push_back(data.get(i));
      RefFreeLoss l = micro_loss(ex, data.attrs().pad_id, &c->tokens, &c->flops);
      (l.loss * scale).backward();
      met += l.metrics;
    }
    return met.to_vector();
  }

  StepSummary summarize(const std::vector<double>& global) const override {
    const RefFreeMetrics m = RefFreeMetrics::from_vector(global);
    return {m.loss_sum / std::max(1.0, m.batches), m.pairs > 0 ? m.rewards_accuracies_sum / m.pairs : NAN};
  }

  std::vector<double> evaluate(const PreferenceReader& data, int64_t lo, int64_t hi, int64_t batch_size) override {
    RefFreeMetrics met;
    for (int64_t s = lo; s < hi; s += batch_size) {
      std::vector<PreferenceExample> ex;
      for (int64_t i = s; i < std::min(hi, s + batch_size); ++i) ex.push_back(data.get(i));
      met += micro_loss(ex, data.attrs().pad_id, nullptr, nullptr).metrics;
    }
    return met.to_vector();
  }

  NamedValues averages(const std::vector<double>& sums, const std::string& prefix) const override {
    return RefFreeMetrics::from_vector(sums).averages(prefix, stage_ == "orpo");
  }
  std::string console_metrics(const nlohmann::json& ev, bool eval) const override {
    const std::string p = eval ? "eval_" : "";
    char buf[160];
    std::snprintf(buf, sizeof buf, "  acc %.3f  margin %.4f  nll %.4f", ev.value(p + "rewards/accuracies", NAN),
                  ev.value(p + "rewards/margins", NAN), ev.value(p + "nll_loss", NAN));
    return buf;
  }

  nlohmann::json compat() const override { return nlohmann::json{{"stage", stage_}}; }
  void save_state(nlohmann::json& record) const override { record["log_window"][stage_] = window_; }
  void load_state(const nlohmann::json& record) override {
    window_ = RefFreeMetrics::from_vector(record["log_window"][stage_].get<std::vector<double>>()).to_vector();
  }

 protected:
  RefFreeLoss micro_loss(const std::vector<PreferenceExample>& ex, int64_t pad_id, int64_t* tokens, double* flops) {
    LlamaModel model = env_.model.model;
    const torch::Device device = env_.model.device;
    if (tokens || flops) {
      const PackedPairs p = collate_packed(ex, pad_id, /*share_prompt=*/false, /*one_row=*/false);  // counts only
      if (tokens) *tokens += p.trl_tokens;
      const bool ckpt = env_.opts.gradient_checkpointing && torch::GradMode::is_enabled();
      if (flops)
        *flops += dpo_step_flops(model->config(), p, DpoStepOptions{false, false, false}, true, /*reference=*/false, ckpt);
    }
    PreferenceBatch b = collate_pairs(ex, pad_id);
    auto ids = b.input_ids.to(device), mask = b.attention_mask.to(device), lm = b.loss_mask.to(device);
    return pair_loss(model->forward(ids, mask), ids, mask, lm, b.num_pairs);
  }

  /// Per-pair sums of a micro-batch's pair quantities (all (B), detached).
  static void add_pairs(RefFreeMetrics& m, const torch::Tensor& rew_c, const torch::Tensor& rew_r,
                        const torch::Tensor& logps_c, const torch::Tensor& logps_r) {
    auto d = [](const torch::Tensor& t) { return t.detach().to(torch::kCPU, torch::kFloat64); };
    const torch::Tensor rc = d(rew_c), rr = d(rew_r);
    m.pairs += static_cast<double>(rc.size(0));
    m.rewards_chosen_sum += rc.sum().item<double>();
    m.rewards_rejected_sum += rr.sum().item<double>();
    m.rewards_accuracies_sum += (rc > rr).sum().item<double>();
    m.rewards_margins_sum += (rc - rr).sum().item<double>();
    m.logps_chosen_sum += d(logps_c).sum().item<double>();
    m.logps_rejected_sum += d(logps_r).sum().item<double>();
  }

  const ObjectiveEnv env_;
  const std::string stage_, title_;
};

}  // namespace dpo
