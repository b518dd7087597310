// The torch-free MPI base every MPI program of the project stands on (dpo_preprocess
// uses it alone; the tensor communicators in mpi_communicator.h build on it):
//   MpiSession  MPI's lifetime in a process (RAII)
//   HostComm    checked collectives on host values over a private duplicate of
//               MPI_COMM_WORLD; every failure is a CommError naming the call and rank
//   agree()     the "all ranks agree" protocol for errors found by one rank
// mpi.h stays out of this header (dist/mpi_check.h has MPI_CHECK for dist's own .cpp).
#pragma once
#include <climits>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

namespace dpo {

/// A collective or backend set-up failed. The message names the call, the rank and
/// what to do next; every rank that sees it should leave (see MpiSession::skip_finalize).
struct CommError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// MPI initialization and finalization for the whole process. Create one at the top of
/// main(), before any communicator, and keep it alive until they are gone. Started
/// without mpirun/srun, MPI comes up as a "singleton": a world of one rank.
///
/// Errors on MPI_COMM_WORLD itself (used by anything else in the process, e.g. HDF5)
/// print the rank, host and MPI error string and abort the whole job instead of
/// leaving the other ranks waiting.
class MpiSession {
 public:
  /// MPI_Init_thread(MPI_THREAD_FUNNELED): only the main thread communicates; the
  /// watchdog thread's MPI_Abort is the one exception, which Open MPI supports
  /// (tests/dist/launch_test.cpp checks it). If MPI is already initialized (by someone
  /// else) this session neither initializes nor finalizes it.
  explicit MpiSession(int* argc = nullptr, char*** argv = nullptr);
  /// MPI_Finalize, except (a) when skip_finalize() was called or (b) when an exception
  /// is unwinding through this destructor. MPI_Finalize waits for every rank (Open MPI
  /// fences), so a rank leaving on an error would hang behind peers stuck in a collective;
  /// exiting without it makes mpirun/srun end the job with this rank's exit status.
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  /// Call on the error path before returning non-zero from main().
  void skip_finalize() { skip_finalize_ = true; }
  /// True when started by a launcher (mpirun, srun, PMI/PMIx), false for a singleton.
  bool under_launcher() const { return under_launcher_; }
  bool owns() const { return owns_; }                 // this object initialized MPI
  int thread_level() const { return thread_level_; }  // MPI_THREAD_* provided
  /// MPI is initialized and not finalized.
  static bool active();
  /// This process's rank in MPI_COMM_WORLD, or -1 when MPI is not active.
  static int world_rank();

 private:
  bool owns_ = false;
  bool under_launcher_ = false;
  bool skip_finalize_ = false;
  int thread_level_ = 0;
  int uncaught_at_start_ = 0;
};

/// The name of this host (gethostname), "unknown" if it cannot be read.
std::string this_host();

/// Takes the whole job down with exit status `code` (MPI_Abort on MPI_COMM_WORLD; _Exit
/// when MPI is not active or MPI_Abort has not ended this process within 30 s). For
/// failures before a communicator exists, e.g. the watchdog over communicator creation.
[[noreturn]] void mpi_abort_job(int code);

enum class HostOp { sum, min, max };

struct HostCommOptions {
  /// Elements (bytes for broadcasts) per MPI call; larger buffers are split into chunks
  /// of at most this many before narrowing to MPI's int count. Tests force small chunks
  /// to exercise the splitting. Must be in [1, INT_MAX].
  int64_t max_chunk = INT_MAX;
  /// Wait for collectives by polling with sleeps (50 us growing to 5 ms) instead of
  /// Open MPI's busy-polling: a rank that finished early gives its core to the ranks
  /// still working (dpo_preprocess). Adds up to a few ms of latency per call.
  bool gentle_wait = false;
};

/// Checked collectives on host buffers. Every rank must call the same collectives in
/// the same order. Synchronous: a call returns when its collective is complete on this
/// rank. Throws CommError "<MPI call> failed on rank R (file:line): <MPI error>".
class HostComm {
 public:
  /// Duplicates MPI_COMM_WORLD (collective: every rank constructs one at the same point).
  /// Throws CommError when no MpiSession is active.
  explicit HostComm(HostCommOptions options = {});
  ~HostComm();
  HostComm(const HostComm&) = delete;
  HostComm& operator=(const HostComm&) = delete;

  int rank() const;
  int world() const;
  const HostCommOptions& options() const;

  void allreduce(int64_t* data, int64_t count, HostOp op);
  void allreduce(double* data, int64_t count, HostOp op);
  /// In place on `root`; other ranks' buffers are left as they were.
  void reduce(int64_t* data, int64_t count, HostOp op, int root);
  void reduce(double* data, int64_t count, HostOp op, int root);
  void broadcast(void* data, int64_t bytes, int root);
  /// recv holds world() * bytes: rank r's `bytes` at offset r * bytes.
  void allgather(const void* send, int64_t bytes, void* recv);
  void barrier();
  /// Point-to-point bytes (tag: the caller's protocol step).
  void send(const void* data, int64_t bytes, int dest, int tag);
  void recv(void* data, int64_t bytes, int source, int tag);
  /// MPI_Abort of the whole job (never returns).
  [[noreturn]] void abort(int code);

 private:
  friend struct HostCommAccess;  // dist/mpi_check.h: the MPI_Comm for dist's backends
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// One rank's outcome of a protocol phase: empty message = success. user_error marks
/// a bad option or input (the tools exit 2), anything else exits 1.
struct Failure {
  std::string message;
  bool user_error = false;
  bool failed() const { return !message.empty(); }
};

/// The "all ranks agree" protocol, run by every rank at the end of a phase:
///  1. Iallreduce(MIN) of (failed ? rank : world): every rank learns the lowest failing
///     rank, or that none failed (waits gently: a rank done early sleeps).
///  2. If that rank is not 0, it sends its message (user_error flag + text, at most
///     1 MiB) to rank 0.
/// Returns: none failed -> success everywhere. Otherwise rank 0 gets the lowest failing
/// rank's Failure (its own if it failed); other ranks get "rank R failed".
Failure agree(const Failure& mine, HostComm& comm);

}  // namespace dpo
