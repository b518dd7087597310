// dpo_preprocess as a user runs it (a child process, no mpirun): exit codes, one-line
// errors naming file:line or the option, no output file after a failure (and an older
// output left intact), nothing left behind, --skip_invalid, --inspect, --stats_json,
// a killed run.
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "data/preference_h5.h"
#include "tests/test_util.h"

namespace dpo {
namespace {

namespace fs = std::filesystem;
using testutil::run_command;
using testutil::TempDir;

const std::string kTool = testutil::tool_path("dpo_preprocess");

class ToolTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    model_dir_ = new TempDir("dpo_tool_model");
    train_test_tokenizer(model_dir_->path(), 300);
  }
  static void TearDownTestSuite() { delete model_dir_; }
  static std::string line(const std::string& p, const std::string& c, const std::string& r) {
    return nlohmann::json{{"prompt", p}, {"chosen", c}, {"rejected", r}}.dump() + "\n";
  }
  std::string write(const std::string& name, const std::string& content) {
    testutil::write_file(dir_.file(name), content);
    return dir_.file(name);
  }
  int tool(const std::string& args, std::string* out) {
    return run_command(kTool + " --model_name_or_path " + model_dir_->path() + " " + args, out);
  }
  // Files in the work dir other than the given ones (temp or part files left behind).
  std::vector<std::string> leftovers(const std::vector<std::string>& expected) {
    std::vector<std::string> extra;
    for (const auto& e : fs::directory_iterator(dir_.path())) {
      const std::string p = e.path().string();
      if (std::find(expected.begin(), expected.end(), p) == expected.end()) extra.push_back(p);
    }
    return extra;
  }
  TempDir dir_;
  static TempDir* model_dir_;
};
TempDir* ToolTest::model_dir_ = nullptr;

TEST_F(ToolTest, WritesAFileAndASummary) {
  const std::string a = write("a.jsonl", line("how do I use a list?", "use the list", "no.") + line("why?", "because", "maybe,"));
  const std::string b = write("b.jsonl", line("what is x?", "x = 1", "x = 2"));
  const std::string out = dir_.file("out.h5"), stats = dir_.file("stats.json");
  std::string o;
  ASSERT_EQ(tool("--input " + a + " --input " + b + " --output " + out + " --stats_json " + stats, &o), 0) << o;
  EXPECT_NE(o.find("wrote " + out + " (3 examples)"), std::string::npos) << o;
  EXPECT_NE(o.find("3 read, 3 written, 0 skipped"), std::string::npos) << o;
  EXPECT_NE(o.find("p50"), std::string::npos) << o;
  PreferenceReader r(out);
  EXPECT_EQ(r.size(), 3);
  EXPECT_EQ(r.attrs().source, (std::vector<std::string>{a, b}));
  auto j = nlohmann::json::parse(testutil::read_file(stats));
  EXPECT_EQ(j["written"], 3);
  EXPECT_EQ(j["lines"], 3);
  EXPECT_EQ(leftovers({a, b, out, stats}), std::vector<std::string>{});
  // Comma list and --tokenizer give the same content.
  const std::string out2 = dir_.file("out2.h5");
  ASSERT_EQ(run_command(kTool + " --tokenizer " + model_dir_->path() + "/tokenizer.model --input " + a + "," + b +
                            " --output " + out2 + " --progress off",
                        &o),
            0)
      << o;
  PreferenceReader r2(out2);
  ASSERT_EQ(r2.size(), 3);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(r2.get(i).chosen, r.get(i).chosen);
}

TEST_F(ToolTest, OptionErrorsExitTwoWithOneLine) {
  const std::string a = write("a.jsonl", line("p", "c", "r"));
  const std::string out = dir_.file("out.h5");
  struct Case {
    std::string args, needle;
  };
  const Case cases[] = {
      {"--output " + out, "--input is required"},
      {"--input " + a, "--output is required"},
      {"--input " + a + " --output " + out + " --max_length 512 --max_prompt_length 512", "--max_length (512)"},
      {"--input " + a + " --output " + out + " --max_prompt_length 0", "--max_prompt_length"},
      {"--input " + a + " --output " + out + " --format alpaca", "--format"},
      {"--input " + a + " --output " + out + " --progress maybe", "--progress"},
      {"--input " + a + " --output " + out + " --tokenizer x.model", "not both"},
      {"--input " + a + " --output " + dir_.file("no/such/dir/out.h5"), "does not exist"},
      {"--input " + a + " --output " + a, "is also an --input"},
      {"--input " + a + " --output " + out + " --no_such_option 1", "unknown option"},
  };
  for (const auto& c : cases) {
    std::string o;
    EXPECT_EQ(tool(c.args, &o), 2) << c.args << "\n" << o;
    EXPECT_NE(o.find(c.needle), std::string::npos) << c.args << "\n" << o;
    EXPECT_EQ(std::count(o.begin(), o.end(), '\n'), 1) << o;
    EXPECT_FALSE(testutil::file_exists(out));
  }
  std::string o;
  EXPECT_EQ(run_command(kTool + " --help", &o), 0);
  EXPECT_NE(o.find("--max_prompt_length"), std::string::npos);
  EXPECT_EQ(run_command(kTool + " --version", &o), 0);
  EXPECT_NE(o.find("dpo_preprocess"), std::string::npos);
}

TEST_F(ToolTest, BadLineStopsAndKeepsTheOlderOutput) {
  const std::string a = write("bad.jsonl", line("p", "c", "r") + line("q", "c", "r") + "{\"prompt\": oops}\n" + line("s", "c", "r"));
  const std::string out = write("out.h5", "an older output the failed run must not destroy");
  std::string o;
  EXPECT_EQ(tool("--input " + a + " --output " + out, &o), 1) << o;
  EXPECT_NE(o.find("dpo_preprocess: error: " + a + ":3: malformed JSON"), std::string::npos) << o;
  EXPECT_NE(o.find("--skip_invalid"), std::string::npos) << o;
  EXPECT_EQ(testutil::read_file(out), "an older output the failed run must not destroy");
  EXPECT_EQ(leftovers({a, out}), std::vector<std::string>{});
  // A missing input is named too.
  EXPECT_EQ(tool("--input " + a + "," + dir_.file("missing.jsonl") + " --output " + out, &o), 1) << o;
  EXPECT_NE(o.find("missing.jsonl"), std::string::npos) << o;
  // A missing tokenizer as well.
  EXPECT_EQ(run_command(kTool + " --model_name_or_path " + dir_.path() + " --input " + a + " --output " + out, &o), 1);
  EXPECT_NE(o.find(dir_.path() + "/tokenizer.model"), std::string::npos) << o;
}

TEST_F(ToolTest, SkipInvalidReportsCountsByReason) {
  const std::string a = write("mixed.jsonl", line("p", "c", "r") + "[1]\n" + line("p", "same", "same") +
                                                 line("", "c", "r") + line("q", "c", "r") + "{bad\n");
  const std::string out = dir_.file("out.h5");
  std::string o;
  ASSERT_EQ(tool("--input " + a + " --output " + out + " --skip_invalid", &o), 0) << o;
  EXPECT_NE(o.find("6 read, 2 written, 4 skipped (malformed JSON 1, not a JSON object 1, empty prompt 1, "
                   "chosen identical to rejected 1)"),
            std::string::npos)
      << o;
  EXPECT_NE(o.find("warning: " + a + ":2: skipped: not a JSON object"), std::string::npos) << o;
  EXPECT_EQ(PreferenceReader(out).size(), 2);
}

TEST_F(ToolTest, InspectPrintsAndValidates) {
  const std::string a = write("a.jsonl", line("how do I use a list?", "use the list", "no.") + line("why?", "because", "maybe,"));
  const std::string out = dir_.file("out.h5");
  std::string o;
  ASSERT_EQ(tool("--input " + a + " --output " + out + " --max_length 64 --max_prompt_length 16", &o), 0) << o;
  ASSERT_EQ(run_command(kTool + " --inspect " + out, &o), 0) << o;
  for (const char* needle : {"num_examples: 2", "vocab_size: 300", "bos_id: 1", "eos_id: 2", "pad_id: 2",
                             "max_length: 64", "max_prompt_length: 16", "ref_logps: absent", "valid: yes", "prompt"})
    EXPECT_NE(o.find(needle), std::string::npos) << needle << "\n" << o;
  // Damaged copies: truncated, and not HDF5 at all.
  const std::string bytes = testutil::read_file(out);
  const std::string cut = write("cut.h5", bytes.substr(0, bytes.size() / 2));
  EXPECT_NE(run_command(kTool + " --inspect " + cut, &o), 0);
  EXPECT_NE(o.find("cut.h5"), std::string::npos) << o;
  EXPECT_EQ(o.find("valid: yes"), std::string::npos) << o;
  EXPECT_NE(run_command(kTool + " --inspect " + a, &o), 0);
  EXPECT_NE(o.find("a.jsonl"), std::string::npos) << o;
}

TEST_F(ToolTest, KilledRunLeavesNoCompleteLookingFile) {
  // Big enough to take a few seconds; killed after a moment. On a machine fast enough to
  // finish first, the input doubles (up to 8x) until the kill lands mid-run.
  const std::string words = "how do I use the list function in python because the value is a string ";
  const std::string out = dir_.file("out.h5");
  std::string a;
  for (int attempt = 0; attempt < 4; ++attempt) {
    std::string content;
    for (int i = 0; i < (20000 << attempt); ++i) content += line(words + std::to_string(i), words + words, words + "no");
    a = write("big.jsonl", content);
    std::string o;
    run_command("timeout -s KILL 0.7 " + kTool + " --model_name_or_path " + model_dir_->path() + " --input " + a +
                    " --output " + out,
                &o);
    if (!testutil::file_exists(out)) break;
    fs::remove(out);
  }
  ASSERT_FALSE(testutil::file_exists(out)) << "the tool finished 160000 lines within 0.7 s: the kill never landed";
  for (const auto& e : fs::directory_iterator(dir_.path())) {
    const std::string p = e.path().string();
    if (p == a) continue;
    EXPECT_NE(p.find(".tmp-"), std::string::npos) << p;
    EXPECT_THROW(PreferenceReader r(p), PreferenceFileError) << p;
  }
}

}  // namespace
}  // namespace dpo
