// The hosts of a failover run, as network namespaces on this machine.
//
//   <p>-cli  client 10.9.0.100 ── veth ──┐
//   <p>-wit  witness 10.9.0.200 ── veth ─┤
//                                        <p>-sw  bridge "sw" (the switch)
//   <p>-pri  bridge br0 10.9.0.1: tap0 + uplink ──┤
//   <p>-sec  bridge br0 10.9.0.2: tap0 + uplink ──┘
//   <p>-pri 10.99.0.1/30 ── veth "repl" ── 10.99.0.2/30 <p>-sec  (the dedicated link)
//
// Each host namespace has a tap "tap0" for its QEMU, bridged to that host's uplink, so the
// guest (10.9.0.10, one MAC on both hosts) is reached through the switch at whichever host
// runs it; the switch learns the new port from the announcement after a takeover. The
// replication link joins the two hosts only, as a dedicated 10GbE link would. The hosts
// reach the witness (a third host) through the switch, on their own addresses.
#pragma once

#include <functional>
#include <future>
#include <memory>
#include <string>

#include "common/status.h"

namespace lockstep::testbed {

class Topology {
 public:
  static constexpr const char* kGuestIp = "10.9.0.10";
  static constexpr const char* kGuestCidr = "10.9.0.10/24";
  static constexpr const char* kClientIp = "10.9.0.100";
  static constexpr const char* kWitnessIp = "10.9.0.200";
  static constexpr const char* kPrimaryHostIp = "10.9.0.1";
  static constexpr const char* kSecondaryHostIp = "10.9.0.2";
  static constexpr const char* kPrimaryLinkIp = "10.99.0.1";
  static constexpr const char* kSecondaryLinkIp = "10.99.0.2";
  static constexpr const char* kTap = "tap0";

  // Builds the namespaces named after `prefix` (at most 8 characters), replacing any left
  // over from an earlier run. Needs root.
  static Result<std::unique_ptr<Topology>> Create(const std::string& prefix);
  ~Topology();  // removes the namespaces (and with them every interface)
  Topology(const Topology&) = delete;
  Topology& operator=(const Topology&) = delete;

  std::string client_ns() const { return prefix_ + "-cli"; }
  std::string switch_ns() const { return prefix_ + "-sw"; }
  std::string primary_ns() const { return prefix_ + "-pri"; }
  std::string secondary_ns() const { return prefix_ + "-sec"; }
  std::string witness_ns() const { return prefix_ + "-wit"; }

  // Unplugs (or plugs back) a host's port on the switch: the host no longer reaches the
  // client, the replication link stays up.
  Status SetHostPortUp(bool primary, bool up);
  // Cuts (or restores) the replication link.
  Status SetReplicationLinkUp(bool up);
  // Unplugs (or plugs back) the witness from the switch.
  Status SetWitnessPortUp(bool up);

 private:
  explicit Topology(std::string prefix) : prefix_(std::move(prefix)) {}
  void Remove();
  std::string prefix_;
};

// Runs `command` with /bin/sh; kIoError with its output if it fails.
Status Run(const std::string& command);

// Moves the calling thread into network namespace `netns` ("" = stays). For threads of
// their own only: a thread never comes back.
Status EnterNamespace(const std::string& netns);

// Runs `fn` on a new thread inside `netns` and returns its result. Sockets (and netlink
// connections) made there stay in that namespace wherever they are used afterwards.
template <typename T>
Result<T> InNamespace(const std::string& netns, const std::function<Result<T>()>& fn) {
  return std::async(std::launch::async,
                    [&]() -> Result<T> {
                      Status s = EnterNamespace(netns);
                      if (!s.ok()) return s;
                      return fn();
                    })
      .get();
}

}  // namespace lockstep::testbed
