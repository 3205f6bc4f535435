// Pieces both replicas share: the role state machine with its transition log, the
// heartbeat sender, the silence check of the failure detector, and the pause window.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/status.h"
#include "lockstep/replicator.h"
#include "lockstep/wire_format.h"
#include "replication_channel/channel.h"

namespace lockstep {

using SteadyClock = std::chrono::steady_clock;

// The replica's state and every change of it, with the reason. Thread-safe.
class RoleState {
 public:
  explicit RoleState(bool primary, std::function<void(const Transition&)> observer = nullptr)
      : primary_(primary), observer_(std::move(observer)) {}

  ReplicaState get() const { return state_.load(std::memory_order_acquire); }
  // Moves to `to` if the role allows it from the current state; returns whether it did.
  bool MoveTo(ReplicaState to, std::string reason);
  template <typename Pred>
  bool WaitUntil(Pred pred, std::chrono::milliseconds timeout) const {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return pred(state_.load()); });
  }
  std::vector<Transition> log() const;
  // The reason given with the last move into a state that ends protection.
  std::string end_reason() const;

 private:
  bool Allowed(ReplicaState from, ReplicaState to) const;

  const bool primary_;
  const std::function<void(const Transition&)> observer_;
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  std::atomic<ReplicaState> state_{ReplicaState::kIdle};
  std::vector<Transition> log_;  // GUARDED_BY(mu_)
  std::string end_reason_;       // GUARDED_BY(mu_)
};

// The steps of a takeover and how long each took, for the transition's reason (operators
// and the failover harness read it): "timeline: witness 1.20 ms, fence 0.00 ms, ...".
// Used on the fault path only (it allocates).
class TakeoverTimeline {
 public:
  TakeoverTimeline() : last_(SteadyClock::now()) {}
  // Ends the step named `step` now.
  void Mark(const char* step);
  std::string ToString() const { return "timeline: " + text_; }

 private:
  SteadyClock::time_point last_;
  std::string text_;
};

// Tells the peer why this side is closing (an ERROR record), best effort: the connection
// may already be gone.
void SendError(channel::Channel& channel, std::string_view reason);

// Asks the witness for the token after a fault; `confirm_within` as for
// Witness::RequestActive (zero: a grant confirmed at once). A transient error (the witness
// unreachable, silent, or its answer lost: kTimedOut, kIoError, kPeerLost) is asked again,
// `kWitnessRetryGap` apart, up to `kWitnessAttempts` times in all: the witness's retry
// rule (witness.h) answers a request it already granted the same way, so asking again is
// safe. A denial, or any other error, is final. Confirm() below retries alike.
constexpr int kWitnessAttempts = 3;
constexpr std::chrono::milliseconds kWitnessRetryGap{20};
Result<vip::WitnessDecision> AskWitness(vip::Witness& witness, const ReplicationOptions& opt,
                                        uint64_t term, std::chrono::milliseconds confirm_within);
Result<vip::WitnessDecision> ConfirmToken(vip::Witness& witness, const ReplicationOptions& opt,
                                          uint64_t term);

// Whether `denied` (the answer to a request with `term`) gave the token to the other side
// provisionally: it may lapse, and this side may then reclaim it.
bool LostToProvisionalGrant(const vip::WitnessDecision& denied, uint64_t term);

// A loser of a provisional grant waits out the winner's window (witness.h): it asks to
// Reclaim() the token every kReclaimPoll — through transient errors, a reclaim being safe
// to ask again — until the witness grants it (confirmed), says the winner confirmed, or
// the token moved on, or `stop()` says so. The witness measures the window, and the
// winner's may be longer than this host's (a fence command set on the other host only), so
// the wait is bounded only by kReclaimPatience, or this host's window if longer, plus
// kReclaimSlack: they end a wait whose answer never comes. Returns the last answer:
// granted and confirmed means this side now holds the token.
constexpr std::chrono::milliseconds kReclaimPoll{50};
constexpr std::chrono::milliseconds kReclaimPatience{120'000};
constexpr std::chrono::milliseconds kReclaimSlack{3'000};
Result<vip::WitnessDecision> AwaitGrantWindow(vip::Witness& witness, const ReplicationOptions& opt,
                                              const vip::WitnessDecision& denied,
                                              const std::function<bool()>& stop);

// If `*decision` (the answer to a request with `term`) lost to a provisional grant, waits
// it out (AwaitGrantWindow, marking "grant window" on `timeline`) and replaces `*decision`
// with the outcome. Returns "; WINNER won the token but never confirmed it: taken back" if
// the token came to this side so, else "".
std::string AwaitLostGrant(vip::Witness& witness, const ReplicationOptions& opt, uint64_t term,
                           Result<vip::WitnessDecision>* decision, TakeoverTimeline* timeline,
                           const std::function<bool()>& stop);

// The fence step of a secondary's takeover (ReplicationOptions::fence_peer), if configured:
// an error means no takeover.
Status FencePeer(const ReplicationOptions& opt, const std::string& peer_host,
                 TakeoverTimeline* timeline);
// The identity step of a takeover (ReplicationOptions::claim_identity), if configured. Not
// fatal: returns "" or what went wrong, for the transition's reason.
std::string ClaimIdentity(const ReplicationOptions& opt, TakeoverTimeline* timeline);

// Whether `s` means a fault was handled or protection ended.
bool IsSettled(ReplicaState s);

// SCHED_FIFO priority of the heartbeat threads (low: above every normal thread, below the
// kernel's own real-time work).
constexpr int kHeartbeatPriority = 10;

// Sends a HEARTBEAT whenever nothing else went to the peer for one interval. Send errors
// are reported once through `on_error`. Thread-safe.
class Heartbeater {
 public:
  Heartbeater(channel::Channel& channel, Micros interval, std::function<uint64_t()> latest_epoch,
              std::function<void(const Status&)> on_error);
  ~Heartbeater();  // Stop()s
  void Start();
  // Joins the thread. Call after Abort()ing the channel if a Send may be blocked.
  void Stop();
  // Tells the heartbeater something else just went out.
  void NoteSent() { last_sent_ns_.store(Now(), std::memory_order_relaxed); }

 private:
  static int64_t Now() { return SteadyClock::now().time_since_epoch().count(); }
  void Run();

  channel::Channel& channel_;
  const Micros interval_;
  std::function<uint64_t()> latest_epoch_;
  std::function<void(const Status&)> on_error_;
  std::atomic<int64_t> last_sent_ns_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;  // GUARDED_BY(mu_)
  std::thread thread_;
};

// kPeerLost when the peer has been silent for longer than `threshold`.
Status CheckPeerSilence(const channel::Channel& channel, Micros threshold, const char* peer);

// The last kWindow durations (checkpoint pauses, ack latencies), for percentiles. Add()
// takes a mutex but never allocates. Thread-safe.
class LatencyWindow {
 public:
  static constexpr size_t kWindow = 1024;
  void Add(Micros d);
  struct Summary {
    Micros last{0}, p50{0}, p99{0}, max{0};
    uint64_t count = 0;  // durations added so far
  };
  Summary Summarize() const;
  void Clear();

 private:
  mutable std::mutex mu_;
  std::array<uint32_t, kWindow> us_{};  // GUARDED_BY(mu_)
  size_t count_ = 0;                    // GUARDED_BY(mu_)
  uint32_t last_ = 0;                   // GUARDED_BY(mu_)
};

// kInvalidArgument unless every block is mapped and a positive multiple of the page size.
Status ValidateRamLayout(const std::vector<RamBlock>& blocks);
// The layout as the handshake carries it.
std::vector<wire::BlockLayout> RamLayout(const std::vector<RamBlock>& blocks);
// Receives one message into `buf` and reads its first record. Handshake only.
Status ReceiveRecord(channel::Channel& ch, std::vector<uint8_t>& buf,
                     std::chrono::milliseconds timeout, wire::RecordView* out);

// The largest message the primary sends (a batch of pages, or the device state with its
// framing), for buffers on both sides.
size_t LargestEpochMessage(size_t max_device_state_bytes);

// A human-readable duration in milliseconds ("12.3 ms").
std::string Millis(Micros d);

}  // namespace lockstep
