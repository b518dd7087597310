// Internal to dist/: mpi.h and the MPI_CHECK macro for dist's own .cpp files, and the
// MPI_Comm of a HostComm for the backends built on it. Never include outside dist/.
#pragma once
// The C API only: Open MPI's deprecated C++ bindings need libmpi_cxx, which is not linked.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <string>

#include "dist/mpi_base.h"

namespace dpo {

/// Throws CommError "<call> failed on rank R (file:line): <MPI error string>".
/// `call` may be the whole expression; only the function name is kept.
[[noreturn]] void throw_mpi_error(const char* call, int code, const char* file, int line);

/// "dist/mpi_base.cpp" from an absolute __FILE__: the last directory and the name.
inline std::string short_source_path(const char* file) {
  const std::string f(file);
  const auto last = f.rfind('/');
  if (last == std::string::npos || last == 0) return f;
  const auto prev = f.rfind('/', last - 1);
  return prev == std::string::npos ? f : f.substr(prev + 1);
}

/// MPI's text for an error code ("MPI_ERR_COUNT: invalid count argument").
std::string mpi_error_string(int code);

struct HostCommAccess {
  static MPI_Comm comm(const HostComm& c);
};

}  // namespace dpo

// Every MPI call in dist/ goes through this: the failure names the call, rank, file, line.
#define MPI_CHECK(call)                                                          \
  do {                                                                           \
    const int dpo_mpi_rc_ = (call);                                              \
    if (dpo_mpi_rc_ != MPI_SUCCESS) {                                            \
      ::dpo::throw_mpi_error(#call, dpo_mpi_rc_, __FILE__, __LINE__);            \
    }                                                                            \
  } while (0)
