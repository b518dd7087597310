#include "core/modules_to_save.h"

#include <filesystem>
#include <stdexcept>

#include "core/lora.h"
#include "core/safetensors.h"

namespace dpo {

namespace {

struct Wanted {
  bool embed = false, head = false;
};

Wanted wanted(const std::vector<std::string>& modules) {
  Wanted w;
  for (const auto& m : modules) {
    lora_modules_to_save_key(m);  // throws for unknown names
    bool& flag = m == "embed_tokens" ? w.embed : w.head;
    if (flag) throw std::runtime_error("modules_to_save names \"" + m + "\" twice");
    flag = true;
  }
  return w;
}

torch::Tensor trainable_copy(const torch::Tensor& t) {
  torch::NoGradGuard ng;
  torch::Tensor c = t.detach().to(torch::kFloat32).clone().contiguous();
  c.set_requires_grad(true);
  return c;
}

}  // namespace

std::vector<std::string> modules_to_save_recorded(const std::vector<std::string>& modules, bool tied) {
  if (!tied || modules.empty()) return modules;
  wanted(modules);  // the same checks as every other entry point
  return {"embed_tokens", "lm_head"};
}

std::vector<std::pair<std::string, torch::Tensor>> modules_to_save_attach(LlamaModel& model,
                                                                          const std::vector<std::string>& modules) {
  const Wanted w = wanted(modules);
  model->set_modules_to_save(torch::Tensor(), torch::Tensor());
  model->set_modules_to_save_enabled(true);
  if (!w.embed && !w.head) return {};
  std::vector<std::pair<std::string, torch::Tensor>> out;
  if (model->config().tie_word_embeddings) {
    torch::Tensor shared = trainable_copy(model->model->embed_tokens->weight);
    model->set_modules_to_save(shared, shared);
    out.emplace_back(lora_modules_to_save_key(modules.front()), shared);
    return out;
  }
  torch::Tensor e, h;
  if (w.embed) e = trainable_copy(model->model->embed_tokens->weight);
  if (w.head) h = trainable_copy(model->lm_head->weight);
  model->set_modules_to_save(e, h);
  for (const auto& m : modules) out.emplace_back(lora_modules_to_save_key(m), m == "embed_tokens" ? e : h);
  return out;
}

std::vector<std::pair<std::string, torch::Tensor>> modules_to_save_state(const LlamaModel& model,
                                                                         const std::vector<std::string>& modules) {
  wanted(modules);
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& m : modules) {
    const torch::Tensor& t = m == "embed_tokens" ? model->saved_embed() : model->saved_head();
    if (!t.defined()) throw std::runtime_error("modules_to_save: " + m + " has no trainable copy");
    out.emplace_back(lora_modules_to_save_key(m), t);
  }
  return out;
}

void modules_to_save_load(LlamaModel& model, const std::vector<std::string>& modules, const std::string& dir) {
  const Wanted w = wanted(modules);
  if (!w.embed && !w.head) return;
  const std::string path = (std::filesystem::path(dir) / "adapter_model.safetensors").string();
  SafetensorsFile file(path);
  const LlamaConfig& c = model->config();
  std::vector<std::pair<std::string, torch::Tensor>> got;  // (module, tensor) validated
  for (const auto& m : modules) {
    std::string key = lora_modules_to_save_key(m);
    const std::string twin = lora_modules_to_save_key(m == "embed_tokens" ? "lm_head" : "embed_tokens");
    if (!file.has(key) && c.tie_word_embeddings && file.has(twin)) key = twin;  // one copy, one key
    if (!file.has(key)) throw std::runtime_error(path + ": missing tensor " + key + " (adapter_config.json lists " + m + " in modules_to_save)");
    torch::Tensor t = file.get(key);
    if (t.dim() != 2 || t.size(0) != c.vocab_size || t.size(1) != c.hidden_size)
      throw std::runtime_error(path + ": tensor " + key + " has shape " + c10::str(t.sizes()) + ", the model needs (" +
                               std::to_string(c.vocab_size) + ", " + std::to_string(c.hidden_size) + ")");
    if (!at::isFloatingType(t.scalar_type())) throw std::runtime_error(path + ": tensor " + key + " is not floating point");
    got.emplace_back(m, t);
  }
  if (c.tie_word_embeddings && got.size() == 2 && !torch::equal(got[0].second.to(torch::kFloat32), got[1].second.to(torch::kFloat32)))
    throw std::runtime_error(path + ": the model ties its embeddings but " + lora_modules_to_save_key("embed_tokens") + " and " +
                             lora_modules_to_save_key("lm_head") +
                             " differ (an adapter trained with untied copies cannot be loaded onto the tied model)");
  const bool have = (!w.embed || model->saved_embed().defined()) && (!w.head || model->saved_head().defined());
  if (!have) modules_to_save_attach(model, modules);
  torch::NoGradGuard ng;
  for (const auto& [m, t] : got) {
    torch::Tensor dst = m == "embed_tokens" ? model->saved_embed() : model->saved_head();
    dst.copy_(t);
  }
}

void modules_to_save_merge(LlamaModel& model) {
  torch::NoGradGuard ng;
  // A half-precision frozen table (llama_table_dtype) would round the trained values.
  if (model->saved_embed().defined() || model->saved_head().defined()) model->set_table_dtype(model->compute_dtype());
  if (model->saved_embed().defined()) model->model->embed_tokens->weight.copy_(model->saved_embed());
  if (model->saved_head().defined()) {
    if (model->config().tie_word_embeddings) {
      if (!model->saved_embed().defined()) model->model->embed_tokens->weight.copy_(model->saved_head());
    } else {
      model->lm_head->weight.copy_(model->saved_head());
    }
  }
  model->set_modules_to_save(torch::Tensor(), torch::Tensor());
}

}  // namespace dpo
