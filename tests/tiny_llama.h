// The tiny Llama shape and the in-process training options the libtorch tests share
// (header-only: tests/test_util.h stays free of libtorch).
#pragma once
#include <cstdint>
#include <string>

#include "core/llama.h"
#include "launch/train_options.h"
#include "tests/fp_bounds.h"

namespace dpo::testutil {

/// A 2-layer Llama small enough for exact tests: hidden 32, 4 heads over 2 key/value
/// heads, MLP 64, initializer_range 0.2 (larger than HF's 0.02, so that logits and the DPO
/// signal are far from uniform). Tests change the fields their case is about.
inline LlamaConfig tiny_llama_config(int64_t vocab) {
  LlamaConfig c;
  c.hidden_size = 32;
  c.intermediate_size = 64;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.vocab_size = vocab;
  c.initializer_range = 0.2;
  return c;
}

/// dpo::train options for a short in-process run on a tiny model: the fake (one-rank)
/// backend, one thread, no progress line or watchdog, constant learning rate, LoRA r 4 /
/// alpha 8 on every projection. Tests set the steps, batch and loss they need.
inline TrainOptions tiny_run_options(const std::string& model_dir, const std::string& train_file,
                                     const std::string& output_dir) {
  TrainOptions o;
  o.model_name_or_path = model_dir;
  o.train_file = train_file;
  o.output_dir = output_dir;
  o.lr_scheduler_type = "constant";
  o.lora_r = 4;
  o.lora_alpha = 8;
  o.lora_target_modules = {"all-linear"};
  o.progress = "off";
  o.backend = "fake";
  o.collective_timeout = 0;
  o.threads = 1;
  return o;
}

/// The tolerance, relative to the largest |entry|, between two fp32 evaluations of model
/// `c` on T tokens that differ only in the order of their sums (another attention kernel,
/// token tiles, batch shape, BLAS blocking, thread count): 2 gamma(N), N the model's longest
/// rounding chain (tests/fp_bounds.h, llama_forward_roundings), or 2N for gradients, whose
/// backward chain follows the forward's. Against a float64 reference: half of it.
/// extra: roundings per evaluation on top of the model's chain (e.g. a merged weight's).
inline double llama_rel_tolerance(const LlamaConfig& c, int64_t T, bool grads = false, double extra = 0) {
  const int64_t D = c.head_dim ? c.head_dim : c.hidden_size / c.num_attention_heads;
  const double n = llama_forward_roundings(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, D,
                                           c.intermediate_size, T);
  return 2 * gamma((grads ? 2 * n : n) + extra);
}

/// Logged metrics of two short training runs whose evaluations differ only in the order of
/// their sums, each forward + backward within tau relative (llama_rel_tolerance(c, T, true)):
/// step k's metrics come from a forward after k - 1 AdamW updates. The update
/// lr m^ / (sqrt(v^) + eps) is scale-free: gradients that differ by tau relative move it by
/// <= 2 tau relative (m^ and sqrt(v^) by tau each) wherever a gradient is above its rounding
/// noise (these tests' gradients are), so the metrics differ by the forward's tau plus the
/// parameters' drift: (2k - 1) tau, relative to max(1, |metric|).
inline double run_rel_tolerance(double tau, int64_t step) { return (2 * static_cast<double>(step) - 1) * tau; }

}  // namespace dpo::testutil
