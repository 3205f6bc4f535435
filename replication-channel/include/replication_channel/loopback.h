// The in-process loopback transport, for unit tests.
//
// A LoopbackLink joins two Channels inside one process through in-memory queues. It
// copies (and allocates) on Send: it is for tests, never for production. Its point is
// fault injection that real sockets make hard to aim:
//   Cut()              both ends see kPeerLost at once, as after a reset;
//   Stall()            messages are silently dropped in both directions and nothing is
//                      heard any more, as when a cable is pulled (only heartbeats notice);
//   CutAfterBytes(n)   the A->B direction delivers whole messages while the total of
//                      their bytes stays within n; the message that would cross n is
//                      dropped and the link is Cut() — the secondary sees the stream stop
//                      at an arbitrary point of the epoch.
//
// Clarifications (loopback.cc implements exactly these):
//   * A message reaches its receiver when Send() appends it to the receiver's queue; the
//     receiver's LastHeardFrom() advances then, and BytesDeliveredAtoB() counts it then.
//   * CutAfterBytes(n) counts from the moment of the call: the link is cut by the first
//     A->B message that would make BytesDeliveredAtoB() exceed its value at the call plus
//     n. That Send() returns kPeerLost, like every later Send() on either end; B still
//     receives the messages delivered before the cut, then kPeerLost (as after a close).
//     Cut() discards undelivered messages (as a reset).
//   * After Stall(), Send() returns OK and drops the message; messages queued before the
//     Stall() stay receivable.
//   * Abort() on one end cuts the link: that end then sees kAborted, the other receives
//     what was already sent to it and then kPeerLost (as after shutdown() of a socket).
//     Destroying an end does the same (as close()). On a stalled link neither is noticed
//     by the peer: a pulled cable carries no news of a close. A Receive() whose buffer is too small
//     returns kResourceExhausted and cuts the link.
//   * Each end's queue holds up to 8 MiB (or one larger message); Send() blocks beyond.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "replication_channel/channel.h"

namespace lockstep::channel {

class LoopbackLink {
 public:
  // Creates a connected pair: a() is the primary's end, b() the secondary's.
  static std::shared_ptr<LoopbackLink> Create();
  virtual ~LoopbackLink() = default;

  // Ends of the link. Each may be taken (moved out) exactly once.
  virtual std::unique_ptr<Channel> TakeA() = 0;
  virtual std::unique_ptr<Channel> TakeB() = 0;

  virtual void Cut() = 0;
  virtual void Stall() = 0;
  virtual void CutAfterBytes(uint64_t n) = 0;
  // Bytes of messages delivered A->B so far.
  virtual uint64_t BytesDeliveredAtoB() const = 0;
};

// A Transport whose addresses are names in a per-process registry: Listen("x") then
// Connect("x") yields a LoopbackLink's two ends.
std::unique_ptr<Transport> MakeLoopbackTransport();

}  // namespace lockstep::channel
