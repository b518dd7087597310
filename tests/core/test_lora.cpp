// LoRA adapters on FrozenLinear: exact base output at init and when disabled,
// scaling, dropout, init statistics, PEFT files, merge.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/linear.h"
#include "core/lora.h"
#include "core/safetensors.h"
#include "tests/fp_bounds.h"
#include "tests/test_util.h"

namespace dpo {
namespace {

using dpo::testutil::TempDir;
using dpo::testutil::throw_message;

namespace fs = std::filesystem;

QuantOptions nf4_opts() {
  QuantOptions q;
  q.load_in_4bit = true;
  return q;
}

FrozenLinear make_linear(int64_t in, int64_t out, bool nf4, uint64_t seed = 1) {
  torch::manual_seed(seed);
  FrozenLinear lin(in, out);
  lin->set_weight(torch::randn({out, in}), nf4 ? nf4_opts() : QuantOptions{});
  return lin;
}

// Two tiny decoder layers' seven projections, named as the Llama model names them.
NamedLinears make_model(bool nf4, int64_t layers = 2) {
  const int64_t h = 64, kv = 32, inter = 96;
  NamedLinears named;
  uint64_t seed = 10;
  for (int64_t l = 0; l < layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l);
    named.emplace_back(p + ".self_attn.q_proj", make_linear(h, h, nf4, seed++));
    named.emplace_back(p + ".self_attn.k_proj", make_linear(h, kv, nf4, seed++));
    named.emplace_back(p + ".self_attn.v_proj", make_linear(h, kv, nf4, seed++));
    named.emplace_back(p + ".self_attn.o_proj", make_linear(h, h, nf4, seed++));
    named.emplace_back(p + ".mlp.gate_proj", make_linear(h, inter, nf4, seed++));
    named.emplace_back(p + ".mlp.up_proj", make_linear(h, inter, nf4, seed++));
    named.emplace_back(p + ".mlp.down_proj", make_linear(inter, h, nf4, seed++));
  }
  return named;
}


// y = x W^T + s (x A^T) B^T computed as is, and x W'^T with the merged W' = W + s B A, are
// each within gamma(I + r + 2) M of the exact value, M = |x| |W|^T + s (|x| |A|^T) |B|^T
// (I = in_features, r = rank): the products are I- and r-term sums (Higham eq. (3.13)),
// the merge and the final addition add a scaling and a sum (tests/fp_bounds.h). Two such
// evaluations: twice that.
torch::Tensor adapter_bound(const torch::Tensor& x, const FrozenLinear& lin) {
  const torch::Tensor M = testutil::abs_product(x, lin->dense_weight().t()) +
                          lin->lora_scaling() * testutil::abs_product(testutil::abs_product(x, lin->lora_A().t()),
                                                                      lin->lora_B().t());
  return 2 * testutil::gamma(static_cast<double>(lin->in_features() + lin->lora_A().size(0) + 2)) * M;
}

void expect_throw_with(const std::function<void()>& f, const std::vector<std::string>& needles) {
  try {
    f();
    ADD_FAILURE() << "no exception; expected one mentioning " << needles.front();
  } catch (const std::runtime_error& e) {
    for (const auto& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what();
  }
}

TEST(Lora, ZeroBGivesExactlyTheBaseOutput) {
  for (bool nf4 : {false, true}) {
    FrozenLinear lin = make_linear(64, 32, nf4);
    const torch::Tensor x = torch::randn({3, 64});
    const torch::Tensor base = lin->forward(x);
    LoraConfig cfg;
    lin->add_lora(cfg, uint64_t{42});
    ASSERT_TRUE(lin->has_lora());
    EXPECT_TRUE(torch::all(lin->lora_B() == 0).item<bool>());
    // Exact: B = 0 makes the adapter's term exact zeros, and y + 0 is y.
    lin->train();
    EXPECT_TRUE(torch::equal(lin->forward(x), base));
    lin->eval();
    EXPECT_TRUE(torch::equal(lin->forward(x), base));
  }
}

TEST(Lora, DisabledAdapterGivesTheBaseOutputAfterTraining) {
  FrozenLinear lin = make_linear(64, 32, true);
  const torch::Tensor x = torch::randn({3, 64});
  const torch::Tensor base = lin->forward(x);
  lin->add_lora(LoraConfig{}, uint64_t{1});
  lin->eval();
  {
    torch::NoGradGuard ng;
    lin->lora_B().normal_();
  }
  EXPECT_FALSE(torch::allclose(lin->forward(x), base));
  lin->set_lora_enabled(false);
  EXPECT_TRUE(torch::equal(lin->forward(x), base));  // exact: the base path alone, as before
  lin->set_lora_enabled(true);
  EXPECT_FALSE(torch::allclose(lin->forward(x), base));
}

TEST(Lora, ScalingAlphaOverROrSqrtR) {
  for (bool rs : {false, true}) {
    FrozenLinear lin = make_linear(64, 32, false);
    LoraConfig cfg;
    cfg.r = 4;
    cfg.alpha = 32;
    cfg.use_rslora = rs;
    lin->add_lora(cfg, uint64_t{3});
    lin->eval();
    const double want = rs ? 32.0 / 2.0 : 32.0 / 4.0;
    EXPECT_DOUBLE_EQ(lin->lora_scaling(), want);
    {
      torch::NoGradGuard ng;
      lin->lora_B().normal_();
    }
    const torch::Tensor x = torch::randn({5, 64});
    const torch::Tensor y = lin->forward(x);
    const torch::Tensor delta = y - torch::matmul(x, lin->dense_weight().t());
    const torch::Tensor expect = torch::matmul(torch::matmul(x, lin->lora_A().t()), lin->lora_B().t()) * want;
    // The forward computes its base product and its adapter term with these same ops on the
    // same values (bit for bit); only y = base + term and y - base round: u |y| + u |delta|.
    const double u = testutil::unit_roundoff(torch::kFloat32);
    testutil::expect_within(delta, expect, u * (y.abs() + delta.abs()).to(torch::kFloat64), rs ? "rslora" : "lora");
  }
}

TEST(Lora, DropoutOnlyInTrainingModeAndReplayable) {
  FrozenLinear lin = make_linear(64, 32, false);
  LoraConfig cfg;
  cfg.dropout = 0.5;
  lin->add_lora(cfg, uint64_t{4});
  {
    torch::NoGradGuard ng;
    lin->lora_B().normal_();
  }
  const torch::Tensor x = torch::randn({8, 64});
  const torch::Tensor closed = torch::matmul(x, lin->dense_weight().t()) +
                               torch::matmul(torch::matmul(x, lin->lora_A().t()), lin->lora_B().t()) * lin->lora_scaling();
  lin->eval();
  // Exact: without dropout the forward runs the closed form's ops on the same values.
  EXPECT_TRUE(torch::equal(lin->forward(x), closed));
  EXPECT_TRUE(torch::equal(lin->forward(x), lin->forward(x)));
  lin->train();
  torch::manual_seed(123);
  const torch::Tensor t1 = lin->forward(x);
  const torch::Tensor t2 = lin->forward(x);
  EXPECT_FALSE(torch::allclose(t1, closed, 1e-3, 1e-3));
  EXPECT_FALSE(torch::equal(t1, t2));
  torch::manual_seed(123);  // activation checkpointing replays by restoring the default generator
  EXPECT_TRUE(torch::equal(lin->forward(x), t1));
}

TEST(Lora, InitIsKaimingUniformA5AndDeterministic) {
  FrozenLinear lin = make_linear(400, 16, false);
  LoraConfig cfg;
  cfg.r = 64;
  lin->add_lora(cfg, uint64_t{5});
  const torch::Tensor A = lin->lora_A();
  EXPECT_EQ(A.sizes(), (std::vector<int64_t>{64, 400}));
  EXPECT_EQ(lin->lora_B().sizes(), (std::vector<int64_t>{16, 64}));
  const double bound = 1.0 / std::sqrt(400.0);  // sqrt(3) * sqrt(2 / (1 + 5)) / sqrt(fan_in)
  EXPECT_LE(A.abs().max().item<double>(), bound);
  EXPECT_GE(A.abs().max().item<double>(), 0.99 * bound);
  // Statistical, 25600 uniform draws: the mean's standard error is bound / sqrt(3 * 25600)
  // = 0.0036 bound (0.02 bound: 5.5 of them), the variance's sqrt(4 / 45 / 25600) bound^2
  // = 0.0019 bound^2 (0.01 bound^2: 5.4 of them).
  EXPECT_NEAR(A.mean().item<double>(), 0.0, 0.02 * bound);
  EXPECT_NEAR(A.var().item<double>(), bound * bound / 3.0, 0.03 * bound * bound / 3.0);
  EXPECT_TRUE(A.requires_grad());
  EXPECT_TRUE(lin->lora_B().requires_grad());
  FrozenLinear other = make_linear(400, 16, false);
  other->add_lora(cfg, uint64_t{5});
  EXPECT_TRUE(torch::equal(other->lora_A(), A));
  other->add_lora(cfg, uint64_t{6});
  EXPECT_FALSE(torch::equal(other->lora_A(), A));
  // Only the adapter is trainable / registered.
  const auto params = lin->named_parameters();
  EXPECT_EQ(params.size(), 2u);
  EXPECT_TRUE(params.contains("lora_A"));
  EXPECT_TRUE(params.contains("lora_B"));
}

TEST(Lora, AttachTargetsNamesAndIsDeterministic) {
  NamedLinears a = make_model(true), b = make_model(true);
  LoraConfig cfg;  // q_proj, v_proj
  EXPECT_EQ(lora_attach(a, cfg, 7), 4);
  EXPECT_EQ(lora_attach(b, cfg, 7), 4);
  for (size_t i = 0; i < a.size(); ++i) {
    const std::string type = lora_module_type(a[i].first);
    EXPECT_EQ(a[i].second->has_lora(), type == "q_proj" || type == "v_proj") << a[i].first;
    if (a[i].second->has_lora()) {
      EXPECT_TRUE(torch::equal(a[i].second->lora_A(), b[i].second->lora_A()));
    }
  }
  // Different modules draw different values from the one generator.
  EXPECT_FALSE(torch::equal(a[0].second->lora_A(), a[7].second->lora_A()));
  const auto params = lora_parameters(a);
  ASSERT_EQ(params.size(), 8u);
  EXPECT_EQ(params[0].first, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
  EXPECT_EQ(params[1].first, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight");
  EXPECT_EQ(params[2].first, "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight");
  EXPECT_TRUE(params[0].second.is_same(a[0].second->lora_A()));

  NamedLinears c = make_model(false, 1);
  LoraConfig all;
  all.target_modules = {"all-linear"};
  EXPECT_EQ(lora_attach(c, all, 1), 7);
  LoraConfig unknown;
  unknown.target_modules = {"q_proj", "lm_head"};
  expect_throw_with([&] { lora_attach(make_model(false, 1), unknown, 1); }, {"lm_head"});
  NamedLinears only_q(c.begin(), c.begin() + 1);
  expect_throw_with([&] { lora_attach(only_q, LoraConfig{}, 1); }, {"v_proj", "matches none"});
  LoraConfig bad;
  bad.r = 0;
  expect_throw_with([&] { lora_attach(c, bad, 1); }, {"lora_r"});
}

TEST(Lora, GradientsReachOnlyTheAdapter) {
  FrozenLinear lin = make_linear(64, 32, true);
  LoraConfig cfg;
  cfg.dropout = 0.0;
  lin->add_lora(cfg, uint64_t{9});
  const torch::Tensor x = torch::randn({6, 64}).requires_grad_(true);
  const torch::Tensor g = torch::randn({6, 32});
  lin->forward(x).backward(g);
  // y = xW^T + s (x A^T) B^T  =>  dL/dB = s g^T (x A^T); dL/dA = s B^T g^T x = 0 while B = 0.
  const torch::Tensor xa = torch::matmul(x.detach(), lin->lora_A().detach().t());
  // The same x A^T both sides (the same op on the same values); s g^T xa scaled before or after
  // the 6-term product: gamma(7) s |g|^T |xa| each, twice between them.
  const double s = lin->lora_scaling();
  testutil::expect_within(lin->lora_B().grad(), torch::matmul(g.t(), xa) * s,
                          2 * s * testutil::gamma(7) * testutil::abs_product(g.t(), xa), "dB");
  EXPECT_TRUE(torch::all(lin->lora_A().grad() == 0).item<bool>());
  // B = 0 adds an exact 0 to g W: linear4bit's blocked product vs torch::matmul, twice gamma(32) |g| |W|.
  const torch::Tensor wd = lin->dense_weight();
  testutil::expect_within(x.grad(), torch::matmul(g, wd), 2 * testutil::matmul_error_bound(g, wd), "dx");
}

TEST(Lora, MergedWeightForwardEqualsAdapterForward) {
  for (bool nf4 : {false, true}) {
    NamedLinears named = make_model(nf4, 1);
    LoraConfig cfg;
    cfg.target_modules = {"all-linear"};
    lora_attach(named, cfg, 11);
    const torch::Tensor x = torch::randn({4, 64});
    std::vector<torch::Tensor> before;
    for (auto& [name, lin] : named) {
      lin->eval();
      torch::NoGradGuard ng;
      lin->lora_B().normal_(0, 0.1);
      const torch::Tensor in = lin->in_features() == 64 ? x : torch::randn({4, lin->in_features()});
      before.push_back(lin->forward(in));
      testutil::expect_within(torch::matmul(in, lin->merged_weight(torch::kFloat32).t()), before.back(),
                              adapter_bound(in, lin), name);
    }
    torch::manual_seed(0);
    std::vector<torch::Tensor> inputs, bounds;
    for (auto& [name, lin] : named) inputs.push_back(torch::randn({4, lin->in_features()}));
    std::vector<torch::Tensor> adapter_out;
    for (size_t i = 0; i < named.size(); ++i) {
      adapter_out.push_back(named[i].second->forward(inputs[i]).detach());
      bounds.push_back(adapter_bound(inputs[i], named[i].second));
    }
    lora_merge(named);
    for (size_t i = 0; i < named.size(); ++i) {
      EXPECT_FALSE(named[i].second->has_lora());
      EXPECT_FALSE(named[i].second->is_4bit());
      EXPECT_TRUE(named[i].second->parameters().empty());
      testutil::expect_within(named[i].second->forward(inputs[i]), adapter_out[i], bounds[i], named[i].first);
    }
  }
}

TEST(LoraPeft, SaveLoadRoundTripAndConfigKeys) {
  TempDir tmp;
  NamedLinears a = make_model(true);
  LoraConfig cfg;
  cfg.r = 4;
  cfg.alpha = 16;
  cfg.dropout = 0.05;
  cfg.target_modules = {"q_proj", "v_proj", "down_proj"};
  lora_attach(a, cfg, 12);
  for (auto& [n, lin] : a)
    if (lin->has_lora()) {
      torch::NoGradGuard ng;
      lin->lora_B().normal_();
    }
  const std::string dir = (fs::path(tmp.path()) / "adapter").string();
  lora_save_peft(a, cfg, dir, "meta-llama/Llama-2-7b-hf");
  ASSERT_TRUE(fs::exists(fs::path(dir) / "adapter_model.safetensors"));
  ASSERT_TRUE(fs::exists(fs::path(dir) / "adapter_config.json"));
  for (const auto& e : fs::directory_iterator(dir))
    EXPECT_EQ(e.path().filename().string().find(".tmp"), std::string::npos) << e.path();

  std::ifstream in(fs::path(dir) / "adapter_config.json");
  std::stringstream ss;
  ss << in.rdbuf();
  const nlohmann::json j = nlohmann::json::parse(ss.str());
  EXPECT_EQ(j["peft_type"], "LORA");
  EXPECT_EQ(j["task_type"], "CAUSAL_LM");
  EXPECT_EQ(j["r"], 4);
  EXPECT_TRUE(j["lora_alpha"].is_number_integer());
  EXPECT_EQ(j["lora_alpha"], 16);
  EXPECT_DOUBLE_EQ(j["lora_dropout"].get<double>(), 0.05);
  EXPECT_EQ(j["target_modules"], nlohmann::json({"q_proj", "v_proj", "down_proj"}));
  EXPECT_EQ(j["bias"], "none");
  EXPECT_EQ(j["use_rslora"], false);
  EXPECT_EQ(j["base_model_name_or_path"], "meta-llama/Llama-2-7b-hf");
  EXPECT_EQ(j["fan_in_fan_out"], false);
  EXPECT_EQ(j["inference_mode"], true);
  EXPECT_TRUE(j["modules_to_save"].is_null());
  EXPECT_TRUE(j.contains("init_lora_weights"));
  EXPECT_TRUE(j.contains("layers_to_transform"));
  EXPECT_TRUE(j.contains("rank_pattern"));
  EXPECT_TRUE(j.contains("alpha_pattern"));

  SafetensorsFile f((fs::path(dir) / "adapter_model.safetensors").string());
  EXPECT_EQ(f.names().size(), 12u);  // 2 layers x 3 modules x (A, B)
  EXPECT_TRUE(f.has("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"));
  EXPECT_EQ(f.shape("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"), (std::vector<int64_t>{4, 96}));
  EXPECT_EQ(f.shape("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"), (std::vector<int64_t>{64, 4}));
  EXPECT_EQ(f.metadata().at("format"), "pt");

  NamedLinears b = make_model(true);  // no adapters yet: loading attaches them
  const LoraConfig got = lora_load_peft(b, dir);
  EXPECT_EQ(got.r, 4);
  EXPECT_EQ(got.alpha, 16);
  EXPECT_EQ(got.target_modules, cfg.target_modules);
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].second->has_lora(), b[i].second->has_lora()) << a[i].first;
    if (!a[i].second->has_lora()) continue;
    EXPECT_TRUE(torch::equal(a[i].second->lora_A(), b[i].second->lora_A()));
    EXPECT_TRUE(torch::equal(a[i].second->lora_B(), b[i].second->lora_B()));
    EXPECT_EQ(a[i].second->lora_scaling(), b[i].second->lora_scaling());
  }
  EXPECT_EQ(lora_config_load(dir).dropout, 0.05);
  // A target named twice is one target, as PEFT keeps the list as a set (fuzz finding
  // tests/fuzz/regressions/adapter_config/duplicate_target_modules_c922e9b8).
  nlohmann::json j2 = j;
  j2["target_modules"] = {"v_proj", "q_proj", "v_proj"};
  std::ofstream(fs::path(dir) / "adapter_config.json") << j2.dump();
  EXPECT_EQ(lora_config_load(dir).target_modules, (std::vector<std::string>{"v_proj", "q_proj"}));
  // PEFT 0.22 records a tied model's table under its short and its path name: one module
  // (found by tests/interop/test_peft.py); another path's last component must still be a
  // supported module.
  j2["modules_to_save"] = {"embed_tokens", "model.embed_tokens"};
  std::ofstream(fs::path(dir) / "adapter_config.json") << j2.dump();
  EXPECT_EQ(lora_config_load(dir).modules_to_save, (std::vector<std::string>{"embed_tokens"}));
  j2["modules_to_save"] = {"model.layers.0.mlp"};
  std::ofstream(fs::path(dir) / "adapter_config.json") << j2.dump();
  expect_throw_with([&] { lora_config_load(dir); }, {"adapter_config.json", "model.layers.0.mlp", "not supported"});
}

TEST(LoraPeft, LoadValidationNamesKeyAndFile) {
  TempDir tmp;
  NamedLinears a = make_model(false, 1);
  LoraConfig cfg;
  lora_attach(a, cfg, 13);
  const std::string dir = (fs::path(tmp.path()) / "ok").string();
  lora_save_peft(a, cfg, dir, "base");
  const std::string weights = (fs::path(dir) / "adapter_model.safetensors").string();
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  {
    SafetensorsFile f(weights);
    for (const auto& n : f.names()) tensors.emplace_back(n, f.get(n).clone());
  }
  const std::string qa = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";

  auto write_variant = [&](const std::string& name, std::vector<std::pair<std::string, torch::Tensor>> t) {
    const fs::path d = fs::path(tmp.path()) / name;
    fs::create_directories(d);
    fs::copy_file(fs::path(dir) / "adapter_config.json", d / "adapter_config.json");
    safetensors_save((d / "adapter_model.safetensors").string(), t);
    return d.string();
  };
  {
    auto t = tensors;
    t.erase(std::remove_if(t.begin(), t.end(), [&](auto& p) { return p.first == qa; }), t.end());
    const std::string d = write_variant("missing", t);
    expect_throw_with([&] { lora_load_peft(make_model(false, 1), d); }, {qa, "missing", "adapter_model.safetensors"});
  }
  {
    auto t = tensors;
    t.emplace_back("base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight", torch::zeros({8, 64}));
    const std::string d = write_variant("extra", t);
    expect_throw_with([&] { lora_load_peft(make_model(false, 1), d); },
                      {"k_proj.lora_A.weight", "unexpected", "adapter_model.safetensors"});
  }
  {
    auto t = tensors;
    for (auto& p : t)
      if (p.first == qa) p.second = torch::zeros({8, 65});
    const std::string d = write_variant("shape", t);
    expect_throw_with([&] { lora_load_peft(make_model(false, 1), d); }, {qa, "shape", "(8, 64)"});
  }
  {
    NamedLinears m = make_model(false, 1);
    LoraConfig r4;
    r4.r = 4;
    lora_attach(m, r4, 1);
    expect_throw_with([&] { lora_load_peft(m, dir); }, {"rank 4", "r=8"});
  }
  {
    NamedLinears m = make_model(false, 1);
    LoraConfig other;
    other.target_modules = {"q_proj", "v_proj", "k_proj"};
    lora_attach(m, other, 1);
    expect_throw_with([&] { lora_load_peft(m, dir); }, {"k_proj", "target_modules"});
  }
  {
    const fs::path d = fs::path(tmp.path()) / "dora";
    fs::create_directories(d);
    fs::copy_file(weights, d / "adapter_model.safetensors");
    nlohmann::json j = nlohmann::json::parse(lora_config_json(cfg, "base"));
    j["use_dora"] = true;
    std::ofstream(d / "adapter_config.json") << j.dump();
    expect_throw_with([&] { lora_config_load(d.string()); }, {"adapter_config.json", "use_dora"});
    j["use_dora"] = false;
    j["target_modules"] = ".*q_proj";
    std::ofstream(d / "adapter_config.json") << j.dump();
    expect_throw_with([&] { lora_config_load(d.string()); }, {"adapter_config.json", "target_modules"});
    j["target_modules"] = {"q_proj", "lm_head"};
    std::ofstream(d / "adapter_config.json") << j.dump();
    expect_throw_with([&] { lora_config_load(d.string()); }, {"adapter_config.json", "lm_head"});
    // Valid JSON nested 10^5 levels deep (issue 28): one line naming the file and the limit.
    j["target_modules"] = {"q_proj"};
    std::string text = j.dump();
    text.insert(1, "\"x\":" + std::string(100000, '[') + std::string(100000, ']') + ",");
    std::ofstream(d / "adapter_config.json") << text;
    EXPECT_EQ(throw_message([&] { lora_config_load(d.string()); }),
              (d / "adapter_config.json").string() +
                  ": JSON nested deeper than 512 levels (the limit of every JSON reader here)");
  }
  expect_throw_with([&] { lora_config_load((fs::path(tmp.path()) / "nowhere").string()); }, {"adapter_config.json"});
  // A save whose config does not match the attached adapters is refused.
  LoraConfig more;
  more.target_modules = {"q_proj", "v_proj", "o_proj"};
  expect_throw_with([&] { lora_save_peft(a, more, (fs::path(tmp.path()) / "bad").string(), "base"); }, {"o_proj"});
}

}  // namespace
}  // namespace dpo
