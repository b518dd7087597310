#include "core/safetensors.h"

#include "util/fs.h"
#include "util/json_read.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <set>
#include <stdexcept>
#include <unordered_map>

#include <nlohmann/json.hpp>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors data is little-endian; this reader maps it without byte swapping"
#endif

namespace dpo {
namespace fs = std::filesystem;

namespace {


// Element size of the dtypes we hold. Ranks follow the Rust library's Dtype
// enum order, which its writer sorts by (descending) so data stays aligned.
struct DtypeInfo {
  const char* name;
  torch::ScalarType type;
  int64_t size;
  int rank;
};
constexpr DtypeInfo kDtypes[] = {
    {"U8", torch::kUInt8, 1, 1},     {"I8", torch::kInt8, 1, 2},    {"F16", torch::kFloat16, 2, 7},
    {"BF16", torch::kBFloat16, 2, 8}, {"I32", torch::kInt32, 4, 9}, {"F32", torch::kFloat32, 4, 11},
    {"I64", torch::kInt64, 8, 13},
};

const DtypeInfo* dtype_info(torch::ScalarType t) {
  for (const auto& d : kDtypes)
    if (d.type == t) return &d;
  return nullptr;
}
const DtypeInfo* dtype_info(const std::string& s) {
  for (const auto& d : kDtypes)
    if (s == d.name) return &d;
  return nullptr;
}

// Strict UTF-8 (no overlong forms, no surrogates, <= U+10FFFF). Returns the
// offset of the first bad byte, or -1.
int64_t first_invalid_utf8(const unsigned char* s, size_t n) {
  size_t i = 0;
  while (i < n) {
    unsigned char c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    int len;
    uint32_t cp;
    if ((c & 0xE0) == 0xC0) {
      len = 2;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4;
      cp = c & 0x07;
    } else {
      return static_cast<int64_t>(i);
    }
    if (i + len > n) return static_cast<int64_t>(i);
    for (int k = 1; k < len; ++k) {
      unsigned char cc = s[i + k];
      if ((cc & 0xC0) != 0x80) return static_cast<int64_t>(i);
      cp = (cp << 6) | (cc & 0x3F);
    }
    static constexpr uint32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return static_cast<int64_t>(i);
    i += len;
  }
  return -1;
}

// The read-only mapping of a whole file. Shared by the file object and by every
// tensor view handed out, so a view stays valid after the file object is gone.
struct Mapping {
  void* addr = nullptr;
  size_t size = 0;
  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    if (addr != nullptr && addr != MAP_FAILED) munmap(addr, size);
  }
};

struct TensorEntry {
  std::string name;
  const DtypeInfo* dtype = nullptr;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // relative to the data section
};

}  // namespace

nlohmann::json json_parse_strict(const std::string& text, const std::string& what) {
  using json = nlohmann::json;
  // One key set per open object; a repeated key is remembered (throwing from
  // inside the parser callback is not something nlohmann documents).
  std::vector<std::set<std::string>> keys;
  std::string duplicate;
  auto cb = [&](int /*depth*/, json::parse_event_t ev, json& parsed) {
    switch (ev) {
      case json::parse_event_t::object_start:
        keys.emplace_back();
        break;
      case json::parse_event_t::object_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case json::parse_event_t::key:
        if (!keys.empty() && !keys.back().insert(parsed.get<std::string>()).second && duplicate.empty())
          duplicate = parsed.get<std::string>();
        break;
      default:
        break;
    }
    return true;
  };
  int64_t bad = first_invalid_utf8(reinterpret_cast<const unsigned char*>(text.data()), text.size());
  if (bad >= 0) throw std::runtime_error(what + ": not valid UTF-8 (byte " + std::to_string(bad) + ")");
  json j;
  try {
    j = json_parse(text, what, {}, cb);
  } catch (const json::exception& e) {
    throw std::runtime_error(what + ": invalid JSON: " + e.what());
  }
  if (!duplicate.empty())
    throw std::runtime_error(what + ": key \"" + duplicate + "\" appears twice in one JSON object");
  return j;
}

// ---------------------------------------------------------------------------
// SafetensorsFile

struct SafetensorsFile::Impl {
  std::string path;
  std::shared_ptr<Mapping> map;
  const unsigned char* data = nullptr;  // start of the data section
  uint64_t data_offset = 0;             // its offset in the file (8 + header length)
  dev_t dev = 0;                        // the mapped file's identity, checked when it is opened again
  ino_t ino = 0;
  std::vector<TensorEntry> tensors;     // sorted by offset
  std::unordered_map<std::string, size_t> index;
  std::map<std::string, std::string> metadata;

  const TensorEntry& entry(const std::string& name) const {
    auto it = index.find(name);
    if (it == index.end()) throw std::runtime_error(path + ": no tensor \"" + name + "\"");
    return tensors[it->second];
  }
  void open_and_validate();
};

void SafetensorsFile::Impl::open_and_validate() {
  auto fail = [&](const std::string& msg) { throw std::runtime_error(path + ": " + msg); };
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("cannot open: " + errno_text());
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    std::string e = errno_text();
    ::close(fd);
    fail("cannot stat: " + e);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail("not a regular file");
  }
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  dev = st.st_dev;
  ino = st.st_ino;
  if (file_size < 8) {
    ::close(fd);
    fail("file is " + std::to_string(file_size) + " bytes, too short for the 8-byte header length (truncated?)");
  }
  map = std::make_shared<Mapping>();
  map->size = static_cast<size_t>(file_size);
  map->addr = ::mmap(nullptr, map->size, PROT_READ, MAP_PRIVATE, fd, 0);
  int mmap_errno = errno;
  ::close(fd);  // the mapping keeps the file referenced
  if (map->addr == MAP_FAILED) {
    map->addr = nullptr;
    fail(std::string("mmap failed: ") + std::strerror(mmap_errno));
  }
  const auto* base = static_cast<const unsigned char*>(map->addr);

  uint64_t n = 0;
  std::memcpy(&n, base, 8);  // little-endian host (checked at compile time)
  if (n > kSafetensorsMaxHeaderBytes)
    fail("header length " + std::to_string(n) + " exceeds the " + std::to_string(kSafetensorsMaxHeaderBytes) +
         "-byte limit (corrupt or not a safetensors file)");
  if (8 + n > file_size)
    fail("header length " + std::to_string(n) + " runs past the end of the " + std::to_string(file_size) +
         "-byte file (truncated?)");
  std::string header(reinterpret_cast<const char*>(base + 8), static_cast<size_t>(n));
  nlohmann::json j = json_parse_strict(header, path + ": header");
  if (!j.is_object()) fail("header is not a JSON object");

  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const nlohmann::json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) fail("\"__metadata__\" must be an object of strings");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) fail("\"__metadata__\" entry \"" + m.key() + "\" is not a string");
        metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    auto bad = [&](const std::string& msg) { fail("tensor \"" + name + "\": " + msg); };
    if (!v.is_object()) bad("entry is not a JSON object");
    for (const char* key : {"dtype", "shape", "data_offsets"})
      if (!v.contains(key)) bad(std::string("missing \"") + key + "\"");
    TensorEntry t;
    t.name = name;
    if (!v["dtype"].is_string()) bad("\"dtype\" is not a string");
    std::string ds = v["dtype"].get<std::string>();
    t.dtype = dtype_info(ds);
    if (t.dtype == nullptr)
      bad("dtype " + ds + " is not supported (F32, F16, BF16, U8, I8, I32, I64); convert the checkpoint");
    if (!v["shape"].is_array()) bad("\"shape\" is not an array");
    for (const auto& d : v["shape"]) {
      if (!d.is_number_unsigned()) bad("shape entry " + d.dump() + " is not a non-negative integer");
      uint64_t u = d.get<uint64_t>();
      if (u > static_cast<uint64_t>(INT64_MAX)) bad("shape entry " + d.dump() + " is too large");
      t.shape.push_back(static_cast<int64_t>(u));
    }
    const auto& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      bad("\"data_offsets\" must be [begin, end] non-negative integers, got " + off.dump());
    t.begin = off[0].get<uint64_t>();
    t.end = off[1].get<uint64_t>();
    if (t.end < t.begin)
      bad("data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) + "] end before begin");
    tensors.push_back(std::move(t));
  }

  // The Python/Rust library sorts by offsets and requires the tensors to tile
  // the data section exactly: no gap, no overlap, nothing after the last one.
  std::sort(tensors.begin(), tensors.end(), [](const TensorEntry& a, const TensorEntry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t expect = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const TensorEntry& t = tensors[i];
    auto bad = [&](const std::string& msg) { fail("tensor \"" + t.name + "\": " + msg); };
    std::string range = "[" + std::to_string(t.begin) + ", " + std::to_string(t.end) + "]";
    if (t.begin < expect)
      bad("data_offsets " + range + " overlap tensor \"" + tensors[i - 1].name + "\" (ends at " +
          std::to_string(expect) + ")");
    if (t.begin > expect)
      bad("data_offsets " + range + " leave a gap: expected the data to start at " + std::to_string(expect));
    uint64_t numel = 1;
    for (int64_t d : t.shape)
      if (__builtin_mul_overflow(numel, static_cast<uint64_t>(d), &numel))
        bad("shape overflows: the element count does not fit in 64 bits");
    uint64_t nbytes = 0;
    if (__builtin_mul_overflow(numel, static_cast<uint64_t>(t.dtype->size), &nbytes) ||
        nbytes > static_cast<uint64_t>(INT64_MAX))
      bad("shape overflows: the byte size does not fit in 64 bits");
    if (nbytes != t.end - t.begin)
      bad("shape and dtype " + std::string(t.dtype->name) + " need " + std::to_string(nbytes) +
          " bytes but data_offsets " + range + " span " + std::to_string(t.end - t.begin));
    expect = t.end;
  }
  // expect <= 2^63 (each size checked above, sum of contiguous ranges = last end).
  if (expect > file_size || 8 + n + expect != file_size)
    fail("file is " + std::to_string(file_size) + " bytes but its header describes " + std::to_string(8 + n) +
         " + " + std::to_string(expect) + " bytes (truncated or trailing data)");

  for (size_t i = 0; i < tensors.size(); ++i) index.emplace(tensors[i].name, i);
  data = base + 8 + n;
  data_offset = 8 + n;
}

SafetensorsFile::SafetensorsFile(const std::string& path) : impl_(std::make_unique<Impl>()) {
  impl_->path = path;
  impl_->open_and_validate();
}
SafetensorsFile::~SafetensorsFile() = default;
SafetensorsFile::SafetensorsFile(SafetensorsFile&&) noexcept = default;
SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&&) noexcept = default;

const std::string& SafetensorsFile::path() const { return impl_->path; }
bool SafetensorsFile::has(const std::string& name) const { return impl_->index.count(name) > 0; }

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(impl_->tensors.size());
  for (const auto& t : impl_->tensors) out.push_back(t.name);
  return out;
}

torch::Tensor SafetensorsFile::get(const std::string& name) const {
  const TensorEntry& t = impl_->entry(name);
  const unsigned char* p = impl_->data + t.begin;
  auto opts = torch::TensorOptions().dtype(t.dtype->type).device(torch::kCPU);
  if (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(t.dtype->size) != 0) {
    // Legal but misaligned for the dtype (a writer that does not sort by
    // alignment): kernels may assume alignment, so hand out an aligned copy.
    torch::Tensor out = torch::empty(t.shape, opts);
    if (t.end > t.begin) std::memcpy(out.data_ptr(), p, static_cast<size_t>(t.end - t.begin));
    return out;
  }
  std::shared_ptr<Mapping> keep = impl_->map;
  return torch::from_blob(const_cast<unsigned char*>(p), t.shape, [keep](void*) {}, opts);
}

namespace {
uint64_t page_size() {
  static const uint64_t p = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  return p;
}
}  // namespace

torch::Tensor SafetensorsFile::map_copy_on_write(const std::string& name, bool random_access) const {
  const TensorEntry& t = impl_->entry(name);
  const uint64_t begin = impl_->data_offset + t.begin, nbytes = t.end - t.begin;
  auto opts = torch::TensorOptions().dtype(t.dtype->type).device(torch::kCPU);
  if (nbytes == 0 || begin % static_cast<uint64_t>(t.dtype->size) != 0) return get(name).clone();
  const uint64_t start = begin - begin % page_size(), len = begin + nbytes - start;
  int fd = ::open(impl_->path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error(impl_->path + ": cannot open again to map tensor \"" + name + "\": " + errno_text());
  struct stat st {};
  if (::fstat(fd, &st) != 0 || st.st_dev != impl_->dev || st.st_ino != impl_->ino ||
      static_cast<uint64_t>(st.st_size) != static_cast<uint64_t>(impl_->map->size)) {
    ::close(fd);
    throw std::runtime_error(impl_->path + ": the file was replaced or rewritten while it was being loaded (tensor \"" + name +
                             "\"); load again");
  }
  void* addr = ::mmap(nullptr, static_cast<size_t>(len), PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, static_cast<off_t>(start));
  int mmap_errno = errno;
  ::close(fd);
  if (addr == MAP_FAILED)
    throw std::runtime_error(impl_->path + ": mmap of tensor \"" + name + "\" failed: " + std::strerror(mmap_errno));
  if (random_access) ::madvise(addr, static_cast<size_t>(len), MADV_RANDOM);  // advisory: errors ignored
  auto* p = static_cast<unsigned char*>(addr) + (begin - start);
  return torch::from_blob(p, t.shape, [addr, len](void*) { ::munmap(addr, static_cast<size_t>(len)); }, opts);
}

void SafetensorsFile::release_pages(const std::string& name) const {
  const TensorEntry& t = impl_->entry(name);
  auto* base = static_cast<unsigned char*>(impl_->map->addr);
  const uint64_t begin = impl_->data_offset + t.begin, end = impl_->data_offset + t.end;
  const uint64_t start = begin - begin % page_size();
  if (end > start) ::madvise(base + start, static_cast<size_t>(end - start), MADV_DONTNEED);  // advisory: errors ignored
}

torch::ScalarType SafetensorsFile::dtype(const std::string& name) const { return impl_->entry(name).dtype->type; }
std::vector<int64_t> SafetensorsFile::shape(const std::string& name) const { return impl_->entry(name).shape; }
int64_t SafetensorsFile::nbytes(const std::string& name) const {
  const TensorEntry& t = impl_->entry(name);
  return static_cast<int64_t>(t.end - t.begin);
}
const std::map<std::string, std::string>& SafetensorsFile::metadata() const { return impl_->metadata; }

// ---------------------------------------------------------------------------
// Writing

void safetensors_save_lazy(const std::string& path, std::vector<SafetensorsEntry> entries,
                           const std::function<torch::Tensor(const SafetensorsEntry&)>& produce,
                           const std::map<std::string, std::string>& metadata) {
  try {
    std::set<std::string> seen;
    std::vector<uint64_t> sizes;
    for (const auto& e : entries) {
      if (e.name == "__metadata__") throw std::runtime_error("a tensor may not be named \"__metadata__\"");
      if (!seen.insert(e.name).second) throw std::runtime_error("tensor \"" + e.name + "\" given twice");
      if (dtype_info(e.dtype) == nullptr)
        throw std::runtime_error("tensor \"" + e.name + "\": dtype " + c10::toString(e.dtype) +
                                 " is not supported (F32, F16, BF16, U8, I8, I32, I64)");
    }
    // Layout of the Python/Rust writer: descending dtype rank, then name.
    std::sort(entries.begin(), entries.end(), [](const SafetensorsEntry& a, const SafetensorsEntry& b) {
      int ra = dtype_info(a.dtype)->rank, rb = dtype_info(b.dtype)->rank;
      return ra != rb ? ra > rb : a.name < b.name;
    });
    std::string header = "{";
    if (!metadata.empty()) header += "\"__metadata__\":" + nlohmann::json(metadata).dump();
    uint64_t offset = 0;
    for (size_t i = 0; i < entries.size(); ++i) {
      const auto& e = entries[i];
      const DtypeInfo* d = dtype_info(e.dtype);
      uint64_t nbytes = static_cast<uint64_t>(d->size);
      std::string shape;
      for (int64_t s : e.shape) {
        if (s < 0) throw std::runtime_error("tensor \"" + e.name + "\": negative dimension");
        if (__builtin_mul_overflow(nbytes, static_cast<uint64_t>(s), &nbytes))
          throw std::runtime_error("tensor \"" + e.name + "\": size overflows");
        shape += (shape.empty() ? "" : ",") + std::to_string(s);
      }
      sizes.push_back(nbytes);
      if (header.size() > 1) header += ",";
      header += nlohmann::json(e.name).dump() + ":{\"dtype\":\"" + d->name + "\",\"shape\":[" + shape +
                "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + nbytes) + "]}";
      offset += nbytes;
    }
    header += "}";
    header.append((8 - header.size() % 8) % 8, ' ');

    AtomicFile out(path);
    uint64_t n = header.size();
    out.write(&n, 8);
    out.write(header);
    for (size_t i = 0; i < entries.size(); ++i) {
      const auto& e = entries[i];
      torch::Tensor t = produce(e);
      if (!t.defined()) throw std::runtime_error("tensor \"" + e.name + "\": no data produced");
      if (t.scalar_type() != e.dtype || t.sizes().vec() != e.shape)
        throw std::runtime_error("tensor \"" + e.name + "\": produced " + std::string(c10::toString(t.scalar_type())) +
                                 " " + c10::str(t.sizes()) + ", declared " + c10::toString(e.dtype) + " " +
                                 c10::str(c10::IntArrayRef(e.shape)));
      t = t.to(torch::kCPU).contiguous();
      if (static_cast<uint64_t>(t.nbytes()) != sizes[i])
        throw std::runtime_error("tensor \"" + e.name + "\": byte size mismatch");
      if (sizes[i] > 0) out.write(t.data_ptr(), static_cast<size_t>(sizes[i]));
    }
    out.commit();
  } catch (const std::exception& e) {
    throw std::runtime_error("writing safetensors file " + path + ": " + e.what());
  }
}


void safetensors_save(const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  std::vector<SafetensorsEntry> entries;
  std::unordered_map<std::string, const torch::Tensor*> by_name;
  for (const auto& [name, t] : tensors) {
    if (!t.defined()) throw std::runtime_error("writing safetensors file " + path + ": tensor \"" + name + "\" is undefined");
    entries.push_back({name, t.scalar_type(), t.sizes().vec()});
    by_name[name] = &t;  // duplicates are reported by safetensors_save_lazy
  }
  safetensors_save_lazy(path, std::move(entries),
                        [&](const SafetensorsEntry& e) { return *by_name.at(e.name); }, metadata);
}

// ---------------------------------------------------------------------------
// HfCheckpoint

namespace {

constexpr const char* kSingleFile = "model.safetensors";
constexpr const char* kIndexFile = "model.safetensors.index.json";

std::string pickle_refusal(const std::string& dir, const std::string& found) {
  return "model directory " + dir + " holds only pickle checkpoints (" + found +
         "), which are never loaded (unpickling can run arbitrary code). Convert it to safetensors first, e.g. "
         "python -c \"from transformers import AutoModelForCausalLM as M; d='" + dir +
         "'; M.from_pretrained(d).save_pretrained(d, safe_serialization=True)\"";
}

bool is_pickle_name(const std::string& f) {
  auto ends = [&](const std::string& s) { return f.size() >= s.size() && f.compare(f.size() - s.size(), s.size(), s) == 0; };
  return f == "pytorch_model.bin.index.json" || ends(".bin") || ends(".pt") || ends(".pth") || ends(".ckpt") ||
         ends(".pkl") || ends(".pickle");
}


// A shard name from the index must name a file inside the model directory.
void check_shard_name(const std::string& shard, const std::string& index_path) {
  auto bad = [&](const std::string& why) {
    throw std::runtime_error(index_path + ": shard file name \"" + shard + "\" refused: " + why);
  };
  if (shard.empty()) bad("empty");
  if (shard.find('\0') != std::string::npos) bad("contains a NUL byte");
  if (shard[0] == '/' || shard[0] == '\\') bad("absolute paths are not allowed; shards must be inside the model directory");
  size_t start = 0;
  while (start <= shard.size()) {
    size_t end = shard.find_first_of("/\\", start);
    if (end == std::string::npos) end = shard.size();
    if (shard.compare(start, end - start, "..") == 0 && end - start == 2)
      bad("\"..\" leaves the model directory");
    start = end + 1;
  }
}

}  // namespace

struct HfCheckpoint::Impl {
  std::string dir;
  std::string source;
  std::vector<std::string> files;  // relative to dir
  std::vector<SafetensorsFile> opened;
  std::map<std::string, size_t> where;  // tensor -> index into files/opened
};

HfCheckpoint::HfCheckpoint(const std::string& dir) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.dir = dir;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw std::runtime_error("model directory " + dir + " does not exist or is not a directory");
  const fs::path d(dir);
  if (fs::is_regular_file(d / kSingleFile, ec)) {
    m.source = kSingleFile;
    m.files.push_back(kSingleFile);
    try {
      m.opened.emplace_back((d / kSingleFile).string());
    } catch (const std::exception& e) {
      throw std::runtime_error(std::string("loading ") + kSingleFile + ": " + e.what());
    }
    for (const auto& name : m.opened[0].names()) m.where[name] = 0;
    return;
  }
  if (fs::is_regular_file(d / kIndexFile, ec)) {
    m.source = kIndexFile;
    const std::string index_path = (d / kIndexFile).string();
    nlohmann::json j = json_parse_strict(json_read_file(index_path, kJsonConfigMaxBytes), index_path);
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      throw std::runtime_error(index_path + ": missing the \"weight_map\" object");
    std::map<std::string, size_t> file_idx;
    std::vector<std::pair<std::string, std::string>> mapping;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string())
        throw std::runtime_error(index_path + ": weight_map entry \"" + it.key() + "\" is not a file name string");
      std::string shard = it.value().get<std::string>();
      check_shard_name(shard, index_path);
      if (!file_idx.count(shard)) {
        file_idx[shard] = m.files.size();
        m.files.push_back(shard);
      }
      mapping.emplace_back(it.key(), shard);
    }
    for (const auto& shard : m.files) {
      try {
        m.opened.emplace_back((d / shard).string());
      } catch (const std::exception& e) {
        throw std::runtime_error("loading shard " + shard + ": " + e.what());
      }
    }
    for (const auto& [name, shard] : mapping) {
      size_t i = file_idx[shard];
      if (!m.opened[i].has(name))
        throw std::runtime_error("loading shard " + shard + ": " + index_path + " maps tensor \"" + name +
                                 "\" to it, but the shard has no such tensor");
      m.where[name] = i;
    }
    return;
  }
  std::vector<std::string> pickles;
  for (const auto& ent : fs::directory_iterator(d, ec)) {
    std::string f = ent.path().filename().string();
    if (is_pickle_name(f)) pickles.push_back(f);
  }
  std::sort(pickles.begin(), pickles.end());
  if (!pickles.empty()) {
    std::string found;
    for (size_t i = 0; i < pickles.size() && i < 3; ++i) found += (i ? ", " : "") + pickles[i];
    if (pickles.size() > 3) found += ", ...";
    throw std::runtime_error(pickle_refusal(dir, found));
  }
  throw std::runtime_error("model directory " + dir + " has neither " + kSingleFile + " nor " + kIndexFile);
}

HfCheckpoint::~HfCheckpoint() = default;
HfCheckpoint::HfCheckpoint(HfCheckpoint&&) noexcept = default;
HfCheckpoint& HfCheckpoint::operator=(HfCheckpoint&&) noexcept = default;

const std::string& HfCheckpoint::dir() const { return impl_->dir; }
const std::string& HfCheckpoint::source() const { return impl_->source; }
bool HfCheckpoint::has(const std::string& name) const { return impl_->where.count(name) > 0; }

std::vector<std::string> HfCheckpoint::names() const {
  std::vector<std::string> out;
  out.reserve(impl_->where.size());
  for (const auto& kv : impl_->where) out.push_back(kv.first);
  return out;
}

std::optional<torch::Tensor> HfCheckpoint::find(const std::string& name) const {
  auto it = impl_->where.find(name);
  if (it == impl_->where.end()) return std::nullopt;
  return impl_->opened[it->second].get(name);
}

torch::Tensor HfCheckpoint::map_copy_on_write(const std::string& name, bool random_access) const {
  file_of(name);  // throws naming the directory when absent
  return impl_->opened[impl_->where.at(name)].map_copy_on_write(name, random_access);
}

void HfCheckpoint::release_pages(const std::string& name) const {
  auto it = impl_->where.find(name);
  if (it != impl_->where.end()) impl_->opened[it->second].release_pages(name);
}

const std::string& HfCheckpoint::file_of(const std::string& name) const {
  auto it = impl_->where.find(name);
  if (it == impl_->where.end())
    throw std::runtime_error("model directory " + impl_->dir + " (" + impl_->source + "): no tensor \"" + name + "\"");
  return impl_->files[it->second];
}

}  // namespace dpo
