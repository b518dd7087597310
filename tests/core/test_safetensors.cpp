// Tests of core/safetensors: round trips of every dtype, the exact byte layout
// of the Python/Rust writer, every malformed file rejected with a message naming
// the file and tensor, and Hugging Face model directories (single, sharded,
// refused). Also built with AddressSanitizer (test_safetensors_asan).
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/types.h>

#include "core/safetensors.h"
#include "tests/proc_maps.h"
#include "tests/test_util.h"

#if defined(__SANITIZE_ADDRESS__)
// libtorch's static registries are never freed; report leaks only from our code.
extern "C" const char* __lsan_default_suppressions() { return "leak:libtorch\nleak:libc10\nleak:libgomp\n"; }
#endif

namespace fs = std::filesystem;
using dpo::HfCheckpoint;
using dpo::SafetensorsFile;
using json = nlohmann::json;

namespace {

using dpo::testutil::TempDir;
using dpo::testutil::throw_message;


std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return s;
}

// A file with this header text and `data_bytes` zero bytes of data.
void write_raw(const std::string& path, const std::string& header, size_t data_bytes) {
  write_bytes(path, le64(header.size()) + header + std::string(data_bytes, '\0'));
}

// Expects SafetensorsFile(path) to throw with a message containing every needle.
void expect_rejected(const std::string& path, const std::vector<std::string>& needles) {
  try {
    SafetensorsFile f(path);
    FAIL() << "accepted a malformed file: " << path;
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << "message does not name the file: " << msg;
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "missing \"" << n << "\" in: " << msg;
  }
}


torch::Tensor random_of(torch::ScalarType t, std::vector<int64_t> shape, int seed) {
  torch::manual_seed(seed);
  if (t == torch::kFloat32 || t == torch::kFloat16 || t == torch::kBFloat16) return torch::randn(shape).to(t);
  if (t == torch::kUInt8) return torch::randint(0, 256, shape).to(t);
  if (t == torch::kInt8) return torch::randint(-128, 128, shape).to(t);
  if (t == torch::kInt32) return torch::randint(-2000000000LL, 2000000000LL, shape, torch::kInt64).to(t);
  return torch::randint(-(1LL << 62), 1LL << 62, shape, torch::kInt64);
}

}  // namespace

TEST(Safetensors, RoundTripEveryDtypeWithMetadata) {
  TempDir dir;
  const std::vector<std::pair<torch::ScalarType, std::string>> dtypes = {
      {torch::kFloat32, "F32"}, {torch::kFloat16, "F16"}, {torch::kBFloat16, "BF16"}, {torch::kUInt8, "U8"},
      {torch::kInt8, "I8"},     {torch::kInt32, "I32"},   {torch::kInt64, "I64"}};
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  int seed = 1;
  for (const auto& [t, name] : dtypes) {
    tensors.emplace_back("w." + name, random_of(t, {3, 5}, seed++));
    tensors.emplace_back("odd." + name, random_of(t, {7}, seed++));  // odd byte counts shift later offsets
  }
  tensors.emplace_back("scalar", torch::tensor(3.5f));
  tensors.emplace_back("empty", torch::zeros({0, 4}, torch::kInt32));
  tensors.emplace_back("transposed", random_of(torch::kFloat32, {4, 6}, 99).t());  // non-contiguous input
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "ünïcode \"quoted\""}};
  const std::string path = dir.file("all.safetensors");
  dpo::safetensors_save(path, tensors, meta);

  SafetensorsFile f(path);
  EXPECT_EQ(f.metadata(), meta);
  EXPECT_EQ(f.names().size(), tensors.size());
  for (const auto& [name, t] : tensors) {
    ASSERT_TRUE(f.has(name)) << name;
    torch::Tensor got = f.get(name);
    EXPECT_EQ(got.scalar_type(), t.scalar_type()) << name;
    EXPECT_EQ(got.sizes(), t.sizes()) << name;
    EXPECT_EQ(f.dtype(name), t.scalar_type());
    EXPECT_EQ(f.shape(name), t.sizes().vec());
    EXPECT_EQ(f.nbytes(name), static_cast<int64_t>(t.numel() * t.element_size()));
    EXPECT_TRUE(torch::equal(got, t)) << name;
    if (got.numel() > 0) {
      // Aligned for the dtype, and a view into the mapping (no copy per call).
      EXPECT_EQ(reinterpret_cast<uintptr_t>(got.data_ptr()) % got.element_size(), 0u) << name;
      EXPECT_EQ(got.data_ptr(), f.get(name).data_ptr()) << name;
    }
  }
  EXPECT_FALSE(f.has("nope"));
  std::string msg = throw_message([&] { f.get("nope"); });
  EXPECT_NE(msg.find(path), std::string::npos);
  EXPECT_NE(msg.find("nope"), std::string::npos);
}

TEST(Safetensors, ViewOutlivesFileObject) {
  TempDir dir;
  const std::string path = dir.file("a.safetensors");
  torch::Tensor t = torch::arange(10, torch::kFloat32);
  dpo::safetensors_save(path, {{"t", t}});
  torch::Tensor view;
  {
    SafetensorsFile f(path);
    view = f.get("t");
  }
  EXPECT_TRUE(torch::equal(view, t));
}

TEST(Safetensors, CopyOnWriteMappingReadsTheFileAndNeverWritesIt) {
  TempDir dir;
  const std::string path = dir.file("a.safetensors");
  torch::Tensor big = torch::arange(3 * 4096, torch::kFloat32).reshape({3, 4096}).to(torch::kBFloat16);
  torch::Tensor small = torch::tensor({1.5f, -2.0f, 3.25f});
  dpo::safetensors_save(path, {{"big", big}, {"small", small}});
  torch::Tensor mapped;
  {
    SafetensorsFile f(path);
    mapped = f.map_copy_on_write("big");
    // A view of the rest of the file stays valid after its pages are released.
    torch::Tensor view = f.get("small");
    f.release_pages("small");
    f.release_pages("big");
    EXPECT_TRUE(torch::equal(view, small));
  }
  // Its own mapping of the file, alive without the file object.
  EXPECT_EQ(dpo::testutil::mapped_file_of(mapped.data_ptr()), path);
  EXPECT_EQ(mapped.scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::equal(mapped, big));
  // Writes land in the process's private copy, never in the file.
  mapped.mul_(2);
  EXPECT_TRUE(torch::equal(mapped, big * 2));
  EXPECT_TRUE(torch::equal(SafetensorsFile(path).get("big"), big));
}

TEST(Safetensors, CopyOnWriteMappingRefusesAReplacedFile) {
  TempDir dir;
  const std::string path = dir.file("a.safetensors");
  dpo::safetensors_save(path, {{"t", torch::ones({8})}});
  SafetensorsFile f(path);
  dpo::safetensors_save(path, {{"t", torch::zeros({8})}});  // written to a temporary and renamed over it
  std::string msg = throw_message([&] { f.map_copy_on_write("t"); });
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
  EXPECT_NE(msg.find("replaced"), std::string::npos) << msg;
  EXPECT_TRUE(torch::equal(f.get("t"), torch::ones({8})));  // the old mapping still reads the old file
}

TEST(Safetensors, ByteLayoutMatchesPythonLibrary) {
  TempDir dir;
  // The Rust crate's own serialization test vector: "attn.0" F32 [1,2,3] = 0..5,
  // whose header is exactly 64 bytes (no padding).
  const std::string path = dir.file("a.safetensors");
  dpo::safetensors_save(path, {{"attn.0", torch::arange(6, torch::kFloat32).view({1, 2, 3})}});
  const std::string header = R"({"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}})";
  ASSERT_EQ(header.size(), 64u);
  std::string data(24, '\0');
  const float v[6] = {0, 1, 2, 3, 4, 5};
  std::memcpy(data.data(), v, 24);
  EXPECT_EQ(read_bytes(path), le64(64) + header + data);

  // Its alignment vector: "attn0" [1,1,2,3] makes a 65-byte header, padded
  // with 7 spaces to 72.
  dpo::safetensors_save(path, {{"attn0", torch::arange(6, torch::kFloat32).view({1, 1, 2, 3})}});
  const std::string header2 = R"({"attn0":{"dtype":"F32","shape":[1,1,2,3],"data_offsets":[0,24]}})";
  ASSERT_EQ(header2.size(), 65u);
  EXPECT_EQ(read_bytes(path), le64(72) + header2 + std::string(7, ' ') + data);

  // Empty file with metadata: 35 bytes padded to 40, metadata first.
  dpo::safetensors_save(path, {}, {{"framework", "pt"}});
  EXPECT_EQ(read_bytes(path), le64(40) + std::string(R"({"__metadata__":{"framework":"pt"}})") + "     ");
  EXPECT_EQ(SafetensorsFile(path).metadata().at("framework"), "pt");
  dpo::safetensors_save(path, {});
  EXPECT_EQ(read_bytes(path), le64(8) + "{}      ");
}

TEST(Safetensors, DataOrderedByDtypeAlignmentThenName) {
  TempDir dir;
  const std::string path = dir.file("a.safetensors");
  dpo::safetensors_save(path, {{"b", torch::zeros({2}, torch::kFloat32)},
                               {"a", torch::zeros({3}, torch::kUInt8)},
                               {"c", torch::zeros({1}, torch::kInt64)},
                               {"e", torch::zeros({1}, torch::kBFloat16)},
                               {"d", torch::zeros({1}, torch::kBFloat16)}});
  SafetensorsFile f(path);
  // Descending alignment (I64, F32, BF16, U8), ties by name: as the Python library writes.
  EXPECT_EQ(f.names(), (std::vector<std::string>{"c", "b", "d", "e", "a"}));
  const std::string bytes = read_bytes(path);
  uint64_t n;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ(n % 8, 0u);
  json h = json::parse(bytes.substr(8, n));
  EXPECT_EQ(h["c"]["data_offsets"], json::array({0, 8}));
  EXPECT_EQ(h["b"]["data_offsets"], json::array({8, 16}));
  EXPECT_EQ(h["d"]["data_offsets"], json::array({16, 18}));
  EXPECT_EQ(h["e"]["data_offsets"], json::array({18, 20}));
  EXPECT_EQ(h["a"]["data_offsets"], json::array({20, 23}));
  EXPECT_FALSE(h.contains("__metadata__"));
}

TEST(Safetensors, AcceptsAnyHeaderOrderAndMisalignedData) {
  TempDir dir;
  const std::string path = dir.file("a.safetensors");
  // JSON order differs from offset order; "f" starts at data offset 1 (legal,
  // misaligned for F32); a padded header with trailing spaces.
  std::string header =
      R"({"f":{"dtype":"F32","shape":[2],"data_offsets":[1,9]},"u":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})";
  header.append(3, ' ');
  std::string data(9, '\0');
  data[0] = 7;
  const float v[2] = {1.5f, -2.0f};
  std::memcpy(data.data() + 1, v, 8);
  write_bytes(path, le64(header.size()) + header + data);
  SafetensorsFile f(path);
  EXPECT_EQ(f.names(), (std::vector<std::string>{"u", "f"}));
  EXPECT_EQ(f.get("u").item<uint8_t>(), 7);
  torch::Tensor got = f.get("f");
  EXPECT_EQ(reinterpret_cast<uintptr_t>(got.data_ptr()) % 4, 0u);
  EXPECT_TRUE(torch::equal(got, torch::tensor({1.5f, -2.0f})));
}

TEST(Safetensors, RejectsTruncatedAndBadLengths) {
  TempDir dir;
  const std::string p = dir.file("bad.safetensors");
  write_bytes(p, "");
  expect_rejected(p, {"too short"});
  write_bytes(p, std::string("\x10\0\0", 3));
  expect_rejected(p, {"too short"});
  write_bytes(p, le64(200'000'000) + "{}");
  expect_rejected(p, {"exceeds", "limit"});
  write_bytes(p, le64(~uint64_t{0}) + "{}");
  expect_rejected(p, {"exceeds"});
  write_bytes(p, le64(100) + "{}");
  expect_rejected(p, {"runs past"});
  // A valid file cut short in its data.
  dpo::safetensors_save(p, {{"t", torch::ones({16})}});
  std::string full = read_bytes(p);
  write_bytes(p, full.substr(0, full.size() - 4));
  expect_rejected(p, {"truncated or trailing"});
  write_bytes(p, full + "xx");
  expect_rejected(p, {"truncated or trailing"});
  fs::remove(p);
  expect_rejected(p, {"cannot open"});
}

TEST(Safetensors, RejectsBadJson) {
  TempDir dir;
  const std::string p = dir.file("bad.safetensors");
  write_raw(p, R"({"a": {"dtype": "F32", )", 0);
  expect_rejected(p, {"invalid JSON"});
  write_raw(p, "[1, 2]  ", 0);
  expect_rejected(p, {"not a JSON object"});
  write_raw(p, "{\"a\xff\":1}", 0);
  expect_rejected(p, {"UTF-8"});
  write_raw(p, "{\"\xc0\xaf\":1}", 0);  // overlong encoding of '/'
  expect_rejected(p, {"UTF-8"});
  write_raw(p, R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8);
  expect_rejected(p, {"\"t\"", "twice"});
  write_raw(p, R"({"t":{"dtype":"F32","dtype":"I32","shape":[1],"data_offsets":[0,4]}})", 4);
  expect_rejected(p, {"\"dtype\"", "twice"});
  write_raw(p, R"({"t":[1,2]})", 0);
  expect_rejected(p, {"\"t\"", "not a JSON object"});
  write_raw(p, R"({"__metadata__":{"a":1}})", 0);
  expect_rejected(p, {"__metadata__", "\"a\""});
  write_raw(p, R"({"__metadata__":["x"]})", 0);
  expect_rejected(p, {"__metadata__"});
}

// Valid JSON nested 10^5 levels deep (issue 28): one line naming the file and the
// limit of util/json_read.h, no stack overflow (also under AddressSanitizer).
TEST(Safetensors, RejectsDeeplyNestedHeaders) {
  TempDir dir;
  const std::string p = dir.file("deep.safetensors");
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  write_raw(p, R"({"__metadata__":{"a":"b"},"x":)" + deep + "}", 0);
  EXPECT_EQ(throw_message([&] { SafetensorsFile f(p); }),
            p + ": header: JSON nested deeper than 512 levels (the limit of every JSON reader here)");
  EXPECT_EQ(throw_message([&] { dpo::json_parse_strict(deep, "x.json"); }),
            "x.json: JSON nested deeper than 512 levels (the limit of every JSON reader here)");
}

TEST(Safetensors, RejectsBadEntries) {
  TempDir dir;
  const std::string p = dir.file("bad.safetensors");
  for (const char* dt : {"F64", "BOOL", "F8_E4M3", "U16", "float32"}) {
    write_raw(p, std::string(R"({"w.bad":{"dtype":")") + dt + R"(","shape":[1],"data_offsets":[0,8]}})", 8);
    expect_rejected(p, {"\"w.bad\"", std::string("dtype ") + dt, "not supported"});
  }
  write_raw(p, R"({"t":{"dtype":7,"shape":[1],"data_offsets":[0,4]}})", 4);
  expect_rejected(p, {"\"t\"", "dtype"});
  write_raw(p, R"({"t":{"shape":[1],"data_offsets":[0,4]}})", 4);
  expect_rejected(p, {"\"t\"", "missing \"dtype\""});
  write_raw(p, R"({"t":{"dtype":"F32","data_offsets":[0,4]}})", 4);
  expect_rejected(p, {"\"t\"", "missing \"shape\""});
  write_raw(p, R"({"t":{"dtype":"F32","shape":[1]}})", 4);
  expect_rejected(p, {"\"t\"", "missing \"data_offsets\""});
  write_raw(p, R"({"t":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4);
  expect_rejected(p, {"\"t\"", "non-negative"});
  write_raw(p, R"({"t":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})", 4);
  expect_rejected(p, {"\"t\"", "non-negative integer"});
  write_raw(p, R"({"t":{"dtype":"F32","shape":{"a":1},"data_offsets":[0,4]}})", 4);
  expect_rejected(p, {"\"t\"", "not an array"});
  write_raw(p, R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0]}})", 4);
  expect_rejected(p, {"\"t\"", "data_offsets"});
  write_raw(p, R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,-4]}})", 4);
  expect_rejected(p, {"\"t\"", "data_offsets"});
}

TEST(Safetensors, RejectsBadOffsets) {
  TempDir dir;
  const std::string p = dir.file("bad.safetensors");
  // Overlap: b starts inside a.
  write_raw(p, R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12);
  expect_rejected(p, {"\"b\"", "overlap", "\"a\""});
  // Two tensors on the same bytes.
  write_raw(p, R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8);
  expect_rejected(p, {"overlap"});
  // Gap between tensors.
  write_raw(p, R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})", 20);
  expect_rejected(p, {"\"b\"", "gap"});
  // Data not starting at 0.
  write_raw(p, R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12);
  expect_rejected(p, {"\"a\"", "gap"});
  // Reversed (unsorted) pair.
  write_raw(p, R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8);
  expect_rejected(p, {"\"a\"", "end before begin"});
  // Size mismatch: 3 floats in 8 bytes.
  write_raw(p, R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8);
  expect_rejected(p, {"\"a\"", "need 12 bytes", "span 8"});
  // Right total size but the header describes more data than the file holds.
  write_raw(p, R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8);
  expect_rejected(p, {"truncated or trailing"});
  // Offsets far beyond the file (no arithmetic wrap-around).
  write_raw(p, R"({"a":{"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,18446744073709551615]}})", 8);
  expect_rejected(p, {"\"a\""});
}

TEST(Safetensors, RejectsOverflowingShapes) {
  TempDir dir;
  const std::string p = dir.file("bad.safetensors");
  write_raw(p, R"({"a":{"dtype":"F32","shape":[1099511627776,1099511627776],"data_offsets":[0,4]}})", 4);
  expect_rejected(p, {"\"a\"", "overflow"});
  // 2^61 elements fit, 2^61 * 4 bytes do not fit in int64.
  write_raw(p, R"({"a":{"dtype":"F32","shape":[2305843009213693952],"data_offsets":[0,0]}})", 0);
  expect_rejected(p, {"\"a\"", "overflow"});
  write_raw(p, R"({"a":{"dtype":"U8","shape":[9223372036854775808],"data_offsets":[0,0]}})", 0);
  expect_rejected(p, {"\"a\"", "too large"});
  // Zero-sized dims are fine.
  write_raw(p, R"({"a":{"dtype":"F32","shape":[0,1099511627776],"data_offsets":[0,0]}})", 0);
  SafetensorsFile f(p);
  EXPECT_EQ(f.get("a").numel(), 0);
}

TEST(Safetensors, SaveErrorsNamePathAndLeaveNoTemp) {
  TempDir dir;
  const std::string p = dir.file("out.safetensors");
  std::string msg = throw_message([&] { dpo::safetensors_save(p, {{"a", torch::ones({2})}, {"a", torch::ones({3})}}); });
  EXPECT_NE(msg.find(p), std::string::npos) << msg;
  EXPECT_NE(msg.find("\"a\""), std::string::npos) << msg;
  msg = throw_message([&] { dpo::safetensors_save(p, {{"d", torch::ones({2}, torch::kFloat64)}}); });
  EXPECT_NE(msg.find("Double"), std::string::npos) << msg;
  msg = throw_message([&] { dpo::safetensors_save(p, {{"__metadata__", torch::ones({2})}}); });
  EXPECT_NE(msg.find("__metadata__"), std::string::npos) << msg;
  // A producer that fails halfway: the temporary file is removed, no output.
  msg = throw_message([&] {
    dpo::safetensors_save_lazy(p, {{"x", torch::kFloat32, {2}}, {"y", torch::kFloat32, {2}}},
                               [](const dpo::SafetensorsEntry& e) -> torch::Tensor {
                                 if (e.name == "y") throw std::runtime_error("producer failed");
                                 return torch::ones({2});
                               });
  });
  EXPECT_NE(msg.find("producer failed"), std::string::npos) << msg;
  msg = throw_message([&] {
    dpo::safetensors_save_lazy(p, {{"x", torch::kFloat32, {2}}},
                               [](const dpo::SafetensorsEntry&) { return torch::ones({3}); });
  });
  EXPECT_NE(msg.find("\"x\""), std::string::npos) << msg;
  EXPECT_TRUE(fs::is_empty(dir.path())) << "left files behind";
  msg = throw_message([&] { dpo::safetensors_save(dir.file("no/such/dir.safetensors"), {{"a", torch::ones({1})}}); });
  EXPECT_NE(msg.find("no/such/dir.safetensors"), std::string::npos) << msg;
  // Overwriting replaces the whole file.
  dpo::safetensors_save(p, {{"a", torch::ones({100})}});
  dpo::safetensors_save(p, {{"b", torch::zeros({1})}});
  SafetensorsFile f(p);
  EXPECT_EQ(f.names(), std::vector<std::string>{"b"});
}

TEST(Safetensors, StrictJsonHelper) {
  EXPECT_EQ(dpo::json_parse_strict(R"({"a":{"b":1,"c":{"b":2}},"b":3})", "x.json")["a"]["c"]["b"], 2);
  std::string msg = throw_message([] { dpo::json_parse_strict(R"({"a":{"b":1,"b":2}})", "x.json"); });
  EXPECT_NE(msg.find("x.json"), std::string::npos);
  EXPECT_NE(msg.find("\"b\""), std::string::npos);
  // Same key in sibling objects is fine.
  EXPECT_NO_THROW(dpo::json_parse_strict(R"([{"a":1},{"a":2}])", "x.json"));
}

// ---------------------------------------------------------------------------
// Hugging Face model directories

namespace {

void write_index(const std::string& dir, const json& weight_map) {
  json j = {{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}};
  write_bytes(dir + "/model.safetensors.index.json", j.dump(2));
}

}  // namespace

TEST(HfCheckpoint, SingleFile) {
  TempDir dir;
  dpo::safetensors_save(dir.file("model.safetensors"), {{"x", torch::ones({2})}, {"y", torch::zeros({3})}});
  HfCheckpoint ck(dir.path());
  EXPECT_EQ(ck.source(), "model.safetensors");
  EXPECT_EQ(ck.names(), (std::vector<std::string>{"x", "y"}));
  EXPECT_TRUE(ck.has("x"));
  EXPECT_FALSE(ck.find("z").has_value());
  EXPECT_TRUE(torch::equal(*ck.find("y"), torch::zeros({3})));
  EXPECT_EQ(ck.file_of("x"), "model.safetensors");
}

TEST(HfCheckpoint, Sharded) {
  TempDir dir;
  dpo::safetensors_save(dir.file("model-00001-of-00002.safetensors"), {{"a", torch::ones({2})}, {"b", torch::ones({1})}});
  dpo::safetensors_save(dir.file("model-00002-of-00002.safetensors"), {{"c", torch::full({4}, 3.0)}, {"unlisted", torch::ones({1})}});
  write_index(dir.path(), {{"a", "model-00001-of-00002.safetensors"},
                                    {"b", "model-00001-of-00002.safetensors"},
                                    {"c", "model-00002-of-00002.safetensors"}});
  HfCheckpoint ck(dir.path());
  EXPECT_EQ(ck.source(), "model.safetensors.index.json");
  EXPECT_EQ(ck.names(), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_TRUE(torch::equal(*ck.find("c"), torch::full({4}, 3.0)));
  EXPECT_EQ(ck.file_of("c"), "model-00002-of-00002.safetensors");
  EXPECT_FALSE(ck.has("unlisted"));  // only what the index maps, as transformers
}

TEST(HfCheckpoint, PrefersSingleFileOverIndex) {
  TempDir dir;
  dpo::safetensors_save(dir.file("model.safetensors"), {{"a", torch::ones({2})}});
  write_index(dir.path(), {{"a", "missing.safetensors"}});
  HfCheckpoint ck(dir.path());
  EXPECT_EQ(ck.source(), "model.safetensors");
}

TEST(HfCheckpoint, RefusesPickleOnlyDirectory) {
  TempDir dir;
  write_bytes(dir.file("pytorch_model.bin"), "PK\x03\x04 not really");
  write_bytes(dir.file("config.json"), "{}");
  std::string msg = throw_message([&] { HfCheckpoint ck(dir.path()); });
  EXPECT_NE(msg.find("pytorch_model.bin"), std::string::npos) << msg;
  EXPECT_NE(msg.find("pickle"), std::string::npos) << msg;
  EXPECT_NE(msg.find("never loaded"), std::string::npos) << msg;
  EXPECT_NE(msg.find("save_pretrained"), std::string::npos) << msg;
  EXPECT_NE(msg.find("safe_serialization=True"), std::string::npos) << msg;
  fs::remove(dir.file("pytorch_model.bin"));
  write_bytes(dir.file("consolidated.00.pth"), "x");
  msg = throw_message([&] { HfCheckpoint ck(dir.path()); });
  EXPECT_NE(msg.find("pickle"), std::string::npos) << msg;
  fs::remove(dir.file("consolidated.00.pth"));
  msg = throw_message([&] { HfCheckpoint ck(dir.path()); });
  EXPECT_NE(msg.find("neither model.safetensors nor model.safetensors.index.json"), std::string::npos) << msg;
  msg = throw_message([&] { HfCheckpoint ck(dir.file("nope")); });
  EXPECT_NE(msg.find("does not exist"), std::string::npos) << msg;
}

TEST(HfCheckpoint, RefusesShardNamesOutsideDirectory) {
  TempDir dir;
  fs::create_directories(fs::path(dir.path()) / "sub");
  dpo::safetensors_save(dir.file("sub/x.safetensors"), {{"a", torch::ones({2})}});
  for (const std::string bad : {"../x.safetensors", "/etc/passwd", "sub/../../x.safetensors", "..", "sub\\..\\..\\x"}) {
    write_index(dir.path(), {{"a", bad}});
    std::string msg = throw_message([&] { HfCheckpoint ck(dir.path()); });
    EXPECT_NE(msg.find("refused"), std::string::npos) << bad << ": " << msg;
    EXPECT_NE(msg.find("model.safetensors.index.json"), std::string::npos) << msg;
  }
  // A subdirectory inside the model directory is fine.
  write_index(dir.path(), {{"a", "sub/x.safetensors"}});
  HfCheckpoint ck(dir.path());
  EXPECT_TRUE(ck.has("a"));
}

TEST(HfCheckpoint, ShardErrorsCarryShardName) {
  TempDir dir;
  const std::string d = dir.path();
  dpo::safetensors_save(dir.file("model-00001-of-00002.safetensors"), {{"a", torch::ones({2})}});
  write_index(d, {{"a", "model-00001-of-00002.safetensors"}, {"b", "model-00002-of-00002.safetensors"}});
  std::string msg = throw_message([&] { HfCheckpoint ck(d); });
  EXPECT_NE(msg.find("loading shard model-00002-of-00002.safetensors: "), std::string::npos) << msg;
  EXPECT_NE(msg.find("cannot open"), std::string::npos) << msg;
  write_bytes(dir.file("model-00002-of-00002.safetensors"), le64(5) + "{}");
  msg = throw_message([&] { HfCheckpoint ck(d); });
  EXPECT_NE(msg.find("loading shard model-00002-of-00002.safetensors: "), std::string::npos) << msg;
  dpo::safetensors_save(dir.file("model-00002-of-00002.safetensors"), {{"other", torch::ones({2})}});
  msg = throw_message([&] { HfCheckpoint ck(d); });
  EXPECT_NE(msg.find("\"b\""), std::string::npos) << msg;
  EXPECT_NE(msg.find("no such tensor"), std::string::npos) << msg;
  write_bytes(d + "/model.safetensors.index.json", R"({"weight_map":{"a":"x","a":"y"}})");
  msg = throw_message([&] { HfCheckpoint ck(d); });
  EXPECT_NE(msg.find("twice"), std::string::npos) << msg;
  write_bytes(d + "/model.safetensors.index.json", R"({"weight_map":{"a":3}})");
  msg = throw_message([&] { HfCheckpoint ck(d); });
  EXPECT_NE(msg.find("\"a\""), std::string::npos) << msg;
  write_bytes(d + "/model.safetensors.index.json", R"({"metadata":{}})");
  msg = throw_message([&] { HfCheckpoint ck(d); });
  EXPECT_NE(msg.find("weight_map"), std::string::npos) << msg;
  // Nested 10^5 levels deep: refused before a tree is built (issue 28).
  write_bytes(d + "/model.safetensors.index.json",
              R"({"weight_map":{"a":"x"},"metadata":)" + std::string(100000, '[') + std::string(100000, ']') + "}");
  msg = throw_message([&] { HfCheckpoint ck(d); });
  EXPECT_NE(msg.find("model.safetensors.index.json: JSON nested deeper than 512 levels"), std::string::npos) << msg;
}
