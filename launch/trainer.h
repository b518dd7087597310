// The training loop of dpo_dist: it orders the step, the objective of --stage
// (launch/objective.h: DPO, SFT) computes it. One optimizer step is
//   1. this rank's micro-batches of the global batch (data/sampler)
//   2. Objective::step: per micro-batch reference log-probs where the loss needs them
//      (HDF5 /ref_logps, or a no-grad forward with adapters off), policy forward, loss
//      normalised by the GLOBAL count of the step (DPO: pairs; SFT: answer tokens), backward
//   3. one fused all-reduce of the adapter gradients (dist/grad_sync), averaged
//   4. clip by global norm (grad_norm logged before clipping), AdamW, LR schedule
//   5. metric sums reduced over ranks; rank 0 logs, evaluates, checkpoints
// Ranks agree on a stop signal at step boundaries; then rank 0 checkpoints and
// every rank returns kExitPreempted.
#pragma once
#include "dist/communicator.h"
#include "launch/train_options.h"

namespace dpo {

/// Runs a whole training job on this rank. Returns the process exit code
/// (0, or kExitPreempted after a signal-triggered checkpoint). Throws on errors.
int train(const TrainOptions& opts, Communicator& comm);

}  // namespace dpo
