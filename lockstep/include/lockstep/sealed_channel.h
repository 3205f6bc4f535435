// The protection of the replication stream after the handshake (wire_format.h, "Link
// protection"): a Channel that wraps the transport's and, once Seal()ed, authenticates
// every message (AES-256-GCM tag over it: kMac) or encrypts and authenticates it
// (AES-256-GCM: kEncrypt), under keys derived from the pairing key and both handshake
// nonces, one per direction.
//
// Each sealed message is the message (kMac) or its ciphertext (kEncrypt) followed by a
// 16-byte tag. The GCM nonce is the message's number in its direction (implicit: the
// transport delivers messages whole and in order), so a message dropped, replayed,
// reordered, reflected back to its sender or changed in any byte fails the next check;
// a check that fails is kCorruption, and so is every later Receive() (nothing past it can
// be trusted). Sending still works, so the receiver can say why (ERROR) before it closes.
// One exception, to keep the peer's words: a first message that fails and is a plain
// ERROR record is the peer refusing the handshake before it sealed anything — kPeerRejected
// with its reason.
// Before Seal() messages pass through unchanged (the handshake, which protects itself:
// the proofs).
//
// Costs: kMac reads each byte once (GHASH) and sends the caller's gather list as is, plus
// the tag; kEncrypt copies each byte once, encrypting, into a buffer of `max_send_bytes`
// allocated (and registered with the transport) at Create(). Neither allocates per
// message. benchmarks/engine_bench measures both against kNone.
//
// Threading: as Channel. Send() holds a priority-inheritance lock across sealing and the
// transport's send, so message numbers follow the order messages leave in.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/pi_mutex.h"
#include "common/status.h"
#include "lockstep/wire_format.h"
#include "replication_channel/channel.h"

namespace lockstep {

// The two directions' keys of one connection.
struct LinkKeys {
  std::array<uint8_t, 32> primary_to_secondary{};
  std::array<uint8_t, 32> secondary_to_primary{};
};

// HKDF-SHA256 (RFC 5869) of the pairing key, salted with both handshake nonces (fresh for
// every connection, so keys — and with them GCM nonces — are never reused), one key per
// direction. kIoError if OpenSSL fails (fail closed).
Result<LinkKeys> DeriveLinkKeys(const std::array<uint8_t, 32>& pairing_key,
                                const wire::Nonce& primary_nonce,
                                const wire::Nonce& secondary_nonce);

class SealedChannel final : public channel::Channel {
 public:
  // `max_send_bytes`: the largest message this side will send (kEncrypt buffers it).
  static Result<std::unique_ptr<SealedChannel>> Create(std::unique_ptr<channel::Channel> inner,
                                                       wire::LinkProtection protection,
                                                       size_t max_send_bytes);
  ~SealedChannel() override;

  // From now on every message is sealed with the protection given to Create(); `primary`
  // says which key is ours to send with. Call once, after the handshake, while no other
  // thread uses the channel. kNone: nothing changes.
  Status Seal(const LinkKeys& keys, bool primary);

  std::string_view transport() const override { return inner_->transport(); }
  std::string peer() const override { return inner_->peer(); }
  Status RegisterMemory(const void* base, size_t len) override;
  Status Send(std::span<const channel::ConstSlice> gather, uint64_t* seq = nullptr) override;
  uint64_t CompletedThrough() const override;
  Status WaitForCompletion(uint64_t seq, std::chrono::microseconds timeout) override;
  // `into` needs room for the tag too (wire::kLinkTagBytes more than the message).
  Status Receive(std::span<uint8_t> into, size_t* size, std::chrono::microseconds timeout) override;
  channel::Clock::time_point LastHeardFrom() const override { return inner_->LastHeardFrom(); }
  void Abort() override { inner_->Abort(); }
  channel::ChannelStats stats() const override { return inner_->stats(); }

  // Whether a received message failed its check (the receiving thread's question).
  bool refused() const { return broken_.code() == Status::Code::kCorruption; }

 private:
  struct Cipher;  // one direction's OpenSSL context and message counter
  SealedChannel(std::unique_ptr<channel::Channel> inner, wire::LinkProtection protection);

  std::unique_ptr<channel::Channel> inner_;
  const wire::LinkProtection protection_;
  bool sealed_ = false;  // set by Seal() before any concurrent use

  PriorityInheritanceMutex send_mu_;
  std::unique_ptr<Cipher> send_;                    // GUARDED_BY(send_mu_)
  std::vector<uint8_t> sealed_buffer_;              // kEncrypt; GUARDED_BY(send_mu_)
  std::vector<channel::ConstSlice> with_tag_;       // kMac: gather + tag; GUARDED_BY(send_mu_)
  std::array<uint8_t, wire::kLinkTagBytes> tag_{};  // GUARDED_BY(send_mu_)

  std::unique_ptr<Cipher> receive_;  // the receiving thread's only
  Status broken_;                    // the receiving thread's only: set by a failed check
};

}  // namespace lockstep
