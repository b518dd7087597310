// Chat templates: a Jinja engine for the chat templates that ship with Hugging Face
// models (tokenizer_config.json "chat_template", chat_template.jinja), rendering them
// byte for byte as Python's jinja2 does in transformers' apply_chat_template: an
// ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the loopcontrols
// extension ({% break %}, {% continue %}), {% generation %} blocks, HF's tojson
// (json.dumps, ensure_ascii=False) and the globals raise_exception and strftime_now.
//
// Supported (docs/preprocess.md lists it): {{ }}, {% if/elif/else %}, {% for %} with
// tuple targets, an `if` filter, `else` and loop.* (index, index0, revindex, revindex0,
// first, last, length, previtem, nextitem, cycle), {% set %} (names, tuples, namespace
// attributes, blocks), {% macro %}, {# #}, whitespace control ({%- -%} {%+), Python
// literals, arithmetic, comparisons, `in`, `~`, conditional expressions, slicing
// (incl. [::-1]), attribute/item access, str/dict methods, the filters and tests a
// chat template uses, and jinja2's default Undefined (prints as "", falsy, iterates
// empty; attribute access or arithmetic on it is an error).
// Anything else is refused with "chat template line N: unsupported ...", never
// approximated: at load time for tags, filters and tests, at render time for methods.
//
// No dependency other than nlohmann-json (messages come as JSON). Where a model keeps
// its template: find_chat_template().
#pragma once
#include <ctime>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>

#include <nlohmann/json.hpp>

namespace dpo {

/// A template that cannot be parsed, uses an unsupported construct, or fails while
/// rendering (raise_exception, undefined attribute access, type errors). what() is
/// "chat template line N: <reason>"; line() is N (0 when no line applies).
class ChatTemplateError : public std::runtime_error {
 public:
  ChatTemplateError(int line, const std::string& message);
  int line() const { return line_; }
  /// The reason without the "chat template line N: " prefix.
  const std::string& reason() const { return reason_; }

 private:
  int line_;
  std::string reason_;
};

class ChatTemplate {
 public:
  /// Parses `source` (the template text as stored in tokenizer_config.json). Throws
  /// ChatTemplateError on a syntax error or an unsupported tag, filter or test.
  explicit ChatTemplate(const std::string& source);
  ~ChatTemplate();
  ChatTemplate(ChatTemplate&&) noexcept;
  ChatTemplate& operator=(ChatTemplate&&) noexcept;
  ChatTemplate(const ChatTemplate&) = delete;
  ChatTemplate& operator=(const ChatTemplate&) = delete;

  /// bos_token / eos_token variables; std::nullopt (the default) leaves them undefined,
  /// as transformers does for a tokenizer without that token (Qwen has no bos).
  void set_bos_token(std::optional<std::string> token);
  void set_eos_token(std::optional<std::string> token);
  /// Extra variables (transformers' **kwargs of apply_chat_template, e.g.
  /// {"enable_thinking": false}); must be a JSON object. Replaces earlier extras.
  void set_extra_variables(const nlohmann::ordered_json& vars);
  /// The clock of strftime_now(format) (local time, as Python's datetime.now()).
  /// Unset: the time of each render call.
  void set_now(std::time_t now);

  /// Renders with `messages` (a JSON array of message objects) and
  /// add_generation_prompt; tools and documents stay undefined. Throws
  /// ChatTemplateError (raise_exception, errors at run time). Thread-safe (const).
  std::string render(const nlohmann::ordered_json& messages, bool add_generation_prompt) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// A model's chat template text and where it came from (for messages).
struct ChatTemplateSource {
  std::string text;
  std::string origin;  ///< "FILE" or "DIR/tokenizer_config.json (chat_template)"
};

/// The lookup of INTERFACES.md: `file` when not empty; else DIR/chat_template.jinja;
/// else "chat_template" of DIR/tokenizer_config.json, a string or a list of
/// {"name", "template"} objects (the one named "default" is taken). std::nullopt when
/// none applies (`dir` may be empty). Throws std::runtime_error naming the file (and
/// JSON field) when a file is unreadable or malformed.
std::optional<ChatTemplateSource> find_chat_template(const std::string& file, const std::string& dir);

namespace detail {
/// Variable scopes of the template engine alive in this process (for the test that a
/// render frees every scope it made, macro closures included).
int64_t chat_template_live_scopes();
/// Dicts and namespace() objects alive in this process (for the test that a render frees
/// every one it made, a namespace that holds itself included).
int64_t chat_template_live_dicts();
}  // namespace detail

}  // namespace dpo
