// The random-number state a checkpoint keeps for every rank, so that a resumed run draws
// the same LoRA-dropout masks as an uninterrupted one: the CPU generator (dropout on CPU
// tensors) and, on --device cuda, the generator of the rank's GPU (dropout on CUDA tensors
// draws from that one, never from the CPU generator).
//
// File: <checkpoint>/rng_state.safetensors, U8 tensors holding Generator::get_state():
//   rank_<i>        rank i's CPU generator (the only entry before CUDA states existed)
//   rank_<i>.cuda   rank i's CUDA generator (only when the run trained on CUDA)
//   __metadata__ {"device_type": "cpu" | "cuda"} (absent in older files: cpu)
// A state only continues its own generator: a CUDA (Philox) state cannot continue a CPU
// (mt19937) stream, so resuming with another --device is refused (rng_load_rank says how
// to go on anyway: delete rng_state.safetensors, and the trainer reseeds).
//
// The generators are passed in (RankGenerators), so the same code runs with the process's
// default generators in the trainer and with stand-in CPU generators in tests of the CUDA
// slot on machines without a GPU.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Generator.h>
#include <torch/types.h>

namespace dpo {

/// The generators one rank's training draws from.
struct RankGenerators {
  std::string device_type = "cpu";  // "cpu" | "cuda": where the run computes (--device)
  at::Generator cpu;                // always defined
  at::Generator device;             // defined iff device_type == "cuda"
};

/// The process's default generators for training on `device`: the default CPU generator,
/// plus the default generator of CUDA device device.index() (or the current device) when
/// device is CUDA. Throws a one-line error when CUDA is asked for but not available.
RankGenerators default_rank_generators(const torch::Device& device);

/// One rank's states (U8 tensors from Generator::get_state()); device undefined on CPU runs.
struct RankRngState {
  torch::Tensor cpu;
  torch::Tensor device;
};

/// Copies the states out of g (under each generator's mutex).
RankRngState rng_capture(const RankGenerators& g);
/// Puts states back into g. Throws when s has a device state and g none, or the reverse.
void rng_restore(const RankGenerators& g, const RankRngState& s);

/// The bytes of a state (for gathering across ranks) and back.
std::string rng_state_bytes(const torch::Tensor& state);
torch::Tensor rng_state_from_bytes(const std::string& bytes);

/// Writes every rank's states (ranks[i] = rank i) to `path` (safetensors, atomically).
void rng_save(const std::string& path, const std::string& device_type, const std::vector<RankRngState>& ranks);

/// Reads rank `rank`'s states from `path` for a run on `device_type`. Throws one line naming
/// the file when it was written on another device type (and what to do), or lacks the rank.
RankRngState rng_load_rank(const std::string& path, int rank, const std::string& device_type);

/// The device type a file was written for ("cpu" for files without the metadata).
std::string rng_file_device_type(const std::string& path);

}  // namespace dpo
