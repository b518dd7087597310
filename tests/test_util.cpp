#include "tests/test_util.h"
#include "tests/proc_maps.h"

#include <sys/wait.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <vector>

namespace dpo {
namespace testutil {

TempDir::TempDir(const std::string& prefix) {
  const char* base = std::getenv("TMPDIR");
  std::string templ = std::string(base && *base ? base : "/tmp") + "/" + prefix + "_XXXXXX";
  std::vector<char> buf(templ.begin(), templ.end());
  buf.push_back('\0');
  if (!mkdtemp(buf.data())) throw std::runtime_error("mkdtemp failed for " + templ);
  path_ = buf.data();
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::string TempDir::sub(const std::string& name) const {
  const std::string p = file(name);
  std::filesystem::create_directories(p);
  return p;
}

std::string throw_message(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "<no exception>";
}

void write_file(const std::string& path, const std::string& content) {
  std::ofstream out(path, std::ios::binary);
  out << content;
  if (!out) throw std::runtime_error("cannot write " + path);
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool file_exists(const std::string& path) { return std::filesystem::exists(path); }

int run_command(const std::string& command, std::string* output) {
  FILE* p = popen((command + " 2>&1").c_str(), "r");
  if (!p) return -1;
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  int status = pclose(p);
  if (output) *output = out;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

std::string test_corpus() {
  // A fixed pseudo-English: words drawn by a tiny LCG, so the corpus (and the model
  // trained on it) is the same on every machine.
  static const char* kWords[] = {
      "the", "a", "of", "and", "to", "in", "is", "it", "that", "for", "on", "with", "as", "was", "be",
      "by", "this", "are", "or", "from", "at", "which", "not", "have", "an", "but", "what", "all", "can",
      "question", "answer", "how", "do", "I", "you", "we", "they", "use", "code", "function", "value",
      "return", "list", "string", "number", "file", "data", "model", "train", "python", "error", "test",
      "reading", "writing", "better", "worse", "good", "bad", "helpful", "honest", "harmless", "because",
      "example", "simple", "complex", "answering", "question?", "yes.", "no.", "maybe,", "thanks!", "=",
      "x", "y", "1", "2", "3", "42", "(", ")", "{", "}", "[", "]", "\"quoted\"", "why", "when", "where",
      "token", "tokens", "preference", "chosen", "rejected", "prompt", "human:", "assistant:"};
  const int n = sizeof(kWords) / sizeof(kWords[0]);
  uint64_t s = 12345;
  std::string text;
  for (int line = 0; line < 3000; ++line) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    const int len = 4 + int((s >> 33) % 14);
    for (int w = 0; w < len; ++w) {
      s = s * 6364136223846793005ull + 1442695040888963407ull;
      // Skewed draw: low indices (common words) come up more often.
      const uint64_t r = (s >> 33) % (uint64_t(n) * n);
      text += kWords[int(std::sqrt(double(r)))];
      text += w + 1 < len ? " " : "\n";
    }
  }
  return text;
}

std::string binary_dir() {
  if (const char* e = std::getenv("DPO_BINARY_DIR"); e && *e) return e;
  std::error_code ec;
  const std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec || exe.parent_path().parent_path().empty())
    throw std::runtime_error("cannot find the build directory (/proc/self/exe unreadable); set DPO_BINARY_DIR");
  return exe.parent_path().parent_path().string();
}

std::string source_dir() {
  if (const char* e = std::getenv("DPO_SOURCE_DIR"); e && *e) return e;
  const std::string cache = binary_dir() + "/CMakeCache.txt";
  std::ifstream in(cache);
  const std::string key = "CMAKE_HOME_DIRECTORY:INTERNAL=";
  for (std::string line; std::getline(in, line);)
    if (line.compare(0, key.size(), key) == 0) return line.substr(key.size());
  throw std::runtime_error("cannot find the source directory: " + cache +
                           " has no CMAKE_HOME_DIRECTORY; set DPO_SOURCE_DIR to the checkout");
}

std::string tool_path(const std::string& tool) { return binary_dir() + "/bin/" + tool; }

std::string tokenizer_fixture_dir() {
  if (const char* e = std::getenv("DPO_TOKENIZER_DIR"); e && *e) return e;
  return binary_dir() + "/fixtures/tokenizers";
}

}  // namespace testutil

std::string train_test_tokenizer(const std::string& dir, int vocab_size, bool byte_fallback) {
  // The spm_train executable (Debian package sentencepiece) runs the library's
  // SentencePieceTrainer::Train in a child process: libsentencepiece must never be
  // loaded into a libtorch process (its bundled protobuf clashes with libtorch's), and
  // this helper is meant for torch tests too.
  const std::string corpus = dir + "/tokenizer_corpus.txt";
  testutil::write_file(corpus, testutil::test_corpus());
  std::ostringstream cmd;
  cmd << "spm_train --input=" << corpus << " --model_prefix=" << dir << "/tokenizer --vocab_size=" << vocab_size
      << " --model_type=bpe --character_coverage=1.0 --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1"
      << " --num_threads=1 --minloglevel=2 --byte_fallback=" << (byte_fallback ? "true" : "false");
  std::string out;
  const int rc = testutil::run_command(cmd.str(), &out);
  if (rc != 0)
    throw std::runtime_error("train_test_tokenizer: spm_train failed (exit " + std::to_string(rc) +
                             "; is the sentencepiece package installed? scripts/setup.sh):\n" + out);
  std::filesystem::remove(corpus);
  std::filesystem::remove(dir + "/tokenizer.vocab");
  return dir + "/tokenizer.model";
}

}  // namespace dpo

namespace dpo::testutil {

std::string mapped_file_of(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    // "start-end perms offset dev inode   path"
    unsigned long lo = 0, hi = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx", &lo, &hi) != 2 || a < lo || a >= hi) continue;
    size_t slash = line.find('/');
    return slash == std::string::npos ? std::string() : line.substr(slash);
  }
  return "?";
}

}  // namespace dpo::testutil
