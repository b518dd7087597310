// The 4-bit linear autograd function and FrozenLinear's dense / NF4 bases.
#include <gtest/gtest.h>

#include <map>

#include "core/linear.h"
#include "core/linear4bit.h"
#include "core/nf4.h"

namespace dpo {
namespace {

TEST(Linear4bit, ForwardIsXTimesDequantizedWeightTransposed) {
  torch::manual_seed(1);
  const Nf4Tensor w = nf4_quantize(torch::randn({24, 40}), false);
  const torch::Tensor x = torch::randn({2, 5, 40});
  const torch::Tensor y = linear4bit_forward(x, w);
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{2, 5, 24}));
  const torch::Tensor wd = nf4_dequantize(w, torch::kFloat32);
  EXPECT_TRUE(torch::allclose(y, torch::matmul(x, wd.t()), 1e-6, 1e-6));
}

TEST(Linear4bit, GradInputIsGradOutTimesDequantizedWeight) {
  torch::manual_seed(2);
  for (bool dq : {false, true}) {
    const Nf4Tensor w = nf4_quantize(torch::randn({24, 40}), dq);
    const torch::Tensor x = torch::randn({7, 40}).requires_grad_(true);
    const torch::Tensor g = torch::randn({7, 24});
    const torch::Tensor y = linear4bit_forward(x, w);
    y.backward(g);
    const torch::Tensor wd = nf4_dequantize(w, torch::kFloat32);
    ASSERT_TRUE(x.grad().defined());
    EXPECT_TRUE(torch::allclose(x.grad(), torch::matmul(g, wd), 1e-5, 1e-5));
  }
}

// The CPU path dequantizes W a block of rows at a time (~16 MiB; forced to 1, 3 or 7 of
// 10 rows here, a ragged last block included): forward and grad_x equal the one-block
// products, with and without double quantization; dequantizing a range of whole
// quantization blocks gives that slice of the full dequantization.
TEST(Linear4bit, BlocksOfRowsEqualTheWholeWeight) {
  torch::manual_seed(4);
  for (bool dq : {false, true}) {
    const Nf4Tensor w = nf4_quantize(torch::randn({10, 128}), dq);
    const torch::Tensor wd = nf4_dequantize(w, torch::kFloat32);
    std::vector<float> part(3 * 128);
    nf4_dequantize_range_into(w, 2 * 128, 5 * 128, part.data());
    EXPECT_TRUE(torch::equal(torch::from_blob(part.data(), {3, 128}), wd.narrow(0, 2, 3)));
    EXPECT_THROW(nf4_dequantize_range_into(w, 32, 128, part.data()), std::runtime_error);  // not whole blocks
    const torch::Tensor x = torch::randn({2, 6, 128});
    const torch::Tensor g = torch::randn({2, 6, 10});
    for (int64_t rows : {1, 3, 7}) {
      detail::set_linear4bit_rows_per_block(rows);
      torch::Tensor xi = x.clone().requires_grad_(true);
      torch::Tensor y = linear4bit_forward(xi, w);
      y.backward(g);
      detail::set_linear4bit_rows_per_block(0);
      EXPECT_EQ(y.sizes(), (std::vector<int64_t>{2, 6, 10}));
      EXPECT_TRUE(torch::allclose(y, torch::matmul(x, wd.t()), 1e-6, 1e-6)) << rows;
      EXPECT_TRUE(torch::allclose(xi.grad(), torch::matmul(g, wd), 1e-5, 1e-5)) << rows;
    }
  }
}

TEST(Linear4bit, GradInputMatchesFiniteDifferences) {
  torch::manual_seed(3);
  const Nf4Tensor w = nf4_quantize(torch::randn({6, 64}), true);
  const torch::Tensor x0 = torch::randn({3, 64});
  const torch::Tensor g = torch::randn({3, 6});
  torch::Tensor x = x0.clone().requires_grad_(true);
  (linear4bit_forward(x, w) * g).sum().backward();
  const torch::Tensor grad = x.grad();
  torch::NoGradGuard no_grad;
  const float h = 1e-2f;
  for (int64_t i : {0, 7, 63}) {
    for (int64_t r : {0, 2}) {
      torch::Tensor xp = x0.clone(), xm = x0.clone();
      xp[r][i] += h;
      xm[r][i] -= h;
      const double fd = ((linear4bit_forward(xp, w) * g).sum().item<double>() -
                         (linear4bit_forward(xm, w) * g).sum().item<double>()) / (2 * h);
      EXPECT_NEAR(grad[r][i].item<double>(), fd, 1e-2 * std::max(1.0, std::fabs(fd))) << r << "," << i;
    }
  }
}

TEST(Linear4bit, ShapeAndDeviceErrors) {
  const Nf4Tensor w = nf4_quantize(torch::randn({4, 64}), false);
  EXPECT_THROW(linear4bit_forward(torch::randn({2, 63}), w), std::runtime_error);
  const Nf4Tensor v = nf4_quantize(torch::randn({256}), false);
  EXPECT_THROW(linear4bit_forward(torch::randn({2, 256}), v), std::runtime_error);
}

TEST(Linear4bit, BackwardDequantizesAgainInsteadOfSavingTheDenseWeight) {
  // Overwrite the packed codes between forward and backward: a backward that kept a
  // dense copy of W from the forward would not see the change.
  torch::manual_seed(8);
  Nf4Tensor w = nf4_quantize(torch::randn({64, 128}), false);
  const torch::Tensor x = torch::randn({3, 128}).requires_grad_(true);
  const torch::Tensor g = torch::randn({3, 64});
  const torch::Tensor y = linear4bit_forward(x, w);
  EXPECT_EQ(w.packed.use_count(), 2);  // w + the graph's saved_data: referenced, not copied
  {
    torch::NoGradGuard no_grad;
    w.packed.fill_(0xFF);  // every code -> 1.0: W[o][i] = absmax of its block
  }
  y.backward(g);
  const torch::Tensor w_now = w.absmax.repeat_interleave(64).reshape({64, 128});
  EXPECT_TRUE(torch::allclose(x.grad(), torch::matmul(g, w_now), 1e-5, 1e-5));
}

// ---- FrozenLinear ------------------------------------------------------------

TensorLookup lookup_of(const std::map<std::string, torch::Tensor>& m) {
  return [&m](const std::string& k) -> std::optional<torch::Tensor> {
    auto it = m.find(k);
    if (it == m.end()) return std::nullopt;
    return it->second;
  };
}

TEST(FrozenLinear, DenseForward) {
  torch::manual_seed(4);
  FrozenLinear lin(32, 16);
  const torch::Tensor w = torch::randn({16, 32});
  lin->set_weight(w, QuantOptions{});
  EXPECT_FALSE(lin->is_4bit());
  const torch::Tensor x = torch::randn({3, 32});
  EXPECT_TRUE(torch::allclose(lin->forward(x), torch::matmul(x, w.t())));
  EXPECT_TRUE(torch::equal(lin->dense_weight(), w));
  EXPECT_TRUE(lin->parameters().empty());
  EXPECT_THROW(lin->set_weight(torch::randn({32, 16}), QuantOptions{}), std::runtime_error);
}

TEST(FrozenLinear, Nf4ForwardEqualsXTimesDequantizedWeight) {
  torch::manual_seed(5);
  for (bool dq : {false, true}) {
    FrozenLinear lin(128, 48);
    QuantOptions q;
    q.load_in_4bit = true;
    q.double_quant = dq;
    const torch::Tensor w = torch::randn({48, 128});
    lin->set_weight(w, q);
    ASSERT_TRUE(lin->is_4bit());
    EXPECT_EQ(lin->nf4_weight().double_quant(), dq);
    const torch::Tensor wd = nf4_dequantize(nf4_quantize(w, dq), torch::kFloat32);
    EXPECT_TRUE(torch::equal(lin->dense_weight(), wd));
    const torch::Tensor x = torch::randn({2, 3, 128});
    EXPECT_TRUE(torch::allclose(lin->forward(x), torch::matmul(x, wd.t()), 1e-6, 1e-6));
    EXPECT_TRUE(lin->parameters().empty());
  }
}

TEST(FrozenLinear, LoadsDenseQuantizesAndPrequantized) {
  torch::manual_seed(6);
  const torch::Tensor w = torch::randn({48, 128});
  std::map<std::string, torch::Tensor> dense{{"m.q_proj.weight", w}};
  QuantOptions q4;
  q4.load_in_4bit = true;
  q4.double_quant = true;

  FrozenLinear a(128, 48);
  a->load(lookup_of(dense), "m.q_proj", q4);  // dense checkpoint, quantized on load
  ASSERT_TRUE(a->is_4bit());

  // base_state exports the bitsandbytes layout; loading it back gives the same weights.
  const auto state = a->base_state("m.q_proj");
  const std::map<std::string, torch::Tensor> bnb(state.begin(), state.end());
  EXPECT_TRUE(bnb.count("m.q_proj.weight.absmax"));
  EXPECT_TRUE(bnb.count("m.q_proj.weight.nested_absmax"));
  FrozenLinear b(128, 48);
  b->load(lookup_of(bnb), "m.q_proj", q4);
  ASSERT_TRUE(b->is_4bit());
  EXPECT_TRUE(torch::equal(a->dense_weight(), b->dense_weight()));

  // Prequantized but load_in_4bit=false: dequantized into a dense base.
  FrozenLinear c(128, 48);
  c->load(lookup_of(bnb), "m.q_proj", QuantOptions{});
  EXPECT_FALSE(c->is_4bit());
  EXPECT_TRUE(torch::equal(c->dense_weight(), a->dense_weight()));
  const auto cs = c->base_state("m.q_proj");
  ASSERT_EQ(cs.size(), 1u);
  EXPECT_EQ(cs[0].first, "m.q_proj.weight");

  // Shape mismatch names the tensor.
  FrozenLinear d(64, 48);
  try {
    d->load(lookup_of(bnb), "m.q_proj", q4);
    ADD_FAILURE() << "expected a shape error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("m.q_proj.weight"), std::string::npos) << e.what();
  }
  try {
    d->load(lookup_of(dense), "m.q_proj", q4);
    ADD_FAILURE() << "expected a shape error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("m.q_proj.weight"), std::string::npos) << e.what();
  }
  try {
    d->load(lookup_of(dense), "m.k_proj", q4);
    ADD_FAILURE() << "expected a missing-tensor error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("m.k_proj.weight"), std::string::npos) << e.what();
  }
}

TEST(FrozenLinear, GradientFlowsToInputOnly) {
  torch::manual_seed(7);
  FrozenLinear lin(64, 32);
  QuantOptions q;
  q.load_in_4bit = true;
  lin->set_weight(torch::randn({32, 64}), q);
  const torch::Tensor x = torch::randn({4, 64}).requires_grad_(true);
  const torch::Tensor g = torch::randn({4, 32});
  lin->forward(x).backward(g);
  EXPECT_TRUE(torch::allclose(x.grad(), torch::matmul(g, lin->dense_weight()), 1e-5, 1e-5));
}

TEST(FrozenLinear, ToDtypeKeepsTheNf4DataAndChangesTheComputeDtype) {
  torch::manual_seed(9);
  FrozenLinear lin(64, 32);
  QuantOptions q;
  q.load_in_4bit = true;
  const torch::Tensor w = torch::randn({32, 64});
  lin->set_weight(w, q);
  const std::vector<uint8_t> before(lin->nf4_weight().packed.data_ptr<uint8_t>(),
                                    lin->nf4_weight().packed.data_ptr<uint8_t>() + lin->nf4_weight().packed.numel());
  const torch::Tensor x = torch::randn({3, 64});
  const torch::Tensor y32 = lin->forward(x);
  lin->to(torch::kBFloat16);
  EXPECT_EQ(lin->nf4_weight().packed.scalar_type(), torch::kUInt8);
  EXPECT_EQ(std::vector<uint8_t>(lin->nf4_weight().packed.data_ptr<uint8_t>(),
                                 lin->nf4_weight().packed.data_ptr<uint8_t>() + lin->nf4_weight().packed.numel()),
            before);
  const torch::Tensor y16 = lin->forward(x.to(torch::kBFloat16));
  EXPECT_EQ(y16.scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::allclose(y16.to(torch::kFloat32), y32, 0.05, 0.1));
  EXPECT_THROW(lin->to(torch::kFloat64), std::runtime_error);

  FrozenLinear dense(64, 32);
  dense->set_weight(w, QuantOptions{});
  dense->to(torch::kFloat64);
  EXPECT_EQ(dense->forward(x.to(torch::kFloat64)).scalar_type(), torch::kFloat64);
  EXPECT_EQ(dense->dense_weight().scalar_type(), torch::kFloat64);
}

}  // namespace
}  // namespace dpo
