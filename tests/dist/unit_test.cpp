// Unit tests of dist/ that need no mpirun: chunk splitting, the watchdog, stop signals,
// the fake communicator and the factory, GradSync packing (through a communicator that
// mirrors one rank's data W times), the peer probe of the watchdog (loopback sockets).
#include <gtest/gtest.h>

#include <signal.h>

#include <chrono>
#include <climits>
#include <cmath>
#include <cstring>
#include <mutex>
#include <thread>

#include "dist/chunks.h"
#include "dist/communicator.h"
#include "dist/fake_communicator.h"
#include "dist/grad_sync.h"
#include "dist/peer_probe.h"
#include "dist/signals.h"
#include "dist/watchdog.h"

namespace dpo {
namespace {

// ------------------------------------------------------------------------- chunks

TEST(DistSplitChunks, EmptyCountGivesNoChunks) { EXPECT_TRUE(split_chunks(0, 5).empty()); }

TEST(DistSplitChunks, LastChunkIsShorter) {
  const auto c = split_chunks(10, 3);
  ASSERT_EQ(c.size(), 4u);
  const int64_t offsets[] = {0, 3, 6, 9};
  const int counts[] = {3, 3, 3, 1};
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(c[i].offset, offsets[i]);
    EXPECT_EQ(c[i].count, counts[i]);
  }
}

TEST(DistSplitChunks, ExactMultipleAndSmallerThanChunk) {
  auto c = split_chunks(9, 3);
  ASSERT_EQ(c.size(), 3u);
  EXPECT_EQ(c[2].offset, 6);
  EXPECT_EQ(c[2].count, 3);
  c = split_chunks(7, 100);
  ASSERT_EQ(c.size(), 1u);
  EXPECT_EQ(c[0].count, 7);
}

TEST(DistSplitChunks, CountsAbove32BitsAreSplitBelowIntMax) {
  const int64_t n = 5'000'000'000;  // > 2^32
  const auto c = split_chunks(n, INT_MAX);
  ASSERT_EQ(c.size(), 3u);
  EXPECT_EQ(c[0].count, INT_MAX);
  EXPECT_EQ(c[1].count, INT_MAX);
  EXPECT_EQ(c[2].count, 5'000'000'000 - 2 * int64_t{INT_MAX});  // 705032706
  int64_t next = 0;
  for (const auto& ch : c) {
    EXPECT_EQ(ch.offset, next);
    next += ch.count;
  }
  EXPECT_EQ(next, n);
}

TEST(DistSplitChunks, RejectsBadArguments) {
  EXPECT_THROW(split_chunks(10, 0), std::invalid_argument);
  EXPECT_THROW(split_chunks(10, int64_t{INT_MAX} + 1), std::invalid_argument);
  EXPECT_THROW(split_chunks(-1, 3), std::invalid_argument);
}

// ----------------------------------------------------------------------- watchdog

struct Recorder {
  std::mutex mu;
  std::vector<std::string> messages;
  Watchdog::OnTimeout fn() {
    return [this](const std::string& m) {
      std::lock_guard<std::mutex> lock(mu);
      messages.push_back(m);
    };
  }
  size_t size() {
    std::lock_guard<std::mutex> lock(mu);
    return messages.size();
  }
};

bool wait_for(const std::function<bool()>& cond, double seconds) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (std::chrono::steady_clock::now() < end) {
    if (cond()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return cond();
}

TEST(DistWatchdog, FiresWithTheDocumentedMessage) {
  Recorder rec;
  Watchdog wd("rank 3 on host n17", rec.fn());
  const auto t0 = std::chrono::steady_clock::now();
  auto guard = wd.arm("barrier", 0.1);
  ASSERT_TRUE(wait_for([&] { return rec.size() == 1; }, 5.0));
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_GE(waited, 0.1);
  EXPECT_LT(waited, 2.0);
  EXPECT_EQ(rec.messages[0],
            "rank 3 on host n17: barrier did not complete within 0.1 s; aborting the job");
  EXPECT_EQ(wd.armed_count(), 0);
  EXPECT_EQ(wd.fired_count(), 1);
}

TEST(DistWatchdog, ReleasedGuardDoesNotFire) {
  Recorder rec;
  Watchdog wd("r", rec.fn());
  {
    auto guard = wd.arm("allreduce_sum", 0.15);
    EXPECT_TRUE(guard.armed());
    EXPECT_EQ(wd.armed_count(), 1);
  }
  EXPECT_EQ(wd.armed_count(), 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_EQ(rec.size(), 0u);
  EXPECT_EQ(wd.fired_count(), 0);
}

TEST(DistWatchdog, ZeroTimeoutArmsNothing) {
  Recorder rec;
  Watchdog wd("r", rec.fn());
  auto guard = wd.arm("barrier", 0.0);
  EXPECT_FALSE(guard.armed());
  EXPECT_EQ(wd.armed_count(), 0);
}

TEST(DistWatchdog, NestedGuardsFireIndependently) {
  Recorder rec;
  Watchdog wd("r", rec.fn());
  auto outer = wd.arm("training step 1", 30.0);
  auto inner = wd.arm("allreduce_sum", 0.05);
  ASSERT_TRUE(wait_for([&] { return rec.size() == 1; }, 5.0));
  EXPECT_NE(rec.messages[0].find("allreduce_sum did not complete within 0.05 s"), std::string::npos);
  EXPECT_EQ(wd.armed_count(), 1);  // the step guard is still armed
  inner.release();                 // already fired: releasing is harmless
  outer.release();
  EXPECT_EQ(wd.armed_count(), 0);
}

TEST(DistWatchdog, MovedGuardKeepsTheDeadline) {
  Recorder rec;
  Watchdog wd("r", rec.fn());
  Watchdog::Guard a = wd.arm("x", 30.0);
  Watchdog::Guard b = std::move(a);
  EXPECT_FALSE(a.armed());
  EXPECT_TRUE(b.armed());
  EXPECT_EQ(wd.armed_count(), 1);
  b = Watchdog::Guard();
  EXPECT_EQ(wd.armed_count(), 0);
}

// ------------------------------------------------------------------------ signals

TEST(DistStopSignals, FirstSignalIsRecorded) {
  install_stop_signal_handlers();
  reset_stop_request();
  EXPECT_FALSE(stop_requested());
  EXPECT_EQ(stop_signal(), 0);
  raise(SIGUSR1);  // the handler runs before raise() returns
  EXPECT_TRUE(stop_requested());
  EXPECT_EQ(stop_signal(), SIGUSR1);
  raise(SIGTERM);  // a later one does not overwrite the first
  EXPECT_EQ(stop_signal(), SIGUSR1);
  reset_stop_request();
  EXPECT_FALSE(stop_requested());
  raise(SIGINT);  // one Ctrl-C: graceful, the process lives on
  EXPECT_EQ(stop_signal(), SIGINT);
  reset_stop_request();
}

TEST(DistStopSignals, ExitCodeIsDistinct) {
  EXPECT_EQ(kExitPreempted, 75);
  EXPECT_NE(kExitPreempted, kExitWatchdog);
  EXPECT_NE(kExitPreempted, kExitCommError);
}

// --------------------------------------------------------------- fake + factory

TEST(DistFakeCommunicator, IsRankZeroOfOne) {
  FakeCommunicator c;
  EXPECT_EQ(c.rank(), 0);
  EXPECT_EQ(c.world_size(), 1);
  EXPECT_EQ(c.local_rank(), 0);
  EXPECT_EQ(c.local_size(), 1);
  EXPECT_EQ(c.name(), "fake");
}

TEST(DistFakeCommunicator, CollectivesAreTheIdentity) {
  FakeCommunicator c;
  torch::Tensor f = torch::arange(7, torch::kFloat32);
  c.allreduce_sum(f);
  for (int i = 0; i < 7; ++i) EXPECT_EQ(f.data_ptr<float>()[i], static_cast<float>(i));
  torch::Tensor l = torch::full({3}, int64_t{5'000'000'000});
  c.allreduce_sum(l);
  EXPECT_EQ(l.data_ptr<int64_t>()[2], 5'000'000'000);
  c.broadcast(f, 0);
  EXPECT_EQ(f.data_ptr<float>()[6], 6.0f);
  c.barrier();
  EXPECT_EQ(c.allreduce_sum(2.5), 2.5);
  std::vector<double> v{1.0, -2.0};
  c.allreduce_sum(v);
  EXPECT_EQ(v, (std::vector<double>{1.0, -2.0}));
  EXPECT_TRUE(c.any(true));
  EXPECT_FALSE(c.any(false));
  EXPECT_EQ(c.allgather_string("abc"), std::vector<std::string>{"abc"});
  EXPECT_EQ(c.allgather_string(""), std::vector<std::string>{""});
  std::string s("with\0nul", 8);
  c.broadcast_string(s, 0);
  EXPECT_EQ(s, std::string("with\0nul", 8));
}

TEST(DistFakeCommunicator, RejectsWhatTheRealBackendsReject) {
  FakeCommunicator c;
  torch::Tensor nc = torch::zeros({2, 3}).t();
  try {
    c.allreduce_sum(nc);
    FAIL() << "non-contiguous tensor accepted";
  } catch (const CommError& e) {
    EXPECT_NE(std::string(e.what()).find("not contiguous"), std::string::npos) << e.what();
  }
  torch::Tensor undefined;
  EXPECT_THROW(c.allreduce_sum(undefined), CommError);
  torch::Tensor b = torch::zeros({2}, torch::kBool);
  EXPECT_THROW(c.allreduce_sum(b), CommError);
  torch::Tensor f = torch::zeros({2});
  EXPECT_THROW(c.broadcast(f, 1), CommError);  // no rank 1
  std::string s = "x";
  EXPECT_THROW(c.broadcast_string(s, -1), CommError);
}

TEST(DistFakeCommunicator, AbortThrowsWithCodeAndRank) {
  FakeCommunicator c;
  try {
    c.abort(7, "data shard missing");
  } catch (const CommAborted& e) {
    EXPECT_EQ(e.code, 7);
    const std::string m = e.what();
    EXPECT_EQ(m.rfind("rank 0 on host ", 0), 0u) << m;
    EXPECT_NE(m.find(": data shard missing"), std::string::npos) << m;
  }
}

TEST(DistFakeCommunicator, TimeoutArmsAndDisarms) {
  FakeCommunicator c;
  EXPECT_THROW(c.set_timeout(-1.0), CommError);
  c.set_timeout(30.0);
  EXPECT_EQ(c.timeout(), 30.0);
  torch::Tensor f = torch::ones({4});
  c.allreduce_sum(f);  // armed and released inside
  EXPECT_EQ(f.data_ptr<float>()[0], 1.0f);
  auto step = c.watch("training step 3", 30.0);
  EXPECT_TRUE(step.armed());
  EXPECT_FALSE(c.watch("nothing", 0.0).armed());
}

TEST(DistFactory, BackendsAreListedInPreferenceOrder) {
  const auto b = communicator_backends();
  ASSERT_EQ(b.size(), 3u);
  EXPECT_EQ(b[0].name, "nccl");
  EXPECT_EQ(b[1].name, "mpi");
  EXPECT_EQ(b[2].name, "fake");
  EXPECT_TRUE(b[2].enabled);
  // This process never starts MPI, so neither MPI-based backend can be enabled.
  EXPECT_FALSE(b[0].enabled);
  EXPECT_FALSE(b[1].enabled);
  EXPECT_NE(b[1].reason.find("MpiSession"), std::string::npos) << b[1].reason;
  EXPECT_FALSE(b[0].reason.empty());
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const CommError& e) {
    return e.what();
  }
  return "";
}

TEST(DistFactory, ChoosesOrExplains) {
  EXPECT_EQ(make_communicator("fake", false)->name(), "fake");
  EXPECT_EQ(make_communicator("fake", true)->name(), "fake");
  EXPECT_NE(error_of([] { make_communicator("gloo", false); }).find("choose auto, mpi, nccl or fake"),
            std::string::npos);
  const std::string mpi = error_of([] { make_communicator("mpi", false); });
  EXPECT_NE(mpi.find("'mpi' is not available"), std::string::npos) << mpi;
  EXPECT_NE(mpi.find("MpiSession"), std::string::npos) << mpi;
  EXPECT_NE(error_of([] { make_communicator("auto", false); }).find("'mpi' is not available"),
            std::string::npos);
  EXPECT_NE(error_of([] { make_communicator("nccl", true); }).find("'nccl' is not available"),
            std::string::npos);
  EXPECT_NE(error_of([] { make_communicator("nccl", false); }).find("CUDA tensors"), std::string::npos);
}

// ---------------------------------------------------------------- GradSync (mirror)

// A communicator that behaves as W ranks holding this rank's exact data: allreduce
// multiplies by W, allgather repeats the sender. It records what allreduce received, so
// the fused layout can be checked. `other_layout` makes rank 1's allgather differ.
class MirrorCommunicator : public Communicator {
 public:
  explicit MirrorCommunicator(int world) : world_(world) {}
  int rank() const override { return 0; }
  int world_size() const override { return world_; }
  int local_rank() const override { return 0; }
  int local_size() const override { return world_; }
  std::string name() const override { return "mirror"; }
  [[noreturn]] void abort(int code, const std::string& why) override { throw CommAborted(code, why); }

  std::vector<torch::Tensor> reduced;  // clones of what allreduce_sum received
  int allgathers = 0;
  std::string other_layout;

 protected:
  void allreduce_impl(torch::Tensor& t) override {
    reduced.push_back(t.clone());
    t.mul_(world_);
  }
  void broadcast_impl(torch::Tensor&, int) override {}
  void barrier_impl() override {}
  void host_allreduce_sum(double* d, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) d[i] *= world_;
  }
  void host_allgather(const void* send, int64_t bytes, void* recv) override {
    ++allgathers;
    for (int r = 0; r < world_; ++r) std::memcpy(static_cast<char*>(recv) + r * bytes, send, bytes);
    if (!other_layout.empty() && bytes > 8) {
      // the padded-string phase: rank 1 reports another layout of the same length
      std::memcpy(static_cast<char*>(recv) + bytes, other_layout.data(),
                  std::min<int64_t>(bytes, static_cast<int64_t>(other_layout.size())));
    }
  }
  void host_broadcast(void*, int64_t, int) override {}

 private:
  int world_;
};

std::vector<torch::Tensor> make_params() {
  auto a = torch::zeros({2, 3}).set_requires_grad(true);
  auto b = torch::zeros({4}).set_requires_grad(true);
  auto c = torch::zeros({3, 1}).set_requires_grad(true);
  a.mutable_grad() = torch::arange(6, torch::kFloat32).reshape({2, 3});
  // b has no gradient (its module saw no data on this rank)
  c.mutable_grad() = torch::tensor({10.0f, 20.0f, 30.0f}).reshape({3, 1});
  return {a, b, c};
}

TEST(DistGradSync, FusesInParamOrderAveragesAndWritesBackInPlace) {
  MirrorCommunicator comm(4);
  auto params = make_params();
  const void* a_storage = params[0].grad().data_ptr();
  GradSync gs(comm);
  gs.sync(params);
  // one allreduce of the 13 elements: a's 6, b's 4 zeros, c's 3
  ASSERT_EQ(comm.reduced.size(), 1u);
  EXPECT_EQ(gs.numel(), 13);
  const float expect_flat[] = {0, 1, 2, 3, 4, 5, 0, 0, 0, 0, 10, 20, 30};
  for (int i = 0; i < 13; ++i) EXPECT_EQ(comm.reduced[0].data_ptr<float>()[i], expect_flat[i]) << i;
  // 4 identical ranks: the mean is the local gradient
  for (int i = 0; i < 6; ++i) EXPECT_EQ(params[0].grad().data_ptr<float>()[i], static_cast<float>(i));
  ASSERT_TRUE(params[1].grad().defined());
  EXPECT_EQ(params[1].grad().sizes(), params[1].sizes());
  EXPECT_EQ(params[1].grad().abs().sum().item<float>(), 0.0f);
  EXPECT_EQ(params[2].grad().data_ptr<float>()[2], 30.0f);
  EXPECT_EQ(params[0].grad().data_ptr(), a_storage);  // in place
  EXPECT_EQ(comm.allgathers, 2);  // layout checked once (lengths + bytes)
  // second step: buffer reused, layout not re-checked
  const void* buf = gs.buffer().data_ptr();
  params[0].grad().fill_(2.0f);
  gs.sync(params);
  EXPECT_EQ(gs.buffer().data_ptr(), buf);
  EXPECT_EQ(comm.allgathers, 2);
  EXPECT_EQ(params[0].grad().data_ptr<float>()[5], 2.0f);
}

TEST(DistGradSync, BoundParamsSyncWithoutArguments) {
  MirrorCommunicator comm(2);
  auto params = make_params();
  GradSync gs(comm, params);
  gs.sync();
  ASSERT_EQ(comm.reduced.size(), 1u);
  EXPECT_EQ(comm.reduced[0].numel(), 13);
  EXPECT_TRUE(params[1].grad().defined());  // the caller's tensors got the zero grad
  EXPECT_EQ(params[2].grad().data_ptr<float>()[1], 20.0f);
}

TEST(DistGradSync, DividesByWorldSize) {
  // The mirror sums 3 copies; a different mirror factor would show up here.
  MirrorCommunicator comm(3);
  auto p = torch::zeros({5}).set_requires_grad(true);
  p.mutable_grad() = torch::full({5}, 0.75f);
  GradSync(comm).sync({p});
  EXPECT_FLOAT_EQ(p.grad().data_ptr<float>()[4], 0.75f);  // (3 * 0.75) / 3
}

TEST(DistGradSync, MixedDtypesAndNonContiguousGradsTakeTheGenericPath) {
  MirrorCommunicator comm(2);
  auto a = torch::zeros({3, 2}).set_requires_grad(true);
  auto b = torch::zeros({2}, torch::kFloat64).set_requires_grad(true);
  a.mutable_grad() = torch::arange(6, torch::kFloat32).reshape({2, 3}).t();  // (3, 2), not contiguous
  b.mutable_grad() = torch::tensor({0.1, 0.2}, torch::kFloat64);
  ASSERT_FALSE(a.grad().is_contiguous());
  GradSync(comm).sync({a, b});
  ASSERT_EQ(comm.reduced.size(), 1u);
  EXPECT_EQ(comm.reduced[0].scalar_type(), torch::kFloat64);  // promoted buffer
  // packed in a's logical (row-major of the (3, 2) view) order: a[i][j] = 3 j + i
  const double expect_flat[] = {0, 3, 1, 4, 2, 5, 0.1, 0.2};
  for (int i = 0; i < 8; ++i) EXPECT_EQ(comm.reduced[0].data_ptr<double>()[i], expect_flat[i]) << i;
  EXPECT_EQ(a.grad().scalar_type(), torch::kFloat32);
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 2; ++j) EXPECT_EQ(a.grad()[i][j].item<float>(), static_cast<float>(3 * j + i));
  }
  EXPECT_DOUBLE_EQ(b.grad().data_ptr<double>()[1], 0.2);
}

TEST(DistGradSync, LayoutMismatchIsReportedWithBothLayouts) {
  MirrorCommunicator comm(2);
  comm.other_layout = "3;Float:6;Float:4;Float:9";  // same length as ours, another shape
  auto params = make_params();
  try {
    GradSync(comm).sync(params);
    FAIL() << "layout mismatch not detected";
  } catch (const CommError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("differs between ranks"), std::string::npos) << m;
    EXPECT_NE(m.find("3;Float:6;Float:4;Float:3"), std::string::npos) << m;
    EXPECT_NE(m.find("3;Float:6;Float:4;Float:9"), std::string::npos) << m;
  }
  EXPECT_TRUE(comm.reduced.empty());  // nothing was reduced
}

TEST(DistGradSync, SingleRankOnlyFillsMissingGrads) {
  FakeCommunicator comm;
  auto params = make_params();
  GradSync gs(comm);
  gs.sync(params);
  EXPECT_EQ(comm.collectives(), 0);
  EXPECT_EQ(gs.numel(), 13);
  EXPECT_TRUE(params[1].grad().defined());
  EXPECT_EQ(params[0].grad().data_ptr<float>()[4], 4.0f);
}

// ---- PeerResponder / probe_peers (dist/peer_probe.h): who answers, who does not, how fast.
// Loopback only.
double peer_probe_seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

TEST(PeerProbe, EndpointNamesHostPortAndAddresses) {
  dpo::PeerResponder r;
  const std::string e = r.endpoint();
  // "<host> <port> <addr>[,<addr>...]"
  const auto sp1 = e.find(' '), sp2 = e.rfind(' ');
  ASSERT_NE(sp1, std::string::npos);
  ASSERT_NE(sp1, sp2) << e;
  const int port = std::stoi(e.substr(sp1 + 1, sp2 - sp1 - 1));
  EXPECT_GT(port, 0);
  EXPECT_LE(port, 65535);
  EXPECT_NE(e.substr(sp2 + 1).find("127.0.0.1"), std::string::npos) << "loopback is always listed: " << e;
}

TEST(PeerProbe, LiveRespondersAnswerQuickly) {
  dpo::PeerResponder a, b, c;
  const std::vector<std::string> eps = {a.endpoint(), b.endpoint(), c.endpoint()};
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_TRUE(dpo::probe_peers(eps, 0, 5.0).empty());
  EXPECT_TRUE(dpo::probe_peers(eps, 2, 5.0).empty());
  EXPECT_LT(peer_probe_seconds_since(t0), 2.0) << "answers must not wait for the deadline";
}

TEST(PeerProbe, GoneAndMalformedPeersAreNamed) {
  dpo::PeerResponder a;
  std::string gone;
  {
    dpo::PeerResponder b;
    gone = b.endpoint();
  }  // b's socket is closed: connection refused
  const std::vector<std::string> eps = {a.endpoint(), gone, "not an endpoint"};
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<std::string> silent = dpo::probe_peers(eps, 0, 3.0);
  ASSERT_EQ(silent.size(), 2u);
  EXPECT_EQ(silent[0].rfind("rank 1 on host ", 0), 0u) << silent[0];
  EXPECT_EQ(silent[1], "rank 2 on host ?");
  EXPECT_LT(peer_probe_seconds_since(t0), 2.5) << "a refused connection is known at once";
}

TEST(PeerProbe, SelfIsNeverListed) {
  const std::vector<std::string> eps = {"garbage"};
  EXPECT_TRUE(dpo::probe_peers(eps, 0, 0.5).empty());
}

}  // namespace
}  // namespace dpo
