// The frozen 4-bit linear y = x @ dequant(W)^T as a custom autograd function:
// the forward dequantizes W into a temporary, multiplies, and drops it; the
// backward dequantizes again for grad_x = grad_y @ W. No full-precision copy of W
// lives between forward and backward (only the NF4 tensors, which the module owns
// anyway, are referenced), which is what makes QLoRA's memory budget.
//
// Legend: N = rows of x (any leading dims), I = in_features, O = out_features.
#pragma once
#include <torch/autograd.h>
#include <torch/types.h>

#include "core/nf4.h"

namespace dpo {

/// y (..., O) = x (..., I) @ dequant(w)^T with w of shape (O, I), computed in x's
/// dtype. Differentiable in x only (W is frozen).
torch::Tensor linear4bit_forward(const torch::Tensor& x /* (..., I) */, const Nf4Tensor& w /* (O, I) */);

/// On the CPU in fp32, W is dequantized one block of ~16 MiB of rows at a time into a
/// per-thread workspace that stays for the life of the thread (re-faulting fresh
/// pages per matmul costs more than the dequantization).

/// The autograd function behind linear4bit_forward (exposed for tests).
struct Linear4bitFn : public torch::autograd::Function<Linear4bitFn> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const Nf4Tensor& w);
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grad_out);
};

namespace detail {
/// Rows of W per dequantized block on the CPU; 0 = automatic (~16 MiB). For tests.
void set_linear4bit_rows_per_block(int64_t rows);
}  // namespace detail

}  // namespace dpo
