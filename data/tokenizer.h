// The model's sentencepiece tokenizer (tokenizer.model) as the data layer needs
// it, and open_tokenizer(), which picks the tokenizer of a model (tokenizer.json or
// tokenizer.model) for dpo_preprocess and the conversational row reader.
// sentencepiece stays behind a pimpl.
//
// Target dpo_tokenize (libsentencepiece). NEVER use it in a libtorch process:
// libsentencepiece exports its own protobuf, which crashes next to libtorch's at load
// time. There, data/tokenizer_info.h gives vocab size, special ids and sha256, and
// data/hf_tokenizer.h (no sentencepiece) encodes with a tokenizer.json.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "data/text_tokenizer.h"

namespace dpo {

class Tokenizer : public TextTokenizer {
 public:
  /// Loads a sentencepiece model file. bos/eos/pad: `special` where it names them
  /// (tokenizer_config.json / config.json), else the model's own pieces. Throws
  /// std::runtime_error naming the file when it is missing, not a sentencepiece model,
  /// or has no eos.
  explicit Tokenizer(const std::string& model_path, const SpecialTokenConfig& special = {});
  ~Tokenizer() override;
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  /// No bos/eos added. The model's control and unknown pieces written in the text
  /// ("<s>", "</s>", "<unk>") become their ids, as Hugging Face's LlamaTokenizer does;
  /// every other stretch goes through sentencepiece Encode (the model's normalizer,
  /// dummy prefix per stretch). Thread-safe (const).
  void encode(std::string_view text, std::vector<int32_t>* ids) const override;
  using TextTokenizer::encode;
  std::string decode(const std::vector<int32_t>& ids) const;

  int64_t vocab_size() const override { return vocab_size_; }
  int32_t token_to_id(std::string_view token) const override;
  int32_t unk_id() const { return unk_id_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int64_t vocab_size_ = 0;
  int32_t unk_id_ = -1;
};

/// The tokenizer file dpo_preprocess uses: `tokenizer_file` when given, else
/// DIR/tokenizer.json when it exists, else DIR/tokenizer.model. Exactly one of the two
/// arguments must be non-empty (std::invalid_argument otherwise). Declared in
/// data/tokenizer_info.h as resolve_tokenizer_path (no sentencepiece needed).
///
/// Opens it: a file whose first non-blank byte is '{' is a tokenizer.json (HfTokenizer),
/// anything else a sentencepiece model (Tokenizer). Special tokens from
/// read_special_token_config() of the file's directory. Throws std::runtime_error
/// naming the file on any problem.
std::unique_ptr<TextTokenizer> open_tokenizer(const std::string& tokenizer_file, const std::string& model_dir);

}  // namespace dpo
