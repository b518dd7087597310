// tokenizer.json encoding, following huggingface/tokenizers (Rust) step by step:
//   1. added tokens with normalized=false are split out of the raw text
//      (AddedVocabulary::extract_and_normalize: leftmost-longest matching, then the
//      single_word / lstrip / rstrip rules of find_matches);
//   2. every other stretch is normalized, then split on the normalized added tokens;
//   3. the pre-tokenizer chain cuts each stretch into words (PreTokenizedString::split);
//   4. the BPE model turns each word into ids (BPE::tokenize_with_cache, merge_word,
//      Word::merge_all with its priority queue of (rank, position)).
// Byte-level pre-tokenization is applied lazily: words stay raw bytes until the model
// maps each byte to its vocabulary symbol (bytes_char), so the word cache is keyed by
// raw bytes and a cache hit never builds the mapped string.
#include "data/hf_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <limits>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include "data/sha256.h"
#include "util/json_read.h"

namespace dpo {
namespace {

using json = nlohmann::json;

// ---------------------------------------------------------------------------
// UTF-8

// Length of the valid UTF-8 sequence starting at s[i] (1..4), 0 when invalid
// (overlong forms, surrogates and code points above U+10FFFF are invalid, as in Rust).
size_t utf8_valid_len(std::string_view s, size_t i) {
  const uint8_t c = uint8_t(s[i]);
  if (c < 0x80) return 1;
  size_t n;
  uint32_t cp;
  if (c >= 0xC2 && c <= 0xDF) n = 2, cp = c & 0x1F;
  else if (c >= 0xE0 && c <= 0xEF) n = 3, cp = c & 0x0F;
  else if (c >= 0xF0 && c <= 0xF4) n = 4, cp = c & 0x07;
  else return 0;
  if (i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k) {
    const uint8_t d = uint8_t(s[i + k]);
    if ((d & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (d & 0x3F);
  }
  if ((n == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
    return 0;
  return n;
}

// Byte offset of the first invalid sequence, npos when `s` is valid UTF-8.
size_t utf8_invalid_at(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    // ASCII runs 8 bytes at a time.
    while (i + 8 <= s.size()) {
      uint64_t w;
      std::memcpy(&w, s.data() + i, 8);
      if (w & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= s.size()) break;
    const size_t n = utf8_valid_len(s, i);
    if (n == 0) return i;
    i += n;
  }
  return std::string_view::npos;
}

inline size_t utf8_len(uint8_t c) { return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4; }

// Decodes the (valid) code point at s[i].
uint32_t utf8_decode(std::string_view s, size_t i) {
  const uint8_t c = uint8_t(s[i]);
  const size_t n = utf8_len(c);
  uint32_t cp = n == 1 ? c : n == 2 ? (c & 0x1F) : n == 3 ? (c & 0x0F) : (c & 0x07);
  for (size_t k = 1; k < n; ++k) cp = (cp << 6) | (uint8_t(s[i + k]) & 0x3F);
  return cp;
}

// The code point ending at s[end) (valid UTF-8 assumed), and its start.
uint32_t utf8_decode_before(std::string_view s, size_t end, size_t* start) {
  size_t i = end - 1;
  while (i > 0 && (uint8_t(s[i]) & 0xC0) == 0x80) --i;
  *start = i;
  return utf8_decode(s, i);
}

void utf8_append(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(char(cp));
  } else if (cp < 0x800) {
    out->push_back(char(0xC0 | (cp >> 6)));
    out->push_back(char(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(char(0xE0 | (cp >> 12)));
    out->push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(char(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(char(0xF0 | (cp >> 18)));
    out->push_back(char(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(char(0x80 | (cp & 0x3F)));
  }
}

// Rust's char::is_whitespace / regex \s (Unicode White_Space).
bool is_white_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// Rust regex \w: Alphabetic, marks, decimal digits, connector punctuation, join
// controls. Alphabetic is taken as letters + letter numbers (+ the marks, included
// anyway); the few Other_Alphabetic symbols (circled letters) are not word characters here.
bool is_word_char(uint32_t c) {
  if (c < 0x80) return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
  if (c == 0x200C || c == 0x200D) return true;
  switch (utf8proc_category(utf8proc_int32_t(c))) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT: case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_NL: case UTF8PROC_CATEGORY_MN: case UTF8PROC_CATEGORY_MC:
    case UTF8PROC_CATEGORY_ME: case UTF8PROC_CATEGORY_ND: case UTF8PROC_CATEGORY_PC:
      return true;
    default:
      return false;
  }
}

bool is_ascii(std::string_view s) {
  for (char c : s)
    if (uint8_t(c) >= 0x80) return false;
  return true;
}

// ---------------------------------------------------------------------------
// Hash tables without per-lookup allocation.

inline uint64_t hash_bytes(std::string_view s) {
  // FNV-1a over 8-byte words, finished with a multiply-xorshift.
  uint64_t h = 0xcbf29ce484222325ull ^ s.size();
  size_t i = 0;
  for (; i + 8 <= s.size(); i += 8) {
    uint64_t w;
    std::memcpy(&w, s.data() + i, 8);
    h = (h ^ w) * 0x100000001b3ull;
    h ^= h >> 29;
  }
  uint64_t tail = 0;
  std::memcpy(&tail, s.data() + i, s.size() - i);
  h = (h ^ tail) * 0x9E3779B97F4A7C15ull;
  return h ^ (h >> 32);
}

// string -> int32 (open addressing; strings in one arena).
class StrTable {
 public:
  void reserve(size_t n) {
    size_t cap = 16;
    while (cap < n * 2) cap <<= 1;
    slots_.assign(cap, Slot{});
    mask_ = cap - 1;
  }
  // Inserts or overwrites; returns true when the key was new.
  bool put(std::string_view k, int32_t v) {
    if ((size_ + 1) * 2 > slots_.size()) grow();
    const uint64_t h = hash_bytes(k);
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
      Slot& s = slots_[i];
      if (s.val == kEmpty) {
        s = Slot{h, uint32_t(arena_.size()), uint32_t(k.size()), v};
        arena_.append(k);
        ++size_;
        return true;
      }
      if (s.hash == h && key(s) == k) {
        s.val = v;
        return false;
      }
    }
  }
  int32_t find(std::string_view k) const {
    if (slots_.empty()) return -1;
    const uint64_t h = hash_bytes(k);
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.val == kEmpty) return -1;
      if (s.hash == h && key(s) == k) return s.val;
    }
  }
  size_t size() const { return size_; }

 private:
  static constexpr int32_t kEmpty = std::numeric_limits<int32_t>::min();
  struct Slot {
    uint64_t hash = 0;
    uint32_t off = 0, len = 0;
    int32_t val = kEmpty;
  };
  std::string_view key(const Slot& s) const { return std::string_view(arena_.data() + s.off, s.len); }
  void grow() {
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(std::max<size_t>(16, old.size() * 2), Slot{});
    mask_ = slots_.size() - 1;
    for (const Slot& s : old) {
      if (s.val == kEmpty) continue;
      for (size_t i = s.hash & mask_;; i = (i + 1) & mask_)
        if (slots_[i].val == kEmpty) {
          slots_[i] = s;
          break;
        }
    }
  }
  std::vector<Slot> slots_;
  std::string arena_;
  size_t mask_ = 0, size_ = 0;
};

// (left id, right id) -> (rank, merged id).
class PairTable {
 public:
  struct Merge {
    uint32_t rank;
    int32_t id;
  };
  void reserve(size_t n) {
    size_t cap = 16;
    while (cap < n * 2) cap <<= 1;
    slots_.assign(cap, Slot{});
    mask_ = cap - 1;
  }
  // Later entries overwrite earlier ones, as HF's HashMap collect does.
  void put(int32_t a, int32_t b, Merge m) {
    const uint64_t k = key(a, b);
    for (size_t i = mix(k) & mask_;; i = (i + 1) & mask_) {
      Slot& s = slots_[i];
      if (s.key == kEmpty || s.key == k) {
        s.key = k;
        s.m = m;
        return;
      }
    }
  }
  const Merge* find(int32_t a, int32_t b) const {
    const uint64_t k = key(a, b);
    for (size_t i = mix(k) & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.key == k) return &s.m;
      if (s.key == kEmpty) return nullptr;
    }
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t(0);
  struct Slot {
    uint64_t key = kEmpty;
    Merge m{0, 0};
  };
  static uint64_t key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }
  static uint64_t mix(uint64_t k) {
    k *= 0x9E3779B97F4A7C15ull;
    return k ^ (k >> 29);
  }
  std::vector<Slot> slots_;
  size_t mask_ = 0;
};

// ---------------------------------------------------------------------------
// PCRE2 (UTF + UCP; JIT when available).

struct MatchScratch {
  pcre2_match_data* md = nullptr;
  pcre2_jit_stack* stack = nullptr;
  pcre2_match_context* ctx = nullptr;
  MatchScratch() {
    md = pcre2_match_data_create(32, nullptr);
    stack = pcre2_jit_stack_create(32 * 1024, 4 * 1024 * 1024, nullptr);
    ctx = pcre2_match_context_create(nullptr);
    if (stack && ctx) pcre2_jit_stack_assign(ctx, nullptr, stack);
  }
  ~MatchScratch() {
    pcre2_match_context_free(ctx);
    pcre2_jit_stack_free(stack);
    pcre2_match_data_free(md);
  }
};

MatchScratch& match_scratch() {
  thread_local MatchScratch s;
  return s;
}

class Regex {
 public:
  // Throws std::runtime_error with PCRE2's message and offset.
  explicit Regex(const std::string& pattern) {
    int err = 0;
    PCRE2_SIZE off = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP, &err,
                          &off, nullptr);
    if (!code_) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      throw std::runtime_error("regex does not compile at offset " + std::to_string(off) + ": " +
                               reinterpret_cast<const char*>(msg));
    }
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // falls back to the interpreter on failure
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Calls f(start, end) for each match, left to right, as onig's find_iter yields them
  // (an empty match is reported and the search moves on by one character). `s` is
  // valid UTF-8 (checked once per encode call).
  template <class F>
  void find_iter(std::string_view s, F&& f) const {
    MatchScratch& m = match_scratch();
    size_t off = 0;
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    while (off <= s.size()) {
      const int rc = pcre2_match(code_, subject, s.size(), off, PCRE2_NO_UTF_CHECK, m.md, m.ctx);
      if (rc == PCRE2_ERROR_NOMATCH) return;
      if (rc < 0) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(rc, msg, sizeof msg);
        throw std::runtime_error(std::string("regex match failed: ") + reinterpret_cast<const char*>(msg));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(m.md);
      const size_t b = ov[0], e = ov[1];
      f(b, e);
      if (e > b) {
        off = e;
      } else {
        if (e >= s.size()) return;
        off = e + utf8_len(uint8_t(s[e]));
      }
    }
  }

 private:
  pcre2_code* code_ = nullptr;
};

// ---------------------------------------------------------------------------
// Pieces of text flowing through the pipeline.

struct Piece {
  std::string_view s;
  bool at_start;  ///< begins at byte 0 of the original text (Metaspace prepend_scheme "first")
};

enum class Behavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct Span {
  size_t b, e;
  bool match;
};

// NormalizedString::split: `spans` cover the piece in order; returns kept (b, e).
void apply_behavior(const std::vector<Span>& spans, Behavior behavior, std::vector<std::pair<size_t, size_t>>* out) {
  out->clear();
  switch (behavior) {
    case Behavior::kIsolated:
      for (const Span& s : spans) out->emplace_back(s.b, s.e);
      break;
    case Behavior::kRemoved:
      for (const Span& s : spans)
        if (!s.match) out->emplace_back(s.b, s.e);
      break;
    case Behavior::kContiguous: {
      bool prev = false;
      for (const Span& s : spans) {
        if (s.match == prev && !out->empty()) out->back().second = s.e;
        else out->emplace_back(s.b, s.e);
        prev = s.match;
      }
      break;
    }
    case Behavior::kMergedWithPrevious: {
      bool prev = false;
      for (const Span& s : spans) {
        if (s.match && !prev && !out->empty()) out->back().second = s.e;
        else out->emplace_back(s.b, s.e);
        prev = s.match;
      }
      break;
    }
    case Behavior::kMergedWithNext: {
      bool prev = false;
      for (size_t k = spans.size(); k-- > 0;) {
        const Span& s = spans[k];
        if (s.match && !prev && !out->empty()) out->back().first = s.b;
        else out->emplace_back(s.b, s.e);
        prev = s.match;
      }
      std::reverse(out->begin(), out->end());
      break;
    }
  }
}

// Per-thread scratch of one encode call; buffers keep their capacity between calls.
struct Scratch {
  std::string norm;                 // the normalized stretch
  std::deque<std::string> arena;    // strings made by pre-tokenizers (stable addresses)
  size_t arena_used = 0;
  std::vector<Piece> a, b;          // pre-tokenizer input / output
  std::vector<Span> spans;
  std::vector<std::pair<size_t, size_t>> kept;
  std::string mapped;               // byte-level symbols of a word (cache misses)
  struct Sym {
    int32_t id, prev, next;
    uint32_t len;
  };
  std::vector<Sym> syms;
  struct QMerge {
    uint32_t rank;
    uint32_t pos;
    int32_t id;
  };
  std::vector<QMerge> heap;
  std::vector<int32_t> word_ids;
  std::string& new_string() {
    if (arena_used == arena.size()) arena.emplace_back();
    std::string& s = arena[arena_used++];
    s.clear();
    return s;
  }
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// ---------------------------------------------------------------------------
// JSON access with paths.

struct Ctx {
  std::string file;
  [[noreturn]] void fail(const std::string& path, const std::string& what) const {
    throw std::runtime_error(file + ": " + (path.empty() ? std::string("/") : path) + ": " + what);
  }
  const json& get(const json& obj, const std::string& path, const char* key) const {
    if (!obj.is_object()) fail(path, "expected a JSON object");
    auto it = obj.find(key);
    if (it == obj.end()) fail(path + "/" + key, "missing");
    return *it;
  }
  std::string str(const json& obj, const std::string& path, const char* key) const {
    const json& v = get(obj, path, key);
    if (!v.is_string()) fail(path + "/" + key, "expected a string");
    return v.get<std::string>();
  }
  // Optional string: "" when absent or null.
  std::string opt_str(const json& obj, const std::string& path, const char* key, bool* present = nullptr) const {
    if (present) *present = false;
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return "";
    if (!it->is_string()) fail(path + "/" + key, "expected a string or null");
    if (present) *present = true;
    return it->get<std::string>();
  }
  bool opt_bool(const json& obj, const std::string& path, const char* key, bool dflt) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return dflt;
    if (!it->is_boolean()) fail(path + "/" + key, "expected true or false");
    return it->get<bool>();
  }
};

// JSON Pointer escaping of a key (RFC 6901).
std::string ptr_key(const std::string& k) {
  std::string o;
  for (char c : k) {
    if (c == '~') o += "~0";
    else if (c == '/') o += "~1";
    else o += c;
  }
  return o;
}

// GPT-2's pre-tokenization regex (ByteLevel with use_regex = true).
const char* kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

}  // namespace

// ---------------------------------------------------------------------------

struct HfTokenizer::Impl {
  // ---- added tokens
  struct Added {
    std::string content;  // the pattern matched (the normalized content when normalized)
    int32_t id;
    bool single_word, lstrip, rstrip;
  };
  struct Matcher {
    std::vector<Added> tokens;
    std::vector<int> by_first[256];  // indices into tokens, longest first
    bool empty() const { return tokens.empty(); }
    void build() {
      for (auto& v : by_first) v.clear();
      for (size_t i = 0; i < tokens.size(); ++i) by_first[uint8_t(tokens[i].content[0])].push_back(int(i));
      for (auto& v : by_first)
        std::stable_sort(v.begin(), v.end(),
                         [&](int x, int y) { return tokens[x].content.size() > tokens[y].content.size(); });
    }
  };
  Matcher raw, normalized;

  // ---- normalizer
  enum class NormKind { kNFC, kNFD, kNFKC, kNFKD, kPrepend, kReplace, kStrip };
  struct NormOp {
    explicit NormOp(NormKind k, std::string x = {}, std::string y = {}) : kind(k), a(std::move(x)), b(std::move(y)) {}
    NormKind kind;
    std::string a, b;  // Prepend: a; Replace: a -> b
    bool left = false, right = false;
  };
  std::vector<NormOp> norm_ops;

  // ---- pre-tokenizer
  enum class PreKind { kSplitRegex, kSplitString, kByteLevelRegex, kMetaspace };
  struct PreOp {
    explicit PreOp(PreKind k) : kind(k) {}
    PreKind kind;
    std::shared_ptr<Regex> re;
    std::string literal;  // Split String pattern; Metaspace replacement
    Behavior behavior = Behavior::kIsolated;
    bool invert = false;
    int prepend = 0;      // Metaspace: 0 never, 1 always, 2 first
    bool split = true;    // Metaspace
  };
  std::vector<PreOp> pre_ops;
  bool byte_level = false;          // ByteLevel pre-tokenizer present (last)
  bool byte_level_prefix = false;   // its add_prefix_space

  // ---- BPE model
  StrTable vocab;                   // the BPE model's vocabulary
  StrTable added_ids;               // added tokens (content -> id), looked up first by token_to_id
  std::vector<std::string> id_to_token;
  PairTable merges;
  std::string prefix, suffix;       // continuing_subword_prefix / end_of_word_suffix
  int32_t unk_id = -1;
  bool fuse_unk = false, byte_fallback = false, ignore_merges = false;
  int32_t byte_fallback_id[256];    // <0xNN> ids, -1 when absent
  std::string byte_char[256];       // bytes_char: byte -> UTF-8 of its symbol
  int32_t byte_symbol_id[256];      // vocab id of byte_char[b], -1 when absent
  bool byte_fast = false;           // byte-level, no prefix/suffix, every byte symbol in vocab
  int64_t vocab_size = 0;

  // ---- word cache (raw word bytes -> ids)
  static constexpr size_t kCacheMaxWordBytes = 256;
  static constexpr size_t kCacheCapacity = 1 << 17;
  mutable std::mutex cache_mu;
  mutable StrTable cache_index;                 // word -> offset into cache_ids
  mutable std::vector<int32_t> cache_ids;       // [len, id...] records

  // ---------------------------------------------------------------- encode
  void normalize(std::string_view in, std::string* out, std::string_view* result) const;
  void split_added(const Matcher& m, std::string_view s, std::vector<Span>* spans, std::vector<int32_t>* span_ids) const;
  void encode_stretch(std::string_view s, bool at_start, std::vector<int32_t>* ids) const;
  void pre_tokenize_and_model(std::string_view s, bool at_start, std::vector<int32_t>* ids) const;
  void model_word(std::string_view word, std::vector<int32_t>* ids) const;
  void merge_word(std::string_view word, std::vector<int32_t>* out) const;
  void merge_all(Scratch& sc) const;
};

// Normalizer chain on one stretch. `result` views `in` when nothing changed, else `out`.
void HfTokenizer::Impl::normalize(std::string_view in, std::string* out, std::string_view* result) const {
  std::string_view cur = in;
  std::string tmp;
  for (const NormOp& op : norm_ops) {
    if (cur.empty()) break;  // every normalizer leaves an empty string empty (Prepend too)
    switch (op.kind) {
      case NormKind::kNFC: case NormKind::kNFD: case NormKind::kNFKC: case NormKind::kNFKD: {
        if (is_ascii(cur)) break;  // ASCII is invariant under every normalization form
        int opts = UTF8PROC_STABLE;
        if (op.kind == NormKind::kNFC) opts |= UTF8PROC_COMPOSE;
        if (op.kind == NormKind::kNFD) opts |= UTF8PROC_DECOMPOSE;
        if (op.kind == NormKind::kNFKC) opts |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT;
        if (op.kind == NormKind::kNFKD) opts |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT;
        utf8proc_uint8_t* dst = nullptr;
        const utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(cur.data()),
                                                utf8proc_ssize_t(cur.size()), &dst, utf8proc_option_t(opts));
        if (n < 0) throw std::runtime_error(std::string("unicode normalization failed: ") + utf8proc_errmsg(n));
        tmp.assign(reinterpret_cast<const char*>(dst), size_t(n));
        std::free(dst);
        out->swap(tmp);
        cur = *out;
        break;
      }
      case NormKind::kPrepend:
        tmp.assign(op.a);
        tmp.append(cur);
        out->swap(tmp);
        cur = *out;
        break;
      case NormKind::kReplace: {
        if (cur.find(op.a) == std::string_view::npos) break;
        tmp.clear();
        size_t pos = 0;
        for (size_t hit; (hit = cur.find(op.a, pos)) != std::string_view::npos; pos = hit + op.a.size()) {
          tmp.append(cur.substr(pos, hit - pos));
          tmp.append(op.b);
        }
        tmp.append(cur.substr(pos));
        out->swap(tmp);
        cur = *out;
        break;
      }
      case NormKind::kStrip: {
        size_t b = 0, e = cur.size();
        if (op.left)
          while (b < e && is_white_space(utf8_decode(cur, b))) b += utf8_len(uint8_t(cur[b]));
        if (op.right)
          while (e > b) {
            size_t st;
            if (!is_white_space(utf8_decode_before(cur, e, &st))) break;
            e = st;
          }
        tmp.assign(cur.substr(b, e - b));
        out->swap(tmp);
        cur = *out;
        break;
      }
    }
  }
  *result = cur;
}

// AddedVocabulary::find_matches: spans covering `s`; span_ids[k] is the added token's id
// for a matched span, -1 for text.
void HfTokenizer::Impl::split_added(const Matcher& m, std::string_view s, std::vector<Span>* spans,
                                    std::vector<int32_t>* span_ids) const {
  spans->clear();
  span_ids->clear();
  size_t start_offset = 0, pos = 0;
  while (pos < s.size()) {
    const auto& cands = m.by_first[uint8_t(s[pos])];
    const Added* hit = nullptr;
    for (int k : cands) {
      const Added& a = m.tokens[k];
      if (s.compare(pos, a.content.size(), a.content) == 0) {
        hit = &a;  // longest first: the leftmost-longest match
        break;
      }
    }
    if (!hit) {
      ++pos;
      continue;
    }
    size_t start = pos, stop = pos + hit->content.size();
    pos = stop;  // the matcher moves past this match even when it is discarded below
    if (hit->single_word) {
      bool start_space = true, stop_space = true;
      if (start > 0) {
        size_t st;
        start_space = !is_word_char(utf8_decode_before(s, start, &st));
      }
      if (stop < s.size()) stop_space = !is_word_char(utf8_decode(s, stop));
      if (!start_space || !stop_space) continue;
    }
    if (hit->lstrip) {
      size_t ns = start;
      while (ns > 0) {
        size_t st;
        if (!is_white_space(utf8_decode_before(s, ns, &st))) break;
        ns = st;
      }
      start = std::max(ns, start_offset);
    }
    if (hit->rstrip) {
      while (stop < s.size() && is_white_space(utf8_decode(s, stop))) stop += utf8_len(uint8_t(s[stop]));
      pos = std::max(pos, stop);
    }
    if (start_offset < start) {
      spans->push_back({start_offset, start, false});
      span_ids->push_back(-1);
    }
    spans->push_back({start, stop, true});
    span_ids->push_back(hit->id);
    start_offset = stop;
  }
  if (start_offset < s.size()) {
    spans->push_back({start_offset, s.size(), false});
    span_ids->push_back(-1);
  }
}

void HfTokenizer::Impl::encode_stretch(std::string_view s, bool at_start, std::vector<int32_t>* ids) const {
  Scratch& sc = scratch();
  std::string_view norm;
  normalize(s, &sc.norm, &norm);
  if (norm.empty()) return;
  if (normalized.empty()) {
    pre_tokenize_and_model(norm, at_start, ids);
    return;
  }
  // Normalized added tokens are matched in the normalized text. The stretch may live in
  // sc.norm, which later stretches do not touch: copy it, the spans index it.
  const std::string text(norm);
  std::vector<Span> spans;
  std::vector<int32_t> span_ids;
  split_added(normalized, text, &spans, &span_ids);
  for (size_t k = 0; k < spans.size(); ++k) {
    if (span_ids[k] >= 0) ids->push_back(span_ids[k]);
    else pre_tokenize_and_model(std::string_view(text).substr(spans[k].b, spans[k].e - spans[k].b),
                                at_start && spans[k].b == 0, ids);
  }
}

void HfTokenizer::Impl::pre_tokenize_and_model(std::string_view s, bool at_start, std::vector<int32_t>* ids) const {
  Scratch& sc = scratch();
  sc.arena_used = 0;
  sc.a.clear();
  sc.a.push_back({s, at_start});
  for (const PreOp& op : pre_ops) {
    sc.b.clear();
    for (const Piece& p : sc.a) {
      std::string_view t = p.s;
      bool first_at_start = p.at_start;
      if (op.kind == PreKind::kMetaspace) {
        std::string& o = sc.new_string();
        for (char c : t) {
          if (c == ' ') o += op.literal;
          else o += c;
        }
        const bool starts = o.compare(0, op.literal.size(), op.literal) == 0;
        if (!starts && (op.prepend == 1 || (op.prepend == 2 && p.at_start))) o.insert(0, op.literal);
        t = o;
        if (!op.split) {
          if (!t.empty()) sc.b.push_back({t, p.at_start});
          continue;
        }
      } else if (op.kind == PreKind::kByteLevelRegex && byte_level_prefix && !t.empty() && t[0] != ' ') {
        std::string& o = sc.new_string();
        o = " ";
        o.append(t);
        t = o;
      }
      // Spans of matches covering t (Pattern::find_matches).
      sc.spans.clear();
      size_t prev = 0;
      auto add_match = [&](size_t b, size_t e) {
        if (prev != b) sc.spans.push_back({prev, b, false});
        sc.spans.push_back({b, e, true});
        prev = e;
      };
      if (op.kind == PreKind::kSplitRegex || op.kind == PreKind::kByteLevelRegex) {
        op.re->find_iter(t, add_match);
      } else {  // literal: Split String pattern, Metaspace replacement
        for (size_t hit; (hit = t.find(op.literal, prev)) != std::string_view::npos;) add_match(hit, hit + op.literal.size());
      }
      if (prev != t.size()) sc.spans.push_back({prev, t.size(), false});
      if (op.invert)
        for (Span& sp : sc.spans) sp.match = !sp.match;
      const Behavior behavior = op.kind == PreKind::kMetaspace ? Behavior::kMergedWithNext
                                : op.kind == PreKind::kByteLevelRegex ? Behavior::kIsolated
                                                                      : op.behavior;
      apply_behavior(sc.spans, behavior, &sc.kept);
      for (const auto& [b, e] : sc.kept)
        if (e > b) sc.b.push_back({t.substr(b, e - b), first_at_start && b == 0});
    }
    sc.a.swap(sc.b);
  }
  for (const Piece& p : sc.a) model_word(p.s, ids);
}

// BPE::tokenize_with_cache on one word (raw bytes when byte-level).
void HfTokenizer::Impl::model_word(std::string_view word, std::vector<int32_t>* ids) const {
  if (word.empty()) return;
  const bool cacheable = word.size() <= kCacheMaxWordBytes;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mu);
    const int32_t at = cache_index.find(word);
    if (at >= 0) {
      const int32_t n = cache_ids[at];
      ids->insert(ids->end(), cache_ids.begin() + at + 1, cache_ids.begin() + at + 1 + n);
      return;
    }
  }
  Scratch& sc = scratch();
  merge_word(word, &sc.word_ids);
  ids->insert(ids->end(), sc.word_ids.begin(), sc.word_ids.end());
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mu);
    if (cache_index.size() < kCacheCapacity && cache_index.find(word) < 0 &&
        cache_ids.size() + sc.word_ids.size() + 1 < size_t(std::numeric_limits<int32_t>::max())) {
      cache_index.put(word, int32_t(cache_ids.size()));
      cache_ids.push_back(int32_t(sc.word_ids.size()));
      cache_ids.insert(cache_ids.end(), sc.word_ids.begin(), sc.word_ids.end());
    }
  }
}

// BPE::merge_word (+ the ignore_merges shortcut of tokenize_with_cache).
void HfTokenizer::Impl::merge_word(std::string_view word, std::vector<int32_t>* out) const {
  Scratch& sc = scratch();
  out->clear();
  std::string_view w = word;  // the word as the model sees it
  if (byte_level) {
    sc.mapped.clear();
    for (char c : word) sc.mapped += byte_char[uint8_t(c)];
    w = sc.mapped;
  }
  if (ignore_merges) {
    const int32_t id = vocab.find(w);
    if (id >= 0) {
      out->push_back(id);
      return;
    }
  }
  sc.syms.clear();
  auto add = [&](int32_t id, uint32_t len) {
    const int32_t i = int32_t(sc.syms.size());
    sc.syms.push_back({id, i - 1, i + 1, len});
  };
  if (byte_fast) {
    for (char c : word) add(byte_symbol_id[uint8_t(c)], 1);
  } else {
    int32_t unk_open_len = -1;  // pending (fused) unk's byte length, -1 when none
    std::string buf;
    for (size_t i = 0; i < w.size();) {
      const size_t n = utf8_len(uint8_t(w[i]));
      const bool first = i == 0, last = i + n >= w.size();
      std::string_view ch = w.substr(i, n);
      std::string_view key = ch;
      if ((!first && !prefix.empty()) || (last && !suffix.empty())) {
        buf.assign(first ? "" : prefix);
        buf.append(ch);
        if (last) buf.append(suffix);
        key = buf;
      }
      i += n;
      const int32_t id = vocab.find(key);
      if (id >= 0) {
        if (unk_open_len >= 0) {
          add(unk_id, uint32_t(unk_open_len));
          unk_open_len = -1;
        }
        add(id, uint32_t(ch.size()));
        continue;
      }
      if (byte_fallback) {
        bool all = true;
        for (char c : key) all = all && byte_fallback_id[uint8_t(c)] >= 0;
        if (all) {
          for (char c : key) add(byte_fallback_id[uint8_t(c)], 1);
          continue;
        }
      }
      if (unk_id >= 0) {
        if (unk_open_len >= 0 && fuse_unk) {
          unk_open_len += int32_t(ch.size());
        } else {
          if (unk_open_len >= 0) add(unk_id, uint32_t(unk_open_len));
          unk_open_len = int32_t(ch.size());
        }
      }
      // No unk token: HF drops the character.
    }
    if (unk_open_len >= 0) add(unk_id, uint32_t(unk_open_len));
  }
  if (sc.syms.empty()) return;
  sc.syms.back().next = -1;
  merge_all(sc);
  for (const auto& s : sc.syms)
    if (s.len != 0) out->push_back(s.id);
}

// Word::merge_all without dropout: a min-queue of (rank, pos); stale entries are
// recognized by their merged id, exactly as HF does.
void HfTokenizer::Impl::merge_all(Scratch& sc) const {
  auto& syms = sc.syms;
  auto& heap = sc.heap;
  heap.clear();
  // std heap functions build a max-heap: "less" means popped later.
  auto later = [](const Scratch::QMerge& x, const Scratch::QMerge& y) {
    return x.rank != y.rank ? x.rank > y.rank : x.pos > y.pos;
  };
  for (size_t i = 0; i + 1 < syms.size(); ++i)
    if (const auto* m = merges.find(syms[i].id, syms[i + 1].id)) heap.push_back({m->rank, uint32_t(i), m->id});
  std::make_heap(heap.begin(), heap.end(), later);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), later);
    const Scratch::QMerge top = heap.back();
    heap.pop_back();
    auto& cur = syms[top.pos];
    if (cur.len == 0 || cur.next == -1) continue;
    const int32_t next_pos = cur.next;
    const auto right = syms[next_pos];
    const auto* m = merges.find(cur.id, right.id);
    if (!m || m->id != top.id) continue;
    cur.id = top.id;
    cur.len += right.len;
    cur.next = right.next;
    syms[next_pos].len = 0;
    if (right.next >= 0 && size_t(right.next) < syms.size()) syms[right.next].prev = int32_t(top.pos);
    if (cur.prev >= 0) {
      if (const auto* pm = merges.find(syms[cur.prev].id, cur.id)) {
        heap.push_back({pm->rank, uint32_t(cur.prev), pm->id});
        std::push_heap(heap.begin(), heap.end(), later);
      }
    }
    if (cur.next >= 0 && size_t(cur.next) < syms.size()) {
      if (const auto* nm = merges.find(cur.id, syms[cur.next].id)) {
        heap.push_back({nm->rank, top.pos, nm->id});
        std::push_heap(heap.begin(), heap.end(), later);
      }
    }
  }
}

// ---------------------------------------------------------------------------

HfTokenizer::HfTokenizer() : impl_(std::make_unique<Impl>()) { kind_ = TokenizerKind::kTokenizersJson; }

HfTokenizer::HfTokenizer(const std::string& json_path, const SpecialTokenConfig& special) : HfTokenizer() {
  std::ifstream in(json_path, std::ios::binary);
  if (!in)
    throw std::runtime_error(json_path + ": cannot open tokenizer.json (give --tokenizer FILE or --model_name_or_path DIR)");
  in.close();
  load(json_read_file(json_path, kJsonTokenizerMaxBytes), json_path, special);
}

std::unique_ptr<HfTokenizer> HfTokenizer::from_string(const std::string& json_text, const std::string& name,
                                                      const SpecialTokenConfig& special) {
  std::unique_ptr<HfTokenizer> t(new HfTokenizer());
  t->load(json_text, name, special);
  return t;
}

HfTokenizer::~HfTokenizer() = default;

void HfTokenizer::load(const std::string& text, const std::string& name, const SpecialTokenConfig& special) {
  Impl& I = *impl_;
  path_ = name;
  sha256_ = sha256_hex(text);
  const Ctx c{name};
  json j;
  try {
    j = json_parse(text, name, {kJsonTokenizerMaxBytes});
  } catch (const json::exception& e) {
    throw std::runtime_error(name + ": not valid JSON (" + e.what() + ")");
  }
  if (!j.is_object()) c.fail("", "expected a JSON object (a Hugging Face tokenizer.json)");

  // ---- model
  const json& model = c.get(j, "", "model");
  if (!model.is_object()) c.fail("/model", "expected an object");
  {
    auto it = model.find("type");
    if (it == model.end() || !it->is_string()) c.fail("/model/type", "missing (supported: \"BPE\")");
    if (*it != "BPE")
      c.fail("/model/type", "unsupported model \"" + it->get<std::string>() + "\" (supported: \"BPE\")");
  }
  if (auto it = model.find("dropout"); it != model.end() && !it->is_null()) {
    if (!it->is_number() || it->get<double>() != 0.0)
      c.fail("/model/dropout", "BPE dropout is not supported (it makes encoding random); expected null");
  }
  const json& vocab = c.get(model, "/model", "vocab");
  if (!vocab.is_object()) c.fail("/model/vocab", "expected an object {token: id}");
  I.vocab.reserve(vocab.size() + 1024);
  int64_t max_id = -1;
  std::vector<std::pair<int32_t, std::string>> id_tokens;
  id_tokens.reserve(vocab.size());
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 || it.value().get<int64_t>() > INT32_MAX)
      c.fail("/model/vocab/" + ptr_key(it.key()), "expected a non-negative 32-bit integer id");
    const int32_t id = it.value().get<int32_t>();
    I.vocab.put(it.key(), id);
    id_tokens.emplace_back(id, it.key());
    max_id = std::max<int64_t>(max_id, id);
  }
  I.prefix = c.opt_str(model, "/model", "continuing_subword_prefix");
  I.suffix = c.opt_str(model, "/model", "end_of_word_suffix");
  I.fuse_unk = c.opt_bool(model, "/model", "fuse_unk", false);
  I.byte_fallback = c.opt_bool(model, "/model", "byte_fallback", false);
  I.ignore_merges = c.opt_bool(model, "/model", "ignore_merges", false);
  bool has_unk = false;
  const std::string unk = c.opt_str(model, "/model", "unk_token", &has_unk);
  if (has_unk) {
    I.unk_id = I.vocab.find(unk);
    if (I.unk_id < 0) c.fail("/model/unk_token", "\"" + unk + "\" is not in /model/vocab");
  }
  for (int b = 0; b < 256; ++b) {
    char hex[8];
    std::snprintf(hex, sizeof hex, "<0x%02X>", b);
    I.byte_fallback_id[b] = I.vocab.find(hex);
  }
  const json& merges = c.get(model, "/model", "merges");
  if (!merges.is_array()) c.fail("/model/merges", "expected an array of merges (\"a b\" or [\"a\", \"b\"])");
  I.merges.reserve(merges.size() + 16);
  for (size_t i = 0; i < merges.size(); ++i) {
    const json& m = merges[i];
    const std::string path = "/model/merges/" + std::to_string(i);
    std::string a, b;
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        c.fail(path, "expected \"a b\" (two tokens separated by one space)");
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    } else {
      c.fail(path, "expected \"a b\" or [\"a\", \"b\"]");
    }
    const int32_t ia = I.vocab.find(a), ib = I.vocab.find(b);
    if (ia < 0) c.fail(path, "token \"" + a + "\" is not in /model/vocab");
    if (ib < 0) c.fail(path, "token \"" + b + "\" is not in /model/vocab");
    if (!I.prefix.empty() && b.compare(0, I.prefix.size(), I.prefix) != 0)
      c.fail(path, "token \"" + b + "\" does not start with continuing_subword_prefix");
    const std::string merged = a + b.substr(I.prefix.size());
    const int32_t im = I.vocab.find(merged);
    if (im < 0) c.fail(path, "merged token \"" + merged + "\" is not in /model/vocab");
    I.merges.put(ia, ib, {uint32_t(i), im});
  }

  // ---- normalizer
  // A Sequence may hold Sequences: bounded, so a hostile file fails instead of recursing
  // once per level (real tokenizers nest one or two).
  constexpr int kMaxSequenceNesting = 32;
  auto check_nesting = [&](int depth, const char* root) {
    if (depth > kMaxSequenceNesting)
      c.fail(root, "a Sequence nested more than " + std::to_string(kMaxSequenceNesting) +
                       " levels deep (real tokenizers nest one or two)");
  };
  std::function<void(const json&, const std::string&, int)> add_norm = [&](const json& n, const std::string& path,
                                                                           int depth) {
    if (n.is_null()) return;
    const std::string type = c.str(n, path, "type");
    using K = Impl::NormKind;
    if (type == "Sequence") {
      check_nesting(depth + 1, "/normalizer");
      const json& list = c.get(n, path, "normalizers");
      if (!list.is_array()) c.fail(path + "/normalizers", "expected an array");
      for (size_t i = 0; i < list.size(); ++i)
        add_norm(list[i], path + "/normalizers/" + std::to_string(i), depth + 1);
    } else if (type == "NFC" || type == "NFD" || type == "NFKC" || type == "NFKD") {
      I.norm_ops.emplace_back(type == "NFC" ? K::kNFC : type == "NFD" ? K::kNFD : type == "NFKC" ? K::kNFKC : K::kNFKD);
    } else if (type == "Prepend") {
      I.norm_ops.emplace_back(K::kPrepend, c.str(n, path, "prepend"));
    } else if (type == "Replace") {
      const json& pat = c.get(n, path, "pattern");
      if (!pat.is_object() || !pat.contains("String") || !pat["String"].is_string())
        c.fail(path + "/pattern", "only {\"String\": ...} patterns are supported in the Replace normalizer");
      const std::string from = pat["String"].get<std::string>();
      if (from.empty()) c.fail(path + "/pattern/String", "empty pattern");
      I.norm_ops.emplace_back(K::kReplace, from, c.str(n, path, "content"));
    } else if (type == "Strip") {
      Impl::NormOp op(K::kStrip);
      op.left = c.opt_bool(n, path, "strip_left", false);
      op.right = c.opt_bool(n, path, "strip_right", false);
      I.norm_ops.push_back(op);
    } else {
      c.fail(path + "/type", "unsupported normalizer \"" + type +
                                 "\" (supported: Sequence, NFC, NFD, NFKC, NFKD, Prepend, Replace, Strip)");
    }
  };
  if (auto it = j.find("normalizer"); it != j.end()) add_norm(*it, "/normalizer", 0);

  // ---- pre-tokenizer
  std::function<void(const json&, const std::string&, int)> add_pre = [&](const json& p, const std::string& path,
                                                                          int depth) {
    if (p.is_null()) return;
    const std::string type = c.str(p, path, "type");
    if (I.byte_level)
      c.fail(path, "a pre-tokenizer after ByteLevel is not supported (ByteLevel must come last)");
    using K = Impl::PreKind;
    if (type == "Sequence") {
      check_nesting(depth + 1, "/pre_tokenizer");
      const json& list = c.get(p, path, "pretokenizers");
      if (!list.is_array()) c.fail(path + "/pretokenizers", "expected an array");
      for (size_t i = 0; i < list.size(); ++i)
        add_pre(list[i], path + "/pretokenizers/" + std::to_string(i), depth + 1);
    } else if (type == "Split") {
      Impl::PreOp op(K::kSplitRegex);
      const json& pat = c.get(p, path, "pattern");
      if (pat.is_object() && pat.contains("Regex") && pat["Regex"].is_string()) {
        try {
          op.re = std::make_shared<Regex>(pat["Regex"].get<std::string>());
        } catch (const std::exception& e) {
          c.fail(path + "/pattern/Regex", e.what());
        }
      } else if (pat.is_object() && pat.contains("String") && pat["String"].is_string()) {
        op.kind = K::kSplitString;
        op.literal = pat["String"].get<std::string>();
        if (op.literal.empty()) c.fail(path + "/pattern/String", "empty pattern");
      } else {
        c.fail(path + "/pattern", "expected {\"Regex\": ...} or {\"String\": ...}");
      }
      const std::string behavior = c.str(p, path, "behavior");
      if (behavior == "Isolated") op.behavior = Behavior::kIsolated;
      else if (behavior == "Removed") op.behavior = Behavior::kRemoved;
      else if (behavior == "MergedWithPrevious") op.behavior = Behavior::kMergedWithPrevious;
      else if (behavior == "MergedWithNext") op.behavior = Behavior::kMergedWithNext;
      else if (behavior == "Contiguous") op.behavior = Behavior::kContiguous;
      else
        c.fail(path + "/behavior", "unsupported behavior \"" + behavior +
                                       "\" (supported: Isolated, Removed, MergedWithPrevious, MergedWithNext, Contiguous)");
      op.invert = c.opt_bool(p, path, "invert", false);
      I.pre_ops.push_back(std::move(op));
    } else if (type == "ByteLevel") {
      I.byte_level = true;
      I.byte_level_prefix = c.opt_bool(p, path, "add_prefix_space", true);
      if (c.opt_bool(p, path, "use_regex", true)) {
        Impl::PreOp op(K::kByteLevelRegex);
        op.re = std::make_shared<Regex>(kGpt2Pattern);
        I.pre_ops.push_back(std::move(op));
      } else if (I.byte_level_prefix) {
        // add_prefix_space without the regex: one op that only prepends (an empty regex
        // list would be wrong), expressed as a Split that never matches.
        Impl::PreOp op(K::kByteLevelRegex);
        op.re = std::make_shared<Regex>("(?!)");
        I.pre_ops.push_back(std::move(op));
      }
    } else if (type == "Metaspace") {
      Impl::PreOp op(K::kMetaspace);
      op.literal = c.str(p, path, "replacement");
      if (op.literal.empty() || utf8_valid_len(op.literal, 0) != op.literal.size())
        c.fail(path + "/replacement", "expected one character");
      bool has_scheme = false;
      const std::string scheme = c.opt_str(p, path, "prepend_scheme", &has_scheme);
      op.prepend = 1;
      if (has_scheme) {
        if (scheme == "always") op.prepend = 1;
        else if (scheme == "first") op.prepend = 2;
        else if (scheme == "never") op.prepend = 0;
        else c.fail(path + "/prepend_scheme", "unsupported value \"" + scheme + "\" (supported: always, first, never)");
      }
      if (auto it = p.find("add_prefix_space"); it != p.end() && it->is_boolean() && !it->get<bool>()) {
        if (op.prepend != 0) c.fail(path + "/add_prefix_space", "false does not match prepend_scheme");
        op.prepend = 0;
      }
      op.split = c.opt_bool(p, path, "split", true);
      I.pre_ops.push_back(std::move(op));
    } else {
      c.fail(path + "/type", "unsupported pre-tokenizer \"" + type +
                                 "\" (supported: Sequence, Split, ByteLevel, Metaspace)");
    }
  };
  if (auto it = j.find("pre_tokenizer"); it != j.end()) add_pre(*it, "/pre_tokenizer", 0);

  // bytes_char: printable bytes map to themselves, the others to U+0100 + n in order.
  {
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool keep = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      I.byte_char[b].clear();
      utf8_append(keep ? uint32_t(b) : uint32_t(256 + n++), &I.byte_char[b]);
      I.byte_symbol_id[b] = I.vocab.find(I.byte_char[b]);
    }
    bool all = true;
    for (int b = 0; b < 256; ++b) all = all && I.byte_symbol_id[b] >= 0;
    I.byte_fast = I.byte_level && all && I.prefix.empty() && I.suffix.empty();
  }

  // ---- added tokens
  if (auto it = j.find("added_tokens"); it != j.end() && !it->is_null()) {
    if (!it->is_array()) c.fail("/added_tokens", "expected an array");
    for (size_t i = 0; i < it->size(); ++i) {
      const json& t = (*it)[i];
      const std::string path = "/added_tokens/" + std::to_string(i);
      const json& idj = c.get(t, path, "id");
      if (!idj.is_number_integer() || idj.get<int64_t>() < 0 || idj.get<int64_t>() > INT32_MAX)
        c.fail(path + "/id", "expected a non-negative 32-bit integer");
      int32_t id = idj.get<int32_t>();
      Impl::Added a{c.str(t, path, "content"), id, c.opt_bool(t, path, "single_word", false),
                    c.opt_bool(t, path, "lstrip", false), c.opt_bool(t, path, "rstrip", false)};
      const bool norm = c.opt_bool(t, path, "normalized", !c.opt_bool(t, path, "special", false));
      if (a.content.empty()) continue;  // HF ignores empty added tokens
      // HF keeps the model's id for a token the vocabulary already has.
      const int32_t in_vocab = I.vocab.find(a.content);
      if (in_vocab >= 0) a.id = id = in_vocab;
      else id_tokens.emplace_back(id, a.content);
      I.added_ids.put(a.content, id);
      max_id = std::max<int64_t>(max_id, id);
      if (norm && !I.norm_ops.empty()) {
        std::string out;
        std::string_view r;
        I.normalize(a.content, &out, &r);
        a.content = std::string(r);
        if (a.content.empty()) continue;
      }
      (norm ? I.normalized : I.raw).tokens.push_back(std::move(a));
    }
  }
  I.raw.build();
  I.normalized.build();
  I.vocab_size = max_id + 1;
  I.id_to_token.assign(size_t(I.vocab_size), std::string());
  for (auto& [id, tok] : id_tokens)
    if (I.id_to_token[id].empty()) I.id_to_token[id] = tok;
  I.cache_index.reserve(Impl::kCacheCapacity);

  // ---- special tokens (tokenizer_config.json, then config.json)
  auto resolve = [&](bool set, const std::string& token, int32_t config_id, const char* field,
                     std::string* token_out) -> int32_t {
    if (set) {
      if (token.empty()) {
        token_out->clear();
        return -1;
      }
      const int32_t id = token_to_id(token);
      if (id < 0)
        throw std::runtime_error(name + ": tokenizer_config.json " + field + " \"" + token +
                                 "\" is neither in /model/vocab nor in /added_tokens");
      *token_out = token;
      return id;
    }
    if (config_id >= 0) {
      if (config_id >= I.vocab_size)
        throw std::runtime_error(name + ": config.json " + field + "_id " + std::to_string(config_id) +
                                 " is outside the vocabulary (" + std::to_string(I.vocab_size) + " ids)");
      *token_out = I.id_to_token[config_id];
      return config_id;
    }
    token_out->clear();
    return -1;
  };
  std::string pad_token;
  bos_id_ = resolve(special.set_bos, special.bos, special.bos_id, "bos_token", &bos_token_);
  eos_id_ = resolve(special.set_eos, special.eos, special.eos_id, "eos_token", &eos_token_);
  pad_id_ = resolve(special.set_pad, special.pad, special.pad_id, "pad_token", &pad_token);
}

void HfTokenizer::encode(std::string_view text, std::vector<int32_t>* ids) const {
  ids->clear();
  if (text.empty()) return;
  const size_t bad = utf8_invalid_at(text);
  if (bad != std::string_view::npos)
    throw std::runtime_error(path_ + ": cannot encode text that is not valid UTF-8 (invalid byte 0x" +
                             [&] {
                               char h[4];
                               std::snprintf(h, sizeof h, "%02X", unsigned(uint8_t(text[bad])));
                               return std::string(h);
                             }() +
                             " at offset " + std::to_string(bad) + ")");
  const Impl& I = *impl_;
  if (I.raw.empty()) {
    I.encode_stretch(text, true, ids);
    return;
  }
  thread_local std::vector<Span> spans;
  thread_local std::vector<int32_t> span_ids;
  I.split_added(I.raw, text, &spans, &span_ids);
  for (size_t k = 0; k < spans.size(); ++k) {
    if (span_ids[k] >= 0) ids->push_back(span_ids[k]);
    else I.encode_stretch(text.substr(spans[k].b, spans[k].e - spans[k].b), spans[k].b == 0, ids);
  }
}

int64_t HfTokenizer::vocab_size() const { return impl_->vocab_size; }

int32_t HfTokenizer::token_to_id(std::string_view token) const {
  const int32_t id = impl_->added_ids.find(token);
  return id >= 0 ? id : impl_->vocab.find(token);
}

std::string HfTokenizer::id_to_token(int32_t id) const {
  if (id < 0 || id >= impl_->vocab_size) return "";
  return impl_->id_to_token[id];
}

}  // namespace dpo
