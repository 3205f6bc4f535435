#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <new>
#include <thread>

#include "epoch_stager.h"
#include "lockstep/pairing_auth.h"
#include "lockstep/replicator.h"
#include "lockstep/sealed_channel.h"
#include "lockstep/wire_format.h"
#include "replica_common.h"

namespace lockstep {

using channel::Channel;
using channel::ConstSlice;

struct PrimaryReplicator::Impl {
  Impl(Hypervisor& h, vip::Witness& w, ReplicationOptions o)
      : hv(h), witness(w), opt(std::move(o)) {}

  void EpochLoop();
  // The live initial synchronization (wire_format.h): pre-copy rounds while the guest
  // runs, until one is small enough or stops shrinking. An error with `*local` set is this
  // host's (the checkpoint machinery), without it the link's.
  Status Precopy(bool* local);
  void AddStreamStats(const StreamStats& delta);
  void ControlLoop();
  // A planned switchover (RequestHandover), on the control thread: HANDOVER goes out once
  // the epoch to hand over is acknowledged; the secondary's answer; the end when accepted.
  void MaybeSendHandover();
  void HandleHandoverReply(const wire::RecordView& r);
  void FinishHandover();
  // Records the first fault; the control thread acts on it.
  void SignalFault(const Status& s);
  void HandleAck(uint64_t epoch);
  Status CheckAckProgress();
  void Teardown(bool orderly, std::string reason);
  // Ends protection on purpose: GOODBYE, then wait for GOODBYE_ACK. True if acknowledged.
  bool SayGoodbye(const std::string& reason);
  // Wakes the epoch thread and Teardown's wait; takes wake_mu so no wakeup is lost.
  void Wake();

  Hypervisor& hv;
  vip::Witness& witness;
  const ReplicationOptions opt;
  RoleState role{true, opt.on_transition};
  LatencyWindow pauses;
  LatencyWindow ack_latencies;  // end of pause to ACK, per acknowledged epoch after the first
  std::atomic<int64_t> initial_sync_pause_us{0};

  // Declared so that they are destroyed in the right order: the heartbeater uses the
  // channel; the channel must go before the memory registered with it.
  std::unique_ptr<EpochStager> stager;
  std::unique_ptr<EpochStreamer> streamer;
  std::unique_ptr<Channel> ch;
  std::unique_ptr<Heartbeater> heartbeat;
  uint64_t term = 0;
  std::string secondary_host;  // from the handshake; set before the threads start

  std::mutex lifecycle_mu;  // serializes Start() and Stop()

  std::thread epoch_thread;
  std::thread control_thread;
  std::atomic<bool> stopping{false};
  std::atomic<bool> epoch_thread_done{false};
  std::mutex wake_mu;
  std::condition_variable wake_cv;          // wakes the epoch thread early on stop or fault
  std::atomic<bool> output_pending{false};  // set by OutputPending(), cleared by a pause

  // A planned switchover: asked for; the epoch being handed over (set by the epoch thread
  // when it captures it: no epoch follows); HANDOVER sent (and when); the secondary's
  // answer (0 none yet, 1 accepted, -1 declined; the epoch thread resets a decline).
  std::atomic<bool> handover_requested{false};
  std::atomic<uint64_t> handover_epoch{0};
  std::atomic<bool> handover_sent{false};
  std::atomic<int64_t> handover_sent_ns{0};
  std::atomic<int> handover_answer{0};
  std::atomic<uint64_t> sync_rounds{0};
  std::atomic<uint64_t> rounds_acked{0};  // ACK(0)s: pre-copy rounds the secondary applied

  std::mutex fault_mu;
  std::string fault;  // GUARDED_BY(fault_mu); first fault seen
  std::atomic<bool> faulted{false};
  // A checkpoint failed on this host: end protection on purpose, the guest goes on.
  std::atomic<bool> local_failed{false};
  std::string local_reason;  // GUARDED_BY(fault_mu)

  std::atomic<uint64_t> captured{0};
  std::atomic<uint64_t> sent{0};
  std::atomic<uint64_t> acked{0};
  // End of pause of recent epochs, for the ack latency; indexed by epoch % size.
  std::array<std::atomic<int64_t>, 64> pause_end_ns{};

  mutable std::mutex stats_mu;
  StreamStats stream;  // GUARDED_BY(stats_mu) for readers; written by the epoch thread
};

void PrimaryReplicator::Impl::SignalFault(const Status& s) {
  {
    std::lock_guard<std::mutex> lock(fault_mu);
    if (faulted.load()) return;
    fault = s.ToString();
    faulted.store(true);
  }
  Wake();
}

void PrimaryReplicator::Impl::Wake() {
  { std::lock_guard<std::mutex> lock(wake_mu); }
  wake_cv.notify_all();
}

void PrimaryReplicator::Impl::AddStreamStats(const StreamStats& delta) {
  std::lock_guard<std::mutex> lock(stats_mu);
  stream.raw_pages += delta.raw_pages;
  stream.zero_pages += delta.zero_pages;
  stream.delta_pages += delta.delta_pages;
  stream.bytes += delta.bytes;
}

Status PrimaryReplicator::Impl::Precopy(bool* local) {
  uint64_t previous = 0;
  for (int round = 1; round <= opt.precopy_max_rounds; ++round) {
    if (stopping.load() || faulted.load()) return Status::Ok();
    const std::string what = "pre-copy round " + std::to_string(round);
    // A pause only long enough to take the dirty set; the copy runs with the guest.
    Status s = hv.StopVcpus();
    if (s.ok()) s = stager->TakeRound(hv, round == 1);
    Status start = hv.StartVcpus();
    if (!s.ok() || !start.ok()) {
      *local = true;
      return (!s.ok() ? s : start).WithContext(what);
    }
    const uint64_t pages = stager->page_count();
    stager->CopyRound();
    StreamStats delta;
    s = streamer->Send(*stager, *ch, &delta);
    if (!s.ok()) return s.WithContext("sending " + what);
    heartbeat->NoteSent();
    AddStreamStats(delta);
    sync_rounds.fetch_add(1);
    {
      // The next round (or epoch 1) only once the secondary applied this one: epoch 1's
      // ACK — which the guest's output waits for — must not queue behind a backlog of
      // rounds (the first one is all of RAM, first-touched at the secondary).
      std::unique_lock<std::mutex> lock(wake_mu);
      wake_cv.wait(lock, [&] {
        return stopping.load() || faulted.load() || rounds_acked.load() >= sync_rounds.load();
      });
    }
    // Small enough for one pause, or no longer shrinking by a tenth (the guest dirties as
    // fast as the link carries): epoch 1 takes the rest.
    if (round > 1 && (pages <= opt.precopy_target_pages || pages * 10 > previous * 9)) break;
    previous = pages;
  }
  return Status::Ok();
}

void PrimaryReplicator::Impl::EpochLoop() {
  uint64_t epoch = 1;
  Status s = hv.StartDirtyLog();
  bool local = !s.ok();
  if (s.ok()) s = Precopy(&local);
  while (s.ok() && !stopping.load() && !faulted.load()) {
    auto t0 = SteadyClock::now();
    // Without pre-copy rounds, epoch 1 carries every page.
    const bool full = epoch == 1 && sync_rounds.load() == 0;
    // The last epoch before a planned switchover: none follows until the secondary answers.
    const bool last = handover_requested.load();
    s = hv.StopVcpus();
    if (!s.ok()) {
      (void)hv.StartVcpus();  // undo a partial stop: the guest must not stay frozen
      s = s.WithContext("stopping the vCPUs for epoch " + std::to_string(epoch));
      local = true;
      break;
    }
    s = stager->Capture(hv, epoch, full);
    if (s.ok()) {
      if (epoch == 1) hv.SetOutputMode(OutputMode::kBuffered);
      hv.CloseOutputBarrier(epoch);
      // What the guest sends after this pause belongs to the next epoch: its own notice.
      output_pending.store(false);
    }
    Status start = hv.StartVcpus();
    auto t1 = SteadyClock::now();
    if (!s.ok() || !start.ok()) {
      s = (!s.ok() ? s : start).WithContext("checkpoint of epoch " + std::to_string(epoch));
      local = true;
      break;
    }
    // The initial synchronization's pause is a different animal from an epoch's: kept apart.
    if (epoch == 1)
      initial_sync_pause_us.store(std::chrono::duration_cast<Micros>(t1 - t0).count());
    else
      pauses.Add(std::chrono::duration_cast<Micros>(t1 - t0));
    pause_end_ns[epoch % pause_end_ns.size()].store(t1.time_since_epoch().count());
    captured.store(epoch);
    if (last) handover_epoch.store(epoch);  // before it is sent: its ACK may come at once

    StreamStats delta;
    s = streamer->Send(*stager, *ch, &delta);
    if (!s.ok()) {
      s = s.WithContext("sending epoch " + std::to_string(epoch));
      break;
    }
    heartbeat->NoteSent();
    sent.store(epoch);
    AddStreamStats(delta);
    ++epoch;
    std::unique_lock<std::mutex> lock(wake_mu);
    auto ended = [&] { return stopping.load() || faulted.load(); };
    if (last) {
      // The control thread sends HANDOVER once this epoch is acknowledged; the guest runs
      // on meanwhile, its output held (and dropped if the secondary takes over).
      wake_cv.wait(lock, [&] { return ended() || handover_answer.load() != 0; });
      if (handover_answer.load() == 1) break;
      if (handover_answer.load() == -1) {
        // Declined (the control thread cleared the epoch and the sent mark already).
        handover_answer.store(0);
        handover_requested.store(false);
        continue;  // the next epoch at once
      }
      continue;  // stopping or a fault: the loop ends
    }
    // The next pause: at the interval, or earlier once output is pending (not before the
    // spacing) or a handover is asked for; the previous epoch has been sent by now, so
    // pauses never queue up.
    const bool early =
        opt.output_epoch_spacing.count() > 0 && opt.output_epoch_spacing < opt.epoch_interval;
    auto urgent = [&] { return ended() || handover_requested.load(); };
    if (early) {
      wake_cv.wait_until(lock, t0 + opt.output_epoch_spacing, urgent);
      wake_cv.wait_until(lock, t0 + opt.epoch_interval,
                         [&] { return urgent() || output_pending.load(); });
    } else {
      wake_cv.wait_until(lock, t0 + opt.epoch_interval, urgent);
    }
  }
  if (!s.ok() && local) {
    // This host's problem, not the link's: the secondary must not take over.
    {
      std::lock_guard<std::mutex> lock(fault_mu);
      local_reason = s.ToString();
    }
    local_failed.store(true);
  } else if (!s.ok()) {
    SignalFault(s);
  }
  epoch_thread_done.store(true);
  Wake();
}

void PrimaryReplicator::Impl::HandleAck(uint64_t epoch) {
  // An ACK for an epoch never sent would release output whose cause the secondary lacks.
  if (epoch > captured.load()) {
    SignalFault(Status::Corruption("the secondary acknowledged epoch " + std::to_string(epoch) +
                                   ", beyond the last epoch captured (" +
                                   std::to_string(captured.load()) + ")"));
    return;
  }
  uint64_t prev = acked.load();
  if (epoch <= prev) return;
  acked.store(epoch);
  hv.ReleaseOutput(epoch);
  int64_t end = pause_end_ns[epoch % pause_end_ns.size()].load();
  int64_t now = SteadyClock::now().time_since_epoch().count();
  // Only an ACK for one epoch measures it; a cumulative ACK would blur several.
  if (end != 0 && now > end && epoch == prev + 1 && epoch > 1) {
    ack_latencies.Add(std::chrono::duration_cast<Micros>(std::chrono::nanoseconds(now - end)));
  }
  if (role.get() == ReplicaState::kSyncing) {
    char pause[32];
    std::snprintf(pause, sizeof pause, "%.1f", initial_sync_pause_us.load() / 1000.0);
    role.MoveTo(ReplicaState::kProtected,
                "initial synchronization done (" + std::to_string(sync_rounds.load()) +
                    " pre-copy rounds, then epoch 1 paused the guest " + pause + " ms)");
  }
}

// Heartbeats show the secondary's process runs, not that it takes epochs: one that stops
// acknowledging (stuck applying, out of memory, a bug) would hold the guest's output for
// ever. Once protected, an epoch unacknowledged for `ack_timeout` after its pause is a
// fault like a lost peer. Runs on the control thread.
Status PrimaryReplicator::Impl::CheckAckProgress() {
  if (role.get() != ReplicaState::kProtected) return Status::Ok();
  const uint64_t a = acked.load(), c = captured.load();
  if (c <= a) return Status::Ok();
  // The oldest unacknowledged epoch's pause end (a later epoch's, if the ring moved on:
  // later, never a false alarm).
  const int64_t end = pause_end_ns[(a + 1) % pause_end_ns.size()].load();
  const int64_t now = SteadyClock::now().time_since_epoch().count();
  const auto waited = std::chrono::nanoseconds(now - end);
  if (end == 0 || waited < opt.ack_timeout) return Status::Ok();
  char ms[32];
  std::snprintf(ms, sizeof ms, "%.0f", std::chrono::duration<double, std::milli>(waited).count());
  return Status::PeerLost("the secondary acknowledged nothing for " + std::string(ms) +
                          " ms (epochs " + std::to_string(a + 1) + ".." + std::to_string(c) +
                          " outstanding) although its heartbeats arrive: it is alive but not "
                          "making progress");
}

void PrimaryReplicator::Impl::ControlLoop() {
  // Room for the largest record the secondary sends (an ERROR with a 64 KiB reason).
  std::vector<uint8_t> buf(128 << 10);
  // Why the secondary said it left (an ERROR record), even if a failed send on another
  // thread signalled the fault first: the ERROR is the cause, the failed send its echo.
  std::string reported;
  while (!stopping.load() && !faulted.load() && !local_failed.load() &&
         handover_answer.load() != 1) {
    size_t n = 0;
    Status s = ch->Receive(buf, &n, opt.heartbeat_interval);
    if (s.ok()) {
      wire::RecordReader reader({buf.data(), n});
      while (s.ok() && !reader.done()) {
        wire::RecordView r;
        s = reader.Next(&r);
        if (!s.ok()) break;
        switch (r.header.type) {
          case wire::RecordType::kAck:
            if (r.header.epoch == 0) {  // a pre-copy round applied
              rounds_acked.fetch_add(1);
              Wake();
            } else {
              HandleAck(r.header.epoch);
            }
            break;
          case wire::RecordType::kHeartbeat:
            break;
          case wire::RecordType::kHandoverReply:
            HandleHandoverReply(r);
            break;
          case wire::RecordType::kError:
            s = Status::Corruption("the secondary reported: " + wire::DecodeReason(r));
            reported = s.WithContext("from the secondary").ToString();
            break;
          default:
            s = Status::Corruption("unexpected " +
                                   wire::RecordTypeName(static_cast<uint16_t>(r.header.type)) +
                                   " record from the secondary");
        }
      }
      if (!s.ok()) SignalFault(s.WithContext("from the secondary"));
      if (s.ok()) {
        Status progress = CheckAckProgress();
        if (!progress.ok()) SignalFault(progress);
        if (!faulted.load()) MaybeSendHandover();
      }
    } else if (s.code() != Status::Code::kTimedOut) {
      if (!stopping.load()) SignalFault(s);
    } else {
      // Judged only after a Receive() that waited for nothing: LastHeardFrom() advances
      // when bytes are read, not when they arrive.
      Status silence =
          CheckPeerSilence(*ch,
                           // ACK(1) comes before the secondary applies epoch 1 (its
                           // first touch of the guest's memory): the longer threshold
                           // holds until ACK(2).
                           role.get() == ReplicaState::kSyncing || acked.load() < 2
                               ? std::max(opt.peer_loss_threshold, opt.sync_loss_threshold)
                               : opt.peer_loss_threshold,
                           "secondary");
      if (!silence.ok()) SignalFault(silence);
      Status progress = CheckAckProgress();
      if (!progress.ok()) SignalFault(progress);
      if (!faulted.load()) MaybeSendHandover();
    }
  }
  // The ERROR may still be unread when another thread's failed send ended the loop — or
  // the acceptance of a handover, followed at once by the secondary's end of the link.
  bool accepted_late = false;
  for (int i = 0; i < 64 && faulted.load() && reported.empty() && !accepted_late; ++i) {
    size_t n = 0;
    if (!ch->Receive(buf, &n, Micros(0)).ok()) break;
    wire::RecordReader reader({buf.data(), n});
    wire::RecordView r;
    while (!reader.done() && reader.Next(&r).ok()) {
      if (r.header.type == wire::RecordType::kError) {
        reported = Status::Corruption("the secondary reported: " + wire::DecodeReason(r))
                       .WithContext("from the secondary")
                       .ToString();
        break;
      }
      if (r.header.type == wire::RecordType::kHandoverReply && handover_sent.load() &&
          r.header.epoch == handover_epoch.load() && (r.header.flags & wire::kFlagAccepted)) {
        accepted_late = true;
        break;
      }
    }
  }
  if (handover_answer.load() == 1 || accepted_late) {
    // The secondary holds the confirmed token and runs the guest from the epoch handed
    // over: whatever failed on the link since, this copy is done.
    FinishHandover();
    return;
  }
  bool orderly;
  std::string reason;
  {
    // One consistent reading: a fault that lands from here on is not acted on separately.
    std::lock_guard<std::mutex> lock(fault_mu);
    if (!reported.empty() && fault.find("the secondary reported") == std::string::npos) {
      fault = reported + " (then: " + fault + ")";
    }
    if (faulted.load()) {
      orderly = false;
      reason = fault;
    } else {
      orderly = true;
      reason = local_failed.load() ? "protection ended: " + local_reason
                                   : std::string("protection stopped by request");
    }
  }
  Teardown(orderly, reason);
}

void PrimaryReplicator::Impl::MaybeSendHandover() {
  const uint64_t epoch = handover_epoch.load();
  if (epoch == 0 || acked.load() < epoch) return;
  if (handover_sent.load()) {
    // Accepted or declined, the secondary answers at once after asking the witness; one
    // that does neither is a fault, and the witness decides who goes on.
    const auto waited = std::chrono::nanoseconds(SteadyClock::now().time_since_epoch().count() -
                                                 handover_sent_ns.load());
    if (handover_answer.load() == 0 && waited > opt.handover_timeout) {
      SignalFault(
          Status::PeerLost("the secondary neither took over nor declined the handover of epoch " +
                           std::to_string(epoch) + " within " +
                           std::to_string(opt.handover_timeout.count()) + " ms"));
    }
    return;
  }
  // Every packet of the epoch is released now. Until the secondary answers, this host does
  // not answer for the VM's address: the other one is about to.
  if (opt.release_identity) opt.release_identity();
  uint8_t rec[wire::kControlRecordBytes];
  ConstSlice slice{rec, wire::EncodeHandover(epoch, rec)};
  handover_sent_ns.store(SteadyClock::now().time_since_epoch().count());
  handover_sent.store(true);
  Status s = ch->Send({&slice, 1});
  if (!s.ok()) SignalFault(s.WithContext("sending HANDOVER"));
}

void PrimaryReplicator::Impl::HandleHandoverReply(const wire::RecordView& r) {
  const uint64_t epoch = handover_epoch.load();
  if (!handover_sent.load() || r.header.epoch != epoch) {
    SignalFault(Status::Corruption("a HANDOVER_REPLY for epoch " + std::to_string(r.header.epoch) +
                                   ", which was not handed over"));
    return;
  }
  if (r.header.flags & wire::kFlagAccepted) {
    handover_answer.store(1);
    Wake();
    return;
  }
  std::string note;
  if (opt.claim_identity) {
    Status claimed = opt.claim_identity();
    if (!claimed.ok()) note = "; claiming the identity back failed: " + claimed.ToString();
  }
  role.MoveTo(ReplicaState::kProtected, "the secondary declined the handover of epoch " +
                                            std::to_string(epoch) + ": " + wire::DecodeReason(r) +
                                            "; protection goes on" + note);
  // Cleared here, on the thread that sends HANDOVER, so it is never sent twice.
  handover_epoch.store(0);
  handover_sent.store(false);
  handover_answer.store(-1);
  Wake();
}

void PrimaryReplicator::Impl::FinishHandover() {
  const uint64_t epoch = handover_epoch.load();
  const auto took = std::chrono::nanoseconds(SteadyClock::now().time_since_epoch().count() -
                                             handover_sent_ns.load());
  Wake();
  if (epoch_thread.joinable()) epoch_thread.join();
  ch->Abort();
  heartbeat->Stop();
  (void)hv.StopDirtyLog();
  // The secondary holds the confirmed token and resumes from `epoch`: what this copy ran
  // since never leaves the host.
  (void)hv.Halt();
  hv.SetOutputMode(OutputMode::kDropped);
  char ms[32];
  std::snprintf(ms, sizeof ms, "%.2f", std::chrono::duration<double, std::milli>(took).count());
  role.MoveTo(ReplicaState::kHandedOver,
              "handed the guest over to " + secondary_host + " at epoch " + std::to_string(epoch) +
                  " (a planned switchover; " + ms +
                  " ms from HANDOVER to its acceptance): it runs the guest now; this copy is "
                  "stopped and what it sent after that epoch dropped");
}

bool PrimaryReplicator::Impl::SayGoodbye(const std::string& reason) {
  auto bye = wire::EncodeReasonRecord(wire::RecordType::kGoodbye, reason);
  ConstSlice slice{bye.data(), bye.size()};
  if (!ch->Send({&slice, 1}).ok()) return false;
  // Acks and heartbeats may still be ahead of the GOODBYE_ACK; read past them.
  std::vector<uint8_t> buf(128 << 10);
  auto deadline = SteadyClock::now() + std::max<std::chrono::microseconds>(
                                           4 * opt.peer_loss_threshold, std::chrono::seconds(1));
  while (SteadyClock::now() < deadline) {
    size_t n = 0;
    Status s = ch->Receive(buf, &n, opt.heartbeat_interval);
    if (s.code() == Status::Code::kTimedOut) continue;
    if (!s.ok()) return false;
    wire::RecordReader reader({buf.data(), n});
    wire::RecordView r;
    while (!reader.done()) {
      if (!reader.Next(&r).ok()) return false;
      if (r.header.type == wire::RecordType::kGoodbyeAck) return true;
      if (r.header.type == wire::RecordType::kAck) HandleAck(r.header.epoch);
    }
  }
  return false;
}

// Runs on the control thread only, so the workers are joined by one owner.
void PrimaryReplicator::Impl::Teardown(bool orderly, std::string reason) {
  Wake();
  if (orderly) {
    // Let the epoch in flight finish so the GOODBYE lands between epochs; a peer that stops
    // reading cannot hold us here for long.
    std::unique_lock<std::mutex> lock(wake_mu);
    wake_cv.wait_for(lock, std::chrono::seconds(2), [&] { return epoch_thread_done.load(); });
  }
  // Held output may go out unprotected only once the secondary has promised not to take
  // over (GOODBYE_ACK). Without that promise — the epoch thread is stuck, the GOODBYE or
  // its ACK is lost, the secondary already left — this is a fault like any other.
  if (orderly && !(epoch_thread_done.load() && SayGoodbye(reason))) {
    orderly = false;
    reason += "; the secondary did not acknowledge the end of protection";
  }
  ch->Abort();
  if (epoch_thread.joinable()) epoch_thread.join();
  heartbeat->Stop();
  (void)hv.StopDirtyLog();

  if (orderly) {
    // A handover in flight gave the identity up; the guest goes on here after all.
    if (handover_sent.load() && opt.claim_identity) (void)opt.claim_identity();
    hv.SetOutputMode(OutputMode::kPassThrough);
    role.MoveTo(ReplicaState::kStopped, reason);
    return;
  }
  // A fault: only the witness may let this replica go on releasing output. Until it has
  // decided, this host stops answering for the VM's VIP too, so a client that asks for it
  // meanwhile cannot learn this host just as the other one takes over; it is claimed back
  // (with a gratuitous ARP) if the token stays here.
  if (opt.release_identity) opt.release_identity();
  TakeoverTimeline timeline;
  // Nothing stands between a primary's grant and its release of output: confirmed at once.
  auto decision = AskWitness(witness, opt, term, std::chrono::milliseconds(0));
  timeline.Mark("witness");
  // If the secondary won but has yet to confirm, output stays held (the guest runs on)
  // until it does, or its window lapses and the token comes back here.
  const std::string lapsed =
      AwaitLostGrant(witness, opt, term, &decision, &timeline, [this] { return stopping.load(); });
  if (decision.ok() && decision->granted && decision->confirmed) {
    std::string identity_note = ClaimIdentity(opt, &timeline);
    hv.SetOutputMode(OutputMode::kPassThrough);  // no other replica can ever contradict it
    role.MoveTo(ReplicaState::kPrimaryAlone,
                reason + lapsed + "; the witness kept this host active (term " +
                    std::to_string(decision->term) + "): running UNPROTECTED" +
                    (identity_note.empty() ? "" : "; " + identity_note) + " (" +
                    timeline.ToString() + ")");
    return;
  }
  const std::string why =
      decision.ok() ? "the witness gave the token to " + decision->holder +
                          (decision->confirmed ? ""
                                               : " (not confirmed yet when this host stopped "
                                                 "waiting for its window to lapse)")
                    : "the witness could not be asked (" + decision.status().ToString() + ")";
  (void)hv.Halt();
  hv.SetOutputMode(OutputMode::kDropped);
  role.MoveTo(ReplicaState::kFenced,
              reason + "; " + why + ": fenced, guest stopped, output dropped");
}

PrimaryReplicator::PrimaryReplicator(Hypervisor& hv, vip::Witness& witness,
                                     ReplicationOptions options)
    : impl_(std::make_unique<Impl>(hv, witness, std::move(options))) {
  role_ = &impl_->role;
}

PrimaryReplicator::~PrimaryReplicator() { Stop(); }

Status PrimaryReplicator::Start(std::unique_ptr<Channel> link) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lifecycle(m.lifecycle_mu);
  if (m.stopping.load()) return Status::Aborted("Stop() was called; make a new replicator");
  if (m.role.get() != ReplicaState::kIdle) {
    return Status::FailedPrecondition("this replicator was already started; make a new one");
  }
  std::vector<RamBlock> blocks = m.hv.RamBlocks();
  LOCKSTEP_RETURN_IF_ERROR(ValidateRamLayout(blocks));
  // Everything the epochs need is allocated and registered before the secondary is asked,
  // so nothing can fail between its acceptance and the first epoch.
  try {
    m.stager = std::make_unique<EpochStager>(blocks, m.opt.max_device_state_bytes);
    m.streamer = std::make_unique<EpochStreamer>(blocks, m.opt.delta_encoding);
  } catch (const std::bad_alloc&) {
    return Status::ResourceExhausted(
        "cannot allocate the staging memory for this guest (about twice its RAM with deltas "
        "on); free memory or turn delta encoding off");
  }
  auto sealed = SealedChannel::Create(std::move(link), m.opt.link_protection,
                                      LargestEpochMessage(m.opt.max_device_state_bytes));
  if (!sealed.ok()) return sealed.status();
  std::unique_ptr<SealedChannel> channel = std::move(*sealed);
  LOCKSTEP_RETURN_IF_ERROR(
      m.streamer->Register(*channel, *m.stager).WithContext("registering staging memory"));
  if (!m.opt.pairing_key) {
    return Status::FailedPrecondition(
        "no pairing key: give both hosts the same key file (key_file=; docs/qemu-plugin.md)");
  }
  auto nonce = FreshNonce();
  if (!nonce.ok()) return nonce.status();
  Result<uint64_t> term = m.witness.Register(m.opt.vm_id, m.opt.host_id);
  if (!term.ok()) return term.status().WithContext("registering with the witness");

  wire::Hello hello;
  hello.pairing_id = m.opt.pairing_id;
  hello.witness_term = *term;
  hello.max_device_state_bytes = static_cast<uint32_t>(m.opt.max_device_state_bytes);
  hello.vm_id = m.opt.vm_id;
  hello.host_id = m.opt.host_id;
  hello.blocks = RamLayout(blocks);
  hello.nonce = *nonce;
  hello.link_protection = static_cast<uint8_t>(m.opt.link_protection);
  auto rec = wire::EncodeHello(hello);
  ConstSlice slice{rec.data(), rec.size()};
  LOCKSTEP_RETURN_IF_ERROR(channel->Send({&slice, 1}).WithContext("sending HELLO"));
  std::vector<uint8_t> buf(128 << 10);
  wire::RecordView r;
  Status s = ReceiveRecord(*channel, buf, m.opt.handshake_timeout, &r);
  if (!s.ok()) return s.WithContext("waiting for the secondary's HELLO_REPLY");
  wire::HelloReply reply;
  LOCKSTEP_RETURN_IF_ERROR(wire::DecodeHelloReply(r, &reply));
  if (!reply.accepted) {
    return Status::PeerRejected("secondary " + reply.host_id + " refused protection of " +
                                m.opt.vm_id + ": " + reply.reason);
  }
  // The secondary proves it holds the pairing key and saw our HELLO unchanged; then we do.
  ProofContext proof;
  proof.hello_digest =
      HelloDigest({rec.data() + wire::kHeaderBytes, rec.size() - wire::kHeaderBytes});
  proof.secondary_host = reply.host_id;
  proof.secondary_nonce = reply.nonce;
  proof.secondary_proof = reply.proof;
  auto expected = ComputeProof(*m.opt.pairing_key, ProofRole::kSecondary, proof);
  if (!expected.ok()) return expected.status();
  if (!ProofMatches(reply.proof, *expected)) {
    std::string why = "secondary " + reply.host_id +
                      " did not prove it holds this host's pairing key (or the handshake was "
                      "altered on the way): give both hosts the same key file";
    SendError(*channel,
              "the primary refused the handshake: the secondary's "
              "pairing-key proof is wrong; give both hosts the same "
              "key file");
    channel->Abort();
    return Status::PeerRejected(why);
  }
  auto mine = ComputeProof(*m.opt.pairing_key, ProofRole::kPrimary, proof);
  if (!mine.ok()) return mine.status();
  auto auth = wire::EncodeAuth(*mine);
  ConstSlice auth_slice{auth.data(), auth.size()};
  LOCKSTEP_RETURN_IF_ERROR(channel->Send({&auth_slice, 1}).WithContext("sending AUTH"));
  auto keys = DeriveLinkKeys(*m.opt.pairing_key, *nonce, reply.nonce);
  if (!keys.ok()) return keys.status();
  LOCKSTEP_RETURN_IF_ERROR(channel->Seal(*keys, /*primary=*/true));

  m.term = *term;
  m.secondary_host = reply.host_id;
  m.ch = std::move(channel);
  m.heartbeat = std::make_unique<Heartbeater>(
      *m.ch, m.opt.heartbeat_interval, [&m] { return m.sent.load(); },
      [&m](const Status& e) { m.SignalFault(e); });
  m.role.MoveTo(ReplicaState::kSyncing,
                "paired with " + reply.host_id + ", term " + std::to_string(m.term));
  m.heartbeat->Start();
  m.epoch_thread = std::thread([&m] { m.EpochLoop(); });
  m.control_thread = std::thread([&m] { m.ControlLoop(); });
  return Status::Ok();
}

void PrimaryReplicator::Stop() {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lifecycle(m.lifecycle_mu);
  m.stopping.store(true);
  m.Wake();
  if (m.control_thread.joinable()) m.control_thread.join();
  if (m.role.get() == ReplicaState::kIdle) m.role.MoveTo(ReplicaState::kStopped, "never started");
}

void PrimaryReplicator::ClearLatencyWindows() {
  impl_->pauses.Clear();
  impl_->ack_latencies.Clear();
}

Status PrimaryReplicator::RequestHandover() {
  Impl& m = *impl_;
  const ReplicaState state = m.role.get();
  if (state != ReplicaState::kProtected || m.stopping.load()) {
    return Status::FailedPrecondition(
        "VM " + m.opt.vm_id + " is " + ReplicaStateName(state) +
        " here, not PROTECTED: a handover needs a secondary that holds a complete epoch");
  }
  if (m.handover_requested.exchange(true)) {
    return Status::FailedPrecondition("a handover of VM " + m.opt.vm_id + " is already under way");
  }
  m.Wake();
  return Status::Ok();
}

void PrimaryReplicator::OutputPending() {
  Impl& m = *impl_;
  if (m.output_pending.exchange(true)) return;  // already noticed for this epoch
  m.Wake();
}

ReplicationStats PrimaryReplicator::stats() const {
  const Impl& m = *impl_;
  ReplicationStats out;
  out.epochs = m.sent.load();
  out.acked_epoch = m.acked.load();
  out.current_epoch = m.captured.load();
  {
    std::lock_guard<std::mutex> lock(m.stats_mu);
    out.bytes = m.stream.bytes;
    out.raw_pages = m.stream.raw_pages;
    out.zero_pages = m.stream.zero_pages;
    out.delta_pages = m.stream.delta_pages;
  }
  auto pause = m.pauses.Summarize();
  out.last_pause = pause.last;
  out.pause_p50 = pause.p50;
  out.pause_p99 = pause.p99;
  out.pause_max = pause.max;
  auto ack = m.ack_latencies.Summarize();
  out.ack_latency_p50 = ack.p50;
  out.ack_latency_p99 = ack.p99;
  out.initial_sync_pause = Micros(m.initial_sync_pause_us.load());
  out.sync_rounds = m.sync_rounds.load();
  return out;
}

}  // namespace lockstep
