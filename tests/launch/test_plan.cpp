// dpo_dist --dry_run: the memory estimate against shapes worked out by hand, and the
// real tool on configs/llama2-7b-dpo.ini with a config.json of Llama-2-7B's shape (no
// weights) and a small preference file: the plan in well under 5 s, nothing loaded.
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "data/preference_h5.h"
#include "launch/plan.h"
#include "tests/test_util.h"

namespace dpo {
namespace {

namespace fs = std::filesystem;

const char* kLlama2_7b = R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
  "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
  "vocab_size": 32000, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "max_position_embeddings": 4096,
  "hidden_act": "silu", "tie_word_embeddings": false, "torch_dtype": "float16", "bos_token_id": 1,
  "eos_token_id": 2})";

TEST(DryRun, MemoryEstimateOfLlama2_7bShapes) {
  const LlamaConfig c = llama_config_from_json(nlohmann::json::parse(kLlama2_7b));
  TrainOptions o;
  o.load_in_4bit = true;
  o.bnb_4bit_use_double_quant = true;
  o.lora_r = 8;
  o.lora_target_modules = {"q_proj", "k_proj", "v_proj"};
  o.gradient_checkpointing = true;
  const MemoryEstimate m = estimate_memory(c, o, /*rows=*/8, /*T=*/1024, /*compute_bytes=*/4);
  // 32 layers x (4 x 4096^2 + 3 x 4096 x 11008) = 6,476,005,376 quantized weights:
  // 4 bits each, one 8-bit absmax per 64, one fp32 per 256 blocks;
  // + embed_tokens and lm_head (2 x 32000 x 4096) in the checkpoint's float16 (kept so
  // under fp32 compute: llama_table_dtype) and 65 norms of 4096 in fp32.
  const double q = 6476005376.0;
  const double want_base = q / 2 + q / 64 + q / 64 / 256 * 4 + 2 * 32000.0 * 4096 * 2 + 65 * 4096.0 * 4;
  EXPECT_NEAR(m.base_weights, want_base, 1.0);
  EXPECT_NEAR(m.base_weights, 3.87e9, 0.01e9);
  // A float32 checkpoint keeps fp32 tables: 2 x 32000 x 4096 x 2 bytes more.
  LlamaConfig c32 = c;
  c32.torch_dtype = torch::kFloat32;
  EXPECT_NEAR(estimate_memory(c32, o, 8, 1024, 4).base_weights - m.base_weights, 2 * 32000.0 * 4096 * 2, 1.0);
  // LoRA r 8 on q, k, v: 32 x 3 x 8 x (4096 + 4096) = 6,291,456 parameters (PEFT's count).
  EXPECT_EQ(m.lora_parameters, 6291456);
  EXPECT_DOUBLE_EQ(m.adapters, 6291456.0 * 16);
  // logits (8, 1024, 32000) fp32 and their gradient
  EXPECT_DOUBLE_EQ(m.logits, 2.0 * 8 * 1024 * 32000 * 4);
  // without checkpointing the activations of every layer stay: more
  o.gradient_checkpointing = false;
  EXPECT_GT(estimate_memory(c, o, 8, 1024, 4).activations, 10 * m.activations);
  // without double quantization: fp32 absmax per 64
  o.bnb_4bit_use_double_quant = false;
  EXPECT_NEAR(estimate_memory(c, o, 8, 1024, 4).base_weights - want_base, q / 64 * 4 - q / 64 - q / 64 / 256 * 4, 1.0);
  EXPECT_EQ(format_bytes(4.39e9), "4.39 GB");
}

TEST(DryRun, PlansThe7bConfigInSecondsWithoutWeights) {
  testutil::TempDir dir("dpo_dry_run");
  const std::string model = dir.file("llama2-7b");
  fs::create_directories(model);
  testutil::write_file(model + "/config.json", kLlama2_7b);  // no weights, no tokenizer
  PreferenceAttrs a;
  a.vocab_size = 32000;
  a.bos_id = 1;
  a.eos_id = 2;
  a.pad_id = 2;
  a.tokenizer_sha256 = std::string(64, '0');
  a.max_length = 1024;
  a.max_prompt_length = 512;
  a.source = {"dry run test"};
  const std::string h5 = dir.file("rl.h5");
  {
    PreferenceWriter w(h5, a);
    for (int i = 0; i < 100; ++i) {
      // prompt 1 + 20 + i, chosen 10 + i, rejected 30: 2p + c + r = 2(21 + i) + 10 + i + 30
      std::vector<int32_t> p(21 + i, 5), c(10 + i, 6), r(30, 7);
      w.append(p, c, r);
    }
    w.close();
  }
  const std::string out = dir.file("out");
  fs::create_directories(out + "/checkpoint-200");
  testutil::write_file(out + "/checkpoint-200/trainer_state.json", "{\"global_step\": 200}");
  const std::string cmd = testutil::tool_path("dpo_dist") + " --config " + testutil::source_dir() +
                          "/configs/llama2-7b-dpo.ini --model_name_or_path " + model + " --train_file " + h5 +
                          " --eval_file '' --output_dir " + out + " --resume_from_checkpoint auto --backend fake --dry_run";
  std::string output;
  // CPU seconds of the child (wall time on a loaded shared machine says little); the
  // wall time is printed.
  auto child_cpu = [] {
    rusage u{};
    getrusage(RUSAGE_CHILDREN, &u);
    return u.ru_utime.tv_sec + u.ru_stime.tv_sec + 1e-6 * (u.ru_utime.tv_usec + u.ru_stime.tv_usec);
  };
  const double cpu0 = child_cpu();
  const auto t0 = std::chrono::steady_clock::now();
  const int rc = testutil::run_command(cmd, &output);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double cpu = child_cpu() - cpu0;
  ASSERT_EQ(rc, 0) << output;
  std::printf("dry run of the 7B config: %.2f s wall, %.2f s CPU\n", secs, cpu);
  EXPECT_LT(cpu, 5.0) << output;
  // per_device 4 x accumulation 4 x 1 rank = 16; 100 examples -> 7 steps per epoch; max_steps 1000
  EXPECT_NE(output.find("global batch  16 = 4 pairs/micro-batch x 4 accumulation x 1 ranks"), std::string::npos) << output;
  EXPECT_NE(output.find("1000 optimizer steps, 7 per epoch = 143 epochs"), std::string::npos) << output;
  // mean of 2(21 + i) + 10 + i + 30 over i < 100 = 82 + 3 * 49.5 = 230.5 tokens per example; x 16
  EXPECT_NE(output.find("tokens/step   3688 on average (230.5 per example"), std::string::npos) << output;
  // longest padded row: prompt 120 + max(chosen 109, rejected 30)
  EXPECT_NE(output.find("longest padded row 229 tokens"), std::string::npos) << output;
  EXPECT_NE(output.find("32 layers, hidden 4096, intermediate 11008"), std::string::npos) << output;
  EXPECT_NE(output.find("6291456 trainable parameters"), std::string::npos) << output;
  EXPECT_NE(output.find("memory/rank   ~"), std::string::npos) << output;
  EXPECT_NE(output.find("resume        from " + out + "/checkpoint-200"), std::string::npos) << output;
  EXPECT_FALSE(fs::exists(out + "/training_args.json"));  // nothing written
}

TEST(DryRun, BadDataFileIsOneLineError) {
  testutil::TempDir dir("dpo_dry_run_bad");
  testutil::write_file(dir.file("config.json"), kLlama2_7b);
  const std::string cmd = testutil::tool_path("dpo_dist") + " --model_name_or_path " + dir.path() +
                          " --train_file " + dir.file("missing.h5") + " --output_dir " + dir.file("out") +
                          " --backend fake --dry_run";
  std::string output;
  EXPECT_NE(testutil::run_command(cmd, &output), 0);
  EXPECT_NE(output.find("missing.h5"), std::string::npos) << output;
}

}  // namespace
}  // namespace dpo
