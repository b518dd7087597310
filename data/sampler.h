// Which examples each rank trains on at each step (docs/data-format.md, "Sampling").
// Every rank computes the same per-epoch global order from (seed, epoch) alone, then
// takes its own contiguous slice of each global batch, so the examples of a step do
// not depend on how the global batch is split across ranks, and any step can be
// planned again after a restart without replaying the data.
//
// Legend: N = examples, W = world size (ranks), B = per-device batch (pairs),
// A = gradient-accumulation steps, G = B * A * W = global batch.
#pragma once
#include <cstdint>
#include <mutex>
#include <vector>

namespace dpo {

/// splitmix64 (Steele, Lea, Flood 2014): advances *state and returns the next value.
uint64_t splitmix64_next(uint64_t* state);

/// Uniform integer in [0, bound) from a splitmix64 stream (Lemire's multiply-shift with
/// rejection: exact, no modulo bias). bound >= 1.
uint64_t uniform_below(uint64_t* state, uint64_t bound);

/// The epoch's permutation of [0, n): Fisher-Yates (i from n-1 down to 1, swap with
/// uniform_below(i + 1)) over a splitmix64 stream seeded with
/// splitmix64(seed) ^ splitmix64(epoch + 0x5851F42D4C957F2D). Depends on nothing else.
std::vector<int64_t> epoch_permutation(int64_t n, uint64_t seed, int64_t epoch);

/// One optimizer step of one rank.
struct StepPlan {
  /// This rank's A micro-batches of example indices (some may be empty in the last,
  /// smaller step of an epoch).
  std::vector<std::vector<int64_t>> micro_batches;
  /// Examples of this step over all ranks (G except maybe in the epoch's last step):
  /// normalize the summed per-example loss by this, not by a local count.
  int64_t global_examples = 0;
  /// Examples of this rank in this step (sum of the micro-batch sizes).
  int64_t local_examples() const;
};

class ShardSampler {
 public:
  /// n examples; group_by_length needs `lengths` (n values, e.g.
  /// PreferenceReader::example_lengths()), which is copied. shuffle = false keeps the
  /// file order (evaluation).
  ShardSampler(int64_t n, int64_t per_device_batch, int64_t grad_accum, int world, int rank, uint64_t seed,
               bool group_by_length = false, const std::vector<int64_t>* lengths = nullptr, bool shuffle = true);

  /// ceil(N / G).
  int64_t steps_per_epoch() const;
  /// G = B * A * W.
  int64_t global_batch_size() const { return global_batch_; }
  int64_t size() const { return n_; }

  /// Step `step_in_epoch` in [0, steps_per_epoch()) of `epoch` (>= 0) for this rank:
  /// global batch = order[s*G, min((s+1)*G, N)); rank r takes the r-th of W contiguous
  /// slices whose sizes differ by at most one (B*A each in a full step) and splits it
  /// the same way into A micro-batches.
  StepPlan plan(int64_t epoch, int64_t step_in_epoch) const;

  /// The epoch's global order of all N indices. With group_by_length, each mega-chunk
  /// of 50 global batches of the permutation is stably sorted by length, longest
  /// first, so each batch holds similar lengths. Depends on (seed, epoch, N, G,
  /// lengths), never on W or rank alone.
  std::vector<int64_t> epoch_order(int64_t epoch) const;

  static constexpr int64_t kMegaBatches = 50;

 private:
  const std::vector<int64_t>& cached_order(int64_t epoch) const;

  int64_t n_, grad_accum_, global_batch_;
  int world_, rank_;
  uint64_t seed_;
  bool group_by_length_, shuffle_;
  std::vector<int64_t> lengths_;
  mutable std::mutex mu_;
  mutable int64_t cached_epoch_ = -1;
  mutable std::vector<int64_t> order_;
};

}  // namespace dpo
