// The Jinja engine behind data/chat_template.h: lexer (jinja2's lexer rules with
// trim_blocks and lstrip_blocks), recursive-descent parser (jinja2's operator
// precedence), and a tree-walking renderer over Python-like values. Semantics follow
// jinja2 3.1 + Python 3 where a chat template can observe them: str() of values,
// float repr, Undefined, scoping (a for body gets a fresh scope each iteration, `if`
// none), and json.dumps for tojson.
#include "data/chat_template.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <set>
#include <utility>
#include <vector>

#include "util/json_read.h"

namespace dpo {

ChatTemplateError::ChatTemplateError(int line, const std::string& message)
    : std::runtime_error(line > 0 ? "chat template line " + std::to_string(line) + ": " + message
                                  : "chat template: " + message),
      line_(line),
      reason_(message) {}

namespace jinja {
namespace {

[[noreturn]] void fail(int line, const std::string& msg) { throw ChatTemplateError(line, msg); }

// ---------------------------------------------------------------------------
// UTF-8 and Python string helpers (str methods work on code points).

bool is_ascii(const std::string& s) {
  for (unsigned char c : s)
    if (c >= 0x80) return false;
  return true;
}

std::u32string utf8_decode(const std::string& s) {
  std::u32string out;
  out.reserve(s.size());
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t i = 0, n = s.size();
  while (i < n) {
    unsigned c = p[i];
    char32_t cp;
    int len;
    if (c < 0x80) cp = c, len = 1;
    else if ((c >> 5) == 6) cp = c & 0x1f, len = 2;
    else if ((c >> 4) == 14) cp = c & 0x0f, len = 3;
    else cp = c & 0x07, len = 4;
    for (int k = 1; k < len && i + k < n; ++k) cp = (cp << 6) | (p[i + k] & 0x3f);
    out.push_back(cp);
    i += len;
  }
  return out;
}

void utf8_append(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xc0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3f));
  } else if (cp < 0x10000) {
    out += char(0xe0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3f));
    out += char(0x80 | (cp & 0x3f));
  } else {
    out += char(0xf0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3f));
    out += char(0x80 | ((cp >> 6) & 0x3f));
    out += char(0x80 | (cp & 0x3f));
  }
}

std::string utf8_encode(const std::u32string& s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : s) utf8_append(out, c);
  return out;
}

// str.isspace() / regex \s of Python 3.
bool py_isspace(char32_t c) {
  return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

int64_t py_len(const std::string& s) {
  if (is_ascii(s)) return int64_t(s.size());
  int64_t n = 0;
  for (unsigned char c : s) n += (c & 0xc0) != 0x80;
  return n;
}

// strip/lstrip/rstrip: chars == nullptr strips whitespace.
std::string py_strip(const std::string& s, const std::string* chars, bool left, bool right) {
  std::u32string set = chars ? utf8_decode(*chars) : std::u32string();
  auto strip_it = [&](char32_t c) { return chars ? set.find(c) != std::u32string::npos : py_isspace(c); };
  if (is_ascii(s) && (!chars || is_ascii(*chars))) {
    size_t b = 0, e = s.size();
    if (left)
      while (b < e && strip_it(char32_t(static_cast<unsigned char>(s[b])))) ++b;
    if (right)
      while (e > b && strip_it(char32_t(static_cast<unsigned char>(s[e - 1])))) --e;
    return s.substr(b, e - b);
  }
  std::u32string u = utf8_decode(s);
  size_t b = 0, e = u.size();
  if (left)
    while (b < e && strip_it(u[b])) ++b;
  if (right)
    while (e > b && strip_it(u[e - 1])) --e;
  return utf8_encode(u.substr(b, e - b));
}

std::string py_float_repr(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x < 0 ? "-inf" : "inf";
  if (x == 0) return std::signbit(x) ? "-0.0" : "0.0";
  char buf[64];
  int prec = 1;
  for (; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*e", prec - 1, x);
    if (std::strtod(buf, nullptr) == x) break;
  }
  // buf = [-]d.ddde[+-]XX
  std::string s = buf;
  bool neg = s[0] == '-';
  if (neg) s.erase(0, 1);
  size_t epos = s.find('e');
  int exp = std::atoi(s.c_str() + epos + 1);
  std::string digits;
  for (size_t i = 0; i < epos; ++i)
    if (s[i] != '.') digits += s[i];
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  std::string out;
  if (exp >= -5 && exp < 16) {
    if (exp < 0) {
      out = "0." + std::string(size_t(-exp - 1), '0') + digits;
    } else if (int(digits.size()) <= exp + 1) {
      out = digits + std::string(size_t(exp + 1 - int(digits.size())), '0') + ".0";
    } else {
      out = digits.substr(0, exp + 1) + "." + digits.substr(exp + 1);
    }
    // Python switches to exponent form below 1e-4.
    if (exp < -4) out.clear();
  }
  if (out.empty()) {
    out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char eb[16];
    std::snprintf(eb, sizeof eb, "e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
    out += eb;
  }
  return neg ? "-" + out : out;
}

// ---------------------------------------------------------------------------
// Values

struct Value;
using List = std::vector<Value>;
struct Dict;
struct Callable;
struct LoopState;

// The deepest list / dict a render may build (the messages alone may nest 256 levels):
// printing, comparing and destroying a value recurse once per level. Lists and dicts
// cannot change once built, so the height computed when one is made stays true.
constexpr int kMaxValueNesting = 512;

struct Value {
  enum Type : uint8_t { kUndef, kNone, kBool, kInt, kFloat, kStr, kList, kDict, kNamespace, kFunc, kLoop };
  Type t = kUndef;
  bool tuple = false;  // a list made by (a, b): repr only
  uint16_t height = 0;  // kList / kDict: levels of lists and dicts from here down
  // A generator (what jinja2's map/select/reject/selectattr/rejectattr/unique/items
  // filters return): single use (*gen = items consumed so far), always true, no len(),
  // no indexing, not printable.
  std::shared_ptr<size_t> gen;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::shared_ptr<const std::string> s;  // kStr; for kUndef the error hint
  std::shared_ptr<List> l;
  std::shared_ptr<Dict> d;  // kDict, kNamespace
  std::shared_ptr<Callable> fn;
  std::shared_ptr<LoopState> loop;

  static Value undef(std::string hint = "") {
    Value v;
    if (!hint.empty()) v.s = std::make_shared<const std::string>(std::move(hint));
    return v;
  }
  static Value none() {
    Value v;
    v.t = kNone;
    return v;
  }
  static Value boolean(bool x) {
    Value v;
    v.t = kBool;
    v.b = x;
    return v;
  }
  static Value integer(int64_t x) {
    Value v;
    v.t = kInt;
    v.i = x;
    return v;
  }
  static Value real(double x) {
    Value v;
    v.t = kFloat;
    v.f = x;
    return v;
  }
  static Value str(std::string x) {
    Value v;
    v.t = kStr;
    v.s = std::make_shared<const std::string>(std::move(x));
    return v;
  }
  static Value list(List x = {}, bool tuple = false) {
    Value v;
    v.t = kList;
    v.tuple = tuple;
    v.l = std::make_shared<List>(std::move(x));
    v.set_height(*v.l);
    return v;
  }
  static Value generator(List x) {
    Value v = list(std::move(x));
    v.gen = std::make_shared<size_t>(0);
    return v;
  }
  static Value dict(std::shared_ptr<Dict> d);
  static Value func(std::shared_ptr<Callable> f) {
    Value v;
    v.t = kFunc;
    v.fn = std::move(f);
    return v;
  }
  const std::string& sv() const { return *s; }
  bool is_undef() const { return t == kUndef; }
  bool is_number() const { return t == kInt || t == kFloat || t == kBool; }
  bool is_intlike() const { return t == kInt || t == kBool; }
  int64_t as_int() const { return t == kBool ? int64_t(b) : i; }
  double as_double() const { return t == kFloat ? f : double(as_int()); }
  template <typename Items, typename Get>
  void set_height(const Items& items, Get get) {
    int h = 0;
    for (const auto& x : items) h = std::max<int>(h, get(x).height);
    if (h + 1 > kMaxValueNesting)
      fail(0, "a value the template builds nests more than " + std::to_string(kMaxValueNesting) + " levels deep");
    height = static_cast<uint16_t>(h + 1);
  }
  void set_height(const List& items) {
    set_height(items, [](const Value& x) -> const Value& { return x; });
  }
};

// Dicts (and namespaces) alive in this process, for the test that a render frees every
// one it made (namespace cycles included).
std::atomic<int64_t> g_live_dicts{0};

struct Dict {
  std::vector<std::pair<std::string, Value>> items;
  Dict() { ++g_live_dicts; }
  Dict(const Dict&) = delete;
  Dict& operator=(const Dict&) = delete;
  ~Dict();
  const Value* find(const std::string& k) const {
    for (const auto& kv : items)
      if (kv.first == k) return &kv.second;
    return nullptr;
  }
  void set(const std::string& k, Value v) {
    for (auto& kv : items)
      if (kv.first == k) {
        kv.second = std::move(v);
        return;
      }
    items.emplace_back(k, std::move(v));
  }
};

// Values reachable only through this dict are destroyed here one at a time, not by the
// recursion of their destructors: namespaces are the one mutable value, so
// {% set a.x = b %} can chain them in any order (no height bounds the chain), and
// destroying a 100,000-long chain recursively overflowed the stack.
Dict::~Dict() {
  --g_live_dicts;
  // Most dicts (a message: role, content) hold no list or dict only they own: nothing
  // below them can recurse, and the plain destructor is faster.
  bool owns_container = false;
  for (const auto& kv : items)
    owns_container = owns_container || (kv.second.d && kv.second.d.use_count() == 1) ||
                     (kv.second.l && kv.second.l.use_count() == 1);
  if (!owns_container) return;
  std::vector<Value> pending;
  auto take = [&](std::vector<std::pair<std::string, Value>>& kvs) {
    for (auto& kv : kvs) pending.push_back(std::move(kv.second));
    kvs.clear();
  };
  take(items);
  while (!pending.empty()) {
    Value v = std::move(pending.back());
    pending.pop_back();
    if (v.d && v.d.use_count() == 1) take(v.d->items);
    if (v.l && v.l.use_count() == 1) {
      for (auto& x : *v.l) pending.push_back(std::move(x));
      v.l->clear();
    }
  }  // each v goes with nothing left inside it
}

Value Value::dict(std::shared_ptr<Dict> d) {
  Value v;
  v.t = kDict;
  v.d = std::move(d);
  v.set_height(v.d->items, [](const std::pair<std::string, Value>& kv) -> const Value& { return kv.second; });
  return v;
}

struct CallArgs {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;
};

struct Context;
struct Callable {
  std::string name;
  std::function<Value(CallArgs&, Context&, int line)> fn;
};

struct LoopState {
  std::shared_ptr<List> items;
  int64_t index0 = 0;
};

const char* type_name(const Value& v) {
  switch (v.t) {
    case Value::kUndef: return "Undefined";
    case Value::kNone: return "NoneType";
    case Value::kBool: return "bool";
    case Value::kInt: return "int";
    case Value::kFloat: return "float";
    case Value::kStr: return "str";
    case Value::kList: return v.gen ? "generator" : v.tuple ? "tuple" : "list";
    case Value::kDict: return "dict";
    case Value::kNamespace: return "Namespace";
    case Value::kFunc: return "function";
    case Value::kLoop: return "LoopContext";
  }
  return "?";
}

std::string undefined_message(const Value& v) {
  if (v.s && !v.s->empty()) return *v.s;
  return "value is undefined";
}

// Operations that jinja2's Undefined refuses (attribute, item, call, arithmetic).
void check_defined(const Value& v, int line) {
  if (v.is_undef()) fail(line, undefined_message(v));
}

Value from_json(const nlohmann::ordered_json& j, int depth = 0) {
  if (depth > 256) fail(0, "the template's data nests more than 256 levels deep");
  switch (j.type()) {
    case nlohmann::ordered_json::value_t::null: return Value::none();
    case nlohmann::ordered_json::value_t::boolean: return Value::boolean(j.get<bool>());
    case nlohmann::ordered_json::value_t::number_integer: return Value::integer(j.get<int64_t>());
    case nlohmann::ordered_json::value_t::number_unsigned: {
      uint64_t u = j.get<uint64_t>();
      if (u > uint64_t(INT64_MAX)) return Value::real(double(u));
      return Value::integer(int64_t(u));
    }
    case nlohmann::ordered_json::value_t::number_float: return Value::real(j.get<double>());
    case nlohmann::ordered_json::value_t::string: return Value::str(j.get<std::string>());
    case nlohmann::ordered_json::value_t::array: {
      List l;
      l.reserve(j.size());
      for (const auto& e : j) l.push_back(from_json(e, depth + 1));
      return Value::list(std::move(l));
    }
    case nlohmann::ordered_json::value_t::object: {
      auto d = std::make_shared<Dict>();
      d->items.reserve(j.size());
      for (auto it = j.begin(); it != j.end(); ++it) d->items.emplace_back(it.key(), from_json(it.value(), depth + 1));
      return Value::dict(d);
    }
    default: return Value::none();
  }
}

// Python's repr() of a str.
std::string py_repr_str(const std::string& s) {
  const bool has_sq = s.find('\'') != std::string::npos, has_dq = s.find('"') != std::string::npos;
  const char q = (has_sq && !has_dq) ? '"' : '\'';
  std::string out(1, q);
  for (char32_t c : utf8_decode(s)) {
    char buf[16];
    if (c == char32_t(q) || c == '\\') {
      out += '\\';
      out += char(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || (c >= 0x7f && c <= 0xa0) || c == 0xad) {
      std::snprintf(buf, sizeof buf, "\\x%02x", unsigned(c));
      out += buf;
    } else if ((c >= 0x2000 && c <= 0x200f) || (c >= 0x2028 && c <= 0x202f) || (c >= 0x205f && c <= 0x206f) ||
               c == 0x3000 || c == 0xfeff || c == 0x1680 || (c >= 0xd800 && c <= 0xf8ff) ||
               (c >= 0xfff0 && c <= 0xfffb) || c == 0xffff) {
      std::snprintf(buf, sizeof buf, "\\u%04x", unsigned(c));
      out += buf;
    } else {
      utf8_append(out, c);
    }
  }
  out += q;
  return out;
}

std::string to_str(const Value& v);

std::string py_repr(const Value& v) {
  switch (v.t) {
    case Value::kStr: return py_repr_str(v.sv());
    case Value::kUndef: return "Undefined";
    default: return to_str(v);
  }
}

// str(value) as jinja2 prints it ({{ }}, ~, join, string).
std::string to_str(const Value& v) {
  switch (v.t) {
    case Value::kUndef: return "";
    case Value::kNone: return "None";
    case Value::kBool: return v.b ? "True" : "False";
    case Value::kInt: return std::to_string(v.i);
    case Value::kFloat: return py_float_repr(v.f);
    case Value::kStr: return v.sv();
    case Value::kList: {
      if (v.gen) return "<generator object>";
      std::string out = v.tuple ? "(" : "[";
      for (size_t k = 0; k < v.l->size(); ++k) {
        if (k) out += ", ";
        out += py_repr((*v.l)[k]);
      }
      if (v.tuple && v.l->size() == 1) out += ",";
      out += v.tuple ? ")" : "]";
      return out;
    }
    case Value::kDict: {
      std::string out = "{";
      bool first = true;
      for (const auto& kv : v.d->items) {
        if (!first) out += ", ";
        first = false;
        out += py_repr_str(kv.first) + ": " + py_repr(kv.second);
      }
      return out + "}";
    }
    case Value::kNamespace: return "<Namespace>";
    case Value::kFunc: return "<function " + v.fn->name + ">";
    case Value::kLoop: return "<LoopContext>";
  }
  return "";
}

bool truthy(const Value& v) {
  switch (v.t) {
    case Value::kUndef:
    case Value::kNone: return false;
    case Value::kBool: return v.b;
    case Value::kInt: return v.i != 0;
    case Value::kFloat: return v.f != 0;
    case Value::kStr: return !v.s->empty();
    case Value::kList: return v.gen || !v.l->empty();
    case Value::kDict: return !v.d->items.empty();
    default: return true;
  }
}

bool equals(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.is_intlike() && b.is_intlike()) return a.as_int() == b.as_int();
    return a.as_double() == b.as_double();
  }
  if (a.t != b.t) return false;
  switch (a.t) {
    case Value::kUndef:
    case Value::kNone: return true;
    case Value::kStr: return a.sv() == b.sv();
    case Value::kList: {
      if (a.gen || b.gen) return a.l == b.l;
      if (a.tuple != b.tuple || a.l->size() != b.l->size()) return false;
      for (size_t k = 0; k < a.l->size(); ++k)
        if (!equals((*a.l)[k], (*b.l)[k])) return false;
      return true;
    }
    case Value::kDict: {
      if (a.d->items.size() != b.d->items.size()) return false;
      for (const auto& kv : a.d->items) {
        const Value* o = b.d->find(kv.first);
        if (!o || !equals(kv.second, *o)) return false;
      }
      return true;
    }
    case Value::kNamespace: return a.d == b.d;
    case Value::kFunc: return a.fn == b.fn;
    case Value::kLoop: return a.loop == b.loop;
    default: return false;
  }
}

// Python's <, for the types a template compares; -1/0/1.
int compare_order(const Value& a, const Value& b, int line, const char* op) {
  if (a.is_number() && b.is_number()) {
    if (a.is_intlike() && b.is_intlike()) return a.as_int() < b.as_int() ? -1 : a.as_int() > b.as_int() ? 1 : 0;
    double x = a.as_double(), y = b.as_double();
    return x < y ? -1 : x > y ? 1 : 0;
  }
  if (a.t == Value::kStr && b.t == Value::kStr) {
    int c = a.sv().compare(b.sv());  // byte order of UTF-8 = code point order
    return c < 0 ? -1 : c > 0 ? 1 : 0;
  }
  if (a.t == Value::kList && b.t == Value::kList) {
    size_t n = std::min(a.l->size(), b.l->size());
    for (size_t k = 0; k < n; ++k) {
      if (equals((*a.l)[k], (*b.l)[k])) continue;
      return compare_order((*a.l)[k], (*b.l)[k], line, op);
    }
    return a.l->size() < b.l->size() ? -1 : a.l->size() > b.l->size() ? 1 : 0;
  }
  check_defined(a, line);
  check_defined(b, line);
  fail(line, std::string("'") + op + "' not supported between instances of '" + type_name(a) + "' and '" +
                 type_name(b) + "'");
}

// Items of an iterable (for loops, filters): list, tuple, dict keys, str chars,
// Undefined = empty.
std::shared_ptr<List> iterate(const Value& v, int line) {
  switch (v.t) {
    case Value::kUndef: return std::make_shared<List>();
    case Value::kList:
      if (v.gen) {  // consumes what is left
        auto rest = std::make_shared<List>(v.l->begin() + std::min(*v.gen, v.l->size()), v.l->end());
        *v.gen = v.l->size();
        return rest;
      }
      return v.l;
    case Value::kDict: {
      auto l = std::make_shared<List>();
      for (const auto& kv : v.d->items) l->push_back(Value::str(kv.first));
      return l;
    }
    case Value::kStr: {
      auto l = std::make_shared<List>();
      std::string cur;
      for (char32_t c : utf8_decode(v.sv())) {
        cur.clear();
        utf8_append(cur, c);
        l->push_back(Value::str(cur));
      }
      return l;
    }
    default: fail(line, std::string("'") + type_name(v) + "' object is not iterable");
  }
}

// For range-for: keeps the (possibly fresh) list alive for the loop, which
// `for (x : *iterate(v))` would not (the shared_ptr temporary dies before the loop).
struct Items {
  std::shared_ptr<List> p;
  List::const_iterator begin() const { return p->cbegin(); }
  List::const_iterator end() const { return p->cend(); }
};
Items items_of(const Value& v, int line) { return Items{iterate(v, line)}; }

int64_t length_of(const Value& v, int line) {
  switch (v.t) {
    case Value::kUndef: return 0;
    case Value::kStr: return py_len(v.sv());
    case Value::kList:
      if (v.gen) fail(line, "object of type 'generator' has no len() (add | list before | length)");
      return int64_t(v.l->size());
    case Value::kDict: return int64_t(v.d->items.size());
    default: fail(line, std::string("object of type '") + type_name(v) + "' has no len()");
  }
}

// json.dumps(x, ensure_ascii=False, indent=indent, separators=None, sort_keys=sort_keys)
// json.dumps's string escaping; ensure_ascii writes non-ASCII as \uXXXX (UTF-16
// surrogate pairs above U+FFFF), as Python does.
void json_escape(std::string& out, const std::string& s, bool ensure_ascii = false) {
  auto ascii_char = [&](unsigned char c) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += char(c);
        }
    }
  };
  out += '"';
  if (!ensure_ascii || is_ascii(s)) {
    for (unsigned char c : s) {
      if (c >= 0x80) out += char(c);  // UTF-8 bytes pass through (ensure_ascii=False)
      else ascii_char(c);
    }
  } else {
    for (char32_t c : utf8_decode(s)) {
      char buf[16];
      if (c < 0x80) {
        ascii_char(static_cast<unsigned char>(c));
      } else if (c < 0x10000) {
        std::snprintf(buf, sizeof buf, "\\u%04x", unsigned(c));
        out += buf;
      } else {
        const unsigned v = unsigned(c) - 0x10000;
        std::snprintf(buf, sizeof buf, "\\u%04x\\u%04x", 0xd800 + (v >> 10), 0xdc00 + (v & 0x3ff));
        out += buf;
      }
    }
  }
  out += '"';
}

// Layout of json.dumps: separators (item, key) and indent.
struct JsonStyle {
  const std::string* indent = nullptr;
  std::string item_sep = ", ", key_sep = ": ";
  bool sort_keys = false, ensure_ascii = false;
};

void to_json(std::string& out, const Value& v, const JsonStyle& st, int depth, int line) {
  auto newline = [&](int d) {
    out += '\n';
    for (int k = 0; k < d; ++k) out += *st.indent;
  };
  switch (v.t) {
    case Value::kNone: out += "null"; return;
    case Value::kBool: out += v.b ? "true" : "false"; return;
    case Value::kInt: out += std::to_string(v.i); return;
    case Value::kFloat:
      if (std::isnan(v.f)) out += "NaN";
      else if (std::isinf(v.f)) out += v.f < 0 ? "-Infinity" : "Infinity";
      else out += py_float_repr(v.f);
      return;
    case Value::kStr: json_escape(out, v.sv(), st.ensure_ascii); return;
    case Value::kList: {
      if (v.gen) fail(line, "tojson: Object of type generator is not JSON serializable (add | list)");
      if (v.l->empty()) {
        out += "[]";
        return;
      }
      out += '[';
      for (size_t k = 0; k < v.l->size(); ++k) {
        if (k) out += st.item_sep;
        if (st.indent) newline(depth + 1);
        to_json(out, (*v.l)[k], st, depth + 1, line);
      }
      if (st.indent) newline(depth);
      out += ']';
      return;
    }
    case Value::kDict: {
      if (v.d->items.empty()) {
        out += "{}";
        return;
      }
      std::vector<const std::pair<std::string, Value>*> kvs;
      for (const auto& kv : v.d->items) kvs.push_back(&kv);
      if (st.sort_keys)
        std::sort(kvs.begin(), kvs.end(), [](auto* a, auto* b) { return a->first < b->first; });
      out += '{';
      bool first = true;
      for (auto* kv : kvs) {
        if (!first) out += st.item_sep;
        first = false;
        if (st.indent) newline(depth + 1);
        json_escape(out, kv->first, st.ensure_ascii);
        out += st.key_sep;
        to_json(out, kv->second, st, depth + 1, line);
      }
      if (st.indent) newline(depth);
      out += '}';
      return;
    }
    default:
      check_defined(v, line);
      fail(line, std::string("tojson: Object of type ") + type_name(v) + " is not JSON serializable");
  }
}

// ---------------------------------------------------------------------------
// Lexer

enum class Tok { kData, kVarBegin, kVarEnd, kBlockBegin, kBlockEnd, kName, kString, kInt, kFloat, kOp, kEof };

struct Token {
  Tok kind;
  std::string text;  // data, name, op, decoded string, number literal
  int line;
};

// Python unicode-escape decoding of a string literal's body (after newline
// normalization), as jinja2 does: \n \t \r \\ \' \" \a \b \f \v \ooo \xhh \uXXXX
// \UXXXXXXXX; unknown escapes stay as written.
std::string unescape(const std::string& body, int line) {
  std::string out;
  for (size_t k = 0; k < body.size(); ++k) {
    char c = body[k];
    if (c != '\\' || k + 1 == body.size()) {
      out += c;
      continue;
    }
    char e = body[++k];
    auto hex = [&](int n) -> char32_t {
      if (k + n >= body.size()) fail(line, "truncated \\x/\\u escape in a string");
      char32_t v = 0;
      for (int j = 1; j <= n; ++j) {
        char h = body[k + j];
        int d = (h >= '0' && h <= '9') ? h - '0' : (h >= 'a' && h <= 'f') ? h - 'a' + 10 : (h >= 'A' && h <= 'F') ? h - 'A' + 10 : -1;
        if (d < 0) fail(line, "bad \\x/\\u escape in a string");
        v = v * 16 + char32_t(d);
      }
      k += n;
      return v;
    };
    switch (e) {
      case '\n': break;  // line continuation
      case '\\': out += '\\'; break;
      case '\'': out += '\''; break;
      case '"': out += '"'; break;
      case 'a': out += '\a'; break;
      case 'b': out += '\b'; break;
      case 'f': out += '\f'; break;
      case 'n': out += '\n'; break;
      case 'r': out += '\r'; break;
      case 't': out += '\t'; break;
      case 'v': out += '\v'; break;
      case 'x': utf8_append(out, hex(2)); break;
      case 'u': utf8_append(out, hex(4)); break;
      case 'U': utf8_append(out, hex(8)); break;
      default:
        if (e >= '0' && e <= '7') {
          unsigned v = unsigned(e - '0');
          for (int j = 0; j < 2 && k + 1 < body.size() && body[k + 1] >= '0' && body[k + 1] <= '7'; ++j)
            v = v * 8 + unsigned(body[++k] - '0');
          utf8_append(out, char32_t(v));
        } else {
          out += '\\';
          out += e;
        }
    }
  }
  return out;
}

class Lexer {
 public:
  explicit Lexer(const std::string& raw) {
    // jinja2: newlines normalized to \n, one trailing newline dropped
    // (keep_trailing_newline=False).
    src_.reserve(raw.size());
    for (size_t k = 0; k < raw.size(); ++k) {
      if (raw[k] == '\r') {
        src_ += '\n';
        if (k + 1 < raw.size() && raw[k + 1] == '\n') ++k;
      } else {
        src_ += raw[k];
      }
    }
    if (!src_.empty() && src_.back() == '\n') src_.pop_back();
  }

  std::vector<Token> run() {
    size_t pos = 0;
    bool line_starting = true;
    const size_t n = src_.size();
    while (pos < n) {
      size_t tag = find_tag(pos);
      if (tag == std::string::npos) {
        emit(Tok::kData, src_.substr(pos), line_);
        count_lines(pos, n);
        break;
      }
      const char kind = src_[tag + 1];  // '{', '%' or '#'
      std::string text = src_.substr(pos, tag - pos);
      const int text_line = line_;
      count_lines(pos, tag);
      char sign = tag + 2 < n ? src_[tag + 2] : 0;
      if (sign != '-' && sign != '+') sign = 0;
      if (sign == '-') {
        text = py_strip(text, nullptr, false, true);
      } else if (sign != '+' && kind != '{') {  // lstrip_blocks: block and comment tags
        size_t l_pos = text.rfind('\n');
        l_pos = l_pos == std::string::npos ? 0 : l_pos + 1;
        if (l_pos > 0 || line_starting) {
          std::string rest = text.substr(l_pos);
          if (!rest.empty() && py_strip(rest, nullptr, true, true).empty()) text.resize(l_pos);
        }
      }
      if (!text.empty()) emit(Tok::kData, text, text_line);
      pos = tag + 2 + (sign ? 1 : 0);
      if (kind == '#') {
        size_t end = src_.find("#}", pos);
        if (end == std::string::npos) fail(line_, "unterminated comment {# ... #}");
        char before = end > pos ? src_[end - 1] : 0;
        count_lines(pos, end);
        pos = end + 2;
        pos = after_end(pos, before == '-' ? '-' : before == '+' ? '+' : 0, true, &line_starting);
        continue;
      }
      const bool block = kind == '%';
      emit(block ? Tok::kBlockBegin : Tok::kVarBegin, "", line_);
      lex_tag(&pos, block, &line_starting);
    }
    emit(Tok::kEof, "", line_);
    return std::move(toks_);
  }

 private:
  size_t find_tag(size_t pos) const {
    for (size_t k = src_.find('{', pos); k != std::string::npos; k = src_.find('{', k + 1))
      if (k + 1 < src_.size() && (src_[k + 1] == '{' || src_[k + 1] == '%' || src_[k + 1] == '#')) return k;
    return std::string::npos;
  }
  void count_lines(size_t a, size_t b) {
    for (size_t k = a; k < b; ++k) line_ += src_[k] == '\n';
  }
  void emit(Tok k, std::string text, int line) { toks_.push_back(Token{k, std::move(text), line}); }

  // After a tag's closing "%}"/"}}"/"#}" at pos: '-' strips all following whitespace,
  // trim (trim_blocks) eats one newline. Returns the new position.
  size_t after_end(size_t pos, char sign, bool trim, bool* line_starting) {
    const size_t start = pos;
    if (sign == '-') {
      while (pos < src_.size()) {
        // Python \s, including non-ASCII spaces.
        size_t len = 1;
        char32_t c = static_cast<unsigned char>(src_[pos]);
        if (c >= 0x80) {
          std::u32string u = utf8_decode(src_.substr(pos, std::min<size_t>(4, src_.size() - pos)));
          c = u.empty() ? 0 : u[0];
          len = c < 0x800 ? 2 : c < 0x10000 ? 3 : 4;
        }
        if (!py_isspace(c)) break;
        pos += len;
      }
    } else if (sign != '+' && trim && pos < src_.size() && src_[pos] == '\n') {
      ++pos;
    }
    count_lines(start, pos);
    // line_starting: the last match ended with a newline (jinja2's lexer)
    *line_starting = pos > start ? src_[pos - 1] == '\n' : false;
    return pos;
  }

  void lex_tag(size_t* ppos, bool block, bool* line_starting) {
    size_t pos = *ppos;
    const size_t n = src_.size();
    const char closer = block ? '%' : '}';
    std::string brackets;  // expected closing brackets
    for (;;) {
      while (pos < n && (src_[pos] == ' ' || src_[pos] == '\t' || src_[pos] == '\n' || src_[pos] == '\r' ||
                         src_[pos] == '\f' || src_[pos] == '\v')) {
        line_ += src_[pos] == '\n';
        ++pos;
      }
      if (pos >= n) fail(line_, block ? "unexpected end of template, expected '%}'" : "unexpected end of template, expected '}}'");
      // end of tag: "-%}" / "+%}" / "%}" (or "}}" / "-}}")
      char sign = 0;
      size_t q = pos;
      // jinja2 balances brackets: "}}" inside {...} closes the dict, not the tag
      if (brackets.empty() && (src_[q] == '-' || (block && src_[q] == '+')) && q + 2 < n + 0 && src_[q + 1] == closer && src_[q + 2] == '}') {
        sign = src_[q];
        ++q;
      }
      if (brackets.empty() && q + 1 < n && src_[q] == closer && src_[q + 1] == '}') {
        emit(block ? Tok::kBlockEnd : Tok::kVarEnd, "", line_);
        *ppos = after_end(q + 2, sign, block, line_starting);
        return;
      }
      const int line = line_;
      const char c = src_[pos];
      if (std::isdigit(static_cast<unsigned char>(c))) {
        size_t e = pos;
        while (e < n && (std::isdigit(static_cast<unsigned char>(src_[e])) || src_[e] == '_')) ++e;
        bool is_float = false;
        if (e + 1 < n && src_[e] == '.' && std::isdigit(static_cast<unsigned char>(src_[e + 1]))) {
          is_float = true;
          ++e;
          while (e < n && (std::isdigit(static_cast<unsigned char>(src_[e])) || src_[e] == '_')) ++e;
        }
        if (e < n && (src_[e] == 'e' || src_[e] == 'E')) {
          size_t x = e + 1;
          if (x < n && (src_[x] == '+' || src_[x] == '-')) ++x;
          if (x < n && std::isdigit(static_cast<unsigned char>(src_[x]))) {
            is_float = true;
            e = x;
            while (e < n && (std::isdigit(static_cast<unsigned char>(src_[e])) || src_[e] == '_')) ++e;
          }
        }
        std::string lit;
        for (size_t k = pos; k < e; ++k)
          if (src_[k] != '_') lit += src_[k];
        emit(is_float ? Tok::kFloat : Tok::kInt, lit, line);
        pos = e;
        continue;
      }
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t e = pos;
        while (e < n && (std::isalnum(static_cast<unsigned char>(src_[e])) || src_[e] == '_')) ++e;
        emit(Tok::kName, src_.substr(pos, e - pos), line);
        pos = e;
        continue;
      }
      if (c == '\'' || c == '"') {
        size_t e = pos + 1;
        while (e < n && src_[e] != c) {
          if (src_[e] == '\\') ++e;
          ++e;
        }
        if (e >= n) fail(line, "unterminated string literal");
        const std::string body = src_.substr(pos + 1, e - pos - 1);
        count_lines(pos, e);
        emit(Tok::kString, unescape(body, line), line);
        pos = e + 1;
        continue;
      }
      static const char* const kOps2[] = {"//", "**", "==", "!=", ">=", "<="};
      bool matched = false;
      for (const char* op : kOps2)
        if (src_.compare(pos, 2, op) == 0) {
          emit(Tok::kOp, op, line);
          pos += 2;
          matched = true;
          break;
        }
      if (matched) continue;
      if (std::strchr("+-/*%~[](){}><=.:|,;", c)) {
        if (c == '(' || c == '[' || c == '{') {
          brackets.push_back(c == '(' ? ')' : c == '[' ? ']' : '}');
        } else if (c == ')' || c == ']' || c == '}') {
          if (brackets.empty()) fail(line, std::string("unexpected '") + c + "'");
          if (brackets.back() != c) fail(line, std::string("unexpected '") + c + "', expected '" + brackets.back() + "'");
          brackets.pop_back();
        }
        emit(Tok::kOp, std::string(1, c), line);
        ++pos;
        continue;
      }
      fail(line, std::string("unexpected character '") + c + "' in a tag");
    }
  }

  std::string src_;
  std::vector<Token> toks_;
  int line_ = 1;
};

// ---------------------------------------------------------------------------
// AST

struct Context;
struct Expr {
  int line = 0;
  int height = 1;  // levels of the tree from this node down (the parser bounds it)
  virtual ~Expr() = default;
  Value eval(Context& ctx) const;  // eval_impl, counted against kMaxActive
  virtual Value eval_impl(Context& ctx) const = 0;
};
using ExprP = std::unique_ptr<Expr>;

struct Stmt {
  int line = 0;
  virtual ~Stmt() = default;
  enum Flow { kNormal, kBreak, kContinue };
  Flow exec(Context& ctx) const;  // exec_impl, counted against kMaxActive
  virtual Flow exec_impl(Context& ctx) const = 0;
};
using StmtP = std::unique_ptr<Stmt>;
using Body = std::vector<StmtP>;

// Scopes: a for body gets a fresh child scope per iteration, a macro call one per
// call; `if` and the template top level share their enclosing scope.
std::atomic<int64_t> g_live_scopes{0};

struct Scope {
  Scope() { ++g_live_scopes; }
  ~Scope() { --g_live_scopes; }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;
  std::shared_ptr<Scope> parent;
  std::vector<std::pair<std::string, Value>> vars;
  const Value* find(const std::string& name) const {
    for (const Scope* s = this; s; s = s->parent.get())
      for (const auto& kv : s->vars)
        if (kv.first == name) return &kv.second;
    return nullptr;
  }
  void set(const std::string& name, Value v) {
    for (auto& kv : vars)
      if (kv.first == name) {
        kv.second = std::move(v);
        return;
      }
    vars.emplace_back(name, std::move(v));
  }
};

struct Context {
  std::shared_ptr<Scope> scope;
  std::string* out = nullptr;
  std::time_t now = 0;
  bool fixed_now = false;
  int depth = 0;  // macro recursion guard
  int active = 0;  // evals and execs under way (bounded by kMaxActive)
  int64_t iterations = 0;  // loop iterations of this render (bounded by kMaxIterations)
  // Scopes a macro closes over. The scope holds the macro, the macro its scope: a
  // reference cycle, broken after the render by clearing these scopes' variables.
  std::vector<std::weak_ptr<Scope>> closures;
  // Namespaces this render made. {% set ns.x = ns %} (or a list holding ns) is a
  // reference cycle too: after the render their attributes are emptied (into a Dict that
  // frees them without recursion). Expired entries are pruned as the list grows, so a loop
  // that makes a namespace per step keeps this list as long as the live ones.
  std::vector<std::weak_ptr<Dict>> namespaces;
  size_t namespaces_pruned_at = 1024;
  void made_namespace(const std::shared_ptr<Dict>& d) {
    if (namespaces.size() >= namespaces_pruned_at) {
      namespaces.erase(std::remove_if(namespaces.begin(), namespaces.end(), [](const auto& w) { return w.expired(); }),
                       namespaces.end());
      namespaces_pruned_at = std::max<size_t>(1024, 2 * namespaces.size());
    }
    namespaces.push_back(d);
  }
  ~Context() {
    for (auto& w : closures)
      if (auto s = w.lock()) s->vars.clear();
    for (auto& w : namespaces)
      if (auto d = w.lock()) {
        Dict emptied;
        emptied.items.swap(d->items);
      }
  }
};

// Run-time nesting. The parser bounds the tree of one expression and the blocks of one
// body, but a macro may call itself (up to 200 times) from deep inside both, and what the
// C++ stack holds is the product: every eval and exec under way is counted, and past
// kMaxActive the render fails instead of overflowing the stack (real templates stay
// under a hundred).
constexpr int kMaxActive = 3000;

struct ActiveGuard {
  Context& ctx;
  ActiveGuard(Context& c, int line) : ctx(c) {
    if (++ctx.active > kMaxActive) {
      --ctx.active;
      fail(line, "the template nests too deeply when it runs (macro calls inside deep blocks or expressions)");
    }
  }
  ~ActiveGuard() { --ctx.active; }
  ActiveGuard(const ActiveGuard&) = delete;
  ActiveGuard& operator=(const ActiveGuard&) = delete;
};

Value Expr::eval(Context& ctx) const {
  ActiveGuard guard(ctx, line);
  return eval_impl(ctx);
}

Stmt::Flow Stmt::exec(Context& ctx) const {
  ActiveGuard guard(ctx, line);
  return exec_impl(ctx);
}

Stmt::Flow exec_body(const Body& body, Context& ctx) {
  for (const auto& s : body) {
    Stmt::Flow f = s->exec(ctx);
    if (f != Stmt::kNormal) return f;
  }
  return Stmt::kNormal;
}

// ---------------------------------------------------------------------------
// Attribute and item access (jinja2's Environment.getattr / getitem)

const char* object_desc(const Value& v) {
  switch (v.t) {
    case Value::kNone: return "None";
    case Value::kBool: return "bool object";
    case Value::kInt: return "int object";
    case Value::kFloat: return "float object";
    case Value::kStr: return "str object";
    case Value::kList: return v.tuple ? "tuple object" : "list object";
    case Value::kDict: return "dict object";
    case Value::kNamespace: return "Namespace object";
    default: return "object";
  }
}

Value missing_attr(const Value& obj, const std::string& name) {
  return Value::undef(std::string("'") + object_desc(obj) + "' has no attribute '" + name + "'");
}

bool is_str_method(const std::string& n) {
  static const std::set<std::string> k = {"startswith", "endswith", "split", "rsplit", "strip", "lstrip", "rstrip",
                                          "replace", "upper", "lower", "title", "capitalize", "find", "rfind",
                                          "count", "join", "isdigit", "isalpha", "isalnum", "isspace", "islower",
                                          "isupper", "splitlines", "format", "index", "rindex", "zfill",
                                          "center", "ljust", "rjust", "swapcase", "casefold", "partition",
                                          "rpartition", "removeprefix", "removesuffix", "expandtabs", "encode",
                                          "isnumeric", "isdecimal", "istitle", "isidentifier", "isprintable",
                                          "isascii", "translate", "maketrans", "format_map"};
  return k.count(n) > 0;
}
bool is_dict_method(const std::string& n) {
  static const std::set<std::string> k = {"items", "keys", "values", "get", "copy", "pop", "popitem",
                                          "setdefault", "update", "clear", "fromkeys"};
  return k.count(n) > 0;
}
bool is_list_method(const std::string& n) {
  static const std::set<std::string> k = {"index", "count", "copy", "append", "extend", "insert", "pop",
                                          "remove", "reverse", "sort", "clear"};
  return k.count(n) > 0;
}

Value call_method(const Value& obj, const std::string& name, CallArgs& args, Context& ctx, int line);

Value bound_method(const Value& obj, const std::string& name) {
  auto c = std::make_shared<Callable>();
  c->name = name;
  Value self = obj;
  c->fn = [self, name](CallArgs& a, Context& ctx, int line) { return call_method(self, name, a, ctx, line); };
  return Value::func(c);
}

Value loop_attr(const LoopState& st, const std::string& name, const Value& self) {
  const int64_t n = int64_t(st.items->size()), i = st.index0;
  if (name == "index") return Value::integer(i + 1);
  if (name == "index0") return Value::integer(i);
  if (name == "revindex") return Value::integer(n - i);
  if (name == "revindex0") return Value::integer(n - i - 1);
  if (name == "first") return Value::boolean(i == 0);
  if (name == "last") return Value::boolean(i == n - 1);
  if (name == "length") return Value::integer(n);
  if (name == "depth") return Value::integer(1);
  if (name == "depth0") return Value::integer(0);
  if (name == "previtem") return i > 0 ? (*st.items)[i - 1] : Value::undef("there is no previous item");
  if (name == "nextitem") return i + 1 < n ? (*st.items)[i + 1] : Value::undef("there is no next item");
  if (name == "cycle") return bound_method(self, name);
  return Value::undef("'LoopContext' object has no attribute '" + name + "'");
}

Value get_attr(const Value& obj, const std::string& name, int line) {
  switch (obj.t) {
    case Value::kUndef: fail(line, undefined_message(obj));
    case Value::kDict:
      if (is_dict_method(name)) return bound_method(obj, name);
      if (const Value* v = obj.d->find(name)) return *v;
      return missing_attr(obj, name);
    case Value::kNamespace:
      if (const Value* v = obj.d->find(name)) return *v;
      return missing_attr(obj, name);
    case Value::kStr:
      if (is_str_method(name)) return bound_method(obj, name);
      return missing_attr(obj, name);
    case Value::kList:
      if (is_list_method(name)) return bound_method(obj, name);
      return missing_attr(obj, name);
    case Value::kLoop: return loop_attr(*obj.loop, name, obj);
    default: return missing_attr(obj, name);
  }
}

// Python index normalization; false when out of range.
bool normalize_index(int64_t* k, int64_t n) {
  if (*k < 0) *k += n;
  return *k >= 0 && *k < n;
}

Value get_item(const Value& obj, const Value& key, int line) {
  if (obj.is_undef()) fail(line, undefined_message(obj));
  if (obj.gen) fail(line, "'generator' object is not subscriptable (add | list)");
  if (key.t == Value::kStr && obj.t != Value::kDict) return get_attr(obj, key.sv(), line);
  switch (obj.t) {
    case Value::kDict:
      if (key.t == Value::kStr) {
        if (const Value* v = obj.d->find(key.sv())) return *v;
        if (is_dict_method(key.sv())) return bound_method(obj, key.sv());
        return missing_attr(obj, key.sv());
      }
      return Value::undef(std::string("'dict object' has no attribute ") + py_repr(key));
    case Value::kList:
      if (key.is_intlike()) {
        int64_t k = key.as_int();
        if (normalize_index(&k, int64_t(obj.l->size()))) return (*obj.l)[k];
      }
      return Value::undef(std::string(object_desc(obj)) + " has no element " + py_repr(key));
    case Value::kStr:
      if (key.is_intlike()) {
        int64_t k = key.as_int();
        if (is_ascii(obj.sv())) {
          if (normalize_index(&k, int64_t(obj.sv().size()))) return Value::str(obj.sv().substr(k, 1));
        } else {
          std::u32string u = utf8_decode(obj.sv());
          if (normalize_index(&k, int64_t(u.size()))) return Value::str(utf8_encode(u.substr(k, 1)));
        }
      }
      return Value::undef(std::string("str object has no element ") + py_repr(key));
    default: return Value::undef(std::string(object_desc(obj)) + " has no element " + py_repr(key));
  }
}

// Python slice semantics (slice.indices) over n elements.
std::vector<int64_t> slice_positions(int64_t n, const Value& a, const Value& b, const Value& c, int line) {
  auto as_opt = [&](const Value& v, const char* what) -> std::optional<int64_t> {
    if (v.t == Value::kNone || v.is_undef()) return std::nullopt;
    if (!v.is_intlike()) fail(line, std::string("slice ") + what + " must be an integer or None");
    return v.as_int();
  };
  const int64_t step = as_opt(c, "step").value_or(1);
  if (step == 0) fail(line, "slice step cannot be zero");
  auto clamp = [&](std::optional<int64_t> v, int64_t dflt) {
    if (!v) return dflt;
    int64_t x = *v;
    if (x < 0) {
      x += n;
      if (x < 0) x = step < 0 ? -1 : 0;
    } else if (x >= n) {
      x = step < 0 ? n - 1 : n;
    }
    return x;
  };
  const int64_t start = clamp(as_opt(a, "start"), step < 0 ? n - 1 : 0);
  const int64_t stop = clamp(as_opt(b, "stop"), step < 0 ? -1 : n);
  std::vector<int64_t> pos;
  if (step > 0)
    for (int64_t k = start; k < stop; k += step) pos.push_back(k);
  else
    for (int64_t k = start; k > stop; k += step) pos.push_back(k);
  return pos;
}

Value do_slice(const Value& obj, const Value& a, const Value& b, const Value& c, int line) {
  if (obj.is_undef()) fail(line, undefined_message(obj));
  if (obj.gen) fail(line, "'generator' object is not subscriptable (add | list)");
  if (obj.t == Value::kList) {
    List out;
    for (int64_t k : slice_positions(int64_t(obj.l->size()), a, b, c, line)) out.push_back((*obj.l)[k]);
    return Value::list(std::move(out), obj.tuple);
  }
  if (obj.t == Value::kStr) {
    if (is_ascii(obj.sv())) {
      std::string out;
      for (int64_t k : slice_positions(int64_t(obj.sv().size()), a, b, c, line)) out += obj.sv()[k];
      return Value::str(out);
    }
    std::u32string u = utf8_decode(obj.sv()), out;
    for (int64_t k : slice_positions(int64_t(u.size()), a, b, c, line)) out += u[k];
    return Value::str(utf8_encode(out));
  }
  fail(line, std::string("'") + type_name(obj) + "' object is not subscriptable");
}

// ---------------------------------------------------------------------------
// Argument binding for builtins: positional then keyword, by parameter name.

struct Params {
  const char* fn;
  std::vector<const char*> names;
  std::vector<std::optional<Value>> bound;
  Params(const char* f, std::vector<const char*> n, CallArgs& a, int line, size_t skip_pos = 0) : fn(f), names(std::move(n)) {
    bound.resize(names.size());
    if (a.pos.size() - skip_pos > names.size())
      fail(line, std::string(fn) + "() takes at most " + std::to_string(names.size()) + " arguments");
    for (size_t k = skip_pos; k < a.pos.size(); ++k) bound[k - skip_pos] = a.pos[k];
    for (auto& kv : a.kw) {
      size_t j = 0;
      while (j < names.size() && kv.first != names[j]) ++j;
      if (j == names.size()) fail(line, std::string(fn) + "() got an unexpected keyword argument '" + kv.first + "'");
      if (bound[j]) fail(line, std::string(fn) + "() got multiple values for argument '" + kv.first + "'");
      bound[j] = kv.second;
    }
  }
  bool has(size_t k) const { return bound[k].has_value(); }
  const Value& get(size_t k, int line) const {
    if (!bound[k]) fail(line, std::string(fn) + "() missing required argument '" + names[k] + "'");
    return *bound[k];
  }
  Value get_or(size_t k, Value dflt) const { return bound[k] ? *bound[k] : dflt; }
};

const std::string& need_str(const Value& v, const char* what, int line) {
  if (v.t != Value::kStr) {
    check_defined(v, line);
    fail(line, std::string(what) + " must be a string, not '" + type_name(v) + "'");
  }
  return v.sv();
}

// ---------------------------------------------------------------------------
// str / dict / list methods

std::vector<std::string> py_split(const std::string& s, const Value& sep, int64_t maxsplit, bool right, int line) {
  std::vector<std::string> parts;
  if (sep.t == Value::kNone || sep.is_undef()) {
    // whitespace split: runs of whitespace, no empty strings
    std::u32string u = utf8_decode(s);
    std::vector<std::pair<size_t, size_t>> words;
    size_t k = 0;
    while (k < u.size()) {
      while (k < u.size() && py_isspace(u[k])) ++k;
      if (k >= u.size()) break;
      size_t b = k;
      while (k < u.size() && !py_isspace(u[k])) ++k;
      words.emplace_back(b, k);
    }
    if (maxsplit < 0 || int64_t(words.size()) <= maxsplit + 1) {
      for (auto& w : words) parts.push_back(utf8_encode(u.substr(w.first, w.second - w.first)));
      return parts;
    }
    if (!right) {
      for (int64_t j = 0; j < maxsplit; ++j) parts.push_back(utf8_encode(u.substr(words[j].first, words[j].second - words[j].first)));
      parts.push_back(utf8_encode(u.substr(words[maxsplit].first)));
    } else {
      const size_t first_kept = words.size() - size_t(maxsplit);
      parts.push_back(utf8_encode(u.substr(0, words[first_kept - 1].second)));
      for (size_t j = first_kept; j < words.size(); ++j)
        parts.push_back(utf8_encode(u.substr(words[j].first, words[j].second - words[j].first)));
    }
    return parts;
  }
  const std::string& sp = need_str(sep, "split separator", line);
  if (sp.empty()) fail(line, "empty separator");
  if (!right) {
    size_t b = 0;
    int64_t done = 0;
    for (;;) {
      size_t e = (maxsplit >= 0 && done >= maxsplit) ? std::string::npos : s.find(sp, b);
      if (e == std::string::npos) {
        parts.push_back(s.substr(b));
        break;
      }
      parts.push_back(s.substr(b, e - b));
      b = e + sp.size();
      ++done;
    }
  } else {
    size_t e = s.size();
    int64_t done = 0;
    for (;;) {
      size_t b = (maxsplit >= 0 && done >= maxsplit) || e < sp.size() ? std::string::npos : s.rfind(sp, e - sp.size());
      if (b == std::string::npos) {
        parts.push_back(s.substr(0, e));
        break;
      }
      parts.push_back(s.substr(b + sp.size(), e - b - sp.size()));
      e = b;
      ++done;
    }
    std::reverse(parts.begin(), parts.end());
  }
  return parts;
}

std::vector<std::string> py_splitlines(const std::string& s, bool keepends) {
  std::vector<std::string> out;
  std::u32string u = utf8_decode(s);
  size_t b = 0, k = 0;
  while (k < u.size()) {
    char32_t c = u[k];
    bool brk = c == '\n' || c == '\r' || c == 0x0b || c == 0x0c || (c >= 0x1c && c <= 0x1e) || c == 0x85 ||
               c == 0x2028 || c == 0x2029;
    if (!brk) {
      ++k;
      continue;
    }
    size_t e = k + 1;
    if (c == '\r' && e < u.size() && u[e] == '\n') ++e;
    out.push_back(utf8_encode(u.substr(b, (keepends ? e : k) - b)));
    b = k = e;
  }
  if (b < u.size()) out.push_back(utf8_encode(u.substr(b)));
  return out;
}

std::string ascii_case(const std::string& s, int mode, const char* fn, int line) {
  // mode 0 lower, 1 upper, 2 title, 3 capitalize
  if (!is_ascii(s)) {
    bool letters = false;
    for (char32_t c : utf8_decode(s))
      if (c >= 0x80) letters = true;
    if (letters) fail(line, std::string(fn) + "() of non-ASCII text is not supported by this engine");
  }
  std::string out = s;
  bool prev_cased = false;
  for (size_t k = 0; k < out.size(); ++k) {
    unsigned char c = static_cast<unsigned char>(out[k]);
    const bool alpha = std::isalpha(c) != 0;
    if (mode == 0) out[k] = char(std::tolower(c));
    else if (mode == 1) out[k] = char(std::toupper(c));
    else if (mode == 2) out[k] = char(prev_cased ? std::tolower(c) : std::toupper(c));
    else out[k] = char(k == 0 ? std::toupper(c) : std::tolower(c));
    prev_cased = alpha;
  }
  return out;
}

bool starts_or_ends(const std::string& s, const Value& what, bool ends, const char* fn, int line) {
  auto one = [&](const Value& p) {
    const std::string& x = need_str(p, fn, line);
    if (x.size() > s.size()) return false;
    return ends ? s.compare(s.size() - x.size(), x.size(), x) == 0 : s.compare(0, x.size(), x) == 0;
  };
  if (what.t == Value::kList && what.tuple) {
    for (const auto& p : *what.l)
      if (one(p)) return true;
    return false;
  }
  return one(what);
}

int64_t py_find(const std::string& s, const std::string& sub, bool right) {
  size_t b = right ? s.rfind(sub) : s.find(sub);
  if (b == std::string::npos) return -1;
  // byte offset -> code point offset
  int64_t n = 0;
  for (size_t k = 0; k < b; ++k) n += (static_cast<unsigned char>(s[k]) & 0xc0) != 0x80;
  return n;
}

Value call_str_method(const std::string& s, const std::string& name, CallArgs& a, int line) {
  auto nopos = [&](size_t maxn) {
    if (a.pos.size() > maxn || !a.kw.empty())
      fail(line, "str." + name + "() called with unsupported arguments");
  };
  if (name == "startswith" || name == "endswith") {
    nopos(1);
    if (a.pos.empty()) fail(line, "str." + name + "() takes at least 1 argument");
    return Value::boolean(starts_or_ends(s, a.pos[0], name == "endswith", name.c_str(), line));
  }
  if (name == "strip" || name == "lstrip" || name == "rstrip") {
    nopos(1);
    const bool has = !a.pos.empty() && a.pos[0].t != Value::kNone;
    const std::string* chars = has ? &need_str(a.pos[0], "strip characters", line) : nullptr;
    return Value::str(py_strip(s, chars, name != "rstrip", name != "lstrip"));
  }
  if (name == "split" || name == "rsplit") {
    Params p("split", {"sep", "maxsplit"}, a, line);
    Value sep = p.get_or(0, Value::none());
    Value maxs = p.get_or(1, Value::integer(-1));
    if (!maxs.is_intlike()) fail(line, "split maxsplit must be an integer");
    List out;
    for (auto& part : py_split(s, sep, maxs.as_int(), name == "rsplit", line)) out.push_back(Value::str(part));
    return Value::list(std::move(out));
  }
  if (name == "splitlines") {
    Params p("splitlines", {"keepends"}, a, line);
    List out;
    for (auto& part : py_splitlines(s, truthy(p.get_or(0, Value::boolean(false))))) out.push_back(Value::str(part));
    return Value::list(std::move(out));
  }
  if (name == "replace") {
    nopos(3);
    if (a.pos.size() < 2) fail(line, "str.replace() takes at least 2 arguments");
    const std::string& old = need_str(a.pos[0], "replace old", line);
    const std::string& rep = need_str(a.pos[1], "replace new", line);
    int64_t count = a.pos.size() > 2 ? a.pos[2].as_int() : -1;
    if (old.empty()) fail(line, "str.replace() with an empty old string is not supported by this engine");
    std::string out;
    size_t b = 0;
    int64_t done = 0;
    for (;;) {
      size_t e = (count >= 0 && done >= count) ? std::string::npos : s.find(old, b);
      if (e == std::string::npos) break;
      out.append(s, b, e - b);
      out += rep;
      b = e + old.size();
      ++done;
    }
    out.append(s, b, std::string::npos);
    return Value::str(out);
  }
  if (name == "lower" || name == "upper" || name == "title" || name == "capitalize") {
    nopos(0);
    int mode = name == "lower" ? 0 : name == "upper" ? 1 : name == "title" ? 2 : 3;
    return Value::str(ascii_case(s, mode, name.c_str(), line));
  }
  if (name == "find" || name == "rfind" || name == "index" || name == "rindex") {
    nopos(1);
    if (a.pos.empty()) fail(line, "str." + name + "() takes 1 argument");
    int64_t r = py_find(s, need_str(a.pos[0], name.c_str(), line), name[0] == 'r');
    if (r < 0 && (name == "index" || name == "rindex")) fail(line, "substring not found");
    return Value::integer(r);
  }
  if (name == "count") {
    nopos(1);
    if (a.pos.empty()) fail(line, "str.count() takes 1 argument");
    const std::string& sub = need_str(a.pos[0], "count", line);
    if (sub.empty()) return Value::integer(py_len(s) + 1);
    int64_t n = 0;
    for (size_t b = s.find(sub); b != std::string::npos; b = s.find(sub, b + sub.size())) ++n;
    return Value::integer(n);
  }
  if (name == "join") {
    nopos(1);
    if (a.pos.empty()) fail(line, "str.join() takes 1 argument");
    std::string out;
    bool first = true;
    for (const auto& v : items_of(a.pos[0], line)) {
      if (!first) out += s;
      first = false;
      out += need_str(v, "str.join() item", line);
    }
    return Value::str(out);
  }
  if (name == "removeprefix" || name == "removesuffix") {
    nopos(1);
    if (a.pos.empty()) fail(line, "str." + name + "() takes 1 argument");
    const std::string& x = need_str(a.pos[0], name.c_str(), line);
    if (name == "removeprefix") return Value::str(s.compare(0, x.size(), x) == 0 ? s.substr(x.size()) : s);
    return Value::str(s.size() >= x.size() && s.compare(s.size() - x.size(), x.size(), x) == 0
                          ? s.substr(0, s.size() - x.size())
                          : s);
  }
  if (name == "isspace" || name == "isdigit" || name == "isalpha" || name == "isalnum" || name == "islower" ||
      name == "isupper") {
    nopos(0);
    if (!is_ascii(s)) fail(line, "str." + name + "() of non-ASCII text is not supported by this engine");
    if (s.empty()) return Value::boolean(false);
    bool any_cased = false, ok = true;
    for (unsigned char c : s) {
      if (name == "isspace") ok &= py_isspace(c);
      else if (name == "isdigit") ok &= std::isdigit(c) != 0;
      else if (name == "isalpha") ok &= std::isalpha(c) != 0;
      else if (name == "isalnum") ok &= std::isalnum(c) != 0;
      else if (name == "islower") ok &= !std::isupper(c), any_cased |= std::islower(c) != 0;
      else ok &= !std::islower(c), any_cased |= std::isupper(c) != 0;
    }
    if (name == "islower" || name == "isupper") ok &= any_cased;
    return Value::boolean(ok);
  }
  fail(line, "unsupported str method '" + name + "'");
}

Value call_method(const Value& obj, const std::string& name, CallArgs& a, Context& ctx, int line) {
  if (obj.t == Value::kStr) return call_str_method(obj.sv(), name, a, line);
  if (obj.t == Value::kDict) {
    if (name == "items" || name == "keys" || name == "values") {
      if (!a.pos.empty() || !a.kw.empty()) fail(line, "dict." + name + "() takes no arguments");
      List out;
      for (const auto& kv : obj.d->items) {
        if (name == "items") out.push_back(Value::list({Value::str(kv.first), kv.second}, true));
        else if (name == "keys") out.push_back(Value::str(kv.first));
        else out.push_back(kv.second);
      }
      return Value::list(std::move(out));
    }
    if (name == "get") {
      Params p("get", {"key", "default"}, a, line);
      const Value& k = p.get(0, line);
      if (k.t == Value::kStr)
        if (const Value* v = obj.d->find(k.sv())) return *v;
      return p.get_or(1, Value::none());
    }
    fail(line, "dict." + name + "() is not allowed (the template may not change its data)");
  }
  if (obj.t == Value::kList) {
    if (name == "index" || name == "count") {
      if (a.pos.size() != 1 || !a.kw.empty()) fail(line, "list." + name + "() takes 1 argument");
      int64_t n = 0, first = -1;
      for (size_t k = 0; k < obj.l->size(); ++k)
        if (equals((*obj.l)[k], a.pos[0])) {
          if (first < 0) first = int64_t(k);
          ++n;
        }
      if (name == "count") return Value::integer(n);
      if (first < 0) fail(line, "list.index(x): x not in list");
      return Value::integer(first);
    }
    fail(line, "list." + name + "() is not allowed (the template may not change its data)");
  }
  if (obj.t == Value::kLoop && name == "cycle") {
    if (a.pos.empty()) fail(line, "loop.cycle() needs at least one argument");
    return a.pos[size_t(obj.loop->index0) % a.pos.size()];
  }
  check_defined(obj, line);
  fail(line, std::string("'") + type_name(obj) + "' object has no method '" + name + "'");
}

// ---------------------------------------------------------------------------
// Tests ({{ x is name(args) }})

bool apply_test(const std::string& name, const Value& v, const std::vector<Value>& args, int line);

const std::set<std::string>& known_tests() {
  static const std::set<std::string> k = {
      "defined", "undefined", "none", "string", "number", "integer", "float", "boolean", "true", "false",
      "mapping", "iterable", "sequence", "callable", "equalto", "eq", "==", "ne", "!=", "lt", "<", "le", "<=",
      "gt", ">", "ge", ">=", "in", "odd", "even", "divisibleby", "sameas", "lower", "upper"};
  return k;
}

bool apply_test(const std::string& name, const Value& v, const std::vector<Value>& args, int line) {
  auto arg = [&](size_t k) -> const Value& {
    if (k >= args.size()) fail(line, "test '" + name + "' needs an argument");
    return args[k];
  };
  if (name == "defined") return !v.is_undef();
  if (name == "undefined") return v.is_undef();
  if (name == "none") return v.t == Value::kNone;
  if (name == "string") return v.t == Value::kStr;
  if (name == "number") return v.is_number();
  if (name == "integer") return v.t == Value::kInt;
  if (name == "float") return v.t == Value::kFloat;
  if (name == "boolean") return v.t == Value::kBool;
  if (name == "true") return v.t == Value::kBool && v.b;
  if (name == "false") return v.t == Value::kBool && !v.b;
  if (name == "mapping") return v.t == Value::kDict;
  if (name == "iterable") return v.t == Value::kUndef || v.t == Value::kStr || v.t == Value::kList || v.t == Value::kDict;
  if (name == "sequence") return v.t == Value::kStr || (v.t == Value::kList && !v.gen) || v.t == Value::kDict;
  if (name == "callable") return v.t == Value::kFunc;
  if (name == "equalto" || name == "eq" || name == "==") return equals(v, arg(0));
  if (name == "ne" || name == "!=") return !equals(v, arg(0));
  if (name == "lt" || name == "<") return compare_order(v, arg(0), line, "<") < 0;
  if (name == "le" || name == "<=") return compare_order(v, arg(0), line, "<=") <= 0;
  if (name == "gt" || name == ">") return compare_order(v, arg(0), line, ">") > 0;
  if (name == "ge" || name == ">=") return compare_order(v, arg(0), line, ">=") >= 0;
  if (name == "sameas") {
    const Value& o = arg(0);
    if (v.t != o.t) return false;
    if (v.t == Value::kNone || v.t == Value::kUndef) return true;
    if (v.t == Value::kBool) return v.b == o.b;
    if (v.t == Value::kList) return v.l == o.l;
    if (v.t == Value::kDict || v.t == Value::kNamespace) return v.d == o.d;
    return false;
  }
  if (name == "odd" || name == "even" || name == "divisibleby") {
    check_defined(v, line);
    if (!v.is_intlike()) fail(line, "test '" + name + "' needs an integer");
    int64_t x = v.as_int();
    if (name == "odd") return ((x % 2) + 2) % 2 == 1;
    if (name == "even") return x % 2 == 0;
    const Value& d = arg(0);
    if (!d.is_intlike() || d.as_int() == 0) fail(line, "divisibleby needs a non-zero integer");
    return x % d.as_int() == 0;
  }
  if (name == "lower" || name == "upper") {
    if (v.t != Value::kStr) return false;
    const std::string& s = v.sv();
    return s == ascii_case(s, name == "lower" ? 0 : 1, name.c_str(), line);
  }
  if (name == "in") {
    const Value& c = arg(0);
    if (c.t == Value::kStr) return v.t == Value::kStr && c.sv().find(v.sv()) != std::string::npos;
    if (c.t == Value::kDict) return v.t == Value::kStr && c.d->find(v.sv()) != nullptr;
    for (const auto& x : items_of(c, line))
      if (equals(x, v)) return true;
    return false;
  }
  fail(line, "unsupported test '" + name + "'");
}

// ---------------------------------------------------------------------------
// Filters ({{ x | name(args) }})

const std::set<std::string>& known_filters() {
  static const std::set<std::string> k = {
      "abs", "capitalize", "count", "d", "default", "e", "escape", "first", "float", "indent", "int", "items",
      "join", "last", "length", "list", "lower", "map", "max", "min", "reject", "rejectattr", "replace",
      "reverse", "safe", "select", "selectattr", "sort", "string", "sum", "title", "tojson", "trim", "unique",
      "upper"};
  return k;
}

// Attribute path "a.b" or "0" as jinja2's make_attrgetter resolves it.
Value attr_path(const Value& v, const std::string& path, int line) {
  Value cur = v;
  size_t b = 0;
  for (;;) {
    size_t e = path.find('.', b);
    std::string part = path.substr(b, e == std::string::npos ? std::string::npos : e - b);
    bool digits = !part.empty() && std::all_of(part.begin(), part.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); });
    cur = digits ? get_item(cur, Value::integer(std::stoll(part)), line) : get_item(cur, Value::str(part), line);
    if (e == std::string::npos) return cur;
    b = e + 1;
  }
}

Value apply_filter(const std::string& name, const Value& v, CallArgs& a, Context& ctx, int line);

Value select_like(const std::string& name, const Value& v, CallArgs& a, Context& ctx, int line) {
  const bool attr = name == "selectattr" || name == "rejectattr";
  const bool want = name == "select" || name == "selectattr";
  if (!a.kw.empty()) fail(line, "filter '" + name + "' takes no keyword arguments");
  size_t k = 0;
  std::string path;
  if (attr) {
    if (a.pos.empty()) fail(line, "filter '" + name + "' needs an attribute name");
    path = need_str(a.pos[k++], name.c_str(), line);
  }
  std::string test;
  if (k < a.pos.size()) {
    test = need_str(a.pos[k++], "test name", line);
    if (!known_tests().count(test)) fail(line, "unsupported test '" + test + "'");
  }
  std::vector<Value> targs(a.pos.begin() + std::min(k, a.pos.size()), a.pos.end());
  List out;
  for (const auto& item : items_of(v, line)) {
    Value x = attr ? attr_path(item, path, line) : item;
    bool ok = test.empty() ? truthy(x) : apply_test(test, x, targs, line);
    if (ok == want) out.push_back(item);
  }
  return Value::generator(std::move(out));
}

std::string html_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&#34;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}

Value apply_filter(const std::string& name, const Value& v, CallArgs& a, Context& ctx, int line) {
  if (name == "default" || name == "d") {
    Params p("default", {"default_value", "boolean"}, a, line);
    const bool boolean = truthy(p.get_or(1, Value::boolean(false)));
    if (v.is_undef() || (boolean && !truthy(v))) return p.get_or(0, Value::str(""));
    return v;
  }
  if (name == "length" || name == "count") return Value::integer(length_of(v, line));
  if (name == "trim") {
    Params p("trim", {"chars"}, a, line);
    Value chars = p.get_or(0, Value::none());
    const std::string* c = chars.t == Value::kNone ? nullptr : &need_str(chars, "trim chars", line);
    return Value::str(py_strip(to_str(v), c, true, true));
  }
  if (name == "tojson") {
    Params p("tojson", {"ensure_ascii", "indent", "separators", "sort_keys"}, a, line);
    JsonStyle st;
    st.ensure_ascii = truthy(p.get_or(0, Value::boolean(false)));
    st.sort_keys = truthy(p.get_or(3, Value::boolean(false)));
    Value ind = p.get_or(1, Value::none());
    std::string indent_str;
    if (ind.t == Value::kStr) {
      indent_str = ind.sv();
      st.indent = &indent_str;
    } else if (ind.is_intlike()) {
      indent_str = std::string(size_t(std::max<int64_t>(0, ind.as_int())), ' ');
      st.indent = &indent_str;
    } else if (ind.t != Value::kNone) {
      fail(line, "tojson indent must be an integer or a string");
    }
    if (st.indent) st.item_sep = ",";  // json.dumps's default separators with an indent
    Value seps = p.get_or(2, Value::none());
    if (seps.t != Value::kNone) {
      if (seps.t != Value::kList || seps.l->size() != 2 || (*seps.l)[0].t != Value::kStr || (*seps.l)[1].t != Value::kStr)
        fail(line, "tojson separators must be a pair of strings, e.g. (',', ':')");
      st.item_sep = (*seps.l)[0].sv();
      st.key_sep = (*seps.l)[1].sv();
    }
    std::string out;
    to_json(out, v, st, 0, line);
    return Value::str(out);
  }
  if (name == "string") {
    if (v.gen) fail(line, "string of a generator is not supported: jinja2 gives its memory address; add | list");
    return Value::str(to_str(v));
  }
  if (name == "safe") return v;
  if (name == "e" || name == "escape") return Value::str(html_escape(to_str(v)));
  if (name == "title") {
    // jinja2's do_title: chunks split after runs of [-\s({[<], first character upper,
    // the rest lower (not str.title(): "['abc']" stays "['abc']").
    const std::string text = to_str(v);
    std::string out;
    bool chunk_start = true;
    for (char c : text) {
      const bool sep = c == '-' || c == '(' || c == '{' || c == '[' || c == '<' || py_isspace(char32_t(static_cast<unsigned char>(c)));
      if (sep) {
        out += c;
        chunk_start = true;
        continue;
      }
      out += ascii_case(std::string(1, c), chunk_start ? 1 : 0, "title", line);
      chunk_start = false;
    }
    if (!is_ascii(text)) ascii_case(text, 2, "title", line);  // refuses non-ASCII letters
    return Value::str(out);
  }
  if (name == "lower" || name == "upper" || name == "capitalize") {
    int mode = name == "lower" ? 0 : name == "upper" ? 1 : 3;
    return Value::str(ascii_case(to_str(v), mode, name.c_str(), line));
  }
  if (name == "replace") {
    CallArgs b;
    b.pos = a.pos;
    for (auto& kv : a.kw) {
      if (kv.first != "count") fail(line, "replace() got an unexpected keyword argument '" + kv.first + "'");
      b.pos.resize(std::max<size_t>(b.pos.size(), 2));
      b.pos.push_back(kv.second);
    }
    return call_str_method(to_str(v), "replace", b, line);
  }
  if (name == "items") {
    if (v.is_undef()) return Value::list();
    if (v.t != Value::kDict) fail(line, "items filter needs a mapping, got '" + std::string(type_name(v)) + "'");
    CallArgs none;
    return Value::generator(*call_method(v, "items", none, ctx, line).l);
  }
  if (name == "list") return Value::list(*iterate(v, line));
  if (name == "first") {
    if (v.gen) {  // next(iter(generator)): consumes one item
      if (*v.gen >= v.l->size()) return Value::undef("No first item, sequence was empty.");
      return (*v.l)[(*v.gen)++];
    }
    auto items = iterate(v, line);
    return items->empty() ? Value::undef("No first item, sequence was empty.") : items->front();
  }
  if (name == "last") {
    if (v.gen) fail(line, "'generator' object is not reversible (add | list before | last)");
    if (v.t != Value::kList && v.t != Value::kStr) check_defined(v, line);
    auto items = iterate(v, line);
    return items->empty() ? Value::undef("No last item, sequence was empty.") : items->back();
  }
  if (name == "reverse") {
    if (v.t == Value::kStr) {
      std::u32string u = utf8_decode(v.sv());
      std::reverse(u.begin(), u.end());
      return Value::str(utf8_encode(u));
    }
    List l = *iterate(v, line);
    std::reverse(l.begin(), l.end());
    return Value::list(std::move(l));
  }
  if (name == "join") {
    Params p("join", {"d", "attribute"}, a, line);
    const std::string sep = to_str(p.get_or(0, Value::str("")));
    Value attr = p.get_or(1, Value::none());
    std::string out;
    bool first = true;
    for (const auto& item : items_of(v, line)) {
      if (!first) out += sep;
      first = false;
      out += to_str(attr.t == Value::kNone ? item : attr_path(item, to_str(attr), line));
    }
    return Value::str(out);
  }
  if (name == "map") {
    List out;
    std::string attr;
    Value dflt = Value::undef();
    bool has_attr = false;
    for (auto& kv : a.kw) {
      if (kv.first == "attribute") attr = to_str(kv.second), has_attr = true;
      else if (kv.first == "default") dflt = kv.second;
      else fail(line, "map() got an unexpected keyword argument '" + kv.first + "'");
    }
    if (has_attr) {
      for (const auto& item : items_of(v, line)) {
        Value x = attr_path(item, attr, line);
        out.push_back(x.is_undef() && !dflt.is_undef() ? dflt : x);
      }
      return Value::generator(std::move(out));
    }
    if (a.pos.empty()) fail(line, "map() needs a filter name or attribute=");
    const std::string f = need_str(a.pos[0], "map filter name", line);
    if (!known_filters().count(f)) fail(line, "unsupported filter '" + f + "'");
    CallArgs rest;
    rest.pos.assign(a.pos.begin() + 1, a.pos.end());
    for (const auto& item : items_of(v, line)) {
      CallArgs copy = rest;
      out.push_back(apply_filter(f, item, copy, ctx, line));
    }
    return Value::generator(std::move(out));
  }
  if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr")
    return select_like(name, v, a, ctx, line);
  if (name == "int") {
    check_defined(v, line);  // Undefined.__int__ raises in jinja2
    Params p("int", {"default", "base"}, a, line);
    Value dflt = p.get_or(0, Value::integer(0));
    if (v.is_intlike()) return Value::integer(v.as_int());
    if (v.t == Value::kFloat) return Value::integer(int64_t(v.f));
    if (v.t == Value::kStr) {
      std::string s = py_strip(v.sv(), nullptr, true, true);
      char* end = nullptr;
      long long x = std::strtoll(s.c_str(), &end, 10);
      if (!s.empty() && end && *end == 0) return Value::integer(x);
      double d = std::strtod(s.c_str(), &end);
      if (!s.empty() && end && *end == 0) return Value::integer(int64_t(d));
    }
    return dflt;
  }
  if (name == "float") {
    check_defined(v, line);
    Params p("float", {"default"}, a, line);
    if (v.is_number()) return Value::real(v.as_double());
    if (v.t == Value::kStr) {
      std::string s = py_strip(v.sv(), nullptr, true, true);
      char* end = nullptr;
      double d = std::strtod(s.c_str(), &end);
      if (!s.empty() && end && *end == 0) return Value::real(d);
    }
    return p.get_or(0, Value::real(0.0));
  }
  if (name == "abs") {
    if (v.is_intlike()) return Value::integer(std::llabs(v.as_int()));
    if (v.t == Value::kFloat) return Value::real(std::fabs(v.f));
    check_defined(v, line);
    fail(line, std::string("bad operand type for abs(): '") + type_name(v) + "'");
  }
  if (name == "sort" || name == "unique" || name == "min" || name == "max") {
    Params p(name.c_str(), name == "sort" ? std::vector<const char*>{"reverse", "case_sensitive", "attribute"}
                                          : std::vector<const char*>{"case_sensitive", "attribute"},
             a, line);
    const bool reverse = name == "sort" && truthy(p.get_or(0, Value::boolean(false)));
    const bool cs = truthy(p.get_or(name == "sort" ? 1 : 0, Value::boolean(false)));
    Value attr = p.get_or(name == "sort" ? 2 : 1, Value::none());
    auto key = [&](const Value& item) {
      Value k = attr.t == Value::kNone ? item : attr_path(item, to_str(attr), line);
      if (!cs && k.t == Value::kStr) return Value::str(ascii_case(k.sv(), 0, "lower", line));
      return k;
    };
    List items = *iterate(v, line);
    if (name == "unique") {
      List out, keys;
      for (const auto& it : items) {
        Value k = key(it);
        if (std::none_of(keys.begin(), keys.end(), [&](const Value& x) { return equals(x, k); })) {
          keys.push_back(k);
          out.push_back(it);
        }
      }
      return Value::generator(std::move(out));
    }
    if (name == "min" || name == "max") {
      if (items.empty()) return Value::undef("No aggregated item, sequence was empty.");
      size_t best = 0;
      for (size_t k = 1; k < items.size(); ++k) {
        int c = compare_order(key(items[k]), key(items[best]), line, "<");
        if ((name == "min" && c < 0) || (name == "max" && c > 0)) best = k;
      }
      return items[best];
    }
    std::stable_sort(items.begin(), items.end(), [&](const Value& x, const Value& y) {
      int c = compare_order(key(x), key(y), line, "<");
      return reverse ? c > 0 : c < 0;
    });
    return Value::list(std::move(items));
  }
  if (name == "sum") {
    Params p("sum", {"attribute", "start"}, a, line);
    Value attr = p.get_or(0, Value::none());
    Value acc = p.get_or(1, Value::integer(0));
    for (const auto& item : items_of(v, line)) {
      Value x = attr.t == Value::kNone ? item : attr_path(item, to_str(attr), line);
      if (!x.is_number() || !acc.is_number()) fail(line, "sum() of non-numbers is not supported by this engine");
      if (x.is_intlike() && acc.is_intlike()) acc = Value::integer(acc.as_int() + x.as_int());
      else acc = Value::real(acc.as_double() + x.as_double());
    }
    return acc;
  }
  if (name == "indent") {
    Params p("indent", {"width", "first", "blank"}, a, line);
    Value w = p.get_or(0, Value::integer(4));
    std::string ind = w.t == Value::kStr ? w.sv() : std::string(size_t(std::max<int64_t>(0, w.as_int())), ' ');
    const bool first = truthy(p.get_or(1, Value::boolean(false))), blank = truthy(p.get_or(2, Value::boolean(false)));
    std::vector<std::string> lines = py_splitlines(to_str(v) + "\n", false);
    std::string rv;
    if (blank) {
      for (size_t k = 0; k < lines.size(); ++k) rv += (k ? "\n" + ind : "") + lines[k];
    } else {
      rv = lines.empty() ? "" : lines[0];
      for (size_t k = 1; k < lines.size(); ++k) rv += "\n" + (lines[k].empty() ? "" : ind + lines[k]);
    }
    return Value::str(first ? ind + rv : rv);
  }
  fail(line, "unsupported filter '" + name + "'");
}

// ---------------------------------------------------------------------------
// Expressions

struct ConstExpr : Expr {
  Value v;
  Value eval_impl(Context&) const override { return v; }
};

struct NameExpr : Expr {
  std::string name;
  Value eval_impl(Context& ctx) const override {
    if (const Value* v = ctx.scope->find(name)) return *v;
    return Value::undef("'" + name + "' is undefined");
  }
};

struct AttrExpr : Expr {
  ExprP obj;
  std::string name;
  Value eval_impl(Context& ctx) const override { return get_attr(obj->eval(ctx), name, line); }
};

struct ItemExpr : Expr {
  ExprP obj, key;
  Value eval_impl(Context& ctx) const override {
    Value o = obj->eval(ctx);
    return get_item(o, key->eval(ctx), line);
  }
};

struct SliceExpr : Expr {
  ExprP obj, a, b, c;  // a/b/c may be null
  Value eval_impl(Context& ctx) const override {
    Value o = obj->eval(ctx);
    Value x = a ? a->eval(ctx) : Value::none(), y = b ? b->eval(ctx) : Value::none(), z = c ? c->eval(ctx) : Value::none();
    return do_slice(o, x, y, z, line);
  }
};

struct ArgList {
  std::vector<ExprP> pos;
  std::vector<std::pair<std::string, ExprP>> kw;
  CallArgs eval(Context& ctx) const {
    CallArgs a;
    for (const auto& e : pos) a.pos.push_back(e->eval(ctx));
    for (const auto& kv : kw) a.kw.emplace_back(kv.first, kv.second->eval(ctx));
    return a;
  }
};

Value call_value(const Value& f, CallArgs& a, Context& ctx, int line) {
  if (f.t == Value::kFunc) return f.fn->fn(a, ctx, line);
  check_defined(f, line);
  fail(line, std::string("'") + type_name(f) + "' object is not callable");
}

struct CallExpr : Expr {
  ExprP callee;
  ArgList args;
  Value eval_impl(Context& ctx) const override {
    // obj.method(...) without building a bound method
    if (auto* at = dynamic_cast<const AttrExpr*>(callee.get())) {
      Value o = at->obj->eval(ctx);
      const bool method = (o.t == Value::kStr && is_str_method(at->name)) ||
                          (o.t == Value::kDict && is_dict_method(at->name)) ||
                          (o.t == Value::kList && is_list_method(at->name)) ||
                          (o.t == Value::kLoop && at->name == "cycle");
      CallArgs a = args.eval(ctx);
      if (method) return call_method(o, at->name, a, ctx, line);
      Value f = get_attr(o, at->name, line);
      return call_value(f, a, ctx, line);
    }
    Value f = callee->eval(ctx);
    CallArgs a = args.eval(ctx);
    return call_value(f, a, ctx, line);
  }
};

struct FilterExpr : Expr {
  ExprP base;
  std::string name;
  ArgList args;
  Value eval_impl(Context& ctx) const override {
    Value v = base->eval(ctx);
    CallArgs a = args.eval(ctx);
    return apply_filter(name, v, a, ctx, line);
  }
};

struct TestExpr : Expr {
  ExprP base;
  std::string name;
  ArgList args;
  bool negated = false;
  Value eval_impl(Context& ctx) const override {
    Value v = base->eval(ctx);
    CallArgs a = args.eval(ctx);
    if (!a.kw.empty()) fail(line, "test '" + name + "' takes no keyword arguments");
    return Value::boolean(apply_test(name, v, a.pos, line) != negated);
  }
};

// Python integers are unbounded; this engine's are 64-bit and refuse to wrap.
[[noreturn]] void overflow(int line) { fail(line, "integer overflow (this engine's integers are 64-bit)"); }
int64_t add_checked(int64_t a, int64_t b, int line) {
  int64_t r;
  if (__builtin_add_overflow(a, b, &r)) overflow(line);
  return r;
}
int64_t sub_checked(int64_t a, int64_t b, int line) {
  int64_t r;
  if (__builtin_sub_overflow(a, b, &r)) overflow(line);
  return r;
}
int64_t mul_checked(int64_t a, int64_t b, int line) {
  int64_t r;
  if (__builtin_mul_overflow(a, b, &r)) overflow(line);
  return r;
}

// Bound on what one template may build (repeated strings and lists, loop iterations),
// so a hostile template fails instead of exhausting memory or time.
constexpr int64_t kMaxBuild = int64_t(1) << 28;
constexpr int64_t kMaxIterations = 10000000;

int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

[[noreturn]] void type_error(const char* op, const Value& a, const Value& b, int line) {
  check_defined(a, line);
  check_defined(b, line);
  fail(line, std::string("unsupported operand type(s) for ") + op + ": '" + type_name(a) + "' and '" + type_name(b) + "'");
}

Value repeat(const Value& seq, int64_t n, int line) {
  const int64_t unit = seq.t == Value::kStr ? int64_t(seq.sv().size()) : int64_t(seq.l->size());
  if (n > 0 && unit > 0 && n > kMaxBuild / unit) fail(line, "repetition too large");
  if (seq.t == Value::kStr) {
    std::string out;
    for (int64_t k = 0; k < n; ++k) out += seq.sv();
    return Value::str(out);
  }
  List out;
  for (int64_t k = 0; k < n; ++k) out.insert(out.end(), seq.l->begin(), seq.l->end());
  return Value::list(std::move(out), seq.tuple);
}

Value binary_op(const std::string& op, const Value& a, const Value& b, int line) {
  if (op == "~") {
    if (a.gen || b.gen) fail(line, "'~' of a generator is not supported: jinja2 prints its memory address; add | list");
    return Value::str(to_str(a) + to_str(b));
  }
  if (a.gen || b.gen) type_error(op.c_str(), a, b, line);
  const bool nums = a.is_number() && b.is_number(), ints = a.is_intlike() && b.is_intlike();
  if (op == "+") {
    if (ints) return Value::integer(add_checked(a.as_int(), b.as_int(), line));
    if (nums) return Value::real(a.as_double() + b.as_double());
    if (a.t == Value::kStr && b.t == Value::kStr) return Value::str(a.sv() + b.sv());
    if (a.t == Value::kList && b.t == Value::kList && a.tuple == b.tuple) {
      if (int64_t(a.l->size() + b.l->size()) > kMaxBuild) fail(line, "list too large");
      List l = *a.l;
      l.insert(l.end(), b.l->begin(), b.l->end());
      return Value::list(std::move(l), a.tuple);
    }
    if (a.t == Value::kStr && !b.is_undef() && b.t != Value::kStr)
      fail(line, std::string("can only concatenate str (not \"") + type_name(b) + "\") to str");
    type_error("+", a, b, line);
  }
  if (op == "-") {
    if (ints) return Value::integer(sub_checked(a.as_int(), b.as_int(), line));
    if (nums) return Value::real(a.as_double() - b.as_double());
    type_error("-", a, b, line);
  }
  if (op == "*") {
    if (ints) return Value::integer(mul_checked(a.as_int(), b.as_int(), line));
    if (nums) return Value::real(a.as_double() * b.as_double());
    if ((a.t == Value::kStr || a.t == Value::kList) && b.is_intlike()) return repeat(a, b.as_int(), line);
    if ((b.t == Value::kStr || b.t == Value::kList) && a.is_intlike()) return repeat(b, a.as_int(), line);
    type_error("*", a, b, line);
  }
  if (op == "/") {
    if (!nums) type_error("/", a, b, line);
    if (b.as_double() == 0) fail(line, "division by zero");
    return Value::real(a.as_double() / b.as_double());
  }
  if (op == "//" || op == "%") {
    if (!nums) {
      if (op == "%" && a.t == Value::kStr) fail(line, "printf-style '%' string formatting is not supported by this engine");
      type_error(op.c_str(), a, b, line);
    }
    if (b.as_double() == 0) fail(line, op == "%" ? "modulo by zero" : "integer division or modulo by zero");
    if (ints) {
      if (a.as_int() == INT64_MIN && b.as_int() == -1) overflow(line);
      int64_t q = floor_div(a.as_int(), b.as_int());
      return Value::integer(op == "//" ? q : a.as_int() - q * b.as_int());
    }
    double x = a.as_double(), y = b.as_double();
    double q = std::floor(x / y);
    if (op == "//") return Value::real(q);
    double m = std::fmod(x, y);
    if (m != 0 && ((m < 0) != (y < 0))) m += y;
    return Value::real(m);
  }
  if (op == "**") {
    if (!nums) type_error("**", a, b, line);
    if (ints && b.as_int() >= 0) {
      int64_t acc = 1, base = a.as_int(), e = b.as_int();
      while (e > 0) {  // square and multiply, refusing to wrap
        if (e & 1) acc = mul_checked(acc, base, line);
        e >>= 1;
        if (e) base = mul_checked(base, base, line);
      }
      return Value::integer(acc);
    }
    return Value::real(std::pow(a.as_double(), b.as_double()));
  }
  fail(line, "unsupported operator '" + op + "'");
}

struct BinaryExpr : Expr {
  std::string op;
  ExprP a, b;
  Value eval_impl(Context& ctx) const override {
    Value x = a->eval(ctx);
    Value y = b->eval(ctx);
    return binary_op(op, x, y, line);
  }
};

struct AndOrExpr : Expr {
  bool is_and = true;
  ExprP a, b;
  Value eval_impl(Context& ctx) const override {
    Value x = a->eval(ctx);
    if (is_and ? !truthy(x) : truthy(x)) return x;
    return b->eval(ctx);
  }
};

struct UnaryExpr : Expr {
  char op;  // '-', '+', '!'
  ExprP e;
  Value eval_impl(Context& ctx) const override {
    Value v = e->eval(ctx);
    if (op == '!') return Value::boolean(!truthy(v));
    if (v.is_intlike()) {
      if (op == '-' && v.as_int() == INT64_MIN) overflow(line);
      return Value::integer(op == '-' ? -v.as_int() : v.as_int());
    }
    if (v.t == Value::kFloat) return Value::real(op == '-' ? -v.f : v.f);
    check_defined(v, line);
    fail(line, std::string("bad operand type for unary ") + op + ": '" + type_name(v) + "'");
  }
};

bool contains(const Value& container, const Value& item, int line) {
  switch (container.t) {
    case Value::kStr:
      if (item.t != Value::kStr) {
        check_defined(item, line);
        fail(line, std::string("'in <string>' requires string as left operand, not ") + type_name(item));
      }
      return container.sv().find(item.sv()) != std::string::npos;
    case Value::kDict: return item.t == Value::kStr && container.d->find(item.sv()) != nullptr;
    case Value::kList:
      if (container.gen) {  // consumes up to the match, as Python's `in` on a generator
        for (size_t& k = *container.gen; k < container.l->size();)
          if (equals((*container.l)[k++], item)) return true;
        return false;
      }
      for (const auto& x : *container.l)
        if (equals(x, item)) return true;
      return false;
    case Value::kUndef: return false;
    default: fail(line, std::string("argument of type '") + type_name(container) + "' is not iterable");
  }
}

struct CompareExpr : Expr {
  ExprP first;
  std::vector<std::pair<std::string, ExprP>> rest;
  Value eval_impl(Context& ctx) const override {
    Value left = first->eval(ctx);
    for (const auto& [op, e] : rest) {
      Value right = e->eval(ctx);
      bool r;
      if (op == "==") r = equals(left, right);
      else if (op == "!=") r = !equals(left, right);
      else if (op == "in") r = contains(right, left, line);
      else if (op == "notin") r = !contains(right, left, line);
      else {
        int c = compare_order(left, right, line, op.c_str());
        r = op == "<" ? c < 0 : op == "<=" ? c <= 0 : op == ">" ? c > 0 : c >= 0;
      }
      if (!r) return Value::boolean(false);
      left = std::move(right);
    }
    return Value::boolean(true);
  }
};

struct CondExpr : Expr {
  ExprP test, then, otherwise;  // otherwise may be null (-> undefined)
  Value eval_impl(Context& ctx) const override {
    if (truthy(test->eval(ctx))) return then->eval(ctx);
    if (otherwise) return otherwise->eval(ctx);
    return Value::undef("the inline if-expression evaluated to false and no else section was defined");
  }
};

struct ListExpr : Expr {
  std::vector<ExprP> items;
  bool tuple = false;
  Value eval_impl(Context& ctx) const override {
    List l;
    l.reserve(items.size());
    for (const auto& e : items) l.push_back(e->eval(ctx));
    return Value::list(std::move(l), tuple);
  }
};

struct DictExpr : Expr {
  std::vector<std::pair<ExprP, ExprP>> items;
  Value eval_impl(Context& ctx) const override {
    auto d = std::make_shared<Dict>();
    for (const auto& [k, v] : items) {
      Value key = k->eval(ctx);
      if (key.t != Value::kStr) fail(line, "dict keys other than strings are not supported by this engine");
      d->set(key.sv(), v->eval(ctx));
    }
    return Value::dict(d);
  }
};

// ---------------------------------------------------------------------------
// Statements

void check_output_size(const Context& ctx, int line) {
  if (int64_t(ctx.out->size()) > kMaxBuild) fail(line, "the rendering grows beyond 256 MiB");
}

struct OutputStmt : Stmt {
  std::string text;
  Flow exec_impl(Context& ctx) const override {
    *ctx.out += text;
    check_output_size(ctx, line);
    return kNormal;
  }
};

struct PrintStmt : Stmt {
  ExprP e;
  Flow exec_impl(Context& ctx) const override {
    Value v = e->eval(ctx);
    if (v.gen)
      fail(line, "printing a generator (the result of map/select/reject/selectattr/rejectattr/unique/items) is not "
                 "supported: jinja2 prints its memory address; add | list or | join");
    if (v.t == Value::kStr) *ctx.out += v.sv();
    else *ctx.out += to_str(v);
    check_output_size(ctx, line);
    return kNormal;
  }
};

struct IfStmt : Stmt {
  std::vector<std::pair<ExprP, Body>> branches;
  Body otherwise;
  Flow exec_impl(Context& ctx) const override {
    for (const auto& [test, body] : branches)
      if (truthy(test->eval(ctx))) return exec_body(body, ctx);
    return exec_body(otherwise, ctx);
  }
};

// Binds a (possibly tuple) target in `scope`.
void assign_targets(Scope& scope, const std::vector<std::string>& names, bool tuple, const Value& v, int line) {
  if (!tuple) {
    scope.set(names[0], v);
    return;
  }
  auto items = iterate(v, line);
  if (items->size() != names.size())
    fail(line, "cannot unpack " + std::to_string(items->size()) + " values into " + std::to_string(names.size()) + " names");
  for (size_t k = 0; k < names.size(); ++k) scope.set(names[k], (*items)[k]);
}

struct ForStmt : Stmt {
  std::vector<std::string> targets;
  bool tuple = false;
  ExprP iter, cond;
  Body body, otherwise;
  Flow exec_impl(Context& ctx) const override {
    Value seq = iter->eval(ctx);
    std::shared_ptr<List> items = iterate(seq, line);
    if (cond) {
      auto filtered = std::make_shared<List>();
      for (const auto& item : *items) {
        auto s = std::make_shared<Scope>();
        s->parent = ctx.scope;
        assign_targets(*s, targets, tuple, item, line);
        std::swap(ctx.scope, s);
        bool keep = false;
        try {
          keep = truthy(cond->eval(ctx));
        } catch (...) {
          std::swap(ctx.scope, s);
          throw;
        }
        std::swap(ctx.scope, s);
        if (keep) filtered->push_back(item);
      }
      items = filtered;
    }
    if (items->empty()) return exec_body(otherwise, ctx);
    auto state = std::make_shared<LoopState>();
    state->items = items;
    Value loop;
    loop.t = Value::kLoop;
    loop.loop = state;
    std::shared_ptr<Scope> outer = ctx.scope;
    for (size_t k = 0; k < items->size(); ++k) {
      if (++ctx.iterations > kMaxIterations) fail(line, "the template runs too long (more than 10 million loop iterations)");
      state->index0 = int64_t(k);
      auto s = std::make_shared<Scope>();
      s->parent = outer;
      s->set("loop", loop);
      assign_targets(*s, targets, tuple, (*items)[k], line);
      ctx.scope = s;
      Flow f;
      try {
        f = exec_body(body, ctx);
      } catch (...) {
        ctx.scope = outer;
        throw;
      }
      ctx.scope = outer;
      if (f == kBreak) break;
    }
    return kNormal;
  }
};

struct SetStmt : Stmt {
  std::vector<std::string> targets;  // one name, or a tuple of names
  bool tuple = false;
  std::string ns_attr;  // set ns.attr = ...: targets[0] = ns, ns_attr = attr
  ExprP value;
  Body block;  // {% set x %}...{% endset %}
  std::vector<std::pair<std::string, ArgList>> block_filters;
  Flow exec_impl(Context& ctx) const override {
    Value v;
    if (value) {
      v = value->eval(ctx);
    } else {
      std::string captured;
      std::string* saved = ctx.out;
      ctx.out = &captured;
      try {
        exec_body(block, ctx);
      } catch (...) {
        ctx.out = saved;
        throw;
      }
      ctx.out = saved;
      v = Value::str(captured);
      for (const auto& [name, args] : block_filters) {
        CallArgs a = args.eval(ctx);
        v = apply_filter(name, v, a, ctx, line);
      }
    }
    if (!ns_attr.empty()) {
      const Value* ns = ctx.scope->find(targets[0]);
      if (!ns || ns->t != Value::kNamespace) fail(line, "cannot assign attribute on non-namespace object '" + targets[0] + "'");
      ns->d->set(ns_attr, v);
      return kNormal;
    }
    assign_targets(*ctx.scope, targets, tuple, v, line);
    return kNormal;
  }
};

struct LoopControlStmt : Stmt {
  Flow flow;
  Flow exec_impl(Context&) const override { return flow; }
};

struct GenerationStmt : Stmt {
  Body body;
  Flow exec_impl(Context& ctx) const override { return exec_body(body, ctx); }
};

struct MacroStmt : Stmt {
  std::string name;
  std::vector<std::string> params;
  std::vector<ExprP> defaults;  // one per param, null when required
  Body body;
  Flow exec_impl(Context& ctx) const override {
    auto c = std::make_shared<Callable>();
    c->name = name;
    std::shared_ptr<Scope> defining = ctx.scope;
    ctx.closures.push_back(defining);
    const MacroStmt* self = this;
    c->fn = [self, defining](CallArgs& a, Context& cctx, int call_line) -> Value {
      if (cctx.depth > 200) fail(call_line, "macro recursion too deep");
      if (a.pos.size() > self->params.size())
        fail(call_line, "macro '" + self->name + "' takes at most " + std::to_string(self->params.size()) + " arguments");
      auto s = std::make_shared<Scope>();
      s->parent = defining;
      std::vector<bool> bound(self->params.size(), false);
      for (size_t k = 0; k < a.pos.size(); ++k) s->set(self->params[k], a.pos[k]), bound[k] = true;
      for (auto& kv : a.kw) {
        auto it = std::find(self->params.begin(), self->params.end(), kv.first);
        if (it == self->params.end()) fail(call_line, "macro '" + self->name + "' got an unexpected keyword argument '" + kv.first + "'");
        s->set(kv.first, kv.second);
        bound[it - self->params.begin()] = true;
      }
      std::shared_ptr<Scope> saved_scope = cctx.scope;
      std::string* saved_out = cctx.out;
      std::string captured;
      cctx.scope = s;
      cctx.out = &captured;
      ++cctx.depth;
      try {
        for (size_t k = 0; k < self->params.size(); ++k)
          if (!bound[k])
            s->set(self->params[k], self->defaults[k] ? self->defaults[k]->eval(cctx)
                                                      : Value::undef("parameter '" + self->params[k] + "' was not provided"));
        exec_body(self->body, cctx);
      } catch (...) {
        cctx.scope = saved_scope;
        cctx.out = saved_out;
        --cctx.depth;
        throw;
      }
      cctx.scope = saved_scope;
      cctx.out = saved_out;
      --cctx.depth;
      return Value::str(captured);
    };
    ctx.scope->set(name, Value::func(c));
    return kNormal;
  }
};

// ---------------------------------------------------------------------------
// Parser (jinja2/parser.py's grammar and precedence)

class Parser {
 public:
  explicit Parser(std::vector<Token> toks) : t_(std::move(toks)) {}

  Body parse_template() {
    std::string end;
    Body b = parse_body({}, &end);
    return b;
  }

 private:
  const Token& cur() const { return t_[p_]; }
  const Token& peek(size_t k = 1) const { return t_[std::min(p_ + k, t_.size() - 1)]; }
  bool is_op(const char* op) const { return cur().kind == Tok::kOp && cur().text == op; }
  bool is_name(const char* n) const { return cur().kind == Tok::kName && cur().text == n; }
  std::string describe(const Token& t) const {
    switch (t.kind) {
      case Tok::kEof: return "end of template";
      case Tok::kBlockEnd: return "'%}'";
      case Tok::kVarEnd: return "'}}'";
      case Tok::kString: return "a string";
      case Tok::kInt:
      case Tok::kFloat: return "a number";
      default: return "'" + t.text + "'";
    }
  }
  [[noreturn]] void unexpected(const char* expected) const {
    fail(cur().line, std::string("expected ") + expected + ", got " + describe(cur()));
  }
  void expect_op(const char* op) {
    if (!is_op(op)) unexpected((std::string("'") + op + "'").c_str());
    ++p_;
  }
  std::string expect_name() {
    if (cur().kind != Tok::kName) unexpected("a name");
    return t_[p_++].text;
  }
  void expect_block_end() {
    if (cur().kind != Tok::kBlockEnd) unexpected("'%}'");
    ++p_;
  }

  // Statements until a block tag named in `ends` (left after its name, which goes
  // to *which).
  Body parse_body(const std::set<std::string>& ends, std::string* which) {
    Body body;
    for (;;) {
      const Token& tk = cur();
      if (tk.kind == Tok::kEof) {
        if (ends.empty()) return body;
        std::string names;
        for (const auto& e : ends) names += (names.empty() ? "'" : " or '") + e + "'";
        fail(tk.line, "unexpected end of template: a block is not closed (expected " + names + ")");
      }
      if (tk.kind == Tok::kData) {
        auto s = std::make_unique<OutputStmt>();
        s->line = tk.line;
        s->text = tk.text;
        body.push_back(std::move(s));
        ++p_;
        continue;
      }
      if (tk.kind == Tok::kVarBegin) {
        ++p_;
        auto s = std::make_unique<PrintStmt>();
        s->line = cur().line;
        s->e = parse_tuple(true, false, {});
        if (cur().kind != Tok::kVarEnd) unexpected("'}}'");
        ++p_;
        body.push_back(std::move(s));
        continue;
      }
      if (tk.kind == Tok::kBlockBegin) {
        ++p_;
        const int line = cur().line;
        const std::string name = expect_name();
        if (ends.count(name)) {
          *which = name;
          return body;
        }
        body.push_back(parse_statement(name, line));
        continue;
      }
      unexpected("template data or a tag");
    }
  }

  StmtP parse_statement(const std::string& name, int line) {
    DepthGuard guard(this, line);
    if (name == "if") return parse_if(line);
    if (name == "for") return parse_for(line);
    if (name == "set") return parse_set(line);
    if (name == "macro") return parse_macro(line);
    if (name == "break" || name == "continue") {
      if (loop_depth_ == 0) fail(line, "'" + name + "' outside of a for loop");
      auto s = std::make_unique<LoopControlStmt>();
      s->line = line;
      s->flow = name == "break" ? Stmt::kBreak : Stmt::kContinue;
      expect_block_end();
      return s;
    }
    if (name == "generation") {
      expect_block_end();
      auto s = std::make_unique<GenerationStmt>();
      s->line = line;
      std::string which;
      s->body = parse_body({"endgeneration"}, &which);
      expect_block_end();
      return s;
    }
    static const std::set<std::string> ends = {"endif", "endfor", "endset", "endmacro", "else", "elif", "endgeneration"};
    if (ends.count(name)) fail(line, "unexpected '" + name + "' (no open block expects it here)");
    fail(line, "unsupported tag '" + name + "'");
  }

  StmtP parse_if(int line) {
    auto s = std::make_unique<IfStmt>();
    s->line = line;
    for (;;) {
      ExprP test = parse_tuple(false, false, {});
      expect_block_end();
      std::string which;
      Body body = parse_body({"elif", "else", "endif"}, &which);
      s->branches.emplace_back(std::move(test), std::move(body));
      if (which == "elif") continue;
      if (which == "else") {
        expect_block_end();
        s->otherwise = parse_body({"endif"}, &which);
      }
      expect_block_end();
      return s;
    }
  }

  // Assignment targets: name | name, name | (name, name)
  void parse_targets(std::vector<std::string>* names, bool* tuple) {
    bool paren = false;
    if (is_op("(")) {
      paren = true;
      ++p_;
    }
    names->push_back(expect_name());
    while (is_op(",")) {
      ++p_;
      *tuple = true;
      if (cur().kind != Tok::kName) break;
      names->push_back(expect_name());
    }
    if (paren) {
      expect_op(")");
      *tuple = *tuple || names->size() > 1;
    }
  }

  StmtP parse_for(int line) {
    auto s = std::make_unique<ForStmt>();
    s->line = line;
    parse_targets(&s->targets, &s->tuple);
    if (!is_name("in")) unexpected("'in'");
    ++p_;
    s->iter = parse_tuple(false, false, {"if", "recursive"});
    if (is_name("if")) {
      ++p_;
      s->cond = parse_expression(true);
    }
    if (is_name("recursive")) fail(cur().line, "unsupported: recursive for loops");
    expect_block_end();
    ++loop_depth_;
    std::string which;
    s->body = parse_body({"endfor", "else"}, &which);
    --loop_depth_;
    if (which == "else") {
      expect_block_end();
      s->otherwise = parse_body({"endfor"}, &which);
    }
    expect_block_end();
    return s;
  }

  StmtP parse_set(int line) {
    auto s = std::make_unique<SetStmt>();
    s->line = line;
    if (cur().kind == Tok::kName && peek().kind == Tok::kOp && peek().text == "." ) {
      s->targets.push_back(expect_name());
      ++p_;
      s->ns_attr = expect_name();
      expect_op("=");
      s->value = parse_tuple(true, false, {});
      expect_block_end();
      return s;
    }
    parse_targets(&s->targets, &s->tuple);
    if (is_op("=")) {
      ++p_;
      s->value = parse_tuple(true, false, {});
      expect_block_end();
      return s;
    }
    if (s->tuple) unexpected("'='");
    while (is_op("|")) {
      ++p_;
      const int fl = cur().line;
      std::string fname = expect_name();
      if (!known_filters().count(fname)) fail(fl, "unsupported filter '" + fname + "'");
      ArgList args;
      if (is_op("(")) parse_call_args(&args);
      s->block_filters.emplace_back(fname, std::move(args));
    }
    expect_block_end();
    std::string which;
    s->block = parse_body({"endset"}, &which);
    expect_block_end();
    return s;
  }

  StmtP parse_macro(int line) {
    auto s = std::make_unique<MacroStmt>();
    s->line = line;
    s->name = expect_name();
    expect_op("(");
    while (!is_op(")")) {
      if (!s->params.empty()) expect_op(",");
      if (is_op(")")) break;
      s->params.push_back(expect_name());
      if (is_op("=")) {
        ++p_;
        s->defaults.push_back(parse_expression(true));
      } else {
        s->defaults.push_back(nullptr);
      }
    }
    expect_op(")");
    expect_block_end();
    std::string which;
    const int saved = loop_depth_;
    loop_depth_ = 0;
    s->body = parse_body({"endmacro"}, &which);
    loop_depth_ = saved;
    if (cur().kind == Tok::kName) ++p_;  // {% endmacro name %}
    expect_block_end();
    return s;
  }

  // --- expressions
  template <typename T>
  std::unique_ptr<T> node(int line) {
    auto n = std::make_unique<T>();
    n->line = line;
    return n;
  }

  bool is_tuple_end(const std::set<std::string>& extra) const {
    if (cur().kind == Tok::kVarEnd || cur().kind == Tok::kBlockEnd || cur().kind == Tok::kEof) return true;
    if (is_op(")")) return true;
    return cur().kind == Tok::kName && extra.count(cur().text) > 0;
  }

  ExprP parse_tuple(bool with_condexpr, bool explicit_parens, const std::set<std::string>& extra_end) {
    const int line = cur().line;
    std::vector<ExprP> args;
    bool is_tuple = false;
    for (;;) {
      if (!args.empty()) expect_op(",");
      if (is_tuple_end(extra_end)) break;
      args.push_back(parse_expression(with_condexpr));
      if (is_op(",")) is_tuple = true;
      else break;
    }
    if (!is_tuple) {
      if (!args.empty()) return std::move(args[0]);
      if (!explicit_parens) unexpected("an expression");
    }
    auto t = node<ListExpr>(line);
    t->items = std::move(args);
    t->tuple = true;
    seal(*t, height(t->items));
    return t;
  }

  ExprP parse_expression(bool with_condexpr) { return with_condexpr ? parse_condexpr() : parse_or(); }

  ExprP parse_condexpr() {
    const int line = cur().line;
    ExprP e1 = parse_or();
    while (is_name("if")) {
      ++p_;
      auto c = node<CondExpr>(line);
      c->test = parse_or();
      if (is_name("else")) {
        ++p_;
        DepthGuard guard(this, line);
        c->otherwise = parse_condexpr();
      }
      c->then = std::move(e1);
      seal(*c, std::max({height(c->test), height(c->then), height(c->otherwise)}));
      e1 = std::move(c);
    }
    return e1;
  }

  ExprP parse_or() {
    ExprP left = parse_and();
    while (is_name("or")) {
      const int line = cur().line;
      ++p_;
      auto n = node<AndOrExpr>(line);
      n->is_and = false;
      n->a = std::move(left);
      n->b = parse_and();
      seal(*n, std::max(height(n->a), height(n->b)));
      left = std::move(n);
    }
    return left;
  }

  ExprP parse_and() {
    ExprP left = parse_not();
    while (is_name("and")) {
      const int line = cur().line;
      ++p_;
      auto n = node<AndOrExpr>(line);
      n->is_and = true;
      n->a = std::move(left);
      n->b = parse_not();
      seal(*n, std::max(height(n->a), height(n->b)));
      left = std::move(n);
    }
    return left;
  }

  ExprP parse_not() {
    if (is_name("not")) {
      const int line = cur().line;
      ++p_;
      DepthGuard guard(this, line);
      auto n = node<UnaryExpr>(line);
      n->op = '!';
      n->e = parse_not();
      seal(*n, height(n->e));
      return n;
    }
    return parse_compare();
  }

  ExprP parse_compare() {
    const int line = cur().line;
    ExprP first = parse_math1();
    std::vector<std::pair<std::string, ExprP>> rest;
    for (;;) {
      if (cur().kind == Tok::kOp && (cur().text == "==" || cur().text == "!=" || cur().text == "<" ||
                                     cur().text == ">" || cur().text == "<=" || cur().text == ">=")) {
        std::string op = cur().text;
        ++p_;
        rest.emplace_back(op, parse_math1());
      } else if (is_name("in")) {
        ++p_;
        rest.emplace_back("in", parse_math1());
      } else if (is_name("not") && peek().kind == Tok::kName && peek().text == "in") {
        p_ += 2;
        rest.emplace_back("notin", parse_math1());
      } else {
        break;
      }
    }
    if (rest.empty()) return first;
    auto c = node<CompareExpr>(line);
    c->first = std::move(first);
    c->rest = std::move(rest);
    int h = height(c->first);
    for (const auto& r : c->rest) h = std::max(h, height(r.second));
    seal(*c, h);
    return c;
  }

  ExprP binary(const std::string& op, ExprP a, ExprP b, int line) {
    auto n = node<BinaryExpr>(line);
    n->op = op;
    n->a = std::move(a);
    n->b = std::move(b);
    seal(*n, std::max(height(n->a), height(n->b)));
    return n;
  }

  ExprP parse_math1() {
    ExprP left = parse_concat();
    while (is_op("+") || is_op("-")) {
      const int line = cur().line;
      std::string op = t_[p_++].text;
      left = binary(op, std::move(left), parse_concat(), line);
    }
    return left;
  }

  ExprP parse_concat() {
    ExprP left = parse_math2();
    while (is_op("~")) {
      const int line = cur().line;
      ++p_;
      left = binary("~", std::move(left), parse_math2(), line);
    }
    return left;
  }

  ExprP parse_math2() {
    ExprP left = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const int line = cur().line;
      std::string op = t_[p_++].text;
      left = binary(op, std::move(left), parse_pow(), line);
    }
    return left;
  }

  ExprP parse_pow() {
    ExprP left = parse_unary(true);
    while (is_op("**")) {
      const int line = cur().line;
      ++p_;
      left = binary("**", std::move(left), parse_unary(true), line);
    }
    return left;
  }

  ExprP parse_unary(bool with_filter) {
    const int line = cur().line;
    DepthGuard guard(this, line);
    ExprP n;
    if (is_op("-") || is_op("+")) {
      char op = cur().text[0];
      ++p_;
      auto u = node<UnaryExpr>(line);
      u->op = op;
      u->e = parse_unary(false);
      seal(*u, height(u->e));
      n = std::move(u);
    } else {
      n = parse_primary();
    }
    n = parse_postfix(std::move(n));
    if (with_filter) n = parse_filter_expr(std::move(n));
    return n;
  }

  ExprP parse_primary() {
    const Token& tk = cur();
    const int line = tk.line;
    if (tk.kind == Tok::kName) {
      ++p_;
      auto c = node<ConstExpr>(line);
      if (tk.text == "true" || tk.text == "True") c->v = Value::boolean(true);
      else if (tk.text == "false" || tk.text == "False") c->v = Value::boolean(false);
      else if (tk.text == "none" || tk.text == "None") c->v = Value::none();
      else {
        auto nm = node<NameExpr>(line);
        nm->name = tk.text;
        return nm;
      }
      return c;
    }
    if (tk.kind == Tok::kString) {
      std::string s;
      while (cur().kind == Tok::kString) s += t_[p_++].text;  // adjacent literals concatenate
      auto c = node<ConstExpr>(line);
      c->v = Value::str(s);
      return c;
    }
    if (tk.kind == Tok::kInt || tk.kind == Tok::kFloat) {
      ++p_;
      auto c = node<ConstExpr>(line);
      if (tk.kind == Tok::kInt) {
        errno = 0;
        long long x = std::strtoll(tk.text.c_str(), nullptr, 10);
        if (errno == ERANGE) fail(line, "integer literal too large");
        c->v = Value::integer(x);
      } else {
        c->v = Value::real(std::strtod(tk.text.c_str(), nullptr));
      }
      return c;
    }
    if (is_op("(")) {
      ++p_;
      ExprP e = parse_tuple(true, true, {});
      expect_op(")");
      return e;
    }
    if (is_op("[")) {
      ++p_;
      auto l = node<ListExpr>(line);
      while (!is_op("]")) {
        if (!l->items.empty()) expect_op(",");
        if (is_op("]")) break;
        l->items.push_back(parse_expression(true));
      }
      expect_op("]");
      seal(*l, height(l->items));
      return l;
    }
    if (is_op("{")) {
      ++p_;
      auto d = node<DictExpr>(line);
      while (!is_op("}")) {
        if (!d->items.empty()) expect_op(",");
        if (is_op("}")) break;
        ExprP k = parse_expression(true);
        expect_op(":");
        ExprP v = parse_expression(true);
        d->items.emplace_back(std::move(k), std::move(v));
      }
      expect_op("}");
      int h = 0;
      for (const auto& kv : d->items) h = std::max({h, height(kv.first), height(kv.second)});
      seal(*d, h);
      return d;
    }
    unexpected("an expression");
  }

  ExprP parse_postfix(ExprP n) {
    for (;;) {
      const int line = cur().line;
      if (is_op(".")) {
        ++p_;
        if (cur().kind == Tok::kInt) {
          auto it = node<ItemExpr>(line);
          auto k = node<ConstExpr>(line);
          k->v = Value::integer(std::strtoll(t_[p_++].text.c_str(), nullptr, 10));
          it->obj = std::move(n);
          it->key = std::move(k);
          seal(*it, height(it->obj));
          n = std::move(it);
          continue;
        }
        auto a = node<AttrExpr>(line);
        a->obj = std::move(n);
        a->name = expect_name();
        seal(*a, height(a->obj));
        n = std::move(a);
      } else if (is_op("[")) {
        ++p_;
        n = parse_subscript(std::move(n), line);
      } else if (is_op("(")) {
        auto c = node<CallExpr>(line);
        c->callee = std::move(n);
        parse_call_args(&c->args);
        seal(*c, std::max(height(c->callee), height(c->args)));
        n = std::move(c);
      } else {
        return n;
      }
    }
  }

  ExprP parse_subscript(ExprP obj, int line) {
    // after '[': expr | [a]:[b][:[c]]
    ExprP a, b, c;
    bool slice = false;
    if (!is_op(":")) a = parse_expression(true);
    if (is_op(":")) {
      slice = true;
      ++p_;
      if (!is_op("]") && !is_op(":")) b = parse_expression(true);
      if (is_op(":")) {
        ++p_;
        if (!is_op("]")) c = parse_expression(true);
      }
    }
    if (is_op(",")) fail(cur().line, "unsupported: tuple subscripts");
    expect_op("]");
    if (!slice) {
      auto it = node<ItemExpr>(line);
      it->obj = std::move(obj);
      it->key = std::move(a);
      seal(*it, std::max(height(it->obj), height(it->key)));
      return it;
    }
    auto s = node<SliceExpr>(line);
    s->obj = std::move(obj);
    s->a = std::move(a);
    s->b = std::move(b);
    s->c = std::move(c);
    seal(*s, std::max({height(s->obj), height(s->a), height(s->b), height(s->c)}));
    return s;
  }

  void parse_call_args(ArgList* args) {
    expect_op("(");
    bool first = true;
    while (!is_op(")")) {
      if (!first) expect_op(",");
      first = false;
      if (is_op(")")) break;
      if (is_op("*") || is_op("**")) fail(cur().line, "unsupported: *args / **kwargs in calls");
      if (cur().kind == Tok::kName && peek().kind == Tok::kOp && peek().text == "=") {
        std::string k = expect_name();
        ++p_;
        args->kw.emplace_back(k, parse_expression(true));
      } else {
        if (!args->kw.empty()) fail(cur().line, "positional argument after keyword arguments");
        args->pos.push_back(parse_expression(true));
      }
    }
    expect_op(")");
  }

  std::string dotted_name() {
    std::string name = expect_name();
    while (is_op(".")) {
      ++p_;
      name += "." + expect_name();
    }
    return name;
  }

  ExprP parse_filter_expr(ExprP n) {
    for (;;) {
      const int line = cur().line;
      if (is_op("|")) {
        ++p_;
        auto f = node<FilterExpr>(cur().line);
        f->name = dotted_name();
        if (!known_filters().count(f->name)) fail(f->line, "unsupported filter '" + f->name + "'");
        if (is_op("(")) parse_call_args(&f->args);
        f->base = std::move(n);
        seal(*f, std::max(height(f->base), height(f->args)));
        n = std::move(f);
      } else if (is_name("is")) {
        ++p_;
        auto t = node<TestExpr>(line);
        if (is_name("not")) {
          ++p_;
          t->negated = true;
        }
        const int tl = cur().line;
        t->name = dotted_name();
        if (!known_tests().count(t->name)) fail(tl, "unsupported test '" + t->name + "'");
        if (is_op("(")) {
          parse_call_args(&t->args);
        } else if ((cur().kind == Tok::kName || cur().kind == Tok::kString || cur().kind == Tok::kInt ||
                    cur().kind == Tok::kFloat || is_op("(") || is_op("[") || is_op("{")) &&
                   !is_name("else") && !is_name("or") && !is_name("and")) {
          if (is_name("is")) fail(cur().line, "you cannot chain multiple tests with is");
          t->args.pos.push_back(parse_postfix(parse_primary()));
        }
        t->base = std::move(n);
        seal(*t, std::max(height(t->base), height(t->args)));
        n = std::move(t);
      } else if (is_op("(")) {
        auto c = node<CallExpr>(line);
        c->callee = std::move(n);
        parse_call_args(&c->args);
        seal(*c, std::max(height(c->callee), height(c->args)));
        n = std::move(c);
      } else {
        return n;
      }
    }
  }

  // Recursion bound of the parser: a hostile template fails instead of overflowing
  // the stack (real templates nest a few dozen levels).
  static constexpr int kMaxNesting = 400;
  struct DepthGuard {
    Parser* p;
    DepthGuard(Parser* parser, int line) : p(parser) {
      if (++p->nesting_ > kMaxNesting) fail(line, "the template nests too deeply");
    }
    ~DepthGuard() { --p->nesting_; }
  };

  // Heights of the expression tree. The loops that parse a + b + c, a.b.c, x|f|g or
  // x if c if d build a node per step without recursing, so the DepthGuard alone does
  // not bound the tree that eval (and the destructors) walk recursively: every inner
  // node gets its height here, and a tree higher than kMaxNesting fails while it is
  // still low enough to evaluate and destroy.
  static int height(const ExprP& e) { return e ? e->height : 0; }
  static int height(const std::vector<ExprP>& v) {
    int h = 0;
    for (const auto& e : v) h = std::max(h, height(e));
    return h;
  }
  static int height(const ArgList& a) {
    int h = height(a.pos);
    for (const auto& kv : a.kw) h = std::max(h, height(kv.second));
    return h;
  }
  static void seal(Expr& n, int children_height) {
    n.height = children_height + 1;
    if (n.height > kMaxNesting) fail(n.line, "the template nests too deeply");
  }

  std::vector<Token> t_;
  size_t p_ = 0;
  int loop_depth_ = 0;
  int nesting_ = 0;
};

// ---------------------------------------------------------------------------
// Globals: raise_exception, namespace, range, dict, strftime_now

std::shared_ptr<Scope> make_globals() {
  auto g = std::make_shared<Scope>();
  auto add = [&](const char* name, std::function<Value(CallArgs&, Context&, int)> fn) {
    auto c = std::make_shared<Callable>();
    c->name = name;
    c->fn = std::move(fn);
    g->set(name, Value::func(c));
  };
  add("raise_exception", [](CallArgs& a, Context&, int line) -> Value {
    fail(line, "raise_exception: " + (a.pos.empty() ? std::string() : to_str(a.pos[0])));
  });
  add("namespace", [](CallArgs& a, Context& ctx, int line) -> Value {
    auto d = std::make_shared<Dict>();
    ctx.made_namespace(d);
    for (const auto& p : a.pos) {
      if (p.t != Value::kDict) fail(line, "namespace() takes keyword arguments (or a dict)");
      for (const auto& kv : p.d->items) d->set(kv.first, kv.second);
    }
    for (const auto& kv : a.kw) d->set(kv.first, kv.second);
    Value v;
    v.t = Value::kNamespace;
    v.d = d;
    return v;
  });
  add("dict", [](CallArgs& a, Context&, int line) -> Value {
    auto d = std::make_shared<Dict>();
    for (const auto& p : a.pos) {
      if (p.t != Value::kDict) fail(line, "dict() takes keyword arguments (or a dict)");
      for (const auto& kv : p.d->items) d->set(kv.first, kv.second);
    }
    for (const auto& kv : a.kw) d->set(kv.first, kv.second);
    return Value::dict(d);
  });
  add("range", [](CallArgs& a, Context&, int line) -> Value {
    if (!a.kw.empty() || a.pos.empty() || a.pos.size() > 3) fail(line, "range() takes 1 to 3 integer arguments");
    for (const auto& p : a.pos)
      if (!p.is_intlike()) fail(line, "range() arguments must be integers");
    int64_t start = 0, stop, step = 1;
    if (a.pos.size() == 1) stop = a.pos[0].as_int();
    else start = a.pos[0].as_int(), stop = a.pos[1].as_int();
    if (a.pos.size() == 3) step = a.pos[2].as_int();
    if (step == 0) fail(line, "range() arg 3 must not be zero");
    List out;
    for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step) {
      if (out.size() >= 100000) fail(line, "range too big (the sandbox allows 100000 items)");
      out.push_back(Value::integer(k));
    }
    return Value::list(std::move(out));
  });
  add("strftime_now", [](CallArgs& a, Context& ctx, int line) -> Value {
    if (a.pos.size() != 1 || a.pos[0].t != Value::kStr) fail(line, "strftime_now(format) takes one string");
    std::time_t t = ctx.fixed_now ? ctx.now : std::time(nullptr);
    std::tm tm{};
    localtime_r(&t, &tm);
    char buf[512];
    size_t n = std::strftime(buf, sizeof buf, a.pos[0].sv().c_str(), &tm);
    return Value::str(std::string(buf, n));
  });
  return g;
}

}  // namespace
}  // namespace jinja

struct ChatTemplate::Impl {
  jinja::Body body;
  std::shared_ptr<jinja::Scope> globals = jinja::make_globals();
  std::optional<std::string> bos, eos;
  nlohmann::ordered_json extras = nlohmann::ordered_json::object();
  std::optional<std::time_t> now;
};

ChatTemplate::ChatTemplate(const std::string& source) : impl_(std::make_unique<Impl>()) {
  jinja::Lexer lexer(source);
  jinja::Parser parser(lexer.run());
  impl_->body = parser.parse_template();
}

ChatTemplate::~ChatTemplate() = default;
ChatTemplate::ChatTemplate(ChatTemplate&&) noexcept = default;
ChatTemplate& ChatTemplate::operator=(ChatTemplate&&) noexcept = default;

void ChatTemplate::set_bos_token(std::optional<std::string> token) { impl_->bos = std::move(token); }
void ChatTemplate::set_eos_token(std::optional<std::string> token) { impl_->eos = std::move(token); }
void ChatTemplate::set_now(std::time_t now) { impl_->now = now; }
void ChatTemplate::set_extra_variables(const nlohmann::ordered_json& vars) {
  if (!vars.is_object()) throw std::invalid_argument("chat template variables must be a JSON object");
  impl_->extras = vars;
}

std::string ChatTemplate::render(const nlohmann::ordered_json& messages, bool add_generation_prompt) const {
  using namespace jinja;
  auto vars = std::make_shared<Scope>();
  vars->parent = impl_->globals;
  for (auto it = impl_->extras.begin(); it != impl_->extras.end(); ++it) vars->set(it.key(), from_json(it.value()));
  vars->set("messages", from_json(messages));
  vars->set("add_generation_prompt", Value::boolean(add_generation_prompt));
  if (impl_->bos) vars->set("bos_token", Value::str(*impl_->bos));
  if (impl_->eos) vars->set("eos_token", Value::str(*impl_->eos));
  std::string out;
  Context ctx;
  ctx.scope = vars;
  ctx.out = &out;
  if (impl_->now) {
    ctx.now = *impl_->now;
    ctx.fixed_now = true;
  }
  exec_body(impl_->body, ctx);
  return out;
}

namespace {

bool read_text_file(const std::string& path, std::string* out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return false;
  std::stringstream ss;
  ss << f.rdbuf();
  if (f.bad()) throw std::runtime_error(path + ": read error");
  *out = ss.str();
  return true;
}

}  // namespace

namespace detail {
int64_t chat_template_live_scopes() { return jinja::g_live_scopes.load(); }
int64_t chat_template_live_dicts() { return jinja::g_live_dicts.load(); }
}  // namespace detail

std::optional<ChatTemplateSource> find_chat_template(const std::string& file, const std::string& dir) {
  ChatTemplateSource src;
  if (!file.empty()) {
    if (!read_text_file(file, &src.text))
      throw std::runtime_error(file + ": cannot read the chat template (--chat_template)");
    src.origin = file;
    return src;
  }
  if (dir.empty()) return std::nullopt;
  const std::string jinja = dir + "/chat_template.jinja";
  if (read_text_file(jinja, &src.text)) {
    src.origin = jinja;
    return src;
  }
  const std::string cfg_path = dir + "/tokenizer_config.json";
  std::string cfg_text;
  if (!read_text_file(cfg_path, &cfg_text)) return std::nullopt;
  nlohmann::json cfg;
  try {
    cfg = json_parse(cfg_text, cfg_path, {kJsonConfigMaxBytes});
  } catch (const nlohmann::json::parse_error& e) {
    throw std::runtime_error(cfg_path + ": malformed JSON: " + e.what());
  }
  if (!cfg.is_object()) throw std::runtime_error(cfg_path + ": not a JSON object");
  auto it = cfg.find("chat_template");
  if (it == cfg.end() || it->is_null()) return std::nullopt;
  src.origin = cfg_path + " (chat_template)";
  if (it->is_string()) {
    src.text = it->get<std::string>();
    return src;
  }
  if (it->is_array()) {
    std::string names;
    for (const auto& e : *it) {
      if (!e.is_object() || !e.contains("name") || !e["name"].is_string() || !e.contains("template") ||
          !e["template"].is_string())
        throw std::runtime_error(cfg_path + ": chat_template is a list whose entries must be {\"name\": string, \"template\": string}");
      names += (names.empty() ? "" : ", ") + e["name"].get<std::string>();
      if (e["name"] == "default") {
        src.text = e["template"].get<std::string>();
        src.origin = cfg_path + " (chat_template \"default\")";
        return src;
      }
    }
    throw std::runtime_error(cfg_path + ": chat_template lists templates (" + names +
                             ") but none named \"default\"; pass one with --chat_template FILE");
  }
  throw std::runtime_error(cfg_path + ": chat_template is " + std::string(it->type_name()) +
                           ", expected a string or a list of {\"name\", \"template\"}");
}

}  // namespace dpo
