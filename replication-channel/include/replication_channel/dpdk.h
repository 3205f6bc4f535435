// The DPDK transport: a Channel over raw Ethernet frames on a DPDK port, with a small
// reliable protocol of its own (DPDK ports, af_packet especially, drop frames).
//
// Addresses. An address is the DPDK device's arguments, as for --vdev, optionally followed
// by "#LINK" (a number, default 0) that tells apart several channels sharing one wire:
//   net_memif0,role=server,socket=/run/lockstep/vm1.sock,socket-abstract=no
//   net_af_packet0,iface=eth2,framecnt=4096#17
// Frames: 2048 bytes on memif (its default buffer; never more than a bsize= given), the
// interface's MTU elsewhere (the transport does not change a host interface's MTU).
// A '+' stands for ',' (lockstep's settings are "key=value,..." and QEMU's options split
// at ','): net_memif0+role=client+socket=/run/lockstep/vm1.sock#3.
// The device is probed the first time an address names it and stays for the process's
// life; one Listener or Channel uses a port at a time ("in use" otherwise). A memif
// server's socket is created by the listening side or the connecting side alike; what
// matters is that the two ends name the same socket with opposite roles.
//
// The EAL. DPDK's environment is initialized once per process, on the first Listen() or
// Connect(), with DpdkOptions::eal_args (the first Transport made decides; later ones must
// pass the same arguments or get kFailedPrecondition). The default needs no hugepages and
// no PCI access (DPDK 22.11 refuses --in-memory beside --no-huge, hence --no-shconf); two
// processes on one machine should pass different cores (-l).
//
// Threads. Send() builds frames in the caller's thread and transmits them itself;
// Receive() copies payload out of the received frames into the caller's buffer. Polling
// the port (receiving frames, answering acks, retransmitting, noticing a link going down)
// is done by whichever thread is there: a Send() between bursts and while it waits for
// window room, a Receive() while it waits for frames and between frames it copies out (run
// to completion: no hand-over, the bytes arrive in its cache), else the port's poller
// thread. The poller sleeps while another thread polled within the last 200 µs, wakes at
// once when that thread goes to sleep (or leaves while another sleeps on the channel), and
// naps (tens of microseconds, longer the longer
// nothing came) when idle, so an idle channel costs little CPU. Real-time threads (the
// engine's heartbeats) never poll: they leave it to the poller.
//
// Wire format, version 1. Every frame is an Ethernet II frame, EtherType 0x88B5 (IEEE
// 802 local experimental), followed by this header, little-endian, then the payload:
//   u32 magic 'LSDP' (0x5044534C)  u8 version (1)  u8 type  u8 flags  u8 reserved (0)
//   u32 link       the address's #LINK; frames of other links are ignored
//   u32 conn       the connection's id, chosen at random by the connecting end
//   u64 seq        DATA: the frame's number (1, 2, ... per direction);
//                  ACK/PROBE: the highest number received in order
//   u32 window     ACK: how many frames past `seq` the receiver can take now
//   u32 msg_bytes  DATA with FIRST: the whole message's length
//   u16 payload    bytes of payload in this frame
//   u16 reserved (0)
// Types: SYN (connect; payload: nothing), SYN_ACK, REFUSE (payload: why, text), DATA,
// ACK, PROBE (asks for an ACK: window and loss recovery), RST (the connection ends).
// Flags: FIRST (1) on a message's first DATA frame, LAST (4) on its last (the receiver
// acknowledges it at once; other DATA frames are acknowledged every 32 or after a short
// pause, and a receiver that ignores LAST is still correct), OUT_OF_ORDER (2) on an ACK while
// the receiver holds frames past a gap (sent at once when a frame opens, shortens or fills
// one). A message is the payload of its frames
// in order; frames are at most the port's MTU (jumbo frames where the port takes them).
//
// Reliability: cumulative acks, the receiver keeps frames that arrive early (up to its
// window); the sender retransmits the first unacknowledged frame on an OUT_OF_ORDER ack and
// after a timeout, and every one up to the sender's point of loss while recovering (like
// TCP NewReno). Flow control: the sender never has more frames past the last ack than
// the receiver's advertised window or DpdkOptions::window_frames. Peer loss: an RST, the
// port's link going down (memif: the other process ended), or no acknowledgement of
// outstanding data within DpdkOptions::peer_timeout.
//
// Version: a SYN of another version is answered with REFUSE saying both versions;
// Connect() then fails with kVersionMismatch, the listener logs nothing and keeps
// listening.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "common/status.h"
#include "replication_channel/channel.h"

namespace lockstep::channel {

struct DpdkOptions {
  // Arguments for rte_eal_init() (whitespace separated), see above.
  std::string eal_args = "--no-huge -m 256 --no-pci --no-shconf --log-level=*:error -l 0";
  // Most frames in flight past the last acknowledgement.
  uint32_t window_frames = 2048;
  // Outstanding data unacknowledged this long means the peer is gone.
  std::chrono::milliseconds peer_timeout{5000};
  // The protocol version this end speaks (tests of a mismatched peer change it).
  uint8_t protocol_version = 1;
  // Fault injection for tests: connections of this transport discard every Nth DATA frame
  // they receive (as if lost on the wire). 0: none.
  uint32_t drop_every_nth_frame = 0;
};

inline constexpr uint8_t kDpdkProtocolVersion = 1;

std::unique_ptr<Transport> MakeDpdkTransport(DpdkOptions options = {});

}  // namespace lockstep::channel
