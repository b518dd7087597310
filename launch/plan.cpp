#include "launch/plan.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "core/lora.h"
#include "data/preference_h5.h"
#include "data/sampler.h"
#include "launch/run_dir.h"
#include "runtime/torch_cuda.h"

#include <torch/cuda.h>

namespace dpo {

std::string format_bytes(double b) {
  char buf[32];
  if (b >= 1e9) std::snprintf(buf, sizeof buf, "%.2f GB", b / 1e9);
  else if (b >= 1e6) std::snprintf(buf, sizeof buf, "%.1f MB", b / 1e6);
  else std::snprintf(buf, sizeof buf, "%.0f kB", b / 1e3);
  return buf;
}

MemoryEstimate estimate_memory(const LlamaConfig& c, const TrainOptions& o, int64_t R, int64_t T, int64_t s) {
  const double C = static_cast<double>(c.hidden_size), F = static_cast<double>(c.intermediate_size);
  const double H = static_cast<double>(c.num_attention_heads);
  const double K = static_cast<double>(c.num_key_value_heads > 0 ? c.num_key_value_heads : c.num_attention_heads);
  const double D = static_cast<double>(c.head_dim > 0 ? c.head_dim : c.hidden_size / c.num_attention_heads);
  const double L = static_cast<double>(c.num_hidden_layers), V = static_cast<double>(c.vocab_size);
  // per layer (in, out) of the seven projections
  const std::vector<std::pair<std::string, std::pair<double, double>>> proj{
      {"q_proj", {C, H * D}},   {"k_proj", {C, K * D}}, {"v_proj", {C, K * D}}, {"o_proj", {H * D, C}},
      {"gate_proj", {C, F}},    {"up_proj", {C, F}},    {"down_proj", {F, C}}};
  double proj_params = 0;
  for (const auto& p : proj) proj_params += p.second.first * p.second.second;
  proj_params *= L;
  MemoryEstimate m;
  if (o.load_in_4bit) {
    // 4 bits per weight + one absmax per 64 (fp32, or 8-bit + one fp32 per 256 blocks)
    const double blocks = proj_params / 64;
    m.base_weights = proj_params / 2 + (o.bnb_4bit_use_double_quant ? blocks + blocks / 256 * 4 : blocks * 4);
  } else {
    m.base_weights = proj_params * static_cast<double>(s);
  }
  const double embed = V * C * (c.tie_word_embeddings ? 1 : 2);
  // Embeddings and lm_head keep a half-precision checkpoint's dtype under fp32 compute (llama_table_dtype).
  const bool half_tables = s == 4 && (c.torch_dtype == torch::kBFloat16 || c.torch_dtype == torch::kFloat16);
  m.base_weights += embed * (half_tables ? 2.0 : static_cast<double>(s)) + (2 * L + 1) * C * static_cast<double>(s);
  // LoRA: r * (in + out) per targeted projection per layer; fp32 value, grad, m, v
  LoraConfig lc;
  lc.target_modules = o.lora_target_modules;
  const auto targets = lora_expand_targets(lc.target_modules);
  double lora = 0;
  for (const auto& p : proj)
    if (std::find(targets.begin(), targets.end(), p.first) != targets.end())
      lora += static_cast<double>(o.lora_r) * (p.second.first + p.second.second);
  lora *= L;
  m.lora_parameters = static_cast<int64_t>(lora);
  m.adapters = lora * 16;
  // Activations kept for backward: per layer about R*T*(6C + 4F) values (norms, q/k/v,
  // attention output, MLP gate/up/act) plus the (R, H, T, T) attention probabilities;
  // with gradient checkpointing only each layer's input, plus one layer recomputed.
  const double RT = static_cast<double>(R) * static_cast<double>(T);
  const double layer = RT * (6 * C + 4 * F) + static_cast<double>(R) * H * static_cast<double>(T) * static_cast<double>(T);
  m.activations = (o.gradient_checkpointing ? L * RT * C + layer : L * layer) * static_cast<double>(s);
  m.logits = 2 * RT * V * 4;
  return m;
}

std::string dry_run_plan(const TrainOptions& o, int world, int local_size) {
  std::ostringstream out;
  char buf[512];
  const bool dpo = o.stage != "sft";  // every preference stage reads both rows
  const LlamaConfig cfg = llama_config_load(o.model_name_or_path + "/config.json");
  PreferenceReader train(o.train_file);
  const int64_t n = train.size();
  if (n == 0) throw std::runtime_error(o.train_file + " holds no examples");
  ShardSampler sampler(n, o.per_device_train_batch_size, o.gradient_accumulation_steps, world, 0,
                       static_cast<uint64_t>(o.seed));
  const int64_t spe = sampler.steps_per_epoch();
  const int64_t total = o.max_steps > 0 ? o.max_steps : static_cast<int64_t>(std::ceil(o.num_train_epochs * static_cast<double>(spe)));
  const int64_t gb = sampler.global_batch_size();
  // Tokens the trainer counts per example: both rows' real tokens (DPO) or prompt + chosen (SFT).
  double tok_sum = 0;
  int64_t longest = 0;
  for (int64_t i = 0; i < n; ++i) {
    const ExampleLengths l = train.lengths(i);
    tok_sum += dpo ? static_cast<double>(2 * l.prompt + l.chosen + l.rejected) : static_cast<double>(l.prompt + l.chosen);
    longest = std::max(longest, l.prompt + (dpo ? std::max(l.chosen, l.rejected) : l.chosen));
  }
  const double tok_per_example = tok_sum / static_cast<double>(n);

  out << "dpo_dist --dry_run: the plan (nothing loaded, nothing written)\n";
  std::snprintf(buf, sizeof buf, "  processes     %d rank(s), %d on this node%s\n", world, local_size,
                world == 1 ? " (run under mpirun -np N or srun to plan for N ranks)" : "");
  out << buf;
  std::snprintf(buf, sizeof buf, "  stage         %s%s\n", o.stage.c_str(),
                dpo ? (", loss " + o.loss_type + ", beta " + std::to_string(o.beta).substr(0, 6)).c_str() : "");
  out << buf;
  std::snprintf(buf, sizeof buf, "  data          %s: %lld examples, longest padded row %lld tokens (file max_length %lld)\n",
                o.train_file.c_str(), (long long)n, (long long)longest, (long long)train.attrs().max_length);
  out << buf;
  std::snprintf(buf, sizeof buf, "  global batch  %lld = %lld pairs/micro-batch x %lld accumulation x %d ranks\n", (long long)gb,
                (long long)o.per_device_train_batch_size, (long long)o.gradient_accumulation_steps, world);
  out << buf;
  std::snprintf(buf, sizeof buf, "  steps         %lld optimizer steps, %lld per epoch = %.3g epochs%s\n", (long long)total,
                (long long)spe, static_cast<double>(total) / static_cast<double>(spe),
                o.max_steps > 0 ? " (--max_steps)" : " (--num_train_epochs)");
  out << buf;
  std::snprintf(buf, sizeof buf, "  tokens/step   %.0f on average (%.1f per example%s), %.3g over the run\n",
                tok_per_example * static_cast<double>(gb), tok_per_example, dpo ? ": prompt twice + both answers" : "",
                tok_per_example * static_cast<double>(gb) * static_cast<double>(total));
  out << buf;
  // memory
  const bool cuda = o.device == "cuda";
  int64_t s = 4;
  if (o.bnb_4bit_compute_dtype == "bfloat16" || o.bnb_4bit_compute_dtype == "float16" ||
      (o.bnb_4bit_compute_dtype == "auto" && cuda))
    s = 2;
  const int64_t rows = (dpo ? 2 : 1) * o.per_device_train_batch_size;
  const MemoryEstimate m = estimate_memory(cfg, o, rows, longest, s);
  std::snprintf(buf, sizeof buf,
                "  model         %s: %lld layers, hidden %lld, intermediate %lld, %lld heads (%lld kv), vocab %lld; %s, "
                "compute %s on %s\n",
                o.model_name_or_path.c_str(), (long long)cfg.num_hidden_layers, (long long)cfg.hidden_size,
                (long long)cfg.intermediate_size, (long long)cfg.num_attention_heads,
                (long long)(cfg.num_key_value_heads ? cfg.num_key_value_heads : cfg.num_attention_heads),
                (long long)cfg.vocab_size, o.load_in_4bit ? (o.bnb_4bit_use_double_quant ? "NF4 + double quant" : "NF4") : "dense",
                s == 4 ? "fp32" : "16-bit", o.device.c_str());
  out << buf;
  std::snprintf(buf, sizeof buf, "  LoRA          r %lld on %zu module type(s): %lld trainable parameters\n", (long long)o.lora_r,
                lora_expand_targets(o.lora_target_modules).size(), (long long)m.lora_parameters);
  out << buf;
  std::snprintf(buf, sizeof buf,
                "  memory/rank   ~%s estimated: base weights %s, adapters + AdamW %s, activations %s%s, logits + grad %s "
                "(micro-batch of %lld rows x %lld tokens)\n",
                format_bytes(m.total()).c_str(), format_bytes(m.base_weights).c_str(), format_bytes(m.adapters).c_str(),
                format_bytes(m.activations).c_str(), o.gradient_checkpointing ? " (checkpointed)" : "",
                format_bytes(m.logits).c_str(), (long long)rows, (long long)longest);
  out << buf;
  // resume
  std::string resume;
  try {
    resume = resolve_resume(o.resume_from_checkpoint, o.output_dir);
  } catch (const std::exception& e) {
    resume = std::string("error: ") + e.what();
  }
  const auto cps = list_checkpoints(o.output_dir);
  if (o.resume_from_checkpoint.empty()) {
    out << "  resume        none: a fresh start";
    if (!cps.empty()) out << " (" << o.output_dir << " holds " << cps.size() << " checkpoint(s); --resume_from_checkpoint auto would use " << cps.back().second << ")";
    out << "\n";
  } else if (resume.rfind("error: ", 0) == 0) {
    out << "  resume        " << resume << "\n";
  } else if (resume.empty()) {
    out << "  resume        auto: no complete checkpoint in " << o.output_dir << ", a fresh start\n";
  } else {
    out << "  resume        from " << resume << "\n";
  }
  if (cuda && !dpo::torch_cuda_available())
    out << "  note          --device cuda, but no CUDA device is visible here: the run itself would stop\n";
  return out.str();
}

}  // namespace dpo
