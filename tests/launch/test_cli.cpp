// The argument parser fed with fake argv and INI files (llama.cpp habit).
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "launch/cli.h"
#include "launch/train_options.h"

using namespace dpo;

namespace {
struct Argv {
  std::vector<std::string> s;
  std::vector<const char*> p;
  Argv(std::initializer_list<std::string> a) : s(a) {
    for (auto& x : s) p.push_back(x.c_str());
  }
  int argc() const { return static_cast<int>(p.size()); }
  const char* const* argv() const { return p.data(); }
};
Cli make_cli() {
  Cli c("tool", "test tool");
  c.add_string("name", "dflt", "a string");
  c.add_int("count", 3, "an int");
  c.add_double("rate", 0.5, "a double");
  c.add_bool("flag", false, "a bool");
  c.add_bool("on", true, "a bool that defaults to true");
  c.add_list("items", "a,b", "a list");
  return c;
}
std::string write_tmp(const std::string& name, const std::string& text) {
  std::string path = testing::TempDir() + name;
  std::ofstream(path) << text;
  return path;
}
}  // namespace

TEST(Cli, DefaultsWhenNothingGiven) {
  Cli c = make_cli();
  Argv a{"tool"};
  ASSERT_TRUE(c.parse(a.argc(), a.argv()));
  EXPECT_EQ(c.get_string("name"), "dflt");
  EXPECT_EQ(c.get_int("count"), 3);
  EXPECT_DOUBLE_EQ(c.get_double("rate"), 0.5);
  EXPECT_FALSE(c.get_bool("flag"));
  EXPECT_TRUE(c.get_bool("on"));
  EXPECT_EQ(c.get_list("items"), (std::vector<std::string>{"a", "b"}));
  EXPECT_FALSE(c.given("count"));
}

TEST(Cli, SpaceAndEqualsForms) {
  Cli c = make_cli();
  Argv a{"tool", "--name", "x y", "--count=7", "--rate", "5e-4"};
  ASSERT_TRUE(c.parse(a.argc(), a.argv()));
  EXPECT_EQ(c.get_string("name"), "x y");
  EXPECT_EQ(c.get_int("count"), 7);
  EXPECT_DOUBLE_EQ(c.get_double("rate"), 5e-4);
  EXPECT_TRUE(c.given("count"));
}

TEST(Cli, BooleansAsHuggingFaceParses) {
  {
    Cli c = make_cli();
    Argv a{"tool", "--flag"};
    ASSERT_TRUE(c.parse(a.argc(), a.argv()));
    EXPECT_TRUE(c.get_bool("flag"));
  }
  {
    Cli c = make_cli();
    Argv a{"tool", "--on", "false", "--flag", "true"};
    ASSERT_TRUE(c.parse(a.argc(), a.argv()));
    EXPECT_FALSE(c.get_bool("on"));
    EXPECT_TRUE(c.get_bool("flag"));
  }
  {
    Cli c = make_cli();
    Argv a{"tool", "--on=0"};
    ASSERT_TRUE(c.parse(a.argc(), a.argv()));
    EXPECT_FALSE(c.get_bool("on"));
  }
}

TEST(Cli, ListsCommaSeparatedAndRepeated) {
  Cli c = make_cli();
  Argv a{"tool", "--items", "q_proj, v_proj", "--items", "k_proj"};
  ASSERT_TRUE(c.parse(a.argc(), a.argv()));
  EXPECT_EQ(c.get_list("items"), (std::vector<std::string>{"q_proj", "v_proj", "k_proj"}));
}

TEST(Cli, UnknownOptionAndBadValuesAreErrorsNamingTheOption) {
  auto expect_error = [](Argv a, const std::string& needle) {
    Cli c = make_cli();
    try {
      c.parse(a.argc(), a.argv());
      FAIL() << "no error for " << needle;
    } catch (const CliError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error(Argv{"tool", "--nope", "1"}, "nope");
  expect_error(Argv{"tool", "--count", "3.5"}, "--count");
  expect_error(Argv{"tool", "--count", "abc"}, "--count");
  expect_error(Argv{"tool", "--rate", "fast"}, "--rate");
  expect_error(Argv{"tool", "--rate", "nan"}, "--rate");
  expect_error(Argv{"tool", "--flag=maybe"}, "--flag");
  // No prefix guessing: --coun is not --count.
  expect_error(Argv{"tool", "--coun", "3"}, "coun");
}

TEST(Cli, ConfigFileAndCommandLineWins) {
  std::string ini = write_tmp("cli_cfg.ini",
                              "# comment\nname = from_file\ncount = 9\n[section]\nrate = 0.25\nflag = true\nitems = x,y\n");
  Cli c = make_cli();
  Argv a{"tool", "--config", ini, "--count", "11"};
  ASSERT_TRUE(c.parse(a.argc(), a.argv()));
  EXPECT_EQ(c.get_string("name"), "from_file");
  EXPECT_EQ(c.get_int("count"), 11);
  EXPECT_DOUBLE_EQ(c.get_double("rate"), 0.25);
  EXPECT_TRUE(c.get_bool("flag"));
  EXPECT_EQ(c.get_list("items"), (std::vector<std::string>{"x", "y"}));
}

TEST(Cli, ConfigFileErrorsNameTheFile) {
  std::string ini = write_tmp("cli_bad.ini", "count = lots\n");
  Cli c = make_cli();
  Argv a{"tool", "--config", ini};
  try {
    c.parse(a.argc(), a.argv());
    FAIL();
  } catch (const CliError& e) {
    EXPECT_NE(std::string(e.what()).find("cli_bad.ini"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("--count"), std::string::npos) << e.what();
  }
  std::string ini2 = write_tmp("cli_unknown.ini", "colour = red\n");
  Cli c2 = make_cli();
  Argv a2{"tool", "--config", ini2};
  EXPECT_THROW(c2.parse(a2.argc(), a2.argv()), CliError);
  Cli c3 = make_cli();
  Argv a3{"tool", "--config", "/nonexistent/x.ini"};
  EXPECT_THROW(c3.parse(a3.argc(), a3.argv()), CliError);
}

TEST(Cli, HelpAndVersionReturnFalse) {
  Cli c = make_cli();
  Argv a{"tool", "--help"};
  testing::internal::CaptureStdout();
  EXPECT_FALSE(c.parse(a.argc(), a.argv()));
  std::string out = testing::internal::GetCapturedStdout();
  EXPECT_NE(out.find("--count"), std::string::npos);
  Cli c2 = make_cli();
  Argv a2{"tool", "--version"};
  testing::internal::CaptureStdout();
  EXPECT_FALSE(c2.parse(a2.argc(), a2.argv()));
  EXPECT_NE(testing::internal::GetCapturedStdout().find(dpo_version()), std::string::npos);
}

TEST(Cli, RunMainMapsExceptionsToExitCodes) {
  testing::internal::CaptureStderr();
  EXPECT_EQ(run_main("t", [] { return 0; }), 0);
  EXPECT_EQ(run_main("t", []() -> int { throw CliError("bad option"); }), 2);
  EXPECT_EQ(run_main("t", []() -> int { throw std::runtime_error("io failed"); }), 1);
  std::string err = testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("t: error: bad option"), std::string::npos);
  EXPECT_NE(err.find("t: error: io failed"), std::string::npos);
}

TEST(TrainOptions, ValidatesAcrossFields) {
  auto parse = [](std::vector<std::string> extra) {
    Cli c("dpo_dist", "");
    add_train_options(c);
    std::vector<std::string> s{"dpo_dist", "--model_name_or_path", "m", "--train_file", "t.h5", "--output_dir", "o"};
    s.insert(s.end(), extra.begin(), extra.end());
    std::vector<const char*> p;
    for (auto& x : s) p.push_back(x.c_str());
    c.parse(static_cast<int>(p.size()), p.data());
    return train_options_from(c);
  };
  TrainOptions o = parse({"--learning_rate", "1e-4", "--lora_target_modules", "all-linear", "--gradient_checkpointing"});
  EXPECT_DOUBLE_EQ(o.learning_rate, 1e-4);
  EXPECT_EQ(o.lora_target_modules, std::vector<std::string>{"all-linear"});
  EXPECT_TRUE(o.gradient_checkpointing);
  EXPECT_TRUE(o.load_in_4bit);
  EXPECT_EQ(o.tiled_mlp_tokens, 0);
  EXPECT_EQ(parse({"--tiled_mlp_tokens", "256"}).tiled_mlp_tokens, 256);
  EXPECT_THROW(parse({"--tiled_mlp_tokens", "-1"}), CliError);
  EXPECT_THROW(parse({"--loss_type", "kto"}), CliError);
  EXPECT_THROW(parse({"--label_smoothing", "0.5"}), CliError);
  EXPECT_THROW(parse({"--per_device_train_batch_size", "0"}), CliError);
  EXPECT_THROW(parse({"--stage", "rlhf"}), CliError);
  EXPECT_THROW(parse({"--max_steps", "-1", "--num_train_epochs", "0"}), CliError);
  EXPECT_THROW(parse({"--bnb_4bit_quant_type", "fp4"}), CliError);
  // The loss-family options reach core's DpoOptions, and core's ranges are the CLI's.
  TrainOptions lf = parse({"--loss_type", "sigmoid,bco_pair,sft", "--loss_weights", "0.8,0.2,1", "--use_weighting",
                           "--ld_alpha", "0.4", "--discopop_tau", "0.1"});
  const DpoOptions d = lf.dpo_options();
  EXPECT_TRUE(d.use_weighting);
  EXPECT_DOUBLE_EQ(d.ld_alpha, 0.4);
  EXPECT_DOUBLE_EQ(d.discopop_tau, 0.1);
  EXPECT_EQ(d.loss_weights, (std::vector<double>{0.8, 0.2, 1.0}));
  EXPECT_FALSE(parse({}).dpo_options().use_weighting);
  EXPECT_DOUBLE_EQ(parse({}).dpo_options().ld_alpha, 1.0);  // off
  try {
    parse({"--ld_alpha", "1.5"});
    ADD_FAILURE() << "--ld_alpha 1.5 accepted";
  } catch (const CliError& e) {
    EXPECT_NE(std::string(e.what()).find("--ld_alpha must be in [0, 1]"), std::string::npos) << e.what();
  }
  EXPECT_THROW(parse({"--loss_type", "aot", "--use_weighting"}), CliError);
  Cli c("dpo_dist", "");
  add_train_options(c);
  const char* argv[] = {"dpo_dist", "--train_file", "t.h5"};
  c.parse(3, argv);
  EXPECT_THROW(train_options_from(c), CliError);  // --model_name_or_path missing
}

TEST(Cli, ParseSize) {
  EXPECT_EQ(parse_size("0", "--s"), 0);
  EXPECT_EQ(parse_size("123", "--s"), 123);
  EXPECT_EQ(parse_size("5GB", "--s"), 5000000000LL);
  EXPECT_EQ(parse_size("200kb", "--s"), 200000);
  EXPECT_EQ(parse_size("1.5MB", "--s"), 1500000);
  EXPECT_EQ(parse_size("2KiB", "--s"), 2048);
  EXPECT_THROW(parse_size("lots", "--s"), CliError);
  EXPECT_THROW(parse_size("-1MB", "--s"), CliError);
  EXPECT_THROW(parse_size("", "--s"), CliError);
}
