// The HDF5 preference file (format_version 1, docs/data-format.md): pre-tokenized
// (prompt, chosen, rejected) triples as three ragged arrays, plus optional reference
// log-probs. PreferenceWriter streams examples into a new file with bounded memory;
// PreferenceReader gives random access to example i without reading the others.
//
// Legend: N = examples, Tp/Tc/Tr = total prompt/chosen/rejected tokens in the file.
//   /prompt/tokens   int32 (Tp)   /prompt/offsets   int64 (N+1)
//   /chosen/tokens   int32 (Tc)   /chosen/offsets   int64 (N+1)
//   /rejected/tokens int32 (Tr)   /rejected/offsets int64 (N+1)
//   /ref_logps/chosen float64 (N) /ref_logps/rejected float64 (N)   (optional)
// HDF5 itself is hidden behind a pimpl; every error is a PreferenceFileError whose
// message names the file (and the dataset or attribute) and what to do.
#pragma once
#include <cstdint>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace dpo {

inline constexpr const char* kPreferenceFormat = "dpo-preference-triples";
inline constexpr int64_t kPreferenceFormatVersion = 1;

/// A preference file is missing, damaged, of another format/version, or incompatible.
struct PreferenceFileError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// The three token columns of a file.
enum class Field { kPrompt = 0, kChosen = 1, kRejected = 2 };
inline constexpr int kNumFields = 3;
/// "prompt", "chosen", "rejected" (also the HDF5 group names).
const char* field_name(Field f);

/// Root attributes of a preference file.
struct PreferenceAttrs {
  int64_t format_version = kPreferenceFormatVersion;
  /// Examples in the file (the writer sets it at close(); ignored when writing).
  int64_t num_examples = 0;
  int64_t vocab_size = 0;
  /// bos_id is -1 for a tokenizer without bos (Qwen); eos_id and pad_id are valid ids.
  int64_t bos_id = -1, eos_id = -1, pad_id = -1;
  /// Lowercase hex SHA-256 of the tokenizer file (tokenizer.model or tokenizer.json)
  /// that tokenized the file.
  std::string tokenizer_sha256;
  /// "sentencepiece" | "tokenizers-json" (tokenizer_type_name()); files without the
  /// attribute (written before tokenizer.json support) read as "sentencepiece".
  std::string tokenizer_type = "sentencepiece";
  int64_t max_length = 0, max_prompt_length = 0;
  /// Input file names, in input order (as given to dpo_preprocess).
  std::vector<std::string> source;
};

/// One triple. Token ids are < vocab_size; prompt starts with bos, answers end with
/// eos unless truncated.
struct PreferenceExample {
  int64_t index = -1;
  std::vector<int32_t> prompt, chosen, rejected;
  /// Reference sequence log-probs from /ref_logps, NaN when the file has none.
  double ref_chosen = std::numeric_limits<double>::quiet_NaN();
  double ref_rejected = std::numeric_limits<double>::quiet_NaN();
};

struct ExampleLengths {
  int64_t prompt = 0, chosen = 0, rejected = 0;
};

struct PreferenceWriterOptions {
  /// Elements per chunk of the token datasets (random reads decompress one chunk).
  int64_t chunk_tokens = 32768;
  /// Elements per chunk of the offsets and ref_logps datasets.
  int64_t chunk_offsets = 8192;
  /// deflate level 0..9 (with byte shuffle); 0 stores uncompressed (part files).
  int deflate_level = 1;
};

/// Streams examples into a new file. Memory: a few chunks per column, whatever N.
/// The file only gets its num_examples attribute in close(): a file whose writer
/// never closed (crash, kill, exception) is refused by PreferenceReader.
class PreferenceWriter {
 public:
  /// Creates (truncates) `path`. attrs.num_examples is ignored.
  PreferenceWriter(const std::string& path, const PreferenceAttrs& attrs, const PreferenceWriterOptions& opts = {});
  /// Without close(): releases the handles and leaves an incomplete file. Never throws.
  ~PreferenceWriter();
  PreferenceWriter(const PreferenceWriter&) = delete;
  PreferenceWriter& operator=(const PreferenceWriter&) = delete;

  void append(const std::vector<int32_t>& prompt, const std::vector<int32_t>& chosen,
              const std::vector<int32_t>& rejected);
  /// Appends every example of another closed preference file, in order, streaming
  /// blocks (memory bounded). Its tokenizer, special ids and limits must equal ours.
  void append_file(const std::string& path);
  /// Examples appended so far.
  int64_t size() const;
  /// Tokens appended so far, per Field.
  int64_t tokens(Field f) const;
  /// Flushes, writes num_examples, closes. Throws on any HDF5 error.
  void close();
  const std::string& path() const { return path_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string path_;
};

/// Random access to a preference file. Opening validates the attributes, the schema,
/// dtypes and all three offsets arrays (cached: N+1 int64 each) and loads /ref_logps
/// when present. Token ids are range-checked per example in get(); validate_tokens()
/// scans all of them. Thread-safe (calls into HDF5 are serialized).
class PreferenceReader {
 public:
  explicit PreferenceReader(const std::string& path);
  ~PreferenceReader();
  PreferenceReader(const PreferenceReader&) = delete;
  PreferenceReader& operator=(const PreferenceReader&) = delete;

  int64_t size() const;
  /// Example i in [0, size()): 3 hyperslab reads. Throws PreferenceFileError when a
  /// token id is outside [0, vocab_size) or the data cannot be read.
  PreferenceExample get(int64_t i) const;
  std::vector<PreferenceExample> get_batch(const std::vector<int64_t>& indices) const;
  /// Token counts of example i (from the cached offsets, no I/O).
  ExampleLengths lengths(int64_t i) const;
  /// prompt + max(chosen, rejected) per example: the padded row length that matters
  /// for ShardSampler's group_by_length.
  std::vector<int64_t> example_lengths() const;
  /// The cached offsets of one column (N+1 values, offsets[0] = 0).
  const std::vector<int64_t>& offsets(Field f) const;
  /// Reads tokens [start, start+n) of one column into out (no range check of ids).
  void read_tokens(Field f, int64_t start, int64_t n, int32_t* out) const;
  /// Scans every token of every column in blocks; throws PreferenceFileError naming the
  /// first id outside [0, vocab_size).
  void validate_tokens() const;

  bool has_ref_logps() const;
  const PreferenceAttrs& attrs() const;
  const std::string& path() const;

  /// Refuses (PreferenceFileError) a file tokenized by another tokenizer: compares the
  /// file's tokenizer_sha256 and vocab_size with the model's.
  void check_compatible(const std::string& tokenizer_sha256, int64_t vocab_size) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Reference log-probs of every example (index order).
struct RefLogps {
  std::vector<double> chosen, rejected;  // (N), (N)
};

/// Reads /ref_logps; throws PreferenceFileError when the file has none.
RefLogps read_ref_logps(const std::string& path);

/// Adds or replaces /ref_logps in an existing, closed preference file. Both vectors
/// must hold num_examples finite values. The new values are written under a temporary
/// group, flushed, and only then moved to /ref_logps (replacing the old group), so an
/// interruption leaves either the old or the new values, never a half-written group.
/// No other process may have the file open meanwhile.
void write_ref_logps(const std::string& path, const std::vector<double>& chosen, const std::vector<double>& rejected);

}  // namespace dpo
