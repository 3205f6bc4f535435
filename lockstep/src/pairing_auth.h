// The pairing-key proof of the handshake (wire_format.h, version 2): nonces and
// HMAC-SHA256 proofs, with OpenSSL. Thread-safe (no state).
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include "common/status.h"
#include "lockstep/wire_format.h"

namespace lockstep {

enum class ProofRole { kPrimary, kSecondary };

// A fresh random nonce (OpenSSL's RAND_bytes); kIoError if the generator fails.
Result<wire::Nonce> FreshNonce();

// What the handshake binds a proof to.
struct ProofContext {
  std::array<uint8_t, 16> pairing_id{};
  std::string vm_id, primary_host, secondary_host;
  wire::Nonce primary_nonce{}, secondary_nonce{};
};

// The proof `role` sends for `context` under `key`.
wire::Proof ComputeProof(const std::array<uint8_t, 32>& key, ProofRole role,
                         const ProofContext& context);

// Reads a pairing key file: 64 hex digits (surrounding whitespace ignored), mode 0600 or
// stricter, as `lockstepctl pair` writes it. Errors say what is wrong and what to do.
Result<std::array<uint8_t, 32>> LoadPairingKey(const std::string& path);

// Constant-time comparison of a received proof with the expected one.
bool ProofMatches(const wire::Proof& received, const wire::Proof& expected);

}  // namespace lockstep
