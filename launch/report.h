// The training report: one self-contained report.html (inline SVG line charts, inline
// CSS, no JavaScript, nothing fetched from the network) drawn from a run's
// metrics.jsonl and training_args.json. Several runs overlay in distinct colours.
// Written by `dpo_report OUTPUT_DIR...` and, with --report_to html, by dpo_dist at
// every log event (atomically: a browser reload never sees half a file).
//
// The plot helpers (axis ranges and ticks, log-scale choice, NaN gaps) are public so
// that tests can check them apart from the HTML.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace dpo {

/// One axis of a chart: the drawn range [lo, hi] and its tick values. A log axis
/// holds lo, hi and ticks as values (not their logarithms).
struct PlotAxis {
  double lo = 0, hi = 1;
  std::vector<double> ticks;
  bool log = false;
};

/// A linear axis over [lo, hi] with about `target` "nice" ticks (1, 2, 2.5 or 5 times
/// a power of ten), widened to whole ticks. lo == hi gets a small range around the
/// value; non-finite bounds give [0, 1].
PlotAxis nice_axis(double lo, double hi, int target = 5);
/// A log10 axis over [lo, hi] (both > 0), widened to powers of ten; ticks at every
/// power of ten (and 2x, 5x when the range spans at most two decades).
PlotAxis log_axis(double lo, double hi);
/// True when every finite value is > 0 and max/min >= 100 (two decades or more):
/// such a series is drawn on a log axis.
bool spans_decades(const std::vector<double>& values);
/// Tick label: "0", "0.25", "1.5k", "3e-05", at most ~4 significant digits.
std::string format_tick(double v);

/// A line of a chart: y over x, NaN/inf y values leave a gap.
struct PlotSeries {
  std::string label;
  std::string color;       // CSS colour
  std::string dash;        // SVG stroke-dasharray ("" = solid)
  std::vector<double> x, y;
};

/// The polyline pieces of a series after dropping non-finite points: indices
/// [begin, end) into x/y of each run of consecutive finite points.
std::vector<std::pair<size_t, size_t>> finite_segments(const std::vector<double>& y);

/// One chart as an <svg> element (id = `id`), with axes, ticks, a legend and the
/// series; an empty chart says "no data".
std::string svg_line_chart(const std::string& id, const std::string& title,
                           const std::vector<PlotSeries>& series, int width = 460, int height = 260);

/// What a report knows about one run.
struct ReportRun {
  std::string dir;                       // the --output_dir
  std::string name;                      // legend label (the dir's last component)
  std::vector<nlohmann::json> events;    // metrics.jsonl, in order
  nlohmann::json args;                   // training_args.json (empty object if absent)
  nlohmann::json model_config;           // <model_name_or_path>/config.json if readable
  double wall_seconds = -1;              // training_args.json -> metrics.jsonl mtimes; < 0 = unknown
};

/// Reads OUTPUT_DIR/metrics.jsonl (required; a malformed line is an error naming
/// file and line) and training_args.json (optional).
ReportRun report_load_run(const std::string& output_dir);

/// The whole HTML document for these runs.
std::string report_html(const std::vector<ReportRun>& runs);

/// The ids of the charts report_html draws (in order), for tests.
const std::vector<std::string>& report_chart_ids();

/// Loads each dir, renders, and writes `out_path` atomically (temp + fsync + rename).
void report_write(const std::vector<std::string>& output_dirs, const std::string& out_path);

}  // namespace dpo
