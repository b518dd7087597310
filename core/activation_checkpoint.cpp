#include "core/activation_checkpoint.h"

#include <mutex>
#include <utility>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <ATen/core/ivalue.h>
#include <torch/autograd.h>

namespace dpo {
namespace {

// Carries fn through the autograd context (saved_data holds IValues only).
struct FnHolder : torch::CustomClassHolder {
  std::function<torch::Tensor(const torch::Tensor&)> fn;
};

torch::Tensor get_rng_state(const at::Generator& gen_const) {
  at::Generator gen = gen_const;  // shares the generator implementation
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_rng_state(const at::Generator& gen_const, const torch::Tensor& state) {
  at::Generator gen = gen_const;
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

// Only called for CUDA tensors, which cannot exist in a CPU-only build, so a
// CPU build never reaches the CUDA hooks.
const at::Generator& device_generator(const torch::Device& d) {
  return at::globalContext().defaultGenerator(d);
}

struct CheckpointFunction : torch::autograd::Function<CheckpointFunction> {
  // x: the block input; dummy: an empty tensor that requires grad when x does
  // not, so that autograd still calls backward (the block's own trainable
  // tensors are invisible to the node).
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, torch::Tensor x, torch::Tensor dummy,
                               c10::intrusive_ptr<FnHolder> holder) {
    ctx->saved_data["cpu_rng"] = get_rng_state(at::detail::getDefaultCPUGenerator());
    if (x.is_cuda()) ctx->saved_data["dev_rng"] = get_rng_state(device_generator(x.device()));
    ctx->saved_data["fn"] = c10::IValue::make_capsule(holder);
    ctx->saved_data["x_requires_grad"] = x.requires_grad();
    ctx->save_for_backward({x});
    return holder->fn(x);  // grad mode is off inside Function::forward
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    torch::Tensor x = ctx->get_saved_variables()[0];
    auto* holder = static_cast<FnHolder*>(ctx->saved_data["fn"].toCapsule().get());
    const bool x_requires_grad = ctx->saved_data["x_requires_grad"].toBool();

    // Replay the forward's random numbers; afterwards put back the state that
    // was current now, so the recomputation is invisible to the caller.
    const at::Generator& cpu_gen = at::detail::getDefaultCPUGenerator();
    torch::Tensor cpu_now = get_rng_state(cpu_gen);
    set_rng_state(cpu_gen, ctx->saved_data["cpu_rng"].toTensor());
    torch::Tensor dev_now;
    if (x.is_cuda()) {
      dev_now = get_rng_state(device_generator(x.device()));
      set_rng_state(device_generator(x.device()), ctx->saved_data["dev_rng"].toTensor());
    }
    torch::Tensor x_in = x.detach();
    x_in.set_requires_grad(x_requires_grad);
    try {
      torch::AutoGradMode grad_on(true);
      torch::Tensor y = holder->fn(x_in);
      if (y.requires_grad() && grad_out[0].defined()) torch::autograd::backward({y}, {grad_out[0]});
    } catch (...) {
      set_rng_state(cpu_gen, cpu_now);
      if (x.is_cuda()) set_rng_state(device_generator(x.device()), dev_now);
      throw;
    }
    set_rng_state(cpu_gen, cpu_now);
    if (x.is_cuda()) set_rng_state(device_generator(x.device()), dev_now);
    torch::Tensor gx = x_requires_grad ? x_in.grad() : torch::Tensor();
    return {gx, torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor checkpoint(std::function<torch::Tensor(const torch::Tensor&)> fn, const torch::Tensor& x) {
  if (!torch::GradMode::is_enabled()) return fn(x);
  auto holder = c10::make_intrusive<FnHolder>();
  holder->fn = std::move(fn);
  // Always defined (autograd records every tensor input); requires grad only
  // when x does not.
  torch::Tensor dummy = torch::empty({0}, x.options().requires_grad(!x.requires_grad()));
  return CheckpointFunction::apply(x, dummy, holder);
}

}  // namespace dpo
