#include "launch/rng_state.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <torch/cuda.h>

#include <cstring>
#include <mutex>
#include <stdexcept>

#include "core/safetensors.h"
#include "runtime/torch_cuda.h"

namespace dpo {

namespace {

torch::Tensor get_state(const at::Generator& g_const) {
  at::Generator g = g_const;  // shares the implementation
  std::lock_guard<std::mutex> lock(g.mutex());
  return g.get_state();
}

void set_state(const at::Generator& g_const, const torch::Tensor& s) {
  at::Generator g = g_const;
  std::lock_guard<std::mutex> lock(g.mutex());
  g.set_state(s);
}

std::string cuda_key(int rank) { return "rank_" + std::to_string(rank) + ".cuda"; }
std::string cpu_key(int rank) { return "rank_" + std::to_string(rank); }

}  // namespace

RankGenerators default_rank_generators(const torch::Device& device) {
  RankGenerators g;
  g.cpu = at::detail::getDefaultCPUGenerator();
  if (device.is_cuda()) {
    // Context::defaultGenerator(Device) reaches the CUDA generator through libtorch's CUDA
    // hooks: no CUDA headers here, so one source serves CPU-only and CUDA libtorch builds.
    if (!dpo::torch_cuda_available())
      throw std::runtime_error("RNG state: --device cuda, but " + torch_cuda_unavailable_reason());
    g.device_type = "cuda";
    g.device = at::globalContext().defaultGenerator(device);
  } else if (!device.is_cpu()) {
    throw std::runtime_error("RNG state: unsupported device " + device.str() + " (cpu or cuda)");
  }
  return g;
}

RankRngState rng_capture(const RankGenerators& g) {
  RankRngState s;
  s.cpu = get_state(g.cpu);
  if (g.device.defined()) s.device = get_state(g.device);
  return s;
}

void rng_restore(const RankGenerators& g, const RankRngState& s) {
  if (g.device.defined() != s.device.defined())
    throw std::runtime_error(std::string("RNG state: ") +
                             (s.device.defined() ? "a device generator state but no device generator to restore it into"
                                                 : "no state for the device generator"));
  set_state(g.cpu, s.cpu);
  if (g.device.defined()) set_state(g.device, s.device);
}

std::string rng_state_bytes(const torch::Tensor& state) {
  auto c = state.contiguous().to(torch::kCPU);
  return std::string(static_cast<const char*>(c.data_ptr()), static_cast<size_t>(c.numel() * c.element_size()));
}

torch::Tensor rng_state_from_bytes(const std::string& bytes) {
  auto t = torch::empty({static_cast<int64_t>(bytes.size())}, torch::kUInt8);
  if (!bytes.empty()) std::memcpy(t.data_ptr(), bytes.data(), bytes.size());
  return t;
}

void rng_save(const std::string& path, const std::string& device_type, const std::vector<RankRngState>& ranks) {
  std::vector<std::pair<std::string, torch::Tensor>> t;
  for (size_t i = 0; i < ranks.size(); ++i) {
    const int r = static_cast<int>(i);
    t.emplace_back(cpu_key(r), ranks[i].cpu);
    if (ranks[i].device.defined() != (device_type == "cuda"))
      throw std::runtime_error("RNG state of rank " + std::to_string(r) + ": device state " +
                               (ranks[i].device.defined() ? "present" : "missing") + " in a " + device_type + " run");
    if (ranks[i].device.defined()) t.emplace_back(cuda_key(r), ranks[i].device);
  }
  safetensors_save(path, t, {{"device_type", device_type}});
}

std::string rng_file_device_type(const std::string& path) {
  SafetensorsFile f(path);
  auto it = f.metadata().find("device_type");
  return it == f.metadata().end() ? "cpu" : it->second;
}

RankRngState rng_load_rank(const std::string& path, int rank, const std::string& device_type) {
  SafetensorsFile f(path);
  auto it = f.metadata().find("device_type");
  const std::string written = it == f.metadata().end() ? "cpu" : it->second;
  if (written != device_type)
    throw std::runtime_error(path + ": dropout RNG state written by a --device " + written +
                             " run cannot continue on --device " + device_type + " (its generator differs); resume with --device " +
                             written + ", or delete this file to resume with reseeded dropout streams");
  RankRngState s;
  if (!f.has(cpu_key(rank))) throw std::runtime_error(path + ": no RNG state for rank " + std::to_string(rank));
  s.cpu = f.get(cpu_key(rank)).clone();
  if (device_type == "cuda") {
    if (!f.has(cuda_key(rank)))
      throw std::runtime_error(path + ": no CUDA RNG state for rank " + std::to_string(rank) + " (" + cuda_key(rank) + ")");
    s.device = f.get(cuda_key(rank)).clone();
  }
  return s;
}

}  // namespace dpo
