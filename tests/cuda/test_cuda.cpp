// GPU tests (ctest label cuda): what only a CUDA device can show.
//   Nf4Cuda      the NF4 CUDA dequantization kernel is bit-identical to the CPU one
//                (odd sizes, partial and all-zero blocks, double quantization, 3 output dtypes)
//   CudaRng      the CUDA generator state a checkpoint saves continues the dropout stream
//   CudaModel    a tiny QLoRA Llama on CUDA: logits and LoRA gradients match the CPU's (fp32),
//                gradient checkpointing (with LoRA dropout) gives the same gradients as without
// Without a CUDA device (or with a CPU-only libtorch) it prints NOT RUN and exits 77, which
// ctest reports as not run (SKIP_RETURN_CODE), never as passed. Compiles against every
// libtorch (no CUDA headers: devices are reached through torch::Device).
#include <gtest/gtest.h>
#include <unistd.h>

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include <torch/cuda.h>
#include <torch/torch.h>

#include "runtime/torch_cuda.h"
#include "core/dpo.h"
#include "core/linear.h"
#include "core/llama.h"
#include "core/lora.h"
#include "core/nf4.h"
#include "launch/rng_state.h"
#include "tests/fp_bounds.h"
#include "tests/tiny_llama.h"

namespace {

const torch::Device kCuda(torch::kCUDA, 0);

// Bitwise equality (also tells -0.0 from 0.0): the tensors as integers of the same width.
bool same_bits(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  const auto as_int = a.element_size() == 4 ? torch::kInt32 : torch::kInt16;
  return torch::equal(a.contiguous().view(as_int), b.contiguous().view(as_int));
}

double max_rel_diff(const torch::Tensor& a, const torch::Tensor& b) {
  auto x = a.to(torch::kCPU, torch::kFloat64), y = b.to(torch::kCPU, torch::kFloat64);
  const double scale = std::max(1e-30, y.abs().max().item<double>());
  return (x - y).abs().max().item<double>() / scale;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r;
  for (auto d : s) r += (r.empty() ? "" : "x") + std::to_string(d);
  return r;
}

TEST(Nf4Cuda, DequantizeBitwiseEqualsCpu) {
  struct Case {
    std::vector<int64_t> shape;
    int64_t blocksize;
    bool double_quant;
    bool zero_block;  // first block all zeros (absmax 0)
  };
  const std::vector<Case> cases = {
      {{1}, 64, false, false},        {{3, 5}, 64, false, false},      {{64}, 64, true, false},
      {{65}, 64, true, false},        {{127, 3}, 64, true, true},      {{4096, 11}, 64, false, true},
      {{4096, 11}, 64, true, false},  {{333, 257}, 128, true, true},   {{11008, 7}, 64, true, false},
      {{17, 33}, 32, false, false},   {{513, 1031}, 256, true, false}, {{4096, 4096}, 64, true, false},
  };
  torch::manual_seed(123);
  int64_t checked = 0;
  for (const Case& c : cases) {
    torch::Tensor w = torch::randn(c.shape) * 0.02;
    if (c.zero_block) w.view(-1).slice(0, 0, std::min<int64_t>(w.numel(), c.blocksize)).zero_();
    const dpo::Nf4Tensor t = dpo::nf4_quantize(w, c.double_quant, c.blocksize);
    const dpo::Nf4Tensor tc = dpo::nf4_to(t, kCuda);
    ASSERT_TRUE(tc.packed.is_cuda());
    for (auto out : {torch::kFloat32, torch::kBFloat16, torch::kFloat16}) {
      torch::Tensor cpu = dpo::nf4_dequantize(t, out);
      torch::Tensor gpu = dpo::nf4_dequantize(tc, out);
      ASSERT_TRUE(gpu.is_cuda());
      EXPECT_TRUE(same_bits(cpu, gpu.cpu()))
          << "shape " << shape_str(c.shape) << " blocksize " << c.blocksize << " double_quant " << c.double_quant
          << " out " << c10::toString(out) << ": max |diff| "
          << (cpu.to(torch::kFloat64) - gpu.cpu().to(torch::kFloat64)).abs().max().item<double>();
      checked += cpu.numel();
    }
  }
  std::printf("Nf4Cuda: %lld values in %zu shapes x 3 dtypes bit-identical to the CPU\n", (long long)checked, cases.size());
}

TEST(CudaRng, CheckpointedStateContinuesTheDropoutStream) {
  const dpo::RankGenerators g = dpo::default_rank_generators(kCuda);
  ASSERT_EQ(g.device_type, "cuda");
  ASSERT_TRUE(g.device.defined());
  torch::manual_seed(5);
  const auto x = torch::ones({4096}, torch::TensorOptions().device(kCuda));
  (void)torch::dropout(x, 0.5, true);  // the stream has moved on from the seed
  const dpo::RankRngState s = dpo::rng_capture(g);
  const auto cpu_before = torch::rand({4});  // CPU draws move only the CPU generator
  const auto a = torch::dropout(x, 0.5, true).cpu();
  const auto b = torch::dropout(x, 0.5, true).cpu();
  EXPECT_FALSE(torch::equal(a, b)) << "two dropout masks in a row are equal: the generator does not advance";

  // Through the checkpoint file, as the trainer does.
  const auto dir = std::filesystem::temp_directory_path() / ("dpo_test_cuda_rng." + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "rng_state.safetensors").string();
  dpo::rng_save(path, "cuda", {s});
  torch::manual_seed(999);  // scramble both generators
  dpo::rng_restore(g, dpo::rng_load_rank(path, 0, "cuda"));
  EXPECT_TRUE(torch::equal(torch::dropout(x, 0.5, true).cpu(), a));
  EXPECT_TRUE(torch::equal(torch::dropout(x, 0.5, true).cpu(), b));
  // The CPU generator came back too (it was captured before cpu_before was drawn).
  EXPECT_TRUE(torch::equal(torch::rand({4}), cpu_before));
  EXPECT_THROW(dpo::rng_load_rank(path, 0, "cpu"), std::runtime_error);
  std::filesystem::remove_all(dir);
}

// A tiny QLoRA Llama (NF4 base, LoRA on every projection with non-zero B) on `device`.
struct TinyModel {
  dpo::LlamaModel model{nullptr};
  std::vector<std::pair<std::string, dpo::FrozenLinear>> named;
};
TinyModel tiny_model(torch::Device device, double dropout) {
  dpo::LlamaConfig cfg;
  cfg.hidden_size = 64;
  cfg.intermediate_size = 128;
  cfg.num_hidden_layers = 2;
  cfg.num_attention_heads = 4;
  cfg.num_key_value_heads = 2;
  cfg.vocab_size = 256;
  cfg.max_position_embeddings = 128;
  cfg.pad_token_id = 0;
  dpo::QuantOptions q;
  q.load_in_4bit = true;
  q.double_quant = true;
  q.compute_dtype = torch::kFloat32;
  TinyModel m;
  m.model = dpo::llama_init_random(cfg, 1, q);
  m.named = m.model->named_projections();
  dpo::LoraConfig lc;
  lc.r = 4;
  lc.alpha = 8;
  lc.dropout = dropout;
  lc.target_modules = {"all-linear"};
  dpo::lora_attach(m.named, lc, 3);
  {
    torch::NoGradGuard ng;
    auto gen = at::detail::createCPUGenerator(17);
    for (auto& [name, p] : m.named)
      if (p->has_lora()) p->lora_B().copy_(torch::empty(p->lora_B().sizes()).normal_(0.0, 0.02, gen));
  }
  m.model->to(device);
  m.model->train();
  return m;
}

struct Batch {
  torch::Tensor ids, mask, lmask;  // (R, T)
};
Batch tiny_batch(torch::Device device) {
  torch::manual_seed(2);
  Batch b;
  b.ids = torch::randint(3, 256, {4, 24}, torch::kInt64);
  b.mask = torch::ones({4, 24}, torch::kInt64);
  b.mask.slice(1, 20, 24)[3].zero_();  // one right-padded row
  b.lmask = torch::zeros({4, 24}, torch::kInt64);
  b.lmask.slice(1, 12, 24).fill_(1);
  b.lmask.slice(1, 20, 24)[3].zero_();
  return {b.ids.to(device), b.mask.to(device), b.lmask.to(device)};
}

// LoRA gradients of sum(sequence log-probs) (and the log-probs), dropout drawn after `seed`.
std::pair<torch::Tensor, std::vector<torch::Tensor>> logps_and_grads(TinyModel& m, const Batch& b, uint64_t seed) {
  for (auto& p : m.model->parameters())
    if (p.grad().defined()) p.mutable_grad() = torch::Tensor();
  torch::manual_seed(seed);
  auto logits = m.model->forward(b.ids, b.mask);
  auto lp = dpo::sequence_logps(logits, b.ids, b.lmask).logps;
  lp.sum().backward();
  std::vector<torch::Tensor> g;
  for (auto& [name, t] : dpo::lora_parameters(m.named)) g.push_back(t.grad().detach().cpu().clone());
  return {lp.detach().cpu(), g};
}

TEST(CudaModel, TinyQloraMatchesCpuInFp32) {
  TinyModel cpu = tiny_model(torch::kCPU, 0.0), gpu = tiny_model(kCuda, 0.0);
  auto [lp_c, g_c] = logps_and_grads(cpu, tiny_batch(torch::kCPU), 7);
  auto [lp_g, g_g] = logps_and_grads(gpu, tiny_batch(kCuda), 7);
  const double d_lp = max_rel_diff(lp_g, lp_c);
  double d_g = 0;
  ASSERT_EQ(g_c.size(), g_g.size());
  for (size_t i = 0; i < g_c.size(); ++i) d_g = std::max(d_g, max_rel_diff(g_g[i], g_c[i]));
  std::printf("CudaModel fp32: log-probs max rel diff %.3g, LoRA grads %.3g (CUDA vs CPU)\n", d_lp, d_g);
  // Two fp32 evaluations of the model (cuBLAS / CUDA kernels and the CPU's; TF32 is off):
  // logits within llama_rel_tolerance of the largest |logit| (tests/tiny_llama.h), each
  // row's log-prob within twice that per answer token (<= 12 here), relative to the largest
  // |log-prob|; the gradients within the tolerance for gradients.
  const dpo::LlamaConfig& cfg = cpu.model->config();
  double logit_scale = 0;
  {
    torch::NoGradGuard ng;
    const Batch b = tiny_batch(torch::kCPU);
    logit_scale = cpu.model->forward(b.ids, b.mask).abs().max().item<double>();
  }
  const double tau = dpo::testutil::llama_rel_tolerance(cfg, 24);
  EXPECT_LE(d_lp, 2 * 12 * tau * logit_scale / lp_c.abs().max().item<double>());
  EXPECT_LE(d_g, dpo::testutil::llama_rel_tolerance(cfg, 24, /*grads=*/true));
}

TEST(CudaModel, GradientCheckpointingGivesTheSameGradients) {
  TinyModel m = tiny_model(kCuda, 0.1);  // dropout on: checkpointing must replay the CUDA masks
  const Batch b = tiny_batch(kCuda);
  m.model->set_gradient_checkpointing(false);
  auto [lp0, g0] = logps_and_grads(m, b, 11);
  m.model->set_gradient_checkpointing(true);
  auto [lp1, g1] = logps_and_grads(m, b, 11);
  auto [lp2, g2] = logps_and_grads(m, b, 12);  // another dropout draw: must differ
  double d = 0, d_other = 0;
  for (size_t i = 0; i < g0.size(); ++i) {
    d = std::max(d, max_rel_diff(g1[i], g0[i]));
    d_other = std::max(d_other, max_rel_diff(g2[i], g0[i]));
  }
  std::printf("CudaModel checkpointing: LoRA grads max rel diff %.3g (other dropout draw: %.3g)\n", d, d_other);
  // CUDA promises no bit-exact replay (atomics in backward, kernels chosen per call): the
  // log-probs within the two-evaluation tolerance (as TinyQloraMatchesCpuInFp32), the
  // gradients within the tolerance for gradients (tests/tiny_llama.h).
  double logit_scale = 0;
  {
    torch::NoGradGuard ng;
    logit_scale = m.model->forward(b.ids, b.mask).abs().max().item<double>();
  }
  const double tau = dpo::testutil::llama_rel_tolerance(m.model->config(), 24);
  EXPECT_LE(max_rel_diff(lp1, lp0), 2 * 12 * tau * logit_scale / lp0.abs().max().item<double>())
      << "log-probs differ with checkpointing";
  EXPECT_LE(d, dpo::testutil::llama_rel_tolerance(m.model->config(), 24, /*grads=*/true));
  EXPECT_GT(d_other, 1e-3) << "dropout had no effect: the test would pass without the RNG replay";
}

}  // namespace

int main(int argc, char** argv) {
  if (!dpo::torch_cuda_available()) {
    std::printf("test_cuda: NOT RUN: no CUDA device visible to libtorch (CPU-only libtorch or no GPU)\n");
    return 77;
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
