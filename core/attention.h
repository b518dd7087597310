// Scaled dot-product attention of the decoder for any "who sees whom" layout of a
// batch: plain right-padded rows, a preference pair sharing its prompt
// ([prompt; chosen; rejected], rejected seeing the prompt but not chosen), or several
// pairs packed into one row (block-diagonal). Two kernels compute the same thing:
//   attention_dense   - (B, H, T, T) scores and probabilities, as transformers' eager path;
//   attention_chunked - fp32 CPU, blocks of queries against only the keys they may see,
//                       log-sum-exp saved, probabilities recomputed in backward
//                       (flash-attention's scheme with BLAS blocks): memory linear in T,
//                       no work for invisible keys.
//
// Legend: B rows, T tokens per row, H query heads, K key/value heads (R = H / K query
// heads share one), D head_dim, S segments.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include <torch/types.h>

namespace dpo {

/// Tokens [begin, end) of row `row`. `parent` (index into AttentionLayout::segments,
/// or -1) is a segment of the same row before this one that this segment continues:
/// its queries see every token of the parent and of the parent's ancestors.
struct AttentionSegment {
  int64_t row = 0;
  int64_t begin = 0;
  int64_t end = 0;
  int64_t parent = -1;
};

/// Visibility of a (B, T) batch: a query at token t of segment s sees keys [begin(s), t]
/// and all tokens of s's ancestors. A token in no segment (padding) sees only itself
/// (its output is never used, but stays finite). position_ids gives the RoPE position
/// of every token (e.g. a rejected answer continues at the prompt's length).
struct AttentionLayout {
  int64_t rows = 0;                     // B
  int64_t tokens = 0;                   // T
  std::vector<AttentionSegment> segments;
  torch::Tensor position_ids;           // (B, T) int64 CPU
};

/// Throws std::runtime_error unless every segment lies in [0, T) of a row < B, segments
/// do not overlap, a parent is an earlier segment of the same row that ends before its
/// child begins, and position_ids is (B, T) int64.
void attention_layout_check(const AttentionLayout& layout);

/// The layout of right-padded rows: one segment [0, length) per row, positions 0..T-1.
/// Empty when a row of `attention_mask` (B, T) is not of the form 1..1 0..0.
std::optional<AttentionLayout> attention_layout_from_mask(const torch::Tensor& attention_mask);

/// The layout as a dense (B, 1, T, T) bool mask (true = query t may see key j).
torch::Tensor attention_layout_dense_mask(const AttentionLayout& layout);

/// softmax(q k^T / sqrt(D) masked by `allowed`) v; query head h uses kv head h / R.
/// q (B, H, T, D), k, v (B, K, T, D) -> (B, H, T, D); allowed (B, 1, T, T) bool. Scores
/// and softmax in fp32 whatever the compute dtype (as transformers' eager attention).
torch::Tensor attention_dense(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                              const torch::Tensor& allowed);

/// The same function for fp32 CPU tensors in token-major layout, differentiable w.r.t.
/// q, k and v: q (B, T, H, D), k, v (B, T, K, D) -> (B, T, H, D). Never builds a
/// (T, T) tensor: queries go in blocks of kAttentionQueryBlock against the key ranges
/// the layout lets them see.
torch::Tensor attention_chunked(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                std::shared_ptr<const AttentionLayout> layout);

/// Queries per block of attention_chunked.
constexpr int64_t kAttentionQueryBlock = 128;

}  // namespace dpo
