#include "data/sampler.h"

#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <string>

namespace dpo {

uint64_t splitmix64_next(uint64_t* state) {
  uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t uniform_below(uint64_t* state, uint64_t bound) {
  // Lemire, "Fast Random Integer Generation in an Interval" (2019).
  unsigned __int128 m = (unsigned __int128)splitmix64_next(state) * bound;
  uint64_t low = uint64_t(m);
  if (low < bound) {
    const uint64_t threshold = (0 - bound) % bound;
    while (low < threshold) {
      m = (unsigned __int128)splitmix64_next(state) * bound;
      low = uint64_t(m);
    }
  }
  return uint64_t(m >> 64);
}

std::vector<int64_t> epoch_permutation(int64_t n, uint64_t seed, int64_t epoch) {
  if (n < 0 || epoch < 0) throw std::invalid_argument("epoch_permutation: n and epoch must be >= 0");
  uint64_t a = seed, b = uint64_t(epoch) + 0x5851F42D4C957F2Dull;
  uint64_t state = splitmix64_next(&a) ^ splitmix64_next(&b);
  std::vector<int64_t> p(n);
  std::iota(p.begin(), p.end(), int64_t(0));
  for (int64_t i = n - 1; i > 0; --i) std::swap(p[i], p[uniform_below(&state, uint64_t(i) + 1)]);
  return p;
}

int64_t StepPlan::local_examples() const {
  int64_t s = 0;
  for (const auto& m : micro_batches) s += int64_t(m.size());
  return s;
}

ShardSampler::ShardSampler(int64_t n, int64_t per_device_batch, int64_t grad_accum, int world, int rank,
                           uint64_t seed, bool group_by_length, const std::vector<int64_t>* lengths, bool shuffle)
    : n_(n), grad_accum_(grad_accum), world_(world), rank_(rank), seed_(seed),
      group_by_length_(group_by_length), shuffle_(shuffle) {
  if (n < 0) throw std::invalid_argument("ShardSampler: negative number of examples");
  if (per_device_batch < 1) throw std::invalid_argument("ShardSampler: per_device_train_batch_size must be >= 1");
  if (grad_accum < 1) throw std::invalid_argument("ShardSampler: gradient_accumulation_steps must be >= 1");
  if (world < 1 || rank < 0 || rank >= world)
    throw std::invalid_argument("ShardSampler: rank " + std::to_string(rank) + " outside world size " +
                                std::to_string(world));
  global_batch_ = per_device_batch * grad_accum * world;
  if (group_by_length) {
    if (!lengths || int64_t(lengths->size()) != n)
      throw std::invalid_argument("ShardSampler: group_by_length needs one length per example (" +
                                  std::to_string(n) + ")");
    lengths_ = *lengths;
  }
}

int64_t ShardSampler::steps_per_epoch() const { return (n_ + global_batch_ - 1) / global_batch_; }

std::vector<int64_t> ShardSampler::epoch_order(int64_t epoch) const {
  std::vector<int64_t> order;
  if (shuffle_) {
    order = epoch_permutation(n_, seed_, epoch);
  } else {
    order.resize(n_);
    std::iota(order.begin(), order.end(), int64_t(0));
  }
  if (group_by_length_) {
    const int64_t mega = kMegaBatches * global_batch_;
    for (int64_t start = 0; start < n_; start += mega) {
      auto first = order.begin() + start, last = order.begin() + std::min(n_, start + mega);
      std::stable_sort(first, last, [&](int64_t a, int64_t b) { return lengths_[a] > lengths_[b]; });
    }
  }
  return order;
}

const std::vector<int64_t>& ShardSampler::cached_order(int64_t epoch) const {
  if (cached_epoch_ != epoch) {
    order_ = epoch_order(epoch);
    cached_epoch_ = epoch;
  }
  return order_;
}

StepPlan ShardSampler::plan(int64_t epoch, int64_t step) const {
  if (epoch < 0 || step < 0 || step >= steps_per_epoch())
    throw std::out_of_range("ShardSampler::plan: step " + std::to_string(step) + " of epoch " + std::to_string(epoch) +
                            " outside [0, " + std::to_string(steps_per_epoch()) + ")");
  std::lock_guard<std::mutex> lock(mu_);
  const std::vector<int64_t>& order = cached_order(epoch);
  const int64_t g0 = step * global_batch_;
  const int64_t g = std::min(global_batch_, n_ - g0);
  // Even split: the first (g % W) ranks get one more. In a full step this is B*A each.
  auto share = [](int64_t total, int64_t parts, int64_t i, int64_t* begin, int64_t* count) {
    const int64_t q = total / parts, r = total % parts;
    *count = q + (i < r ? 1 : 0);
    *begin = i * q + std::min(i, r);
  };
  int64_t rb, rc;
  share(g, world_, rank_, &rb, &rc);
  StepPlan p;
  p.global_examples = g;
  p.micro_batches.resize(grad_accum_);
  for (int64_t j = 0; j < grad_accum_; ++j) {
    int64_t mb, mc;
    share(rc, grad_accum_, j, &mb, &mc);
    auto first = order.begin() + g0 + rb + mb;
    p.micro_batches[j].assign(first, first + mc);
  }
  return p;
}

}  // namespace dpo
