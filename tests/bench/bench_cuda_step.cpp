// One QLoRA DPO micro-batch on one GPU, at the shape of Llama-2-7B or Llama-3-8B, with
// random NF4 weights made directly on the device (double-quantized, as configs/llama2-7b-dpo.ini;
// no checkpoint needed): bf16 compute, LoRA r=8 on q,k,v, gradient checkpointing, one
// chosen/rejected micro-batch of `pairs` pairs x T tokens. Per step (what Trainer::micro_dpo
// does): reference forward (adapters off, no grad) + policy forward + dpo_batch_loss + backward.
// Prints tokens/s, the CUDA caching allocator's peak, and the executed FLOP rate as a share
// of a bf16 matmul peak measured in the same process (an n x n x n at::mm, best of 10).
//
// FLOP accounting as bench_step (N = projection + lm_head parameters, tok = R * T):
//   executed = (ckpt ? 8 : 6) * N * tok + (ckpt ? 4 : 3) * 4 * L * R * T^2 * C (attention)
//
// Usage: bench_cuda_step [--shape llama2-7b|llama3-8b] [--pairs 4] [--seq 1024] [--answer 512]
//                        [--steps 3] [--layers 0 (= the shape's)] [--checkpointing true]
// Without a CUDA device it says so and exits 77.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <torch/cuda.h>
#include <torch/torch.h>

#if __has_include(<c10/cuda/CUDACachingAllocator.h>) && __has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#include <c10/cuda/CUDACachingAllocator.h>
#define DPO_BENCH_ALLOCATOR_STATS 1
#endif

#include "runtime/torch_cuda.h"
#include "core/dpo.h"
#include "core/linear.h"
#include "core/llama.h"
#include "core/lora.h"
#include "core/nf4.h"
#include "launch/cli.h"
#include "launch/dpo_step.h"

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void cuda_sync() { torch::cuda::synchronize(); }

void reset_peak(int dev) {
#ifdef DPO_BENCH_ALLOCATOR_STATS
  c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(dev));
#endif
}
// Peak bytes allocated through libtorch's CUDA allocator since reset_peak (-1: unknown).
double peak_bytes(int dev) {
#ifdef DPO_BENCH_ALLOCATOR_STATS
  const auto st = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(dev));
  return static_cast<double>(st.allocated_bytes[0].peak);  // [0] = aggregate over pool types
#else
  return -1;
#endif
}

// Best-of-`reps` TFLOP/s of an n x n x n bf16 matmul on the device.
double matmul_tflops(int64_t n, int reps, torch::Device d) {
  auto o = torch::TensorOptions().dtype(torch::kBFloat16).device(d);
  auto a = torch::randn({n, n}, o), b = torch::randn({n, n}, o);
  for (int i = 0; i < 3; ++i) (void)torch::mm(a, b);
  cuda_sync();
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    const double t0 = now_s();
    auto c = torch::mm(a, b);
    cuda_sync();
    best = std::min(best, now_s() - t0);
  }
  return 2.0 * n * n * n / best / 1e12;
}

// Random double-quantized NF4 weight (O, I) on the device: uniform codes and statistics.
dpo::Nf4Tensor random_nf4(int64_t O, int64_t I, torch::Device d) {
  dpo::Nf4Tensor t;
  const int64_t n = O * I;
  t.shape = {O, I};
  t.blocksize = 64;
  t.nested_blocksize = 256;
  t.dtype = torch::kBFloat16;
  const int64_t nb = (n + t.blocksize - 1) / t.blocksize, nnb = (nb + t.nested_blocksize - 1) / t.nested_blocksize;
  auto u8 = torch::TensorOptions().dtype(torch::kUInt8).device(d);
  auto f32 = torch::TensorOptions().dtype(torch::kFloat32).device(d);
  t.packed = torch::randint(0, 256, {(n + 1) / 2}, u8);
  t.absmax = torch::randint(0, 256, {nb}, u8);
  t.nested_absmax = torch::rand({nnb}, f32) * 0.01;
  const auto& map = dpo::dynamic_map_signed();
  t.nested_code = torch::from_blob(const_cast<float*>(map.data()), {256}, torch::kFloat32).clone().to(d);
  t.offset = 0.02f;
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  return dpo::run_main("bench_cuda_step", [&]() -> int {
    dpo::Cli cli("bench_cuda_step", "QLoRA DPO micro-batch throughput and memory on one GPU at a 7B/8B shape");
    cli.add_string("shape", "llama2-7b", "llama2-7b | llama3-8b");
    cli.add_int("layers", 0, "decoder layers (0 = the shape's 32)");
    cli.add_int("pairs", 4, "preference pairs per micro-batch (2 rows each)");
    cli.add_int("seq", 1024, "tokens per row T");
    cli.add_int("answer", 512, "answer tokens at the end of each row");
    cli.add_int("steps", 3, "timed steps (after one warm-up step)");
    cli.add_bool("checkpointing", true, "gradient checkpointing of the decoder layers");
    cli.add_int("matmul_n", 8192, "size of the peak-measuring square bf16 matmul");
    if (!cli.parse(argc, argv)) return 0;
    if (!dpo::torch_cuda_available()) {
      std::printf("bench_cuda_step: NOT RUN: no CUDA device visible to libtorch\n");
      return 77;
    }
    const torch::Device dev(torch::kCUDA, 0);

    dpo::LlamaConfig cfg;
    const std::string shape = cli.get_string("shape");
    cfg.hidden_size = 4096;
    cfg.num_hidden_layers = 32;
    cfg.num_attention_heads = 32;
    cfg.max_position_embeddings = 4096;
    cfg.rms_norm_eps = 1e-5;
    cfg.pad_token_id = 0;
    if (shape == "llama2-7b") {
      cfg.intermediate_size = 11008;
      cfg.num_key_value_heads = 32;
      cfg.vocab_size = 32000;
    } else if (shape == "llama3-8b") {
      cfg.intermediate_size = 14336;
      cfg.num_key_value_heads = 8;
      cfg.vocab_size = 128256;
      cfg.rope_theta = 500000.0;
      cfg.max_position_embeddings = 8192;
    } else {
      throw dpo::CliError("--shape must be llama2-7b or llama3-8b, got '" + shape + "'");
    }
    if (cli.get_int("layers") > 0) cfg.num_hidden_layers = cli.get_int("layers");
    const int64_t P = cli.get_int("pairs"), T = cli.get_int("seq"), answer = cli.get_int("answer");
    if (P < 1 || answer <= 0 || answer >= T) throw dpo::CliError("need --pairs >= 1 and --answer in [1, --seq)");
    const bool ckpt = cli.get_bool("checkpointing");
    const int64_t R = 2 * P, C = cfg.hidden_size, F = cfg.intermediate_size, L = cfg.num_hidden_layers,
                  V = cfg.vocab_size, K = cfg.num_key_value_heads, H = cfg.num_attention_heads;

    // Model: empty on the CPU, LoRA attached, moved, then NF4 weights and tables on the GPU.
    const double t_build = now_s();
    dpo::LlamaModel model(dpo::llama_config_checked(cfg), torch::kBFloat16);
    auto named = model->named_projections();
    dpo::LoraConfig lcfg;
    lcfg.r = 8;
    lcfg.alpha = 16;
    lcfg.dropout = 0.05;
    lcfg.target_modules = {"q_proj", "k_proj", "v_proj"};
    dpo::lora_attach(named, lcfg, 1);
    model->to(dev);
    dpo::QuantOptions q;
    q.load_in_4bit = true;
    q.double_quant = true;
    q.compute_dtype = torch::kBFloat16;
    torch::manual_seed(1);
    {
      torch::NoGradGuard ng;
      for (auto& [name, p] : named) p->set_weight_nf4(random_nf4(p->out_features(), p->in_features(), dev), q);
      for (auto& t : model->parameters())
        if (t.dim() == 2 && t.size(0) == V) t.normal_(0.0, 0.02);  // embeddings, lm_head
      for (auto& [name, p] : named)
        if (p->has_lora()) p->lora_B().normal_(0.0, 0.01);  // as after some training
    }
    model->set_gradient_checkpointing(ckpt);
    model->train();
    cuda_sync();
    int64_t nf4_bytes = 0;
    for (auto& [name, p] : named) nf4_bytes += p->nf4_weight().nbytes();
    const double build_s = now_s() - t_build;

    auto ids = torch::randint(3, V, {R, T}, torch::kInt64);
    ids.slice(0, P, R).slice(1, 0, T - answer).copy_(ids.slice(0, 0, P).slice(1, 0, T - answer));
    ids = ids.to(dev);
    auto mask = torch::ones({R, T}, torch::TensorOptions().dtype(torch::kInt64).device(dev));
    auto lmask = torch::zeros({R, T}, torch::TensorOptions().dtype(torch::kInt64).device(dev));
    lmask.slice(1, T - answer, T).fill_(1);

    const double tok = static_cast<double>(R * T);
    const double D = static_cast<double>(C / H);
    const double n_active = static_cast<double>(L) * (2.0 * C * C + 2.0 * C * K * D + 3.0 * C * F) + static_cast<double>(V) * C;
    const double attn_fwd = 4.0 * L * R * static_cast<double>(T) * T * C;
    const double executed = (ckpt ? 8.0 : 6.0) * n_active * tok + (ckpt ? 4.0 : 3.0) * attn_fwd;
    const double peak_tf = matmul_tflops(cli.get_int("matmul_n"), 10, dev);
    std::printf("bench_cuda_step: %s shape, L=%lld C=%lld F=%lld H=%lld K=%lld V=%lld, NF4 double-quant %.2f GB on the GPU "
                "(built in %.1f s), bf16, LoRA r=8 q,k,v, %lld pairs x %lld tokens (%lld answer), checkpointing %s\n",
                shape.c_str(), (long long)L, (long long)C, (long long)F, (long long)H, (long long)K, (long long)V,
                nf4_bytes / 1e9, build_s, (long long)P, (long long)T, (long long)answer, ckpt ? "on" : "off");
    std::printf("N = %.2f B; executed per step ~ %.1f TFLOP; bf16 matmul peak measured %.0f TFLOP/s (%lld^3)\n",
                n_active / 1e9, executed / 1e12, peak_tf, (long long)cli.get_int("matmul_n"));

    dpo::DpoOptions dopts;
    double best = 1e30, best_ref = 0, peak = 0;
    for (int64_t s = 0; s <= cli.get_int("steps"); ++s) {
      for (auto& p : model->parameters())
        if (p.grad().defined()) p.mutable_grad() = torch::Tensor();
      cuda_sync();
      reset_peak(0);
      const double t0 = now_s();
      // The trainer's reference pass (launch/dpo_step.h: adapters off by ReferenceModeGuard).
      torch::Tensor ref = dpo::reference_logps(model, named, ids, mask, lmask);
      cuda_sync();
      const double t1 = now_s();
      auto logits = model->forward(ids, mask);
      dpo::DpoStepLoss l = dpo::dpo_batch_loss(logits, ids, lmask, ref, dopts);
      logits = torch::Tensor();
      l.loss.backward();
      cuda_sync();
      const double t2 = now_s();
      peak = std::max(peak, peak_bytes(0));
      if (s > 0 && t2 - t0 < best) {
        best = t2 - t0;
        best_ref = t1 - t0;
      }
    }
    const double tflops = executed / best / 1e12;
    std::printf("RESULT shape=%s pairs=%lld seq=%lld step_s=%.3f ref_fwd_s=%.3f tokens_per_s=%.0f peak_gpu_gb=%.2f "
                "exec_tflops=%.1f share_of_matmul_peak=%.3f\n",
                shape.c_str(), (long long)P, (long long)T, best, best_ref, tok / best, peak < 0 ? -1.0 : peak / 1e9, tflops,
                tflops / peak_tf);
    return 0;
  });
}
