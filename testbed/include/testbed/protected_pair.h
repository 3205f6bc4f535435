// A protected guest across the test bed's hosts, as the failover tests and the failover
// latency harness need it: the witness on its own host (the embedded lockstep-witness or
// etcd), the secondary QEMU paused, the primary protected by QMP object-add, a capture on
// the switch's host ports, and a client busy on one TCP connection from a third host.
#pragma once

#include <memory>
#include <string>

#include "common/status.h"
#include "testbed/child_process.h"
#include "testbed/port_capture.h"
#include "testbed/qemu_vm.h"
#include "testbed/topology.h"
#include "testbed/workload_client.h"

namespace lockstep::testbed {

enum class WitnessKind { kEmbedded, kEtcd };
const char* WitnessKindName(WitnessKind k);

struct PairOptions {
  std::string prefix = "lst";  // namespace names (Topology::Create)
  int smp = 1;
  WitnessKind witness = WitnessKind::kEmbedded;
  std::string witness_binary;  // lockstep-witness (kEmbedded)
  std::string etcd_binary = "/usr/bin/etcd";
  // Plugin settings for both replicas (";"-separated, see docs/qemu-plugin.md).
  std::string settings = "interval_ms=20;threshold_ms=300";
  // A host-level VIP on each host's br0 that follows the active replica ("" = none).
  std::string vip;
  // Settings for one side only (e.g. a fence command), appended to `settings`.
  std::string primary_settings, secondary_settings;
};

// Where the witness listens, from the hosts' side.
constexpr int kWitnessPort = 7900;

class ProtectedPair {
 public:
  // Builds everything and waits until the secondary is PROTECTED and the client has had a
  // few replies. Any failure says which step and carries the logs that explain it.
  static Result<std::unique_ptr<ProtectedPair>> Start(const Parts& parts,
                                                      const PairOptions& options);
  ~ProtectedPair();

  Topology& net() { return *net_; }
  QemuVm& primary() { return *primary_; }
  QemuVm& secondary() { return *secondary_; }
  WorkloadClient& client() { return *client_; }
  PortCapture& capture() { return *capture_; }  // port 0: the primary's, 1: the secondary's
  ChildProcess& witness() { return *witness_; }
  std::string Logs() const;  // both QEMUs' and the witness's
  // From launching the primary QEMU to its guest's workload being ready: what a cold
  // restart of the VM elsewhere (classic HA) costs at least, on this machine.
  double boot_seconds() const { return boot_seconds_; }

 private:
  ProtectedPair() = default;
  std::string witness_state_;
  double boot_seconds_ = 0;
  std::unique_ptr<Topology> net_;
  std::unique_ptr<ChildProcess> witness_;
  std::unique_ptr<QemuVm> primary_, secondary_;
  std::unique_ptr<PortCapture> capture_;
  std::unique_ptr<WorkloadClient> client_;
};

}  // namespace lockstep::testbed
