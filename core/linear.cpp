#include "core/linear.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <stdexcept>

#include "core/linear4bit.h"
#include "core/lora.h"
#include "util/tensor_str.h"

namespace dpo {

namespace {


}  // namespace

FrozenLinearImpl::FrozenLinearImpl(int64_t in_features, int64_t out_features, bool bias)
    : in_(in_features), out_(out_features), has_bias_(bias) {
  if (in_features <= 0 || out_features <= 0)
    throw std::runtime_error("FrozenLinear: in_features and out_features must be positive, got " +
                             std::to_string(in_features) + " and " + std::to_string(out_features));
}

void FrozenLinearImpl::set_weight(const torch::Tensor& weight, const QuantOptions& opts) {
  if (weight.dim() != 2 || weight.size(0) != out_ || weight.size(1) != in_) {
    throw std::runtime_error("FrozenLinear: weight of shape " + shape_str(weight) + ", expected " +
                             std::to_string(out_) + "x" + std::to_string(in_));
  }
  opts_ = opts;
  if (opts.load_in_4bit) {
    nf4_ = nf4_quantize(weight, opts.double_quant);
    weight_ = torch::Tensor();
  } else {
    nf4_.reset();
    weight_ = weight.detach().to(opts.compute_dtype).contiguous().clone();
    weight_.set_requires_grad(false);
  }
  if (bias_.defined()) bias_ = bias_.to(opts.compute_dtype);
}

void FrozenLinearImpl::set_weight_nf4(Nf4Tensor w, const QuantOptions& opts) {
  if (w.shape.size() != 2 || w.shape[0] != out_ || w.shape[1] != in_)
    throw std::runtime_error("FrozenLinear: NF4 weight of " + std::to_string(w.shape.size()) +
                             " dims does not match " + std::to_string(out_) + "x" + std::to_string(in_));
  opts_ = opts;
  opts_.load_in_4bit = true;
  opts_.double_quant = w.double_quant();
  const torch::Device dev = weight_.defined() ? weight_.device() : nf4_ ? nf4_->device() : w.device();
  nf4_ = w.device() == dev ? std::move(w) : nf4_to(w, dev);
  weight_ = torch::Tensor();
  if (bias_.defined()) bias_ = bias_.to(opts_.compute_dtype);
}

void FrozenLinearImpl::set_bias(const torch::Tensor& bias) {
  if (!has_bias_) throw std::runtime_error("FrozenLinear: this projection has no bias");
  if (bias.dim() != 1 || bias.size(0) != out_)
    throw std::runtime_error("FrozenLinear: bias of shape " + shape_str(bias) + ", expected " + std::to_string(out_));
  if (!at::isFloatingType(bias.scalar_type())) throw std::runtime_error("FrozenLinear: bias is not floating point");
  const torch::Device dev = weight_.defined() ? weight_.device() : nf4_ ? nf4_->device() : bias.device();
  bias_ = bias.detach().to(dev, opts_.compute_dtype).contiguous().clone();
  bias_.set_requires_grad(false);
}

void FrozenLinearImpl::load(const TensorLookup& lookup, const std::string& prefix, const QuantOptions& opts) {
  load_weight(lookup, prefix, opts);
  if (!has_bias_) return;
  auto b = lookup(prefix + ".bias");
  if (!b) throw std::runtime_error("missing tensor " + prefix + ".bias");
  try {
    set_bias(*b);
  } catch (const std::exception& e) {
    throw std::runtime_error("tensor " + prefix + ".bias: " + e.what());
  }
}

void FrozenLinearImpl::load_weight(const TensorLookup& lookup, const std::string& prefix, const QuantOptions& opts) {
  if (nf4_bnb_present(lookup, prefix)) {
    Nf4Tensor w = nf4_from_bnb(lookup, prefix);
    if (w.shape.size() != 2 || w.shape[0] != out_ || w.shape[1] != in_) {
      std::string s;
      for (size_t i = 0; i < w.shape.size(); ++i) s += (i ? "x" : "") + std::to_string(w.shape[i]);
      throw std::runtime_error("tensor " + prefix + ".weight.quant_state.bitsandbytes__nf4: shape " + s +
                               ", expected " + std::to_string(out_) + "x" + std::to_string(in_));
    }
    if (opts.load_in_4bit) {
      set_weight_nf4(std::move(w), opts);
    } else {
      QuantOptions dense = opts;
      set_weight(nf4_dequantize(w, torch::kFloat32), dense);
    }
    return;
  }
  auto w = lookup(prefix + ".weight");
  if (!w) throw std::runtime_error("missing tensor " + prefix + ".weight");
  try {
    set_weight(*w, opts);
  } catch (const std::exception& e) {
    throw std::runtime_error("tensor " + prefix + ".weight: " + e.what());
  }
}

torch::Tensor FrozenLinearImpl::base_forward(const torch::Tensor& x) {
  if (nf4_) return linear4bit_forward(x.scalar_type() == opts_.compute_dtype ? x : x.to(opts_.compute_dtype), *nf4_);
  if (!weight_.defined())
    throw std::runtime_error("FrozenLinear(" + std::to_string(in_) + "->" + std::to_string(out_) +
                             "): forward before set_weight/load");
  return torch::matmul(x.scalar_type() == weight_.scalar_type() ? x : x.to(weight_.scalar_type()), weight_.t());
}

torch::Tensor FrozenLinearImpl::forward(const torch::Tensor& x) {
  torch::Tensor y = base_forward(x);
  if (has_bias_) {
    if (!bias_.defined()) throw std::runtime_error("FrozenLinear: forward before the bias was set");
    y = y + bias_;
  }
  if (!has_lora() || !lora_enabled_) return y;
  // PEFT lora.Linear.forward: result + lora_B(lora_A(dropout(x))) * scaling, x cast to lora_A's dtype.
  torch::Tensor xa = x.scalar_type() == lora_A_.scalar_type() ? x : x.to(lora_A_.scalar_type());
  if (dropout_ > 0.0) xa = torch::dropout(xa, dropout_, is_training());  // default generator: replayable
  torch::Tensor delta = torch::matmul(torch::matmul(xa, lora_A_.t()), lora_B_.t()) * scaling_;
  return y + (delta.scalar_type() == y.scalar_type() ? delta : delta.to(y.scalar_type()));
}

torch::Tensor FrozenLinearImpl::dense_weight() const {
  if (nf4_) return nf4_dequantize(*nf4_, opts_.compute_dtype);
  return weight_;
}

const Nf4Tensor& FrozenLinearImpl::nf4_weight() const {
  if (!nf4_) throw std::runtime_error("FrozenLinear: the base weight is dense, not NF4");
  return *nf4_;
}

std::vector<std::pair<std::string, torch::Tensor>> FrozenLinearImpl::base_state(const std::string& prefix) const {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  if (nf4_) {
    out = nf4_to_bnb_tensors(*nf4_, prefix);
  } else {
    if (!weight_.defined()) throw std::runtime_error("FrozenLinear " + prefix + ": no base weight set");
    out.emplace_back(prefix + ".weight", weight_.to(torch::kCPU).contiguous());
  }
  if (has_bias_) {
    if (!bias_.defined()) throw std::runtime_error("FrozenLinear " + prefix + ": no bias set");
    out.emplace_back(prefix + ".bias", bias_.to(torch::kCPU).contiguous());
  }
  return out;
}

void FrozenLinearImpl::add_lora(const LoraConfig& cfg, at::Generator gen) {
  lora_config_validate(cfg);
  const int64_t r = cfg.r;
  // torch.nn.init.kaiming_uniform_(a=sqrt(5)) on (r, I): fan_in = I,
  // gain = sqrt(2 / (1 + a^2)), std = gain / sqrt(fan_in), bound = sqrt(3) * std = 1/sqrt(I).
  const double a = std::sqrt(5.0);
  const double gain = std::sqrt(2.0 / (1.0 + a * a));
  const double stdv = gain / std::sqrt(static_cast<double>(in_));
  const double bound = std::sqrt(3.0) * stdv;
  torch::NoGradGuard no_grad;
  torch::Tensor A = torch::empty({r, in_}, torch::kFloat32);
  A.uniform_(-bound, bound, gen);
  torch::Tensor B = torch::zeros({out_, r}, torch::kFloat32);
  const torch::Device dev = nf4_ ? nf4_->device() : weight_.defined() ? weight_.device() : torch::Device(torch::kCPU);
  A = A.to(dev);
  B = B.to(dev);
  if (has_lora()) {
    // Re-initialization keeps the registered Parameter objects (optimizers may hold them).
    if (lora_A_.sizes() != A.sizes() || lora_B_.sizes() != B.sizes()) {
      throw std::runtime_error("FrozenLinear: add_lora with r=" + std::to_string(r) + " on an adapter of r=" +
                               std::to_string(lora_A_.size(0)) + " (remove the adapter first)");
    }
    lora_A_.set_data(A);
    lora_B_.set_data(B);
  } else {
    lora_A_ = register_parameter("lora_A", A);
    lora_B_ = register_parameter("lora_B", B);
  }
  scaling_ = dpo::lora_scaling(cfg);
  dropout_ = cfg.dropout;
  lora_enabled_ = true;
}

void FrozenLinearImpl::add_lora(const LoraConfig& cfg, uint64_t seed) {
  add_lora(cfg, at::make_generator<at::CPUGeneratorImpl>(seed));
}

torch::Tensor FrozenLinearImpl::merged_weight(torch::ScalarType dtype) const {
  torch::NoGradGuard no_grad;
  torch::Tensor w = nf4_ ? nf4_dequantize(*nf4_, torch::kFloat32) : weight_.to(torch::kFloat32);
  if (has_lora()) w = w + torch::matmul(lora_B_.to(torch::kFloat32), lora_A_.to(torch::kFloat32)) * scaling_;
  return w.to(dtype);
}

void FrozenLinearImpl::merge_lora() {
  torch::Tensor w = merged_weight(opts_.compute_dtype);
  nf4_.reset();
  weight_ = w.contiguous();
  opts_.load_in_4bit = false;
  opts_.double_quant = false;
  if (has_lora()) {
    // Module has no unregister_parameter in libtorch 1.13: drop by clearing the dict entries.
    parameters_.erase("lora_A");
    parameters_.erase("lora_B");
    lora_A_ = torch::Tensor();
    lora_B_ = torch::Tensor();
  }
  lora_enabled_ = false;
  scaling_ = 0.0;
}

namespace {
void check_nf4_compute_dtype(bool nf4, torch::Dtype dtype) {
  if (nf4 && dtype != torch::kFloat32 && dtype != torch::kBFloat16 && dtype != torch::kFloat16)
    throw std::runtime_error(std::string("FrozenLinear: an NF4 base computes in float32, bfloat16 or float16, not ") +
                             c10::toString(dtype));
}
}  // namespace

void FrozenLinearImpl::to(torch::Device device, torch::Dtype dtype, bool non_blocking) {
  check_nf4_compute_dtype(nf4_.has_value(), dtype);
  torch::nn::Module::to(device, dtype, non_blocking);
  if (nf4_) nf4_ = nf4_to(*nf4_, device);
  opts_.compute_dtype = dtype;
  if (weight_.defined()) weight_ = weight_.to(device, dtype, non_blocking);
  if (bias_.defined()) bias_ = bias_.to(device, dtype, non_blocking);
}

void FrozenLinearImpl::to(torch::Dtype dtype, bool non_blocking) {
  check_nf4_compute_dtype(nf4_.has_value(), dtype);
  torch::nn::Module::to(dtype, non_blocking);
  opts_.compute_dtype = dtype;
  if (weight_.defined()) weight_ = weight_.to(dtype);
  if (bias_.defined()) bias_ = bias_.to(dtype);
}

void FrozenLinearImpl::to(torch::Device device, bool non_blocking) {
  torch::nn::Module::to(device, non_blocking);
  if (nf4_) nf4_ = nf4_to(*nf4_, device);
  if (weight_.defined()) weight_ = weight_.to(device, /*non_blocking=*/non_blocking);
  if (bias_.defined()) bias_ = bias_.to(device, /*non_blocking=*/non_blocking);
}

}  // namespace dpo
