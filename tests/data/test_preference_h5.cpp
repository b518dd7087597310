// The HDF5 preference format: writer/reader round trip, streaming merge, reference
// log-probs, compatibility check, and damaged files (truncated, garbage, wrong dtypes,
// bad offsets, out-of-range ids, wrong version) refused with PreferenceFileError.
#include <gtest/gtest.h>
#include <hdf5.h>

#include <cmath>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "data/preference_h5.h"
#include "tests/test_util.h"

namespace dpo {
namespace {

using testutil::TempDir;

constexpr int64_t kVocab = 100;
const std::string kSha(64, 'a');

PreferenceAttrs test_attrs() {
  PreferenceAttrs a;
  a.vocab_size = kVocab;
  a.bos_id = 1;
  a.eos_id = 2;
  a.pad_id = 2;
  a.tokenizer_sha256 = kSha;
  a.max_length = 64;
  a.max_prompt_length = 32;
  a.source = {"a.jsonl", "dir/b.jsonl"};
  return a;
}

std::vector<PreferenceExample> random_examples(int n, uint32_t seed) {
  std::mt19937 rng(seed);
  auto seq = [&](int min_len, int max_len) {
    std::vector<int32_t> v(min_len + rng() % (max_len - min_len + 1));
    for (auto& t : v) t = int32_t(rng() % kVocab);
    return v;
  };
  std::vector<PreferenceExample> out(n);
  for (int i = 0; i < n; ++i) {
    out[i].index = i;
    out[i].prompt = seq(1, 30);
    out[i].chosen = seq(1, 20);
    out[i].rejected = seq(1, 20);
  }
  return out;
}

void write_examples(const std::string& path, const std::vector<PreferenceExample>& ex,
                    const PreferenceAttrs& attrs = test_attrs(), PreferenceWriterOptions opts = {}) {
  PreferenceWriter w(path, attrs, opts);
  for (const auto& e : ex) w.append(e.prompt, e.chosen, e.rejected);
  w.close();
}

// Expects `fn` to throw PreferenceFileError whose message holds every `needles` entry.
template <typename Fn>
void expect_file_error(Fn&& fn, std::initializer_list<std::string> needles) {
  try {
    fn();
    ADD_FAILURE() << "no PreferenceFileError";
  } catch (const PreferenceFileError& e) {
    for (const auto& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what() << "\n  missing: " << n;
  }
}

// Raw HDF5 surgery on a closed file (the tests' way to damage it precisely).
struct RawFile {
  explicit RawFile(const std::string& path) {
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    id = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    EXPECT_GE(id, 0);
  }
  ~RawFile() { H5Fclose(id); }
  void write_i64(const char* dset, int64_t index, int64_t value) {
    hid_t d = H5Dopen2(id, dset, H5P_DEFAULT);
    write_elem(d, H5T_NATIVE_INT64, index, &value);
    H5Dclose(d);
  }
  void write_i32(const char* dset, int64_t index, int32_t value) {
    hid_t d = H5Dopen2(id, dset, H5P_DEFAULT);
    write_elem(d, H5T_NATIVE_INT32, index, &value);
    H5Dclose(d);
  }
  static void write_elem(hid_t d, hid_t type, int64_t index, const void* v) {
    hid_t fs = H5Dget_space(d);
    hsize_t s = index, c = 1;
    H5Sselect_hyperslab(fs, H5S_SELECT_SET, &s, nullptr, &c, nullptr);
    hid_t ms = H5Screate_simple(1, &c, nullptr);
    EXPECT_GE(H5Dwrite(d, type, ms, fs, H5P_DEFAULT, v), 0);
    H5Sclose(ms);
    H5Sclose(fs);
  }
  // Replaces a dataset by a contiguous one of another type holding n zeros.
  void replace(const char* dset, hid_t type, hsize_t n) {
    EXPECT_GE(H5Ldelete(id, dset, H5P_DEFAULT), 0);
    hid_t s = H5Screate_simple(1, &n, nullptr);
    hid_t d = H5Dcreate2(id, dset, type, s, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    EXPECT_GE(d, 0);
    std::vector<char> zeros(n * H5Tget_size(type) + 1, 0);
    H5Dwrite(d, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, zeros.data());
    H5Dclose(d);
    H5Sclose(s);
  }
  void set_int_attr(const char* name, int64_t v) {
    H5Adelete(id, name);
    hid_t s = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(id, name, H5T_STD_I64LE, s, H5P_DEFAULT, H5P_DEFAULT);
    H5Awrite(a, H5T_NATIVE_INT64, &v);
    H5Aclose(a);
    H5Sclose(s);
  }
  hid_t id;
};

TEST(PreferenceH5, RoundTripWithManySmallChunks) {
  TempDir dir;
  const auto ex = random_examples(257, 1);
  PreferenceWriterOptions o;
  o.chunk_tokens = 7;  // forces many flushes and partial chunks
  o.chunk_offsets = 5;
  write_examples(dir.file("f.h5"), ex, test_attrs(), o);
  PreferenceReader r(dir.file("f.h5"));
  ASSERT_EQ(r.size(), 257);
  EXPECT_EQ(r.attrs().num_examples, 257);
  EXPECT_EQ(r.attrs().vocab_size, kVocab);
  EXPECT_EQ(r.attrs().bos_id, 1);
  EXPECT_EQ(r.attrs().eos_id, 2);
  EXPECT_EQ(r.attrs().pad_id, 2);
  EXPECT_EQ(r.attrs().tokenizer_sha256, kSha);
  EXPECT_EQ(r.attrs().max_length, 64);
  EXPECT_EQ(r.attrs().max_prompt_length, 32);
  EXPECT_EQ(r.attrs().source, (std::vector<std::string>{"a.jsonl", "dir/b.jsonl"}));
  EXPECT_FALSE(r.has_ref_logps());
  int64_t prompt_total = 0;
  // Read in a scrambled order: random access must not depend on what was read before.
  for (int64_t k = 0; k < r.size(); ++k) {
    const int64_t i = (k * 101) % r.size();
    PreferenceExample e = r.get(i);
    EXPECT_EQ(e.index, i);
    EXPECT_EQ(e.prompt, ex[i].prompt) << i;
    EXPECT_EQ(e.chosen, ex[i].chosen) << i;
    EXPECT_EQ(e.rejected, ex[i].rejected) << i;
    EXPECT_TRUE(std::isnan(e.ref_chosen));
    ExampleLengths l = r.lengths(i);
    EXPECT_EQ(l.prompt, int64_t(ex[i].prompt.size()));
    EXPECT_EQ(l.chosen, int64_t(ex[i].chosen.size()));
    EXPECT_EQ(l.rejected, int64_t(ex[i].rejected.size()));
  }
  for (const auto& e : ex) prompt_total += e.prompt.size();
  EXPECT_EQ(r.offsets(Field::kPrompt).back(), prompt_total);
  auto lens = r.example_lengths();
  for (int i = 0; i < 257; ++i)
    EXPECT_EQ(lens[i], int64_t(ex[i].prompt.size() + std::max(ex[i].chosen.size(), ex[i].rejected.size())));
  r.validate_tokens();
  auto batch = r.get_batch({5, 0, 5});
  ASSERT_EQ(batch.size(), 3u);
  EXPECT_EQ(batch[0].chosen, ex[5].chosen);
  EXPECT_EQ(batch[1].prompt, ex[0].prompt);
  EXPECT_THROW(r.get(257), std::out_of_range);
  EXPECT_THROW(r.get(-1), std::out_of_range);
}

TEST(PreferenceH5, EmptyFileHasZeroExamples) {
  TempDir dir;
  write_examples(dir.file("e.h5"), {});
  PreferenceReader r(dir.file("e.h5"));
  EXPECT_EQ(r.size(), 0);
  EXPECT_TRUE(r.example_lengths().empty());
  r.validate_tokens();
}

TEST(PreferenceH5, AppendFileConcatenatesInOrder) {
  TempDir dir;
  const auto a = random_examples(40, 2), b = random_examples(13, 3);
  PreferenceWriterOptions raw;
  raw.deflate_level = 0;
  raw.chunk_tokens = 16;
  write_examples(dir.file("a.h5"), a, test_attrs(), raw);
  write_examples(dir.file("b.h5"), b, test_attrs(), raw);
  write_examples(dir.file("empty.h5"), {}, test_attrs(), raw);
  PreferenceWriterOptions o;
  o.chunk_tokens = 9;
  o.chunk_offsets = 4;
  {
    PreferenceWriter w(dir.file("m.h5"), test_attrs(), o);
    w.append(a[0].prompt, a[0].chosen, a[0].rejected);  // one example before the parts
    w.append_file(dir.file("a.h5"));
    w.append_file(dir.file("empty.h5"));
    w.append_file(dir.file("b.h5"));
    EXPECT_EQ(w.size(), 54);
    w.close();
  }
  std::vector<PreferenceExample> all = {a[0]};
  all.insert(all.end(), a.begin(), a.end());
  all.insert(all.end(), b.begin(), b.end());
  PreferenceReader r(dir.file("m.h5"));
  ASSERT_EQ(r.size(), 54);
  for (int64_t i = 0; i < 54; ++i) {
    auto e = r.get(i);
    EXPECT_EQ(e.prompt, all[i].prompt) << i;
    EXPECT_EQ(e.chosen, all[i].chosen) << i;
    EXPECT_EQ(e.rejected, all[i].rejected) << i;
  }
}

TEST(PreferenceH5, AppendFileRefusesOtherTokenizer) {
  TempDir dir;
  PreferenceAttrs other = test_attrs();
  other.tokenizer_sha256 = std::string(64, 'b');
  write_examples(dir.file("o.h5"), random_examples(3, 4), other);
  PreferenceWriter w(dir.file("m.h5"), test_attrs());
  expect_file_error([&] { w.append_file(dir.file("o.h5")); }, {"o.h5", "tokenizer"});
}

TEST(PreferenceH5, UnclosedWriterLeavesAFileTheReaderRefuses) {
  TempDir dir;
  {
    PreferenceWriter w(dir.file("partial.h5"), test_attrs());
    for (const auto& e : random_examples(10, 5)) w.append(e.prompt, e.chosen, e.rejected);
    // no close(): as if the process died
  }
  expect_file_error([&] { PreferenceReader r(dir.file("partial.h5")); }, {"partial.h5", "num_examples", "incomplete"});
}

TEST(PreferenceH5, RefLogpsAddReplaceRead) {
  TempDir dir;
  const auto ex = random_examples(20, 6);
  write_examples(dir.file("f.h5"), ex);
  expect_file_error([&] { read_ref_logps(dir.file("f.h5")); }, {"f.h5", "ref_logps"});
  std::vector<double> c(20), rj(20);
  for (int i = 0; i < 20; ++i) {
    c[i] = -1.5 * i - 0.25;
    rj[i] = -2.0 * i - 0.125;
  }
  write_ref_logps(dir.file("f.h5"), c, rj);
  {
    PreferenceReader r(dir.file("f.h5"));
    EXPECT_TRUE(r.has_ref_logps());
    auto e = r.get(7);
    EXPECT_EQ(e.ref_chosen, c[7]);
    EXPECT_EQ(e.ref_rejected, rj[7]);
    EXPECT_EQ(e.chosen, ex[7].chosen);  // the tokens are untouched
  }
  for (auto& v : c) v -= 100;  // replace
  write_ref_logps(dir.file("f.h5"), c, rj);
  RefLogps got = read_ref_logps(dir.file("f.h5"));
  EXPECT_EQ(got.chosen, c);
  EXPECT_EQ(got.rejected, rj);
  // Wrong length and non-finite values are refused; the stored values survive.
  EXPECT_ANY_THROW(write_ref_logps(dir.file("f.h5"), std::vector<double>(19, -1.0), std::vector<double>(19, -1.0)));
  auto bad = c;
  bad[3] = std::nan("");
  EXPECT_ANY_THROW(write_ref_logps(dir.file("f.h5"), bad, rj));
  EXPECT_EQ(read_ref_logps(dir.file("f.h5")).chosen, c);
}

TEST(PreferenceH5, RefLogpsOfWrongLengthOrTypeRefusedAtOpen) {
  TempDir dir;
  write_examples(dir.file("f.h5"), random_examples(5, 7));
  write_ref_logps(dir.file("f.h5"), std::vector<double>(5, -1), std::vector<double>(5, -2));
  {
    RawFile f(dir.file("f.h5"));
    f.replace("/ref_logps/rejected", H5T_NATIVE_DOUBLE, 4);
  }
  expect_file_error([&] { PreferenceReader r(dir.file("f.h5")); }, {"f.h5", "/ref_logps/rejected", "4"});
  {
    RawFile f(dir.file("f.h5"));
    f.replace("/ref_logps/rejected", H5T_NATIVE_FLOAT, 5);
  }
  expect_file_error([&] { PreferenceReader r(dir.file("f.h5")); }, {"/ref_logps/rejected", "dtype"});
}

TEST(PreferenceH5, CheckCompatibleNamesBothValuesAndTheFix) {
  TempDir dir;
  write_examples(dir.file("f.h5"), random_examples(2, 8));
  PreferenceReader r(dir.file("f.h5"));
  r.check_compatible(kSha, kVocab);  // same tokenizer: fine
  const std::string other(64, 'c');
  expect_file_error([&] { r.check_compatible(other, kVocab); }, {"f.h5", kSha, other, "re-run dpo_preprocess"});
  expect_file_error([&] { r.check_compatible(kSha, 32000); }, {"f.h5", "100", "32000", "re-run dpo_preprocess"});
}

TEST(PreferenceH5, MissingGarbageEmptyAndTruncatedFilesRefused) {
  TempDir dir;
  expect_file_error([&] { PreferenceReader r(dir.file("nope.h5")); }, {"nope.h5", "cannot open"});
  testutil::write_file(dir.file("garbage.h5"), std::string(5000, 'x'));
  expect_file_error([&] { PreferenceReader r(dir.file("garbage.h5")); }, {"garbage.h5", "HDF5"});
  testutil::write_file(dir.file("zero.h5"), "");
  expect_file_error([&] { PreferenceReader r(dir.file("zero.h5")); }, {"zero.h5"});
  write_examples(dir.file("full.h5"), random_examples(300, 9));
  const std::string bytes = testutil::read_file(dir.file("full.h5"));
  for (double frac : {0.9, 0.5, 0.1}) {
    const std::string p = dir.file("cut.h5");
    testutil::write_file(p, bytes.substr(0, size_t(bytes.size() * frac)));
    expect_file_error([&] { PreferenceReader r(p); r.validate_tokens(); }, {"cut.h5"});
  }
}

TEST(PreferenceH5, WrongTokenDtypeRefused) {
  TempDir dir;
  write_examples(dir.file("f.h5"), random_examples(4, 10));
  hsize_t n;
  {
    PreferenceReader r(dir.file("f.h5"));
    n = r.offsets(Field::kChosen).back();
  }
  {
    RawFile f(dir.file("f.h5"));
    f.replace("/chosen/tokens", H5T_NATIVE_FLOAT, n);
  }
  expect_file_error([&] { PreferenceReader r(dir.file("f.h5")); }, {"f.h5", "/chosen/tokens", "dtype", "int32"});
  {
    RawFile f(dir.file("f.h5"));
    f.replace("/chosen/tokens", H5T_NATIVE_INT64, n);
  }
  expect_file_error([&] { PreferenceReader r(dir.file("f.h5")); }, {"/chosen/tokens", "dtype"});
  write_examples(dir.file("g.h5"), random_examples(4, 10));
  {
    RawFile f(dir.file("g.h5"));
    f.replace("/rejected/offsets", H5T_NATIVE_INT32, 5);
  }
  expect_file_error([&] { PreferenceReader r(dir.file("g.h5")); }, {"/rejected/offsets", "int64"});
}

TEST(PreferenceH5, MissingDatasetRefused) {
  TempDir dir;
  write_examples(dir.file("f.h5"), random_examples(4, 11));
  {
    RawFile f(dir.file("f.h5"));
    H5Ldelete(f.id, "/prompt/offsets", H5P_DEFAULT);
  }
  expect_file_error([&] { PreferenceReader r(dir.file("f.h5")); }, {"f.h5", "missing dataset /prompt/offsets"});
}

TEST(PreferenceH5, BadOffsetsRefused) {
  TempDir dir;
  const auto ex = random_examples(30, 12);
  struct Case {
    const char* dset;
    int64_t index;
    int64_t value;
    const char* needle;
  };
  const int64_t total_chosen = [&] {
    int64_t t = 0;
    for (const auto& e : ex) t += e.chosen.size();
    return t;
  }();
  const Case cases[] = {
      {"/prompt/offsets", 0, 1, "/prompt/offsets[0]"},                       // offsets[0] != 0
      {"/chosen/offsets", 10, 1000000, "/chosen/offsets[10]"},               // past the tokens
      {"/chosen/offsets", 10, -5, "/chosen/offsets[10]"},                     // negative / decreasing
      {"/rejected/offsets", 30, 3, "/rejected/offsets"},                      // last != tokens length
      {"/chosen/offsets", 30, total_chosen - 1, "/chosen/offsets[N]"},        // last short of the tokens
  };
  for (const auto& c : cases) {
    write_examples(dir.file("f.h5"), ex);
    {
      RawFile f(dir.file("f.h5"));
      f.write_i64(c.dset, c.index, c.value);
    }
    expect_file_error([&] { PreferenceReader r(dir.file("f.h5")); }, {"f.h5", c.needle});
  }
  // Offsets array of the wrong length (num_examples disagrees).
  write_examples(dir.file("f.h5"), ex);
  {
    RawFile f(dir.file("f.h5"));
    f.set_int_attr("num_examples", 31);
  }
  expect_file_error([&] { PreferenceReader r(dir.file("f.h5")); }, {"offsets", "num_examples + 1"});
}

TEST(PreferenceH5, OutOfRangeTokenIdRefusedOnReadAndScan) {
  TempDir dir;
  const auto ex = random_examples(30, 13);
  write_examples(dir.file("f.h5"), ex);
  int64_t pos;
  {
    PreferenceReader r(dir.file("f.h5"));
    pos = r.offsets(Field::kRejected)[17];  // first rejected token of example 17
  }
  {
    RawFile f(dir.file("f.h5"));
    f.write_i32("/rejected/tokens", pos, int32_t(kVocab));
  }
  {
    PreferenceReader r(dir.file("f.h5"));  // lazy: opening does not scan the tokens
    EXPECT_EQ(r.get(16).rejected, ex[16].rejected);
    expect_file_error([&] { r.get(17); }, {"f.h5", "/rejected/tokens", "example 17", "vocab_size=100"});
    expect_file_error([&] { r.validate_tokens(); }, {"/rejected/tokens[" + std::to_string(pos) + "]"});
  }
  {
    RawFile f(dir.file("f.h5"));
    f.write_i32("/rejected/tokens", pos, -3);
  }
  PreferenceReader r2(dir.file("f.h5"));
  expect_file_error([&] { r2.get(17); }, {"-3"});
}

TEST(PreferenceH5, WrongFormatOrVersionOrAttributesRefused) {
  TempDir dir;
  write_examples(dir.file("f.h5"), random_examples(3, 14));
  {
    RawFile f(dir.file("f.h5"));
    f.set_int_attr("format_version", 2);
  }
  expect_file_error([&] { PreferenceReader r(dir.file("f.h5")); }, {"f.h5", "format_version 2", "re-run dpo_preprocess"});
  write_examples(dir.file("f.h5"), random_examples(3, 14));
  {
    RawFile f(dir.file("f.h5"));
    f.set_int_attr("eos_id", 100);
  }
  expect_file_error([&] { PreferenceReader r(dir.file("f.h5")); }, {"eos_id"});
  write_examples(dir.file("f.h5"), random_examples(3, 14));
  {
    RawFile f(dir.file("f.h5"));
    H5Adelete(f.id, "format");
  }
  expect_file_error([&] { PreferenceReader r(dir.file("f.h5")); }, {"not a dpo preference file"});
  {
    // A plain HDF5 file of something else.
    hid_t id = H5Fcreate(dir.file("other.h5").c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    H5Fclose(id);
  }
  expect_file_error([&] { PreferenceReader r(dir.file("other.h5")); }, {"other.h5", "not a dpo preference file"});
}

}  // namespace
}  // namespace dpo
