#include "data/sources.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "data/chat_template.h"
#include "util/json_read.h"

namespace dpo {

InputFormat parse_input_format(const std::string& name) {
  if (name == "trl") return InputFormat::kTrl;
  if (name == "stack-exchange") return InputFormat::kStackExchange;
  throw std::invalid_argument("unknown input format '" + name + "' (use trl or stack-exchange)");
}

const char* input_format_name(InputFormat f) { return f == InputFormat::kTrl ? "trl" : "stack-exchange"; }

const char* row_kind_name(RowKind k) {
  switch (k) {
    case RowKind::kText: return "text";
    case RowKind::kConversational: return "conversational";
    default: return "unknown";
  }
}

const char* invalid_reason_text(InvalidReason r) {
  switch (r) {
    case InvalidReason::kNone: return "valid";
    case InvalidReason::kInvalidUtf8: return "invalid UTF-8";
    case InvalidReason::kMalformedJson: return "malformed JSON";
    case InvalidReason::kNotAnObject: return "not a JSON object";
    case InvalidReason::kMissingField: return "missing field";
    case InvalidReason::kNonStringField: return "non-string field";
    case InvalidReason::kEmptyPrompt: return "empty prompt";
    case InvalidReason::kEmptyAnswer: return "empty answer";
    case InvalidReason::kIdenticalAnswers: return "chosen identical to rejected";
    case InvalidReason::kNoRoomForAnswer: return "no room for answer";
    case InvalidReason::kBadMessage: return "bad chat message";
    case InvalidReason::kTemplateError: return "chat template error";
    case InvalidReason::kPromptNotPrefix: return "prompt rendering not a prefix";
    case InvalidReason::kNoChatTemplate: return "no chat template";
    case InvalidReason::kJsonLimit: return "JSON past the reader's limits";
    case InvalidReason::kCount: break;
  }
  return "?";
}

const char* invalid_reason_key(InvalidReason r) {
  switch (r) {
    case InvalidReason::kNone: return "valid";
    case InvalidReason::kInvalidUtf8: return "invalid_utf8";
    case InvalidReason::kMalformedJson: return "malformed_json";
    case InvalidReason::kNotAnObject: return "not_an_object";
    case InvalidReason::kMissingField: return "missing_field";
    case InvalidReason::kNonStringField: return "non_string_field";
    case InvalidReason::kEmptyPrompt: return "empty_prompt";
    case InvalidReason::kEmptyAnswer: return "empty_answer";
    case InvalidReason::kIdenticalAnswers: return "identical_answers";
    case InvalidReason::kNoRoomForAnswer: return "no_room_for_answer";
    case InvalidReason::kBadMessage: return "bad_message";
    case InvalidReason::kTemplateError: return "template_error";
    case InvalidReason::kPromptNotPrefix: return "prompt_not_prefix";
    case InvalidReason::kNoChatTemplate: return "no_chat_template";
    case InvalidReason::kJsonLimit: return "json_limit";
    case InvalidReason::kCount: break;
  }
  return "?";
}

bool is_valid_utf8(std::string_view s, size_t* error_offset) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    // ASCII fast path, 8 bytes at a time.
    if (i + 8 <= n) {
      uint64_t w;
      std::memcpy(&w, p + i, 8);
      if ((w & 0x8080808080808080ull) == 0) {
        i += 8;
        continue;
      }
    }
    const unsigned c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    int len;
    unsigned lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;       // overlong
      if (c == 0xED) hi = 0x9F;       // surrogates U+D800..DFFF
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;       // overlong
      if (c == 0xF4) hi = 0x8F;       // above U+10FFFF
    } else {
      if (error_offset) *error_offset = i;
      return false;
    }
    if (i + len > n || p[i + 1] < lo || p[i + 1] > hi) {
      if (error_offset) *error_offset = i;
      return false;
    }
    for (int k = 2; k < len; ++k)
      if ((p[i + k] & 0xC0) != 0x80) {
        if (error_offset) *error_offset = i;
        return false;
      }
    i += len;
  }
  return true;
}

bool is_blank(std::string_view s) {
  for (char c : s)
    if (c != ' ' && c != '\t' && c != '\r' && c != '\n') return false;
  return true;
}

namespace {

using Json = nlohmann::ordered_json;  // key order of messages matters to templates (tojson, keys())

// Said after a row past the JSON limits: such a line is no preference row, and the file
// is likely not one either.
constexpr const char* kRowLimitHint = "is this file really preference data?";

const char* json_type_name(const Json& v) { return v.type_name(); }

// Extracts a string field; returns the reason when absent or not a string.
InvalidReason get_string(const Json& obj, const char* key, std::string* out, std::string* detail) {
  auto it = obj.find(key);
  if (it == obj.end()) {
    *detail = std::string("field '") + key + "' is missing";
    return InvalidReason::kMissingField;
  }
  if (!it->is_string()) {
    *detail = std::string("field '") + key + "' is " + json_type_name(*it) + ", not a string";
    return InvalidReason::kNonStringField;
  }
  *out = it->get_ref<const std::string&>();
  return InvalidReason::kNone;
}


bool is_conversational_field(const Json& v) { return v.is_array() && !v.empty() && v.front().is_object(); }

bool object_is_conversational(const Json& obj) {
  for (const char* key : {"prompt", "chosen", "rejected"}) {
    auto it = obj.find(key);
    if (it != obj.end() && is_conversational_field(*it)) return true;
  }
  return false;
}

// A conversational field: a non-empty list of {"role": known role, "content": string}
// objects (other keys pass through to the template). `answer`: starts with assistant.
InvalidReason check_messages(const Json& obj, const char* key, bool answer, std::string* detail) {
  auto it = obj.find(key);
  if (it == obj.end()) {
    *detail = std::string("field '") + key + "' is missing";
    return InvalidReason::kMissingField;
  }
  if (!it->is_array()) {
    *detail = std::string("field '") + key + "' is " + json_type_name(*it) +
              "; in a conversational row it must be a list of {\"role\", \"content\"} messages";
    return InvalidReason::kBadMessage;
  }
  if (it->empty()) {
    *detail = std::string("field '") + key + "' is an empty list of messages";
    return answer ? InvalidReason::kEmptyAnswer : InvalidReason::kEmptyPrompt;
  }
  for (size_t i = 0; i < it->size(); ++i) {
    const Json& m = (*it)[i];
    const std::string where = std::string(key) + "[" + std::to_string(i) + "]";
    if (!m.is_object()) {
      *detail = where + " is " + json_type_name(m) + ", not a {\"role\", \"content\"} object";
      return InvalidReason::kBadMessage;
    }
    auto role = m.find("role");
    if (role == m.end()) {
      *detail = where + " has no 'role'" +
                (m.contains("from") ? std::string(" (ShareGPT's from/value? convert to role/content)") : std::string());
      return InvalidReason::kBadMessage;
    }
    if (!role->is_string()) {
      *detail = where + ".role is " + json_type_name(*role) + ", not a string";
      return InvalidReason::kBadMessage;
    }
    const std::string& r = role->get_ref<const std::string&>();
    bool known = false;
    for (const char* k : kChatRoles) known |= r == k;
    if (!known) {
      *detail = where + ".role is '" + r + "'; use system, user, assistant or tool";
      return InvalidReason::kBadMessage;
    }
    auto content = m.find("content");
    if (content == m.end()) {
      *detail = where + ".content is missing";
      return InvalidReason::kBadMessage;
    }
    if (!content->is_string()) {
      *detail = where + ".content is " + json_type_name(*content) + ", not a string";
      return InvalidReason::kBadMessage;
    }
    if (answer && i == 0 && r != "assistant") {
      *detail = where + ".role is '" + r + "'; an answer starts with an assistant message";
      return InvalidReason::kBadMessage;
    }
  }
  return InvalidReason::kNone;
}

// A short, escaped view of s[at, at+n) for messages.
std::string snippet(const std::string& s, size_t at) {
  std::string out = Json(s.substr(at, 24)).dump();
  if (s.size() > at + 24) out.insert(out.size() - 1, "...");
  return out;
}

// prompt_text = render(prompt, true); *answer_text = render(prompt + answer, false)
// minus prompt_text.
InvalidReason render_answer(const ChatTemplate& chat, const Json& prompt, const Json& answer,
                            const std::string& prompt_text, const char* key, std::string* answer_text,
                            std::string* detail) {
  Json all = prompt;
  for (const auto& m : answer) all.push_back(m);
  std::string full;
  try {
    full = chat.render(all, false);
  } catch (const ChatTemplateError& e) {
    *detail = std::string("rendering prompt + ") + key + ": " + e.what();
    return InvalidReason::kTemplateError;
  }
  if (full.compare(0, prompt_text.size(), prompt_text) != 0) {
    size_t at = 0;
    while (at < full.size() && at < prompt_text.size() && full[at] == prompt_text[at]) ++at;
    *detail = std::string("render(prompt + ") + key +
              ") does not start with render(prompt, add_generation_prompt=true): they differ at byte " +
              std::to_string(at) + " (" + snippet(full, at) + " vs " + snippet(prompt_text, at) + ")";
    return InvalidReason::kPromptNotPrefix;
  }
  *answer_text = full.substr(prompt_text.size());
  if (answer_text->empty()) {
    *detail = std::string("the ") + key + " answer renders to nothing after the prompt";
    return InvalidReason::kEmptyAnswer;
  }
  return InvalidReason::kNone;
}

InvalidReason parse_conversational(const Json& obj, const ChatTemplate* chat, RawTriple* out, std::string* detail) {
  const bool explicit_prompt = obj.contains("prompt");
  InvalidReason r;
  if (explicit_prompt && (r = check_messages(obj, "prompt", false, detail)) != InvalidReason::kNone) return r;
  if ((r = check_messages(obj, "chosen", explicit_prompt, detail)) != InvalidReason::kNone) return r;
  if ((r = check_messages(obj, "rejected", explicit_prompt, detail)) != InvalidReason::kNone) return r;
  Json prompt, chosen, rejected;
  if (explicit_prompt) {
    prompt = obj["prompt"];
    chosen = obj["chosen"];
    rejected = obj["rejected"];
  } else {
    // TRL's extract_prompt: the first index where the conversations differ (or the
    // last index of the shorter one when one is a prefix of the other).
    const Json& c = obj["chosen"];
    const Json& j = obj["rejected"];
    const size_t n = std::min(c.size(), j.size());
    size_t idx = 0;
    for (; idx < n; ++idx)
      if (c[idx] != j[idx]) break;
    if (idx == n) idx = n - 1;
    prompt = Json::array();
    chosen = Json::array();
    rejected = Json::array();
    for (size_t k = 0; k < c.size(); ++k) (k < idx ? prompt : chosen).push_back(c[k]);
    for (size_t k = idx; k < j.size(); ++k) rejected.push_back(j[k]);
    if (prompt.empty()) {
      *detail = "fields 'chosen' and 'rejected' share no leading message, so the row has no prompt";
      return InvalidReason::kEmptyPrompt;
    }
    for (const auto* a : {&chosen, &rejected}) {
      const char* key = a == &chosen ? "chosen" : "rejected";
      if (a->empty()) {
        *detail = std::string("field '") + key + "' holds only the common prompt, no answer";
        return InvalidReason::kEmptyAnswer;
      }
      const std::string& role = (*a)[0]["role"].get_ref<const std::string&>();
      if (role != "assistant") {
        *detail = std::string(key) + "[" + std::to_string(idx) + "].role is '" + role +
                  "'; the first message after the common prompt must be the assistant's answer";
        return InvalidReason::kBadMessage;
      }
    }
  }
  if (chosen == rejected) {
    *detail = "fields 'chosen' and 'rejected' hold the same messages";
    return InvalidReason::kIdenticalAnswers;
  }
  if (!chat) {
    *detail = "a conversational row needs the model's chat template: give --chat_template FILE, or a model "
              "directory with chat_template.jinja or a chat_template in tokenizer_config.json";
    return InvalidReason::kNoChatTemplate;
  }
  try {
    out->prompt = chat->render(prompt, true);
  } catch (const ChatTemplateError& e) {
    *detail = std::string("rendering the prompt: ") + e.what();
    return InvalidReason::kTemplateError;
  }
  if ((r = render_answer(*chat, prompt, chosen, out->prompt, "chosen", &out->chosen, detail)) != InvalidReason::kNone)
    return r;
  if ((r = render_answer(*chat, prompt, rejected, out->prompt, "rejected", &out->rejected, detail)) != InvalidReason::kNone)
    return r;
  if (out->chosen == out->rejected) {
    *detail = "'chosen' and 'rejected' render to the same text";
    return InvalidReason::kIdenticalAnswers;
  }
  out->templated = true;
  return InvalidReason::kNone;
}

}  // namespace

InvalidReason parse_preference_line(std::string_view line, InputFormat format, RawTriple* out, std::string* detail,
                                    const ChatTemplate* chat, RowKind* kind) {
  if (kind) *kind = RowKind::kUnknown;
  out->templated = false;
  size_t bad = 0;
  if (!is_valid_utf8(line, &bad)) {
    *detail = "invalid UTF-8 at byte " + std::to_string(bad + 1) + " of the line";
    return InvalidReason::kInvalidUtf8;
  }
  Json obj;
  try {
    obj = json_parse<Json>(line, "", {kJsonRowMaxBytes, kRowLimitHint});
  } catch (const JsonLimitError& e) {
    *detail = e.what();
    return InvalidReason::kJsonLimit;
  } catch (const Json::exception& e) {
    // parse_error, and out_of_range for a number beyond double ("1e400"; found by
    // tests/fuzz/fuzz_jsonl_rows). e.what() starts with "[json.exception.parse_error.101] ";
    // keep the readable part.
    std::string m = e.what();
    auto sp = m.find("] ");
    *detail = sp == std::string::npos ? m : m.substr(sp + 2);
    return InvalidReason::kMalformedJson;
  }
  if (!obj.is_object()) {
    *detail = std::string("the line is a JSON ") + json_type_name(obj) + ", not an object";
    return InvalidReason::kNotAnObject;
  }
  const bool trl = format == InputFormat::kTrl;
  const bool conversational = trl && object_is_conversational(obj);
  if (kind) *kind = conversational ? RowKind::kConversational : RowKind::kText;
  if (conversational) return parse_conversational(obj, chat, out, detail);
  const char* keys[3] = {trl ? "prompt" : "question", trl ? "chosen" : "response_j", trl ? "rejected" : "response_k"};
  std::string* dst[3] = {&out->prompt, &out->chosen, &out->rejected};
  for (int k = 0; k < 3; ++k) {
    InvalidReason r = get_string(obj, keys[k], dst[k], detail);
    if (r != InvalidReason::kNone) return r;
  }
  if (is_blank(out->prompt)) {
    *detail = std::string("field '") + keys[0] + "' is empty";
    return InvalidReason::kEmptyPrompt;
  }
  for (int k = 1; k < 3; ++k)
    if (is_blank(*dst[k])) {
      *detail = std::string("field '") + keys[k] + "' is empty";
      return InvalidReason::kEmptyAnswer;
    }
  if (out->chosen == out->rejected) {
    *detail = std::string("fields '") + keys[1] + "' and '" + keys[2] + "' are identical";
    return InvalidReason::kIdenticalAnswers;
  }
  if (!trl) out->prompt = "Question: " + out->prompt + "\n\nAnswer: ";
  return InvalidReason::kNone;
}

RowKind preference_row_kind(std::string_view line, InputFormat format) {
  if (!is_valid_utf8(line)) return RowKind::kUnknown;
  Json obj = json_parse_or_discarded<Json>(line, {kJsonRowMaxBytes});
  if (!obj.is_object()) return RowKind::kUnknown;
  return format == InputFormat::kTrl && object_is_conversational(obj) ? RowKind::kConversational : RowKind::kText;
}

}  // namespace dpo
