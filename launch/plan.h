// dpo_dist --dry_run: the plan of a run without loading the model. Process layout,
// global batch, steps and epochs from the HDF5 file's offsets (no token is read),
// tokens per step, an estimate of memory per rank from config.json's shapes, and the
// checkpoint a resume would use.
//
// Legend: R rows of a micro-batch (2B for DPO, B for SFT), T padded row length,
// C hidden, F intermediate, L layers, H heads, K kv heads, D head dim, V vocabulary.
#pragma once
#include <cstdint>
#include <string>

#include "core/llama.h"
#include "launch/train_options.h"

namespace dpo {

/// Estimated bytes held per rank (the parts, so tests and the plan can show them).
struct MemoryEstimate {
  double base_weights = 0;   // frozen projections (NF4 + absmax, or dense) + embeddings, norms, lm_head
  double adapters = 0;       // LoRA A/B fp32 + their grads + AdamW's two moments (16 bytes / parameter)
  double activations = 0;    // what the policy forward keeps for backward (one micro-batch)
  double logits = 0;         // (R, T, V) fp32 logits + their gradient
  double total() const { return base_weights + adapters + activations + logits; }
  int64_t lora_parameters = 0;
};

/// rows R and padded length T of the largest micro-batch; compute_bytes = 4 (fp32) or 2.
MemoryEstimate estimate_memory(const LlamaConfig& cfg, const TrainOptions& o, int64_t rows, int64_t T,
                               int64_t compute_bytes);

/// The whole plan as printable lines. world / local_size: this job's process layout.
/// Throws (naming the file) when the data file or config.json cannot be read.
std::string dry_run_plan(const TrainOptions& o, int world, int local_size);

/// "3.51 GB" (decimal units, as docs/benchmarks.md).
std::string format_bytes(double bytes);

}  // namespace dpo
