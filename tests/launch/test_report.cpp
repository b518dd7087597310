// The HTML report: axis ranges and ticks, log-scale choice, NaN gaps, and the
// document drawn from a fake run directory (every chart present, self-contained,
// escaped, several runs overlaid, input errors named).
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <regex>
#include <set>
#include <sstream>
#include <unistd.h>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "launch/report.h"

namespace dpo {
namespace {

namespace fs = std::filesystem;
const double kNaN = std::numeric_limits<double>::quiet_NaN();
const double kInf = std::numeric_limits<double>::infinity();

int count(const std::string& s, const std::string& what) {
  int n = 0;
  for (size_t p = s.find(what); p != std::string::npos; p = s.find(what, p + what.size())) ++n;
  return n;
}

struct TmpDir {
  std::string path;
  explicit TmpDir(const std::string& name) {
    path = (fs::temp_directory_path() / ("dpo_report_test_" + std::to_string(::getpid()) + "_" + name)).string();
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TmpDir() { fs::remove_all(path); }
};

void write(const std::string& path, const std::string& text) {
  std::ofstream(path) << text;
}

// Every tick step is constant and "nice" (1, 2, 2.5 or 5 times a power of ten), the
// range holds the data and starts/ends on a tick. The axis code is scalar fp64 (glibc's
// log10 / pow, no SIMD kernel): a tick k * step rounds once, a difference of two ticks twice
// relative to the larger one, so the 1e-12 and 1e-9 slacks below are >= 4500 ulps.
void expect_nice(const PlotAxis& a, double lo, double hi) {
  ASSERT_GE(a.ticks.size(), 3u);
  EXPECT_LE(a.lo, lo);
  EXPECT_GE(a.hi, hi);
  EXPECT_DOUBLE_EQ(a.ticks.front(), a.lo);
  EXPECT_NEAR(a.ticks.back(), a.hi, 1e-12 * std::max(1.0, std::abs(a.hi)));
  const double step = a.ticks[1] - a.ticks[0];
  for (size_t i = 1; i < a.ticks.size(); ++i) EXPECT_NEAR(a.ticks[i] - a.ticks[i - 1], step, step * 1e-9);
  const double mant = step / std::pow(10.0, std::floor(std::log10(step)));
  EXPECT_TRUE(std::abs(mant - 1) < 1e-9 || std::abs(mant - 2) < 1e-9 || std::abs(mant - 2.5) < 1e-9 ||
              std::abs(mant - 5) < 1e-9)
      << "step " << step;
  // at most one tick of padding on each side
  EXPECT_LT(lo - a.lo, step + 1e-12);
  EXPECT_LT(a.hi - hi, step + 1e-12);
}

TEST(ReportPlot, NiceAxisCoversDataWithRoundTicks) {
  PlotAxis a = nice_axis(0, 1, 5);
  expect_nice(a, 0, 1);
  EXPECT_DOUBLE_EQ(a.lo, 0);
  EXPECT_DOUBLE_EQ(a.hi, 1);
  EXPECT_EQ(a.ticks.size(), 6u);  // 0, 0.2, ..., 1
  EXPECT_NEAR(a.ticks[1], 0.2, 1e-12);

  for (auto [lo, hi] : std::vector<std::pair<double, double>>{
           {0.13, 0.87}, {-0.3, 0.7}, {0.6931, 0.6932}, {1, 1000}, {-5e-4, 2e-3}, {123456, 987654}, {-12, -3}}) {
    SCOPED_TRACE(std::to_string(lo) + " .. " + std::to_string(hi));
    expect_nice(nice_axis(lo, hi, 5), lo, hi);
  }
  // zero is drawn as exactly 0 (no -0 or 1e-17 label)
  PlotAxis z = nice_axis(-0.3, 0.7, 5);
  bool zero = false;
  for (double t : z.ticks) zero |= (t == 0 && !std::signbit(t));
  EXPECT_TRUE(zero);
}

TEST(ReportPlot, NiceAxisHandlesDegenerateRanges) {
  PlotAxis one = nice_axis(0.5, 0.5);
  EXPECT_LT(one.lo, 0.5);
  EXPECT_GT(one.hi, 0.5);
  PlotAxis zero = nice_axis(0, 0);
  EXPECT_LT(zero.lo, 0);
  EXPECT_GT(zero.hi, 0);
  PlotAxis bad = nice_axis(kNaN, kInf);
  EXPECT_DOUBLE_EQ(bad.lo, 0);
  EXPECT_DOUBLE_EQ(bad.hi, 1);
  PlotAxis swapped = nice_axis(3, 1);
  EXPECT_LE(swapped.lo, 1);
  EXPECT_GE(swapped.hi, 3);
}

TEST(ReportPlot, LogAxisSpansWholeDecades) {
  PlotAxis a = log_axis(0.003, 2);
  EXPECT_TRUE(a.log);
  EXPECT_DOUBLE_EQ(a.lo, 1e-3);
  EXPECT_DOUBLE_EQ(a.hi, 10);
  // 4 decades: powers of ten only
  ASSERT_EQ(a.ticks.size(), 5u);
  // The same std::pow(10.0, e) the axis takes: exact but for 1e-15 (< 1 ulp of 10) of slack.
  for (size_t i = 0; i < a.ticks.size(); ++i) EXPECT_NEAR(a.ticks[i], std::pow(10.0, -3.0 + i), 1e-15);

  PlotAxis f = log_axis(1, 50);  // two decades or less: 1, 2, 5 steps
  EXPECT_DOUBLE_EQ(f.lo, 1);
  EXPECT_DOUBLE_EQ(f.hi, 100);
  std::vector<double> want{1, 2, 5, 10, 20, 50, 100};
  ASSERT_EQ(f.ticks.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(f.ticks[i], want[i], 1e-12);

  PlotAxis p = log_axis(10, 10);  // one power of ten: still a decade
  EXPECT_DOUBLE_EQ(p.lo, 10);
  EXPECT_DOUBLE_EQ(p.hi, 100);
}

TEST(ReportPlot, LogScaleOnlyForPositiveValuesSpanningDecades) {
  EXPECT_TRUE(spans_decades({1, 10, 1000}));
  EXPECT_TRUE(spans_decades({kNaN, 0.01, 1}));
  EXPECT_FALSE(spans_decades({1, 50}));
  EXPECT_FALSE(spans_decades({0, 1000}));  // a zero (warmup's lr) cannot be drawn on a log axis
  EXPECT_FALSE(spans_decades({-1, 100}));
  EXPECT_FALSE(spans_decades({}));
  EXPECT_FALSE(spans_decades({kNaN}));
}

TEST(ReportPlot, TickLabelsAreShort) {
  EXPECT_EQ(format_tick(0), "0");
  EXPECT_EQ(format_tick(0.25), "0.25");
  EXPECT_EQ(format_tick(0.1 + 0.2), "0.3");
  EXPECT_EQ(format_tick(1500), "1500");
  EXPECT_EQ(format_tick(1e-5), "1e-5");
  EXPECT_EQ(format_tick(2.5e6), "2.5e6");
  EXPECT_EQ(format_tick(-0.5), "-0.5");
}

TEST(ReportPlot, NonFiniteValuesSplitTheLine) {
  using Seg = std::vector<std::pair<size_t, size_t>>;
  EXPECT_EQ(finite_segments({1, kNaN, 2, 3, kInf, 4}), (Seg{{0, 1}, {2, 4}, {5, 6}}));
  EXPECT_EQ(finite_segments({kNaN, kNaN}), Seg{});
  EXPECT_EQ(finite_segments({1, 2, 3}), (Seg{{0, 3}}));

  PlotSeries s;
  s.label = "loss";
  s.color = "#123456";
  s.x = {1, 2, 3, 4, 5, 6};
  s.y = {0.7, 0.6, kNaN, 0.5, kNaN, 0.4};
  const std::string svg = svg_line_chart("c", "loss", {s});
  EXPECT_EQ(count(svg, "<polyline"), 1);  // points 1-2
  EXPECT_EQ(count(svg, "<circle"), 2);    // 4 and 6 stand alone
  EXPECT_EQ(svg.find("nan"), std::string::npos);
  EXPECT_EQ(svg.find("inf"), std::string::npos);
}

TEST(ReportPlot, ChartMapsDataInsideThePlotArea) {
  PlotSeries s;
  s.color = "#000";
  s.x = {0, 10};
  s.y = {0, 1};
  const std::string svg = svg_line_chart("c", "t", {s}, 460, 260);
  std::smatch m;
  ASSERT_TRUE(std::regex_search(svg, m, std::regex("points=\"([0-9.]+),([0-9.]+) ([0-9.]+),([0-9.]+)\"")));
  const double x0 = std::stod(m[1]), y0 = std::stod(m[2]), x1 = std::stod(m[3]), y1 = std::stod(m[4]);
  EXPECT_LT(x0, x1);
  EXPECT_GT(y0, y1);  // larger values higher up
  for (double x : {x0, x1}) EXPECT_TRUE(x >= 0 && x <= 460);
  for (double y : {y0, y1}) EXPECT_TRUE(y >= 0 && y <= 260);
  // the axis ends on ticks at the data ends here (0..10, 0..1): the line spans the frame
  ASSERT_TRUE(std::regex_search(svg, m, std::regex("<rect x=\"([0-9.]+)\" y=\"([0-9.]+)\" width=\"([0-9.]+)\" height=\"([0-9.]+)\" class=\"frame\"")));
  // SVG coordinates are printed with one decimal ("%.1f"): each within 0.05 of its value.
  EXPECT_NEAR(x0, std::stod(m[1]), 0.06);
  EXPECT_NEAR(x1, std::stod(m[1]) + std::stod(m[3]), 0.06);
  EXPECT_NEAR(y1, std::stod(m[2]), 0.06);
  EXPECT_NEAR(y0, std::stod(m[2]) + std::stod(m[4]), 0.06);
}

TEST(ReportPlot, DecadeSpanningSeriesGetsALogAxis) {
  PlotSeries s;
  s.color = "#000";
  s.x = {1, 2, 3};
  s.y = {5, 0.5, 0.005};
  const std::string svg = svg_line_chart("c", "loss", {s});
  EXPECT_NE(svg.find("(log y)"), std::string::npos);
  EXPECT_NE(svg.find(">0.001<"), std::string::npos);  // ticks at every power of ten, 0.001 .. 10
  EXPECT_NE(svg.find(">0.01<"), std::string::npos);
  EXPECT_NE(svg.find(">10<"), std::string::npos);
  s.y = {0.7, 0.5, 0.3};
  EXPECT_EQ(svg_line_chart("c", "loss", {s}).find("(log y)"), std::string::npos);
}

TEST(ReportPlot, EmptyChartSaysNoData) {
  const std::string svg = svg_line_chart("c", "t", {});
  EXPECT_NE(svg.find("no data"), std::string::npos);
  EXPECT_NE(svg.find("<svg id=\"c\""), std::string::npos);
}

// A run directory as dpo_dist writes it.
void fake_run(const std::string& dir, double loss0, bool with_nan) {
  fs::create_directories(dir);
  std::string m;
  m += R"({"step":0,"epoch":0.0,"eval_loss":0.6931,"eval_rewards/accuracies":0.0,"eval_rewards/chosen":0.0,"eval_rewards/rejected":0.0,"eval_rewards/margins":0.0,"eval_logps/chosen":-40.0,"eval_logps/rejected":-41.0,"eval_logits/chosen":0.1,"eval_logits/rejected":0.1})" "\n";
  for (int s = 1; s <= 6; ++s) {
    nlohmann::json ev{{"step", s * 5}, {"epoch", s * 0.1}, {"loss", loss0 / s}, {"rewards/chosen", 0.01 * s},
                      {"rewards/rejected", -0.02 * s}, {"rewards/accuracies", 0.5 + 0.05 * s},
                      {"rewards/margins", 0.03 * s}, {"logps/chosen", -40.0 + s}, {"logps/rejected", -41.0 - s},
                      {"logits/chosen", 0.1}, {"logits/rejected", 0.12}, {"learning_rate", 5e-4},
                      {"grad_norm", 1.0 / s}, {"tokens_per_second", 1000.0 + s}, {"nll_loss", 2.0}};
    if (with_nan && s == 3) ev["grad_norm"] = nullptr;  // how a NaN reaches metrics.jsonl
    m += ev.dump() + "\n";
  }
  m += R"({"step":30,"epoch":0.6,"eval_loss":0.4,"eval_rewards/accuracies":0.75,"eval_rewards/chosen":0.05,"eval_rewards/rejected":-0.1,"eval_rewards/margins":0.15,"eval_logps/chosen":-38.0,"eval_logps/rejected":-44.0,"eval_logits/chosen":0.1,"eval_logits/rejected":0.1,"eval_nll_loss":2.1})" "\n";
  write(dir + "/metrics.jsonl", m);
  write(dir + "/training_args.json",
        R"({"stage":"dpo","loss_type":"sigmoid","model_name_or_path":")" + dir +
            R"(/model","train_file":"train.h5","eval_file":"eval.h5","world_size":2,"per_device_train_batch_size":"4","gradient_accumulation_steps":"2","max_steps":"30","beta":"0.1"})");
  fs::create_directories(dir + "/model");
  write(dir + "/model/config.json",
        R"({"architectures":["LlamaForCausalLM"],"hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":300})");
}

TEST(Report, DocumentHasEveryChartAndTheRunFacts) {
  TmpDir t("doc");
  fake_run(t.path + "/run<1>", 0.69, true);
  const std::string out = t.path + "/report.html";
  report_write({t.path + "/run<1>"}, out);
  std::ifstream in(out);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string html = ss.str();
  ASSERT_FALSE(html.empty());
  for (const auto& id : report_chart_ids()) {
    SCOPED_TRACE(id);
    const auto p = html.find("<svg id=\"" + id + "\"");
    ASSERT_NE(p, std::string::npos);
    const auto e = html.find("</svg>", p);
    EXPECT_EQ(html.substr(p, e - p).find("no data"), std::string::npos);  // every fixed chart has data here
  }
  EXPECT_NE(html.find("<svg id=\"chart-x-nll-loss\""), std::string::npos);  // extra metric charted, train + eval
  EXPECT_GE(report_chart_ids().size(), 9u);
  // self-contained: nothing loaded from elsewhere, no script
  for (const char* bad : {"<script", "src=", "href=", "@import", "url("}) EXPECT_EQ(html.find(bad), std::string::npos) << bad;
  // the run's facts: escaped name, model shape from config.json, world size, global batch 4*2*2
  EXPECT_NE(html.find("run&lt;1&gt;"), std::string::npos);
  EXPECT_EQ(html.find("run<1>"), std::string::npos);
  EXPECT_NE(html.find("LlamaForCausalLM"), std::string::npos);
  EXPECT_NE(html.find("hidden_size 64"), std::string::npos);
  EXPECT_NE(html.find("<td>2</td><td>16</td><td>30 / 30</td>"), std::string::npos);
  EXPECT_NE(html.find("eval.h5"), std::string::npos);
  // final metrics: last train and eval values
  EXPECT_NE(html.find("<th>eval_rewards/accuracies</th><td>0.75</td>"), std::string::npos);
  EXPECT_NE(html.find("<th>loss</th><td>0.115</td>"), std::string::npos);
  // the NaN grad_norm is a gap: two polylines (steps 5-10 and 20-30) in that chart
  const auto g = html.find("<svg id=\"chart-grad-norm\"");
  const std::string gsvg = html.substr(g, html.find("</svg>", g) - g);
  EXPECT_EQ(count(gsvg, "<polyline"), 2);
  // no temporary file left next to it
  for (const auto& e : fs::directory_iterator(t.path)) EXPECT_EQ(e.path().filename().string().find(".tmp"), std::string::npos);
}

TEST(Report, SeveralRunsOverlayInDistinctColours) {
  TmpDir t("two");
  fake_run(t.path + "/a", 0.69, false);
  fake_run(t.path + "/b", 0.9, false);
  std::vector<ReportRun> runs{report_load_run(t.path + "/a"), report_load_run(t.path + "/b")};
  const std::string html = report_html(runs);
  const auto p = html.find("<svg id=\"chart-loss\"");
  const std::string svg = html.substr(p, html.find("</figure>", p) - p);
  std::smatch m;
  std::set<std::string> colours;
  std::string rest = svg;
  while (std::regex_search(rest, m, std::regex("<polyline fill=\"none\" stroke=\"(#[0-9a-f]{6})\""))) {
    colours.insert(m[1]);
    rest = m.suffix();
  }
  EXPECT_EQ(colours.size(), 2u);
  EXPECT_NE(svg.find("a: loss"), std::string::npos);
  EXPECT_NE(svg.find("b: eval_loss"), std::string::npos);
}

TEST(Report, InputErrorsNameFileAndLine) {
  TmpDir t("err");
  try {
    report_load_run(t.path + "/missing");
    FAIL() << "no error";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("missing/metrics.jsonl"), std::string::npos) << e.what();
  }
  write(t.path + "/metrics.jsonl", "{\"step\":1,\"loss\":0.5}\n{\"step\":2,\"loss\":}\n{\"step\":3}\n");
  try {
    report_load_run(t.path);
    FAIL() << "no error";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("metrics.jsonl line 2"), std::string::npos) << e.what();
  }
  // a last line still being written by a live run is skipped, not an error
  write(t.path + "/metrics.jsonl", "{\"step\":1,\"loss\":0.5}\n{\"step\":2,\"lo");
  EXPECT_EQ(report_load_run(t.path).events.size(), 1u);
}

}  // namespace
}  // namespace dpo
