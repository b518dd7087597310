// Fuzzes the JSONL preference row reader (data/sources.h, parse_preference_line) in
// both formats (trl: prompt/chosen/rejected, text or conversational rows rendered
// through a chat template; stack-exchange: question/response_j/response_k) and
// preference_row_kind. The input is one line.
// Checked: it never throws (bad rows are reasons, counted with --skip_invalid); an
// accepted row has valid UTF-8, non-blank prompt and answers, and distinct answers;
// a rejected row has a non-empty detail.
#include <string>
#include <string_view>

#include "data/chat_template.h"
#include "data/sources.h"
#include "tests/fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // A small template in the style of the real ones (role markers, generation prompt).
  static const dpo::ChatTemplate chat(
      "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
      "{% if add_generation_prompt %}<|assistant|>\n{% endif %}");
  const std::string_view line(reinterpret_cast<const char*>(data), size);
  for (dpo::InputFormat f : {dpo::InputFormat::kTrl, dpo::InputFormat::kStackExchange}) {
    dpo::RawTriple t;
    std::string detail;
    dpo::InvalidReason r = dpo::InvalidReason::kNone;
    try {
      (void)dpo::preference_row_kind(line, f);
      dpo::RowKind kind = dpo::RowKind::kUnknown;
      r = dpo::parse_preference_line(line, f, &t, &detail, &chat, &kind);
    } catch (...) {
      fuzz::fail(std::string("parse_preference_line threw ") + fuzz::current_exception_type());
    }
    if (r == dpo::InvalidReason::kNone) {
      for (const std::string* s : {&t.prompt, &t.chosen, &t.rejected}) {
        if (!dpo::is_valid_utf8(*s)) fuzz::fail("accepted a field that is not UTF-8");
        if (dpo::is_blank(*s)) fuzz::fail("accepted a blank field");
      }
      if (t.chosen == t.rejected) fuzz::fail("accepted identical answers");
      if (f == dpo::InputFormat::kStackExchange && t.prompt.rfind("Question: ", 0) != 0)
        fuzz::fail("stack-exchange prompt does not start with \"Question: \"");
    } else {
      if (static_cast<int>(r) <= 0 || static_cast<int>(r) >= dpo::kNumInvalidReasons) fuzz::fail("reason out of range");
      if (invalid_reason_text(r) == nullptr || invalid_reason_key(r) == nullptr) fuzz::fail("reason without text");
      if (detail.empty()) fuzz::fail(std::string("rejected (") + invalid_reason_key(r) + ") without a detail");
    }
  }
  return 0;
}
