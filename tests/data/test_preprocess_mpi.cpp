// dpo_preprocess under mpirun: the output of np = 2 and np = 3 holds exactly the
// datasets and values of np = 1 (checked by h5diff and by reading every token), the
// summary counts agree, and a bad line in rank 1's share fails every rank cleanly.
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/preference_h5.h"
#include "tests/test_util.h"

namespace dpo {
namespace {

namespace fs = std::filesystem;
using testutil::run_command;
using testutil::TempDir;

const std::string kTool = testutil::tool_path("dpo_preprocess");

std::string mpirun(int np) {
  return std::string(DPO_MPIEXEC) + " --allow-run-as-root --oversubscribe --bind-to none -np " + std::to_string(np) + " ";
}

std::string line(const std::string& p, const std::string& c, const std::string& r) {
  return nlohmann::json{{"prompt", p}, {"chosen", c}, {"rejected", r}}.dump() + "\n";
}

void expect_same_content(const std::string& a, const std::string& b) {
  std::string o;
  EXPECT_EQ(run_command("h5diff " + a + " " + b, &o), 0) << o;  // datasets, values and attributes
  PreferenceReader ra(a), rb(b);
  ASSERT_EQ(ra.size(), rb.size());
  EXPECT_EQ(ra.attrs().source, rb.attrs().source);
  EXPECT_EQ(ra.attrs().tokenizer_sha256, rb.attrs().tokenizer_sha256);
  for (Field f : {Field::kPrompt, Field::kChosen, Field::kRejected}) {
    ASSERT_EQ(ra.offsets(f), rb.offsets(f)) << field_name(f);
    const int64_t n = ra.offsets(f).back();
    std::vector<int32_t> ta(n), tb(n);
    ra.read_tokens(f, 0, n, ta.data());
    rb.read_tokens(f, 0, n, tb.data());
    EXPECT_EQ(ta, tb) << field_name(f);
  }
}

TEST(PreprocessMpi, OutputIndependentOfRankCount) {
  TempDir dir("dpo_mpi");
  train_test_tokenizer(dir.path(), 300);
  std::vector<std::string> inputs;
  for (int f = 0; f < 3; ++f) {
    std::string content;
    for (int i = 0; i < 60 + 40 * f; ++i) {
      const std::string n = std::to_string(f * 1000 + i);
      if (i % 17 == 5) content += "{\"prompt\": broken " + n + "\n";  // invalid, skipped
      else if (i % 23 == 7) content += line("p" + n, "same", "same");
      else content += line("question " + n + std::string(size_t(i % 13) * 5, 'y'), "answer " + n, "other " + n);
    }
    inputs.push_back(dir.file("in" + std::to_string(f) + ".jsonl"));
    testutil::write_file(inputs.back(), content);
  }
  const std::string in_list = inputs[0] + "," + inputs[1] + "," + inputs[2];
  nlohmann::json stats[4];
  for (int np : {1, 2, 3}) {
    const std::string out = dir.file("np" + std::to_string(np) + ".h5");
    const std::string js = dir.file("np" + std::to_string(np) + ".json");
    std::string o;
    ASSERT_EQ(run_command(mpirun(np) + kTool + " --tokenizer " + dir.file("tokenizer.model") + " --input " + in_list +
                              " --output " + out + " --skip_invalid --max_length 40 --max_prompt_length 12" +
                              " --stats_json " + js,
                          &o),
              0)
        << o;
    stats[np] = nlohmann::json::parse(testutil::read_file(js));
  }
  expect_same_content(dir.file("np1.h5"), dir.file("np2.h5"));
  expect_same_content(dir.file("np1.h5"), dir.file("np3.h5"));
  for (int np : {2, 3}) {
    for (const char* k : {"lines", "written", "skipped", "encoded_tokens", "bytes", "prompt", "chosen", "rejected"})
      EXPECT_EQ(stats[np][k], stats[1][k]) << k << " np " << np;
  }
  EXPECT_GT(stats[1]["skipped"]["malformed_json"].get<int>(), 0);
  EXPECT_GT(stats[1]["prompt"]["truncated"].get<int>(), 0);
  // Only the outputs remain: parts and temp files are gone.
  for (const auto& e : fs::directory_iterator(dir.path()))
    EXPECT_EQ(e.path().string().find(".tmp-"), std::string::npos) << e.path();
}

TEST(PreprocessMpi, BadLineInRankOnesShareFailsAllRanksCleanly) {
  TempDir dir("dpo_mpi_bad");
  train_test_tokenizer(dir.path(), 300);
  std::string content;
  for (int i = 0; i < 100; ++i) content += i == 80 ? "{\"prompt\": 1, \"chosen\": \"a\", \"rejected\": \"b\"}\n"
                                                   : line("p" + std::to_string(i), "c", "r");
  const std::string in = dir.file("in.jsonl");
  testutil::write_file(in, content);
  const std::string out = dir.file("out.h5");
  std::string o;
  const int rc = run_command("timeout 60 " + mpirun(2) + kTool + " --tokenizer " + dir.file("tokenizer.model") +
                                 " --input " + in + " --output " + out,
                             &o);
  EXPECT_NE(rc, 0) << o;
  EXPECT_NE(rc, 124) << "timed out: a rank hung\n" << o;
  EXPECT_NE(o.find(in + ":81: non-string field"), std::string::npos) << o;
  EXPECT_FALSE(testutil::file_exists(out));
  for (const auto& e : fs::directory_iterator(dir.path()))
    EXPECT_EQ(e.path().string().find(".tmp-"), std::string::npos) << e.path();
}

}  // namespace
}  // namespace dpo
