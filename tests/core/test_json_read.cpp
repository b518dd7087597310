// util/json_read.h: the one checked JSON reader. Valid-but-hostile texts (nesting
// 100,000 deep, more bytes than a reader allows) fail with one line naming the text and
// the limit, before any tree is built (issue 28); everything else parses as nlohmann's
// parse would. Also compiled into test_safetensors_asan (AddressSanitizer).
#include "util/json_read.h"

#include <string>

#include <gtest/gtest.h>

#include "tests/test_util.h"

namespace {

using dpo::JsonLimitError;
using dpo::kJsonMaxDepth;
using dpo::testutil::TempDir;
using dpo::testutil::throw_message;

std::string nested_arrays(int depth) { return std::string(depth, '[') + std::string(depth, ']'); }

// {"a":{"a":...{"a":1}...}}: depth levels of objects.
std::string nested_objects(int depth) {
  std::string s;
  for (int i = 0; i < depth; ++i) s += "{\"a\":";
  s += "1";
  s += std::string(depth, '}');
  return s;
}

const std::string kDeepMessage =
    "JSON nested deeper than 512 levels (the limit of every JSON reader here)";

TEST(JsonRead, DepthScanCountsBracketsOutsideStrings) {
  EXPECT_EQ(dpo::json_too_deep_at("[[[]]]", 3), -1);
  EXPECT_EQ(dpo::json_too_deep_at("[[[]]]", 2), 2);
  EXPECT_EQ(dpo::json_too_deep_at(R"({"a":[{"b":[]}]})", 4), -1);
  EXPECT_EQ(dpo::json_too_deep_at(R"({"a":[{"b":[]}]})", 3), 11);
  // Brackets inside strings are text, escaped quotes do not end a string, an even run
  // of backslashes before a quote does.
  EXPECT_EQ(dpo::json_too_deep_at(R"(["[[[[{{{{"])", 1), -1);
  EXPECT_EQ(dpo::json_too_deep_at(R"(["\"[[[[", "\\\\"])", 1), -1);
  EXPECT_EQ(dpo::json_too_deep_at(R"(["\\"[[)", 1), 5);
  EXPECT_EQ(dpo::json_too_deep_at(R"(["\\\"[[)", 1), -1);  // \\ then \" : still in the string
  // Siblings do not add up; an unterminated string ends the scan (the parser reports it).
  EXPECT_EQ(dpo::json_too_deep_at("[[],[],[],[]]", 2), -1);
  EXPECT_EQ(dpo::json_too_deep_at("[\"[[[[", 1), -1);
  EXPECT_EQ(dpo::json_too_deep_at("", 1), -1);
}

TEST(JsonRead, RefusesTextsNestedDeeperThanTheLimit) {
  // 10^5 levels (what crashed the tools, issue 28), arrays and objects, json and
  // ordered_json: one line naming the text and the limit; nothing built.
  for (const std::string& text : {nested_arrays(100000), nested_objects(100000)}) {
    std::string msg = throw_message([&] { dpo::json_parse(text, "m/config.json"); });
    EXPECT_EQ(msg, "m/config.json: " + kDeepMessage);
    msg = throw_message([&] { dpo::json_parse<nlohmann::ordered_json>(text, "train.jsonl:3", {0, "is it data?"}); });
    EXPECT_EQ(msg, "train.jsonl:3: " + kDeepMessage + "; is it data?");
    EXPECT_THROW(dpo::json_parse(text, "x"), JsonLimitError);
    EXPECT_TRUE(dpo::json_parse_or_discarded(text).is_discarded());
    EXPECT_TRUE(dpo::json_parse_or_discarded<nlohmann::ordered_json>(text).is_discarded());
  }
  // Without a name the message starts with the problem.
  EXPECT_EQ(throw_message([&] { dpo::json_parse(nested_arrays(600), ""); }), kDeepMessage);
  // 10^5 levels that are truncated, or followed by garbage: still the limit (it is
  // checked before the syntax).
  EXPECT_THROW(dpo::json_parse(std::string(100000, '['), "x"), JsonLimitError);
  EXPECT_THROW(dpo::json_parse(std::string(100000, '{'), "x"), JsonLimitError);
}

TEST(JsonRead, AcceptsNestingUpToTheLimit) {
  EXPECT_EQ(kJsonMaxDepth, 512);
  nlohmann::json j = dpo::json_parse(nested_arrays(kJsonMaxDepth), "x");
  EXPECT_TRUE(j.is_array());
  j = dpo::json_parse(nested_objects(kJsonMaxDepth), "x");
  EXPECT_TRUE(j.is_object());
  EXPECT_THROW(dpo::json_parse(nested_arrays(kJsonMaxDepth + 1), "x"), JsonLimitError);
  EXPECT_THROW(dpo::json_parse(nested_objects(kJsonMaxDepth + 1), "x"), JsonLimitError);
  // 10^5 brackets inside a string are no nesting at all.
  j = dpo::json_parse("{\"s\":\"" + nested_arrays(100000) + "\"}", "x");
  EXPECT_EQ(j["s"].get<std::string>().size(), 200000u);
}

TEST(JsonRead, SyntaxErrorsStayNlohmannErrors) {
  // The readers keep their own messages for malformed JSON: nlohmann's exceptions pass
  // through unchanged (and JsonLimitError is not one of them).
  EXPECT_THROW(dpo::json_parse("{\"a\": ", "x"), nlohmann::json::parse_error);
  EXPECT_THROW(dpo::json_parse("[1e400]", "x"), nlohmann::json::out_of_range);
  EXPECT_TRUE(dpo::json_parse_or_discarded("{\"a\": ").is_discarded());
  EXPECT_TRUE(dpo::json_parse_or_discarded("[1e400]").is_discarded());
  EXPECT_EQ(dpo::json_parse(R"({"b": 1, "a": [true, null]})", "x"), nlohmann::json::parse(R"({"b":1,"a":[true,null]})"));
  // ordered_json keeps the key order.
  EXPECT_EQ(dpo::json_parse<nlohmann::ordered_json>(R"({"b":1,"a":2})", "x").begin().key(), "b");
  // The parser callback is nlohmann's (core/safetensors.cpp's duplicate-key check uses it).
  int keys = 0;
  dpo::json_parse(R"({"a":{"b":1},"c":2})", "x", {},
                  [&](int, nlohmann::json::parse_event_t ev, nlohmann::json&) {
                    keys += ev == nlohmann::json::parse_event_t::key;
                    return true;
                  });
  EXPECT_EQ(keys, 3);
}

TEST(JsonRead, SizeLimit) {
  const std::string text = "[" + std::string(100, ' ') + "]";
  EXPECT_NO_THROW(dpo::json_parse(text, "x", {102}));
  EXPECT_EQ(throw_message([&] { dpo::json_parse(text, "x.json", {101, "hint"}); }),
            "x.json: 102 bytes of JSON, over this reader's limit of 101 bytes; hint");
  EXPECT_TRUE(dpo::json_parse_or_discarded(text, {101}).is_discarded());
  EXPECT_EQ(dpo::kJsonConfigMaxBytes, int64_t(64) << 20);

  TempDir dir;
  const std::string path = dir.file("big.json");
  dpo::testutil::write_file(path, text);
  EXPECT_EQ(dpo::json_read_file(path, 102), text);
  EXPECT_EQ(dpo::json_read_file(path, 0), text);  // 0: no limit
  EXPECT_EQ(throw_message([&] { dpo::json_read_file(path, 101); }),
            path + ": 102 bytes of JSON, over this reader's limit of 101 bytes");
  dpo::testutil::write_file(path, std::string((64 << 20) + 1, ' '));
  EXPECT_EQ(throw_message([&] { dpo::json_read_file(path, dpo::kJsonConfigMaxBytes, "is it a config?"); }),
            path + ": 67108865 bytes of JSON, over this reader's limit of 64 MiB; is it a config?");
  // Not a regular file: the limit holds while reading.
  EXPECT_EQ(throw_message([&] { dpo::json_read_file("/dev/zero", 1000); }),
            "/dev/zero: more than 1000 bytes of JSON, over this reader's limit of 1000 bytes");
  const std::string msg = throw_message([&] { dpo::json_read_file(dir.file("none.json"), 10); });
  EXPECT_NE(msg.find("none.json: cannot open"), std::string::npos) << msg;
}

}  // namespace
