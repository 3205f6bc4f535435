#include "common/crc32c.h"

#include <catch2/catch.hpp>
#include <cstring>
#include <string>
#include <vector>

using lockstep::Crc32c;
using lockstep::Crc32cExtend;

TEST_CASE("crc32c matches the published check value", "[crc32c]") {
  const char* s = "123456789";
  REQUIRE(Crc32c(s, 9) == 0xE3069283u);
  // RFC 3720 B.4: 32 bytes of zeros and of 0xFF.
  std::vector<unsigned char> zeros(32, 0), ones(32, 0xFF);
  REQUIRE(Crc32c(zeros.data(), zeros.size()) == 0x8A9136AAu);
  REQUIRE(Crc32c(ones.data(), ones.size()) == 0x62A8AB43u);
}

TEST_CASE("crc32c extends across split buffers", "[crc32c]") {
  std::string data(10000, '\0');
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 131 + 7);
  uint32_t whole = Crc32c(data.data(), data.size());
  for (size_t cut : {0u, 1u, 7u, 4096u, 9999u, 10000u}) {
    uint32_t part = Crc32cExtend(Crc32c(data.data(), cut), data.data() + cut, data.size() - cut);
    REQUIRE(part == whole);
  }
  data[5000] ^= 1;
  REQUIRE(Crc32c(data.data(), data.size()) != whole);
}
