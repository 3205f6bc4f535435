// The peer API's hex codec (pairing ids and keys in pairing.json, pairing.key and on the
// wire): round trip, and what it refuses.
#include <catch2/catch.hpp>

#include "admin/peer_link.h"

using namespace lockstep;
using namespace lockstep::admin;

TEST_CASE("hex: lower case out, either case in, exactly the size asked", "[admin][hex]") {
  const std::array<uint8_t, 4> bytes{0x00, 0xab, 0x7f, 0xff};
  CHECK(ToHex(bytes.data(), bytes.size()) == "00ab7fff");
  auto back = FromHex<4>("00AB7fff");
  REQUIRE(back.ok());
  CHECK(*back == bytes);
  for (const char* bad : {"00ab7f", "00ab7fff00", "00ab7fzz", "", "00:ab:7f:ff"}) {
    INFO(bad);
    auto r = FromHex<4>(bad);
    REQUIRE(!r.ok());
    CHECK(r.status().code() == Status::Code::kInvalidArgument);
    CHECK(r.status().message().find("expected 8 hex digits") != std::string::npos);
  }
}
