// Shared helpers of the libFuzzer harnesses (tests/fuzz/fuzz_*.cpp).
//
// Every harness defines LLVMFuzzerTestOneInput. Built with clang -fsanitize=fuzzer
// (scripts/fuzz.sh, -DDPO_FUZZ=ON) it is a fuzzer; built with replay_main.cpp (the
// normal build, ctest label unit) it replays the seed and regression corpora.
//
// The contract a parser must keep for any input bytes: it returns a value or throws
// std::runtime_error (our one-line user error). Anything else is a finding and
// aborts: a crash or sanitizer report, an exception of another type (a bare
// nlohmann/boost/std::logic_error/c10 message reaches the user without the file or
// field), or a broken property the harness checks (e.g. a round trip).
#pragma once
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <string>
#include <typeinfo>

#include <cxxabi.h>

namespace fuzz {

[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "FUZZ FINDING: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

inline std::string current_exception_type() {
  const std::type_info* t = abi::__cxa_current_exception_type();
  if (t == nullptr) return "?";
  int status = 0;
  char* n = abi::__cxa_demangle(t->name(), nullptr, nullptr, &status);
  std::string s = status == 0 && n ? n : t->name();
  std::free(n);
  return s;
}

/// Runs body; a std::runtime_error is the parser's clean rejection (its message must
/// not be empty). Any other exception is a finding.
template <class F>
void expect_clean(const char* what, F&& body) {
  try {
    body();
  } catch (const std::runtime_error& e) {
    if (e.what()[0] == '\0') fail(std::string(what) + ": empty error message");
    if (std::getenv("DPO_FUZZ_VERBOSE")) std::fprintf(stderr, "%s: rejected: %s\n", what, e.what());
  } catch (const std::exception& e) {
    fail(std::string(what) + ": escaped " + current_exception_type() + ": " + e.what());
  } catch (...) {
    fail(std::string(what) + ": escaped a non-std exception " + current_exception_type());
  }
}

/// A per-process scratch directory (tmpfs when /dev/shm exists), created once.
inline const std::string& scratch_dir() {
  static const std::string dir = [] {
    const char* base = std::getenv("DPO_FUZZ_TMP");
    std::string b = base ? base : (access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
    std::string d = b + "/dpo_fuzz_" + std::to_string(getpid());
    std::error_code ec;
    std::filesystem::create_directories(d, ec);
    if (ec) fail("cannot create " + d + ": " + ec.message());
    // Removed at exit (the replay driver and libFuzzer both exit normally).
    static std::string to_remove = d;
    std::atexit([] {
      std::error_code e;
      std::filesystem::remove_all(to_remove, e);
    });
    return d;
  }();
  return dir;
}

/// Writes data to scratch_dir()/name (replacing it) and returns the path.
inline std::string write_scratch(const std::string& name, const uint8_t* data, size_t size) {
  std::string path = scratch_dir() + "/" + name;
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) fail("cannot write " + path);
  if (size > 0 && std::fwrite(data, 1, size, f) != size) fail("short write " + path);
  if (std::fclose(f) != 0) fail("cannot close " + path);
  return path;
}

}  // namespace fuzz
