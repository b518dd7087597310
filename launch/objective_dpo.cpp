// The DPO objectives (TRL's DPOTrainer): one class per way a DPO micro-batch becomes a
// loss, over a shared base that owns the options, bco_pair's running mean, the
// metrics (core/dpo.h DpoMetrics) and evaluation.
//   DpoPadded         TRL's layout: two padded rows per pair, full logits, dense attention
//   DpoPacked         --prefix_sharing / --padding_free (launch/dpo_step.h)
//   DpoGlobalBatch<L> aot / aot_unpaired: the loss sorts over the whole global batch, so
//                     a step is two passes (below); evaluation uses layout L
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>

#include "core/dpo.h"
#include "data/collate.h"
#include "launch/dpo_step.h"
#include "launch/objective.h"

namespace dpo {

namespace {

using nlohmann::json;

// The four log-prob columns of this rank's pairs that aot / aot_unpaired sort over
// the global batch: policy chosen / rejected, reference chosen / rejected.
struct PairColumns {
  std::vector<double> pc, pr, rc, rr;
  // pol_c, pol_r (B); ref (2B) = [chosen; rejected]
  void add(const torch::Tensor& pol_c, const torch::Tensor& pol_r, const torch::Tensor& ref) {
    const int64_t B = pol_c.size(0);
    const torch::Tensor c = pol_c.to(torch::kCPU, torch::kFloat64).contiguous();
    const torch::Tensor j = pol_r.to(torch::kCPU, torch::kFloat64).contiguous();
    const torch::Tensor r = ref.to(torch::kCPU, torch::kFloat64).contiguous();
    for (int64_t i = 0; i < B; ++i) {
      pc.push_back(c.data_ptr<double>()[i]);
      pr.push_back(j.data_ptr<double>()[i]);
      rc.push_back(r.data_ptr<double>()[i]);
      rr.push_back(r.data_ptr<double>()[B + i]);
    }
  }
};

std::vector<PreferenceExample> examples_of(const PreferenceReader& data, const std::vector<int64_t>& idx) {
  std::vector<PreferenceExample> ex;
  ex.reserve(idx.size());
  for (int64_t i : idx) ex.push_back(data.get(i));
  return ex;
}

class DpoObjective : public Objective {
 public:
  explicit DpoObjective(const ObjectiveEnv& env) : Objective(DpoMetrics::kNumFields), env_(env) {
    opts_ = env.opts.dpo_options();
    validate_dpo_options(opts_);
    model_.model = env.model.model;
    model_.adapters = &env.model.projections;
    model_.device = env.model.device;
    model_.gradient_checkpointing = env.opts.gradient_checkpointing;
  }
  std::string title() const override { return "DPO"; }
  bool needs_reference() const override { return true; }

  /// One micro-batch's loss in this objective's layout; tokens / flops / ref_out may be null.
  virtual DpoStepLoss micro_loss(const std::vector<PreferenceExample>& ex, int64_t pad_id, int64_t* tokens,
                                 double* flops, torch::Tensor* ref_out) = 0;

  std::vector<double> step(const PreferenceReader& data, const std::vector<std::vector<int64_t>>& micro_batches,
                           int64_t global_examples, StepCounters* c) override {
    // world / global pairs of the step: after the gradient average over ranks this is
    // the mean over every pair of the global batch.
    const double scale = static_cast<double>(env_.comm.world_size()) / static_cast<double>(global_examples);
    DpoMetrics met;
    for (const auto& idx : micro_batches) {
      if (idx.empty()) continue;
      DpoStepLoss l = micro_loss(examples_of(data, idx), data.attrs().pad_id, &c->tokens, &c->flops, nullptr);
      (l.losses.sum() * scale).backward();
      met += l.metrics;
    }
    return met.to_vector();
  }

  StepSummary summarize(const std::vector<double>& global) const override {
    const DpoMetrics m = DpoMetrics::from_vector(global);
    return {m.loss_sum / std::max(1.0, m.pairs), m.pairs > 0 ? m.rewards_accuracies_sum / m.pairs : NAN};
  }

  void finish_step(const std::vector<double>& global) override {
    Objective::finish_step(global);
    // bco_pair's reward mean: the next step (and evaluation) shifts by the steps so far.
    const DpoMetrics m = DpoMetrics::from_vector(global);
    bco_.add(m.rewards_chosen_sum, m.rewards_rejected_sum, m.pairs);
    opts_.bco_delta = bco_.mean();
  }

  std::vector<double> evaluate(const PreferenceReader& data, int64_t lo, int64_t hi, int64_t batch_size) override {
    DpoMetrics met;
    PairColumns cols;  // global terms: this rank's eval pairs
    for (int64_t s = lo; s < hi; s += batch_size) {
      std::vector<PreferenceExample> ex;
      for (int64_t i = s; i < std::min(hi, s + batch_size); ++i) ex.push_back(data.get(i));
      torch::Tensor ref;
      DpoStepLoss l = micro_loss(ex, data.attrs().pad_id, nullptr, nullptr, &ref);
      met += l.metrics;
      if (opts_.skip_global_terms) cols.add(l.chosen_logps, l.rejected_logps, ref);
    }
    if (opts_.skip_global_terms) {
      // aot / aot_unpaired over the whole eval set (sorted across ranks)
      size_t off = 0;
      const DpoGlobalTerms g = global_terms(cols, &off);
      if (env_.comm.rank() == 0) met.loss_sum += g.loss_sum;
    }
    return met.to_vector();
  }

  NamedValues averages(const std::vector<double>& sums, const std::string& prefix) const override {
    return DpoMetrics::from_vector(sums).averages(prefix);
  }
  std::string console_metrics(const json& ev, bool eval) const override {
    char buf[128];
    if (eval)
      std::snprintf(buf, sizeof buf, "  rewards/accuracies %.3f  rewards/margins %.4f",
                    ev.value("eval_rewards/accuracies", NAN), ev.value("eval_rewards/margins", NAN));
    else
      std::snprintf(buf, sizeof buf, "  acc %.3f  margin %.4f", ev.value("rewards/accuracies", NAN),
                    ev.value("rewards/margins", NAN));
    return buf;
  }

  json compat() const override { return json{{"stage", "dpo"}}; }
  void save_state(json& record) const override {
    record["bco_running_mean"] = {{"reward_sum", bco_.reward_sum}, {"count", bco_.count}};
    record["log_window"]["dpo"] = window_;
  }
  void load_state(const json& record) override {
    window_ = DpoMetrics::from_vector(record["log_window"]["dpo"].get<std::vector<double>>()).to_vector();
    if (record.contains("bco_running_mean")) {  // absent in older checkpoints: bco_pair had no reward mean then
      bco_.reward_sum = record["bco_running_mean"]["reward_sum"].get<double>();
      bco_.count = record["bco_running_mean"]["count"].get<double>();
      opts_.bco_delta = bco_.mean();
    }
  }

 protected:
  // Every rank gets the terms over all ranks' pairs (rank order) and its own offset;
  // a rank sends its columns as [pol_c..., pol_r..., ref_c..., ref_r...] (4n doubles).
  DpoGlobalTerms global_terms(const PairColumns& mine, size_t* offset) {
    std::vector<double> local = mine.pc;
    local.insert(local.end(), mine.pr.begin(), mine.pr.end());
    local.insert(local.end(), mine.rc.begin(), mine.rc.end());
    local.insert(local.end(), mine.rr.begin(), mine.rr.end());
    const auto all =
        env_.comm.allgather_string(std::string(reinterpret_cast<const char*>(local.data()), local.size() * sizeof(double)));
    std::vector<double> pc, pr, rc, rr;
    for (int r = 0; r < env_.comm.world_size(); ++r) {
      const size_t n = all[r].size() / sizeof(double) / 4;
      if (r == env_.comm.rank()) *offset = pc.size();
      std::vector<double> v(4 * n);
      std::memcpy(v.data(), all[r].data(), v.size() * sizeof(double));
      pc.insert(pc.end(), v.begin(), v.begin() + n);
      pr.insert(pr.end(), v.begin() + n, v.begin() + 2 * n);
      rc.insert(rc.end(), v.begin() + 2 * n, v.begin() + 3 * n);
      rr.insert(rr.end(), v.begin() + 3 * n, v.end());
    }
    return dpo_global_terms(pc, pr, rc, rr, opts_);
  }

  const ObjectiveEnv env_;
  DpoOptions opts_;
  DpoModel model_;
  BcoRunningMean bco_;  // bco_pair's reward mean over the steps so far (all ranks)
};

class DpoPadded : public DpoObjective {
 public:
  using DpoObjective::DpoObjective;
  DpoStepLoss micro_loss(const std::vector<PreferenceExample>& ex, int64_t pad_id, int64_t* tokens, double* flops,
                         torch::Tensor* ref_out) override {
    return dpo_padded_loss(model_, ex, pad_id, opts_, tokens, flops, ref_out);
  }
};

class DpoPacked : public DpoObjective {
 public:
  DpoPacked(const ObjectiveEnv& env, const DpoStepOptions& so) : DpoObjective(env), so_(so) {}
  DpoStepLoss micro_loss(const std::vector<PreferenceExample>& ex, int64_t pad_id, int64_t* tokens, double* flops,
                         torch::Tensor* ref_out) override {
    return dpo_packed_loss(model_, ex, pad_id, so_, opts_, tokens, flops, ref_out);
  }

 private:
  DpoStepOptions so_;
};

// A step whose loss sorts over the global batch (aot, aot_unpaired). Pass 1: every
// micro-batch's reference and policy log-probs without grad (the dropout RNG state
// before each policy forward is kept). The gathered pairs give each pair's
// d(global terms)/d(policy logps). Pass 2: each micro-batch again with the same
// dropout draws, back-propagating its local terms + those coefficients. Costs one
// extra policy forward per micro-batch; holds one micro-batch's graph at a time.
// Both passes use TRL's padded rows; evaluation uses Layout's micro_loss. No FLOPs
// are counted (train_mfu is not logged).
template <class Layout>
class DpoGlobalBatch final : public Layout {
 public:
  template <class... A>
  explicit DpoGlobalBatch(A&&... a) : Layout(std::forward<A>(a)...) {
    this->opts_.skip_global_terms = true;  // added here, over the global batch
  }

  std::vector<double> step(const PreferenceReader& data, const std::vector<std::vector<int64_t>>& micro_batches,
                           int64_t global_examples, StepCounters* c) override {
    const double scale = static_cast<double>(this->env_.comm.world_size()) / static_cast<double>(global_examples);
    LlamaModel model = this->model_.model;
    const torch::Device device = this->model_.device;
    struct Micro {
      torch::Tensor ids, mask, lmask, ref;
      RankRngState rng;  // dropout generators before the policy forward
      int64_t pairs = 0;
    };
    std::vector<Micro> mbs;
    PairColumns cols;
    for (const auto& idx : micro_batches) {
      if (idx.empty()) continue;
      PreferenceBatch b = collate_pairs(examples_of(data, idx), data.attrs().pad_id);
      Micro m;
      m.ids = b.input_ids.to(device);
      m.mask = b.attention_mask.to(device);
      m.lmask = b.loss_mask.to(device);
      m.pairs = b.num_pairs;
      c->tokens += b.attention_mask.sum().item<int64_t>();
      m.ref = (b.ref_logps.defined() ? b.ref_logps : reference_logps(model, *this->model_.adapters, m.ids, m.mask, m.lmask))
                  .to(torch::kFloat64);
      m.rng = rng_capture(this->env_.rng);
      torch::Tensor pol;
      {
        torch::NoGradGuard ng;
        pol = padded_answer_logps(model, m.ids, m.mask, m.lmask).logps.to(torch::kCPU, torch::kFloat64);
      }
      cols.add(pol.narrow(0, 0, m.pairs), pol.narrow(0, m.pairs, m.pairs), m.ref);
      mbs.push_back(std::move(m));
    }
    size_t off = 0;
    const DpoGlobalTerms g = this->global_terms(cols, &off);
    DpoMetrics met;
    if (this->env_.comm.rank() == 0) met.loss_sum += g.loss_sum;  // the global sum, counted once over ranks
    for (const auto& m : mbs) {
      rng_restore(this->env_.rng, m.rng);
      auto logits = model->forward(m.ids, m.mask);
      DpoStepLoss l = dpo_batch_loss(logits, m.ids, m.lmask, m.ref.to(device), this->opts_);
      std::vector<double> coef(2 * m.pairs);
      for (int64_t i = 0; i < m.pairs; ++i) {
        coef[i] = g.grad_c[off + i];
        coef[m.pairs + i] = g.grad_r[off + i];
      }
      off += static_cast<size_t>(m.pairs);
      const torch::Tensor cf = torch::tensor(coef, torch::kFloat64).to(l.policy_logps.options());
      ((l.losses.sum() + (l.policy_logps * cf).sum()) * scale).backward();
      met += l.metrics;
    }
    return met.to_vector();
  }
};

}  // namespace

std::unique_ptr<Objective> make_dpo_objective(const ObjectiveEnv& env) {
  DpoStepOptions so;
  so.share_prompt = env.opts.prefix_sharing;
  so.padding_free = env.opts.padding_free;
  const bool padded = !so.share_prompt && !so.padding_free;
  // aot / aot_unpaired sort over the whole global batch (docs/objective.md).
  if (dpo_has_global_terms(env.opts.dpo_options())) {
    if (padded) return std::make_unique<DpoGlobalBatch<DpoPadded>>(env);
    return std::make_unique<DpoGlobalBatch<DpoPacked>>(env, so);
  }
  if (padded) return std::make_unique<DpoPadded>(env);
  return std::make_unique<DpoPacked>(env, so);
}

}  // namespace dpo
