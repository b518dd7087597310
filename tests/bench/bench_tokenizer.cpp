// bench_tokenizer: encoding throughput of the tokenizer.json tokenizer (HfTokenizer)
// next to sentencepiece on the same English text, one thread (docs/benchmarks.md).
//
//   bench_tokenizer --tokenizer_json DIR/tokenizer.json [--spm_model tokenizer.model]
//                   [--text FILE ...] [--seconds 3]
//
// Text: the given files, else the license texts in /usr/share/common-licenses (plain
// English prose). It is encoded paragraph by paragraph (blank-line separated), as
// dpo_preprocess encodes prompts and answers. Without --spm_model a Llama-2-like
// sentencepiece model (BPE, identity normalization, byte fallback, 8000 pieces) is
// trained on the text with spm_train. Reported: the first pass (cold word cache) and
// the steady state, in tokens/s and MB/s.
#include <sentencepiece_processor.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <unistd.h>
#include <string>
#include <vector>

#include "data/hf_tokenizer.h"
#include "data/tokenizer.h"
#include "data/tokenizer_info.h"

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string read(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<std::string> paragraphs(const std::string& text) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find("\n\n", pos);
    if (end == std::string::npos) end = text.size();
    if (end > pos) out.push_back(text.substr(pos, end - pos));
    pos = end + 2;
  }
  return out;
}

struct Result {
  double first_tps = 0, steady_tps = 0, mbps = 0;
  int64_t tokens = 0;
};

template <class Encode>
Result run(const std::vector<std::string>& paras, int64_t bytes, double seconds, Encode&& encode) {
  std::vector<int32_t> ids;
  Result r;
  double t0 = now_s();
  for (const auto& p : paras) {
    encode(p, &ids);
    r.tokens += int64_t(ids.size());
  }
  r.first_tps = double(r.tokens) / (now_s() - t0);
  int64_t toks = 0, passes = 0;
  t0 = now_s();
  double t = t0;
  while (t - t0 < seconds) {
    for (const auto& p : paras) {
      encode(p, &ids);
      toks += int64_t(ids.size());
    }
    ++passes;
    t = now_s();
  }
  r.steady_tps = double(toks) / (t - t0);
  r.mbps = double(bytes) * double(passes) / (t - t0) / 1e6;
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  std::string json_path, spm_path;
  std::vector<std::string> texts;
  double seconds = 3;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--tokenizer_json") json_path = next();
    else if (a == "--spm_model") spm_path = next();
    else if (a == "--text") texts.push_back(next());
    else if (a == "--seconds") seconds = std::atof(next().c_str());
    else {
      std::fprintf(stderr,
                   "usage: bench_tokenizer --tokenizer_json FILE [--spm_model FILE] [--text FILE ...] [--seconds S]\n");
      return a == "--help" ? 0 : 2;
    }
  }
  if (json_path.empty()) {
    const char* env = std::getenv("DPO_TOKENIZER_DIR");
    if (env) json_path = std::string(env) + "/tokenizer-llama3_1/models/tokenizer.json";
  }
  if (json_path.empty() || !std::filesystem::exists(json_path)) {
    std::fprintf(stderr, "bench_tokenizer: give --tokenizer_json FILE (e.g. Llama 3.1's tokenizer.json) or set DPO_TOKENIZER_DIR (e.g. build/fixtures/tokenizers)\n");
    return 2;
  }
  try {
    if (texts.empty())
      for (const char* f : {"GPL-3", "GPL-2", "LGPL-3", "LGPL-2.1", "Apache-2.0", "MPL-2.0", "Artistic", "GFDL-1.3"})
        if (std::filesystem::exists(std::string("/usr/share/common-licenses/") + f))
          texts.push_back(std::string("/usr/share/common-licenses/") + f);
    std::string all;
    for (const auto& f : texts) all += read(f) + "\n\n";
    const auto paras = paragraphs(all);
    std::printf("text: %zu files, %.1f KB, %zu paragraphs\n", texts.size(), all.size() / 1024.0, paras.size());

    namespace fs = std::filesystem;
    const fs::path tmp = fs::temp_directory_path() / ("bench_tokenizer_" + std::to_string(getpid()));
    if (spm_path.empty()) {
      fs::create_directories(tmp);
      std::ofstream(tmp / "corpus.txt") << all;
      const std::string cmd = "spm_train --input=" + (tmp / "corpus.txt").string() + " --model_prefix=" +
                              (tmp / "tokenizer").string() +
                              " --vocab_size=8000 --model_type=bpe --character_coverage=1.0 --unk_id=0 --bos_id=1"
                              " --eos_id=2 --pad_id=-1 --normalization_rule_name=identity"
                              " --remove_extra_whitespaces=false --byte_fallback=true --split_digits=true"
                              " --minloglevel=2 --num_threads=1 >/dev/null 2>&1";
      if (std::system(cmd.c_str()) != 0) throw std::runtime_error("spm_train failed");
      spm_path = (tmp / "tokenizer.model").string();
    }

    const double t_load = now_s();
    dpo::HfTokenizer hf(json_path, dpo::read_special_token_config(dpo::tokenizer_file_dir(json_path)));
    std::printf("load %s: %.2f s (vocab %lld)\n", json_path.c_str(), now_s() - t_load, (long long)hf.vocab_size());
    const Result h = run(paras, int64_t(all.size()), seconds,
                         [&](const std::string& p, std::vector<int32_t>* ids) { hf.encode(p, ids); });
    std::printf("tokenizer.json (HfTokenizer): %lld tokens; first pass %.0f tokens/s; steady %.0f tokens/s (%.1f MB/s)\n",
                (long long)h.tokens, h.first_tps, h.steady_tps, h.mbps);

    sentencepiece::SentencePieceProcessor sp;
    if (!sp.Load(spm_path).ok()) throw std::runtime_error(spm_path + ": not a sentencepiece model");
    const Result s = run(paras, int64_t(all.size()), seconds, [&](const std::string& p, std::vector<int32_t>* ids) {
      std::vector<int> v;
      sp.Encode(p, &v).IgnoreError();
      ids->assign(v.begin(), v.end());
    });
    std::printf("sentencepiece %s (%d pieces): %lld tokens; first pass %.0f tokens/s; steady %.0f tokens/s (%.1f MB/s)\n",
                spm_path.c_str(), sp.GetPieceSize(), (long long)s.tokens, s.first_tps, s.steady_tps, s.mbps);
    std::printf("ratio (steady tokens/s): %.2fx\n", h.steady_tps / s.steady_tps);
    std::error_code ec;
    fs::remove_all(tmp, ec);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_tokenizer: %s\n", e.what());
    return 1;
  }
  return 0;
}
