#include "data/tokenizer_info.h"

#include <algorithm>
#include <climits>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/sha256.h"
#include "data/text_tokenizer.h"
#include "util/json_read.h"

namespace dpo {
namespace {

// SentencePiece.Type values of sentencepiece_model.proto.
constexpr uint64_t kTypeNormal = 1, kTypeUnknown = 2, kTypeControl = 3;

struct WireError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A cursor over protobuf wire-format bytes.
class Wire {
 public:
  explicit Wire(std::string_view b) : b_(b) {}
  bool done() const { return pos_ >= b_.size(); }
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (pos_ >= b_.size()) throw WireError("truncated varint");
      const uint8_t byte = uint8_t(b_[pos_++]);
      v |= uint64_t(byte & 0x7F) << shift;
      if (!(byte & 0x80)) return v;
    }
    throw WireError("varint longer than 10 bytes");
  }
  std::string_view bytes() {
    const uint64_t n = varint();
    if (n > b_.size() - pos_) throw WireError("length-delimited field runs past the end");
    std::string_view s = b_.substr(pos_, n);
    pos_ += n;
    return s;
  }
  void skip(uint32_t wire_type) {
    switch (wire_type) {
      case 0: varint(); break;
      case 1: advance(8); break;
      case 2: bytes(); break;
      case 5: advance(4); break;
      default: throw WireError("unsupported wire type " + std::to_string(wire_type));
    }
  }

 private:
  void advance(size_t n) {
    if (n > b_.size() - pos_) throw WireError("fixed-size field runs past the end");
    pos_ += n;
  }
  std::string_view b_;
  size_t pos_ = 0;
};

}  // namespace

std::string resolve_tokenizer_path(const std::string& tokenizer_file, const std::string& model_dir) {
  if (!tokenizer_file.empty() && !model_dir.empty())
    throw std::invalid_argument("give either --tokenizer or --model_name_or_path, not both");
  if (tokenizer_file.empty() && model_dir.empty())
    throw std::invalid_argument("--tokenizer FILE or --model_name_or_path DIR is required");
  if (!tokenizer_file.empty()) return tokenizer_file;
  const std::string json = (std::filesystem::path(model_dir) / "tokenizer.json").string();
  if (std::filesystem::exists(json)) return json;
  return (std::filesystem::path(model_dir) / "tokenizer.model").string();
}

std::string tokenizer_file_dir(const std::string& path) {
  const std::filesystem::path parent = std::filesystem::path(path).parent_path();
  return parent.empty() ? std::string(".") : parent.string();
}

static bool bytes_look_like_json(std::string_view b) {
  for (char c : b) {
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r') continue;
    return c == '{';
  }
  return false;
}

bool tokenizer_file_is_json(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char buf[256];
  in.read(buf, sizeof buf);
  return bytes_look_like_json(std::string_view(buf, size_t(in.gcount())));
}

TokenizerInfo::TokenizerInfo(const std::string& model_path) : path_(model_path) {
  std::ifstream in(model_path, std::ios::binary);
  if (!in) throw std::runtime_error(model_path + ": cannot open tokenizer file");
  std::ostringstream ss;
  ss << in.rdbuf();
  const std::string bytes = ss.str();
  sha256_ = sha256_hex(bytes);
  if (bytes_look_like_json(bytes)) {
    type_ = tokenizer_type_name(TokenizerKind::kTokenizersJson);
    parse_tokenizer_json(bytes);
  } else {
    type_ = tokenizer_type_name(TokenizerKind::kSentencepiece);
    parse_sentencepiece(bytes);
  }
}

void TokenizerInfo::parse_tokenizer_json(const std::string& bytes) {
  const std::string& model_path = path_;
  nlohmann::json j;
  try {
    j = json_parse(bytes, model_path, {kJsonTokenizerMaxBytes});
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(model_path + ": not valid JSON (" + e.what() + ")");
  }
  const auto* vocab = j.is_object() && j.contains("model") && j["model"].is_object() && j["model"].contains("vocab")
                          ? &j["model"]["vocab"] : nullptr;
  if (!vocab || !vocab->is_object())
    throw std::runtime_error(model_path + ": /model/vocab: missing or not an object (not a tokenizer.json with a BPE model)");
  std::unordered_map<std::string, int32_t> ids;
  int64_t max_id = -1;
  for (auto it = vocab->begin(); it != vocab->end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 || it.value().get<int64_t>() > INT32_MAX)
      throw std::runtime_error(model_path + ": /model/vocab/" + it.key() + ": not a non-negative 32-bit id");
    ids[it.key()] = it.value().get<int32_t>();
    max_id = std::max<int64_t>(max_id, it.value().get<int64_t>());
  }
  if (j.contains("added_tokens") && j["added_tokens"].is_array()) {
    for (size_t i = 0; i < j["added_tokens"].size(); ++i) {
      const auto& t = j["added_tokens"][i];
      if (!t.is_object() || !t.contains("id") || !t["id"].is_number_integer() || !t.contains("content") ||
          !t["content"].is_string() || t["id"].get<int64_t>() < 0 || t["id"].get<int64_t>() > INT32_MAX)
        throw std::runtime_error(model_path + ": /added_tokens/" + std::to_string(i) + ": needs an integer id and a string content");
      ids[t["content"].get<std::string>()] = t["id"].get<int32_t>();
      max_id = std::max<int64_t>(max_id, t["id"].get<int64_t>());
    }
  }
  vocab_size_ = max_id + 1;
  const auto& model = j["model"];
  if (model.contains("unk_token") && model["unk_token"].is_string()) {
    auto it = ids.find(model["unk_token"].get<std::string>());
    if (it != ids.end()) unk_id_ = it->second;
  }
  const SpecialTokenConfig sc = read_special_token_config(tokenizer_file_dir(model_path));
  auto resolve = [&](bool set, const std::string& token, int32_t config_id) -> int32_t {
    if (set) {
      if (token.empty()) return -1;
      auto it = ids.find(token);
      return it == ids.end() ? -1 : it->second;
    }
    return config_id;
  };
  bos_id_ = resolve(sc.set_bos, sc.bos, sc.bos_id);
  eos_id_ = resolve(sc.set_eos, sc.eos, sc.eos_id);
  model_pad_id_ = resolve(sc.set_pad, sc.pad, sc.pad_id);
}

void TokenizerInfo::parse_sentencepiece(const std::string& bytes) {
  const std::string& model_path = path_;

  std::vector<std::string_view> pieces;
  std::vector<uint64_t> types;
  std::string unk_piece = "<unk>", bos_piece = "<s>", eos_piece = "</s>", pad_piece = "<pad>";
  try {
    Wire model(bytes);
    while (!model.done()) {
      const uint64_t tag = model.varint();
      const uint32_t field = uint32_t(tag >> 3), wt = uint32_t(tag & 7);
      if (field == 1 && wt == 2) {  // repeated SentencePiece pieces
        Wire p(model.bytes());
        std::string_view piece;
        uint64_t type = kTypeNormal;
        while (!p.done()) {
          const uint64_t t = p.varint();
          if ((t >> 3) == 1 && (t & 7) == 2) piece = p.bytes();
          else if ((t >> 3) == 3 && (t & 7) == 0) type = p.varint();
          else p.skip(uint32_t(t & 7));
        }
        pieces.push_back(piece);
        types.push_back(type);
      } else if (field == 2 && wt == 2) {  // TrainerSpec
        Wire spec(model.bytes());
        while (!spec.done()) {
          const uint64_t t = spec.varint();
          const uint32_t f = uint32_t(t >> 3);
          if ((t & 7) == 2 && f >= 45 && f <= 48) {
            std::string s(spec.bytes());
            (f == 45 ? unk_piece : f == 46 ? bos_piece : f == 47 ? eos_piece : pad_piece) = s;
          } else {
            spec.skip(uint32_t(t & 7));
          }
        }
      } else {
        model.skip(wt);
      }
    }
  } catch (const WireError& e) {
    throw std::runtime_error(model_path + ": not a sentencepiece model (" + e.what() + ")");
  }
  if (pieces.empty()) throw std::runtime_error(model_path + ": not a sentencepiece model (no pieces)");
  vocab_size_ = int64_t(pieces.size());
  std::unordered_map<std::string_view, int32_t> ids;
  for (size_t i = 0; i < pieces.size(); ++i) ids.emplace(pieces[i], int32_t(i));
  // As SentencePieceProcessor::{unk,bos,eos,pad}_id: the piece's id when it has the
  // expected type, else -1.
  auto special = [&](const std::string& piece, uint64_t type) -> int32_t {
    auto it = ids.find(piece);
    return it != ids.end() && types[it->second] == type ? it->second : -1;
  };
  unk_id_ = special(unk_piece, kTypeUnknown);
  bos_id_ = special(bos_piece, kTypeControl);
  eos_id_ = special(eos_piece, kTypeControl);
  model_pad_id_ = special(pad_piece, kTypeControl);
}

}  // namespace dpo
