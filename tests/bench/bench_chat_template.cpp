// bench_chat_template: chat template rendering speed of the Jinja engine
// (data/chat_template.h) on the real templates of tests/data/fixtures/chat, with
// conversational preference rows as dpo_preprocess renders them (3 renders a row:
// prompt with add_generation_prompt, prompt + chosen, prompt + rejected).
// Prints rows/s, renders/s and MB/s of rendered text per template, on CPU time of one
// thread (less sensitive to other load than wall time), next to the wall time.
#include <chrono>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "data/chat_template.h"
#include "launch/cli.h"

namespace dpo {
namespace {

using json = nlohmann::ordered_json;

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(path + ": cannot read");
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// Deterministic pseudo-English of about `chars` characters.
std::string words(std::mt19937& rng, size_t chars) {
  static const char* kWords[] = {"the", "model", "answer", "question", "list", "python", "value", "data",
                                 "because", "which", "returns", "function", "error", "file", "line", "and"};
  std::string s;
  while (s.size() < chars) {
    if (!s.empty()) s += rng() % 12 == 0 ? ".\n" : " ";
    s += kWords[rng() % 16];
  }
  return s;
}

int run(int argc, char** argv) {
  Cli cli("bench_chat_template", "Chat template rendering speed (rows/s, MB/s) on the fixture templates.");
  cli.add_string("fixtures", std::string(DPO_SOURCE_DIR) + "/tests/data/fixtures/chat", "directory of the .jinja fixtures");
  cli.add_int("rows", 2000, "conversational rows rendered per template");
  cli.add_int("turns", 2, "user/assistant exchanges in a row's prompt (plus a system message)");
  cli.add_int("chars", 600, "characters per message");
  if (!cli.parse(argc, argv)) return 0;
  const int64_t rows = cli.get_int("rows"), turns = cli.get_int("turns"), chars = cli.get_int("chars");
  std::mt19937 rng(1234);
  std::vector<json> prompts, chosen, rejected;
  for (int64_t r = 0; r < rows; ++r) {
    json p = json::array({json{{"role", "system"}, {"content", words(rng, 80)}}});
    for (int64_t t = 0; t < turns; ++t) {
      p.push_back(json{{"role", "user"}, {"content", words(rng, chars)}});
      if (t + 1 < turns) p.push_back(json{{"role", "assistant"}, {"content", words(rng, chars)}});
    }
    prompts.push_back(p);
    chosen.push_back(json::array({json{{"role", "assistant"}, {"content", words(rng, chars)}}}));
    rejected.push_back(json::array({json{{"role", "assistant"}, {"content", words(rng, chars / 2)}}}));
  }
  std::printf("%d rows per template, %lld turns, %lld chars per message\n", int(rows), (long long)turns, (long long)chars);
  std::printf("%-26s %10s %10s %10s %10s\n", "template", "rows/s", "renders/s", "MB/s", "wall_s");
  for (const char* name : {"llama3_1_instruct.jinja", "llama3_2_instruct.jinja", "qwen2_5_instruct.jinja", "qwen3.jinja",
                           "gemma3.jinja", "deepseek_v3.jinja"}) {
    ChatTemplate t(slurp(cli.get_string("fixtures") + "/" + name));
    t.set_bos_token("<s>");
    t.set_eos_token("</s>");
    t.set_now(1700000000);
    size_t bytes = 0;
    const std::clock_t c0 = std::clock();
    const auto w0 = std::chrono::steady_clock::now();
    for (int64_t r = 0; r < rows; ++r) {
      bytes += t.render(prompts[r], true).size();
      json pc = prompts[r], pr = prompts[r];
      pc.push_back(chosen[r][0]);
      pr.push_back(rejected[r][0]);
      bytes += t.render(pc, false).size();
      bytes += t.render(pr, false).size();
    }
    const double cpu = double(std::clock() - c0) / CLOCKS_PER_SEC;
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - w0).count();
    std::printf("%-26s %10.0f %10.0f %10.1f %10.2f\n", name, rows / cpu, 3 * rows / cpu, bytes / cpu / 1e6, wall);
  }
  return 0;
}

}  // namespace
}  // namespace dpo

int main(int argc, char** argv) { return dpo::run_main("bench_chat_template", [&] { return dpo::run(argc, argv); }); }
