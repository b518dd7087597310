#include "launch/objective.h"

#include <stdexcept>

namespace dpo {

void Objective::finish_step(const std::vector<double>& global) {
  if (global.size() != window_.size())
    throw std::logic_error("Objective::finish_step: " + std::to_string(global.size()) + " sums, the window has " +
                           std::to_string(window_.size()));
  for (size_t i = 0; i < global.size(); ++i) window_[i] += global[i];
}

std::unique_ptr<Objective> make_objective(const ObjectiveEnv& env) {
  const std::string& stage = env.opts.stage;
  if (stage == "dpo") return make_dpo_objective(env);
  if (stage == "sft") return make_sft_objective(env);
  if (stage == "orpo") return make_orpo_objective(env);
  if (stage == "cpo") return make_cpo_objective(env);
  throw std::runtime_error("--stage " + stage + ": not a stage (dpo, sft, orpo, cpo)");
}

}  // namespace dpo
