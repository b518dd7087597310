// The one JSON reader of the project: every JSON text a tool reads (JSONL rows,
// config.json, tokenizer.json, tokenizer_config.json, adapter_config.json, safetensors
// headers and index files, quant_state, run state, --chat_template_kwargs) is checked
// here before nlohmann builds its tree.
//
// Why: valid JSON can still be hostile. nlohmann's parser (3.11.2) and its destructor are
// iterative, but copying a tree, dump(), operator== and our own walks recurse once per
// level, so a row whose "prompt" nests 100,000 arrays deep overflowed the stack (SIGSEGV,
// issue 28). The depth is counted by a scan over the bytes (brackets outside strings; no
// recursion, no allocation) before anything is built, so a refused text costs one pass.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

#include <nlohmann/json.hpp>

namespace dpo {

/// The deepest nesting of [ and { that every JSON reader here accepts (real files: < 10).
inline constexpr int kJsonMaxDepth = 512;

/// Size limits (bytes) of the files read as JSON; real files are far below.
inline constexpr int64_t kJsonConfigMaxBytes = int64_t(64) << 20;     ///< config.json & co: real ones < 1 MB
inline constexpr int64_t kJsonTokenizerMaxBytes = int64_t(1) << 30;   ///< tokenizer.json: real ones 2-35 MB
inline constexpr int64_t kJsonRowMaxBytes = int64_t(64) << 20;        ///< one JSONL row (a line)

/// A JSON text past a reader's limits. Not a nlohmann::json::exception, so the readers'
/// handlers of syntax errors let it through with its own message.
class JsonLimitError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct JsonLimits {
  JsonLimits(int64_t bytes = 0, std::string then = "") : max_bytes(bytes), hint(std::move(then)) {}
  int64_t max_bytes;  ///< longest text accepted; 0: no size limit
  std::string hint;   ///< said after the limit, e.g. "is this file really preference data?"
};

/// Byte offset of the bracket that opens nesting level max_depth + 1, or -1. One pass,
/// no recursion, no allocation; exact on every prefix of valid JSON (all that nlohmann
/// builds before a syntax error stops it).
int64_t json_too_deep_at(std::string_view text, int max_depth = kJsonMaxDepth);

/// Throws JsonLimitError, one line: "<what>: JSON nested deeper than 512 levels (the
/// limit of every JSON reader here)[; <hint>]", or "<what>: <n> bytes of JSON, over this
/// reader's limit of 64 MiB[; <hint>]". An empty `what` leaves out "<what>: ".
void json_check_limits(std::string_view text, const std::string& what, const JsonLimits& limits = {});

/// json_check_limits, then nlohmann's parse (with `cb` as its parser callback). A syntax
/// error throws nlohmann::json::parse_error as nlohmann's parse does, so the callers keep
/// their messages. Json: nlohmann::json or nlohmann::ordered_json.
template <class Json = nlohmann::json>
Json json_parse(std::string_view text, const std::string& what, const JsonLimits& limits = {},
                const typename Json::parser_callback_t& cb = nullptr);

/// Never throws: a discarded value (is_discarded()) when the text is not JSON or is past
/// the limits.
template <class Json = nlohmann::json>
Json json_parse_or_discarded(std::string_view text, const JsonLimits& limits = {});

/// The whole file, for a JSON reader: throws JsonLimitError naming the path when it holds
/// more than max_bytes (checked before reading a regular file, and while reading
/// anything else), std::runtime_error "PATH: cannot open: REASON" / "PATH: read failed:
/// REASON" as read_file (util/fs.h).
std::string json_read_file(const std::string& path, int64_t max_bytes, const std::string& hint = "");

}  // namespace dpo
