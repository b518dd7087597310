// SHA-256 against the FIPS 180-2 / NIST example vectors and values from Python's
// hashlib for every padding boundary (55, 56, 63, 64, 65, 119, 120 bytes).
#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include "data/sha256.h"
#include "tests/test_util.h"

namespace dpo {
namespace {

std::string bytes_0_to(int n) {
  std::string s;
  for (int i = 0; i < n; ++i) s += char(i);
  return s;
}

TEST(Sha256, NistVectors) {
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(sha256_hex(std::string(1000000, 'a')), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Sha256, PaddingBoundaries) {
  const std::pair<int, const char*> cases[] = {
      {55, "463eb28e72f82e0a96c0a4cc53690c571281131f672aa229e0d45ae59b598b59"},
      {56, "da2ae4d6b36748f2a318f23e7ab1dfdf45acdc9d049bd80e59de82a60895f562"},
      {63, "29af2686fd53374a36b0846694cc342177e428d1647515f078784d69cdb9e488"},
      {64, "fdeab9acf3710362bd2658cdc9a29e8f9c757fcf9811603a8c447cd1d9151108"},
      {65, "4bfd2c8b6f1eec7a2afeb48b934ee4b2694182027e6d0fc075074f2fabb31781"},
      {119, "da18797ed7c3a777f0847f429724a2d8cd5138e6ed2895c3fa1a6d39d18f7ec6"},
      {120, "f52b23db1fbb6ded89ef42a23ce0c8922c45f25c50b568a93bf1c075420bbb7c"}};
  for (auto [n, hex] : cases) EXPECT_EQ(sha256_hex(bytes_0_to(n)), hex) << n << " bytes";
}

TEST(Sha256, IncrementalEqualsOneShot) {
  const std::string data = std::string(1000, 'x') + bytes_0_to(200);
  for (size_t step : {1u, 3u, 63u, 64u, 65u, 500u}) {
    Sha256 h;
    for (size_t i = 0; i < data.size(); i += step) h.update(std::string_view(data).substr(i, step));
    EXPECT_EQ(h.hex_digest(), sha256_hex(data)) << "step " << step;
  }
}

TEST(Sha256, FileMatchesBytesAndMissingFileThrows) {
  testutil::TempDir dir;
  const std::string data = bytes_0_to(120) + std::string(3 << 20, 'q');  // spans several 1 MiB reads
  testutil::write_file(dir.file("f.bin"), data);
  EXPECT_EQ(file_sha256(dir.file("f.bin")), sha256_hex(data));
  try {
    file_sha256(dir.file("missing.bin"));
    FAIL() << "no exception";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("missing.bin"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace dpo
