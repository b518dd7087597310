#include "runtime/torch_cuda.h"

#include <dlfcn.h>

#include <torch/cuda.h>

#include <filesystem>
#include <mutex>

namespace dpo {

namespace {

struct LoadResult {
  bool ok = false;
  std::string why;
};

const LoadResult& load_once() {
  static LoadResult result;
  static std::once_flag once;
  std::call_once(once, [] {
    // libtorch_cuda.so sits beside libtorch_cpu.so (wheel: torch/lib; unpacked libtorch:
    // lib/): find that directory from a libtorch_cpu function's address.
    Dl_info info{};
    if (dladdr(reinterpret_cast<void*>(&torch::cuda::device_count), &info) == 0 || info.dli_fname == nullptr) {
      result.why = "cannot locate libtorch_cpu.so (dladdr failed)";
      return;
    }
    const std::filesystem::path lib = std::filesystem::path(info.dli_fname).parent_path() / "libtorch_cuda.so";
    if (!std::filesystem::exists(lib)) {
      result.why = "this libtorch has no CUDA half (" + lib.string() + " does not exist: a CPU-only libtorch)";
      return;
    }
    // RTLD_GLOBAL: its symbols serve later-loaded CUDA libraries as at program start.
    if (dlopen(lib.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
      const char* e = dlerror();
      result.why = "loading " + lib.string() + ": " + (e ? e : "unknown dlopen error");
      return;
    }
    result.ok = true;
  });
  return result;
}

}  // namespace

bool load_torch_cuda(std::string* why) {
  const LoadResult& r = load_once();
  if (!r.ok && why) *why = r.why;
  return r.ok;
}

bool torch_cuda_available() { return load_torch_cuda() && torch::cuda::is_available(); }

std::string torch_cuda_unavailable_reason() {
  std::string why;
  if (!load_torch_cuda(&why)) return why;
  if (!torch::cuda::is_available()) return "no CUDA device is visible to this process (this machine has no GPU, or CUDA_VISIBLE_DEVICES hides it)";
  return "";
}

}  // namespace dpo
