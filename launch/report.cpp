// report.html: inline-SVG line charts of metrics.jsonl, one document per set of runs.
#include "launch/report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>

#include "util/fs.h"  // write_file_atomic
#include "util/json_read.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace dpo {
namespace {

// Distinct colours for runs (Tableau 10); dash patterns tell a run's lines apart.
const char* const kRunColors[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                  "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
const char* const kDashes[] = {"", "7 4", "2 3", "9 3 2 3"};

std::string html_escape(const std::string& s) {
  std::string o;
  o.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '&': o += "&amp;"; break;
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '"': o += "&quot;"; break;
      case '\'': o += "&#39;"; break;
      default: o += c;
    }
  }
  return o;
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}
std::string px(double v) { return fmt("%.1f", v); }

// A metric value as it appears in a report table.
std::string format_value(const json& v) {
  if (v.is_null()) return "NaN";
  if (v.is_number_integer()) return std::to_string(v.get<int64_t>());
  if (v.is_number()) {
    const double d = v.get<double>();
    return std::isfinite(d) ? fmt("%.6g", d) : "NaN";
  }
  if (v.is_string()) return v.get<std::string>();
  return v.dump();
}

std::string format_seconds(double s) {
  if (s < 0 || !std::isfinite(s)) return "unknown";
  const int64_t t = static_cast<int64_t>(s + 0.5);
  char buf[48];
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%lldh %02lldm %02llds", (long long)(t / 3600), (long long)(t / 60 % 60), (long long)(t % 60));
  else if (t >= 60) std::snprintf(buf, sizeof buf, "%lldm %02llds", (long long)(t / 60), (long long)(t % 60));
  else std::snprintf(buf, sizeof buf, "%.1f s", s);
  return buf;
}

double number_or_nan(const json& v) {
  if (v.is_number()) return v.get<double>();
  return std::numeric_limits<double>::quiet_NaN();  // null = a NaN that JSON could not hold
}

struct ChartSpec {
  std::string id, title;
  std::vector<std::string> keys;  // metrics.jsonl keys drawn, each with its own dash
};

const std::vector<ChartSpec>& chart_specs() {
  static const std::vector<ChartSpec> k{
      {"chart-loss", "loss", {"loss", "eval_loss"}},
      {"chart-rewards", "rewards/chosen and rewards/rejected",
       {"rewards/chosen", "rewards/rejected", "eval_rewards/chosen", "eval_rewards/rejected"}},
      {"chart-margins", "rewards/margins", {"rewards/margins", "eval_rewards/margins"}},
      {"chart-accuracies", "rewards/accuracies", {"rewards/accuracies", "eval_rewards/accuracies"}},
      {"chart-logps", "logps/chosen and logps/rejected",
       {"logps/chosen", "logps/rejected", "eval_logps/chosen", "eval_logps/rejected"}},
      {"chart-logits", "logits/chosen and logits/rejected",
       {"logits/chosen", "logits/rejected", "eval_logits/chosen", "eval_logits/rejected"}},
      {"chart-learning-rate", "learning_rate", {"learning_rate"}},
      {"chart-grad-norm", "grad_norm", {"grad_norm"}},
      {"chart-tokens-per-second", "tokens/s", {"tokens_per_second"}},
  };
  return k;
}

// Keys never charted: the x axis and bookkeeping.
bool is_axis_key(const std::string& k) { return k == "step" || k == "epoch"; }

PlotSeries series_of(const ReportRun& run, const std::string& key) {
  PlotSeries s;
  for (const auto& ev : run.events) {
    if (!ev.is_object() || !ev.contains(key) || !ev.contains("step")) continue;
    const json& v = ev[key];
    if (!v.is_number() && !v.is_null()) continue;
    s.x.push_back(number_or_nan(ev["step"]));
    s.y.push_back(number_or_nan(v));
  }
  return s;
}

std::string chart_for(const ChartSpec& spec, const std::vector<ReportRun>& runs) {
  std::vector<PlotSeries> all;
  for (size_t r = 0; r < runs.size(); ++r) {
    for (size_t k = 0; k < spec.keys.size(); ++k) {
      PlotSeries s = series_of(runs[r], spec.keys[k]);
      if (s.x.empty()) continue;
      s.label = (runs.size() > 1 ? runs[r].name + ": " : std::string()) + spec.keys[k];
      s.color = kRunColors[r % (sizeof kRunColors / sizeof *kRunColors)];
      // dash by key, colour by run: a key looks the same in every run
      s.dash = kDashes[k % (sizeof kDashes / sizeof *kDashes)];
      all.push_back(std::move(s));
    }
  }
  return svg_line_chart(spec.id, spec.title, all);
}

}  // namespace

// ---- axes ----------------------------------------------------------------------
PlotAxis nice_axis(double lo, double hi, int target) {
  PlotAxis a;
  if (!std::isfinite(lo) || !std::isfinite(hi)) {
    lo = 0;
    hi = 1;
  }
  if (lo > hi) std::swap(lo, hi);
  if (hi - lo <= std::abs(hi) * 1e-12) {  // one value: a range around it
    const double pad = lo == 0 ? 1.0 : std::abs(lo) * 0.1;
    lo -= pad;
    hi += pad;
  }
  target = std::max(2, target);
  const double rough = (hi - lo) / target;
  const double mag = std::pow(10.0, std::floor(std::log10(rough)));
  const double norm = rough / mag;
  double nice = 10;
  for (double c : {1.0, 2.0, 2.5, 5.0}) {
    if (norm <= c * (1 + 1e-9)) {
      nice = c;
      break;
    }
  }
  const double step = nice * mag;
  const double k0 = std::floor(lo / step * (1 + 1e-12) + 1e-9), k1 = std::ceil(hi / step - 1e-9);
  a.lo = k0 * step;
  a.hi = k1 * step;
  for (double k = k0; k <= k1 + 0.5; k += 1) {
    double t = k * step;
    if (std::abs(t) < step * 1e-9) t = 0;  // no "-0" or 1e-17 at zero
    a.ticks.push_back(t);
  }
  return a;
}

PlotAxis log_axis(double lo, double hi) {
  PlotAxis a;
  a.log = true;
  if (!(lo > 0) || !(hi > 0) || !std::isfinite(lo) || !std::isfinite(hi)) {
    lo = 1;
    hi = 10;
  }
  if (lo > hi) std::swap(lo, hi);
  int e0 = static_cast<int>(std::floor(std::log10(lo) + 1e-12));
  int e1 = static_cast<int>(std::ceil(std::log10(hi) - 1e-12));
  if (e1 <= e0) e1 = e0 + 1;
  a.lo = std::pow(10.0, e0);
  a.hi = std::pow(10.0, e1);
  const bool fine = e1 - e0 <= 2;
  for (int e = e0; e <= e1; ++e) {
    const double p = std::pow(10.0, e);
    a.ticks.push_back(p);
    if (fine && e < e1) {
      a.ticks.push_back(2 * p);
      a.ticks.push_back(5 * p);
    }
  }
  return a;
}

bool spans_decades(const std::vector<double>& values) {
  double mn = std::numeric_limits<double>::infinity(), mx = 0;
  bool any = false;
  for (double v : values) {
    if (!std::isfinite(v)) continue;
    if (v <= 0) return false;
    mn = std::min(mn, v);
    mx = std::max(mx, v);
    any = true;
  }
  return any && mx / mn >= 100.0;
}

std::string format_tick(double v) {
  if (v == 0) return "0";
  std::string s = fmt("%.4g", v);
  // "1e-05" -> "1e-5", "2.5e+06" -> "2.5e6": shorter labels
  const auto e = s.find('e');
  if (e != std::string::npos) {
    std::string mant = s.substr(0, e), ex = s.substr(e + 1);
    const bool neg = ex[0] == '-';
    size_t i = (ex[0] == '-' || ex[0] == '+') ? 1 : 0;
    while (i + 1 < ex.size() && ex[i] == '0') ++i;
    s = mant + "e" + (neg ? "-" : "") + ex.substr(i);
  }
  return s;
}

std::vector<std::pair<size_t, size_t>> finite_segments(const std::vector<double>& y) {
  std::vector<std::pair<size_t, size_t>> out;
  size_t i = 0;
  while (i < y.size()) {
    while (i < y.size() && !std::isfinite(y[i])) ++i;
    const size_t b = i;
    while (i < y.size() && std::isfinite(y[i])) ++i;
    if (i > b) out.emplace_back(b, i);
  }
  return out;
}

// ---- one chart -------------------------------------------------------------------
std::string svg_line_chart(const std::string& id, const std::string& title, const std::vector<PlotSeries>& series,
                           int width, int height) {
  const double ml = 58, mr = 14, mt = 26, mb = 34;
  const double pw = width - ml - mr, ph = height - mt - mb;
  std::vector<double> xs, ys;
  for (const auto& s : series) {
    for (size_t i = 0; i < s.y.size() && i < s.x.size(); ++i) {
      if (std::isfinite(s.y[i]) && std::isfinite(s.x[i])) {
        xs.push_back(s.x[i]);
        ys.push_back(s.y[i]);
      }
    }
  }
  std::ostringstream o;
  o << "<figure class=\"chart\"><svg id=\"" << html_escape(id) << "\" xmlns=\"http://www.w3.org/2000/svg\" width=\""
    << width << "\" height=\"" << height << "\" viewBox=\"0 0 " << width << " " << height << "\" role=\"img\">";
  o << "<title>" << html_escape(title) << "</title>";
  o << "<text x=\"" << ml << "\" y=\"16\" class=\"ct\">" << html_escape(title) << "</text>";
  if (xs.empty()) {
    o << "<rect x=\"" << ml << "\" y=\"" << mt << "\" width=\"" << px(pw) << "\" height=\"" << px(ph)
      << "\" class=\"frame\"/><text x=\"" << px(ml + pw / 2) << "\" y=\"" << px(mt + ph / 2)
      << "\" text-anchor=\"middle\" class=\"nodata\">no data</text></svg></figure>";
    return o.str();
  }
  const auto [xmn, xmx] = std::minmax_element(xs.begin(), xs.end());
  const auto [ymn, ymx] = std::minmax_element(ys.begin(), ys.end());
  const PlotAxis ax = nice_axis(*xmn, *xmx, 6);
  const PlotAxis ay = spans_decades(ys) ? log_axis(*ymn, *ymx) : nice_axis(*ymn, *ymx, 5);
  auto X = [&](double x) { return ml + (x - ax.lo) / (ax.hi - ax.lo) * pw; };
  auto Y = [&](double y) {
    const double f = ay.log ? (std::log10(y) - std::log10(ay.lo)) / (std::log10(ay.hi) - std::log10(ay.lo))
                            : (y - ay.lo) / (ay.hi - ay.lo);
    return mt + (1 - f) * ph;
  };
  // grid + tick labels
  o << "<g class=\"grid\">";
  for (double t : ay.ticks) o << "<line x1=\"" << ml << "\" x2=\"" << px(ml + pw) << "\" y1=\"" << px(Y(t)) << "\" y2=\"" << px(Y(t)) << "\"/>";
  for (double t : ax.ticks) o << "<line y1=\"" << mt << "\" y2=\"" << px(mt + ph) << "\" x1=\"" << px(X(t)) << "\" x2=\"" << px(X(t)) << "\"/>";
  o << "</g><g class=\"tl\">";
  for (double t : ay.ticks) {
    // a log axis with 2x/5x ticks labels only the powers of ten when crowded
    const bool minor = ay.log && std::abs(std::log10(t) - std::round(std::log10(t))) > 1e-9 && ay.ticks.size() > 7;
    if (minor) continue;
    o << "<text x=\"" << px(ml - 5) << "\" y=\"" << px(Y(t) + 4) << "\" text-anchor=\"end\">" << format_tick(t) << "</text>";
  }
  for (double t : ax.ticks)
    o << "<text x=\"" << px(X(t)) << "\" y=\"" << px(mt + ph + 15) << "\" text-anchor=\"middle\">" << format_tick(t) << "</text>";
  o << "<text x=\"" << px(ml + pw / 2) << "\" y=\"" << px(height - 3.0) << "\" text-anchor=\"middle\">step"
    << (ay.log ? " (log y)" : "") << "</text></g>";
  o << "<rect x=\"" << ml << "\" y=\"" << mt << "\" width=\"" << px(pw) << "\" height=\"" << px(ph) << "\" class=\"frame\"/>";
  // series
  for (const auto& s : series) {
    const std::string dash = s.dash.empty() ? "" : " stroke-dasharray=\"" + s.dash + "\"";
    for (const auto& [b, e] : finite_segments(s.y)) {
      if (e - b == 1) {
        o << "<circle cx=\"" << px(X(s.x[b])) << "\" cy=\"" << px(Y(s.y[b])) << "\" r=\"2.5\" fill=\"" << s.color << "\"/>";
        continue;
      }
      o << "<polyline fill=\"none\" stroke=\"" << s.color << "\" stroke-width=\"1.6\"" << dash << " points=\"";
      for (size_t i = b; i < e; ++i) o << (i > b ? " " : "") << px(X(s.x[i])) << "," << px(Y(s.y[i]));
      o << "\"><title>" << html_escape(s.label) << "</title></polyline>";
    }
  }
  o << "</svg><figcaption>";
  for (const auto& s : series) {
    o << "<span class=\"lg\"><svg width=\"26\" height=\"10\"><line x1=\"1\" y1=\"5\" x2=\"25\" y2=\"5\" stroke=\"" << s.color
      << "\" stroke-width=\"2\"" << (s.dash.empty() ? "" : " stroke-dasharray=\"" + s.dash + "\"") << "/></svg>" << html_escape(s.label)
      << "</span>";
  }
  o << "</figcaption></figure>";
  return o.str();
}

// ---- runs ------------------------------------------------------------------------
ReportRun report_load_run(const std::string& output_dir) {
  ReportRun run;
  run.dir = output_dir;
  std::string d = output_dir;
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  run.name = fs::path(d).filename().string();
  if (run.name.empty()) run.name = d;
  const std::string mpath = output_dir + "/metrics.jsonl";
  std::ifstream in(mpath);
  if (!in) {
    throw std::runtime_error(mpath + ": cannot open (is " + output_dir +
                             " a dpo_dist --output_dir written with --report_to other than none?)");
  }
  std::string line;
  int64_t n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    json ev;
    try {
      ev = json_parse(line, mpath + " line " + std::to_string(n), {kJsonRowMaxBytes});
    } catch (const JsonLimitError&) {
      throw;
    } catch (const std::exception& e) {
      // A line still being appended by a live run ends the file early; anything else is an error.
      if (in.peek() == EOF && line.back() != '}') break;
      throw std::runtime_error(mpath + " line " + std::to_string(n) + ": not a JSON object (" + e.what() + ")");
    }
    if (!ev.is_object()) throw std::runtime_error(mpath + " line " + std::to_string(n) + ": not a JSON object");
    run.events.push_back(std::move(ev));
  }
  run.args = json::object();
  const std::string apath = output_dir + "/training_args.json";
  std::error_code ec;
  if (fs::exists(apath, ec)) {
    const std::string text = json_read_file(apath, kJsonConfigMaxBytes);
    try {
      run.args = json_parse(text, apath);
    } catch (const json::exception& e) {
      throw std::runtime_error(apath + ": not valid JSON (" + e.what() + ")");
    }
    const auto t0 = fs::last_write_time(apath, ec);
    const auto t1 = fs::last_write_time(mpath, ec);
    if (!ec) run.wall_seconds = std::max(0.0, std::chrono::duration<double>(t1 - t0).count());
  }
  if (run.args.is_object() && run.args.contains("model_name_or_path") && run.args["model_name_or_path"].is_string()) {
    const std::string cpath = run.args["model_name_or_path"].get<std::string>() + "/config.json";
    std::string text;
    try {
      text = json_read_file(cpath, kJsonConfigMaxBytes);
    } catch (const std::exception&) {
      // The report draws without the model's config (a moved or deleted model directory).
    }
    run.model_config = json_parse_or_discarded(text);
    if (run.model_config.is_discarded()) run.model_config = json();
  }
  return run;
}

const std::vector<std::string>& report_chart_ids() {
  static const std::vector<std::string> ids = [] {
    std::vector<std::string> v;
    for (const auto& c : chart_specs()) v.push_back(c.id);
    return v;
  }();
  return ids;
}

namespace {

std::string arg_str(const json& args, const std::string& k) {
  if (!args.is_object() || !args.contains(k)) return "";
  return format_value(args[k]);
}

int64_t arg_int(const json& args, const std::string& k, int64_t dflt) {
  if (!args.is_object() || !args.contains(k)) return dflt;
  const json& v = args[k];
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_string()) {
    try {
      return std::stoll(v.get<std::string>());
    } catch (...) {
    }
  }
  return dflt;
}

std::string model_summary(const ReportRun& r) {
  std::string s = html_escape(arg_str(r.args, "model_name_or_path"));
  const json& c = r.model_config;
  if (c.is_object()) {
    std::string arch;
    if (c.contains("architectures") && c["architectures"].is_array() && !c["architectures"].empty())
      arch = format_value(c["architectures"][0]);
    std::string shape;
    for (const char* k : {"hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"}) {
      if (c.contains(k)) shape += std::string(shape.empty() ? "" : ", ") + k + " " + format_value(c[k]);
    }
    s += " <span class=\"dim\">(" + html_escape(arch + (arch.empty() || shape.empty() ? "" : "; ") + shape) + ")</span>";
  }
  return s;
}

// Last event holding `prefix`ed keys (train: the last without eval_ keys).
const json* last_event(const ReportRun& r, bool eval) {
  for (auto it = r.events.rbegin(); it != r.events.rend(); ++it) {
    bool has_eval = false, has_train = false;
    for (auto k = it->begin(); k != it->end(); ++k) {
      if (is_axis_key(k.key())) continue;
      (k.key().rfind("eval_", 0) == 0 ? has_eval : has_train) = true;
    }
    if (eval ? has_eval : has_train) return &*it;
  }
  return nullptr;
}

std::string metrics_table(const json* ev) {
  if (!ev) return "<p class=\"dim\">none yet</p>";
  std::string o = "<table class=\"kv\">";
  for (auto k = ev->begin(); k != ev->end(); ++k)
    o += "<tr><th>" + html_escape(k.key()) + "</th><td>" + html_escape(format_value(k.value())) + "</td></tr>";
  return o + "</table>";
}

const char* kCss = R"(body{font:14px/1.4 system-ui,sans-serif;margin:16px 24px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:18px 0 6px}
.dim{color:#777}.charts{display:flex;flex-wrap:wrap;gap:10px}
figure.chart{margin:0;border:1px solid #ddd;border-radius:4px;padding:4px 6px;background:#fcfcfc}
figcaption{font-size:11px;max-width:460px}.lg{margin-right:10px;white-space:nowrap}.lg svg{vertical-align:middle;margin-right:3px}
svg text{font:11px system-ui,sans-serif;fill:#444}svg text.ct{font-weight:600;font-size:12px;fill:#222}
svg .grid line{stroke:#e6e6e6;stroke-width:1}svg rect.frame{fill:none;stroke:#bbb}svg text.nodata{fill:#999}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top}
th{background:#f4f4f4;font-weight:600}.runs td:first-child{font-weight:600}.swatch{display:inline-block;width:10px;height:10px;margin-right:5px}
.finals{display:flex;flex-wrap:wrap;gap:16px}details{margin:4px 0}
)";

}  // namespace

std::string report_html(const std::vector<ReportRun>& runs) {
  std::ostringstream o;
  std::string names;
  for (const auto& r : runs) names += (names.empty() ? "" : ", ") + r.name;
  o << "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
    << "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
    << "<title>dpo_dist report: " << html_escape(names) << "</title><style>" << kCss << "</style></head><body>\n";
  o << "<h1>dpo_dist training report</h1><p class=\"dim\">" << runs.size() << " run" << (runs.size() == 1 ? "" : "s")
    << "; charts over optimizer steps; colour = run, line style = metric (see each legend)</p>\n";

  // Runs table
  o << "<h2>Runs</h2><table class=\"runs\"><tr><th>run</th><th>stage / loss</th><th>model</th><th>data</th>"
    << "<th>world size</th><th>global batch</th><th>steps</th><th>wall time</th></tr>";
  for (size_t i = 0; i < runs.size(); ++i) {
    const auto& r = runs[i];
    const int64_t world = arg_int(r.args, "world_size", 1);
    const int64_t gb = arg_int(r.args, "per_device_train_batch_size", 0) * arg_int(r.args, "gradient_accumulation_steps", 1) * world;
    int64_t last_step = 0;
    for (const auto& ev : r.events)
      if (ev.contains("step") && ev["step"].is_number()) last_step = std::max<int64_t>(last_step, ev["step"].get<int64_t>());
    std::string stage = arg_str(r.args, "stage");
    std::string loss = arg_str(r.args, "loss_type");
    if (stage == "dpo" || stage.empty()) stage += (stage.empty() ? "" : " / ") + loss;
    std::string data = html_escape(arg_str(r.args, "train_file"));
    if (!arg_str(r.args, "eval_file").empty()) data += "<br><span class=\"dim\">eval: " + html_escape(arg_str(r.args, "eval_file")) + "</span>";
    const std::string max_steps = arg_str(r.args, "max_steps");
    o << "<tr><td><span class=\"swatch\" style=\"background:" << kRunColors[i % (sizeof kRunColors / sizeof *kRunColors)]
      << "\"></span>" << html_escape(r.name) << "<br><span class=\"dim\">" << html_escape(r.dir) << "</span></td><td>"
      << html_escape(stage) << "</td><td>" << model_summary(r) << "</td><td>" << data << "</td><td>" << world << "</td><td>"
      << (gb > 0 ? std::to_string(gb) : "?") << "</td><td>" << last_step
      << (max_steps.empty() || max_steps == "-1" ? "" : " / " + html_escape(max_steps)) << "</td><td>"
      << format_seconds(r.wall_seconds) << "</td></tr>";
  }
  o << "</table>\n";

  // Charts: the fixed ones, then every other numeric metric (e.g. nll_loss) by its base name.
  o << "<h2>Charts</h2><div class=\"charts\">\n";
  std::set<std::string> drawn;
  for (const auto& spec : chart_specs()) {
    o << chart_for(spec, runs) << "\n";
    for (const auto& k : spec.keys) drawn.insert(k);
  }
  std::map<std::string, std::vector<std::string>> extra;  // base name -> keys
  for (const auto& r : runs) {
    for (const auto& ev : r.events) {
      for (auto k = ev.begin(); k != ev.end(); ++k) {
        if (is_axis_key(k.key()) || drawn.count(k.key()) || !(k.value().is_number() || k.value().is_null())) continue;
        const std::string base = k.key().rfind("eval_", 0) == 0 ? k.key().substr(5) : k.key();
        auto& keys = extra[base];
        if (std::find(keys.begin(), keys.end(), k.key()) == keys.end()) keys.push_back(k.key());
      }
    }
  }
  for (auto& [base, keys] : extra) {
    std::sort(keys.begin(), keys.end(), [](const std::string& a, const std::string& b) {
      return (a.rfind("eval_", 0) == 0) < (b.rfind("eval_", 0) == 0);
    });
    std::string id = "chart-x-";
    for (char c : base) id += std::isalnum(static_cast<unsigned char>(c)) ? c : '-';
    o << chart_for(ChartSpec{id, base, keys}, runs) << "\n";
  }
  o << "</div>\n";

  // Final metrics and options per run
  o << "<h2>Final metrics</h2><div class=\"finals\">";
  for (const auto& r : runs) {
    o << "<div><b>" << html_escape(r.name) << "</b><br>train (last log)" << metrics_table(last_event(r, false))
      << "eval (last)" << metrics_table(last_event(r, true)) << "</div>";
  }
  o << "</div>\n<h2>Options</h2>";
  for (const auto& r : runs) {
    o << "<details" << (runs.size() == 1 ? " open" : "") << "><summary>" << html_escape(r.name)
      << " (training_args.json)</summary>";
    if (r.args.is_object() && !r.args.empty()) {
      o << "<table class=\"kv\">";
      for (auto k = r.args.begin(); k != r.args.end(); ++k)
        o << "<tr><th>" << html_escape(k.key()) << "</th><td>" << html_escape(format_value(k.value())) << "</td></tr>";
      o << "</table>";
    } else {
      o << "<p class=\"dim\">no training_args.json</p>";
    }
    o << "</details>";
  }
  o << "\n</body></html>\n";
  return o.str();
}

void report_write(const std::vector<std::string>& output_dirs, const std::string& out_path) {
  std::vector<ReportRun> runs;
  for (const auto& d : output_dirs) runs.push_back(report_load_run(d));
  write_file_atomic(out_path, report_html(runs));
}

}  // namespace dpo
