#include "data/collate.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace dpo {
namespace {

// Fills row r of (input_ids, attention_mask, loss_mask) with prompt + answer.
void fill_row(int64_t r, int64_t T, const std::vector<int32_t>& prompt, const std::vector<int32_t>& answer,
              int64_t* ids, int64_t* attn, float* loss) {
  int64_t* row_ids = ids + r * T;
  int64_t* row_attn = attn + r * T;
  float* row_loss = loss + r * T;
  const int64_t lp = prompt.size(), la = answer.size();
  for (int64_t t = 0; t < lp; ++t) row_ids[t] = prompt[t];
  for (int64_t t = 0; t < la; ++t) {
    row_ids[lp + t] = answer[t];
    row_loss[lp + t] = 1.0f;
  }
  for (int64_t t = 0; t < lp + la; ++t) row_attn[t] = 1;
}

void check_pad(int64_t pad_id) {
  if (pad_id < 0) throw std::invalid_argument("collate: pad_id must be >= 0 (got " + std::to_string(pad_id) + ")");
}

// The (2B) [chosen; rejected] reference log-probs of the examples, or undefined when none
// has them; some but not all is an error (`who` names the caller).
torch::Tensor reference_logps_of(const std::vector<PreferenceExample>& examples, const char* who) {
  const int64_t B = examples.size();
  int64_t with_ref = 0;
  for (const auto& e : examples) with_ref += (!std::isnan(e.ref_chosen) && !std::isnan(e.ref_rejected)) ? 1 : 0;
  if (with_ref != 0 && with_ref != B)
    throw std::invalid_argument(std::string(who) + ": " + std::to_string(with_ref) + " of " + std::to_string(B) +
                                " examples have reference log-probs; all or none must");
  if (B == 0 || with_ref == 0) return torch::Tensor();
  torch::Tensor t = torch::empty({2 * B}, torch::TensorOptions().dtype(torch::kFloat64));
  double* ref = t.data_ptr<double>();
  for (int64_t i = 0; i < B; ++i) {
    ref[i] = examples[i].ref_chosen;
    ref[B + i] = examples[i].ref_rejected;
  }
  return t;
}

}  // namespace

PreferenceBatch collate_pairs(const std::vector<PreferenceExample>& examples, int64_t pad_id) {
  check_pad(pad_id);
  const int64_t B = examples.size();
  int64_t T = 0;
  for (const auto& e : examples) {
    if (e.prompt.empty()) throw std::invalid_argument("collate_pairs: example " + std::to_string(e.index) + " has an empty prompt");
    T = std::max<int64_t>(T, e.prompt.size() + std::max(e.chosen.size(), e.rejected.size()));
  }
  torch::Tensor ref = reference_logps_of(examples, "collate_pairs");
  PreferenceBatch b;
  b.num_pairs = B;
  const auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  b.input_ids = torch::full({2 * B, T}, pad_id, i64);
  b.attention_mask = torch::zeros({2 * B, T}, i64);
  b.loss_mask = torch::zeros({2 * B, T}, torch::TensorOptions().dtype(torch::kFloat32));
  int64_t* ids = b.input_ids.data_ptr<int64_t>();
  int64_t* attn = b.attention_mask.data_ptr<int64_t>();
  float* loss = b.loss_mask.data_ptr<float>();
  for (int64_t i = 0; i < B; ++i) {
    fill_row(i, T, examples[i].prompt, examples[i].chosen, ids, attn, loss);
    fill_row(B + i, T, examples[i].prompt, examples[i].rejected, ids, attn, loss);
  }
  b.ref_logps = ref;
  return b;
}

PackedPairs collate_packed(const std::vector<PreferenceExample>& examples, int64_t pad_id, bool share_prompt,
                           bool one_row) {
  check_pad(pad_id);
  const int64_t B = examples.size();
  for (const auto& e : examples) {
    if (e.prompt.empty())
      throw std::invalid_argument("collate_packed: example " + std::to_string(e.index) + " has an empty prompt");
  }
  torch::Tensor ref = reference_logps_of(examples, "collate_packed");
  // The sequences in order: per pair, share_prompt ? {prompt+chosen+rejected} : {prompt+chosen}, {prompt+rejected}.
  std::vector<int64_t> lengths;  // token count of each sequence, in order
  for (const auto& e : examples) {
    const int64_t p = e.prompt.size(), c = e.chosen.size(), r = e.rejected.size();
    if (share_prompt) {
      lengths.push_back(p + c + r);
    } else {
      lengths.push_back(p + c);
      lengths.push_back(p + r);
    }
  }
  int64_t rows = 0, T = 0;
  if (one_row) {
    rows = B > 0 ? 1 : 0;
    for (int64_t l : lengths) T += l;
  } else {
    rows = static_cast<int64_t>(lengths.size());
    for (int64_t l : lengths) T = std::max(T, l);
  }
  PackedPairs b;
  b.num_pairs = B;
  const auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  b.input_ids = torch::full({rows, T}, pad_id, i64);
  b.position_ids = torch::zeros({rows, T}, i64);
  int64_t* ids = b.input_ids.data_ptr<int64_t>();
  int64_t* pos = b.position_ids.data_ptr<int64_t>();
  std::vector<int64_t> tpos, ttok, tseq;
  int64_t row = 0, at = 0;  // where the next sequence starts
  auto place = [&](const std::vector<int32_t>& toks, int64_t first_pos) {
    for (size_t j = 0; j < toks.size(); ++j) {
      ids[row * T + at + static_cast<int64_t>(j)] = toks[j];
      pos[row * T + at + static_cast<int64_t>(j)] = first_pos + static_cast<int64_t>(j);
    }
  };
  // The answer's token j is predicted by the position before it: the prompt's last
  // token for j = 0 (shared or not), else the answer's token j - 1.
  auto add_targets = [&](const std::vector<int32_t>& answer, int64_t answer_begin, int64_t prompt_last, int64_t seq) {
    for (size_t j = 0; j < answer.size(); ++j) {
      tpos.push_back(row * T + (j == 0 ? prompt_last : answer_begin + static_cast<int64_t>(j) - 1));
      ttok.push_back(answer[j]);
      tseq.push_back(seq);
    }
  };
  auto next_sequence = [&](int64_t len) {
    if (one_row) {
      at += len;
    } else {
      ++row;
      at = 0;
    }
  };
  for (int64_t i = 0; i < B; ++i) {
    const auto& e = examples[i];
    const int64_t p = e.prompt.size(), c = e.chosen.size(), r = e.rejected.size();
    b.trl_tokens += 2 * p + c + r;
    if (share_prompt) {
      const int64_t seg = static_cast<int64_t>(b.segments.size());
      place(e.prompt, 0);
      b.segments.push_back({row, at, at + p, -1});
      at += p;
      place(e.chosen, p);
      b.segments.push_back({row, at, at + c, seg});
      add_targets(e.chosen, at, at - 1, i);
      at += c;
      place(e.rejected, p);
      b.segments.push_back({row, at, at + r, seg});
      add_targets(e.rejected, at, at - c - 1, B + i);
      at -= p + c;  // back to the start of this pair's sequence
      next_sequence(p + c + r);
    } else {
      for (int k = 0; k < 2; ++k) {
        const auto& answer = k == 0 ? e.chosen : e.rejected;
        place(e.prompt, 0);
        b.segments.push_back({row, at, at + p, -1});
        at += p;
        place(answer, p);
        // Prompt and answer as one segment: a causal sequence like a padded row.
        b.segments.back().end = at + static_cast<int64_t>(answer.size());
        add_targets(answer, at, at - 1, k == 0 ? i : B + i);
        at -= p;
        next_sequence(p + static_cast<int64_t>(answer.size()));
      }
    }
  }
  b.computed_tokens = rows * T;
  auto to_tensor = [](const std::vector<int64_t>& v) {
    torch::Tensor t = torch::empty({static_cast<int64_t>(v.size())}, torch::kInt64);
    std::copy(v.begin(), v.end(), t.data_ptr<int64_t>());
    return t;
  };
  b.target_position = to_tensor(tpos);
  b.target_token = to_tensor(ttok);
  b.target_sequence = to_tensor(tseq);
  b.ref_logps = ref;
  return b;
}

SftBatch collate_sft(const std::vector<PreferenceExample>& examples, int64_t pad_id) {
  check_pad(pad_id);
  const int64_t B = examples.size();
  int64_t T = 0;
  for (const auto& e : examples) {
    if (e.prompt.empty()) throw std::invalid_argument("collate_sft: example " + std::to_string(e.index) + " has an empty prompt");
    T = std::max<int64_t>(T, e.prompt.size() + e.chosen.size());
  }
  SftBatch b;
  b.num_rows = B;
  const auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  b.input_ids = torch::full({B, T}, pad_id, i64);
  b.attention_mask = torch::zeros({B, T}, i64);
  b.loss_mask = torch::zeros({B, T}, torch::TensorOptions().dtype(torch::kFloat32));
  for (int64_t i = 0; i < B; ++i)
    fill_row(i, T, examples[i].prompt, examples[i].chosen, b.input_ids.data_ptr<int64_t>(),
             b.attention_mask.data_ptr<int64_t>(), b.loss_mask.data_ptr<float>());
  return b;
}

}  // namespace dpo
