// Reading and writing the safetensors format (Hugging Face), and opening a
// Hugging Face model directory (model.safetensors, or an index + shards).
//
// Reading mmaps the file and validates the whole header before any tensor is
// handed out: a safetensors file is untrusted input (downloaded weights), so
// every length, offset, shape and name is checked and every error names the
// file and the tensor. Pickle files (pytorch_model.bin, *.pt) are never read.
//
// File layout: [u64 little-endian N][N bytes JSON header, space padded][data],
// header = {"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [b, e]}},
// offsets relative to the start of the data section, contiguous from 0.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json_fwd.hpp>
#include <torch/types.h>

namespace dpo {

/// Largest header accepted (the Python/Rust library's limit).
constexpr uint64_t kSafetensorsMaxHeaderBytes = 100'000'000;

/// Parses JSON text strictly: like json_parse (util/json_read.h: nesting past
/// kJsonMaxDepth refused), but a key repeated in any object is an error (nlohmann
/// keeps the last one silently, which would let two header entries disagree about a
/// tensor), and so is invalid UTF-8. `what` (a file name) prefixes errors.
nlohmann::json json_parse_strict(const std::string& text, const std::string& what);

/// One validated safetensors file, memory-mapped read-only. Move-only.
class SafetensorsFile {
 public:
  /// Maps and validates `path`; throws std::runtime_error naming the file and tensor.
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(SafetensorsFile&&) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const;
  bool has(const std::string& name) const;
  /// Tensor names in data (offset) order.
  std::vector<std::string> names() const;
  /// Zero-copy CPU view of the mapped bytes (a copy only when the file's offset
  /// leaves the data misaligned for its dtype). The mapping is read-only: never
  /// write into the result in place; clone() to own or modify. The view keeps
  /// the mapping alive by itself. Throws (naming file and tensor) if absent.
  torch::Tensor get(const std::string& name) const;
  /// The tensor in its own copy-on-write mapping of the file (MAP_PRIVATE, read and
  /// write): pages are read from the file only when touched and stay reclaimable page
  /// cache until written (a written page becomes the process's own copy), so a large
  /// table of which a step reads a few rows (the embeddings) costs only those rows of
  /// resident memory. Independent of this object's lifetime. The file must not be
  /// rewritten in place while the tensor lives (replacing it by rename, as every writer
  /// here does, is safe). A copy when the data is misaligned for its dtype.
  /// random_access: madvise(MADV_RANDOM) (a table read by rows: no readahead).
  torch::Tensor map_copy_on_write(const std::string& name, bool random_access = false) const;
  /// Drops the pages of `name` from this process's resident set (madvise DONTNEED on
  /// the read-only mapping: they are read again from the file if touched), so a loader
  /// that has converted a tensor does not keep the file's bytes counted in its RSS.
  /// Views from get() stay valid.
  void release_pages(const std::string& name) const;
  torch::ScalarType dtype(const std::string& name) const;
  std::vector<int64_t> shape(const std::string& name) const;
  /// Bytes of the tensor's data.
  int64_t nbytes(const std::string& name) const;
  /// The header's "__metadata__" (empty if absent).
  const std::map<std::string, std::string>& metadata() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Writes `tensors` to `path` as the Python library does: data ordered by dtype
/// alignment (largest first) then name, header padded with spaces to a multiple
/// of 8, "__metadata__" first. Tensors may be non-contiguous or on any device
/// (copied to CPU). Written to `path.tmp.<pid>`, fsynced, renamed over `path`;
/// on error the temporary file is removed and the message names `path`.
void safetensors_save(const std::string& path,
                      const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

/// Name, dtype and shape of a tensor to be written by safetensors_save_lazy.
struct SafetensorsEntry {
  std::string name;
  torch::ScalarType dtype = torch::kFloat32;
  std::vector<int64_t> shape;
};

/// Like safetensors_save, but each tensor is produced on demand (in file order)
/// by `produce(entry)` and dropped after it is written, so at most one tensor
/// exists at a time. The produced tensor must match the entry's dtype and shape.
void safetensors_save_lazy(const std::string& path, std::vector<SafetensorsEntry> entries,
                           const std::function<torch::Tensor(const SafetensorsEntry&)>& produce,
                           const std::map<std::string, std::string>& metadata = {});

/// A Hugging Face model directory's weights: `model.safetensors`, or
/// `model.safetensors.index.json` + shards (taken in that order, as transformers
/// does). Shard names must stay inside the directory. A directory with only
/// pickle checkpoints (pytorch_model.bin, *.bin, *.pt, *.pth) is refused.
class HfCheckpoint {
 public:
  explicit HfCheckpoint(const std::string& dir);
  ~HfCheckpoint();
  HfCheckpoint(HfCheckpoint&&) noexcept;
  HfCheckpoint& operator=(HfCheckpoint&&) noexcept;
  HfCheckpoint(const HfCheckpoint&) = delete;
  HfCheckpoint& operator=(const HfCheckpoint&) = delete;

  const std::string& dir() const;
  /// "model.safetensors" or "model.safetensors.index.json": what was opened.
  const std::string& source() const;
  bool has(const std::string& name) const;
  /// Sorted tensor names over all files.
  std::vector<std::string> names() const;
  /// Zero-copy view (see SafetensorsFile::get); nullopt when absent.
  std::optional<torch::Tensor> find(const std::string& name) const;
  /// SafetensorsFile::map_copy_on_write of the file holding `name`; throws if absent.
  torch::Tensor map_copy_on_write(const std::string& name, bool random_access = false) const;
  /// SafetensorsFile::release_pages of the file holding `name`; nothing if absent.
  void release_pages(const std::string& name) const;
  /// The file (relative to dir) holding `name`; throws if absent.
  const std::string& file_of(const std::string& name) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dpo
