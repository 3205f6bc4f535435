#include "page_codec.h"

#include <catch2/catch.hpp>
#include <cstring>
#include <random>
#include <vector>

#include "common/crc32c.h"
#include "lockstep/wire_format.h"

using namespace lockstep;
constexpr size_t kPage = wire::kPageSize;

TEST_CASE("zero pages are recognized, and only they", "[codec]") {
  std::vector<uint8_t> page(kPage, 0);
  REQUIRE(IsZeroPage(page.data(), kPage));
  for (size_t i : {0u, 7u, 8u, 63u, 64u, 4095u}) {
    page[i] = 1;
    REQUIRE_FALSE(IsZeroPage(page.data(), kPage));
    page[i] = 0;
  }
}

TEST_CASE("XOR+RLE reproduces the page for many change patterns", "[codec]") {
  std::mt19937_64 rng(7);
  std::vector<uint8_t> base(kPage), page(kPage), out(kPage * 3), applied(kPage);
  for (int trial = 0; trial < 2000; ++trial) {
    for (auto& b : base) b = static_cast<uint8_t>(rng());
    page = base;
    int changes = static_cast<int>(rng() % 20);
    for (int c = 0; c < changes; ++c) {
      size_t off = rng() % kPage;
      size_t len = 1 + rng() % (trial % 3 == 0 ? 512 : 16);
      for (size_t k = off; k < std::min(kPage, off + len); ++k)
        page[k] = static_cast<uint8_t>(rng());
    }
    size_t n = EncodeXorRle(page.data(), base.data(), kPage, out);
    REQUIRE(n > 0);
    std::span<const uint8_t> runs(out.data(), n);
    REQUIRE(ValidateXorRle(runs, kPage).ok());
    REQUIRE(XorRleResultCrc(runs, base.data(), kPage) == Crc32c(page.data(), kPage));
    applied = base;
    ApplyXorRle(runs, applied.data());
    REQUIRE(applied == page);
  }
}

TEST_CASE("an unchanged page encodes to one tiny run", "[codec]") {
  std::vector<uint8_t> page(kPage, 3), out(64);
  size_t n = EncodeXorRle(page.data(), page.data(), kPage, out);
  REQUIRE(n == 4);
  REQUIRE(ValidateXorRle({out.data(), n}, kPage).ok());
}

TEST_CASE("a delta that does not fit is refused, not truncated", "[codec]") {
  std::vector<uint8_t> base(kPage, 0), page(kPage, 0xFF), out(kPage / 2);
  REQUIRE(EncodeXorRle(page.data(), base.data(), kPage, out) == 0);
}

TEST_CASE("malformed deltas are rejected", "[codec]") {
  auto runs = [](std::initializer_list<uint16_t> hdr, size_t literal) {
    std::vector<uint8_t> v;
    auto it = hdr.begin();
    while (it != hdr.end()) {
      uint16_t skip = *it++, len = *it++;
      v.resize(v.size() + 4);
      wire::PutU16(v.data() + v.size() - 4, skip);
      wire::PutU16(v.data() + v.size() - 2, len);
      v.resize(v.size() + std::min<size_t>(len, literal));
    }
    return v;
  };
  REQUIRE(ValidateXorRle(runs({4096, 0}, 0), kPage).ok());
  REQUIRE_FALSE(ValidateXorRle(runs({4000, 0}, 0), kPage).ok());    // short
  REQUIRE_FALSE(ValidateXorRle(runs({4096, 8}, 8), kPage).ok());    // too long
  REQUIRE_FALSE(ValidateXorRle(runs({0, 4096}, 100), kPage).ok());  // literal missing
  std::vector<uint8_t> stub = {1, 2};
  REQUIRE_FALSE(ValidateXorRle(stub, kPage).ok());                      // truncated header
  REQUIRE_FALSE(ValidateXorRle({}, kPage).ok());                        // empty
  REQUIRE_FALSE(ValidateXorRle(runs({0, 0, 4096, 0}, 0), kPage).ok());  // an empty run
}

TEST_CASE("the delta pre-check tells small edits from rewrites", "[codec]") {
  std::vector<uint8_t> base(kPage), page(kPage);
  std::mt19937_64 rng(3);
  for (auto& b : base) b = static_cast<uint8_t>(rng());
  page = base;
  REQUIRE(DeltaLikelyPays(page.data(), base.data(), kPage));
  for (size_t i = 0; i < 64; ++i) page[1000 + i] ^= 0xFF;  // a small edit
  REQUIRE(DeltaLikelyPays(page.data(), base.data(), kPage));
  for (auto& b : page) b = static_cast<uint8_t>(rng());  // rewritten wholesale
  REQUIRE_FALSE(DeltaLikelyPays(page.data(), base.data(), kPage));
}
