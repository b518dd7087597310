// dpo_preprocess: raw preference data (JSONL) -> pre-tokenized HDF5 triples
// (docs/preprocess.md, docs/data-format.md). Runs alone or under mpirun/srun; the
// output holds the same datasets and values whatever the number of ranks.
//
// Protocol between ranks (W ranks, every step on every rank unless said):
//  1. parse options, load the tokenizer, size the inputs; agree() on failures (the
//     lowest failing rank's message goes to rank 0, every rank exits non-zero).
//  2. rank 0 broadcasts its pid: temp = "<output>.tmp-<pid>", part r = temp + ".part<r>".
//  3. rank r tokenizes the lines whose first byte lies in its contiguous share of the
//     concatenated input bytes (data/preprocess.h rank_byte_range). Rank 0 writes its
//     share straight into temp (it comes first in input order); rank r > 0 writes an
//     uncompressed part file. agree() on failures.
//  4. reduce (sum) of the counters and length histograms to rank 0.
//  5. rank 0 appends parts 1..W-1 in rank order (streamed), closes temp, renames it to
//     <output> (atomic; an older <output> survives any failure before this point), and
//     broadcasts success or failure.
//  6. every rank deletes its part file; on failure rank 0 deletes temp.
// An exception outside this protocol with W > 1 aborts the job (MPI_Abort) so no rank
// hangs. The MPI layer is dist/mpi_base.h (HostComm, agree).
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cmath>
#include <ctime>
#include <optional>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "data/chat_template.h"
#include "data/preference_h5.h"
#include "data/preprocess.h"
#include "data/tokenizer.h"
#include "data/tokenizer_info.h"
#include "dist/mpi_base.h"
#include "launch/cli.h"
#include "util/json_read.h"

namespace dpo {
namespace {

constexpr const char* kTool = "dpo_preprocess";
constexpr int kMaxWarningsPerRank = 10;

double cpu_seconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + 1e-6 * double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

template <typename Fn>
Failure guarded(Fn&& fn) {
  try {
    fn();
    return {};
  } catch (const CliError& e) {
    return {e.what(), true};
  } catch (const std::exception& e) {
    std::string m = e.what();
    return {m.empty() ? "unknown error" : m, false};
  }
}

[[noreturn]] void rethrow(const Failure& f) {
  if (f.user_error) throw CliError(f.message);
  throw std::runtime_error(f.message);
}

double now_s() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

std::string hms(double s) {
  if (!std::isfinite(s) || s < 0) return "--:--";
  long t = long(s + 0.5);
  char buf[32];
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
  else std::snprintf(buf, sizeof buf, "%ld:%02ld", t / 60, t % 60);
  return buf;
}

// A one-line progress bar on stderr (rank 0; its share stands for the whole run).
class ProgressBar {
 public:
  ProgressBar(bool enabled, int64_t total_bytes, int world) : enabled_(enabled), total_(total_bytes), world_(world) {
    start_ = last_ = now_s();
  }
  void update(int64_t bytes_done, const PreprocessStats& st, bool force = false) {
    if (!enabled_) return;
    const double t = now_s();
    if (!force && t - last_ < 0.2) return;
    last_ = t;
    const double el = std::max(1e-9, t - start_);
    const double frac = total_ > 0 ? std::min(1.0, double(bytes_done) / double(total_)) : 1.0;
    const int width = 24, filled = int(frac * width);
    std::string bar(filled, '=');
    if (filled < width) bar += '>' + std::string(width - filled - 1, ' ');
    const double toks = double(st.tokens[0] + st.tokens[1] + st.tokens[2]);
    std::fprintf(stderr, "\r[%s] %5.1f%% %7.0f ex/s %9.0f tok/s%s ETA %s  ", bar.c_str(), 100 * frac,
                 st.written / el, toks / el, world_ > 1 ? " (rank 0)" : "",
                 frac > 0 ? hms(el / frac - el).c_str() : "--:--");
    std::fflush(stderr);
    drawn_ = true;
  }
  void finish() {
    if (drawn_) std::fprintf(stderr, "\n");
    drawn_ = false;
  }

 private:
  bool enabled_, drawn_ = false;
  int64_t total_;
  int world_;
  double start_, last_;
};

void remove_quietly(const std::string& path) {
  if (!path.empty()) std::remove(path.c_str());
}

std::string same_file_key(const std::string& path) {
  char buf[PATH_MAX];
  return realpath(path.c_str(), buf) ? std::string(buf) : path;
}

// Prints attributes and length statistics of a preference file and validates it fully.
int inspect(const std::string& path) {
  PreferenceReader r(path);
  r.validate_tokens();
  const PreferenceAttrs& a = r.attrs();
  std::printf("file: %s\n", path.c_str());
  std::printf("format: %s (format_version %lld)\n", kPreferenceFormat, (long long)a.format_version);
  std::printf("num_examples: %lld\n", (long long)a.num_examples);
  std::printf("vocab_size: %lld\nbos_id: %lld\neos_id: %lld\npad_id: %lld\n", (long long)a.vocab_size,
              (long long)a.bos_id, (long long)a.eos_id, (long long)a.pad_id);
  std::printf("tokenizer_sha256: %s\n", a.tokenizer_sha256.c_str());
  std::printf("tokenizer_type: %s\n", a.tokenizer_type.c_str());
  std::printf("max_length: %lld\nmax_prompt_length: %lld\n", (long long)a.max_length, (long long)a.max_prompt_length);
  std::string src;
  for (const auto& s : a.source) src += (src.empty() ? "" : ", ") + s;
  std::printf("source: %s\n", src.c_str());
  std::printf("ref_logps: %s\n", r.has_ref_logps() ? "present" : "absent");
  std::printf("%-9s %10s %8s %8s %8s %8s %8s %8s %12s\n", "lengths", "examples", "min", "mean", "p50", "p90", "p99", "max",
              "tokens");
  const Field fields[3] = {Field::kPrompt, Field::kChosen, Field::kRejected};
  for (Field f : fields) {
    const auto& off = r.offsets(f);
    std::vector<int64_t> len(r.size());
    for (int64_t i = 0; i < r.size(); ++i) len[i] = off[i + 1] - off[i];
    std::sort(len.begin(), len.end());
    auto pct = [&](double p) -> long long {
      if (len.empty()) return 0;
      int64_t rank = std::max<int64_t>(1, int64_t(std::ceil(p / 100.0 * double(len.size()))));
      return len[rank - 1];
    };
    const long long total = off.back();
    std::printf("  %-7s %10lld %8lld %8.1f %8lld %8lld %8lld %8lld %12lld\n", field_name(f), (long long)len.size(),
                len.empty() ? 0LL : (long long)len.front(), len.empty() ? 0.0 : double(total) / double(len.size()),
                pct(50), pct(90), pct(99), len.empty() ? 0LL : (long long)len.back(), total);
  }
  if (r.has_ref_logps()) {
    RefLogps ref = read_ref_logps(path);
    for (size_t i = 0; i < ref.chosen.size(); ++i)
      if (!std::isfinite(ref.chosen[i]) || !std::isfinite(ref.rejected[i]))
        throw PreferenceFileError(path + ": /ref_logps holds a non-finite value at example " + std::to_string(i) +
                                  "; recompute them with dpo_score --write_ref_logps");
  }
  std::printf("valid: yes\n");
  return 0;
}

// The chat template of conversational rows (null when the model has none: such rows are
// then refused with a message saying how to give one).
std::unique_ptr<ChatTemplate> load_chat_template(const std::string& file, const std::string& kwargs,
                                                 const std::string& dir, const TextTokenizer& tok) {
  std::optional<ChatTemplateSource> src = find_chat_template(file, dir);
  if (!src) {
    if (!kwargs.empty()) throw CliError("--chat_template_kwargs given but no chat template was found (--chat_template FILE)");
    return nullptr;
  }
  std::unique_ptr<ChatTemplate> chat;
  try {
    chat = std::make_unique<ChatTemplate>(src->text);
  } catch (const ChatTemplateError& e) {
    throw std::runtime_error(src->origin + ": " + e.what());
  }
  // bos_token / eos_token as the tokenizer resolved them (tokenizer_config.json: a
  // string, an AddedToken object or null; then config.json; then the tokenizer file);
  // a tokenizer without bos (Qwen) leaves the variable undefined, as transformers does.
  chat->set_bos_token(tok.bos_id() >= 0 ? std::optional<std::string>(tok.bos_token()) : std::nullopt);
  chat->set_eos_token(tok.eos_id() >= 0 ? std::optional<std::string>(tok.eos_token()) : std::nullopt);
  if (!kwargs.empty()) {
    nlohmann::ordered_json vars;
    try {
      vars = json_parse<nlohmann::ordered_json>(kwargs, "--chat_template_kwargs");
    } catch (const nlohmann::json::parse_error& e) {
      throw CliError(std::string("--chat_template_kwargs: malformed JSON: ") + e.what());
    } catch (const JsonLimitError& e) {
      throw CliError(e.what());
    }
    if (!vars.is_object()) throw CliError("--chat_template_kwargs must be a JSON object, e.g. '{\"enable_thinking\": false}'");
    chat->set_extra_variables(vars);
  }
  return chat;
}

int run(HostComm& mpi, int argc, char** argv) {
  const double t0 = now_s(), cpu0 = cpu_seconds();
  const bool root = mpi.rank() == 0;
  Cli cli(kTool, "Tokenizes JSONL preference data into an HDF5 file of (prompt, chosen, rejected) triples; "
                 "runs alone or under mpirun (ranks split the input).");
  cli.add_list("input", "", "JSONL input file(s), processed in order (repeat the option or comma-separate)");
  cli.add_string("output", "", "output HDF5 file (written as OUTPUT.tmp-PID, renamed when complete)");
  cli.add_string("tokenizer", "", "tokenizer file: a sentencepiece tokenizer.model or a Hugging Face tokenizer.json "
                                  "(special tokens from tokenizer_config.json / config.json in its directory)");
  cli.add_string("model_name_or_path", "", "model directory: uses DIR/tokenizer.json, else DIR/tokenizer.model (instead of --tokenizer)");
  cli.add_string("chat_template", "",
                 "Jinja chat template for conversational rows (default: DIR/chat_template.jinja, else chat_template "
                 "of DIR/tokenizer_config.json; DIR = --model_name_or_path or the tokenizer's directory)");
  cli.add_string("chat_template_kwargs", "",
                 "JSON object of extra chat template variables, e.g. '{\"enable_thinking\": false}'");
  cli.add_string("format", "trl",
                 "trl (prompt, chosen, rejected: text, or chat messages rendered by the chat template) or "
                 "stack-exchange (question, response_j, response_k)");
  cli.add_int("max_length", 1024, "max tokens of prompt + answer");
  cli.add_int("max_prompt_length", 512, "max prompt tokens (bos counted); longer prompts keep bos + their end");
  cli.add_bool("skip_invalid", false, "skip invalid lines (counted by reason) instead of stopping at the first");
  cli.add_string("inspect", "", "print the attributes and length statistics of FILE.h5, validate it, and exit");
  cli.add_string("progress", "auto", "progress bar on stderr: auto (when stderr is a terminal), on, off");
  cli.add_int("compression_level", 1, "deflate level 0..9 of the output datasets (byte shuffle first)");
  cli.add_string("stats_json", "", "also write the summary as one JSON object to this file");

  // Step 1: options, tokenizer, inputs.
  bool help_only = false;
  PreprocessOptions opts;
  std::unique_ptr<TextTokenizer> tok;
  std::unique_ptr<ChatTemplate> chat;
  std::vector<int64_t> sizes;
  int64_t total_bytes = 0;
  std::string output, inspect_path, progress_mode, stats_json;
  int compression = 1;
  std::streambuf* saved_cout = nullptr;
  if (!root) saved_cout = std::cout.rdbuf(nullptr);  // --help/--version once, from rank 0
  Failure f = guarded([&] {
    help_only = !cli.parse(argc, argv);
    if (help_only) return;
    inspect_path = cli.get_string("inspect");
    if (!inspect_path.empty()) return;
    opts.inputs = cli.get_list("input");
    output = cli.get_string("output");
    if (opts.inputs.empty()) throw CliError("--input is required (JSONL file(s))");
    if (output.empty()) throw CliError("--output is required (the HDF5 file to write)");
    try {
      opts.format = parse_input_format(cli.get_string("format"));
    } catch (const std::invalid_argument& e) {
      throw CliError(std::string("--format: ") + e.what());
    }
    opts.max_length = cli.get_int("max_length");
    opts.max_prompt_length = cli.get_int("max_prompt_length");
    try {
      validate_limits(opts.max_length, opts.max_prompt_length);
    } catch (const std::invalid_argument& e) {
      throw CliError(e.what());
    }
    opts.skip_invalid = cli.get_bool("skip_invalid");
    progress_mode = cli.get_string("progress");
    if (progress_mode != "auto" && progress_mode != "on" && progress_mode != "off")
      throw CliError("--progress must be auto, on or off (got '" + progress_mode + "')");
    const int64_t level = cli.get_int("compression_level");
    if (level < 0 || level > 9) throw CliError("--compression_level must be in 0..9");
    compression = int(level);
    stats_json = cli.get_string("stats_json");
    const std::string tok_file = cli.get_string("tokenizer");
    const std::string model_dir = cli.get_string("model_name_or_path");
    if (!tok_file.empty() && !model_dir.empty())
      throw CliError("give either --tokenizer or --model_name_or_path, not both");
    if (tok_file.empty() && model_dir.empty())
      throw CliError("--tokenizer FILE or --model_name_or_path DIR is required");
    const std::filesystem::path out_dir = std::filesystem::absolute(output).parent_path();
    if (!std::filesystem::is_directory(out_dir))
      throw CliError("--output " + output + ": directory " + out_dir.string() + " does not exist");
    const std::string out_key = same_file_key(output);
    for (const auto& in : opts.inputs)
      if (same_file_key(in) == out_key) throw CliError("--output " + output + " is also an --input");
    tok = open_tokenizer(tok_file, model_dir);
    chat = load_chat_template(cli.get_string("chat_template"), cli.get_string("chat_template_kwargs"),
                              model_dir.empty() ? tokenizer_file_dir(tok_file) : model_dir, *tok);
    opts.chat_template = chat.get();
    sizes = input_sizes(opts.inputs);
    for (int64_t s : sizes) total_bytes += s;
  });
  if (saved_cout) std::cout.rdbuf(saved_cout);
  f = agree(f, mpi);
  if (f.failed()) rethrow(f);
  if (help_only) return 0;
  if (!inspect_path.empty()) return root ? inspect(inspect_path) : 0;

  // Step 2: names; rank 0's clock for the chat template's strftime_now (one date for all ranks).
  int64_t pid = int64_t(getpid());
  mpi.broadcast(&pid, sizeof pid, 0);
  int64_t now = int64_t(std::time(nullptr));
  mpi.broadcast(&now, sizeof now, 0);
  if (chat) chat->set_now(std::time_t(now));
  const std::string temp = output + ".tmp-" + std::to_string(pid);
  const std::string mine = root ? temp : temp + ".part" + std::to_string(mpi.rank());

  // Step 3: this rank's share.
  PreprocessStats stats;
  std::unique_ptr<PreferenceWriter> writer;
  const bool show = progress_mode == "on" || (progress_mode == "auto" && isatty(STDERR_FILENO));
  ProgressBar bar(root && show, rank_byte_range(total_bytes, mpi.world(), 0).second, mpi.world());
  int warnings = 0;
  f = guarded([&] {
    PreferenceWriterOptions wopts;
    // Parts are read back once by rank 0: compressing them would only cost time.
    wopts.deflate_level = root ? compression : 0;
    writer = std::make_unique<PreferenceWriter>(mine, preprocess_attrs(*tok, opts), wopts);
    auto [begin, end] = rank_byte_range(total_bytes, mpi.world(), mpi.rank());
    preprocess_range(
        *tok, opts, sizes, begin, end, writer.get(), &stats,
        [&](int64_t done, const PreprocessStats& st) { bar.update(done, st); },
        [&](const std::string& msg) {
          if (warnings < kMaxWarningsPerRank) {
            bar.finish();
            std::fprintf(stderr, "%s: warning: %s\n", kTool, msg.c_str());
          } else if (warnings == kMaxWarningsPerRank) {
            std::fprintf(stderr, "%s: warning: more skipped lines are not listed (see the summary)\n", kTool);
          }
          ++warnings;
        });
    if (!root) writer->close();
  });
  if (f.failed()) writer.reset();
  f = agree(f, mpi);
  bar.finish();
  if (f.failed()) {
    writer.reset();
    remove_quietly(mine);
    rethrow(f);
  }

  // Step 4: counters (histograms first grown to one size on every rank).
  int64_t bins = stats.histogram_size(), max_bins = bins;
  mpi.allreduce(&max_bins, 1, HostOp::max);
  stats.resize_histograms(max_bins);
  std::vector<int64_t> summed = stats.pack();
  mpi.reduce(summed.data(), int64_t(summed.size()), HostOp::sum, 0);

  // Step 5: merge + rename on rank 0.
  int64_t ok = 1;
  if (root) {
    f = guarded([&] {
      for (int r = 1; r < mpi.world(); ++r) writer->append_file(temp + ".part" + std::to_string(r));
      writer->close();
      writer.reset();
      if (std::rename(temp.c_str(), output.c_str()) != 0)
        throw std::runtime_error(output + ": cannot rename " + temp + " to it: " + std::strerror(errno));
    });
    ok = f.failed() ? 0 : 1;
  }
  mpi.broadcast(&ok, sizeof ok, 0);

  // CPU seconds of the ranks (max = the critical path on free cores; sum = total work).
  double cpu = cpu_seconds() - cpu0, cpu_max = cpu, cpu_sum = cpu;
  mpi.reduce(&cpu_max, 1, HostOp::max, 0);
  mpi.reduce(&cpu_sum, 1, HostOp::sum, 0);

  // Step 6: clean up.
  if (!root) remove_quietly(mine);
  if (!ok) {
    if (root) {
      writer.reset();
      remove_quietly(temp);
      for (int r = 1; r < mpi.world(); ++r) remove_quietly(temp + ".part" + std::to_string(r));
      rethrow(f);
    }
    return 1;
  }
  if (root) {
    stats.unpack(summed);
    const double elapsed = now_s() - t0;
    std::printf("%s: wrote %s (%lld examples)\n%s\n", kTool, output.c_str(), (long long)stats.written,
                stats.summary(elapsed).c_str());
    if (!stats_json.empty()) {
      std::ofstream js(stats_json);
      nlohmann::json j = json_parse(stats.to_json(elapsed), "the run's statistics");
      j["ranks"] = mpi.world();
      j["cpu_s_max"] = cpu_max;
      j["cpu_s_sum"] = cpu_sum;
      js << j.dump() << "\n";
      if (!js) throw std::runtime_error(stats_json + ": cannot write (--stats_json)");
    }
  }
  return 0;
}

}  // namespace
}  // namespace dpo

int main(int argc, char** argv) {
  int rc = 1;
  try {
    dpo::MpiSession session(&argc, &argv);
    // Ranks that finish a phase early sleep in the collectives instead of spinning on a
    // core the ranks still tokenizing need.
    dpo::HostCommOptions options;
    options.gentle_wait = true;
    dpo::HostComm mpi(options);
    auto body = [&] {
      try {
        return dpo::run(mpi, argc, argv);
      } catch (const dpo::CommError& e) {
        // A failed MPI call: the ranks can no longer agree on anything.
        std::fprintf(stderr, "%s: error (rank %d): %s\n", dpo::kTool, mpi.rank(), e.what());
        if (mpi.world() > 1) mpi.abort(1);
        return 1;
      }
    };
    try {
      if (mpi.rank() == 0) {
        rc = dpo::run_main(dpo::kTool, body);
      } else {
        // Only rank 0 reports errors: they were agreed on, so it knows them all.
        try {
          rc = body();
        } catch (const dpo::CliError&) {
          rc = 2;
        } catch (const std::exception&) {
          rc = 1;
        }
      }
    } catch (...) {
      // Outside the protocol: the other ranks may be waiting in a collective.
      if (mpi.world() > 1) mpi.abort(1);
      rc = 1;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", dpo::kTool, e.what());
    rc = 1;
  }
  return rc;
}
