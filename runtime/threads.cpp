#include "runtime/threads.h"

#include <dlfcn.h>
#include <malloc.h>
#include <sched.h>
#include <unistd.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>

namespace dpo {

namespace {
// OpenBLAS is reached through the BLAS libtorch links; look the symbols up at
// run time so another BLAS (or none) is not a link error.
using SetFn = void (*)(int);
using GetFn = int (*)();
SetFn blas_set() { return reinterpret_cast<SetFn>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads")); }
GetFn blas_get() { return reinterpret_cast<GetFn>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads")); }
}  // namespace

int available_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<int>(n) : 1;
}

int auto_threads(int usable_cores, int online_cores, int ranks_on_node) {
  // The node's cores shared by its ranks, but never more than this rank may run on:
  // srun --cpus-per-task / mpirun --bind-to core give each rank its own set (use it),
  // --bind-to none leaves every rank the whole node (divide it), --bind-to socket
  // gives ranks of a socket the same set (divide the node).
  const int ranks = std::max(1, ranks_on_node);
  return std::max(1, std::min(usable_cores, std::max(1, online_cores / ranks)));
}

int configure_threads(int requested, int ranks_on_node) {
  long online = sysconf(_SC_NPROCESSORS_ONLN);
  int n = requested > 0 ? requested
                        : auto_threads(available_cores(), online > 0 ? static_cast<int>(online) : available_cores(),
                                       ranks_on_node);
  at::set_num_threads(n);
  static bool inter_set = false;
  if (!inter_set) {
    // May only be set once per process, before any inter-op work.
    try {
      at::set_num_interop_threads(1);
    } catch (...) {
    }
    inter_set = true;
  }
  if (auto f = blas_set()) f(n);
  return n;
}

void limit_heap_retention() {
  if (std::getenv("MALLOC_MMAP_THRESHOLD_") == nullptr) mallopt(M_MMAP_THRESHOLD, 1 << 20);
}

std::string describe_threads() {
  std::string s = "torch " + std::to_string(at::get_num_threads());
  if (auto g = blas_get()) s += " / openblas " + std::to_string(g());
  return s;
}

}  // namespace dpo
