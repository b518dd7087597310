// NF4 benchmark: quantize and dequantize a Llama-2-7B MLP weight (11008 x 4096) on
// the CPU. Dequantization is compared with a memcpy of the same fp32 output buffer
// (the bandwidth floor: dequantization writes as many bytes and reads 8x fewer)
// and with itself on one thread.
//
// Usage: bench_nf4 [rows=11008] [cols=4096] [iters=10] [threads=hardware threads]
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <thread>
#include <vector>

#include "core/linear4bit.h"
#include "core/nf4.h"

namespace {

// Best wall time of `iters` runs, in ms (after one warm-up run).
double best_ms(int iters, const std::function<void()>& f) {
  f();
  double best = 1e30;
  for (int i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    const auto t1 = std::chrono::steady_clock::now();
    best = std::min(best, std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  return best;
}

void row(const char* what, double ms, double bytes) {
  std::printf("%-44s %9.2f ms %8.2f GB/s\n", what, ms, bytes / (ms * 1e-3) / 1e9);
}

constexpr const char* kUsage = "usage: bench_nf4 [rows=11008] [cols=4096] [iters=10] [threads=hardware threads]\n";

// argv[i] as a positive integer (at most `max`), or `fallback` when absent; exits with the
// usage on anything else.
int64_t positional(int argc, char** argv, int i, const char* name, int64_t fallback, int64_t max) {
  if (argc <= i) return fallback;
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(argv[i], &end, 10);
  if (errno != 0 || end == argv[i] || *end != '\0' || v < 1 || v > max) {
    std::fprintf(stderr, "bench_nf4: %s must be an integer in [1, %lld], got \"%s\"\n%s", name,
                 static_cast<long long>(max), argv[i], kUsage);
    std::exit(2);
  }
  return v;
}

}  // namespace

int main(int argc, char** argv) try {
  for (int i = 1; i < argc; ++i)
    if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) {
      std::printf("%s", kUsage);
      return 0;
    }
  const int64_t rows = positional(argc, argv, 1, "rows", 11008, int64_t{1} << 20);
  const int64_t cols = positional(argc, argv, 2, "cols", 4096, int64_t{1} << 20);
  const int iters = static_cast<int>(positional(argc, argv, 3, "iters", 10, 100000));
  // libtorch defaults to one thread per physical core; the machine may have more.
  const int threads = static_cast<int>(positional(
      argc, argv, 4, "threads", static_cast<int64_t>(std::max(1u, std::thread::hardware_concurrency())), 1024));

  at::set_num_threads(threads);
  const int64_t n = rows * cols;
  const double out_bytes = static_cast<double>(n) * sizeof(float);
  std::printf("NF4 %lld x %lld (%.1f MB fp32 out), %d threads, best of %d\n", static_cast<long long>(rows),
              static_cast<long long>(cols), out_bytes / 1e6, threads, iters);

  torch::manual_seed(0);
  const torch::Tensor w = torch::randn({rows, cols});
  dpo::Nf4Tensor q, qd;
  const double q_ms = best_ms(std::max(1, iters / 5), [&] { q = dpo::nf4_quantize(w, false); });
  const double qd_ms = best_ms(std::max(1, iters / 5), [&] { qd = dpo::nf4_quantize(w, true); });
  std::printf("%-44s %9.2f ms %8.2f GB/s (fp32 in)\n", "nf4_quantize", q_ms, out_bytes / (q_ms * 1e-3) / 1e9);
  std::printf("%-44s %9.2f ms %8.2f GB/s (fp32 in)\n", "nf4_quantize double_quant", qd_ms,
              out_bytes / (qd_ms * 1e-3) / 1e9);
  std::printf("NF4 bytes: %.1f MB (plain), %.1f MB (double quant)\n", q.nbytes() / 1e6, qd.nbytes() / 1e6);

  std::vector<float> out(static_cast<size_t>(n)), src(static_cast<size_t>(n), 1.0f);
  row("nf4_dequantize_into fp32", best_ms(iters, [&] { dpo::nf4_dequantize_into(q, out.data()); }), out_bytes);
  row("nf4_dequantize_into fp32, double quant", best_ms(iters, [&] { dpo::nf4_dequantize_into(qd, out.data()); }),
      out_bytes);
  row("nf4_dequantize (allocates the output)", best_ms(iters, [&] { dpo::nf4_dequantize(q, torch::kFloat32); }),
      out_bytes);
  row("memset fp32 (store only), 1 thread", best_ms(iters, [&] { std::memset(out.data(), 0, n * sizeof(float)); }),
      out_bytes);
  row("memcpy fp32, 1 thread", best_ms(iters, [&] { std::memcpy(out.data(), src.data(), n * sizeof(float)); }),
      out_bytes);
  row("memcpy fp32, parallel_for", best_ms(iters, [&] {
        at::parallel_for(0, n, 1 << 20, [&](int64_t b, int64_t e) {
          std::memcpy(out.data() + b, src.data() + b, (e - b) * sizeof(float));
        });
      }),
      out_bytes);
  {
    const torch::Tensor x = torch::randn({16, cols});
    const torch::Tensor wd = dpo::nf4_dequantize(q, torch::kFloat32);
    torch::NoGradGuard no_grad;
    const double mm = best_ms(iters, [&] { torch::matmul(x, wd.t()); });
    const double l4 = best_ms(iters, [&] { dpo::linear4bit_forward(x, q); });
    std::printf("%-44s %9.2f ms\n", "dense matmul x(16, I) @ W^T (fp32 W)", mm);
    std::printf("%-44s %9.2f ms\n", "linear4bit_forward x(16, I) (dequant + matmul)", l4);
  }
  at::set_num_threads(1);
  row("nf4_dequantize_into fp32, 1 thread", best_ms(iters, [&] { dpo::nf4_dequantize_into(q, out.data()); }),
      out_bytes);
  const double q1_ms = best_ms(std::max(1, iters / 5), [&] { q = dpo::nf4_quantize(w, false); });
  std::printf("%-44s %9.2f ms\n", "nf4_quantize, 1 thread", q1_ms);
  at::set_num_threads(threads);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "bench_nf4: %s\n", e.what());
  return 1;
}
