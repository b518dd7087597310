// SFT (TRL's SFTTrainer on the chosen answers): the causal-LM loss of prompt + chosen,
// answer tokens only, normalised by the answer tokens of the WHOLE optimizer step (all
// micro-batches, all ranks; counted first). No reference pass. Metrics: core/dpo.h
// SftMetrics (loss, mean_token_accuracy).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>

#include "core/dpo.h"
#include "data/collate.h"
#include "launch/objective.h"

namespace dpo {

namespace {

using nlohmann::json;

class SftObjective final : public Objective {
 public:
  explicit SftObjective(const ObjectiveEnv& env) : Objective(SftMetrics::kNumFields), env_(env) {}
  std::string title() const override { return "SFT"; }
  bool needs_reference() const override { return false; }

  std::vector<double> step(const PreferenceReader& data, const std::vector<std::vector<int64_t>>& micro_batches,
                           int64_t /*global_examples*/, StepCounters* c) override {
    // The answer tokens of the whole global step: the gradient scale.
    double local = 0;
    for (const auto& mb : micro_batches)
      for (int64_t i : mb) local += static_cast<double>(data.lengths(i).chosen);
    const double global = env_.comm.allreduce_sum(local);
    const double scale = global > 0 ? static_cast<double>(env_.comm.world_size()) / global : 0.0;
    SftMetrics met;
    for (const auto& idx : micro_batches) {
      if (idx.empty()) continue;
      std::vector<PreferenceExample> ex;
      for (int64_t i : idx) ex.push_back(data.get(i));
      SftLoss l = micro_loss(ex, data.attrs().pad_id, &c->tokens);
      (l.nll_sum * scale).backward();
      met += SftMetrics::of(l, static_cast<int64_t>(idx.size()));
    }
    return met.to_vector();
  }

  StepSummary summarize(const std::vector<double>& global) const override {
    const SftMetrics m = SftMetrics::from_vector(global);
    return {m.nll_sum / std::max(1.0, m.tokens), m.tokens > 0 ? m.correct / m.tokens : NAN};
  }

  std::vector<double> evaluate(const PreferenceReader& data, int64_t lo, int64_t hi, int64_t batch_size) override {
    SftMetrics met;
    for (int64_t s = lo; s < hi; s += batch_size) {
      std::vector<PreferenceExample> ex;
      for (int64_t i = s; i < std::min(hi, s + batch_size); ++i) ex.push_back(data.get(i));
      met += SftMetrics::of(micro_loss(ex, data.attrs().pad_id, nullptr), static_cast<int64_t>(ex.size()));
    }
    return met.to_vector();
  }

  NamedValues averages(const std::vector<double>& sums, const std::string& prefix) const override {
    return SftMetrics::from_vector(sums).averages(prefix);
  }
  std::string console_metrics(const json& ev, bool eval) const override {
    if (eval) return "";
    char buf[64];
    std::snprintf(buf, sizeof buf, "  token_acc %.3f", ev.value("mean_token_accuracy", NAN));
    return buf;
  }

  json compat() const override { return json{{"stage", "sft"}}; }
  void save_state(json& record) const override { record["log_window"]["sft"] = window_; }
  void load_state(const json& record) override {
    std::vector<double> sft = record["log_window"]["sft"].get<std::vector<double>>();
    sft.resize(SftMetrics::kNumFields, 0.0);  // 0.1 checkpoints had no token-accuracy field
    window_ = SftMetrics::from_vector(sft).to_vector();
  }

 private:
  // prompt + chosen rows, loss on the answer tokens; adds the tokens seen (if asked).
  SftLoss micro_loss(const std::vector<PreferenceExample>& ex, int64_t pad_id, int64_t* tokens) {
    const torch::Device& device = env_.model.device;
    SftBatch b = collate_sft(ex, pad_id);
    auto ids = b.input_ids.to(device), mask = b.attention_mask.to(device), lmask = b.loss_mask.to(device);
    if (tokens) *tokens += b.attention_mask.sum().item<int64_t>();
    return sft_loss(env_.model.model->forward(ids, mask), ids, lmask);
  }

  const ObjectiveEnv env_;
};

}  // namespace

std::unique_ptr<Objective> make_sft_objective(const ObjectiveEnv& env) { return std::make_unique<SftObjective>(env); }

}  // namespace dpo
