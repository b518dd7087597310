// Helpers shared by every test suite: a tiny sentencepiece model, temporary
// directories, reading/writing small files, running a tool.
#pragma once
#include <functional>
#include <string>

namespace dpo {

/// Trains a small BPE sentencepiece model on a fixed generated English-like corpus
/// and writes DIR/tokenizer.model (returned). Ids are laid out as Llama's: unk 0,
/// bos 1, eos 2, no pad piece (pad_id -1). vocab_size: about 200..2000.
/// byte_fallback = true adds Llama's 256 <0xNN> pieces (then vocab_size >= 300).
/// Deterministic: the same arguments give the same model bytes. Trains through the
/// spm_train executable (not in-process), so libtorch tests may use it too.
std::string train_test_tokenizer(const std::string& dir, int vocab_size, bool byte_fallback = false);

namespace testutil {

/// A fresh directory under $TMPDIR (or /tmp), removed with its content on destruction.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "dpo_test");
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  const std::string& str() const { return path_; }
  /// path() + "/" + name
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  /// Creates path()/name (and parents) and returns it.
  std::string sub(const std::string& name) const;

 private:
  std::string path_;
};

/// The what() of the std::exception fn throws, or "<no exception>".
std::string throw_message(const std::function<void()>& fn);

void write_file(const std::string& path, const std::string& content);
std::string read_file(const std::string& path);
bool file_exists(const std::string& path);

/// Runs a shell command; returns its exit status (-1 if it did not exit normally);
/// `output` (optional) gets stdout and stderr together.
int run_command(const std::string& command, std::string* output = nullptr);

/// The deterministic corpus the test tokenizer is trained on (one sentence a line).
std::string test_corpus();

/// Where the tests find the build and the checkout, at run time (not compiled in: a test
/// object then does not depend on the build directory's path, so ccache serves it to any
/// build directory). binary_dir(): $DPO_BINARY_DIR, else the parent of the directory of
/// the running executable (tests run from <build>/tests). source_dir(): $DPO_SOURCE_DIR,
/// else CMAKE_HOME_DIRECTORY of <build>/CMakeCache.txt. Throw std::runtime_error saying
/// which variable to set when neither works.
std::string binary_dir();
std::string source_dir();
/// binary_dir() + "/bin/" + tool
std::string tool_path(const std::string& tool);
/// The real tokenizer files (Llama 3.1, Qwen 3, Llama 2 / Mistral: <dir>/tokenizer-<name>/models/
/// tokenizer.json + tokenizer_config.json): $DPO_TOKENIZER_DIR, else what CMake extracted
/// from tests/fixtures/tokenizers.tar.xz into binary_dir() + "/fixtures/tokenizers".
std::string tokenizer_fixture_dir();

}  // namespace testutil
}  // namespace dpo
