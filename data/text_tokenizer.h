// The tokenizer interface of the data layer: what dpo_preprocess and the
// conversational row reader need from a model's tokenizer, whichever file it comes
// from. Two implementations:
//   - Tokenizer    (data/tokenizer.h, sentencepiece tokenizer.model; target
//                   dpo_tokenize, links libsentencepiece: never in a libtorch process)
//   - HfTokenizer  (data/hf_tokenizer.h, Hugging Face tokenizer.json; target
//                   dpo_hf_tokenizer: PCRE2 + utf8proc, no sentencepiece, safe anywhere)
// open_tokenizer() (data/tokenizer.h) picks one from --tokenizer / --model_name_or_path.
//
// Special tokens: bos/eos/pad come from tokenizer_config.json next to the tokenizer
// file (bos_token / eos_token / pad_token: a string, an AddedToken object
// {"content": ...} or null), then config.json (bos_token_id / eos_token_id /
// pad_token_id), then the tokenizer file itself. bos may be absent (Qwen): bos_id()
// is -1 and bos_token() is "". No pad token -> pad_id() is eos_id().
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace dpo {

enum class TokenizerKind { kSentencepiece, kTokenizersJson };

/// The HDF5 root attribute `tokenizer_type`: "sentencepiece" | "tokenizers-json".
const char* tokenizer_type_name(TokenizerKind kind);

class TextTokenizer {
 public:
  virtual ~TextTokenizer() = default;

  /// Encodes `text` with NO bos/eos added. Special-token strings written in the text
  /// (added tokens such as "<|eot_id|>", "<|im_start|>", "<s>") become their ids, as
  /// Hugging Face tokenizers do by default (split_special_tokens=False); the rest goes
  /// through the tokenizer's normalizer, pre-tokenizer and model. `ids` is overwritten.
  /// Thread-safe (const); may be called concurrently from several threads.
  virtual void encode(std::string_view text, std::vector<int32_t>* ids) const = 0;
  std::vector<int32_t> encode(std::string_view text) const {
    std::vector<int32_t> ids;
    encode(text, &ids);
    return ids;
  }

  /// Number of ids (len(tokenizer) in HF: model vocabulary plus added tokens).
  virtual int64_t vocab_size() const = 0;
  /// The id of a token string (vocabulary or added token), -1 when unknown.
  virtual int32_t token_to_id(std::string_view token) const = 0;

  /// -1 / "" when the tokenizer has no bos (Qwen).
  int32_t bos_id() const { return bos_id_; }
  const std::string& bos_token() const { return bos_token_; }
  /// Always present (open_tokenizer refuses a tokenizer without eos).
  int32_t eos_id() const { return eos_id_; }
  const std::string& eos_token() const { return eos_token_; }
  /// The pad token's id, else eos_id() (padding is masked out anyway).
  int32_t pad_id() const { return pad_id_ >= 0 ? pad_id_ : eos_id_; }

  TokenizerKind kind() const { return kind_; }
  /// Lowercase hex SHA-256 of the tokenizer file's bytes (tokenizer.model or tokenizer.json).
  const std::string& sha256() const { return sha256_; }
  const std::string& path() const { return path_; }

 protected:
  TokenizerKind kind_ = TokenizerKind::kSentencepiece;
  std::string path_, sha256_;
  int32_t bos_id_ = -1, eos_id_ = -1, pad_id_ = -1;
  std::string bos_token_, eos_token_;
};

/// Special tokens as tokenizer_config.json / config.json name them. A field is
/// "unset" (set_* false) when the files do not mention it, and set but empty/-1 when
/// they say null (Qwen's "bos_token": null).
struct SpecialTokenConfig {
  bool set_bos = false, set_eos = false, set_pad = false;
  std::string bos, eos, pad;  ///< token strings from tokenizer_config.json ("" = null)
  /// Ids from config.json (-1 when absent or null); used only for tokens that
  /// tokenizer_config.json does not name. A list (eos_token_id: [a, b]) gives its first.
  int32_t bos_id = -1, eos_id = -1, pad_id = -1;
};

/// Reads DIR/tokenizer_config.json and DIR/config.json when they exist (missing files
/// are fine: every field stays unset). A malformed file or field throws
/// std::runtime_error naming the file and field.
SpecialTokenConfig read_special_token_config(const std::string& dir);

}  // namespace dpo
