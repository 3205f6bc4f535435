#include "replica_common.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>

#include "epoch_stager.h"
#include "lockstep/wire_format.h"

namespace lockstep {

const char* ReplicaStateName(ReplicaState s) {
  switch (s) {
    case ReplicaState::kIdle:
      return "IDLE";
    case ReplicaState::kSyncing:
      return "SYNCING";
    case ReplicaState::kProtected:
      return "PROTECTED";
    case ReplicaState::kPrimaryAlone:
      return "PRIMARY_ALONE";
    case ReplicaState::kPromoting:
      return "PROMOTING";
    case ReplicaState::kActive:
      return "ACTIVE";
    case ReplicaState::kFenced:
      return "FENCED";
    case ReplicaState::kStopped:
      return "STOPPED";
    case ReplicaState::kHandedOver:
      return "HANDED_OVER";
    case ReplicaState::kFailed:
      return "FAILED";
  }
  return "?";
}

void TakeoverTimeline::Mark(const char* step) {
  auto now = SteadyClock::now();
  char buf[64];
  std::snprintf(buf, sizeof buf, "%s%s %.2f ms", text_.empty() ? "" : ", ", step,
                std::chrono::duration<double, std::milli>(now - last_).count());
  text_ += buf;
  last_ = now;
}

void SendError(channel::Channel& channel, std::string_view reason) {
  auto error = wire::EncodeReasonRecord(wire::RecordType::kError, reason);
  channel::ConstSlice slice{error.data(), error.size()};
  (void)channel.Send({&slice, 1});
}

namespace {

// Calls `ask` until it answers or fails with an error that is not transient, at most
// kWitnessAttempts times, kWitnessRetryGap apart.
template <typename Ask>
Result<vip::WitnessDecision> WithRetries(const Ask& ask) {
  Result<vip::WitnessDecision> decision = ask();
  for (int attempt = 1; attempt < kWitnessAttempts && !decision.ok(); ++attempt) {
    const Status::Code code = decision.status().code();
    if (code != Status::Code::kTimedOut && code != Status::Code::kIoError &&
        code != Status::Code::kPeerLost) {
      break;
    }
    std::this_thread::sleep_for(kWitnessRetryGap);
    decision = ask();
  }
  return decision;
}

}  // namespace

Result<vip::WitnessDecision> AskWitness(vip::Witness& witness, const ReplicationOptions& opt,
                                        uint64_t term, std::chrono::milliseconds confirm_within) {
  return WithRetries(
      [&] { return witness.RequestActive(opt.vm_id, opt.host_id, term, confirm_within); });
}

Result<vip::WitnessDecision> ConfirmToken(vip::Witness& witness, const ReplicationOptions& opt,
                                          uint64_t term) {
  return WithRetries([&] { return witness.Confirm(opt.vm_id, opt.host_id, term); });
}

bool LostToProvisionalGrant(const vip::WitnessDecision& denied, uint64_t term) {
  return !denied.granted && !denied.confirmed && denied.term == term + 1;
}

Result<vip::WitnessDecision> AwaitGrantWindow(vip::Witness& witness, const ReplicationOptions& opt,
                                              const vip::WitnessDecision& denied,
                                              const std::function<bool()>& stop) {
  const auto give_up =
      SteadyClock::now() + std::max(opt.grant_window, kReclaimPatience) + kReclaimSlack;
  Result<vip::WitnessDecision> last = denied;
  for (;;) {
    std::this_thread::sleep_for(kReclaimPoll);
    if (stop() || SteadyClock::now() >= give_up) return last;
    last = witness.Reclaim(opt.vm_id, opt.host_id, denied.term);
    if (!last.ok()) {
      const Status::Code code = last.status().code();
      if (code == Status::Code::kTimedOut || code == Status::Code::kIoError ||
          code == Status::Code::kPeerLost) {
        continue;  // transient; a reclaim is safe to ask again (the retry rule)
      }
      return last;
    }
    if (last->confirmed || last->term != denied.term) return last;
  }
}

std::string AwaitLostGrant(vip::Witness& witness, const ReplicationOptions& opt, uint64_t term,
                           Result<vip::WitnessDecision>* decision, TakeoverTimeline* timeline,
                           const std::function<bool()>& stop) {
  if (!decision->ok() || !LostToProvisionalGrant(**decision, term)) return "";
  const std::string winner = (*decision)->holder;
  *decision = AwaitGrantWindow(witness, opt, **decision, stop);
  timeline->Mark("grant window");
  if (decision->ok() && (*decision)->granted && (*decision)->confirmed) {
    return "; " + winner + " won the token but never confirmed it: taken back";
  }
  return "";
}

Status FencePeer(const ReplicationOptions& opt, const std::string& peer_host,
                 TakeoverTimeline* timeline) {
  if (!opt.fence_peer) return Status::Ok();
  Status fenced = opt.fence_peer(peer_host);
  timeline->Mark("fence");
  if (fenced.ok()) return fenced;
  return Status::FailedPrecondition("fencing " + (peer_host.empty() ? "the peer" : peer_host) +
                                    " failed (" + fenced.ToString() +
                                    "); a configured fence must succeed before a takeover");
}

std::string ClaimIdentity(const ReplicationOptions& opt, TakeoverTimeline* timeline) {
  if (!opt.claim_identity) return "";
  Status claimed = opt.claim_identity();
  timeline->Mark("identity");
  return claimed.ok() ? "" : "claiming the identity failed: " + claimed.ToString();
}

bool IsSettled(ReplicaState s) {
  return s != ReplicaState::kIdle && s != ReplicaState::kSyncing && s != ReplicaState::kProtected &&
         s != ReplicaState::kPromoting;
}

ReplicaState Replica::state() const { return role_->get(); }

bool Replica::WaitForState(ReplicaState s, std::chrono::milliseconds timeout) const {
  return role_->WaitUntil([s](ReplicaState cur) { return cur == s; }, timeout);
}

bool Replica::WaitForFaultHandled(std::chrono::milliseconds timeout) const {
  return role_->WaitUntil(IsSettled, timeout);
}

std::vector<Transition> Replica::transitions() const { return role_->log(); }

std::string Replica::fault_reason() const { return role_->end_reason(); }

bool RoleState::Allowed(ReplicaState from, ReplicaState to) const {
  using S = ReplicaState;
  if (from == S::kIdle) return to == S::kSyncing || to == S::kStopped;
  if (primary_) {
    switch (from) {
      case S::kSyncing:
        return to == S::kProtected || to == S::kPrimaryAlone || to == S::kFenced ||
               to == S::kStopped;
      case S::kProtected:
        // PROTECTED again: a handover the secondary declined (noted in the log).
        return to == S::kPrimaryAlone || to == S::kFenced || to == S::kStopped ||
               to == S::kHandedOver || to == S::kProtected;
      case S::kPrimaryAlone:
        return to == S::kStopped;
      default:
        return false;
    }
  }
  switch (from) {
    case S::kSyncing:
      return to == S::kProtected || to == S::kFailed || to == S::kStopped;
    case S::kProtected:
      return to == S::kPromoting || to == S::kStopped || to == S::kFailed;
    case S::kPromoting:
      return to == S::kActive || to == S::kFenced || to == S::kFailed;
    default:
      return false;
  }
}

bool RoleState::MoveTo(ReplicaState to, std::string reason) {
  Transition t;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ReplicaState from = state_.load();
    if (!Allowed(from, to)) return false;
    t = {std::chrono::system_clock::now(), from, to, std::move(reason)};
    log_.push_back(t);
    if (IsSettled(to)) end_reason_ = t.reason;
    state_.store(to, std::memory_order_release);
  }
  cv_.notify_all();
  if (observer_) observer_(t);
  return true;
}

std::vector<Transition> RoleState::log() const {
  std::lock_guard<std::mutex> lock(mu_);
  return log_;
}

std::string RoleState::end_reason() const {
  std::lock_guard<std::mutex> lock(mu_);
  return end_reason_;
}

Heartbeater::Heartbeater(channel::Channel& channel, Micros interval,
                         std::function<uint64_t()> latest_epoch,
                         std::function<void(const Status&)> on_error)
    : channel_(channel),
      interval_(interval),
      latest_epoch_(std::move(latest_epoch)),
      on_error_(std::move(on_error)) {}

Heartbeater::~Heartbeater() { Stop(); }

void Heartbeater::Start() {
  NoteSent();
  thread_ = std::thread([this] { Run(); });
}

void Heartbeater::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Heartbeater::Run() {
  // The peer's failure detector trusts these beats. On a busy host a normal thread can wait
  // milliseconds for a CPU, which a short threshold takes for a dead peer; real-time
  // priority (where permitted: root or CAP_SYS_NICE) keeps that wait short. The thread
  // sleeps between beats, so it costs almost no CPU; without the permission it runs as is.
  sched_param realtime{};
  realtime.sched_priority = kHeartbeatPriority;
  (void)pthread_setschedparam(pthread_self(), SCHED_FIFO, &realtime);
  uint8_t record[wire::kControlRecordBytes];
  const int64_t interval_ns =
      std::chrono::duration_cast<std::chrono::nanoseconds>(interval_).count();
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    int64_t since = Now() - last_sent_ns_.load(std::memory_order_relaxed);
    if (since >= interval_ns) {
      lock.unlock();
      size_t n = wire::EncodeHeartbeat(latest_epoch_(), record);
      channel::ConstSlice slice{record, n};
      Status s = channel_.Send({&slice, 1});
      lock.lock();
      if (!s.ok()) {
        if (!stop_) on_error_(s.WithContext("sending a heartbeat"));
        return;
      }
      NoteSent();
      since = 0;
    }
    cv_.wait_for(lock, std::chrono::nanoseconds(interval_ns - since));
  }
}

Status CheckPeerSilence(const channel::Channel& channel, Micros threshold, const char* peer) {
  auto silent = std::chrono::duration_cast<Micros>(SteadyClock::now() - channel.LastHeardFrom());
  if (silent <= threshold) return Status::Ok();
  return Status::PeerLost(std::string("no word from the ") + peer + " for " + Millis(silent) +
                          " (threshold " + Millis(threshold) + ")");
}

void LatencyWindow::Add(Micros d) {
  std::lock_guard<std::mutex> lock(mu_);
  uint32_t us = static_cast<uint32_t>(std::clamp<int64_t>(d.count(), 0, UINT32_MAX));
  us_[count_ % kWindow] = us;
  ++count_;
  last_ = us;
}

void LatencyWindow::Clear() {
  std::lock_guard<std::mutex> lock(mu_);
  count_ = 0;
  last_ = 0;
}

LatencyWindow::Summary LatencyWindow::Summarize() const {
  std::array<uint32_t, kWindow> copy;
  Summary out;
  size_t n;
  {
    std::lock_guard<std::mutex> lock(mu_);
    n = std::min(count_, kWindow);
    std::copy(us_.begin(), us_.begin() + n, copy.begin());
    out.last = Micros(last_);
    out.count = count_;
  }
  if (n == 0) return out;
  std::sort(copy.begin(), copy.begin() + n);
  auto pct = [&](double p) { return Micros(copy[std::min(n - 1, static_cast<size_t>(p * n))]); };
  out.p50 = pct(0.50);
  out.p99 = pct(0.99);
  out.max = Micros(copy[n - 1]);
  return out;
}

Status ValidateRamLayout(const std::vector<RamBlock>& blocks) {
  if (blocks.empty()) return Status::InvalidArgument("the hypervisor reports no guest RAM");
  for (const auto& b : blocks) {
    if (b.host == nullptr || b.length == 0 || b.length % wire::kPageSize != 0) {
      return Status::InvalidArgument("RAM block '" + b.id + "' has length " +
                                     std::to_string(b.length) +
                                     ", not a positive multiple of 4096, or no mapping");
    }
  }
  return Status::Ok();
}

std::vector<wire::BlockLayout> RamLayout(const std::vector<RamBlock>& blocks) {
  std::vector<wire::BlockLayout> out;
  for (const auto& b : blocks) out.push_back({b.id, b.length});
  return out;
}

Status ReceiveRecord(channel::Channel& ch, std::vector<uint8_t>& buf,
                     std::chrono::milliseconds timeout, wire::RecordView* out) {
  size_t n = 0;
  LOCKSTEP_RETURN_IF_ERROR(ch.Receive(buf, &n, timeout));
  wire::RecordReader reader({buf.data(), n});
  return reader.Next(out);
}

size_t LargestEpochMessage(size_t max_device_state_bytes) {
  // The last message of an epoch carries a whole batch of pages, the device state and the
  // commit (EpochStreamer::Send): the sum, with room for the framing records.
  return EpochStreamer::kBatchPages * (wire::kHeaderBytes + wire::kPageSize) +
         max_device_state_bytes + 8 * wire::kHeaderBytes + 256;
}

std::string Millis(Micros d) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f ms", static_cast<double>(d.count()) / 1000.0);
  return buf;
}

}  // namespace lockstep
