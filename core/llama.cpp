#include "core/llama.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <regex>
#include <set>
#include <stdexcept>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/autograd.h>

#include "core/activation_checkpoint.h"
#include "core/safetensors.h"
#include "util/fs.h"
#include "util/json_int.h"
#include "util/json_read.h"
#include "util/tensor_str.h"

namespace dpo {
namespace fs = std::filesystem;
using json = nlohmann::json;

// ---------------------------------------------------------------------------
// config.json

namespace {

[[noreturn]] void field_fail(const std::string& what, const std::string& field, const std::string& msg) {
  throw std::runtime_error(what + ": field \"" + field + "\" " + msg);
}

bool present(const json& j, const char* k) { return j.contains(k) && !j.at(k).is_null(); }

int64_t get_int(const json& j, const std::string& what, const char* k, std::optional<int64_t> def) {
  if (!present(j, k)) {
    if (def) return *def;
    field_fail(what, k, "is missing (required for a Llama model)");
  }
  const json& v = j.at(k);
  if (json_is_int64(v)) return v.get<int64_t>();
  field_fail(what, k, (v.is_number_integer() ? "is too large: " : "must be an integer, got ") + v.dump());
}

double get_double(const json& j, const std::string& what, const char* k, std::optional<double> def) {
  if (!present(j, k)) {
    if (def) return *def;
    field_fail(what, k, "is missing");
  }
  const json& v = j.at(k);
  if (!v.is_number()) field_fail(what, k, "must be a number, got " + v.dump());
  return v.get<double>();
}

bool get_bool(const json& j, const std::string& what, const char* k, bool def) {
  if (!present(j, k)) return def;
  const json& v = j.at(k);
  if (!v.is_boolean()) field_fail(what, k, "must be true or false, got " + v.dump());
  return v.get<bool>();
}

std::string dtype_name(torch::ScalarType t) {
  if (auto n = weight_dtype_name(t)) return *n;
  throw std::runtime_error(std::string("dtype ") + c10::toString(t) + " is not a model weight dtype (float32, float16, bfloat16)");
}

torch::ScalarType dtype_from_name(const std::string& what, const char* field, const std::string& s) {
  if (auto t = weight_dtype_from_name(s)) return *t;
  field_fail(what, field, "\"" + s + "\" is not supported (float32, float16, bfloat16)");
}

RopeScaling parse_rope_scaling(const json& rs, const std::string& what, const char* field) {
  RopeScaling r;
  if (!rs.is_object()) field_fail(what, field, "must be an object or null, got " + rs.dump());
  std::string type;
  if (present(rs, "rope_type")) type = rs.at("rope_type").is_string() ? rs.at("rope_type").get<std::string>() : "?";
  else if (present(rs, "type")) type = rs.at("type").is_string() ? rs.at("type").get<std::string>() : "?";
  else field_fail(what, field, "has no \"rope_type\"");
  if (type == "default") return r;
  if (type == "linear") {
    r.type = RopeScaling::Type::kLinear;
    r.factor = get_double(rs, what, "factor", std::nullopt);
  } else if (type == "llama3") {
    r.type = RopeScaling::Type::kLlama3;
    r.factor = get_double(rs, what, "factor", std::nullopt);
    r.low_freq_factor = get_double(rs, what, "low_freq_factor", std::nullopt);
    r.high_freq_factor = get_double(rs, what, "high_freq_factor", std::nullopt);
    r.original_max_position_embeddings = get_int(rs, what, "original_max_position_embeddings", std::nullopt);
  } else {
    field_fail(what, field, "type \"" + type +
                              "\" is not implemented (supported: default, linear, llama3); the model would compute "
                              "different positions than it was trained with");
  }
  return r;
}

}  // namespace

LlamaConfig llama_config_checked(LlamaConfig c, const std::string& what) {
  auto positive = [&](int64_t v, const char* f) {
    if (v <= 0) field_fail(what, f, "must be a positive integer, got " + std::to_string(v));
  };
  positive(c.hidden_size, "hidden_size");
  positive(c.intermediate_size, "intermediate_size");
  positive(c.num_hidden_layers, "num_hidden_layers");
  positive(c.num_attention_heads, "num_attention_heads");
  positive(c.vocab_size, "vocab_size");
  if (c.num_key_value_heads == 0) c.num_key_value_heads = c.num_attention_heads;
  positive(c.num_key_value_heads, "num_key_value_heads");
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    field_fail(what, "num_key_value_heads",
               "(" + std::to_string(c.num_key_value_heads) + ") must divide num_attention_heads (" +
                   std::to_string(c.num_attention_heads) + ")");
  if (c.head_dim == 0) {
    if (c.hidden_size % c.num_attention_heads != 0)
      field_fail(what, "hidden_size",
                 "(" + std::to_string(c.hidden_size) + ") must be divisible by num_attention_heads (" +
                     std::to_string(c.num_attention_heads) + ")");
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  positive(c.head_dim, "head_dim");
  if (c.head_dim % 2 != 0) field_fail(what, "head_dim", "must be even for rotary embeddings, got " + std::to_string(c.head_dim));
  positive(c.max_position_embeddings, "max_position_embeddings");
  if (!(c.rms_norm_eps > 0)) field_fail(what, "rms_norm_eps", "must be positive");
  if (!(c.rope_theta > 0)) field_fail(what, "rope_theta", "must be positive");
  if (!(c.initializer_range >= 0)) field_fail(what, "initializer_range", "must be non-negative");
  if (c.sliding_window && *c.sliding_window <= 0) field_fail(what, "sliding_window", "must be positive or null");
  const RopeScaling& r = c.rope_scaling;
  if (r.type != RopeScaling::Type::kNone && !(r.factor > 0)) field_fail(what, "rope_scaling", "factor must be positive");
  if (r.type == RopeScaling::Type::kLlama3 &&
      (!(r.high_freq_factor > r.low_freq_factor) || !(r.low_freq_factor > 0) || r.original_max_position_embeddings <= 0))
    field_fail(what, "rope_scaling",
               "llama3 needs 0 < low_freq_factor < high_freq_factor and original_max_position_embeddings > 0");
  torch::ScalarType t = c.torch_dtype;
  if (t != torch::kFloat32 && t != torch::kFloat16 && t != torch::kBFloat16)
    field_fail(what, "torch_dtype", "must be float32, float16 or bfloat16");
  return c;
}

const char* llama_arch_model_type(LlamaArch a) {
  switch (a) {
    case LlamaArch::kLlama: return "llama";
    case LlamaArch::kMistral: return "mistral";
    case LlamaArch::kQwen2: return "qwen2";
    case LlamaArch::kQwen3: return "qwen3";
  }
  return "?";
}

const char* llama_arch_class(LlamaArch a) {
  switch (a) {
    case LlamaArch::kLlama: return "LlamaForCausalLM";
    case LlamaArch::kMistral: return "MistralForCausalLM";
    case LlamaArch::kQwen2: return "Qwen2ForCausalLM";
    case LlamaArch::kQwen3: return "Qwen3ForCausalLM";
  }
  return "?";
}

LlamaArch llama_arch_from_model_type(const std::string& name) {
  for (LlamaArch a : {LlamaArch::kLlama, LlamaArch::kMistral, LlamaArch::kQwen2, LlamaArch::kQwen3})
    if (name == llama_arch_model_type(a)) return a;
  throw std::runtime_error("architecture \"" + name + "\" is not supported (llama, mistral, qwen2, qwen3)");
}

LlamaConfig llama_config_from_json(const json& j, const std::string& what) {
  if (!j.is_object()) throw std::runtime_error(what + ": not a JSON object");
  static const char* kSupported =
      "only LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM are supported";
  std::optional<LlamaArch> arch;
  if (present(j, "architectures")) {
    const json& a = j.at("architectures");
    if (!a.is_array() || a.empty() || !a[0].is_string())
      field_fail(what, "architectures", "must be a non-empty list of names, got " + a.dump());
    for (const auto& e : a) {
      std::optional<LlamaArch> found;
      for (LlamaArch x : {LlamaArch::kLlama, LlamaArch::kMistral, LlamaArch::kQwen2, LlamaArch::kQwen3})
        if (e.is_string() && e.get<std::string>() == llama_arch_class(x)) found = x;
      if (!found) field_fail(what, "architectures", "lists " + e.dump() + ": " + kSupported);
      if (arch && *arch != *found) field_fail(what, "architectures", "lists two different architectures: " + a.dump());
      arch = found;
    }
  }
  if (present(j, "model_type")) {
    const json& m = j.at("model_type");
    std::optional<LlamaArch> mt;
    for (LlamaArch x : {LlamaArch::kLlama, LlamaArch::kMistral, LlamaArch::kQwen2, LlamaArch::kQwen3})
      if (m.is_string() && m.get<std::string>() == llama_arch_model_type(x)) mt = x;
    if (!mt) field_fail(what, "model_type", "is " + m.dump() + ": only \"llama\", \"mistral\", \"qwen2\" and \"qwen3\" are supported");
    if (arch && *arch != *mt)
      field_fail(what, "model_type", "is " + m.dump() + " but architectures says " + llama_arch_class(*arch));
    arch = mt;
  } else if (!present(j, "architectures")) {
    field_fail(what, "architectures", "is missing (and so is model_type): cannot tell which architecture this is");
  }

  LlamaConfig c;
  c.raw = j;
  c.arch = *arch;
  const bool qwen = c.arch == LlamaArch::kQwen2 || c.arch == LlamaArch::kQwen3;
  c.hidden_size = get_int(j, what, "hidden_size", std::nullopt);
  c.intermediate_size = get_int(j, what, "intermediate_size", std::nullopt);
  c.num_hidden_layers = get_int(j, what, "num_hidden_layers", std::nullopt);
  c.num_attention_heads = get_int(j, what, "num_attention_heads", std::nullopt);
  c.vocab_size = get_int(j, what, "vocab_size", std::nullopt);
  c.num_key_value_heads = get_int(j, what, "num_key_value_heads", c.num_attention_heads);
  // Qwen3Config's head_dim defaults to 128; the others derive it from C / H.
  c.head_dim = get_int(j, what, "head_dim", c.arch == LlamaArch::kQwen3 ? 128 : 0);
  c.rms_norm_eps = get_double(j, what, "rms_norm_eps", 1e-6);
  c.max_position_embeddings = get_int(j, what, "max_position_embeddings", 2048);
  c.tie_word_embeddings = get_bool(j, what, "tie_word_embeddings", false);
  c.initializer_range = get_double(j, what, "initializer_range", 0.02);
  c.bos_token_id = get_int(j, what, "bos_token_id", 1);
  if (present(j, "eos_token_id") && j.at("eos_token_id").is_array()) {
    const json& e = j.at("eos_token_id");
    if (e.empty() || !e[0].is_number_integer()) field_fail(what, "eos_token_id", "must be an integer or a list of integers");
    c.eos_token_id = e[0].get<int64_t>();
  } else {
    c.eos_token_id = get_int(j, what, "eos_token_id", 2);
  }
  if (present(j, "pad_token_id")) c.pad_token_id = get_int(j, what, "pad_token_id", std::nullopt);
  // transformers >= 4.56 writes "dtype", older ones "torch_dtype".
  for (const char* k : {"torch_dtype", "dtype"}) {
    if (!present(j, k)) continue;
    if (!j.at(k).is_string()) field_fail(what, k, "must be a string");
    c.torch_dtype = dtype_from_name(what, k, j.at(k).get<std::string>());
    break;
  }
  if (present(j, "hidden_act")) {
    const json& a = j.at("hidden_act");
    if (!a.is_string() || a.get<std::string>() != "silu")
      field_fail(what, "hidden_act", "is " + a.dump() + ": only \"silu\" (SwiGLU) is implemented");
  }
  // Biases as each modeling file builds its nn.Linear layers: Llama reads
  // attention_bias (q, k, v, o) and mlp_bias; Qwen3 attention_bias; Qwen2 always
  // has q/k/v biases; Mistral none (the fields are ignored where HF ignores them).
  if (c.arch == LlamaArch::kLlama || c.arch == LlamaArch::kQwen3)
    c.attention_bias = get_bool(j, what, "attention_bias", false);
  if (c.arch == LlamaArch::kLlama) c.mlp_bias = get_bool(j, what, "mlp_bias", false);
  c.qkv_bias = c.arch == LlamaArch::kQwen2;
  c.qk_norm = c.arch == LlamaArch::kQwen3;
  if (get_double(j, what, "attention_dropout", 0.0) != 0.0)
    field_fail(what, "attention_dropout", "is not 0: attention dropout is not implemented");
  c.rope_theta = get_double(j, what, "rope_theta", 10000.0);
  if (present(j, "rope_scaling")) c.rope_scaling = parse_rope_scaling(j.at("rope_scaling"), what, "rope_scaling");
  // transformers v5 keeps theta and scaling together in "rope_parameters".
  if (present(j, "rope_parameters")) {
    const json& rp = j.at("rope_parameters");
    c.rope_scaling = parse_rope_scaling(rp, what, "rope_parameters");
    if (present(rp, "rope_theta")) c.rope_theta = get_double(rp, what, "rope_theta", std::nullopt);
  }
  // Sliding windows as transformers resolves them: Mistral slides every layer when
  // sliding_window is set (MistralConfig's default is 4096 when the key is absent);
  // Qwen2/Qwen3 only with use_sliding_window, and then the layers listed as
  // "sliding_attention" in layer_types, else those >= max_window_layers (default 28).
  // Llama has no sliding window.
  if (c.arch == LlamaArch::kMistral) {
    if (!j.contains("sliding_window")) c.sliding_window = 4096;
    else if (present(j, "sliding_window") && !(present(j, "use_sliding_window") && !get_bool(j, what, "use_sliding_window", true)))
      c.sliding_window = get_int(j, what, "sliding_window", std::nullopt);
  } else if (qwen && get_bool(j, what, "use_sliding_window", false)) {
    const int64_t window = j.contains("sliding_window") ? (present(j, "sliding_window") ? get_int(j, what, "sliding_window", std::nullopt) : 0)
                                                        : 4096;
    bool any_sliding = false;
    if (present(j, "layer_types")) {
      const json& lt = j.at("layer_types");
      if (!lt.is_array()) field_fail(what, "layer_types", "must be a list of strings");
      for (const auto& e : lt) any_sliding = any_sliding || (e.is_string() && e.get<std::string>() == "sliding_attention");
    } else {
      any_sliding = get_int(j, what, "max_window_layers", 28) < c.num_hidden_layers;
    }
    if (window > 0 && any_sliding) c.sliding_window = window;
  }
  return llama_config_checked(c, what);
}

void llama_check_max_length(const LlamaConfig& cfg, int64_t max_length, const std::string& what) {
  if (!cfg.sliding_window || max_length <= *cfg.sliding_window) return;
  throw std::runtime_error(what + ": sequences of up to " + std::to_string(max_length) + " tokens (max_length) exceed the " +
                           llama_arch_class(cfg.arch) + " sliding_window of " + std::to_string(*cfg.sliding_window) +
                           " tokens; sliding-window attention is not implemented, so the model would attend further back "
                           "than it was trained to: use max_length <= " +
                           std::to_string(*cfg.sliding_window) + " (dpo_preprocess --max_length)");
}

LlamaConfig llama_config_load(const std::string& path) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) throw std::runtime_error(path + ": not found (a Hugging Face model directory needs config.json)");
  const std::string text = json_read_file(path, kJsonConfigMaxBytes);
  return llama_config_from_json(json_parse_strict(text, path), path);
}

json llama_config_to_json(const LlamaConfig& cfg_in) {
  LlamaConfig c = llama_config_checked(cfg_in);
  json j = c.raw.is_object() ? c.raw : json::object();
  for (const char* k : {"rope_parameters", "dtype", "_name_or_path"}) j.erase(k);
  j["architectures"] = json::array({llama_arch_class(c.arch)});
  j["model_type"] = llama_arch_model_type(c.arch);
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["head_dim"] = c.head_dim;
  j["hidden_act"] = "silu";
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope_theta;
  switch (c.rope_scaling.type) {
    case RopeScaling::Type::kNone: j["rope_scaling"] = nullptr; break;
    case RopeScaling::Type::kLinear: j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", c.rope_scaling.factor}}; break;
    case RopeScaling::Type::kLlama3:
      j["rope_scaling"] = {{"rope_type", "llama3"},
                           {"factor", c.rope_scaling.factor},
                           {"low_freq_factor", c.rope_scaling.low_freq_factor},
                           {"high_freq_factor", c.rope_scaling.high_freq_factor},
                           {"original_max_position_embeddings", c.rope_scaling.original_max_position_embeddings}};
      break;
  }
  j["vocab_size"] = c.vocab_size;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["torch_dtype"] = dtype_name(c.torch_dtype);
  j["bos_token_id"] = c.bos_token_id;
  // Keep a list of end tokens (Llama 3) if it still starts with ours.
  const bool keep_eos_list = j.contains("eos_token_id") && j["eos_token_id"].is_array() && !j["eos_token_id"].empty() &&
                             j["eos_token_id"][0] == c.eos_token_id;
  if (!keep_eos_list) j["eos_token_id"] = c.eos_token_id;
  j["pad_token_id"] = c.pad_token_id ? json(*c.pad_token_id) : json(nullptr);
  j["initializer_range"] = c.initializer_range;
  j["attention_dropout"] = 0.0;
  if (!j.contains("use_cache")) j["use_cache"] = true;
  switch (c.arch) {
    case LlamaArch::kLlama:
      j["attention_bias"] = c.attention_bias;
      j["mlp_bias"] = c.mlp_bias;
      if (!j.contains("pretraining_tp")) j["pretraining_tp"] = 1;
      break;
    case LlamaArch::kMistral:
      // Absent means 4096 to MistralConfig: write the window we ran with.
      j["sliding_window"] = c.sliding_window ? json(*c.sliding_window) : json(nullptr);
      break;
    case LlamaArch::kQwen3:
      j["attention_bias"] = c.attention_bias;
      [[fallthrough]];
    case LlamaArch::kQwen2:
      if (!c.sliding_window) {
        j["use_sliding_window"] = false;
        if (!j.contains("sliding_window")) j["sliding_window"] = nullptr;
      }
      if (!j.contains("max_window_layers")) j["max_window_layers"] = c.num_hidden_layers;
      break;
  }
  return j;
}

// ---------------------------------------------------------------------------
// RoPE

torch::Tensor llama_rope_inv_freq(const LlamaConfig& cfg) {
  const int64_t D = cfg.head_dim;
  // As transformers: 1 / theta ** (arange(0, D, 2, int64).float() / D), in fp32.
  torch::Tensor exponent = torch::arange(0, D, 2, torch::kInt64).to(torch::kFloat32) / static_cast<double>(D);
  torch::Tensor inv_freq = 1.0 / torch::pow(cfg.rope_theta, exponent).to(torch::kFloat32);
  const RopeScaling& r = cfg.rope_scaling;
  if (r.type == RopeScaling::Type::kLinear) {
    inv_freq = inv_freq / r.factor;
  } else if (r.type == RopeScaling::Type::kLlama3) {
    // transformers _compute_llama3_parameters: long wavelengths slowed by
    // `factor`, short ones kept, a smooth blend in between.
    const double old_ctx = static_cast<double>(r.original_max_position_embeddings);
    const double low_wavelen = old_ctx / r.low_freq_factor;
    const double high_wavelen = old_ctx / r.high_freq_factor;
    constexpr double kPi = 3.14159265358979323846;
    torch::Tensor wavelen = 2 * kPi / inv_freq;
    torch::Tensor scaled = torch::where(wavelen > low_wavelen, inv_freq / r.factor, inv_freq);
    torch::Tensor smooth = (old_ctx / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
    torch::Tensor smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled;
    torch::Tensor medium = (wavelen >= high_wavelen).logical_and(wavelen <= low_wavelen);
    inv_freq = torch::where(medium, smoothed, scaled);
  }
  return inv_freq;
}

std::pair<torch::Tensor, torch::Tensor> llama_rope_cos_sin(const LlamaConfig& cfg, int64_t T, const torch::Device& device) {
  torch::Tensor inv_freq = llama_rope_inv_freq(cfg);                             // (D/2)
  torch::Tensor pos = torch::arange(T, torch::kInt64).to(torch::kFloat32);        // (T)
  torch::Tensor freqs = torch::outer(pos, inv_freq);                              // (T, D/2)
  torch::Tensor emb = torch::cat({freqs, freqs}, -1);                             // (T, D)
  return {emb.cos().to(device), emb.sin().to(device)};
}

namespace {

// (..., D): cat(-x2, x1) where x1, x2 are the halves of the last dim.
torch::Tensor rotate_half(const torch::Tensor& x) {
  const int64_t h = x.size(-1) / 2;
  return torch::cat({-x.narrow(-1, h, h), x.narrow(-1, 0, h)}, -1);
}

torch::Tensor frozen_param(torch::nn::Module& m, const std::string& name, torch::Tensor t) {
  return m.register_parameter(name, std::move(t), /*requires_grad=*/false);
}

// silu(gate) * up keeping only gate and up for backward: silu(gate) is recomputed there
// and the backward writes its gradients into the buffers of gate, up and that
// recomputation. The same ATen ops as autograd's silu + mul, so the same numbers, with
// 4 instead of 6 (T, F) tensors alive at the peak of an MLP's backward (-0.18 GB per
// 1536-token row at Llama-3-8B's F = 14336) and one fewer kept between forward and backward.
class SwigluFn : public torch::autograd::Function<SwigluFn> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& gate,
                               const torch::Tensor& up) {
    ctx->save_for_backward({gate, up});
    return torch::silu(gate) * up;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    torch::Tensor gate = saved[0], up = saved[1];
    const torch::Tensor& g = grads[0];
    // gate and up belong to this node only (the projections keep neither their inputs'
    // products nor their outputs), so their buffers can take the gradients.
    torch::Tensor grad_up = torch::silu(gate).mul_(g);                    // g * silu(gate)
    torch::Tensor grad_silu = up.mul_(g);                                 // g * up
    torch::Tensor grad_gate = at::silu_backward_out(gate, grad_silu, gate);  // in place: silu'(gate) * grad_silu
    return {grad_gate, grad_up};
  }
};

}  // namespace

// ---------------------------------------------------------------------------
// Modules

LlamaRMSNormImpl::LlamaRMSNormImpl(int64_t dim, double eps_, torch::ScalarType dtype) : eps(eps_) {
  weight = frozen_param(*this, "weight", torch::ones({dim}, torch::TensorOptions().dtype(dtype)));
}

torch::Tensor LlamaRMSNormImpl::forward(const torch::Tensor& x) {
  torch::Tensor xf = x.to(torch::kFloat32);
  torch::Tensor var = xf.pow(2).mean(-1, /*keepdim=*/true);
  xf = xf * torch::rsqrt(var + eps);
  return weight * xf.to(x.scalar_type());
}

LlamaAttentionImpl::LlamaAttentionImpl(const LlamaConfig& cfg, torch::ScalarType dtype)
    : num_heads(cfg.num_attention_heads), num_kv_heads(cfg.num_key_value_heads), head_dim(cfg.head_dim) {
  const int64_t C = cfg.hidden_size, HD = num_heads * head_dim, KD = num_kv_heads * head_dim;
  const bool qkv_bias = cfg.attention_bias || cfg.qkv_bias;
  q_proj = register_module("q_proj", FrozenLinear(C, HD, qkv_bias));
  k_proj = register_module("k_proj", FrozenLinear(C, KD, qkv_bias));
  v_proj = register_module("v_proj", FrozenLinear(C, KD, qkv_bias));
  o_proj = register_module("o_proj", FrozenLinear(HD, C, cfg.attention_bias));
  if (cfg.qk_norm) {
    q_norm = register_module("q_norm", LlamaRMSNorm(head_dim, cfg.rms_norm_eps, dtype));
    k_norm = register_module("k_norm", LlamaRMSNorm(head_dim, cfg.rms_norm_eps, dtype));
  }
}

torch::Tensor LlamaAttentionImpl::forward(const torch::Tensor& x, const AttentionInputs& in) {
  const int64_t B = x.size(0), T = x.size(1), H = num_heads, K = num_kv_heads, D = head_dim;
  torch::Tensor q = q_proj(x).reshape({B, T, H, D});
  torch::Tensor k = k_proj(x).reshape({B, T, K, D});
  if (q_norm) {  // Qwen3: RMSNorm over each head's D features, before RoPE
    q = q_norm(q);
    k = k_norm(k);
  }
  torch::Tensor v = v_proj(x).reshape({B, T, K, D});
  torch::Tensor c = in.cos.unsqueeze(2).to(q.scalar_type()), s = in.sin.unsqueeze(2).to(q.scalar_type());  // (B|1, T, 1, D)
  q = q * c + rotate_half(q) * s;
  k = k * c + rotate_half(k) * s;
  torch::Tensor out;  // (B, T, H, D)
  if (in.layout) {
    out = attention_chunked(q, k, v, in.layout);
  } else {
    out = attention_dense(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), in.allowed).transpose(1, 2);
  }
  return o_proj(out.reshape({B, T, H * D}));
}

LlamaMLPImpl::LlamaMLPImpl(const LlamaConfig& cfg) {
  gate_proj = register_module("gate_proj", FrozenLinear(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias));
  up_proj = register_module("up_proj", FrozenLinear(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias));
  down_proj = register_module("down_proj", FrozenLinear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias));
}

namespace {
// The MLP on all of x at once. Under no-grad, silu and the product in place (the same
// kernels as silu and mul, so the same numbers): two (N, F) tensors alive instead of
// four; under grad, SwigluFn.
torch::Tensor mlp_whole(LlamaMLPImpl& m, const torch::Tensor& x) {
  torch::Tensor gate = m.gate_proj(x);
  torch::Tensor up = m.up_proj(x);
  if (!torch::GradMode::is_enabled()) {
    torch::silu_(gate);
    gate.mul_(up);
    up = torch::Tensor();
    return m.down_proj(gate);
  }
  if (gate.requires_grad() || up.requires_grad()) return m.down_proj(SwigluFn::apply(gate, up));
  return m.down_proj(torch::silu(gate) * up);
}
}  // namespace

torch::Tensor LlamaMLPImpl::forward(const torch::Tensor& x) {
  const int64_t N = x.dim() >= 2 ? x.numel() / std::max<int64_t>(1, x.size(-1)) : 0;
  if (tile_tokens <= 0 || N <= tile_tokens) return mlp_whole(*this, x);
  // Tokens are independent in the MLP: tiles along the flattened token dim. Under grad
  // each tile is checkpointed (its (tile, F) tensors recomputed in backward); under
  // no-grad the tiles cost nothing extra and only one tile's tensors exist at once.
  const bool grad = torch::GradMode::is_enabled();
  const torch::Tensor flat = x.reshape({-1, x.size(-1)});
  auto self = std::static_pointer_cast<LlamaMLPImpl>(shared_from_this());
  std::vector<torch::Tensor> parts;
  torch::Tensor out;
  for (int64_t t0 = 0; t0 < N; t0 += tile_tokens) {
    const int64_t n = std::min(tile_tokens, N - t0);
    const torch::Tensor xt = flat.narrow(0, t0, n);
    if (grad) {
      parts.push_back(checkpoint([self](const torch::Tensor& t) { return mlp_whole(*self, t); }, xt));
      continue;
    }
    torch::Tensor y = mlp_whole(*this, xt);
    if (!out.defined()) out = torch::empty({N, y.size(-1)}, y.options());
    out.narrow(0, t0, n).copy_(y);
  }
  if (grad) out = torch::cat(parts, 0);
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = out.size(-1);
  return out.view(shape);
}

LlamaDecoderLayerImpl::LlamaDecoderLayerImpl(const LlamaConfig& cfg, int64_t index_, torch::ScalarType dtype)
    : index(index_) {
  self_attn = register_module("self_attn", LlamaAttention(cfg, dtype));
  mlp = register_module("mlp", LlamaMLP(cfg));
  input_layernorm = register_module("input_layernorm", LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype));
  post_attention_layernorm =
      register_module("post_attention_layernorm", LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype));
}

torch::Tensor LlamaDecoderLayerImpl::forward(const torch::Tensor& x, const AttentionInputs& in) {
  torch::Tensor h = x + self_attn(input_layernorm(x), in);
  if (hook) h = hook(index, h);
  return h + mlp(post_attention_layernorm(h));
}

LlamaTableImpl::LlamaTableImpl(int64_t rows, int64_t cols, torch::ScalarType dtype) {
  weight = frozen_param(*this, "weight", torch::zeros({rows, cols}, torch::TensorOptions().dtype(dtype)));
}

void LlamaTableImpl::store_as(torch::ScalarType dtype) {
  if (weight.scalar_type() == dtype) return;
  torch::NoGradGuard ng;
  weight.set_data(weight.to(dtype));
}

torch::ScalarType llama_table_dtype(torch::ScalarType stored, torch::ScalarType compute, const torch::Device& device) {
  const bool half = stored == torch::kBFloat16 || stored == torch::kFloat16;
  return half && compute == torch::kFloat32 && device.is_cpu() ? stored : compute;
}

LlamaBackboneImpl::LlamaBackboneImpl(const LlamaConfig& cfg, torch::ScalarType dtype) {
  embed_tokens = register_module("embed_tokens",
                                 LlamaTable(cfg.vocab_size, cfg.hidden_size, llama_table_dtype(cfg.torch_dtype, dtype)));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < cfg.num_hidden_layers; ++i) {
    LlamaDecoderLayer layer(cfg, i, dtype);
    layers->push_back(layer);
    layer_list.push_back(layer);
  }
  norm = register_module("norm", LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype));
}

LlamaModelImpl::LlamaModelImpl(const LlamaConfig& cfg, torch::ScalarType compute_dtype)
    : cfg_(llama_config_checked(cfg)), dtype_(compute_dtype) {
  if (dtype_ != torch::kFloat32 && dtype_ != torch::kFloat16 && dtype_ != torch::kBFloat16)
    throw std::runtime_error(std::string("LlamaModel: compute dtype ") + c10::toString(dtype_) +
                             " is not supported (float32, float16, bfloat16)");
  model = register_module("model", LlamaBackbone(cfg_, dtype_));
  if (!cfg_.tie_word_embeddings)
    lm_head = register_module("lm_head", LlamaTable(cfg_.vocab_size, cfg_.hidden_size, llama_table_dtype(cfg_.torch_dtype, dtype_)));
}

void LlamaModelImpl::set_table_dtype(torch::ScalarType dtype) {
  model->embed_tokens->store_as(dtype);
  if (lm_head) lm_head->store_as(dtype);
}

torch::Tensor LlamaModelImpl::lm_logits(const torch::Tensor& h) const {
  const torch::Tensor w = lm_head_weight();
  if (w.scalar_type() == h.scalar_type()) return torch::matmul(h, w.t()).to(torch::kFloat32);
  // A half table under fp32 compute: ~32 MiB of it widened at a time.
  const int64_t V = w.size(0), C = w.size(1);
  const int64_t block = std::max<int64_t>(1, (int64_t{8} << 20) / std::max<int64_t>(C, 1));
  std::vector<torch::Tensor> parts;
  for (int64_t v0 = 0; v0 < V; v0 += block)
    parts.push_back(torch::matmul(h, w.narrow(0, v0, std::min(block, V - v0)).to(h.scalar_type()).t()).to(torch::kFloat32));
  return parts.size() == 1 ? parts[0] : torch::cat(parts, -1);
}

torch::Tensor LlamaModelImpl::lm_head_weight() const {
  if (mts_enabled_ && mts_head_.defined()) return mts_head_.scalar_type() == dtype_ ? mts_head_ : mts_head_.to(dtype_);
  return cfg_.tie_word_embeddings ? model->embed_tokens->weight : lm_head->weight;
}

torch::Tensor LlamaModelImpl::embed_weight() const {
  if (mts_enabled_ && mts_embed_.defined()) return mts_embed_;
  return model->embed_tokens->weight;
}

void LlamaModelImpl::set_modules_to_save(torch::Tensor embed, torch::Tensor head) {
  for (const torch::Tensor* t : {&embed, &head})
    if (t->defined() && (t->dim() != 2 || t->size(0) != cfg_.vocab_size || t->size(1) != cfg_.hidden_size))
      throw std::runtime_error("LlamaModel::set_modules_to_save: a table must be (vocab_size, hidden_size) = (" +
                               std::to_string(cfg_.vocab_size) + ", " + std::to_string(cfg_.hidden_size) + "), got " +
                               c10::str(t->sizes()));
  mts_embed_ = std::move(embed);
  mts_head_ = std::move(head);
}

void LlamaModelImpl::set_mlp_tile_tokens(int64_t tokens) {
  if (tokens < 0) throw std::runtime_error("LlamaModel: MLP tile tokens must be >= 0, got " + std::to_string(tokens));
  for (auto& layer : model->layer_list) layer->mlp->tile_tokens = tokens;
}

void LlamaModelImpl::set_layer_hook(LayerHook hook) {
  for (auto& layer : model->layer_list) layer->hook = hook;
}

torch::Tensor LlamaModelImpl::embed(const torch::Tensor& input_ids_in) {
  if (input_ids_in.dim() != 2)
    throw std::runtime_error("LlamaModel::forward: input_ids must be (B, T), got " + c10::str(input_ids_in.sizes()));
  if (c10::isFloatingType(input_ids_in.scalar_type()) || input_ids_in.scalar_type() == torch::kBool)
    throw std::runtime_error("LlamaModel::forward: input_ids must be an integer tensor");
  const int64_t B = input_ids_in.size(0), T = input_ids_in.size(1), C = cfg_.hidden_size;
  const torch::Device dev = model->embed_tokens->weight.device();
  torch::Tensor ids = input_ids_in.to(dev, torch::kInt64);
  if (ids.numel() > 0) {
    const int64_t lo = ids.min().item<int64_t>(), hi = ids.max().item<int64_t>();
    if (lo < 0 || hi >= cfg_.vocab_size)
      throw std::runtime_error("LlamaModel::forward: token id " + std::to_string(lo < 0 ? lo : hi) +
                               " outside the vocabulary [0, " + std::to_string(cfg_.vocab_size) + ")");
  }
  torch::Tensor h = embed_weight().index_select(0, ids.reshape({-1})).view({B, T, C});  // (B, T, C)
  if (h.scalar_type() != dtype_) h = h.to(dtype_);  // an fp32 trainable copy under a bf16 model
  return h;
}

torch::Tensor LlamaModelImpl::run_layers(torch::Tensor h, const AttentionInputs& in) {
  const bool ckpt = checkpointing_ && torch::GradMode::is_enabled();
  for (auto& layer : model->layer_list) {
    if (ckpt) {
      std::shared_ptr<LlamaDecoderLayerImpl> impl = layer.ptr();  // kept alive by the graph
      h = checkpoint([impl, in](const torch::Tensor& x) { return impl->forward(x, in); }, h);
    } else {
      h = layer->forward(h, in);
    }
  }
  return model->norm(h);
}

namespace {
bool chunked_applies(AttentionKernel k, torch::ScalarType dtype, const torch::Device& dev) {
  return k == AttentionKernel::kChunked && dtype == torch::kFloat32 && dev.is_cpu();
}
}  // namespace

torch::Tensor LlamaModelImpl::hidden_states(const torch::Tensor& input_ids_in, const torch::Tensor& attention_mask) {
  if (!attention_mask.defined() || attention_mask.sizes() != input_ids_in.sizes())
    throw std::runtime_error("LlamaModel::forward: attention_mask must have the shape of input_ids " +
                             c10::str(input_ids_in.sizes()));
  const torch::Device dev = model->embed_tokens->weight.device();
  if (chunked_applies(attention_kernel_, dtype_, dev) && input_ids_in.dim() == 2) {
    if (auto layout = attention_layout_from_mask(attention_mask))
      return hidden_states(input_ids_in, std::make_shared<const AttentionLayout>(std::move(*layout)));
  }
  torch::Tensor h = embed(input_ids_in);
  const int64_t B = h.size(0), T = h.size(1);
  if (cfg_.sliding_window && T > *cfg_.sliding_window)
    throw std::runtime_error("LlamaModel::forward: " + std::to_string(T) + " tokens exceed the model's sliding_window (" +
                             std::to_string(*cfg_.sliding_window) +
                             "), which is not implemented; use sequences of at most sliding_window tokens");
  AttentionInputs in;
  auto [cos, sin] = llama_rope_cos_sin(cfg_, T, dev);  // (T, D)
  in.cos = cos.unsqueeze(0);
  in.sin = sin.unsqueeze(0);
  torch::Tensor causal = torch::ones({T, T}, torch::TensorOptions().dtype(torch::kBool).device(dev)).tril();
  torch::Tensor keys = attention_mask.to(dev).ne(0).view({B, 1, 1, T});
  in.allowed = causal.view({1, 1, T, T}).logical_and(keys);  // (B, 1, T, T)
  return run_layers(h, in);
}

torch::Tensor LlamaModelImpl::hidden_states(const torch::Tensor& input_ids, std::shared_ptr<const AttentionLayout> layout) {
  if (!layout) throw std::runtime_error("LlamaModel::forward: no attention layout");
  attention_layout_check(*layout);
  if (input_ids.dim() != 2 || input_ids.size(0) != layout->rows || input_ids.size(1) != layout->tokens)
    throw std::runtime_error("LlamaModel::forward: input_ids " + c10::str(input_ids.sizes()) + " do not match the layout (" +
                             std::to_string(layout->rows) + ", " + std::to_string(layout->tokens) + ")");
  torch::Tensor h = embed(input_ids);
  const torch::Device dev = h.device();
  const int64_t B = layout->rows, T = layout->tokens;
  const int64_t max_pos = layout->position_ids.numel() > 0 ? layout->position_ids.max().item<int64_t>() : 0;
  if (layout->position_ids.numel() > 0 && layout->position_ids.min().item<int64_t>() < 0)
    throw std::runtime_error("LlamaModel::forward: negative position id in the layout");
  if (cfg_.sliding_window && max_pos + 1 > *cfg_.sliding_window)
    throw std::runtime_error("LlamaModel::forward: position " + std::to_string(max_pos) + " exceeds the model's sliding_window (" +
                             std::to_string(*cfg_.sliding_window) +
                             "), which is not implemented; use sequences of at most sliding_window tokens");
  AttentionInputs in;
  auto [cos, sin] = llama_rope_cos_sin(cfg_, max_pos + 1, dev);  // (P, D)
  torch::Tensor pos = layout->position_ids.reshape({-1}).to(dev);
  in.cos = cos.index_select(0, pos).view({B, T, -1});
  in.sin = sin.index_select(0, pos).view({B, T, -1});
  if (chunked_applies(attention_kernel_, dtype_, dev)) {
    in.layout = layout;
  } else {
    in.allowed = attention_layout_dense_mask(*layout).to(dev);
  }
  return run_layers(h, in);
}

torch::Tensor LlamaModelImpl::forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask) {
  return lm_logits(hidden_states(input_ids, attention_mask));  // (B, T, V)
}

torch::Tensor LlamaModelImpl::forward(const torch::Tensor& input_ids, std::shared_ptr<const AttentionLayout> layout) {
  return lm_logits(hidden_states(input_ids, std::move(layout)));  // (B, T, V)
}

std::vector<std::pair<std::string, FrozenLinear>> LlamaModelImpl::named_projections() const {
  std::vector<std::pair<std::string, FrozenLinear>> out;
  for (const auto& layer : model->layer_list) {
    const std::string p = "model.layers." + std::to_string(layer->index) + ".";
    out.emplace_back(p + "self_attn.q_proj", layer->self_attn->q_proj);
    out.emplace_back(p + "self_attn.k_proj", layer->self_attn->k_proj);
    out.emplace_back(p + "self_attn.v_proj", layer->self_attn->v_proj);
    out.emplace_back(p + "self_attn.o_proj", layer->self_attn->o_proj);
    out.emplace_back(p + "mlp.gate_proj", layer->mlp->gate_proj);
    out.emplace_back(p + "mlp.up_proj", layer->mlp->up_proj);
    out.emplace_back(p + "mlp.down_proj", layer->mlp->down_proj);
  }
  return out;
}

// ---------------------------------------------------------------------------
// Loading, random init, saving

namespace {

// The dense tensors (everything but the projections) in checkpoint order.
std::vector<std::pair<std::string, torch::Tensor>> dense_tables(LlamaModelImpl& m) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  out.emplace_back("model.embed_tokens.weight", m.model->embed_tokens->weight);
  for (const auto& layer : m.model->layer_list) {
    const std::string p = "model.layers." + std::to_string(layer->index) + ".";
    out.emplace_back(p + "input_layernorm.weight", layer->input_layernorm->weight);
    out.emplace_back(p + "post_attention_layernorm.weight", layer->post_attention_layernorm->weight);
    if (layer->self_attn->q_norm) {
      out.emplace_back(p + "self_attn.q_norm.weight", layer->self_attn->q_norm->weight);
      out.emplace_back(p + "self_attn.k_norm.weight", layer->self_attn->k_norm->weight);
    }
  }
  out.emplace_back("model.norm.weight", m.model->norm->weight);
  if (!m.config().tie_word_embeddings) out.emplace_back("lm_head.weight", m.lm_head->weight);
  return out;
}


}  // namespace

LlamaModel llama_load(const std::string& dir, const QuantOptions& q, torch::Device device) {
  try {
    const std::string cfg_path = (fs::path(dir) / "config.json").string();
    LlamaConfig cfg = llama_config_load(cfg_path);
    HfCheckpoint ckpt(dir);
    const std::string src = (fs::path(dir) / ckpt.source()).string();
    LlamaModel model(cfg, q.compute_dtype);
    auto tables = dense_tables(*model);
    auto projections = model->named_projections();

    std::vector<std::string> missing;
    for (const auto& [name, t] : tables)
      if (!ckpt.has(name)) missing.push_back(name);
    for (const auto& [name, p] : projections) {
      if (!ckpt.has(name + ".weight")) missing.push_back(name + ".weight");
      if (p->has_bias() && !ckpt.has(name + ".bias")) missing.push_back(name + ".bias");
    }
    if (!missing.empty()) {
      std::string list;
      for (size_t i = 0; i < missing.size() && i < 12; ++i) list += (i ? ", " : "") + missing[i];
      if (missing.size() > 12) list += ", ... (" + std::to_string(missing.size()) + " in all)";
      std::string hint;
      if (!cfg.tie_word_embeddings && !ckpt.has("lm_head.weight"))
        hint = " (config.json has tie_word_embeddings false, so lm_head.weight is required)";
      throw std::runtime_error(src + " lacks tensors that config.json requires: " + list + hint);
    }

    torch::NoGradGuard no_grad;
    for (auto& [name, param] : tables) {
      const std::string file = (fs::path(dir) / ckpt.file_of(name)).string();
      torch::Tensor view = *ckpt.find(name);
      const auto t = view.scalar_type();
      if (t != torch::kFloat32 && t != torch::kFloat16 && t != torch::kBFloat16)
        throw std::runtime_error(file + ": tensor " + name + " has dtype " + c10::toString(t) +
                                 ", expected F32, F16 or BF16");
      if (view.sizes() != param.sizes())
        throw std::runtime_error(file + ": tensor " + name + " has shape " + shape_str(view.sizes()) +
                                 ", config.json implies " + shape_str(param.sizes()));
      // The embedding / lm_head tables keep a half-precision file's own dtype on the CPU
      // (llama_table_dtype; config.json's torch_dtype gave the first guess).
      LlamaTable table = name == "model.embed_tokens.weight" ? model->model->embed_tokens
                         : name == "lm_head.weight"          ? model->lm_head
                                                             : LlamaTable{nullptr};
      const torch::ScalarType keep = table ? llama_table_dtype(t, q.compute_dtype) : param.scalar_type();
      if (name == "model.embed_tokens.weight" && !cfg.tie_word_embeddings && device.is_cpu() && keep == t) {
        // The untied embedding table stays in the file, mapped copy-on-write: a step reads
        // only its tokens' rows, so only those pages become resident (1.05 GB of bf16 rows
        // on Llama-3-8B, of which a 1,536-token pair touches a few MB).
        param.set_data(ckpt.map_copy_on_write(name, /*random_access=*/true));
        continue;
      }
      if (table) table->store_as(keep);
      param.copy_(view);  // converts to the table's / compute dtype; the view stays in the mapping
      ckpt.release_pages(name);
    }
    TensorLookup lookup = [&ckpt](const std::string& n) { return ckpt.find(n); };
    const std::vector<std::string> names = ckpt.names();  // sorted
    for (auto& [name, proj] : projections) {
      try {
        proj->load(lookup, name, q);
      } catch (const std::exception& e) {
        throw std::runtime_error("loading " + name + " from " + (fs::path(dir) / ckpt.file_of(name + ".weight")).string() +
                                 ": " + e.what());
      }
      // The projection holds its own (quantized) copy now: drop the file's pages it read
      // (weight, bias, a pre-quantized checkpoint's absmax/quant_map/... entries) from
      // the resident set, so loading a 16 GB checkpoint never holds more than a tensor of it.
      const std::string prefix = name + ".";
      for (auto it = std::lower_bound(names.begin(), names.end(), prefix);
           it != names.end() && it->compare(0, prefix.size(), prefix) == 0; ++it)
        ckpt.release_pages(*it);
    }
    if (device != torch::Device(torch::kCPU)) {
      model->set_table_dtype(llama_table_dtype(cfg.torch_dtype, q.compute_dtype, device));
      model->to(device);
    }
    return model;
  } catch (const std::exception& e) {
    throw std::runtime_error("loading model " + dir + ": " + e.what());
  }
}

LlamaModel llama_init_random(const LlamaConfig& cfg_in, uint64_t seed, const QuantOptions& q) {
  LlamaConfig cfg = llama_config_checked(cfg_in);
  LlamaModel model(cfg, q.compute_dtype);
  at::Generator gen = at::detail::createCPUGenerator(seed);
  const double std_dev = cfg.initializer_range;
  auto normal = [&](int64_t rows, int64_t cols) {
    return torch::empty({rows, cols}, torch::kFloat32).normal_(0.0, std_dev, gen);
  };
  // A table drawn in place: the weight itself when fp32; else fp32 blocks of rows
  // rounded into it. normal_ draws all uniforms of a tensor, then transforms them 16 at
  // a time, so blocks of a multiple of 16 values give the numbers of one whole draw.
  auto fill_table = [&](torch::Tensor& w) {
    const int64_t rows = w.size(0), cols = w.size(1);
    const int64_t block = std::max<int64_t>(1, (int64_t{4} << 20) / std::max<int64_t>(cols, 1));
    if (w.scalar_type() == torch::kFloat32) {
      w.normal_(0.0, std_dev, gen);
    } else if (block < rows && (block * cols) % 16 == 0 && ((rows % block) * cols) % 16 == 0) {
      for (int64_t r0 = 0; r0 < rows; r0 += block) {
        const int64_t n = std::min(block, rows - r0);
        w.narrow(0, r0, n).copy_(normal(n, cols));
      }
    } else {
      w.copy_(normal(rows, cols));
    }
  };
  torch::NoGradGuard no_grad;
  {
    torch::Tensor& w = model->model->embed_tokens->weight;
    fill_table(w);
    if (cfg.pad_token_id && *cfg.pad_token_id >= 0 && *cfg.pad_token_id < cfg.vocab_size) w[*cfg.pad_token_id].zero_();
  }
  for (auto& [name, proj] : model->named_projections()) {
    proj->set_weight(normal(proj->out_features(), proj->in_features()), q);
    if (proj->has_bias()) proj->set_bias(torch::zeros({proj->out_features()}));  // nn.Linear biases: HF zeroes them
  }
  if (!cfg.tie_word_embeddings) fill_table(model->lm_head->weight);
  return model;
}

void llama_save_hf(LlamaModel& model, const std::string& dir, torch::ScalarType dtype, int64_t max_shard_bytes) {
  try {
    if (dtype != torch::kFloat32 && dtype != torch::kFloat16 && dtype != torch::kBFloat16)
      throw std::runtime_error(std::string("dtype ") + c10::toString(dtype) + " is not supported (float32, float16, bfloat16)");
    // Tensors in HF state_dict order, each produced only when written.
    struct Item {
      std::string name;
      std::vector<int64_t> shape;
      std::function<torch::Tensor()> get;
    };
    std::vector<Item> items;
    auto tables = dense_tables(*model);
    std::map<std::string, torch::Tensor> table_by_name(tables.begin(), tables.end());
    auto table_item = [&](const std::string& name) {
      torch::Tensor t = table_by_name.at(name);
      items.push_back({name, t.sizes().vec(), [t] { return t; }});
    };
    table_item("model.embed_tokens.weight");
    auto projections = model->named_projections();
    for (size_t i = 0; i < projections.size(); ++i) {
      FrozenLinear p = projections[i].second;
      items.push_back({projections[i].first + ".weight", {p->out_features(), p->in_features()}, [p] { return p->dense_weight(); }});
      if (p->has_bias()) items.push_back({projections[i].first + ".bias", {p->out_features()}, [p] { return p->bias(); }});
      if (i % 7 == 6) {
        const std::string pre = "model.layers." + std::to_string(i / 7) + ".";
        if (table_by_name.count(pre + "self_attn.q_norm.weight")) {
          table_item(pre + "self_attn.q_norm.weight");
          table_item(pre + "self_attn.k_norm.weight");
        }
        table_item(pre + "input_layernorm.weight");
        table_item(pre + "post_attention_layernorm.weight");
      }
    }
    table_item("model.norm.weight");
    if (!model->config().tie_word_embeddings) table_item("lm_head.weight");

    const int64_t esize = static_cast<int64_t>(c10::elementSize(dtype));
    std::vector<std::vector<size_t>> shards(1);
    std::vector<int64_t> shard_bytes(1, 0);
    int64_t total = 0;
    for (size_t i = 0; i < items.size(); ++i) {
      int64_t bytes = esize;
      for (int64_t d : items[i].shape) bytes *= d;
      if (max_shard_bytes > 0 && shard_bytes.back() > 0 && shard_bytes.back() + bytes > max_shard_bytes) {
        shards.emplace_back();
        shard_bytes.push_back(0);
      }
      shards.back().push_back(i);
      shard_bytes.back() += bytes;
      total += bytes;
    }
    const size_t n = shards.size();
    std::vector<std::string> files;
    if (n == 1) {
      files.push_back("model.safetensors");
    } else {
      char buf[64];
      for (size_t s = 0; s < n; ++s) {
        std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", s + 1, n);
        files.push_back(buf);
      }
    }
    fs::create_directories(dir);
    torch::NoGradGuard no_grad;
    json weight_map = json::object();
    for (size_t s = 0; s < n; ++s) {
      std::vector<SafetensorsEntry> entries;
      std::map<std::string, const Item*> by_name;
      for (size_t i : shards[s]) {
        entries.push_back({items[i].name, dtype, items[i].shape});
        by_name[items[i].name] = &items[i];
        weight_map[items[i].name] = files[s];
      }
      safetensors_save_lazy((fs::path(dir) / files[s]).string(), std::move(entries),
                            [&](const SafetensorsEntry& e) {
                              return by_name.at(e.name)->get().detach().to(torch::kCPU).to(dtype).contiguous();
                            },
                            {{"format", "pt"}});
    }
    if (n > 1) {
      json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
      write_file_atomic((fs::path(dir) / "model.safetensors.index.json").string(), index.dump(2) + "\n");
    }
    LlamaConfig cfg = model->config();
    cfg.torch_dtype = dtype;
    write_file_atomic((fs::path(dir) / "config.json").string(), llama_config_to_json(cfg).dump(2) + "\n");

    // Stale weights of an earlier save would shadow or mix with these
    // (loaders take model.safetensors before the index).
    const std::set<std::string> keep(files.begin(), files.end());
    static const std::regex kShard("model-[0-9]{5}-of-[0-9]{5}\\.safetensors");
    for (const auto& ent : fs::directory_iterator(dir)) {
      const std::string f = ent.path().filename().string();
      if (f == "model.safetensors.index.json") {
        if (n == 1) fs::remove(ent.path());
      } else if ((f == "model.safetensors" || std::regex_match(f, kShard)) && !keep.count(f)) {
        fs::remove(ent.path());
      }
    }
  } catch (const std::exception& e) {
    throw std::runtime_error("saving model to " + dir + ": " + e.what());
  }
}

}  // namespace dpo
