// dpo_merge: base model + PEFT adapter -> merged Hugging Face model directory
// (W + scaling * B A, dequantized from the 4-bit base the adapter was trained
// on unless --load_in_4bit false), with the adapter's modules_to_save copies of
// embed_tokens / lm_head in place of the originals, in the requested dtype; loads with
// transformers and with dpo_dist (e.g. the DPO stage after SFT).
#include <filesystem>
#include <iostream>

#include "core/modules_to_save.h"
#include "launch/cli.h"
#include "launch/model_setup.h"
#include "runtime/threads.h"

using namespace dpo;
namespace fs = std::filesystem;

int main(int argc, char** argv) {
  return run_main("dpo_merge", [&] {
    Cli cli("dpo_merge", "Merge a PEFT LoRA adapter into its base model and write a Hugging Face model directory.");
    add_model_options(cli, "base Hugging Face Llama directory (with --load_in_4bit false the adapter is merged onto the original weights)");
    cli.add_string("adapter", "", "PEFT adapter directory");
    cli.add_string("output_dir", "", "merged model directory to write");
    cli.add_string("torch_dtype", "float32", "float32|float16|bfloat16 (stored dtype)");
    cli.add_string("max_shard_size", "0", "largest shard, as transformers' save_pretrained: 5GB, 500MB, 200KB or bytes (0 = one file)");
    cli.add_int("threads", 0, "compute threads (0 = all cores)");
    if (!cli.parse(argc, argv)) return 0;
    const std::string adapter = cli.get_string("adapter"), out = cli.get_string("output_dir");
    if (adapter.empty()) throw CliError("option --adapter is required");
    if (out.empty()) throw CliError("option --output_dir is required");
    const std::string dt = cli.get_string("torch_dtype");
    const torch::ScalarType dtype = storage_dtype_from(dt, "--torch_dtype");
    configure_threads(static_cast<int>(cli.get_int("threads")), 1);
    limit_heap_retention();
    const ModelSetupOptions mo = model_options_from(cli);
    LoadedModel m = load_model(mo);
    attach_peft_adapter(m, adapter);
    lora_merge(m.projections);
    modules_to_save_merge(m.model);  // trained embed_tokens / lm_head copies, if the adapter has them
    llama_save_hf(m.model, out, dtype, parse_size(cli.get_string("max_shard_size"), "--max_shard_size"));
    if (fs::exists(m.tokenizer_path))
      fs::copy_file(m.tokenizer_path, fs::path(out) / fs::path(m.tokenizer_path).filename(),
                    fs::copy_options::overwrite_existing);
    for (const char* f : {"tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"})
      if (fs::exists(fs::path(mo.model_dir) / f))
        fs::copy_file(fs::path(mo.model_dir) / f, fs::path(out) / f, fs::copy_options::overwrite_existing);
    std::cout << "merged " << adapter << " into " << mo.model_dir << " -> " << out << " (" << dt << ")\n";
    return 0;
  });
}
