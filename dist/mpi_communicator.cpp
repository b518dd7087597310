// MPI backend: tensor collectives over a HostComm (dist/mpi_base.h), chunked.
#include "dist/mpi_internal.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <exception>

#include "dist/chunks.h"

namespace dpo {

MPI_Datatype mpi_sum_datatype(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::ScalarType::Float: return MPI_FLOAT;
    case c10::ScalarType::Double: return MPI_DOUBLE;
    case c10::ScalarType::Long: return MPI_INT64_T;
    case c10::ScalarType::Int: return MPI_INT32_T;
    case c10::ScalarType::Byte: return MPI_UINT8_T;
    case c10::ScalarType::Char: return MPI_INT8_T;
    default:
      throw CommError(std::string("allreduce_sum: the MPI backend cannot sum dtype ") +
                      c10::toString(dtype) +
                      " (it sums float32, float64, int64, int32, uint8, int8); reduce a float32 copy");
  }
}

// ---------------------------------------------------------------------- communicator

MpiCommunicator::MpiCommunicator(MpiOptions options) : impl_(std::make_unique<Impl>()) {
  if (!MpiSession::active()) {
    throw CommError("MpiCommunicator: MPI is not initialized; create a dpo::MpiSession at the top "
                    "of main() that outlives every communicator");
  }
  if (options.max_chunk < 1 || options.max_chunk > INT_MAX) {
    throw CommError("MpiCommunicator: MpiOptions::max_chunk " + std::to_string(options.max_chunk) +
                    " is outside [1, INT_MAX]");
  }
  impl_->options = options;
  HostCommOptions host_options;
  host_options.max_chunk = options.max_chunk;
  impl_->host = std::make_unique<HostComm>(host_options);
  impl_->comm = HostCommAccess::comm(*impl_->host);
  impl_->rank = impl_->host->rank();
  impl_->world = impl_->host->world();
  // Ranks that share memory = ranks on this host (the GPU index for NCCL).
  MPI_Comm local = MPI_COMM_NULL;
  MPI_CHECK(MPI_Comm_split_type(impl_->comm, MPI_COMM_TYPE_SHARED, impl_->rank, MPI_INFO_NULL, &local));
  MPI_CHECK(MPI_Comm_rank(local, &impl_->local_rank));
  MPI_CHECK(MPI_Comm_size(local, &impl_->local_size));
  MPI_Comm_free(&local);
}

MpiCommunicator::~MpiCommunicator() = default;

int MpiCommunicator::rank() const { return impl_->rank; }
int MpiCommunicator::world_size() const { return impl_->world; }
int MpiCommunicator::local_rank() const { return impl_->local_rank; }
int MpiCommunicator::local_size() const { return impl_->local_size; }
const MpiOptions& MpiCommunicator::options() const { return impl_->options; }

void MpiCommunicator::abort(int code, const std::string& why) {
  std::fprintf(stderr, "%s: %s\n", who().c_str(), why.c_str());
  impl_->host->abort(code);
}

void MpiCommunicator::allreduce_impl(torch::Tensor& t) {
  if (!t.device().is_cpu()) {
    // Staging through the host keeps the backend usable for CUDA tensors without CUDA-aware MPI.
    torch::Tensor host = t.to(torch::kCPU).contiguous();
    allreduce_impl(host);
    t.copy_(host);
    return;
  }
  const MPI_Datatype type = mpi_sum_datatype(t.scalar_type());
  char* base = static_cast<char*>(t.data_ptr());
  const int64_t esize = static_cast<int64_t>(t.element_size());
  for (const Chunk& c : split_chunks(t.numel(), impl_->options.max_chunk)) {
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, base + c.offset * esize, c.count, type, MPI_SUM, impl_->comm));
  }
}

void MpiCommunicator::broadcast_impl(torch::Tensor& t, int root) {
  if (!t.device().is_cpu()) {
    torch::Tensor host = t.to(torch::kCPU).contiguous();
    broadcast_impl(host, root);
    t.copy_(host);
    return;
  }
  // Bytes, so every dtype (bf16, bool, ...) broadcasts.
  host_broadcast(t.data_ptr(), t.numel() * static_cast<int64_t>(t.element_size()), root);
}

void MpiCommunicator::barrier_impl() { impl_->host->barrier(); }

void MpiCommunicator::host_allreduce_sum(double* data, int64_t count) {
  impl_->host->allreduce(data, count, HostOp::sum);
}

void MpiCommunicator::host_allgather(const void* send, int64_t bytes, void* recv) {
  impl_->host->allgather(send, bytes, recv);
}

void MpiCommunicator::host_broadcast(void* data, int64_t bytes, int root) {
  impl_->host->broadcast(data, bytes, root);
}

}  // namespace dpo
