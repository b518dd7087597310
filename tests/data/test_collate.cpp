// collate_pairs / collate_sft: shapes, row layout [chosen; rejected], right padding
// with pad_id, attention and loss masks position by position, reference log-probs,
// empty batches.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "data/collate.h"
#include "data/tokenizer_info.h"
#include "tests/test_util.h"

namespace dpo {
namespace {

PreferenceExample ex(int64_t index, std::vector<int32_t> p, std::vector<int32_t> c, std::vector<int32_t> r) {
  PreferenceExample e;
  e.index = index;
  e.prompt = std::move(p);
  e.chosen = std::move(c);
  e.rejected = std::move(r);
  return e;
}

std::vector<int64_t> row(const torch::Tensor& t, int64_t i) {
  auto r = t[i].contiguous();
  return std::vector<int64_t>(r.data_ptr<int64_t>(), r.data_ptr<int64_t>() + r.numel());
}
std::vector<float> rowf(const torch::Tensor& t, int64_t i) {
  auto r = t[i].contiguous();
  return std::vector<float>(r.data_ptr<float>(), r.data_ptr<float>() + r.numel());
}

TEST(Collate, PairsLayoutPaddingAndMasks) {
  const int64_t pad = 2;
  std::vector<PreferenceExample> b = {ex(4, {1, 10, 11}, {20, 2}, {30, 31, 32, 2}),
                                      ex(9, {1, 12}, {21, 22, 23, 24, 2}, {33, 2})};
  PreferenceBatch pb = collate_pairs(b, pad);
  EXPECT_EQ(pb.num_pairs, 2);
  // T = max(3+2, 3+4, 2+5, 2+2) = 7
  ASSERT_EQ(pb.input_ids.sizes(), (std::vector<int64_t>{4, 7}));
  EXPECT_EQ(pb.input_ids.scalar_type(), torch::kInt64);
  EXPECT_EQ(pb.attention_mask.scalar_type(), torch::kInt64);
  EXPECT_EQ(pb.loss_mask.scalar_type(), torch::kFloat32);
  EXPECT_EQ(pb.loss_mask.sizes(), pb.input_ids.sizes());
  // rows: chosen 0, chosen 1, rejected 0, rejected 1
  EXPECT_EQ(row(pb.input_ids, 0), (std::vector<int64_t>{1, 10, 11, 20, 2, pad, pad}));
  EXPECT_EQ(row(pb.input_ids, 1), (std::vector<int64_t>{1, 12, 21, 22, 23, 24, 2}));
  EXPECT_EQ(row(pb.input_ids, 2), (std::vector<int64_t>{1, 10, 11, 30, 31, 32, 2}));
  EXPECT_EQ(row(pb.input_ids, 3), (std::vector<int64_t>{1, 12, 33, 2, pad, pad, pad}));
  EXPECT_EQ(row(pb.attention_mask, 0), (std::vector<int64_t>{1, 1, 1, 1, 1, 0, 0}));
  EXPECT_EQ(row(pb.attention_mask, 1), (std::vector<int64_t>{1, 1, 1, 1, 1, 1, 1}));
  EXPECT_EQ(row(pb.attention_mask, 3), (std::vector<int64_t>{1, 1, 1, 1, 0, 0, 0}));
  EXPECT_EQ(rowf(pb.loss_mask, 0), (std::vector<float>{0, 0, 0, 1, 1, 0, 0}));
  EXPECT_EQ(rowf(pb.loss_mask, 1), (std::vector<float>{0, 0, 1, 1, 1, 1, 1}));
  EXPECT_EQ(rowf(pb.loss_mask, 2), (std::vector<float>{0, 0, 0, 1, 1, 1, 1}));
  EXPECT_EQ(rowf(pb.loss_mask, 3), (std::vector<float>{0, 0, 1, 1, 0, 0, 0}));
  EXPECT_FALSE(pb.ref_logps.defined());
  // Answer tokens counted by the mask = chosen/rejected lengths.
  EXPECT_EQ(pb.loss_mask.sum().item<float>(), 2 + 5 + 4 + 2);
}

TEST(Collate, RefLogpsAllOrNone) {
  std::vector<PreferenceExample> b = {ex(0, {1}, {5, 2}, {6, 2}), ex(1, {1, 7}, {5, 2}, {6, 6, 2})};
  b[0].ref_chosen = -1.5;
  b[0].ref_rejected = -2.5;
  b[1].ref_chosen = -3.25;
  b[1].ref_rejected = -4.0;
  PreferenceBatch pb = collate_pairs(b, 0);
  ASSERT_TRUE(pb.ref_logps.defined());
  EXPECT_EQ(pb.ref_logps.scalar_type(), torch::kFloat64);
  ASSERT_EQ(pb.ref_logps.numel(), 4);
  const double* r = pb.ref_logps.data_ptr<double>();
  EXPECT_EQ(r[0], -1.5);
  EXPECT_EQ(r[1], -3.25);
  EXPECT_EQ(r[2], -2.5);
  EXPECT_EQ(r[3], -4.0);
  b[1].ref_rejected = std::nan("");
  EXPECT_THROW(collate_pairs(b, 0), std::invalid_argument);
  EXPECT_THROW(collate_pairs(b, -1), std::invalid_argument);
}

TEST(Collate, EmptyBatch) {
  PreferenceBatch pb = collate_pairs({}, 0);
  EXPECT_EQ(pb.num_pairs, 0);
  EXPECT_EQ(pb.input_ids.size(0), 0);
  EXPECT_EQ(pb.input_ids.dim(), 2);
  EXPECT_FALSE(pb.ref_logps.defined());
  SftBatch sb = collate_sft({}, 0);
  EXPECT_EQ(sb.num_rows, 0);
  EXPECT_EQ(sb.input_ids.size(0), 0);
}

TEST(Collate, SftUsesPromptAndChosenOnly) {
  std::vector<PreferenceExample> b = {ex(0, {1, 10}, {20, 21, 2}, {30, 31, 32, 33, 34, 35, 2}),
                                      ex(1, {1, 11, 12, 13}, {22, 2}, {36, 2})};
  SftBatch sb = collate_sft(b, 0);
  EXPECT_EQ(sb.num_rows, 2);
  ASSERT_EQ(sb.input_ids.sizes(), (std::vector<int64_t>{2, 6}));  // rejected does not set T
  EXPECT_EQ(row(sb.input_ids, 0), (std::vector<int64_t>{1, 10, 20, 21, 2, 0}));
  EXPECT_EQ(row(sb.input_ids, 1), (std::vector<int64_t>{1, 11, 12, 13, 22, 2}));
  EXPECT_EQ(row(sb.attention_mask, 0), (std::vector<int64_t>{1, 1, 1, 1, 1, 0}));
  EXPECT_EQ(rowf(sb.loss_mask, 0), (std::vector<float>{0, 0, 1, 1, 1, 0}));
  EXPECT_EQ(rowf(sb.loss_mask, 1), (std::vector<float>{0, 0, 0, 0, 1, 1}));
}

// This executable links libtorch: TokenizerInfo (and the test tokenizer helper) must
// work here without libsentencepiece.
TEST(Collate, TokenizerInfoInALibtorchProcess) {
  testutil::TempDir dir;
  const std::string model = train_test_tokenizer(dir.path(), 300);
  TokenizerInfo info(model);
  EXPECT_EQ(info.vocab_size(), 300);
  EXPECT_EQ(info.unk_id(), 0);
  EXPECT_EQ(info.bos_id(), 1);
  EXPECT_EQ(info.eos_id(), 2);
  EXPECT_EQ(info.model_pad_id(), -1);
  EXPECT_EQ(info.pad_id(), 2);
  std::string out;
  ASSERT_EQ(testutil::run_command("sha256sum " + model, &out), 0);
  EXPECT_EQ(info.sha256(), out.substr(0, 64));
}

}  // namespace
}  // namespace dpo
