// The Llama-family decoder as libtorch modules, computing exactly what Hugging
// Face transformers computes for LlamaForCausalLM, MistralForCausalLM,
// Qwen2ForCausalLM and Qwen3ForCausalLM: RMSNorm in fp32, RoPE in the rotate_half
// layout, grouped-query attention with causal + padding masks, SwiGLU MLP. The
// four differ only in switches of LlamaConfig: projection biases (Qwen2: q/k/v;
// Llama attention_bias / mlp_bias; Qwen3 attention_bias), an RMSNorm over each
// head of q and k before RoPE (Qwen3), head_dim != C / H. Sliding-window attention
// is not implemented: a window shorter than the sequence is refused.
// Reads and writes the HF layout (config.json + safetensors, tensor names
// "model.layers.3.mlp.down_proj.weight").
//
// Legend: B batch, T tokens, C hidden_size, F intermediate_size, V vocab_size,
// H attention heads, K key/value heads (H % K == 0), D head_dim, L layers.
//
// Frozen: embeddings, norms and lm_head are parameters with requires_grad=false;
// the seven projections per layer are FrozenLinear (dense or NF4, + LoRA added
// by core/lora). Only LoRA parameters are meant to train.
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include "core/attention.h"
#include "core/linear.h"

namespace dpo {

/// RoPE frequency scaling (config.json "rope_scaling"); kNone = plain RoPE.
struct RopeScaling {
  enum class Type { kNone, kLinear, kLlama3 };
  Type type = Type::kNone;
  double factor = 1.0;
  double low_freq_factor = 1.0;                   // llama3
  double high_freq_factor = 4.0;                  // llama3
  int64_t original_max_position_embeddings = 0;   // llama3
};

/// The architectures of config.json "architectures" / "model_type" this code runs.
enum class LlamaArch { kLlama, kMistral, kQwen2, kQwen3 };
/// "llama" | "mistral" | "qwen2" | "qwen3" (config.json model_type).
const char* llama_arch_model_type(LlamaArch a);
/// "LlamaForCausalLM" | "MistralForCausalLM" | "Qwen2ForCausalLM" | "Qwen3ForCausalLM".
const char* llama_arch_class(LlamaArch a);
/// model_type name -> arch; throws naming the supported ones.
LlamaArch llama_arch_from_model_type(const std::string& name);

/// The fields of a HF Llama config.json this code uses (HF defaults where optional).
struct LlamaConfig {
  LlamaArch arch = LlamaArch::kLlama;
  int64_t hidden_size = 0;               // C
  int64_t intermediate_size = 0;         // F
  int64_t num_hidden_layers = 0;         // L
  int64_t num_attention_heads = 0;       // H
  int64_t num_key_value_heads = 0;       // K (0 = H)
  int64_t head_dim = 0;                  // D (0 = C / H)
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  int64_t vocab_size = 0;                // V
  int64_t max_position_embeddings = 2048;
  bool tie_word_embeddings = false;
  torch::ScalarType torch_dtype = torch::kFloat32;  // dtype of the stored weights
  int64_t bos_token_id = 1;
  int64_t eos_token_id = 2;              // the first one when config.json lists several
  std::optional<int64_t> pad_token_id;
  double initializer_range = 0.02;       // std of the normal init
  bool attention_bias = false;           // biases on q, k, v and o (Llama, Qwen3 "attention_bias")
  bool qkv_bias = false;                 // biases on q, k, v only (Qwen2, always)
  bool mlp_bias = false;                 // biases on gate, up, down (Llama "mlp_bias")
  bool qk_norm = false;                  // RMSNorm over each head of q and k before RoPE (Qwen3)
  /// The window of the layers that use sliding-window attention, as transformers
  /// resolves it per architecture (Mistral: sliding_window; Qwen2/3: only with
  /// use_sliding_window and a layer >= max_window_layers or in layer_types);
  /// unset when every layer attends to the whole sequence. Not implemented:
  /// sequences longer than the window are refused.
  std::optional<int64_t> sliding_window;
  nlohmann::json raw;                    // the parsed config.json (or null)
};

/// Parses a config.json object; `what` (the file) prefixes every error.
/// Refuses other architectures, rope_scaling types other than linear/llama3,
/// non-silu activations, attention dropout, bad head counts, missing fields.
LlamaConfig llama_config_from_json(const nlohmann::json& j, const std::string& what = "config.json");
/// Reads and parses `config_json_path` (strict JSON: duplicate keys refused).
LlamaConfig llama_config_load(const std::string& config_json_path);
/// Fills defaults (K = H, D = C / H) and validates; throws naming `what` and the field.
LlamaConfig llama_config_checked(LlamaConfig cfg, const std::string& what = "config");
/// Throws (naming `what`, the window and the fix) when sequences of `max_length`
/// tokens would reach past cfg.sliding_window, which this code does not implement.
void llama_check_max_length(const LlamaConfig& cfg, int64_t max_length, const std::string& what);
/// A HF-compatible config.json of cfg.arch (architectures ["Qwen3ForCausalLM"],
/// model_type "qwen3", ...); keeps unknown keys of cfg.raw.
nlohmann::json llama_config_to_json(const LlamaConfig& cfg);

/// x * rsqrt(mean(x^2) + eps) in fp32, cast back to x's dtype, times weight.
class LlamaRMSNormImpl : public torch::nn::Module {
 public:
  LlamaRMSNormImpl(int64_t dim, double eps, torch::ScalarType dtype);
  torch::Tensor forward(const torch::Tensor& x);  // (..., C) -> (..., C)
  torch::Tensor weight;  // (C) frozen
  double eps;
};
TORCH_MODULE(LlamaRMSNorm);

/// What every attention layer of one forward needs besides its input.
struct AttentionInputs {
  torch::Tensor cos, sin;  // (B or 1, T, D) fp32: RoPE tables at every token's position
  /// Kernel: attention_chunked with this layout when set, else attention_dense with `allowed`.
  std::shared_ptr<const AttentionLayout> layout;
  torch::Tensor allowed;   // (B, 1, T, T) bool, for the dense kernel
};

/// Which attention kernel a model runs where both apply (chunked: fp32 CPU only).
enum class AttentionKernel { kDense, kChunked };

class LlamaAttentionImpl : public torch::nn::Module {
 public:
  LlamaAttentionImpl(const LlamaConfig& cfg, torch::ScalarType dtype);
  /// x (B, T, C) -> (B, T, C)
  torch::Tensor forward(const torch::Tensor& x, const AttentionInputs& in);
  FrozenLinear q_proj{nullptr};  // C -> H*D
  FrozenLinear k_proj{nullptr};  // C -> K*D
  FrozenLinear v_proj{nullptr};  // C -> K*D
  FrozenLinear o_proj{nullptr};  // H*D -> C
  LlamaRMSNorm q_norm{nullptr};  // (D) Qwen3 only: over each head of q, before RoPE
  LlamaRMSNorm k_norm{nullptr};  // (D) Qwen3 only
  int64_t num_heads, num_kv_heads, head_dim;
};
TORCH_MODULE(LlamaAttention);

class LlamaMLPImpl : public torch::nn::Module {
 public:
  explicit LlamaMLPImpl(const LlamaConfig& cfg);
  /// down(silu(gate(x)) * up(x)); x (B, T, C) -> (B, T, C)
  torch::Tensor forward(const torch::Tensor& x);
  /// > 0 and grad mode on: the MLP runs on tiles of this many tokens, each under
  /// checkpoint() (its (tile, F) intermediates recomputed in backward), so a layer's
  /// backward holds (tile, F) instead of (T, F) tensors at one more MLP forward per
  /// layer (TiledMLP, Arctic long-sequence training). 0 = off.
  int64_t tile_tokens = 0;
  FrozenLinear gate_proj{nullptr};  // C -> F
  FrozenLinear up_proj{nullptr};    // C -> F
  FrozenLinear down_proj{nullptr};  // F -> C
};
TORCH_MODULE(LlamaMLP);

/// Called on the hidden states after the attention residual of every layer
/// (instrumentation and tests, e.g. injecting a stochastic op); (layer, h) -> h.
using LayerHook = std::function<torch::Tensor(int64_t layer, const torch::Tensor& h)>;

class LlamaDecoderLayerImpl : public torch::nn::Module {
 public:
  LlamaDecoderLayerImpl(const LlamaConfig& cfg, int64_t index, torch::ScalarType dtype);
  /// x (B, T, C) -> (B, T, C)
  torch::Tensor forward(const torch::Tensor& x, const AttentionInputs& in);
  LlamaAttention self_attn{nullptr};
  LlamaMLP mlp{nullptr};
  LlamaRMSNorm input_layernorm{nullptr};
  LlamaRMSNorm post_attention_layernorm{nullptr};
  int64_t index;
  LayerHook hook;  // empty = none
};
TORCH_MODULE(LlamaDecoderLayer);

/// A frozen (N, C) table: the token embeddings, or lm_head's weight.
class LlamaTableImpl : public torch::nn::Module {
 public:
  LlamaTableImpl(int64_t rows, int64_t cols, torch::ScalarType dtype);
  /// Converts the stored values to `dtype` in place (the parameter object stays).
  void store_as(torch::ScalarType dtype);
  torch::Tensor weight;  // (rows, C) frozen
};

/// The dtype the frozen embedding and lm_head tables are kept in: a half-precision
/// checkpoint's own dtype (bf16/fp16) when the compute dtype is fp32 on the CPU (exact:
/// every half value is an fp32 value; the embedding rows and head_logps's vocabulary
/// blocks are widened where they are used, as HF QLoRA keeps these tables in their
/// 16-bit dtype), else the compute dtype. Halves their memory: 0.52 GB on Llama-2-7B,
/// 2.1 GB on Llama-3-8B.
torch::ScalarType llama_table_dtype(torch::ScalarType stored, torch::ScalarType compute,
                                    const torch::Device& device = torch::kCPU);
TORCH_MODULE(LlamaTable);

/// HF's LlamaModel: embeddings, decoder layers, final norm (registered as "model").
class LlamaBackboneImpl : public torch::nn::Module {
 public:
  LlamaBackboneImpl(const LlamaConfig& cfg, torch::ScalarType dtype);
  LlamaTable embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  std::vector<LlamaDecoderLayer> layer_list;  // the same modules, typed
  LlamaRMSNorm norm{nullptr};
};
TORCH_MODULE(LlamaBackbone);

/// HF's LlamaForCausalLM. Parameter names match the HF checkpoint names
/// ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "lm_head.weight").
class LlamaModelImpl : public torch::nn::Module {
 public:
  /// Empty weights (embeddings/lm_head uninitialized, norms 1, projections
  /// without weights): use llama_load or llama_init_random. The embedding and lm_head
  /// tables are kept in llama_table_dtype(cfg.torch_dtype, compute_dtype).
  LlamaModelImpl(const LlamaConfig& cfg, torch::ScalarType compute_dtype);

  /// input_ids (B, T) int64, attention_mask (B, T) 1 = token, 0 = padding
  /// (right padding; positions are 0..T-1) -> logits (B, T, V) fp32.
  torch::Tensor forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask);
  /// The final-norm hidden states (B, T, C) in the compute dtype (before lm_head).
  /// Positions of padding (mask 0) are unspecified (finite, never read by a loss).
  torch::Tensor hidden_states(const torch::Tensor& input_ids, const torch::Tensor& attention_mask);
  /// The same for any attention layout (shared prompts, packed rows; core/attention.h):
  /// input_ids (B, T) with layout (B, T) -> (B, T, C).
  torch::Tensor hidden_states(const torch::Tensor& input_ids, std::shared_ptr<const AttentionLayout> layout);
  /// logits (B, T, V) fp32 of a layout.
  torch::Tensor forward(const torch::Tensor& input_ids, std::shared_ptr<const AttentionLayout> layout);
  /// kChunked (default): attention_chunked wherever the compute is fp32 on the CPU;
  /// kDense: (B, H, T, T) attention everywhere (transformers' eager path).
  void set_attention_kernel(AttentionKernel k) { attention_kernel_ = k; }
  AttentionKernel attention_kernel() const { return attention_kernel_; }
  /// The lm_head weight (V, C) in use: the embedding table when tied, or the
  /// trainable copy of modules_to_save while those are enabled (then fp32). Its dtype
  /// may differ from the compute dtype (llama_table_dtype): use lm_logits or head_logps.
  torch::Tensor lm_head_weight() const;
  /// Logits (..., V) fp32 of final hidden states h (..., C): h @ lm_head^T, with a
  /// half-precision table widened one block of vocabulary rows at a time.
  torch::Tensor lm_logits(const torch::Tensor& h) const;
  /// Keeps the embedding and lm_head tables in `dtype` from now on (converted in place).
  void set_table_dtype(torch::ScalarType dtype);
  /// The token embedding table (V, C) in use (the trainable copy while enabled).
  torch::Tensor embed_weight() const;

  /// PEFT modules_to_save (core/modules_to_save.h): trainable full copies of the
  /// embedding table and/or lm_head (V, C) that replace the frozen originals while
  /// enabled; undefined = that module is not saved. A tied model gets one tensor
  /// for both. The originals stay untouched (the reference pass disables the copies,
  /// as PEFT's disable_adapter does).
  void set_modules_to_save(torch::Tensor embed, torch::Tensor head);
  void set_modules_to_save_enabled(bool on) { mts_enabled_ = on; }
  bool modules_to_save_enabled() const { return mts_enabled_; }
  const torch::Tensor& saved_embed() const { return mts_embed_; }  // (V, C) or undefined
  const torch::Tensor& saved_head() const { return mts_head_; }    // (V, C) or undefined

  /// The seven projections of every layer with HF names ("model.layers.3.mlp.down_proj"),
  /// in checkpoint order (q, k, v, o, gate, up, down per layer). Biases, where the
  /// architecture has them, belong to the projection (FrozenLinear::bias).
  std::vector<std::pair<std::string, FrozenLinear>> named_projections() const;
  const LlamaConfig& config() const { return cfg_; }
  torch::ScalarType compute_dtype() const { return dtype_; }

  /// Recompute each decoder layer in backward instead of keeping its
  /// activations (core/activation_checkpoint.h). Only matters when grad mode is on.
  void set_gradient_checkpointing(bool on) { checkpointing_ = on; }
  bool gradient_checkpointing() const { return checkpointing_; }
  /// Installs `hook` in every decoder layer (empty function removes it).
  void set_layer_hook(LayerHook hook);
  /// LlamaMLPImpl::tile_tokens of every layer (0 = off).
  void set_mlp_tile_tokens(int64_t tokens);

  LlamaBackbone model{nullptr};
  LlamaTable lm_head{nullptr};  // null when tie_word_embeddings

 private:
  LlamaConfig cfg_;
  torch::ScalarType dtype_;
  bool checkpointing_ = false;
  AttentionKernel attention_kernel_ = AttentionKernel::kChunked;
  torch::Tensor run_layers(torch::Tensor h, const AttentionInputs& in);
  torch::Tensor embed(const torch::Tensor& input_ids);  // checked ids (B, T) -> (B, T, C)
  torch::Tensor mts_embed_, mts_head_;  // (V, C) trainable copies (modules_to_save) or undefined
  bool mts_enabled_ = true;
};
TORCH_MODULE(LlamaModel);

/// RoPE tables for positions 0..T-1: cos, sin (T, D) fp32, HF layout cat(freqs, freqs).
std::pair<torch::Tensor, torch::Tensor> llama_rope_cos_sin(const LlamaConfig& cfg, int64_t T,
                                                           const torch::Device& device = torch::kCPU);
/// inv_freq (D/2) fp32 = 1 / theta^(2i/D), with cfg.rope_scaling applied.
torch::Tensor llama_rope_inv_freq(const LlamaConfig& cfg);

/// Loads a HF model directory (config.json + model.safetensors or index + shards).
/// Weights are read one tensor at a time from the mmapped files and converted to
/// q.compute_dtype (projections through FrozenLinear::load, quantized there when
/// q.load_in_4bit), so the full-precision model never exists in memory at once.
/// Tensors the model does not use are ignored; missing ones are an error listing them.
/// The model is built on the CPU, then moved to `device`.
LlamaModel llama_load(const std::string& dir, const QuantOptions& q, torch::Device device = torch::kCPU);

/// A randomly initialized model as transformers initializes one: normal(0,
/// initializer_range) for embeddings and projections (pad_token_id's embedding
/// row zero), norms 1. Generated one tensor at a time from a CPU generator
/// seeded with `seed` (deterministic; a 7B NF4 model never exists in fp32); the
/// tables are drawn in place (in blocks of rows when stored in half precision, the
/// same numbers rounded), so no second copy of a (V, C) table exists either.
LlamaModel llama_init_random(const LlamaConfig& cfg, uint64_t seed, const QuantOptions& q);

/// Writes a HF model directory: config.json (torch_dtype = dtype) and
/// model.safetensors, or, when max_shard_bytes > 0 and the weights exceed it,
/// model-0000i-of-0000n.safetensors + model.safetensors.index.json. Projections
/// are written through FrozenLinear::dense_weight() (dequantized for NF4), one
/// tensor at a time. Each file is written to a temporary name and renamed;
/// stale weight files of the other layout are removed afterwards.
/// dtype: kFloat32, kFloat16 or kBFloat16. lm_head is omitted when tied (as HF does).
void llama_save_hf(LlamaModel& model, const std::string& dir, torch::ScalarType dtype, int64_t max_shard_bytes);

}  // namespace dpo
