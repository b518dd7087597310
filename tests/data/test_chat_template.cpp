// The Jinja engine against Python's jinja2: every golden of
// tests/data/fixtures/chat/goldens.json (real Llama 3/3.1/3.2, Qwen 2.5/3, Gemma 3 and
// DeepSeek V3 templates,
// plus a template of engine features) rendered byte for byte; then the errors: an
// unsupported construct names its template line, raise_exception carries its message.
#include <gtest/gtest.h>

#include <cstdlib>
#include <ctime>
#include <fstream>
#include <sstream>
#include <string>

#include "data/chat_template.h"
#include "tests/test_util.h"

namespace dpo {
namespace {

using json = nlohmann::ordered_json;

const std::string kDir = testutil::source_dir() + "/tests/data/fixtures/chat/";

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  EXPECT_TRUE(f.good()) << path;
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

class ChatGoldens : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // The goldens' strftime_now ran at a fixed time in UTC.
    setenv("TZ", "UTC", 1);
    tzset();
  }
};

// Renders every golden row of one template; returns the number compared.
int check_template(const std::string& name) {
  const json cases = json::parse(slurp(kDir + "cases.json"));
  const json goldens = json::parse(slurp(kDir + "goldens.json"));
  const json& rows = goldens["goldens"][name];
  EXPECT_FALSE(rows.empty()) << name;
  ChatTemplate t(slurp(kDir + name));
  const json& tokens = cases["special_tokens"][name];
  if (tokens.contains("bos_token") && tokens["bos_token"].is_string()) t.set_bos_token(tokens["bos_token"].get<std::string>());
  if (tokens.contains("eos_token") && tokens["eos_token"].is_string()) t.set_eos_token(tokens["eos_token"].get<std::string>());
  t.set_now(std::time_t(goldens["now"].get<int64_t>()));
  int n = 0;
  for (const auto& row : rows) {
    const json* c = nullptr;
    for (const auto& x : cases["cases"])
      if (x["name"] == row["case"]) c = &x;
    EXPECT_NE(c, nullptr) << row["case"];
    if (!c) continue;
    t.set_extra_variables(c->contains("extra") ? (*c)["extra"] : json::object());
    const bool agp = row["add_generation_prompt"].get<bool>();
    const std::string what = name + " case " + row["case"].get<std::string>() + " add_generation_prompt=" + (agp ? "true" : "false");
    if (row.contains("error")) {
      try {
        std::string out = t.render((*c)["messages"], agp);
        ADD_FAILURE() << what << ": rendered, jinja2 raised " << row["error"] << "; got\n" << out;
      } catch (const ChatTemplateError& e) {
        // raise_exception's message is jinja2's; other errors only need to happen.
        const std::string expected = row["error"].get<std::string>();
        if (std::string(e.what()).find("raise_exception") != std::string::npos) {
          EXPECT_NE(std::string(e.what()).find(expected), std::string::npos) << what << ": " << e.what();
        }
        EXPECT_GT(e.line(), 0) << what;
      }
    } else {
      std::string out;
      try {
        out = t.render((*c)["messages"], agp);
      } catch (const std::exception& e) {
        ADD_FAILURE() << what << ": " << e.what();
        continue;
      }
      EXPECT_EQ(out, row["output"].get<std::string>()) << what;
    }
    ++n;
  }
  return n;
}

TEST_F(ChatGoldens, Llama3Instruct) { EXPECT_EQ(check_template("llama3_instruct.jinja"), 12); }
TEST_F(ChatGoldens, Llama31Instruct) { EXPECT_EQ(check_template("llama3_1_instruct.jinja"), 24); }
TEST_F(ChatGoldens, Llama32Instruct) { EXPECT_EQ(check_template("llama3_2_instruct.jinja"), 16); }
TEST_F(ChatGoldens, Qwen25Instruct) { EXPECT_EQ(check_template("qwen2_5_instruct.jinja"), 24); }
TEST_F(ChatGoldens, Qwen3) { EXPECT_EQ(check_template("qwen3.jinja"), 28); }
TEST_F(ChatGoldens, Gemma3) { EXPECT_EQ(check_template("gemma3.jinja"), 12); }
TEST_F(ChatGoldens, DeepSeekV3) { EXPECT_EQ(check_template("deepseek_v3.jinja"), 12); }
TEST_F(ChatGoldens, EngineFeatures) { EXPECT_EQ(check_template("engine_features.jinja"), 16); }

// The error a template raises at load or render time.
std::string error_of(const std::string& source, const json& messages = json::array(), int* line = nullptr) {
  try {
    ChatTemplate t(source);
    t.render(messages, true);
  } catch (const ChatTemplateError& e) {
    if (line) *line = e.line();
    return e.what();
  }
  return "";
}

// A macro closes over the scope that defines it, and that scope holds the macro: the
// engine breaks the cycle after each render. Every scope a render makes (namespace()
// objects, macros, loop bodies) is freed when it returns or throws (found by
// LeakSanitizer on engine_features.jinja; docs/robustness.md).
TEST(ChatTemplateEngine, RenderFreesEveryScopeItMade) {
  const int64_t before = detail::chat_template_live_scopes();
  {
    ChatTemplate t(slurp(kDir + "engine_features.jinja"));
    t.set_now(0);
    const json msgs = json::array({{{"role", "user"}, {"content", "Hi"}}, {{"role", "assistant"}, {"content", "Hello."}}});
    for (int i = 0; i < 3; ++i) EXPECT_FALSE(t.render(msgs, true).empty());
    ChatTemplate m(
        "{% set ns = namespace(n=0) %}{% macro add(k) %}{% set ns.n = ns.n + k %}{{ ns.n }}{% endmacro %}"
        "{% for x in [1, 2] %}{% macro inner() %}{{ x }}{% endmacro %}{{ add(x) }}{{ inner() }}{% endfor %}");
    EXPECT_EQ(m.render(json::array(), false), "1132");
    ChatTemplate bad("{% macro f() %}{{ raise_exception('no') }}{% endmacro %}{{ f() }}");
    EXPECT_THROW(bad.render(json::array(), false), ChatTemplateError);
  }
  EXPECT_EQ(detail::chat_template_live_scopes(), before);
}

// A namespace that holds itself, directly or through lists, dicts and other namespaces,
// is a reference cycle: the render empties its namespaces when it ends, normally or by
// an error (LeakSanitizer reported {% set ns.x = ns %} in fuzz_chat_template).
TEST(ChatTemplateEngine, RenderFreesNamespaceCycles) {
  const int64_t before = detail::chat_template_live_dicts();
  {
    ChatTemplate t(
        "{% set ns = namespace(x=1) %}{% set ns.x = ns %}{% set b = namespace(l=[ns]) %}"
        "{% set ns.y = [b, {'k': b}] %}{{ ns.x.x.x.y | length }}");
    EXPECT_EQ(t.render(json::array(), false), "2");
    ChatTemplate bad("{% set ns = namespace() %}{% set ns.x = ns %}{{ raise_exception('no') }}");
    EXPECT_THROW(bad.render(json::array(), false), ChatTemplateError);
    // A namespace per loop step, freed with its step (the engine's list of the render's
    // namespaces is pruned as it grows), or kept by a cycle until the render ends.
    ChatTemplate loop("{% for i in range(5000) %}{% set n = namespace(i=i) %}{% endfor %}"
                      "{% for i in range(5000) %}{% set n = namespace(i=i) %}{% set n.self = n %}{% endfor %}ok");
    EXPECT_EQ(loop.render(json::array(), false), "ok");
  }
  EXPECT_EQ(detail::chat_template_live_dicts(), before);
}

TEST(ChatTemplateErrors, UnsupportedFilterNamesItsLine) {
  int line = 0;
  const std::string e = error_of("{{ 'a' }}\n\n{% if x %}\n  {{ x | frobnicate }}\n{% endif %}", json::array(), &line);
  EXPECT_EQ(e, "chat template line 4: unsupported filter 'frobnicate'");
  EXPECT_EQ(line, 4);
}

TEST(ChatTemplateErrors, UnsupportedTagTestAndMethod) {
  EXPECT_EQ(error_of("a\n{% include 'x.jinja' %}"), "chat template line 2: unsupported tag 'include'");
  EXPECT_EQ(error_of("{{ 1 is prime }}"), "chat template line 1: unsupported test 'prime'");
  EXPECT_EQ(error_of("\n{% for m in messages recursive %}{% endfor %}"), "chat template line 2: unsupported: recursive for loops");
  EXPECT_EQ(error_of("{{ 'x'.format(1) }}"), "chat template line 1: unsupported str method 'format'");
  EXPECT_EQ(error_of("{{ '%s' % 1 }}"), "chat template line 1: printf-style '%' string formatting is not supported by this engine");
}

TEST(ChatTemplateErrors, SyntaxErrors) {
  EXPECT_EQ(error_of("{% if x %}\nno end"), "chat template line 2: unexpected end of template: a block is not closed (expected 'elif' or 'else' or 'endif')");
  EXPECT_EQ(error_of("{{ 'abc }}"), "chat template line 1: unterminated string literal");
  EXPECT_EQ(error_of("\n\n{% endfor %}"), "chat template line 3: unexpected 'endfor' (no open block expects it here)");
  EXPECT_EQ(error_of("{{ (1 }}"), "chat template line 1: unexpected '}', expected ')'");
  EXPECT_EQ(error_of("{{ 1 "), "chat template line 1: unexpected end of template, expected '}}'");
  EXPECT_EQ(error_of("{% break %}"), "chat template line 1: 'break' outside of a for loop");
}

TEST(ChatTemplateErrors, RaiseExceptionCarriesTheMessage) {
  const std::string src =
      "{% for m in messages %}\n"
      "{% if m.role not in ['user', 'assistant'] %}\n"
      "{{ raise_exception('Only user and assistant roles are supported!') }}\n"
      "{% endif %}\n"
      "{% endfor %}";
  int line = 0;
  const std::string e = error_of(src, json::parse(R"([{"role":"user","content":"a"},{"role":"robot","content":"b"}])"), &line);
  EXPECT_EQ(e, "chat template line 3: raise_exception: Only user and assistant roles are supported!");
  EXPECT_EQ(line, 3);
}

TEST(ChatTemplateErrors, UndefinedSemantics) {
  // Printing, testing and iterating an undefined value are fine ...
  ChatTemplate t("[{{ nothing }}][{{ nothing is defined }}][{% for x in nothing %}x{% endfor %}][{{ nothing | length }}]");
  EXPECT_EQ(t.render(json::array(), false), "[][False][][0]");
  // ... attribute access and arithmetic are not (jinja2's default Undefined).
  EXPECT_EQ(error_of("{{ nothing.attr }}"), "chat template line 1: 'nothing' is undefined");
  EXPECT_EQ(error_of("\n{{ 1 + nothing }}"), "chat template line 2: 'nothing' is undefined");
  EXPECT_EQ(error_of("{{ messages[0].content }}"), "chat template line 1: list object has no element 0");
  // A missing key of a defined object is undefined, its attribute an error.
  EXPECT_EQ(error_of("{{ messages[0].tool_calls.x }}", json::parse(R"([{"role":"user"}])")),
            "chat template line 1: 'dict object' has no attribute 'tool_calls'");
}

TEST(ChatTemplateErrors, TypeErrors) {
  EXPECT_EQ(error_of("{{ 'a' + 1 }}"), "chat template line 1: can only concatenate str (not \"int\") to str");
  EXPECT_EQ(error_of("{{ 1 // 0 }}"), "chat template line 1: integer division or modulo by zero");
  EXPECT_EQ(error_of("{% set x = 1 %}{% set x.y = 2 %}"), "chat template line 1: cannot assign attribute on non-namespace object 'x'");
  EXPECT_EQ(error_of("{{ messages.append(1) }}"), "chat template line 1: list.append() is not allowed (the template may not change its data)");
}

// A hostile template fails cleanly instead of wrapping integers, exhausting memory or
// time, or overflowing the stack.
TEST(ChatTemplateErrors, HostileTemplatesAreBounded) {
  EXPECT_EQ(error_of("{{ 9223372036854775807 + 1 }}"), "chat template line 1: integer overflow (this engine's integers are 64-bit)");
  EXPECT_EQ(error_of("{{ 3 ** 99 }}"), "chat template line 1: integer overflow (this engine's integers are 64-bit)");
  EXPECT_EQ(error_of("{{ 2 ** 62 }}x"), "");  // in range: fine
  EXPECT_EQ(error_of("{{ 'ab' * 1000000000000 }}"), "chat template line 1: repetition too large");
  EXPECT_EQ(error_of("{% for a in range(10000) %}{% for b in range(10000) %}{% endfor %}{% endfor %}"),
            "chat template line 1: the template runs too long (more than 10 million loop iterations)");
  EXPECT_EQ(error_of("{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}"),
            "chat template line 1: the template nests too deeply");
  std::string nested_ifs;
  for (int i = 0; i < 2000; ++i) nested_ifs += "{% if true %}";
  EXPECT_EQ(error_of(nested_ifs), "chat template line 1: the template nests too deeply");
  json deep = json::array();
  for (int i = 0; i < 1000; ++i) deep = json::array({deep});
  EXPECT_EQ(error_of("{{ messages }}", deep), "chat template: the template's data nests more than 256 levels deep");
  EXPECT_EQ(error_of("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"), "chat template line 1: macro recursion too deep");
}

// Nesting 10^5 levels deep in every form the grammar has (issue 28): recursion in the
// parser (parentheses, lists, dicts, not, unary minus, if-else chains, blocks) and trees
// built by loops (a + b + ..., a.b.c..., x|f|g..., calls and subscripts), which
// evaluation and destruction walk recursively, all stop at the parser's bound.
TEST(ChatTemplateErrors, DeepNestingOfEveryKindIsBounded) {
  const int n = 100000;
  auto repeat = [](const std::string& s, int k) {
    std::string out;
    out.reserve(s.size() * k);
    for (int i = 0; i < k; ++i) out += s;
    return out;
  };
  auto joined = [&](const std::string& item, const std::string& sep) { return item + repeat(sep + item, n - 1); };
  const std::string deep = "chat template line 1: the template nests too deeply";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"parentheses", "{{ " + repeat("(", n) + "1" + repeat(")", n) + " }}"},
      {"lists", "{{ " + repeat("[", n) + repeat("]", n) + " }}"},
      {"dicts", "{{ " + repeat("{'a': ", n) + "1" + repeat("}", n) + " }}"},
      {"not", "{{ " + repeat("not ", n) + "true }}"},
      {"unary minus", "{{ " + repeat("-", n) + "1 }}"},
      {"if-else chain", "{{ " + repeat("1 if x else ", n) + "1 }}"},
      {"if chain", "{{ 1" + repeat(" if x", n) + " }}"},
      {"sum", "{{ " + joined("1", " + ") + " }}"},
      {"concatenation", "{{ " + joined("'a'", " ~ ") + " }}"},
      {"and", "{{ " + joined("x", " and ") + " }}"},
      {"or", "{{ " + joined("x", " or ") + " }}"},
      {"power", "{{ " + joined("1", " ** ") + " }}"},
      {"comparison", "{{ " + joined("1", " < ") + " }}"},
      {"attributes", "{{ x" + repeat(".a", n) + " }}"},
      {"subscripts", "{{ x" + repeat("[0]", n) + " }}"},
      {"slices", "{{ x" + repeat("[1:]", n) + " }}"},
      {"calls", "{{ x" + repeat("()", n) + " }}"},
      {"filters", "{{ x" + repeat(" | first", n) + " }}"},
      {"filter arguments", "{{ " + repeat("x | default(", n) + "1" + repeat(")", n) + " }}"},
      {"if blocks", repeat("{% if true %}", n) + "x" + repeat("{% endif %}", n)},
      {"for blocks", repeat("{% for a in [1] %}", n) + "x" + repeat("{% endfor %}", n)},
      {"set blocks", repeat("{% set x %}", n) + repeat("{% endset %}", n)},
  };
  for (const auto& [name, source] : cases) {
    const std::string e = error_of(source);
    if (name == "comparison") {
      // A chain of comparisons is one node (a < b < c is (a < b) and (b < c)).
      EXPECT_EQ(e, "") << name;
    } else {
      EXPECT_EQ(e, deep) << name;
    }
  }
  // Trees up to the bound still work: a sum of 300 terms, 300 parentheses.
  EXPECT_EQ(ChatTemplate("{{ 1" + repeat(" + 1", 299) + " }}").render(json::array(), false), "300");
  EXPECT_EQ(ChatTemplate("{{ " + repeat("(", 300) + "7" + repeat(")", 300) + " }}").render(json::array(), false), "7");
}

// Nesting built while the template runs (issue 28): a macro calling itself from inside
// deep blocks, a list or dict wrapped once per loop step, and a chain of namespaces
// linked head first (no height bounds it; it is freed without recursion).
TEST(ChatTemplateErrors, RunTimeNestingIsBounded) {
  std::string ifs, endifs;
  for (int i = 0; i < 300; ++i) ifs += "{% if true %}", endifs += "{% endif %}";
  EXPECT_EQ(error_of("{% macro f(n) %}" + ifs + "{{ f(n + 1) }}" + endifs + "{% endmacro %}{{ f(0) }}"),
            "chat template line 1: the template nests too deeply when it runs (macro calls inside deep blocks or "
            "expressions)");
  EXPECT_EQ(error_of("{% set ns = namespace(x=[]) %}{% for i in range(99999) %}{% set ns.x = [ns.x] %}{% endfor %}"
                     "{{ ns.x }}"),
            "chat template: a value the template builds nests more than 512 levels deep");
  EXPECT_EQ(error_of("{% set ns = namespace(x={}) %}{% for i in range(99999) %}{% set ns.x = {'a': ns.x} %}{% endfor %}"
                     "{{ ns.x | tojson }}"),
            "chat template: a value the template builds nests more than 512 levels deep");
  // 400,000 namespaces, each held only by the one before it (freeing them recursively
  // overflowed the stack).
  EXPECT_EQ(ChatTemplate("{% set head = namespace() %}{% set cur = namespace(n=head) %}{% for k in range(4) %}"
                         "{% for i in range(100000) %}{% set nxt = namespace() %}{% set t = cur.n %}{% set t.x = nxt %}"
                         "{% set cur.n = nxt %}{% endfor %}{% endfor %}{{ head.x.x.x is defined }}")
                .render(json::array(), false),
            "True");
  // The messages may nest 256 levels, and the template may wrap them further.
  json deep = json::array();
  for (int i = 0; i < 255; ++i) deep = json::array({deep});
  EXPECT_EQ(error_of("{{ [[messages]] | length }}", deep), "");
}

TEST(ChatTemplate, BosEosAndExtrasAreVariables) {
  ChatTemplate t("{{ bos_token }}|{{ eos_token }}|{{ bos_token is defined }}|{{ enable_thinking }}|{{ add_generation_prompt }}");
  EXPECT_EQ(t.render(json::array(), true), "||False||True");
  t.set_bos_token("<s>");
  t.set_eos_token("</s>");
  t.set_extra_variables(json::parse(R"({"enable_thinking": false})"));
  EXPECT_EQ(t.render(json::array(), false), "<s>|</s>|True|False|False");
}

TEST(ChatTemplate, TrailingNewlineAndCrlfAsJinja2) {
  // keep_trailing_newline=False drops one final newline; CRLF in the source becomes LF.
  ChatTemplate t("a\r\nb\n\n");
  EXPECT_EQ(t.render(json::array(), false), "a\nb\n");
}

}  // namespace
}  // namespace dpo
