// Internal to dist/: access to an MpiCommunicator's MPI_Comm (the NCCL backend
// bootstraps through it) and the tensor dtype -> MPI datatype map. Never include
// outside dist/*.cpp.
#pragma once
#include "dist/mpi_check.h"
#include "dist/mpi_communicator.h"

namespace dpo {

/// The MPI datatype that MPI_SUM can reduce for this dtype; throws CommError for others.
MPI_Datatype mpi_sum_datatype(c10::ScalarType dtype);

struct MpiCommunicator::Impl {
  std::unique_ptr<HostComm> host;  // owns the communicator
  MPI_Comm comm = MPI_COMM_NULL;   // host's private duplicate of MPI_COMM_WORLD, MPI_ERRORS_RETURN
  int rank = 0;
  int world = 1;
  int local_rank = 0;
  int local_size = 1;
  MpiOptions options;
};

// The NCCL backend runs its host-value conveniences on an MpiCommunicator it owns.
struct MpiAccess {
  static MPI_Comm comm(const MpiCommunicator& c) { return c.impl_->comm; }
  static void host_allreduce_sum(MpiCommunicator& c, double* data, int64_t count) {
    c.host_allreduce_sum(data, count);
  }
  static void host_allgather(MpiCommunicator& c, const void* send, int64_t bytes, void* recv) {
    c.host_allgather(send, bytes, recv);
  }
  static void host_broadcast(MpiCommunicator& c, void* data, int64_t bytes, int root) {
    c.host_broadcast(data, bytes, root);
  }
};

}  // namespace dpo
