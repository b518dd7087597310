// Data-parallel averaging: the trainable (LoRA) gradients reduced over ranks through ONE
// fused buffer per optimizer step. (Logged metrics are reduced as sums by the trainer:
// core/dpo.h DpoMetrics / SftMetrics.)
//
// Letters: P = trainable parameter tensors, N = total gradient elements (sum of numel),
//          W = world size.
//
// GradSync::sync(params) protocol (every rank calls it at the same point):
//  1. Every param whose grad() is undefined gets a zero gradient, so every rank sends the
//     same layout (a rank whose batch never reached a module still contributes zeros).
//  2. On the first call, and whenever this rank's layout (P, dtypes, numels) changes: allgather
//     the layout strings; every rank compares all of them and throws the same CommError if
//     any differs. A layout change must therefore happen on all ranks at the same call.
//  3. Copy grad i into flat[off_i, off_i + numel_i) in the order given.
//  4. allreduce_sum(flat) once; flat /= W (the mean, as PyTorch DDP).
//  5. Copy every slice back into its grad in place (same storage: optimizer state and
//     references to the grads stay valid).
// With W == 1 only step 1 runs.

#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/types.h>

#include "dist/communicator.h"

namespace dpo {

class GradSync {
 public:
  /// comm must outlive this object.
  explicit GradSync(Communicator& comm);
  /// Binds the trainable tensors once (the usual case: the adapters never change); sync()
  /// then averages their gradients.
  GradSync(Communicator& comm, std::vector<torch::Tensor> params);
  GradSync(const GradSync&) = delete;
  GradSync& operator=(const GradSync&) = delete;

  /// Averages p.grad() over ranks in place for every p in params (protocol steps 1-5).
  /// params: the trainable tensors (requires_grad leaves), same order on every rank.
  void sync(const std::vector<torch::Tensor>& params);
  /// sync() of the tensors given to the constructor.
  void sync() { sync(params_); }

  int64_t numel() const { return numel_; }    // N of the last layout
  const torch::Tensor& buffer() const { return flat_; }  // (N) fused gradients, reused between calls

 private:
  Communicator& comm_;
  std::vector<torch::Tensor> params_;  // bound by the constructor (may be empty)
  torch::Tensor flat_;   // (N) in params order; dtype = promoted grad dtype, device of the grads
  std::string layout_;   // layout verified across ranks (protocol step 2)
  int64_t numel_ = 0;
};

}  // namespace dpo
