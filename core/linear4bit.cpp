#include "core/linear4bit.h"

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <vector>
#include <stdexcept>

namespace dpo {

namespace {

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
thread_local std::unique_ptr<float, FreeDeleter> t_workspace;
thread_local int64_t t_workspace_floats = 0;

// The calling thread's scratch buffer of at least n floats (64-byte aligned). A
// fresh allocation per matmul would page-fault the whole weight in again every
// time (~5x the cost of the dequantization itself for a 7B MLP weight).
float* cpu_workspace(int64_t n) {
  if (n > t_workspace_floats) {
    t_workspace.reset();
    const size_t bytes = (static_cast<size_t>(n) * sizeof(float) + 63) / 64 * 64;
    float* p = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (!p) throw std::runtime_error("linear4bit: cannot allocate " + std::to_string(bytes) + " bytes of workspace");
    t_workspace.reset(p);
    t_workspace_floats = n;
  }
  return t_workspace.get();
}

// Rows of W dequantized per block on the CPU: ~16 MiB of fp32 (1024 rows at I = 4096),
// so the workspace stays small and in cache instead of holding the whole weight
// (180 MB for a Llama-2-7B MLP weight, 235 MB for Llama-3-8B's). Whole quantization
// blocks only: one block of rows when I is not a multiple of the blocksize.
int64_t g_rows_per_block = 0;  // > 0: tests force small blocks
int64_t rows_per_block(const Nf4Tensor& w) {
  const int64_t O = w.shape[0], I = w.shape[1];
  if (I % w.blocksize != 0) return O;
  if (g_rows_per_block > 0) return std::min(O, g_rows_per_block);
  return std::clamp<int64_t>((int64_t{4} << 20) / std::max<int64_t>(I, 1), 1, std::max<int64_t>(O, 1));
}

// y = x @ dequant(w)^T (forward) or gy @ dequant(w) (backward, transpose_w = false).
// On the CPU in fp32, W goes through the thread's workspace one block of rows at a
// time: y[:, o0:o1] = x @ W_b^T, or gx = sum_b gy[:, o0:o1] @ W_b. The workspace is
// only read by the matmul (grad mode is off inside a custom Function), never kept.
torch::Tensor matmul_dequantized(const torch::Tensor& a, const Nf4Tensor& w, bool transpose_w) {
  if (a.device().is_cpu() && a.scalar_type() == torch::kFloat32 && w.device().is_cpu()) {
    const int64_t O = w.shape[0], I = w.shape[1];
    const int64_t rows = rows_per_block(w);
    float* ws = cpu_workspace(rows * I);
    const torch::Tensor a2 = a.reshape({-1, a.size(-1)});
    std::vector<int64_t> out_shape = a.sizes().vec();
    out_shape.back() = transpose_w ? O : I;
    torch::Tensor out = torch::empty({a2.size(0), out_shape.back()}, a.options());
    for (int64_t o0 = 0; o0 < O; o0 += rows) {
      const int64_t n = std::min(rows, O - o0);
      nf4_dequantize_range_into(w, o0 * I, (o0 + n) * I, ws);
      const torch::Tensor wb = torch::from_blob(ws, {n, I}, torch::kFloat32);  // W[o0:o0+n]
      if (transpose_w) {
        torch::Tensor y = out.narrow(1, o0, n);
        at::mm_out(y, a2, wb.t());  // strided rows of out: BLAS writes them in place
      } else if (o0 == 0) {
        at::mm_out(out, a2.narrow(1, o0, n), wb);
      } else {
        out.addmm_(a2.narrow(1, o0, n), wb);
      }
    }
    return out.view(out_shape);
  }
  const torch::Tensor wd = nf4_dequantize(w, a.scalar_type());  // a temporary
  return torch::matmul(a, transpose_w ? wd.t() : wd);
}

// The NF4 parts go into ctx->saved_data as IValues: tensors by reference (no
// copy, no version-counter checks: they are frozen), metadata as ints/doubles.
void save_nf4(torch::autograd::AutogradContext* ctx, const Nf4Tensor& w) {
  auto& d = ctx->saved_data;
  d["packed"] = w.packed;
  d["absmax"] = w.absmax;
  d["dq"] = w.double_quant();
  if (w.double_quant()) {
    d["nested_absmax"] = w.nested_absmax;
    d["nested_code"] = w.nested_code;
  }
  d["offset"] = static_cast<double>(w.offset);
  d["shape"] = c10::IValue(w.shape);
  d["blocksize"] = w.blocksize;
  d["nested_blocksize"] = w.nested_blocksize;
  d["dtype"] = static_cast<int64_t>(w.dtype);
}

Nf4Tensor load_nf4(torch::autograd::AutogradContext* ctx) {
  auto& d = ctx->saved_data;
  Nf4Tensor w;
  w.packed = d["packed"].toTensor();
  w.absmax = d["absmax"].toTensor();
  if (d["dq"].toBool()) {
    w.nested_absmax = d["nested_absmax"].toTensor();
    w.nested_code = d["nested_code"].toTensor();
  }
  w.offset = static_cast<float>(d["offset"].toDouble());
  w.shape = d["shape"].toIntVector();
  w.blocksize = d["blocksize"].toInt();
  w.nested_blocksize = d["nested_blocksize"].toInt();
  w.dtype = static_cast<torch::ScalarType>(d["dtype"].toInt());
  return w;
}

}  // namespace

torch::Tensor Linear4bitFn::forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                                    const Nf4Tensor& w) {
  // y = x @ W^T, W (O, I) dequantized into a temporary that is not kept
  torch::Tensor y = matmul_dequantized(x, w, /*transpose_w=*/true);
  save_nf4(ctx, w);
  return y;
}

torch::autograd::tensor_list Linear4bitFn::backward(torch::autograd::AutogradContext* ctx,
                                                    torch::autograd::tensor_list grad_out) {
  // forward: y = x @ W^T  =>  dL/dx = dL/dy @ W  (W frozen: no grad for it)
  const torch::Tensor& gy = grad_out[0];  // (..., O)
  const Nf4Tensor w = load_nf4(ctx);
  torch::Tensor gx = matmul_dequantized(gy.contiguous(), w, /*transpose_w=*/false);  // (..., I), W dequantized again
  return {gx, torch::Tensor()};
}

namespace detail {
void set_linear4bit_rows_per_block(int64_t rows) { g_rows_per_block = rows; }
}  // namespace detail

torch::Tensor linear4bit_forward(const torch::Tensor& x, const Nf4Tensor& w) {
  if (w.shape.size() != 2)
    throw std::runtime_error("linear4bit_forward: the NF4 weight must be 2-D (O, I), got " +
                             std::to_string(w.shape.size()) + " dims");
  if (x.dim() < 1 || x.size(-1) != w.shape[1])
    throw std::runtime_error("linear4bit_forward: x has " + std::to_string(x.dim() ? x.size(-1) : 0) +
                             " features, the weight expects " + std::to_string(w.shape[1]));
  if (x.device() != w.device())
    throw std::runtime_error("linear4bit_forward: x is on " + x.device().str() + " but the NF4 weight is on " +
                             w.device().str());
  return Linear4bitFn::apply(x, w);
}

}  // namespace dpo
