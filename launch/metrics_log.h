// Rank 0's record of a run: metrics.jsonl (one JSON object per log event, TRL
// key names), TensorBoard event files (runs/, readable by TensorBoard without
// TensorFlow: a minimal writer of the tfevents record format), and the live
// progress line on a terminal.
#pragma once
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace dpo {

/// Appends TensorBoard scalar events to <dir>/events.out.tfevents.<time>.<host>.
class TensorBoardWriter {
 public:
  explicit TensorBoardWriter(const std::string& dir);
  ~TensorBoardWriter();
  TensorBoardWriter(const TensorBoardWriter&) = delete;
  TensorBoardWriter& operator=(const TensorBoardWriter&) = delete;
  void add_scalar(const std::string& tag, double value, int64_t step);
  void flush();
  const std::string& path() const { return path_; }

 private:
  void write_record(const std::string& data);
  std::string path_;
  std::FILE* f_ = nullptr;
};

/// CRC-32C (Castagnoli), as the tfevents record format requires.
uint32_t crc32c(const void* data, size_t n);

class MetricsLog {
 public:
  /// report_to: none, or a comma-separated list of jsonl | tensorboard | html
  /// (metrics.jsonl is written for any of them; html redraws report.html after
  /// every event, atomically).
  MetricsLog(const std::string& output_dir, const std::string& report_to);
  /// Writes one event (a JSON object with "step") to every sink, flushed.
  void log(const nlohmann::json& event);
  /// Every event logged by this process (for trainer_state.json's log_history).
  const std::vector<nlohmann::json>& history() const { return history_; }
  void set_history(std::vector<nlohmann::json> h) { history_ = std::move(h); }

 private:
  void refresh_report();
  std::string output_dir_, jsonl_path_;
  bool enabled_, html_ = false, report_warned_ = false;
  std::unique_ptr<TensorBoardWriter> tb_;
  std::vector<nlohmann::json> history_;
};

/// "step 40/1000 | loss 0.6931 | acc 0.50 | 1234 tok/s | ETA 12:34" redrawn in place on a
/// terminal; on a non-terminal nothing (the log lines are printed instead).
class ProgressLine {
 public:
  ProgressLine(int64_t total_steps, int64_t first_step, const std::string& mode /*auto|on|off*/);
  bool active() const { return active_; }
  void update(int64_t step, double loss, double accuracy, double tokens_per_s);
  /// Ends the line so that ordinary output can follow.
  void finish();

 private:
  int64_t total_, first_;
  bool active_, dirty_ = false;
  std::chrono::steady_clock::time_point start_;
};

/// "1:02:03" / "02:03".
std::string format_duration(double seconds);

}  // namespace dpo
