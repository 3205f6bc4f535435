// The handshake's pairing-key proof: bound to the key, the role, the connection's nonces
// and the pairing's names, so no proof can be reused for anything else.
#include "pairing_auth.h"

#include <catch2/catch.hpp>

using namespace lockstep;

TEST_CASE("a proof is bound to the key, the role, both nonces and the names", "[auth]") {
  std::array<uint8_t, 32> key{1, 2, 3};
  ProofContext c;
  c.pairing_id[0] = 9;
  c.vm_id = "vm1";
  c.primary_host = "hostA";
  c.secondary_host = "hostB";
  c.primary_nonce[0] = 1;
  c.secondary_nonce[0] = 2;
  const wire::Proof base = ComputeProof(key, ProofRole::kPrimary, c);
  REQUIRE(ProofMatches(base, ComputeProof(key, ProofRole::kPrimary, c)));
  REQUIRE_FALSE(ProofMatches(base, ComputeProof(key, ProofRole::kSecondary, c)));
  auto changed = [&](auto mutate) {
    ProofContext d = c;
    std::array<uint8_t, 32> k = key;
    mutate(d, k);
    return ComputeProof(k, ProofRole::kPrimary, d);
  };
  REQUIRE_FALSE(ProofMatches(base, changed([](ProofContext&, auto& k) { k[31] ^= 1; })));
  REQUIRE_FALSE(
      ProofMatches(base, changed([](ProofContext& d, auto&) { d.primary_nonce[5] ^= 1; })));
  REQUIRE_FALSE(
      ProofMatches(base, changed([](ProofContext& d, auto&) { d.secondary_nonce[5] ^= 1; })));
  REQUIRE_FALSE(ProofMatches(base, changed([](ProofContext& d, auto&) { d.vm_id = "vm2"; })));
  // Length-prefixed names: moving a byte from one name to the next changes the proof.
  REQUIRE_FALSE(ProofMatches(base, changed([](ProofContext& d, auto&) {
                               d.primary_host = "host";
                               d.secondary_host = "AhostB";
                             })));
  REQUIRE_FALSE(ProofMatches(base, changed([](ProofContext& d, auto&) { d.pairing_id[15] = 1; })));
}

TEST_CASE("nonces are fresh", "[auth]") {
  auto a = FreshNonce(), b = FreshNonce();
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  REQUIRE(*a != *b);
}
