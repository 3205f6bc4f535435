// The handshake's pairing-key proof: bound to the key, the role, the whole HELLO, the
// secondary's answer and (for the primary) the secondary's proof, so no proof can be
// reused for anything else and no byte of the handshake can be changed on the way.
#include "lockstep/pairing_auth.h"

#include <catch2/catch.hpp>
#include <vector>

using namespace lockstep;

TEST_CASE("a proof is bound to the key, the role, the HELLO and the answer", "[auth]") {
  std::array<uint8_t, 32> key{1, 2, 3};
  wire::Hello hello;
  hello.witness_term = 7;
  hello.vm_id = "vm1";
  hello.host_id = "hostA";
  hello.nonce[0] = 1;
  auto rec = wire::EncodeHello(hello);
  std::vector<uint8_t> payload(rec.begin() + wire::kHeaderBytes, rec.end());
  ProofContext c;
  c.hello_digest = HelloDigest(payload);
  c.secondary_host = "hostB";
  c.secondary_nonce[0] = 2;
  auto proof = [&](ProofRole role, const ProofContext& ctx, std::array<uint8_t, 32> k) {
    auto p = ComputeProof(k, role, ctx);
    REQUIRE(p.ok());
    return *p;
  };
  const wire::Proof base = proof(ProofRole::kPrimary, c, key);
  REQUIRE(ProofMatches(base, proof(ProofRole::kPrimary, c, key)));
  REQUIRE_FALSE(ProofMatches(base, proof(ProofRole::kSecondary, c, key)));
  auto k2 = key;
  k2[31] ^= 1;
  REQUIRE_FALSE(ProofMatches(base, proof(ProofRole::kPrimary, c, k2)));
  // One byte of the HELLO changed on the way (say, the witness term): another digest.
  payload[20] ^= 1;
  ProofContext tampered = c;
  tampered.hello_digest = HelloDigest(payload);
  REQUIRE_FALSE(ProofMatches(base, proof(ProofRole::kPrimary, tampered, key)));
  ProofContext d = c;
  d.secondary_nonce[5] ^= 1;
  REQUIRE_FALSE(ProofMatches(base, proof(ProofRole::kPrimary, d, key)));
  d = c;
  d.secondary_host = "hostC";
  REQUIRE_FALSE(ProofMatches(base, proof(ProofRole::kPrimary, d, key)));
  d = c;
  d.secondary_proof[0] ^= 1;  // the primary's proof covers the secondary's
  REQUIRE_FALSE(ProofMatches(base, proof(ProofRole::kPrimary, d, key)));
  REQUIRE(ProofMatches(proof(ProofRole::kSecondary, c, key),
                       proof(ProofRole::kSecondary, d, key)));  // ... not the other way
}

TEST_CASE("nonces are fresh", "[auth]") {
  auto a = FreshNonce(), b = FreshNonce();
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  REQUIRE(*a != *b);
}
