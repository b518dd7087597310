// Memory benchmark of one QLoRA DPO micro-batch on a Llama-2-7B-shaped (or, with
// --preset llama3-8b, Llama-3-8B-shaped: V 128256, GQA) model: the model is generated
// directly in NF4 (llama_init_random, one tensor at a time), LoRA r=8 on q_proj,v_proj,
// gradient checkpointing on, and one pair (prompt + two answers; rows of the seed's
// max_length 1024 by default) goes through the trainer's path (launch/dpo_step: one
// shared-prompt row, chunked attention and log-probs, tensor cache) or, with
// --path trl, two padded rows with full logits and dense attention:
//   1. the reference forward (adapters off, no grad) -> reference logps,
//   2. the policy forward + dpo_batch_loss + backward.
// After each phase it prints the phase time, the current RSS, the peak RSS of the
// phase (VmHWM, reset between phases through /proc/self/clear_refs) and the
// process peak (getrusage ru_maxrss). docs/benchmarks.md has results.
//
// Usage: bench_memory [--preset llama2-7b|llama3-8b] [--layers 32] [--threads 0] [--prompt 512] [--answer 512]
//                     [--path optimized|trl] [--double_quant] [--torch_dtype float16|bfloat16|float32]
//                     [--tiled_mlp_tokens N]
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include <torch/autograd.h>
#include <torch/types.h>

#include "core/dpo.h"
#include "core/linear.h"
#include "core/linear4bit.h"
#include "core/llama.h"
#include "core/lora.h"
#include "data/collate.h"
#include "launch/dpo_step.h"
#include "runtime/tensor_cache.h"
#include "launch/cli.h"
#include "runtime/threads.h"

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// A field of /proc/self/status in kB ("VmHWM", "VmRSS"); -1 when absent.
int64_t proc_status_kb(const std::string& field) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.compare(0, field.size() + 1, field + ":") == 0) return std::stoll(line.substr(field.size() + 1));
  return -1;
}

// Largest VmHWM seen before the last reset_hwm(), in kB.
int64_t g_peak_kb = 0;

// getrusage ru_maxrss (kB on Linux). Linux derives it from the same high-water mark
// as VmHWM, so /proc/self/clear_refs resets it too: the process peak is the max of
// this and the phase peaks seen before each reset (g_peak_kb).
int64_t maxrss_kb() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return std::max<int64_t>(u.ru_maxrss, g_peak_kb);
}

// Resets VmHWM to the current RSS (Linux >= 4.0), so the next VmHWM is one phase's peak.
bool reset_hwm() {
  g_peak_kb = std::max<int64_t>({g_peak_kb, proc_status_kb("VmHWM"), maxrss_kb()});
  std::ofstream f("/proc/self/clear_refs");
  if (!f) return false;
  f << "5";
  f.flush();
  return static_cast<bool>(f);
}

// Load average of the machine: the timings depend on it.
std::string loadavg() {
  double l[3] = {0, 0, 0};
  if (getloadavg(l, 3) != 3) return "?";
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.2f %.2f %.2f", l[0], l[1], l[2]);
  return buf;
}

double gb(double bytes) { return bytes / 1e9; }
double kb_gb(int64_t kb) { return static_cast<double>(kb) * 1024.0 / 1e9; }

void report(const char* phase, double seconds) {
  std::printf("%-34s %9.2f s   RSS %6.2f GB   phase peak VmHWM %6.2f GB   process peak %6.2f GB   loadavg %s\n",
              phase, seconds, kb_gb(proc_status_kb("VmRSS")), kb_gb(proc_status_kb("VmHWM")), kb_gb(maxrss_kb()),
              loadavg().c_str());
  std::printf("  of the RSS: anonymous %.2f GB, file-backed %.2f GB (mapped checkpoint pages)\n",
              kb_gb(proc_status_kb("RssAnon")), kb_gb(proc_status_kb("RssFile")));
  if (dpo::tensor_cache_installed()) {
    // Large tensors (>= 1 MiB) through the cache: live now, their peak so far, cached (free, mapped).
    const dpo::TensorCacheStats st = dpo::tensor_cache_stats();
    std::printf("  tensor cache: live %.2f GB, peak live %.2f GB, cached %.2f GB\n", gb(st.live_bytes),
                gb(st.peak_live_bytes), gb(st.cached_bytes));
  }
  std::fflush(stdout);
  reset_hwm();
}

}  // namespace

int main(int argc, char** argv) {
  return dpo::run_main("bench_memory", [&]() -> int {
    dpo::Cli cli("bench_memory", "peak memory of one QLoRA DPO micro-batch on a Llama-2-7B-shaped NF4 model");
    cli.add_string("preset", "llama2-7b", "llama2-7b (V 32000) | llama3-8b (V 128256, F 14336, 8 kv heads)");
    cli.add_int("layers", 32, "decoder layers (32 = the full model; fewer for a quick run)");
    cli.add_int("prompt", 512, "prompt tokens of the pair (the seed's max_prompt_length)");
    cli.add_int("answer", 512, "tokens of each answer (prompt + answer = the seed's max_length 1024)");
    cli.add_string("path", "optimized", "optimized (packed, shared prompt, chunked attention and log-probs, tensor cache) | trl (two padded rows, full logits, dense attention)");
    cli.add_int("threads", 0, "compute threads (0 = all cores)");
    cli.add_bool("double_quant", true, "double-quantize the NF4 absmax (as configs/llama2-7b-*.ini)");
    cli.add_bool("checkpointing", true, "gradient checkpointing of the decoder layers");
    cli.add_int("tiled_mlp_tokens", 0, "the MLP in tiles of N tokens, recomputed in backward (dpo_dist --tiled_mlp_tokens; 0 = off)");
    cli.add_int("seed", 0, "seed of the weights and tokens");
    cli.add_string("torch_dtype", "",
                   "the checkpoint's dtype (config.json torch_dtype; the embeddings and lm_head keep it under fp32 "
                   "compute): float16 | bfloat16 | float32; default: the preset's (Llama-2-7b-hf float16, Llama-3-8B bfloat16)");
    cli.add_string("checkpoint", "",
                   "load the model with llama_load from this Hugging Face directory, as dpo_dist does (file pages "
                   "counted); when it has no config.json the preset's random model is first written there "
                   "(llama_save_hf in --torch_dtype, 5 GB shards: ~16 GB for llama3-8b) and the peak is reset after "
                   "writing. Empty: llama_init_random in memory");
    if (!cli.parse(argc, argv)) return 0;
    reset_hwm();

    const int threads = dpo::configure_threads(static_cast<int>(cli.get_int("threads")), 1);
    dpo::LlamaConfig cfg;
    const std::string preset = cli.get_string("preset"), path = cli.get_string("path");
    if (preset != "llama2-7b" && preset != "llama3-8b") throw dpo::CliError("--preset: llama2-7b or llama3-8b");
    if (path != "optimized" && path != "trl") throw dpo::CliError("--path: optimized or trl");
    const bool llama3 = preset == "llama3-8b";
    const double target_gb = llama3 ? 7.0 : 6.0;
    cfg.hidden_size = 4096;
    cfg.intermediate_size = llama3 ? 14336 : 11008;
    cfg.num_hidden_layers = cli.get_int("layers");
    cfg.num_attention_heads = 32;
    cfg.num_key_value_heads = llama3 ? 8 : 32;
    cfg.vocab_size = llama3 ? 128256 : 32000;
    cfg.rope_theta = llama3 ? 500000.0 : 10000.0;
    cfg.max_position_embeddings = 8192;
    cfg.rms_norm_eps = 1e-5;
    cfg.pad_token_id = 0;
    const std::string tdt = cli.get_string("torch_dtype").empty() ? (llama3 ? "bfloat16" : "float16") : cli.get_string("torch_dtype");
    if (tdt == "float16") cfg.torch_dtype = torch::kFloat16;
    else if (tdt == "bfloat16") cfg.torch_dtype = torch::kBFloat16;
    else if (tdt == "float32") cfg.torch_dtype = torch::kFloat32;
    else throw dpo::CliError("--torch_dtype: float16, bfloat16 or float32");
    const int64_t prompt_len = cli.get_int("prompt"), answer = cli.get_int("answer");
    if (prompt_len <= 0 || answer <= 0) throw dpo::CliError("--prompt and --answer must be positive");
    if (path == "optimized") {
      dpo::limit_heap_retention();
      dpo::install_tensor_cache();
    }

    const int64_t C = cfg.hidden_size, F = cfg.intermediate_size, L = cfg.num_hidden_layers, V = cfg.vocab_size;
    const int64_t KD = cfg.num_key_value_heads * (C / cfg.num_attention_heads);
    const int64_t proj_params = L * (2 * C * C + 2 * C * KD + 3 * C * F);
    const int64_t table_params = 2 * V * C;  // embeddings + lm_head (untied)
    std::printf("bench_memory: %s shape, L=%lld C=%lld F=%lld H=%lld K=%lld V=%lld, one pair: prompt %lld + answers 2 x %lld "
                "tokens, %s path, threads %s\n",
                preset.c_str(), (long long)L, (long long)C, (long long)F, (long long)cfg.num_attention_heads,
                (long long)cfg.num_key_value_heads, (long long)V, (long long)prompt_len, (long long)answer, path.c_str(),
                dpo::describe_threads().c_str());
    std::printf("model: %.3f B parameters; the whole model in fp32 would be %.2f GB\n",
                (proj_params + table_params + (2 * L + 1) * C) / 1e9, gb(4.0 * (proj_params + table_params)));
    std::printf("start                              RSS %6.2f GB\n", kb_gb(proc_status_kb("VmRSS")));

    // ---- 1. build --------------------------------------------------------
    double t0 = now_s();
    dpo::QuantOptions q;
    q.load_in_4bit = true;
    q.double_quant = cli.get_bool("double_quant");
    const std::string ckpt_dir = cli.get_string("checkpoint");
    dpo::LlamaModel model{nullptr};
    if (ckpt_dir.empty()) {
      model = dpo::llama_init_random(cfg, static_cast<uint64_t>(cli.get_int("seed")), q);
    } else {
      const std::filesystem::path cfg_path = std::filesystem::path(ckpt_dir) / "config.json";
      if (std::filesystem::exists(cfg_path)) {
        const dpo::LlamaConfig have = dpo::llama_config_load(cfg_path.string());
        if (have.num_hidden_layers != cfg.num_hidden_layers || have.vocab_size != cfg.vocab_size ||
            have.intermediate_size != cfg.intermediate_size)
          throw dpo::CliError("--checkpoint " + ckpt_dir + " holds another shape than --preset/--layers; remove it to rewrite");
      } else {
        {
          dpo::LlamaModel random = dpo::llama_init_random(cfg, static_cast<uint64_t>(cli.get_int("seed")), q);
          dpo::llama_save_hf(random, ckpt_dir, cfg.torch_dtype, int64_t{5'000'000'000});
        }
        std::printf("wrote the random model to %s in %.1f s (not part of the peaks below)\n", ckpt_dir.c_str(),
                    now_s() - t0);
        if (dpo::tensor_cache_installed()) dpo::tensor_cache_release();  // the writer's freed blocks
        reset_hwm();
        g_peak_kb = 0;  // the writer's peak is not the trainer's
        t0 = now_s();
      }
      model = dpo::llama_load(ckpt_dir, q);
    }
    const double t_init = now_s() - t0;
    auto named = model->named_projections();
    dpo::LoraConfig lcfg;
    lcfg.r = 8;
    lcfg.alpha = 16;
    lcfg.target_modules = {"q_proj", "v_proj"};
    const int64_t adapted = dpo::lora_attach(named, lcfg, 1);
    model->set_gradient_checkpointing(cli.get_bool("checkpointing"));
    model->set_mlp_tile_tokens(cli.get_int("tiled_mlp_tokens"));
    model->train();
    int64_t nf4_bytes = 0, lora_params = 0;
    for (auto& [name, p] : named) nf4_bytes += p->nf4_weight().nbytes();
    for (auto& [key, t] : dpo::lora_parameters(named)) lora_params += t.numel();
    int64_t table_bytes = 0;
    for (auto& t : model->parameters())
      if (!t.requires_grad()) table_bytes += t.numel() * static_cast<int64_t>(t.element_size());
    std::printf("NF4 projection weights (sum of Nf4Tensor::nbytes): %.3f GB (%.3f bits/param)\n", gb(nf4_bytes),
                8.0 * nf4_bytes / proj_params);
    std::printf("embeddings + lm_head (%s) + norms (fp32), frozen: %.3f GB\n",
                c10::toString(model->model->embed_tokens->weight.scalar_type()), gb(table_bytes));
    std::printf("LoRA: %lld adapted projections, %lld trainable parameters (%.1f MB fp32)\n", (long long)adapted,
                (long long)lora_params, lora_params * 4 / 1e6);
    report(ckpt_dir.empty() ? "build (llama_init_random + LoRA)" : "build (llama_load + LoRA)", now_s() - t0);
    std::printf("  of which %s: %.2f s\n", ckpt_dir.empty() ? "llama_init_random" : "llama_load", t_init);

    torch::manual_seed(static_cast<uint64_t>(cli.get_int("seed")) + 1);
    dpo::PreferenceExample ex;
    auto draw = [&](int64_t n) {
      auto t = torch::randint(3, V, {n}, torch::kInt64);
      return std::vector<int32_t>(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + n);
    };
    ex.prompt = draw(prompt_len);
    ex.prompt[0] = 1;
    ex.chosen = draw(answer);
    ex.rejected = draw(answer);
    const std::vector<dpo::PreferenceExample> batch{ex};
    dpo::DpoOptions dopts;
    const bool trl = path == "trl";
    model->set_attention_kernel(trl ? dpo::AttentionKernel::kDense : dpo::AttentionKernel::kChunked);
    dpo::PreferenceBatch pb = dpo::collate_pairs(batch, 0);
    dpo::ModelBatch mb = dpo::model_batch(dpo::collate_packed(batch, 0, true, true), torch::kCPU);

    // ---- 2. reference forward ---------------------------------------------
    t0 = now_s();
    // The trainer's reference pass (launch/dpo_step.h: adapters off by ReferenceModeGuard).
    torch::Tensor ref = trl ? dpo::reference_logps(model, named, pb.input_ids, pb.attention_mask, pb.loss_mask)
                            : dpo::reference_logps(model, named, mb, true);
    report("reference forward (no grad)", now_s() - t0);

    // ---- 3. policy forward + loss + backward --------------------------------
    t0 = now_s();
    dpo::DpoStepLoss l = trl ? dpo::dpo_batch_loss(model->forward(pb.input_ids, pb.attention_mask), pb.input_ids,
                                                   pb.loss_mask, ref, dopts)
                             : dpo::dpo_batch_loss(dpo::model_answer_logps(model, mb, true), ref, dopts);
    const double t_fwd = now_s() - t0;
    std::printf("  policy forward + loss: %.2f s (RSS %.2f GB, phase peak so far %.2f GB)\n", t_fwd,
                kb_gb(proc_status_kb("VmRSS")), kb_gb(proc_status_kb("VmHWM")));
    const double t1 = now_s();
    l.loss.backward();
    const double t_bwd = now_s() - t1;
    std::printf("  backward: %.2f s\n", t_bwd);
    report("policy forward + DPO loss + backward", now_s() - t0);

    double gnorm = 0;
    for (auto& [key, t] : dpo::lora_parameters(named))
      if (t.grad().defined()) gnorm += t.grad().pow(2).sum().item<double>();
    std::printf("loss %.6f, LoRA grad norm %.3e (lora_B starts at 0, so only lora_B has a gradient)\n",
                l.loss.item<double>(), std::sqrt(gnorm));
    const double peak_gb = std::max(kb_gb(maxrss_kb()), kb_gb(g_peak_kb));
    std::printf("PEAK RSS (max of ru_maxrss and the phase VmHWMs) %.2f GB, threads %d; %s target <= %.0f GB: %s\n", peak_gb,
                threads, preset.c_str(), target_gb, peak_gb <= target_gb ? "met" : "EXCEEDED");
    return 0;
  });
}
