#include "launch/model_setup.h"

#include <filesystem>
#include <stdexcept>

#include <torch/cuda.h>

#include "core/modules_to_save.h"
#include "data/tokenizer_info.h"
#include "runtime/torch_cuda.h"

namespace fs = std::filesystem;

namespace dpo {

torch::ScalarType compute_dtype_from(const std::string& name, const std::string& device) {
  if (name == "auto") return device == "cuda" ? torch::kBFloat16 : torch::kFloat32;
  if (name == "float32") return torch::kFloat32;
  if (name == "bfloat16") return torch::kBFloat16;
  if (name == "float16") return torch::kFloat16;
  throw std::runtime_error("option --bnb_4bit_compute_dtype: '" + name + "' is not one of auto|float32|bfloat16|float16");
}

void add_model_options(Cli& cli, const std::string& model_help) {
  cli.add_string("model_name_or_path", "", model_help);
  cli.add_bool("load_in_4bit", true, "quantize the base projections to NF4 while loading (as in training)");
  cli.add_bool("bnb_4bit_use_double_quant", false, "double quantization of the NF4 absmax values (as in training)");
  cli.add_string("bnb_4bit_compute_dtype", "auto", "float32|bfloat16|float16|auto (float32 on CPU, bfloat16 on CUDA)");
  cli.add_string("device", "cpu", "cpu|cuda");
}

ModelSetupOptions model_options_from(const Cli& cli) {
  ModelSetupOptions mo;
  mo.model_dir = cli.get_string("model_name_or_path");
  mo.load_in_4bit = cli.get_bool("load_in_4bit");
  mo.double_quant = cli.get_bool("bnb_4bit_use_double_quant");
  mo.compute_dtype = cli.get_string("bnb_4bit_compute_dtype");
  mo.device = cli.get_string("device");
  compute_dtype_from(mo.compute_dtype, mo.device);  // validates early
  return mo;
}

torch::ScalarType storage_dtype_from(const std::string& name, const std::string& option) {
  if (name == "float32") return torch::kFloat32;
  if (name == "float16") return torch::kFloat16;
  if (name == "bfloat16") return torch::kBFloat16;
  throw CliError("option " + option + ": '" + name + "' is not one of float32|float16|bfloat16");
}

void attach_peft_adapter(LoadedModel& m, const std::string& dir) {
  LoraConfig cfg = lora_config_load(dir);
  lora_attach(m.projections, cfg, 0);
  lora_load_peft(m.projections, dir);
  modules_to_save_load(m.model, cfg.modules_to_save, dir);
}

LoadedModel load_model(const ModelSetupOptions& o) {
  if (o.model_dir.empty()) throw std::runtime_error("option --model_name_or_path is required");
  if (!fs::is_directory(o.model_dir))
    throw std::runtime_error("--model_name_or_path " + o.model_dir +
                             ": not a directory (give a Hugging Face Llama directory with config.json, "
                             "*.safetensors and tokenizer.model; dpo_init_model writes a small one)");
  LoadedModel m;
  if (o.device == "cuda") {
    if (!dpo::torch_cuda_available())
      throw std::runtime_error("--device cuda: " + torch_cuda_unavailable_reason());
    m.device = torch::Device(torch::kCUDA);
  }
  QuantOptions q;
  q.load_in_4bit = o.load_in_4bit;
  q.double_quant = o.double_quant;
  q.compute_dtype = compute_dtype_from(o.compute_dtype, o.device);
  m.model = llama_load(o.model_dir, q, m.device);
  m.projections = m.model->named_projections();
  // The file dpo_preprocess would use: tokenizer.json when present, else tokenizer.model.
  m.tokenizer_path = resolve_tokenizer_path("", o.model_dir);
  if (fs::exists(m.tokenizer_path)) {
    TokenizerInfo tok(m.tokenizer_path);
    m.tokenizer_sha256 = tok.sha256();
    m.tokenizer_vocab = tok.vocab_size();
    if (m.tokenizer_vocab > m.model->config().vocab_size)
      throw std::runtime_error(m.tokenizer_path + " has " + std::to_string(m.tokenizer_vocab) +
                               " ids but config.json's vocab_size is " + std::to_string(m.model->config().vocab_size) +
                               ": the tokenizer does not belong to this model");
  }
  return m;
}

void check_data_matches_model(const LoadedModel& m, const std::string& h5_path, const std::string& file_sha256,
                              int64_t file_vocab) {
  if (m.tokenizer_sha256.empty())
    throw std::runtime_error(m.tokenizer_path + " is missing: dpo_dist needs the model's tokenizer.model to check that " +
                             h5_path + " was tokenized with it (copy it into the model directory)");
  if (file_sha256 != m.tokenizer_sha256 || file_vocab != m.tokenizer_vocab)
    throw std::runtime_error(h5_path + " was tokenized with another tokenizer (tokenizer_sha256 " + file_sha256.substr(0, 12) +
                             "..., vocab_size " + std::to_string(file_vocab) + ") than the model's " + m.tokenizer_path +
                             " (sha256 " + m.tokenizer_sha256.substr(0, 12) + "..., vocab_size " +
                             std::to_string(m.tokenizer_vocab) + "): re-run dpo_preprocess --tokenizer " + m.tokenizer_path);
}

}  // namespace dpo
