// Collective communication between the ranks of one training job: the abstract
// interface every backend implements (MPI for CPU tensors, NCCL for CUDA tensors,
// a single-process fake for unit tests), the exit codes of the job, and the factory
// that picks a backend. Knows tensors, not the model. docs/distributed.md has the
// whole picture (launch, signals, watchdog, cost model).
//
// Protocol between ranks (every backend, every collective) — the numbered steps:
//  1. SPMD: every rank calls the same collectives in the same order, with the same
//     element count, dtype and root. A mismatch is undefined behaviour in MPI/NCCL
//     (wrong sums or a hang); the watchdog (set_timeout) turns the hang into an abort.
//     Only the string conveniences exchange sizes first, because strings differ by rank.
//  2. allreduce_sum(t): t is contiguous and has the same numel and dtype on every rank.
//     When it completes (on return for MPI; when the stream reaches it for NCCL, see
//     nccl_communicator.h) every rank's t holds the element-wise sum over ranks.
//  3. broadcast(t, root): same numel and dtype everywhere; afterwards every rank's t
//     holds root's bytes.
//  4. allgather_string(s): (a) allgather every rank's byte length as int64;
//     (b) allgather the bytes, each padded to the longest; result in rank order.
//  5. broadcast_string(s, root): (a) broadcast root's length; (b) resize; (c) broadcast bytes.
//  6. any(flag): allreduce_sum of flag ? 1 : 0 (double); true on every rank iff > 0.
//     The stop protocol uses it: each rank polls stop_requested() (signals.h) at a step
//     boundary and all ranks stop at the same step.
//  7. abort(code, why): the calling rank alone prints "rank R on host H: why" to stderr
//     and takes the whole job down (MPI_Abort; mpirun/srun kills every rank). The other
//     ranks need not take part, so it is the way out of a rank that cannot continue.
//  8. Timeouts: with set_timeout(s > 0) every collective above is armed on a watchdog
//     thread; one that does not complete in s seconds makes that rank print
//     "rank R on host H: <collective> did not complete within s s; aborting the job"
//     and abort(kExitWatchdog). watch() arms the same watchdog around a training step.
#pragma once
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/types.h>

#include "dist/mpi_base.h"  // CommError
#include "dist/peer_probe.h"
#include "dist/watchdog.h"

namespace dpo {


/// Exit codes of a dpo_dist job (what mpirun/srun returns, what Slurm scripts test).
/// kExitPreempted (75) lives in signals.h, kExitWatchdog (124) in watchdog.h.
constexpr int kExitCommError = 70;  // EX_SOFTWARE: a rank aborted the job (Communicator::abort)

class Communicator {
 public:
  Communicator() = default;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;
  virtual ~Communicator();

  virtual int rank() const = 0;        // 0 .. world_size()-1
  virtual int world_size() const = 0;  // number of ranks in the job
  virtual int local_rank() const = 0;  // rank among the ranks on this host (GPU index)
  virtual int local_size() const = 0;  // ranks on this host
  virtual std::string name() const = 0;  // backend: "mpi", "nccl" or "fake"
  /// This host's name (for messages: "rank R on host H").
  std::string host() const;

  // ---- tensor collectives (protocol steps 2, 3) ----
  /// In place: t (any shape, contiguous) = sum over ranks. dtypes: float32, float64,
  /// int32, int64, uint8, int8 everywhere; NCCL also float16/bfloat16.
  void allreduce_sum(torch::Tensor& t);
  /// In place: t = root's t (any dtype, contiguous).
  void broadcast(torch::Tensor& t, int root);
  /// Returns once every rank has entered it.
  void barrier();
  /// Waits until every collective this rank enqueued has completed (NCCL: the stream;
  /// MPI and fake are synchronous, so a no-op).
  virtual void synchronize() {}
  /// Protocol step 7: never returns. code is the job's exit status.
  [[noreturn]] virtual void abort(int code, const std::string& why) = 0;

  // ---- conveniences on host values (protocol steps 4-6) ----
  double allreduce_sum(double v);
  void allreduce_sum(std::vector<double>& v);  // in place, element-wise
  bool any(bool flag);                          // true on every rank iff true on some rank
  std::vector<std::string> allgather_string(const std::string& s);  // index = rank
  void broadcast_string(std::string& s, int root);

  // ---- hang protection (protocol step 8) ----
  /// Seconds each collective may take before the job is aborted; 0 (default) = no limit.
  void set_timeout(double seconds);
  double timeout() const { return timeout_s_; }
  /// Arms the watchdog around a larger piece of work (a training step) until the guard
  /// dies. seconds <= 0 returns an empty guard. what: e.g. "training step 12".
  [[nodiscard]] Watchdog::Guard watch(const std::string& what, double seconds);
  /// Collective (one allgather): starts this rank's PeerResponder (peer_probe.h) and
  /// learns every rank's endpoint. From then on a watchdog timeout probes the other
  /// ranks before aborting and names those that stopped answering. Best effort: when
  /// this rank cannot listen on a TCP port, messages stay as they were.
  void enable_peer_probe();

 protected:
  // Backend hooks. The public wrappers have validated the arguments (defined,
  // contiguous, root in range) and armed the watchdog.
  virtual void allreduce_impl(torch::Tensor& t) = 0;
  virtual void broadcast_impl(torch::Tensor& t, int root) = 0;
  virtual void barrier_impl() = 0;
  // Host-memory collectives behind the conveniences (NCCL routes them through MPI).
  virtual void host_allreduce_sum(double* data, int64_t count) = 0;
  /// recv holds world_size() * bytes; rank i's bytes land at recv + i * bytes.
  virtual void host_allgather(const void* send, int64_t bytes, void* recv) = 0;
  virtual void host_broadcast(void* data, int64_t bytes, int root) = 0;

  /// "rank R on host H": the prefix of every message a backend prints before aborting.
  std::string who() const;

 private:
  Watchdog& watchdog();

  double timeout_s_ = 0.0;
  std::unique_ptr<PeerResponder> responder_;   // enable_peer_probe()
  std::vector<std::string> peer_endpoints_;    // index = rank; empty = no probing
  std::unique_ptr<Watchdog> watchdog_;  // started on the first armed guard (last: stops first)
};

/// One backend and whether this build/machine can use it.
struct BackendInfo {
  std::string name;     // "nccl", "mpi", "fake"
  bool enabled = false; // usable now
  std::string reason;   // why not (empty when enabled)
};

/// The backends in the order "auto" prefers them (nccl, mpi, fake).
std::vector<BackendInfo> communicator_backends();

/// backend: "auto" | "mpi" | "nccl" | "fake". auto: NCCL when cuda_tensors and the NCCL
/// backend is enabled, else MPI (which stages CUDA tensors through host memory). mpi and
/// nccl need an active MpiSession (mpi_communicator.h). Throws CommError naming the
/// backend and the reason when the requested one is unavailable.
std::unique_ptr<Communicator> make_communicator(const std::string& backend, bool cuda_tensors);

}  // namespace dpo
