// The objective interface: every way a micro-batch becomes a loss, behind one class.
// The trainer (launch/trainer.cpp) only orders a step: sample, Objective::step (forward,
// loss, backward of this rank's micro-batches), gradient sync, clip, optimize, log,
// save; everything that depends on the stage is here:
//   * the micro-step and its gradient scale (DPO: 1 / global pairs; SFT: 1 / global
//     answer tokens, counted over the ranks first),
//   * the metric accumulator: sums that reduce over ranks by addition, their averages
//     under TRL's names, the console line,
//   * evaluation of a batch,
//   * what a checkpoint records (compatibility fields, log window, running statistics
//     such as bco_pair's reward mean), and whether the loss needs a reference pass.
// make_objective maps --stage (and, for DPO, the layout and loss type) to one
// implementation: objective_dpo.cpp (TRL's padded path, the packed path, the two-pass
// global-terms step of aot / aot_unpaired), objective_sft.cpp, and the reference-free
// pair objectives objective_orpo.cpp, objective_cpo.cpp. A new stage is one file
// and one line of make_objective. The math without the model is core/dpo.h; the
// micro-batch's layouts and the reference pass are launch/dpo_step.h.
// Here, not in core/: an objective reads examples (data/) and reduces over ranks (dist/).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/preference_h5.h"
#include "dist/communicator.h"
#include "launch/model_setup.h"
#include "launch/rng_state.h"
#include "launch/train_options.h"

namespace dpo {

/// What an objective works with; everything outlives the objective.
struct ObjectiveEnv {
  const TrainOptions& opts;
  LoadedModel& model;         // the policy; its reference is the same model with adapters off
  Communicator& comm;         // every rank calls step / evaluate in the same order
  const RankGenerators& rng;  // dropout generators (the two-pass step replays them)
};

/// This rank's counters of one optimizer step besides the metric sums.
struct StepCounters {
  int64_t tokens = 0;  // TRL-counted tokens (tokens_per_second)
  double flops = 0;    // executed FLOPs (train_mfu); 0 where not counted
};

/// A step's loss and the accuracy shown on the progress line (global values).
struct StepSummary {
  double loss = 0;
  double accuracy = 0;  // DPO: reward accuracy of the pairs; SFT: answer-token accuracy
};

using NamedValues = std::vector<std::pair<std::string, double>>;

class Objective {
 public:
  virtual ~Objective() = default;
  /// The stage's name in the start banner ("DPO", "SFT").
  virtual std::string title() const = 0;
  /// True when the loss reads the reference model's log-probs (a reference pass, or
  /// /ref_logps of the data file: --precompute_ref_log_probs applies).
  virtual bool needs_reference() const = 0;

  // ---- one optimizer step -----------------------------------------------------------
  /// Forward, loss and backward of this rank's micro-batches (indices into `data`),
  /// gradients scaled so that after the average over ranks they are the global step's
  /// mean loss. Returns this rank's metric sums; adds to `c`. Model in train mode.
  virtual std::vector<double> step(const PreferenceReader& data, const std::vector<std::vector<int64_t>>& micro_batches,
                                   int64_t global_examples, StepCounters* c) = 0;
  /// Loss and accuracy of a step from its metric sums over all ranks.
  virtual StepSummary summarize(const std::vector<double>& global) const = 0;
  /// The step's sums over all ranks, after the finite check: the log window takes them,
  /// and state the next step depends on (bco_pair's reward mean) is updated.
  virtual void finish_step(const std::vector<double>& global);

  /// This rank's metric sums over examples [lo, hi) of `data` in batches of
  /// `batch_size`; no grad, model in eval mode (the caller sets both). Every rank calls
  /// it (it may gather across ranks).
  virtual std::vector<double> evaluate(const PreferenceReader& data, int64_t lo, int64_t hi, int64_t batch_size) = 0;

  // ---- metrics ------------------------------------------------------------------------
  /// The logged values of metric sums, TRL's names with `prefix` ("" or "eval_").
  virtual NamedValues averages(const std::vector<double>& sums, const std::string& prefix) const = 0;
  /// The stage's part of a console line, after the loss (`ev`: the logged event).
  virtual std::string console_metrics(const nlohmann::json& ev, bool eval) const = 0;
  /// The log window: sums over the steps since the last log event (all ranks).
  const std::vector<double>& window() const { return window_; }
  void reset_window() { window_.assign(window_.size(), 0.0); }

  // ---- checkpoints --------------------------------------------------------------------
  /// Fields of the compatibility record a resumed run must agree on.
  virtual nlohmann::json compat() const = 0;
  /// Its part of the resume record (log window, running statistics), and reading it back.
  virtual void save_state(nlohmann::json& record) const = 0;
  virtual void load_state(const nlohmann::json& record) = 0;

 protected:
  explicit Objective(size_t num_sums) : window_(num_sums, 0.0) {}
  std::vector<double> window_;
};

/// The one place that maps --stage (and the DPO layout / loss type) to an objective.
/// Throws on an unknown stage.
std::unique_ptr<Objective> make_objective(const ObjectiveEnv& env);

// The implementations' constructors (objective_dpo.cpp, objective_sft.cpp,
// objective_orpo.cpp, objective_cpo.cpp).
std::unique_ptr<Objective> make_dpo_objective(const ObjectiveEnv& env);
std::unique_ptr<Objective> make_sft_objective(const ObjectiveEnv& env);
std::unique_ptr<Objective> make_orpo_objective(const ObjectiveEnv& env);
std::unique_ptr<Objective> make_cpo_objective(const ObjectiveEnv& env);

}  // namespace dpo
