// attention_dense (transformers' eager attention) and attention_chunked (blocks of
// queries against the key ranges a layout lets them see, recomputed in backward).
#include "core/attention.h"

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>
#include <torch/autograd.h>

#include "core/simd_math.h"

namespace dpo {

using torch::Tensor;

// ---------------------------------------------------------------------------
// Layouts

void attention_layout_check(const AttentionLayout& L) {
  const int64_t B = L.rows, T = L.tokens;
  if (B < 0 || T < 0) throw std::runtime_error("attention layout: negative size");
  if (!L.position_ids.defined() || L.position_ids.dim() != 2 || L.position_ids.size(0) != B ||
      L.position_ids.size(1) != T || L.position_ids.scalar_type() != torch::kLong)
    throw std::runtime_error("attention layout: position_ids must be (B, T) = (" + std::to_string(B) + ", " +
                             std::to_string(T) + ") int64");
  std::vector<std::vector<int64_t>> owner(B, std::vector<int64_t>(T, -1));
  for (size_t i = 0; i < L.segments.size(); ++i) {
    const AttentionSegment& s = L.segments[i];
    const std::string name = "attention layout: segment " + std::to_string(i);
    if (s.row < 0 || s.row >= B || s.begin < 0 || s.begin > s.end || s.end > T)
      throw std::runtime_error(name + " [" + std::to_string(s.begin) + ", " + std::to_string(s.end) + ") of row " +
                               std::to_string(s.row) + " lies outside the (" + std::to_string(B) + ", " +
                               std::to_string(T) + ") batch");
    for (int64_t t = s.begin; t < s.end; ++t) {
      if (owner[s.row][t] >= 0)
        throw std::runtime_error(name + " overlaps segment " + std::to_string(owner[s.row][t]) + " at token " +
                                 std::to_string(t));
      owner[s.row][t] = static_cast<int64_t>(i);
    }
    if (s.parent >= 0) {
      if (s.parent >= static_cast<int64_t>(i))
        throw std::runtime_error(name + ": parent " + std::to_string(s.parent) + " must be an earlier segment");
      const AttentionSegment& p = L.segments[s.parent];
      if (p.row != s.row || p.end > s.begin)
        throw std::runtime_error(name + ": parent " + std::to_string(s.parent) +
                                 " must lie in the same row and end before the segment begins");
    }
  }
}

std::optional<AttentionLayout> attention_layout_from_mask(const Tensor& attention_mask) {
  if (!attention_mask.defined() || attention_mask.dim() != 2) return std::nullopt;
  Tensor m = attention_mask.to(torch::kCPU).ne(0).contiguous();
  const int64_t B = m.size(0), T = m.size(1);
  const bool* p = m.data_ptr<bool>();
  AttentionLayout L;
  L.rows = B;
  L.tokens = T;
  for (int64_t b = 0; b < B; ++b) {
    int64_t len = 0;
    while (len < T && p[b * T + len]) ++len;
    for (int64_t t = len; t < T; ++t)
      if (p[b * T + t]) return std::nullopt;  // not right-padded
    if (len > 0) L.segments.push_back({b, 0, len, -1});
  }
  L.position_ids = torch::arange(T, torch::kLong).unsqueeze(0).expand({B, T}).contiguous();
  return L;
}

namespace {

// Per segment, the key ranges its queries see besides their own segment: the
// ancestors' [begin, end), in token order.
std::vector<std::vector<std::pair<int64_t, int64_t>>> ancestor_ranges(const AttentionLayout& L) {
  std::vector<std::vector<std::pair<int64_t, int64_t>>> out(L.segments.size());
  for (size_t i = 0; i < L.segments.size(); ++i) {
    for (int64_t p = L.segments[i].parent; p >= 0; p = L.segments[p].parent)
      out[i].insert(out[i].begin(), {L.segments[p].begin, L.segments[p].end});
  }
  return out;
}

// Tokens in no segment, as (row, token).
std::vector<std::pair<int64_t, int64_t>> padding_tokens(const AttentionLayout& L) {
  std::vector<std::vector<uint8_t>> covered(L.rows, std::vector<uint8_t>(L.tokens, 0));
  for (const auto& s : L.segments)
    for (int64_t t = s.begin; t < s.end; ++t) covered[s.row][t] = 1;
  std::vector<std::pair<int64_t, int64_t>> out;
  for (int64_t b = 0; b < L.rows; ++b)
    for (int64_t t = 0; t < L.tokens; ++t)
      if (!covered[b][t]) out.emplace_back(b, t);
  return out;
}

}  // namespace

Tensor attention_layout_dense_mask(const AttentionLayout& L) {
  attention_layout_check(L);
  Tensor m = torch::zeros({L.rows, 1, L.tokens, L.tokens}, torch::kBool);
  auto a = m.accessor<bool, 4>();
  const auto anc = ancestor_ranges(L);
  for (size_t i = 0; i < L.segments.size(); ++i) {
    const auto& s = L.segments[i];
    for (int64_t t = s.begin; t < s.end; ++t) {
      for (const auto& [kb, ke] : anc[i])
        for (int64_t j = kb; j < ke; ++j) a[s.row][0][t][j] = true;
      for (int64_t j = s.begin; j <= t; ++j) a[s.row][0][t][j] = true;
    }
  }
  for (const auto& [b, t] : padding_tokens(L)) a[b][0][t][t] = true;
  return m;
}

// ---------------------------------------------------------------------------
// Dense

Tensor attention_dense(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& allowed) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), K = k.size(1), R = H / K;
  // Grouped-query attention without materializing repeated K/V: query heads
  // k*R .. k*R+R-1 share kv head k (transformers repeat_kv), so the R heads of
  // a group are stacked along the token axis: (B, K, R*T, D).
  Tensor qg = q.reshape({B, K, R * T, D});
  Tensor scores = torch::matmul(qg, k.transpose(-1, -2)) * (1.0 / std::sqrt(static_cast<double>(D)));
  scores = scores.view({B, H, T, T}).to(torch::kFloat32);
  // A finite fill instead of -inf: a query row with no allowed key (padding
  // at the front) becomes uniform instead of NaN.
  scores = scores.masked_fill(allowed.logical_not(), std::numeric_limits<float>::lowest());
  Tensor probs = torch::softmax(scores, -1).to(q.scalar_type());  // (B, H, T, T)
  Tensor out = torch::matmul(probs.view({B, K, R * T, T}), v);     // (B, K, R*T, D)
  return out.view({B, H, T, D});
}

// ---------------------------------------------------------------------------
// Chunked

namespace {

enum class Op { kN, kT };  // a stored matrix as is, or transposed
constexpr Op kN = Op::kN;
constexpr Op kT = Op::kT;

// A row-major (rows x cols) fp32 matrix at p with leading dimension ld, as a tensor view.
Tensor matrix_view(const float* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(at::kFloat));
}

// Row-major C (M x N, ldc) = alpha * op(A) (M x Kd) * op(B) (Kd x N) + beta * C, with A
// and B stored row-major (lda, ldb). addmm on strided views: straight to BLAS, no
// copies (cpublas::gemm is not exported by libtorch). beta = 0 ignores C's contents.
void rm_gemm(Op ta, Op tb, int64_t M, int64_t N, int64_t Kd, float alpha, const float* A, int64_t lda,
             const float* Bm, int64_t ldb, float beta, float* C, int64_t ldc) {
  Tensor a = ta == kT ? matrix_view(A, Kd, M, lda).t() : matrix_view(A, M, Kd, lda);
  Tensor b = tb == kT ? matrix_view(Bm, N, Kd, ldb).t() : matrix_view(Bm, Kd, N, ldb);
  Tensor c = matrix_view(C, M, N, ldc);
  at::addmm_out(c, c, a, b, beta, alpha);
}

// One block of queries [q0, q1) of a segment and the key ranges it sees (ancestors,
// then its own segment up to q1 - 1).
struct QueryBlock {
  int64_t row, seg_begin, q0, q1;
  std::vector<std::pair<int64_t, int64_t>> ranges;
  int64_t keys() const {
    int64_t n = 0;
    for (const auto& r : ranges) n += r.second - r.first;
    return n;
  }
  int64_t ancestor_keys() const { return keys() - (q1 - seg_begin); }
};

struct Plan : torch::CustomClassHolder {
  std::shared_ptr<const AttentionLayout> layout;
  std::vector<QueryBlock> blocks;
  std::vector<std::pair<int64_t, int64_t>> pads;  // (row, token) in no segment
};

c10::intrusive_ptr<Plan> make_plan(std::shared_ptr<const AttentionLayout> L) {
  auto p = c10::make_intrusive<Plan>();
  const auto anc = ancestor_ranges(*L);
  for (size_t i = 0; i < L->segments.size(); ++i) {
    const auto& s = L->segments[i];
    for (int64_t q0 = s.begin; q0 < s.end; q0 += kAttentionQueryBlock) {
      QueryBlock qb;
      qb.row = s.row;
      qb.seg_begin = s.begin;
      qb.q0 = q0;
      qb.q1 = std::min(s.end, q0 + kAttentionQueryBlock);
      qb.ranges = anc[i];
      qb.ranges.emplace_back(s.begin, qb.q1);
      p->blocks.push_back(std::move(qb));
    }
  }
  p->pads = padding_tokens(*L);
  p->layout = std::move(L);
  return p;
}

struct Dims {
  int64_t B, T, H, K, D, R;
  float scale;
};

// S (nq x nk) = scale * Q_h[q0:q1] K_kv[ranges]^T.
void block_scores(const Dims& d, const QueryBlock& qb, int64_t h, const float* q, const float* k, float* S,
                  int64_t nk) {
  const int64_t kv = h / d.R, nq = qb.q1 - qb.q0;
  const float* Qh = q + ((qb.row * d.T + qb.q0) * d.H + h) * d.D;
  int64_t off = 0;
  for (const auto& [kb, ke] : qb.ranges) {
    const float* Kk = k + ((qb.row * d.T + kb) * d.K + kv) * d.D;
    rm_gemm(kN, kT, nq, ke - kb, d.D, d.scale, Qh, d.H * d.D, Kk, d.K * d.D, 0.0f, S + off, nk);
    off += ke - kb;
  }
}

// Keys visible to query i of the block (the rest of the row is causal-masked).
inline int64_t visible_keys(const QueryBlock& qb, int64_t n_anc, int64_t i) {
  return n_anc + (qb.q0 + i - qb.seg_begin + 1);
}

// In place: s[0..n) -> softmax, s[n..nk) -> 0; returns the log-sum-exp.
inline float softmax_row(float* s, int64_t n, int64_t nk) {
  using simd::kLanes;
  float mx[kLanes];
  for (int j = 0; j < kLanes; ++j) mx[j] = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) mx[l] = s[j + l] > mx[l] ? s[j + l] : mx[l];
  for (; j < n; ++j) mx[0] = s[j] > mx[0] ? s[j] : mx[0];
  float m = mx[0];
  for (int l = 1; l < kLanes; ++l) m = mx[l] > m ? mx[l] : m;
  if (!std::isfinite(m)) {  // NaN/inf scores: the exact path propagates them
    double sum = 0;
    for (j = 0; j < n; ++j) sum += std::exp(static_cast<double>(s[j]) - m);
    for (j = 0; j < n; ++j) s[j] = static_cast<float>(std::exp(static_cast<double>(s[j]) - m) / sum);
    for (j = n; j < nk; ++j) s[j] = 0.0f;
    return static_cast<float>(m + std::log(sum));
  }
  float acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float e = simd::exp_approx(s[j + l] - m);
      s[j + l] = e;
      acc[l] += e;
    }
  for (; j < n; ++j) {
    const float e = simd::exp_approx(s[j] - m);
    s[j] = e;
    acc[0] += e;
  }
  float sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += acc[l];
  const float inv = 1.0f / sum;
  for (j = 0; j < n; ++j) s[j] *= inv;
  for (j = n; j < nk; ++j) s[j] = 0.0f;
  return m + std::log(sum);
}

class ChunkedAttentionFn : public torch::autograd::Function<ChunkedAttentionFn> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, Tensor q_in, Tensor k_in, Tensor v_in,
                        c10::intrusive_ptr<Plan> plan) {
    Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
    const Dims d = dims(q, k);
    Tensor o = at::empty_like(q);
    Tensor lse = torch::zeros({d.B, d.H, d.T}, torch::kFloat32);
    const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
    float* op = o.data_ptr<float>();
    float* lp = lse.data_ptr<float>();
    std::vector<float> S;
    for (const QueryBlock& qb : plan->blocks) {
      const int64_t nq = qb.q1 - qb.q0, nk = qb.keys(), na = qb.ancestor_keys();
      S.resize(static_cast<size_t>(nq * nk));
      for (int64_t h = 0; h < d.H; ++h) {
        const int64_t kv = h / d.R;
        block_scores(d, qb, h, qp, kp, S.data(), nk);
        at::parallel_for(0, nq, 16, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i)
            lp[(qb.row * d.H + h) * d.T + qb.q0 + i] = softmax_row(S.data() + i * nk, visible_keys(qb, na, i), nk);
        });
        float* Oh = op + ((qb.row * d.T + qb.q0) * d.H + h) * d.D;
        int64_t off = 0;
        for (const auto& [kb, ke] : qb.ranges) {
          const float* Vk = vp + ((qb.row * d.T + kb) * d.K + kv) * d.D;
          rm_gemm(kN, kN, nq, d.D, ke - kb, 1.0f, S.data() + off, nk, Vk, d.K * d.D, off == 0 ? 0.0f : 1.0f, Oh,
                  d.H * d.D);
          off += ke - kb;
        }
      }
    }
    for (const auto& [b, t] : plan->pads)  // a padding token sees itself: its output is its value
      for (int64_t h = 0; h < d.H; ++h)
        std::copy_n(vp + ((b * d.T + t) * d.K + h / d.R) * d.D, d.D, op + ((b * d.T + t) * d.H + h) * d.D);
    ctx->save_for_backward({q, k, v, o, lse});
    ctx->saved_data["plan"] = c10::IValue::make_capsule(plan);
    return o;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &q = saved[0], &k = saved[1], &v = saved[2], &o = saved[3], &lse = saved[4];
    const Plan* plan = static_cast<const Plan*>(ctx->saved_data["plan"].toCapsule().get());
    const Dims d = dims(q, k);
    Tensor go = grads[0].defined() ? grads[0].contiguous() : torch::zeros_like(o);
    // forward: o = P v with P = softmax(S); backward per row: dS = P * (dP - sum(dO * o)).
    Tensor dsum = (go * o).sum(-1).contiguous();  // (B, T, H)
    Tensor gq = torch::zeros_like(q), gk = torch::zeros_like(k), gv = torch::zeros_like(v);
    const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
    const float *gop = go.data_ptr<float>(), *lp = lse.data_ptr<float>(), *dp = dsum.data_ptr<float>();
    float *gqp = gq.data_ptr<float>(), *gkp = gk.data_ptr<float>(), *gvp = gv.data_ptr<float>();
    std::vector<float> P, dP;
    for (const QueryBlock& qb : plan->blocks) {
      const int64_t nq = qb.q1 - qb.q0, nk = qb.keys(), na = qb.ancestor_keys();
      P.resize(static_cast<size_t>(nq * nk));
      dP.resize(static_cast<size_t>(nq * nk));
      for (int64_t h = 0; h < d.H; ++h) {
        const int64_t kv = h / d.R;
        const int64_t qrow = (qb.row * d.T + qb.q0) * d.H + h;  // row index of the block's first query
        const float* Qh = qp + qrow * d.D;
        const float* dOh = gop + qrow * d.D;
        float* dQh = gqp + qrow * d.D;
        block_scores(d, qb, h, qp, kp, P.data(), nk);
        int64_t off = 0;
        for (const auto& [kb, ke] : qb.ranges) {  // dP = dO V^T
          const float* Vk = vp + ((qb.row * d.T + kb) * d.K + kv) * d.D;
          rm_gemm(kN, kT, nq, ke - kb, d.D, 1.0f, dOh, d.H * d.D, Vk, d.K * d.D, 0.0f, dP.data() + off, nk);
          off += ke - kb;
        }
        at::parallel_for(0, nq, 16, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) {
            const int64_t t = qb.q0 + i, n = visible_keys(qb, na, i);
            const float l = lp[(qb.row * d.H + h) * d.T + t];
            const float ds = dp[(qb.row * d.T + t) * d.H + h];
            float* p = P.data() + i * nk;
            float* g = dP.data() + i * nk;
            for (int64_t j = 0; j < n; ++j) {
              p[j] = simd::exp_approx(p[j] - l);
              g[j] = p[j] * (g[j] - ds);
            }
            for (int64_t j = n; j < nk; ++j) p[j] = g[j] = 0.0f;
          }
        });
        off = 0;
        for (const auto& [kb, ke] : qb.ranges) {
          const int64_t len = ke - kb, krow = (qb.row * d.T + kb) * d.K + kv;
          // dQ += scale dS K;  dK += scale dS^T Q;  dV += P^T dO
          rm_gemm(kN, kN, nq, d.D, len, d.scale, dP.data() + off, nk, kp + krow * d.D, d.K * d.D, 1.0f, dQh,
                  d.H * d.D);
          rm_gemm(kT, kN, len, d.D, nq, d.scale, dP.data() + off, nk, Qh, d.H * d.D, 1.0f, gkp + krow * d.D,
                  d.K * d.D);
          rm_gemm(kT, kN, len, d.D, nq, 1.0f, P.data() + off, nk, dOh, d.H * d.D, 1.0f, gvp + krow * d.D,
                  d.K * d.D);
          off += ke - kb;
        }
      }
    }
    for (const auto& [b, t] : plan->pads)
      for (int64_t h = 0; h < d.H; ++h) {
        const float* src = gop + ((b * d.T + t) * d.H + h) * d.D;
        float* dst = gvp + ((b * d.T + t) * d.K + h / d.R) * d.D;
        for (int64_t x = 0; x < d.D; ++x) dst[x] += src[x];
      }
    return {gq, gk, gv, Tensor()};
  }

 private:
  static Dims dims(const Tensor& q, const Tensor& k) {
    Dims d;
    d.B = q.size(0);
    d.T = q.size(1);
    d.H = q.size(2);
    d.D = q.size(3);
    d.K = k.size(2);
    d.R = d.H / d.K;
    d.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d.D)));
    return d;
  }
};

}  // namespace

Tensor attention_chunked(const Tensor& q, const Tensor& k, const Tensor& v,
                         std::shared_ptr<const AttentionLayout> layout) {
  if (!layout) throw std::runtime_error("attention_chunked: no layout");
  for (const Tensor* t : {&q, &k, &v})
    if (!t->defined() || t->dim() != 4 || !t->device().is_cpu() || t->scalar_type() != torch::kFloat32)
      throw std::runtime_error("attention_chunked: q, k, v must be 4-D fp32 CPU tensors");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), K = k.size(2);
  if (k.sizes() != v.sizes() || k.size(0) != B || k.size(1) != T || k.size(3) != D || K <= 0 || H % K != 0)
    throw std::runtime_error("attention_chunked: q (B, T, H, D) and k, v (B, T, K, D) with H % K == 0; got q " +
                             c10::str(q.sizes()) + ", k " + c10::str(k.sizes()) + ", v " + c10::str(v.sizes()));
  if (layout->rows != B || layout->tokens != T)
    throw std::runtime_error("attention_chunked: layout is (" + std::to_string(layout->rows) + ", " +
                             std::to_string(layout->tokens) + "), q is " + c10::str(q.sizes()));
  return ChunkedAttentionFn::apply(q, k, v, make_plan(std::move(layout)));
}

}  // namespace dpo
