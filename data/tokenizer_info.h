// What the trainer needs to know about a model's tokenizer without linking
// libsentencepiece: vocabulary size, special ids and the file's SHA-256, for a
// sentencepiece tokenizer.model or a Hugging Face tokenizer.json (whose vocabulary
// size counts the added tokens: the largest id + 1, len(tokenizer) in HF).
// libsentencepiece bundles (and exports) its own protobuf-lite, which clashes with
// libtorch's libprotobuf at load time (a crash in static initialization), so no
// libtorch process may link it. This reader parses the model's protobuf wire format
// itself (ModelProto: pieces = 1 {piece = 1, type = 3}; trainer_spec = 2 {unk_piece
// = 45, bos_piece = 46, eos_piece = 47, pad_piece = 48}) and resolves special ids as
// SentencePieceProcessor does (a special piece counts only with the right type).
#pragma once
#include <cstdint>
#include <string>

namespace dpo {

/// The tokenizer file of a model: `tokenizer_file` when given, else DIR/tokenizer.json
/// when it exists, else DIR/tokenizer.model (which may not exist: the caller opens it
/// and reports). Exactly one argument must be non-empty (std::invalid_argument).
std::string resolve_tokenizer_path(const std::string& tokenizer_file, const std::string& model_dir);
/// The directory holding `path` ("." for a bare file name): where tokenizer_config.json
/// and config.json are looked for.
std::string tokenizer_file_dir(const std::string& path);
/// True when the file's first non-blank byte is '{' (a tokenizer.json); false for a
/// sentencepiece model (protobuf) or a missing file.
bool tokenizer_file_is_json(const std::string& path);

class TokenizerInfo {
 public:
  /// Reads and parses the file (tokenizer.model or tokenizer.json, told apart by
  /// content). Throws std::runtime_error naming it when it is missing or neither.
  explicit TokenizerInfo(const std::string& model_path);

  /// "sentencepiece" | "tokenizers-json" (tokenizer_type_name()).
  const std::string& type() const { return type_; }
  /// Number of pieces (SentencePieceProcessor::GetPieceSize); for tokenizer.json the
  /// largest id of the model vocabulary and the added tokens, plus one.
  int64_t vocab_size() const { return vocab_size_; }
  /// -1 when the model has no such piece (as SentencePieceProcessor reports it).
  /// tokenizer.json: bos/eos/pad as TextTokenizer resolves them (tokenizer_config.json,
  /// then config.json, next to the file); unk from the BPE model's unk_token.
  int32_t unk_id() const { return unk_id_; }
  int32_t bos_id() const { return bos_id_; }
  int32_t eos_id() const { return eos_id_; }
  /// The model's own pad piece, -1 for Llama's tokenizer.
  int32_t model_pad_id() const { return model_pad_id_; }
  /// The pad id stored in preference files: model_pad_id() if >= 0, else eos_id().
  int32_t pad_id() const { return model_pad_id_ >= 0 ? model_pad_id_ : eos_id_; }
  /// Lowercase hex SHA-256 of the file's bytes.
  const std::string& sha256() const { return sha256_; }
  const std::string& path() const { return path_; }

 private:
  void parse_sentencepiece(const std::string& bytes);
  void parse_tokenizer_json(const std::string& bytes);
  std::string path_, sha256_, type_;
  int64_t vocab_size_ = 0;
  int32_t unk_id_ = -1, bos_id_ = -1, eos_id_ = -1, model_pad_id_ = -1;
};

}  // namespace dpo
