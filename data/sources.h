// JSONL preference sources (docs/preprocess.md): one JSON object per line, mapped to a
// raw (prompt, chosen, rejected) text triple by the input format, with the checks
// that make a line invalid. No tokenization here (see data/preprocess.h).
// Conversational trl rows (lists of chat messages, TRL's is_conversational) are
// rendered to text here through the model's chat template (data/chat_template.h).
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

namespace dpo {

enum class InputFormat {
  kTrl,            ///< fields prompt, chosen, rejected
  kStackExchange,  ///< question, response_j (chosen), response_k (rejected);
                   ///< prompt = "Question: " + question + "\n\nAnswer: "
};
/// "trl" or "stack-exchange"; throws std::invalid_argument otherwise.
InputFormat parse_input_format(const std::string& name);
const char* input_format_name(InputFormat f);

/// Why a line is not turned into an example (counted per reason with --skip_invalid).
enum class InvalidReason {
  kNone = 0,
  kInvalidUtf8,       ///< the line is not valid UTF-8
  kMalformedJson,     ///< JSON syntax error (including bad \u escapes)
  kNotAnObject,       ///< valid JSON but not an object
  kMissingField,      ///< a field of the format is absent
  kNonStringField,    ///< a field of the format is not a string
  kEmptyPrompt,       ///< prompt (question) empty or only whitespace
  kEmptyAnswer,       ///< chosen or rejected empty or only whitespace
  kIdenticalAnswers,  ///< chosen == rejected (byte-equal): no preference signal
  kNoRoomForAnswer,   ///< after truncation an answer would keep no token (see truncate_triple)
  kBadMessage,        ///< conversational: a field is not a list of {role, content} messages, a role is
                      ///< unknown, or an answer does not start with an assistant message
  kTemplateError,     ///< conversational: the chat template failed on the row (raise_exception, ...)
  kPromptNotPrefix,   ///< conversational: render(prompt + answer) does not start with
                      ///< render(prompt, add_generation_prompt=true)
  kNoChatTemplate,    ///< conversational row without a chat template: never skipped (fatal)
  kJsonLimit,         ///< JSON nested deeper than kJsonMaxDepth or longer than kJsonRowMaxBytes
                      ///< (util/json_read.h): never skipped (fatal; not preference data)
  kCount
};
inline constexpr int kNumInvalidReasons = static_cast<int>(InvalidReason::kCount);
/// Human words ("malformed JSON") and a snake_case key ("malformed_json") for JSON stats.
const char* invalid_reason_text(InvalidReason r);
const char* invalid_reason_key(InvalidReason r);

struct RawTriple {
  std::string prompt, chosen, rejected;
  /// The texts were rendered by a chat template and carry their own special tokens:
  /// tokenization adds no bos/eos (data/preprocess.h).
  bool templated = false;
};

/// The two kinds of trl rows. A row is conversational (TRL's is_conversational) when
/// one of prompt/chosen/rejected is a list whose first element is an object; a file
/// holds one kind only.
enum class RowKind { kUnknown, kText, kConversational };
const char* row_kind_name(RowKind k);

/// Message roles a conversational row may use.
inline constexpr const char* kChatRoles[] = {"system", "user", "assistant", "tool"};

class ChatTemplate;

/// The kind of one line without the rest of the checks: kUnknown when the line is not a
/// JSON object (or not valid UTF-8); stack-exchange rows are always text.
RowKind preference_row_kind(std::string_view line, InputFormat format);

/// Parses one JSONL line (without its newline) into `out`. Returns kNone on success,
/// else the reason, with `detail` saying more (e.g. the JSON parser's message or the
/// field name). Unknown extra fields are ignored. `kind` (optional) gets the row's kind
/// as soon as the line is a JSON object (kUnknown before that).
/// Conversational rows (format trl only), explicit prompt {"prompt": [msgs], "chosen":
/// [msgs], "rejected": [msgs]} or implicit {"chosen": [conversation], "rejected":
/// [conversation]} (prompt = their longest common prefix of messages, as TRL's
/// extract_prompt), become prompt = render(prompt, add_generation_prompt=true) and
/// answer = render(prompt + answer) minus that prefix, with templated = true. Without
/// `chat` such a row returns kNoChatTemplate.
InvalidReason parse_preference_line(std::string_view line, InputFormat format, RawTriple* out, std::string* detail,
                                    const ChatTemplate* chat = nullptr, RowKind* kind = nullptr);

/// Strict UTF-8 (RFC 3629: no overlongs, no surrogates, nothing above U+10FFFF).
/// On failure *error_offset (if given) is the offset of the first bad byte.
bool is_valid_utf8(std::string_view s, size_t* error_offset = nullptr);

/// True when s is empty or only spaces, tabs, CR and LF.
bool is_blank(std::string_view s);

}  // namespace dpo
