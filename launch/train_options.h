// Every option of dpo_dist (names as in TRL / HF TrainingArguments; see
// docs/usage.md), parsed from the command line + INI file and validated across
// fields so that a bad combination fails before any model is loaded.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/cpo.h"
#include "core/dpo.h"
#include "launch/cli.h"

namespace dpo {

struct TrainOptions {
  // model
  std::string model_name_or_path;
  bool load_in_4bit = true;
  std::string bnb_4bit_quant_type = "nf4";
  bool bnb_4bit_use_double_quant = false;
  std::string bnb_4bit_compute_dtype = "auto";  // float32 on CPU, bfloat16 on CUDA
  std::string device = "cpu";
  // data
  std::string train_file, eval_file, output_dir;
  bool group_by_length = false;
  // objective
  std::string stage = "dpo";  // dpo | sft | orpo | cpo
  double beta = 0.1;  // DPO / CPO temperature; ORPO's lambda
  std::string loss_type = "sigmoid";     // one type or a comma-separated mixture
  std::vector<double> loss_weights;      // empty = 1 per type
  double label_smoothing = 0.0;
  double rpo_alpha = 0.0;
  double discopop_tau = 0.05;
  bool use_weighting = false;            // WPO
  double ld_alpha = 1.0;                 // LD-DPO; 1 = off
  double cpo_alpha = 1.0;    // CPO: weight of the chosen answers' NLL (alphapo: 0)
  double simpo_gamma = 0.5;  // CPO simpo / alphapo: target reward margin
  double alpha = 0.0;        // CPO: AlphaPO reward shape (0 = log-prob reward)
  bool precompute_ref_log_probs = false;
  bool padding_free = true;    // DPO micro-batch in one row (launch/dpo_step.h)
  bool prefix_sharing = true;  // [prompt; chosen; rejected] per pair
  // optimisation
  double learning_rate = 5e-4;
  std::string lr_scheduler_type = "cosine";
  int64_t warmup_steps = 0;
  double warmup_ratio = 0.0;
  double weight_decay = 0.0;
  double adam_beta1 = 0.9, adam_beta2 = 0.999, adam_epsilon = 1e-8;
  double max_grad_norm = 1.0;
  int64_t per_device_train_batch_size = 4;
  int64_t per_device_eval_batch_size = 4;
  int64_t gradient_accumulation_steps = 1;
  int64_t max_steps = -1;
  double num_train_epochs = 1.0;
  bool gradient_checkpointing = false;
  int64_t tiled_mlp_tokens = 0;  // > 0: each MLP in token tiles, recomputed in backward (0 = off)
  int64_t seed = 42;
  // lora
  int64_t lora_r = 8;
  double lora_alpha = 16;
  double lora_dropout = 0.05;
  std::vector<std::string> lora_target_modules{"q_proj", "v_proj"};
  bool use_rslora = false;
  std::vector<std::string> modules_to_save;  // embed_tokens, lm_head (PEFT modules_to_save)
  // logging, eval, checkpoints
  int64_t logging_steps = 10;
  int64_t eval_steps = 0;  // 0 = only at the end
  int64_t save_steps = 500;
  int64_t save_total_limit = 0;  // 0 = keep all
  std::string resume_from_checkpoint;  // "" | auto | DIR
  std::string report_to = "jsonl";     // none | list of jsonl, tensorboard, html (jsonl always written unless none)
  std::string progress = "auto";       // auto | on | off
  // processes
  int64_t threads = 0;                 // 0 = cores of this node / ranks on this node
  double collective_timeout = 600;     // seconds; 0 = off
  std::string backend = "auto";        // auto | mpi | nccl | fake
  bool dry_run = false;                // print the plan and exit

  /// The objective's options (core/dpo) from these.
  DpoOptions dpo_options() const;
  /// The CPO/SimPO options of --stage cpo, as given (not yet resolved or validated).
  CpoOptions cpo_options() const;
  /// True when --report_to lists `sink` (jsonl, tensorboard, html).
  bool reports_to(const std::string& sink) const;

  /// name=value of every option, for training_args.json and the compat check.
  std::vector<std::pair<std::string, std::string>> dump;

};

/// Declares all dpo_dist options on cli.
void add_train_options(Cli& cli);
/// Reads and validates them (cross-field checks); throws CliError naming the option.
TrainOptions train_options_from(const Cli& cli);

}  // namespace dpo
