// Fuzzes the command-line + INI parser (launch/cli.h) with every dpo_dist option
// (launch/train_options.h: declaration and cross-field validation) and parse_size.
// Input: INI text, then '\0', then command-line words separated by '\0'. Without a
// '\0' the whole input is command-line words separated by newlines and no config
// file is given. When an INI part exists it is written to a file and `--config FILE`
// comes first on the command line.
// Checked: after a successful parse every option reads back (get_* of the declared
// kind does not throw), dump() names every option once, and a size that parses is
// non-negative.
#include <set>
#include <string>
#include <vector>

#include "launch/cli.h"
#include "launch/train_options.h"
#include "tests/fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string in(reinterpret_cast<const char*>(data), size);
  std::vector<std::string> words{"dpo_dist"};
  std::string rest = in;
  char sep = '\n';
  const size_t z = in.find('\0');
  if (z != std::string::npos) {
    const std::string ini = in.substr(0, z);
    const std::string path = fuzz::write_scratch("train.ini", reinterpret_cast<const uint8_t*>(ini.data()), ini.size());
    words.push_back("--config");
    words.push_back(path);
    rest = in.substr(z + 1);
    sep = '\0';
  }
  size_t b = 0;
  while (b <= rest.size() && !rest.empty()) {
    size_t e = rest.find(sep, b);
    if (e == std::string::npos) e = rest.size();
    words.push_back(rest.substr(b, e - b));
    b = e + 1;
  }
  if (words.size() > 64) return 0;  // long argv adds nothing new
  std::vector<const char*> argv;
  for (const auto& w : words) argv.push_back(w.c_str());

  fuzz::expect_clean("Cli::parse", [&] {
    dpo::Cli cli("dpo_dist", "fuzz");
    dpo::add_train_options(cli);
    if (!cli.parse(static_cast<int>(argv.size()), argv.data())) return;  // --help / --version
    const auto dump = cli.dump();
    std::set<std::string> names;
    for (const auto& [k, v] : dump)
      if (!names.insert(k).second) fuzz::fail("dump() lists " + k + " twice");
    try {
      dpo::TrainOptions o = dpo::train_options_from(cli);
      (void)o;
    } catch (const dpo::CliError&) {
      // a rejected combination: fine
    }
  });
  for (size_t i = 1; i < words.size(); ++i) {
    fuzz::expect_clean("parse_size", [&] {
      if (dpo::parse_size(words[i], "--max_shard_size") < 0) fuzz::fail("negative size from '" + words[i] + "'");
    });
  }
  return 0;
}
