// Fuzzes the chat-template engine (data/chat_template.h): the lexer, parser and
// renderer of the Jinja subset. Input: template source, then optionally '\0' and a
// JSON array of messages (default: a system/user/assistant conversation).
// Checked: the engine returns text or throws ChatTemplateError whose line is within the
// template (0 = no line); rendering twice gives the same text (the template is const).
#include <string>

#include <nlohmann/json.hpp>

#include "data/chat_template.h"
#include "tests/fuzz/fuzz_common.h"
#include "util/json_read.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string in(reinterpret_cast<const char*>(data), size);
  const size_t z = in.find('\0');
  const std::string source = in.substr(0, z);
  nlohmann::ordered_json messages = nlohmann::ordered_json::array(
      {{{"role", "system"}, {"content", "Be brief."}},
       {{"role", "user"}, {"content", "Hi <b>there</b>"}},
       {{"role", "assistant"}, {"content", "Hello."}}});
  if (z != std::string::npos) {
    messages = dpo::json_parse_or_discarded<nlohmann::ordered_json>(in.substr(z + 1));
    // The messages come from our own JSONL reader (util/json_read.h: at most 512 levels
    // deep), which only passes arrays.
    if (messages.is_discarded() || !messages.is_array()) return 0;
  }
  // Lines as jinja2 counts them: "\r\n", "\r" and "\n" each end one (newlines are
  // normalized before lexing).
  int lines = 1;
  for (size_t k = 0; k < source.size(); ++k) {
    if (source[k] == '\r' && k + 1 < source.size() && source[k + 1] == '\n') ++k;
    if (source[k] == '\r' || source[k] == '\n') ++lines;
  }
  try {
    dpo::ChatTemplate t(source);
    t.set_bos_token(std::string("<s>"));
    t.set_eos_token(std::string("</s>"));
    t.set_now(0);
    for (bool gen : {false, true}) {
      const std::string a = t.render(messages, gen);
      const std::string b = t.render(messages, gen);
      if (a != b) fuzz::fail("two renders of one template differ");
    }
  } catch (const dpo::ChatTemplateError& e) {
    if (e.line() < 0 || e.line() > lines)
      fuzz::fail("error names line " + std::to_string(e.line()) + " of a " + std::to_string(lines) + "-line template");
    if (e.reason().empty()) fuzz::fail("error without a reason");
  } catch (const std::exception& e) {
    fuzz::fail(std::string("escaped ") + fuzz::current_exception_type() + ": " + e.what());
  } catch (...) {
    fuzz::fail("escaped a non-std exception " + fuzz::current_exception_type());
  }
  return 0;
}
