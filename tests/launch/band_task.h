// The "learnable bands" preference task of the training tests (test_loss_training,
// test_orpo_cpo): a tiny NF4 Llama saved in the HF layout with a trained test tokenizer, and
// pairs whose chosen answers use ids [100, 130) and rejected ones [130, 160) after a prompt
// of ids [3, 100): the band, not the wording, decides the preference.
#pragma once
#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "core/llama.h"
#include "data/preference_h5.h"
#include "data/tokenizer_info.h"
#include "tests/test_util.h"
#include "tests/tiny_llama.h"

namespace dpo::testutil {

struct BandTask {
  explicit BandTask(const std::string& name) : dir(name) {}
  TempDir dir;
  std::string model_dir, train_h5;
  int64_t vocab = 0;
};

/// Writes the model and `pairs` pairs (seed 1) under a new temporary directory `name`.
/// equal_answer_lengths: chosen and rejected of one length per pair (only the band differs);
/// else the rejected length is drawn on its own (averages and padding matter).
inline BandTask* make_band_task(const std::string& name, int64_t pairs, bool equal_answer_lengths) {
  namespace fs = std::filesystem;
  auto* t = new BandTask(name);
  t->model_dir = t->dir.file("model");
  fs::create_directories(t->model_dir);
  fs::create_directories(t->dir.file("tok"));
  const std::string tok = train_test_tokenizer(t->dir.file("tok"), 300);
  TokenizerInfo info(tok);
  t->vocab = info.vocab_size();
  LlamaConfig c = tiny_llama_config(t->vocab);
  c.max_position_embeddings = 64;
  QuantOptions q;
  q.load_in_4bit = true;
  LlamaModel m = llama_init_random(llama_config_checked(c), 5, q);
  llama_save_hf(m, t->model_dir, torch::kFloat32, 0);
  fs::copy_file(tok, t->model_dir + "/tokenizer.model");
  PreferenceAttrs a;
  a.vocab_size = t->vocab;
  a.bos_id = info.bos_id();
  a.eos_id = info.eos_id();
  a.pad_id = info.pad_id();
  a.tokenizer_sha256 = info.sha256();
  a.max_length = 32;
  a.max_prompt_length = 16;
  a.source = {"learnable bands"};
  std::mt19937_64 rng(1);
  std::uniform_int_distribution<int32_t> prompt_tok(3, 99), good(100, 129), bad(130, 159);
  t->train_h5 = t->dir.file("train.h5");
  PreferenceWriter w(t->train_h5, a);
  for (int64_t i = 0; i < pairs; ++i) {
    std::vector<int32_t> p{static_cast<int32_t>(info.bos_id())}, ch, rj;
    const int64_t lp = 3 + rng() % 5, lc = 2 + rng() % 4;
    const int64_t lr = equal_answer_lengths ? lc : 1 + static_cast<int64_t>(rng() % 5);
    for (int64_t k = 0; k < lp; ++k) p.push_back(prompt_tok(rng));
    for (int64_t k = 0; k < lc; ++k) ch.push_back(good(rng));
    for (int64_t k = 0; k < lr; ++k) rj.push_back(bad(rng));
    ch.push_back(static_cast<int32_t>(info.eos_id()));
    rj.push_back(static_cast<int32_t>(info.eos_id()));
    w.append(p, ch, rj);
  }
  w.close();
  return t;
}

}  // namespace dpo::testutil
