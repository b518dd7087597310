// What /proc/self/maps says about an address (tests that check where a tensor's bytes live).
#pragma once
#include <string>

namespace dpo::testutil {

/// The path of the file mapped at `p` in this process ("" when the address is in an
/// anonymous mapping, "?" when no mapping holds it).
std::string mapped_file_of(const void* p);

}  // namespace dpo::testutil
