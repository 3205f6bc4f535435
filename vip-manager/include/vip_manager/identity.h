// Identity takeover: the replica that becomes active claims the VM's network identity.
//
//   - a host-level virtual IP, added as a /32 (IPv4) or /128 (IPv6, no DAD) to an interface
//     over rtnetlink (libnl-route-3), and removed again idempotently;
//   - announcements on raw AF_PACKET sockets, so that switches and neighbours move to this
//     host at once instead of when their caches expire: gratuitous ARP (a request and a
//     reply, sender = target = the VIP) or, for an IPv6 VIP, an unsolicited neighbour
//     advertisement with the override flag; and a RARP frame from each of the VM's MACs,
//     as QEMU's own announce does after a migration;
//   - repeated a few times after the claim (as keepalived repeats its gratuitous ARPs):
//     a frame lost to a switch still learning its ports is sent again.
//
// Everything that can fail slowly (interface lookup, sockets, netlink connection, frame
// building) happens in Open(); Claim() sends what was prepared. Nothing shells out.
//
// Thread safety: an IdentityClaimer is used by one thread at a time; the repeats run on a
// thread of its own.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"

namespace lockstep::vip {

using MacAddress = std::array<uint8_t, 6>;

// "52:54:00:12:34:56" -> bytes; kInvalidArgument otherwise.
Result<MacAddress> ParseMac(const std::string& text);

struct IdentitySpec {
  std::string interface;            // the host interface the identity lives on
  std::string vip;                  // "10.9.0.50" or "fd00::50"; "" = no VIP
  std::vector<MacAddress> vm_macs;  // RARP from each (the VM's NICs); may be empty
  int rounds = 3;                   // announcement rounds, the first at once
  std::chrono::milliseconds round_gap{100};
};

// What one Claim() did, for the failover timeline.
struct ClaimReport {
  std::chrono::steady_clock::time_point began, address_added, first_frame_sent;
  bool address_was_there = false;  // the VIP was already on the interface (claim repeated)
};

class IdentityClaimer {
 public:
  // Resolves the interface (its index and MAC), connects to rtnetlink, opens the packet
  // socket and builds every frame. kInvalidArgument for a bad VIP or MAC, kIoError (with
  // what to do) for a missing interface or missing privileges (CAP_NET_ADMIN, CAP_NET_RAW).
  static Result<std::unique_ptr<IdentityClaimer>> Open(const IdentitySpec& spec);
  ~IdentityClaimer();  // waits for the announcement rounds in flight; does not release
  IdentityClaimer(const IdentityClaimer&) = delete;
  IdentityClaimer& operator=(const IdentityClaimer&) = delete;

  // Adds the VIP (an address already there is fine) and sends the first announcement
  // round; the other rounds follow on a thread, `round_gap` apart.
  Result<ClaimReport> Claim();
  // Removes the VIP; an address that is not there is fine. Stops pending rounds.
  Status Release();
  // True while the VIP is on the interface (asks the kernel).
  Result<bool> Holds() const;

  uint64_t frames_sent() const;

 private:
  struct Impl;
  explicit IdentityClaimer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The frames, exposed for tests. All return whole Ethernet frames.
namespace frames {
// ARP over Ethernet for IPv4 `ip`, from `mac`: op 1 (request: target MAC zero) or 2 (reply:
// target MAC = `mac`), broadcast, sender IP = target IP = `ip`.
std::vector<uint8_t> GratuitousArp(const MacAddress& mac, const std::array<uint8_t, 4>& ip,
                                   bool reply);
// RARP "reverse request" (op 3) from `mac` about itself, broadcast (as QEMU announces).
std::vector<uint8_t> Rarp(const MacAddress& mac);
// ICMPv6 neighbour advertisement for `ip`, override flag set, to all nodes (ff02::1),
// with the target link-layer address option = `mac`; hop limit 255.
std::vector<uint8_t> UnsolicitedNeighborAdvert(const MacAddress& mac,
                                               const std::array<uint8_t, 16>& ip);
}  // namespace frames

}  // namespace lockstep::vip
