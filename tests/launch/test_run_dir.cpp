// Checkpoint directory mechanics and the metrics sinks.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "launch/metrics_log.h"
#include "launch/run_dir.h"
#include "util/fs.h"

namespace fs = std::filesystem;
using namespace dpo;

namespace {
std::string fresh_dir(const std::string& name) {
  fs::path p = fs::path(testing::TempDir()) / name;
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}
void write_state(const std::string& dir, int64_t step) {
  std::ofstream(dir + "/trainer_state.json") << "{\"global_step\": " << step << "}";
}
}  // namespace

TEST(RunDir, CommitIsAtomicAndListed) {
  std::string out = fresh_dir("rd_commit");
  auto path = checkpoint_commit(out, 10, [](const std::string& tmp) { write_state(tmp, 10); });
  EXPECT_EQ(path, out + "/checkpoint-10");
  EXPECT_TRUE(fs::exists(path + "/trainer_state.json"));
  // A failing writer leaves nothing behind and earlier checkpoints intact.
  EXPECT_THROW(checkpoint_commit(out, 20, [](const std::string& tmp) {
                 write_state(tmp, 20);
                 throw std::runtime_error("disk full");
               }),
               std::runtime_error);
  auto all = list_checkpoints(out);
  ASSERT_EQ(all.size(), 1u);
  EXPECT_EQ(all[0].first, 10);
  for (const auto& e : fs::directory_iterator(out)) EXPECT_EQ(e.path().filename(), "checkpoint-10");
}

TEST(RunDir, IncompleteDirsIgnoredAndRemoved) {
  std::string out = fresh_dir("rd_incomplete");
  checkpoint_commit(out, 5, [](const std::string& tmp) { write_state(tmp, 5); });
  fs::create_directories(out + "/.checkpoint-9.tmp-123");
  fs::create_directories(out + "/checkpoint-7");  // no trainer_state.json: damaged
  std::ofstream(out + "/checkpoint-8/trainer_state.json");  // fails: dir missing, file not created
  fs::create_directories(out + "/checkpoint-8");
  std::ofstream(out + "/checkpoint-8/trainer_state.json") << "{not json";
  EXPECT_EQ(resolve_resume("auto", out), out + "/checkpoint-5");
  EXPECT_EQ(remove_incomplete_checkpoints(out), 1);
  EXPECT_FALSE(fs::exists(out + "/.checkpoint-9.tmp-123"));
  EXPECT_THROW(resolve_resume(out + "/checkpoint-7", out), std::runtime_error);
  EXPECT_THROW(resolve_resume(out + "/checkpoint-8", out), std::runtime_error);
  EXPECT_THROW(resolve_resume(out + "/checkpoint-99", out), std::runtime_error);
  EXPECT_EQ(resolve_resume("", out), "");
  EXPECT_EQ(resolve_resume("auto", fresh_dir("rd_empty")), "");
}

TEST(RunDir, RotationKeepsNewest) {
  std::string out = fresh_dir("rd_rotate");
  std::string last;
  for (int s : {1, 2, 3, 4}) last = checkpoint_commit(out, s, [s](const std::string& tmp) { write_state(tmp, s); });
  rotate_checkpoints(out, 2, last);
  auto all = list_checkpoints(out);
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0].first, 3);
  EXPECT_EQ(all[1].first, 4);
  // limit 1 with the newest named as keep: only it stays.
  rotate_checkpoints(out, 1, last);
  all = list_checkpoints(out);
  ASSERT_EQ(all.size(), 1u);
  EXPECT_EQ(all[0].first, 4);
}

TEST(RunDir, ResavingSameStepReplaces) {
  std::string out = fresh_dir("rd_resave");
  checkpoint_commit(out, 3, [](const std::string& tmp) { std::ofstream(tmp + "/a") << "old"; write_state(tmp, 3); });
  checkpoint_commit(out, 3, [](const std::string& tmp) { std::ofstream(tmp + "/a") << "new"; write_state(tmp, 3); });
  EXPECT_EQ(read_file(out + "/checkpoint-3/a"), "new");
}

TEST(Metrics, Crc32cKnownVector) {
  // RFC 3720 test vector: 32 bytes of zeros -> 0x8a9136aa; "123456789" -> 0xe3069283.
  std::string zeros(32, '\0');
  EXPECT_EQ(crc32c(zeros.data(), zeros.size()), 0x8a9136aau);
  EXPECT_EQ(crc32c("123456789", 9), 0xe3069283u);
}

TEST(Metrics, JsonlAndTensorBoardRecords) {
  std::string out = fresh_dir("rd_metrics");
  MetricsLog log(out, "tensorboard");
  log.log({{"step", 1}, {"loss", 0.69}, {"rewards/accuracies", 0.5}});
  log.log({{"step", 2}, {"eval_loss", 0.5}});
  std::ifstream in(out + "/metrics.jsonl");
  std::string l1, l2;
  std::getline(in, l1);
  std::getline(in, l2);
  EXPECT_EQ(nlohmann::json::parse(l1)["loss"].get<double>(), 0.69);
  EXPECT_EQ(nlohmann::json::parse(l2)["eval_loss"].get<double>(), 0.5);
  // Walk the tfevents records: each header's and payload's masked CRC must verify.
  fs::path runs(out + "/runs");
  ASSERT_TRUE(fs::exists(runs));
  std::string bytes = read_file(fs::directory_iterator(runs)->path().string());
  auto unmask = [](uint32_t m) { uint32_t r = m - 0xa282ead8u; return (r << 15) | (r >> 17); };
  size_t pos = 0;
  int records = 0;
  while (pos < bytes.size()) {
    ASSERT_LE(pos + 12, bytes.size());
    uint64_t len;
    uint32_t hcrc, dcrc;
    std::memcpy(&len, bytes.data() + pos, 8);
    std::memcpy(&hcrc, bytes.data() + pos + 8, 4);
    EXPECT_EQ(unmask(hcrc), crc32c(bytes.data() + pos, 8));
    ASSERT_LE(pos + 12 + len + 4, bytes.size());
    std::memcpy(&dcrc, bytes.data() + pos + 12 + len, 4);
    EXPECT_EQ(unmask(dcrc), crc32c(bytes.data() + pos + 12, len));
    pos += 12 + len + 4;
    ++records;
  }
  EXPECT_EQ(records, 1 + 2 + 1);  // file_version + 2 train scalars + 1 eval scalar
  EXPECT_NE(bytes.find("train/rewards/accuracies"), std::string::npos);
  EXPECT_NE(bytes.find("eval/loss"), std::string::npos);
}

TEST(Metrics, DurationFormat) {
  EXPECT_EQ(format_duration(0), "00:00");
  EXPECT_EQ(format_duration(75), "01:15");
  EXPECT_EQ(format_duration(3723), "1:02:03");
}
