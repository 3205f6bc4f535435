// The in-process loopback transport (see loopback.h).
//
// A link is one mutex-protected state shared by its two ends: a queue of whole messages
// towards each end plus the fault-injection switches. Send() copies the gather list into
// a fresh vector and appends it to the peer's queue; that moment counts as the message
// reaching the peer, so it is when the peer's LastHeardFrom() advances (as a TCP peer
// hears bytes once they are in its socket buffer). A queue holds at most
// kQueueCapacityBytes (or one larger message), beyond which Send() blocks: back-pressure
// behaves as over a real connection.

#include "replication_channel/loopback.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "gather.h"

namespace lockstep::channel {

namespace {

constexpr size_t kQueueCapacityBytes = 8u << 20;
// Timeouts at least this long wait forever (and cannot overflow a time_point).
constexpr std::chrono::microseconds kForever = std::chrono::hours(24 * 365);
constexpr int kSideA = 0;
constexpr int kSideB = 1;

std::atomic<uint64_t> next_link_id{1};

class LinkImpl;

class LoopbackChannel final : public Channel {
 public:
  LoopbackChannel(std::shared_ptr<LinkImpl> link, int side) : link_(std::move(link)), side_(side) {}
  // The peer sees kPeerLost from now on.
  ~LoopbackChannel() override;

  std::string_view transport() const override { return "loopback"; }
  std::string peer() const override;
  Status RegisterMemory(const void* base, size_t len) override {
    if (base == nullptr || len == 0) {
      return Status::InvalidArgument("RegisterMemory needs a non-empty region");
    }
    return Status::Ok();
  }
  Status Send(std::span<const ConstSlice> gather, uint64_t* seq) override;
  uint64_t CompletedThrough() const override;
  Status WaitForCompletion(uint64_t seq, std::chrono::microseconds timeout) override;
  Status Receive(std::span<uint8_t> into, size_t* size, std::chrono::microseconds timeout) override;
  Clock::time_point LastHeardFrom() const override;
  void Abort() override;
  ChannelStats stats() const override;

 private:
  const std::shared_ptr<LinkImpl> link_;
  const int side_;
};

class LinkImpl final : public LoopbackLink, public std::enable_shared_from_this<LinkImpl> {
 public:
  explicit LinkImpl(std::string description) : description_(std::move(description)) {
    auto now = Clock::now().time_since_epoch().count();
    last_heard_[kSideA].store(now, std::memory_order_relaxed);
    last_heard_[kSideB].store(now, std::memory_order_relaxed);
  }

  std::unique_ptr<Channel> TakeA() override { return Take(kSideA); }
  std::unique_ptr<Channel> TakeB() override { return Take(kSideB); }

  void Cut() override {
    std::lock_guard lock(mu_);
    CutLocked("the loopback link " + description_ + " was cut", /*discard_queued=*/true);
  }

  void Stall() override {
    std::lock_guard lock(mu_);
    stalled_ = true;
    changed_.notify_all();  // senders blocked on a full queue now drop instead
  }

  void CutAfterBytes(uint64_t n) override {
    std::lock_guard lock(mu_);
    uint64_t headroom = std::numeric_limits<uint64_t>::max() - delivered_a_to_b_;
    cut_after_a_to_b_ = delivered_a_to_b_ + std::min(n, headroom);
  }

  uint64_t BytesDeliveredAtoB() const override {
    std::lock_guard lock(mu_);
    return delivered_a_to_b_;
  }

  // The Channel operations of end `side`.

  std::string PeerOf(int side) const {
    return "loopback " + description_ + (side == kSideA ? " end B" : " end A");
  }

  Status Send(int side, std::span<const ConstSlice> gather, uint64_t* seq) {
    size_t total = 0;
    LOCKSTEP_RETURN_IF_ERROR(internal::CheckGather(gather, &total));
    // Copied before taking the lock; the one allocation of a send.
    std::vector<uint8_t> message(total);
    size_t offset = 0;
    for (const ConstSlice& slice : gather) {
      if (slice.size == 0) continue;
      std::memcpy(message.data() + offset, slice.data, slice.size);
      offset += slice.size;
    }

    const int peer = 1 - side;
    std::unique_lock lock(mu_);
    Queue& queue = to_[peer];
    while (true) {
      LOCKSTEP_RETURN_IF_ERROR(CheckUsableLocked(side));
      if (stalled_ || queue.bytes == 0 || queue.bytes + total <= kQueueCapacityBytes) break;
      changed_.wait(lock);
    }
    if (!stalled_) {
      if (side == kSideA && total > cut_after_a_to_b_ - delivered_a_to_b_) {
        CutLocked("the loopback link " + description_ + " was cut after " +
                      std::to_string(delivered_a_to_b_) + " bytes from A to B",
                  /*discard_queued=*/false);
        return cut_reason_;
      }
      queue.bytes += total;
      queue.messages.push_back(std::move(message));
      if (side == kSideA) delivered_a_to_b_ += total;
      last_heard_[peer].store(Clock::now().time_since_epoch().count(), std::memory_order_relaxed);
      changed_.notify_all();
    }
    uint64_t sequence = ++sent_[side];
    completed_[side].store(sequence, std::memory_order_release);
    stats_[side].messages_sent++;
    stats_[side].bytes_sent += total;
    if (seq != nullptr) *seq = sequence;
    return Status::Ok();
  }

  uint64_t CompletedThrough(int side) const {
    return completed_[side].load(std::memory_order_acquire);
  }

  // Messages are copied by Send(), so they complete before it returns.
  Status WaitForCompletion(int side, uint64_t seq) {
    if (seq <= CompletedThrough(side)) return Status::Ok();
    std::lock_guard lock(mu_);
    LOCKSTEP_RETURN_IF_ERROR(CheckUsableLocked(side));
    return Status::FailedPrecondition("message " + std::to_string(seq) + " to " + PeerOf(side) +
                                      " was never sent");
  }

  Status Receive(int side, std::span<uint8_t> into, size_t* size,
                 std::chrono::microseconds timeout) {
    std::unique_lock lock(mu_);
    Queue& queue = to_[side];
    auto ready = [&] { return aborted_[side] || cut_ || !queue.messages.empty(); };
    if (timeout >= kForever) {
      changed_.wait(lock, ready);
    } else {
      auto deadline = Clock::now() + std::max(timeout, std::chrono::microseconds::zero());
      if (!changed_.wait_until(lock, deadline, ready)) {
        return Status::TimedOut("no message from " + PeerOf(side) + " in time");
      }
    }
    if (aborted_[side]) return CheckUsableLocked(side);
    // Messages that reached this end before a cut that kept them are still received.
    if (queue.messages.empty()) return CheckUsableLocked(side);
    std::vector<uint8_t>& message = queue.messages.front();
    if (message.size() > into.size()) {
      Status error = Status::ResourceExhausted(
          "a message of " + std::to_string(message.size()) + " bytes from " + PeerOf(side) +
          " does not fit the receive buffer of " + std::to_string(into.size()) + " bytes");
      CutLocked(error.message(), /*discard_queued=*/true);
      return error;
    }
    std::memcpy(into.data(), message.data(), message.size());
    *size = message.size();
    stats_[side].messages_received++;
    stats_[side].bytes_received += message.size();
    queue.bytes -= message.size();
    queue.messages.pop_front();
    changed_.notify_all();  // a sender may wait for room
    return Status::Ok();
  }

  Clock::time_point LastHeardFrom(int side) const {
    return Clock::time_point(Clock::duration(last_heard_[side].load(std::memory_order_relaxed)));
  }

  void Abort(int side) {
    std::lock_guard lock(mu_);
    aborted_[side] = true;
    changed_.notify_all();
    // A stalled link carries nothing, not even the news of a close.
    if (stalled_) return;
    // Like shutdown() of a socket: what this end already sent still reaches the peer.
    CutLocked("the peer aborted the loopback link " + description_, /*discard_queued=*/false);
  }

  void Close(int side) {
    std::lock_guard lock(mu_);
    if (stalled_) return;  // a stalled link carries nothing, not even the news of a close
    // Like close() of a socket: what this end already sent still reaches the peer.
    CutLocked("the peer's end of the loopback link " + description_ + " was destroyed",
              /*discard_queued=*/false);
    (void)side;
  }

  ChannelStats Stats(int side) const {
    std::lock_guard lock(mu_);
    return stats_[side];
  }

 private:
  struct Queue {
    std::deque<std::vector<uint8_t>> messages;
    size_t bytes = 0;  // sum of messages' sizes
  };

  std::unique_ptr<Channel> Take(int side) {
    std::lock_guard lock(mu_);
    if (taken_[side]) return nullptr;
    taken_[side] = true;
    return std::make_unique<LoopbackChannel>(shared_from_this(), side);
  }

  // REQUIRES: mu_ held.
  Status CheckUsableLocked(int side) const {
    if (aborted_[side]) return Status::Aborted("loopback channel was aborted");
    if (cut_) return cut_reason_;
    return Status::Ok();
  }

  // Both ends see kPeerLost(`reason`) from now on: at once if `discard_queued` (as after
  // a reset), else once they received the messages already queued for them (as after a
  // close). Sends fail at once either way. The first cut's reason sticks.
  // REQUIRES: mu_ held.
  void CutLocked(std::string_view reason, bool discard_queued) {
    if (!cut_) {
      cut_ = true;
      cut_reason_ = Status::PeerLost(reason);
    }
    if (discard_queued) {
      for (Queue& queue : to_) {
        queue.messages.clear();
        queue.bytes = 0;
      }
    }
    changed_.notify_all();
  }

  const std::string description_;
  mutable std::mutex mu_;
  std::condition_variable changed_;  // notified on every change a waiter may await

  // Everything below is GUARDED_BY(mu_) except the atomics, which are read lock-free.
  Queue to_[2];  // to_[side]: messages waiting for end `side` to receive them
  bool taken_[2] = {false, false};
  bool aborted_[2] = {false, false};
  bool cut_ = false;
  Status cut_reason_;  // kPeerLost once cut_
  // Messages sent after Stall() vanish; those already queued remain receivable.
  bool stalled_ = false;
  uint64_t delivered_a_to_b_ = 0;
  // A->B messages are delivered while delivered_a_to_b_ stays <= this.
  uint64_t cut_after_a_to_b_ = std::numeric_limits<uint64_t>::max();
  uint64_t sent_[2] = {0, 0};
  ChannelStats stats_[2];
  std::atomic<uint64_t> completed_[2] = {0, 0};
  std::atomic<Clock::rep> last_heard_[2];  // of the end `side`: when its peer was last heard
};

LoopbackChannel::~LoopbackChannel() { link_->Close(side_); }
std::string LoopbackChannel::peer() const { return link_->PeerOf(side_); }
Status LoopbackChannel::Send(std::span<const ConstSlice> gather, uint64_t* seq) {
  return link_->Send(side_, gather, seq);
}
uint64_t LoopbackChannel::CompletedThrough() const { return link_->CompletedThrough(side_); }
Status LoopbackChannel::WaitForCompletion(uint64_t seq, std::chrono::microseconds /*timeout*/) {
  return link_->WaitForCompletion(side_, seq);
}
Status LoopbackChannel::Receive(std::span<uint8_t> into, size_t* size,
                                std::chrono::microseconds timeout) {
  return link_->Receive(side_, into, size, timeout);
}
Clock::time_point LoopbackChannel::LastHeardFrom() const { return link_->LastHeardFrom(side_); }
void LoopbackChannel::Abort() { link_->Abort(side_); }
ChannelStats LoopbackChannel::stats() const { return link_->Stats(side_); }

// Connections made to a listener, waiting to be accepted.
struct PendingConnections {
  std::mutex mu;
  std::condition_variable changed;
  std::deque<std::unique_ptr<Channel>> channels;  // GUARDED_BY(mu)
  bool aborted = false;                           // GUARDED_BY(mu)
};

// The process-wide names of listening loopback transports.
struct Registry {
  std::mutex mu;
  std::map<std::string, std::shared_ptr<PendingConnections>, std::less<>>
      listeners;  // GUARDED_BY(mu)
};

Registry& GetRegistry() {
  static Registry* registry = new Registry;  // never destroyed: no exit-order hazards
  return *registry;
}

class LoopbackListener final : public Listener {
 public:
  LoopbackListener(std::string name, std::shared_ptr<PendingConnections> pending)
      : name_(std::move(name)), pending_(std::move(pending)) {}

  // Unregisters the name; connections not yet accepted are closed.
  ~LoopbackListener() override {
    Registry& registry = GetRegistry();
    std::lock_guard lock(registry.mu);
    auto it = registry.listeners.find(name_);
    if (it != registry.listeners.end() && it->second == pending_) registry.listeners.erase(it);
  }

  std::string address() const override { return name_; }

  Result<std::unique_ptr<Channel>> Accept(std::chrono::milliseconds timeout) override {
    std::unique_lock lock(pending_->mu);
    auto ready = [&] { return pending_->aborted || !pending_->channels.empty(); };
    if (timeout >= std::chrono::duration_cast<std::chrono::milliseconds>(kForever)) {
      pending_->changed.wait(lock, ready);
    } else {
      auto deadline = Clock::now() + std::max(timeout, std::chrono::milliseconds::zero());
      if (!pending_->changed.wait_until(lock, deadline, ready)) {
        return Status::TimedOut("no connection to loopback listener " + name_ + " within " +
                                std::to_string(timeout.count()) + " ms");
      }
    }
    if (pending_->aborted) return Status::Aborted("loopback listener " + name_ + " was aborted");
    std::unique_ptr<Channel> channel = std::move(pending_->channels.front());
    pending_->channels.pop_front();
    return channel;
  }

  void Abort() override {
    std::lock_guard lock(pending_->mu);
    pending_->aborted = true;
    pending_->changed.notify_all();
  }

 private:
  const std::string name_;
  const std::shared_ptr<PendingConnections> pending_;
};

class LoopbackTransport final : public Transport {
 public:
  std::string_view name() const override { return "loopback"; }

  Result<std::unique_ptr<Listener>> Listen(std::string_view address) override {
    if (address.empty()) return Status::InvalidArgument("a loopback listener needs a name");
    Registry& registry = GetRegistry();
    std::lock_guard lock(registry.mu);
    auto [it, inserted] = registry.listeners.try_emplace(std::string(address),
                                                         std::make_shared<PendingConnections>());
    if (!inserted) {
      return Status::FailedPrecondition("a loopback listener named " + std::string(address) +
                                        " already exists");
    }
    return std::unique_ptr<Listener>(new LoopbackListener(it->first, it->second));
  }

  // Never waits: the connection is made (or refused) at once.
  Result<std::unique_ptr<Channel>> Connect(std::string_view address,
                                           std::chrono::milliseconds /*timeout*/) override {
    std::shared_ptr<PendingConnections> pending;
    {
      Registry& registry = GetRegistry();
      std::lock_guard lock(registry.mu);
      auto it = registry.listeners.find(address);
      if (it == registry.listeners.end()) {
        return Status::PeerLost("no loopback listener named " + std::string(address));
      }
      pending = it->second;
    }
    auto link = std::make_shared<LinkImpl>(std::string(address) + " #" +
                                           std::to_string(next_link_id.fetch_add(1)));
    std::unique_ptr<Channel> ours = link->TakeA();
    std::lock_guard lock(pending->mu);
    if (pending->aborted) {
      return Status::PeerLost("loopback listener " + std::string(address) + " was aborted");
    }
    pending->channels.push_back(link->TakeB());
    pending->changed.notify_all();
    return ours;
  }
};

}  // namespace

std::shared_ptr<LoopbackLink> LoopbackLink::Create() {
  return std::make_shared<LinkImpl>("#" + std::to_string(next_link_id.fetch_add(1)));
}

std::unique_ptr<Transport> MakeLoopbackTransport() { return std::make_unique<LoopbackTransport>(); }

}  // namespace lockstep::channel
