// dpo_score: per-example sequence log-probs of the chosen and rejected answers
// of an HDF5 preference file under a model (+ optional PEFT adapter), as JSONL;
// optionally stored as the file's reference log-probs (/ref_logps), and with
// --beta the implicit-reward accuracy and mean margin over the file.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>

#include <nlohmann/json.hpp>

#include "launch/cli.h"
#include "launch/model_setup.h"
#include "launch/run_dir.h"
#include "launch/scoring.h"
#include "runtime/tensor_cache.h"
#include "runtime/threads.h"
#include "util/fs.h"

using namespace dpo;

int main(int argc, char** argv) {
  return run_main("dpo_score", [&] {
    Cli cli("dpo_score", "Score chosen/rejected answers of an HDF5 preference file under a model (+ adapter).");
    add_model_options(cli, "Hugging Face Llama directory");
    cli.add_string("adapter", "", "PEFT adapter directory (adapter_model.safetensors + adapter_config.json), optional");
    cli.add_string("data", "", "HDF5 preference file from dpo_preprocess");
    cli.add_string("output", "", "JSONL output (index, chosen_logps, rejected_logps, chosen_tokens, rejected_tokens)");
    cli.add_bool("write_ref_logps", false, "store the scores as the file's reference log-probs (/ref_logps)");
    cli.add_double("beta", 0.0, "> 0: print the implicit-reward accuracy and mean margin against the reference");
    cli.add_int("batch_size", 8, "pairs per forward pass");
    cli.add_int("max_examples", 0, "score only the first N examples (0 = all)");
    cli.add_int("threads", 0, "compute threads (0 = all cores)");
    if (!cli.parse(argc, argv)) return 0;
    const std::string data = cli.get_string("data"), out = cli.get_string("output");
    if (data.empty()) throw CliError("option --data is required");
    if (out.empty() && !cli.get_bool("write_ref_logps") && cli.get_double("beta") <= 0)
      throw CliError("nothing to do: give --output FILE.jsonl, --write_ref_logps and/or --beta");
    if (cli.get_int("batch_size") < 1) throw CliError("option --batch_size must be >= 1");
    configure_threads(static_cast<int>(cli.get_int("threads")), 1);
    limit_heap_retention();
    install_tensor_cache();  // large activations reuse their mappings step after step

    LoadedModel m = load_model(model_options_from(cli));
    const std::string adapter = cli.get_string("adapter");
    if (!adapter.empty()) attach_peft_adapter(m, adapter);
    double beta = cli.get_double("beta");
    std::vector<double> ref_c, ref_r;
    std::vector<ExampleScore> scores;
    {
      PreferenceReader reader(data);
      check_data_matches_model(m, data, reader.attrs().tokenizer_sha256, reader.attrs().vocab_size);
      llama_check_max_length(m.model->config(), reader.attrs().max_length, data + " on " + cli.get_string("model_name_or_path"));
      int64_t n = reader.size();
      if (cli.get_int("max_examples") > 0) n = std::min(n, cli.get_int("max_examples"));
      std::vector<int64_t> idx(n);
      for (int64_t i = 0; i < n; ++i) idx[i] = i;
      scores = score_examples(m, reader, idx, cli.get_int("batch_size"), /*adapters=*/true);
      if (beta > 0) {
        if (reader.has_ref_logps()) {
          for (int64_t i = 0; i < n; ++i) {
            auto e = reader.get(i);
            ref_c.push_back(e.ref_chosen);
            ref_r.push_back(e.ref_rejected);
          }
        } else if (!adapter.empty()) {
          for (const auto& s : score_examples(m, reader, idx, cli.get_int("batch_size"), /*adapters=*/false)) {
            ref_c.push_back(s.chosen_logps);
            ref_r.push_back(s.rejected_logps);
          }
        }
      }
    }
    if (!out.empty()) {
      std::string text;
      for (const auto& s : scores) {
        nlohmann::json j{{"index", s.index},
                         {"chosen_logps", s.chosen_logps},
                         {"rejected_logps", s.rejected_logps},
                         {"chosen_tokens", s.chosen_tokens},
                         {"rejected_tokens", s.rejected_tokens}};
        text += j.dump() + "\n";
      }
      write_file_atomic(out, text);
      std::cout << "wrote " << scores.size() << " scores to " << out << "\n";
    }
    if (beta > 0) {
      double acc = 0, margin = 0;
      const bool have_ref = !ref_c.empty();
      for (size_t i = 0; i < scores.size(); ++i) {
        double rc = beta * (scores[i].chosen_logps - (have_ref ? ref_c[i] : 0.0));
        double rr = beta * (scores[i].rejected_logps - (have_ref ? ref_r[i] : 0.0));
        acc += rc > rr ? 1.0 : 0.0;
        margin += rc - rr;
      }
      const double n = std::max<double>(1.0, static_cast<double>(scores.size()));
      std::printf("%s over %zu pairs: rewards/accuracies %.4f  rewards/margins %.6f (beta %g)\n",
                  have_ref ? "implicit reward vs reference" : "no reference (no /ref_logps, no adapter): log-prob preference",
                  scores.size(), acc / n, margin / n, beta);
    }
    if (cli.get_bool("write_ref_logps")) {
      if (cli.get_int("max_examples") > 0)
        throw CliError("--write_ref_logps needs every example scored: drop --max_examples");
      std::vector<double> c, r;
      for (const auto& s : scores) {
        c.push_back(s.chosen_logps);
        r.push_back(s.rejected_logps);
      }
      write_ref_logps(data, c, r);
      std::cout << "stored " << c.size() << " reference log-prob pairs in " << data << " (/ref_logps)\n";
    }
    return 0;
  });
}
