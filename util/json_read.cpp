#include "util/json_read.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include "util/fs.h"

namespace dpo {

namespace {

std::string size_text(int64_t n) {
  if (n >= (int64_t(1) << 30) && n % (int64_t(1) << 30) == 0) return std::to_string(n >> 30) + " GiB";
  if (n >= (int64_t(1) << 20) && n % (int64_t(1) << 20) == 0) return std::to_string(n >> 20) + " MiB";
  return std::to_string(n) + " bytes";
}

[[noreturn]] void limit_error(const std::string& what, const std::string& problem, const std::string& hint) {
  throw JsonLimitError((what.empty() ? "" : what + ": ") + problem + (hint.empty() ? "" : "; " + hint));
}

void fail_size(const std::string& what, int64_t n, int64_t max_bytes, const std::string& hint, bool at_least) {
  limit_error(what,
              (at_least ? "more than " : "") + std::to_string(n) + " bytes of JSON, over this reader's limit of " +
                  size_text(max_bytes),
              hint);
}

}  // namespace

int64_t json_too_deep_at(std::string_view text, int max_depth) {
  const char* s = text.data();
  const size_t n = text.size();
  int64_t depth = 0;
  size_t i = 0;
  while (i < n) {
    const char c = s[i];
    if (c == '"') {
      // Skip the string: to the first quote not escaped, i.e. preceded by an even run of
      // backslashes. The run is counted back only to `from` (the byte after the string's
      // opening quote or after an escaped quote), so the scan stays linear.
      size_t from = i + 1;
      for (;;) {
        const void* q = from < n ? std::memchr(s + from, '"', n - from) : nullptr;
        if (!q) return -1;  // unterminated string: the parser reports it
        const size_t at = static_cast<const char*>(q) - s;
        size_t run = 0;
        while (at - run > from && s[at - run - 1] == '\\') ++run;
        from = at + 1;
        if (run % 2 == 0) break;
      }
      i = from;
      continue;
    }
    if (c == '[' || c == '{') {
      if (++depth > max_depth) return static_cast<int64_t>(i);
    } else if (c == ']' || c == '}') {
      if (depth > 0) --depth;
    }
    ++i;
  }
  return -1;
}

void json_check_limits(std::string_view text, const std::string& what, const JsonLimits& limits) {
  if (limits.max_bytes > 0 && static_cast<int64_t>(text.size()) > limits.max_bytes)
    fail_size(what, static_cast<int64_t>(text.size()), limits.max_bytes, limits.hint, false);
  if (json_too_deep_at(text, kJsonMaxDepth) >= 0)
    limit_error(what,
                "JSON nested deeper than " + std::to_string(kJsonMaxDepth) +
                    " levels (the limit of every JSON reader here)",
                limits.hint);
}

template <class Json>
Json json_parse(std::string_view text, const std::string& what, const JsonLimits& limits,
                const typename Json::parser_callback_t& cb) {
  json_check_limits(text, what, limits);
  return Json::parse(text.begin(), text.end(), cb);
}

template <class Json>
Json json_parse_or_discarded(std::string_view text, const JsonLimits& limits) {
  if ((limits.max_bytes > 0 && static_cast<int64_t>(text.size()) > limits.max_bytes) ||
      json_too_deep_at(text, kJsonMaxDepth) >= 0)
    return Json(Json::value_t::discarded);
  return Json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
}

template nlohmann::json json_parse<nlohmann::json>(std::string_view, const std::string&, const JsonLimits&,
                                                   const nlohmann::json::parser_callback_t&);
template nlohmann::ordered_json json_parse<nlohmann::ordered_json>(std::string_view, const std::string&,
                                                                   const JsonLimits&,
                                                                   const nlohmann::ordered_json::parser_callback_t&);
template nlohmann::json json_parse_or_discarded<nlohmann::json>(std::string_view, const JsonLimits&);
template nlohmann::ordered_json json_parse_or_discarded<nlohmann::ordered_json>(std::string_view, const JsonLimits&);

std::string json_read_file(const std::string& path, int64_t max_bytes, const std::string& hint) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error(path + ": cannot open: " + errno_text());
  struct FdCloser {
    int fd;
    ~FdCloser() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && max_bytes > 0 && int64_t(st.st_size) > max_bytes)
    fail_size(path, int64_t(st.st_size), max_bytes, hint, false);
  std::string out;
  if (S_ISREG(st.st_mode) && st.st_size > 0) out.reserve(static_cast<size_t>(st.st_size));
  char buf[65536];
  for (;;) {
    const ssize_t r = ::read(fd, buf, sizeof buf);
    if (r < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error(path + ": read failed: " + errno_text());
    }
    if (r == 0) break;
    out.append(buf, static_cast<size_t>(r));
    // A file that grew since fstat, or a pipe: stop at the limit instead of reading on.
    if (max_bytes > 0 && int64_t(out.size()) > max_bytes) fail_size(path, max_bytes, max_bytes, hint, true);
  }
  return out;
}

}  // namespace dpo
