// The link protection (sealed_channel.h): what a sealed channel delivers, what it shows on
// the wire, and that every change on the way — a flipped bit, a dropped, replayed,
// reordered or reflected message, another key — is refused.
#include "lockstep/sealed_channel.h"

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "replication_channel/loopback.h"

using namespace lockstep;
using namespace std::chrono_literals;
using wire::LinkProtection;

namespace {

LinkKeys TestKeys(uint8_t seed = 7) {
  wire::Nonce p{}, s{};
  p[0] = seed;
  s[0] = static_cast<uint8_t>(seed + 1);
  std::array<uint8_t, 32> pairing{};
  pairing[5] = 0x42;
  auto keys = DeriveLinkKeys(pairing, p, s);
  REQUIRE(keys.ok());
  return *keys;
}

std::unique_ptr<SealedChannel> Sealed(std::unique_ptr<channel::Channel> inner,
                                      LinkProtection protection, const LinkKeys& keys,
                                      bool primary) {
  auto c = SealedChannel::Create(std::move(inner), protection, 1 << 20);
  REQUIRE(c.ok());
  REQUIRE((*c)->Seal(keys, primary).ok());
  return std::move(*c);
}

Status SendText(channel::Channel& c, const std::string& a, const std::string& b = "") {
  channel::ConstSlice g[2] = {{a.data(), a.size()}, {b.data(), b.size()}};
  return c.Send({g, b.empty() ? size_t{1} : size_t{2}});
}

Result<std::string> ReceiveText(channel::Channel& c) {
  std::vector<uint8_t> buf(1 << 20);
  size_t n = 0;
  Status s = c.Receive(buf, &n, 2s);
  if (!s.ok()) return s;
  return std::string(buf.begin(), buf.begin() + static_cast<long>(n));
}

// The primary's sealed end, a relay in the middle that sees (and may change) the sealed
// bytes, and the secondary's sealed end.
struct Relay {
  explicit Relay(LinkProtection protection, const LinkKeys& secondary_keys = TestKeys()) {
    auto to_relay = channel::LoopbackLink::Create();
    auto from_relay = channel::LoopbackLink::Create();
    primary = Sealed(to_relay->TakeA(), protection, TestKeys(), true);
    relay_in = to_relay->TakeB();
    relay_out = from_relay->TakeA();
    secondary = Sealed(from_relay->TakeB(), protection, secondary_keys, false);
  }
  // The next sealed message as it crossed the wire.
  std::vector<uint8_t> Intercept() {
    std::vector<uint8_t> buf(1 << 20);
    size_t n = 0;
    REQUIRE(relay_in->Receive(buf, &n, 2s).ok());
    buf.resize(n);
    return buf;
  }
  void Forward(const std::vector<uint8_t>& m) {
    channel::ConstSlice g{m.data(), m.size()};
    REQUIRE(relay_out->Send({&g, 1}).ok());
  }
  std::unique_ptr<SealedChannel> primary, secondary;
  std::unique_ptr<channel::Channel> relay_in, relay_out;
};

bool Contains(const std::vector<uint8_t>& hay, const std::string& needle) {
  return std::search(hay.begin(), hay.end(), needle.begin(), needle.end()) != hay.end();
}

}  // namespace

TEST_CASE("sealed messages arrive whole and in order, both ways", "[sealed]") {
  const auto protection = GENERATE(LinkProtection::kMac, LinkProtection::kEncrypt);
  INFO(wire::LinkProtectionName(protection));
  auto link = channel::LoopbackLink::Create();
  auto primary = Sealed(link->TakeA(), protection, TestKeys(), true);
  auto secondary = Sealed(link->TakeB(), protection, TestKeys(), false);
  for (int i = 0; i < 50; ++i) {
    std::string a = "epoch " + std::to_string(i), b(static_cast<size_t>(i) * 997, 'x');
    REQUIRE(SendText(*primary, a, b).ok());
    auto got = ReceiveText(*secondary);
    REQUIRE(got.ok());
    REQUIRE(*got == a + b);
    REQUIRE(SendText(*secondary, "ack " + std::to_string(i)).ok());
    auto ack = ReceiveText(*primary);
    REQUIRE(ack.ok());
    REQUIRE(*ack == "ack " + std::to_string(i));
  }
}

TEST_CASE("on the wire: a tag on every message, encrypted, the text is gone", "[sealed]") {
  const auto protection = GENERATE(LinkProtection::kMac, LinkProtection::kEncrypt);
  INFO(wire::LinkProtectionName(protection));
  Relay r(protection);
  const std::string secret = "the guest's memory page";
  REQUIRE(SendText(*r.primary, secret).ok());
  auto wire_bytes = r.Intercept();
  CHECK(wire_bytes.size() == secret.size() + wire::kLinkTagBytes);
  CHECK(Contains(wire_bytes, secret) == (protection == LinkProtection::kMac));
  r.Forward(wire_bytes);
  CHECK(*ReceiveText(*r.secondary) == secret);
}

TEST_CASE("before Seal() messages pass unchanged (the handshake)", "[sealed]") {
  auto link = channel::LoopbackLink::Create();
  auto a = SealedChannel::Create(link->TakeA(), LinkProtection::kEncrypt, 1 << 20);
  REQUIRE(a.ok());
  auto b = link->TakeB();
  REQUIRE(SendText(**a, "HELLO").ok());
  CHECK(*ReceiveText(*b) == "HELLO");
}

TEST_CASE("any change on the way is refused, and the connection ends", "[sealed]") {
  const auto protection = GENERATE(LinkProtection::kMac, LinkProtection::kEncrypt);
  INFO(wire::LinkProtectionName(protection));
  Relay r(protection);
  REQUIRE(SendText(*r.primary, "ACK 1").ok());
  REQUIRE(SendText(*r.primary, "ACK 2").ok());
  auto first = r.Intercept();
  auto second = r.Intercept();
  std::vector<uint8_t> tampered = first;
  SECTION("a flipped bit in the message") { tampered[2] ^= 0x01; }
  SECTION("a flipped bit in the tag") { tampered.back() ^= 0x80; }
  SECTION("a dropped message (the next one arrives first)") { tampered = second; }
  SECTION("a truncated message") { tampered.resize(tampered.size() - 1); }
  SECTION("a forged message of the right length") {
    std::fill(tampered.begin(), tampered.end(), 0);
  }
  r.Forward(tampered);
  auto got = ReceiveText(*r.secondary);
  REQUIRE(!got.ok());
  CHECK(got.status().code() == Status::Code::kCorruption);
  CHECK(got.status().message().find("failed authentication") != std::string::npos);
  // Nothing more is taken from this connection, not even the next genuine message; it can
  // still say why it closes.
  r.Forward(second);
  CHECK(ReceiveText(*r.secondary).status().code() == Status::Code::kCorruption);
  CHECK(SendText(*r.secondary, "ERROR").ok());
}

TEST_CASE("a replayed message is refused", "[sealed]") {
  Relay r(LinkProtection::kMac);
  REQUIRE(SendText(*r.primary, "ACK 1").ok());
  auto first = r.Intercept();
  r.Forward(first);
  REQUIRE(*ReceiveText(*r.secondary) == "ACK 1");
  r.Forward(first);  // the same bytes again
  auto again = ReceiveText(*r.secondary);
  REQUIRE(!again.ok());
  CHECK(again.status().code() == Status::Code::kCorruption);
}

TEST_CASE("another pairing key, other nonces, or a reflected message: refused", "[sealed]") {
  SECTION("the secondary derived its keys from another connection's nonces") {
    Relay r(LinkProtection::kMac, TestKeys(9));
    REQUIRE(SendText(*r.primary, "ACK 1").ok());
    r.Forward(r.Intercept());
    CHECK(!ReceiveText(*r.secondary).ok());
  }
  SECTION("another pairing key") {
    std::array<uint8_t, 32> other{};
    wire::Nonce p{}, s{};
    p[0] = 7;
    s[0] = 8;
    auto keys = DeriveLinkKeys(other, p, s);
    REQUIRE(keys.ok());
    Relay r(LinkProtection::kEncrypt, *keys);
    REQUIRE(SendText(*r.primary, "ACK 1").ok());
    r.Forward(r.Intercept());
    CHECK(!ReceiveText(*r.secondary).ok());
  }
  SECTION("the primary's own message sent back to it") {
    auto link = channel::LoopbackLink::Create();
    auto primary = Sealed(link->TakeA(), LinkProtection::kMac, TestKeys(), true);
    auto raw = link->TakeB();
    REQUIRE(SendText(*primary, "ACK 1").ok());
    std::vector<uint8_t> buf(1 << 16);
    size_t n = 0;
    REQUIRE(raw->Receive(buf, &n, 2s).ok());
    channel::ConstSlice back{buf.data(), n};
    REQUIRE(raw->Send({&back, 1}).ok());
    CHECK(!ReceiveText(*primary).ok());
  }
}

TEST_CASE("the link keys are RFC 5869 HKDF-SHA256 as wire_format.h says", "[sealed]") {
  // Expected values computed independently (Python's hmac/hashlib, RFC 5869 by hand) for
  // TestKeys(7): pairing key 00*5 42 00*26, salt = 07 00*31 || 08 00*31.
  auto hex = [](const std::array<uint8_t, 32>& k) {
    std::string s;
    char b[3];
    for (uint8_t v : k) {
      std::snprintf(b, sizeof b, "%02x", v);
      s += b;
    }
    return s;
  };
  LinkKeys k = TestKeys(7);
  CHECK(hex(k.primary_to_secondary) ==
        "f4792d4c718ed65d8864bccfbd171d848bf221af39484e9b94dd6341e55bd2a4");
  CHECK(hex(k.secondary_to_primary) ==
        "98caddc7e978ca4068b099a05d1392680840a7c701e35e1ebbb01008b8569f45");
}

TEST_CASE("a refusal the peer sent before sealing is told as its refusal", "[sealed]") {
  // The secondary rejects the primary's AUTH with a plain ERROR; the primary, sealed by
  // then, reports the secondary's words, not a failed tag.
  auto link = channel::LoopbackLink::Create();
  auto primary = Sealed(link->TakeA(), LinkProtection::kEncrypt, TestKeys(), true);
  auto raw = link->TakeB();
  auto error = wire::EncodeReasonRecord(wire::RecordType::kError, "the key is wrong");
  channel::ConstSlice g{error.data(), error.size()};
  REQUIRE(raw->Send({&g, 1}).ok());
  auto got = ReceiveText(*primary);
  REQUIRE(!got.ok());
  CHECK(got.status().code() == Status::Code::kPeerRejected);
  CHECK(got.status().message().find("the key is wrong") != std::string::npos);
  CHECK(!primary->refused());
}

TEST_CASE("the link keys: one per direction, fresh for each pair of nonces", "[sealed]") {
  LinkKeys a = TestKeys(1), b = TestKeys(1), c = TestKeys(2);
  CHECK(a.primary_to_secondary == b.primary_to_secondary);
  CHECK(a.primary_to_secondary != a.secondary_to_primary);
  CHECK(a.primary_to_secondary != c.primary_to_secondary);
  CHECK(a.secondary_to_primary != c.secondary_to_primary);
}

TEST_CASE("an encrypted message larger than this side's largest is refused, not cut", "[sealed]") {
  auto link = channel::LoopbackLink::Create();
  auto c = SealedChannel::Create(link->TakeA(), LinkProtection::kEncrypt, 1000);
  REQUIRE(c.ok());
  REQUIRE((*c)->Seal(TestKeys(), true).ok());
  Status s = SendText(**c, std::string(1001, 'x'));
  CHECK(s.code() == Status::Code::kInvalidArgument);
  CHECK(SendText(**c, std::string(1000, 'x')).ok());
}
