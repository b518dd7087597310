// The frozen base projection of a decoder layer (q,k,v,o,gate,up,down): the
// base weight is dense or NF4 (see core/nf4.h, core/linear4bit.h), and an
// optional LoRA adapter (core/lora.h) adds scaling * B(A(dropout(x))).
//
// Legend: N = rows of x (any leading dims flattened), I = in_features,
// O = out_features, r = LoRA rank.
//
// An optional frozen bias (O) (Qwen2 q/k/v, Llama attention_bias/mlp_bias) stays
// dense in the compute dtype also when the weight is NF4 (as bitsandbytes' Linear4bit).
//
// Parameters: only lora_A (r, I) and lora_B (O, r) are registered (trainable);
// the base weight and bias are neither parameters nor buffers (an NF4 base must never be
// converted by Module::to(dtype)); the to() overrides move it explicitly.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Generator.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include "core/nf4.h"  // Nf4Tensor, TensorLookup

namespace dpo {

struct LoraConfig;  // core/lora.h

/// How the frozen base weights are stored and computed.
struct QuantOptions {
  /// Store the seven projections in NF4 (bitsandbytes layout) instead of dense.
  bool load_in_4bit = false;
  /// Quantize the per-block absmax values again (bitsandbytes compress_statistics).
  bool double_quant = false;
  /// dtype of the matmuls (fp32 on CPU, bf16 on CUDA).
  torch::ScalarType compute_dtype = torch::kFloat32;
};

class FrozenLinearImpl : public torch::nn::Module {
 public:
  FrozenLinearImpl(int64_t in_features, int64_t out_features, bool bias = false);

  /// Sets the frozen base weight (O, I) of any float dtype; quantizes it when
  /// opts.load_in_4bit. The tensor is not kept (NF4) or converted to compute dtype.
  void set_weight(const torch::Tensor& weight /* (O, I) */, const QuantOptions& opts);

  /// Sets an already-quantized base (O, I).
  void set_weight_nf4(Nf4Tensor w, const QuantOptions& opts);

  /// Sets the frozen bias (O) (converted to the compute dtype); only with has_bias().
  void set_bias(const torch::Tensor& bias /* (O) */);

  /// Loads `<prefix>.weight` through lookup: dense, or the bitsandbytes 4-bit layout
  /// (recognised by `<prefix>.weight.absmax`; used as is when opts.load_in_4bit, else
  /// dequantized), and `<prefix>.bias` when has_bias(). Throws std::runtime_error
  /// naming the missing/ill-shaped tensor.
  void load(const TensorLookup& lookup, const std::string& prefix, const QuantOptions& opts);
  using torch::nn::Module::load;  // the serialize::InputArchive overload stays visible

  /// x (..., I) -> (..., O): base(x) [+ bias] [+ scaling * (dropout(x) @ A^T) @ B^T when a
  /// LoRA adapter is present and enabled; dropout only in training mode].
  torch::Tensor forward(const torch::Tensor& x);

  /// The base weight (O, I) in the compute dtype (dequantized if NF4). A copy for NF4.
  torch::Tensor dense_weight() const;

  /// The frozen bias (O) in the compute dtype; undefined without one.
  const torch::Tensor& bias() const { return bias_; }
  bool has_bias() const { return has_bias_; }

  int64_t in_features() const { return in_; }
  int64_t out_features() const { return out_; }

  /// True when the base is stored in NF4.
  bool is_4bit() const { return nf4_.has_value(); }
  /// The NF4 base; throws unless is_4bit().
  const Nf4Tensor& nf4_weight() const;
  const QuantOptions& quant_options() const { return opts_; }

  /// The checkpoint tensors of the base: `<prefix>.weight` (dense, compute dtype) or
  /// the bitsandbytes 4-bit layout (see nf4_to_bnb_tensors), then `<prefix>.bias`. CPU tensors.
  std::vector<std::pair<std::string, torch::Tensor>> base_state(const std::string& prefix) const;

  // ---- LoRA ---------------------------------------------------------------
  /// Adds (or re-initializes) the adapter: lora_A (r, I) ~ U(-1/sqrt(I), 1/sqrt(I))
  /// (kaiming_uniform_(a=sqrt(5)), as PEFT / nn.Linear.reset_parameters), lora_B (O, r)
  /// = 0, drawn from `gen` (a CPU generator) in that order; fp32, on the base's device.
  /// scaling = alpha / r, or alpha / sqrt(r) with use_rslora. Enables the adapter.
  void add_lora(const LoraConfig& cfg, at::Generator gen);
  /// Same with a fresh CPU generator seeded with `seed`.
  void add_lora(const LoraConfig& cfg, uint64_t seed);
  bool has_lora() const { return lora_A_.defined(); }
  /// Adapters off: forward returns the base output only (the DPO reference pass).
  void set_lora_enabled(bool enabled) { lora_enabled_ = enabled; }
  bool lora_enabled() const { return lora_enabled_; }
  torch::Tensor& lora_A() { return lora_A_; }  // (r, I)
  torch::Tensor& lora_B() { return lora_B_; }  // (O, r)
  const torch::Tensor& lora_A() const { return lora_A_; }
  const torch::Tensor& lora_B() const { return lora_B_; }
  double lora_scaling() const { return scaling_; }
  double lora_dropout() const { return dropout_; }
  int64_t lora_r() const { return has_lora() ? lora_A_.size(0) : 0; }

  /// dequant(W) + scaling * B @ A (O, I) in `dtype` (W alone without an adapter).
  torch::Tensor merged_weight(torch::ScalarType dtype) const;
  /// Replaces the base by merged_weight (dense, compute dtype) and removes the adapter
  /// (the bias is unchanged: LoRA adds no bias).
  void merge_lora();

  // Module::to would also convert the uint8 NF4 data; these move the base explicitly.
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Device device, bool non_blocking = false) override;

 private:
  torch::Tensor base_forward(const torch::Tensor& x);
  void load_weight(const TensorLookup& lookup, const std::string& prefix, const QuantOptions& opts);

  int64_t in_, out_;
  bool has_bias_;
  QuantOptions opts_;
  torch::Tensor bias_;             // (O) compute dtype, frozen; undefined until set
  torch::Tensor weight_;           // (O, I) compute dtype, frozen (dense storage); undefined when NF4
  std::optional<Nf4Tensor> nf4_;   // (O, I) NF4 base when is_4bit()
  torch::Tensor lora_A_;           // (r, I) trainable, registered as "lora_A"
  torch::Tensor lora_B_;           // (O, r) trainable, registered as "lora_B"
  double scaling_ = 0.0;
  double dropout_ = 0.0;
  bool lora_enabled_ = false;
};
TORCH_MODULE(FrozenLinear);

}  // namespace dpo
