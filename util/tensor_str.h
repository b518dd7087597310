// Tensor facts as text for error messages and file headers, one spelling for the
// whole project (header-only: only libtorch targets include it).
#pragma once
#include <optional>
#include <stdexcept>
#include <string>

#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

namespace dpo {

/// "(2, 3, 4)": the shape as the error messages print it.
inline std::string shape_str(c10::IntArrayRef s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + ")";
}
template <class T>
auto shape_str(const T& t) -> decltype(t.sizes(), std::string()) {
  return shape_str(t.sizes());
}

/// torch_dtype names as config.json and bitsandbytes' quant_state write them, for
/// the dtypes a model weight may have (float32, float16, bfloat16); nullopt otherwise.
inline std::optional<std::string> weight_dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return std::string("float32");
    case c10::ScalarType::Half: return std::string("float16");
    case c10::ScalarType::BFloat16: return std::string("bfloat16");
    default: return std::nullopt;
  }
}
/// The inverse; also takes torch's aliases "float" and "half". nullopt for others.
inline std::optional<c10::ScalarType> weight_dtype_from_name(const std::string& s) {
  if (s == "float32" || s == "float") return c10::ScalarType::Float;
  if (s == "float16" || s == "half") return c10::ScalarType::Half;
  if (s == "bfloat16") return c10::ScalarType::BFloat16;
  return std::nullopt;
}

}  // namespace dpo
