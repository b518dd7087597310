#include "data/preprocess.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <sstream>

#include <nlohmann/json.hpp>

#include "util/json_read.h"

namespace dpo {

void validate_limits(int64_t max_length, int64_t max_prompt_length) {
  if (max_prompt_length < 1)
    throw std::invalid_argument("--max_prompt_length must be >= 1 (the prompt holds at least bos), got " +
                                std::to_string(max_prompt_length));
  if (max_length <= max_prompt_length)
    throw std::invalid_argument("--max_length (" + std::to_string(max_length) +
                                ") must be greater than --max_prompt_length (" + std::to_string(max_prompt_length) +
                                ") so that every answer keeps at least one token");
  if (max_length > (int64_t(1) << 30))
    throw std::invalid_argument("--max_length " + std::to_string(max_length) + " is unreasonably large (max 2^30)");
}

InvalidReason truncate_triple(TokenizedTriple* t, int64_t max_length, int64_t max_prompt_length,
                              bool keep_first) {
  auto& p = t->prompt;
  t->prompt_truncated = t->chosen_truncated = t->rejected_truncated = false;
  if (int64_t(p.size()) > max_prompt_length) {
    // TRL's keep_end; with bos, keep it (p[0]) and the last max_prompt_length - 1 tokens,
    // so the sequence still starts with bos.
    const int64_t head = keep_first ? 1 : 0;
    const int64_t keep = max_prompt_length - head;
    std::move(p.end() - keep, p.end(), p.begin() + head);
    p.resize(max_prompt_length);
    t->prompt_truncated = true;
  }
  const int64_t room = max_length - int64_t(p.size());
  if (room < 1) {
    t->chosen.clear();
    t->rejected.clear();
    return InvalidReason::kNoRoomForAnswer;
  }
  if (int64_t(t->chosen.size()) > room) {
    t->chosen.resize(room);
    t->chosen_truncated = true;
  }
  if (int64_t(t->rejected.size()) > room) {
    t->rejected.resize(room);
    t->rejected_truncated = true;
  }
  return InvalidReason::kNone;
}

InvalidReason tokenize_triple(const TextTokenizer& tok, const RawTriple& raw, int64_t max_length,
                              int64_t max_prompt_length, TokenizedTriple* out, int64_t* encoded_tokens) {
  if (raw.templated) {
    tok.encode(raw.prompt, &out->prompt);
    tok.encode(raw.chosen, &out->chosen);
    tok.encode(raw.rejected, &out->rejected);
    if (encoded_tokens) *encoded_tokens = int64_t(out->prompt.size() + out->chosen.size() + out->rejected.size());
    const bool starts_with_bos = tok.bos_id() >= 0 && !out->prompt.empty() && out->prompt[0] == tok.bos_id();
    return truncate_triple(out, max_length, max_prompt_length, starts_with_bos);
  }
  static thread_local std::vector<int32_t> ids;
  const bool bos = tok.bos_id() >= 0;
  if (bos) {
    tok.encode(raw.prompt, &ids);
    out->prompt.resize(ids.size() + 1);
    out->prompt[0] = tok.bos_id();
    std::copy(ids.begin(), ids.end(), out->prompt.begin() + 1);
  } else {
    tok.encode(raw.prompt, &out->prompt);
  }
  tok.encode(raw.chosen, &out->chosen);
  out->chosen.push_back(tok.eos_id());
  tok.encode(raw.rejected, &out->rejected);
  out->rejected.push_back(tok.eos_id());
  if (encoded_tokens) *encoded_tokens = int64_t(out->prompt.size() + out->chosen.size() + out->rejected.size());
  return truncate_triple(out, max_length, max_prompt_length, bos);
}

// ---------------------------------------------------------------------------
// Stats

PreprocessStats::PreprocessStats(int64_t hist_size) {
  for (auto& h : hist) h.assign(std::max<int64_t>(0, hist_size), 0);
}

int64_t PreprocessStats::histogram_size() const {
  size_t n = 0;
  for (const auto& h : hist) n = std::max(n, h.size());
  return int64_t(n);
}

void PreprocessStats::resize_histograms(int64_t bins) {
  for (auto& h : hist)
    if (int64_t(h.size()) < bins) h.resize(bins, 0);
}

int64_t PreprocessStats::skipped_total() const {
  int64_t s = 0;
  for (int r = 1; r < kNumInvalidReasons; ++r) s += skipped[r];
  return s;
}

void PreprocessStats::add_example(const TokenizedTriple& t) {
  const std::vector<int32_t>* cols[kNumFields] = {&t.prompt, &t.chosen, &t.rejected};
  const bool cut[kNumFields] = {t.prompt_truncated, t.chosen_truncated, t.rejected_truncated};
  for (int f = 0; f < kNumFields; ++f) {
    const int64_t len = cols[f]->size();
    tokens[f] += len;
    truncated[f] += cut[f];
    if (len >= int64_t(hist[f].size())) hist[f].resize(len + 1, 0);
    ++hist[f][len];
  }
  ++written;
}

int64_t PreprocessStats::percentile(Field f, double p) const {
  const auto& h = hist[int(f)];
  int64_t n = 0;
  for (int64_t c : h) n += c;
  if (n == 0) return 0;
  const int64_t rank = std::max<int64_t>(1, int64_t(std::ceil(p / 100.0 * double(n))));
  int64_t cum = 0;
  for (size_t len = 0; len < h.size(); ++len) {
    cum += h[len];
    if (cum >= rank) return int64_t(len);
  }
  return int64_t(h.size()) - 1;
}

int64_t PreprocessStats::max_length_seen(Field f) const {
  const auto& h = hist[int(f)];
  for (size_t len = h.size(); len-- > 0;)
    if (h[len]) return int64_t(len);
  return 0;
}

void PreprocessStats::merge(const PreprocessStats& o) {
  PreprocessStats other = o;
  const int64_t bins = std::max(histogram_size(), other.histogram_size());
  resize_histograms(bins);
  other.resize_histograms(bins);
  std::vector<int64_t> a = pack(), b = other.pack();
  for (size_t i = 0; i < a.size(); ++i) a[i] += b[i];
  unpack(a);
}

std::vector<int64_t> PreprocessStats::pack() const {
  std::vector<int64_t> v = {lines, written, encoded_tokens, bytes};
  v.insert(v.end(), skipped, skipped + kNumInvalidReasons);
  v.insert(v.end(), tokens, tokens + kNumFields);
  v.insert(v.end(), truncated, truncated + kNumFields);
  for (const auto& h : hist) v.insert(v.end(), h.begin(), h.end());
  return v;
}

void PreprocessStats::unpack(const std::vector<int64_t>& v) {
  size_t need = 4 + kNumInvalidReasons + 2 * kNumFields;
  for (const auto& h : hist) need += h.size();
  if (v.size() != need)
    throw std::invalid_argument("PreprocessStats::unpack: buffer of " + std::to_string(v.size()) +
                                " values, expected " + std::to_string(need) + " (histograms of another size)");
  size_t i = 0;
  lines = v[i++];
  written = v[i++];
  encoded_tokens = v[i++];
  bytes = v[i++];
  for (auto& s : skipped) s = v[i++];
  for (auto& t : tokens) t = v[i++];
  for (auto& t : truncated) t = v[i++];
  for (auto& h : hist)
    for (auto& c : h) c = v[i++];
}

namespace {
std::string human(double x) {
  char buf[32];
  if (x >= 1e9) std::snprintf(buf, sizeof buf, "%.2fG", x / 1e9);
  else if (x >= 1e6) std::snprintf(buf, sizeof buf, "%.2fM", x / 1e6);
  else if (x >= 1e4) std::snprintf(buf, sizeof buf, "%.1fk", x / 1e3);
  else std::snprintf(buf, sizeof buf, "%.0f", x);
  return buf;
}
}  // namespace

std::string PreprocessStats::summary(double elapsed_s) const {
  std::ostringstream s;
  s << "examples: " << lines << " read, " << written << " written, " << skipped_total() << " skipped";
  if (skipped_total() > 0) {
    s << " (";
    bool first = true;
    for (int r = 1; r < kNumInvalidReasons; ++r)
      if (skipped[r]) {
        s << (first ? "" : ", ") << invalid_reason_text(InvalidReason(r)) << " " << skipped[r];
        first = false;
      }
    s << ")";
  }
  const int64_t total_tokens = tokens[0] + tokens[1] + tokens[2];
  s << "\ntokens: " << total_tokens << " written (prompt " << tokens[0] << ", chosen " << tokens[1]
    << ", rejected " << tokens[2] << "), " << encoded_tokens << " before truncation";
  s << "\ntruncated: " << truncated[0] << " prompts, " << truncated[1] << " chosen, " << truncated[2]
    << " rejected answers";
  char line[160];
  std::snprintf(line, sizeof line, "\nlengths   %8s %8s %8s %8s", "p50", "p90", "p99", "max");
  s << line;
  for (int f = 0; f < kNumFields; ++f) {
    std::snprintf(line, sizeof line, "\n  %-8s%8lld %8lld %8lld %8lld", field_name(Field(f)),
                  (long long)percentile(Field(f), 50), (long long)percentile(Field(f), 90),
                  (long long)percentile(Field(f), 99), (long long)max_length_seen(Field(f)));
    s << line;
  }
  if (elapsed_s > 0) {
    char t[160];
    std::snprintf(t, sizeof t, "\ntime: %.2f s, %s examples/s, %s tokens/s (written), %.1f MB/s of input", elapsed_s,
                  human(written / elapsed_s).c_str(), human(total_tokens / elapsed_s).c_str(),
                  bytes / elapsed_s / 1e6);
    s << t;
  }
  return s.str();
}

std::string PreprocessStats::to_json(double elapsed_s) const {
  nlohmann::json j;
  j["lines"] = lines;
  j["written"] = written;
  j["skipped_total"] = skipped_total();
  nlohmann::json sk = nlohmann::json::object();
  for (int r = 1; r < kNumInvalidReasons; ++r) sk[invalid_reason_key(InvalidReason(r))] = skipped[r];
  j["skipped"] = sk;
  j["encoded_tokens"] = encoded_tokens;
  j["bytes"] = bytes;
  j["elapsed_s"] = elapsed_s;
  for (int f = 0; f < kNumFields; ++f) {
    nlohmann::json c;
    c["tokens"] = tokens[f];
    c["truncated"] = truncated[f];
    c["p50"] = percentile(Field(f), 50);
    c["p90"] = percentile(Field(f), 90);
    c["p99"] = percentile(Field(f), 99);
    c["max"] = max_length_seen(Field(f));
    j[field_name(Field(f))] = c;
  }
  return j.dump();
}

// ---------------------------------------------------------------------------
// Input splitting and line reading

std::vector<int64_t> input_sizes(const std::vector<std::string>& inputs) {
  std::vector<int64_t> sizes;
  for (const auto& path : inputs) {
    std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
    if (!f) throw std::runtime_error(path + ": cannot open input: " + std::strerror(errno));
    if (fseeko(f.get(), 0, SEEK_END) != 0) throw std::runtime_error(path + ": cannot seek (not a regular file?)");
    sizes.push_back(int64_t(ftello(f.get())));
  }
  return sizes;
}

std::pair<int64_t, int64_t> rank_byte_range(int64_t total, int world, int rank) {
  if (world < 1 || rank < 0 || rank >= world) throw std::invalid_argument("rank_byte_range: bad rank/world");
  auto cut = [&](int r) { return int64_t((__int128)total * r / world); };
  return {cut(rank), cut(rank + 1)};
}

namespace {

// Number of '\n' in [0, end) of a file (line numbers of error messages only).
int64_t count_newlines(const std::string& path, int64_t end) {
  std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!f) return 0;
  std::vector<char> buf(1 << 20);
  int64_t count = 0, done = 0;
  while (done < end) {
    size_t n = std::fread(buf.data(), 1, std::min<int64_t>(buf.size(), end - done), f.get());
    if (n == 0) break;
    count += std::count(buf.data(), buf.data() + n, '\n');
    done += int64_t(n);
  }
  return count;
}

// Buffered line reader over one file from a byte offset; lines exclude '\n'. A line
// longer than kJsonRowMaxBytes (util/json_read.h) is refused before the buffer grows
// further: such a file is no JSONL preference data, and reading on could take all memory.
class LineReader {
 public:
  LineReader(const std::string& path, int64_t start) : path_(path), f_(std::fopen(path.c_str(), "rb"), &std::fclose) {
    if (!f_) throw std::runtime_error(path + ": cannot open input: " + std::strerror(errno));
    if (fseeko(f_.get(), start, SEEK_SET) != 0) throw std::runtime_error(path + ": cannot seek");
    buf_pos_ = start;
    buf_.resize(1 << 22);
  }
  // Next line and the file offset of its first byte; false at end of file.
  bool next(std::string_view* line, int64_t* pos) {
    for (;;) {
      const char* base = buf_.data();
      if (const void* nl = std::memchr(base + head_, '\n', tail_ - head_)) {
        const size_t end = static_cast<const char*>(nl) - base;
        *line = std::string_view(base + head_, end - head_);
        *pos = buf_pos_ + int64_t(head_);
        head_ = end + 1;
        return true;
      }
      if (eof_) {
        if (head_ == tail_) return false;
        *line = std::string_view(base + head_, tail_ - head_);
        *pos = buf_pos_ + int64_t(head_);
        head_ = tail_;
        return true;
      }
      fill();
    }
  }

 private:
  void fill() {
    if (head_ > 0) {  // keep the partial line at the front
      std::memmove(buf_.data(), buf_.data() + head_, tail_ - head_);
      buf_pos_ += int64_t(head_);
      tail_ -= head_;
      head_ = 0;
    }
    if (tail_ == buf_.size()) {  // a line longer than the buffer
      if (int64_t(tail_) > kJsonRowMaxBytes)
        throw InvalidLineError(path_ + ":" + std::to_string(count_newlines(path_, buf_pos_) + 1) +
                               ": a line of more than " + std::to_string(kJsonRowMaxBytes >> 20) +
                               " MiB, over the limit of a JSONL row; is this file really preference data?");
      buf_.resize(buf_.size() * 2);
    }
    size_t n = std::fread(buf_.data() + tail_, 1, buf_.size() - tail_, f_.get());
    if (n == 0) {
      if (std::ferror(f_.get())) throw std::runtime_error(path_ + ": read error: " + std::strerror(errno));
      eof_ = true;
    }
    tail_ += n;
  }

  std::string path_;
  std::unique_ptr<FILE, int (*)(FILE*)> f_;
  std::vector<char> buf_;
  size_t head_ = 0, tail_ = 0;
  int64_t buf_pos_ = 0;
  bool eof_ = false;
};

// The kind of a file's rows: that of its first line that is a JSON object (every rank
// reads it from the file's start, so all ranks agree whatever their share). *line gets
// its 1-based line number.
RowKind file_row_kind(const std::string& path, InputFormat format, int64_t* line_no) {
  LineReader reader(path, 0);
  std::string_view line;
  int64_t pos = 0, n = 0;
  while (reader.next(&line, &pos)) {
    ++n;
    if (pos == 0 && line.size() >= 3 && line.substr(0, 3) == "\xEF\xBB\xBF") line.remove_prefix(3);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (is_blank(line)) continue;
    RowKind k = preference_row_kind(line, format);
    if (k != RowKind::kUnknown) {
      *line_no = n;
      return k;
    }
  }
  return RowKind::kUnknown;
}

}  // namespace

PreferenceAttrs preprocess_attrs(const TextTokenizer& tok, const PreprocessOptions& opts) {
  PreferenceAttrs a;
  a.vocab_size = tok.vocab_size();
  a.bos_id = tok.bos_id();
  a.eos_id = tok.eos_id();
  a.pad_id = tok.pad_id();
  a.tokenizer_sha256 = tok.sha256();
  a.tokenizer_type = tokenizer_type_name(tok.kind());
  a.max_length = opts.max_length;
  a.max_prompt_length = opts.max_prompt_length;
  a.source = opts.inputs;
  return a;
}

void preprocess_range(const TextTokenizer& tok, const PreprocessOptions& opts, const std::vector<int64_t>& sizes,
                      int64_t begin, int64_t end, PreferenceWriter* out, PreprocessStats* stats,
                      const ProgressFn& progress, const WarnFn& warn) {
  validate_limits(opts.max_length, opts.max_prompt_length);
  if (sizes.size() != opts.inputs.size()) throw std::invalid_argument("preprocess_range: sizes/inputs mismatch");
  RawTriple raw;
  TokenizedTriple t;
  std::string detail;
  int64_t file_start = 0, bytes_done = 0, since_progress = 0;
  for (size_t fi = 0; fi < opts.inputs.size(); file_start += sizes[fi], ++fi) {
    const std::string& path = opts.inputs[fi];
    const int64_t s = std::max(begin, file_start) - file_start;
    const int64_t e = std::min(end, file_start + sizes[fi]) - file_start;
    if (s >= e) continue;
    // The first line that starts at or after s: the one after the newline at or after s-1.
    LineReader reader(path, s == 0 ? 0 : s - 1);
    std::string_view line;
    int64_t pos = 0;
    if (s > 0 && !reader.next(&line, &pos)) continue;
    int64_t first_line_start = -1, lines_in_segment = 0, base_line = -1;
    auto line_number = [&]() {
      if (base_line < 0) base_line = count_newlines(path, first_line_start);
      return base_line + lines_in_segment;
    };
    RowKind file_kind = RowKind::kUnknown;  // found when the first row needs it
    int64_t file_kind_line = 0;
    int64_t consumed_to = s;  // progress within the segment
    while (reader.next(&line, &pos) && pos < e) {
      if (first_line_start < 0) first_line_start = pos;
      ++lines_in_segment;
      consumed_to = std::min(pos + int64_t(line.size()) + 1, e);
      if (pos == 0 && line.size() >= 3 && line.substr(0, 3) == "\xEF\xBB\xBF") line.remove_prefix(3);  // BOM
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      if (is_blank(line)) continue;
      ++stats->lines;
      RowKind kind = RowKind::kUnknown;
      InvalidReason reason = parse_preference_line(line, opts.format, &raw, &detail, opts.chat_template, &kind);
      if (kind != RowKind::kUnknown) {
        if (file_kind == RowKind::kUnknown) file_kind = file_row_kind(path, opts.format, &file_kind_line);
        if (kind != file_kind)
          throw InvalidLineError(path + ":" + std::to_string(line_number()) + ": a " + row_kind_name(kind) +
                                 " row in a file whose first row (line " + std::to_string(file_kind_line) +
                                 ") is a " + row_kind_name(file_kind) +
                                 " row; a file holds one kind of rows: split it into two files");
      }
      if (reason == InvalidReason::kNoChatTemplate || reason == InvalidReason::kJsonLimit)
        throw InvalidLineError(path + ":" + std::to_string(line_number()) + ": " + detail);
      int64_t encoded = 0;
      if (reason == InvalidReason::kNone) {
        reason = tokenize_triple(tok, raw, opts.max_length, opts.max_prompt_length, &t, &encoded);
        stats->encoded_tokens += encoded;
        if (reason == InvalidReason::kNoRoomForAnswer)
          detail = "the prompt keeps " + std::to_string(t.prompt.size()) + " tokens and max_length is " +
                   std::to_string(opts.max_length);
      }
      if (reason != InvalidReason::kNone) {
        const std::string where = path + ":" + std::to_string(line_number());
        if (!opts.skip_invalid)
          throw InvalidLineError(where + ": " + invalid_reason_text(reason) + " (" + detail +
                                 "); fix the line or pass --skip_invalid to skip such lines");
        ++stats->skipped[int(reason)];
        if (warn) warn(where + ": skipped: " + invalid_reason_text(reason) + " (" + detail + ")");
        continue;
      }
      out->append(t.prompt, t.chosen, t.rejected);
      stats->add_example(t);
      if (progress && ++since_progress >= 64) {
        since_progress = 0;
        progress(bytes_done + consumed_to - s, *stats);
      }
    }
    // This rank's share of the file counts as consumed, whatever lines it held.
    bytes_done += e - s;
    stats->bytes += e - s;
  }
  if (progress) progress(bytes_done, *stats);
}

}  // namespace dpo
