// Loading what a run needs from a Hugging Face model directory: the Llama model
// (4-bit or dense), its tokenizer fingerprint, LoRA adapters (fresh or from a
// PEFT directory), and the check that a preference file was tokenized with the
// model's tokenizer. Shared by dpo_dist, dpo_score and dpo_merge.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "core/linear.h"
#include "core/llama.h"
#include "core/lora.h"
#include "launch/cli.h"

namespace dpo {

struct ModelSetupOptions {
  std::string model_dir;
  bool load_in_4bit = true;
  bool double_quant = false;
  std::string compute_dtype = "auto";  // auto|float32|bfloat16|float16
  std::string device = "cpu";
};

struct LoadedModel {
  LlamaModel model{nullptr};
  std::vector<std::pair<std::string, FrozenLinear>> projections;  // HF names, layer order
  std::string tokenizer_path;    // <model_dir>/tokenizer.json if present, else <model_dir>/tokenizer.model
  std::string tokenizer_sha256;  // "" when the directory has neither
  int64_t tokenizer_vocab = 0;
  torch::Device device{torch::kCPU};
};

/// Resolves "auto" (float32 on CPU, bfloat16 on CUDA) and validates the name.
torch::ScalarType compute_dtype_from(const std::string& name, const std::string& device);

/// Declares the model options every model-loading tool shares: --model_name_or_path,
/// --load_in_4bit, --bnb_4bit_use_double_quant, --bnb_4bit_compute_dtype, --device.
void add_model_options(Cli& cli, const std::string& model_help);
/// Reads them back (after cli.parse).
ModelSetupOptions model_options_from(const Cli& cli);

/// "float32" | "float16" | "bfloat16" -> dtype of stored weights; CliError naming `option` otherwise.
torch::ScalarType storage_dtype_from(const std::string& name, const std::string& option);

/// Attaches the PEFT adapter in `dir` (adapter_config.json + adapter_model.safetensors).
void attach_peft_adapter(LoadedModel& m, const std::string& dir);

/// Loads the model (no adapters). Errors name the directory and what is wrong.
LoadedModel load_model(const ModelSetupOptions& o);

/// Refuses a preference file whose tokenizer differs from the model's: compares
/// the file's tokenizer_sha256 and vocab_size attributes with the model directory's
/// tokenizer.model, and the vocabulary with the model's embedding size.
void check_data_matches_model(const LoadedModel& m, const std::string& h5_path,
                              const std::string& file_sha256, int64_t file_vocab);

}  // namespace dpo
