// Per-sequence log-probs of the answer tokens from a model's (R, T, V) logits: the
// hand-vectorized CPU kernel (one pass over V per scored position, nothing of size V
// stored) with its autograd function, an ATen fallback for other devices, and the two
// reductions the objectives use (length-average, token-mean NLL).
//
// Legend: R = rows (R = 2B for a DPO batch: the B chosen rows first, then the B
// rejected rows, as TRL's concatenated_forward), T = tokens per row (prompt + answer
// + padding), V = vocabulary size.
//
// Token alignment (causal LM): the log-prob of token t is read from the logits at
// position t-1, so loss_mask[:, 0] is never used (nothing predicts the first token).
#pragma once
#include <cstdint>

#include <torch/types.h>

namespace dpo {

/// Per-row statistics of the answer tokens of (R, T, V) logits.
struct SeqLogps {
  /// Sum over answer tokens of log p(token | prefix), computed with an fp32 (fp64 for
  /// fp64 logits) log-softmax. Differentiable w.r.t. the logits. 0 for a row without
  /// answer tokens.
  torch::Tensor logps;  // (R) fp32 (fp64 for fp64 logits)
  /// Mean over the row's answer positions of the mean logit over V (the positions
  /// t-1 that predict answer tokens). Detached. 0 for a row without answer tokens.
  /// TRL's logits/chosen is a TOKEN-weighted mean over all answer positions of the
  /// chosen rows: sum_r mean_logits[r] * token_counts[r] / sum_r token_counts[r]
  /// (not the plain mean over rows, unless all rows have the same answer length).
  torch::Tensor mean_logits;  // (R) same dtype as logps
  /// Number of answer tokens that were scored (loss_mask[:, 1:] != 0).
  torch::Tensor token_counts;  // (R) int64
  /// WPO (head_logps with HeadLogpsOptions::wpo only, else undefined): per sequence, the
  /// mean over its tokens of log p(token) - log sum_v p_v^2 (WPO, arXiv 2406.11827 eq. 2,
  /// as TRL's use_weighting), from the unweighted log-probs. Detached.
  torch::Tensor wpo_logps;  // (R) same dtype as logps
  /// With HeadLogpsOptions::token_weight only (else undefined): the unweighted sums, for
  /// terms that are plain NLLs (sft, RPO). Differentiable.
  torch::Tensor unweighted_logps;  // (R) same dtype as logps
};

/// Log-probs of the answer tokens of every row.
/// logits: any float dtype, any device; never copied whole to fp32: on CPU a
/// hand-written loop reads each needed position once in place; on other devices
/// (or `aten` path) each row's needed positions are upcast separately.
/// Positions that predict no answer token (prompt, padding) cost nothing.
/// Throws std::runtime_error on bad shapes or an answer token id outside [0, V).
SeqLogps sequence_logps(const torch::Tensor& logits,     // (R, T, V) float
                        const torch::Tensor& input_ids,  // (R, T) integer
                        const torch::Tensor& loss_mask); // (R, T) nonzero at answer tokens

/// The shape and dtype checks of sequence_logps, for callers that want them before
/// other work: logits (R, T, V) float, input_ids (R, T) integer, loss_mask (R, T).
/// Throws std::runtime_error naming the mismatch.
void check_logps_inputs(const torch::Tensor& logits, const torch::Tensor& input_ids,
                        const torch::Tensor& loss_mask);

/// logps / token_counts per row (0 where a row has no answer tokens): the
/// length-averaged log-probs TRL uses for loss_type "ipo".
torch::Tensor average_by_length(const torch::Tensor& logps,          // (R) float
                                const torch::Tensor& token_counts);  // (R) int64

/// Mean negative log-likelihood per token over all rows together (token-weighted):
/// -sum(logps) / sum(token_counts); 0 when there are no tokens. Differentiable
/// through logps. TRL's RPO nll_loss is this over the chosen rows of one micro-batch.
torch::Tensor token_mean_nll(const torch::Tensor& logps,          // (R) summed log-probs
                             const torch::Tensor& token_counts);  // (R) int64

/// Optional parts of head_logps, off by default (no cost when off).
struct HeadLogpsOptions {
  /// (M) weight of each entry in its sequence's sum (LD-DPO: ld_token_weights); the
  /// gradient of entry i is scaled by it too. Undefined = 1 each.
  torch::Tensor token_weight;
  /// Also compute SeqLogps::wpo_logps (one more running sum per position, same exps).
  bool wpo = false;
};

/// Log-probs of scored tokens straight from the final hidden states, without ever
/// building the (positions, V) logits: the hidden rows at `position` go through lm_head
/// + log-softmax in chunks of ~32 MiB of fp32 logits (on the CPU: vocabulary blocks of
/// the weight, each widened to hidden's dtype once per pass when the weight is stored in
/// half precision, with a running log-sum-exp per position), and backward recomputes each
/// chunk (grad w.r.t. hidden, and w.r.t. the weight only when it requires grad: a
/// modules_to_save lm_head). Entry i scores
/// token[i] with the logits of hidden row position[i] (a flat index over hidden's
/// leading dims) and adds it to sequence[i]. With `weight` undefined, `hidden` holds
/// logits already ((..., V): the full-logits path) and is only read at `position`.
/// Same statistics as sequence_logps, per sequence: logps (S) fp32, differentiable;
/// mean_logits (S); token_counts (S); and the extras `extra` asks for.
SeqLogps head_logps(const torch::Tensor& hidden,    // (..., C) compute dtype, or (..., V) logits
                    const torch::Tensor& weight,    // (V, C) lm_head, or undefined
                    const torch::Tensor& position,  // (M) int64
                    const torch::Tensor& token,     // (M) int64 in [0, V)
                    const torch::Tensor& sequence,  // (M) int64 in [0, S)
                    int64_t sequences,              // S
                    const HeadLogpsOptions& extra = {});

/// The head_logps entries of padded rows: row r's answer token t (loss_mask[r][t] != 0,
/// t >= 1) is read at flat position r * T + t - 1 and summed into sequence r. Same
/// checks as sequence_logps (token ids in [0, vocab)).
struct AnswerTargets {
  torch::Tensor position, token, sequence;  // (M) int64, CPU
  int64_t sequences = 0;                    // R
};
AnswerTargets answer_targets(const torch::Tensor& input_ids,  // (R, T)
                             const torch::Tensor& loss_mask,  // (R, T)
                             int64_t vocab);

/// LD-DPO's token weights (Liu et al. 2024, arXiv 2409.06411; TRL's ld_alpha) for head_logps
/// entries of 2B sequences [chosen; rejected]: within each answer, in entry order, the
/// first l_p tokens weigh 1 and the rest alpha, l_p = min(chosen length, rejected length)
/// of its pair. (M) double.
torch::Tensor ld_token_weights(const torch::Tensor& target_sequence, int64_t sequences, double alpha);

namespace detail {
/// head_logps's positions per chunk; 0 = automatic (~32 MiB of fp32 logits). For tests.
void set_head_chunk_rows(int64_t rows);
/// head_logps's vocabulary rows per block on the CPU with a weight; 0 = automatic
/// (a multiple of 512 keeping the block's logits and widened weight ~32 MiB). For tests.
void set_head_vocab_block(int64_t rows);
/// Which kernel sequence_logps uses: automatic = the CPU loop for contiguous CPU
/// logits, ATen ops otherwise. Exposed for tests that compare the two.
enum class LogpsKernel { automatic, cpu_loop, aten };
SeqLogps sequence_logps(const torch::Tensor& logits, const torch::Tensor& input_ids,
                        const torch::Tensor& loss_mask, LogpsKernel kernel);
}  // namespace detail

}  // namespace dpo
