#include "launch/dpo_step.h"

#include <algorithm>
#include <chrono>

#include <ATen/CPUGeneratorImpl.h>

#include "core/dpo.h"
#include "core/reference_mode.h"

namespace dpo {

ModelBatch model_batch(const PackedPairs& p, const torch::Device& device) {
  auto layout = std::make_shared<AttentionLayout>();
  layout->rows = p.input_ids.size(0);
  layout->tokens = p.input_ids.size(1);
  layout->position_ids = p.position_ids;
  layout->segments.reserve(p.segments.size());
  for (const auto& s : p.segments) layout->segments.push_back({s.row, s.begin, s.end, s.parent});
  ModelBatch b;
  b.input_ids = p.input_ids.to(device);
  b.layout = std::move(layout);
  b.target_position = p.target_position;
  b.target_token = p.target_token;
  b.target_sequence = p.target_sequence;
  b.sequences = 2 * p.num_pairs;
  return b;
}

SeqLogps model_answer_logps(LlamaModel& model, const ModelBatch& b, bool chunked, const HeadLogpsOptions& extra) {
  torch::Tensor h = model->hidden_states(b.input_ids, b.layout);  // (rows, T, C)
  if (chunked)
    return head_logps(h, model->lm_head_weight(), b.target_position, b.target_token, b.target_sequence, b.sequences,
                      extra);
  torch::Tensor logits = model->lm_logits(h);  // (rows, T, V) fp32
  return head_logps(logits, torch::Tensor(), b.target_position, b.target_token, b.target_sequence, b.sequences, extra);
}

SeqLogps padded_answer_logps(LlamaModel& model, const torch::Tensor& ids, const torch::Tensor& mask,
                             const torch::Tensor& loss_mask) {
  return sequence_logps(model->forward(ids, mask), ids, loss_mask);  // logits (2B, T, V)
}

torch::Tensor reference_logps(LlamaModel& model, const NamedLinears& adapters, const ModelBatch& b, bool chunked) {
  torch::NoGradGuard ng;
  ReferenceModeGuard reference(model, adapters);
  return model_answer_logps(model, b, chunked).logps.to(torch::kFloat64);
}

torch::Tensor reference_logps(LlamaModel& model, const NamedLinears& adapters, const torch::Tensor& ids,
                              const torch::Tensor& mask, const torch::Tensor& loss_mask) {
  torch::NoGradGuard ng;
  ReferenceModeGuard reference(model, adapters);
  return padded_answer_logps(model, ids, mask, loss_mask).logps.to(torch::kFloat64);
}

DpoStepLoss dpo_padded_loss(const DpoModel& m, const std::vector<PreferenceExample>& ex, int64_t pad_id,
                            const DpoOptions& opts, int64_t* tokens, double* flops, torch::Tensor* ref_out) {
  LlamaModel model = m.model;
  const PackedPairs p = collate_packed(ex, pad_id, /*share_prompt=*/false, /*one_row=*/false);  // counts only
  if (tokens) *tokens += p.trl_tokens;
  const bool ckpt = m.gradient_checkpointing && torch::GradMode::is_enabled();
  if (flops)
    *flops += dpo_step_flops(model->config(), p, DpoStepOptions{false, false, false}, true, !p.ref_logps.defined(), ckpt);
  PreferenceBatch pb = collate_pairs(ex, pad_id);
  auto ids = pb.input_ids.to(m.device), mask = pb.attention_mask.to(m.device), lm = pb.loss_mask.to(m.device);
  torch::Tensor ref = pb.ref_logps.defined() ? pb.ref_logps : reference_logps(model, *m.adapters, ids, mask, lm);
  if (ref_out) *ref_out = ref;
  return dpo_batch_loss(model->forward(ids, mask), ids, lm, ref.to(m.device), opts);
}

DpoStepLoss dpo_packed_loss(const DpoModel& m, const std::vector<PreferenceExample>& ex, int64_t pad_id,
                            const DpoStepOptions& so, const DpoOptions& opts, int64_t* tokens, double* flops,
                            torch::Tensor* ref_out) {
  LlamaModel model = m.model;
  const PackedPairs p = collate_packed(ex, pad_id, so.share_prompt, so.padding_free);
  if (tokens) *tokens += p.trl_tokens;
  const bool ckpt = m.gradient_checkpointing && torch::GradMode::is_enabled();
  ModelBatch b = model_batch(p, m.device);
  const bool dense = model->attention_kernel() == AttentionKernel::kDense || model->compute_dtype() != torch::kFloat32 ||
                     !m.device.is_cpu();
  if (flops) *flops += dpo_step_flops(model->config(), p, so, dense, !p.ref_logps.defined(), ckpt);
  torch::Tensor ref = p.ref_logps.defined() ? p.ref_logps : reference_logps(model, *m.adapters, b, so.chunked_logps);
  if (ref_out) *ref_out = ref;
  return dpo_batch_loss(model_answer_logps(model, b, so.chunked_logps,
                                           policy_logps_options(opts, b.target_sequence, b.sequences)),
                        ref.to(m.device), opts);
}

double dpo_step_flops(const LlamaConfig& cfg, const PackedPairs& p, const DpoStepOptions& o, bool dense_attention,
                      bool reference, bool checkpointing) {
  const double C = cfg.hidden_size, F = cfg.intermediate_size, V = cfg.vocab_size, L = cfg.num_hidden_layers;
  const double H = cfg.num_attention_heads, K = cfg.num_key_value_heads > 0 ? cfg.num_key_value_heads : H;
  const double D = cfg.head_dim > 0 ? cfg.head_dim : C / H;
  const double proj_params = L * (C * H * D * 2 + 2 * C * K * D + 3 * C * F);  // q, o, k, v, gate, up, down
  const double rows = static_cast<double>(p.input_ids.size(0)), T = static_cast<double>(p.input_ids.size(1));
  const double positions = rows * T, targets = static_cast<double>(p.target_token.numel());
  // (query, key) pairs whose scores are computed, per head and layer.
  double pairs = 0;
  if (dense_attention) {
    pairs = rows * T * T;
  } else {
    std::vector<double> seg_keys(p.segments.size(), 0);  // keys of a segment's ancestors
    for (size_t i = 0; i < p.segments.size(); ++i) {
      const auto& s = p.segments[i];
      double anc = 0;
      for (int64_t a = s.parent; a >= 0; a = p.segments[a].parent) anc += p.segments[a].end - p.segments[a].begin;
      for (int64_t q0 = s.begin; q0 < s.end; q0 += kAttentionQueryBlock) {
        const int64_t q1 = std::min(s.end, q0 + kAttentionQueryBlock);
        pairs += static_cast<double>(q1 - q0) * (anc + static_cast<double>(q1 - s.begin));
      }
    }
  }
  const double attn_fwd = L * 4 * pairs * H * D;
  const double attn_bwd = L * (dense_attention ? 8 : 10) * pairs * H * D;
  const double layers_fwd = 2 * proj_params * positions + attn_fwd;
  const double head_fwd = 2 * V * C * (o.chunked_logps ? targets : positions);
  const double head_bwd = o.chunked_logps ? 4 * V * C * targets : 2 * V * C * positions;
  double f = layers_fwd + head_fwd;                                    // policy forward
  f += 2 * proj_params * positions + attn_bwd + head_bwd;             // backward (grad_x)
  if (checkpointing) f += layers_fwd;                                  // recomputed layers
  if (reference) f += layers_fwd + head_fwd;                           // reference forward
  return f;
}

double measure_matmul_gflops(int64_t n, int iters) {
  at::Generator gen = at::detail::createCPUGenerator(0);  // not the default generator: dropout streams stay as they are
  auto a = at::randn({n, n}, gen), b = at::randn({n, n}, gen), c = torch::empty({n, n});
  at::mm_out(c, a, b);
  double best = 1e30;
  for (int i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    at::mm_out(c, a, b);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return 2.0 * static_cast<double>(n) * n * n / best / 1e9;
}

}  // namespace dpo
