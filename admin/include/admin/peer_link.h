// The peer API: how the daemons of two paired hosts talk (admin plane, docs/admin-plane.md).
// This header is its one description.
//
// Transport: one replication-channel TCP connection per exchange (management network),
// messages of JSON text. Handshake, version 1 — the replication handshake's proof
// (lockstep/pairing_auth.h) over this protocol's own HELLO:
//   client → server  HELLO  {"peer_api": 1, "protocol": "lockstep-peer", "host": CLIENT,
//                            "pairing_id": HEX16, "nonce": HEX32}
//   server → client  {"ok": true, "host": SERVER, "nonce": HEX32, "proof": HEX32}, or
//                    {"ok": false, "error": WHY} (not paired, another pairing, another host)
//   client → server  {"proof": HEX32}, or {"error": WHY} when the server's proof is wrong
// Proofs are ComputeProof() under the pairing key: the server's as the secondary's, the
// client's as the primary's; the digest is SHA-256 of the HELLO message exactly as sent.
// After a good client proof both ends seal every later message with AES-256-GCM, keys from
// the key and both nonces (lockstep/sealed_channel.h). Then one request and its answer:
//   {"command": NAME, ...} → {"ok": true, ...} | {"ok": false, "error": WHY}
// A wrong key is refused on both sides: each names the pairing key in its error.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "admin/control.h"
#include "common/status.h"
#include "replication_channel/channel.h"

namespace lockstep::admin {

// What a host keeps of its pairing.
struct Pairing {
  std::string peer_host;     // the other host's name
  std::string peer_address;  // HOST:PORT of its peer API
  std::array<uint8_t, 16> pairing_id{};
  std::array<uint8_t, 32> key{};
};

inline constexpr int kPeerApi = 1;

// Connects to `pairing.peer_address`, proves this host holds the key and checks the peer
// does, and returns the sealed connection. kPeerRejected with the reason if either side
// refused (the key named when it is the key).
Result<std::unique_ptr<channel::Channel>> ConnectPeer(const std::string& my_host,
                                                      const Pairing& pairing,
                                                      std::chrono::milliseconds timeout);

// The server's side of the handshake on an accepted connection. `pairings` are this host's
// (its partner's, and a spare's if it has one); the client's HELLO picks one by its host
// name, and is refused, told so, if none is its (or there are none). `*client_host` (if
// given) is set to the host the connection proved to be.
Result<std::unique_ptr<channel::Channel>> AcceptPeer(std::unique_ptr<channel::Channel> link,
                                                     const std::string& my_host,
                                                     const std::vector<Pairing>& pairings,
                                                     std::chrono::milliseconds timeout,
                                                     std::string* client_host = nullptr);
// The same with at most one pairing.
inline Result<std::unique_ptr<channel::Channel>> AcceptPeer(std::unique_ptr<channel::Channel> link,
                                                            const std::string& my_host,
                                                            const std::optional<Pairing>& pairing,
                                                            std::chrono::milliseconds timeout) {
  std::vector<Pairing> pairings;
  if (pairing) pairings.push_back(*pairing);
  return AcceptPeer(std::move(link), my_host, pairings, timeout);
}

// One JSON message each way.
Status SendJson(channel::Channel& ch, const Json& message);
Result<Json> ReceiveJson(channel::Channel& ch, std::chrono::milliseconds timeout);

// Hex of bytes, and back (OpenSSL's hex codec, as the engine's key file uses):
// kInvalidArgument unless `hex` is exactly `n` bytes of hex.
std::string ToHex(const uint8_t* data, size_t n);
Status FromHex(const std::string& hex, uint8_t* out, size_t n);
template <size_t N>
Result<std::array<uint8_t, N>> FromHex(const std::string& hex) {
  std::array<uint8_t, N> out{};
  LOCKSTEP_RETURN_IF_ERROR(FromHex(hex, out.data(), N));
  return out;
}

}  // namespace lockstep::admin
