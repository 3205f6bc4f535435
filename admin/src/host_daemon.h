// lockstepd's core: the VMs of this host, their QEMU processes, and the control API
// (admin/control.h) over them. The binary (admin/tools/lockstepd.cc) adds flags, signals
// and the socket's life.
//
// State on disk, under `state_dir` (mode 0700), one directory per defined VM:
//   vms/<name>/definition.json   the definition as defined (admin/vm_definition.h)
//   vms/<name>/qemu.pid          "PID STARTTIME" while QEMU runs (STARTTIME: field 22 of
//                                /proc/PID/stat, so a reused PID is not taken for ours)
//   vms/<name>/qmp.sock          QEMU's QMP socket
//   vms/<name>/qemu.log, console.log   QEMU's output and the guest's serial console
//   pairing.json                 the paired host: {"peer_host", "peer_address", "pairing_id"}
//   pairing.key                  the pairing key, 64 hex digits, mode 0600 (the file the
//                                engine's key_file= reads)
//   spare.json, spare.key        a spare host, paired in advance (lockstepctl pair --spare):
//                                when the partner stays silent past --spare-after while
//                                VMs here run unprotected, the spare becomes the partner
//                                (its files replace pairing.*) and they are protected there
// QEMU runs in a session of its own, not as part of the daemon: stopping, killing or
// restarting the daemon leaves every VM running, and a daemon that starts again adopts
// the VMs whose qemu.pid names a live QEMU (and reconnects to their QMP).
//
// Threading: Handle() may be called from several threads; one mutex guards the VMs.
#pragma once

#include <sys/types.h>

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>

#include "admin/control.h"
#include "admin/peer_link.h"
#include "admin/qmp.h"
#include "admin/vm_definition.h"

namespace lockstep::admin {

struct DaemonConfig {
  std::string host_id;       // this host's name (default: the system's host name)
  std::string state_dir;     // see above
  QemuParts parts;           // the QEMU binary and its firmware directories
  std::string peer_address;  // HOST:PORT of this daemon's peer API ("" = none)
  // Protection (docs/admin-plane.md): the engine plugin, the witness setting both hosts
  // share (tcp:HOST:PORT or etcd:...), and this host's address on the replication link,
  // where its secondaries listen.
  std::string plugin, witness, replication_address;
  // The fast transports (a VM's transport=dpdk|rdma): this host's DPDK port on the
  // replication link as DPDK device arguments (replication_channel/dpdk.h), the EAL's
  // arguments for QEMU processes here, and the RDMA device ("" = the first one).
  std::string dpdk_port, dpdk_eal, rdma_device;
  // Host-local parts of a takeover, never taken from a VM definition (which the paired
  // host sends): the interface a VM's VIP goes on, and the fence command (STONITH) this
  // host runs against the other before it takes a VM over.
  std::string vip_interface, fence_command;
  // How long the partner must be silent, with VMs here waiting for re-protection, before
  // a configured spare takes its place.
  std::chrono::seconds spare_after{60};
};

class HostDaemon {
 public:
  // Loads the state (creating the directory if needed) and adopts running VMs. Fails if
  // the state directory cannot be used, or the QEMU binary is missing.
  static Result<std::unique_ptr<HostDaemon>> Open(const DaemonConfig& config);
  ~HostDaemon();

  // Answers one control request (admin/control.h); never throws.
  Json Handle(const Json& request);

  // Collects the exit of QEMU processes this daemon started (they are its children).
  void ReapChildren();

  // Automatic re-protection: every VM running here that lost its protection by a fault
  // (the engine ACTIVE after a takeover, or PRIMARY_ALONE) is protected again as soon as
  // the paired host's daemon answers. A secondary copy here whose engine ended without
  // taking over (STOPPED, FAILED, FENCED) is shut down on the way, so that its primary's
  // host can protect the VM here again. Call it now and then (lockstepd: every 2 s, on a
  // thread of its own); each attempt that fails is logged once per distinct reason.
  void ReprotectLostVms();

  // This host's metrics in Prometheus' text format (version 0.0.4): per VM whether it
  // runs, its protection state and role, and the engine's counters and latencies.
  std::string MetricsText();

  // Serves one connection of the peer API (admin/peer_link.h): handshake, one request.
  void ServePeer(std::unique_ptr<channel::Channel> link);

 private:
  struct Vm {
    VmDefinition def;
    pid_t pid = 0;  // 0: not running
    uint64_t starttime = 0;
    std::optional<Qmp> qmp;
    std::string note;  // why the VM is in an odd state ("" if not)
    // Set while this copy is the paired host's secondary (vms/<name>/secondary_of holds
    // that host's name): it runs only to take over, and only that host may discard it.
    std::string secondary_of;
    // The host this copy was last protected with as the primary (vms/<name>/protected_with):
    // after a failover that host may turn this stopped copy into its secondary.
    std::string protected_with;
  };
  explicit HostDaemon(DaemonConfig config) : config_(std::move(config)) {}

  // REQUIRES: mu_ held.
  Json Summary(const std::string& name, Vm& vm);
  Json Describe(const std::string& name, Vm& vm);
  bool Alive(Vm& vm);  // refreshes pid/qmp if QEMU is gone
  Result<Json> Define(const Json& definition);
  Result<Json> Undefine(const std::string& name);
  Result<Json> Start(const std::string& name);
  // Starts QEMU for `vm` with `extra` arguments and connects to its QMP.
  Result<Json> Launch(const std::string& name, Vm& vm, const std::vector<std::string>& extra);
  // Protect and Unprotect take mu_ themselves (REQUIRES: mu_ not held) and let go of it
  // while the paired host's daemon works.
  // `again`: only a re-protection (refused if this VM's QEMU never had an engine).
  // `transport` (tcp|dpdk|rdma, "" = keep) becomes the VM's replication transport first.
  Result<Json> Protect(const std::string& name, bool again = false,
                       const std::string& transport = "");
  // Where this host's primary engine connects, given the secondary's listen address: that
  // address itself (tcp, rdma), or this host's DPDK port with the secondary's link number.
  std::string PrimaryPeerAddress(const std::string& transport, const std::string& listen) const;
  Result<Json> Unprotect(const std::string& name);
  // Failovers (REQUIRES: mu_ not held; they let go of it while they wait).
  // HandOver: a planned switchover of a PROTECTED VM whose primary runs here to the paired
  // host (the engine's HANDOVER: no output lost); this host's copy, stopped for good, is
  // then shut down, and the other host's daemon re-protects the VM with this one.
  Result<Json> HandOver(const std::string& name);
  // ForceFailover: this host's QEMU of the VM is killed (SIGKILL); returns once the
  // paired host's secondary runs it (ACTIVE), with its takeover's timeline.
  Result<Json> ForceFailover(const std::string& name);
  // Drill: HandOver, then once the other host has re-protected the VM, the same back, and
  // once this host has re-protected it again, the timings of both legs.
  Result<Json> Drill(const std::string& name);
  // What only the primary's host may do needs: the VM runs here, is not busy, and its
  // engine here is the primary (PROTECTED too, with `protected_only`); else the refusal,
  // ending in `otherwise` (what to do). REQUIRES: mu_ held.
  Status CheckPrimaryHere(const std::string& name, Vm& vm, bool protected_only,
                          const std::string& otherwise);
  // A primary here, PROTECTED, and a pairing: what a failover starts from. Marks the VM
  // busy and returns it with the pairing. REQUIRES: mu_ held.
  Result<std::pair<Vm*, Pairing>> BeginFailover(const std::string& name);
  // The paired host's view of VM `name` (peer API "vm-state"): role, state, reason.
  Result<Json> PeerVmState(const Pairing& pairing, const std::string& name,
                           std::chrono::milliseconds connect_timeout = std::chrono::seconds(5));
  // Polls `probe` every `every` until it returns a value or an error, or `timeout` passes.
  Result<Json> AwaitOutcome(const std::function<Result<std::optional<Json>>()>& probe,
                            std::chrono::milliseconds every, std::chrono::milliseconds timeout,
                            const std::string& what);
  // The peer API's calls of protect and unprotect (REQUIRES: mu_ not held).
  Result<std::string> PrepareOnPeer(const Pairing& pairing, const std::string& definition);
  Status DiscardOnPeer(const Pairing& pairing, const std::string& name);
  // The peer API's side of protect and unprotect, on the secondary's host.
  Result<Json> PrepareSecondary(const Json& definition, const std::string& primary_host);
  Result<Json> DiscardSecondary(const std::string& name, const std::string& primary_host);
  // The engine's settings for `def` under `pairing`: key_file, pairing id, the VM's own.
  std::string EngineSettings(const VmDefinition& def, const Pairing& pairing) const;
  Result<Json> Stop(const std::string& name, bool force);
  Result<Vm*> Find(const std::string& name);
  void ServePeerUnchecked(std::unique_ptr<channel::Channel> link, const std::string& from);
  // The pairing commands; they take pairing_mu_ only, never mu_ (a check talks to the peer,
  // whose own check may be talking to us).
  // With "spare": true, `request` pairs a spare (this host must be paired already).
  Result<Json> Pair(const Json& request);
  // `spare`: forgets the spare only.
  Result<Json> Unpair(bool spare);
  // `spare`: checks the spare instead of the partner.
  Result<Json> CheckPairing(bool spare);
  // Whether `pairing`'s host answers on the peer API: kPeerRejected with its reason if it
  // refuses this host, the connection's error if it cannot be asked.
  Status Ping(const Pairing& pairing,
              std::chrono::milliseconds connect_timeout = std::chrono::seconds(1),
              std::chrono::milliseconds answer_timeout = std::chrono::seconds(2));
  // The partner has been silent too long: if a spare is configured and answers, it becomes
  // the partner. True if it did.
  bool PromoteSpare(const std::string& silent_partner);
  std::optional<Pairing> CurrentPairing();
  Json PairingSummary();
  std::string VmDir(const std::string& name) const;
  // Records the engine's state changes of `vm` (QMP LOCKSTEP_STATE_CHANGE, read whenever
  // the daemon talks to its QEMU) in vms/<name>/events.log, one JSON line each; and stops
  // the QMP client from keeping the other events.
  void WatchEvents(const std::string& name, Vm& vm);
  std::vector<Json> Events(const std::string& name);
  // The engine's role and state for a running VM ("" if it has no engine object).
  std::pair<std::string, std::string> EngineRole(Vm& vm);
  // Sets `*field` of VM `name` to `value`, kept on disk as vms/<name>/<file> ("" removes it).
  Status SetMark(const std::string& name, const char* file, std::string* field,
                 const std::string& value);

  const DaemonConfig config_;
  std::mutex mu_;
  std::map<std::string, Vm> vms_;  // GUARDED_BY(mu_)
  std::mutex pairing_mu_;
  std::optional<Pairing> pairing_;  // GUARDED_BY(pairing_mu_)
  std::optional<Pairing> spare_;    // GUARDED_BY(pairing_mu_)
  std::string pairing_note_;        // the last check's outcome; GUARDED_BY(pairing_mu_)
  std::set<std::string> busy_;  // VMs being protected, unprotected or failed over; GUARDED_BY(mu_)
  // The last reason re-protection waits, per VM: ReprotectLostVms's thread only.
  std::map<std::string, std::string> reprotect_errors_;
  // Since when the partner has not answered while VMs wait (ReprotectLostVms's thread).
  std::optional<std::chrono::steady_clock::time_point> partner_silent_since_;
};

}  // namespace lockstep::admin
