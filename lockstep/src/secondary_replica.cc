#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <new>
#include <thread>

#include "epoch_assembler.h"
#include "epoch_stager.h"
#include "lockstep/pairing_auth.h"
#include "lockstep/replicator.h"
#include "lockstep/sealed_channel.h"
#include "lockstep/wire_format.h"
#include "replica_common.h"

namespace lockstep {

using channel::Channel;
using channel::ConstSlice;

namespace {

std::string DescribeLayout(const std::vector<wire::BlockLayout>& blocks) {
  std::string s;
  for (const auto& b : blocks) {
    if (!s.empty()) s += ", ";
    s += b.id + " " + std::to_string(b.length >> 10) + " KiB";
  }
  return s.empty() ? "no RAM" : s;
}

std::string HexId(const std::array<uint8_t, 16>& id) {
  static const char* kHex = "0123456789abcdef";
  std::string s;
  for (uint8_t b : id) {
    s += kHex[b >> 4];
    s += kHex[b & 15];
  }
  return s;
}

// Why this secondary cannot take `hello`, or "" if it can.
std::string RefusalReason(const wire::Hello& hello, const ReplicationOptions& opt,
                          const std::vector<wire::BlockLayout>& mine) {
  if (hello.page_size != wire::kPageSize) {
    return "page size " + std::to_string(hello.page_size) + " is not supported (4096 only)";
  }
  if (hello.pairing_id != opt.pairing_id) {
    return "pairing id " + HexId(hello.pairing_id) + " is not this host's pairing (" +
           HexId(opt.pairing_id) + "); pair the hosts again";
  }
  if (hello.vm_id != opt.vm_id) {
    return "this secondary replicates VM '" + opt.vm_id + "', not '" + hello.vm_id + "'";
  }
  if (hello.blocks != mine) {
    return "the guest configurations differ: the primary has [" + DescribeLayout(hello.blocks) +
           "], this secondary has [" + DescribeLayout(mine) +
           "]; start the secondary with the same machine type and memory size";
  }
  return "";
}

}  // namespace

struct SecondaryReplica::Impl {
  Impl(Hypervisor& h, vip::Witness& w, ReplicationOptions o)
      : hv(h), witness(w), opt(std::move(o)) {}

  // How the receive loop ended.
  enum class Ending {
    kStopped,   // Stop() was called
    kGoodbye,   // the primary ended protection and was told we will not take over
    kRejected,  // the stream was bad while the primary is evidently alive: no takeover
    kPeerLost,  // the primary is gone or silent: the witness decides
    kHandover,  // the primary handed the guest over and the witness granted us the token
  };
  void ReceiveLoop();
  Status SendControl(uint8_t* rec, size_t n);
  void Teardown(Status fault, Ending ending);
  // On the primary's HANDOVER of `epoch`: asks the witness for the token (a provisional
  // grant, as on a fault). Returns "" with the grant in `*grant`, or why not.
  std::string AcceptHandover(uint64_t epoch, vip::WitnessDecision* grant);
  // HANDOVER_REPLY for `epoch`, best effort. REQUIRES: the receive thread.
  void ReplyHandover(uint64_t epoch, bool accepted, const std::string& reason);
  // The takeover once the witness granted the token, on a fault or on a handover (then the
  // primary is told the outcome, and nothing is fenced: it stopped its output itself).
  void TakeOver(const vip::WitnessDecision& decision, const std::string& cause, bool handover,
                TakeoverTimeline timeline, const std::string& lapsed);

  Hypervisor& hv;
  vip::Witness& witness;
  const ReplicationOptions opt;
  RoleState role{false, opt.on_transition};

  // Declared so that they are destroyed in the right order: the heartbeater uses the
  // channel; the channel must go before the memory it receives into.
  PageArena arena;              // the staging area: one whole epoch, as received
  std::vector<uint8_t> device;  // device state of the applied epoch (capacity fixed)
  std::unique_ptr<EpochAssembler> assembler;
  std::unique_ptr<Channel> ch;
  SealedChannel* sealed = nullptr;  // ch, as the link protection that may refuse a message
  std::unique_ptr<Heartbeater> heartbeat;
  std::mutex lifecycle_mu;  // serializes Start() and Stop()
  uint64_t term = 0;
  std::string primary_host;

  std::thread receive_thread;
  std::atomic<bool> stopping{false};
  std::mutex fault_mu;
  Status heartbeat_fault;  // GUARDED_BY(fault_mu)
  std::atomic<bool> heartbeat_failed{false};

  std::atomic<uint64_t> acked{0};
  std::atomic<uint64_t> applied{0};
  std::atomic<uint64_t> bytes{0};
  std::atomic<uint64_t> rounds{0};  // pre-copy rounds applied

  // Set by the receive thread on an accepted HANDOVER, read by its Teardown.
  vip::WitnessDecision handover_grant;
  uint64_t handover_epoch = 0;
  TakeoverTimeline handover_timeline;  // from the HANDOVER's arrival
  // A HANDOVER was declined because the witness did not answer (AcceptHandover).
  bool grant_may_be_stale = false;
};

std::string SecondaryReplica::Impl::AcceptHandover(uint64_t epoch, vip::WitnessDecision* grant) {
  if (role.get() != ReplicaState::kProtected || epoch != acked.load() || epoch != applied.load()) {
    return "this secondary holds epoch " + std::to_string(applied.load()) + " (" +
           ReplicaStateName(role.get()) + "), not the epoch " + std::to_string(epoch) +
           " the HANDOVER names";
  }
  handover_timeline = TakeoverTimeline();
  auto decision = AskWitness(witness, opt, term, opt.grant_window);
  handover_timeline.Mark("witness");
  if (!decision.ok()) {
    // The request may have been applied with every answer lost: a grant to this side
    // whose window runs out unseen. Should a fault come later, the retry rule hands it
    // back without a fresh window, and the primary may reclaim it at once; so the
    // takeover then confirms before it fences (TakeOver), never fencing a primary that
    // took the token back.
    grant_may_be_stale = true;
    return "the witness could not be asked (" + decision.status().ToString() + ")";
  }
  if (!decision->granted) {
    return "the witness gave the token to " + decision->holder + " (term " +
           std::to_string(decision->term) + ")";
  }
  *grant = *decision;
  return "";
}

void SecondaryReplica::Impl::ReplyHandover(uint64_t epoch, bool accepted,
                                           const std::string& reason) {
  auto rec = wire::EncodeReasonRecord(wire::RecordType::kHandoverReply, reason.substr(0, 4096),
                                      epoch, accepted ? wire::kFlagAccepted : 0);
  ConstSlice slice{rec.data(), rec.size()};
  if (ch->Send({&slice, 1}).ok()) heartbeat->NoteSent();
}

Status SecondaryReplica::Impl::SendControl(uint8_t* rec, size_t n) {
  ConstSlice slice{rec, n};
  LOCKSTEP_RETURN_IF_ERROR(ch->Send({&slice, 1}));
  heartbeat->NoteSent();
  return Status::Ok();
}

void SecondaryReplica::Impl::ReceiveLoop() {
  size_t used = 0;  // bytes of the open epoch in the arena
  Status fault;
  Ending ending = Ending::kStopped;
  uint8_t control[wire::kControlRecordBytes];
  while (!stopping.load()) {
    if (heartbeat_failed.load()) {
      std::lock_guard<std::mutex> lock(fault_mu);
      fault = heartbeat_fault;
      ending = Ending::kPeerLost;
      break;
    }
    size_t n = 0;
    std::span<uint8_t> room(arena.data() + used, arena.size() - used);
    Status s = ch->Receive(room, &n, opt.heartbeat_interval);
    if (s.code() == Status::Code::kTimedOut) {
      fault = CheckPeerSilence(*ch,
                               role.get() == ReplicaState::kSyncing
                                   ? std::max(opt.peer_loss_threshold, opt.sync_loss_threshold)
                                   : opt.peer_loss_threshold,
                               "primary");
      if (!fault.ok()) {
        ending = Ending::kPeerLost;
        break;
      }
      continue;
    }
    if (!s.ok()) {
      fault = s;
      ending = Ending::kPeerLost;
      if (sealed->refused()) {  // the link protection refused a message: tampering or a bug
        SendError(*ch, fault.ToString());
        ending = Ending::kRejected;
      }
      break;
    }
    bytes.fetch_add(n, std::memory_order_relaxed);
    std::span<const uint8_t> msg(room.data(), n);
    // Control messages are handled and forgotten; they never enter the staged epoch.
    auto type = n >= 2 ? static_cast<wire::RecordType>(wire::GetU16(msg.data()))
                       : wire::RecordType::kEpochBegin;
    if (type == wire::RecordType::kHeartbeat || type == wire::RecordType::kGoodbye ||
        type == wire::RecordType::kError || type == wire::RecordType::kHandover) {
      wire::RecordReader reader(msg);
      wire::RecordView r;
      fault = reader.Next(&r);
      if (!fault.ok()) {
        ending = Ending::kRejected;
        break;
      }
      if (type == wire::RecordType::kGoodbye) {
        // Promise not to take over; the primary releases its held output on this.
        (void)SendControl(control, wire::EncodeGoodbyeAck(control));
        fault = Status::Aborted("the primary ended protection: " + wire::DecodeReason(r));
        ending = Ending::kGoodbye;
        break;
      }
      if (type == wire::RecordType::kError) {
        fault = Status::Corruption("the primary reported: " + wire::DecodeReason(r));
        ending = Ending::kRejected;
        break;
      }
      if (type == wire::RecordType::kHandover) {
        const std::string why = AcceptHandover(r.header.epoch, &handover_grant);
        if (!why.empty()) {
          // Nothing changed: the primary goes on with the next epoch, and so do we.
          ReplyHandover(r.header.epoch, false, why);
          continue;
        }
        handover_epoch = r.header.epoch;
        fault = Status::Aborted(primary_host + " handed the guest over at epoch " +
                                std::to_string(r.header.epoch) + " (a planned switchover)");
        ending = Ending::kHandover;
        break;
      }
      continue;
    }
    auto progress = assembler->Feed(msg);
    if (!progress.ok()) {
      fault = progress.status();
      SendError(*ch, fault.ToString());
      ending = Ending::kRejected;
      break;
    }
    used += n;
    if (*progress == EpochAssembler::Progress::kRoundCommitted) {
      // A pre-copy round: straight into the replica's RAM, which is no checkpoint until
      // epoch 1 commits. ACK(0) says it is applied: the primary paces rounds on it.
      (void)assembler->Apply({arena.data(), used});
      rounds.fetch_add(1);
      used = 0;
      fault = SendControl(control, wire::EncodeAck(0, control));
      if (!fault.ok()) {
        ending = Ending::kPeerLost;
        break;
      }
    } else if (*progress == EpochAssembler::Progress::kCommitted) {
      uint64_t epoch = assembler->open_epoch();
      // ACK first: the epoch is complete and verified in memory, and the primary's output
      // waits on this. Applying it can overlap with the ACK's flight.
      acked.store(epoch);
      fault = SendControl(control, wire::EncodeAck(epoch, control));
      auto dev = assembler->Apply({arena.data(), used});
      device.assign(dev.begin(), dev.end());
      applied.store(epoch);
      used = 0;
      if (role.get() == ReplicaState::kSyncing) {
        role.MoveTo(ReplicaState::kProtected,
                    "initial synchronization complete (epoch " + std::to_string(epoch) + ")");
      }
      if (!fault.ok()) {
        ending = Ending::kPeerLost;
        break;
      }
    }
    // No silence check here: after a long apply, LastHeardFrom() is stale until the next
    // Receive() reads what the primary sent meanwhile. Silence is judged only when a
    // Receive() waited and nothing came (above).
  }
  assembler->Discard();
  Teardown(fault, ending);
}

// Runs on the receive thread, after its loop.
void SecondaryReplica::Impl::Teardown(Status fault, Ending ending) {
  if (ending == Ending::kHandover && !stopping.load()) {
    // The channel stays open until the primary is told the outcome.
    role.MoveTo(ReplicaState::kPromoting, fault.message());
    TakeOver(handover_grant, fault.message(), /*handover=*/true, handover_timeline, "");
    return;
  }
  ch->Abort();
  heartbeat->Stop();
  if (ending == Ending::kGoodbye) {
    role.MoveTo(ReplicaState::kStopped, fault.message());
    return;
  }
  if (ending == Ending::kStopped || ending == Ending::kHandover || stopping.load()) {
    role.MoveTo(ReplicaState::kStopped,
                fault.ok() ? std::string("stopped by request")
                           : "stopped by request (while: " + fault.ToString() + ")");
    return;
  }
  if (ending == Ending::kRejected) {
    // The primary was sending a moment ago: it is alive, and it will be the one to ask the
    // witness. A secondary that took over now could be the only wrong copy.
    role.MoveTo(ReplicaState::kFailed, "rejected the primary's stream (" + fault.ToString() +
                                           "); not taking over from a live primary, which "
                                           "goes on alone; re-protect to resynchronize");
    return;
  }
  std::string reason = fault.ToString();
  if (applied.load() == 0) {
    role.MoveTo(ReplicaState::kFailed,
                reason +
                    "; the initial synchronization never completed, so there is no "
                    "checkpoint to resume from");
    return;
  }
  role.MoveTo(ReplicaState::kPromoting, reason);
  TakeoverTimeline timeline;
  // The grant is provisional (witness.h): if this side cannot finish the takeover, the
  // primary — should it be alive — takes the token back once the window lapses.
  auto decision = AskWitness(witness, opt, term, opt.grant_window);
  timeline.Mark("witness");
  const std::string lapsed =
      AwaitLostGrant(witness, opt, term, &decision, &timeline, [this] { return stopping.load(); });
  if (!decision.ok() || !decision->granted) {
    std::string why = decision.ok()
                          ? "the witness gave the token to " + decision->holder
                          : "the witness could not be asked (" + decision.status().ToString() + ")";
    role.MoveTo(ReplicaState::kFenced, why + ": not taking over");
    return;
  }
  TakeOver(*decision, reason, /*handover=*/false, timeline, lapsed);
}

void SecondaryReplica::Impl::TakeOver(const vip::WitnessDecision& decision,
                                      const std::string& reason, bool handover,
                                      TakeoverTimeline timeline, const std::string& lapsed) {
  const uint64_t epoch = applied.load();
  // A handing-over primary waits for the outcome; it is told once it is decided, before
  // anything of the guest leaves this host, and the channel ends with that. A failure
  // after the grant is no decline (the token may be ours): an ERROR, so the primary
  // handles it as a fault and the witness decides.
  auto tell_primary = [&](bool accepted, const std::string& why) {
    if (!handover) return;
    if (accepted) {
      ReplyHandover(handover_epoch, true, "");
    } else {
      SendError(*ch, "the handover failed after the witness granted the token: " + why);
    }
  };
  // The link ends once the primary has read the answer and closed its end (not before:
  // a link cut under it could make it take the answer for a fault), whatever way this
  // returns; heartbeats go on meanwhile.
  struct CloseLink {
    Impl& m;
    bool handover;
    ~CloseLink() {
      if (!handover) return;
      std::vector<uint8_t> sink(64 << 10);
      const auto deadline = SteadyClock::now() + m.opt.handover_timeout;
      while (!m.stopping.load() && SteadyClock::now() < deadline) {
        size_t n = 0;
        Status s = m.ch->Receive(sink, &n, std::chrono::milliseconds(100));
        if (!s.ok() && s.code() != Status::Code::kTimedOut) break;  // the primary closed
      }
      m.ch->Abort();
      m.heartbeat->Stop();
    }
  } close_link{*this, handover};
  const std::string unconfirmed =
      decision.confirmed ? "" : "; the token was never confirmed, so the primary may take it back";
  Status s = hv.LoadDeviceState(device);
  timeline.Mark("device state");
  if (!s.ok()) {
    const std::string why = "won the token but could not load the device state of epoch " +
                            std::to_string(epoch) + ": " + s.ToString() + unconfirmed;
    tell_primary(false, why);
    role.MoveTo(ReplicaState::kFailed, why);
    return;
  }
  // The last moment to find out whether the primary took the token back: nothing of the
  // guest has left this host yet. Asked even when the grant says it is confirmed (a
  // reclaimed token): one round trip on a failover, and safety never rests on that flag.
  auto confirm = [&]() {
    auto confirmed = ConfirmToken(witness, opt, decision.term);
    timeline.Mark("confirm");
    if (!confirmed.ok()) {
      const std::string why = "won the token (term " + std::to_string(decision.term) +
                              ") but could not confirm it (" + confirmed.status().ToString() +
                              "); the guest stays stopped" + unconfirmed;
      tell_primary(false, why);
      role.MoveTo(ReplicaState::kFailed, why);
      return false;
    }
    if (!confirmed->granted || !confirmed->confirmed) {
      const std::string why = "won the token (term " + std::to_string(decision.term) +
                              ") but did not confirm it within its window, and " +
                              confirmed->holder + " took it back (term " +
                              std::to_string(confirmed->term) + "): not taking over";
      tell_primary(false, why);
      role.MoveTo(ReplicaState::kFenced, why);
      return false;
    }
    return true;
  };
  // A grant that may date from a declined handover (AcceptHandover) may have no window
  // left: confirm it before fencing, so a primary that took it back is never fenced.
  const bool confirm_first = grant_may_be_stale && !handover;
  if (confirm_first && !confirm()) return;
  // A handing-over primary stopped its output for good itself: nothing to fence.
  s = handover ? Status::Ok() : FencePeer(opt, primary_host, &timeline);
  if (!s.ok()) {
    role.MoveTo(ReplicaState::kFailed, "won the token (term " + std::to_string(decision.term) +
                                           ") but " + s.ToString() + "; the guest stays stopped" +
                                           unconfirmed);
    return;
  }
  if (!confirm_first && !confirm()) return;
  tell_primary(true, "");
  std::string identity_note = ClaimIdentity(opt, &timeline);
  hv.SetOutputMode(OutputMode::kPassThrough);
  Status announced = hv.Announce();
  timeline.Mark("announce");
  s = hv.StartVcpus();
  timeline.Mark("vcpus");
  if (!s.ok()) {
    hv.SetOutputMode(OutputMode::kDropped);
    if (opt.release_identity) opt.release_identity();  // no guest runs here to answer for it
    role.MoveTo(ReplicaState::kFailed,
                "won the token but could not start the vCPUs: " + s.ToString());
    return;
  }
  role.MoveTo(ReplicaState::kActive,
              "took over from " + primary_host + " at epoch " + std::to_string(epoch) + " (term " +
                  std::to_string(decision.term) + ")" +
                  (handover ? " by a planned handover" : " after: " + reason) + lapsed +
                  (announced.ok() ? "" : "; announcing failed: " + announced.ToString()) +
                  (identity_note.empty() ? "" : "; " + identity_note) + " (" + timeline.ToString() +
                  ")");
}

SecondaryReplica::SecondaryReplica(Hypervisor& hv, vip::Witness& witness,
                                   ReplicationOptions options)
    : impl_(std::make_unique<Impl>(hv, witness, std::move(options))) {
  role_ = &impl_->role;
}

SecondaryReplica::~SecondaryReplica() { Stop(); }

Status SecondaryReplica::Start(std::unique_ptr<Channel> link) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lifecycle(m.lifecycle_mu);
  if (m.stopping.load()) return Status::Aborted("Stop() was called; make a new replica");
  if (m.role.get() != ReplicaState::kIdle) {
    return Status::FailedPrecondition("this replica was already started; make a new one");
  }
  std::vector<RamBlock> blocks = m.hv.RamBlocks();
  LOCKSTEP_RETURN_IF_ERROR(ValidateRamLayout(blocks));

  // Everything is allocated before the primary is answered, so nothing can fail between
  // our acceptance and the first epoch.
  std::vector<ReplicaBlock> replica;
  uint64_t pages = 0;
  for (const auto& b : blocks) {
    replica.push_back({b.host, b.length / wire::kPageSize});
    pages += b.length / wire::kPageSize;
  }
  // Room for the largest epoch (every page raw, the device state, four framing records)
  // plus one more message, which Receive() needs whole.
  const size_t largest_epoch = pages * (wire::kHeaderBytes + wire::kPageSize) +
                               m.opt.max_device_state_bytes + 8 * wire::kHeaderBytes + 64;
  const size_t largest_message =
      LargestEpochMessage(m.opt.max_device_state_bytes) + wire::kLinkTagBytes;
  std::string no_memory;
  try {
    m.arena = PageArena(largest_epoch + largest_message);
    m.device.reserve(m.opt.max_device_state_bytes);
    m.assembler = std::make_unique<EpochAssembler>(
        std::move(replica), 0, static_cast<uint32_t>(m.opt.max_device_state_bytes));
  } catch (const std::bad_alloc&) {
    no_memory = "this host cannot allocate the " +
                std::to_string((largest_epoch + largest_message) >> 20) +
                " MiB staging area the guest needs; free memory and try again";
  }

  if (!m.opt.pairing_key) {
    return Status::FailedPrecondition(
        "no pairing key: give both hosts the same key file (key_file=; docs/qemu-plugin.md)");
  }
  auto nonce = FreshNonce();
  if (!nonce.ok()) return nonce.status();
  // The secondary sends control records only (ACK, HEARTBEAT, GOODBYE_ACK, and an ERROR
  // whose reason is at most 64 KiB).
  auto sealed = SealedChannel::Create(std::move(link), m.opt.link_protection,
                                      (64 << 10) + 4 * wire::kHeaderBytes);
  if (!sealed.ok()) return sealed.status();
  std::unique_ptr<SealedChannel> channel = std::move(*sealed);
  std::vector<uint8_t> buf(1 << 20);
  wire::RecordView r;
  Status s = ReceiveRecord(*channel, buf, m.opt.handshake_timeout, &r);
  if (!s.ok()) return s.WithContext("waiting for the primary's HELLO");
  wire::Hello hello;
  wire::HelloReply reply;
  reply.host_id = m.opt.host_id;
  ProofContext proof;
  proof.hello_digest = HelloDigest(r.payload);  // before `buf` is reused
  s = wire::DecodeHello(r, &hello);
  if (!s.ok()) {
    reply.reason = s.message();
  } else if (!no_memory.empty()) {
    reply.reason = no_memory;
  } else if (hello.max_device_state_bytes > m.opt.max_device_state_bytes) {
    reply.reason = "the primary may send " + std::to_string(hello.max_device_state_bytes) +
                   " bytes of device state; this secondary takes at most " +
                   std::to_string(m.opt.max_device_state_bytes) +
                   "; configure the same limit on both hosts";
  } else if (hello.link_protection != static_cast<uint8_t>(m.opt.link_protection)) {
    reply.reason =
        std::string("the primary protects the stream with '") +
        wire::LinkProtectionName(static_cast<wire::LinkProtection>(hello.link_protection)) +
        "', this secondary is set for '" + wire::LinkProtectionName(m.opt.link_protection) +
        "'; set the same link_protection on both hosts";
  } else {
    reply.reason = RefusalReason(hello, m.opt, RamLayout(blocks));
  }
  reply.accepted = reply.reason.empty();
  reply.nonce = *nonce;
  proof.secondary_host = m.opt.host_id;
  proof.secondary_nonce = *nonce;
  if (reply.accepted) {
    auto mine = ComputeProof(*m.opt.pairing_key, ProofRole::kSecondary, proof);
    if (!mine.ok()) return mine.status();
    reply.proof = proof.secondary_proof = *mine;
  }
  auto rec = wire::EncodeHelloReply(reply);
  ConstSlice slice{rec.data(), rec.size()};
  Status sent = channel->Send({&slice, 1});
  if (!reply.accepted) {
    channel->Abort();
    if (!s.ok()) return s.WithContext("refused the primary's handshake");
    if (!no_memory.empty()) return Status::ResourceExhausted(no_memory);
    return Status::InvalidArgument("refused the primary's handshake: " + reply.reason);
  }
  LOCKSTEP_RETURN_IF_ERROR(sent.WithContext("answering HELLO"));
  // The primary proves it holds the pairing key before anything of the guest is taken.
  s = ReceiveRecord(*channel, buf, m.opt.handshake_timeout, &r);
  if (!s.ok()) return s.WithContext("waiting for the primary's AUTH");
  if (r.header.type == wire::RecordType::kError) {
    channel->Abort();
    return Status::PeerRejected("primary " + hello.host_id +
                                " ended the handshake: " + wire::DecodeReason(r));
  }
  wire::Proof primary_proof{};
  s = wire::DecodeAuth(r, &primary_proof);
  auto expected = ComputeProof(*m.opt.pairing_key, ProofRole::kPrimary, proof);
  if (!expected.ok()) return expected.status();
  if (!s.ok() || !ProofMatches(primary_proof, *expected)) {
    SendError(*channel,
              "the secondary refused the handshake: the primary's pairing-key proof is wrong; give "
              "both hosts the same key file");
    channel->Abort();
    return Status::PeerRejected(
        "primary " + hello.host_id +
        (s.ok() ? " did not prove it holds this host's pairing key (or the handshake was "
                  "altered on the way): give both hosts the same key file"
                : " sent no valid AUTH: " + s.message()));
  }

  auto keys = DeriveLinkKeys(*m.opt.pairing_key, hello.nonce, *nonce);
  if (!keys.ok()) return keys.status();
  LOCKSTEP_RETURN_IF_ERROR(channel->Seal(*keys, /*primary=*/false));

  m.term = hello.witness_term;
  m.primary_host = hello.host_id;
  m.sealed = channel.get();
  m.ch = std::move(channel);
  m.heartbeat = std::make_unique<Heartbeater>(
      *m.ch, m.opt.heartbeat_interval, [&m] { return m.acked.load(); },
      [&m](const Status& e) {
        std::lock_guard<std::mutex> lock(m.fault_mu);
        m.heartbeat_fault = e;
        m.heartbeat_failed.store(true);
      });
  m.role.MoveTo(ReplicaState::kSyncing,
                "paired with " + hello.host_id + ", term " + std::to_string(m.term));
  m.heartbeat->Start();
  m.receive_thread = std::thread([&m] { m.ReceiveLoop(); });
  return Status::Ok();
}

void SecondaryReplica::Stop() {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lifecycle(m.lifecycle_mu);
  m.stopping.store(true);
  if (m.receive_thread.joinable()) m.receive_thread.join();
  if (m.role.get() == ReplicaState::kIdle) m.role.MoveTo(ReplicaState::kStopped, "never started");
}

uint64_t SecondaryReplica::acked_epoch() const { return impl_->acked.load(); }
uint64_t SecondaryReplica::applied_epoch() const { return impl_->applied.load(); }

ReplicationStats SecondaryReplica::stats() const {
  ReplicationStats out;
  out.epochs = impl_->applied.load();
  out.acked_epoch = impl_->acked.load();
  out.current_epoch = impl_->applied.load();
  out.bytes = impl_->bytes.load();
  out.sync_rounds = impl_->rounds.load();
  return out;
}

}  // namespace lockstep
