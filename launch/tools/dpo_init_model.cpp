// dpo_init_model: writes a random Llama-family model (--architecture llama,
// mistral, qwen2 or qwen3) of a given shape in the Hugging Face layout
// (config.json + model.safetensors, optionally sharded), so tests, the demo and
// benchmarks have models without downloads. The weights are drawn as transformers
// initialises them (normal(0, 0.02), biases 0, norms 1).
#include <filesystem>
#include <iostream>

#include "core/llama.h"
#include "launch/cli.h"
#include "launch/model_setup.h"

using namespace dpo;

int main(int argc, char** argv) {
  return run_main("dpo_init_model", [&] {
    Cli cli("dpo_init_model", "Write a random Llama, Mistral, Qwen2 or Qwen3 model in the Hugging Face layout.");
    cli.add_string("output_dir", "", "directory to write (config.json, model.safetensors)");
    cli.add_string("architecture", "llama",
                   "llama|mistral|qwen2|qwen3 (qwen2: q/k/v biases; qwen3: q/k RMSNorm per head)");
    cli.add_int("head_dim", 0, "attention head size (0 = hidden_size / num_attention_heads)");
    cli.add_int("num_hidden_layers", 2, "decoder layers");
    cli.add_int("hidden_size", 64, "hidden size");
    cli.add_int("num_attention_heads", 4, "attention heads");
    cli.add_int("num_key_value_heads", 0, "key/value heads (0 = num_attention_heads; fewer = grouped-query attention)");
    cli.add_int("intermediate_size", 0, "MLP size (0 = the Llama rule: 256-multiple of 8/3 hidden)");
    cli.add_int("vocab_size", 32000, "vocabulary size (match the tokenizer)");
    cli.add_int("max_position_embeddings", 2048, "longest sequence");
    cli.add_double("rms_norm_eps", 1e-5, "RMSNorm epsilon");
    cli.add_double("rope_theta", 10000, "RoPE base");
    cli.add_bool("tie_word_embeddings", false,
                 "share embeddings with lm_head (when not given: true for qwen2/qwen3, as their small models; false for llama/mistral)");
    cli.add_int("bos_token_id", 1, "BOS id");
    cli.add_int("eos_token_id", 2, "EOS id");
    cli.add_int("seed", 0, "random seed");
    cli.add_string("torch_dtype", "float32", "float32|float16|bfloat16 (stored dtype)");
    cli.add_string("max_shard_size", "0", "largest shard, as transformers' save_pretrained: 5GB, 500MB, 200KB or bytes (0 = one file)");
    cli.add_string("tokenizer", "", "tokenizer.model to copy into the directory (optional)");
    if (!cli.parse(argc, argv)) return 0;
    const std::string out = cli.get_string("output_dir");
    if (out.empty()) throw CliError("option --output_dir is required");
    LlamaConfig c;
    try {
      c.arch = llama_arch_from_model_type(cli.get_string("architecture"));
    } catch (const std::exception& e) {
      throw CliError(std::string("option --architecture: ") + e.what());
    }
    const bool qwen = c.arch == LlamaArch::kQwen2 || c.arch == LlamaArch::kQwen3;
    c.qkv_bias = c.arch == LlamaArch::kQwen2;
    c.qk_norm = c.arch == LlamaArch::kQwen3;
    c.hidden_size = cli.get_int("hidden_size");
    c.num_hidden_layers = cli.get_int("num_hidden_layers");
    c.num_attention_heads = cli.get_int("num_attention_heads");
    c.num_key_value_heads = cli.get_int("num_key_value_heads") > 0 ? cli.get_int("num_key_value_heads") : c.num_attention_heads;
    int64_t inter = cli.get_int("intermediate_size");
    if (inter <= 0) inter = ((8 * c.hidden_size / 3) + 255) / 256 * 256;
    c.intermediate_size = inter;
    c.vocab_size = cli.get_int("vocab_size");
    c.max_position_embeddings = cli.get_int("max_position_embeddings");
    c.rms_norm_eps = cli.get_double("rms_norm_eps");
    c.rope_theta = cli.get_double("rope_theta");
    c.tie_word_embeddings = cli.given("tie_word_embeddings") ? cli.get_bool("tie_word_embeddings") : qwen;
    c.bos_token_id = cli.get_int("bos_token_id");
    c.eos_token_id = cli.get_int("eos_token_id");
    const std::string dt = cli.get_string("torch_dtype");
    const torch::ScalarType dtype = storage_dtype_from(dt, "--torch_dtype");
    c.torch_dtype = dtype;
    if (c.hidden_size <= 0 || c.num_hidden_layers <= 0 || c.num_attention_heads <= 0 || c.vocab_size <= 0)
      throw CliError("options --hidden_size, --num_hidden_layers, --num_attention_heads, --vocab_size must be > 0");
    c.head_dim = cli.get_int("head_dim");
    if (c.head_dim < 0 || c.head_dim % 2 != 0)
      throw CliError("option --head_dim must be 0 (hidden_size / num_attention_heads) or a positive even number");
    if (c.head_dim == 0 && c.hidden_size % c.num_attention_heads != 0)
      throw CliError("option --hidden_size (" + std::to_string(c.hidden_size) + ") must be divisible by --num_attention_heads (" +
                     std::to_string(c.num_attention_heads) + "), or give --head_dim");
    if (c.num_attention_heads % c.num_key_value_heads != 0)
      throw CliError("option --num_attention_heads must be divisible by --num_key_value_heads");
    if (c.head_dim == 0) c.head_dim = c.hidden_size / c.num_attention_heads;
    QuantOptions dense;  // written dense; the trainer quantizes when loading
    LlamaModel m = llama_init_random(c, static_cast<uint64_t>(cli.get_int("seed")), dense);
    llama_save_hf(m, out, dtype, parse_size(cli.get_string("max_shard_size"), "--max_shard_size"));
    const std::string tok = cli.get_string("tokenizer");
    if (!tok.empty()) {
      std::filesystem::copy_file(tok, out + "/tokenizer.model", std::filesystem::copy_options::overwrite_existing);
    }
    std::cout << "wrote " << out << ": " << llama_arch_class(c.arch) << ", " << c.num_hidden_layers << " layers, hidden " << c.hidden_size << ", heads "
              << c.num_attention_heads << "/" << c.num_key_value_heads << " x " << c.head_dim << ", intermediate " << c.intermediate_size
              << ", vocab " << c.vocab_size << (c.tie_word_embeddings ? ", tied" : "") << ", " << dt << "\n";
    return 0;
  });
}
