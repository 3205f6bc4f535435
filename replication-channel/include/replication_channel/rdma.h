// The RDMA transport: a Channel over one reliable-connected (RC) queue pair, libibverbs.
//
// Setup. Every connection starts as a TCP connection to the listener's "HOST:PORT"
// (numeric IPv4, or "[V6]:PORT"; port 0 in Listen() picks one, see Listener::address()).
// Over it both ends exchange a hello, bring their QPs to RTS and confirm with a READY
// word; the socket then stays open for the connection's life as its side channel: it ends
// with a goodbye on an orderly close, and an end or reset without one is how a crashed or
// aborted peer shows (kPeerLost). Connect() returns once the listener's Accept() has
// answered (so the two run on different threads or hosts); the handshake after the TCP
// connect has its own 30 s bound. The verbs device is RdmaOptions::device or the first
// one found; its port's GID is the IPv4-mapped RoCE v2 entry when there is one (so RoCE v2
// works on soft-RoCE, rxe), else any RoCE v2 entry, else any valid entry.
//
// Data path. Each end registers a receive ring of RdmaOptions::ring_bytes. A message is
// RDMA-WRITTEN into the peer's ring right after the previous one (wrapping at the end),
// in work requests of up to 1 MiB, and its last one is an RDMA_WRITE_WITH_IMM whose
// immediate value is the message's length: its receive completion tells the peer that
// the whole message is in place (RC executes a QP's requests in order). Gather slices
// inside memory registered with RegisterMemory() go out zero-copy as scatter-gather
// entries with that region's lkey; other slices are first copied into a registered
// bounce ring of RdmaOptions::bounce_bytes. Receive() copies the next message out of the
// ring into the caller's buffer, so a message may be at most the peer's ring_bytes
// (larger ones are refused by Send() with kInvalidArgument, nothing sent).
//
// Flow control. The sender may have at most the peer's ring_bytes unconsumed in the ring
// and at most `credits` messages unconsumed, the smaller of both ends' receive_credits
// (the same both ways). The receiver returns credits as a SEND carrying its running
// totals of consumed bytes and messages, after a Receive() that empties the ring or that
// frees a quarter of either limit. So at most one credit SEND per received message is
// ever in flight, and each end keeps 2 * its receive_credits + 8 receive requests posted
// (messages plus credit updates). A sender out of ring space, credits, bounce space or
// send-queue slots waits (Abort() wakes it).
//
// Completion. Send() returns once its work requests are posted; each message's last
// request is signalled, and CompletedThrough() advances when its completion arrives (RC:
// the peer acknowledged the bytes). Bounce-using requests are signalled too, and at least
// every quarter of the send queue, so slots and bounce space are recycled in order.
//
// Threads. Each channel runs one progress thread that sleeps in poll() on the completion
// channel, the async-event fd, the side channel and an eventfd (Abort/close), drains the
// CQ and wakes the callers (a condition variable): no busy polling, at the price of a
// thread wake-up per completion batch. Send() may be called from several threads (one
// message at a time under a lock), Receive() from one thread at a time, Abort() from
// anywhere. Send() and Receive() allocate nothing on success: rings, queues and scratch
// space are made at connect time.
//
// LastHeardFrom() is when a message's end last arrived: partial messages are invisible
// to an RDMA receiver, and credit updates are not data, so they do not count.
//
// A completion with an error status, a fatal async event, or the side channel ending
// without a goodbye makes every later call fail with kPeerLost carrying the verbs status
// (ibv_wc_status_str) or what happened. Messages that arrived whole before the peer closed
// or went away are still delivered first (an orderly close also waits up to 2 s for its
// writes to be acknowledged and announces how many completed, and the receiver waits for
// those); a failure of this end (a message too big for the caller's buffer, a protocol
// violation by the peer) delivers nothing more.
//
// Wire protocol, version 1 (kRdmaProtocolVersion). All integers little-endian.
//   Hello (72 bytes). Both ends send its first 16 bytes at once after the TCP connect and
//   check the peer's; only then do they open the device, pin the ring and send the rest
//   (a stranger on the port costs no pinned memory):
//     0  u8[8]  magic "LSTPRDMA"
//     8  u32    protocol version
//    12  u32    hello size in bytes (72 in version 1); the fields above never change
//    16  u32    QP number          20  u32  initial PSN (24 bits)
//    24  u8[16] GID                40  u16  LID
//    42  u8     active MTU (enum ibv_mtu)      43  u8  link layer (enum IBV_LINK_LAYER_*)
//    44  u32    receive ring rkey  48  u64  receive ring address
//    56  u64    receive ring size  64  u32  receive credits (messages)
//    68  u32    reserved, 0
//   A peer whose magic or version differs is refused with kVersionMismatch, on both ends
//   (each reads the other's first 16 bytes before anything else).
//   READY (side channel, each way, once the QP is RTS): u32 0x59444552 ("REDY").
//   Message bytes: RDMA WRITEs into the peer's ring at (bytes written before) mod ring size.
//   Message end: RDMA_WRITE_WITH_IMM, immediate = message length (1..kMaxMessageBytes), in
//     network byte order as verbs carries immediates.
//   Credit update (SEND, 24 bytes): u32 0x54444552 ("REDT"), u32 0, u64 bytes consumed
//     in total, u64 messages consumed in total.
//   Goodbye (side channel, then the socket is shut down): u32 0x45594247 ("GBYE"),
//     u32 0, u64 messages of this end that completed (the peer delivers those first).
//
// On a host without RDMA devices (ibv_get_device_list() returns none, as on a kernel
// without InfiniBand support) Listen() and Connect() fail with kUnsupported and a message
// that says so and what to do (load rdma_rxe / use transport=tcp); RdmaAvailable() tells
// it up front, so the engine can refuse to start on it. Registering memory pins it: with
// the defaults a channel pins 136 MiB (its ring and bounce buffer) plus what the caller
// registers, so the process needs CAP_IPC_LOCK or a large enough RLIMIT_MEMLOCK.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "common/status.h"
#include "replication_channel/channel.h"

namespace lockstep::channel {

// The version of the wire protocol above; both ends must speak the same.
inline constexpr uint32_t kRdmaProtocolVersion = 1;

struct RdmaOptions {
  // The verbs device to use ("rxe0", "mlx5_0"); empty: the first one found.
  std::string device;
  // The device port (verbs ports count from 1).
  uint8_t port = 1;
  // GID table index; negative: chosen as described above.
  int gid_index = -1;
  // This end's receive ring: the largest message the peer may send. At least 64 KiB.
  size_t ring_bytes = 2 * kMaxMessageBytes;
  // The send-side copy area for slices outside registered memory. At least 64 KiB.
  size_t bounce_bytes = 8u << 20;
  // Messages the peer may have in flight towards this end (receive credits).
  uint32_t receive_credits = 256;
  // Work requests in the send queue.
  uint32_t send_queue_depth = 512;
  // The protocol version announced in the hello. For tests of version checks only.
  uint32_t protocol_version = kRdmaProtocolVersion;
};

// What an rdma channel did, beyond ChannelStats: how its payload left (zero-copy from
// registered memory or copied through the bounce buffer) and its control traffic.
struct RdmaCounters {
  uint64_t zero_copy_bytes = 0;
  uint64_t bounce_bytes = 0;
  uint64_t work_requests = 0;   // RDMA writes posted
  uint64_t credit_updates = 0;  // credit SENDs posted
};

// The counters of `channel` when it is an rdma channel; kInvalidArgument otherwise.
Result<RdmaCounters> GetRdmaCounters(const Channel& channel);

// OK when at least one RDMA device (or `options.device`) is present here and its port is
// active; otherwise kUnsupported saying why and what to do.
Status RdmaAvailable(const RdmaOptions& options = {});

std::unique_ptr<Transport> MakeRdmaTransport(RdmaOptions options = {});

}  // namespace lockstep::channel
