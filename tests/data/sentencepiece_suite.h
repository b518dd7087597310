// A GoogleTest fixture whose suite shares one test sentencepiece model (trained once per
// suite: train_test_tokenizer) and a processor of it, for the independent expectations of
// the preprocessing tests (sentencepiece itself, bos/eos added by hand).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <sentencepiece_processor.h>

#include "tests/test_util.h"

namespace dpo::testutil {

template <int kVocab>
class SentencepieceSuite : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir("dpo_sp_suite");
    model_ = train_test_tokenizer(dir_->path(), kVocab);
    sp_ = new sentencepiece::SentencePieceProcessor();
    ASSERT_TRUE(sp_->Load(model_).ok());
  }
  static void TearDownTestSuite() {
    delete sp_;
    delete dir_;
  }
  static std::vector<int32_t> enc(const std::string& s) { return sp_->EncodeAsIds(s); }

  TempDir tmp_;                                        // per test
  static inline TempDir* dir_ = nullptr;               // holds the model
  static inline std::string model_;                    // its tokenizer.model
  static inline sentencepiece::SentencePieceProcessor* sp_ = nullptr;
};

}  // namespace dpo::testutil
