#include "launch/scoring.h"

#include <optional>

#include "core/dpo.h"
#include "core/reference_mode.h"
#include "data/collate.h"
#include "launch/dpo_step.h"

namespace dpo {

std::vector<ExampleScore> score_examples(LoadedModel& m, const PreferenceReader& reader,
                                         const std::vector<int64_t>& indices, int64_t batch_size, bool adapters) {
  torch::NoGradGuard ng;
  // Eval mode for the pass, restored on the way out (an exception included).
  struct ModeRestore {
    LlamaModel model;
    bool was_training;
    ~ModeRestore() {
      if (was_training) model->train();
    }
  } restore{m.model, m.model->is_training()};
  m.model->eval();
  std::optional<ReferenceModeGuard> reference;  // the training reference pass's guard
  if (!adapters) reference.emplace(m.model, m.projections);
  std::vector<ExampleScore> out;
  out.reserve(indices.size());
  for (size_t s = 0; s < indices.size(); s += static_cast<size_t>(batch_size)) {
    std::vector<PreferenceExample> ex;
    for (size_t k = s; k < std::min(indices.size(), s + static_cast<size_t>(batch_size)); ++k)
      ex.push_back(reader.get(indices[k]));
    // TRL's padded layout, as the plain DPO path and its reference pass compute it.
    PreferenceBatch b = collate_pairs(ex, reader.attrs().pad_id);
    auto ids = b.input_ids.to(m.device);
    SeqLogps lp = padded_answer_logps(m.model, ids, b.attention_mask.to(m.device), b.loss_mask.to(m.device));
    auto logps = lp.logps.to(torch::kCPU, torch::kFloat64);
    auto counts = lp.token_counts.to(torch::kCPU);
    const int64_t B = static_cast<int64_t>(ex.size());
    for (int64_t i = 0; i < B; ++i) {
      ExampleScore sc;
      sc.index = indices[s + static_cast<size_t>(i)];
      sc.chosen_logps = logps[i].item<double>();
      sc.rejected_logps = logps[B + i].item<double>();
      sc.chosen_tokens = counts[i].item<int64_t>();
      sc.rejected_tokens = counts[B + i].item<int64_t>();
      out.push_back(sc);
    }
  }
  return out;
}

}  // namespace dpo
