// Activation (gradient) checkpointing: run a block without keeping its
// activations and recompute them in backward, trading one extra forward of the
// block for memory (torch.utils.checkpoint, use_reentrant=True semantics).
#pragma once
#include <functional>

#include <torch/types.h>

namespace dpo {

/// y = fn(x), but only x is kept for backward. Under no-grad (or when grad mode
/// is off) this is just fn(x). Otherwise fn runs under no-grad; backward re-runs
/// fn(x) with grad enabled and back-propagates into x and into every tensor fn
/// reads that requires grad (their .grad accumulates, as with loss.backward()).
///
/// The recomputation replays the forward's random numbers: the default CPU
/// generator (and, for a CUDA x, that device's default generator) is set to its
/// state before the forward, and the state current at backward time is put back
/// afterwards (torch.utils.checkpoint's preserve_rng_state).
///
/// fn is kept alive by the autograd graph. Everything fn reads besides x (module
/// weights, LoRA on/off switches, masks) must be unchanged when backward runs.
/// As with PyTorch's reentrant checkpoint, gradients reach fn's tensors through
/// their .grad (loss.backward()), not through torch::autograd::grad(outputs, inputs).
/// x: any shape; fn must return one tensor.
torch::Tensor checkpoint(std::function<torch::Tensor(const torch::Tensor&)> fn, const torch::Tensor& x);

}  // namespace dpo
