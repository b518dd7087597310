// dpo_quantize: Hugging Face Llama directory -> the same model with the seven
// decoder projections stored in the bitsandbytes 4-bit (NF4) layout
// (<p>.weight packed U8, .absmax, .quant_map, [.nested_absmax, .nested_quant_map],
// .quant_state.bitsandbytes__nf4) and `quantization_config` in config.json, as
// transformers' save_pretrained of a load_in_4bit model writes it. Embeddings,
// norms and lm_head are copied unchanged. Quantizes one tensor at a time.
#include <filesystem>
#include <fstream>
#include <iostream>

#include <nlohmann/json.hpp>

#include "core/linear.h"
#include "core/llama.h"
#include "core/nf4.h"
#include "core/safetensors.h"
#include "launch/cli.h"
#include "runtime/threads.h"
#include "util/fs.h"
#include "util/json_read.h"

using namespace dpo;
namespace fs = std::filesystem;

namespace {
bool is_projection(const std::string& name, std::string* prefix) {
  static const char* kProj[] = {".self_attn.q_proj.weight", ".self_attn.k_proj.weight", ".self_attn.v_proj.weight",
                                ".self_attn.o_proj.weight", ".mlp.gate_proj.weight",    ".mlp.up_proj.weight",
                                ".mlp.down_proj.weight"};
  for (const char* p : kProj) {
    const std::string s(p);
    if (name.size() > s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0 &&
        name.rfind("model.layers.", 0) == 0) {
      *prefix = name.substr(0, name.size() - std::string(".weight").size());
      return true;
    }
  }
  return false;
}
}  // namespace

int main(int argc, char** argv) {
  return run_main("dpo_quantize", [&] {
    Cli cli("dpo_quantize", "Write a Hugging Face Llama model with NF4 projections in the bitsandbytes layout.");
    cli.add_string("model_name_or_path", "", "Hugging Face Llama directory to quantize");
    cli.add_string("output_dir", "", "directory to write");
    cli.add_bool("bnb_4bit_use_double_quant", false, "quantize the absmax values again (compress_statistics)");
    cli.add_string("bnb_4bit_compute_dtype", "float32", "compute dtype recorded in quantization_config");
    cli.add_int("threads", 0, "compute threads (0 = all cores)");
    if (!cli.parse(argc, argv)) return 0;
    const std::string in = cli.get_string("model_name_or_path"), out = cli.get_string("output_dir");
    if (in.empty()) throw CliError("option --model_name_or_path is required");
    if (out.empty()) throw CliError("option --output_dir is required");
    if (fs::exists(out) && fs::exists(in) && fs::equivalent(in, out))
      throw CliError("--output_dir must differ from --model_name_or_path");
    const bool dq = cli.get_bool("bnb_4bit_use_double_quant");
    const std::string cdt = cli.get_string("bnb_4bit_compute_dtype");
    if (cdt != "float32" && cdt != "bfloat16" && cdt != "float16")
      throw CliError("option --bnb_4bit_compute_dtype: '" + cdt + "' is not one of float32|bfloat16|float16");
    configure_threads(static_cast<int>(cli.get_int("threads")), 1);

    LlamaConfig cfg = llama_config_load(in + "/config.json");  // validates the architecture
    (void)cfg;
    HfCheckpoint ck(in);
    // Entries first (names, dtypes, shapes), tensors produced lazily one by one.
    std::vector<SafetensorsEntry> entries;
    std::map<std::string, std::vector<std::pair<std::string, torch::Tensor>>> cache;  // prefix -> bnb tensors
    for (const auto& name : ck.names()) {
      std::string prefix;
      auto t = *ck.find(name);
      if (is_projection(name, &prefix)) {
        if (t.dim() != 2) throw std::runtime_error(ck.file_of(name) + ": " + name + " is not 2-D");
        // Shapes of the bnb tensors without keeping them: quantize a tiny stand-in of
        // the same numel layout is not possible, so compute sizes from the format.
        const int64_t n = t.numel(), nb = (n + 63) / 64;
        entries.push_back({name, torch::kUInt8, {(n + 1) / 2, 1}});
        entries.push_back({name + ".absmax", dq ? torch::kUInt8 : torch::kFloat32, {nb}});
        entries.push_back({name + ".quant_map", torch::kFloat32, {16}});
        if (dq) {
          entries.push_back({name + ".nested_absmax", torch::kFloat32, {(nb + 255) / 256}});
          entries.push_back({name + ".nested_quant_map", torch::kFloat32, {256}});
        }
        entries.push_back({name + ".quant_state.bitsandbytes__nf4", torch::kUInt8, {-1}});  // size fixed below
      } else {
        entries.push_back({name, t.scalar_type(), t.sizes().vec()});
      }
    }
    // The JSON quant_state's length depends on its text: produce it once per prefix.
    auto bnb_of = [&](const std::string& weight_name) -> const std::vector<std::pair<std::string, torch::Tensor>>& {
      auto it = cache.find(weight_name);
      if (it != cache.end()) return it->second;
      cache.clear();  // one projection at a time
      auto w = ck.find(weight_name)->to(torch::kFloat32);
      Nf4Tensor q = nf4_quantize(w, dq);
      std::string prefix = weight_name.substr(0, weight_name.size() - std::string(".weight").size());
      return cache[weight_name] = nf4_to_bnb_tensors(q, prefix);
    };
    for (auto& e : entries) {
      if (e.shape.size() == 1 && e.shape[0] == -1) {
        std::string w = e.name.substr(0, e.name.find(".quant_state."));
        for (const auto& [k, v] : bnb_of(w))
          if (k == e.name) e.shape = v.sizes().vec();
      }
    }
    fs::create_directories(out);
    safetensors_save_lazy(out + "/model.safetensors", entries, [&](const SafetensorsEntry& e) -> torch::Tensor {
      std::string prefix;
      std::string base = e.name;
      auto pos = base.find(".weight");
      std::string wname = pos == std::string::npos ? base : base.substr(0, pos + 7);
      if (is_projection(wname, &prefix)) {
        for (const auto& [k, v] : bnb_of(wname))
          if (k == e.name) return v;
        throw std::runtime_error("dpo_quantize: internal error: no tensor " + e.name);
      }
      return *ck.find(e.name);
    }, {{"format", "pt"}});
    // Remove stale shards of an earlier save into the same directory.
    if (fs::exists(out + "/model.safetensors.index.json")) fs::remove(out + "/model.safetensors.index.json");
    nlohmann::json config = json_parse(json_read_file(in + "/config.json", kJsonConfigMaxBytes), in + "/config.json");
    config["quantization_config"] = {{"quant_method", "bitsandbytes"},
                                     {"load_in_4bit", true},
                                     {"load_in_8bit", false},
                                     {"bnb_4bit_quant_type", "nf4"},
                                     {"bnb_4bit_use_double_quant", dq},
                                     {"bnb_4bit_compute_dtype", cdt},
                                     {"bnb_4bit_quant_storage", "uint8"},
                                     {"llm_int8_threshold", 6.0},
                                     {"llm_int8_skip_modules", nullptr},
                                     {"llm_int8_enable_fp32_cpu_offload", false},
                                     {"llm_int8_has_fp16_weight", false}};
    write_file_atomic(out + "/config.json", config.dump(2) + "\n");
    for (const char* f : {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                          "generation_config.json", "chat_template.jinja"})
      if (fs::exists(fs::path(in) / f)) fs::copy_file(fs::path(in) / f, fs::path(out) / f, fs::copy_options::overwrite_existing);
    std::cout << "wrote " << out << " (NF4" << (dq ? ", double quant" : "") << ", bitsandbytes layout)\n";
    return 0;
  });
}
