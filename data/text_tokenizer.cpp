#include "data/text_tokenizer.h"

#include <climits>
#include <filesystem>
#include <memory>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "util/json_read.h"

namespace dpo {

const char* tokenizer_type_name(TokenizerKind kind) {
  return kind == TokenizerKind::kTokenizersJson ? "tokenizers-json" : "sentencepiece";
}

namespace {

// nullptr when the file does not exist; throws naming it when it is not a JSON object.
std::unique_ptr<nlohmann::json> read_json_object(const std::string& path) {
  if (!std::filesystem::exists(path)) return nullptr;
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  in.close();
  const std::string text = json_read_file(path, kJsonConfigMaxBytes);
  auto j = std::make_unique<nlohmann::json>();
  try {
    *j = json_parse(text, path);
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(path + ": not valid JSON (" + e.what() + ")");
  }
  if (!j->is_object()) throw std::runtime_error(path + ": expected a JSON object at the top level");
  return j;
}

}  // namespace

SpecialTokenConfig read_special_token_config(const std::string& dir) {
  SpecialTokenConfig c;
  const std::string tc_path = (std::filesystem::path(dir) / "tokenizer_config.json").string();
  if (auto tc = read_json_object(tc_path)) {
    auto token = [&](const char* key, bool* set, std::string* out) {
      if (!tc->contains(key)) return;
      const auto& v = (*tc)[key];
      *set = true;
      if (v.is_null()) {
        out->clear();
      } else if (v.is_string()) {
        *out = v.get<std::string>();
      } else if (v.is_object() && v.contains("content") && v["content"].is_string()) {
        *out = v["content"].get<std::string>();
      } else {
        throw std::runtime_error(tc_path + ": " + key +
                                 ": expected a string, an AddedToken object {\"content\": ...} or null");
      }
    };
    token("bos_token", &c.set_bos, &c.bos);
    token("eos_token", &c.set_eos, &c.eos);
    token("pad_token", &c.set_pad, &c.pad);
  }
  const std::string cfg_path = (std::filesystem::path(dir) / "config.json").string();
  if (auto cfg = read_json_object(cfg_path)) {
    auto id = [&](const char* key, int32_t* out) {
      if (!cfg->contains(key)) return;
      const nlohmann::json* v = &(*cfg)[key];
      if (v->is_array()) {
        if (v->empty()) return;
        v = &(*v)[0];
      }
      if (v->is_null()) return;
      if (!v->is_number_integer() || v->get<int64_t>() < 0 || v->get<int64_t>() > INT32_MAX)
        throw std::runtime_error(cfg_path + ": " + key + ": expected a non-negative integer id, a list of them, or null");
      *out = v->get<int32_t>();
    };
    id("bos_token_id", &c.bos_id);
    id("eos_token_id", &c.eos_id);
    id("pad_token_id", &c.pad_id);
  }
  return c;
}

}  // namespace dpo
