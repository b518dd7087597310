// Communicator: argument checks, watchdog arming, the host-value conveniences (protocol
// steps 4-6 of communicator.h) and the backend factory.
#include "dist/communicator.h"

#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <thread>

#include "dist/fake_communicator.h"
#include "dist/mpi_communicator.h"
#ifdef DPO_DIST_WITH_NCCL
#include "dist/nccl_communicator.h"
#endif

namespace dpo {

namespace {

std::string describe(const torch::Tensor& t) {
  return std::to_string(t.numel()) + " " + c10::toString(t.scalar_type()) + " elements";
}

void check_tensor(const torch::Tensor& t, const char* op) {
  if (!t.defined()) throw CommError(std::string(op) + ": the tensor is undefined");
  if (!t.is_contiguous()) {
    throw CommError(std::string(op) + ": the tensor (" + describe(t) +
                    ") is not contiguous; pass t.contiguous() and copy the result back "
                    "(the collective writes into the caller's storage)");
  }
}

// If MPI_Abort itself hangs (a broken runtime), the watchdog must still end this rank.
constexpr int kAbortBackstopSeconds = 30;
// How long a timed-out rank waits for its peers to answer the probe (peer_probe.h).
constexpr double kProbeSeconds = 3.0;

}  // namespace

Communicator::~Communicator() = default;

std::string Communicator::host() const {
  char buf[256] = {0};
  if (gethostname(buf, sizeof buf - 1) != 0) return "unknown";
  return buf;
}

std::string Communicator::who() const {
  return "rank " + std::to_string(rank()) + " on host " + host();
}

Watchdog& Communicator::watchdog() {
  if (!watchdog_) {
    const std::string label = who();
    watchdog_ = std::make_unique<Watchdog>(label, [this, label](const std::string& message) {
      std::thread([] {
        std::this_thread::sleep_for(std::chrono::seconds(kAbortBackstopSeconds));
        std::_Exit(kExitWatchdog);
      }).detach();
      std::string why = message.substr(label.size() + 2);  // abort() prefixes who() again
      if (!peer_endpoints_.empty()) {
        const std::vector<std::string> silent = probe_peers(peer_endpoints_, rank(), kProbeSeconds);
        std::string list;
        for (const auto& s : silent) list += (list.empty() ? "" : ", ") + s;
        why += silent.empty() ? " (every other rank still answers: a peer is slow or stuck, not lost)"
                              : " (stopped answering: " + list + ")";
      }
      abort(kExitWatchdog, why);
    });
  }
  return *watchdog_;
}

void Communicator::enable_peer_probe() {
  std::string mine;
  try {
    responder_ = std::make_unique<PeerResponder>();
    mine = responder_->endpoint();
  } catch (const std::exception&) {
    responder_.reset();  // no probing of this rank: peers will list it as not answering
  }
  std::vector<std::string> all = allgather_string(mine);
  if (!mine.empty()) peer_endpoints_ = std::move(all);
}

void Communicator::set_timeout(double seconds) {
  if (!(seconds >= 0)) {
    throw CommError("Communicator::set_timeout: " + std::to_string(seconds) +
                    " s is not a valid timeout (0 = none, or a positive number of seconds)");
  }
  timeout_s_ = seconds;
}

Watchdog::Guard Communicator::watch(const std::string& what, double seconds) {
  if (!(seconds > 0)) return Watchdog::Guard();
  return watchdog().arm(what, seconds);
}

void Communicator::allreduce_sum(torch::Tensor& t) {
  check_tensor(t, "allreduce_sum");
  auto guard = timeout_s_ > 0 ? watchdog().arm("allreduce_sum of " + describe(t), timeout_s_)
                              : Watchdog::Guard();
  allreduce_impl(t);
}

void Communicator::broadcast(torch::Tensor& t, int root) {
  check_tensor(t, "broadcast");
  if (root < 0 || root >= world_size()) {
    throw CommError("broadcast: root " + std::to_string(root) + " is not a rank of this " +
                    std::to_string(world_size()) + "-rank job");
  }
  auto guard = timeout_s_ > 0 ? watchdog().arm("broadcast of " + describe(t) + " from rank " +
                                                   std::to_string(root), timeout_s_)
                              : Watchdog::Guard();
  broadcast_impl(t, root);
}

void Communicator::barrier() {
  auto guard = timeout_s_ > 0 ? watchdog().arm("barrier", timeout_s_) : Watchdog::Guard();
  barrier_impl();
}

double Communicator::allreduce_sum(double v) {
  auto guard = timeout_s_ > 0 ? watchdog().arm("allreduce_sum of 1 double", timeout_s_)
                              : Watchdog::Guard();
  host_allreduce_sum(&v, 1);
  return v;
}

void Communicator::allreduce_sum(std::vector<double>& v) {
  auto guard = timeout_s_ > 0 ? watchdog().arm("allreduce_sum of " + std::to_string(v.size()) +
                                                   " doubles", timeout_s_)
                              : Watchdog::Guard();
  host_allreduce_sum(v.data(), static_cast<int64_t>(v.size()));
}

bool Communicator::any(bool flag) {
  auto guard = timeout_s_ > 0 ? watchdog().arm("any", timeout_s_) : Watchdog::Guard();
  double x = flag ? 1.0 : 0.0;
  host_allreduce_sum(&x, 1);
  return x > 0.5;
}

std::vector<std::string> Communicator::allgather_string(const std::string& s) {
  auto guard = timeout_s_ > 0 ? watchdog().arm("allgather_string", timeout_s_) : Watchdog::Guard();
  const int world = world_size();
  // (a) lengths
  const int64_t len = static_cast<int64_t>(s.size());
  std::vector<int64_t> lens(static_cast<size_t>(world), 0);
  host_allgather(&len, sizeof len, lens.data());
  int64_t longest = 0;
  for (int64_t l : lens) longest = std::max(longest, l);
  std::vector<std::string> out(static_cast<size_t>(world));
  if (longest == 0) return out;
  // (b) bytes padded to the longest
  std::string padded = s;
  padded.resize(static_cast<size_t>(longest), '\0');
  std::string all(static_cast<size_t>(longest) * world, '\0');
  host_allgather(padded.data(), longest, all.data());
  for (int r = 0; r < world; ++r) out[r] = all.substr(static_cast<size_t>(r * longest), lens[r]);
  return out;
}

void Communicator::broadcast_string(std::string& s, int root) {
  if (root < 0 || root >= world_size()) {
    throw CommError("broadcast_string: root " + std::to_string(root) + " is not a rank of this " +
                    std::to_string(world_size()) + "-rank job");
  }
  auto guard = timeout_s_ > 0 ? watchdog().arm("broadcast_string from rank " + std::to_string(root),
                                               timeout_s_)
                              : Watchdog::Guard();
  int64_t len = static_cast<int64_t>(s.size());  // (a)
  host_broadcast(&len, sizeof len, root);
  s.resize(static_cast<size_t>(len));           // (b)
  if (len > 0) host_broadcast(s.data(), len, root);  // (c)
}

// --------------------------------------------------------------------------- factory

std::vector<BackendInfo> communicator_backends() {
  std::vector<BackendInfo> out;
#ifdef DPO_DIST_WITH_NCCL
  out.push_back(nccl_backend_info());
#else
  out.push_back({"nccl", false,
                 "this build has no NCCL backend (configured without CUDA toolkit or NCCL: "
                 "DPO_HAVE_NCCL OFF); rebuild where nccl.h and libnccl are found"});
#endif
  if (MpiSession::active()) {
    out.push_back({"mpi", true, ""});
  } else {
    out.push_back({"mpi", false,
                   "MPI is not initialized: create a dpo::MpiSession at the top of main()"});
  }
  out.push_back({"fake", true, ""});
  return out;
}

std::unique_ptr<Communicator> make_communicator(const std::string& backend, bool cuda_tensors) {
  const auto backends = communicator_backends();
  auto info = [&](const std::string& name) {
    for (const auto& b : backends) {
      if (b.name == name) return b;
    }
    return BackendInfo{name, false, "unknown backend"};
  };
  auto unavailable = [&](const BackendInfo& b) {
    return CommError("communicator backend '" + b.name + "' is not available: " + b.reason);
  };
  std::string chosen = backend;
  if (backend == "auto") {
    chosen = cuda_tensors && info("nccl").enabled ? "nccl" : "mpi";
  } else if (backend != "mpi" && backend != "nccl" && backend != "fake") {
    throw CommError("unknown communicator backend '" + backend + "' (choose auto, mpi, nccl or fake)");
  }
  if (chosen == "nccl" && !cuda_tensors) {
    throw CommError("communicator backend 'nccl' reduces CUDA tensors, but the tensors are on the "
                    "CPU; use backend mpi (or auto) for --device cpu");
  }
  const BackendInfo b = info(chosen);
  if (!b.enabled) throw unavailable(b);
  if (chosen == "fake") return std::make_unique<FakeCommunicator>();
  if (chosen == "mpi") return std::make_unique<MpiCommunicator>();
#ifdef DPO_DIST_WITH_NCCL
  return std::make_unique<NcclCommunicator>();
#else
  throw unavailable(b);  // unreachable: nccl is never enabled in this build
#endif
}

}  // namespace dpo
