// DPO training-step throughput, in one process: the TRL-equivalent path (separate
// padded [prompt; chosen] / [prompt; rejected] rows, full (rows, T, V) logits, dense
// (B, H, T, T) attention, reference forward every step, the plain mmap-per-tensor heap)
// against each technique of the optimized path alone and all together (docs/benchmarks.md):
//   cache   - the tensor cache (launch/tensor_cache.h) instead of a fresh mmap per tensor
//   logps   - chunked lm_head + log-softmax over scored positions only (core/logps.h)
//   attn    - chunked attention over visible keys (core/attention.h)
//   prefix  - one [prompt; chosen; rejected] sequence per pair (prefix sharing)
//   packing - all pairs of the micro-batch in one row (padding-free)
//   ref     - reference log-probs precomputed (--precompute_ref_log_probs): no reference forward
// on a stack-exchange-like length mix (prompt 60-200 words, answers 20-160 words, ~1.3
// tokens per word, max_length 1024 / max_prompt_length 512), random token ids.
//
// tokens/s counts real tokens as TRL does (the prompt once in each of the two rows);
// executed FLOPs are the matmuls each variant really runs (launch/dpo_step.h); the fp32
// matmul peak is measured in the same process with the same threads. Every variant's
// answer log-probs are compared with the TRL path's (max relative difference).
//
// Usage: bench_step [--layers 8] [--hidden_size 512] [--pairs 4] [--steps 2] [--threads 0]
//                   [--variants trl,cache,logps,attn,prefix,packing,all,all+ref]
#include <malloc.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <torch/autograd.h>
#include <torch/types.h>

#include "core/dpo.h"
#include "core/linear.h"
#include "core/llama.h"
#include "core/lora.h"
#include "data/collate.h"
#include "launch/cli.h"
#include "launch/dpo_step.h"
#include "runtime/tensor_cache.h"
#include "runtime/threads.h"

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string loadavg() {
  double l[3] = {0, 0, 0};
  if (getloadavg(l, 3) != 3) return "?";
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.2f %.2f %.2f", l[0], l[1], l[2]);
  return buf;
}

int64_t proc_status_kb(const std::string& field) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind(field + ":", 0) == 0) return std::atoll(line.c_str() + field.size() + 1);
  return -1;
}

void reset_hwm() {
  std::ofstream f("/proc/self/clear_refs");
  if (f) f << "5";
}

double cpu_seconds(bool system) {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  const timeval& t = system ? u.ru_stime : u.ru_utime;
  return t.tv_sec + t.tv_usec * 1e-6;
}

struct Variant {
  std::string name;
  bool trl = false;  // the TRL-equivalent code path (collate_pairs + full logits + dpo_batch_loss)
  bool cache = false, dense_attention = true, precomputed_ref = false;
  dpo::DpoStepOptions opts{false, false, false};
};

Variant variant_named(const std::string& n) {
  Variant v;
  v.name = n;
  if (n == "trl") {
    v.trl = true;
  } else if (n == "cache") {
    v.trl = true;
    v.cache = true;
  } else if (n == "attn") {
    v.trl = true;
    v.dense_attention = false;
  } else if (n == "logps") {
    v.opts.chunked_logps = true;
  } else if (n == "prefix") {
    v.opts.share_prompt = true;
  } else if (n == "packing") {
    v.opts.padding_free = true;
  } else if (n == "all" || n == "all+ref") {
    v.cache = true;
    v.dense_attention = false;
    v.opts = dpo::DpoStepOptions{};
    v.precomputed_ref = n == "all+ref";
  } else {
    throw dpo::CliError("--variants: unknown variant '" + n +
                        "' (trl, cache, logps, attn, prefix, packing, all, all+ref)");
  }
  return v;
}

// Stack-exchange-like pairs: "Question: <q>\n\nAnswer: " prompts with bos, answers + eos.
std::vector<dpo::PreferenceExample> make_pairs(std::mt19937_64& rng, int64_t n, int64_t V, double tpw,
                                               int64_t max_length, int64_t max_prompt) {
  std::uniform_int_distribution<int64_t> pw(60, 200), aw(20, 160), tok(3, V - 1);
  std::vector<dpo::PreferenceExample> out;
  for (int64_t i = 0; i < n; ++i) {
    dpo::PreferenceExample e;
    e.index = i;
    auto fill = [&](std::vector<int32_t>& v, int64_t len) {
      for (int64_t t = 0; t < len; ++t) v.push_back(static_cast<int32_t>(tok(rng)));
    };
    e.prompt.push_back(1);
    fill(e.prompt, std::min<int64_t>(max_prompt - 1, std::llround(pw(rng) * tpw) + 8));
    const int64_t room = max_length - static_cast<int64_t>(e.prompt.size());
    fill(e.chosen, std::min<int64_t>(room, std::llround(aw(rng) * tpw) + 1));
    fill(e.rejected, std::min<int64_t>(room, std::llround(aw(rng) * tpw) + 1));
    out.push_back(std::move(e));
  }
  return out;
}

struct StepResult {
  double ref_s = 0, fwd_s = 0, bwd_s = 0;
  torch::Tensor logps;  // (2B) policy [chosen; rejected]
  double flops = 0;
  int64_t trl_tokens = 0;
};

}  // namespace

int main(int argc, char** argv) {
  return dpo::run_main("bench_step", [&]() -> int {
    dpo::limit_heap_retention();
    dpo::install_tensor_cache();
    dpo::Cli cli("bench_step", "DPO step tokens/s: the TRL-equivalent path vs each optimization, in one process");
    cli.add_int("layers", 8, "decoder layers");
    cli.add_int("hidden_size", 512, "hidden size C");
    cli.add_int("intermediate_size", 1376, "MLP size F");
    cli.add_int("heads", 8, "attention heads H");
    cli.add_int("kv_heads", 8, "key/value heads K");
    cli.add_int("vocab_size", 32000, "vocabulary V (Llama 2)");
    cli.add_int("pairs", 4, "preference pairs per step");
    cli.add_int("steps", 2, "timed steps per variant (after one warm-up step)");
    cli.add_int("threads", 0, "compute threads (0 = all cores)");
    cli.add_int("max_length", 1024, "max prompt + answer tokens");
    cli.add_int("max_prompt_length", 512, "max prompt tokens");
    cli.add_double("tokens_per_word", 1.3, "tokens per word of the length mix");
    cli.add_list("variants", "trl,cache,logps,attn,prefix,packing,all,all+ref", "variants to run, in this order");
    cli.add_bool("nf4", true, "NF4 base weights (QLoRA); false = dense fp32");
    cli.add_bool("checkpointing", false, "gradient checkpointing of the decoder layers");
    cli.add_int("matmul_n", 2048, "size of the peak-measuring square matmul");
    cli.add_int("seed", 1, "seed of the data and the model");
    if (!cli.parse(argc, argv)) return 0;

    dpo::LlamaConfig cfg;
    cfg.hidden_size = cli.get_int("hidden_size");
    cfg.intermediate_size = cli.get_int("intermediate_size");
    cfg.num_hidden_layers = cli.get_int("layers");
    cfg.num_attention_heads = cli.get_int("heads");
    cfg.num_key_value_heads = cli.get_int("kv_heads");
    cfg.vocab_size = cli.get_int("vocab_size");
    cfg.max_position_embeddings = 4096;
    cfg.pad_token_id = 0;
    // Weights large enough that the hidden states move the log-probs (at 0.02 every token's
    // log-prob is ~ -ln V whatever the path computes, and the logps diff column says nothing).
    cfg.initializer_range = 0.2;
    const int64_t P = cli.get_int("pairs"), steps = cli.get_int("steps");
    if (P <= 0 || steps <= 0) throw dpo::CliError("--pairs and --steps must be positive");
    const bool ckpt = cli.get_bool("checkpointing");
    std::vector<Variant> variants;
    for (const auto& n : cli.get_list("variants")) variants.push_back(variant_named(n));

    const int threads = dpo::configure_threads(static_cast<int>(cli.get_int("threads")), 1);
    dpo::QuantOptions q;
    q.load_in_4bit = cli.get_bool("nf4");
    dpo::LlamaModel model = dpo::llama_init_random(cfg, static_cast<uint64_t>(cli.get_int("seed")), q);
    auto named = model->named_projections();
    dpo::LoraConfig lcfg;
    lcfg.target_modules = {"q_proj", "v_proj"};
    lcfg.dropout = 0.0;  // no random masks: every variant computes the same function (logps diff)
    dpo::lora_attach(named, lcfg, 1);
    {  // non-zero B so that policy and reference differ
      torch::NoGradGuard ng;
      for (auto& p : dpo::lora_parameters(named)) p.second.normal_(0, 0.02);
    }
    model->set_gradient_checkpointing(ckpt);
    model->train();
    const auto lora = dpo::lora_parameters(named);

    std::mt19937_64 rng(static_cast<uint64_t>(cli.get_int("seed")));
    std::vector<std::vector<dpo::PreferenceExample>> batches;
    for (int64_t s = 0; s <= steps; ++s)
      batches.push_back(make_pairs(rng, P, cfg.vocab_size, cli.get_double("tokens_per_word"), cli.get_int("max_length"),
                                   cli.get_int("max_prompt_length")));
    int64_t trl_tokens = 0, longest = 0;
    for (int64_t s = 1; s <= steps; ++s)
      for (const auto& e : batches[s]) {
        trl_tokens += 2 * e.prompt.size() + e.chosen.size() + e.rejected.size();
        longest = std::max<int64_t>(longest, e.prompt.size() + std::max(e.chosen.size(), e.rejected.size()));
      }

    const double peak = dpo::measure_matmul_gflops(cli.get_int("matmul_n"), 5);
    std::printf("bench_step: L=%lld C=%lld F=%lld H=%lld K=%lld V=%lld %s, LoRA r=8 q,v, %lld pairs/step, "
                "checkpointing %s, %d threads\n",
                (long long)cfg.num_hidden_layers, (long long)cfg.hidden_size, (long long)cfg.intermediate_size,
                (long long)cfg.num_attention_heads, (long long)cfg.num_key_value_heads, (long long)cfg.vocab_size,
                q.load_in_4bit ? "NF4" : "fp32", (long long)P, ckpt ? "on" : "off", threads);
    std::printf("data: %lld timed steps, %lld TRL-counted tokens (%.0f per step), longest row %lld; fp32 %lld^3 "
                "matmul peak %.1f GFLOP/s; loadavg %s\n",
                (long long)steps, (long long)trl_tokens, double(trl_tokens) / steps, (long long)longest,
                (long long)cli.get_int("matmul_n"), peak, loadavg().c_str());
    std::printf("%-8s %8s %7s %7s %7s %9s %7s %9s %6s %5s %8s %10s  %s\n", "variant", "step s", "ref s", "fwd s", "bwd s",
                "tokens/s", "x trl", "exec GF/s", "%peak", "sys%", "peak GB", "logps diff", "loadavg");
    std::fflush(stdout);

    dpo::DpoOptions dopts;
    std::vector<torch::Tensor> ref_cache(batches.size());  // reference logps per batch, for all+ref
    torch::Tensor trl_logps;
    double trl_rate = 0;
    for (const Variant& v : variants) {
      dpo::tensor_cache_set_enabled(v.cache);
      dpo::tensor_cache_release();
      malloc_trim(0);
      model->set_attention_kernel(v.dense_attention ? dpo::AttentionKernel::kDense : dpo::AttentionKernel::kChunked);
      if (v.precomputed_ref) {  // untimed: what --precompute_ref_log_probs stores in the file
        for (size_t s = 0; s < batches.size(); ++s) {
          dpo::PackedPairs p = dpo::collate_packed(batches[s], 0, true, true);
          ref_cache[s] = dpo::reference_logps(model, named, dpo::model_batch(p, torch::kCPU), true);
          for (int64_t i = 0; i < P; ++i) {
            batches[s][i].ref_chosen = ref_cache[s][i].item<double>();
            batches[s][i].ref_rejected = ref_cache[s][P + i].item<double>();
          }
        }
      }
      StepResult total;
      torch::Tensor first_logps;
      double wall = 0, user0 = 0, sys0 = 0;
      int64_t peak_kb = 0;
      for (int64_t s = 0; s <= steps; ++s) {
        if (s == 1) {  // step 0 is the warm-up
          reset_hwm();
          user0 = cpu_seconds(false);
          sys0 = cpu_seconds(true);
        }
        for (auto& p : lora) p.second.mutable_grad() = torch::Tensor();
        std::vector<dpo::PreferenceExample> ex = batches[s];
        if (!v.precomputed_ref)
          for (auto& e : ex) e.ref_chosen = e.ref_rejected = std::nan("");
        StepResult r;
        const double t0 = now_s();
        dpo::DpoStepLoss l;
        if (v.trl) {
          dpo::PreferenceBatch b = dpo::collate_pairs(ex, 0);
          // The trainer's padded path (launch/dpo_step.h dpo_padded_loss), timed in its parts.
          torch::Tensor ref = dpo::reference_logps(model, named, b.input_ids, b.attention_mask, b.loss_mask);
          const double t1 = now_s();
          l = dpo::dpo_batch_loss(model->forward(b.input_ids, b.attention_mask), b.input_ids, b.loss_mask, ref, dopts);
          r.ref_s = t1 - t0;
          r.fwd_s = now_s() - t1;
          dpo::PackedPairs shape = dpo::collate_packed(ex, 0, false, false);
          r.flops = dpo::dpo_step_flops(cfg, shape, v.opts, v.dense_attention, true, ckpt);
        } else {
          dpo::PackedPairs p = dpo::collate_packed(ex, 0, v.opts.share_prompt, v.opts.padding_free);
          dpo::ModelBatch mb = dpo::model_batch(p, torch::kCPU);
          // The trainer's packed path (launch/dpo_step.h dpo_packed_loss), timed in its parts.
          torch::Tensor ref = p.ref_logps;
          if (!ref.defined()) ref = dpo::reference_logps(model, named, mb, v.opts.chunked_logps);
          const double t1 = now_s();
          l = dpo::dpo_batch_loss(dpo::model_answer_logps(model, mb, v.opts.chunked_logps), ref, dopts);
          r.ref_s = t1 - t0;
          r.fwd_s = now_s() - t1;
          r.flops = dpo::dpo_step_flops(cfg, p, v.opts, v.dense_attention, !v.precomputed_ref, ckpt);
        }
        const double t2 = now_s();
        l.loss.backward();
        r.bwd_s = now_s() - t2;
        if (s == 0) continue;
        if (s == 1) first_logps = torch::cat({l.chosen_logps, l.rejected_logps});
        total.ref_s += r.ref_s;
        total.fwd_s += r.fwd_s;
        total.bwd_s += r.bwd_s;
        total.flops += r.flops;
        wall += now_s() - t0;
      }
      peak_kb = proc_status_kb("VmHWM");
      const double cpu_user = cpu_seconds(false) - user0, cpu_sys = cpu_seconds(true) - sys0;
      const double rate = trl_tokens / wall;
      if (v.name == "trl") {
        trl_rate = rate;
        trl_logps = first_logps;
      }
      double diff = NAN;
      if (trl_logps.defined()) {
        const torch::Tensor a = first_logps.to(torch::kFloat64), b = trl_logps.to(torch::kFloat64);
        diff = ((a - b).abs() / b.abs().clamp_min(1e-30)).max().item<double>();
      }
      const double gf = total.flops / wall / 1e9;
      std::printf("%-8s %8.2f %7.2f %7.2f %7.2f %9.0f %7.2f %9.1f %5.0f%% %4.0f%% %8.2f %10.1e  %s\n", v.name.c_str(),
                  wall / steps, total.ref_s / steps, total.fwd_s / steps, total.bwd_s / steps, rate,
                  trl_rate > 0 ? rate / trl_rate : NAN, gf, 100.0 * gf / peak,
                  100.0 * cpu_sys / std::max(1e-9, cpu_user + cpu_sys), peak_kb / 1048576.0, diff, loadavg().c_str());
      std::fflush(stdout);
    }
    auto st = dpo::tensor_cache_stats();
    std::printf("tensor cache: %lld hits, %lld misses (%lld served by resizing a cached block), %lld evictions\n",
                (long long)st.hits, (long long)st.misses, (long long)st.resized, (long long)st.evictions);
    return 0;
  });
}
