// Conversational preference rows (TRL's conversational format) through the preprocess
// pipeline: token ids must equal encode() of the pieces Python's jinja2 rendered
// (tests/data/fixtures/chat/goldens.json), with no bos/eos added; the implicit prompt
// (longest common prefix) gives the same triples as the explicit one; truncation keeps
// a prompt's first token only when it is bos; bad rows (role, content, prefix, template
// errors, a file mixing row kinds, no template) fail with FILE:LINE and the field, or
// are skipped and counted; dpo_preprocess finds the template in a model directory.
#include <gtest/gtest.h>
#include <sentencepiece_processor.h>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "data/chat_template.h"
#include "data/preference_h5.h"
#include "data/preprocess.h"
#include "data/sources.h"
#include "data/tokenizer.h"
#include "tests/data/byte_level_fixture.h"
#include "tests/data/sentencepiece_suite.h"
#include "tests/test_util.h"

namespace dpo {
namespace {

using testutil::TempDir;
using Ids = std::vector<int32_t>;
using json = nlohmann::ordered_json;

const std::string kFixtures = testutil::source_dir() + "/tests/data/fixtures/chat/";
const std::string kTool = testutil::tool_path("dpo_preprocess");

std::string golden(const std::string& tmpl, const std::string& case_name, bool agp) {
  static const json g = json::parse(testutil::read_file(kFixtures + "goldens.json"));
  for (const auto& row : g["goldens"][tmpl])
    if (row["case"] == case_name && row["add_generation_prompt"] == agp) return row["output"].get<std::string>();
  ADD_FAILURE() << "no golden " << tmpl << " " << case_name;
  return "";
}

json case_messages(const std::string& case_name) {
  static const json c = json::parse(testutil::read_file(kFixtures + "cases.json"));
  for (const auto& x : c["cases"])
    if (x["name"] == case_name) return x["messages"];
  ADD_FAILURE() << "no case " << case_name;
  return json::array();
}

json msg(const char* role, const char* content) { return json{{"role", role}, {"content", content}}; }

class ChatPreprocess : public testutil::SentencepieceSuite<400> {
 protected:

  static std::unique_ptr<ChatTemplate> load(const std::string& name) {
    auto t = std::make_unique<ChatTemplate>(testutil::read_file(kFixtures + name));
    if (name.rfind("llama", 0) == 0) {
      t->set_bos_token("<|begin_of_text|>");
      t->set_eos_token("<|eot_id|>");
    } else {
      t->set_eos_token("<|im_end|>");
    }
    return t;
  }

  PreprocessStats run(const PreprocessOptions& o, const std::string& out, std::vector<std::string>* warnings = nullptr) {
    Tokenizer tok(model_);
    auto sizes = input_sizes(o.inputs);
    int64_t total = 0;
    for (auto s : sizes) total += s;
    PreprocessStats st;
    PreferenceWriter w(out, preprocess_attrs(tok, o));
    preprocess_range(tok, o, sizes, 0, total, &w, &st, {}, [&](const std::string& m) {
      if (warnings) warnings->push_back(m);
    });
    w.close();
    return st;
  }
  std::string write(const std::string& name, const std::string& content) {
    testutil::write_file(tmp_.file(name), content);
    return tmp_.file(name);
  }
  // The message of the InvalidLineError a file raises (empty when none).
  std::string error_of(const std::string& jsonl, const ChatTemplate* chat) {
    PreprocessOptions o;
    o.inputs = {write("bad.jsonl", jsonl)};
    o.chat_template = chat;
    try {
      run(o, tmp_.file("bad.h5"));
    } catch (const InvalidLineError& e) {
      return e.what();
    }
    return "";
  }

};

// Explicit and implicit rows for three real templates: ids are encode() of jinja2's
// pieces, nothing added, and the two row forms agree.
TEST_F(ChatPreprocess, IdsAreEncodedJinja2Pieces) {
  for (const std::string name : {"llama3_1_instruct.jinja", "qwen2_5_instruct.jinja", "qwen3.jinja"}) {
    SCOPED_TRACE(name);
    auto chat = load(name);
    // Single turn, explicit prompt.
    json explicit_row = {{"prompt", json::array({msg("user", "Name a colour.")})},
                         {"chosen", json::array({msg("assistant", "Blue, the colour of the sky.")})},
                         {"rejected", json::array({msg("assistant", "Red.")})}};
    // Multi-turn, implicit prompt: whole conversations sharing all but the last message.
    json mt_chosen = case_messages("pp_mt_chosen"), mt_rejected = case_messages("pp_mt_rejected");
    json implicit_row = {{"chosen", mt_chosen}, {"rejected", mt_rejected}};
    // The same multi-turn row, explicit.
    json mt_prompt = case_messages("multi_turn");
    json explicit_mt = {{"prompt", mt_prompt},
                        {"chosen", json::array({mt_chosen.back()})},
                        {"rejected", json::array({mt_rejected.back()})}};
    PreprocessOptions o;
    o.inputs = {write("conv.jsonl", explicit_row.dump() + "\n" + implicit_row.dump() + "\n"),
                write("conv2.jsonl", explicit_mt.dump() + "\n")};
    o.chat_template = chat.get();
    PreprocessStats st = run(o, tmp_.file("conv.h5"));
    ASSERT_EQ(st.written, 3);
    PreferenceReader r(tmp_.file("conv.h5"));
    ASSERT_EQ(r.size(), 3);

    const std::string p1 = golden(name, "pp_prompt", true);
    const std::string c1 = golden(name, "prompt_chosen", false), j1 = golden(name, "pp_rejected", false);
    ASSERT_EQ(c1.compare(0, p1.size(), p1), 0);
    ASSERT_EQ(j1.compare(0, p1.size(), p1), 0);
    auto e = r.get(0);
    EXPECT_EQ(e.prompt, enc(p1));
    EXPECT_EQ(e.chosen, enc(c1.substr(p1.size())));
    EXPECT_EQ(e.rejected, enc(j1.substr(p1.size())));
    EXPECT_NE(e.prompt.front(), 1);  // no bos id added in front of the template's text
    EXPECT_NE(e.chosen.back(), 2);   // no eos id appended

    const std::string p2 = golden(name, "multi_turn", true);
    const std::string c2 = golden(name, "pp_mt_chosen", false), j2 = golden(name, "pp_mt_rejected", false);
    auto f = r.get(1);
    EXPECT_EQ(f.prompt, enc(p2));
    EXPECT_EQ(f.chosen, enc(c2.substr(p2.size())));
    EXPECT_EQ(f.rejected, enc(j2.substr(p2.size())));
    auto g = r.get(2);
    EXPECT_EQ(g.prompt, f.prompt);
    EXPECT_EQ(g.chosen, f.chosen);
    EXPECT_EQ(g.rejected, f.rejected);
  }
}

// keep_end truncation of a templated prompt: the first token stays only if it is bos.
TEST_F(ChatPreprocess, TruncationKeepsFirstTokenOnlyIfBos) {
  Tokenizer tok(model_);
  RawTriple raw;
  raw.templated = true;
  raw.prompt = "the quick brown fox jumps over the lazy dog and the answer is here";
  raw.chosen = "a good answer";
  raw.rejected = "a bad one";
  const Ids full = enc(raw.prompt);
  ASSERT_GT(full.size(), 6u);
  TokenizedTriple t;
  int64_t encoded = 0;
  ASSERT_EQ(tokenize_triple(tok, raw, 64, 5, &t, &encoded), InvalidReason::kNone);
  EXPECT_EQ(t.prompt, Ids(full.end() - 5, full.end()));  // no bos: the last 5 tokens
  EXPECT_TRUE(t.prompt_truncated);
  EXPECT_EQ(t.chosen, enc(raw.chosen));  // no eos appended
  EXPECT_EQ(encoded, int64_t(full.size() + enc(raw.chosen).size() + enc(raw.rejected).size()));
  // A prompt whose first id is bos keeps it.
  TokenizedTriple u;
  u.prompt = full;
  u.prompt.insert(u.prompt.begin(), tok.bos_id());
  ASSERT_EQ(truncate_triple(&u, 64, 5, true), InvalidReason::kNone);
  Ids want = {tok.bos_id()};
  want.insert(want.end(), full.end() - 4, full.end());
  EXPECT_EQ(u.prompt, want);
}

TEST_F(ChatPreprocess, BadRowsNameFileLineAndField) {
  auto chat = load("qwen3.jinja");
  const std::string ok = json{{"prompt", json::array({msg("user", "hi")})},
                              {"chosen", json::array({msg("assistant", "a")})},
                              {"rejected", json::array({msg("assistant", "b")})}}
                             .dump();
  auto row = [](json prompt, json chosen, json rejected) {
    return json{{"prompt", prompt}, {"chosen", chosen}, {"rejected", rejected}}.dump();
  };
  const json u = json::array({msg("user", "hi")});
  const json a = json::array({msg("assistant", "a")});
  const std::string path = tmp_.file("bad.jsonl");
  EXPECT_EQ(error_of(ok + "\n" + row(json::array({msg("human", "hi")}), a, a) + "\n", chat.get()),
            path + ":2: bad chat message (prompt[0].role is 'human'; use system, user, assistant or tool); fix the "
                   "line or pass --skip_invalid to skip such lines");
  EXPECT_EQ(error_of(row(u, json::array({json{{"role", "assistant"}}}), a) + "\n", chat.get()),
            path + ":1: bad chat message (chosen[0].content is missing); fix the line or pass --skip_invalid to skip such lines");
  EXPECT_EQ(error_of(row(u, json::array({msg("user", "x")}), a) + "\n", chat.get()),
            path + ":1: bad chat message (chosen[0].role is 'user'; an answer starts with an assistant message); "
                   "fix the line or pass --skip_invalid to skip such lines");
  EXPECT_NE(error_of(row(u, a, json::array({json{{"from", "gpt"}, {"value", "x"}}})) + "\n", chat.get())
                .find(":1: bad chat message (rejected[0] has no 'role' (ShareGPT's from/value? convert to role/content))"),
            std::string::npos);
  EXPECT_NE(error_of(row(u, a, a) + "\n", chat.get()).find(":1: chosen identical to rejected"), std::string::npos);
  // A file mixing the two kinds of rows: an error at the first row of the other kind,
  // even with --skip_invalid.
  EXPECT_EQ(error_of(ok + "\n\n" + R"({"prompt": "p", "chosen": "c", "rejected": "r"})" + "\n", chat.get()),
            path + ":3: a text row in a file whose first row (line 1) is a conversational row; a file holds one "
                   "kind of rows: split it into two files");
  // No chat template.
  EXPECT_NE(error_of(ok + "\n", nullptr).find(path + ":1: a conversational row needs the model's chat template: give "
                                              "--chat_template FILE"),
            std::string::npos);
}

TEST_F(ChatPreprocess, TemplateFailuresAndNonPrefixRenderingsAreSkippedWithSkipInvalid) {
  // A template whose prompt rendering is not a prefix of prompt + answer, and one that
  // raises on a role.
  ChatTemplate not_prefix("{% for m in messages %}{{ m.content }};{% endfor %}{% if add_generation_prompt %}GEN{% endif %}");
  ChatTemplate raising(
      "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}"
      "{% endif %}{{ m.content }}|{% endfor %}");
  const std::string row = json{{"prompt", json::array({msg("user", "q")})},
                               {"chosen", json::array({msg("assistant", "a")})},
                               {"rejected", json::array({msg("assistant", "b")})}}
                              .dump();
  const std::string sys_row = json{{"prompt", json::array({msg("system", "s"), msg("user", "q")})},
                                   {"chosen", json::array({msg("assistant", "a")})},
                                   {"rejected", json::array({msg("assistant", "b")})}}
                                  .dump();
  const std::string path = tmp_.file("bad.jsonl");
  EXPECT_EQ(error_of(row + "\n", &not_prefix),
            path + ":1: prompt rendering not a prefix (render(prompt + chosen) does not start with render(prompt, "
                   "add_generation_prompt=true): they differ at byte 2 (\"a;\" vs \"GEN\")); fix the line or pass "
                   "--skip_invalid to skip such lines");
  EXPECT_EQ(error_of(sys_row + "\n", &raising),
            path + ":1: chat template error (rendering the prompt: chat template line 1: raise_exception: System role "
                   "not supported); fix the line or pass --skip_invalid to skip such lines");
  // With --skip_invalid: counted per reason, the good row written.
  PreprocessOptions o;
  o.inputs = {write("mixed.jsonl", sys_row + "\n" + row + "\n")};
  o.chat_template = &raising;
  o.skip_invalid = true;
  std::vector<std::string> warnings;
  PreprocessStats st = run(o, tmp_.file("skip.h5"), &warnings);
  EXPECT_EQ(st.written, 1);
  EXPECT_EQ(st.skipped[int(InvalidReason::kTemplateError)], 1);
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_NE(warnings[0].find("mixed.jsonl:1: skipped: chat template error"), std::string::npos) << warnings[0];
  PreferenceReader r(tmp_.file("skip.h5"));
  ASSERT_EQ(r.size(), 1);
  EXPECT_EQ(r.get(0).prompt, enc("q|"));
  EXPECT_EQ(r.get(0).chosen, enc("a|"));
}

TEST(ChatTemplateSourceTest, LookupOrder) {
  TempDir d("dpo_chat_src");
  EXPECT_FALSE(find_chat_template("", d.path()).has_value());
  EXPECT_FALSE(find_chat_template("", "").has_value());
  testutil::write_file(d.file("tokenizer_config.json"), R"({"chat_template": [{"name": "tool_use", "template": "T"},
                                                             {"name": "default", "template": "D"}]})");
  auto s = find_chat_template("", d.path());
  ASSERT_TRUE(s.has_value());
  EXPECT_EQ(s->text, "D");
  testutil::write_file(d.file("tokenizer_config.json"), R"({"chat_template": "from config"})");
  EXPECT_EQ(find_chat_template("", d.path())->text, "from config");
  testutil::write_file(d.file("chat_template.jinja"), "from jinja file");
  EXPECT_EQ(find_chat_template("", d.path())->text, "from jinja file");
  testutil::write_file(d.file("other.jinja"), "explicit");
  EXPECT_EQ(find_chat_template(d.file("other.jinja"), d.path())->text, "explicit");
  EXPECT_THROW(find_chat_template(d.file("missing.jinja"), d.path()), std::runtime_error);
  std::remove(d.file("chat_template.jinja").c_str());
  testutil::write_file(d.file("tokenizer_config.json"), R"({"chat_template": [{"name": "tool_use", "template": "T"}]})");
  try {
    find_chat_template("", d.path());
    ADD_FAILURE() << "no default template accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("none named \"default\""), std::string::npos) << e.what();
  }
  testutil::write_file(d.file("tokenizer_config.json"), R"({"chat_template": 3})");
  EXPECT_THROW(find_chat_template("", d.path()), std::runtime_error);
}

// dpo_preprocess end to end: template and special-token strings from the model
// directory's tokenizer_config.json, conversational JSONL in, ids = encode(pieces).
TEST_F(ChatPreprocess, ToolReadsTheModelDirectory) {
  TempDir model("dpo_chat_model");
  ASSERT_EQ(testutil::run_command("cp " + model_ + " " + model.file("tokenizer.model")), 0);
  // The special tokens must be the tokenizer's own (the test model's <s> and </s>): the
  // Llama 3.1 template writes bos_token, which the tokenizer then turns into bos.
  json cfg = {{"bos_token", {{"content", "<s>"}, {"lstrip", false}}},
              {"eos_token", "</s>"},
              {"chat_template", testutil::read_file(kFixtures + "llama3_1_instruct.jinja")}};
  testutil::write_file(model.file("tokenizer_config.json"), cfg.dump());
  const std::string in = write("in.jsonl", json{{"chosen", case_messages("pp_mt_chosen")},
                                                {"rejected", case_messages("pp_mt_rejected")}}
                                                   .dump() +
                                               "\n");
  const std::string out = tmp_.file("tool.h5");
  std::string o;
  ASSERT_EQ(testutil::run_command(kTool + " --model_name_or_path " + model.path() + " --input " + in + " --output " +
                                      out + " --progress off",
                                  &o),
            0)
      << o;
  PreferenceReader r(out);
  ASSERT_EQ(r.size(), 1);
  // jinja2 rendered the goldens with bos_token "<|begin_of_text|>"; here it is "<s>".
  auto with_s = [](std::string t) {
    const std::string b = "<|begin_of_text|>";
    for (size_t i; (i = t.find(b)) != std::string::npos;) t.replace(i, b.size(), "<s>");
    return t;
  };
  const std::string p = with_s(golden("llama3_1_instruct.jinja", "multi_turn", true));
  const std::string c = with_s(golden("llama3_1_instruct.jinja", "pp_mt_chosen", false));
  ASSERT_EQ(p.rfind("<s>", 0), 0u);
  auto e = r.get(0);
  Ids want = {1};  // "<s>" written by the template is the bos id, the rest plain text
  for (int id : enc(p.substr(3))) want.push_back(id);
  EXPECT_EQ(e.prompt, want);
  EXPECT_EQ(e.chosen, enc(c.substr(p.size())));
  // --chat_template wins over the directory's; a broken template names its file and line.
  testutil::write_file(tmp_.file("broken.jinja"), "{{ messages }}\n{{ x | nosuchfilter }}");
  EXPECT_EQ(testutil::run_command(kTool + " --model_name_or_path " + model.path() + " --chat_template " +
                                      tmp_.file("broken.jinja") + " --input " + in + " --output " + out,
                                  &o),
            1);
  EXPECT_NE(o.find(tmp_.file("broken.jinja") + ": chat template line 2: unsupported filter 'nosuchfilter'"),
            std::string::npos)
      << o;
  // --chat_template_kwargs must be a JSON object.
  EXPECT_EQ(testutil::run_command(kTool + " --model_name_or_path " + model.path() + " --chat_template_kwargs '[1]'" +
                                      " --input " + in + " --output " + out,
                                  &o),
            2);
  EXPECT_NE(o.find("--chat_template_kwargs must be a JSON object"), std::string::npos) << o;
}

// A tiny byte-level tokenizer.json: ids 0..255 are the bytes (GPT-2's byte symbols, no
// merges), then the given special tokens, matched in the text as Hugging Face does.
json byte_level_tokenizer_json(const std::vector<std::string>& specials) {
  json vocab = json::object();
  const auto sym = testutil::gpt2_byte_symbols();
  for (int b = 0; b < 256; ++b) vocab[sym[b]] = b;
  json added = json::array();
  for (size_t k = 0; k < specials.size(); ++k) {
    vocab[specials[k]] = 256 + int(k);
    added.push_back(json{{"id", 256 + int(k)}, {"content", specials[k]}, {"single_word", false}, {"lstrip", false},
                         {"rstrip", false}, {"normalized", false}, {"special", true}});
  }
  return testutil::byte_level_bpe_json(vocab, json::array(), added);
}

// The independent expectation for that tokenizer: special strings -> their ids, every
// other byte -> its value.
Ids encode_bytes_and_specials(const std::string& text, const std::vector<std::string>& specials) {
  Ids ids;
  for (size_t i = 0; i < text.size();) {
    bool hit = false;
    for (size_t k = 0; k < specials.size() && !hit; ++k)
      if (text.compare(i, specials[k].size(), specials[k]) == 0) {
        ids.push_back(256 + int32_t(k));
        i += specials[k].size();
        hit = true;
      }
    if (!hit) ids.push_back(static_cast<unsigned char>(text[i++]));
  }
  return ids;
}

// With a tokenizer.json, the template's special-token strings become their ids: the
// prompt starts with exactly one bos (Llama 3.1's <|begin_of_text|> written by the
// template), each answer ends with exactly one <|eot_id|>, and a keep_end cut keeps
// that bos; Qwen 2.5 (no bos) keeps only the prompt's end.
TEST_F(ChatPreprocess, TokenizerJsonSpecialTokensAndBos) {
  struct Model {
    const char* tmpl;
    std::vector<std::string> specials;
    json config;
    int32_t bos, eot;
  };
  const Model models[] = {
      {"llama3_1_instruct.jinja",
       {"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"},
       json{{"bos_token", "<|begin_of_text|>"}, {"eos_token", "<|eot_id|>"}},
       256, 259},
      {"qwen2_5_instruct.jinja", {"<|im_start|>", "<|im_end|>"}, json{{"bos_token", nullptr}, {"eos_token", "<|im_end|>"}},
       -1, 257}};
  const std::string in = write("row.jsonl", json{{"prompt", json::array({msg("user", "Name a colour.")})},
                                                 {"chosen", json::array({msg("assistant", "Blue, the colour of the sky.")})},
                                                 {"rejected", json::array({msg("assistant", "Red.")})}}
                                                    .dump() +
                                                "\n");
  for (const Model& m : models) {
    SCOPED_TRACE(m.tmpl);
    TempDir model("dpo_chat_hf");
    testutil::write_file(model.file("tokenizer.json"), byte_level_tokenizer_json(m.specials).dump());
    json cfg = m.config;
    cfg["chat_template"] = testutil::read_file(kFixtures + m.tmpl);
    testutil::write_file(model.file("tokenizer_config.json"), cfg.dump());
    const std::string p = golden(m.tmpl, "pp_prompt", true);
    const std::string c = golden(m.tmpl, "prompt_chosen", false);
    const std::string j = golden(m.tmpl, "pp_rejected", false);
    const Ids want_prompt = encode_bytes_and_specials(p, m.specials);
    std::string o;
    ASSERT_EQ(testutil::run_command(kTool + " --model_name_or_path " + model.path() + " --input " + in + " --output " +
                                        tmp_.file("hf.h5") + " --progress off",
                                    &o),
              0)
        << o;
    {
      PreferenceReader r(tmp_.file("hf.h5"));
      ASSERT_EQ(r.size(), 1);
      const PreferenceExample e = r.get(0);
      EXPECT_EQ(e.prompt, want_prompt);
      EXPECT_EQ(e.chosen, encode_bytes_and_specials(c.substr(p.size()), m.specials));
      EXPECT_EQ(e.rejected, encode_bytes_and_specials(j.substr(p.size()), m.specials));
      if (m.bos >= 0) {
        EXPECT_EQ(e.prompt.front(), m.bos);
        EXPECT_EQ(std::count(e.prompt.begin(), e.prompt.end(), m.bos), 1);  // the template's bos, none added
      }
      EXPECT_EQ(std::count(e.chosen.begin(), e.chosen.end(), m.eot), 1);  // the template's eot only, no eos added
      EXPECT_EQ(r.attrs().bos_id, m.bos);
    }
    // keep_end cut of the prompt to 10 tokens: Llama keeps its bos in front.
    ASSERT_EQ(testutil::run_command(kTool + " --model_name_or_path " + model.path() + " --input " + in + " --output " +
                                        tmp_.file("hf_cut.h5") + " --max_prompt_length 10 --progress off",
                                    &o),
              0)
        << o;
    PreferenceReader r(tmp_.file("hf_cut.h5"));
    Ids want;
    if (m.bos >= 0) {
      want = {m.bos};
      want.insert(want.end(), want_prompt.end() - 9, want_prompt.end());
    } else {
      want.assign(want_prompt.end() - 10, want_prompt.end());
    }
    EXPECT_EQ(r.get(0).prompt, want);
  }
}

}  // namespace
}  // namespace dpo
