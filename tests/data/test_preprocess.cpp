// The preprocess pipeline without MPI: JSONL -> HDF5 -> reader with token ids computed
// independently by a sentencepiece processor; the truncation rule; stack-exchange
// mapping; every kind of invalid line (stop with FILE:LINE, or skip and count); byte
// range splitting disjoint and complete for 1..5 ranks; statistics.
#include <gtest/gtest.h>
#include <sentencepiece_processor.h>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/chat_template.h"
#include "data/hf_tokenizer.h"
#include "data/preference_h5.h"
#include "data/preprocess.h"
#include "data/sha256.h"
#include "data/sources.h"
#include "data/tokenizer.h"
#include "data/tokenizer_info.h"
#include "tests/data/byte_level_fixture.h"
#include "tests/data/sentencepiece_suite.h"
#include "tests/test_util.h"
#include "util/json_read.h"

namespace dpo {
namespace {

using testutil::TempDir;
using Ids = std::vector<int32_t>;

// Independent expectation: sentencepiece directly (enc), bos/eos by hand.
class PreprocessTest : public testutil::SentencepieceSuite<300> {
 protected:
  static Ids prompt_ids(const std::string& s) {
    Ids v = {1};
    for (int t : enc(s)) v.push_back(t);
    return v;
  }
  static Ids answer_ids(const std::string& s) {
    Ids v = enc(s);
    v.push_back(2);
    return v;
  }
  static std::string trl_line(const std::string& p, const std::string& c, const std::string& r) {
    return nlohmann::json{{"prompt", p}, {"chosen", c}, {"rejected", r}}.dump();
  }
  // Runs the whole pipeline on `inputs` into out.h5; returns the stats.
  PreprocessStats run(const PreprocessOptions& o, const std::string& out, int world = 1, int rank = -1) {
    Tokenizer tok(model_);
    auto sizes = input_sizes(o.inputs);
    int64_t total = 0;
    for (auto s : sizes) total += s;
    PreprocessStats st;
    PreferenceWriter w(out, preprocess_attrs(tok, o));
    auto [b, e] = rank < 0 ? std::pair<int64_t, int64_t>{0, total} : rank_byte_range(total, world, rank);
    preprocess_range(tok, o, sizes, b, e, &w, &st);
    w.close();
    return st;
  }
  std::string write(const std::string& name, const std::string& content) {
    testutil::write_file(tmp_.file(name), content);
    return tmp_.file(name);
  }
};

TEST_F(PreprocessTest, TokenizerReportsLlamaLikeIdsAndFileSha256) {
  Tokenizer tok(model_);
  EXPECT_EQ(tok.vocab_size(), 300);
  EXPECT_EQ(tok.vocab_size(), sp_->GetPieceSize());
  EXPECT_EQ(tok.unk_id(), 0);
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  EXPECT_EQ(tok.pad_id(), 2);  // no pad piece -> eos, as TRL's stack_llama_2 sets it
  // The fingerprint equals coreutils' sha256sum of the file.
  std::string out;
  ASSERT_EQ(testutil::run_command("sha256sum " + model_, &out), 0);
  EXPECT_EQ(tok.sha256(), out.substr(0, 64));
  EXPECT_EQ(tok.encode("the answer is 42"), enc("the answer is 42"));
  EXPECT_THROW(Tokenizer(tmp_.file("missing.model")), std::runtime_error);
  write("bad.model", "not a model");
  EXPECT_THROW(Tokenizer(tmp_.file("bad.model")), std::runtime_error);
}

// TokenizerInfo parses the protobuf itself; it must agree with sentencepiece on
// models with and without pad, with byte fallback, and without bos.
TEST_F(PreprocessTest, TokenizerInfoAgreesWithSentencepiece) {
  testutil::write_file(tmp_.file("corpus.txt"), testutil::test_corpus());
  const std::pair<const char*, const char*> variants[] = {
      {"plain", "--vocab_size=400 --model_type=bpe --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1"},
      {"pad", "--vocab_size=400 --model_type=bpe --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=3"},
      {"bytes", "--vocab_size=400 --model_type=bpe --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1 --byte_fallback=true"},
      {"nobos", "--vocab_size=400 --model_type=bpe --unk_id=2 --bos_id=-1 --eos_id=0 --pad_id=1"},
      {"unigram", "--vocab_size=150 --model_type=unigram --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1"}};
  for (auto [name, flags] : variants) {
    const std::string prefix = tmp_.file(name);
    std::string out;
    ASSERT_EQ(testutil::run_command("spm_train --input=" + tmp_.file("corpus.txt") + " --model_prefix=" + prefix +
                                        " --minloglevel=2 --character_coverage=1.0 " + flags,
                                    &out),
              0)
        << out;
    sentencepiece::SentencePieceProcessor sp;
    ASSERT_TRUE(sp.Load(prefix + ".model").ok());
    TokenizerInfo info(prefix + ".model");
    EXPECT_EQ(info.vocab_size(), sp.GetPieceSize()) << name;
    EXPECT_EQ(info.unk_id(), sp.unk_id()) << name;
    EXPECT_EQ(info.bos_id(), sp.bos_id()) << name;
    EXPECT_EQ(info.eos_id(), sp.eos_id()) << name;
    EXPECT_EQ(info.model_pad_id(), sp.pad_id()) << name;
    EXPECT_EQ(info.sha256(), file_sha256(prefix + ".model"));
  }
  Tokenizer tok(model_);
  TokenizerInfo info(model_);
  EXPECT_EQ(info.pad_id(), tok.pad_id());
  EXPECT_EQ(info.sha256(), tok.sha256());
  EXPECT_THROW(TokenizerInfo(tmp_.file("missing.model")), std::runtime_error);
  write("bad.model", "\x0a\xff\xff\xff");  // a length running past the end
  EXPECT_THROW(TokenizerInfo(tmp_.file("bad.model")), std::runtime_error);
  const std::string bytes = testutil::read_file(model_);
  write("cut.model", bytes.substr(0, bytes.size() / 2));
  EXPECT_THROW(TokenizerInfo(tmp_.file("cut.model")), std::runtime_error);
}

TEST_F(PreprocessTest, TrlRoundTripExactIds) {
  const std::vector<std::array<std::string, 3>> rows = {
      {"how do I use a list in python?", "you use the list function", "no."},
      {"Human: what is \"quoted\" here?\n\nAssistant:", " the value is quoted", "it is a file\twith tabs"},
      {"caf\xC3\xA9 na\xC3\xAFve \xE2\x9C\x93 test", "unicode \xF0\x9F\x98\x80 answer", "worse answer"},
      {"x = 1", "y = 2", "y = 3"}};
  std::string jsonl;
  for (const auto& r : rows) jsonl += trl_line(r[0], r[1], r[2]) + "\n";
  PreprocessOptions o;
  o.inputs = {write("in.jsonl", jsonl)};
  PreprocessStats st = run(o, tmp_.file("out.h5"));
  EXPECT_EQ(st.lines, 4);
  EXPECT_EQ(st.written, 4);
  EXPECT_EQ(st.skipped_total(), 0);
  PreferenceReader r(tmp_.file("out.h5"));
  ASSERT_EQ(r.size(), 4);
  int64_t tokens = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    auto e = r.get(i);
    EXPECT_EQ(e.prompt, prompt_ids(rows[i][0])) << i;
    EXPECT_EQ(e.chosen, answer_ids(rows[i][1])) << i;
    EXPECT_EQ(e.rejected, answer_ids(rows[i][2])) << i;
    tokens += e.prompt.size() + e.chosen.size() + e.rejected.size();
  }
  EXPECT_EQ(st.tokens[0] + st.tokens[1] + st.tokens[2], tokens);
  EXPECT_EQ(st.encoded_tokens, tokens);  // nothing truncated
  const auto& a = r.attrs();
  EXPECT_EQ(a.vocab_size, 300);
  EXPECT_EQ(a.bos_id, 1);
  EXPECT_EQ(a.eos_id, 2);
  EXPECT_EQ(a.pad_id, 2);
  EXPECT_EQ(a.tokenizer_sha256, file_sha256(model_));
  EXPECT_EQ(a.max_length, 1024);
  EXPECT_EQ(a.max_prompt_length, 512);
  EXPECT_EQ(a.source, o.inputs);
}

TEST_F(PreprocessTest, SeveralInputsBlankLinesCrlfBomAndNoFinalNewline) {
  const std::string a = "\xEF\xBB\xBF" + trl_line("p one", "c one", "r one") + "\r\n\n   \n" +
                        trl_line("p two", "c two", "r two") + "\r\n";
  const std::string b = trl_line("p three", "c three", "r three");  // no trailing newline
  PreprocessOptions o;
  o.inputs = {write("a.jsonl", a), write("empty.jsonl", ""), write("b.jsonl", b)};
  PreprocessStats st = run(o, tmp_.file("out.h5"));
  EXPECT_EQ(st.lines, 3);
  EXPECT_EQ(st.bytes, int64_t(a.size() + b.size()));
  PreferenceReader r(tmp_.file("out.h5"));
  ASSERT_EQ(r.size(), 3);
  EXPECT_EQ(r.get(0).prompt, prompt_ids("p one"));
  EXPECT_EQ(r.get(1).rejected, answer_ids("r two"));
  EXPECT_EQ(r.get(2).chosen, answer_ids("c three"));
  EXPECT_EQ(r.attrs().source.size(), 3u);
}

TEST_F(PreprocessTest, StackExchangeMapping) {
  const std::string line = nlohmann::json{{"qid", 7},
                                          {"question", "how do I return a value?"},
                                          {"date", "2020"},
                                          {"response_j", "use return"},
                                          {"response_k", "you can not"},
                                          {"metadata", {"x", "y"}}}
                               .dump();
  PreprocessOptions o;
  o.inputs = {write("se.jsonl", line + "\n")};
  o.format = InputFormat::kStackExchange;
  run(o, tmp_.file("out.h5"));
  PreferenceReader r(tmp_.file("out.h5"));
  ASSERT_EQ(r.size(), 1);
  auto e = r.get(0);
  EXPECT_EQ(e.prompt, prompt_ids("Question: how do I return a value?\n\nAnswer: "));
  EXPECT_EQ(e.chosen, answer_ids("use return"));
  EXPECT_EQ(e.rejected, answer_ids("you can not"));
  // A TRL file read as stack-exchange lacks the fields.
  o.inputs = {write("trl.jsonl", trl_line("a", "b", "c") + "\n")};
  try {
    run(o, tmp_.file("out2.h5"));
    FAIL() << "no error";
  } catch (const InvalidLineError& e) {
    EXPECT_NE(std::string(e.what()).find("trl.jsonl:1: missing field"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("question"), std::string::npos) << e.what();
  }
}

// The rule on hand-made ids: bos = 1, eos = 2, ordinary tokens >= 10.
TokenizedTriple triple(int prompt_len, int chosen_len, int rejected_len) {
  TokenizedTriple t;
  t.prompt.push_back(1);
  for (int i = 1; i < prompt_len; ++i) t.prompt.push_back(100 + i);
  for (int i = 0; i + 1 < chosen_len; ++i) t.chosen.push_back(200 + i);
  t.chosen.push_back(2);
  for (int i = 0; i + 1 < rejected_len; ++i) t.rejected.push_back(300 + i);
  t.rejected.push_back(2);
  return t;
}

TEST(Truncation, PromptExactlyAtTheLimitIsKept) {
  TokenizedTriple t = triple(8, 3, 4), orig = t;
  EXPECT_EQ(truncate_triple(&t, 16, 8), InvalidReason::kNone);
  EXPECT_EQ(t.prompt, orig.prompt);
  EXPECT_FALSE(t.prompt_truncated);
  EXPECT_EQ(t.chosen, orig.chosen);
  EXPECT_FALSE(t.chosen_truncated);
}

TEST(Truncation, LongPromptKeepsBosAndItsEnd) {
  TokenizedTriple t = triple(11, 3, 3);  // prompt 1,101..110
  EXPECT_EQ(truncate_triple(&t, 16, 8), InvalidReason::kNone);
  EXPECT_EQ(t.prompt, (Ids{1, 104, 105, 106, 107, 108, 109, 110}));
  EXPECT_TRUE(t.prompt_truncated);
  EXPECT_FALSE(t.chosen_truncated);
}

TEST(Truncation, AnswersCutToMaxLengthMinusPromptKeepingTheirStart) {
  TokenizedTriple t = triple(6, 11, 10);  // room = 16 - 6 = 10
  EXPECT_EQ(truncate_triple(&t, 16, 8), InvalidReason::kNone);
  EXPECT_EQ(t.chosen, (Ids{200, 201, 202, 203, 204, 205, 206, 207, 208, 209}));  // eos cut off
  EXPECT_TRUE(t.chosen_truncated);
  EXPECT_EQ(t.rejected.size(), 10u);  // exactly the room: untouched, ends with eos
  EXPECT_EQ(t.rejected.back(), 2);
  EXPECT_FALSE(t.rejected_truncated);
}

TEST(Truncation, PromptLongerThanMaxLength) {
  TokenizedTriple t = triple(40, 30, 2);
  EXPECT_EQ(truncate_triple(&t, 16, 12), InvalidReason::kNone);
  ASSERT_EQ(t.prompt.size(), 12u);
  EXPECT_EQ(t.prompt[0], 1);
  EXPECT_EQ(t.prompt[1], 129);  // last 11 of 101..139
  EXPECT_EQ(t.prompt.back(), 139);
  EXPECT_EQ(t.chosen, (Ids{200, 201, 202, 203}));  // room 4
  EXPECT_EQ(t.rejected, (Ids{300, 2}));
}

TEST(Truncation, NoRoomForAnswerWhenLimitsAllowIt) {
  TokenizedTriple t = triple(10, 3, 3);
  EXPECT_EQ(truncate_triple(&t, 8, 8), InvalidReason::kNoRoomForAnswer);
  EXPECT_TRUE(t.chosen.empty());
  // ... which the tool rules out: max_length must exceed max_prompt_length.
  EXPECT_THROW(validate_limits(8, 8), std::invalid_argument);
  EXPECT_THROW(validate_limits(8, 9), std::invalid_argument);
  EXPECT_THROW(validate_limits(8, 0), std::invalid_argument);
  EXPECT_NO_THROW(validate_limits(9, 8));
  TokenizedTriple u = triple(10, 3, 3);
  EXPECT_EQ(truncate_triple(&u, 9, 8), InvalidReason::kNone);  // the smallest room: one token
  EXPECT_EQ(u.chosen, (Ids{200}));
}

TEST_F(PreprocessTest, TruncationThroughThePipelineMatchesTheRule) {
  std::string long_prompt;
  for (int i = 0; i < 60; ++i) long_prompt += "question " + std::to_string(i % 7) + " why ";
  const std::string long_answer = long_prompt + " answer";
  PreprocessOptions o;
  o.max_length = 48;
  o.max_prompt_length = 20;
  o.inputs = {write("t.jsonl", trl_line(long_prompt, long_answer, "short") + "\n")};
  PreprocessStats st = run(o, tmp_.file("out.h5"));
  Ids p = prompt_ids(long_prompt);
  ASSERT_GT(p.size(), 20u);
  Ids want_p = {1};
  want_p.insert(want_p.end(), p.end() - 19, p.end());
  Ids c = answer_ids(long_answer);
  Ids want_c(c.begin(), c.begin() + 28);
  PreferenceReader r(tmp_.file("out.h5"));
  auto e = r.get(0);
  EXPECT_EQ(e.prompt, want_p);
  EXPECT_EQ(e.chosen, want_c);
  EXPECT_EQ(e.rejected, answer_ids("short"));
  EXPECT_EQ(st.truncated[0], 1);
  EXPECT_EQ(st.truncated[1], 1);
  EXPECT_EQ(st.truncated[2], 0);
  EXPECT_EQ(st.encoded_tokens, int64_t(p.size() + c.size() + answer_ids("short").size()));
}

struct BadLine {
  std::string line;
  InvalidReason reason;
};

std::vector<BadLine> bad_lines() {
  auto L = [](const std::string& p, const std::string& c, const std::string& r) {
    return nlohmann::json{{"prompt", p}, {"chosen", c}, {"rejected", r}}.dump();
  };
  return {
      {"{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": ", InvalidReason::kMalformedJson},
      {"{\"prompt\": \"a\" \"chosen\": \"b\"}", InvalidReason::kMalformedJson},
      {"{\"prompt\": \"\\ud800\", \"chosen\": \"b\", \"rejected\": \"c\"}", InvalidReason::kMalformedJson},
      {"[\"a\", \"b\", \"c\"]", InvalidReason::kNotAnObject},
      {"\"just a string\"", InvalidReason::kNotAnObject},
      {"{\"prompt\": \"a\", \"chosen\": \"b\"}", InvalidReason::kMissingField},
      {"{\"prompt\": 3, \"chosen\": \"b\", \"rejected\": \"c\"}", InvalidReason::kNonStringField},
      {"{\"prompt\": \"a\", \"chosen\": null, \"rejected\": \"c\"}", InvalidReason::kNonStringField},
      {"{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": [\"c\"]}", InvalidReason::kNonStringField},
      {L("", "b", "c"), InvalidReason::kEmptyPrompt},
      {L(" \n\t", "b", "c"), InvalidReason::kEmptyPrompt},
      {L("a", "", "c"), InvalidReason::kEmptyAnswer},
      {L("a", "b", "  "), InvalidReason::kEmptyAnswer},
      {L("a", "same", "same"), InvalidReason::kIdenticalAnswers},
      {"{\"prompt\": \"a\xFF\", \"chosen\": \"b\", \"rejected\": \"c\"}", InvalidReason::kInvalidUtf8},
      {"{\"prompt\": \"\xC0\xAF\", \"chosen\": \"b\", \"rejected\": \"c\"}", InvalidReason::kInvalidUtf8},
      {"{\"prompt\": \"\xED\xA0\x80\", \"chosen\": \"b\", \"rejected\": \"c\"}", InvalidReason::kInvalidUtf8},
      {"{\"prompt\": \"a\", \"chosen\": \"b\xE2\x82\", \"rejected\": \"c\"}", InvalidReason::kInvalidUtf8},
  };
}

TEST_F(PreprocessTest, EveryBadLineStopsWithFileLineAndReason) {
  for (const auto& bad : bad_lines()) {
    // Line 3 is bad; line 2 is blank (blank lines still count for line numbers).
    const std::string content = trl_line("a", "b", "c") + "\n\n" + bad.line + "\n" + trl_line("d", "e", "f") + "\n";
    PreprocessOptions o;
    o.inputs = {write("bad.jsonl", content)};
    try {
      run(o, tmp_.file("out.h5"));
      ADD_FAILURE() << "no error for " << bad.line;
    } catch (const InvalidLineError& e) {
      const std::string want = tmp_.file("bad.jsonl") + ":3: " + invalid_reason_text(bad.reason);
      EXPECT_EQ(std::string(e.what()).rfind(want, 0), 0u) << e.what() << "\n  want prefix: " << want;
      EXPECT_NE(std::string(e.what()).find("--skip_invalid"), std::string::npos);
    }
  }
}

TEST_F(PreprocessTest, SkipInvalidCountsEveryReason) {
  std::string content;
  std::vector<int64_t> want(kNumInvalidReasons, 0);
  int good = 0;
  for (const auto& bad : bad_lines()) {
    content += trl_line("p" + std::to_string(good), "c", "r") + "\n" + bad.line + "\n";
    ++good;
    ++want[int(bad.reason)];
  }
  PreprocessOptions o;
  o.inputs = {write("mixed.jsonl", content)};
  o.skip_invalid = true;
  Tokenizer tok(model_);
  auto sizes = input_sizes(o.inputs);
  PreprocessStats st(o.max_length);
  PreferenceWriter w(tmp_.file("out.h5"), preprocess_attrs(tok, o));
  std::vector<std::string> warnings;
  preprocess_range(tok, o, sizes, 0, sizes[0], &w, &st, {}, [&](const std::string& m) { warnings.push_back(m); });
  w.close();
  EXPECT_EQ(st.written, good);
  EXPECT_EQ(st.lines, int64_t(2 * good));
  for (int r = 1; r < kNumInvalidReasons; ++r) EXPECT_EQ(st.skipped[r], want[r]) << invalid_reason_text(InvalidReason(r));
  ASSERT_EQ(warnings.size(), bad_lines().size());
  EXPECT_EQ(warnings[0].rfind(tmp_.file("mixed.jsonl") + ":2: skipped: malformed JSON", 0), 0u) << warnings[0];
  PreferenceReader r(tmp_.file("out.h5"));
  ASSERT_EQ(r.size(), good);
  EXPECT_EQ(r.get(good - 1).prompt, prompt_ids("p" + std::to_string(good - 1)));
}

// Valid-but-hostile JSON (issue 28): a row whose prompt nests 10^5 arrays deep killed
// dpo_preprocess (SIGSEGV in a recursive copy of the parsed tree). It is refused before
// a tree is built, with the file and line, and stops the run even with --skip_invalid
// (such a file is no preference data).
TEST_F(PreprocessTest, DeeplyNestedRowStopsWithFileLineAndLimit) {
  const std::string deep =
      "{\"prompt\": " + std::string(100000, '[') + std::string(100000, ']') + ", \"chosen\": \"b\", \"rejected\": \"c\"}";
  RawTriple raw;
  std::string detail;
  RowKind kind = RowKind::kText;
  EXPECT_EQ(parse_preference_line(deep, InputFormat::kTrl, &raw, &detail, nullptr, &kind), InvalidReason::kJsonLimit);
  EXPECT_EQ(detail,
            "JSON nested deeper than 512 levels (the limit of every JSON reader here); is this file really preference data?");
  EXPECT_EQ(kind, RowKind::kUnknown);
  EXPECT_EQ(preference_row_kind(deep, InputFormat::kTrl), RowKind::kUnknown);
  EXPECT_STREQ(invalid_reason_key(InvalidReason::kJsonLimit), "json_limit");
  for (bool skip : {false, true}) {
    PreprocessOptions o;
    o.inputs = {write("deep.jsonl", trl_line("a", "b", "c") + "\n\n" + deep + "\n" + trl_line("d", "e", "f") + "\n")};
    o.skip_invalid = skip;
    try {
      run(o, tmp_.file("out.h5"));
      ADD_FAILURE() << "no error";
    } catch (const InvalidLineError& e) {
      EXPECT_EQ(std::string(e.what()), tmp_.file("deep.jsonl") + ":3: " + detail);
    }
  }
  // A row of more than 64 MiB: the same (its size checked before its syntax).
  const std::string big = "{\"prompt\": \"" + std::string(kJsonRowMaxBytes, 'a') + "\", \"chosen\": \"b\", \"rejected\": \"c\"}";
  EXPECT_EQ(parse_preference_line(big, InputFormat::kTrl, &raw, &detail), InvalidReason::kJsonLimit);
  EXPECT_EQ(detail, std::to_string(big.size()) +
                        " bytes of JSON, over this reader's limit of 64 MiB; is this file really preference data?");
  // A line of more than 128 MiB is refused while it is read (before the line buffer
  // grows further): a sparse file of zeros, no newline.
  const std::string huge = tmp_.file("huge.jsonl");
  testutil::write_file(huge, trl_line("a", "b", "c") + "\n");
  ASSERT_EQ(truncate(huge.c_str(), (int64_t(130) << 20)), 0);
  PreprocessOptions o;
  o.inputs = {huge};
  o.skip_invalid = true;
  try {
    run(o, tmp_.file("out.h5"));
    ADD_FAILURE() << "no error";
  } catch (const InvalidLineError& e) {
    EXPECT_EQ(std::string(e.what()), huge + ":2: a line of more than 64 MiB, over the limit of a JSONL row; "
                                             "is this file really preference data?");
  }
}

// tokenizer.json, tokenizer_config.json and config.json nested 10^5 levels deep: one line
// naming the file and the limit (the tokenizer readers of data/).
TEST(HostileJson, TokenizerFilesNestedTooDeep) {
  TempDir dir;
  const std::string deep = "{\"x\": " + std::string(100000, '[') + std::string(100000, ']') + "}";
  const std::string want = ": JSON nested deeper than 512 levels (the limit of every JSON reader here)";
  testutil::write_file(dir.file("tokenizer.json"), deep);
  EXPECT_EQ(testutil::throw_message([&] { HfTokenizer::from_string(deep, "t.json", {}); }), "t.json" + want);
  EXPECT_EQ(testutil::throw_message([&] { HfTokenizer t(dir.file("tokenizer.json"), {}); }),
            dir.file("tokenizer.json") + want);
  EXPECT_EQ(testutil::throw_message([&] { TokenizerInfo t(dir.file("tokenizer.json")); }),
            dir.file("tokenizer.json") + want);
  testutil::write_file(dir.file("tokenizer_config.json"), deep);
  EXPECT_EQ(testutil::throw_message([&] { read_special_token_config(dir.str()); }),
            dir.file("tokenizer_config.json") + want);
  EXPECT_EQ(testutil::throw_message([&] { find_chat_template("", dir.str()); }),
            dir.file("tokenizer_config.json") + want);
  std::filesystem::remove(dir.file("tokenizer_config.json"));
  testutil::write_file(dir.file("config.json"), deep);
  EXPECT_EQ(testutil::throw_message([&] { read_special_token_config(dir.str()); }), dir.file("config.json") + want);
}

// Pre-tokenizer and normalizer Sequences inside Sequences: a depth bound, not one
// recursion per level of the file.
TEST(HostileJson, NestedTokenizerSequencesAreBounded) {
  nlohmann::json vocab = nlohmann::json::object();
  const auto sym = testutil::gpt2_byte_symbols();
  for (int b = 0; b < 256; ++b) vocab[sym[b]] = b;
  nlohmann::json j = testutil::byte_level_bpe_json(vocab, nlohmann::json::array(), nlohmann::json::array());
  nlohmann::json pre = j["pre_tokenizer"], norm = {{"type", "NFC"}};
  ASSERT_EQ(pre["type"], "Sequence");  // Llama 3's: Split then ByteLevel
  for (int i = 0; i < 32; ++i) {
    if (i < 31) pre = {{"type", "Sequence"}, {"pretokenizers", {pre}}};
    norm = {{"type", "Sequence"}, {"normalizers", {norm}}};
  }
  j["pre_tokenizer"] = pre;
  j["normalizer"] = norm;
  EXPECT_NO_THROW(HfTokenizer::from_string(j.dump(), "t.json", {}));  // 32 levels: fine
  j["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", {pre}}};
  EXPECT_EQ(testutil::throw_message([&] { HfTokenizer::from_string(j.dump(), "t.json", {}); }),
            "t.json: /pre_tokenizer: a Sequence nested more than 32 levels deep (real tokenizers nest one or two)");
  j["pre_tokenizer"] = pre;
  j["normalizer"] = {{"type", "Sequence"}, {"normalizers", {norm}}};
  EXPECT_EQ(testutil::throw_message([&] { HfTokenizer::from_string(j.dump(), "t.json", {}); }),
            "t.json: /normalizer: a Sequence nested more than 32 levels deep (real tokenizers nest one or two)");
}

TEST(Utf8, StrictValidation) {
  EXPECT_TRUE(is_valid_utf8(""));
  EXPECT_TRUE(is_valid_utf8("plain ascii text that is longer than eight bytes"));
  EXPECT_TRUE(is_valid_utf8("\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80\xF4\x8F\xBF\xBF"));  // é € 😀 U+10FFFF
  EXPECT_TRUE(is_valid_utf8("\xEF\xBF\xBF\xED\x9F\xBF"));  // U+FFFF, U+D7FF
  size_t off = 0;
  EXPECT_FALSE(is_valid_utf8("abcdefghij\x80", &off));  // stray continuation after the fast path
  EXPECT_EQ(off, 10u);
  EXPECT_FALSE(is_valid_utf8("\xC1\xBF"));           // overlong 2-byte
  EXPECT_FALSE(is_valid_utf8("\xE0\x9F\xBF"));       // overlong 3-byte
  EXPECT_FALSE(is_valid_utf8("\xF0\x8F\xBF\xBF"));   // overlong 4-byte
  EXPECT_FALSE(is_valid_utf8("\xED\xBF\xBF"));       // surrogate U+DFFF
  EXPECT_FALSE(is_valid_utf8("\xF4\x90\x80\x80"));   // U+110000
  EXPECT_FALSE(is_valid_utf8("\xF5\x80\x80\x80"));
  EXPECT_FALSE(is_valid_utf8("\xE2\x82"));           // truncated
  EXPECT_FALSE(is_valid_utf8("\xE2\x28\xA1"));       // bad continuation
}

// Splitting by bytes: for W = 1..5 the ranks' outputs, concatenated in rank order, equal
// the single-rank output, whatever the line lengths and file boundaries.
TEST_F(PreprocessTest, ByteRangesAreDisjointAndCompleteForOneToFiveRanks) {
  std::vector<std::string> files;
  int n = 0;
  for (int f = 0; f < 3; ++f) {
    std::string content;
    for (int i = 0; i < 5 + 7 * f; ++i, ++n) {
      std::string pad(size_t((n * 37) % 90), 'x');
      content += trl_line("prompt " + std::to_string(n) + " " + pad, "chosen " + std::to_string(n), "rejected") + "\n";
      if (n % 4 == 0) content += "\n";  // blank lines too
    }
    files.push_back(write("in" + std::to_string(f) + ".jsonl", content));
  }
  PreprocessOptions o;
  o.inputs = files;
  run(o, tmp_.file("one.h5"));
  PreferenceReader one(tmp_.file("one.h5"));
  ASSERT_EQ(one.size(), n);
  for (int world = 1; world <= 5; ++world) {
    std::vector<PreferenceExample> all;
    int64_t bytes = 0;
    for (int rank = 0; rank < world; ++rank) {
      const std::string part = tmp_.file("part" + std::to_string(rank) + ".h5");
      bytes += run(o, part, world, rank).bytes;
      PreferenceReader r(part);
      for (int64_t i = 0; i < r.size(); ++i) all.push_back(r.get(i));
    }
    EXPECT_EQ(bytes, one.offsets(Field::kPrompt).empty() ? 0 : [&] {
      int64_t t = 0;
      for (auto s : input_sizes(files)) t += s;
      return t;
    }());
    ASSERT_EQ(int64_t(all.size()), n) << "world " << world;
    for (int i = 0; i < n; ++i) {
      EXPECT_EQ(all[i].prompt, one.get(i).prompt) << "world " << world << " example " << i;
      EXPECT_EQ(all[i].chosen, one.get(i).chosen);
    }
  }
}

TEST_F(PreprocessTest, LineNumbersAreGlobalWhenTheErrorIsInALaterRanksShare) {
  std::string content;
  for (int i = 0; i < 40; ++i) content += (i == 33 ? std::string("{broken") : trl_line("p", "c" + std::to_string(i), "r")) + "\n";
  PreprocessOptions o;
  o.inputs = {write("big.jsonl", content)};
  bool seen = false;
  for (int rank = 0; rank < 3; ++rank) {
    try {
      run(o, tmp_.file("p.h5"), 3, rank);
    } catch (const InvalidLineError& e) {
      EXPECT_EQ(rank, 2);
      EXPECT_NE(std::string(e.what()).find("big.jsonl:34: malformed JSON"), std::string::npos) << e.what();
      seen = true;
    }
  }
  EXPECT_TRUE(seen);
}

TEST(RankByteRange, EvenContiguousCover) {
  for (int64_t total : {0, 1, 7, 100, 1000003}) {
    for (int w = 1; w <= 6; ++w) {
      int64_t prev = 0;
      for (int r = 0; r < w; ++r) {
        auto [b, e] = rank_byte_range(total, w, r);
        EXPECT_EQ(b, prev);
        EXPECT_LE(e - b, total / w + 1);
        EXPECT_GE(e - b, total / w);
        prev = e;
      }
      EXPECT_EQ(prev, total);
    }
  }
}

TEST(PreprocessStatsTest, PercentilesMergeAndPack) {
  PreprocessStats a(10), b(10);
  TokenizedTriple t;
  // prompt lengths 1..10 in a, 10 x length 3 in b
  for (int len = 1; len <= 10; ++len) {
    t.prompt.assign(len, 1);
    t.chosen.assign(2, 2);
    t.rejected.assign(len % 3 + 1, 2);
    t.prompt_truncated = len > 8;
    a.add_example(t);
    t.prompt.assign(3, 1);
    t.prompt_truncated = false;
    b.add_example(t);
  }
  EXPECT_EQ(a.percentile(Field::kPrompt, 50), 5);
  EXPECT_EQ(a.percentile(Field::kPrompt, 90), 9);
  EXPECT_EQ(a.percentile(Field::kPrompt, 100), 10);
  EXPECT_EQ(a.max_length_seen(Field::kPrompt), 10);
  EXPECT_EQ(a.truncated[0], 2);
  a.merge(b);
  EXPECT_EQ(a.written, 20);
  // 20 prompts: 1,2,3x11,4,...,10 -> p50 is the 10th = 3, p90 the 18th = 8.
  EXPECT_EQ(a.percentile(Field::kPrompt, 50), 3);
  EXPECT_EQ(a.percentile(Field::kPrompt, 90), 8);
  EXPECT_EQ(a.tokens[0], 55 + 30);
  EXPECT_EQ(a.histogram_size(), 11);  // grew for the length-10 prompt
  PreprocessStats c;
  c.resize_histograms(a.histogram_size());
  c.unpack(a.pack());
  EXPECT_EQ(c.pack(), a.pack());
  EXPECT_NE(a.summary(1.0).find("20 written"), std::string::npos) << a.summary(1.0);
  auto j = nlohmann::json::parse(a.to_json(2.0));
  EXPECT_EQ(j["written"], 20);
  EXPECT_EQ(j["prompt"]["p50"], 3);
  EXPECT_THROW(PreprocessStats(5).unpack(a.pack()), std::invalid_argument);
}

}  // namespace
}  // namespace dpo
