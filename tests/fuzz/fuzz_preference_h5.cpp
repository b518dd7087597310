// Fuzzes the HDF5 preference file reader (data/preference_h5.h) as dpo_dist and
// dpo_score open --train_file, in two modes chosen by the first input byte:
//  - odd: the rest of the input is the whole file (seeds: real writer outputs). This
//    mostly exercises libhdf5's own parser, which is not ours: Debian's libhdf5 1.10.8
//    has use-after-free, infinite-loop and huge-allocation bugs on damaged files
//    (tests/fuzz/libhdf5_issues/), so scripts/fuzz.sh sets DPO_FUZZ_H5_STRUCTURED=1,
//    which turns every input into the structured mode.
//  - even: structured. The harness writes a well-formed HDF5 file with the HDF5 API
//    whose CONTENTS come from the input: every root attribute (right or wrong type and
//    value), offsets and token values, dataset lengths (also huge, sparse chunked ones
//    that cost nothing on disk), int32/int64 dtypes swapped, /ref_logps present or not,
//    of any length and value (NaN, inf). This is what tests our validation.
// Checked: an opened file's examples read back with the lengths of its offsets and ids
// inside [0, vocab_size); validate_tokens and /ref_logps reads succeed or throw the
// reader's error.
#include <hdf5.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "data/preference_h5.h"
#include "tests/fuzz/fuzz_common.h"

namespace {

// Takes little-endian values from the input; zeros once it is used up.
struct Input {
  const uint8_t* p;
  size_t n;
  uint8_t u8() { return n ? (--n, *p++) : 0; }
  int16_t i16() { return static_cast<int16_t>(u8() | (u8() << 8)); }
  int64_t i64() {
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v |= uint64_t{u8()} << (8 * i);
    return static_cast<int64_t>(v);
  }
  double f64() {
    const int64_t v = i64();
    double d;
    std::memcpy(&d, &v, sizeof d);
    return d;
  }
};

void attr_int(hid_t loc, const char* name, int64_t v, bool as_string) {
  if (as_string) {
    hid_t t = H5Tcopy(H5T_C_S1);
    H5Tset_size(t, 4);
    hid_t s = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(loc, name, t, s, H5P_DEFAULT, H5P_DEFAULT);
    H5Awrite(a, t, "12\0\0");
    H5Aclose(a), H5Sclose(s), H5Tclose(t);
    return;
  }
  hid_t s = H5Screate(H5S_SCALAR);
  hid_t a = H5Acreate2(loc, name, H5T_STD_I64LE, s, H5P_DEFAULT, H5P_DEFAULT);
  H5Awrite(a, H5T_NATIVE_INT64, &v);
  H5Aclose(a), H5Sclose(s);
}

void attr_str(hid_t loc, const char* name, const std::string& v) {
  hid_t t = H5Tcopy(H5T_C_S1);
  H5Tset_size(t, H5T_VARIABLE);
  H5Tset_cset(t, H5T_CSET_UTF8);
  hid_t s = H5Screate(H5S_SCALAR);
  hid_t a = H5Acreate2(loc, name, t, s, H5P_DEFAULT, H5P_DEFAULT);
  const char* c = v.c_str();
  H5Awrite(a, t, &c);
  H5Aclose(a), H5Sclose(s), H5Tclose(t);
}

// A 1-D dataset of `dims` elements; `values` (converted from int64 or double) fill its
// start. Huge dims get a chunked layout with nothing written (the fill value is 0).
void dataset(hid_t loc, const char* name, hid_t file_type, hid_t mem_type, hsize_t dims, const void* values,
             hsize_t count) {
  hid_t s = H5Screate_simple(1, &dims, nullptr);
  hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
  hsize_t chunk = std::min<hsize_t>(dims, 64);  // chunks may not exceed a fixed dimension
  if (dims > 0) H5Pset_chunk(dcpl, 1, &chunk);
  hid_t d = H5Dcreate2(loc, name, file_type, s, H5P_DEFAULT, dims > 0 ? dcpl : H5P_DEFAULT, H5P_DEFAULT);
  if (d >= 0 && count > 0) {
    count = std::min(count, dims);
    hsize_t start = 0;
    hid_t fs = H5Dget_space(d);
    H5Sselect_hyperslab(fs, H5S_SELECT_SET, &start, nullptr, &count, nullptr);
    hid_t ms = H5Screate_simple(1, &count, nullptr);
    H5Dwrite(d, mem_type, ms, fs, H5P_DEFAULT, values);
    H5Sclose(ms), H5Sclose(fs);
  }
  if (d >= 0) H5Dclose(d);
  H5Pclose(dcpl), H5Sclose(s);
}

void write_structured(const std::string& path, Input in) {
  const uint8_t flags = in.u8(), flags2 = in.u8();
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  hid_t f = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  if (f < 0) fuzz::fail("H5Fcreate " + path);
  const int64_t n = (flags & 1) ? in.i64() : in.u8() % 8;  // num_examples
  attr_str(f, "format", (flags & 2) ? "dpo-preference-triple" : "dpo-preference-triples");
  attr_int(f, "format_version", (flags & 4) ? in.i16() : 1, false);
  if (!(flags & 8)) attr_int(f, "num_examples", n, (flags2 & 1) != 0);
  const int64_t vocab = in.i16();
  attr_int(f, "vocab_size", (flags2 & 2) ? in.i64() : vocab, false);
  for (const char* k : {"bos_id", "eos_id", "pad_id"}) attr_int(f, k, in.i16(), false);
  std::string sha(64, 'a');
  if (flags2 & 4) sha = std::string(in.u8() % 70, static_cast<char>(in.u8()));
  attr_str(f, "tokenizer_sha256", sha);
  attr_int(f, "max_length", in.i16(), false);
  attr_int(f, "max_prompt_length", in.i16(), false);
  if (!(flags2 & 8)) attr_str(f, "source", "train.jsonl");  // scalar, where the writer stores a list
  for (const char* g : {"prompt", "chosen", "rejected"}) {
    hid_t grp = H5Gcreate2(f, g, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    const uint8_t c = in.u8();
    std::vector<int64_t> off(in.u8() % 12);
    int64_t acc = 0;
    for (auto& o : off) o = (acc += in.i16() % 8);
    if (!off.empty() && !(c & 1)) off[0] = 0;
    const hsize_t n_off = (c & 2) ? static_cast<hsize_t>(in.i64()) % (hsize_t{1} << 40) : static_cast<hsize_t>(n + 1);
    std::vector<int64_t> tok(in.u8() % 24);
    for (auto& t : tok) t = in.i16();
    const hsize_t n_tok = (c & 4) ? static_cast<hsize_t>(in.i64()) % (hsize_t{1} << 40) : tok.size();
    if (!(c & 8))
      dataset(grp, "offsets", (c & 16) ? H5T_STD_I32LE : H5T_STD_I64LE, H5T_NATIVE_INT64, n_off, off.data(), off.size());
    if (!(c & 32))
      dataset(grp, "tokens", (c & 64) ? H5T_STD_I64LE : H5T_STD_I32LE, H5T_NATIVE_INT64, n_tok, tok.data(), tok.size());
    H5Gclose(grp);
  }
  if (flags & 16) {
    hid_t grp = H5Gcreate2(f, "ref_logps", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    for (const char* k : {"chosen", "rejected"}) {
      std::vector<double> v(in.u8() % 10);
      for (auto& x : v) x = (flags & 32) ? in.f64() : -in.u8() / 8.0;
      const hsize_t len = (flags & 64) ? v.size() : static_cast<hsize_t>(n);
      dataset(grp, k, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, len, v.data(), v.size());
    }
    H5Gclose(grp);
  }
  H5Fclose(f);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  static const bool structured_only = std::getenv("DPO_FUZZ_H5_STRUCTURED") != nullptr;
  std::string path;
  if ((data[0] & 1) && !structured_only) {
    path = fuzz::write_scratch("train.h5", data + 1, size - 1);
  } else {
    path = fuzz::scratch_dir() + "/structured.h5";
    write_structured(path, Input{data + 1, size - 1});
  }
  fuzz::expect_clean("PreferenceReader", [&] {
    dpo::PreferenceReader r(path);
    const int64_t n = r.size();
    if (n < 0) fuzz::fail("negative size");
    const int64_t vocab = r.attrs().vocab_size;
    for (dpo::Field f : {dpo::Field::kPrompt, dpo::Field::kChosen, dpo::Field::kRejected})
      if (static_cast<int64_t>(r.offsets(f).size()) != n + 1) fuzz::fail("offsets of the wrong length");
    const auto lens = r.example_lengths();
    if (static_cast<int64_t>(lens.size()) != n) fuzz::fail("example_lengths of the wrong length");
    for (int64_t i = 0; i < std::min<int64_t>(n, 32); ++i) {
      const dpo::PreferenceExample ex = r.get(i);
      const dpo::ExampleLengths l = r.lengths(i);
      if (static_cast<int64_t>(ex.prompt.size()) != l.prompt || static_cast<int64_t>(ex.chosen.size()) != l.chosen ||
          static_cast<int64_t>(ex.rejected.size()) != l.rejected)
        fuzz::fail("example " + std::to_string(i) + " differs from its offsets");
      for (const auto* v : {&ex.prompt, &ex.chosen, &ex.rejected})
        for (int32_t id : *v)
          if (id < 0 || id >= vocab) fuzz::fail("get() returned id " + std::to_string(id) + " outside the vocab");
      if (r.has_ref_logps() && (!std::isfinite(ex.ref_chosen) || !std::isfinite(ex.ref_rejected)))
        fuzz::fail("get() returned a non-finite reference log-prob");
    }
    r.validate_tokens();
    if (r.has_ref_logps()) {
      const dpo::RefLogps ref = dpo::read_ref_logps(path);
      if (static_cast<int64_t>(ref.chosen.size()) != n || static_cast<int64_t>(ref.rejected.size()) != n)
        fuzz::fail("/ref_logps of the wrong length");
    }
    r.check_compatible(r.attrs().tokenizer_sha256, vocab);
  });
  return 0;
}
