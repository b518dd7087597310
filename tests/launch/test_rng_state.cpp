// Checkpointed RNG state (launch/rng_state.h) on a machine without a GPU: the CUDA slot of
// RankGenerators is filled with a stand-in CPU generator, so the code that saves, reloads
// and restores a CUDA run's states runs here; test_cuda repeats the round trip with the
// real CUDA generator where a device exists.
#include <gtest/gtest.h>
#include <unistd.h>

#include <ATen/CPUGeneratorImpl.h>

#include <filesystem>
#include <string>

#include <torch/cuda.h>
#include <torch/torch.h>

#include "runtime/torch_cuda.h"
#include "core/safetensors.h"
#include "launch/rng_state.h"

namespace fs = std::filesystem;

namespace {

struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() / ("dpo_test_rng_state." + std::to_string(::getpid()) + "." +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  std::string file(const std::string& n) const { return (path / n).string(); }
};

// A "cuda" run's generators with a CPU generator standing in for the GPU's.
dpo::RankGenerators stand_in(uint64_t cpu_seed, uint64_t dev_seed) {
  dpo::RankGenerators g;
  g.device_type = "cuda";
  g.cpu = at::make_generator<at::CPUGeneratorImpl>(cpu_seed);
  g.device = at::make_generator<at::CPUGeneratorImpl>(dev_seed);
  return g;
}

torch::Tensor draw(const at::Generator& g) {
  at::Generator gen = g;
  return torch::empty({8}).uniform_(0.0, 1.0, gen);
}

TEST(RngState, CudaSlotSavedAndRestoredPerRank) {
  TempDir d;
  // Two ranks, each with its own CPU and "device" streams, part-way through.
  dpo::RankGenerators r0 = stand_in(1, 2), r1 = stand_in(3, 4);
  for (auto* g : {&r0, &r1}) {
    draw(g->cpu);
    draw(g->device);
    draw(g->device);
  }
  const dpo::RankRngState s0 = dpo::rng_capture(r0), s1 = dpo::rng_capture(r1);
  ASSERT_TRUE(s0.device.defined());
  // What each stream draws next, had the run not stopped.
  const auto c0 = draw(r0.cpu), g0 = draw(r0.device), c1 = draw(r1.cpu), g1 = draw(r1.device);
  ASSERT_FALSE(torch::equal(c1, g1));  // distinct streams: a swap would show

  // Through bytes (the allgather) and the file (rank 0 writes), as the trainer does.
  std::vector<dpo::RankRngState> all(2);
  for (int i = 0; i < 2; ++i) {
    const auto& s = i == 0 ? s0 : s1;
    all[i].cpu = dpo::rng_state_from_bytes(dpo::rng_state_bytes(s.cpu));
    all[i].device = dpo::rng_state_from_bytes(dpo::rng_state_bytes(s.device));
  }
  const std::string path = d.file("rng_state.safetensors");
  dpo::rng_save(path, "cuda", all);
  EXPECT_EQ(dpo::rng_file_device_type(path), "cuda");
  dpo::SafetensorsFile f(path);
  EXPECT_TRUE(f.has("rank_0") && f.has("rank_0.cuda") && f.has("rank_1") && f.has("rank_1.cuda"));

  // A resumed process: fresh generators with other seeds, restored from the file.
  dpo::RankGenerators n0 = stand_in(100, 200), n1 = stand_in(300, 400);
  dpo::rng_restore(n1, dpo::rng_load_rank(path, 1, "cuda"));
  dpo::rng_restore(n0, dpo::rng_load_rank(path, 0, "cuda"));
  EXPECT_TRUE(torch::equal(draw(n0.cpu), c0));
  EXPECT_TRUE(torch::equal(draw(n0.device), g0));
  EXPECT_TRUE(torch::equal(draw(n1.cpu), c1));
  EXPECT_TRUE(torch::equal(draw(n1.device), g1));
}

TEST(RngState, OtherDeviceTypeRefusedWithOneLine) {
  TempDir d;
  const dpo::RankGenerators g = stand_in(1, 2);
  const std::string cuda_file = d.file("cuda.safetensors"), cpu_file = d.file("cpu.safetensors");
  dpo::rng_save(cuda_file, "cuda", {dpo::rng_capture(g)});
  dpo::RankRngState cpu_only;
  cpu_only.cpu = dpo::rng_capture(g).cpu;
  dpo::rng_save(cpu_file, "cpu", {cpu_only});
  try {
    dpo::rng_load_rank(cuda_file, 0, "cpu");
    FAIL() << "a CUDA run's RNG state was accepted by a CPU run";
  } catch (const std::runtime_error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find(cuda_file), std::string::npos) << m;
    EXPECT_NE(m.find("--device cuda"), std::string::npos) << m;
    EXPECT_NE(m.find("delete this file"), std::string::npos) << m;
    EXPECT_EQ(m.find('\n'), std::string::npos) << m;
  }
  EXPECT_THROW(dpo::rng_load_rank(cpu_file, 0, "cuda"), std::runtime_error);
  EXPECT_THROW(dpo::rng_load_rank(cpu_file, 1, "cpu"), std::runtime_error);  // no rank 1
  // A device state in a CPU run (or none in a CUDA run) is a programming error, caught.
  EXPECT_THROW(dpo::rng_save(d.file("bad.safetensors"), "cpu", {dpo::rng_capture(g)}), std::runtime_error);
  EXPECT_THROW(dpo::rng_restore(g, cpu_only), std::runtime_error);
}

TEST(RngState, CheckpointsWithoutMetadataAreCpu) {
  // The layout before CUDA states: rank_<i> only, no __metadata__.
  TempDir d;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(9);
  draw(gen);
  torch::Tensor st = gen.get_state();
  const std::string path = d.file("rng_state.safetensors");
  dpo::safetensors_save(path, {{"rank_0", st}});
  EXPECT_EQ(dpo::rng_file_device_type(path), "cpu");
  const auto next = draw(gen);
  dpo::RankGenerators g;
  g.cpu = at::make_generator<at::CPUGeneratorImpl>(1);
  dpo::rng_restore(g, dpo::rng_load_rank(path, 0, "cpu"));
  EXPECT_TRUE(torch::equal(draw(g.cpu), next));
}

TEST(RngState, DefaultGenerators) {
  const dpo::RankGenerators c = dpo::default_rank_generators(torch::kCPU);
  EXPECT_EQ(c.device_type, "cpu");
  EXPECT_FALSE(c.device.defined());
  // The process's default CPU generator: manual_seed reaches it.
  torch::manual_seed(4);
  const auto a = draw(c.cpu);
  torch::manual_seed(4);
  EXPECT_TRUE(torch::equal(torch::rand({8}), a));
  if (!dpo::torch_cuda_available()) {
    try {
      dpo::default_rank_generators(torch::Device(torch::kCUDA, 0));
      FAIL() << "CUDA generators handed out without CUDA";
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find("no CUDA device"), std::string::npos) << e.what();
    }
  }
}

}  // namespace
