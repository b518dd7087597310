// The dpo_preprocess pipeline without MPI (docs/preprocess.md): JSONL lines ->
// RawTriple -> token ids with bos/eos -> truncation (INTERFACES.md) -> PreferenceWriter,
// with counters and length histograms. The tool splits the inputs' bytes across
// ranks and calls preprocess_range() once per rank.
#pragma once
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "data/chat_template.h"
#include "data/preference_h5.h"
#include "data/sources.h"
#include "data/text_tokenizer.h"

namespace dpo {

struct PreprocessOptions {
  /// JSONL files, processed in this order (the output keeps it).
  std::vector<std::string> inputs;
  InputFormat format = InputFormat::kTrl;
  int64_t max_length = 1024;
  int64_t max_prompt_length = 512;
  /// Skip (and count) invalid lines instead of stopping at the first one.
  bool skip_invalid = false;
  /// The model's chat template for conversational rows (not owned). Null: a
  /// conversational row is an error that --skip_invalid does not skip.
  const ChatTemplate* chat_template = nullptr;
};

/// Throws std::invalid_argument naming the option when the limits are unusable:
/// max_prompt_length >= 1 and max_length > max_prompt_length.
void validate_limits(int64_t max_length, int64_t max_prompt_length);

/// A tokenized triple before/after truncation.
struct TokenizedTriple {
  std::vector<int32_t> prompt, chosen, rejected;
  bool prompt_truncated = false, chosen_truncated = false, rejected_truncated = false;
};

/// The truncation rule of INTERFACES.md, applied to prompt = [bos] + encode(prompt) and
/// answers = encode(answer) + [eos]:
///  1. a prompt longer than max_prompt_length keeps its LAST max_prompt_length tokens
///     (TRL's keep_end); with keep_first (the prompt starts with bos) it keeps prompt[0]
///     and the last max_prompt_length - 1 instead;
///  2. each answer keeps its FIRST max_length - len(prompt) tokens.
/// Returns kNoRoomForAnswer (and leaves the answers empty) when max_length - len(prompt)
/// < 1, which validate_limits() rules out for the tool.
InvalidReason truncate_triple(TokenizedTriple* t, int64_t max_length, int64_t max_prompt_length,
                              bool keep_first = true);

/// Text rows: prompt = [bos if the tokenizer has one] + encode(prompt), answers =
/// encode(answer) + [eos], then truncate_triple (keep_first when bos was added).
/// Rows rendered by a chat template (raw.templated): prompt = encode(prompt), answers =
/// encode(answer), nothing added (the template wrote the special tokens), and the
/// prompt's first token survives a keep_end cut only if it is bos.
/// `encoded_tokens` (optional) gets the token count before truncation (bos and eos
/// included).
InvalidReason tokenize_triple(const TextTokenizer& tok, const RawTriple& raw, int64_t max_length,
                              int64_t max_prompt_length, TokenizedTriple* out, int64_t* encoded_tokens = nullptr);

/// Counters of one run (or one rank's share; merge() adds them up). Length
/// histograms are exact (one bin per length); they grow as longer examples come.
struct PreprocessStats {
  /// hist_size: initial number of bins per histogram (lengths 0..hist_size-1).
  explicit PreprocessStats(int64_t hist_size = 0);

  int64_t lines = 0;             ///< non-blank lines read
  int64_t written = 0;           ///< examples written
  int64_t skipped[kNumInvalidReasons] = {};  ///< by InvalidReason (index 0 unused)
  int64_t encoded_tokens = 0;    ///< tokens of written + no-room lines before truncation (bos/eos counted)
  int64_t tokens[kNumFields] = {};  ///< tokens written per Field
  int64_t truncated[kNumFields] = {};  ///< examples whose prompt/chosen/rejected was cut
  int64_t bytes = 0;             ///< input bytes consumed
  std::vector<int64_t> hist[kNumFields];  ///< hist[f][len] = examples with that stored length

  int64_t skipped_total() const;
  void add_example(const TokenizedTriple& t);
  /// Nearest-rank percentile (p in (0, 100]) of stored lengths of a field; 0 when empty.
  int64_t percentile(Field f, double p) const;
  int64_t max_length_seen(Field f) const;

  void merge(const PreprocessStats& o);
  /// Bins of the largest histogram (max stored length + 1, or more).
  int64_t histogram_size() const;
  /// Grows (never shrinks) every histogram to `bins` bins.
  void resize_histograms(int64_t bins);
  /// Flat int64 image (every field is a sum, so an element-wise MPI_SUM merges ranks
  /// whose histograms were first resized to the same size). unpack() needs the same
  /// histogram sizes as the packer's.
  std::vector<int64_t> pack() const;
  void unpack(const std::vector<int64_t>& v);

  /// Multi-line human summary; JSON object for --stats_json.
  std::string summary(double elapsed_s) const;
  std::string to_json(double elapsed_s) const;
};

/// An invalid line hit without skip_invalid: what() is "FILE:LINE: reason (detail); ...".
/// Also, with or without it, a line that is never skipped: a conversational row without a
/// chat template, JSON past the limits of util/json_read.h ("FILE:LINE: JSON nested
/// deeper than 512 levels ..."), a line of more than 128 MiB.
struct InvalidLineError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// Byte sizes of the inputs in order; throws std::runtime_error naming a file that
/// cannot be opened.
std::vector<int64_t> input_sizes(const std::vector<std::string>& inputs);

/// Rank r's share [begin, end) of `total` bytes of the concatenated inputs: contiguous,
/// sizes differ by at most one byte. A line belongs to the rank whose share holds its
/// first byte, so shares of lines are disjoint and complete, and in input order.
std::pair<int64_t, int64_t> rank_byte_range(int64_t total, int world, int rank);

/// Progress callback: bytes of this range consumed so far and the stats so far.
using ProgressFn = std::function<void(int64_t bytes_done, const PreprocessStats& stats)>;
/// Receives one line per skipped input line ("FILE:LINE: skipped: reason (detail)").
using WarnFn = std::function<void(const std::string& message)>;

/// Processes every line whose first byte lies in [begin, end) of the concatenated
/// inputs (sizes from input_sizes()), appending valid examples to `out` in input
/// order and counting into `stats`. Without
/// opts.skip_invalid the first invalid line throws InvalidLineError.
void preprocess_range(const TextTokenizer& tok, const PreprocessOptions& opts, const std::vector<int64_t>& sizes,
                      int64_t begin, int64_t end, PreferenceWriter* out, PreprocessStats* stats,
                      const ProgressFn& progress = {}, const WarnFn& warn = {});

/// The root attributes a run writes (num_examples is set by the writer).
PreferenceAttrs preprocess_attrs(const TextTokenizer& tok, const PreprocessOptions& opts);

}  // namespace dpo
