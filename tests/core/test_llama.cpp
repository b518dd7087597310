// Tests of core/llama and core/activation_checkpoint: logits of tiny models against an
// independent double-precision computation written from the math (plain loops
// over weights generated here), padding, sharded/single/F16/BF16 checkpoints,
// config.json and directory refusals, random init, HF saving, and gradient
// checkpointing (identical grads with a stochastic op in every layer).
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <set>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/autograd.h>
#include <torch/types.h>

#include "core/activation_checkpoint.h"
#include "core/llama.h"
#include "core/lora.h"
#include "core/safetensors.h"
#include "tests/fp_bounds.h"
#include "tests/proc_maps.h"
#include "tests/test_util.h"
#include "tests/tiny_llama.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

using dpo::testutil::TempDir;
using dpo::testutil::throw_message;



void write_text(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << text;
}

// ---- a tiny model, its weights as plain vectors ---------------------------

struct Spec {
  int64_t L = 2, C = 32, H = 4, K = 4, F = 48, V = 64;
  double eps = 1e-5, theta = 10000.0;
  bool tied = false;
  std::string arch = "llama";  // llama | mistral | qwen2 | qwen3 (config.json model_type)
  int64_t head_dim = 0;        // 0 = C / H
  bool qkv_bias = false;       // biases on q, k, v
  bool o_bias = false;         // bias on o_proj
  bool mlp_bias = false;       // biases on gate, up, down
  bool qk_norm = false;        // RMSNorm over each head of q and k before RoPE
  int64_t D() const { return head_dim ? head_dim : C / H; }
};

struct Weight {
  std::vector<int64_t> shape;
  std::vector<float> v;
  int64_t cols() const { return shape.size() == 2 ? shape[1] : 1; }
  float at(int64_t r, int64_t c) const { return v[r * cols() + c]; }
};
using Weights = std::map<std::string, Weight>;

Weights make_weights(const Spec& s, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  Weights w;
  auto mat = [&](const std::string& name, int64_t rows, int64_t cols, float std_dev) {
    Weight x{{rows, cols}, std::vector<float>(rows * cols)};
    for (auto& e : x.v) e = std_dev * n01(gen);
    w[name] = x;
  };
  auto norm = [&](const std::string& name, int64_t n) {
    Weight x{{n}, std::vector<float>(n)};
    for (auto& e : x.v) e = 1.0f + 0.2f * n01(gen);
    w[name] = x;
  };
  auto bias = [&](const std::string& name, int64_t n) {
    Weight x{{n}, std::vector<float>(n)};
    for (auto& e : x.v) e = 0.5f * n01(gen);
    w[name] = x;
  };
  const int64_t D = s.D();
  mat("model.embed_tokens.weight", s.V, s.C, 1.0f);
  for (int64_t l = 0; l < s.L; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const float in_c = 1.0f / std::sqrt(static_cast<float>(s.C));
    mat(p + "self_attn.q_proj.weight", s.H * D, s.C, in_c);
    mat(p + "self_attn.k_proj.weight", s.K * D, s.C, in_c);
    mat(p + "self_attn.v_proj.weight", s.K * D, s.C, in_c);
    mat(p + "self_attn.o_proj.weight", s.C, s.H * D, 1.0f / std::sqrt(static_cast<float>(s.H * D)));
    mat(p + "mlp.gate_proj.weight", s.F, s.C, in_c);
    mat(p + "mlp.up_proj.weight", s.F, s.C, in_c);
    mat(p + "mlp.down_proj.weight", s.C, s.F, 1.0f / std::sqrt(static_cast<float>(s.F)));
    norm(p + "input_layernorm.weight", s.C);
    norm(p + "post_attention_layernorm.weight", s.C);
    if (s.qkv_bias) {
      bias(p + "self_attn.q_proj.bias", s.H * D);
      bias(p + "self_attn.k_proj.bias", s.K * D);
      bias(p + "self_attn.v_proj.bias", s.K * D);
    }
    if (s.o_bias) bias(p + "self_attn.o_proj.bias", s.C);
    if (s.mlp_bias) {
      bias(p + "mlp.gate_proj.bias", s.F);
      bias(p + "mlp.up_proj.bias", s.F);
      bias(p + "mlp.down_proj.bias", s.C);
    }
    if (s.qk_norm) {
      norm(p + "self_attn.q_norm.weight", D);
      norm(p + "self_attn.k_norm.weight", D);
    }
  }
  norm("model.norm.weight", s.C);
  if (!s.tied) mat("lm_head.weight", s.V, s.C, 1.0f / std::sqrt(static_cast<float>(s.C)));
  return w;
}

torch::Tensor to_tensor(const Weight& w) {
  return torch::from_blob(const_cast<float*>(w.v.data()), w.shape, torch::kFloat32).clone();
}

// Weights as stored in `dtype` and read back (what the model sees).
Weights rounded(const Weights& w, torch::ScalarType dtype) {
  Weights out = w;
  for (auto& [name, x] : out) {
    torch::Tensor t = to_tensor(x).to(dtype).to(torch::kFloat32).contiguous();
    std::memcpy(x.v.data(), t.data_ptr<float>(), x.v.size() * sizeof(float));
  }
  return out;
}

json config_json(const Spec& s) {
  static const std::map<std::string, std::string> kClass = {{"llama", "LlamaForCausalLM"},
                                                            {"mistral", "MistralForCausalLM"},
                                                            {"qwen2", "Qwen2ForCausalLM"},
                                                            {"qwen3", "Qwen3ForCausalLM"}};
  json j = {{"architectures", {kClass.at(s.arch)}},
          {"model_type", s.arch},
          {"hidden_size", s.C},
          {"intermediate_size", s.F},
          {"num_hidden_layers", s.L},
          {"num_attention_heads", s.H},
          {"num_key_value_heads", s.K},
          {"vocab_size", s.V},
          {"rms_norm_eps", s.eps},
          {"rope_theta", s.theta},
          {"max_position_embeddings", 128},
          {"tie_word_embeddings", s.tied},
          {"hidden_act", "silu"},
          {"torch_dtype", "float32"},
          {"bos_token_id", 1},
          {"eos_token_id", 2}};
  if (s.head_dim) j["head_dim"] = s.head_dim;
  if (s.arch == "llama") {
    EXPECT_EQ(s.qkv_bias, s.o_bias) << "Llama's attention_bias covers q, k, v and o";
    if (s.o_bias) j["attention_bias"] = true;
    if (s.mlp_bias) j["mlp_bias"] = true;
  } else if (s.arch == "mistral") {
    EXPECT_TRUE(!s.qkv_bias && !s.o_bias && !s.mlp_bias && !s.qk_norm) << "Mistral has no biases";
    j["sliding_window"] = nullptr;
  } else if (s.arch == "qwen2") {
    EXPECT_TRUE(s.qkv_bias && !s.o_bias && !s.mlp_bias && !s.qk_norm) << "Qwen2: q/k/v biases only";
    // As Qwen2.5 ships it: a window that is not in use.
    j["use_sliding_window"] = false;
    j["sliding_window"] = 4;
    j["max_window_layers"] = 0;
  } else {
    EXPECT_TRUE(s.qk_norm && s.qkv_bias == s.o_bias && !s.mlp_bias) << "Qwen3: q/k norms, attention_bias on q/k/v/o";
    EXPECT_NE(s.head_dim, 0) << "Qwen3's head_dim defaults to 128: give it";
    j["attention_bias"] = s.o_bias;
    j["use_sliding_window"] = false;
    j["sliding_window"] = nullptr;
  }
  return j;
}

void write_model(const std::string& dir, const json& cfg, const Weights& w, torch::ScalarType dtype = torch::kFloat32,
                 const std::vector<std::pair<std::string, torch::Tensor>>& extra = {}) {
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (const auto& [name, x] : w) tensors.emplace_back(name, to_tensor(x).to(dtype));
  for (const auto& e : extra) tensors.push_back(e);
  dpo::safetensors_save(dir + "/model.safetensors", tensors, {{"format", "pt"}});
  write_text(dir + "/config.json", cfg.dump(2));
}

// ---- the independent reference: one unpadded sequence, double precision ----

using Mat = std::vector<std::vector<double>>;  // [T][N]

Mat linear(const Mat& x, const Weight& w, const Weight* b = nullptr) {  // y = x W^T + b, W (O, I)
  const int64_t O = w.shape[0], I = w.shape[1];
  Mat y(x.size(), std::vector<double>(O, 0.0));
  for (size_t t = 0; t < x.size(); ++t)
    for (int64_t o = 0; o < O; ++o) {
      double acc = b ? b->v[o] : 0.0;
      for (int64_t i = 0; i < I; ++i) acc += x[t][i] * w.at(o, i);
      y[t][o] = acc;
    }
  return y;
}

// `prefix`.weight times x, plus `prefix`.bias when the weights have one.
Mat proj(const Mat& x, const Weights& w, const std::string& prefix) {
  auto b = w.find(prefix + ".bias");
  return linear(x, w.at(prefix + ".weight"), b == w.end() ? nullptr : &b->second);
}

Mat rmsnorm(const Mat& x, const Weight& w, double eps) {
  Mat y = x;
  for (auto& row : y) {
    double ms = 0;
    for (double v : row) ms += v * v;
    ms /= static_cast<double>(row.size());
    const double r = 1.0 / std::sqrt(ms + eps);
    for (size_t c = 0; c < row.size(); ++c) row[c] = row[c] * r * w.v[c];
  }
  return y;
}

// RMSNorm over each head's D features (Qwen3's q_norm / k_norm).
void head_rmsnorm(Mat& x, int64_t heads, int64_t D, const Weight& w, double eps) {
  for (auto& row : x)
    for (int64_t h = 0; h < heads; ++h) {
      double ms = 0;
      for (int64_t i = 0; i < D; ++i) ms += row[h * D + i] * row[h * D + i];
      const double r = 1.0 / std::sqrt(ms / static_cast<double>(D) + eps);
      for (int64_t i = 0; i < D; ++i) row[h * D + i] = row[h * D + i] * r * w.v[i];
    }
}

// Rotates each head's pairs (i, i + D/2) by angle t * theta^(-2i/D).
void rope(Mat& x, int64_t heads, int64_t D, double theta) {
  for (size_t t = 0; t < x.size(); ++t)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < D / 2; ++i) {
        const double ang = static_cast<double>(t) * std::pow(theta, -2.0 * i / D);
        double& a = x[t][h * D + i];
        double& b = x[t][h * D + i + D / 2];
        const double a0 = a, b0 = b;
        a = a0 * std::cos(ang) - b0 * std::sin(ang);
        b = b0 * std::cos(ang) + a0 * std::sin(ang);
      }
}

// logits [T][V] of one sequence (no padding); abs_head (optional): |x| |W_head|^T of the
// final hidden states, the magnitudes the model's last product combines.
Mat reference_logits(const Spec& s, const Weights& w, const std::vector<int64_t>& tokens, Mat* abs_head = nullptr) {
  const int64_t T = static_cast<int64_t>(tokens.size()), D = s.D(), C = s.C;
  Mat x(T, std::vector<double>(C));
  const Weight& E = w.at("model.embed_tokens.weight");
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < C; ++c) x[t][c] = E.at(tokens[t], c);
  for (int64_t l = 0; l < s.L; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    Mat xn = rmsnorm(x, w.at(p + "input_layernorm.weight"), s.eps);
    Mat q = proj(xn, w, p + "self_attn.q_proj");
    Mat k = proj(xn, w, p + "self_attn.k_proj");
    Mat v = proj(xn, w, p + "self_attn.v_proj");
    if (s.qk_norm) {
      head_rmsnorm(q, s.H, D, w.at(p + "self_attn.q_norm.weight"), s.eps);
      head_rmsnorm(k, s.K, D, w.at(p + "self_attn.k_norm.weight"), s.eps);
    }
    rope(q, s.H, D, s.theta);
    rope(k, s.K, D, s.theta);
    Mat att(T, std::vector<double>(s.H * D, 0.0));
    for (int64_t h = 0; h < s.H; ++h) {
      const int64_t kv = h / (s.H / s.K);
      for (int64_t t = 0; t < T; ++t) {
        std::vector<double> sc(t + 1);
        double mx = -1e300;
        for (int64_t j = 0; j <= t; ++j) {
          double d = 0;
          for (int64_t e = 0; e < D; ++e) d += q[t][h * D + e] * k[j][kv * D + e];
          sc[j] = d / std::sqrt(static_cast<double>(D));
          mx = std::max(mx, sc[j]);
        }
        double z = 0;
        for (auto& e : sc) z += (e = std::exp(e - mx));
        for (int64_t j = 0; j <= t; ++j)
          for (int64_t e = 0; e < D; ++e) att[t][h * D + e] += sc[j] / z * v[j][kv * D + e];
      }
    }
    Mat o = proj(att, w, p + "self_attn.o_proj");
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c) x[t][c] += o[t][c];
    xn = rmsnorm(x, w.at(p + "post_attention_layernorm.weight"), s.eps);
    Mat g = proj(xn, w, p + "mlp.gate_proj");
    Mat u = proj(xn, w, p + "mlp.up_proj");
    for (int64_t t = 0; t < T; ++t)
      for (int64_t f = 0; f < s.F; ++f) g[t][f] = g[t][f] / (1.0 + std::exp(-g[t][f])) * u[t][f];
    Mat d = proj(g, w, p + "mlp.down_proj");
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c) x[t][c] += d[t][c];
  }
  x = rmsnorm(x, w.at("model.norm.weight"), s.eps);
  const Weight& head = w.at(s.tied ? "model.embed_tokens.weight" : "lm_head.weight");
  if (abs_head) {
    Mat ax = x;
    for (auto& row : ax)
      for (double& e : row) e = std::abs(e);
    Weight aw = head;
    for (float& e : aw.v) e = std::abs(e);
    *abs_head = linear(ax, aw);
  }
  return linear(x, head);
}

// The bound on |fp32 model logits - float64 reference| of one sequence: gamma(N) (half the
// tolerance of two fp32 evaluations, tests/tiny_llama.h) times the largest magnitude the
// head combines, max |x| |W_head|^T: the layers' rounding is relative to the final hidden
// states' magnitudes, and the head carries it, with its own, through |W_head|.
double reference_tolerance(const Spec& s, const Weights& w, const std::vector<int64_t>& tokens) {
  Mat abs_head;
  reference_logits(s, w, tokens, &abs_head);
  double scale = 0;
  for (const auto& row : abs_head)
    for (double v : row) scale = std::max(scale, v);
  const dpo::LlamaConfig cfg = dpo::llama_config_from_json(config_json(s));
  return dpo::testutil::llama_rel_tolerance(cfg, static_cast<int64_t>(tokens.size())) / 2 * scale;
}

// max |a - b| / max |b|
double rel_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return ((a - b).abs().max() / b.abs().max()).item<double>();
}

// Max |model - reference| over the first `len` positions of batch row b.
double max_diff(const torch::Tensor& logits, int64_t b, const Mat& ref) {
  torch::Tensor l = logits[b].to(torch::kFloat64).contiguous();
  double m = 0;
  for (size_t t = 0; t < ref.size(); ++t)
    for (size_t v = 0; v < ref[t].size(); ++v)
      m = std::max(m, std::abs(l[t][v].item<double>() - ref[t][v]));
  return m;
}

std::vector<int64_t> tokens_of(int64_t T, int64_t V, uint32_t seed) {
  std::mt19937 gen(seed);
  std::vector<int64_t> t(T);
  for (auto& e : t) e = static_cast<int64_t>(gen() % V);
  return t;
}

torch::Tensor ids_tensor(const std::vector<std::vector<int64_t>>& seqs, int64_t T, int64_t pad_id = 0) {
  torch::Tensor ids = torch::full({static_cast<int64_t>(seqs.size()), T}, pad_id, torch::kInt64);
  for (size_t b = 0; b < seqs.size(); ++b)
    for (size_t t = 0; t < seqs[b].size(); ++t) ids[b][t] = seqs[b][t];
  return ids;
}

torch::Tensor mask_tensor(const std::vector<std::vector<int64_t>>& seqs, int64_t T) {
  torch::Tensor m = torch::zeros({static_cast<int64_t>(seqs.size()), T}, torch::kInt64);
  for (size_t b = 0; b < seqs.size(); ++b) m[b].narrow(0, 0, static_cast<int64_t>(seqs[b].size())).fill_(1);
  return m;
}

// Sum over t >= 1 of log softmax(logits[t-1])[tokens[t]] (the sequence log-prob
// of everything after the first token), in double.
double reference_seq_logp(const Mat& logits, const std::vector<int64_t>& tokens) {
  double sum = 0;
  for (size_t t = 1; t < tokens.size(); ++t) {
    const auto& row = logits[t - 1];
    double mx = -1e300, z = 0;
    for (double v : row) mx = std::max(mx, v);
    for (double v : row) z += std::exp(v - mx);
    sum += row[tokens[t]] - mx - std::log(z);
  }
  return sum;
}

double model_seq_logp(const torch::Tensor& logits, int64_t b, const std::vector<int64_t>& tokens) {
  torch::Tensor lp = torch::log_softmax(logits[b].to(torch::kFloat64), -1);
  double sum = 0;
  for (size_t t = 1; t < tokens.size(); ++t) sum += lp[t - 1][tokens[t]].item<double>();
  return sum;
}

void check_against_reference(const Spec& s, uint32_t seed) {
  TempDir dir;
  Weights w = make_weights(s, seed);
  write_model(dir.str(), config_json(s), w);
  dpo::LlamaModel m = dpo::llama_load(dir.str(), dpo::QuantOptions{});
  EXPECT_EQ(m->config().num_key_value_heads, s.K);
  EXPECT_EQ(m->config().head_dim, s.D());
  std::vector<std::vector<int64_t>> seqs = {tokens_of(9, s.V, seed + 1), tokens_of(9, s.V, seed + 2)};
  torch::Tensor logits = m->forward(ids_tensor(seqs, 9), mask_tensor(seqs, 9));
  ASSERT_EQ(logits.sizes(), (std::vector<int64_t>{2, 9, s.V}));
  EXPECT_EQ(logits.scalar_type(), torch::kFloat32);
  double scale = 0;
  for (size_t b = 0; b < seqs.size(); ++b) {
    Mat ref = reference_logits(s, w, seqs[b]);
    double row_scale = 0;
    for (const auto& row : ref)
      for (double v : row) row_scale = std::max(row_scale, std::abs(v));
    scale = std::max(scale, row_scale);
    const double d = max_diff(logits, static_cast<int64_t>(b), ref);
    const double tol = reference_tolerance(s, w, seqs[b]);
    EXPECT_LT(d, tol) << "row " << b << ": logits differ by " << d << " (largest logit " << row_scale << ")";
    // Each log-prob moves by at most twice the logits' error (its logit and the log-sum-exp,
    // 1-Lipschitz in the max norm); the float64 log_softmax of both adds nothing visible.
    const double want = reference_seq_logp(ref, seqs[b]), got = model_seq_logp(logits, static_cast<int64_t>(b), seqs[b]);
    EXPECT_LT(std::abs(got - want), 2 * static_cast<double>(seqs[b].size() - 1) * tol)
        << "row " << b << ": sequence log-prob " << got << " vs " << want;
  }
  EXPECT_GT(scale, 0.5);  // the comparison is not between two near-zero tensors
}

}  // namespace

// ---------------------------------------------------------------------------
// Logits

TEST(LlamaLogits, MatchReferenceMultiHead) { check_against_reference(Spec{}, 11); }

TEST(LlamaLogits, MatchReferenceGroupedQuery) {
  Spec s;
  s.K = 2;
  check_against_reference(s, 21);
}

TEST(LlamaLogits, MatchReferenceTiedEmbeddingsSingleKvHead) {
  Spec s;
  s.K = 1;
  s.tied = true;
  s.theta = 500.0;
  check_against_reference(s, 31);
}

// Mistral with head_dim != hidden_size / heads (as Mistral-Nemo: 5120 / 32 != 128).
TEST(LlamaLogits, MatchReferenceMistralHeadDim) {
  Spec s;
  s.arch = "mistral";
  s.K = 2;
  s.head_dim = 16;  // H * D = 64 != C = 32
  check_against_reference(s, 51);
}

TEST(LlamaLogits, MatchReferenceLlamaBiasesAndHeadDim) {
  Spec s;
  s.K = 2;
  s.head_dim = 4;
  s.qkv_bias = s.o_bias = true;  // attention_bias
  s.mlp_bias = true;
  check_against_reference(s, 52);
}

// Qwen2 (Qwen2.5): biases on q, k, v; tied embeddings as its small models.
TEST(LlamaLogits, MatchReferenceQwen2) {
  Spec s;
  s.arch = "qwen2";
  s.K = 2;
  s.qkv_bias = true;
  s.tied = true;
  s.theta = 1000000.0;
  check_against_reference(s, 53);
}

// Qwen3: per-head RMSNorm of q and k before RoPE, head_dim from config.json.
TEST(LlamaLogits, MatchReferenceQwen3) {
  Spec s;
  s.arch = "qwen3";
  s.K = 2;
  s.head_dim = 12;
  s.qk_norm = true;
  s.tied = true;
  check_against_reference(s, 54);
  s.tied = false;
  s.K = 1;
  s.qkv_bias = s.o_bias = true;  // attention_bias
  check_against_reference(s, 55);
}

TEST(LlamaLogits, PaddedBatchMatchesUnpadded) {
  TempDir dir;
  Spec s;
  s.K = 2;
  Weights w = make_weights(s, 41);
  write_model(dir.str(), config_json(s), w);
  dpo::LlamaModel m = dpo::llama_load(dir.str(), dpo::QuantOptions{});
  std::vector<std::vector<int64_t>> seqs = {tokens_of(8, s.V, 1), tokens_of(5, s.V, 2), tokens_of(1, s.V, 3)};
  torch::Tensor ids = ids_tensor(seqs, 8, /*pad_id=*/7);
  torch::Tensor mask = mask_tensor(seqs, 8);
  torch::NoGradGuard ng;
  torch::Tensor padded = m->forward(ids, mask);
  EXPECT_FALSE(padded.isnan().any().item<bool>());
  for (size_t b = 0; b < seqs.size(); ++b) {
    const int64_t len = static_cast<int64_t>(seqs[b].size());
    torch::Tensor alone = m->forward(ids_tensor({seqs[b]}, len), torch::ones({1, len}, torch::kInt64));
    // Another batch shape: other GEMM blockings, the tolerance of two fp32 evaluations.
    EXPECT_LT(rel_diff(padded[b].narrow(0, 0, len), alone[0]), dpo::testutil::llama_rel_tolerance(m->config(), 8))
        << "row " << b;
    EXPECT_LT(max_diff(padded, static_cast<int64_t>(b), reference_logits(s, w, seqs[b])),
              reference_tolerance(s, w, seqs[b]));
  }
  // The padding token id does not matter. Exact: the same shapes and kernels, and a
  // masked key adds an exact 0 (probability 0, or never visited by the chunked kernel).
  torch::Tensor ids2 = ids_tensor(seqs, 8, /*pad_id=*/50);
  torch::Tensor padded2 = m->forward(ids2, mask);
  EXPECT_TRUE(torch::equal(padded2[1].narrow(0, 0, 5), padded[1].narrow(0, 0, 5)));
  // Left padding leaves query rows with no visible key: finite, not NaN.
  torch::Tensor left_mask = torch::tensor({{0, 0, 1, 1, 1, 1, 1, 1}}, torch::kInt64);
  torch::Tensor left = m->forward(ids.narrow(0, 0, 1), left_mask);
  EXPECT_TRUE(left.isfinite().all().item<bool>());
  // A fully padded row too.
  torch::Tensor none = m->forward(ids.narrow(0, 0, 1), torch::zeros({1, 8}, torch::kInt64));
  EXPECT_TRUE(none.isfinite().all().item<bool>());
}

TEST(LlamaLogits, RejectsBadInputs) {
  Spec s;
  dpo::LlamaConfig cfg = dpo::llama_config_from_json(config_json(s));
  dpo::LlamaModel m = dpo::llama_init_random(cfg, 1, dpo::QuantOptions{});
  torch::Tensor ids = torch::full({1, 3}, 64, torch::kInt64);
  std::string msg = throw_message([&] { m->forward(ids, torch::ones({1, 3})); });
  EXPECT_NE(msg.find("token id 64"), std::string::npos) << msg;
  msg = throw_message([&] { m->forward(torch::zeros({3}, torch::kInt64), torch::ones({3})); });
  EXPECT_NE(msg.find("(B, T)"), std::string::npos) << msg;
  msg = throw_message([&] { m->forward(torch::zeros({1, 3}, torch::kInt64), torch::ones({1, 4})); });
  EXPECT_NE(msg.find("attention_mask"), std::string::npos) << msg;
}

// ---------------------------------------------------------------------------
// Checkpoint directories

TEST(LlamaLoad, ShardedEqualsSingleFileAndExtrasIgnored) {
  TempDir dir;
  Spec s;
  s.K = 2;
  Weights w = make_weights(s, 51);
  const std::string single = dir.sub("single"), sharded = dir.sub("sharded");
  write_model(single, config_json(s), w, torch::kFloat32,
              {{"model.layers.0.self_attn.rotary_emb.inv_freq", torch::ones({4})}, {"unused.extra", torch::ones({2, 2})}});
  // Three shards split at arbitrary points, written by hand with an index.
  std::vector<std::vector<std::pair<std::string, torch::Tensor>>> parts(3);
  json weight_map = json::object();
  int i = 0;
  for (const auto& [name, x] : w) {
    const int s_idx = (i++ * 7) % 3;
    parts[s_idx].emplace_back(name, to_tensor(x));
    weight_map[name] = "model-0000" + std::to_string(s_idx + 1) + "-of-00003.safetensors";
  }
  for (int k = 0; k < 3; ++k)
    dpo::safetensors_save(sharded + "/model-0000" + std::to_string(k + 1) + "-of-00003.safetensors", parts[k]);
  write_text(sharded + "/model.safetensors.index.json", json({{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}}).dump());
  write_text(sharded + "/config.json", config_json(s).dump());

  dpo::LlamaModel a = dpo::llama_load(single, dpo::QuantOptions{});
  dpo::LlamaModel b = dpo::llama_load(sharded, dpo::QuantOptions{});
  auto pa = a->named_parameters(), pb = b->named_parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (const auto& item : pa) EXPECT_TRUE(torch::equal(item.value(), pb[item.key()])) << item.key();
  for (const auto& [name, proj] : a->named_projections()) {
    EXPECT_TRUE(torch::equal(proj->dense_weight(), to_tensor(w.at(name + ".weight")))) << name;
  }
  std::vector<std::vector<int64_t>> seqs = {tokens_of(6, s.V, 5)};
  torch::Tensor la = a->forward(ids_tensor(seqs, 6), mask_tensor(seqs, 6));
  torch::Tensor lb = b->forward(ids_tensor(seqs, 6), mask_tensor(seqs, 6));
  EXPECT_TRUE(torch::equal(la, lb));
}

TEST(LlamaLoad, StoredHalfAndBfloat16Weights) {
  for (torch::ScalarType dt : {torch::kFloat16, torch::kBFloat16}) {
    TempDir dir;
    Spec s;
    s.K = 2;
    Weights w = make_weights(s, 61);
    json cfg = config_json(s);
    cfg["torch_dtype"] = dt == torch::kFloat16 ? "float16" : "bfloat16";
    write_model(dir.str(), cfg, w, dt);
    dpo::LlamaModel m = dpo::llama_load(dir.str(), dpo::QuantOptions{});
    EXPECT_EQ(m->config().torch_dtype, dt);
    // The embedding / lm_head tables stay in the file's half precision (llama_table_dtype),
    // the norms are in the compute dtype.
    EXPECT_EQ(m->model->embed_tokens->weight.scalar_type(), dt);
    if (m->lm_head) EXPECT_EQ(m->lm_head->weight.scalar_type(), dt);
    EXPECT_EQ(m->model->norm->weight.scalar_type(), torch::kFloat32);
    // The untied embedding table is read from the file where it is used (a copy-on-write
    // mapping: only the rows a batch touches become resident); the others are copies.
    EXPECT_EQ(dpo::testutil::mapped_file_of(m->model->embed_tokens->weight.data_ptr()), dir.file("model.safetensors"));
    EXPECT_EQ(dpo::testutil::mapped_file_of(m->lm_head->weight.data_ptr()), "");
    std::vector<std::vector<int64_t>> seqs = {tokens_of(7, s.V, 9)};
    torch::Tensor logits = m->forward(ids_tensor(seqs, 7), mask_tensor(seqs, 7));
    // The reference of the rounded weights within the rounding bound; clearly off (beyond
    // twice that bound) from the unrounded ones for bf16.
    const double tol = reference_tolerance(s, rounded(w, dt), seqs[0]);
    EXPECT_LT(max_diff(logits, 0, reference_logits(s, rounded(w, dt), seqs[0])), tol) << c10::toString(dt);
    if (dt == torch::kBFloat16) {
      EXPECT_GT(max_diff(logits, 0, reference_logits(s, w, seqs[0])), 2 * tol);
    }
  }
}

TEST(LlamaLoad, MissingTensorsAreListed) {
  TempDir dir;
  Spec s;
  Weights w = make_weights(s, 71);
  w.erase("model.layers.1.mlp.up_proj.weight");
  w.erase("model.norm.weight");
  write_model(dir.str(), config_json(s), w);
  std::string msg = throw_message([&] { dpo::llama_load(dir.str(), dpo::QuantOptions{}); });
  EXPECT_NE(msg.find("model.layers.1.mlp.up_proj.weight"), std::string::npos) << msg;
  EXPECT_NE(msg.find("model.norm.weight"), std::string::npos) << msg;
  EXPECT_NE(msg.find(dir.str() + "/model.safetensors"), std::string::npos) << msg;

  // Untied config without lm_head.weight: missing; tied config: uses the embeddings.
  Spec t;
  Weights w2 = make_weights(t, 72);
  w2.erase("lm_head.weight");
  write_model(dir.str(), config_json(t), w2);
  msg = throw_message([&] { dpo::llama_load(dir.str(), dpo::QuantOptions{}); });
  EXPECT_NE(msg.find("lm_head.weight"), std::string::npos) << msg;
  EXPECT_NE(msg.find("tie_word_embeddings"), std::string::npos) << msg;
  t.tied = true;
  write_model(dir.str(), config_json(t), w2);
  dpo::LlamaModel m = dpo::llama_load(dir.str(), dpo::QuantOptions{});
  EXPECT_FALSE(m->lm_head);
  EXPECT_TRUE(torch::equal(m->lm_head_weight(), to_tensor(w2.at("model.embed_tokens.weight"))));
}

TEST(LlamaLoad, WrongShapesAndDtypesNamed) {
  TempDir dir;
  Spec s;
  Weights w = make_weights(s, 81);
  w["model.norm.weight"] = Weight{{s.C + 1}, std::vector<float>(s.C + 1, 1.0f)};
  write_model(dir.str(), config_json(s), w);
  std::string msg = throw_message([&] { dpo::llama_load(dir.str(), dpo::QuantOptions{}); });
  EXPECT_NE(msg.find("model.norm.weight"), std::string::npos) << msg;
  EXPECT_NE(msg.find("shape"), std::string::npos) << msg;

  w = make_weights(s, 81);
  w["model.layers.0.self_attn.k_proj.weight"] = Weight{{s.C, s.C + 2}, std::vector<float>(s.C * (s.C + 2), 0.0f)};
  write_model(dir.str(), config_json(s), w);
  msg = throw_message([&] { dpo::llama_load(dir.str(), dpo::QuantOptions{}); });
  EXPECT_NE(msg.find("model.layers.0.self_attn.k_proj"), std::string::npos) << msg;

  w = make_weights(s, 81);
  write_model(dir.str(), config_json(s), w, torch::kFloat32, {});
  {
    // An integer embedding table.
    std::vector<std::pair<std::string, torch::Tensor>> tensors;
    for (const auto& [name, x] : w)
      tensors.emplace_back(name, name == "model.embed_tokens.weight" ? to_tensor(x).to(torch::kInt32) : to_tensor(x));
    dpo::safetensors_save(dir.str() + "/model.safetensors", tensors);
  }
  msg = throw_message([&] { dpo::llama_load(dir.str(), dpo::QuantOptions{}); });
  EXPECT_NE(msg.find("model.embed_tokens.weight"), std::string::npos) << msg;
  EXPECT_NE(msg.find("Int"), std::string::npos) << msg;
}

TEST(LlamaLoad, RefusesUnsafeOrUnsupportedDirectories) {
  TempDir dir;
  Spec s;
  Weights w = make_weights(s, 91);
  // Pickle only.
  const std::string pk = dir.sub("pickle");
  write_text(pk + "/config.json", config_json(s).dump());
  write_text(pk + "/pytorch_model.bin", "not loaded");
  std::string msg = throw_message([&] { dpo::llama_load(pk, dpo::QuantOptions{}); });
  EXPECT_NE(msg.find("pickle"), std::string::npos) << msg;
  EXPECT_NE(msg.find("safe_serialization=True"), std::string::npos) << msg;
  // A shard outside the directory.
  const std::string esc = dir.sub("escape");
  dpo::safetensors_save(dir.str() + "/outside.safetensors", {{"x", torch::ones({1})}});
  write_text(esc + "/config.json", config_json(s).dump());
  write_text(esc + "/model.safetensors.index.json",
             json({{"weight_map", {{"model.norm.weight", "../outside.safetensors"}}}}).dump());
  msg = throw_message([&] { dpo::llama_load(esc, dpo::QuantOptions{}); });
  EXPECT_NE(msg.find("../outside.safetensors"), std::string::npos) << msg;
  EXPECT_NE(msg.find("refused"), std::string::npos) << msg;
  // Another architecture; a RoPE scaling we do not implement; no config.json.
  const std::string arch = dir.sub("arch");
  json cfg = config_json(s);
  cfg["architectures"] = {"GPTNeoXForCausalLM"};
  write_model(arch, cfg, w);
  msg = throw_message([&] { dpo::llama_load(arch, dpo::QuantOptions{}); });
  EXPECT_NE(msg.find("GPTNeoXForCausalLM"), std::string::npos) << msg;
  EXPECT_NE(msg.find("config.json"), std::string::npos) << msg;
  cfg = config_json(s);
  cfg["rope_scaling"] = {{"type", "yarn"}, {"factor", 4.0}};
  write_text(arch + "/config.json", cfg.dump());
  msg = throw_message([&] { dpo::llama_load(arch, dpo::QuantOptions{}); });
  EXPECT_NE(msg.find("rope_scaling"), std::string::npos) << msg;
  EXPECT_NE(msg.find("yarn"), std::string::npos) << msg;
  fs::remove(arch + "/config.json");
  msg = throw_message([&] { dpo::llama_load(arch, dpo::QuantOptions{}); });
  EXPECT_NE(msg.find("config.json"), std::string::npos) << msg;
}

// ---------------------------------------------------------------------------
// config.json

TEST(LlamaConfig, DefaultsAndDerivedFields) {
  json j = {{"architectures", {"LlamaForCausalLM"}}, {"hidden_size", 64},      {"intermediate_size", 128},
            {"num_hidden_layers", 2},                 {"num_attention_heads", 8}, {"vocab_size", 100},
            {"eos_token_id", {7, 8}},                 {"pad_token_id", nullptr},  {"transformers_version", "4.40.0"}};
  dpo::LlamaConfig c = dpo::llama_config_from_json(j);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.max_position_embeddings, 2048);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.torch_dtype, torch::kFloat32);
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_id, 7);
  EXPECT_FALSE(c.pad_token_id.has_value());
  EXPECT_EQ(c.rope_scaling.type, dpo::RopeScaling::Type::kNone);

  // to_json -> from_json keeps every field, and unknown keys of the original.
  c.torch_dtype = torch::kBFloat16;
  c.pad_token_id = 0;
  c.tie_word_embeddings = true;
  json out = dpo::llama_config_to_json(c);
  EXPECT_EQ(out["architectures"], json::array({"LlamaForCausalLM"}));
  EXPECT_EQ(out["model_type"], "llama");
  EXPECT_EQ(out["torch_dtype"], "bfloat16");
  EXPECT_EQ(out["transformers_version"], "4.40.0");
  EXPECT_EQ(out["eos_token_id"], json::array({7, 8}));
  EXPECT_EQ(out["hidden_act"], "silu");
  dpo::LlamaConfig back = dpo::llama_config_from_json(out);
  EXPECT_EQ(back.hidden_size, 64);
  EXPECT_EQ(back.num_key_value_heads, 8);
  EXPECT_EQ(back.torch_dtype, torch::kBFloat16);
  EXPECT_EQ(back.pad_token_id, std::optional<int64_t>(0));
  EXPECT_TRUE(back.tie_word_embeddings);
  EXPECT_EQ(back.eos_token_id, 7);

  // transformers v5 names: "dtype", "rope_parameters".
  j["dtype"] = "float16";
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 500000.0}};
  c = dpo::llama_config_from_json(j);
  EXPECT_EQ(c.torch_dtype, torch::kFloat16);
  EXPECT_DOUBLE_EQ(c.rope_theta, 500000.0);
}

TEST(LlamaConfig, Refusals) {
  const json base = config_json(Spec{});
  auto expect_refused = [&](json j, const std::vector<std::string>& needles) {
    std::string msg = throw_message([&] { dpo::llama_config_from_json(j, "/m/config.json"); });
    EXPECT_NE(msg.find("/m/config.json"), std::string::npos) << msg;
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "missing " << n << " in: " << msg;
  };
  json j = base;
  j["architectures"] = {"Gemma2ForCausalLM"};
  expect_refused(j, {"architectures", "Gemma2ForCausalLM", "Qwen3ForCausalLM"});
  j = base;
  j["model_type"] = "qwen2";
  expect_refused(j, {"model_type", "qwen2", "LlamaForCausalLM"});
  j = base;
  j.erase("architectures");
  j["model_type"] = "gpt2";
  expect_refused(j, {"model_type", "gpt2"});
  j.erase("model_type");
  expect_refused(j, {"architectures", "missing"});
  for (const char* f : {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"}) {
    j = base;
    j.erase(f);
    expect_refused(j, {std::string("\"") + f + "\"", "missing"});
  }
  j = base;
  j["hidden_size"] = 30;
  expect_refused(j, {"hidden_size", "divisible", "num_attention_heads"});
  j = base;
  j["num_key_value_heads"] = 3;
  expect_refused(j, {"num_key_value_heads", "divide"});
  j = base;
  j["num_attention_heads"] = "4";
  expect_refused(j, {"num_attention_heads", "integer"});
  j = base;
  j["hidden_size"] = -32;
  expect_refused(j, {"hidden_size", "positive"});
  j = base;
  j["rope_scaling"] = {{"rope_type", "dynamic"}, {"factor", 2.0}};
  expect_refused(j, {"rope_scaling", "dynamic", "not implemented"});
  j = base;
  j["rope_scaling"] = {{"factor", 2.0}};
  expect_refused(j, {"rope_scaling", "rope_type"});
  j = base;
  j["hidden_act"] = "gelu";
  expect_refused(j, {"hidden_act", "gelu"});
  j = base;
  j["attention_bias"] = "yes";
  expect_refused(j, {"attention_bias", "true or false"});
  j = base;
  j["torch_dtype"] = "float64";
  expect_refused(j, {"torch_dtype", "float64"});
  j = base;
  j["attention_dropout"] = 0.1;
  expect_refused(j, {"attention_dropout"});
  expect_refused(json::array(), {"not a JSON object"});

  TempDir dir;
  write_text(dir.str() + "/config.json", R"({"hidden_size": 32, "hidden_size": 64})");
  std::string msg = throw_message([&] { dpo::llama_config_load(dir.str() + "/config.json"); });
  EXPECT_NE(msg.find("twice"), std::string::npos) << msg;
  write_text(dir.str() + "/config.json", R"({"hidden_size": )");
  msg = throw_message([&] { dpo::llama_config_load(dir.str() + "/config.json"); });
  EXPECT_NE(msg.find("config.json"), std::string::npos) << msg;
  // Valid JSON with one key nested 200,000 levels deep killed every tool that loads a
  // model (SIGSEGV, issue 28): now one line naming the file and the limit.
  std::string deep = "{\"hidden_size\": 32, \"x\": ";
  for (int i = 0; i < 200000; ++i) deep += "{\"a\":";
  deep += "1" + std::string(200000, '}') + "}";
  write_text(dir.str() + "/config.json", deep);
  EXPECT_EQ(throw_message([&] { dpo::llama_config_load(dir.str() + "/config.json"); }),
            dir.str() + "/config.json: JSON nested deeper than 512 levels (the limit of every JSON reader here)");
  // More than 64 MiB: refused before it is read.
  write_text(dir.str() + "/config.json", "{" + std::string((64 << 20) + 10, ' ') + "}");
  EXPECT_EQ(throw_message([&] { dpo::llama_config_load(dir.str() + "/config.json"); }),
            dir.str() + "/config.json: 67108876 bytes of JSON, over this reader's limit of 64 MiB");
}

TEST(LlamaConfig, MistralWithoutActiveSlidingWindow) {
  TempDir dir;
  Spec s;
  s.K = 2;
  Weights w = make_weights(s, 101);
  json cfg = config_json(s);
  cfg["architectures"] = {"MistralForCausalLM"};
  cfg["model_type"] = "mistral";
  cfg["sliding_window"] = nullptr;
  EXPECT_FALSE(dpo::llama_config_to_json(dpo::llama_config_from_json(cfg))["sliding_window"].is_number());
  write_model(dir.str(), cfg, w);
  dpo::LlamaModel m = dpo::llama_load(dir.str(), dpo::QuantOptions{});
  EXPECT_FALSE(m->config().sliding_window.has_value());
  std::vector<std::vector<int64_t>> seqs = {tokens_of(7, s.V, 3)};
  const double tol = reference_tolerance(s, w, seqs[0]);
  EXPECT_LT(max_diff(m->forward(ids_tensor(seqs, 7), mask_tensor(seqs, 7)), 0, reference_logits(s, w, seqs[0])), tol);

  // A window at least as long as the sequence is not in effect; a longer sequence is refused.
  cfg["sliding_window"] = 7;
  write_text(dir.str() + "/config.json", cfg.dump());
  m = dpo::llama_load(dir.str(), dpo::QuantOptions{});
  EXPECT_LT(max_diff(m->forward(ids_tensor(seqs, 7), mask_tensor(seqs, 7)), 0, reference_logits(s, w, seqs[0])), tol);
  std::string msg = throw_message([&] { m->forward(torch::zeros({1, 8}, torch::kInt64), torch::ones({1, 8})); });
  EXPECT_NE(msg.find("sliding_window"), std::string::npos) << msg;
  // Saved as the Mistral it is, with the window it ran with.
  json out = dpo::llama_config_to_json(m->config());
  EXPECT_EQ(out["architectures"], json::array({"MistralForCausalLM"}));
  EXPECT_EQ(out["sliding_window"], 7);
}

TEST(LlamaRope, InvFreqPlainLinearLlama3) {
  dpo::LlamaConfig c = dpo::llama_config_from_json(config_json(Spec{}));
  c.head_dim = 16;
  c.rope_theta = 500000.0;
  torch::Tensor plain = dpo::llama_rope_inv_freq(c).to(torch::kFloat64);
  ASSERT_EQ(plain.numel(), 8);
  // fp32 1 / theta^(2i/D): the exponent 2i/16 is exact, pow is within 1 ulp (2u relative:
  // Sleef's u10, glibc), the division rounds once: 3u relative.
  const double u = dpo::testutil::unit_roundoff(torch::kFloat32);
  for (int64_t i = 0; i < 8; ++i) {
    const double want = std::pow(500000.0, -2.0 * i / 16);
    EXPECT_NEAR(plain[i].item<double>(), want, dpo::testutil::gamma(3) * want) << i;
  }
  c.rope_scaling.type = dpo::RopeScaling::Type::kLinear;
  c.rope_scaling.factor = 4.0;
  // Exact: the same fp32 pow, and dividing by 4 only changes the exponent.
  EXPECT_TRUE(torch::equal(dpo::llama_rope_inv_freq(c).to(torch::kFloat64), plain / 4.0));
  // llama3: wavelength 2*pi/f above old/low -> f/factor; below old/high -> f;
  // between: (1 - s) f/factor + s f with s = (old/wavelen - low)/(high - low).
  c.rope_scaling = {dpo::RopeScaling::Type::kLlama3, 8.0, 1.0, 4.0, 64};
  torch::Tensor got = dpo::llama_rope_inv_freq(c).to(torch::kFloat64);
  int kinds[3] = {0, 0, 0};
  for (int64_t i = 0; i < 8; ++i) {
    const double f = std::pow(500000.0, -2.0 * i / 16), wl = 2 * M_PI / f;
    double want;
    if (wl < 64 / 4.0) {
      want = f, ++kinds[0];
    } else if (wl > 64 / 1.0) {
      want = f / 8.0, ++kinds[1];
    } else {
      const double sm = (64 / wl - 1.0) / (4.0 - 1.0);
      want = (1 - sm) * f / 8.0 + sm * f, ++kinds[2];
    }
    // fp32: f (3u); wl = 2 pi / f (2 pi rounded, the division: 5u with f's); the blend
    // s = (64 / wl - 1) / 3: 64 / wl <= 4 carries 6u (24u absolute), the subtraction u on a
    // value <= 3, the division u on s <= 1, so |ds| <= 10u; (1 - s) f / 8 + s f then moves
    // by |ds| (f - f / 8) <= 10u f, f's 3u and four roundings of terms <= f: 17u f, and
    // gamma(20) f covers the second-order terms.
    EXPECT_NEAR(got[i].item<double>(), want, dpo::testutil::gamma(20) * f) << i;
  }
  EXPECT_GT(kinds[0], 0);
  EXPECT_GT(kinds[1], 0);
  EXPECT_GT(kinds[2], 0);
  // HF layout of the tables: cos/sin of cat(freqs, freqs) at positions 0..T-1.
  c.rope_scaling = {};
  auto [cos, sin] = dpo::llama_rope_cos_sin(c, 5);
  ASSERT_EQ(cos.sizes(), (std::vector<int64_t>{5, 16}));
  for (int64_t t = 0; t < 5; ++t)
    for (int64_t d = 0; d < 16; ++d) {
      const double ang = t * std::pow(500000.0, -2.0 * (d % 8) / 16);
      // The fp32 angle t f carries f's 3u and its product's u (4u ang absolute), cos / sin
      // are within 3.5 ulp (Sleef's u35 on AVX2 / AVX-512) of a value <= 1: 7u.
      const double bound = (4 * ang + 7) * u;
      EXPECT_NEAR(cos[t][d].item<float>(), std::cos(ang), bound) << t << "," << d;
      EXPECT_NEAR(sin[t][d].item<float>(), std::sin(ang), bound) << t << "," << d;
    }
}

// ---------------------------------------------------------------------------
// Random init and saving

TEST(LlamaInit, DeterministicHfInit) {
  Spec s;
  s.K = 2;
  dpo::LlamaConfig cfg = dpo::llama_config_from_json(config_json(s));
  cfg.pad_token_id = 3;
  cfg.initializer_range = 0.05;
  dpo::LlamaModel a = dpo::llama_init_random(cfg, 123, dpo::QuantOptions{});
  dpo::LlamaModel b = dpo::llama_init_random(cfg, 123, dpo::QuantOptions{});
  dpo::LlamaModel c = dpo::llama_init_random(cfg, 124, dpo::QuantOptions{});
  auto pa = a->named_parameters(), pb = b->named_parameters(), pc = c->named_parameters();
  for (const auto& it : pa) {
    EXPECT_TRUE(torch::equal(it.value(), pb[it.key()])) << it.key();
    EXPECT_FALSE(it.value().requires_grad()) << it.key();
  }
  auto pra = a->named_projections(), prb = b->named_projections(), prc = c->named_projections();
  torch::Tensor all = torch::cat({pra[0].second->dense_weight().flatten(), pra[5].second->dense_weight().flatten()});
  for (size_t i = 0; i < pra.size(); ++i) {
    EXPECT_TRUE(torch::equal(pra[i].second->dense_weight(), prb[i].second->dense_weight()));
    EXPECT_FALSE(torch::equal(pra[i].second->dense_weight(), prc[i].second->dense_weight()));
  }
  // Statistical: 2560 N(0, 0.05^2) draws; the sample std's standard error is
  // 0.05 / sqrt(2 * 2560) = 7e-4 and the mean's 0.05 / sqrt(2560) = 1e-3, so 0.005 is 7 and 5
  // standard errors (2048 draws for the embedding: 6).
  EXPECT_NEAR(all.std().item<double>(), 0.05, 0.005);
  EXPECT_NEAR(all.mean().item<double>(), 0.0, 0.005);
  torch::Tensor emb = a->model->embed_tokens->weight;
  EXPECT_TRUE(torch::equal(emb[3], torch::zeros({s.C})));
  EXPECT_NEAR(emb.std().item<double>(), 0.05, 0.005);
  EXPECT_TRUE(torch::equal(a->model->norm->weight, torch::ones({s.C})));
  EXPECT_TRUE(torch::equal(a->model->layer_list[1]->input_layernorm->weight, torch::ones({s.C})));
  EXPECT_FALSE(torch::equal(a->lm_head->weight, c->lm_head->weight));
  // HF parameter names.
  for (const char* n : {"model.embed_tokens.weight", "model.layers.1.input_layernorm.weight",
                        "model.layers.0.post_attention_layernorm.weight", "model.norm.weight", "lm_head.weight"})
    EXPECT_TRUE(pa.contains(n)) << n;
  EXPECT_EQ(pra.size(), 14u);
  EXPECT_EQ(pra[13].first, "model.layers.1.mlp.down_proj");
  EXPECT_EQ(pra[1].first, "model.layers.0.self_attn.k_proj");
  EXPECT_EQ(pra[1].second->out_features(), 2 * 8);
}

// The MLP's SwiGLU keeps only gate and up for backward and writes its gradients into
// their buffers: the input gradient must be bit-identical to autograd's silu * mul, for
// dense and NF4 bases.
TEST(LlamaMlp, FusedSwigluGradientsAreAutogradsExactly) {
  dpo::LlamaConfig c = dpo::llama_config_from_json(config_json(Spec{}));
  for (bool nf4 : {false, true}) {
    torch::manual_seed(12);
    dpo::LlamaMLP mlp(c);
    dpo::QuantOptions q;
    q.load_in_4bit = nf4;
    for (dpo::FrozenLinear* p : {&mlp->gate_proj, &mlp->up_proj, &mlp->down_proj})
      (*p)->set_weight(torch::randn({(*p)->out_features(), (*p)->in_features()}) * 0.2, q);
    torch::Tensor x = torch::randn({2, 5, c.hidden_size});
    torch::Tensor g = torch::randn({2, 5, c.hidden_size});
    torch::Tensor x1 = x.clone().requires_grad_(true), x2 = x.clone().requires_grad_(true);
    // Exact by construction: the fused function runs the same ATen ops in the same order.
    torch::Tensor y1 = mlp->forward(x1);
    torch::Tensor y2 = mlp->down_proj(torch::silu(mlp->gate_proj(x2)) * mlp->up_proj(x2));
    EXPECT_TRUE(torch::equal(y1, y2));
    y1.backward(g);
    y2.backward(g);
    EXPECT_TRUE(torch::equal(x1.grad(), x2.grad())) << (nf4 ? "nf4" : "dense");
    torch::NoGradGuard ng;
    EXPECT_TRUE(torch::equal(mlp->forward(x), y2));
  }
}

// --tiled_mlp_tokens: the MLP in token tiles, each recomputed in backward (nested
// inside the layer checkpoint, or alone) computes the same logits and the same LoRA
// (all seven projections) and input gradients as the whole MLP.
TEST(LlamaMlp, TokenTilesGiveTheWholeMlpsValuesAndGradients) {
  Spec s;
  s.K = 2;
  dpo::LlamaConfig cfg = dpo::llama_config_from_json(config_json(s));
  std::vector<std::vector<int64_t>> seqs = {tokens_of(9, s.V, 5), tokens_of(7, s.V, 6)};
  torch::Tensor ids = ids_tensor(seqs, 9), mask = mask_tensor(seqs, 9);
  torch::manual_seed(3);
  torch::Tensor g = torch::randn({2, 9, s.V});
  auto run = [&](bool ckpt, int64_t tile, torch::Tensor* logits) {
    dpo::LlamaModel m = dpo::llama_init_random(cfg, 21, dpo::QuantOptions{});
    auto named = m->named_projections();
    dpo::LoraConfig lc;
    lc.r = 4;
    lc.dropout = 0.0;  // tiles draw their own dropout masks; without dropout the function is the same
    lc.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
    dpo::lora_attach(named, lc, 7);
    torch::manual_seed(4);
    for (auto& [k, t] : dpo::lora_parameters(named)) {
      torch::NoGradGuard ng;
      t.normal_(0.0, 0.1);  // lora_B non-zero: every adapter gets a gradient
    }
    m->set_gradient_checkpointing(ckpt);
    m->set_mlp_tile_tokens(tile);
    m->train();
    *logits = m->forward(ids, mask);
    (*logits * g).sum().backward();
    std::vector<torch::Tensor> grads;
    for (auto& [k, t] : dpo::lora_parameters(named)) grads.push_back(t.grad().clone());
    return grads;
  };
  torch::Tensor want_logits;
  const auto want = run(false, 0, &want_logits);
  // Tiles run the MLP's products on fewer rows (other GEMM blockings) and sum the LoRA
  // gradients over tokens in another order: the tolerance of two fp32 evaluations.
  const double tol = dpo::testutil::llama_rel_tolerance(cfg, 9), tol_grad = dpo::testutil::llama_rel_tolerance(cfg, 9, true);
  for (bool ckpt : {false, true})
    for (int64_t tile : {1, 4, 7, 100}) {
      torch::Tensor logits;
      const auto got = run(ckpt, tile, &logits);
      EXPECT_LE(rel_diff(logits, want_logits), tol) << ckpt << " " << tile;
      ASSERT_EQ(got.size(), want.size());
      for (size_t i = 0; i < got.size(); ++i)
        EXPECT_LE(rel_diff(got[i], want[i]), tol_grad) << "ckpt " << ckpt << " tile " << tile << " #" << i;
    }
  dpo::LlamaModel m = dpo::llama_init_random(cfg, 21, dpo::QuantOptions{});
  EXPECT_THROW(m->set_mlp_tile_tokens(-1), std::runtime_error);
}

// config.json torch_dtype bf16 under fp32 compute: the embedding and lm_head tables are
// kept in bf16 (llama_table_dtype), drawn in blocks of rows from the same stream as the
// fp32 model's (so they are its tables rounded), and the model computes what the fp32
// model computes with those rounded tables.
TEST(LlamaInit, HalfPrecisionTablesAreTheFp32DrawRounded) {
  Spec s;
  s.L = 1, s.C = 128, s.H = 4, s.K = 4, s.F = 64, s.V = 70001;  // 2+ blocks of rows, a ragged last one
  dpo::LlamaConfig c32 = dpo::llama_config_from_json(config_json(s));
  c32.pad_token_id = 5;
  dpo::LlamaConfig c16 = c32;
  c16.torch_dtype = torch::kBFloat16;
  EXPECT_EQ(dpo::llama_table_dtype(torch::kBFloat16, torch::kFloat32), torch::kBFloat16);
  EXPECT_EQ(dpo::llama_table_dtype(torch::kFloat16, torch::kBFloat16), torch::kBFloat16);
  EXPECT_EQ(dpo::llama_table_dtype(torch::kFloat32, torch::kFloat32), torch::kFloat32);
  dpo::LlamaModel a = dpo::llama_init_random(c32, 9, dpo::QuantOptions{});
  dpo::LlamaModel b = dpo::llama_init_random(c16, 9, dpo::QuantOptions{});
  ASSERT_EQ(b->model->embed_tokens->weight.scalar_type(), torch::kBFloat16);
  ASSERT_EQ(b->lm_head->weight.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(b->model->norm->weight.scalar_type(), torch::kFloat32);
  EXPECT_TRUE(torch::equal(b->model->embed_tokens->weight, a->model->embed_tokens->weight.to(torch::kBFloat16)));
  EXPECT_TRUE(torch::equal(b->lm_head->weight, a->lm_head->weight.to(torch::kBFloat16)));
  EXPECT_TRUE(torch::equal(b->model->embed_tokens->weight[5].to(torch::kFloat), torch::zeros({s.C})));
  auto pa = a->named_projections(), pb = b->named_projections();
  for (size_t i = 0; i < pa.size(); ++i) EXPECT_TRUE(torch::equal(pa[i].second->dense_weight(), pb[i].second->dense_weight()));
  {
    torch::NoGradGuard ng;
    a->model->embed_tokens->weight.copy_(b->model->embed_tokens->weight);
    a->lm_head->weight.copy_(b->lm_head->weight);
  }
  std::vector<std::vector<int64_t>> seqs = {tokens_of(9, s.V, 3), tokens_of(9, s.V, 4)};
  torch::Tensor ids = ids_tensor(seqs, 9), mask = mask_tensor(seqs, 9);
  torch::Tensor la = a->forward(ids, mask), lb = b->forward(ids, mask);
  EXPECT_EQ(lb.scalar_type(), torch::kFloat32);
  // The same final hidden states h (bit for bit: the same ops on the same values); only the
  // head differs, widened in blocks of vocabulary rows: two fp32 products h W^T, each
  // within gamma(C) |h| |W|^T.
  const torch::Tensor h = a->hidden_states(ids, mask);
  EXPECT_TRUE(torch::equal(b->hidden_states(ids, mask), h));
  dpo::testutil::expect_within(lb, la, 2 * dpo::testutil::matmul_error_bound(h, a->lm_head->weight.t()), "logits");
  // Widened back for a device or a merge: the same values in the compute dtype.
  b->set_table_dtype(torch::kFloat32);
  EXPECT_TRUE(torch::equal(b->lm_head->weight, a->lm_head->weight));
}

TEST(LlamaSave, RoundTripSingleShardedAndDtypes) {
  TempDir dir;
  Spec s;
  s.K = 2;
  dpo::LlamaConfig cfg = dpo::llama_config_from_json(config_json(s));
  dpo::LlamaModel m = dpo::llama_init_random(cfg, 5, dpo::QuantOptions{});
  std::vector<std::vector<int64_t>> seqs = {tokens_of(6, s.V, 1), tokens_of(6, s.V, 2)};
  torch::Tensor ids = ids_tensor(seqs, 6), mask = mask_tensor(seqs, 6);
  torch::Tensor want = m->forward(ids, mask);

  const std::string d = dir.sub("out");
  dpo::llama_save_hf(m, d, torch::kFloat32, 0);
  EXPECT_TRUE(fs::exists(d + "/model.safetensors"));
  EXPECT_FALSE(fs::exists(d + "/model.safetensors.index.json"));
  json cj = json::parse(std::ifstream(d + "/config.json"));
  EXPECT_EQ(cj["torch_dtype"], "float32");
  EXPECT_EQ(cj["architectures"], json::array({"LlamaForCausalLM"}));
  EXPECT_EQ(cj["num_key_value_heads"], 2);
  dpo::SafetensorsFile f(d + "/model.safetensors");
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.names().size(), 1u + 2 * 9 + 1 + 1);
  // Exact: the same fp32 weights through the same kernels, shapes and threads.
  EXPECT_TRUE(torch::equal(dpo::llama_load(d, dpo::QuantOptions{})->forward(ids, mask), want));

  // Sharded: ~3 KB per shard; the index covers every tensor; then back to one file.
  dpo::llama_save_hf(m, d, torch::kFloat32, 3000);
  EXPECT_FALSE(fs::exists(d + "/model.safetensors"));
  json index = json::parse(std::ifstream(d + "/model.safetensors.index.json"));
  std::set<std::string> shard_files;
  int64_t total = 0;
  for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
    shard_files.insert(it.value().get<std::string>());
  }
  for (const auto& sf : shard_files) {
    dpo::SafetensorsFile shard(d + "/" + sf);
    for (const auto& n : shard.names()) {
      total += shard.nbytes(n);
      EXPECT_EQ(index["weight_map"][n], sf);
      if (shard.names().size() > 1) {
        EXPECT_LE(shard.nbytes(n), 3000);
      }
    }
  }
  EXPECT_GT(shard_files.size(), 3u);
  EXPECT_EQ(index["weight_map"].size(), 21u);
  EXPECT_EQ(index["metadata"]["total_size"], total);
  char first[64];
  std::snprintf(first, sizeof first, "model-00001-of-%05zu.safetensors", shard_files.size());
  EXPECT_TRUE(shard_files.count(first)) << first;
  EXPECT_TRUE(torch::equal(dpo::llama_load(d, dpo::QuantOptions{})->forward(ids, mask), want));

  dpo::llama_save_hf(m, d, torch::kBFloat16, 0);
  EXPECT_FALSE(fs::exists(d + "/model.safetensors.index.json"));
  EXPECT_FALSE(fs::exists(d + "/" + std::string(first)));
  cj = json::parse(std::ifstream(d + "/config.json"));
  EXPECT_EQ(cj["torch_dtype"], "bfloat16");
  dpo::SafetensorsFile fb(d + "/model.safetensors");
  EXPECT_EQ(fb.dtype("model.layers.0.mlp.up_proj.weight"), torch::kBFloat16);
  torch::Tensor got = dpo::llama_load(d, dpo::QuantOptions{})->forward(ids, mask);
  EXPECT_FALSE(torch::equal(got, want));
  // bf16 moves every weight by <= u_bf16 relative. A logit depends on a chain of at most 16
  // weights, each scaling what it multiplies: the embedding, per layer q and k (the
  // scores), v, o, gate and up (their product), down, then the head; so it moves by
  // gamma_bf16(16) relative to the magnitudes the head combines, max |h| |W_head|^T, plus
  // the fp32 rounding of two evaluations.
  {
    torch::NoGradGuard ng;
    const double scale = dpo::testutil::abs_product(m->hidden_states(ids, mask), m->lm_head->weight.t()).max().item<double>();
    const double tol = dpo::testutil::gamma(16, torch::kBFloat16) + dpo::testutil::llama_rel_tolerance(m->config(), 6);
    EXPECT_LT((got - want).abs().max().item<double>(), tol * scale);
  }
  for (const auto& e : fs::directory_iterator(d))
    EXPECT_EQ(e.path().filename().string().find(".tmp."), std::string::npos) << e.path();

  // Tied models omit lm_head.weight, as transformers does.
  cfg.tie_word_embeddings = true;
  dpo::LlamaModel t = dpo::llama_init_random(cfg, 6, dpo::QuantOptions{});
  const std::string dt = dir.sub("tied");
  dpo::llama_save_hf(t, dt, torch::kFloat32, 0);
  EXPECT_FALSE(dpo::SafetensorsFile(dt + "/model.safetensors").has("lm_head.weight"));
  // Exact, as above.
  EXPECT_TRUE(torch::equal(dpo::llama_load(dt, dpo::QuantOptions{})->forward(ids, mask), t->forward(ids, mask)));
}

TEST(LlamaLoad, Nf4ProjectionsAndDequantizedSave) {
  // load_in_4bit quantizes the projections while loading (core/nf4): logits move
  // by the NF4 error only; saving writes the dequantized weights, which load
  // back densely to the same function.
  TempDir dir;
  Spec s;
  s.C = 64;
  s.F = 128;
  s.K = 2;
  Weights w = make_weights(s, 111);
  const std::string d = dir.sub("dense");
  write_model(d, config_json(s), w);
  dpo::QuantOptions q4;
  q4.load_in_4bit = true;
  dpo::LlamaModel dense = dpo::llama_load(d, dpo::QuantOptions{});
  dpo::LlamaModel nf4 = dpo::llama_load(d, q4);
  std::vector<std::vector<int64_t>> seqs = {tokens_of(8, s.V, 4), tokens_of(8, s.V, 5)};
  torch::Tensor ids = ids_tensor(seqs, 8), mask = mask_tensor(seqs, 8);
  torch::NoGradGuard ng;
  torch::Tensor ld = dense->forward(ids, mask), lq = nf4->forward(ids, mask);
  const double err = (ld - lq).abs().max().item<double>(), scale = ld.abs().max().item<double>();
  EXPECT_GT(err, 1e-4);
  EXPECT_LT(err, 0.3 * scale);
  const std::string back = dir.sub("back");
  dpo::llama_save_hf(nf4, back, torch::kFloat32, 0);
  torch::Tensor lb = dpo::llama_load(back, dpo::QuantOptions{})->forward(ids, mask);
  // The same weight values through dense products instead of linear4bit's blocks: the
  // tolerance of two fp32 evaluations.
  EXPECT_LE(rel_diff(lb, lq), dpo::testutil::llama_rel_tolerance(nf4->config(), 8));
}

// Qwen2 / Qwen3 / Mistral-with-head_dim through NF4 and back: the biases stay dense
// in the compute dtype (bitsandbytes Linear4bit keeps them), the q/k norms are
// loaded and saved, and the saved directory keeps its architecture.
TEST(LlamaLoad, Nf4AndSaveRoundTripOfEveryArchitecture) {
  std::vector<Spec> specs(3);
  specs[0].arch = "qwen2";
  specs[0].qkv_bias = true;
  specs[1].arch = "qwen3";
  specs[1].qk_norm = true;
  specs[1].head_dim = 16;
  specs[1].qkv_bias = specs[1].o_bias = true;
  specs[2].arch = "mistral";
  specs[2].head_dim = 4;
  uint32_t seed = 120;
  for (Spec s : specs) {
    SCOPED_TRACE(s.arch);
    s.C = 64;
    s.F = 128;
    s.K = 2;
    TempDir dir;
    Weights w = make_weights(s, ++seed);
    const std::string d = dir.sub("dense");
    write_model(d, config_json(s), w);
    dpo::QuantOptions q4;
    q4.load_in_4bit = true;
    dpo::LlamaModel dense = dpo::llama_load(d, dpo::QuantOptions{});
    dpo::LlamaModel nf4 = dpo::llama_load(d, q4);
    for (auto& [name, p] : nf4->named_projections()) {
      EXPECT_TRUE(p->is_4bit()) << name;
      const bool want_bias = w.count(name + ".bias") > 0;
      ASSERT_EQ(p->has_bias(), want_bias) << name;
      if (!want_bias) continue;
      EXPECT_EQ(p->bias().scalar_type(), torch::kFloat32) << name;
      EXPECT_TRUE(torch::equal(p->bias(), to_tensor(w.at(name + ".bias")))) << name;
    }
    std::vector<std::vector<int64_t>> seqs = {tokens_of(8, s.V, 4), tokens_of(8, s.V, 5)};
    torch::Tensor ids = ids_tensor(seqs, 8), mask = mask_tensor(seqs, 8);
    torch::NoGradGuard ng;
    torch::Tensor ld = dense->forward(ids, mask), lq = nf4->forward(ids, mask);
    const double err = (ld - lq).abs().max().item<double>(), scale = ld.abs().max().item<double>();
    EXPECT_GT(err, 1e-4);
    EXPECT_LT(err, 0.3 * scale);
    // Dense save -> load: the same function, the same architecture and tensor names.
    const std::string back = dir.sub("back");
    dpo::llama_save_hf(dense, back, torch::kFloat32, 0);
    json saved = json::parse(std::ifstream(back + "/config.json"));
    EXPECT_EQ(saved["model_type"], s.arch);
    EXPECT_EQ(saved["head_dim"], s.D());
    dpo::SafetensorsFile f(back + "/model.safetensors");
    const auto listed = f.names();
    std::set<std::string> names(listed.begin(), listed.end());
    for (const auto& [name, x] : w) EXPECT_TRUE(names.count(name)) << name << " not saved";
    EXPECT_EQ(names.size(), w.size());
    dpo::LlamaModel reloaded = dpo::llama_load(back, dpo::QuantOptions{});
    EXPECT_EQ(reloaded->config().arch, dense->config().arch);
    // Exact: the same fp32 weights through the same kernels, shapes and threads.
    EXPECT_TRUE(torch::equal(reloaded->forward(ids, mask), ld));
    // NF4 save (dequantized) -> dense load: the NF4 function, through dense products
    // instead of linear4bit's blocks (the tolerance of two fp32 evaluations).
    const std::string back4 = dir.sub("back4");
    dpo::llama_save_hf(nf4, back4, torch::kFloat32, 0);
    EXPECT_LE(rel_diff(dpo::llama_load(back4, dpo::QuantOptions{})->forward(ids, mask), lq),
              dpo::testutil::llama_rel_tolerance(nf4->config(), 8));
  }
}

TEST(LlamaConfig, SlidingWindowAsTransformersResolvesIt) {
  json mistral = config_json([] { Spec s; s.arch = "mistral"; return s; }());
  mistral.erase("sliding_window");  // MistralConfig's default: 4096
  EXPECT_EQ(dpo::llama_config_from_json(mistral).sliding_window, std::optional<int64_t>(4096));
  mistral["sliding_window"] = nullptr;
  EXPECT_FALSE(dpo::llama_config_from_json(mistral).sliding_window.has_value());
  mistral["sliding_window"] = 512;
  dpo::LlamaConfig c = dpo::llama_config_from_json(mistral);
  EXPECT_EQ(c.sliding_window, std::optional<int64_t>(512));
  EXPECT_NO_THROW(dpo::llama_check_max_length(c, 512, "m/config.json"));
  std::string msg = throw_message([&] { dpo::llama_check_max_length(c, 1024, "m/config.json"); });
  for (const char* n : {"m/config.json", "1024", "512", "sliding_window", "MistralForCausalLM", "max_length"})
    EXPECT_NE(msg.find(n), std::string::npos) << n << " not in: " << msg;
  EXPECT_EQ(dpo::llama_config_to_json(c)["sliding_window"], 512);

  for (const std::string arch : {"qwen2", "qwen3"}) {
    SCOPED_TRACE(arch);
    Spec s;
    s.arch = arch;
    s.qkv_bias = arch == "qwen2";
    s.qk_norm = arch == "qwen3";
    s.head_dim = 8;
    json j = config_json(s);  // L = 2 layers
    j["sliding_window"] = 256;
    j["use_sliding_window"] = false;
    j["max_window_layers"] = 0;
    EXPECT_FALSE(dpo::llama_config_from_json(j).sliding_window.has_value()) << "use_sliding_window false";
    j["use_sliding_window"] = true;
    EXPECT_EQ(dpo::llama_config_from_json(j).sliding_window, std::optional<int64_t>(256)) << "layers >= 0 slide";
    j["max_window_layers"] = 2;
    EXPECT_FALSE(dpo::llama_config_from_json(j).sliding_window.has_value()) << "no layer >= max_window_layers";
    j["layer_types"] = {"full_attention", "sliding_attention"};
    EXPECT_EQ(dpo::llama_config_from_json(j).sliding_window, std::optional<int64_t>(256)) << "layer_types wins";
    j["layer_types"] = {"full_attention", "full_attention"};
    j["max_window_layers"] = 0;
    EXPECT_FALSE(dpo::llama_config_from_json(j).sliding_window.has_value());
    j.erase("layer_types");
    j.erase("max_window_layers");  // default 28 > 2 layers
    EXPECT_FALSE(dpo::llama_config_from_json(j).sliding_window.has_value());
    j["max_window_layers"] = 1;
    j.erase("sliding_window");  // default 4096
    EXPECT_EQ(dpo::llama_config_from_json(j).sliding_window, std::optional<int64_t>(4096));
  }
  // Llama has no sliding window: the key is ignored, as transformers ignores it.
  json llama = config_json(Spec{});
  llama["sliding_window"] = 4;
  EXPECT_FALSE(dpo::llama_config_from_json(llama).sliding_window.has_value());
}

TEST(LlamaConfig, ArchitecturesDefaultsAndRoundTrip) {
  // Qwen3Config's head_dim defaults to 128 (not C / H); the biases follow each modeling file.
  json q3 = {{"architectures", {"Qwen3ForCausalLM"}}, {"hidden_size", 64}, {"intermediate_size", 128},
             {"num_hidden_layers", 2}, {"num_attention_heads", 2}, {"vocab_size", 100}};
  dpo::LlamaConfig c = dpo::llama_config_from_json(q3);
  EXPECT_EQ(c.arch, dpo::LlamaArch::kQwen3);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_TRUE(c.qk_norm);
  EXPECT_FALSE(c.attention_bias || c.qkv_bias || c.mlp_bias);
  json q2 = q3;
  q2["architectures"] = {"Qwen2ForCausalLM"};
  q2["attention_bias"] = true;  // not a Qwen2 field: Qwen2Attention always has q/k/v biases, never o
  c = dpo::llama_config_from_json(q2);
  EXPECT_EQ(c.arch, dpo::LlamaArch::kQwen2);
  EXPECT_EQ(c.head_dim, 32);
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_FALSE(c.attention_bias || c.qk_norm);
  for (dpo::LlamaArch a : {dpo::LlamaArch::kLlama, dpo::LlamaArch::kMistral, dpo::LlamaArch::kQwen2, dpo::LlamaArch::kQwen3}) {
    dpo::LlamaConfig x = c;
    x.raw = nullptr;
    x.arch = a;
    x.qkv_bias = a == dpo::LlamaArch::kQwen2;
    x.qk_norm = a == dpo::LlamaArch::kQwen3;
    x.attention_bias = a == dpo::LlamaArch::kLlama || a == dpo::LlamaArch::kQwen3;
    x.mlp_bias = a == dpo::LlamaArch::kLlama;
    x.head_dim = 16;
    x.sliding_window.reset();
    json j = dpo::llama_config_to_json(x);
    EXPECT_EQ(j["architectures"], json::array({dpo::llama_arch_class(a)}));
    EXPECT_EQ(j["model_type"], dpo::llama_arch_model_type(a));
    dpo::LlamaConfig back = dpo::llama_config_from_json(j);
    EXPECT_EQ(back.arch, a);
    EXPECT_EQ(back.head_dim, 16);
    EXPECT_EQ(back.qkv_bias, x.qkv_bias);
    EXPECT_EQ(back.qk_norm, x.qk_norm);
    EXPECT_EQ(back.attention_bias, x.attention_bias);
    EXPECT_EQ(back.mlp_bias, x.mlp_bias);
    EXPECT_FALSE(back.sliding_window.has_value()) << dpo::llama_arch_class(a);
  }
}

// ---------------------------------------------------------------------------
// Gradient checkpointing

TEST(Checkpointing, GenericMatchesDirectGradients) {
  torch::Tensor w = torch::tensor({0.5, -1.5, 2.0}, torch::kFloat64).requires_grad_(true);
  torch::Tensor x0 = torch::tensor({0.1, 0.2, 0.3}, torch::kFloat64);
  int calls = 0;
  auto fn = [&](const torch::Tensor& x) {
    ++calls;
    return torch::sin(x) * w;
  };
  torch::Tensor x = x0.clone().requires_grad_(true);
  torch::Tensor y = dpo::checkpoint(fn, x);
  EXPECT_FALSE(y.grad_fn() == nullptr);
  EXPECT_EQ(calls, 1);
  y.sum().backward();
  EXPECT_EQ(calls, 2);
  // d/dx sum(sin(x) w) = cos(x) w; d/dw = sin(x). In fp64 each side rounds a cos / sin
  // (1 ulp: 2u) and a product or two (u each): gamma(3) per side, 2 gamma(3) between them.
  const torch::Tensor cw = torch::cos(x0) * w.detach(), sx = torch::sin(x0);
  const double g3 = 2 * dpo::testutil::gamma(3, torch::kFloat64);
  dpo::testutil::expect_within(x.grad(), cw, g3 * cw.abs(), "dx");
  dpo::testutil::expect_within(w.grad(), sx, g3 * sx.abs(), "dw");
  // Input without grad: the parameters still get theirs.
  w.mutable_grad() = torch::Tensor();
  dpo::checkpoint(fn, x0).sum().backward();
  dpo::testutil::expect_within(w.grad(), sx, g3 * sx.abs(), "dw, x without grad");
  // Under no-grad it is just fn.
  torch::NoGradGuard ng;
  EXPECT_TRUE(dpo::checkpoint(fn, x0).grad_fn() == nullptr);
}

namespace {

struct GradRun {
  std::map<std::string, torch::Tensor> grads;
  double loss = 0;
  double next_random = 0;
  int hook_calls = 0;
};

// One forward + backward with a dropout inside every layer (through a trainable
// test parameter), all norms and the embeddings trainable.
GradRun grad_run(dpo::LlamaModel& m, bool ckpt, bool embed_trainable, uint64_t seed = 1234) {
  GradRun r;
  torch::Tensor p = torch::linspace(0.5, 1.5, m->config().hidden_size).requires_grad_(true);
  m->set_layer_hook([&](int64_t layer, const torch::Tensor& h) {
    ++r.hook_calls;
    return torch::dropout(h, 0.3, /*train=*/true) * p;
  });
  for (auto& it : m->named_parameters()) {
    const bool train = it.key().find("norm") != std::string::npos || (embed_trainable && it.key() == "model.embed_tokens.weight");
    it.value().set_requires_grad(train);
    it.value().mutable_grad() = torch::Tensor();
  }
  m->set_gradient_checkpointing(ckpt);
  std::vector<std::vector<int64_t>> seqs = {tokens_of(7, 64, 1), tokens_of(4, 64, 2)};
  torch::manual_seed(seed);
  torch::Tensor logits = m->forward(ids_tensor(seqs, 7), mask_tensor(seqs, 7));
  torch::Tensor wts = torch::linspace(-1, 1, logits.numel()).view(logits.sizes());
  torch::Tensor loss = (logits * wts).sum();
  loss.backward();
  r.loss = loss.item<double>();
  r.next_random = torch::rand({1}).item<double>();
  for (auto& it : m->named_parameters())
    if (it.value().grad().defined()) r.grads[it.key()] = it.value().grad().clone();
  r.grads["hook.p"] = p.grad().clone();
  m->set_layer_hook(nullptr);
  for (auto& it : m->named_parameters()) it.value().set_requires_grad(false);
  return r;
}

}  // namespace

TEST(Checkpointing, ModelGradsIdenticalWithDropout) {
  Spec s;
  s.K = 2;
  dpo::LlamaConfig cfg = dpo::llama_config_from_json(config_json(s));
  cfg.initializer_range = 0.2;
  dpo::LlamaModel m = dpo::llama_init_random(cfg, 77, dpo::QuantOptions{});
  for (bool embed : {true, false}) {
    GradRun plain = grad_run(m, false, embed);
    GradRun ck = grad_run(m, true, embed);
    EXPECT_EQ(plain.hook_calls, s.L);
    EXPECT_EQ(ck.hook_calls, 2 * s.L);  // each layer recomputed once in backward
    // Exact: the checkpointed forward runs the same ops on the same values.
    EXPECT_DOUBLE_EQ(plain.loss, ck.loss);
    EXPECT_DOUBLE_EQ(plain.next_random, ck.next_random);  // RNG state after backward as without recomputation
    ASSERT_EQ(plain.grads.size(), ck.grads.size());
    EXPECT_EQ(plain.grads.count("model.embed_tokens.weight"), embed ? 1u : 0u);
    EXPECT_EQ(plain.grads.size(), (embed ? 1u : 0u) + 2 * s.L + 1 + 1);
    for (const auto& [name, g] : plain.grads) {
      ASSERT_TRUE(ck.grads.count(name)) << name;
      EXPECT_GT(g.abs().max().item<double>(), 0) << name;
      // Exact, as the loss: the recomputed layers run the same backward ops on the same
      // values, and each gradient sums its contributions in the same order.
      EXPECT_TRUE(torch::equal(g, ck.grads[name])) << name;
    }
  }
  // Another seed draws other dropout masks and so other grads: without the
  // replayed RNG state the recomputation could not match.
  GradRun a = grad_run(m, false, false, 1234), b = grad_run(m, false, false, 999);
  EXPECT_NE(a.loss, b.loss);
  EXPECT_FALSE(torch::allclose(a.grads["hook.p"], b.grads["hook.p"], 1e-3, 1e-3));
}

TEST(Checkpointing, NoGradForwardSkipsRecomputation) {
  Spec s;
  dpo::LlamaConfig cfg = dpo::llama_config_from_json(config_json(s));
  dpo::LlamaModel m = dpo::llama_init_random(cfg, 3, dpo::QuantOptions{});
  int calls = 0;
  m->set_layer_hook([&](int64_t, const torch::Tensor& h) {
    ++calls;
    return h;
  });
  m->set_gradient_checkpointing(true);
  std::vector<std::vector<int64_t>> seqs = {tokens_of(5, 64, 1)};
  torch::Tensor with;
  {
    torch::NoGradGuard ng;
    with = m->forward(ids_tensor(seqs, 5), mask_tensor(seqs, 5));
  }
  m->set_gradient_checkpointing(false);
  torch::Tensor without = m->forward(ids_tensor(seqs, 5), mask_tensor(seqs, 5));
  EXPECT_TRUE(torch::equal(with, without));
  EXPECT_EQ(calls, 2 * s.L);
}
