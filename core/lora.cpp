#include "core/lora.h"

#include <ATen/CPUGeneratorImpl.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <fcntl.h>
#include <unistd.h>

#include "core/safetensors.h"
#include "util/fs.h"
#include "util/json_read.h"
#include "util/tensor_str.h"

namespace dpo {

namespace fs = std::filesystem;

namespace {

constexpr const char* kAdapterWeights = "adapter_model.safetensors";
constexpr const char* kAdapterConfig = "adapter_config.json";



}  // namespace

std::string lora_module_type(const std::string& name) {
  const auto dot = name.rfind('.');
  return dot == std::string::npos ? name : name.substr(dot + 1);
}

bool lora_targets(const LoraConfig& cfg, const std::string& name) {
  const std::string type = lora_module_type(name);
  for (const auto& t : lora_expand_targets(cfg.target_modules))
    if (t == type) return true;
  return false;
}

std::string lora_peft_key(const std::string& name, char which) {
  if (which != 'A' && which != 'B') throw std::invalid_argument("lora_peft_key: which must be 'A' or 'B'");
  return "base_model.model." + name + ".lora_" + which + ".weight";
}

int64_t lora_attach(const NamedLinears& named, const LoraConfig& cfg, uint64_t seed) {
  lora_config_validate(cfg);
  const std::vector<std::string> targets = lora_expand_targets(cfg.target_modules);
  std::set<std::string> matched;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  int64_t count = 0;
  for (const auto& [name, lin] : named) {
    if (!lora_targets(cfg, name)) continue;
    lin.ptr()->add_lora(cfg, gen);
    matched.insert(lora_module_type(name));
    ++count;
  }
  for (const auto& t : targets)
    if (!matched.count(t))
      throw std::runtime_error("lora_target_modules: \"" + t + "\" matches none of the model's " +
                               std::to_string(named.size()) + " projections");
  return count;
}

void lora_set_enabled(const NamedLinears& named, bool enabled) {
  for (const auto& [name, lin] : named)
    if (lin.ptr()->has_lora()) lin.ptr()->set_lora_enabled(enabled);
}

std::vector<std::pair<std::string, torch::Tensor>> lora_parameters(const NamedLinears& named) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& [name, lin] : named) {
    if (!lin.ptr()->has_lora()) continue;
    out.emplace_back(lora_peft_key(name, 'A'), lin.ptr()->lora_A());
    out.emplace_back(lora_peft_key(name, 'B'), lin.ptr()->lora_B());
  }
  return out;
}

std::string lora_config_json(const LoraConfig& cfg, const std::string& base_model_name_or_path) {
  lora_config_validate(cfg);
  nlohmann::json j;  // keys sorted, as PEFT's json.dumps(sort_keys=True)
  j["alpha_pattern"] = nlohmann::json::object();
  j["auto_mapping"] = nullptr;
  j["base_model_name_or_path"] = base_model_name_or_path;
  j["bias"] = "none";
  j["fan_in_fan_out"] = false;
  j["inference_mode"] = true;
  j["init_lora_weights"] = true;
  j["layer_replication"] = nullptr;
  j["layers_pattern"] = nullptr;
  j["layers_to_transform"] = nullptr;
  j["loftq_config"] = nlohmann::json::object();
  // PEFT types lora_alpha as int: write 16, not 16.0, when it is integral.
  if (cfg.alpha == std::floor(cfg.alpha) && std::fabs(cfg.alpha) < 1e15)
    j["lora_alpha"] = static_cast<int64_t>(cfg.alpha);
  else
    j["lora_alpha"] = cfg.alpha;
  j["lora_dropout"] = cfg.dropout;
  j["megatron_config"] = nullptr;
  j["megatron_core"] = "megatron.core";
  if (cfg.modules_to_save.empty()) j["modules_to_save"] = nullptr;
  else j["modules_to_save"] = cfg.modules_to_save;
  if (cfg.ensure_weight_tying) j["ensure_weight_tying"] = true;
  j["peft_type"] = "LORA";
  j["r"] = cfg.r;
  j["rank_pattern"] = nlohmann::json::object();
  j["revision"] = nullptr;
  j["target_modules"] = lora_expand_targets(cfg.target_modules);
  j["task_type"] = "CAUSAL_LM";
  j["use_dora"] = false;
  j["use_rslora"] = cfg.use_rslora;
  return j.dump(2) + "\n";
}

void lora_save_peft(const NamedLinears& named, const LoraConfig& cfg, const std::string& dir,
                    const std::string& base_model_name_or_path,
                    const std::vector<std::pair<std::string, torch::Tensor>>& saved_modules) {
  const std::string where = "saving the LoRA adapter to " + dir + ": ";
  try {
    lora_config_validate(cfg);
    std::vector<std::pair<std::string, torch::Tensor>> tensors;
    for (const auto& [name, lin] : named) {
      const bool targeted = lora_targets(cfg, name);
      if (targeted != lin.ptr()->has_lora())
        throw std::runtime_error("module " + name + (targeted ? " is targeted by the config but has no adapter"
                                                               : " has an adapter but is not in target_modules"));
      if (!targeted) continue;
      if (lin.ptr()->lora_r() != cfg.r)
        throw std::runtime_error("module " + name + " has rank " + std::to_string(lin.ptr()->lora_r()) +
                                 ", the config says r=" + std::to_string(cfg.r));
      tensors.emplace_back(lora_peft_key(name, 'A'), lin.ptr()->lora_A().detach().to(torch::kCPU).contiguous());
      tensors.emplace_back(lora_peft_key(name, 'B'), lin.ptr()->lora_B().detach().to(torch::kCPU).contiguous());
    }
    if (tensors.empty()) throw std::runtime_error("no adapters to save");
    std::set<std::string> want;
    for (const auto& m : cfg.modules_to_save) want.insert(lora_modules_to_save_key(m));
    for (const auto& [key, t] : saved_modules) {
      if (!want.erase(key)) throw std::runtime_error("saved module " + key + " is not in the config's modules_to_save");
      tensors.emplace_back(key, t.detach().to(torch::kCPU).contiguous());
    }
    if (!want.empty()) throw std::runtime_error("modules_to_save: no tensor for " + *want.begin());
    fs::create_directories(dir);
    safetensors_save((fs::path(dir) / kAdapterWeights).string(), tensors, {{"format", "pt"}});
    write_file_atomic((fs::path(dir) / kAdapterConfig).string(), lora_config_json(cfg, base_model_name_or_path));
  } catch (const std::exception& e) {
    throw std::runtime_error(where + e.what());
  }
}

LoraConfig lora_config_load(const std::string& dir) {
  const std::string path = (fs::path(dir) / kAdapterConfig).string();
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path + ": cannot open (is " + dir + " a PEFT adapter directory?)");
  in.close();
  const std::string text = json_read_file(path, kJsonConfigMaxBytes);
  nlohmann::json j;
  try {
    j = json_parse(text, path);
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(path + ": invalid JSON: " + e.what());
  }
  if (!j.is_object()) throw std::runtime_error(path + ": not a JSON object");
  auto bad = [&](const std::string& key, const std::string& m) {
    return std::runtime_error(path + ": " + key + ": " + m);
  };
  LoraConfig cfg;
  try {
    if (j.contains("peft_type") && j["peft_type"] != "LORA")
      throw bad("peft_type", j["peft_type"].dump() + " is not supported (only LORA)");
    if (!j.contains("r")) throw bad("r", "missing");
    if (!j["r"].is_number_integer()) throw bad("r", "must be an integer, got " + j["r"].dump());
    cfg.r = j["r"].get<int64_t>();
    cfg.alpha = j.contains("lora_alpha") ? j["lora_alpha"].get<double>() : 8.0;  // PEFT's default
    cfg.dropout = j.contains("lora_dropout") && !j["lora_dropout"].is_null() ? j["lora_dropout"].get<double>() : 0.0;
    cfg.use_rslora = j.contains("use_rslora") && j["use_rslora"].get<bool>();
    if (!j.contains("target_modules") || j["target_modules"].is_null()) throw bad("target_modules", "missing");
    const auto& tm = j["target_modules"];
    if (tm.is_string()) {
      if (tm.get<std::string>() != "all-linear")
        throw bad("target_modules", "the regular expression " + tm.dump() + " is not supported (give a list)");
      cfg.target_modules = {"all-linear"};
    } else {
      // PEFT keeps a list of targets as a set: a name given twice is one target.
      cfg.target_modules.clear();
      for (const auto& t : tm.get<std::vector<std::string>>())
        if (std::find(cfg.target_modules.begin(), cfg.target_modules.end(), t) == cfg.target_modules.end())
          cfg.target_modules.push_back(t);
    }
    if (j.contains("bias") && j["bias"] != "none") throw bad("bias", j["bias"].dump() + " is not supported (only \"none\")");
    for (const char* k : {"use_dora", "fan_in_fan_out"})
      if (j.contains(k) && !j[k].is_null() && j[k].get<bool>()) throw bad(k, "true is not supported");
    for (const char* k : {"rank_pattern", "alpha_pattern"})
      if (j.contains(k) && !j[k].is_null() && !j[k].empty()) throw bad(k, "per-module ranks/alphas are not supported");
    for (const char* k : {"layers_to_transform", "layer_replication"})
      if (j.contains(k) && !j[k].is_null()) throw bad(k, "is not supported (must be null)");
    if (j.contains("modules_to_save") && !j["modules_to_save"].is_null()) {
      if (!j["modules_to_save"].is_array()) throw bad("modules_to_save", "must be a list of module names or null");
      for (const auto& m : j["modules_to_save"]) {
        if (!m.is_string()) throw bad("modules_to_save", "must be a list of module names, got " + m.dump());
        // PEFT matches module names by suffix and writes a tied model's table under its
        // short and its path name ("embed_tokens", "model.embed_tokens"): one module.
        const std::string given = m.get<std::string>();
        const std::string name = given.substr(given.rfind('.') == std::string::npos ? 0 : given.rfind('.') + 1);
        bool known = false;
        for (const auto& k : lora_saveable_modules()) known = known || k == name;
        if (!known) throw bad("modules_to_save", "\"" + given + "\" is not supported (embed_tokens, lm_head)");
        if (std::find(cfg.modules_to_save.begin(), cfg.modules_to_save.end(), name) == cfg.modules_to_save.end())
          cfg.modules_to_save.push_back(name);
      }
    }
    cfg.ensure_weight_tying = j.contains("ensure_weight_tying") && j["ensure_weight_tying"].is_boolean() &&
                              j["ensure_weight_tying"].get<bool>();
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(path + ": wrong type of a field: " + e.what());
  }
  try {
    lora_config_validate(cfg);
  } catch (const std::exception& e) {
    throw std::runtime_error(path + ": " + e.what());
  }
  return cfg;
}

LoraConfig lora_load_peft(const NamedLinears& named, const std::string& dir) {
  LoraConfig cfg = lora_config_load(dir);
  const std::string path = (fs::path(dir) / kAdapterWeights).string();
  if (!fs::exists(path)) {
    if (fs::exists(fs::path(dir) / "adapter_model.bin"))
      throw std::runtime_error(path + ": missing; the adapter is a pickle file (adapter_model.bin), which is never "
                                      "loaded: re-save it with safetensors (PEFT save_pretrained(safe_serialization=True))");
    throw std::runtime_error(path + ": missing");
  }
  SafetensorsFile file(path);
  std::set<std::string> expected, saved;
  for (const auto& [name, lin] : named) {
    const bool targeted = lora_targets(cfg, name);
    if (!targeted) {
      if (lin.ptr()->has_lora())
        throw std::runtime_error(path + ": module " + name + " has an adapter but the adapter's target_modules do not include " +
                                 lora_module_type(name));
      continue;
    }
    if (lin.ptr()->has_lora() && lin.ptr()->lora_r() != cfg.r)
      throw std::runtime_error(path + ": module " + name + " has an adapter of rank " + std::to_string(lin.ptr()->lora_r()) +
                               " but the file's config says r=" + std::to_string(cfg.r));
    expected.insert(lora_peft_key(name, 'A'));
    expected.insert(lora_peft_key(name, 'B'));
  }
  for (const auto& m : cfg.modules_to_save) saved.insert(lora_modules_to_save_key(m));
  // A tied adapter (PEFT's ensure_weight_tying) holds its one copy under both tables' keys.
  if (cfg.ensure_weight_tying && !cfg.modules_to_save.empty())
    for (const auto& m : lora_saveable_modules()) saved.insert(lora_modules_to_save_key(m));
  for (const auto& k : file.names())
    if (!expected.count(k) && !saved.count(k))
      throw std::runtime_error(path + ": unexpected tensor " + k + " (no such adapted module in this model)");
  // Validate everything before touching any module.
  std::map<std::string, torch::Tensor> loaded;
  for (const auto& [name, lin] : named) {
    if (!lora_targets(cfg, name)) continue;
    for (char which : {'A', 'B'}) {
      const std::string key = lora_peft_key(name, which);
      if (!file.has(key)) throw std::runtime_error(path + ": missing tensor " + key);
      torch::Tensor t = file.get(key);
      const std::vector<int64_t> want =
          which == 'A' ? std::vector<int64_t>{cfg.r, lin.ptr()->in_features()} : std::vector<int64_t>{lin.ptr()->out_features(), cfg.r};
      if (t.sizes().vec() != want)
        throw std::runtime_error(path + ": tensor " + key + " has shape " + shape_str(t) + ", expected (" +
                                 std::to_string(want[0]) + ", " + std::to_string(want[1]) + ")");
      if (!at::isFloatingType(t.scalar_type()))
        throw std::runtime_error(path + ": tensor " + key + " is not floating point");
      loaded[key] = t;
    }
  }
  torch::NoGradGuard no_grad;
  for (const auto& [name, lin] : named) {
    if (!lora_targets(cfg, name)) continue;
    lin.ptr()->add_lora(cfg, uint64_t{0});  // sets scaling/dropout from the file's config; values overwritten below
    lin.ptr()->lora_A().copy_(loaded.at(lora_peft_key(name, 'A')));
    lin.ptr()->lora_B().copy_(loaded.at(lora_peft_key(name, 'B')));
  }
  return cfg;
}

void lora_merge(const NamedLinears& named) {
  for (const auto& [name, lin] : named)
    if (lin.ptr()->has_lora()) lin.ptr()->merge_lora();
}

}  // namespace dpo
