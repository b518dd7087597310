#include "launch/run_dir.h"

#include "core/safetensors.h"
#include "util/fs.h"
#include "util/json_read.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <stdexcept>

#include <nlohmann/json.hpp>

namespace fs = std::filesystem;

namespace dpo {

namespace {
std::string os_error(const std::string& what, const std::string& path) {
  return what + " " + path + ": " + std::strerror(errno);
}
bool parse_step(const std::string& name, int64_t* step) {
  static const std::regex re("^checkpoint-([0-9]+)$");
  std::smatch m;
  if (!std::regex_match(name, m, re)) return false;
  *step = std::stoll(m[1].str());
  return true;
}
bool is_complete(const fs::path& dir) {
  std::string text;
  try {
    text = json_read_file((dir / "trainer_state.json").string(), kJsonConfigMaxBytes);
  } catch (const std::exception&) {
    return false;
  }
  const auto j = json_parse_or_discarded(text);
  return j.is_object() && j.contains("global_step");
}
}  // namespace

void fsync_path(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw std::runtime_error(os_error("cannot open for fsync", path));
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  errno = err;
  if (rc != 0) throw std::runtime_error(os_error("fsync failed on", path));
}


std::string checkpoint_commit(const std::string& output_dir, int64_t step,
                              const std::function<void(const std::string&)>& write_files) {
  const fs::path out(output_dir);
  const fs::path final_dir = out / ("checkpoint-" + std::to_string(step));
  const fs::path tmp = out / (".checkpoint-" + std::to_string(step) + ".tmp-" + std::to_string(::getpid()));
  std::error_code ec;
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  if (ec) throw std::runtime_error("cannot create checkpoint directory " + tmp.string() + ": " + ec.message());
  try {
    write_files(tmp.string());
    for (const auto& e : fs::directory_iterator(tmp)) {
      if (e.is_regular_file()) fsync_path(e.path().string());
    }
    fsync_path(tmp.string());
    if (fs::exists(final_dir)) {
      // A checkpoint of the same step from an earlier (crashed) attempt: replace it.
      fs::path old = out / (".checkpoint-" + std::to_string(step) + ".old-" + std::to_string(::getpid()));
      fs::rename(final_dir, old);
      fs::rename(tmp, final_dir);
      fs::remove_all(old, ec);
    } else {
      fs::rename(tmp, final_dir);
    }
    fsync_path(out.string());
  } catch (const std::exception& e) {
    fs::remove_all(tmp, ec);
    throw std::runtime_error("writing checkpoint " + final_dir.string() + " failed (earlier checkpoints are intact): " +
                             e.what());
  }
  return final_dir.string();
}

std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& output_dir) {
  std::vector<std::pair<int64_t, std::string>> out;
  std::error_code ec;
  if (!fs::is_directory(output_dir, ec)) return out;
  for (const auto& e : fs::directory_iterator(output_dir, ec)) {
    int64_t step;
    if (e.is_directory() && parse_step(e.path().filename().string(), &step) && is_complete(e.path())) {
      out.emplace_back(step, e.path().string());
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

int remove_incomplete_checkpoints(const std::string& output_dir) {
  int n = 0;
  std::error_code ec;
  if (!fs::is_directory(output_dir, ec)) return 0;
  std::vector<fs::path> doomed;
  for (const auto& e : fs::directory_iterator(output_dir, ec)) {
    const std::string name = e.path().filename().string();
    if (e.is_directory() && name.rfind(".checkpoint-", 0) == 0) doomed.push_back(e.path());
  }
  for (const auto& p : doomed) {
    fs::remove_all(p, ec);
    if (!ec) ++n;
  }
  return n;
}

void rotate_checkpoints(const std::string& output_dir, int64_t limit, const std::string& keep_path) {
  if (limit <= 0) return;
  auto all = list_checkpoints(output_dir);
  int64_t excess = static_cast<int64_t>(all.size()) - limit;
  for (const auto& [step, path] : all) {
    if (excess <= 0) break;
    if (fs::equivalent(path, keep_path)) continue;
    std::error_code ec;
    fs::remove_all(path, ec);
    if (ec) throw std::runtime_error("cannot remove old checkpoint " + path + ": " + ec.message());
    --excess;
  }
}

std::string resolve_resume(const std::string& arg, const std::string& output_dir) {
  if (arg.empty() || arg == "false" || arg == "none") return "";
  if (arg == "auto" || arg == "true") {
    auto all = list_checkpoints(output_dir);
    return all.empty() ? "" : all.back().second;
  }
  std::error_code ec;
  if (!fs::is_directory(arg, ec))
    throw std::runtime_error("--resume_from_checkpoint " + arg + ": no such checkpoint directory (use auto to start fresh when none exists)");
  if (!is_complete(arg))
    throw std::runtime_error("--resume_from_checkpoint " + arg +
                             ": trainer_state.json is missing or damaged; this checkpoint is incomplete (pick an older checkpoint-<step>)");
  return arg;
}

}  // namespace dpo
