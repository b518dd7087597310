// AdamW (torch.optim.AdamW semantics) and clip_grad_norm (torch.nn.utils.clip_grad_norm_).
#include "core/optim.h"
#include "util/tensor_str.h"

#include <cmath>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

namespace dpo {
namespace {

using torch::Tensor;


constexpr int64_t kGrain = 1 << 14;  // elements per parallel chunk

bool cpu_fp32_contiguous(const Tensor& t) {
  return t.is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous();
}

}  // namespace

bool hf_weight_decays(const std::string& name) {
  if (name.find("bias") != std::string::npos) return false;
  // Module name = the name without its last component (".weight").
  const auto dot = name.rfind('.');
  const std::string module = dot == std::string::npos ? name : name.substr(0, dot);
  const std::string tail = "norm";
  const bool is_norm = module.size() >= tail.size() && module.compare(module.size() - tail.size(), tail.size(), tail) == 0;
  return !is_norm;
}

AdamW::AdamW(std::vector<std::pair<std::string, Tensor>> params, AdamWOptions opts) : opts_(std::move(opts)) {
  auto bad = [](const std::string& what) { throw std::runtime_error("AdamW: " + what); };
  if (!(opts_.beta1 >= 0 && opts_.beta1 < 1)) bad("--adam_beta1 must be in [0, 1); got " + std::to_string(opts_.beta1));
  if (!(opts_.beta2 >= 0 && opts_.beta2 < 1)) bad("--adam_beta2 must be in [0, 1); got " + std::to_string(opts_.beta2));
  if (!(opts_.eps >= 0) || !std::isfinite(opts_.eps)) bad("--adam_epsilon must be >= 0; got " + std::to_string(opts_.eps));
  if (!(opts_.weight_decay >= 0) || !std::isfinite(opts_.weight_decay)) {
    bad("--weight_decay must be >= 0; got " + std::to_string(opts_.weight_decay));
  }
  if (!opts_.decays) opts_.decays = hf_weight_decays;
  std::set<std::string> seen;
  for (auto& [name, t] : params) {
    if (!t.defined()) bad("parameter '" + name + "' is an undefined tensor");
    if (!t.is_floating_point()) bad("parameter '" + name + "' is not a float tensor");
    if (!seen.insert(name).second) bad("parameter name '" + name + "' is given twice");
    Param p;
    p.name = name;
    p.value = t;
    p.exp_avg = torch::zeros(t.sizes(), t.options().dtype(torch::kFloat));
    p.exp_avg_sq = torch::zeros(t.sizes(), t.options().dtype(torch::kFloat));
    p.decay = opts_.decays(name);
    params_.push_back(std::move(p));
  }
}

void AdamW::step(double lr) {
  if (!(lr >= 0) || !std::isfinite(lr)) throw std::runtime_error("AdamW::step: learning rate must be >= 0; got " + std::to_string(lr));
  at::NoGradGuard no_grad;
  const double b1 = opts_.beta1, b2 = opts_.beta2, eps = opts_.eps;
  for (auto& p : params_) {
    const Tensor& grad = p.value.grad();
    if (!grad.defined()) continue;
    if (grad.sizes() != p.value.sizes()) {
      throw std::runtime_error("AdamW::step: grad of '" + p.name + "' has shape " + shape_str(grad) +
                               ", the parameter " + shape_str(p.value));
    }
    p.step += 1;
    const double wd = p.decay ? opts_.weight_decay : 0.0;
    const double bc1 = 1.0 - std::pow(b1, static_cast<double>(p.step));
    const double bc2 = 1.0 - std::pow(b2, static_cast<double>(p.step));
    const double step_size = lr / bc1;
    const double bc2_sqrt = std::sqrt(bc2);
    if (cpu_fp32_contiguous(p.value) && grad.is_cpu()) {
      // Fused: one pass over p, g, m, v with torch's fp32 arithmetic order.
      Tensor g32 = grad.to(torch::kFloat).contiguous();
      float* pv = p.value.data_ptr<float>();
      const float* gv = g32.data_ptr<float>();
      float* mv = p.exp_avg.data_ptr<float>();
      float* vv = p.exp_avg_sq.data_ptr<float>();
      const float decay = static_cast<float>(1.0 - lr * wd);
      const float fb1 = static_cast<float>(b1), fb2 = static_cast<float>(b2);
      const float omb1 = static_cast<float>(1.0 - b1), omb2 = static_cast<float>(1.0 - b2);
      const float fbc2 = static_cast<float>(bc2_sqrt), feps = static_cast<float>(eps);
      const float fstep = static_cast<float>(step_size);
      const bool do_decay = wd != 0.0;
      at::parallel_for(0, p.value.numel(), kGrain, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          float x = pv[i];
          if (do_decay) x *= decay;
          const float g = gv[i];
          const float m = mv[i] * fb1 + g * omb1;
          const float v = vv[i] * fb2 + g * g * omb2;
          mv[i] = m;
          vv[i] = v;
          const float denom = std::sqrt(v) / fbc2 + feps;
          pv[i] = x - fstep * (m / denom);
        }
      });
    } else {
      Tensor g32 = grad.to(p.exp_avg.device(), torch::kFloat);
      const bool fp32 = p.value.scalar_type() == torch::kFloat;
      Tensor x = fp32 ? p.value : p.value.to(torch::kFloat);
      if (wd != 0.0) x.mul_(1.0 - lr * wd);
      p.exp_avg.mul_(b1).add_(g32, 1.0 - b1);
      p.exp_avg_sq.mul_(b2).addcmul_(g32, g32, 1.0 - b2);
      Tensor denom = (p.exp_avg_sq.sqrt() / bc2_sqrt).add_(eps);
      x.addcdiv_(p.exp_avg, denom, -step_size);
      if (!fp32) p.value.copy_(x);
    }
  }
}

void AdamW::zero_grad(bool set_to_none) {
  for (auto& p : params_) {
    Tensor g = p.value.grad();
    if (!g.defined()) continue;
    if (set_to_none) {
      p.value.mutable_grad() = Tensor();
    } else {
      at::NoGradGuard no_grad;
      g.detach().zero_();
    }
  }
}

std::vector<std::pair<std::string, Tensor>> AdamW::state() const {
  std::vector<std::pair<std::string, Tensor>> out;
  out.reserve(params_.size() * 3);
  for (const auto& p : params_) {
    out.emplace_back(p.name + ".exp_avg", p.exp_avg.to(torch::kCPU).clone());
    out.emplace_back(p.name + ".exp_avg_sq", p.exp_avg_sq.to(torch::kCPU).clone());
    out.emplace_back(p.name + ".step", torch::full({}, p.step, torch::kLong));
  }
  return out;
}

void AdamW::load_state(const std::vector<std::pair<std::string, Tensor>>& state) {
  std::map<std::string, Tensor> by_name;
  for (const auto& [k, t] : state) {
    if (!by_name.emplace(k, t).second) throw std::runtime_error("AdamW::load_state: key '" + k + "' appears twice");
  }
  auto take = [&](const std::string& key) {
    auto it = by_name.find(key);
    if (it == by_name.end()) {
      throw std::runtime_error("AdamW::load_state: missing key '" + key +
                               "'; the optimizer state was saved for other trainable parameters (LoRA r or "
                               "target modules changed?)");
    }
    Tensor t = it->second;
    by_name.erase(it);
    if (!t.defined()) throw std::runtime_error("AdamW::load_state: key '" + key + "' is an undefined tensor");
    return t;
  };
  // Validate everything before touching the state, so a bad file changes nothing.
  struct Loaded {
    Tensor m, v;
    int64_t step;
  };
  std::vector<Loaded> loaded;
  for (const auto& p : params_) {
    Loaded l;
    for (const char* suffix : {".exp_avg", ".exp_avg_sq"}) {
      const std::string key = p.name + suffix;
      Tensor t = take(key);
      if (t.sizes() != p.value.sizes() || !t.is_floating_point()) {
        throw std::runtime_error("AdamW::load_state: '" + key + "' has shape " + shape_str(t) + " (" +
                                 std::string(c10::toString(t.scalar_type())) + "), the parameter " +
                                 shape_str(p.value) + " float");
      }
      (std::string(suffix) == ".exp_avg" ? l.m : l.v) = t;
    }
    const std::string key = p.name + ".step";
    Tensor s = take(key);
    if (s.numel() != 1) throw std::runtime_error("AdamW::load_state: '" + key + "' must hold one value; got " + shape_str(s));
    const double sv = s.to(torch::kCPU, torch::kDouble).item<double>();
    if (!(sv >= 0) || sv != std::floor(sv)) {
      throw std::runtime_error("AdamW::load_state: '" + key + "' = " + std::to_string(sv) + " is not a step count");
    }
    l.step = static_cast<int64_t>(sv);
    loaded.push_back(l);
  }
  if (!by_name.empty()) {
    throw std::runtime_error("AdamW::load_state: unexpected key '" + by_name.begin()->first +
                             "' (no such trainable parameter)");
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    auto& p = params_[i];
    p.exp_avg.copy_(loaded[i].m.to(p.exp_avg.device(), torch::kFloat));
    p.exp_avg_sq.copy_(loaded[i].v.to(p.exp_avg_sq.device(), torch::kFloat));
    p.step = loaded[i].step;
  }
}

double clip_grad_norm(const std::vector<Tensor>& params, double max_norm) {
  at::NoGradGuard no_grad;
  std::vector<Tensor> grads;
  for (const auto& p : params) {
    if (p.defined() && p.grad().defined()) grads.push_back(p.grad());
  }
  double sq = 0.0;
  Tensor device_sq;  // accumulates non-CPU-fp32 grads without a sync per tensor
  for (const auto& g : grads) {
    if (cpu_fp32_contiguous(g)) {
      const float* d = g.data_ptr<float>();
      sq += at::parallel_reduce(
          0, g.numel(), kGrain, 0.0,
          [&](int64_t b, int64_t e, double acc) {
            for (int64_t i = b; i < e; ++i) acc += static_cast<double>(d[i]) * d[i];
            return acc;
          },
          std::plus<double>());
    } else {
      Tensor s = g.to(torch::kDouble).square().sum();
      device_sq = device_sq.defined() ? device_sq + s.to(device_sq.device()) : s;
    }
  }
  if (device_sq.defined()) sq += device_sq.item<double>();
  const double norm = std::sqrt(sq);
  if (max_norm <= 0 || !std::isfinite(norm)) return norm;
  const double coef = max_norm / (norm + 1e-6);
  if (coef >= 1.0) return norm;
  for (auto& g : grads) {
    if (cpu_fp32_contiguous(g)) {
      float* d = g.data_ptr<float>();
      const float c = static_cast<float>(coef);
      at::parallel_for(0, g.numel(), kGrain, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) d[i] *= c;
      });
    } else {
      g.mul_(coef);
    }
  }
  return norm;
}

}  // namespace dpo
