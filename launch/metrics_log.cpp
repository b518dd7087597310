#include "launch/metrics_log.h"

#include <unistd.h>

#include <cmath>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "launch/report.h"

namespace dpo {

namespace {
// ---- protobuf wire format, just what tensorboard's Event needs ------------
void put_varint(std::string& s, uint64_t v) {
  while (v >= 0x80) {
    s.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  s.push_back(static_cast<char>(v));
}
void put_tag(std::string& s, int field, int wire) { put_varint(s, (static_cast<uint64_t>(field) << 3) | wire); }
void put_bytes(std::string& s, int field, const std::string& b) {
  put_tag(s, field, 2);
  put_varint(s, b.size());
  s += b;
}
template <class T>
void put_fixed(std::string& s, int field, T v) {
  put_tag(s, field, sizeof(T) == 8 ? 1 : 5);
  char buf[sizeof(T)];
  std::memcpy(buf, &v, sizeof(T));  // little-endian host (x86-64, aarch64)
  s.append(buf, sizeof(T));
}
std::string event(double wall_time, int64_t step) {
  std::string e;
  put_fixed<double>(e, 1, wall_time);  // Event.wall_time
  put_tag(e, 2, 0);                    // Event.step
  put_varint(e, static_cast<uint64_t>(step));
  return e;
}
double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}
uint32_t masked_crc(const std::string& d) {
  uint32_t c = crc32c(d.data(), d.size());
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}
}  // namespace

uint32_t crc32c(const void* data, size_t n) {
  static uint32_t table[256];
  static bool init = [] {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82f63b78u : c >> 1;
      table[i] = c;
    }
    return true;
  }();
  (void)init;
  uint32_t c = 0xffffffffu;
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; ++i) c = table[(c ^ p[i]) & 0xff] ^ (c >> 8);
  return c ^ 0xffffffffu;
}

TensorBoardWriter::TensorBoardWriter(const std::string& dir) {
  std::filesystem::create_directories(dir);
  char host[256] = "localhost";
  ::gethostname(host, sizeof(host) - 1);
  path_ = dir + "/events.out.tfevents." + std::to_string(static_cast<int64_t>(now_seconds())) + "." + host;
  f_ = std::fopen(path_.c_str(), "ab");
  if (!f_) throw std::runtime_error("cannot create TensorBoard event file " + path_ + ": " + std::strerror(errno));
  std::string e = event(now_seconds(), 0);
  put_bytes(e, 3, "brain.Event:2");  // Event.file_version
  write_record(e);
  flush();
}

TensorBoardWriter::~TensorBoardWriter() {
  if (f_) std::fclose(f_);
}

void TensorBoardWriter::write_record(const std::string& data) {
  uint64_t len = data.size();
  std::string header(reinterpret_cast<const char*>(&len), 8);
  uint32_t hcrc = masked_crc(header), dcrc = masked_crc(data);
  std::fwrite(header.data(), 1, 8, f_);
  std::fwrite(&hcrc, 4, 1, f_);
  std::fwrite(data.data(), 1, data.size(), f_);
  std::fwrite(&dcrc, 4, 1, f_);
}

void TensorBoardWriter::add_scalar(const std::string& tag, double value, int64_t step) {
  std::string v;
  put_bytes(v, 1, tag);                             // Summary.Value.tag
  put_fixed<float>(v, 2, static_cast<float>(value));  // Summary.Value.simple_value
  std::string summary;
  put_bytes(summary, 1, v);  // Summary.value
  std::string e = event(now_seconds(), step);
  put_bytes(e, 5, summary);  // Event.summary
  write_record(e);
}

void TensorBoardWriter::flush() {
  if (f_) std::fflush(f_);
}

MetricsLog::MetricsLog(const std::string& output_dir, const std::string& report_to)
    : output_dir_(output_dir), jsonl_path_(output_dir + "/metrics.jsonl"), enabled_(report_to != "none") {
  std::stringstream in(report_to);
  for (std::string sink; std::getline(in, sink, ',');) {
    if (sink == "tensorboard") tb_ = std::make_unique<TensorBoardWriter>(output_dir + "/runs");
    if (sink == "html") html_ = true;
  }
}

void MetricsLog::refresh_report() {
  try {
    report_write({output_dir_}, output_dir_ + "/report.html");
  } catch (const std::exception& e) {
    // The report is a view of metrics.jsonl: a failure to draw it must not stop training.
    if (!report_warned_) std::fprintf(stderr, "warning: %s/report.html not updated: %s\n", output_dir_.c_str(), e.what());
    report_warned_ = true;
  }
}

void MetricsLog::log(const nlohmann::json& ev) {
  history_.push_back(ev);
  if (!enabled_) return;
  std::ofstream out(jsonl_path_, std::ios::app);
  if (!out) throw std::runtime_error("cannot append to " + jsonl_path_);
  out << ev.dump() << "\n";
  out.flush();
  if (!out) throw std::runtime_error("write failed on " + jsonl_path_ + " (disk full?)");
  if (tb_) {
    const int64_t step = ev.value("step", int64_t{0});
    for (auto it = ev.begin(); it != ev.end(); ++it) {
      if (it.key() == "step" || !it.value().is_number()) continue;
      // HF's TensorBoard callback groups train/ and eval/ scalars.
      std::string tag = it.key();
      if (tag.rfind("eval_", 0) == 0) tag = "eval/" + tag.substr(5);
      else tag = "train/" + tag;
      tb_->add_scalar(tag, it.value().get<double>(), step);
    }
    tb_->flush();
  }
  if (html_) refresh_report();
}

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "--:--";
  int64_t t = static_cast<int64_t>(s + 0.5);
  char buf[32];
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", (long long)(t / 3600), (long long)(t / 60 % 60), (long long)(t % 60));
  else
    std::snprintf(buf, sizeof buf, "%02lld:%02lld", (long long)(t / 60), (long long)(t % 60));
  return buf;
}

ProgressLine::ProgressLine(int64_t total, int64_t first, const std::string& mode)
    : total_(total), first_(first), start_(std::chrono::steady_clock::now()) {
  active_ = mode == "on" || (mode == "auto" && ::isatty(STDERR_FILENO));
}

void ProgressLine::update(int64_t step, double loss, double acc, double tps) {
  if (!active_) return;
  double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  double per = step > first_ ? el / static_cast<double>(step - first_) : NAN;
  double eta = per * static_cast<double>(total_ - step);
  std::fprintf(stderr, "\r\033[2Kstep %lld/%lld | loss %.4f | acc %.2f | %.0f tok/s | %s elapsed | ETA %s", (long long)step,
               (long long)total_, loss, acc, tps, format_duration(el).c_str(), format_duration(eta).c_str());
  std::fflush(stderr);
  dirty_ = true;
}

void ProgressLine::finish() {
  if (active_ && dirty_) std::fprintf(stderr, "\n");
  dirty_ = false;
}

}  // namespace dpo
