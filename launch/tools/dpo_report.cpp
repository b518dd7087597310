// dpo_report: one self-contained report.html (inline SVG charts, no network, no
// JavaScript) from one or more dpo_dist output directories. docs/usage.md.
#include <cstdio>
#include <string>
#include <vector>

#include "launch/cli.h"
#include "launch/report.h"

using namespace dpo;

namespace {
void usage() {
  std::printf(
      "usage: dpo_report [--output FILE] OUTPUT_DIR [OUTPUT_DIR...]\n"
      "Writes one self-contained HTML report (inline SVG charts of metrics.jsonl, the runs'\n"
      "options from training_args.json) of one or more dpo_dist runs, overlaid in distinct colours.\n"
      "  --output FILE   where to write (default: FIRST_OUTPUT_DIR/report.html)\n"
      "  --help, --version\n");
}
}  // namespace

int main(int argc, char** argv) {
  return run_main("dpo_report", [&] {
    std::vector<std::string> dirs;
    std::string out;
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      if (a == "--help" || a == "-h") {
        usage();
        return 0;
      }
      if (a == "--version") {
        std::printf("dpo_report %s\n", dpo_version());
        return 0;
      }
      if (a == "--output" || a.rfind("--output=", 0) == 0) {
        if (a == "--output") {
          if (i + 1 >= argc) throw CliError("--output needs a file name (e.g. --output report.html)");
          out = argv[++i];
        } else {
          out = a.substr(9);
        }
        if (out.empty()) throw CliError("--output needs a file name (e.g. --output report.html)");
        continue;
      }
      if (a.rfind("--", 0) == 0) throw CliError("unknown option " + a + " (dpo_report --help lists the options)");
      dirs.push_back(a);
    }
    if (dirs.empty()) throw CliError("no OUTPUT_DIR given: dpo_report OUTPUT_DIR [OUTPUT_DIR...] (see --help)");
    if (out.empty()) out = dirs.front() + "/report.html";
    report_write(dirs, out);
    std::printf("wrote %s (%zu run%s)\n", out.c_str(), dirs.size(), dirs.size() == 1 ? "" : "s");
    return 0;
  });
}
