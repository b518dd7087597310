// A Hugging Face `tokenizer.json` tokenizer (the `tokenizers` library's format),
// encoding only, for the models users bring (docs/preprocess.md):
//   - model BPE with byte-level pre-tokenization (Llama 3.x, Qwen 2/2.5/3, GPT-2):
//     normalizer none/NFC/Sequence, pre_tokenizer Split(Regex) + ByteLevel (PCRE2,
//     UTF + UCP, JIT), merges in both the "a b" and ["a", "b"] forms, ignore_merges;
//   - model BPE with byte_fallback + the sentencepiece-style normalizer
//     (Prepend/Replace "▁") or Metaspace pre-tokenizer (Llama 2, Mistral);
//   - added tokens matched in the raw text before the model (split_special_tokens=False),
//     honouring lstrip / rstrip / single_word / normalized.
// Anything else in the JSON is refused with an error naming its JSON path; nothing is
// approximated. The post_processor (bos/eos templates) and decoder are ignored: the
// caller adds bos/eos itself (TextTokenizer::encode adds none).
//
// Target dpo_hf_tokenizer (PCRE2, utf8proc, nlohmann_json; no sentencepiece, no torch),
// so it can be linked into any process.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "data/text_tokenizer.h"

namespace dpo {

class HfTokenizer : public TextTokenizer {
 public:
  /// Loads `json_path` (a tokenizer.json). Special tokens: `special` (usually
  /// read_special_token_config(dir of the file)); tokens it leaves unset fall back to
  /// the post_processor's template (bos) and fail for eos. Throws std::runtime_error
  /// "FILE: /json/path: what is wrong (what is supported)" on anything unsupported or
  /// malformed.
  HfTokenizer(const std::string& json_path, const SpecialTokenConfig& special);
  /// Same, from JSON text already in memory (tests); `name` stands for the file in errors.
  static std::unique_ptr<HfTokenizer> from_string(const std::string& json_text, const std::string& name,
                                                  const SpecialTokenConfig& special = {});
  ~HfTokenizer() override;
  HfTokenizer(const HfTokenizer&) = delete;
  HfTokenizer& operator=(const HfTokenizer&) = delete;

  void encode(std::string_view text, std::vector<int32_t>* ids) const override;
  using TextTokenizer::encode;
  int64_t vocab_size() const override;
  int32_t token_to_id(std::string_view token) const override;
  /// The token string of an id ("" when out of range); for tests and messages.
  std::string id_to_token(int32_t id) const;

 private:
  HfTokenizer();
  void load(const std::string& json_text, const std::string& name, const SpecialTokenConfig& special);
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dpo
