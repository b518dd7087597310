// Fuzzes the tokenizer.json loader and encoder (data/hf_tokenizer.h): the JSON layout
// checks, the vocabulary / merges / added-token tables, the normalizers and
// pre-tokenizers, then encoding. Input: tokenizer.json text, then optionally '\0' and
// the text to encode (default: a few fixed strings: ASCII, multi-byte UTF-8, an
// added-token-like marker).
// Checked: loading returns a tokenizer or throws std::runtime_error (the one-line
// "FILE: /json/path: ..." error); encoding returns ids in [0, vocab_size) or throws
// std::runtime_error (invalid UTF-8); encoding twice gives the same ids; token_to_id of
// an id's own token string gives that id back.
#include <string>
#include <vector>

#include "data/hf_tokenizer.h"
#include "tests/fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string in(reinterpret_cast<const char*>(data), size);
  const size_t z = in.find('\0');
  const std::string json_text = in.substr(0, z);
  std::vector<std::string> texts;
  if (z != std::string::npos) {
    texts.push_back(in.substr(z + 1));
  } else {
    texts = {"Hello world, 123!", "  two  spaces\n\ttab", "caf\xC3\xA9 \xE2\x96\x81 \xF0\x9F\x98\x80", "<s>a</s><|end|>b"};
  }
  std::unique_ptr<dpo::HfTokenizer> t;
  try {
    t = dpo::HfTokenizer::from_string(json_text, "fuzz.json");
  } catch (const std::runtime_error&) {
    return 0;  // the contract: a one-line user error
  } catch (const std::exception& e) {
    fuzz::fail(std::string("load: escaped ") + fuzz::current_exception_type() + ": " + e.what());
  } catch (...) {
    fuzz::fail("load: escaped a non-std exception " + fuzz::current_exception_type());
  }
  const int64_t V = t->vocab_size();
  if (V <= 0) fuzz::fail("a loaded tokenizer with vocab_size " + std::to_string(V));
  for (const auto& text : texts) {
    try {
      std::vector<int32_t> a, b;
      t->encode(text, &a);
      t->encode(text, &b);
      if (a != b) fuzz::fail("two encodings of one text differ");
      for (int32_t id : a) {
        if (id < 0 || id >= V)
          fuzz::fail("id " + std::to_string(id) + " outside [0, " + std::to_string(V) + ")");
        const std::string tok = t->id_to_token(id);
        if (tok.empty()) fuzz::fail("id " + std::to_string(id) + " has no token string");
      }
    } catch (const std::runtime_error&) {
      // invalid UTF-8 in the text, or a text the model cannot encode (no unk, no byte fallback)
    } catch (const std::exception& e) {
      fuzz::fail(std::string("encode: escaped ") + fuzz::current_exception_type() + ": " + e.what());
    } catch (...) {
      fuzz::fail("encode: escaped a non-std exception " + fuzz::current_exception_type());
    }
  }
  return 0;
}
