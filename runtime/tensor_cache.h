// A caching allocator for libtorch's large CPU tensors, so that a training step does
// not fault in (and the kernel zero) fresh pages for every activation.
//
// Why: limit_heap_retention() makes every allocation >= 1 MiB its own mmap, returned
// to the OS when freed, which keeps the Llama-2-7B step's peak RSS low but makes every
// large tensor of every step a new mapping: each 4 KiB page is faulted in and zeroed
// by the kernel (measured: more system than user time in a DPO step, docs/benchmarks.md).
// A step allocates the same sizes again and again (layer after layer, step after step),
// so freed blocks are kept mapped and handed out again.
//
// A request that no cached block fits (within 1/8 of its size) resizes the cached block
// nearest in size instead of mapping fresh memory: a larger one is cut to the request
// (its tail unmapped; no page of the rest faults again), a smaller one grows with
// mremap (its pages move with it; only the added pages fault in). Step lengths vary
// (every batch has other sequence lengths), so most misses of a step are of this kind.
//
// Peak-memory rule: a request that no cached block fits first unmaps cached blocks
// (least recently freed first) worth at least the memory it adds before mapping it.
// Resident memory (live tensors + cache) therefore grows only when the cache is empty,
// i.e. the peak RSS is at most the peak of live tensors (+ the 1/8 size tolerance of a
// reused block): the cache never raises the peak that the plain mmap policy has.
//
// Small tensors (< kMinBytes) go to the allocator that was installed before.
#pragma once
#include <cstddef>
#include <cstdint>

namespace dpo {

struct TensorCacheStats {
  int64_t hits = 0;            // large allocations served from the cache
  int64_t misses = 0;          // large allocations that no cached block fitted
  int64_t resized = 0;         // misses served by resizing a cached block (only added pages fault in)
  int64_t evictions = 0;       // cached blocks unmapped to make room
  int64_t cached_bytes = 0;    // bytes mapped and free in the cache now
  int64_t live_bytes = 0;      // bytes of large blocks in use now
  int64_t peak_live_bytes = 0; // max of live_bytes
  int64_t peak_mapped_bytes = 0; // max of live + cached
};

/// Installs the cache as libtorch's CPU allocator (idempotent; thread-safe). Tensors
/// allocated before keep their own deleters. DPO_TENSOR_CACHE=0 in the environment
/// turns it off (returns false).
bool install_tensor_cache();
/// True when installed.
bool tensor_cache_installed();
/// Off: new large tensors come from the previous allocator again (for comparisons);
/// blocks already handed out still return to the cache. On by default.
void tensor_cache_set_enabled(bool on);
/// Unmaps every cached (free) block; blocks in use are not touched.
void tensor_cache_release();
TensorCacheStats tensor_cache_stats();

/// Requests at least this large are cached (1 MiB, the mmap threshold of limit_heap_retention).
constexpr size_t kTensorCacheMinBytes = size_t{1} << 20;

}  // namespace dpo
