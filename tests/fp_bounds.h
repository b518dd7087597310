// Floating-point error bounds for tests that compare results computed in another
// order, by another kernel, blocking, thread count or BLAS (MKL, oneDNN, OpenBLAS,
// ATen's scalar or AVX2 / AVX-512 kernels): a bound derived from the operation, valid
// for any correctly rounded evaluation order, never one machine's rounding. Where the
// code promises bit-exactness (same kernel, same order, same threads) a test compares
// with torch::equal and says why instead.
//
// u  unit roundoff of the dtype the operation rounds in (fp32 2^-24, fp64 2^-53,
//    bf16 2^-8, fp16 2^-11): fl(a op b) = (a op b)(1 + d), |d| <= u.
// k  terms in a sum or dot product; n  entries in a softmax row.
// Reference: N. J. Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed.
// (SIAM 2002), chapters 3 and 4.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/types.h>

namespace dpo::testutil {

/// ulps of the least accurate exp() among the CPU kernels the code may run: ATen's
/// vectorized Vectorized<float>::exp_u20 ("a faster version of exp with ULP=20",
/// ATen/cpu/vec/vec512/vec512_float.h, used by its softmax kernels), Sleef's u10 (1 ulp),
/// glibc's (< 1 ulp) and core/simd_math.h's exp_approx (~2 ulp). 1 ulp <= 2u relative.
constexpr double kExpUlps = 20;
/// ulps of log() (Sleef_logf*_u10, glibc): 1.
constexpr double kLogUlps = 1;

/// Unit roundoff u of a floating dtype.
inline double unit_roundoff(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat64: return std::ldexp(1.0, -53);
    case torch::kFloat32: return std::ldexp(1.0, -24);
    case torch::kBFloat16: return std::ldexp(1.0, -8);
    case torch::kFloat16: return std::ldexp(1.0, -11);
    default: throw std::invalid_argument(std::string("unit_roundoff: not a floating dtype: ") + c10::toString(t));
  }
}

/// gamma(k) = k u / (1 - k u) (Higham, Lemma 3.1): |prod_{i<=k} (1 + d_i)^{+-1} - 1| <= gamma(k)
/// for |d_i| <= u, i.e. the relative error of k roundings in a row. Throws when k u >= 1
/// (no bound: the test must use a wider dtype or fewer terms).
inline double gamma(double k, torch::ScalarType t = torch::kFloat32) {
  const double ku = k * unit_roundoff(t);
  if (ku >= 1) throw std::invalid_argument("gamma: k u >= 1 for k = " + std::to_string(k));
  return ku / (1 - ku);
}

/// |A| @ |B| in float64: the scale of every matmul bound.
inline torch::Tensor abs_product(const torch::Tensor& a, const torch::Tensor& b) {
  return torch::matmul(a.detach().to(torch::kCPU, torch::kFloat64).abs(), b.detach().to(torch::kCPU, torch::kFloat64).abs());
}

/// Elementwise bound on |fl(A @ B) - A @ B| when the product rounds in `t`:
/// gamma(K) * (|A| @ |B|), K = A.size(-1), computed in float64 (Higham eq. (3.13): each
/// entry is a K-term dot product, and |fl(x^T y) - x^T y| <= gamma(K) |x|^T |y| for ANY
/// order of the K products and K - 1 additions (eq. (3.5)); with FMA, blocking, split-K or
/// several threads the number of roundings on any path is still <= K). A, B are exact
/// (the same values both sides compare). bf16 / fp16 kernels that accumulate in fp32 and
/// round once are inside gamma(K) of their own dtype. Two computed products (neither
/// exact) differ by up to twice this; a float64 reference needs it once: the reference's
/// own error, <= K 2^-53 |A| |B| for fp64, is below gamma's slack (K u)^2 / (1 - K u).
inline torch::Tensor matmul_error_bound(const torch::Tensor& a, const torch::Tensor& b,
                                        torch::ScalarType t = torch::kFloat32) {
  const int64_t k = a.dim() == 0 ? 1 : a.size(-1);
  return abs_product(a, b) * gamma(static_cast<double>(k), t);
}

/// Bound on |fl(sum x) - sum x| along `dim` (kept as a size-1 dim when keepdim): gamma(n - 1)
/// * sum |x| (Higham eq. (4.4), any order, pairwise, vectorized lanes or threads).
inline torch::Tensor sum_error_bound(const torch::Tensor& x, int64_t dim, torch::ScalarType t = torch::kFloat32,
                                     bool keepdim = false) {
  const torch::Tensor ax = x.detach().to(torch::kCPU, torch::kFloat64).abs();
  const double n = static_cast<double>(x.dim() == 0 ? 1 : x.size(dim));
  return ax.sum(dim, keepdim) * gamma(std::max(n - 1, 1.0), t);
}

/// Bound on |fl(logsumexp(x)) - logsumexp(x)| along `dim` (kept as size 1), for any kernel
/// that computes m + log(sum exp(x - m)), m = max x, rounding in `t` (double accumulators
/// are inside the bound), x exact. With d_i = x_i - m <= 0 and S = sum exp(d_i) >= 1:
///   x_i - m rounds once: exp(d_i) moves by a factor exp(u |d_i|), and
///     sum_i exp(d_i) |d_i| <= (n - 1) / e (t e^-t <= 1/e): (n - 1) u / e relative to S;
///   exp: 2 kExpUlps u relative per term; the sum of n positive terms: gamma(n - 1);
///   so S comes out with a relative error eta1 <= gamma(n - 1) + (2 kExpUlps + (n - 1) / e) u
///   to first order, eta = eta1 (1 + eta1) with the products of those factors;
///   log(S (1 + eta)) - log S <= eta / (1 - eta); log itself: 2 kLogUlps u log S <=
///   2 kLogUlps u log n; the final m + log S: u |lse|.
/// n is the whole row (masked -inf entries included: they only make the bound larger).
/// Underflowed exps (d_i < -87 in fp32) change S >= 1 by < n 1e-38: not counted.
inline torch::Tensor logsumexp_error_bound(const torch::Tensor& x, int64_t dim, torch::ScalarType t = torch::kFloat32) {
  const double u = unit_roundoff(t);
  const double n = static_cast<double>(x.size(dim));
  const double eta1 = gamma(std::max(n - 1, 1.0), t) + (2 * kExpUlps + (n - 1) / M_E) * u;
  const double eta = eta1 * (1 + eta1);
  if (eta >= 0.5) throw std::invalid_argument("logsumexp_error_bound: no bound for n = " + std::to_string(n));
  const torch::Tensor lse = x.detach().to(torch::kCPU, torch::kFloat64).logsumexp(dim, /*keepdim=*/true);
  return eta / (1 - eta) + 2 * kLogUlps * u * std::log(n) + u * lse.abs();
}

/// Elementwise bound on |fl(log_softmax(x)) - log_softmax(x)| along `dim`: the logsumexp's
/// bound plus the rounding of x_i - lse (u |x_i - lse|).
inline torch::Tensor log_softmax_error_bound(const torch::Tensor& x, int64_t dim, torch::ScalarType t = torch::kFloat32) {
  const torch::Tensor xd = x.detach().to(torch::kCPU, torch::kFloat64);
  return logsumexp_error_bound(x, dim, t) + unit_roundoff(t) * torch::log_softmax(xd, dim).abs();
}

/// Elementwise bound on |fl(p_i) - p_i|, p = softmax(x) along `dim`, possibly times a scale
/// g rounded once (a gradient g p), for either form a kernel uses:
///   exp(x_i - m) / S: exp(x_i - m) as above (u |x_i - m| + 2 kExpUlps u), S (eta <= the
///     logsumexp bound L), the division (u);
///   exp(x_i - lse~) with lse~ = lse + D, |D| <= L: e^-D (L), x_i - lse~ rounds
///     (u |x_i - lse| <= u (|x_i - m| + log n), since m <= lse <= m + log n), exp (2 kExpUlps u).
/// Either way, with one more rounding for a scale, the relative error of p_i is at most
///   rel = L + u (|x_i - m| + log n) + 2 kExpUlps u + 2u   to first order,
/// and |fl(p_i) - p_i| <= p_i rel (1 + rel) with the products of those factors.
inline torch::Tensor softmax_error_bound(const torch::Tensor& x, int64_t dim, torch::ScalarType t = torch::kFloat32) {
  const double u = unit_roundoff(t);
  const double n = static_cast<double>(x.size(dim));
  const torch::Tensor xd = x.detach().to(torch::kCPU, torch::kFloat64);
  const torch::Tensor m = std::get<0>(xd.max(dim, /*keepdim=*/true));
  const torch::Tensor rel = logsumexp_error_bound(x, dim, t) + u * ((xd - m).abs() + std::log(n)) + (2 * kExpUlps + 2) * u;
  const torch::Tensor p = torch::softmax(xd, dim);
  // Entries with p = 0 (x_i = -inf) may come out as an underflowed or clamped exp (< 2 tiny).
  const double tiny = t == torch::kFloat64 ? std::numeric_limits<double>::min()
                     : t == torch::kFloat16 ? std::ldexp(1.0, -14)
                                            : std::numeric_limits<float>::min();
  return torch::where(p > 0, p * rel * (1 + rel), torch::zeros_like(p)) + 2 * tiny;
}

/// First-order bound on how much log_softmax(x) along `dim` moves when each x_j may be off
/// by e_j (x's own error, e.g. a product's matmul_error_bound): d log p_i = dx_i - sum_j p_j dx_j,
/// so |d log p_i| <= e_i + sum_j p_j e_j (and log-sum-exp moves by <= sum_j p_j e_j).
inline torch::Tensor log_softmax_input_error(const torch::Tensor& x, const torch::Tensor& e, int64_t dim) {
  const torch::Tensor p = torch::softmax(x.detach().to(torch::kCPU, torch::kFloat64), dim);
  const torch::Tensor ed = e.detach().to(torch::kCPU, torch::kFloat64);
  return ed + (p * ed).sum(dim, /*keepdim=*/true);
}

/// Bound on per-sequence sums of gathered log-probabilities, as sequence_logps and head_logps
/// compute them in `t`: entry i adds w_i log_softmax(rows[i])[tok[i]] to sequence seq[i]
/// (rows (M, V) exact logits, weights w (M) or undefined for 1; R sequences). Each term is
/// within log_softmax_error_bound (plus input_error carried by log_softmax_input_error when
/// the logits are themselves computed, and u |w l| for the weighting); a sequence's n terms
/// sum in any order within gamma(n) sum |w l| (Higham eq. (4.4), with one more rounding to
/// spare). Returns (R) float64.
inline torch::Tensor gathered_logp_sum_bound(const torch::Tensor& rows, const torch::Tensor& tok, const torch::Tensor& seq,
                                             int64_t R, torch::ScalarType t = torch::kFloat32,
                                             const torch::Tensor& weight = {}, const torch::Tensor& input_error = {}) {
  const double u = unit_roundoff(t);
  const torch::Tensor x = rows.detach().to(torch::kCPU, torch::kFloat64);
  torch::Tensor e = log_softmax_error_bound(x, 1, t);
  if (input_error.defined()) e = e + log_softmax_input_error(x, input_error, 1);
  const torch::Tensor idx = tok.to(torch::kCPU, torch::kLong).unsqueeze(1);
  const torch::Tensor l = torch::log_softmax(x, 1).gather(1, idx).squeeze(1);  // (M)
  torch::Tensor term_err = e.gather(1, idx).squeeze(1);
  torch::Tensor wl = l.abs();
  if (weight.defined()) {
    const torch::Tensor w = weight.detach().to(torch::kCPU, torch::kFloat64).abs();
    term_err = term_err * w + u * w * l.abs();
    wl = w * l.abs();
  }
  const torch::Tensor s = seq.to(torch::kCPU, torch::kLong);
  const torch::Tensor err = torch::zeros({R}, torch::kFloat64).index_add(0, s, term_err);
  const torch::Tensor mag = torch::zeros({R}, torch::kFloat64).index_add(0, s, wl);
  const torch::Tensor n = torch::zeros({R}, torch::kFloat64).index_add(0, s, torch::ones_like(l));
  return err + mag * (n + 1) * u / (1 - (n + 1) * u);  // gamma(n + 1) per sequence
}

/// Where an elementwise bound is impractical (a whole model's forward and backward), a
/// test compares two fp32 evaluations relative to the largest |entry| within 2 gamma(N),
/// N = the longest chain of dependent roundings in the computation: each rounding moves a
/// value by u relative to the magnitudes it combines, and a chain of N of them by gamma(N)
/// (Higham Lemma 3.1); RMSNorm and softmax are well conditioned (O(1) relative condition),
/// so no amplification beyond the chain is counted. For one Llama decoder layer the chain
/// is RMSNorm (C + 4: a C-term sum of squares, rsqrt, two products), q/k/v (C + 1 with a
/// bias), q/k RMSNorm (D + 4), RoPE (3), scores (D + 2), softmax (2 kExpUlps + 2T + 4, as
/// in logsumexp_error_bound), P V (T), o_proj (H D + 1), the residual (1), RMSNorm
/// (C + 4), gate / up (C + 1), SiLU and the product (2 kExpUlps + 5), down (F + 1), the
/// residual (1); after the layers the final RMSNorm and the head (C + 4 + C). A backward
/// pass runs the transposed products of the same chain after the forward's: 2N.
inline double llama_forward_roundings(int64_t layers, int64_t C, int64_t H, int64_t D, int64_t F, int64_t T) {
  const double layer = (C + 4) + (C + 1) + (D + 4) + 3 + (D + 2) + (2 * kExpUlps + 2 * T + 4) + T + (H * D + 1) + 1 +
                       (C + 4) + (C + 1) + (2 * kExpUlps + 5) + (F + 1) + 1;
  return static_cast<double>(layers) * layer + (C + 4) + C;
}

/// Passes when |actual - expected| <= bound elementwise (broadcast; inf == inf and NaN
/// where both are NaN count as equal); otherwise says how many entries fail and shows the
/// worst one (largest error / bound): its index, both values, the error and the bound.
inline ::testing::AssertionResult is_within(const torch::Tensor& actual, const torch::Tensor& expected,
                                            const torch::Tensor& bound) {
  if (actual.sizes() != expected.sizes()) {
    std::ostringstream s;
    s << "shapes differ: actual " << actual.sizes() << ", expected " << expected.sizes();
    return ::testing::AssertionFailure() << s.str();
  }
  const torch::Tensor a = actual.detach().to(torch::kCPU, torch::kFloat64).contiguous();
  const torch::Tensor e = expected.detach().to(torch::kCPU, torch::kFloat64).contiguous();
  const torch::Tensor b = bound.detach().to(torch::kCPU, torch::kFloat64).expand_as(a).contiguous();
  const torch::Tensor err = (a - e).abs();
  const torch::Tensor ok = err.le(b) | a.eq(e) | (a.isnan() & e.isnan());
  const int64_t bad = (~ok).sum().item<int64_t>();
  if (bad == 0) return ::testing::AssertionSuccess();
  // The worst entry: the largest error / bound among the failing ones (NaN errors first).
  const torch::Tensor ratio = torch::where(ok, torch::zeros_like(err),
                                           torch::where(err.isnan(), torch::full_like(err, INFINITY), err / b));
  const int64_t flat = ratio.reshape({-1}).argmax().item<int64_t>();
  std::ostringstream idx;
  idx << "[";
  int64_t rest = flat;
  std::vector<int64_t> coords(a.dim());
  for (int64_t d = a.dim() - 1; d >= 0; --d) {
    coords[d] = rest % a.size(d);
    rest /= a.size(d);
  }
  for (size_t d = 0; d < coords.size(); ++d) idx << (d ? ", " : "") << coords[d];
  idx << "]";
  const auto at = [&](const torch::Tensor& x) { return x.reshape({-1})[flat].item<double>(); };
  std::ostringstream s;
  s.precision(9);
  s << bad << " of " << a.numel() << " entries outside the bound; worst at " << idx.str() << ": actual " << at(a)
    << ", expected " << at(e) << ", |error| " << at(err) << " > bound " << at(b) << " (" << at(err) / at(b)
    << "x)";
  return ::testing::AssertionFailure() << s.str();
}

/// EXPECT_TRUE(is_within(...)) reported at the caller's file and line, prefixed with `what`.
/// With DPO_FP_BOUNDS_VERBOSE set, a passing comparison prints its largest error / bound
/// (how much of the bound the kernels on this machine use).
inline bool expect_within(const torch::Tensor& actual, const torch::Tensor& expected, const torch::Tensor& bound,
                          const std::string& what = "", const char* file = __builtin_FILE(),
                          int line = __builtin_LINE()) {
  const ::testing::AssertionResult r = is_within(actual, expected, bound);
  if (!r) ADD_FAILURE_AT(file, line) << (what.empty() ? "" : what + ": ") << r.message();
  if (r && std::getenv("DPO_FP_BOUNDS_VERBOSE")) {
    const torch::Tensor err = (actual.detach().to(torch::kCPU, torch::kFloat64) -
                               expected.detach().to(torch::kCPU, torch::kFloat64)).abs();
    const torch::Tensor b = bound.detach().to(torch::kCPU, torch::kFloat64).expand_as(err);
    const double used = torch::where(b > 0, err / b, torch::zeros_like(err)).nan_to_num(0).max().item<double>();
    std::printf("[fp_bounds] %s:%d %s: %.3g of the bound\n", file, line, what.c_str(), used);
  }
  return static_cast<bool>(r);
}

/// EXPECT_NEAR(actual, expected, bound) reported at the caller's line, prefixed with `what`;
/// with DPO_FP_BOUNDS_VERBOSE set a pass prints |error| / bound, as expect_within does.
inline bool expect_near(double actual, double expected, double bound, const std::string& what = "",
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  const double err = std::abs(actual - expected);
  const bool ok = err <= bound || actual == expected;
  if (!ok)
    ADD_FAILURE_AT(file, line) << (what.empty() ? "" : what + ": ") << "|" << actual << " - " << expected
                               << "| = " << err << " > bound " << bound;
  else if (std::getenv("DPO_FP_BOUNDS_VERBOSE"))
    std::printf("[fp_bounds] %s:%d %s: %.3g of the bound\n", file, line, what.c_str(), bound > 0 ? err / bound : 0.0);
  return ok;
}

}  // namespace dpo::testutil
