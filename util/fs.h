// File helpers every room shares (no libtorch, no third-party headers): whole-file
// reads and the one atomic write the project uses for every output a reader may open
// while it is being replaced (configs, adapters, safetensors, reports).
#pragma once
#include <cstddef>
#include <string>

namespace dpo {

/// strerror(errno) of the calling thread, as text.
std::string errno_text();

/// The whole file as bytes. Throws std::runtime_error "PATH: cannot open: REASON" or
/// "PATH: read failed: REASON".
std::string read_file(const std::string& path);

/// A file written under a temporary name next to `path` (path.tmp.<pid>) and renamed
/// over it by commit(): fsync of the file, rename, fsync of the directory. A reader sees
/// the old file or the new one, never a torn one. Destroyed without commit() (an error
/// on the way), the temporary file is removed and `path` is untouched.
class AtomicFile {
 public:
  explicit AtomicFile(std::string path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  /// Appends all of [p, p + n) (retries short writes and EINTR).
  void write(const void* p, size_t n);
  void write(const std::string& bytes) { write(bytes.data(), bytes.size()); }
  /// fsync, close, rename over the final path, fsync the directory.
  void commit();
  const std::string& path() const { return path_; }

 private:
  std::string path_, tmp_;
  int fd_ = -1;
};

/// AtomicFile in one call. Throws std::runtime_error "writing PATH: REASON".
void write_file_atomic(const std::string& path, const std::string& bytes);

}  // namespace dpo
