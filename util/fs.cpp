#include "util/fs.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <stdexcept>

namespace dpo {
namespace fs = std::filesystem;

std::string errno_text() { return std::strerror(errno); }

std::string read_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error(path + ": cannot open: " + errno_text());
  std::string out;
  char buf[65536];
  for (;;) {
    ssize_t r = ::read(fd, buf, sizeof buf);
    if (r < 0) {
      if (errno == EINTR) continue;
      std::string e = errno_text();
      ::close(fd);
      throw std::runtime_error(path + ": read failed: " + e);
    }
    if (r == 0) break;
    out.append(buf, static_cast<size_t>(r));
  }
  ::close(fd);
  return out;
}

namespace {
void fsync_dir_of(const std::string& path) {
  fs::path parent = fs::path(path).parent_path();
  if (parent.empty()) parent = ".";
  int dfd = ::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);  // best effort: some file systems refuse fsync on directories
    ::close(dfd);
  }
}
}  // namespace

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)), tmp_(path_ + ".tmp." + std::to_string(::getpid())) {
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) throw std::runtime_error("cannot create " + tmp_ + ": " + errno_text());
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) {
    ::close(fd_);
    ::unlink(tmp_.c_str());
  }
}

void AtomicFile::write(const void* p, size_t n) {
  if (fd_ < 0) throw std::runtime_error(path_ + ": write after commit");
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    ssize_t w = ::write(fd_, c, std::min<size_t>(n, size_t{1} << 30));
    if (w < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error("write failed: " + errno_text());
    }
    c += w;
    n -= static_cast<size_t>(w);
  }
}

void AtomicFile::commit() {
  if (fd_ < 0) throw std::runtime_error(path_ + ": committed twice");
  if (::fsync(fd_) != 0) throw std::runtime_error("fsync failed: " + errno_text());
  const int rc = ::close(fd_);
  fd_ = -1;
  if (rc != 0) {
    const std::string e = errno_text();
    ::unlink(tmp_.c_str());
    throw std::runtime_error("close failed: " + e);
  }
  if (::rename(tmp_.c_str(), path_.c_str()) != 0) {
    const std::string e = errno_text();
    ::unlink(tmp_.c_str());
    throw std::runtime_error("cannot rename " + tmp_ + " to it: " + e);
  }
  fsync_dir_of(path_);
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  try {
    AtomicFile f(path);
    f.write(bytes);
    f.commit();
  } catch (const std::exception& e) {
    throw std::runtime_error("writing " + path + ": " + e.what());
  }
}

}  // namespace dpo
