// A byte-level BPE tokenizer.json (the layout of Llama 3, Qwen and GPT-2) built in
// memory, for the data tests that need one without the real files.
#pragma once
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace dpo::testutil {

/// GPT-2's byte -> symbol table, written from its definition: printable Latin-1 bytes
/// stand for themselves, the other 68 bytes for U+0100, U+0101, ... in byte order.
inline std::vector<std::string> gpt2_byte_symbols() {
  std::vector<std::string> out(256);
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    const bool keep = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
    const unsigned cp = keep ? unsigned(b) : 256u + unsigned(n++);
    std::string s;
    if (cp < 0x80) {
      s += char(cp);
    } else {
      s += char(0xC0 | (cp >> 6));
      s += char(0x80 | (cp & 0x3F));
    }
    out[b] = s;
  }
  return out;
}

/// tokenizer.json of a byte-level BPE: Llama 3's split regex then the ByteLevel
/// pre-tokenizer, a BPE model over `vocab` (symbol -> id) with `merges` (a JSON array in
/// either of HF's forms), and `added_tokens` as given (a JSON array).
inline nlohmann::json byte_level_bpe_json(const nlohmann::json& vocab, const nlohmann::json& merges,
                                          const nlohmann::json& added_tokens, bool ignore_merges = false) {
  using json = nlohmann::json;
  return json{
      {"version", "1.0"},
      {"added_tokens", added_tokens},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         json::array({{{"type", "Split"},
                       {"pattern", {{"Regex", R"( ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)"}}},
                       {"behavior", "Isolated"},
                       {"invert", false}},
                      {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}}})}}},
      {"post_processor", nullptr},
      {"decoder", nullptr},
      {"model",
       {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"fuse_unk", false}, {"byte_fallback", false},
        {"ignore_merges", ignore_merges}, {"vocab", vocab}, {"merges", merges}}}};
}

}  // namespace dpo::testutil
