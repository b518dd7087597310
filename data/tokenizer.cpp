#include "data/tokenizer.h"

#include <sentencepiece_processor.h>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <type_traits>

#include "data/hf_tokenizer.h"
#include "data/sha256.h"
#include "data/tokenizer_info.h"

namespace dpo {

static_assert(std::is_same<int, int32_t>::value, "sentencepiece ids are int; the data layer stores int32");

struct Tokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
  /// Control and unknown pieces matched in the text (longest first at a position).
  std::vector<std::pair<std::string, int32_t>> specials;
  bool first_byte[256] = {};  ///< bytes some special piece starts with
};

namespace {

std::string read_bytes(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open " + what);
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw std::runtime_error(path + ": read error");
  return ss.str();
}

}  // namespace

Tokenizer::Tokenizer(const std::string& model_path, const SpecialTokenConfig& special)
    : impl_(std::make_unique<Impl>()) {
  kind_ = TokenizerKind::kSentencepiece;
  path_ = model_path;
  // Read the bytes once: the same buffer is hashed and parsed, so the fingerprint is
  // of exactly the model that tokenizes.
  std::ifstream probe(model_path, std::ios::binary);
  if (!probe)
    throw std::runtime_error(model_path + ": cannot open tokenizer model (give --tokenizer FILE or --model_name_or_path DIR containing tokenizer.json or tokenizer.model)");
  const std::string bytes = read_bytes(model_path, "tokenizer model");
  auto status = impl_->sp.LoadFromSerializedProto(bytes);
  if (!status.ok())
    throw std::runtime_error(model_path + ": not a sentencepiece model: " + status.ToString());
  sha256_ = sha256_hex(bytes);
  vocab_size_ = impl_->sp.GetPieceSize();
  unk_id_ = impl_->sp.unk_id();
  for (int i = 0; i < impl_->sp.GetPieceSize(); ++i)
    if ((impl_->sp.IsControl(i) || impl_->sp.IsUnknown(i)) && !impl_->sp.IdToPiece(i).empty())
      impl_->specials.emplace_back(impl_->sp.IdToPiece(i), i);
  for (const auto& sp : impl_->specials) impl_->first_byte[uint8_t(sp.first[0])] = true;
  std::stable_sort(impl_->specials.begin(), impl_->specials.end(),
                   [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });

  // bos/eos/pad: the config's token strings where it names them, else config.json's
  // ids, else the model's own pieces.
  auto resolve = [&](bool set, const std::string& token, int32_t config_id, int32_t model_id, const char* field,
                     std::string* token_out) -> int32_t {
    int32_t id = model_id;
    if (set) {
      if (token.empty()) {
        id = -1;
      } else {
        id = token_to_id(token);
        if (id < 0)
          throw std::runtime_error(model_path + ": tokenizer_config.json " + field + " \"" + token +
                                   "\" is not a piece of this sentencepiece model");
      }
    } else if (config_id >= 0) {
      if (config_id >= vocab_size_)
        throw std::runtime_error(model_path + ": config.json " + field + "_id " + std::to_string(config_id) +
                                 " is outside the vocabulary (" + std::to_string(vocab_size_) + " pieces)");
      id = config_id;
    }
    *token_out = id >= 0 ? impl_->sp.IdToPiece(id) : std::string();
    return id;
  };
  std::string pad_token;
  bos_id_ = resolve(special.set_bos, special.bos, special.bos_id, impl_->sp.bos_id(), "bos_token", &bos_token_);
  eos_id_ = resolve(special.set_eos, special.eos, special.eos_id, impl_->sp.eos_id(), "eos_token", &eos_token_);
  pad_id_ = resolve(special.set_pad, special.pad, special.pad_id, impl_->sp.pad_id(), "pad_token", &pad_token);
  if (eos_id_ < 0)
    throw std::runtime_error(model_path + ": the tokenizer has no eos piece; dpo_preprocess needs one (train it with "
                             "--eos_id >= 0, or name eos_token in tokenizer_config.json)");
}

Tokenizer::~Tokenizer() = default;

int32_t Tokenizer::token_to_id(std::string_view token) const {
  const int id = impl_->sp.PieceToId(token);
  // PieceToId answers unk for an unknown piece: only the unk piece itself maps there.
  if (id == impl_->sp.unk_id() && token != impl_->sp.IdToPiece(id)) return -1;
  return id;
}

void Tokenizer::encode(std::string_view text, std::vector<int32_t>* ids) const {
  ids->clear();
  static thread_local std::vector<int> part;
  size_t start = 0, pos = 0;
  auto flush = [&](size_t end) {
    if (end <= start) return;
    auto status = impl_->sp.Encode(text.substr(start, end - start), &part);
    if (!status.ok()) throw std::runtime_error(path_ + ": sentencepiece Encode failed: " + status.ToString());
    ids->insert(ids->end(), part.begin(), part.end());
  };
  if (!impl_->specials.empty()) {
    for (; pos < text.size(); ++pos) {
      if (!impl_->first_byte[uint8_t(text[pos])]) continue;
      for (const auto& [piece, id] : impl_->specials) {
        if (text.compare(pos, piece.size(), piece) == 0) {
          flush(pos);
          ids->push_back(id);
          start = pos + piece.size();
          pos = start - 1;
          break;
        }
      }
    }
  }
  flush(text.size());
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  auto status = impl_->sp.Decode(ids, &out);
  if (!status.ok()) throw std::runtime_error(path_ + ": sentencepiece Decode failed: " + status.ToString());
  return out;
}

std::unique_ptr<TextTokenizer> open_tokenizer(const std::string& tokenizer_file, const std::string& model_dir) {
  const std::string path = resolve_tokenizer_path(tokenizer_file, model_dir);
  const std::string dir = tokenizer_file_dir(path);
  const SpecialTokenConfig special = read_special_token_config(dir);
  if (tokenizer_file_is_json(path)) {
    auto t = std::make_unique<HfTokenizer>(path, special);
    if (t->eos_id() < 0)
      throw std::runtime_error(path + ": no eos token: name it in " + dir +
                               "/tokenizer_config.json (\"eos_token\": \"...\") or config.json (eos_token_id)");
    return t;
  }
  return std::make_unique<Tokenizer>(path, special);
}

}  // namespace dpo
