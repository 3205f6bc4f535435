// The engine: PrimaryReplicator and SecondaryReplica.
//
// A PrimaryReplicator checkpoints a running guest into epochs and streams them to a
// SecondaryReplica over a replication channel, holding the guest's output until the
// secondary acknowledges the epoch that caused it. Each side watches the other with
// heartbeats; on a fault each asks the witness for the single active token, and only the
// winner acts. See docs/engine.md for the state machine and docs/wire-format.md for the
// bytes.
//
// Threads (all owned by the replicator): the primary runs an epoch thread (pause, then
// stream), a control thread (acks, heartbeats in, failure detection, fault handling) and a
// heartbeat thread; the secondary runs a receive thread (verify, ack, apply, failure
// detection, fault handling) and a heartbeat thread. Public methods are thread-safe.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"
#include "lockstep/hypervisor.h"
#include "lockstep/wire_format.h"
#include "replication_channel/channel.h"
#include "vip_manager/witness.h"

namespace lockstep {

using Micros = std::chrono::microseconds;

struct ReplicationOptions {
  std::string vm_id;                     // the protected VM; the same on both hosts
  std::string host_id;                   // this host, as the witness and the peer know it
  std::array<uint8_t, 16> pairing_id{};  // both sides must agree
  // The hosts' shared secret: each side proves it holds it in the handshake (HMAC-SHA256
  // challenge-response, wire_format.h). Required: Start() refuses without one.
  std::optional<std::array<uint8_t, 32>> pairing_key;
  // How the stream is protected after the handshake (wire_format.h, "Link protection"):
  // kMac authenticates every message, kEncrypt also encrypts it (for links that are not
  // physically dedicated), kNone leaves records with their CRC only. Both hosts must agree:
  // a secondary refuses a primary that asks for another.
  wire::LinkProtection link_protection = wire::LinkProtection::kMac;
  Micros epoch_interval{20'000};  // time between checkpoint pauses
  // Output the guest sends is held until its epoch is acknowledged, so an epoch with
  // output pending ends early (OutputPending()): a reply waits for a pause and an ACK,
  // not for the rest of the interval. This is the least time from one pause's start to
  // the next such early one, so a chatty guest is not paused back to back. Zero: epochs
  // end on the interval only.
  Micros output_epoch_spacing{3'000};
  Micros heartbeat_interval{1'000};    // a heartbeat goes out when nothing else did
  Micros peer_loss_threshold{30'000};  // silence longer than this is a lost peer
  // Until the initial synchronization is complete (SYNCING) the larger of this and
  // peer_loss_threshold applies: a secondary first-touching the guest's whole memory can
  // be silent for a while, and a fault then has nothing to fail over to anyway.
  Micros sync_loss_threshold{2'000'000};
  // Once protected, an epoch the secondary has not acknowledged this long after its pause
  // is a fault, even while its heartbeats arrive (alive, but not making progress).
  Micros ack_timeout{2'000'000};
  // A secondary that wins the token on a fault holds it provisionally for this long
  // (witness.h's grant window): it must load the device state, fence the old primary and
  // confirm the token within it, or the primary — if it is alive and lost the race — may
  // take the token back and go on alone. Longer than the fence command may take. The
  // loser waits at most this long (plus some slack) before it gives up for good.
  std::chrono::milliseconds grant_window{2'000};
  bool delta_encoding = true;  // XOR+RLE deltas against the last copy sent
  // The live initial synchronization (wire_format.h): before epoch 1, up to this many
  // pre-copy rounds copy the guest's RAM while it runs, so that epoch 1's pause carries
  // only what the last round left dirty, not all of RAM. Rounds end early once one carries
  // at most `precopy_target_pages` or shrinks by less than a tenth. 0: no pre-copy, epoch 1
  // copies every page in its pause (stop-and-copy).
  int precopy_max_rounds = 30;
  uint64_t precopy_target_pages = 256;
  // A planned switchover (RequestHandover) the secondary neither completes nor declines
  // this long after HANDOVER is a fault: the witness decides.
  std::chrono::milliseconds handover_timeout{10'000};
  size_t max_device_state_bytes = 4u << 20;
  std::chrono::milliseconds handshake_timeout{5'000};
  // Called after every state change, on an engine thread, outside the engine's locks.
  std::function<void(const struct Transition&)> on_transition;

  // Takeover steps the engine does not own, run on an engine thread outside the engine's
  // locks by the replica that won the token on a fault, before it goes active.
  //
  // fence_peer: a secondary taking over runs it first, to make sure `peer_host` (the old
  // primary) can no longer run the VM (STONITH, e.g. a fence-agents command). An error
  // means no takeover: the secondary ends FAILED with the guest never started. A primary
  // that keeps the token does not fence: its secondary never ran the guest and cannot
  // without the token. Unset: no fencing beyond the witness.
  std::function<Status(const std::string& peer_host)> fence_peer;
  // claim_identity: moves the VM's host-level identity (a VIP, announcements) to this host;
  // on a secondary before QEMU's own announce of the guest's MACs and the vCPUs' start. An
  // error is told in the transition's reason; the takeover goes on.
  std::function<Status()> claim_identity;
  // release_identity: a primary gives the identity up as soon as it sees a fault (it claims
  // it back if the witness keeps it active), and a secondary that fails to start the guest
  // it took over gives it up (idempotent).
  std::function<void()> release_identity;
};

// The explicit states of a replica. See docs/engine.md for the allowed transitions.
enum class ReplicaState {
  kIdle,          // not started
  kSyncing,       // initial full synchronization in progress
  kProtected,     // primary: epochs acknowledged; secondary: holds a complete epoch
  kPrimaryAlone,  // primary lost its secondary, won the token, runs unprotected
  kPromoting,     // secondary lost its primary and is asking the witness / resuming
  kActive,        // secondary won and runs the guest
  kFenced,        // lost the token (or could not ask): emits nothing for this VM
  kStopped,       // protection ended on purpose (Stop() or the primary's GOODBYE)
  kHandedOver,    // primary: handed the guest over to its secondary on purpose (a planned
                  // switchover); its own copy is stopped for good, its later output dropped
  kFailed,        // cannot go on (e.g. the primary died before the initial sync finished)
};
const char* ReplicaStateName(ReplicaState s);

struct Transition {
  std::chrono::system_clock::time_point at;
  ReplicaState from;
  ReplicaState to;
  std::string reason;
};

struct ReplicationStats {
  uint64_t epochs = 0;         // primary: epochs sent; secondary: epochs applied
  uint64_t acked_epoch = 0;    // primary: highest ACK received; secondary: highest ACK sent
  uint64_t current_epoch = 0;  // primary: last epoch captured
  uint64_t bytes = 0;          // record bytes sent (primary) or received (secondary)
  uint64_t raw_pages = 0, zero_pages = 0, delta_pages = 0;
  // primary: the pause of epoch 1 (after pre-copy rounds, only what the last one left
  // dirty; without them every page)
  Micros initial_sync_pause{0};
  uint64_t sync_rounds = 0;  // pre-copy rounds sent (primary) or applied (secondary)
  Micros last_pause{0};      // primary: the last checkpoint pause (after the first)
  Micros pause_p50{0}, pause_p99{0}, pause_max{0};  // over the recent pauses
  // primary: from the end of an epoch's pause to its ACK (the output-release delay)
  Micros ack_latency_p50{0}, ack_latency_p99{0};
};

class RoleState;  // internal

// What every replica tells about itself: its state and the history of it. Thread-safe.
class Replica {
 public:
  ReplicaState state() const;
  // Waits until the state is `s`; false on timeout.
  bool WaitForState(ReplicaState s, std::chrono::milliseconds timeout) const;
  // Waits until the state is none of kIdle, kSyncing, kProtected, kPromoting (a fault was
  // handled or protection ended).
  bool WaitForFaultHandled(std::chrono::milliseconds timeout) const;
  // Every change of state, with its time and reason.
  std::vector<Transition> transitions() const;
  // Why protection ended, if it did ("" otherwise).
  std::string fault_reason() const;

 protected:
  Replica() = default;
  ~Replica() = default;
  const RoleState* role_ = nullptr;  // the derived class's; set by its constructor
};

class PrimaryReplicator : public Replica {
 public:
  PrimaryReplicator(Hypervisor& hv, vip::Witness& witness, ReplicationOptions options);
  ~PrimaryReplicator();  // Stop()s
  PrimaryReplicator(const PrimaryReplicator&) = delete;
  PrimaryReplicator& operator=(const PrimaryReplicator&) = delete;

  // Registers with the witness, runs the handshake on `channel` and starts the initial
  // synchronization and the epoch loop. Returns when the handshake is done; the state is
  // then kSyncing and becomes kProtected when the secondary acknowledges epoch 1. On error
  // (peer refused, wrong version, ...) the guest keeps running unprotected, untouched.
  Status Start(std::unique_ptr<channel::Channel> channel);

  // Ends protection on purpose: tells the secondary (GOODBYE) not to take over, releases
  // held output and leaves the guest running. Idempotent.
  void Stop();

  ReplicationStats stats() const;
  // Starts new windows for the pause and ack-latency percentiles of stats() (counters are
  // not reset), e.g. after the initial synchronization has drained.
  void ClearLatencyWindows();

  // The hypervisor holds guest output sent in the open epoch: end the epoch early (see
  // ReplicationOptions::output_epoch_spacing). Cheap; safe from any thread, also before
  // Start() and after Stop() (then it does nothing).
  void OutputPending();

  // A planned switchover with no output lost: ends the open epoch at once, waits for its
  // ACK (so every packet the guest sent up to it is released), sends no further epoch and
  // asks the secondary to take over from exactly that epoch. Returns at once; the outcome
  // is a state change: kHandedOver (the secondary runs the guest; this copy is stopped,
  // what it sent after the last epoch dropped) or, if the secondary declines (e.g. it
  // cannot reach the witness), back to kProtected with the reason in the transition.
  // A handover the secondary neither completes nor declines in time is a fault like a lost
  // peer: the witness decides. kFailedPrecondition unless kProtected.
  Status RequestHandover();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

class SecondaryReplica : public Replica {
 public:
  SecondaryReplica(Hypervisor& hv, vip::Witness& witness, ReplicationOptions options);
  ~SecondaryReplica();  // Stop()s
  SecondaryReplica(const SecondaryReplica&) = delete;
  SecondaryReplica& operator=(const SecondaryReplica&) = delete;

  // Validates the primary's HELLO on `channel` (version, pairing, VM, RAM layout against
  // this hypervisor's), answers it, and starts receiving epochs. A refused handshake is
  // answered with the reason, returned here, and leaves the replica untouched.
  Status Start(std::unique_ptr<channel::Channel> channel);

  // Stops receiving without taking over. Idempotent.
  void Stop();

  ReplicationStats stats() const;
  // Highest epoch acknowledged to the primary; the replica holds exactly this epoch
  // (or is applying it). Lock-free, cheap enough to poll.
  uint64_t acked_epoch() const;
  // The epoch the replica RAM holds (fully applied).
  uint64_t applied_epoch() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace lockstep
