// The replication channel: one interface, several transports.
//
// A Channel is one established, bidirectional, reliable connection between the two
// replicas of a VM. It is message oriented and shaped after RDMA verbs so that TCP, DPDK
// and RDMA transports can sit behind it without the engine noticing:
//
//  * Registered memory. Bulk data (guest pages) is gathered straight out of memory the
//    sender registered once with RegisterMemory() (an RDMA memory region; a no-op for TCP).
//    Small pieces (record headers, control messages) may come from anywhere as long as a
//    message's unregistered bytes stay within kMaxInlineBytes per slice.
//  * Scatter-gather sends. Send() takes a gather list and delivers it as ONE message.
//    Messages arrive whole, in the order they were sent, or not at all.
//  * Completion notification. Send() may return before the bytes left the sender's
//    buffers (RDMA posts work requests). Each Send() returns a sequence number; the
//    buffers it referenced may be reused once CompletedThrough() >= that number or after
//    WaitForCompletion() of it. The TCP transport completes every send before returning.
//  * Receive into caller memory. Receive() places the next message into a buffer of the
//    caller's, so the secondary can receive an epoch straight into its staging arena.
//  * Peer loss. Orderly close, reset, a truncated message or an I/O error make every
//    later call fail with kPeerLost, and LastHeardFrom() reports when the peer was last
//    heard, so the engine's failure detector can tell silence from progress. The channel
//    does not send keep-alives of its own: the engine heartbeats on top of it.
//
// Threading: Send() may be called from several threads (whole messages never interleave);
// Receive() from one thread at a time. Abort() may be called from any thread at any time
// and makes blocked Send()/Receive() calls return kAborted promptly.
//
// Reconnection: a Channel is one connection and is never revived. A Transport makes new
// ones (Listen/Accept on the secondary, Connect on the primary); ConnectWithRetry()
// retries a Connect with backoff until a deadline.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "common/status.h"

namespace lockstep::channel {

using Clock = std::chrono::steady_clock;

// Slices of unregistered memory up to this size may appear in a gather list.
inline constexpr size_t kMaxInlineBytes = 4096;
// No message may exceed this many bytes; transports may refuse larger ones.
inline constexpr size_t kMaxMessageBytes = 64u << 20;
// Most slices one Send() accepts (the TCP transport batches them into writev calls).
inline constexpr size_t kMaxGatherSlices = 8192;

struct ConstSlice {
  const void* data;
  size_t size;
};

struct ChannelStats {
  uint64_t messages_sent = 0;
  uint64_t bytes_sent = 0;  // payload bytes, excluding transport framing
  uint64_t messages_received = 0;
  uint64_t bytes_received = 0;
  // Frames sent again because the peer had not acknowledged them (transports with a
  // reliability protocol of their own, e.g. DPDK; 0 for the others).
  uint64_t retransmissions = 0;
};

class Channel {
 public:
  virtual ~Channel() = default;
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;

  // Short name of the transport ("tcp", "loopback", ...), for logs and status.
  virtual std::string_view transport() const = 0;
  // Human-readable description of the peer (address), for logs and status.
  virtual std::string peer() const = 0;

  // Registers [base, base+len) as a source of bulk sends. Not for the hot path: call it
  // once per buffer at setup. Regions stay registered until the Channel is destroyed.
  virtual Status RegisterMemory(const void* base, size_t len) = 0;

  // Queues one message made of the concatenation of `gather`. Blocks while the transport
  // is back-pressured (until Abort()). On success `*seq` (if given) is the message's
  // sequence number, starting at 1. Fails with kInvalidArgument for an empty or oversized
  // message (nothing is sent), kPeerLost once the connection is gone, kAborted after
  // Abort(). Performs no heap allocation.
  virtual Status Send(std::span<const ConstSlice> gather, uint64_t* seq = nullptr) = 0;

  // Highest sequence number whose buffers may be reused.
  virtual uint64_t CompletedThrough() const = 0;
  // Blocks until CompletedThrough() >= seq, the timeout, peer loss or Abort().
  virtual Status WaitForCompletion(uint64_t seq, std::chrono::microseconds timeout) = 0;

  // Receives the next message into `into` and sets `*size` to its length. Returns
  // kTimedOut when none arrived within `timeout` (the channel stays usable), kPeerLost when
  // the connection is gone, kResourceExhausted when the message does not fit `into`
  // (the connection is then unusable: the stream cannot skip it safely), kAborted after
  // Abort(). Performs no heap allocation (on success).
  // REQUIRES: after a kTimedOut, the next Receive() passes the same `into` again: the
  // transport may already have placed the start of the next message in it (TCP does;
  // it refuses another buffer with kFailedPrecondition).
  virtual Status Receive(std::span<uint8_t> into, size_t* size,
                         std::chrono::microseconds timeout) = 0;

  // When anything (a whole or partial message) last arrived from the peer; the time the
  // connection was established if nothing has yet. Safe from any thread.
  virtual Clock::time_point LastHeardFrom() const = 0;

  // Tears the connection down: the peer sees kPeerLost, blocked calls here return
  // kAborted. Idempotent; safe from any thread.
  virtual void Abort() = 0;

  virtual ChannelStats stats() const = 0;

 protected:
  Channel() = default;
};

// Something that accepts connections from a peer (the secondary's side).
class Listener {
 public:
  virtual ~Listener() = default;
  // The address a peer should connect to (e.g. "127.0.0.1:40123" once an ephemeral port
  // was chosen).
  virtual std::string address() const = 0;
  // Waits up to `timeout` for one connection.
  virtual Result<std::unique_ptr<Channel>> Accept(std::chrono::milliseconds timeout) = 0;
  // Makes a blocked Accept() return kAborted. Safe from any thread.
  virtual void Abort() = 0;
};

// A kind of transport. Addresses are transport specific ("host:port" for TCP).
class Transport {
 public:
  virtual ~Transport() = default;
  virtual std::string_view name() const = 0;
  virtual Result<std::unique_ptr<Listener>> Listen(std::string_view address) = 0;
  // One attempt; kPeerLost/kIoError if nobody answers, kTimedOut past `timeout`.
  virtual Result<std::unique_ptr<Channel>> Connect(std::string_view address,
                                                   std::chrono::milliseconds timeout) = 0;
};

// Connects, retrying with exponential backoff (from 1 ms, at most 100 ms apart) until
// `deadline`. Returns the last error if no attempt succeeded.
Result<std::unique_ptr<Channel>> ConnectWithRetry(Transport& transport, std::string_view address,
                                                  Clock::time_point deadline);

}  // namespace lockstep::channel
