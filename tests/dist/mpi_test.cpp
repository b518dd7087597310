// MPI tests of dist/, run by ctest under mpirun -np 1..4 (dist_mpi_test_np<N>).
// Every TEST runs on every rank and calls the same collectives in the same order; value
// checks use EXPECT (never an early return between collectives) so a failing rank
// does not desynchronize the others. Expected values are computed in closed form.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <thread>

#include "dist/communicator.h"
#include "dist/grad_sync.h"
#include "dist/mpi_communicator.h"
#include "dist/mpi_internal.h"

namespace dpo {
namespace {

MpiCommunicator* g_comm = nullptr;

int R() { return g_comm->rank(); }
int W() { return g_comm->world_size(); }

TEST(MpiTopology, RanksAreDistinctAndMatchTheLauncher) {
  const char* env = std::getenv("OMPI_COMM_WORLD_SIZE");
  EXPECT_EQ(W(), env ? std::atoi(env) : 1);
  EXPECT_GE(R(), 0);
  EXPECT_LT(R(), W());
  // ctest runs every rank on this one host
  EXPECT_EQ(g_comm->local_size(), W());
  EXPECT_EQ(g_comm->local_rank(), R());
  const auto all = g_comm->allgather_string(std::to_string(R()));
  ASSERT_EQ(static_cast<int>(all.size()), W());
  for (int r = 0; r < W(); ++r) EXPECT_EQ(all[r], std::to_string(r));
  EXPECT_EQ(g_comm->name(), "mpi");
}

// t[i] = (rank + 1) * (i % 1000): every sum is an integer below 2^24, exact in float.
TEST(MpiAllreduce, OddSizesFloat32) {
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{1000003}}) {
    torch::Tensor t = torch::empty({n}, torch::kFloat32);
    float* p = t.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>((R() + 1) * (i % 1000));
    g_comm->allreduce_sum(t);
    const int64_t tri = int64_t{W()} * (W() + 1) / 2;
    int64_t bad = 0;
    for (int64_t i = 0; i < n; ++i) bad += p[i] != static_cast<float>(tri * (i % 1000));
    EXPECT_EQ(bad, 0) << "n = " << n;
  }
}

TEST(MpiAllreduce, Float64Int64Int32Uint8Int8) {
  const int64_t n = 1001;
  const int64_t tri = int64_t{W()} * (W() + 1) / 2;  // sum of (rank + 1)
  torch::Tensor d = torch::empty({n}, torch::kFloat64);
  torch::Tensor l = torch::empty({n}, torch::kInt64);
  torch::Tensor i32 = torch::empty({n}, torch::kInt32);
  torch::Tensor u8 = torch::empty({n}, torch::kUInt8);
  torch::Tensor i8 = torch::empty({n}, torch::kInt8);
  for (int64_t i = 0; i < n; ++i) {
    d.data_ptr<double>()[i] = (R() + 1) * 0.25 * i;
    l.data_ptr<int64_t>()[i] = (R() + 1) * (int64_t{3'000'000'000} + i);  // beyond 32 bits
    i32.data_ptr<int32_t>()[i] = (R() + 1) * static_cast<int32_t>(i);
    u8.data_ptr<uint8_t>()[i] = static_cast<uint8_t>((R() + 1) * (i % 20));
    i8.data_ptr<int8_t>()[i] = static_cast<int8_t>(-(R() + 1) * (i % 10));
  }
  for (torch::Tensor* t : {&d, &l, &i32, &u8, &i8}) g_comm->allreduce_sum(*t);
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    bad += d.data_ptr<double>()[i] != tri * 0.25 * i;
    bad += l.data_ptr<int64_t>()[i] != tri * (int64_t{3'000'000'000} + i);
    bad += i32.data_ptr<int32_t>()[i] != static_cast<int32_t>(tri * i);
    bad += u8.data_ptr<uint8_t>()[i] != static_cast<uint8_t>(tri * (i % 20));
    bad += i8.data_ptr<int8_t>()[i] != static_cast<int8_t>(-tri * (i % 10));
  }
  EXPECT_EQ(bad, 0);
}

TEST(MpiAllreduce, MultiDimensionalAndEmpty) {
  torch::Tensor t = torch::full({3, 4, 5}, static_cast<float>(R()));
  g_comm->allreduce_sum(t);
  EXPECT_EQ(t.data_ptr<float>()[59], static_cast<float>(W() * (W() - 1) / 2));
  torch::Tensor e = torch::empty({0}, torch::kFloat32);
  g_comm->allreduce_sum(e);  // no MPI call, no error
  EXPECT_EQ(e.numel(), 0);
}

TEST(MpiAllreduce, UnsupportedDtypeIsRejectedOnEveryRank) {
  torch::Tensor b = torch::zeros({4}, torch::kBFloat16);
  try {
    g_comm->allreduce_sum(b);
    ADD_FAILURE() << "bfloat16 accepted by the MPI backend";
  } catch (const CommError& e) {
    EXPECT_NE(std::string(e.what()).find("cannot sum dtype BFloat16"), std::string::npos) << e.what();
  }
}

TEST(MpiChunks, ForcedSmallChunksGiveTheSameResult) {
  MpiCommunicator small(MpiOptions{1000});  // collective: every rank makes one
  EXPECT_EQ(small.options().max_chunk, 1000);
  const int64_t n = 1000003;  // 1001 chunks, the last of 3 elements
  torch::Tensor t = torch::empty({n}, torch::kFloat32);
  float* p = t.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>((R() + 1) * (i % 4096));
  small.allreduce_sum(t);
  const int64_t tri = int64_t{W()} * (W() + 1) / 2;
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad += p[i] != static_cast<float>(tri * (i % 4096));
  EXPECT_EQ(bad, 0);

  MpiCommunicator tiny(MpiOptions{3});
  std::vector<double> v(10);
  for (int i = 0; i < 10; ++i) v[i] = R() + i;
  tiny.allreduce_sum(v);  // 4 chunks of doubles
  for (int i = 0; i < 10; ++i) EXPECT_EQ(v[i], W() * (W() - 1) / 2.0 + W() * i);
  torch::Tensor bc = torch::empty({7}, torch::kFloat64);  // 56 bytes: 19 byte-chunks of <= 3
  for (int i = 0; i < 7; ++i) bc.data_ptr<double>()[i] = R() == 0 ? 1.5 * i : -1.0;
  tiny.broadcast(bc, 0);
  for (int i = 0; i < 7; ++i) EXPECT_EQ(bc.data_ptr<double>()[i], 1.5 * i);
  std::string s = R() == W() - 1 ? "a string longer than three bytes" : "";
  tiny.broadcast_string(s, W() - 1);
  EXPECT_EQ(s, "a string longer than three bytes");
}

TEST(MpiBroadcast, FromEveryRootAnyDtype) {
  for (int root = 0; root < W(); ++root) {
    torch::Tensor f = torch::full({2, 1001}, static_cast<float>(R() * 10 + 1));
    g_comm->broadcast(f, root);
    EXPECT_EQ((f != static_cast<float>(root * 10 + 1)).sum().item<int64_t>(), 0) << "root " << root;
    torch::Tensor h = torch::full({5}, static_cast<float>(R()) + 0.5f).to(torch::kBFloat16);
    g_comm->broadcast(h, root);  // bytes: bf16 broadcasts even though it cannot be summed
    EXPECT_EQ(h.to(torch::kFloat32).data_ptr<float>()[4], static_cast<float>(root) + 0.5f);
  }
  torch::Tensor f = torch::zeros({2});
  EXPECT_THROW(g_comm->broadcast(f, W()), CommError);  // checked before any MPI call
}

TEST(MpiBarrier, WaitsForTheLastRank) {
  const auto t0 = std::chrono::steady_clock::now();
  if (R() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(300));
  g_comm->barrier();
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_GE(waited, 0.25);  // every rank left the barrier after rank 0 entered it
}

TEST(MpiConveniences, AnyScalarVectorStrings) {
  EXPECT_TRUE(g_comm->any(R() == W() - 1));
  EXPECT_FALSE(g_comm->any(false));
  EXPECT_TRUE(g_comm->any(true));
  EXPECT_EQ(g_comm->allreduce_sum(R() + 0.5), W() * (W() - 1) / 2.0 + 0.5 * W());
  std::vector<double> v{1.0, static_cast<double>(R()), -2.0};
  g_comm->allreduce_sum(v);
  EXPECT_EQ(v, (std::vector<double>{1.0 * W(), W() * (W() - 1) / 2.0, -2.0 * W()}));
  // rank r sends r*3 copies of 'a'+r (rank 0 the empty string), with a NUL inside for r >= 2
  std::string mine(static_cast<size_t>(R() * 3), static_cast<char>('a' + R()));
  if (R() >= 2) mine[1] = '\0';
  const auto all = g_comm->allgather_string(mine);
  ASSERT_EQ(static_cast<int>(all.size()), W());
  for (int r = 0; r < W(); ++r) {
    std::string expect(static_cast<size_t>(r * 3), static_cast<char>('a' + r));
    if (r >= 2) expect[1] = '\0';
    EXPECT_EQ(all[r], expect) << "rank " << r;
  }
  std::string cfg = R() == W() - 1 ? "lora_r=8\nlearning_rate=5e-4" : "stale " + std::to_string(R());
  g_comm->broadcast_string(cfg, W() - 1);
  EXPECT_EQ(cfg, "lora_r=8\nlearning_rate=5e-4");
}

TEST(MpiErrors, FailingCallBecomesCommErrorNamingCallAndRank) {
  int dummy = 0;
  try {
    MPI_CHECK(MPI_Bcast(&dummy, -1, MPI_INT, 0, MpiAccess::comm(*g_comm)));  // invalid count
    ADD_FAILURE() << "MPI accepted a negative count";
  } catch (const CommError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("MPI_Bcast failed on rank " + std::to_string(R())), std::string::npos) << m;
    EXPECT_NE(m.find("mpi_test.cpp:"), std::string::npos) << m;
    EXPECT_NE(m.find("MPI_ERR_COUNT"), std::string::npos) << m;
  }
}

TEST(MpiFactory, AutoPicksMpiForCpuTensors) {
  auto c = make_communicator("auto", false);  // collective (Comm_dup)
  EXPECT_EQ(c->name(), "mpi");
  EXPECT_EQ(c->world_size(), W());
  auto m = make_communicator("mpi", true);  // CUDA tensors staged through the host
  EXPECT_EQ(m->name(), "mpi");
}

TEST(MpiGradSync, AveragesOverRanksIncludingMissingGrads) {
  // a: grad (rank + 1) * i; b: only even ranks have a gradient (value rank + 1);
  // c: a 3-D parameter with constant grad rank.
  auto a = torch::zeros({4, 3}).set_requires_grad(true);
  auto b = torch::zeros({5}).set_requires_grad(true);
  auto c = torch::zeros({2, 2, 2}).set_requires_grad(true);
  a.mutable_grad() = torch::arange(12, torch::kFloat32).reshape({4, 3}) * static_cast<float>(R() + 1);
  if (R() % 2 == 0) b.mutable_grad() = torch::full({5}, static_cast<float>(R() + 1));
  c.mutable_grad() = torch::full({2, 2, 2}, static_cast<float>(R()));
  const void* a_storage = a.grad().data_ptr();
  GradSync gs(*g_comm);
  gs.sync({a, b, c});
  EXPECT_EQ(gs.numel(), 25);
  double mean_scale = 0, mean_b = 0, mean_c = 0;
  for (int r = 0; r < W(); ++r) {
    mean_scale += (r + 1.0) / W();
    mean_b += (r % 2 == 0 ? r + 1.0 : 0.0) / W();
    mean_c += static_cast<double>(r) / W();
  }
  // Sums of small integers are exact in any reduction order; the division by W rounds
  // once (<= 1/2 ulp), the reference once more: within EXPECT_FLOAT_EQ's 4 ulps.
  for (int i = 0; i < 12; ++i) EXPECT_FLOAT_EQ(a.grad().data_ptr<float>()[i], static_cast<float>(i * mean_scale));
  ASSERT_TRUE(b.grad().defined());
  for (int i = 0; i < 5; ++i) EXPECT_FLOAT_EQ(b.grad().data_ptr<float>()[i], static_cast<float>(mean_b));
  for (int i = 0; i < 8; ++i) EXPECT_FLOAT_EQ(c.grad().data_ptr<float>()[i], static_cast<float>(mean_c));
  EXPECT_EQ(a.grad().data_ptr(), a_storage);
  // a second step reuses the fused buffer (W > 1: at W = 1 nothing is fused)
  const void* buf = gs.buffer().defined() ? gs.buffer().data_ptr() : nullptr;
  a.grad().fill_(static_cast<float>(R()));
  gs.sync({a, b, c});
  EXPECT_FLOAT_EQ(a.grad().data_ptr<float>()[11], static_cast<float>(mean_c));
  if (W() > 1) {
    EXPECT_EQ(gs.buffer().data_ptr(), buf);
  }
}

TEST(MpiGradSync, LayoutMismatchThrowsOnEveryRank) {
  // rank 0 has a (3) param where the others have a (4) one
  auto p = torch::zeros({R() == 0 ? 3 : 4}).set_requires_grad(true);
  bool threw = false;
  try {
    GradSync(*g_comm).sync({p});
  } catch (const CommError& e) {
    threw = true;
    EXPECT_NE(std::string(e.what()).find("differs between ranks"), std::string::npos) << e.what();
  }
  EXPECT_EQ(threw, W() > 1);  // one rank alone cannot disagree with itself
  g_comm->barrier();          // every rank is still in step
}

TEST(MpiWatchdog, ArmedCollectivesCompleteNormally) {
  g_comm->set_timeout(60.0);
  torch::Tensor t = torch::ones({100});
  {
    auto step = g_comm->watch("training step 1", 60.0);
    g_comm->allreduce_sum(t);
    g_comm->barrier();
  }
  EXPECT_EQ(t.data_ptr<float>()[99], static_cast<float>(W()));
}

// Non-zero ranks print only failed assertions, tagged with the rank.
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (r.failed()) {
      std::fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", rank_, r.file_name() ? r.file_name() : "?",
                   r.line_number(), r.summary());
    }
  }

 private:
  int rank_;
};

}  // namespace
}  // namespace dpo

int main(int argc, char** argv) {
  dpo::MpiSession mpi(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  int rc = 0;
  {
    dpo::MpiCommunicator comm;
    comm.set_timeout(120.0);  // a desynchronized test aborts instead of hanging until ctest's timeout
    dpo::g_comm = &comm;
    if (comm.rank() != 0) {
      auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
      delete listeners.Release(listeners.default_result_printer());
      listeners.Append(new dpo::RankFailurePrinter(comm.rank()));
    }
    rc = RUN_ALL_TESTS();
    rc = comm.any(rc != 0) ? 1 : 0;  // every rank reports the job's result
    dpo::g_comm = nullptr;
  }
  return rc;
}
