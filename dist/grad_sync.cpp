// GradSync: fused-buffer gradient averaging.
#include "dist/grad_sync.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <stdexcept>

namespace dpo {

namespace {

// Throws the same CommError on every rank when the gathered strings differ (every rank
// sees the same gathered vector, so the decision is identical everywhere).
void check_same_everywhere(Communicator& comm, const std::string& mine, const char* what) {
  const std::vector<std::string> all = comm.allgather_string(mine);
  for (size_t r = 1; r < all.size(); ++r) {
    if (all[r] != all[0]) {
      throw CommError(std::string(what) + " differs between ranks: rank 0 has [" + all[0] +
                      "], rank " + std::to_string(r) + " has [" + all[r] +
                      "]; every rank must build the same model/adapters and metric keys");
    }
  }
}

}  // namespace

GradSync::GradSync(Communicator& comm) : comm_(comm) {}

GradSync::GradSync(Communicator& comm, std::vector<torch::Tensor> params)
    : comm_(comm), params_(std::move(params)) {}

void GradSync::sync(const std::vector<torch::Tensor>& params) {
  torch::NoGradGuard no_grad;
  // 1. every param has a gradient
  std::ostringstream layout;
  layout << params.size();
  c10::ScalarType dtype = c10::ScalarType::Undefined;
  int64_t n = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const torch::Tensor& p = params[i];
    if (!p.defined()) {
      throw std::invalid_argument("grad_sync: parameter " + std::to_string(i) + " is undefined");
    }
    if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
    const torch::Tensor& g = p.grad();
    if (g.device() != params[0].grad().device()) {
      throw std::invalid_argument("grad_sync: gradient " + std::to_string(i) + " is on " +
                                  g.device().str() + ", gradient 0 on " +
                                  params[0].grad().device().str() + "; keep the adapters on one device");
    }
    dtype = dtype == c10::ScalarType::Undefined ? g.scalar_type() : c10::promoteTypes(dtype, g.scalar_type());
    layout << ';' << c10::toString(g.scalar_type()) << ':' << g.numel();
    n += g.numel();
  }
  numel_ = n;
  if (comm_.world_size() == 1) return;
  // 2. same layout on every rank
  if (layout.str() != layout_) {
    check_same_everywhere(comm_, layout.str(), "the trainable-gradient layout");
    layout_ = layout.str();
  }
  if (n == 0) return;
  const auto options = torch::TensorOptions().dtype(dtype).device(params[0].grad().device());
  if (!flat_.defined() || flat_.numel() != n || flat_.scalar_type() != dtype ||
      flat_.device() != options.device()) {
    flat_ = torch::empty({n}, options);
  }
  // Float32 CPU gradients (the CPU trainer) take plain loops: memcpy in, one pass out
  // that divides while unpacking (instead of a separate div_ pass over the buffer).
  bool fast = flat_.device().is_cpu() && dtype == c10::ScalarType::Float;
  for (const torch::Tensor& p : params) {
    fast = fast && p.grad().scalar_type() == c10::ScalarType::Float && p.grad().is_contiguous();
  }
  // 3. pack
  int64_t off = 0;
  for (const torch::Tensor& p : params) {
    const torch::Tensor& g = p.grad();
    if (fast) {
      std::memcpy(flat_.data_ptr<float>() + off, g.data_ptr<float>(), static_cast<size_t>(g.numel()) * sizeof(float));
    } else {
      flat_.narrow(0, off, g.numel()).copy_(g.reshape({-1}));
    }
    off += g.numel();
  }
  // 4. one allreduce, then the mean (a division by W, as DDP's div_, not a multiply by 1/W)
  comm_.allreduce_sum(flat_);
  if (!fast) flat_.div_(static_cast<double>(comm_.world_size()));
  // 5. unpack in place
  const float world = static_cast<float>(comm_.world_size());
  off = 0;
  for (const torch::Tensor& p : params) {
    torch::Tensor g = p.grad();
    if (fast) {
      const float* src = flat_.data_ptr<float>() + off;
      float* dst = g.data_ptr<float>();
      const int64_t m = g.numel();
      for (int64_t i = 0; i < m; ++i) dst[i] = src[i] / world;
    } else {
      g.copy_(flat_.narrow(0, off, g.numel()).view(g.sizes()));
    }
    off += g.numel();
  }
}

}  // namespace dpo
