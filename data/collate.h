// Padded training batches from preference examples (libtorch tensors; a separate
// target, dpo_collate, so that dpo_preprocess does not link libtorch).
//
// Legend: B = pairs (or SFT rows) in the batch, T = longest row (prompt + answer).
// Rows are right-padded with pad_id. Position t of a row is an answer token when
// loss_mask[t] = 1; its log-prob comes from the logits at position t - 1 (t >= 1
// always, since every row starts with the prompt's bos).
#pragma once
#include <cstdint>
#include <vector>

#include <torch/types.h>

#include "data/preference_h5.h"

namespace dpo {

struct PreferenceBatch {
  torch::Tensor input_ids;       // (2B, T) int64: rows 0..B-1 = prompt+chosen, B..2B-1 = prompt+rejected
  torch::Tensor attention_mask;  // (2B, T) int64: 1 on real tokens, 0 on padding
  torch::Tensor loss_mask;       // (2B, T) float32: 1 on answer tokens
  torch::Tensor ref_logps;       // (2B) float64 [ref_chosen...; ref_rejected...], undefined when none
  int64_t num_pairs = 0;         // B
};

/// Collates pairs. pad_id must be >= 0 (use PreferenceAttrs::pad_id). ref_logps is
/// defined when every example carries both reference values (from /ref_logps), and
/// undefined when none does; a mix throws std::invalid_argument. An empty batch gives
/// (0, 0) tensors and num_pairs = 0.
PreferenceBatch collate_pairs(const std::vector<PreferenceExample>& examples, int64_t pad_id);

/// A DPO micro-batch laid out to do the least work (docs/architecture.md):
///   share_prompt: one sequence per pair, [prompt; chosen; rejected]; the rejected
///     answer's positions restart after the prompt and it sees the prompt, not chosen;
///     else two sequences per pair, [prompt; chosen] and [prompt; rejected];
///   one_row (padding-free): every sequence of the batch back to back in one row, each
///     seeing only its own pair; else one sequence per row, right-padded.
/// The model reads input_ids with the segments/position_ids as its attention layout;
/// the log-probs read the hidden state at target_position (flat index row * T + t)
/// for target_token, summed into target_sequence (chosen of pair i -> i, rejected -> B + i).
struct PackedSegment {
  int64_t row = 0, begin = 0, end = 0;
  int64_t parent = -1;  // index of the segment this one continues (the shared prompt), -1 none
};

struct PackedPairs {
  torch::Tensor input_ids;        // (rows, T) int64, pad_id after the last segment of a row
  torch::Tensor position_ids;     // (rows, T) int64 RoPE positions (0 on padding)
  std::vector<PackedSegment> segments;
  torch::Tensor target_position;  // (M) int64: row * T + t of the position that predicts the token
  torch::Tensor target_token;     // (M) int64: the answer token
  torch::Tensor target_sequence;  // (M) int64 in [0, 2B)
  torch::Tensor ref_logps;        // (2B) float64, as PreferenceBatch::ref_logps
  int64_t num_pairs = 0;          // B
  /// Real tokens as TRL counts them (the prompt once per row: 2 P + C + R per pair).
  int64_t trl_tokens = 0;
  /// Token positions the model actually runs (padding included).
  int64_t computed_tokens = 0;
};

/// Collates pairs as above. Same checks as collate_pairs.
PackedPairs collate_packed(const std::vector<PreferenceExample>& examples, int64_t pad_id, bool share_prompt,
                           bool one_row);

struct SftBatch {
  torch::Tensor input_ids;       // (B, T) int64: prompt + chosen, right-padded
  torch::Tensor attention_mask;  // (B, T) int64
  torch::Tensor loss_mask;       // (B, T) float32: 1 on chosen tokens
  int64_t num_rows = 0;          // B
};

/// SFT on the chosen answers (prompt + chosen only).
SftBatch collate_sft(const std::vector<PreferenceExample>& examples, int64_t pad_id);

}  // namespace dpo
