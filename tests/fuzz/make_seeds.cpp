// Writes the seed corpora of the fuzz harnesses (tests/fuzz/corpus/<harness>/) with
// the project's own writers, so every seed is a file the tools really produce:
//   build/tests/fuzz_make_seeds tests/fuzz/corpus
// Text seeds (command lines, JSONL rows) are written literally below.
#include <torch/types.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "core/llama.h"
#include "core/lora.h"
#include "core/nf4.h"
#include "core/safetensors.h"
#include "data/preference_h5.h"

namespace fs = std::filesystem;

namespace {
fs::path g_root;

void put(const std::string& harness, const std::string& name, const std::string& bytes) {
  fs::create_directories(g_root / harness);
  std::ofstream out(g_root / harness / name, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("cannot write " + (g_root / harness / name).string());
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void safetensors_seeds(const fs::path& tmp) {
  torch::manual_seed(0);
  const fs::path f = tmp / "s.safetensors";
  dpo::safetensors_save(f.string(),
                        {{"a.weight", torch::randn({3, 4})},
                         {"b.bias", torch::randn({5}).to(torch::kBFloat16)},
                         {"c.ids", torch::arange(6, torch::kInt64).view({2, 3})},
                         {"d.scalar", torch::scalar_tensor(7, torch::kInt32)},  // 0-dim
                         {"e.empty", torch::empty({0, 2}, torch::kFloat16)},
                         {"f.bytes", torch::arange(5, torch::kUInt8)}},
                        {{"format", "pt"}});
  put("safetensors", "mixed.safetensors", slurp(f));
  dpo::safetensors_save(f.string(), {{"only", torch::ones({2}, torch::kInt8)}});
  put("safetensors", "one_i8.safetensors", slurp(f));
  dpo::safetensors_save(f.string(), {});
  put("safetensors", "empty.safetensors", slurp(f));
}

void llama_seeds() {
  dpo::LlamaConfig c;
  c.hidden_size = 64;
  c.intermediate_size = 128;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.vocab_size = 256;
  put("llama_config", "tiny.json", dpo::llama_config_to_json(c).dump(2));
  c.rope_scaling.type = dpo::RopeScaling::Type::kLlama3;
  c.rope_scaling.factor = 8;
  c.rope_scaling.original_max_position_embeddings = 8192;
  c.tie_word_embeddings = true;
  c.pad_token_id = 0;
  c.torch_dtype = torch::kBFloat16;
  nlohmann::json j = dpo::llama_config_to_json(c);
  j["eos_token_id"] = {2, 3};
  put("llama_config", "llama3.json", j.dump());
  c.rope_scaling = {};
  c.rope_scaling.type = dpo::RopeScaling::Type::kLinear;
  c.rope_scaling.factor = 2;
  j = dpo::llama_config_to_json(c);
  j["architectures"] = {"MistralForCausalLM"};
  j["model_type"] = "mistral";
  j["sliding_window"] = 4096;
  j["head_dim"] = 32;
  put("llama_config", "mistral.json", j.dump());
}

void adapter_seeds() {
  dpo::LoraConfig c;
  put("adapter_config", "default.json", dpo::lora_config_json(c, "base"));
  c.r = 16;
  c.alpha = 32;
  c.dropout = 0;
  c.use_rslora = true;
  c.target_modules = {"all-linear"};
  put("adapter_config", "all_linear_rslora.json", dpo::lora_config_json(c, "meta-llama/Llama-2-7b-hf"));
  put("adapter_config", "minimal.json", R"({"r": 4, "target_modules": ["q_proj", "down_proj"]})");
}

void quant_state_seeds() {
  for (int dq = 0; dq < 2; ++dq)
    for (int n : {1, 64, 200}) {
      torch::manual_seed(n);  // as the harness: n + 1 = data[1] + 1 values
      const dpo::Nf4Tensor q = dpo::nf4_quantize(torch::randn({n}), dq != 0, 64);
      for (auto& [name, t] : dpo::nf4_to_bnb_tensors(q, "m")) {
        if (name.find("quant_state") == std::string::npos) continue;
        std::string bytes(1, static_cast<char>(dq));
        bytes += static_cast<char>(n - 1);
        bytes.append(reinterpret_cast<const char*>(t.data_ptr<uint8_t>()), static_cast<size_t>(t.numel()));
        put("quant_state", (dq ? "dq_" : "plain_") + std::to_string(n) + ".bin", bytes);
      }
    }
}

void cli_seeds() {
  auto words = [](std::initializer_list<std::string> w, char sep) {
    std::string s;
    for (const auto& x : w) s += (s.empty() ? "" : std::string(1, sep)) + x;
    return s;
  };
  put("cli", "argv.txt",
      words({"--model_name_or_path", "m", "--train_file", "t.h5", "--output_dir", "o", "--learning_rate", "5e-4",
             "--lora_target_modules", "q_proj,v_proj", "--gradient_checkpointing", "--use_rslora", "false",
             "--max_steps=10"},
            '\n'));
  const std::string ini =
      "# a config\n[train]\nmodel_name_or_path = m\ntrain_file = t.h5\noutput_dir = o\nbeta = 0.2\n"
      "lora_target_modules = q_proj\nlora_target_modules = k_proj\n; comment\nmax_steps = 3\nseed=1\n";
  put("cli", "ini_and_argv.bin", ini + std::string(1, '\0') + words({"--beta", "0.1", "--stage", "sft"}, '\0'));
  put("cli", "sizes.txt", words({"5GB", "500MB", "1.5KiB", "123", "--help"}, '\n'));
}

void jsonl_seeds() {
  put("jsonl_rows", "trl.jsonl", R"({"prompt": "Hi", "chosen": " yes", "rejected": " no"})");
  put("jsonl_rows", "trl_unicode.jsonl",
      R"({"prompt": "\u00e9t\u00e9 \ud83d\ude00", "chosen": "\t ok\n", "rejected": "caf\u00e9", "extra": [1, {"a": null}]})");
  put("jsonl_rows", "stack.jsonl", R"({"question": "Why?", "response_j": "Because.", "response_k": "No idea."})");
  put("jsonl_rows", "bad_type.jsonl", R"({"prompt": 1, "chosen": true, "rejected": null})");
  put("jsonl_rows", "conversational_explicit.jsonl",
      R"({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}], )"
      R"("chosen": [{"role": "assistant", "content": "Hello."}], "rejected": [{"role": "assistant", "content": "Go away."}]})");
  put("jsonl_rows", "conversational_implicit.jsonl",
      R"({"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], )"
      R"("rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]})");
}

// Valid-but-hostile JSON (issue 28): nesting 50,000 levels deep (which overflowed the
// stack before util/json_read.h bounded every reader at 512) and long lines, both past
// libFuzzer's default -max_len of 4,096 bytes (scripts/fuzz.sh passes 1 MiB to the JSON
// harnesses).
void hostile_json_seeds() {
  const std::string deep = std::string(50000, '[') + std::string(50000, ']');
  put("jsonl_rows", "deep_prompt.jsonl", R"({"prompt": )" + deep + R"(, "chosen": "b", "rejected": "c"})");
  put("jsonl_rows", "long_line.jsonl",
      R"({"prompt": ")" + std::string(100000, 'a') + R"(", "chosen": "b", "rejected": "c"})");
  put("jsonl_rows", "deep_message_content.jsonl",
      R"({"prompt": [{"role": "user", "content": )" + std::string(300, '[') + std::string(300, ']') +
          R"(}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]})");
  put("llama_config", "deep_key.json", R"({"hidden_size": 64, "x": )" + deep + "}");
  put("adapter_config", "deep_key.json", R"({"r": 4, "target_modules": ["q_proj"], "x": )" + deep + "}");
  put("quant_state", "deep_key.bin", std::string("\x00\x3f", 2) + R"({"quant_type": "nf4", "x": )" + deep + "}");
  const std::string header = R"({"x": )" + deep + "}";
  std::string len(8, '\0');
  for (int i = 0; i < 8; ++i) len[i] = static_cast<char>((uint64_t(header.size()) >> (8 * i)) & 0xff);
  put("safetensors", "deep_header.safetensors", len + header);
}

// The structured mode of fuzz_preference_h5 (even first byte): the values the harness
// writes, in its order. A valid two-example file, then the same with /ref_logps.
std::string h5_structured_seed(bool ref) {
  std::string s;
  auto u8 = [&](int v) { s += static_cast<char>(v & 0xff); };
  auto i16 = [&](int v) { u8(v), u8(v >> 8); };
  u8(0);                 // mode: structured
  u8(ref ? 16 : 0), u8(0);  // flags, flags2
  u8(2);                 // num_examples
  i16(32);               // vocab_size
  i16(1), i16(2), i16(0);  // bos, eos, pad
  i16(16), i16(8);       // max_length, max_prompt_length
  for (int g = 0; g < 3; ++g) {
    u8(0);                        // column flags
    u8(3), i16(0), i16(2), i16(3);  // offsets 0, 2, 5
    u8(5);
    for (int t : {1, 5, 6, 7, 2}) i16(t);
  }
  if (ref)
    for (int k = 0; k < 2; ++k) u8(2), u8(12), u8(20);  // two values each: -1.5, -2.5
  return s;
}

void h5_seeds(const fs::path& tmp) {
  put("preference_h5", "structured_two.bin", h5_structured_seed(false));
  put("preference_h5", "structured_two_ref.bin", h5_structured_seed(true));
  dpo::PreferenceAttrs a;
  a.vocab_size = 32;
  a.bos_id = 1;
  a.eos_id = 2;
  a.pad_id = 0;
  a.tokenizer_sha256 = std::string(64, 'a');
  a.max_length = 16;
  a.max_prompt_length = 8;
  a.source = {"train.jsonl"};
  dpo::PreferenceWriterOptions o;
  o.chunk_tokens = 8;
  o.chunk_offsets = 4;
  o.deflate_level = 0;  // uncompressed: mutations reach offsets, ids and attributes
  const fs::path f = tmp / "p.h5";
  for (int variant = 0; variant < 3; ++variant) {
    {
      dpo::PreferenceWriter w(f.string(), a, variant == 2 ? dpo::PreferenceWriterOptions{} : o);
      w.append({1, 5, 6}, {7, 2}, {8, 9, 2});
      w.append({1, 10}, {11, 12, 13, 2}, {14});
      if (variant > 0) w.append({1}, {3, 2}, {4, 2});
      w.close();
    }
    std::string name = variant == 0 ? "two.h5" : variant == 1 ? "three_ref.h5" : "three_deflate.h5";
    if (variant == 1) dpo::write_ref_logps(f.string(), {-1.5, -2.0, -0.25}, {-3.0, -1.0, -4.5});
    put("preference_h5", "raw_" + name, std::string(1, '\x01') + slurp(f));  // odd first byte: raw file mode
  }
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR (tests/fuzz/corpus)\n", argv[0]);
    return 2;
  }
  try {
    g_root = argv[1];
    const fs::path tmp = fs::temp_directory_path() / ("dpo_fuzz_seeds_" + std::to_string(::getpid()));
    fs::create_directories(tmp);
    safetensors_seeds(tmp);
    llama_seeds();
    adapter_seeds();
    quant_state_seeds();
    cli_seeds();
    jsonl_seeds();
    hostile_json_seeds();
    h5_seeds(tmp);
    fs::remove_all(tmp);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fuzz_make_seeds: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
