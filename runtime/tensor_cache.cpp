#include "runtime/tensor_cache.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

namespace dpo {

namespace {

constexpr size_t kPage = 4096;
constexpr size_t kHugePage = size_t{2} << 20;

struct Block {
  void* ptr;
  size_t bytes;  // mapped size (a multiple of kPage)
};

// One cache per process: blocks live in their own mappings; `free_` holds the cached
// ones in the order they were freed (oldest first).
class TensorCache final : public c10::Allocator {
 public:
  explicit TensorCache(c10::Allocator* small) : small_(small) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < kTensorCacheMinBytes || !enabled_.load(std::memory_order_relaxed)) return small_->allocate(n);
    return allocate_large(n);
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    if (count) std::memcpy(dest, src, count);
  }

  void release() {
    std::vector<Block> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      drop.swap(free_);
      stats_.cached_bytes = 0;
    }
    for (const Block& b : drop) ::munmap(b.ptr, b.bytes);
  }

  void set_enabled(bool on) { enabled_.store(on); }

  TensorCacheStats stats() const {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }

 private:
  static void delete_block(void* ctx) {
    Block* b = static_cast<Block*>(ctx);
    instance()->give_back(b);
  }

  c10::DataPtr allocate_large(size_t n) {
    const size_t want = (n + kPage - 1) / kPage * kPage;
    std::vector<Block> drop;
    Block got{nullptr, 0};
    size_t live_add = want;  // a hit keeps its block's size
    bool resize = false;     // got is a donor block to cut or grow to `want`
    {
      std::lock_guard<std::mutex> lock(mu_);
      // Best fit within 1/8 of the request (the same shape, or a slightly longer batch).
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i) {
        const size_t b = free_[i].bytes;
        if (b >= want && b - want <= want / 8 && (best == free_.size() || b < free_[best].bytes)) best = i;
      }
      if (best != free_.size()) {
        got = free_[best];
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
        stats_.cached_bytes -= static_cast<int64_t>(got.bytes);
        live_add = got.bytes;
        ++stats_.hits;
      } else {
        ++stats_.misses;
        // The donor: the smallest cached block above the request (cut to size), else
        // the largest below it (grown); -1 = none cached.
        std::ptrdiff_t donor = -1;
        for (size_t i = 0; i < free_.size(); ++i) {
          const size_t b = free_[i].bytes;
          if (donor < 0) {
            donor = static_cast<std::ptrdiff_t>(i);
            continue;
          }
          const size_t d = free_[static_cast<size_t>(donor)].bytes;
          const bool better = b >= want ? (d < want || b < d) : (d < want && b > d);
          if (better) donor = static_cast<std::ptrdiff_t>(i);
        }
        if (donor >= 0) {
          got = free_[static_cast<size_t>(donor)];
          free_.erase(free_.begin() + donor);
          stats_.cached_bytes -= static_cast<int64_t>(got.bytes);
          resize = true;
          ++stats_.resized;
        }
        // Unmap the oldest cached blocks worth what the request adds first, so that
        // resident memory (live + cached) does not grow while the cache holds enough.
        const size_t adds = want > got.bytes ? want - got.bytes : 0;
        size_t freed = 0, k = 0;
        while (k < free_.size() && freed < adds) freed += free_[k++].bytes;
        drop.assign(free_.begin(), free_.begin() + static_cast<std::ptrdiff_t>(k));
        free_.erase(free_.begin(), free_.begin() + static_cast<std::ptrdiff_t>(k));
        stats_.cached_bytes -= static_cast<int64_t>(freed);
        stats_.evictions += static_cast<int64_t>(k);
      }
      stats_.live_bytes += static_cast<int64_t>(live_add);
      stats_.peak_live_bytes = std::max(stats_.peak_live_bytes, stats_.live_bytes);
      stats_.peak_mapped_bytes = std::max(stats_.peak_mapped_bytes, stats_.live_bytes + stats_.cached_bytes);
    }
    for (const Block& b : drop) ::munmap(b.ptr, b.bytes);
    if (resize && got.bytes > want) {
      ::munmap(static_cast<char*>(got.ptr) + want, got.bytes - want);  // cut: the head stays resident
      got.bytes = want;
    } else if (resize && got.bytes < want) {
      void* p = ::mremap(got.ptr, got.bytes, want, MREMAP_MAYMOVE);  // grow: its pages move along
      if (p == MAP_FAILED) {
        ::munmap(got.ptr, got.bytes);
        got = Block{nullptr, 0};
      } else {
        if (want >= kHugePage) ::madvise(p, want, MADV_HUGEPAGE);
        got = Block{p, want};
      }
    }
    if (!got.ptr) {
      void* p = ::mmap(nullptr, want, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) {
        std::lock_guard<std::mutex> lock(mu_);
        stats_.live_bytes -= static_cast<int64_t>(want);
        throw std::bad_alloc();
      }
      // Fewer page faults for big tensors where the system allows it per mapping
      // (transparent_hugepage=madvise); harmless where it does not.
      if (want >= kHugePage) ::madvise(p, want, MADV_HUGEPAGE);
      got = Block{p, want};
    }
    Block* ctx = new Block(got);
    return c10::DataPtr(got.ptr, ctx, &TensorCache::delete_block, c10::Device(c10::DeviceType::CPU));
  }

  void give_back(Block* b) {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.live_bytes -= static_cast<int64_t>(b->bytes);
    stats_.cached_bytes += static_cast<int64_t>(b->bytes);
    free_.push_back(*b);
    delete b;
  }

 public:
  static TensorCache*& instance() {
    static TensorCache* p = nullptr;
    return p;
  }

 private:
  c10::Allocator* small_;
  std::atomic<bool> enabled_{true};
  mutable std::mutex mu_;
  std::vector<Block> free_;
  TensorCacheStats stats_;
};

std::mutex g_install_mu;

}  // namespace

bool install_tensor_cache() {
  std::lock_guard<std::mutex> lock(g_install_mu);
  if (TensorCache::instance()) return true;
  if (const char* e = std::getenv("DPO_TENSOR_CACHE"); e && std::string(e) == "0") return false;
  // Never destroyed: tensors freed during static destruction still call back into it.
  auto* cache = new TensorCache(c10::GetCPUAllocator());
  TensorCache::instance() = cache;
  c10::SetCPUAllocator(cache, /*priority=*/0);
  if (c10::GetCPUAllocator() != cache) {  // a higher-priority allocator is in place: keep it
    TensorCache::instance() = nullptr;
    return false;
  }
  return true;
}

bool tensor_cache_installed() { return TensorCache::instance() != nullptr; }

void tensor_cache_set_enabled(bool on) {
  if (auto* c = TensorCache::instance()) c->set_enabled(on);
}

void tensor_cache_release() {
  if (auto* c = TensorCache::instance()) c->release();
}

TensorCacheStats tensor_cache_stats() {
  if (auto* c = TensorCache::instance()) return c->stats();
  return {};
}

}  // namespace dpo
