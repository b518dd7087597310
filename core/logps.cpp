// sequence_logps: a custom autograd function with a hand-vectorized CPU loop and an
// ATen fallback; average_by_length and token_mean_nll.
#include "core/logps.h"

#include "core/simd_math.h"
#include "util/tensor_str.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <limits>
#include <sstream>
#include <stdexcept>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>

namespace dpo {
namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;


// The positions whose logits are read: row r, position p = t - 1 predicts the answer
// token ids[r][t]. Built on the CPU from the (R, T) ids and mask; rows ascending and
// positions ascending within a row (row_begin[r] .. row_begin[r + 1]).
struct ActivePositions {
  std::vector<int64_t> row, pos, target;
  std::vector<int64_t> row_begin;  // (R + 1)
  int64_t size() const { return static_cast<int64_t>(row.size()); }
};

ActivePositions active_positions(const Tensor& input_ids, const Tensor& loss_mask, int64_t vocab) {
  const int64_t R = input_ids.size(0), T = input_ids.size(1);
  Tensor ids = input_ids.to(torch::kCPU, torch::kLong).contiguous();
  Tensor mask = loss_mask.to(torch::kCPU).ne(0).contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  const bool* m = mask.data_ptr<bool>();
  ActivePositions a;
  a.row_begin.assign(R + 1, 0);
  for (int64_t r = 0; r < R; ++r) {
    a.row_begin[r] = a.size();
    for (int64_t t = 1; t < T; ++t) {
      if (!m[r * T + t]) continue;
      const int64_t tok = id[r * T + t];
      if (tok < 0 || tok >= vocab) {
        throw std::runtime_error("sequence_logps: input_ids[" + std::to_string(r) + "][" + std::to_string(t) +
                                 "] = " + std::to_string(tok) + " is an answer token outside the vocabulary [0, " +
                                 std::to_string(vocab) + "); the data was tokenized for another model (check "
                                 "vocab_size) or loss_mask marks padding");
      }
      a.row.push_back(r);
      a.pos.push_back(t - 1);
      a.target.push_back(tok);
    }
  }
  a.row_begin[R] = a.size();
  return a;
}

Tensor to_long_tensor(const std::vector<int64_t>& v) {
  Tensor t = torch::empty({static_cast<int64_t>(v.size())}, torch::kLong);
  std::copy(v.begin(), v.end(), t.data_ptr<int64_t>());
  return t;
}

Tensor to_double_tensor(const std::vector<double>& v) {
  Tensor t = torch::empty({static_cast<int64_t>(v.size())}, torch::kDouble);
  std::copy(v.begin(), v.end(), t.data_ptr<double>());
  return t;
}

torch::ScalarType acc_dtype(torch::ScalarType t) {
  return t == torch::kDouble ? torch::kDouble : torch::kFloat;
}

// Grain for parallel_for over positions: each position costs ~V exp()s.
int64_t position_grain(int64_t vocab) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, vocab)); }

// ---- CPU loop -------------------------------------------------------------------
// Per position: lse = log(sum exp(x)) in one pass over the V logits (chunks of kChunk
// stay in L1: chunk max, then the chunk's exp-sum rescaled into a running double
// sum), the target logit, and the sum of the logits (for the V-mean). Nothing of
// size V is stored. fp32/bf16/fp16 logits use exp_approx in 8 independent lanes so
// the compiler vectorizes; rows with a non-finite logit and fp64 logits take the
// exact std::exp path (NaN/inf propagate as in log_softmax).

constexpr int64_t kChunk = 512;
using simd::exp_approx;  // core/simd_math.h: Cephes expf, ~2 ulp, vectorizes with -fno-trapping-math
using simd::kLanes;

// The chunk as fp32: the logits themselves when they are fp32, else converted into buf.
template <typename scalar_t>
inline const float* chunk_as_float(const scalar_t* x, int64_t n, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return x;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(x[i]);
    return buf;
  }
}

inline float chunk_max(const float* f, int64_t n) {
  float m[kLanes];
  for (int j = 0; j < kLanes; ++j) m[j] = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) m[j] = f[i + j] > m[j] ? f[i + j] : m[j];
  }
  for (; i < n; ++i) m[0] = f[i] > m[0] ? f[i] : m[0];
  float out = m[0];
  for (int j = 1; j < kLanes; ++j) out = m[j] > out ? m[j] : out;
  return out;
}

// Sum of exp(f - shift) and sum of f over one chunk; with kSq also the sum of
// exp(f - shift)^2 = exp(2 (f - shift)) (WPO's log sum p^2, from the same exps).
template <bool kSq = false>
inline void chunk_sums(const float* f, int64_t n, float shift, float& sum_exp, float& sum_x, float* sum_sq = nullptr) {
  float se[kLanes] = {}, sx[kLanes] = {}, sq[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float e = exp_approx(f[i + j] - shift);
      se[j] += e;
      sx[j] += f[i + j];
      if constexpr (kSq) sq[j] += e * e;
    }
  }
  for (; i < n; ++i) {
    const float e = exp_approx(f[i] - shift);
    se[0] += e, sx[0] += f[i];
    if constexpr (kSq) sq[0] += e * e;
  }
  sum_exp = 0.0f;
  sum_x = 0.0f;
  for (int j = 0; j < kLanes; ++j) sum_exp += se[j], sum_x += sx[j];
  if constexpr (kSq) {
    *sum_sq = 0.0f;
    for (int j = 0; j < kLanes; ++j) *sum_sq += sq[j];
  }
}

// Exact two-pass log-sum-exp in the accumulation type (fp64 logits, non-finite rows).
// lse2 (when given) = log sum exp(2 x), for WPO's log sum p^2 = lse2 - 2 lse.
template <typename scalar_t>
inline void exact_lse(const scalar_t* x, int64_t V, double& lse, double& sum_x, double* lse2 = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  double sx = 0.0;
  bool nan = false;
  for (int64_t v = 0; v < V; ++v) {
    const acc_t xv = static_cast<acc_t>(x[v]);
    nan |= std::isnan(xv);
    mx = xv > mx ? xv : mx;
    sx += xv;
  }
  double se = 0.0, se2 = 0.0;
  for (int64_t v = 0; v < V; ++v) {
    const double e = std::exp(static_cast<acc_t>(x[v]) - mx);
    se += e;
    se2 += e * e;
  }
  const double q_nan = std::numeric_limits<double>::quiet_NaN();
  lse = nan ? q_nan : static_cast<double>(mx) + std::log(se);
  if (lse2) *lse2 = nan ? q_nan : 2.0 * static_cast<double>(mx) + std::log(se2);
  sum_x = sx;
}

// Running log-sum-exp of one row of logits seen chunk by chunk (kChunk logits at a
// time, in order): chunk max, then the chunk's exp-sum rescaled into a running double
// sum. The same arithmetic in the same order whether the row arrives whole
// (fast_lse) or one vocabulary block at a time (head_logps with a weight).
// finite = false once a chunk holds inf/NaN (the row then needs exact_lse).
struct LseAcc {
  double run_max = -std::numeric_limits<double>::infinity(), run_sum = 0.0, run_sq = 0.0, sum_x = 0.0;
  bool finite = true;
  // n <= kChunk fp32 logits; with sq also the sum of exp(2 (x - max)) (WPO).
  void add_chunk(const float* f, int64_t n, bool sq) {
    if (!finite) return;
    const float m = chunk_max(f, n);
    float se, sx, s2 = 0.0f;
    if (sq) chunk_sums<true>(f, n, m, se, sx, &s2);
    else chunk_sums(f, n, m, se, sx);
    if (!std::isfinite(sx)) {  // inf/NaN somewhere in the chunk
      finite = false;
      return;
    }
    sum_x += sx;
    if (m > run_max) {
      const double r = std::exp(run_max - m);
      run_sum = run_sum * r + se;
      run_sq = run_sq * r * r + s2;
      run_max = m;
    } else {
      const double r = std::exp(m - run_max);
      run_sum += se * r;
      run_sq += s2 * r * r;
    }
  }
  // A contiguous piece of the row, split into kChunk chunks from its start.
  void add(const float* f, int64_t n, bool sq) {
    for (int64_t c0 = 0; c0 < n && finite; c0 += kChunk) add_chunk(f + c0, std::min(kChunk, n - c0), sq);
  }
  double lse() const { return run_max + std::log(run_sum); }
  double lse2() const { return 2.0 * run_max + std::log(run_sq); }  // log sum exp(2 x)
};

// Returns false (and leaves lse unset) when the row holds a non-finite logit.
// With lse2: also log sum exp(2 x), from the squares of the same exps.
template <typename scalar_t>
inline bool fast_lse(const scalar_t* x, int64_t V, double& lse, double& sum_x, double* lse2 = nullptr) {
  float buf[kChunk];
  LseAcc acc;
  for (int64_t c0 = 0; c0 < V && acc.finite; c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    acc.add_chunk(chunk_as_float(x + c0, n, buf), n, lse2 != nullptr);
  }
  if (!acc.finite) return false;
  lse = acc.lse();
  if (lse2) *lse2 = acc.lse2();
  sum_x = acc.sum_x;
  return true;
}

// exact[i] = 1 where position i was computed exactly (its backward must be too).
void cpu_forward(const Tensor& logits, const ActivePositions& a, std::vector<double>& logp,
                 std::vector<double>& sum_logit, std::vector<double>& lse, std::vector<uint8_t>& exact) {
  const int64_t T = logits.size(1), V = logits.size(2), N = a.size();
  logp.assign(N, 0.0);
  sum_logit.assign(N, 0.0);
  lse.assign(N, 0.0);
  exact.assign(N, 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "sequence_logps_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* base = logits.data_ptr<scalar_t>();
    at::parallel_for(0, N, position_grain(V), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const scalar_t* x = base + (a.row[i] * T + a.pos[i]) * V;
        double l = 0.0, sx = 0.0;
        const bool fast = std::is_same_v<acc_t, float> && fast_lse(x, V, l, sx);
        if (!fast) exact_lse(x, V, l, sx);
        exact[i] = fast ? 0 : 1;
        lse[i] = l;
        logp[i] = static_cast<double>(static_cast<acc_t>(x[a.target[i]])) - l;
        sum_logit[i] = sx;
      }
    });
  });
}

// d logp / d x_v = [v == target] - softmax(x)_v, times the row's incoming gradient.
// "logp[i] = x[target] - lse" is the forward line this differentiates. Every (r, p)
// slice of the result is written exactly once: zeros where nothing was scored.
Tensor cpu_backward(const Tensor& logits, const ActivePositions& a, const std::vector<double>& lse,
                    const std::vector<uint8_t>& exact, const Tensor& grad_rows) {
  const int64_t R = logits.size(0), T = logits.size(1), V = logits.size(2), N = a.size();
  Tensor grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
  Tensor g = grad_rows.to(torch::kCPU, torch::kDouble).contiguous();
  const double* gr = g.data_ptr<double>();
  std::vector<uint8_t> scored(R * T, 0);
  for (int64_t i = 0; i < N; ++i) scored[a.row[i] * T + a.pos[i]] = 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "sequence_logps_cpu_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* base = logits.data_ptr<scalar_t>();
    scalar_t* out_base = grad.data_ptr<scalar_t>();
    at::parallel_for(0, R * T, position_grain(V), [&](int64_t b, int64_t e) {
      for (int64_t rp = b; rp < e; ++rp) {
        if (!scored[rp]) std::fill(out_base + rp * V, out_base + (rp + 1) * V, scalar_t(0));
      }
    });
    at::parallel_for(0, N, position_grain(V), [&](int64_t b, int64_t e) {
      float in_buf[kChunk], out_buf[kChunk];
      for (int64_t i = b; i < e; ++i) {
        const double gi = gr[a.row[i]];
        const int64_t off = (a.row[i] * T + a.pos[i]) * V;
        const scalar_t* x = base + off;
        scalar_t* out = out_base + off;
        if (gi == 0.0) {
          std::fill(out, out + V, scalar_t(0));
          continue;
        }
        const acc_t l = static_cast<acc_t>(lse[i]);
        const acc_t ga = static_cast<acc_t>(gi);
        bool done = false;
        if constexpr (std::is_same_v<acc_t, float>) {
          if (!exact[i]) {
            // Through a local buffer: no aliasing between x and out for the vectorizer.
            for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
              const int64_t n = std::min(kChunk, V - c0);
              const float* f = chunk_as_float(x + c0, n, in_buf);
              int64_t v = 0;
              for (; v + kLanes <= n; v += kLanes) {  // fixed-width blocks: vectorized at -O2
                for (int j = 0; j < kLanes; ++j) out_buf[v + j] = -ga * exp_approx(f[v + j] - l);
              }
              for (; v < n; ++v) out_buf[v] = -ga * exp_approx(f[v] - l);
              for (v = 0; v < n; ++v) out[c0 + v] = static_cast<scalar_t>(out_buf[v]);
            }
            done = true;
          }
        }
        if (!done) {
          for (int64_t v = 0; v < V; ++v) out[v] = static_cast<scalar_t>(-ga * std::exp(static_cast<acc_t>(x[v]) - l));
        }
        const acc_t p_t = std::exp(static_cast<acc_t>(x[a.target[i]]) - l);
        out[a.target[i]] = static_cast<scalar_t>(ga * (acc_t(1) - p_t));
      }
    });
  });
  return grad;
}

// ---- ATen fallback (CUDA, or any layout) --------------------------------------
// One row at a time, only its needed positions upcast: at most (T, V) fp32 alive.
struct RowIndex {
  Tensor pos, target;  // (n) int64 on the logits' device
};

std::vector<RowIndex> row_indices(const ActivePositions& a, int64_t R, const torch::Device& dev) {
  std::vector<RowIndex> out(R);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t b = a.row_begin[r], e = a.row_begin[r + 1];
    if (b == e) continue;
    out[r].pos = to_long_tensor(std::vector<int64_t>(a.pos.begin() + b, a.pos.begin() + e)).to(dev);
    out[r].target = to_long_tensor(std::vector<int64_t>(a.target.begin() + b, a.target.begin() + e)).to(dev);
  }
  return out;
}

class SeqLogpsFn : public torch::autograd::Function<SeqLogpsFn> {
 public:
  static variable_list forward(AutogradContext* ctx, Tensor logits, Tensor input_ids, Tensor loss_mask,
                               int64_t kernel) {
    const int64_t R = logits.size(0), V = logits.size(2);
    const auto acc = acc_dtype(logits.scalar_type());
    const auto out_opts = logits.options().dtype(acc);
    auto a = std::make_shared<ActivePositions>(active_positions(input_ids, loss_mask, V));
    std::vector<int64_t> counts(R);
    for (int64_t r = 0; r < R; ++r) counts[r] = a->row_begin[r + 1] - a->row_begin[r];
    Tensor token_counts = to_long_tensor(counts).to(logits.device());

    const bool use_loop = kernel == static_cast<int64_t>(detail::LogpsKernel::cpu_loop) ||
                          (kernel == static_cast<int64_t>(detail::LogpsKernel::automatic) && logits.is_cpu());
    Tensor logps, mean_logits;
    if (use_loop) {
      if (!logits.is_cpu()) throw std::runtime_error("sequence_logps: the cpu_loop kernel needs CPU logits");
      Tensor x = logits.contiguous();
      std::vector<double> logp, sum_logit, lse;
      std::vector<uint8_t> exact;
      cpu_forward(x, *a, logp, sum_logit, lse, exact);
      std::vector<double> row_logp(R, 0.0), row_mean(R, 0.0);
      for (int64_t r = 0; r < R; ++r) {
        double s = 0.0, m = 0.0;
        for (int64_t i = a->row_begin[r]; i < a->row_begin[r + 1]; ++i) {
          s += logp[i];
          m += sum_logit[i] / static_cast<double>(V);
        }
        row_logp[r] = s;
        row_mean[r] = counts[r] > 0 ? m / static_cast<double>(counts[r]) : 0.0;
      }
      logps = to_double_tensor(row_logp).to(out_opts);
      mean_logits = to_double_tensor(row_mean).to(out_opts);
      ctx->save_for_backward({x});
      ctx->saved_data["lse"] = to_double_tensor(lse);
      ctx->saved_data["exact"] = to_long_tensor(std::vector<int64_t>(exact.begin(), exact.end()));
    } else {
      auto rows = row_indices(*a, R, logits.device());
      std::vector<Tensor> lp(R), ml(R), lses(R);
      for (int64_t r = 0; r < R; ++r) {
        if (!rows[r].pos.defined()) {
          lp[r] = torch::zeros({}, out_opts);
          ml[r] = torch::zeros({}, out_opts);
          lses[r] = torch::zeros({0}, out_opts);
          continue;
        }
        Tensor x = logits[r].index_select(0, rows[r].pos).to(acc);  // (n, V)
        Tensor l = x.logsumexp({1});                                  // (n)
        Tensor tgt = x.gather(1, rows[r].target.unsqueeze(1)).squeeze(1);
        lp[r] = (tgt - l).to(torch::kDouble).sum().to(acc);
        ml[r] = x.to(torch::kDouble).mean({1}).mean().to(acc);
        lses[r] = l;
      }
      logps = R > 0 ? at::stack(lp) : torch::zeros({0}, out_opts);
      mean_logits = R > 0 ? at::stack(ml) : torch::zeros({0}, out_opts);
      ctx->save_for_backward({logits});
      ctx->saved_data["row_lse"] = c10::List<Tensor>(std::vector<Tensor>(lses.begin(), lses.end()));
    }
    ctx->saved_data["kernel"] = static_cast<int64_t>(use_loop ? detail::LogpsKernel::cpu_loop : detail::LogpsKernel::aten);
    // The position list is plain CPU data; an IValue holds it through a tensor.
    ctx->saved_data["row"] = to_long_tensor(a->row);
    ctx->saved_data["pos"] = to_long_tensor(a->pos);
    ctx->saved_data["target"] = to_long_tensor(a->target);
    ctx->saved_data["row_begin"] = to_long_tensor(a->row_begin);
    ctx->mark_non_differentiable({mean_logits, token_counts});
    return {logps, mean_logits, token_counts};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    Tensor logits = ctx->get_saved_variables()[0];
    Tensor g = grads[0];  // (R)
    const int64_t R = logits.size(0);
    auto vec = [&](const char* k) {
      Tensor t = ctx->saved_data[k].toTensor();
      return std::vector<int64_t>(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + t.numel());
    };
    ActivePositions a;
    a.row = vec("row");
    a.pos = vec("pos");
    a.target = vec("target");
    a.row_begin = vec("row_begin");
    Tensor grad;
    if (!g.defined()) {
      grad = at::zeros_like(logits);
    } else if (ctx->saved_data["kernel"].toInt() == static_cast<int64_t>(detail::LogpsKernel::cpu_loop)) {
      Tensor l = ctx->saved_data["lse"].toTensor();
      std::vector<double> lse(l.data_ptr<double>(), l.data_ptr<double>() + l.numel());
      const auto ex = vec("exact");
      grad = cpu_backward(logits, a, lse, std::vector<uint8_t>(ex.begin(), ex.end()), g);
    } else {
      const auto acc = acc_dtype(logits.scalar_type());
      auto row_lse = ctx->saved_data["row_lse"].toTensorList();
      auto rows = row_indices(a, R, logits.device());
      grad = at::zeros_like(logits);
      Tensor gd = g.to(logits.device(), acc);
      for (int64_t r = 0; r < R; ++r) {
        if (!rows[r].pos.defined()) continue;
        Tensor x = logits[r].index_select(0, rows[r].pos).to(acc);  // (n, V)
        Tensor lse = row_lse.get(r);
        Tensor d = (x - lse.unsqueeze(1)).exp_().neg_();  // -softmax
        d.scatter_add_(1, rows[r].target.unsqueeze(1), torch::ones({d.size(0), 1}, d.options()));
        d.mul_(gd[r]);
        grad[r].index_copy_(0, rows[r].pos, d.to(logits.scalar_type()));
      }
    }
    return {grad, Tensor(), Tensor(), Tensor()};
  }
};


// ---- chunked lm_head + log-softmax ------------------------------------------------
// Only the positions that predict a scored token are computed, kHeadChunkBytes of fp32
// logits at a time; backward recomputes each chunk's logits from the saved hidden rows.

// Rows of logits per chunk: ~32 MiB of fp32 (256 rows at V = 32000, 65 at V = 128256).
int64_t g_head_chunk_rows = 0;  // > 0: tests force small chunks
int64_t head_chunk_rows(int64_t V) {
  if (g_head_chunk_rows > 0) return g_head_chunk_rows;
  return std::max<int64_t>(16, (int64_t{32} << 20) / 4 / std::max<int64_t>(1, V));
}

// fp32 logits (m, V) of rows [m0, m1) of x: x itself when w is undefined (x already
// holds logits), else x[m0:m1] @ w^T (lm_head in the compute dtype, upcast as the model does).
Tensor head_chunk(const Tensor& x, const Tensor& w, int64_t m0, int64_t m1) {
  Tensor rows = x.narrow(0, m0, m1 - m0);
  Tensor logits = w.numel() > 0 ? at::mm(rows, w.t()) : rows;
  return (logits.scalar_type() == torch::kFloat ? logits : logits.to(torch::kFloat)).contiguous();
}

// ---- CPU with an lm_head weight: vocabulary blocks --------------------------------
// A chunk of positions meets the weight one vocabulary block at a time: the block is
// widened to x's dtype once per pass (a half-precision table stays half in memory:
// llama_load keeps a bf16/fp16 checkpoint's embeddings and lm_head as they are), its
// logits (m, Vb) are computed and each position's running LseAcc, target logit and
// logit sum updated. At most ~32 MiB of fp32 logits and ~32 MiB of widened weight exist
// at once, whatever V is, and the table is read once per pass instead of once per chunk.
int64_t g_head_vocab_block = 0;  // > 0: tests force small vocabulary blocks
struct HeadBlocks {
  int64_t rows, vocab;  // positions per chunk, vocabulary rows per block
};
HeadBlocks head_blocks(int64_t M, int64_t V, int64_t C) {
  constexpr int64_t kElems = (int64_t{32} << 20) / 4;
  if (g_head_chunk_rows > 0 || g_head_vocab_block > 0)
    return {g_head_chunk_rows > 0 ? g_head_chunk_rows : std::max<int64_t>(M, 1),
            g_head_vocab_block > 0 ? g_head_vocab_block : kChunk};
  const int64_t rows = std::clamp<int64_t>(M, 1, kElems / kChunk);  // up to 16384 positions at once
  // A multiple of kChunk, so each row is chunked exactly as fast_lse chunks a whole row.
  const int64_t vb = std::max<int64_t>(kChunk, std::min(kElems / rows, kElems / std::max<int64_t>(C, 1)) / kChunk * kChunk);
  return {rows, std::min(vb, std::max<int64_t>(V, 1))};
}

// Rows [v0, v1) of w in dtype dt: a view when w already is dt, else widened into buf.
Tensor weight_block(const Tensor& w, int64_t v0, int64_t v1, torch::ScalarType dt, Tensor& buf) {
  Tensor blk = w.narrow(0, v0, v1 - v0);
  if (blk.scalar_type() == dt) return blk;
  if (!buf.defined() || buf.numel() < blk.numel()) buf = torch::empty({blk.numel()}, blk.options().dtype(dt));
  return buf.narrow(0, 0, blk.numel()).view(blk.sizes()).copy_(blk);
}

// fp32 logits (m, vb), contiguous, of hidden rows xs against a weight block wb.
Tensor block_logits(const Tensor& xs, const Tensor& wb) {
  Tensor lg = at::mm(xs, wb.t());
  return (lg.scalar_type() == torch::kFloat ? lg : lg.to(torch::kFloat)).contiguous();
}

struct HeadStats {
  std::vector<double> lse, logp, sx, lse2;
  std::vector<uint8_t> exact;
};

void cpu_blocked_forward(const Tensor& x, const Tensor& w, const int64_t* tg, bool wpo, HeadStats& st) {
  const int64_t M = x.size(0), V = w.size(0), C = x.size(1);
  const HeadBlocks hb = head_blocks(M, V, C);
  std::vector<LseAcc> acc(M);
  std::vector<double> tlogit(M, 0.0);
  Tensor buf;
  for (int64_t m0 = 0; m0 < M; m0 += hb.rows) {
    const int64_t m1 = std::min(M, m0 + hb.rows);
    Tensor xs = x.narrow(0, m0, m1 - m0);
    for (int64_t v0 = 0; v0 < V; v0 += hb.vocab) {
      const int64_t v1 = std::min(V, v0 + hb.vocab), vb = v1 - v0;
      Tensor lg = block_logits(xs, weight_block(w, v0, v1, x.scalar_type(), buf));
      const float* base = lg.data_ptr<float>();
      at::parallel_for(0, m1 - m0, position_grain(vb), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const float* row = base + i * vb;
          acc[m0 + i].add(row, vb, wpo);
          const int64_t t = tg[m0 + i];
          if (t >= v0 && t < v1) tlogit[m0 + i] = row[t - v0];
        }
      });
    }
  }
  std::vector<int64_t> redo;  // rows with a non-finite logit: exact_lse over the whole row
  for (int64_t i = 0; i < M; ++i) {
    if (!acc[i].finite) {
      redo.push_back(i);
      continue;
    }
    st.lse[i] = acc[i].lse();
    if (wpo) st.lse2[i] = acc[i].lse2();
    st.sx[i] = acc[i].sum_x;
    st.logp[i] = tlogit[i] - st.lse[i];
    st.exact[i] = 0;
  }
  const int64_t step = head_chunk_rows(V);
  for (size_t k0 = 0; k0 < redo.size(); k0 += static_cast<size_t>(step)) {
    const size_t k1 = std::min(redo.size(), k0 + static_cast<size_t>(step));
    std::vector<int64_t> idx(redo.begin() + static_cast<std::ptrdiff_t>(k0), redo.begin() + static_cast<std::ptrdiff_t>(k1));
    Tensor rows = x.index_select(0, to_long_tensor(idx));
    Tensor full = torch::empty({rows.size(0), V}, torch::kFloat);
    for (int64_t v0 = 0; v0 < V; v0 += hb.vocab) {
      const int64_t v1 = std::min(V, v0 + hb.vocab);
      full.narrow(1, v0, v1 - v0).copy_(block_logits(rows, weight_block(w, v0, v1, x.scalar_type(), buf)));
    }
    const float* base = full.data_ptr<float>();
    for (size_t k = 0; k < idx.size(); ++k) {
      const int64_t i = idx[k];
      const float* row = base + static_cast<int64_t>(k) * V;
      double l = 0.0, s = 0.0;
      exact_lse(row, V, l, s, wpo ? &st.lse2[i] : nullptr);
      st.lse[i] = l;
      st.sx[i] = s;
      st.logp[i] = static_cast<double>(row[tg[i]]) - l;
      st.exact[i] = 1;
    }
  }
}

// Chunks of positions against the whole vocabulary: x holds logits already (no weight),
// or the compute is on a GPU (ATen ops).
void chunked_forward(const Tensor& x, const Tensor& w, const Tensor& target, bool wpo, HeadStats& st) {
  const int64_t M = x.size(0), V = w.numel() > 0 ? w.size(0) : x.size(1);
  const int64_t* tg = target.data_ptr<int64_t>();
  std::vector<double>&lse = st.lse, &logp = st.logp, &sx = st.sx, &lse2 = st.lse2;
  std::vector<uint8_t>& exact = st.exact;
  const int64_t step = head_chunk_rows(V);
  for (int64_t m0 = 0; m0 < M; m0 += step) {
    const int64_t m1 = std::min(M, m0 + step);
    Tensor lg = head_chunk(x, w, m0, m1);
    if (lg.is_cpu()) {
      const float* base = lg.data_ptr<float>();
      at::parallel_for(0, m1 - m0, position_grain(V), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const float* row = base + i * V;
          double l = 0.0, s = 0.0;
          double* l2 = wpo ? &lse2[m0 + i] : nullptr;
          const bool fast = fast_lse(row, V, l, s, l2);
          if (!fast) exact_lse(row, V, l, s, l2);
          exact[m0 + i] = fast ? 0 : 1;
          lse[m0 + i] = l;
          logp[m0 + i] = static_cast<double>(row[tg[m0 + i]]) - l;
          sx[m0 + i] = s;
        }
      });
    } else {
      Tensor l = lg.logsumexp({1});
      Tensor t = lg.gather(1, target.narrow(0, m0, m1 - m0).to(lg.device()).unsqueeze(1)).squeeze(1);
      Tensor l2 = wpo ? (2 * lg).logsumexp({1}) : l;
      Tensor cols = at::stack({l.to(torch::kDouble), (t - l).to(torch::kDouble), lg.to(torch::kDouble).sum(1),
                               l2.to(torch::kDouble)})
                        .cpu()
                        .contiguous();
      const double* c = cols.data_ptr<double>();
      const int64_t n = m1 - m0;
      for (int64_t i = 0; i < n; ++i) {
        lse[m0 + i] = c[i];
        logp[m0 + i] = c[n + i];
        sx[m0 + i] = c[2 * n + i];
        if (wpo) lse2[m0 + i] = c[3 * n + i];
        exact[m0 + i] = 1;
      }
    }
  }
}

// d logp / d logit_v = [v == target] - softmax_v, times the entry's gradient, for the
// logits (m, vb) of rows m0.. and vocabulary v0..: in place.
void dlogits_in_place(float* base, int64_t m, int64_t vb, int64_t m0, int64_t v0, const std::vector<double>& ge,
                      const double* lse, const int64_t* ex, const int64_t* tg) {
  at::parallel_for(0, m, position_grain(vb), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      float* row = base + i * vb;
      const float g = static_cast<float>(ge[m0 + i]);
      const float l = static_cast<float>(lse[m0 + i]);
      const int64_t t = tg[m0 + i] - v0;
      const bool has_t = t >= 0 && t < vb;
      const float p_t = has_t ? std::exp(row[t] - l) : 0.0f;
      if (ex[m0 + i]) {
        for (int64_t v = 0; v < vb; ++v) row[v] = -g * std::exp(row[v] - l);
      } else {
        int64_t v = 0;
        for (; v + kLanes <= vb; v += kLanes)
          for (int j = 0; j < kLanes; ++j) row[v + j] = -g * exp_approx(row[v + j] - l);
        for (; v < vb; ++v) row[v] = -g * exp_approx(row[v] - l);
      }
      if (has_t) row[t] = g * (1.0f - p_t);
    }
  });
}

class HeadLogpsFn : public torch::autograd::Function<HeadLogpsFn> {
 public:
  // x (M, C) hidden rows (or (M, V) logits when w is empty); w (V, C) or empty (its gradient only when it requires grad);
  // target, seq (M) int64 CPU; S sequences; tw (M) double CPU token weights or empty (all 1);
  // wpo: also the per-sequence mean of logp - log sum_v p_v^2.
  static variable_list forward(AutogradContext* ctx, Tensor x, Tensor w, Tensor target, Tensor seq, int64_t S,
                               Tensor tw, bool wpo) {
    const int64_t M = x.size(0), V = w.numel() > 0 ? w.size(0) : x.size(1);
    const int64_t* tg = target.data_ptr<int64_t>();
    const int64_t* sq = seq.data_ptr<int64_t>();
    const double* twp = tw.numel() > 0 ? tw.data_ptr<double>() : nullptr;
    HeadStats st{std::vector<double>(M), std::vector<double>(M), std::vector<double>(M),
                 std::vector<double>(wpo ? M : 0), std::vector<uint8_t>(M, 0)};
    const std::vector<double>&lse = st.lse, &logp = st.logp, &sx = st.sx, &lse2 = st.lse2;
    const std::vector<uint8_t>& exact = st.exact;
    if (x.is_cpu() && w.numel() > 0) cpu_blocked_forward(x, w, tg, wpo, st);
    else chunked_forward(x, w, target, wpo, st);
    std::vector<double> sum(S, 0.0), mean(S, 0.0), wpo_sum(S, 0.0), plain(twp ? S : 0, 0.0);
    std::vector<int64_t> counts(S, 0);
    for (int64_t i = 0; i < M; ++i) {
      sum[sq[i]] += twp ? twp[i] * logp[i] : logp[i];
      if (twp) plain[sq[i]] += logp[i];
      mean[sq[i]] += sx[i] / static_cast<double>(V);
      // log p - log sum_v p_v^2, with log sum p^2 = log sum exp(2x) - 2 lse
      if (wpo) wpo_sum[sq[i]] += logp[i] - (lse2[i] - 2.0 * lse[i]);
      ++counts[sq[i]];
    }
    for (int64_t s = 0; s < S; ++s) {
      const double n = static_cast<double>(counts[s]);
      mean[s] = counts[s] > 0 ? mean[s] / n : 0.0;
      wpo_sum[s] = counts[s] > 0 ? wpo_sum[s] / n : 0.0;
    }
    const auto out_opts = torch::TensorOptions().dtype(torch::kFloat).device(x.device());
    Tensor logps = to_double_tensor(sum).to(out_opts), mean_logits = to_double_tensor(mean).to(out_opts);
    Tensor token_counts = to_long_tensor(counts).to(x.device());
    Tensor wpo_logps = wpo ? to_double_tensor(wpo_sum).to(out_opts) : torch::zeros({0}, out_opts);
    // With token weights, the unweighted sums too (differentiable: the NLL terms read them).
    Tensor plain_logps = twp ? to_double_tensor(plain).to(out_opts) : torch::zeros({0}, out_opts);
    ctx->save_for_backward({x, w});
    ctx->saved_data["lse"] = to_double_tensor(lse);
    ctx->saved_data["exact"] = to_long_tensor(std::vector<int64_t>(exact.begin(), exact.end()));
    ctx->saved_data["target"] = target;
    ctx->saved_data["seq"] = seq;
    ctx->saved_data["tw"] = tw;
    if (twp) ctx->mark_non_differentiable({mean_logits, token_counts, wpo_logps});
    else ctx->mark_non_differentiable({mean_logits, token_counts, wpo_logps, plain_logps});
    return {logps, mean_logits, token_counts, wpo_logps, plain_logps};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    Tensor x = saved[0], w = saved[1];
    const int64_t M = x.size(0), V = w.numel() > 0 ? w.size(0) : x.size(1);
    Tensor grad_x = at::zeros_like(x);
    // The head's own gradient only where it is trained (modules_to_save lm_head).
    const bool want_w = w.numel() > 0 && ctx->needs_input_grad(1);
    Tensor grad_w = want_w ? at::zeros_like(w) : Tensor();
    const bool g_plain = grads.size() > 4 && grads[4].defined() && grads[4].numel() > 0;
    if ((!grads[0].defined() && !g_plain) || M == 0) return {grad_x, grad_w, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    const int64_t S = grads[0].defined() ? grads[0].numel() : grads[4].numel();
    Tensor gs = grads[0].defined() ? grads[0].to(torch::kCPU, torch::kDouble).contiguous() : torch::zeros({S}, torch::kDouble);
    Tensor gp = g_plain ? grads[4].to(torch::kCPU, torch::kDouble).contiguous() : Tensor();
    const double* gr = gs.data_ptr<double>();
    const double* gpl = g_plain ? gp.data_ptr<double>() : nullptr;
    Tensor lse_t = ctx->saved_data["lse"].toTensor(), ex_t = ctx->saved_data["exact"].toTensor();
    Tensor target = ctx->saved_data["target"].toTensor(), seq = ctx->saved_data["seq"].toTensor();
    const double* lse = lse_t.data_ptr<double>();
    const int64_t* ex = ex_t.data_ptr<int64_t>();
    const int64_t* tg = target.data_ptr<int64_t>();
    const int64_t* sq = seq.data_ptr<int64_t>();
    Tensor tw = ctx->saved_data["tw"].toTensor();
    const double* twp = tw.numel() > 0 ? tw.data_ptr<double>() : nullptr;
    // Each entry's incoming gradient: its sequence's, times its token weight (LD-DPO).
    std::vector<double> ge(M);
    for (int64_t i = 0; i < M; ++i) ge[i] = (twp ? gr[sq[i]] * twp[i] : gr[sq[i]]) + (gpl ? gpl[sq[i]] : 0.0);
    if (x.is_cpu() && w.numel() > 0) {
      // Vocabulary blocks, as the forward: grad_x += dlogits_b @ W_b (accumulated in fp32).
      const HeadBlocks hb = head_blocks(M, V, x.size(1));
      Tensor gacc = x.scalar_type() == torch::kFloat ? grad_x : torch::zeros(x.sizes(), x.options().dtype(torch::kFloat));
      Tensor buf;
      for (int64_t m0 = 0; m0 < M; m0 += hb.rows) {
        const int64_t m1 = std::min(M, m0 + hb.rows);
        Tensor xs = x.narrow(0, m0, m1 - m0);
        for (int64_t v0 = 0; v0 < V; v0 += hb.vocab) {
          const int64_t v1 = std::min(V, v0 + hb.vocab);
          Tensor wb = weight_block(w, v0, v1, x.scalar_type(), buf);
          Tensor lg = block_logits(xs, wb);
          dlogits_in_place(lg.data_ptr<float>(), m1 - m0, v1 - v0, m0, v0, ge, lse, ex, tg);
          Tensor gx = gacc.narrow(0, m0, m1 - m0);
          if (wb.scalar_type() == torch::kFloat) gx.addmm_(lg, wb);
          else gx.add_(at::mm(lg.to(wb.scalar_type()), wb).to(torch::kFloat));
          if (want_w) grad_w.narrow(0, v0, v1 - v0).addmm_(lg.t().to(w.scalar_type()), xs.to(w.scalar_type()));
        }
      }
      if (!gacc.is_same(grad_x)) grad_x.copy_(gacc);
      return {grad_x, grad_w, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    }
    const int64_t step = head_chunk_rows(V);
    for (int64_t m0 = 0; m0 < M; m0 += step) {
      const int64_t m1 = std::min(M, m0 + step);
      // d logp / d logit_v = [v == target] - softmax_v, times the sequence's gradient.
      Tensor lg = head_chunk(x, w, m0, m1);
      if (lg.is_cpu()) {
        dlogits_in_place(lg.data_ptr<float>(), m1 - m0, V, m0, 0, ge, lse, ex, tg);
      } else {
        Tensor l = to_double_tensor(std::vector<double>(lse + m0, lse + m1)).to(lg.device(), torch::kFloat);
        Tensor g = to_double_tensor(std::vector<double>(ge.begin() + m0, ge.begin() + m1)).to(lg.device(), torch::kFloat);
        Tensor d = (lg - l.unsqueeze(1)).exp_().neg_();
        d.scatter_add_(1, target.narrow(0, m0, m1 - m0).to(lg.device()).unsqueeze(1), torch::ones({m1 - m0, 1}, d.options()));
        lg = d.mul_(g.unsqueeze(1));
      }
      Tensor gx = w.numel() > 0 ? at::mm(lg.to(w.scalar_type()), w) : lg.to(x.scalar_type());
      grad_x.narrow(0, m0, m1 - m0).copy_(gx);
      // dL/dW (V, C) += dlogits^T (V, m) @ x (m, C)
      if (want_w) grad_w.addmm_(lg.t().to(w.scalar_type()), x.narrow(0, m0, m1 - m0).to(w.scalar_type()));
    }
    return {grad_x, grad_w, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor counts_as(const Tensor& token_counts, const Tensor& like) {
  return token_counts.to(like.device(), like.scalar_type());
}

}  // namespace

void check_logps_inputs(const Tensor& logits, const Tensor& input_ids, const Tensor& loss_mask) {
  if (!logits.defined() || logits.dim() != 3 || !logits.is_floating_point()) {
    throw std::runtime_error("sequence_logps: logits must be a float tensor of shape (R, T, V); got " +
                             (logits.defined() ? shape_str(logits) : std::string("undefined")));
  }
  if (!input_ids.defined() || input_ids.dim() != 2 || input_ids.size(0) != logits.size(0) ||
      input_ids.size(1) != logits.size(1)) {
    throw std::runtime_error("sequence_logps: input_ids must be (R, T) = (" + std::to_string(logits.size(0)) +
                             ", " + std::to_string(logits.size(1)) + ") to match logits " + shape_str(logits) +
                             "; got " + (input_ids.defined() ? shape_str(input_ids) : std::string("undefined")));
  }
  if (input_ids.is_floating_point() || input_ids.scalar_type() == torch::kBool || input_ids.is_complex()) {
    throw std::runtime_error("sequence_logps: input_ids must be an integer tensor (int64 or int32)");
  }
  if (!loss_mask.defined() || loss_mask.sizes() != input_ids.sizes()) {
    throw std::runtime_error("sequence_logps: loss_mask must have the shape of input_ids " + shape_str(input_ids) +
                             "; got " + (loss_mask.defined() ? shape_str(loss_mask) : std::string("undefined")));
  }
  if (logits.size(2) == 0) throw std::runtime_error("sequence_logps: logits have an empty vocabulary dimension");
}

namespace detail {
void set_head_chunk_rows(int64_t rows) { g_head_chunk_rows = rows; }
void set_head_vocab_block(int64_t rows) { g_head_vocab_block = rows; }

SeqLogps sequence_logps(const Tensor& logits, const Tensor& input_ids, const Tensor& loss_mask,
                        LogpsKernel kernel) {
  check_logps_inputs(logits, input_ids, loss_mask);
  auto out = SeqLogpsFn::apply(logits, input_ids, loss_mask, static_cast<int64_t>(kernel));
  return SeqLogps{out[0], out[1], out[2], {}, {}};
}
}  // namespace detail

SeqLogps sequence_logps(const Tensor& logits, const Tensor& input_ids, const Tensor& loss_mask) {
  return detail::sequence_logps(logits, input_ids, loss_mask, detail::LogpsKernel::automatic);
}

SeqLogps head_logps(const Tensor& hidden, const Tensor& weight, const Tensor& position, const Tensor& token,
                    const Tensor& sequence, int64_t sequences, const HeadLogpsOptions& extra) {
  if (!hidden.defined() || hidden.dim() < 2 || !hidden.is_floating_point())
    throw std::runtime_error("head_logps: hidden must be a float tensor (..., C)");
  const int64_t C = hidden.size(-1);
  if (weight.defined() && (weight.dim() != 2 || weight.size(1) != C))
    throw std::runtime_error("head_logps: weight must be (V, " + std::to_string(C) + "); got " + shape_str(weight));
  const int64_t V = weight.defined() ? weight.size(0) : C;
  const int64_t M = position.numel();
  if (token.numel() != M || sequence.numel() != M)
    throw std::runtime_error("head_logps: position, token and sequence must have one entry per scored token");
  Tensor pos = position.to(torch::kCPU, torch::kLong).contiguous();
  Tensor tok = token.to(torch::kCPU, torch::kLong).contiguous();
  Tensor seq = sequence.to(torch::kCPU, torch::kLong).contiguous();
  const int64_t N = hidden.numel() / std::max<int64_t>(1, C);
  for (int64_t i = 0; i < M; ++i) {
    const int64_t p = pos.data_ptr<int64_t>()[i], t = tok.data_ptr<int64_t>()[i], q = seq.data_ptr<int64_t>()[i];
    if (p < 0 || p >= N || q < 0 || q >= sequences)
      throw std::runtime_error("head_logps: entry " + std::to_string(i) + " reads position " + std::to_string(p) +
                               " of " + std::to_string(N) + " for sequence " + std::to_string(q) + " of " +
                               std::to_string(sequences));
    if (t < 0 || t >= V)
      throw std::runtime_error("head_logps: token " + std::to_string(t) + " is outside the vocabulary [0, " +
                               std::to_string(V) + "); the data was tokenized for another model (check vocab_size)");
  }
  Tensor tw = torch::empty({0}, torch::kDouble);
  if (extra.token_weight.defined()) {
    if (extra.token_weight.dim() != 1 || extra.token_weight.numel() != M)
      throw std::runtime_error("head_logps: token_weight must have one entry per scored token (" + std::to_string(M) +
                               "); got " + shape_str(extra.token_weight));
    tw = extra.token_weight.to(torch::kCPU, torch::kDouble).contiguous();
  }
  Tensor rows = hidden.reshape({N, C}).index_select(0, pos.to(hidden.device()));  // (M, C)
  // No weight: an empty placeholder (autograd records every tensor input; undefined ones are refused).
  // A weight that requires grad (a trained lm_head copy) gets its gradient in backward.
  auto out = HeadLogpsFn::apply(rows, weight.defined() ? weight : torch::empty({0}, hidden.options()), tok, seq,
                                sequences, tw, extra.wpo);
  SeqLogps r{out[0], out[1], out[2], {}, {}};
  if (extra.wpo) r.wpo_logps = out[3];
  if (extra.token_weight.defined()) r.unweighted_logps = out[4];
  return r;
}

AnswerTargets answer_targets(const Tensor& input_ids, const Tensor& loss_mask, int64_t vocab) {
  if (!input_ids.defined() || input_ids.dim() != 2 || !loss_mask.defined() || loss_mask.sizes() != input_ids.sizes())
    throw std::runtime_error("answer_targets: input_ids and loss_mask must both be (R, T)");
  const ActivePositions a = active_positions(input_ids, loss_mask, vocab);
  const int64_t T = input_ids.size(1);
  std::vector<int64_t> flat(a.row.size());
  for (size_t i = 0; i < flat.size(); ++i) flat[i] = a.row[i] * T + a.pos[i];
  return AnswerTargets{to_long_tensor(flat), to_long_tensor(a.target), to_long_tensor(a.row), input_ids.size(0)};
}

Tensor ld_token_weights(const Tensor& target_sequence, int64_t sequences, double alpha) {
  if (sequences % 2 != 0)
    throw std::runtime_error("ld_token_weights: expected 2B sequences ([chosen; rejected]); got " +
                             std::to_string(sequences));
  Tensor seq = target_sequence.to(torch::kCPU, torch::kLong).contiguous();
  const int64_t M = seq.numel(), B = sequences / 2;
  const int64_t* sq = seq.data_ptr<int64_t>();
  std::vector<int64_t> len(sequences, 0);
  for (int64_t i = 0; i < M; ++i) {
    if (sq[i] < 0 || sq[i] >= sequences)
      throw std::runtime_error("ld_token_weights: entry " + std::to_string(i) + " names sequence " +
                               std::to_string(sq[i]) + " of " + std::to_string(sequences));
    ++len[sq[i]];
  }
  std::vector<int64_t> seen(sequences, 0);
  std::vector<double> w(M);
  for (int64_t i = 0; i < M; ++i) {
    const int64_t s = sq[i], pair = s % B;
    const int64_t pub = std::min(len[pair], len[B + pair]);  // l_p: the shorter answer of the pair
    w[i] = seen[s]++ < pub ? 1.0 : alpha;
  }
  return to_double_tensor(w);
}

Tensor average_by_length(const Tensor& logps, const Tensor& token_counts) {
  if (logps.sizes() != token_counts.sizes()) {
    throw std::runtime_error("average_by_length: logps " + shape_str(logps) + " and token_counts " +
                             shape_str(token_counts) + " must both be (R)");
  }
  Tensor c = counts_as(token_counts, logps);
  return at::where(c > 0, logps / c.clamp_min(1), at::zeros_like(logps));
}

Tensor token_mean_nll(const Tensor& logps, const Tensor& token_counts) {
  if (logps.sizes() != token_counts.sizes()) {
    throw std::runtime_error("token_mean_nll: logps " + shape_str(logps) + " and token_counts " +
                             shape_str(token_counts) + " must both be (R)");
  }
  Tensor n = counts_as(token_counts, logps).sum();
  return -logps.sum() / n.clamp_min(1);  // no tokens: -0 / 1 = 0
}

}  // namespace dpo
