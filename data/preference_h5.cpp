#include "data/preference_h5.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <tuple>

#include "data/h5_util.h"

namespace dpo {

using h5::H5Id;

namespace {

constexpr const char* kRefGroup = "ref_logps";
constexpr const char* kRefTmpGroup = "ref_logps.tmp";
constexpr int64_t kScanBlock = 1 << 20;  // elements per block of streamed reads

constexpr Field kFields[kNumFields] = {Field::kPrompt, Field::kChosen, Field::kRejected};

std::string tokens_path(Field f) { return std::string("/") + field_name(f) + "/tokens"; }
std::string offsets_path(Field f) { return std::string("/") + field_name(f) + "/offsets"; }

// Runs `fn`, rethrowing any failure as PreferenceFileError prefixed with the file name.
template <typename Fn>
auto with_context(const std::string& path, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const PreferenceFileError&) {
    throw;
  } catch (const std::exception& e) {
    throw PreferenceFileError(path + ": " + e.what());
  }
}

H5Id open_file(const std::string& path, unsigned flags) {
  h5::init();
  hid_t id = H5Fopen(path.c_str(), flags, H5P_DEFAULT);
  if (id < 0) {
    std::string why = h5::error_stack_message();
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) throw PreferenceFileError(path + ": cannot open (no such file or no permission)");
    std::fclose(f);
    throw PreferenceFileError(path + ": not a readable HDF5 file (damaged or truncated? " + why +
                              "); re-run dpo_preprocess to recreate it");
  }
  return H5Id(id, H5Fclose);
}

// Checks the stored type of a dataset: integer/float class, byte size, signedness.
void check_dtype(hid_t dset, const std::string& name, H5T_class_t cls, size_t size, const char* expected) {
  H5Id type = H5_OWN(H5Dget_type(dset), H5Tclose);
  bool ok = H5Tget_class(type.get()) == cls && H5Tget_size(type.get()) == size;
  if (ok && cls == H5T_INTEGER) ok = H5Tget_sign(type.get()) == H5T_SGN_2;
  if (!ok) throw std::runtime_error(name + ": wrong dtype (expected " + expected + ")");
}

H5Id open_dataset(hid_t file, const std::string& name, hid_t dapl = H5P_DEFAULT) {
  if (!h5::link_exists(file, name)) throw std::runtime_error("missing dataset " + name);
  return H5_OWN(H5Dopen2(file, name.c_str(), dapl), H5Dclose);
}

bool is_hex64(const std::string& s) {
  return s.size() == 64 && std::all_of(s.begin(), s.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

// Reads and validates the root attributes.
PreferenceAttrs read_attrs(hid_t file) {
  PreferenceAttrs a;
  if (!h5::attr_exists(file, "format"))
    throw std::runtime_error("missing attribute 'format': not a dpo preference file (create it with dpo_preprocess)");
  const std::string format = h5::read_attr_string(file, "format");
  if (format != kPreferenceFormat)
    throw std::runtime_error("attribute format is '" + format + "', expected '" + kPreferenceFormat +
                             "': not a dpo preference file");
  a.format_version = h5::read_attr_int(file, "format_version");
  if (a.format_version != kPreferenceFormatVersion)
    throw std::runtime_error("format_version " + std::to_string(a.format_version) +
                             " is not supported (this build reads version " +
                             std::to_string(kPreferenceFormatVersion) + "); re-run dpo_preprocess with this build");
  if (!h5::attr_exists(file, "num_examples"))
    throw std::runtime_error("missing attribute 'num_examples': the file is incomplete (its writer did not finish); re-run dpo_preprocess");
  a.num_examples = h5::read_attr_int(file, "num_examples");
  a.vocab_size = h5::read_attr_int(file, "vocab_size");
  a.bos_id = h5::read_attr_int(file, "bos_id");
  a.eos_id = h5::read_attr_int(file, "eos_id");
  a.pad_id = h5::read_attr_int(file, "pad_id");
  a.tokenizer_sha256 = h5::read_attr_string(file, "tokenizer_sha256");
  a.max_length = h5::read_attr_int(file, "max_length");
  a.max_prompt_length = h5::read_attr_int(file, "max_prompt_length");
  a.source = h5::read_attr_strings(file, "source");
  if (a.num_examples < 0) throw std::runtime_error("attribute num_examples is negative");
  if (a.vocab_size <= 0 || a.vocab_size > (int64_t(1) << 31))
    throw std::runtime_error("attribute vocab_size = " + std::to_string(a.vocab_size) + " is out of range");
  // tokenizer_type came with tokenizer.json support; files written before it are
  // sentencepiece files of the same format_version.
  a.tokenizer_type = h5::attr_exists(file, "tokenizer_type") ? h5::read_attr_string(file, "tokenizer_type")
                                                              : std::string("sentencepiece");
  if (a.tokenizer_type != "sentencepiece" && a.tokenizer_type != "tokenizers-json")
    throw std::runtime_error("attribute tokenizer_type is '" + a.tokenizer_type +
                             "', expected 'sentencepiece' or 'tokenizers-json'");
  // bos_id may be -1: a tokenizer without bos (Qwen).
  if (a.bos_id < -1 || a.bos_id >= a.vocab_size)
    throw std::runtime_error("attribute bos_id = " + std::to_string(a.bos_id) + " is outside [-1, vocab_size=" +
                             std::to_string(a.vocab_size) + ") (-1: no bos)");
  for (auto [name, v] : {std::pair<const char*, int64_t>{"eos_id", a.eos_id}, {"pad_id", a.pad_id}})
    if (v < 0 || v >= a.vocab_size)
      throw std::runtime_error(std::string("attribute ") + name + " = " + std::to_string(v) + " is outside [0, vocab_size=" +
                               std::to_string(a.vocab_size) + ")");
  if (!is_hex64(a.tokenizer_sha256))
    throw std::runtime_error("attribute tokenizer_sha256 is not 64 lowercase hex digits");
  if (a.max_prompt_length < 1 || a.max_length <= a.max_prompt_length)
    throw std::runtime_error("attributes max_length/max_prompt_length (" + std::to_string(a.max_length) + "/" +
                             std::to_string(a.max_prompt_length) + ") are inconsistent");
  return a;
}

void write_attrs(hid_t file, const PreferenceAttrs& a) {
  h5::write_attr_string(file, "format", kPreferenceFormat);
  h5::write_attr_int(file, "format_version", kPreferenceFormatVersion);
  h5::write_attr_int(file, "vocab_size", a.vocab_size);
  h5::write_attr_int(file, "bos_id", a.bos_id);
  h5::write_attr_int(file, "eos_id", a.eos_id);
  h5::write_attr_int(file, "pad_id", a.pad_id);
  h5::write_attr_string(file, "tokenizer_sha256", a.tokenizer_sha256);
  h5::write_attr_string(file, "tokenizer_type", a.tokenizer_type);
  h5::write_attr_int(file, "max_length", a.max_length);
  h5::write_attr_int(file, "max_prompt_length", a.max_prompt_length);
  h5::write_attr_strings(file, "source", a.source);
}

// One column's datasets, opened and type-checked; `tokens_len` = length of tokens.
struct Column {
  H5Id tokens, offsets;
  int64_t tokens_len = 0;
};

Column open_column(hid_t file, Field f, int64_t n, hid_t tokens_dapl = H5P_DEFAULT) {
  Column c;
  c.tokens = open_dataset(file, tokens_path(f), tokens_dapl);
  check_dtype(c.tokens.get(), tokens_path(f), H5T_INTEGER, 4, "int32");
  c.tokens_len = h5::length_1d(c.tokens.get(), tokens_path(f));
  c.offsets = open_dataset(file, offsets_path(f));
  check_dtype(c.offsets.get(), offsets_path(f), H5T_INTEGER, 8, "int64");
  int64_t n_off = h5::length_1d(c.offsets.get(), offsets_path(f));
  if (n_off != n + 1)
    throw std::runtime_error(offsets_path(f) + " has " + std::to_string(n_off) + " entries, expected num_examples + 1 = " +
                             std::to_string(n + 1));
  // Every element must have been written (shown with a structured fuzz_preference_h5 input,
  // tests/fuzz/regressions/preference_h5/unwritten_offsets_2e33: a 30 KB
  // file declaring 2^33 unwritten offsets made the reader allocate 64 GB).
  for (auto [dset, len, name] : {std::tuple<hid_t, int64_t, std::string>{c.offsets.get(), n_off, offsets_path(f)},
                                 {c.tokens.get(), c.tokens_len, tokens_path(f)}})
    if (h5::stored_elements_1d(dset) < len)
      throw std::runtime_error(name + " declares " + std::to_string(len) + " elements but the file stores only " +
                               std::to_string(h5::stored_elements_1d(dset)) +
                               " (damaged or incomplete); re-run dpo_preprocess");
  return c;
}

// Validates one block of offsets continuing from `prev` (the last offset seen, or -1
// before the first block).
void check_offsets_block(const int64_t* off, int64_t count, int64_t first_index, int64_t* prev, int64_t tokens_len,
                         Field f) {
  for (int64_t k = 0; k < count; ++k) {
    const int64_t v = off[k], idx = first_index + k;
    if (idx == 0 && v != 0) throw std::runtime_error(offsets_path(f) + "[0] = " + std::to_string(v) + ", expected 0");
    if (v < *prev || v > tokens_len)
      throw std::runtime_error(offsets_path(f) + "[" + std::to_string(idx) + "] = " + std::to_string(v) +
                               " is out of range (previous " + std::to_string(*prev) + ", tokens length " +
                               std::to_string(tokens_len) + ")");
    *prev = v;
  }
}

void check_ids(const int32_t* ids, int64_t n, int64_t vocab, Field f, int64_t start, int64_t example) {
  for (int64_t k = 0; k < n; ++k) {
    if (ids[k] < 0 || ids[k] >= vocab) {
      std::string where = example >= 0 ? " (example " + std::to_string(example) + ")" : "";
      throw std::runtime_error(tokens_path(f) + "[" + std::to_string(start + k) + "] = " + std::to_string(ids[k]) +
                               where + " is outside [0, vocab_size=" + std::to_string(vocab) +
                               "): the file is damaged; re-run dpo_preprocess");
    }
  }
}

}  // namespace

const char* field_name(Field f) {
  switch (f) {
    case Field::kPrompt: return "prompt";
    case Field::kChosen: return "chosen";
    case Field::kRejected: return "rejected";
  }
  return "?";
}

// ---------------------------------------------------------------------------
// Writer

struct PreferenceWriter::Impl {
  struct Col {
    H5Id tokens, offsets;
    std::vector<int32_t> tok_buf;
    std::vector<int64_t> off_buf;
    int64_t tok_in_file = 0, off_in_file = 0;  // elements already in the datasets
    int64_t total_tokens = 0;                  // including buffered
  };
  PreferenceWriterOptions opts;
  PreferenceAttrs attrs;
  H5Id file;
  Col cols[kNumFields];
  int64_t n = 0;
  bool closed = false;

  // Writes whole chunks only (a partial chunk is written once, at close): rewriting a
  // compressed chunk would cost a read-decompress-recompress.
  template <typename T>
  static void flush_whole(std::vector<T>& buf, hid_t dset, hid_t mem_type, int64_t* in_file, int64_t chunk, bool all) {
    const int64_t count = all ? int64_t(buf.size()) : int64_t(buf.size()) / chunk * chunk;
    if (count == 0) return;
    h5::append_1d(dset, mem_type, buf.data(), *in_file, count);
    *in_file += count;
    buf.erase(buf.begin(), buf.begin() + count);
  }
  void maybe_flush(Col& c) {
    if (int64_t(c.tok_buf.size()) >= 8 * opts.chunk_tokens)
      flush_whole(c.tok_buf, c.tokens.get(), H5T_NATIVE_INT32, &c.tok_in_file, opts.chunk_tokens, false);
    if (int64_t(c.off_buf.size()) >= 8 * opts.chunk_offsets)
      flush_whole(c.off_buf, c.offsets.get(), H5T_NATIVE_INT64, &c.off_in_file, opts.chunk_offsets, false);
  }
  void add(Col& c, const int32_t* ids, int64_t count) {
    c.tok_buf.insert(c.tok_buf.end(), ids, ids + count);
    c.total_tokens += count;
    c.off_buf.push_back(c.total_tokens);
    maybe_flush(c);
  }
};

PreferenceWriter::PreferenceWriter(const std::string& path, const PreferenceAttrs& attrs,
                                   const PreferenceWriterOptions& opts)
    : impl_(std::make_unique<Impl>()), path_(path) {
  if (opts.chunk_tokens < 1 || opts.chunk_offsets < 1 || opts.deflate_level < 0 || opts.deflate_level > 9)
    throw std::invalid_argument(path + ": bad PreferenceWriterOptions (chunks >= 1, deflate_level 0..9)");
  impl_->opts = opts;
  impl_->attrs = attrs;
  with_context(path, [&] {
    h5::init();
    std::lock_guard<std::recursive_mutex> lock(h5::mutex());
    impl_->file = H5_OWN(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), H5Fclose);
    write_attrs(impl_->file.get(), attrs);
    for (Field f : kFields) {
      auto& c = impl_->cols[int(f)];
      H5Id group = H5_OWN(H5Gcreate2(impl_->file.get(), field_name(f), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
      c.tokens = h5::create_extendible_1d(group.get(), "tokens", H5T_STD_I32LE, opts.chunk_tokens, opts.deflate_level);
      c.offsets = h5::create_extendible_1d(group.get(), "offsets", H5T_STD_I64LE, opts.chunk_offsets, opts.deflate_level);
      c.off_buf.push_back(0);
      c.tok_buf.reserve(9 * opts.chunk_tokens);
    }
  });
}

PreferenceWriter::~PreferenceWriter() {
  std::lock_guard<std::recursive_mutex> lock(h5::mutex());
  impl_.reset();
}

int64_t PreferenceWriter::size() const { return impl_->n; }
int64_t PreferenceWriter::tokens(Field f) const { return impl_->cols[int(f)].total_tokens; }

void PreferenceWriter::append(const std::vector<int32_t>& prompt, const std::vector<int32_t>& chosen,
                              const std::vector<int32_t>& rejected) {
  if (impl_->closed) throw std::logic_error(path_ + ": append after close");
  with_context(path_, [&] {
    std::lock_guard<std::recursive_mutex> lock(h5::mutex());
    impl_->add(impl_->cols[0], prompt.data(), prompt.size());
    impl_->add(impl_->cols[1], chosen.data(), chosen.size());
    impl_->add(impl_->cols[2], rejected.data(), rejected.size());
  });
  ++impl_->n;
}

void PreferenceWriter::append_file(const std::string& part) {
  if (impl_->closed) throw std::logic_error(path_ + ": append_file after close");
  std::lock_guard<std::recursive_mutex> lock(h5::mutex());
  H5Id file = open_file(part, H5F_ACC_RDONLY);
  const PreferenceAttrs a = with_context(part, [&] { return read_attrs(file.get()); });
  const PreferenceAttrs& mine = impl_->attrs;
  if (a.tokenizer_sha256 != mine.tokenizer_sha256 || a.tokenizer_type != mine.tokenizer_type || a.vocab_size != mine.vocab_size || a.bos_id != mine.bos_id ||
      a.eos_id != mine.eos_id || a.pad_id != mine.pad_id || a.max_length != mine.max_length ||
      a.max_prompt_length != mine.max_prompt_length)
    throw PreferenceFileError(part + ": cannot append to " + path_ +
                              ": tokenizer, special ids or length limits differ");
  with_context(part, [&] {
    std::vector<int64_t> off;
    std::vector<int32_t> tok;
    for (Field f : kFields) {
      Column src = open_column(file.get(), f, a.num_examples);
      auto& c = impl_->cols[int(f)];
      const int64_t base = c.total_tokens;
      // Offsets 1..N of the part, shifted by the tokens already in this column.
      int64_t prev = -1;
      for (int64_t start = 0; start <= a.num_examples; start += kScanBlock) {
        const int64_t cnt = std::min<int64_t>(kScanBlock, a.num_examples + 1 - start);
        off.resize(cnt);
        h5::read_1d(src.offsets.get(), H5T_NATIVE_INT64, off.data(), start, cnt);
        check_offsets_block(off.data(), cnt, start, &prev, src.tokens_len, f);
        for (int64_t k = (start == 0 ? 1 : 0); k < cnt; ++k) c.off_buf.push_back(base + off[k]);
        Impl::flush_whole(c.off_buf, c.offsets.get(), H5T_NATIVE_INT64, &c.off_in_file, impl_->opts.chunk_offsets, false);
      }
      if (prev != src.tokens_len)
        throw std::runtime_error(offsets_path(f) + " ends at " + std::to_string(prev) + ", tokens has " +
                                 std::to_string(src.tokens_len));
      for (int64_t start = 0; start < src.tokens_len; start += kScanBlock) {
        const int64_t cnt = std::min<int64_t>(kScanBlock, src.tokens_len - start);
        tok.resize(cnt);
        h5::read_1d(src.tokens.get(), H5T_NATIVE_INT32, tok.data(), start, cnt);
        check_ids(tok.data(), cnt, a.vocab_size, f, start, -1);
        c.tok_buf.insert(c.tok_buf.end(), tok.begin(), tok.end());
        c.total_tokens += cnt;
        Impl::flush_whole(c.tok_buf, c.tokens.get(), H5T_NATIVE_INT32, &c.tok_in_file, impl_->opts.chunk_tokens, false);
      }
    }
  });
  impl_->n += a.num_examples;
}

void PreferenceWriter::close() {
  if (impl_->closed) return;
  with_context(path_, [&] {
    std::lock_guard<std::recursive_mutex> lock(h5::mutex());
    for (auto& c : impl_->cols) {
      Impl::flush_whole(c.tok_buf, c.tokens.get(), H5T_NATIVE_INT32, &c.tok_in_file, impl_->opts.chunk_tokens, true);
      Impl::flush_whole(c.off_buf, c.offsets.get(), H5T_NATIVE_INT64, &c.off_in_file, impl_->opts.chunk_offsets, true);
      c.tokens.close();
      c.offsets.close();
    }
    // Last: a file carries num_examples only when everything before it is written.
    h5::write_attr_int(impl_->file.get(), "num_examples", impl_->n);
    H5_CHECK(H5Fflush(impl_->file.get(), H5F_SCOPE_GLOBAL));
    impl_->file.close();
  });
  impl_->closed = true;
}

// ---------------------------------------------------------------------------
// Reader

struct PreferenceReader::Impl {
  std::string path;
  PreferenceAttrs attrs;
  H5Id file;
  Column cols[kNumFields];
  std::vector<int64_t> offsets[kNumFields];
  bool has_ref = false;
  std::vector<double> ref_chosen, ref_rejected;

  void read_ids(Field f, int64_t start, int64_t n, int32_t* out) const {
    h5::read_1d(cols[int(f)].tokens.get(), H5T_NATIVE_INT32, out, start, n);
  }
};

static void read_ref_group(hid_t file, const std::string& group, int64_t n, std::vector<double>* chosen,
                           std::vector<double>* rejected) {
  for (int k = 0; k < 2; ++k) {
    const std::string name = "/" + group + (k == 0 ? "/chosen" : "/rejected");
    H5Id d = open_dataset(file, name);
    check_dtype(d.get(), name, H5T_FLOAT, 8, "float64");
    int64_t len = h5::length_1d(d.get(), name);
    if (len != n)
      throw std::runtime_error(name + " has " + std::to_string(len) + " values, expected num_examples = " +
                               std::to_string(n));
    auto* out = k == 0 ? chosen : rejected;
    out->resize(n);
    h5::read_1d(d.get(), H5T_NATIVE_DOUBLE, out->data(), 0, n);
  }
}

PreferenceReader::PreferenceReader(const std::string& path) : impl_(std::make_unique<Impl>()) {
  impl_->path = path;
  std::lock_guard<std::recursive_mutex> lock(h5::mutex());
  impl_->file = open_file(path, H5F_ACC_RDONLY);
  with_context(path, [&] {
    impl_->attrs = read_attrs(impl_->file.get());
    const int64_t n = impl_->attrs.num_examples;
    // A 4 MiB chunk cache per token dataset keeps neighbouring random reads of one
    // epoch's batches from decompressing the same chunk again.
    H5Id dapl = H5_OWN(H5Pcreate(H5P_DATASET_ACCESS), H5Pclose);
    H5_CHECK(H5Pset_chunk_cache(dapl.get(), 521, 4 << 20, 0.75));
    for (Field f : kFields) {
      impl_->cols[int(f)] = open_column(impl_->file.get(), f, n, dapl.get());
      auto& off = impl_->offsets[int(f)];
      off.resize(n + 1);
      h5::read_1d(impl_->cols[int(f)].offsets.get(), H5T_NATIVE_INT64, off.data(), 0, n + 1);
      int64_t prev = -1;
      check_offsets_block(off.data(), n + 1, 0, &prev, impl_->cols[int(f)].tokens_len, f);
      if (off.back() != impl_->cols[int(f)].tokens_len)
        throw std::runtime_error(offsets_path(f) + "[N] = " + std::to_string(off.back()) +
                                 " differs from the length of " + tokens_path(f) + " (" +
                                 std::to_string(impl_->cols[int(f)].tokens_len) + ")");
      // Every example has a prompt (at least bos); empty answers never get written.
      for (int64_t i = 0; i < n; ++i)
        if (off[i + 1] == off[i])
          throw std::runtime_error(offsets_path(f) + ": example " + std::to_string(i) + " is empty");
    }
    if (h5::link_exists(impl_->file.get(), kRefGroup)) {
      read_ref_group(impl_->file.get(), kRefGroup, n, &impl_->ref_chosen, &impl_->ref_rejected);
      impl_->has_ref = true;
    }
  });
}

PreferenceReader::~PreferenceReader() {
  std::lock_guard<std::recursive_mutex> lock(h5::mutex());
  for (auto& c : impl_->cols) {
    c.tokens.reset();
    c.offsets.reset();
  }
  impl_->file.reset();
}

int64_t PreferenceReader::size() const { return impl_->attrs.num_examples; }
bool PreferenceReader::has_ref_logps() const { return impl_->has_ref; }
const PreferenceAttrs& PreferenceReader::attrs() const { return impl_->attrs; }
const std::string& PreferenceReader::path() const { return impl_->path; }
const std::vector<int64_t>& PreferenceReader::offsets(Field f) const { return impl_->offsets[int(f)]; }

ExampleLengths PreferenceReader::lengths(int64_t i) const {
  if (i < 0 || i >= size())
    throw std::out_of_range(impl_->path + ": example " + std::to_string(i) + " out of range [0, " +
                            std::to_string(size()) + ")");
  const auto& o = impl_->offsets;
  return {o[0][i + 1] - o[0][i], o[1][i + 1] - o[1][i], o[2][i + 1] - o[2][i]};
}

std::vector<int64_t> PreferenceReader::example_lengths() const {
  const auto& o = impl_->offsets;
  std::vector<int64_t> out(size());
  for (int64_t i = 0; i < size(); ++i)
    out[i] = (o[0][i + 1] - o[0][i]) + std::max(o[1][i + 1] - o[1][i], o[2][i + 1] - o[2][i]);
  return out;
}

void PreferenceReader::read_tokens(Field f, int64_t start, int64_t n, int32_t* out) const {
  const int64_t len = impl_->cols[int(f)].tokens_len;
  if (start < 0 || n < 0 || start + n > len)
    throw std::out_of_range(impl_->path + ": " + tokens_path(f) + " range [" + std::to_string(start) + ", " +
                            std::to_string(start + n) + ") outside [0, " + std::to_string(len) + ")");
  std::lock_guard<std::recursive_mutex> lock(h5::mutex());
  with_context(impl_->path, [&] { impl_->read_ids(f, start, n, out); });
}

PreferenceExample PreferenceReader::get(int64_t i) const {
  if (i < 0 || i >= size())
    throw std::out_of_range(impl_->path + ": example " + std::to_string(i) + " out of range [0, " +
                            std::to_string(size()) + ")");
  PreferenceExample ex;
  ex.index = i;
  std::vector<int32_t>* dst[kNumFields] = {&ex.prompt, &ex.chosen, &ex.rejected};
  std::lock_guard<std::recursive_mutex> lock(h5::mutex());
  with_context(impl_->path, [&] {
    for (Field f : kFields) {
      const auto& off = impl_->offsets[int(f)];
      const int64_t start = off[i], n = off[i + 1] - off[i];
      dst[int(f)]->resize(n);
      impl_->read_ids(f, start, n, dst[int(f)]->data());
      check_ids(dst[int(f)]->data(), n, impl_->attrs.vocab_size, f, start, i);
    }
  });
  if (impl_->has_ref) {
    ex.ref_chosen = impl_->ref_chosen[i];
    ex.ref_rejected = impl_->ref_rejected[i];
  }
  return ex;
}

std::vector<PreferenceExample> PreferenceReader::get_batch(const std::vector<int64_t>& indices) const {
  std::vector<PreferenceExample> out;
  out.reserve(indices.size());
  for (int64_t i : indices) out.push_back(get(i));
  return out;
}

void PreferenceReader::validate_tokens() const {
  std::vector<int32_t> buf;
  std::lock_guard<std::recursive_mutex> lock(h5::mutex());
  with_context(impl_->path, [&] {
    for (Field f : kFields) {
      const int64_t len = impl_->cols[int(f)].tokens_len;
      for (int64_t start = 0; start < len; start += kScanBlock) {
        const int64_t cnt = std::min<int64_t>(kScanBlock, len - start);
        buf.resize(cnt);
        impl_->read_ids(f, start, cnt, buf.data());
        check_ids(buf.data(), cnt, impl_->attrs.vocab_size, f, start, -1);
      }
    }
  });
}

void PreferenceReader::check_compatible(const std::string& tokenizer_sha256, int64_t vocab_size) const {
  const auto& a = impl_->attrs;
  if (a.tokenizer_sha256 == tokenizer_sha256 && a.vocab_size == vocab_size) return;
  throw PreferenceFileError(
      impl_->path + ": tokenized with another tokenizer than the model's (file: tokenizer_sha256 " +
      a.tokenizer_sha256 + ", vocab_size " + std::to_string(a.vocab_size) + "; model: tokenizer_sha256 " +
      tokenizer_sha256 + ", vocab_size " + std::to_string(vocab_size) +
      "); re-run dpo_preprocess with the model's tokenizer (--model_name_or_path MODEL_DIR)");
}

// ---------------------------------------------------------------------------
// Reference log-probs

RefLogps read_ref_logps(const std::string& path) {
  std::lock_guard<std::recursive_mutex> lock(h5::mutex());
  H5Id file = open_file(path, H5F_ACC_RDONLY);
  return with_context(path, [&] {
    const PreferenceAttrs a = read_attrs(file.get());
    if (!h5::link_exists(file.get(), kRefGroup))
      throw std::runtime_error("has no /ref_logps (compute them with dpo_score --write_ref_logps)");
    RefLogps r;
    read_ref_group(file.get(), kRefGroup, a.num_examples, &r.chosen, &r.rejected);
    return r;
  });
}

void write_ref_logps(const std::string& path, const std::vector<double>& chosen, const std::vector<double>& rejected) {
  std::lock_guard<std::recursive_mutex> lock(h5::mutex());
  H5Id file = open_file(path, H5F_ACC_RDWR);
  with_context(path, [&] {
    const PreferenceAttrs a = read_attrs(file.get());
    if (int64_t(chosen.size()) != a.num_examples || int64_t(rejected.size()) != a.num_examples)
      throw std::invalid_argument("write_ref_logps: got " + std::to_string(chosen.size()) + " chosen and " +
                                  std::to_string(rejected.size()) + " rejected values for " +
                                  std::to_string(a.num_examples) + " examples");
    for (size_t i = 0; i < chosen.size(); ++i)
      if (!std::isfinite(chosen[i]) || !std::isfinite(rejected[i]))
        throw std::invalid_argument("write_ref_logps: example " + std::to_string(i) + " has a non-finite log-prob");
    // Step 1: the new group under a temporary name (a leftover from an earlier crash goes).
    if (h5::link_exists(file.get(), kRefTmpGroup)) H5_CHECK(H5Ldelete(file.get(), kRefTmpGroup, H5P_DEFAULT));
    {
      H5Id g = H5_OWN(H5Gcreate2(file.get(), kRefTmpGroup, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
      const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(8192, a.num_examples));
      for (int k = 0; k < 2; ++k) {
        H5Id d = h5::create_fixed_1d(g.get(), k == 0 ? "chosen" : "rejected", H5T_IEEE_F64LE, a.num_examples, chunk, 1);
        h5::write_1d(d.get(), H5T_NATIVE_DOUBLE, (k == 0 ? chosen : rejected).data(), 0, a.num_examples);
      }
    }
    H5_CHECK(H5Fflush(file.get(), H5F_SCOPE_GLOBAL));
    // Step 2: swap it in. The old values' space is not reclaimed (HDF5 never shrinks a
    // file; h5repack does).
    if (h5::link_exists(file.get(), kRefGroup)) H5_CHECK(H5Ldelete(file.get(), kRefGroup, H5P_DEFAULT));
    H5_CHECK(H5Lmove(file.get(), kRefTmpGroup, file.get(), kRefGroup, H5P_DEFAULT, H5P_DEFAULT));
    H5_CHECK(H5Fflush(file.get(), H5F_SCOPE_GLOBAL));
    file.close();
  });
}

}  // namespace dpo
