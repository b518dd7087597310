// runtime/torch_cuda: libtorch_cuda.so is not part of a process until CUDA is asked for,
// and loading it then registers libtorch's CUDA kernels as linking it would have.
// Its own executable (linked like the tools: dpo_runtime + DPO_TORCH_LIBRARIES), so that
// nothing else in the process has loaded the library before the first check.
#include <gtest/gtest.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <fstream>
#include <string>

#include "runtime/torch_cuda.h"

namespace dpo {
namespace {

bool mapped(const std::string& name) {
  std::ifstream maps("/proc/self/maps");
  for (std::string line; std::getline(maps, line);)
    if (line.find(name) != std::string::npos) return true;
  return false;
}

bool cuda_kernel_for_add() {
  auto op = c10::Dispatcher::singleton().findSchema({"aten::add", "Tensor"});
  return op.has_value() && op->hasKernelForDispatchKey(c10::DispatchKey::CUDA);
}

TEST(TorchCuda, LoadedOnlyWhenAskedAndThenRegistersCudaKernels) {
  // A CPU tensor op first: libtorch_cpu is fully up, libtorch_cuda still absent.
  EXPECT_EQ(torch::ones({2}).add(1).sum().item<float>(), 4.0f);
  ASSERT_FALSE(mapped("libtorch_cuda.so")) << "the executable links libtorch_cuda.so: check DPO_TORCH_LIBRARIES";
  EXPECT_FALSE(cuda_kernel_for_add());
  EXPECT_FALSE(mapped("libcublas")) << "cuBLAS came in without libtorch_cuda";

  std::string why;
  ASSERT_TRUE(load_torch_cuda(&why)) << why;  // the wheel's libtorch is a CUDA build
  EXPECT_TRUE(mapped("libtorch_cuda.so"));
  EXPECT_TRUE(cuda_kernel_for_add()) << "libtorch_cuda.so loaded but registered no CUDA kernel";
  EXPECT_TRUE(load_torch_cuda());  // once per process: the same answer again

  // With the library loaded the availability answer is libtorch's own device count.
  EXPECT_EQ(torch_cuda_available(), torch::cuda::device_count() > 0);
  if (!torch_cuda_available())
    EXPECT_NE(torch_cuda_unavailable_reason().find("no CUDA device is visible"), std::string::npos)
        << torch_cuda_unavailable_reason();
  else
    EXPECT_EQ(torch_cuda_unavailable_reason(), "");
}

}  // namespace
}  // namespace dpo
