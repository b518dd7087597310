// dpo_make_demo_data, run as the user runs it (a subprocess): counts, valid TRL JSONL,
// determinism, held-out eval prompts, and that every chosen answer is the right one —
// checked by re-solving each prompt with an independent parser, not with the generator.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tests/test_util.h"

namespace fs = std::filesystem;

namespace {

struct Triple {
  std::string prompt, chosen, rejected;
};

std::string fresh_dir(const std::string& name) {
  fs::path p = fs::path(testing::TempDir()) / ("demo_data_" + name + "_" + std::to_string(getpid()));
  fs::remove_all(p);
  return p.string();
}

/// Runs the tool; returns its exit status.
int run_tool(const std::string& args) {
  const std::string cmd = dpo::testutil::tool_path("dpo_make_demo_data") + " " + args + " > /dev/null 2>&1";
  const int rc = std::system(cmd.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

std::string make(const std::string& name, int64_t num_train, int64_t num_eval, int64_t seed,
                 const std::string& extra = "") {
  const std::string dir = fresh_dir(name);
  const int rc = run_tool("--output_dir " + dir + " --num_train " + std::to_string(num_train) + " --num_eval " +
                          std::to_string(num_eval) + " --seed " + std::to_string(seed) + " " + extra);
  EXPECT_EQ(rc, 0) << "dpo_make_demo_data failed for " << dir;
  return dir;
}

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  EXPECT_TRUE(f.good()) << "cannot read " << path;
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

/// Parses TRL JSONL strictly: each line one object with exactly string prompt/chosen/rejected.
std::vector<Triple> read_jsonl(const std::string& path) {
  std::vector<Triple> out;
  std::ifstream f(path);
  EXPECT_TRUE(f.good()) << "cannot read " << path;
  std::string line;
  int64_t lineno = 0;
  while (std::getline(f, line)) {
    ++lineno;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const std::exception& e) {
      ADD_FAILURE() << path << ":" << lineno << " is not JSON: " << e.what();
      continue;
    }
    EXPECT_TRUE(j.is_object() && j.size() == 3) << path << ":" << lineno << ": " << line;
    for (const char* k : {"prompt", "chosen", "rejected"})
      EXPECT_TRUE(j.contains(k) && j[k].is_string()) << path << ":" << lineno << " lacks string field " << k;
    if (!j.contains("prompt") || !j.contains("chosen") || !j.contains("rejected")) continue;
    out.push_back({j["prompt"].get<std::string>(), j["chosen"].get<std::string>(), j["rejected"].get<std::string>()});
  }
  return out;
}

std::vector<std::string> words(const std::string& s) {
  std::vector<std::string> w;
  std::istringstream in(s);
  for (std::string t; in >> t;) w.push_back(t);
  return w;
}

/// The correct answer and the answers a distractor could be, found by reading the prompt
/// word by word (an independent solver, sharing no code with the generator).
struct Solution {
  std::string answer;
  std::set<std::string> wrong;  // other entities of the same kind in the prompt
  std::string kind;             // of the answer: "name" | "color" | "object"
  std::map<std::string, std::set<std::string>> seen;  // kind -> words of that kind in the prompt
};

/// The entity word of an answer (" the ball ." -> "ball", " ann ." -> "ann").
std::string answer_word(const std::string& a) {
  const auto w = words(a);
  return w.size() >= 2 ? w[w.size() - 2] : "";
}

bool solve(const std::string& prompt, Solution* s) {
  const auto w = words(prompt);
  if (w.size() < 8 || w.front() != "Q:" || w.back() != "A:" || w[w.size() - 2] != "?") return false;
  // Question part: after the last ".".
  size_t q = w.size();
  while (q > 0 && w[q - 1] != ".") --q;
  const std::vector<std::string> question(w.begin() + q, w.end() - 2);
  const std::vector<std::string> facts(w.begin() + 1, w.begin() + q);
  if (question.size() >= 3 && question[0] == "who" && question[1] == "has") {
    // facts: NAME has the OBJ . NAME has the OBJ . ...
    const std::string obj = question.back();
    s->kind = "name";
    if (facts.size() % 5 != 0) return false;
    bool found = false;
    for (size_t i = 0; i < facts.size(); i += 5) {
      if (facts[i + 1] != "has" || facts[i + 2] != "the" || facts[i + 4] != ".") return false;
      s->seen["name"].insert(facts[i]);
      s->seen["object"].insert(facts[i + 3]);
      if (facts[i + 3] == obj) {
        s->answer = " " + facts[i] + " .";
        found = true;
      } else {
        s->wrong.insert(" " + facts[i] + " .");
      }
    }
    return found;
  }
  // facts: NAME has a COLOR OBJ [, a COLOR OBJ] and a COLOR OBJ .
  std::vector<std::pair<std::string, std::string>> items;  // (color, object)
  for (size_t i = 2; i + 2 < facts.size(); ++i)
    if (facts[i] == "a") items.emplace_back(facts[i + 1], facts[i + 2]);
  if (items.size() < 2) return false;
  s->seen["name"].insert(facts[0]);
  for (const auto& [c, o] : items) {
    s->seen["color"].insert(c);
    s->seen["object"].insert(o);
  }
  if (question.size() == 3 && question[0] == "what" && question[1] == "is") {
    s->kind = "object";
    for (const auto& [c, o] : items) {
      if (c == question[2]) s->answer = " the " + o + " .";
      else s->wrong.insert(" the " + o + " .");
    }
  } else if (question.size() == 5 && question[0] == "what" && question[1] == "color") {
    s->kind = "color";
    for (const auto& [c, o] : items) {
      if (o == question[4]) s->answer = " " + c + " .";
      else s->wrong.insert(" " + c + " .");
    }
  } else {
    return false;
  }
  return !s->answer.empty();
}

/// Checks every example of a split against the independent solver. Returns how many
/// rejected answers are distractors taken from the prompt (the rest must be absent from it).
int64_t check_examples(const std::vector<Triple>& xs, const std::map<std::string, std::set<std::string>>& vocab) {
  int64_t from_prompt = 0;
  for (const auto& t : xs) {
    EXPECT_NE(t.chosen, t.rejected) << t.prompt;
    Solution s;
    if (!solve(t.prompt, &s)) {
      ADD_FAILURE() << "unparseable prompt: " << t.prompt;
      continue;
    }
    EXPECT_EQ(t.chosen, s.answer) << t.prompt;
    // Same form as the right answer (" the X ." for objects, " X ." otherwise), same kind.
    EXPECT_EQ(words(t.rejected).size(), words(t.chosen).size()) << t.prompt << " ->" << t.rejected;
    const std::string rw = answer_word(t.rejected);
    EXPECT_TRUE(vocab.at(s.kind).count(rw)) << "'" << rw << "' is not a " << s.kind << ": " << t.prompt;
    if (s.wrong.count(t.rejected)) {
      ++from_prompt;
    } else {
      const auto pw = words(t.prompt);
      EXPECT_EQ(std::count(pw.begin(), pw.end(), rw), 0) << "rejected '" << rw << "' is in the prompt but not a "
                                                         << s.kind << " of it: " << t.prompt;
    }
    // Short enough for the demo model's 48-token budget (one word is about one token).
    EXPECT_LE(words(t.prompt).size(), 22u) << t.prompt;
    EXPECT_LE(words(t.chosen).size(), 3u) << t.chosen;
  }
  return from_prompt;
}

/// Every word seen in each slot of the prompts (the vocabulary by kind, read from the data).
std::map<std::string, std::set<std::string>> vocab_of(const std::vector<Triple>& xs) {
  std::map<std::string, std::set<std::string>> v;
  for (const auto& t : xs) {
    Solution s;
    if (!solve(t.prompt, &s)) continue;
    for (const auto& [k, ws] : s.seen) v[k].insert(ws.begin(), ws.end());
  }
  return v;
}

}  // namespace

TEST(DemoData, CountsValidJsonlAndCorrectAnswers) {
  const std::string dir = make("counts", 600, 60, 1);
  const auto train = read_jsonl(dir + "/train.jsonl");
  const auto eval = read_jsonl(dir + "/eval.jsonl");
  ASSERT_EQ(train.size(), 600u);
  ASSERT_EQ(eval.size(), 60u);
  const auto vocab = vocab_of(train);
  ASSERT_EQ(vocab.size(), 3u);
  // Default: every rejected answer is absent from its prompt.
  EXPECT_EQ(check_examples(train, vocab), 0);
  EXPECT_EQ(check_examples(eval, vocab), 0);
  std::map<std::string, int> kinds;
  for (const auto& t : train) {
    Solution s;
    if (solve(t.prompt, &s)) ++kinds[s.kind];
  }
  // All three question kinds occur, each in a fair share of the examples.
  ASSERT_EQ(kinds.size(), 3u);
  for (const auto& [k, n] : kinds) EXPECT_GE(n, 120) << k;
}

TEST(DemoData, HardPercentPicksDistractorsFromThePrompt) {
  for (int64_t pct : {100, 50}) {
    const std::string dir = make("hard" + std::to_string(pct), 600, 0, 3, "--hard_percent " + std::to_string(pct));
    const auto train = read_jsonl(dir + "/train.jsonl");
    ASSERT_EQ(train.size(), 600u);
    const int64_t from_prompt = check_examples(train, vocab_of(train));
    if (pct == 100) EXPECT_EQ(from_prompt, 600);
    // Binomial(600, 0.5): 300 +- 12 (1 sigma); the bounds are > 8 sigma away.
    else EXPECT_TRUE(from_prompt > 200 && from_prompt < 400) << from_prompt;
  }
}

TEST(DemoData, NoAnswerIsPreferableWithoutThePrompt) {
  // A word must be about as often chosen as rejected, or a model could score without
  // reading the prompt (and eval accuracy would not measure the task).
  const std::string dir = make("marginals", 4000, 0, 5);
  std::map<std::string, int> chosen, rejected;
  for (const auto& t : read_jsonl(dir + "/train.jsonl")) {
    ++chosen[answer_word(t.chosen)];
    ++rejected[answer_word(t.rejected)];
  }
  EXPECT_GE(chosen.size(), 30u);
  for (const auto& [w, n] : chosen) {
    // Each word appears ~100-130 times per side; a 2:1 imbalance would be a shortcut.
    const int r = rejected[w];
    EXPECT_TRUE(n < 2 * r && r < 2 * n) << "'" << w << "' chosen " << n << " times, rejected " << r;
  }
}

TEST(DemoData, EvalPromptsAreNeverInTrain) {
  const std::string dir = make("heldout", 2000, 200, 1);
  const auto train = read_jsonl(dir + "/train.jsonl");
  const auto eval = read_jsonl(dir + "/eval.jsonl");
  std::set<std::string> train_prompts;
  for (const auto& t : train) train_prompts.insert(t.prompt);
  EXPECT_EQ(train_prompts.size(), train.size()) << "duplicate prompts in train";
  std::set<std::string> eval_prompts;
  for (const auto& t : eval) {
    EXPECT_FALSE(train_prompts.count(t.prompt)) << "eval prompt also in train: " << t.prompt;
    eval_prompts.insert(t.prompt);
  }
  EXPECT_EQ(eval_prompts.size(), eval.size()) << "duplicate prompts in eval";
  // corpus.txt covers every word of the eval set (the tokenizer must know them).
  std::set<std::string> corpus_words;
  for (const auto& w : words(slurp(dir + "/corpus.txt"))) corpus_words.insert(w);
  for (const auto& t : eval)
    for (const auto* s : {&t.prompt, &t.chosen, &t.rejected})
      for (const auto& w : words(*s)) EXPECT_TRUE(corpus_words.count(w)) << "'" << w << "' missing from corpus.txt";
}

TEST(DemoData, DeterministicFromSeed) {
  const std::string a = make("det_a", 200, 20, 7);
  const std::string b = make("det_b", 200, 20, 7);
  const std::string c = make("det_c", 200, 20, 8);
  for (const char* f : {"/train.jsonl", "/eval.jsonl", "/corpus.txt"}) {
    EXPECT_EQ(slurp(a + f), slurp(b + f)) << f << " differs between two runs with the same seed";
    EXPECT_NE(slurp(a + f), slurp(c + f)) << f << " is the same for seeds 7 and 8";
  }
  // The eval set depends on (seed, num_eval) only, so demos of any size share it.
  const std::string d = make("det_d", 50, 20, 7);
  EXPECT_EQ(slurp(a + "/eval.jsonl"), slurp(d + "/eval.jsonl"));
}

TEST(DemoData, PinnedOutputForSeed1) {
  // Pins the exact output (own RNG, no std::*_distribution), so every platform and
  // standard library produces the same demo data; recorded from this implementation.
  const std::string dir = make("pinned", 3, 2, 1);
  const auto eval = read_jsonl(dir + "/eval.jsonl");
  const auto train = read_jsonl(dir + "/train.jsonl");
  ASSERT_EQ(eval.size(), 2u);
  ASSERT_EQ(train.size(), 3u);
  EXPECT_EQ(eval[0].prompt, "Q: joe has a pink book , a white key and a gold box . what is pink ? A:");
  EXPECT_EQ(eval[0].chosen, " the book .");
  EXPECT_EQ(eval[0].rejected, " the pen .");
  EXPECT_EQ(train[0].prompt, "Q: ann has a pink key and a gray ring . what color is the ring ? A:");
  EXPECT_EQ(train[0].rejected, " white .");
}

TEST(DemoData, RejectsBadOptions) {
  EXPECT_EQ(run_tool("--output_dir " + fresh_dir("bad1") + " --num_train 0"), 2);
  EXPECT_EQ(run_tool("--num_train 5"), 2);  // no --output_dir
  EXPECT_EQ(run_tool("--output_dir " + fresh_dir("bad2") + " --no_such_option 1"), 2);
  EXPECT_EQ(run_tool("--output_dir " + fresh_dir("bad3") + " --hard_percent 101"), 2);
}
