// Compute threads of one rank. libtorch's intra-op pool and OpenBLAS's own
// pthreads are both set from the cores this rank owns (cores of the node /
// ranks on the node), because oversubscribed threads under mpirun cost more
// than they give (docs/benchmarks.md has the measurements).
#pragma once
#include <string>

namespace dpo {

/// Cores of this machine usable by this process (sched_getaffinity, else nproc).
int available_cores();
/// Threads of one rank when none are requested: min(cores this process may run on,
/// cores of the node / ranks on the node), at least 1 (no oversubscription whether the
/// launcher binds ranks to their own cores, to a shared socket, or not at all).
int auto_threads(int usable_cores, int online_cores, int ranks_on_node);
/// requested > 0: that many; 0: auto_threads(affinity cores, online cores, ranks_on_node). Applies it to
/// libtorch (intra- and, once, inter-op) and OpenBLAS; returns the number set.
int configure_threads(int requested, int ranks_on_node);
/// Makes every allocation of >= 1 MiB its own mmap, returned to the OS when freed
/// (glibc's default threshold grows with the tensors freed, and the heap then keeps
/// ~1.25 GB of freed activations at the Llama-2-7B shape: docs/benchmarks.md).
/// Called at the start of the tools that run models; MALLOC_MMAP_THRESHOLD_ in the
/// environment still wins.
void limit_heap_retention();

/// "torch 2 / openblas 2" for logs.
std::string describe_threads();

}  // namespace dpo
