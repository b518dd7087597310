// Small vectorizable math helpers shared by the hand-written CPU kernels (the
// sequence log-prob loop, chunked attention). Internal to core/.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

namespace dpo::simd {

/// Independent accumulators per loop, so that GCC vectorizes reductions at -O2
/// without -ffast-math (the order of a float sum is then fixed by the lane layout).
constexpr int kLanes = 8;

/// Cephes expf: exp(x) = 2^n * exp(r), n = round(x / ln2), |r| <= ln2 / 2, with a
/// degree-6 polynomial; relative error ~2 ulp for x in [-87, 88] (x is clamped there,
/// so exp(-inf) reads as ~1.6e-38 instead of 0: callers only pass finite x <= ~0).
/// Compile the caller with -fno-trapping-math: the clamps are then compare-and-select
/// and the loops around this vectorize.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float t = x * 1.44269504088896341f;  // in [-125.6, 127]
  // round(t) without a branch: the shifted value is > 0, so truncation is floor.
  const int32_t n = static_cast<int32_t>(t + 128.5f) - 128;
  const float fn = static_cast<float>(n);
  float r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace dpo::simd
