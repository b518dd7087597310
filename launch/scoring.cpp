#include "launch/scoring.h"

#include "core/dpo.h"
#include "data/collate.h"

namespace dpo {

std::vector<ExampleScore> score_examples(LoadedModel& m, const PreferenceReader& reader,
                                         const std::vector<int64_t>& indices, int64_t batch_size, bool adapters) {
  torch::NoGradGuard ng;
  const bool was_training = m.model->is_training();
  m.model->eval();
  if (!adapters) {
    lora_set_enabled(m.projections, false);
    m.model->set_modules_to_save_enabled(false);  // the original embeddings/lm_head too
  }
  std::vector<ExampleScore> out;
  out.reserve(indices.size());
  try {
    for (size_t s = 0; s < indices.size(); s += static_cast<size_t>(batch_size)) {
      std::vector<PreferenceExample> ex;
      for (size_t k = s; k < std::min(indices.size(), s + static_cast<size_t>(batch_size)); ++k)
        ex.push_back(reader.get(indices[k]));
      PreferenceBatch b = collate_pairs(ex, reader.attrs().pad_id);
      auto ids = b.input_ids.to(m.device);
      SeqLogps lp = sequence_logps(m.model->forward(ids, b.attention_mask.to(m.device)), ids, b.loss_mask.to(m.device));
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
  } catch (...) {
    lora_set_enabled(m.projections, true);
    m.model->set_modules_to_save_enabled(true);
    if (was_training) m.model->train();
    throw;
  }
  lora_set_enabled(m.projections, true);
  m.model->set_modules_to_save_enabled(true);
  if (was_training) m.model->train();
  return out;
}

}  // namespace dpo
