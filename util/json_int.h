// Integer fields of JSON files users give (config.json, quant_state): one check for the
// whole project (header-only, nlohmann/json).
#pragma once
#include <cstdint>

#include <nlohmann/json.hpp>

namespace dpo {

/// True when `v` is a JSON integer (not a float such as 9.2e21 or 64.5) whose value fits
/// int64, i.e. when v.get<int64_t>() is exact (for a float it is undefined behaviour).
inline bool json_is_int64(const nlohmann::json& v) {
  return v.is_number_integer() && !(v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX));
}

}  // namespace dpo
