// The pairing-key proof of the handshake (wire_format.h, version 2): nonces and
// HMAC-SHA256 proofs, with OpenSSL. Thread-safe (no state).
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>

#include "common/status.h"
#include "lockstep/wire_format.h"

namespace lockstep {

enum class ProofRole { kPrimary, kSecondary };

// A fresh random nonce (OpenSSL's RAND_bytes); kIoError if the generator fails.
Result<wire::Nonce> FreshNonce();

using Digest = std::array<uint8_t, 32>;

// SHA-256 of a HELLO record's payload, exactly as sent (primary) or received (secondary).
Digest HelloDigest(std::span<const uint8_t> hello_payload);

// What the handshake binds a proof to: the whole HELLO (pairing id, witness term, VM,
// primary host, RAM layout, primary nonce), the secondary's answer, and for the primary's
// proof the secondary's proof as well. A change to any byte of it on the way (say, the
// witness term) makes the proofs disagree.
struct ProofContext {
  Digest hello_digest{};
  std::string secondary_host;
  wire::Nonce secondary_nonce{};
  wire::Proof secondary_proof{};  // ProofRole::kPrimary only
};

// The proof `role` sends for `context` under `key`. kIoError if OpenSSL fails (fail closed).
Result<wire::Proof> ComputeProof(const std::array<uint8_t, 32>& key, ProofRole role,
                                 const ProofContext& context);

// Reads a pairing key file: 64 hex digits (surrounding whitespace ignored), mode 0600 or
// stricter (e.g. `openssl rand -hex 32 > F && chmod 600 F`, the same file on both hosts).
// Errors say what is wrong and what to do.
Result<std::array<uint8_t, 32>> LoadPairingKey(const std::string& path);

// Constant-time comparison of a received proof with the expected one.
bool ProofMatches(const wire::Proof& received, const wire::Proof& expected);

}  // namespace lockstep
