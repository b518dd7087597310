// The 4-bit linear autograd function and FrozenLinear's dense / NF4 bases.
#include <gtest/gtest.h>

#include <map>

#include "core/linear.h"
#include "core/linear4bit.h"
#include "core/nf4.h"
#include "tests/fp_bounds.h"

namespace dpo {
namespace {

using testutil::expect_within;
using testutil::matmul_error_bound;

// The products below run in another blocking / kernel than torch::matmul (a block of W's
// rows at a time, strided outputs, addmm over blocks): each is compared with the float64
// product of the same fp32 operands within Higham's bound gamma(K) |A| |B| for any
// summation order (tests/fp_bounds.h).
torch::Tensor mm64(const torch::Tensor& a, const torch::Tensor& b) {
  return torch::matmul(a.to(torch::kFloat64), b.to(torch::kFloat64));
}

TEST(Linear4bit, ForwardIsXTimesDequantizedWeightTransposed) {
  torch::manual_seed(1);
  const Nf4Tensor w = nf4_quantize(torch::randn({24, 40}), false);
  const torch::Tensor x = torch::randn({2, 5, 40});
  const torch::Tensor y = linear4bit_forward(x, w);
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{2, 5, 24}));
  const torch::Tensor wd = nf4_dequantize(w, torch::kFloat32);
  expect_within(y, mm64(x, wd.t()), matmul_error_bound(x, wd.t()), "y");
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
    expect_within(x.grad(), mm64(g, wd), matmul_error_bound(g, wd), dq ? "grad_x, double quant" : "grad_x");
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
    // Exact: each weight is code * absmax, one product per element whatever the range.
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
      const std::string what = std::to_string(rows) + " rows per block" + (dq ? ", double quant" : "");
      expect_within(y, mm64(x, wd.t()), matmul_error_bound(x, wd.t()), "y, " + what);
      expect_within(xi.grad(), mm64(g, wd), matmul_error_bound(g, wd), "grad_x, " + what);
    }
  }
}

TEST(Linear4bit, GradInputMatchesFiniteDifferences) {
  torch::manual_seed(3);
  const Nf4Tensor w = nf4_quantize(torch::randn({6, 64}), true);
  const torch::Tensor wd = nf4_dequantize(w, torch::kFloat32);
  const torch::Tensor x0 = torch::randn({3, 64});
  const torch::Tensor g = torch::randn({3, 6});
  torch::Tensor x = x0.clone().requires_grad_(true);
  (linear4bit_forward(x, w) * g).sum().backward();
  const torch::Tensor grad = x.grad();
  const torch::Tensor grad_bound = matmul_error_bound(g, wd);  // grad = g @ W in fp32
  torch::NoGradGuard no_grad;
  // f(x) = sum(g * (x @ W^T)) is linear in x: a central difference has no truncation error
  // for any step, only f's rounding divided by the step, so the step is large. f's bound:
  // each y = x @ W^T within gamma(64) |x| |W|^T, then 18 products g y summed (gamma(18)).
  auto f = [&](const torch::Tensor& xv, double* bound) {
    const torch::Tensor y = linear4bit_forward(xv, w);
    *bound = (g.abs().to(torch::kFloat64) * matmul_error_bound(xv, wd.t())).sum().item<double>() +
             testutil::gamma(18) * (g * y).abs().sum().item<double>();
    return (y * g).sum().item<double>();
  };
  const float h = 1.0f;
  for (int64_t i : {0, 7, 63}) {
    for (int64_t r : {0, 2}) {
      torch::Tensor xp = x0.clone(), xm = x0.clone();
      xp[r][i] += h;
      xm[r][i] -= h;
      double bp = 0, bm = 0;
      const double fp = f(xp, &bp), fm = f(xm, &bm);
      const double step = xp[r][i].item<double>() - xm[r][i].item<double>();  // as rounded: exact in double
      const double fd = (fp - fm) / step;
      EXPECT_NEAR(grad[r][i].item<double>(), fd, (bp + bm) / step + grad_bound[r][i].item<double>()) << r << "," << i;
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
  expect_within(x.grad(), mm64(g, w_now), matmul_error_bound(g, w_now), "grad_x");
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
  expect_within(lin->forward(x), mm64(x, w.t()), matmul_error_bound(x, w.t()), "y");
  EXPECT_TRUE(torch::equal(lin->dense_weight(), w));  // a copy
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
    EXPECT_TRUE(torch::equal(lin->dense_weight(), wd));  // the same quantization of the same values
    const torch::Tensor x = torch::randn({2, 3, 128});
    expect_within(lin->forward(x), mm64(x, wd.t()), matmul_error_bound(x, wd.t()), dq ? "y, double quant" : "y");
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
  const torch::Tensor wd = lin->dense_weight();
  expect_within(x.grad(), mm64(g, wd), matmul_error_bound(g, wd), "grad_x");
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
  // y16 = bf16(x) @ bf16(W)^T on a bf16 GEMM that accumulates in fp32 and rounds its output
  // to bf16 once (oneDNN, ATen's cpublas): rounding x and W costs gamma_bf16(2) |x| |W|^T,
  // each fp32 accumulation (y16's and y32's) gamma_fp32(64) |x| |W|^T (times 1 + gamma_bf16(2)
  // for the rounded operands), the output rounding u_bf16 |y|.
  const torch::Tensor wd = nf4_dequantize(lin->nf4_weight(), torch::kFloat32);
  const torch::Tensor xw = testutil::abs_product(x, wd.t());
  const double g2 = testutil::gamma(2, torch::kBFloat16);
  const torch::Tensor e = (g2 + testutil::gamma(64) * (2 + g2)) * xw;
  expect_within(y16, y32, e + testutil::unit_roundoff(torch::kBFloat16) * (y32.abs().to(torch::kFloat64) + e), "y bf16");
  EXPECT_THROW(lin->to(torch::kFloat64), std::runtime_error);

  FrozenLinear dense(64, 32);
  dense->set_weight(w, QuantOptions{});
  dense->to(torch::kFloat64);
  EXPECT_EQ(dense->forward(x.to(torch::kFloat64)).scalar_type(), torch::kFloat64);
  EXPECT_EQ(dense->dense_weight().scalar_type(), torch::kFloat64);
}

}  // namespace
}  // namespace dpo
