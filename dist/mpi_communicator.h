// The MPI backend: MpiCommunicator, collectives on CPU tensors over a HostComm (a
// private duplicate of MPI_COMM_WORLD; dist/mpi_base.h, which also has MpiSession).
// mpi.h stays behind the pimpl; dist/mpi_check.h has the MPI_CHECK macro.
//
// Errors: the communicator uses MPI_ERRORS_RETURN, so a failing call becomes a CommError
// "MPI_Allreduce failed on rank 3 (dist/mpi_communicator.cpp:120): MPI_ERR_TRUNCATE: ...".
// MPI_COMM_WORLD (used by anything else in the process, e.g. HDF5) gets a handler that
// prints the rank, host and MPI error string and aborts the whole job instead of leaving
// the other ranks waiting.
#pragma once
#include <climits>
#include <cstdint>
#include <memory>
#include <string>

#include "dist/communicator.h"
#include "dist/mpi_base.h"

namespace dpo {


struct MpiOptions {
  /// Elements (or bytes, for broadcasts) per MPI call; larger buffers are split into
  /// chunks of at most this many before narrowing to MPI's int count. Tests force small
  /// chunks to exercise the splitting. Must be in [1, INT_MAX].
  int64_t max_chunk = INT_MAX;
};

/// Collectives over MPI. Tensors must be CPU tensors or are staged through host memory
/// (a CUDA tensor is copied to the host, reduced, copied back: correct, not fast; use
/// the NCCL backend for CUDA). Synchronous: every call returns when its collective is
/// complete on this rank.
class MpiCommunicator final : public Communicator {
 public:
  /// Duplicates MPI_COMM_WORLD (collective: every rank constructs one at the same point).
  /// Throws CommError when no MpiSession is active.
  explicit MpiCommunicator(MpiOptions options = {});
  ~MpiCommunicator() override;

  int rank() const override;
  int world_size() const override;
  int local_rank() const override;
  int local_size() const override;
  std::string name() const override { return "mpi"; }
  [[noreturn]] void abort(int code, const std::string& why) override;

  const MpiOptions& options() const;

 protected:
  void allreduce_impl(torch::Tensor& t) override;
  void broadcast_impl(torch::Tensor& t, int root) override;
  void barrier_impl() override;
  void host_allreduce_sum(double* data, int64_t count) override;
  void host_allgather(const void* send, int64_t bytes, void* recv) override;
  void host_broadcast(void* data, int64_t bytes, int root) override;

 private:
  friend struct MpiAccess;  // dist/mpi_internal.h: the MPI_Comm for the NCCL bootstrap
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dpo
