#include "launch/train_options.h"

#include <cmath>
#include <set>
#include <sstream>

#include "core/cpo.h"
#include "core/dpo.h"
#include "core/schedule.h"

namespace dpo {

namespace {
std::string joined(const std::vector<std::string>& v, const char* sep) {
  std::string out;
  for (const auto& s : v) out += (out.empty() ? "" : sep) + s;
  return out;
}
}  // namespace

void add_train_options(Cli& c) {
  c.add_string("model_name_or_path", "", "Hugging Face Llama directory (config.json, *.safetensors, tokenizer.model)");
  c.add_bool("load_in_4bit", true, "store the frozen base projections in NF4");
  c.add_string("bnb_4bit_quant_type", "nf4", "4-bit quantization type (only nf4)");
  c.add_bool("bnb_4bit_use_double_quant", false, "quantize the NF4 absmax values again (8-bit, blocksize 256)");
  c.add_string("bnb_4bit_compute_dtype", "auto", "float32|bfloat16|float16|auto (float32 on CPU, bfloat16 on CUDA)");
  c.add_string("device", "cpu", "cpu|cuda (cuda: each rank takes the GPU of its local rank)");
  c.add_string("train_file", "", "HDF5 preference file from dpo_preprocess");
  c.add_string("eval_file", "", "HDF5 preference file for evaluation (optional)");
  c.add_string("output_dir", "", "where checkpoints, metrics.jsonl and the final adapter go");
  c.add_bool("group_by_length", false, "batch examples of similar length (less padding)");
  c.add_string("stage", "dpo", "dpo|sft|orpo|cpo (orpo, cpo: TRL's ORPOTrainer / CPOTrainer, no reference model)");
  c.add_double("beta", 0.1, "DPO / CPO temperature beta; ORPO's lambda (weight of the odds-ratio term)");
  c.add_string("loss_type", "sigmoid",
               joined(dpo_loss_types(), "|") + ", or a comma-separated mixture of them (TRL's names and formulas); "
               "--stage cpo: " + joined(cpo_loss_types(), "|"));
  c.add_double("cpo_alpha", 1.0, "--stage cpo: weight of the chosen answers' NLL (alphapo sets it to 0)");
  c.add_double("simpo_gamma", 0.5, "--stage cpo, loss simpo|alphapo: SimPO's target reward margin");
  c.add_double("alpha", 0.0, "--stage cpo: AlphaPO reward shape r = (1 - p^-alpha) / alpha (0 = log-prob reward)");
  c.add_list("loss_weights", "", "weights of the --loss_type mixture, one per type (default 1 each)");
  c.add_double("discopop_tau", 0.05, "DiscoPOP temperature tau (loss_type discopop)");
  c.add_bool("use_weighting", false, "WPO: weight each pair's loss by its answers' probability under the policy");
  c.add_double("ld_alpha", 1.0, "LD-DPO: weight of answer tokens past the shorter answer of a pair, in [0, 1] (1 = off)");
  c.add_double("label_smoothing", 0.0, "conservative DPO label smoothing in [0, 0.5)");
  c.add_double("rpo_alpha", 0.0, "weight of the chosen-answer NLL added to the DPO loss (0 = off)");
  c.add_bool("precompute_ref_log_probs", false, "compute reference log-probs once and store them in the HDF5 files");
  c.add_bool("padding_free", true, "DPO: all pairs of a micro-batch in one row, no padding (block-diagonal attention)");
  c.add_bool("prefix_sharing", true, "DPO: one [prompt; chosen; rejected] sequence per pair, the prompt computed once");
  c.add_double("learning_rate", 5e-4, "peak learning rate");
  c.add_string("lr_scheduler_type", "cosine", joined(schedule_types(), "|"));
  c.add_int("warmup_steps", 0, "linear warmup steps (wins over warmup_ratio when > 0)");
  c.add_double("warmup_ratio", 0.0, "warmup as a fraction of the total steps");
  c.add_double("weight_decay", 0.0, "AdamW decoupled weight decay (trainable weights only: LoRA, modules_to_save)");
  c.add_double("adam_beta1", 0.9, "AdamW beta1");
  c.add_double("adam_beta2", 0.999, "AdamW beta2");
  c.add_double("adam_epsilon", 1e-8, "AdamW epsilon");
  c.add_double("max_grad_norm", 1.0, "clip the global gradient norm (0 = off)");
  c.add_int("per_device_train_batch_size", 4, "preference pairs per rank per micro-batch");
  c.add_int("per_device_eval_batch_size", 4, "preference pairs per rank per eval batch");
  c.add_int("gradient_accumulation_steps", 1, "micro-batches per optimizer step");
  c.add_int("max_steps", -1, "optimizer steps (> 0 overrides num_train_epochs)");
  c.add_double("num_train_epochs", 1.0, "epochs when max_steps <= 0");
  c.add_bool("gradient_checkpointing", false, "recompute each decoder layer in backward");
  c.add_int("tiled_mlp_tokens", 0,
            "run each decoder MLP in tiles of N tokens, recomputed in backward: (N, F) instead of (T, F) "
            "activations for one more MLP forward per layer (long rows on a tight memory budget; 0 = off)");
  c.add_int("seed", 42, "seed of LoRA init, data order and dropout");
  c.add_int("lora_r", 8, "LoRA rank");
  c.add_double("lora_alpha", 16, "LoRA alpha (scaling alpha/r)");
  c.add_double("lora_dropout", 0.05, "dropout on the LoRA input");
  c.add_list("lora_target_modules", "q_proj,v_proj", "projections with adapters (or all-linear)");
  c.add_bool("use_rslora", false, "scaling alpha/sqrt(r)");
  c.add_list("modules_to_save", "",
             "embed_tokens and/or lm_head: train full copies next to the adapters (PEFT modules_to_save; one shared copy "
             "when the model ties them)");
  c.add_int("logging_steps", 10, "log every N optimizer steps");
  c.add_int("eval_steps", 0, "evaluate every N steps (0 = only at the end)");
  c.add_int("save_steps", 500, "checkpoint every N steps (0 = only at the end)");
  c.add_int("save_total_limit", 0, "keep at most N checkpoints (0 = all; the newest is never removed)");
  c.add_string("resume_from_checkpoint", "", "auto (newest complete checkpoint in output_dir, if any) or DIR");
  c.add_string("report_to", "jsonl",
               "none, or a comma-separated list of jsonl|tensorboard|html (metrics.jsonl is always written; "
               "html refreshes OUTPUT_DIR/report.html at every log event)");
  c.add_string("progress", "auto", "auto|on|off: live progress line (auto: when stderr is a terminal)");
  c.add_int("threads", 0, "compute threads per rank (0 = cores of the node / ranks on the node)");
  c.add_double("collective_timeout", 600, "seconds a step or collective may hang before the job is aborted (0 = off)");
  c.add_string("backend", "auto", "communication backend: auto|mpi|nccl|fake");
  c.add_bool("dry_run", false, "print the plan (ranks, batch, steps, tokens, memory per rank, resume) and exit");
}

namespace {
void require(bool ok, const std::string& msg) {
  if (!ok) throw CliError(msg);
}
void one_of(const std::string& opt, const std::string& v, const std::vector<std::string>& allowed) {
  if (std::find(allowed.begin(), allowed.end(), v) != allowed.end()) return;
  throw CliError("option --" + opt + ": '" + v + "' is not one of " + joined(allowed, "|"));
}
// Core's own validation (the one source of the allowed values and ranges), as CliError.
template <typename Fn>
void core_check(Fn&& fn) {
  try {
    fn();
  } catch (const std::runtime_error& e) {
    throw CliError(std::string("option ") + e.what());
  }
}
}  // namespace

DpoOptions TrainOptions::dpo_options() const {
  DpoOptions d;
  d.beta = beta;
  d.loss_type = loss_type;
  d.loss_weights = loss_weights;
  d.label_smoothing = label_smoothing;
  d.rpo_alpha = rpo_alpha;
  d.discopop_tau = discopop_tau;
  d.use_weighting = use_weighting;
  d.ld_alpha = ld_alpha;
  return d;
}

CpoOptions TrainOptions::cpo_options() const {
  CpoOptions c;
  c.beta = beta;
  c.loss_type = loss_type;
  c.label_smoothing = label_smoothing;
  c.cpo_alpha = cpo_alpha;
  c.simpo_gamma = simpo_gamma;
  c.alpha = alpha;
  return c;
}

bool TrainOptions::reports_to(const std::string& sink) const {
  std::stringstream in(report_to);
  for (std::string t; std::getline(in, t, ',');)
    if (t == sink) return true;
  return false;
}

TrainOptions train_options_from(const Cli& c) {
  TrainOptions o;
  o.model_name_or_path = c.get_string("model_name_or_path");
  o.load_in_4bit = c.get_bool("load_in_4bit");
  o.bnb_4bit_quant_type = c.get_string("bnb_4bit_quant_type");
  o.bnb_4bit_use_double_quant = c.get_bool("bnb_4bit_use_double_quant");
  o.bnb_4bit_compute_dtype = c.get_string("bnb_4bit_compute_dtype");
  o.device = c.get_string("device");
  o.train_file = c.get_string("train_file");
  o.eval_file = c.get_string("eval_file");
  o.output_dir = c.get_string("output_dir");
  o.group_by_length = c.get_bool("group_by_length");
  o.stage = c.get_string("stage");
  o.beta = c.get_double("beta");
  o.loss_type = c.get_string("loss_type");
  o.label_smoothing = c.get_double("label_smoothing");
  o.rpo_alpha = c.get_double("rpo_alpha");
  o.cpo_alpha = c.get_double("cpo_alpha");
  o.simpo_gamma = c.get_double("simpo_gamma");
  o.alpha = c.get_double("alpha");
  for (const auto& w : c.get_list("loss_weights")) {
    std::istringstream in(w);
    double v;
    in >> v;
    if (!in || !in.eof()) throw CliError("option --loss_weights: '" + w + "' is not a number (e.g. --loss_weights 0.8,0.2,1.0)");
    o.loss_weights.push_back(v);
  }
  o.discopop_tau = c.get_double("discopop_tau");
  o.use_weighting = c.get_bool("use_weighting");
  o.ld_alpha = c.get_double("ld_alpha");
  o.precompute_ref_log_probs = c.get_bool("precompute_ref_log_probs");
  o.padding_free = c.get_bool("padding_free");
  o.prefix_sharing = c.get_bool("prefix_sharing");
  o.learning_rate = c.get_double("learning_rate");
  o.lr_scheduler_type = c.get_string("lr_scheduler_type");
  o.warmup_steps = c.get_int("warmup_steps");
  o.warmup_ratio = c.get_double("warmup_ratio");
  o.weight_decay = c.get_double("weight_decay");
  o.adam_beta1 = c.get_double("adam_beta1");
  o.adam_beta2 = c.get_double("adam_beta2");
  o.adam_epsilon = c.get_double("adam_epsilon");
  o.max_grad_norm = c.get_double("max_grad_norm");
  o.per_device_train_batch_size = c.get_int("per_device_train_batch_size");
  o.per_device_eval_batch_size = c.get_int("per_device_eval_batch_size");
  o.gradient_accumulation_steps = c.get_int("gradient_accumulation_steps");
  o.max_steps = c.get_int("max_steps");
  o.num_train_epochs = c.get_double("num_train_epochs");
  o.gradient_checkpointing = c.get_bool("gradient_checkpointing");
  o.tiled_mlp_tokens = c.get_int("tiled_mlp_tokens");
  o.seed = c.get_int("seed");
  o.lora_r = c.get_int("lora_r");
  o.lora_alpha = c.get_double("lora_alpha");
  o.lora_dropout = c.get_double("lora_dropout");
  o.lora_target_modules = c.get_list("lora_target_modules");
  o.use_rslora = c.get_bool("use_rslora");
  o.modules_to_save = c.get_list("modules_to_save");
  o.logging_steps = c.get_int("logging_steps");
  o.eval_steps = c.get_int("eval_steps");
  o.save_steps = c.get_int("save_steps");
  o.save_total_limit = c.get_int("save_total_limit");
  o.resume_from_checkpoint = c.get_string("resume_from_checkpoint");
  o.report_to = c.get_string("report_to");
  o.progress = c.get_string("progress");
  o.threads = c.get_int("threads");
  o.collective_timeout = c.get_double("collective_timeout");
  o.backend = c.get_string("backend");
  o.dry_run = c.get_bool("dry_run");
  o.dump = c.dump();

  require(!o.model_name_or_path.empty(), "option --model_name_or_path is required (a Hugging Face Llama directory)");
  require(!o.train_file.empty(), "option --train_file is required (an HDF5 file written by dpo_preprocess)");
  require(!o.output_dir.empty(), "option --output_dir is required");
  one_of("stage", o.stage, {"dpo", "sft", "orpo", "cpo"});
  const bool ref_free = o.stage == "orpo" || o.stage == "cpo";
  if (!ref_free) core_check([&] { validate_dpo_options(o.dpo_options()); });
  for (const char* n : {"cpo_alpha", "simpo_gamma", "alpha"})
    require(o.stage == "cpo" || !c.given(n), std::string("option --") + n + " applies to --stage cpo only");
  if (ref_free) {
    // TRL's ORPOTrainer / CPOTrainer have none of DPO's extras; their layout is TRL's padded rows.
    for (const char* n : {"loss_weights", "rpo_alpha", "discopop_tau", "use_weighting", "ld_alpha",
                          "precompute_ref_log_probs", "padding_free", "prefix_sharing"})
      require(!c.given(n), std::string("option --") + n + " applies to --stage dpo, not " + o.stage +
                               " (no reference model; TRL's padded rows)");
    o.padding_free = o.prefix_sharing = false;
    require(o.beta > 0 && std::isfinite(o.beta), "option --beta must be > 0");
  }
  if (o.stage == "orpo") {
    require(!c.given("loss_type"), "option --loss_type does not apply to --stage orpo (ORPO has one loss; --beta is its lambda)");
    require(!c.given("label_smoothing"), "option --label_smoothing does not apply to --stage orpo");
  }
  if (o.stage == "cpo") {
    const CpoOptions co = o.cpo_options();
    core_check([&] { validate_cpo_options(co); });
    require(!c.given("simpo_gamma") || o.loss_type == "simpo" || o.loss_type == "alphapo",
            "option --simpo_gamma applies to --stage cpo with --loss_type simpo|alphapo only");
    require(!(c.given("cpo_alpha") && o.loss_type == "alphapo"),
            "option --cpo_alpha: --loss_type alphapo sets it to 0 (TRL's CPOConfig); use --loss_type simpo --alpha A "
            "to keep an NLL term");
  }
  one_of("lr_scheduler_type", o.lr_scheduler_type, schedule_types());
  one_of("bnb_4bit_quant_type", o.bnb_4bit_quant_type, {"nf4"});
  one_of("bnb_4bit_compute_dtype", o.bnb_4bit_compute_dtype, {"auto", "float32", "bfloat16", "float16"});
  one_of("device", o.device, {"cpu", "cuda"});
  {
    std::vector<std::string> sinks;
    std::stringstream in(o.report_to);
    for (std::string t; std::getline(in, t, ',');) sinks.push_back(t);
    if (sinks.empty()) sinks.push_back("");
    for (const auto& t : sinks) one_of("report_to", t, {"none", "jsonl", "tensorboard", "html"});
    require(!(sinks.size() > 1 && o.report_to.find("none") != std::string::npos),
            "option --report_to: none cannot be combined with other sinks");
  }
  one_of("progress", o.progress, {"auto", "on", "off"});
  one_of("backend", o.backend, {"auto", "mpi", "nccl", "fake"});
  require(o.learning_rate >= 0, "option --learning_rate must be >= 0");
  require(o.warmup_steps >= 0, "option --warmup_steps must be >= 0");
  require(o.warmup_ratio >= 0 && o.warmup_ratio <= 1, "option --warmup_ratio must be in [0, 1]");
  require(o.weight_decay >= 0, "option --weight_decay must be >= 0");
  require(o.adam_beta1 >= 0 && o.adam_beta1 < 1, "option --adam_beta1 must be in [0, 1)");
  require(o.adam_beta2 >= 0 && o.adam_beta2 < 1, "option --adam_beta2 must be in [0, 1)");
  require(o.adam_epsilon > 0, "option --adam_epsilon must be > 0");
  require(o.max_grad_norm >= 0, "option --max_grad_norm must be >= 0 (0 = no clipping)");
  require(o.per_device_train_batch_size >= 1, "option --per_device_train_batch_size must be >= 1");
  require(o.per_device_eval_batch_size >= 1, "option --per_device_eval_batch_size must be >= 1");
  require(o.gradient_accumulation_steps >= 1, "option --gradient_accumulation_steps must be >= 1");
  require(o.max_steps > 0 || o.num_train_epochs > 0, "set --max_steps > 0 or --num_train_epochs > 0");
  require(o.lora_r >= 1, "option --lora_r must be >= 1");
  require(o.tiled_mlp_tokens >= 0, "option --tiled_mlp_tokens must be >= 0 (0 = off)");
  require(o.lora_alpha > 0, "option --lora_alpha must be > 0");
  require(o.lora_dropout >= 0 && o.lora_dropout < 1, "option --lora_dropout must be in [0, 1)");
  require(!o.lora_target_modules.empty(), "option --lora_target_modules is empty");
  for (size_t i = 0; i < o.modules_to_save.size(); ++i) {
    const std::string& m = o.modules_to_save[i];
    require(m == "embed_tokens" || m == "lm_head",
            "option --modules_to_save: '" + m + "' is not one of embed_tokens, lm_head");
    for (size_t k = 0; k < i; ++k) require(o.modules_to_save[k] != m, "option --modules_to_save names '" + m + "' twice");
  }
  require(o.logging_steps >= 1, "option --logging_steps must be >= 1");
  require(o.eval_steps >= 0 && o.save_steps >= 0 && o.save_total_limit >= 0,
          "options --eval_steps, --save_steps, --save_total_limit must be >= 0");
  require(o.threads >= 0, "option --threads must be >= 0 (0 = automatic)");
  require(o.collective_timeout >= 0, "option --collective_timeout must be >= 0 (0 = off)");
  if (o.stage == "sft") {
    require(!o.precompute_ref_log_probs, "option --precompute_ref_log_probs applies to --stage dpo only");
  }
  // --backend mpi with --device cuda reduces the adapter gradients through host copies
  // (dist/mpi_communicator.h): slower than NCCL, and the reference the GPU check compares
  // the NCCL backend against (scripts/gpu/check.sh).
  return o;
}

}  // namespace dpo
