// bench_preprocess: tokens/s of dpo_preprocess at np = 1 and np = 2 next to the raw
// sentencepiece encode throughput on the same text, in the same run.
//
//  1. generates a TRL JSONL corpus of --size_mb MB of pseudo-English (Zipf-distributed
//     synthetic words; deterministic);
//  2. trains a BPE tokenizer on a sample of it (--vocab_size) unless --tokenizer is given;
//  3. raw: SentencePieceProcessor::Encode of every prompt/chosen/rejected string, one
//     thread, strings already in memory (the ceiling of one rank);
//  4. runs dpo_preprocess (no truncation) alone and under mpirun -np 2, reading its
//     --stats_json; tokens/s counts the same tokens as raw (bos/eos excluded).
// Steps 3 and 4 run in --repeats interleaved rounds (best of each kept). Wall times
// suffer from other load on the machine; the CPU-time figures (process CPU seconds,
// busiest rank) do much less, and are printed next to them.
// Targets (docs/preprocess.md): np=1 >= 90% of raw per rank; np=2 >= 1.8x np=1.
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "launch/cli.h"
#include "tests/test_util.h"

namespace dpo {
namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double cpu_now_s() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

// Deterministic pseudo-English: syllable words drawn with a Zipf(1.1) law.
class TextGen {
 public:
  TextGen() {
    static const char* kSyl[] = {"ka", "to", "ri", "en", "mo", "sa", "lu", "in", "te", "ar", "on", "de", "li",
                                 "ve", "pro", "con", "ing", "er", "al", "tion", "ex", "st", "ch", "qu", "ou",
                                 "an", "or", "th", "is", "at", "ne", "ma", "po", "le", "gra", "fi", "bu", "ly"};
    const int ns = sizeof(kSyl) / sizeof(kSyl[0]);
    double total = 0;
    for (int w = 0; w < 20000; ++w) {
      std::string word;
      const int len = 1 + int(next() % 4);
      for (int k = 0; k < len; ++k) word += kSyl[next() % ns];
      words_.push_back(word);
      total += 1.0 / std::pow(w + 1, 1.1);
      cdf_.push_back(total);
    }
    for (auto& c : cdf_) c /= total;
  }
  std::string text(int n_words) {
    std::string s;
    for (int i = 0; i < n_words; ++i) {
      const double u = double(next() >> 11) / double(1ull << 53);
      s += words_[std::lower_bound(cdf_.begin(), cdf_.end(), u) - cdf_.begin()];
      const uint64_t r = next() % 20;
      s += r == 0 ? ". " : r == 1 ? ", " : i + 1 < n_words ? " " : "";
    }
    return s;
  }
  uint64_t next() {  // splitmix64
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }

 private:
  uint64_t state_ = 2024;
  std::vector<std::string> words_;
  std::vector<double> cdf_;
};

std::string self_dir() {
  return std::filesystem::canonical("/proc/self/exe").parent_path().string();
}

int run_bench(int argc, char** argv) {
  Cli cli("bench_preprocess", "Throughput of dpo_preprocess (np=1, np=2) vs raw sentencepiece encoding.");
  cli.add_double("size_mb", 60, "MB of JSONL text to generate");
  cli.add_int("vocab_size", 8000, "BPE vocabulary of the tokenizer trained for the run");
  cli.add_string("tokenizer", "", "use this tokenizer.model instead of training one (e.g. Llama's)");
  cli.add_string("dir", "", "work directory (default: a temporary one, removed at the end)");
  cli.add_int("repeats", 1, "runs of each measurement; the best is reported");
  if (!cli.parse(argc, argv)) return 0;
  std::unique_ptr<testutil::TempDir> tmp;
  std::string dir = cli.get_string("dir");
  if (dir.empty()) {
    tmp = std::make_unique<testutil::TempDir>("bench_preprocess");
    dir = tmp->path();
  }
  const std::string jsonl = dir + "/corpus.jsonl";
  const int64_t target = int64_t(cli.get_double("size_mb") * 1e6);

  // 1. Corpus.
  TextGen gen;
  std::vector<std::string> texts;  // prompt, chosen, rejected, ...
  int64_t bytes = 0, text_bytes = 0;
  {
    std::ofstream out(jsonl);
    while (bytes < target) {
      std::string p = gen.text(20 + int(gen.next() % 180));
      std::string c = gen.text(20 + int(gen.next() % 380));
      std::string r = gen.text(20 + int(gen.next() % 380));
      const std::string line = nlohmann::json{{"prompt", p}, {"chosen", c}, {"rejected", r}}.dump() + "\n";
      out << line;
      bytes += int64_t(line.size());
      text_bytes += int64_t(p.size() + c.size() + r.size());
      texts.push_back(std::move(p));
      texts.push_back(std::move(c));
      texts.push_back(std::move(r));
    }
  }
  std::printf("corpus: %.1f MB JSONL, %.1f MB of text, %zu examples\n", bytes / 1e6, text_bytes / 1e6, texts.size() / 3);

  // 2. Tokenizer.
  std::string model = cli.get_string("tokenizer");
  if (model.empty()) {
    const double t = now_s();
    const std::string sample = dir + "/sample.txt";
    {
      std::ofstream s(sample);
      for (size_t i = 0; i < texts.size() && i < 6000; ++i) s << texts[i] << "\n";
    }
    std::ostringstream args;
    args << "--input=" << sample << " --model_prefix=" << dir << "/tokenizer --vocab_size=" << cli.get_int("vocab_size")
         << " --model_type=bpe --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1 --byte_fallback=true"
         << " --character_coverage=1.0 --num_threads=2 --minloglevel=2 --max_sentence_length=100000";
    auto st = sentencepiece::SentencePieceTrainer::Train(args.str());
    if (!st.ok()) throw std::runtime_error("training the tokenizer: " + st.ToString());
    model = dir + "/tokenizer.model";
    std::printf("tokenizer: trained BPE vocab %lld in %.1f s\n", (long long)cli.get_int("vocab_size"), now_s() - t);
  } else {
    std::printf("tokenizer: %s\n", model.c_str());
  }

  // 3 + 4. Rounds of (raw, np=1, np=2), interleaved so that the three see the same
  // machine load; the best of each is reported.
  sentencepiece::SentencePieceProcessor sp;
  if (!sp.Load(model).ok()) throw std::runtime_error(model + ": cannot load");
  const int repeats = int(std::max<int64_t>(1, cli.get_int("repeats")));
  const std::string tool = self_dir() + "/dpo_preprocess";
  struct Best {
    double wall = 1e30, launch_wall = 1e30, cpu_max = 1e30, cpu_sum = 1e30;
  } best[3];  // [0] raw, [1] np=1, [2] np=2
  int64_t raw_tokens = 0, tool_tokens[3] = {0, 0, 0};
  std::vector<int> ids;
  for (int k = 0; k < repeats; ++k) {
    raw_tokens = 0;
    const double t = now_s(), c = cpu_now_s();
    for (const auto& s : texts) {
      sp.Encode(s, &ids).IgnoreError();
      raw_tokens += int64_t(ids.size());
    }
    best[0].wall = std::min(best[0].wall, now_s() - t);
    best[0].cpu_max = best[0].cpu_sum = std::min(best[0].cpu_sum, cpu_now_s() - c);
    for (int np : {1, 2}) {
      const std::string out = dir + "/out_np" + std::to_string(np) + ".h5", js = out + ".json";
      const std::string cmd = (np > 1 ? std::string(DPO_MPIEXEC) + " --allow-run-as-root --oversubscribe --bind-to none -np " +
                                            std::to_string(np) + " "
                                      : std::string()) +
                              tool + " --tokenizer " + model + " --input " + jsonl + " --output " + out +
                              " --max_length 1000000 --max_prompt_length 500000 --progress off --stats_json " + js;
      std::string output;
      const double t0 = now_s();
      const int rc = testutil::run_command(cmd, &output);
      const double wall = now_s() - t0;
      if (rc != 0) throw std::runtime_error("dpo_preprocess failed:\n" + output);
      auto j = nlohmann::json::parse(testutil::read_file(js));
      tool_tokens[np] = j["encoded_tokens"].get<int64_t>() - 3 * j["written"].get<int64_t>();  // no bos/eos
      Best& b = best[np];
      b.wall = std::min(b.wall, j["elapsed_s"].get<double>());
      b.launch_wall = std::min(b.launch_wall, wall);
      b.cpu_max = std::min(b.cpu_max, j["cpu_s_max"].get<double>());
      b.cpu_sum = std::min(b.cpu_sum, j["cpu_s_sum"].get<double>());
      if (k == 0 && np == 1) std::printf("output file: %.1f MB\n", std::filesystem::file_size(out) / 1e6);
    }
    std::printf("round %d done, load average %s", k + 1, testutil::read_file("/proc/loadavg").c_str());
  }
  const double raw_tps = raw_tokens / best[0].wall, raw_cpu_tps = raw_tokens / best[0].cpu_sum;
  std::printf("raw sentencepiece encode (1 thread): %lld tokens in %.2f s wall / %.2f s CPU = %.0f tokens/s, "
              "%.0f tokens per CPU-s (%.2f MB/s of text)\n",
              (long long)raw_tokens, best[0].wall, best[0].cpu_sum, raw_tps, raw_cpu_tps, text_bytes / best[0].wall / 1e6);
  double tps[3] = {0, 0, 0};
  for (int np : {1, 2}) {
    if (tool_tokens[np] != raw_tokens)
      std::printf("  warning: dpo_preprocess encoded %lld tokens, raw %lld\n", (long long)tool_tokens[np],
                  (long long)raw_tokens);
    const Best& b = best[np];
    tps[np] = tool_tokens[np] / b.wall;
    std::printf("dpo_preprocess np=%d: %.2f s (%.2f s incl. launch) = %.0f tokens/s, %.0f tokens/s/rank "
                "(%.1f%% of raw per rank)\n",
                np, b.wall, b.launch_wall, tps[np], tps[np] / np, 100.0 * tps[np] / np / raw_tps);
    std::printf("    CPU: busiest rank %.2f s, all ranks %.2f s = %.0f tokens per CPU-s (%.1f%% of raw)\n", b.cpu_max,
                b.cpu_sum, tool_tokens[np] / b.cpu_sum, 100.0 * tool_tokens[np] / b.cpu_sum / raw_cpu_tps);
  }
  std::printf("speedup np=2 / np=1: %.2fx wall; %.2fx by the busiest rank's CPU time (= the wall speedup on idle cores)\n",
              tps[2] / tps[1], best[1].cpu_max / best[2].cpu_max);
  std::printf("targets: np=1 >= 90%% of raw: %s (wall), %s (CPU); np=2 >= 1.8x np=1: %s (wall), %s (CPU critical path)\n",
              tps[1] >= 0.9 * raw_tps ? "met" : "MISSED", tool_tokens[1] / best[1].cpu_sum >= 0.9 * raw_cpu_tps ? "met" : "MISSED",
              tps[2] >= 1.8 * tps[1] ? "met" : "MISSED", best[1].cpu_max >= 1.8 * best[2].cpu_max ? "met" : "MISSED");
  return 0;
}

}  // namespace
}  // namespace dpo

int main(int argc, char** argv) {
  return dpo::run_main("bench_preprocess", [&] { return dpo::run_bench(argc, argv); });
}
