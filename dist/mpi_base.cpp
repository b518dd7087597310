// MPI session lifetime, checked host collectives, the agree protocol (no libtorch).
#include "dist/mpi_check.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <thread>

#include "dist/chunks.h"

namespace dpo {

namespace {

// MPI_COMM_WORLD's handler: anything else in the process that fails on the world
// communicator (HDF5, a stray call) takes the job down with a readable line instead of
// returning an error code nobody checks while peers wait.
void world_error_handler(MPI_Comm* /*comm*/, int* code, ...) {
  std::fprintf(stderr, "rank %d on host %s: MPI error on MPI_COMM_WORLD: %s; aborting the job\n",
               MpiSession::world_rank(), this_host().c_str(), mpi_error_string(*code).c_str());
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, 70);  // kExitCommError (communicator.h)
}

bool env_set(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0';
}

MPI_Op mpi_op(HostOp op) {
  switch (op) {
    case HostOp::sum: return MPI_SUM;
    case HostOp::min: return MPI_MIN;
    case HostOp::max: return MPI_MAX;
  }
  return MPI_SUM;
}

}  // namespace

std::string this_host() {
  char buf[256] = {0};
  if (gethostname(buf, sizeof buf - 1) != 0) return "unknown";
  return buf;
}

std::string mpi_error_string(int code) {
  char msg[MPI_MAX_ERROR_STRING] = {0};
  int len = 0;
  if (MPI_Error_string(code, msg, &len) != MPI_SUCCESS) return "MPI error " + std::to_string(code);
  return std::string(msg, static_cast<size_t>(len));
}

void throw_mpi_error(const char* call, int code, const char* file, int line) {
  std::string fn(call);
  const auto paren = fn.find('(');
  if (paren != std::string::npos) fn.resize(paren);
  throw CommError(fn + " failed on rank " + std::to_string(MpiSession::world_rank()) + " (" +
                  short_source_path(file) + ":" + std::to_string(line) + "): " + mpi_error_string(code) +
                  "; every rank should stop (a peer may have died or called a different collective)");
}

// ---------------------------------------------------------------------------- session

MpiSession::MpiSession(int* argc, char*** argv) {
  uncaught_at_start_ = std::uncaught_exceptions();
  // Open MPI's mpirun, PMIx (srun --mpi=pmix, prterun), PMI-1/2 (srun --mpi=pmi2, Hydra).
  under_launcher_ = env_set("OMPI_COMM_WORLD_SIZE") || env_set("PMIX_RANK") ||
                    env_set("PMI_RANK") || env_set("PMI_SIZE");
  int inited = 0, fin = 0;
  MPI_Initialized(&inited);
  MPI_Finalized(&fin);
  if (fin) {
    throw CommError("MpiSession: MPI was already finalized in this process and cannot start again; "
                    "create one MpiSession at the top of main() that lives until the end");
  }
  if (inited) {
    MPI_Query_thread(&thread_level_);
    return;
  }
  // Started without a launcher (a plain `dpo_dist ...` or `dpo_preprocess ...`): Open MPI's
  // singleton start would fork an orted first, 2.4 s measured here on every run, for the
  // ability to MPI_Comm_spawn, which nothing here uses. Isolated singletons skip it
  // (0.3 s); a value the user set wins.
  if (!under_launcher_) setenv("OMPI_MCA_ess_singleton_isolated", "1", /*overwrite=*/0);
  const int rc = MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &thread_level_);
  if (rc != MPI_SUCCESS) {
    throw CommError("MPI_Init_thread failed (" + mpi_error_string(rc) +
                    "); run under mpirun/srun or check the MPI installation");
  }
  owns_ = true;
  MPI_Errhandler eh;
  MPI_Comm_create_errhandler(&world_error_handler, &eh);
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, eh);
  MPI_Errhandler_free(&eh);
}

MpiSession::~MpiSession() {
  if (!owns_ || !active()) return;
  if (skip_finalize_ || std::uncaught_exceptions() > uncaught_at_start_) return;
  MPI_Finalize();
}

bool MpiSession::active() {
  int inited = 0, fin = 0;
  MPI_Initialized(&inited);
  MPI_Finalized(&fin);
  return inited && !fin;
}

void mpi_abort_job(int code) {
  std::thread([code] {
    std::this_thread::sleep_for(std::chrono::seconds(30));
    std::_Exit(code);
  }).detach();
  if (MpiSession::active()) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

int MpiSession::world_rank() {
  if (!active()) return -1;
  int r = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

// ---------------------------------------------------------------------------- HostComm

struct HostComm::Impl {
  MPI_Comm comm = MPI_COMM_NULL;  // private duplicate of MPI_COMM_WORLD, MPI_ERRORS_RETURN
  int rank = 0;
  int world = 1;
  HostCommOptions options;

  // Completes a request: MPI_Wait, or polling with sleeps (HostCommOptions::gentle_wait).
  void wait(MPI_Request* req) const {
    if (!options.gentle_wait) {
      MPI_CHECK(MPI_Wait(req, MPI_STATUS_IGNORE));
      return;
    }
    int done = 0;
    auto pause = std::chrono::microseconds(50);
    for (;;) {
      MPI_CHECK(MPI_Test(req, &done, MPI_STATUS_IGNORE));
      if (done) return;
      std::this_thread::sleep_for(pause);
      pause = std::min<std::chrono::microseconds>(pause * 2, std::chrono::milliseconds(5));
    }
  }

  template <typename T>
  void allreduce(T* data, int64_t count, MPI_Datatype type, HostOp op) const {
    for (const Chunk& c : split_chunks(count, options.max_chunk)) {
      MPI_Request req;
      MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, data + c.offset, c.count, type, mpi_op(op), comm, &req));
      wait(&req);
    }
  }

  template <typename T>
  void reduce(T* data, int64_t count, MPI_Datatype type, HostOp op, int root) const {
    for (const Chunk& c : split_chunks(count, options.max_chunk)) {
      MPI_Request req;
      void* buf = data + c.offset;
      if (rank == root) {
        MPI_CHECK(MPI_Ireduce(MPI_IN_PLACE, buf, c.count, type, mpi_op(op), root, comm, &req));
      } else {
        MPI_CHECK(MPI_Ireduce(buf, nullptr, c.count, type, mpi_op(op), root, comm, &req));
      }
      wait(&req);
    }
  }
};

MPI_Comm HostCommAccess::comm(const HostComm& c) { return c.impl_->comm; }

HostComm::HostComm(HostCommOptions options) : impl_(std::make_unique<Impl>()) {
  if (!MpiSession::active()) {
    throw CommError("MPI is not initialized; create a dpo::MpiSession at the top of main() that "
                    "outlives every communicator");
  }
  if (options.max_chunk < 1 || options.max_chunk > INT_MAX) {
    throw CommError("max_chunk " + std::to_string(options.max_chunk) + " is outside [1, INT_MAX]");
  }
  impl_->options = options;
  MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &impl_->comm));
  MPI_CHECK(MPI_Comm_set_errhandler(impl_->comm, MPI_ERRORS_RETURN));
  MPI_CHECK(MPI_Comm_rank(impl_->comm, &impl_->rank));
  MPI_CHECK(MPI_Comm_size(impl_->comm, &impl_->world));
}

HostComm::~HostComm() {
  if (impl_ && impl_->comm != MPI_COMM_NULL && MpiSession::active()) MPI_Comm_free(&impl_->comm);
}

int HostComm::rank() const { return impl_->rank; }
int HostComm::world() const { return impl_->world; }
const HostCommOptions& HostComm::options() const { return impl_->options; }

void HostComm::allreduce(int64_t* data, int64_t count, HostOp op) { impl_->allreduce(data, count, MPI_INT64_T, op); }
void HostComm::allreduce(double* data, int64_t count, HostOp op) { impl_->allreduce(data, count, MPI_DOUBLE, op); }
void HostComm::reduce(int64_t* data, int64_t count, HostOp op, int root) {
  impl_->reduce(data, count, MPI_INT64_T, op, root);
}
void HostComm::reduce(double* data, int64_t count, HostOp op, int root) {
  impl_->reduce(data, count, MPI_DOUBLE, op, root);
}

void HostComm::broadcast(void* data, int64_t bytes, int root) {
  char* base = static_cast<char*>(data);
  for (const Chunk& c : split_chunks(bytes, impl_->options.max_chunk)) {
    MPI_Request req;
    MPI_CHECK(MPI_Ibcast(base + c.offset, c.count, MPI_BYTE, root, impl_->comm, &req));
    impl_->wait(&req);
  }
}

void HostComm::allgather(const void* send, int64_t bytes, void* recv) {
  if (bytes < 0 || bytes > INT_MAX) {
    throw CommError("MPI_Allgather: " + std::to_string(bytes) +
                    " bytes per rank do not fit MPI's int count (limit 2^31-1)");
  }
  const int n = static_cast<int>(bytes);
  MPI_Request req;
  MPI_CHECK(MPI_Iallgather(send, n, MPI_BYTE, recv, n, MPI_BYTE, impl_->comm, &req));
  impl_->wait(&req);
}

void HostComm::barrier() {
  MPI_Request req;
  MPI_CHECK(MPI_Ibarrier(impl_->comm, &req));
  impl_->wait(&req);
}

void HostComm::send(const void* data, int64_t bytes, int dest, int tag) {
  char* base = static_cast<char*>(const_cast<void*>(data));
  for (const Chunk& c : split_chunks(bytes, impl_->options.max_chunk))
    MPI_CHECK(MPI_Send(base + c.offset, c.count, MPI_BYTE, dest, tag, impl_->comm));
}

void HostComm::recv(void* data, int64_t bytes, int source, int tag) {
  char* base = static_cast<char*>(data);
  for (const Chunk& c : split_chunks(bytes, impl_->options.max_chunk))
    MPI_CHECK(MPI_Recv(base + c.offset, c.count, MPI_BYTE, source, tag, impl_->comm, MPI_STATUS_IGNORE));
}

void HostComm::abort(int code) {
  std::fflush(stdout);
  std::fflush(stderr);
  if (MpiSession::active()) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);  // MPI_Abort does not return; without MPI this rank is the job
}

// ---------------------------------------------------------------------------- agree

Failure agree(const Failure& mine, HostComm& comm) {
  const int world = comm.world(), rank = comm.rank();
  if (world == 1) return mine;
  int64_t first = mine.failed() ? rank : world;
  comm.allreduce(&first, 1, HostOp::min);
  if (first == world) return {};
  const int f = static_cast<int>(first);
  if (f == 0) return rank == 0 ? mine : Failure{"rank 0 failed", mine.user_error};
  constexpr int64_t kMaxMessage = int64_t{1} << 20;
  constexpr int kTagLength = 1, kTagText = 2;
  if (rank == f) {
    const std::string wire = std::string(mine.user_error ? "U" : "E") + mine.message;
    const int64_t len = std::min<int64_t>(static_cast<int64_t>(wire.size()), kMaxMessage);
    comm.send(&len, sizeof len, 0, kTagLength);
    comm.send(wire.data(), len, 0, kTagText);
  } else if (rank == 0) {
    int64_t len = 0;
    comm.recv(&len, sizeof len, f, kTagLength);
    std::string wire(static_cast<size_t>(std::clamp<int64_t>(len, 0, kMaxMessage)), '\0');
    comm.recv(wire.data(), static_cast<int64_t>(wire.size()), f, kTagText);
    if (wire.size() <= 1) return {"rank " + std::to_string(f) + " failed", false};
    return {wire.substr(1), wire[0] == 'U'};
  }
  return {"rank " + std::to_string(f) + " failed", false};
}

}  // namespace dpo
