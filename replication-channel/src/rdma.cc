// The RDMA transport (see rdma.h for the design and the wire protocol).
//
// Locking: send_mu_ serializes whole messages (Send); state_mu_ guards everything the
// progress thread shares with the callers (credits, send-queue accounting, arrived
// messages, failure state) and every ibv_post_send, and state_cv_ announces its changes.
// Order: send_mu_ before state_mu_. Counters that the sender reads in its copy loop are
// atomics written under state_mu_, so it can test them without the lock and only takes it
// to wait.

#include "replication_channel/rdma.h"

#include <arpa/inet.h>
#include <endian.h>
#include <fcntl.h>
#include <infiniband/verbs.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <climits>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/pi_mutex.h"
#include "gather.h"
#include "socket_util.h"

namespace lockstep::channel {

namespace {

using namespace internal;

constexpr uint8_t kMagic[8] = {'L', 'S', 'T', 'P', 'R', 'D', 'M', 'A'};
constexpr size_t kHelloFixedBytes = 16;  // magic, version, size: the same in every version
constexpr size_t kHelloBytes = 72;
constexpr uint32_t kReadyWord = 0x59444552;    // "REDY"
constexpr uint32_t kCreditWord = 0x54444552;   // "REDT"
constexpr uint32_t kGoodbyeWord = 0x45594247;  // "GBYE"
constexpr size_t kCreditBytes = 24;
constexpr size_t kGoodbyeBytes = 16;
constexpr size_t kControlSlotBytes = 32;  // one receive or credit-send buffer

// The largest RDMA write one work request carries: bounce space and ring credit come
// back in pieces of at most this.
constexpr size_t kMaxWrBytes = 1 << 20;
// Most scatter-gather entries one work request uses (the device may allow fewer).
constexpr size_t kMaxSges = 32;
// Most RegisterMemory() regions per channel.
constexpr size_t kMaxRegions = 256;
// Receive requests beyond the two per credit the protocol needs.
constexpr uint32_t kReceiveSlack = 8;
constexpr size_t kMinBufferBytes = 64 << 10;

constexpr std::chrono::seconds kHandshakeTimeout{30};
// How long a closing channel waits for its posted writes to be acknowledged.
constexpr std::chrono::seconds kCloseDrain{2};
// How long after a goodbye the peer's last announced messages may take to show up.
constexpr std::chrono::seconds kGoodbyeGrace{2};
// Timeouts at least this long wait forever (and cannot overflow a time_point).

// QP timing: 4.096 us * 2^17 = 0.54 s per transport retry (generous for emulated guests),
// 7 retries; receiver-not-ready retried forever (credits make it rare).
constexpr uint8_t kAckTimeout = 17;
constexpr uint8_t kRetryCount = 7;
constexpr uint8_t kRnrRetryForever = 7;
constexpr uint8_t kMinRnrTimer = 12;  // 0.64 ms

constexpr std::string_view kDriverHint =
    "load a driver (e.g. rdma_rxe: rdma link add rxe0 type rxe netdev eth0) or use "
    "transport=tcp";

void PutU16(uint8_t* p, uint16_t v) {
  for (int i = 0; i < 2; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
void PutU32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
void PutU64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint16_t GetU16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | p[1] << 8); }
uint32_t GetU32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = v << 8 | p[i];
  return v;
}
uint64_t GetU64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = v << 8 | p[i];
  return v;
}

// Blocking-style I/O on a non-blocking socket, for the handshake.
Status WriteAll(int fd, const uint8_t* data, size_t size, int abort_fd, const Deadline& deadline,
                const std::string& peer) {
  while (size > 0) {
    ssize_t n = ::send(fd, data, size, MSG_NOSIGNAL);
    if (n > 0) {
      data += n;
      size -= static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      LOCKSTEP_RETURN_IF_ERROR(WaitFor(fd, POLLOUT, abort_fd, deadline, "send the rdma handshake"));
      continue;
    }
    return Status::PeerLost("rdma handshake with " + peer + " failed: send: " + Errno(errno));
  }
  return Status::Ok();
}

Status ReadAll(int fd, uint8_t* data, size_t size, int abort_fd, const Deadline& deadline,
               const std::string& peer) {
  while (size > 0) {
    ssize_t n = ::recv(fd, data, size, 0);
    if (n > 0) {
      data += n;
      size -= static_cast<size_t>(n);
      continue;
    }
    if (n == 0) {
      return Status::PeerLost("rdma handshake with " + peer +
                              " failed: the peer closed the connection (is it an rdma listener, "
                              "and did it refuse us? see its log)");
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      LOCKSTEP_RETURN_IF_ERROR(
          WaitFor(fd, POLLIN, abort_fd, deadline, "receive the rdma handshake"));
      continue;
    }
    return Status::PeerLost("rdma handshake with " + peer + " failed: recv: " + Errno(errno));
  }
  return Status::Ok();
}

class DeviceList {
 public:
  DeviceList() = default;
  DeviceList(const DeviceList&) = delete;
  DeviceList& operator=(const DeviceList&) = delete;
  ~DeviceList() {
    if (list_ != nullptr) ::ibv_free_device_list(list_);
  }

  // Finds options.device, or the first device; kUnsupported when there is none.
  Result<ibv_device*> Find(const RdmaOptions& options) {
    errno = 0;
    list_ = ::ibv_get_device_list(&count_);
    int err = errno;
    if (list_ == nullptr || count_ <= 0) {
      std::string why = list_ == nullptr ? "ibv_get_device_list: " + Errno(err)
                                         : "ibv_get_device_list found none";
      return Status::Unsupported("no RDMA device on this host (" + why +
                                 "): " + std::string(kDriverHint));
    }
    if (options.device.empty()) return list_[0];
    std::string names;
    for (int i = 0; i < count_; ++i) {
      const char* name = ::ibv_get_device_name(list_[i]);
      if (options.device == name) return list_[i];
      names += (i > 0 ? ", " : "") + std::string(name);
    }
    return Status::Unsupported("RDMA device '" + options.device + "' not found (devices here: " +
                               names + "): name one of them, or " + std::string(kDriverHint));
  }

 private:
  ibv_device** list_ = nullptr;
  int count_ = 0;
};

// Checks what RdmaAvailable() checks on an open device.
Status CheckPort(ibv_context* context, const RdmaOptions& options, ibv_port_attr* port) {
  const char* name = ::ibv_get_device_name(context->device);
  int rc = ::ibv_query_port(context, options.port, port);
  if (rc != 0) {
    return Status::Unsupported("cannot query port " + std::to_string(options.port) + " of " + name +
                               ": " + Errno(rc) + " (set RdmaOptions::port)");
  }
  if (port->state != IBV_PORT_ACTIVE) {
    return Status::Unsupported("port " + std::to_string(options.port) + " of " + name + " is " +
                               ::ibv_port_state_str(port->state) +
                               ", not ACTIVE: bring its network interface up");
  }
  return Status::Ok();
}

// The GID index to use: options.gid_index, else an IPv4-mapped RoCE v2 entry, else any
// RoCE v2 entry, else any valid one (InfiniBand: index 0).
Result<int> ChooseGid(ibv_context* context, const RdmaOptions& options, const ibv_port_attr& port,
                      ibv_gid* gid) {
  const char* name = ::ibv_get_device_name(context->device);
  if (options.gid_index >= 0) {
    if (options.gid_index > 255 || options.gid_index >= port.gid_tbl_len) {
      return Status::InvalidArgument("GID index " + std::to_string(options.gid_index) + " of " +
                                     name + " is out of range: its table has " +
                                     std::to_string(port.gid_tbl_len) + " entries");
    }
    int rc = ::ibv_query_gid(context, options.port, options.gid_index, gid);
    if (rc != 0) {
      return Status::InvalidArgument("GID index " + std::to_string(options.gid_index) + " of " +
                                     name + " cannot be read: " + Errno(rc) +
                                     " (see `rdma resource` / show_gids)");
    }
    return options.gid_index;
  }
  int best = -1;
  int best_rank = 0;
  for (int i = 0; i < port.gid_tbl_len; ++i) {
    ibv_gid_entry entry{};
    if (::ibv_query_gid_ex(context, options.port, static_cast<uint32_t>(i), &entry, 0) != 0) {
      continue;
    }
    const uint8_t* raw = entry.gid.raw;
    bool zero = std::all_of(raw, raw + 16, [](uint8_t b) { return b == 0; });
    if (zero) continue;
    bool v4_mapped = std::all_of(raw, raw + 10, [](uint8_t b) { return b == 0; }) &&
                     raw[10] == 0xff && raw[11] == 0xff;
    int rank = 1;
    if (entry.gid_type == IBV_GID_TYPE_ROCE_V2) rank = v4_mapped ? 3 : 2;
    if (rank > best_rank) {
      best = i;
      best_rank = rank;
      *gid = entry.gid;
    }
  }
  if (best < 0) {
    return Status::Unsupported("port " + std::to_string(options.port) + " of " + name +
                               " has no GID: give its network interface an IP address");
  }
  return best;
}

// The hello of one end (see rdma.h).
struct Hello {
  uint32_t version = 0;
  uint32_t qpn = 0;
  uint32_t psn = 0;
  ibv_gid gid{};
  uint16_t lid = 0;
  uint8_t mtu = 0;
  uint8_t link_layer = 0;
  uint32_t ring_rkey = 0;
  uint64_t ring_addr = 0;
  uint64_t ring_bytes = 0;
  uint32_t credits = 0;

  void Encode(uint8_t* out) const {
    std::memset(out, 0, kHelloBytes);
    std::memcpy(out, kMagic, sizeof(kMagic));
    PutU32(out + 8, version);
    PutU32(out + 12, kHelloBytes);
    PutU32(out + 16, qpn);
    PutU32(out + 20, psn);
    std::memcpy(out + 24, gid.raw, 16);
    PutU16(out + 40, lid);
    out[42] = mtu;
    out[43] = link_layer;
    PutU32(out + 44, ring_rkey);
    PutU64(out + 48, ring_addr);
    PutU64(out + 56, ring_bytes);
    PutU32(out + 64, credits);
  }

  void DecodeBody(const uint8_t* in) {
    qpn = GetU32(in + 16);
    psn = GetU32(in + 20) & 0xffffff;
    std::memcpy(gid.raw, in + 24, 16);
    lid = GetU16(in + 40);
    mtu = in[42];
    link_layer = in[43];
    ring_rkey = GetU32(in + 44);
    ring_addr = GetU64(in + 48);
    ring_bytes = GetU64(in + 56);
    credits = GetU32(in + 64);
  }
};

// Anonymous memory, unmapped on scope exit.
class Mapping {
 public:
  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    if (base_ != nullptr) ::munmap(base_, size_);
  }
  Status Allocate(size_t size, const char* what) {
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return Status::FromErrno(std::string("mapping the ") + what, errno);
    base_ = static_cast<uint8_t*>(p);
    size_ = size;
    return Status::Ok();
  }
  uint8_t* get() const { return base_; }
  size_t size() const { return size_; }

 private:
  uint8_t* base_ = nullptr;
  size_t size_ = 0;
};

class RdmaChannel final : public Channel {
 public:
  RdmaChannel(const RdmaOptions& options, std::string peer)
      : options_(options),
        peer_(std::move(peer)),
        last_heard_(Clock::now().time_since_epoch().count()) {}

  ~RdmaChannel() override;

  // Opens the device and makes every resource of this end, up to a QP in INIT with its
  // receive requests posted. Then LocalHello(), ConnectQp(), Start().
  Status Open();
  Hello LocalHello() const;
  // Brings the QP to RTS towards `remote`.
  Status ConnectQp(const Hello& remote);
  // Takes over the handshake's socket and starts the progress thread.
  Status Start(UniqueFd socket);

  std::string_view transport() const override { return "rdma"; }
  std::string peer() const override { return peer_; }
  Status RegisterMemory(const void* base, size_t len) override;
  Status Send(std::span<const ConstSlice> gather, uint64_t* seq) override;
  uint64_t CompletedThrough() const override {
    return completed_through_.load(std::memory_order_acquire);
  }
  Status WaitForCompletion(uint64_t seq, std::chrono::microseconds timeout) override;
  Status Receive(std::span<uint8_t> into, size_t* size, std::chrono::microseconds timeout) override;
  Clock::time_point LastHeardFrom() const override {
    return Clock::time_point(Clock::duration(last_heard_.load(std::memory_order_relaxed)));
  }
  void Abort() override;
  RdmaCounters counters() const {
    RdmaCounters c;
    c.zero_copy_bytes = zero_copy_bytes_.load(std::memory_order_relaxed);
    c.bounce_bytes = bounce_bytes_.load(std::memory_order_relaxed);
    c.work_requests = work_requests_.load(std::memory_order_relaxed);
    c.credit_updates = credit_updates_.load(std::memory_order_relaxed);
    return c;
  }
  ChannelStats stats() const override {
    ChannelStats s;
    s.messages_sent = messages_sent_.load(std::memory_order_relaxed);
    s.bytes_sent = bytes_sent_.load(std::memory_order_relaxed);
    s.messages_received = messages_received_.load(std::memory_order_relaxed);
    s.bytes_received = bytes_received_.load(std::memory_order_relaxed);
    return s;
  }

 private:
  struct Region {
    uintptr_t begin = 0;
    uintptr_t end = 0;
    uint32_t lkey = 0;
    ibv_mr* mr = nullptr;
  };
  // A signalled work request not yet completed. Its completion completes every earlier
  // request too (a QP completes in order).
  struct Signalled {
    uint64_t wr_index;
    uint64_t seq;          // the message it ends, or 0
    uint64_t bounce_head;  // bounce bytes released by its completion; kNoBounce: none
  };
  static constexpr uint64_t kNoBounce = ~uint64_t{0};

  uint8_t* ReceiveSlot(uint32_t i) const { return control_.get() + i * kControlSlotBytes; }
  uint8_t* SendSlot(uint64_t wr_index) const {
    return control_.get() + (receive_slots_ + wr_index % send_depth_) * kControlSlotBytes;
  }
  Status PostReceive(uint32_t slot);

  // Send() helpers; REQUIRE send_mu_.
  const Region* FindRegion(const uint8_t* p);
  bool AppendSge(const uint8_t* addr, size_t size, uint32_t lkey);
  Status PostWrite(bool last, size_t total, uint64_t seq);
  // Waits for `ready` under state_mu_ (until Abort or failure).
  template <typename Ready>
  Status WaitUntil(std::unique_lock<std::mutex>& lock, const Deadline& deadline, Ready ready,
                   bool fail_when_peer_gone);
  // Posts a credit update; REQUIRES state_mu_.
  // Posts a credit update now if the send queue has room, else leaves it to the completion
  // that frees a slot (credit_pending_): Receive() never waits for the send queue.
  // REQUIRES: state_mu_ held.
  void ReturnCreditLocked();
  Status PostCreditNowLocked();
  bool credit_pending_ = false;  // GUARDED_BY(state_mu_)
  bool SignalNextLocked() const { return wr_posted_ + 1 - last_signalled_ >= send_depth_ / 4; }
  void PushSignalledLocked(const Signalled& record) {
    signalled_[(signalled_head_ + signalled_count_) % signalled_.size()] = record;
    ++signalled_count_;
  }

  // OK, or the error every call returns now; REQUIRES state_mu_.
  Status UsableLocked(bool fail_when_peer_gone) const;
  // Marks the connection unusable and tears it down (the peer notices through the side
  // channel). Returns `error`, or kAborted when Abort() is what broke the connection.
  // `keep_arrived`: the peer went away, and the whole messages that arrived before are
  // still delivered (as TCP delivers what is in its buffer); otherwise this end broke the
  // stream and nothing more is delivered.
  Status Fail(Status error, bool keep_arrived = false);
  Status FailLocked(Status error, bool keep_arrived = false);
  Status AbortedStatus() const {
    return Status::Aborted("rdma channel to " + peer_ + " was aborted");
  }

  // The progress thread.
  void Progress();
  void DrainCq();
  void HandleCompletionLocked(const ibv_wc& wc);
  void HandleAsyncEvents();
  // Reads the side channel; false once it ended.
  bool ReadSideChannel();
  void CheckGoodbyeLocked();

  const RdmaOptions options_;
  const std::string peer_;

  // Verbs resources, made by Open(), destroyed by the destructor.
  ibv_context* context_ = nullptr;
  ibv_pd* pd_ = nullptr;
  ibv_comp_channel* comp_ = nullptr;
  ibv_cq* cq_ = nullptr;
  ibv_qp* qp_ = nullptr;
  Mapping ring_;
  Mapping bounce_;
  Mapping control_;
  ibv_mr* ring_mr_ = nullptr;
  ibv_mr* bounce_mr_ = nullptr;
  ibv_mr* control_mr_ = nullptr;
  ibv_port_attr port_{};
  ibv_gid gid_{};
  int gid_index_ = 0;
  uint32_t psn_ = 0;
  uint32_t send_depth_ = 0;
  uint32_t receive_slots_ = 0;
  uint32_t max_sge_ = 1;
  uint32_t own_credits_ = 0;  // announced in the hello

  // The peer, from its hello.
  uint64_t peer_ring_addr_ = 0;
  uint32_t peer_ring_rkey_ = 0;
  uint64_t peer_ring_bytes_ = 0;
  uint32_t credits_ = 0;  // min of both ends' announcements: messages in flight each way

  int socket_ = -1;   // the side channel
  int wake_fd_ = -1;  // an eventfd; readable once Abort() ran or the destructor stops
  std::thread progress_;
  unsigned unacked_cq_events_ = 0;  // progress thread only

  std::atomic<bool> aborted_{false};
  std::atomic<bool> stopping_{false};
  std::atomic<Clock::rep> last_heard_;
  std::atomic<uint64_t> completed_through_{0};
  std::atomic<uint64_t> last_seq_{0};
  std::atomic<uint64_t> messages_sent_{0};
  std::atomic<uint64_t> bytes_sent_{0};
  std::atomic<uint64_t> messages_received_{0};
  std::atomic<uint64_t> bytes_received_{0};
  std::atomic<uint64_t> zero_copy_bytes_{0};
  std::atomic<uint64_t> bounce_bytes_{0};
  std::atomic<uint64_t> work_requests_{0};
  std::atomic<uint64_t> credit_updates_{0};

  std::mutex register_mu_;  // serializes RegisterMemory()
  std::array<Region, kMaxRegions> regions_;
  std::atomic<size_t> region_count_{0};  // entries below it are immutable

  mutable std::mutex state_mu_;
  std::condition_variable state_cv_;
  bool failed_ = false;        // GUARDED_BY(state_mu_)
  bool keep_arrived_ = false;  // GUARDED_BY(state_mu_); see FailLocked()
  Status failure_;             // GUARDED_BY(state_mu_); kPeerLost once failed_
  bool peer_gone_ = false;     // GUARDED_BY(state_mu_); the peer closed in order, all delivered
  // Sending side (GUARDED_BY(state_mu_) unless atomic).
  uint64_t wr_posted_ = 0;            // work requests posted, the last one's index
  uint64_t last_signalled_ = 0;       // index of the last signalled one
  uint64_t messages_posted_ = 0;      // message ends posted
  uint64_t posted_bytes_ = 0;         // bytes of posted writes (remote_written_'s copy)
  std::vector<Signalled> signalled_;  // a ring of send_depth_ entries, made by Open()
  size_t signalled_head_ = 0;
  size_t signalled_count_ = 0;
  std::atomic<uint64_t> wr_completed_{0};
  std::atomic<uint64_t> bounce_tail_{0};
  std::atomic<uint64_t> peer_consumed_bytes_{0};
  std::atomic<uint64_t> peer_consumed_messages_{0};
  // Receiving side (GUARDED_BY(state_mu_)).
  std::vector<uint32_t> arrived_;  // lengths of arrived, unconsumed messages; a ring
  size_t arrived_head_ = 0;
  size_t arrived_count_ = 0;
  uint64_t arrived_messages_ = 0;
  uint64_t arrived_bytes_ = 0;
  uint64_t consumed_bytes_ = 0;
  uint64_t consumed_messages_ = 0;
  uint64_t reported_bytes_ = 0;  // totals sent in the last credit update
  uint64_t reported_messages_ = 0;
  bool goodbye_seen_ = false;
  uint64_t goodbye_messages_ = 0;
  Clock::time_point goodbye_deadline_;
  // Side-channel input; progress thread only.
  uint8_t side_[kGoodbyeBytes] = {};
  size_t side_received_ = 0;

  // Sender state; GUARDED_BY(send_mu_). See rdma.h on why a priority-inheritance lock.
  PriorityInheritanceMutex send_mu_;
  uint64_t remote_written_ = 0;  // bytes written into the peer's ring (of posted requests)
  uint64_t bounce_head_ = 0;     // bounce bytes handed out
  std::array<ibv_sge, kMaxSges> sges_{};
  uint32_t sge_count_ = 0;
  size_t wr_bytes_ = 0;  // bytes in the work request being built
  bool wr_uses_bounce_ = false;
  size_t last_region_ = 0;  // FindRegion's cache
};

RdmaChannel::~RdmaChannel() {
  if (progress_.joinable()) {
    // Orderly close: let the posted writes be acknowledged, then say goodbye with how
    // many messages completed, so the peer delivers them before reporting the close.
    {
      std::unique_lock lock(state_mu_);
      if (!aborted_.load() && !failed_ && !peer_gone_) {
        // Every message's last request is signalled: no signalled request left means
        // every message was acknowledged.
        state_cv_.wait_for(lock, kCloseDrain, [&] {
          return failed_ || peer_gone_ || aborted_.load() || signalled_count_ == 0;
        });
        if (!failed_ && !aborted_.load()) {
          uint8_t goodbye[kGoodbyeBytes] = {};
          PutU32(goodbye, kGoodbyeWord);
          PutU64(goodbye + 8, completed_through_.load());
          // 16 bytes always fit an idle socket's send buffer; if not, the peer sees an
          // abrupt close instead, which is still a close.
          [[maybe_unused]] ssize_t n = ::send(socket_, goodbye, sizeof(goodbye), MSG_NOSIGNAL);
        }
      }
    }
    stopping_.store(true);
    ::shutdown(socket_, SHUT_RDWR);
    Signal(wake_fd_);
    progress_.join();
  }
  if (qp_ != nullptr) ::ibv_destroy_qp(qp_);
  if (cq_ != nullptr) {
    if (unacked_cq_events_ > 0) ::ibv_ack_cq_events(cq_, unacked_cq_events_);
    ::ibv_destroy_cq(cq_);
  }
  if (comp_ != nullptr) ::ibv_destroy_comp_channel(comp_);
  for (size_t i = 0; i < region_count_.load(); ++i) ::ibv_dereg_mr(regions_[i].mr);
  if (ring_mr_ != nullptr) ::ibv_dereg_mr(ring_mr_);
  if (bounce_mr_ != nullptr) ::ibv_dereg_mr(bounce_mr_);
  if (control_mr_ != nullptr) ::ibv_dereg_mr(control_mr_);
  if (pd_ != nullptr) ::ibv_dealloc_pd(pd_);
  if (context_ != nullptr) ::ibv_close_device(context_);
  if (socket_ >= 0) ::close(socket_);
  if (wake_fd_ >= 0) ::close(wake_fd_);
}

Status RdmaChannel::Open() {
  if (options_.ring_bytes < kMinBufferBytes || options_.bounce_bytes < kMinBufferBytes) {
    return Status::InvalidArgument("RdmaOptions: ring_bytes and bounce_bytes must be at least " +
                                   std::to_string(kMinBufferBytes));
  }
  if (options_.receive_credits == 0 || options_.send_queue_depth < 8) {
    return Status::InvalidArgument(
        "RdmaOptions: receive_credits must be positive and send_queue_depth at least 8");
  }
  DeviceList devices;
  Result<ibv_device*> device = devices.Find(options_);
  if (!device.ok()) return device.status();
  const std::string name = ::ibv_get_device_name(*device);
  context_ = ::ibv_open_device(*device);
  if (context_ == nullptr) return Status::FromErrno("ibv_open_device(" + name + ")", errno);
  LOCKSTEP_RETURN_IF_ERROR(CheckPort(context_, options_, &port_));
  Result<int> gid_index = ChooseGid(context_, options_, port_, &gid_);
  if (!gid_index.ok()) return gid_index.status();
  gid_index_ = *gid_index;

  ibv_device_attr device_attr{};
  if (int rc = ::ibv_query_device(context_, &device_attr); rc != 0) {
    return Status::IoError("ibv_query_device(" + name + "): " + Errno(rc));
  }
  const auto max_wr = static_cast<uint32_t>(std::max(device_attr.max_qp_wr, 8));
  send_depth_ = std::min(options_.send_queue_depth, max_wr);
  own_credits_ = std::min(options_.receive_credits, (max_wr - kReceiveSlack) / 2);
  if (own_credits_ == 0) {
    return Status::Unsupported(name + " takes too few work requests per queue pair (" +
                               std::to_string(device_attr.max_qp_wr) + ") for the rdma transport");
  }
  receive_slots_ = 2 * own_credits_ + kReceiveSlack;

  pd_ = ::ibv_alloc_pd(context_);
  if (pd_ == nullptr) return Status::FromErrno("ibv_alloc_pd(" + name + ")", errno);

  auto register_area = [&](Mapping& area, size_t size, int access, const char* what,
                           ibv_mr** mr) -> Status {
    LOCKSTEP_RETURN_IF_ERROR(area.Allocate(size, what));
    *mr = ::ibv_reg_mr(pd_, area.get(), size, access);
    if (*mr == nullptr) {
      return Status::ResourceExhausted(
          "registering the " + std::to_string(size) + "-byte " + what + " with " + name +
          " failed: " + Errno(errno) +
          ": raise RLIMIT_MEMLOCK (ulimit -l) or lower RdmaOptions::ring_bytes/bounce_bytes");
    }
    return Status::Ok();
  };
  LOCKSTEP_RETURN_IF_ERROR(register_area(ring_, options_.ring_bytes,
                                         IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE,
                                         "receive ring", &ring_mr_));
  LOCKSTEP_RETURN_IF_ERROR(register_area(bounce_, options_.bounce_bytes, IBV_ACCESS_LOCAL_WRITE,
                                         "bounce buffer", &bounce_mr_));
  LOCKSTEP_RETURN_IF_ERROR(register_area(control_,
                                         size_t{receive_slots_ + send_depth_} * kControlSlotBytes,
                                         IBV_ACCESS_LOCAL_WRITE, "control buffer", &control_mr_));

  comp_ = ::ibv_create_comp_channel(context_);
  if (comp_ == nullptr) return Status::FromErrno("ibv_create_comp_channel(" + name + ")", errno);
  LOCKSTEP_RETURN_IF_ERROR(SetNonBlocking(comp_->fd, "completion channel"));
  LOCKSTEP_RETURN_IF_ERROR(SetNonBlocking(context_->async_fd, "async event channel"));
  int cqe =
      static_cast<int>(std::min<uint64_t>(uint64_t{send_depth_} + receive_slots_ + 16,
                                          static_cast<uint64_t>(std::max(device_attr.max_cqe, 1))));
  cq_ = ::ibv_create_cq(context_, cqe, nullptr, comp_, 0);
  if (cq_ == nullptr) return Status::FromErrno("ibv_create_cq(" + name + ")", errno);

  ibv_qp_init_attr init{};
  init.send_cq = cq_;
  init.recv_cq = cq_;
  init.qp_type = IBV_QPT_RC;
  init.sq_sig_all = 0;
  init.cap.max_send_wr = send_depth_;
  init.cap.max_recv_wr = receive_slots_;
  init.cap.max_send_sge =
      static_cast<uint32_t>(std::clamp<int>(device_attr.max_sge, 1, static_cast<int>(kMaxSges)));
  init.cap.max_recv_sge = 1;
  qp_ = ::ibv_create_qp(pd_, &init);
  if (qp_ == nullptr) return Status::FromErrno("ibv_create_qp(" + name + ", RC)", errno);
  max_sge_ = std::clamp<uint32_t>(init.cap.max_send_sge, 1, kMaxSges);

  ibv_qp_attr attr{};
  attr.qp_state = IBV_QPS_INIT;
  attr.pkey_index = 0;
  attr.port_num = options_.port;
  attr.qp_access_flags = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE;
  if (int rc = ::ibv_modify_qp(
          qp_, &attr, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS);
      rc != 0) {
    return Status::IoError("ibv_modify_qp to INIT on " + name + ": " + Errno(rc));
  }
  for (uint32_t i = 0; i < receive_slots_; ++i) LOCKSTEP_RETURN_IF_ERROR(PostReceive(i));
  if (int rc = ::ibv_req_notify_cq(cq_, 0); rc != 0) {
    return Status::IoError("ibv_req_notify_cq on " + name + ": " + Errno(rc));
  }

  signalled_.resize(send_depth_);
  arrived_.resize(own_credits_);
  std::random_device random;
  psn_ = random() & 0xffffff;
  return Status::Ok();
}

Hello RdmaChannel::LocalHello() const {
  Hello hello;
  hello.version = options_.protocol_version;
  hello.qpn = qp_->qp_num;
  hello.psn = psn_;
  hello.gid = gid_;
  hello.lid = port_.lid;
  hello.mtu = static_cast<uint8_t>(port_.active_mtu);
  hello.link_layer = port_.link_layer;
  hello.ring_rkey = ring_mr_->rkey;
  hello.ring_addr = reinterpret_cast<uintptr_t>(ring_.get());
  hello.ring_bytes = ring_.size();
  hello.credits = own_credits_;
  return hello;
}

Status RdmaChannel::ConnectQp(const Hello& remote) {
  if (remote.ring_bytes < kMinBufferBytes || remote.credits == 0 || remote.mtu < IBV_MTU_256 ||
      remote.mtu > IBV_MTU_4096) {
    return Status::Corruption("the rdma hello of " + peer_ + " is malformed (ring of " +
                              std::to_string(remote.ring_bytes) + " bytes, " +
                              std::to_string(remote.credits) + " credits, mtu enum " +
                              std::to_string(remote.mtu) + ")");
  }
  peer_ring_addr_ = remote.ring_addr;
  peer_ring_rkey_ = remote.ring_rkey;
  peer_ring_bytes_ = remote.ring_bytes;
  credits_ = std::min(own_credits_, remote.credits);

  const std::string name = ::ibv_get_device_name(context_->device);
  ibv_qp_attr attr{};
  attr.qp_state = IBV_QPS_RTR;
  attr.path_mtu = static_cast<ibv_mtu>(std::min<int>(port_.active_mtu, remote.mtu));
  attr.dest_qp_num = remote.qpn;
  attr.rq_psn = remote.psn;
  attr.max_dest_rd_atomic = 1;
  attr.min_rnr_timer = kMinRnrTimer;
  attr.ah_attr.port_num = options_.port;
  attr.ah_attr.dlid = remote.lid;
  attr.ah_attr.sl = 0;
  if (port_.link_layer == IBV_LINK_LAYER_ETHERNET) {
    attr.ah_attr.is_global = 1;
    attr.ah_attr.grh.dgid = remote.gid;
    attr.ah_attr.grh.sgid_index = static_cast<uint8_t>(gid_index_);
    attr.ah_attr.grh.hop_limit = 64;
  }
  if (int rc =
          ::ibv_modify_qp(qp_, &attr,
                          IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN |
                              IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER);
      rc != 0) {
    return Status::IoError("ibv_modify_qp to RTR on " + name + " towards " + peer_ + ": " +
                           Errno(rc) + " (is the peer's GID reachable from GID index " +
                           std::to_string(gid_index_) + "? set RdmaOptions::gid_index)");
  }
  attr = {};
  attr.qp_state = IBV_QPS_RTS;
  attr.timeout = kAckTimeout;
  attr.retry_cnt = kRetryCount;
  attr.rnr_retry = kRnrRetryForever;
  attr.sq_psn = psn_;
  attr.max_rd_atomic = 1;
  if (int rc = ::ibv_modify_qp(qp_, &attr,
                               IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
                                   IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC);
      rc != 0) {
    return Status::IoError("ibv_modify_qp to RTS on " + name + ": " + Errno(rc));
  }
  return Status::Ok();
}

Status RdmaChannel::Start(UniqueFd socket) {
  Result<UniqueFd> wake = MakeWakeFd();
  if (!wake.ok()) return wake.status();
  socket_ = socket.release();
  wake_fd_ = wake->release();
  last_heard_.store(Clock::now().time_since_epoch().count());
  progress_ = std::thread([this] { Progress(); });
  return Status::Ok();
}

Status RdmaChannel::PostReceive(uint32_t slot) {
  ibv_sge sge{reinterpret_cast<uintptr_t>(ReceiveSlot(slot)), kControlSlotBytes, control_mr_->lkey};
  ibv_recv_wr wr{};
  wr.wr_id = slot;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  ibv_recv_wr* bad = nullptr;
  if (int rc = ::ibv_post_recv(qp_, &wr, &bad); rc != 0) {
    return Status::PeerLost("posting a receive request for " + peer_ + " failed: " + Errno(rc));
  }
  return Status::Ok();
}

Status RdmaChannel::RegisterMemory(const void* base, size_t len) {
  if (base == nullptr || len == 0) {
    return Status::InvalidArgument("RegisterMemory needs a non-empty region");
  }
  std::lock_guard lock(register_mu_);
  size_t count = region_count_.load(std::memory_order_relaxed);
  if (count == kMaxRegions) {
    return Status::ResourceExhausted("an rdma channel registers at most " +
                                     std::to_string(kMaxRegions) +
                                     " regions: register fewer, larger buffers");
  }
  // Read-only access is enough for a source of RDMA writes, and works for const memory.
  ibv_mr* mr = ::ibv_reg_mr(pd_, const_cast<void*>(base), len, 0);
  if (mr == nullptr) {
    return Status::ResourceExhausted("registering " + std::to_string(len) +
                                     " bytes for rdma sends failed: " + Errno(errno) +
                                     ": raise RLIMIT_MEMLOCK (ulimit -l)");
  }
  auto begin = reinterpret_cast<uintptr_t>(base);
  regions_[count] = {begin, begin + len, mr->lkey, mr};
  region_count_.store(count + 1, std::memory_order_release);
  return Status::Ok();
}

const RdmaChannel::Region* RdmaChannel::FindRegion(const uint8_t* p) {
  auto address = reinterpret_cast<uintptr_t>(p);
  size_t count = region_count_.load(std::memory_order_acquire);
  if (last_region_ < count && regions_[last_region_].begin <= address &&
      address < regions_[last_region_].end) {
    return &regions_[last_region_];
  }
  for (size_t i = 0; i < count; ++i) {
    if (regions_[i].begin <= address && address < regions_[i].end) {
      last_region_ = i;
      return &regions_[i];
    }
  }
  return nullptr;
}

bool RdmaChannel::AppendSge(const uint8_t* addr, size_t size, uint32_t lkey) {
  auto address = reinterpret_cast<uintptr_t>(addr);
  if (sge_count_ > 0) {
    ibv_sge& last = sges_[sge_count_ - 1];
    if (last.lkey == lkey && last.addr + last.length == address) {
      last.length += static_cast<uint32_t>(size);
      return true;
    }
  }
  if (sge_count_ == max_sge_) return false;
  sges_[sge_count_++] = {address, static_cast<uint32_t>(size), lkey};
  return true;
}

Status RdmaChannel::UsableLocked(bool fail_when_peer_gone) const {
  if (aborted_.load(std::memory_order_acquire)) return AbortedStatus();
  if (failed_) return failure_;
  if (fail_when_peer_gone && peer_gone_) {
    return Status::PeerLost("peer " + peer_ + " closed the connection");
  }
  return Status::Ok();
}

template <typename Ready>
Status RdmaChannel::WaitUntil(std::unique_lock<std::mutex>& lock, const Deadline& deadline,
                              Ready ready, bool fail_when_peer_gone) {
  while (true) {
    // What is done is done, even if the channel failed since (a completion and the peer's
    // goodbye handled together).
    if (ready()) return Status::Ok();
    LOCKSTEP_RETURN_IF_ERROR(UsableLocked(fail_when_peer_gone));
    if (deadline.infinite()) {
      state_cv_.wait(lock);
    } else if (state_cv_.wait_until(lock, deadline.when()) == std::cv_status::timeout) {
      LOCKSTEP_RETURN_IF_ERROR(UsableLocked(fail_when_peer_gone));
      if (ready()) return Status::Ok();
      return Status::TimedOut("rdma channel to " + peer_ + ": timed out");
    }
  }
}

Status RdmaChannel::Fail(Status error, bool keep_arrived) {
  std::lock_guard lock(state_mu_);
  return FailLocked(std::move(error), keep_arrived);
}

Status RdmaChannel::FailLocked(Status error, bool keep_arrived) {
  if (aborted_.load(std::memory_order_acquire)) return AbortedStatus();
  // A local failure that ends delivery (a message that did not fit) ends it even after the
  // peer's loss had left the arrived messages readable.
  if (failed_ && !keep_arrived) keep_arrived_ = false;
  if (!failed_) {
    failed_ = true;
    keep_arrived_ = keep_arrived;
    failure_ = error.code() == Status::Code::kPeerLost ? error : Status::PeerLost(error.message());
    ::shutdown(socket_, SHUT_RDWR);
    ibv_qp_attr attr{};
    attr.qp_state = IBV_QPS_ERR;
    ::ibv_modify_qp(qp_, &attr, IBV_QP_STATE);
    state_cv_.notify_all();
  }
  return error;
}

void RdmaChannel::Abort() {
  if (aborted_.exchange(true)) return;
  ::shutdown(socket_, SHUT_RDWR);
  ibv_qp_attr attr{};
  attr.qp_state = IBV_QPS_ERR;
  ::ibv_modify_qp(qp_, &attr, IBV_QP_STATE);
  Signal(wake_fd_);
  { std::lock_guard lock(state_mu_); }  // a waiter between its check and its wait sees it
  state_cv_.notify_all();
}

Status RdmaChannel::PostWrite(bool last, size_t total, uint64_t seq) {
  std::unique_lock lock(state_mu_);
  LOCKSTEP_RETURN_IF_ERROR(WaitUntil(
      lock, Deadline(kForever),
      [&] {
        return wr_posted_ - wr_completed_.load() < send_depth_ &&
               (!last || messages_posted_ - peer_consumed_messages_.load() < credits_);
      },
      /*fail_when_peer_gone=*/true));
  ibv_send_wr wr{};
  wr.wr_id = wr_posted_ + 1;
  wr.sg_list = sges_.data();
  wr.num_sge = static_cast<int>(sge_count_);
  wr.opcode = last ? IBV_WR_RDMA_WRITE_WITH_IMM : IBV_WR_RDMA_WRITE;
  if (last) wr.imm_data = htobe32(static_cast<uint32_t>(total));
  wr.wr.rdma.remote_addr = peer_ring_addr_ + remote_written_ % peer_ring_bytes_;
  wr.wr.rdma.rkey = peer_ring_rkey_;
  const bool signalled = last || wr_uses_bounce_ || SignalNextLocked();
  if (signalled) wr.send_flags = IBV_SEND_SIGNALED;
  ibv_send_wr* bad = nullptr;
  if (int rc = ::ibv_post_send(qp_, &wr, &bad); rc != 0) {
    return FailLocked(
        Status::PeerLost("posting an RDMA write to " + peer_ + " failed: " + Errno(rc)));
  }
  ++wr_posted_;
  work_requests_.fetch_add(1, std::memory_order_relaxed);
  if (signalled) {
    PushSignalledLocked({wr_posted_, last ? seq : 0, wr_uses_bounce_ ? bounce_head_ : kNoBounce});
    last_signalled_ = wr_posted_;
  }
  if (last) ++messages_posted_;
  remote_written_ += wr_bytes_;
  posted_bytes_ = remote_written_;
  sge_count_ = 0;
  wr_bytes_ = 0;
  wr_uses_bounce_ = false;
  return Status::Ok();
}

Status RdmaChannel::Send(std::span<const ConstSlice> gather, uint64_t* seq) {
  size_t total = 0;
  LOCKSTEP_RETURN_IF_ERROR(internal::CheckGather(gather, &total));
  if (total > peer_ring_bytes_) {
    return Status::InvalidArgument("a message of " + std::to_string(total) +
                                   " bytes does not fit the receive ring of " + peer_ + " (" +
                                   std::to_string(peer_ring_bytes_) +
                                   " bytes): raise RdmaOptions::ring_bytes on the receiving end");
  }

  std::lock_guard send_lock(send_mu_);
  {
    std::lock_guard lock(state_mu_);
    LOCKSTEP_RETURN_IF_ERROR(UsableLocked(/*fail_when_peer_gone=*/true));
  }
  const uint64_t message_seq = last_seq_.load(std::memory_order_relaxed) + 1;
  const uint64_t ring = peer_ring_bytes_;
  const uint64_t bounce = bounce_.size();
  const Deadline forever(kForever);

  size_t slice = 0;
  size_t offset = 0;
  size_t remaining = total;
  size_t copied = 0;
  while (remaining > 0) {
    const ConstSlice& current = gather[slice];
    if (offset == current.size) {
      ++slice;
      offset = 0;
      continue;
    }
    const uint8_t* source = static_cast<const uint8_t*>(current.data) + offset;

    // Room in the peer's ring for the request being built: the request's size limit, the
    // ring's end (a request writes one contiguous range) and the peer's free space.
    const uint64_t end = remote_written_ + wr_bytes_;
    const uint64_t ring_room = (wr_bytes_ > 0 && end % ring == 0) ? 0 : ring - end % ring;
    const uint64_t credit_room = ring - (end - peer_consumed_bytes_.load());
    const size_t room =
        static_cast<size_t>(std::min<uint64_t>({kMaxWrBytes - wr_bytes_, ring_room, credit_room}));
    if (room == 0) {
      if (wr_bytes_ > 0) {
        LOCKSTEP_RETURN_IF_ERROR(PostWrite(false, total, message_seq));
      } else {
        std::unique_lock lock(state_mu_);
        LOCKSTEP_RETURN_IF_ERROR(WaitUntil(
            lock, forever, [&] { return remote_written_ - peer_consumed_bytes_.load() < ring; },
            /*fail_when_peer_gone=*/true));
      }
      continue;
    }
    size_t n = std::min(current.size - offset, room);

    if (const Region* region = FindRegion(source); region != nullptr) {
      // Zero-copy: the bytes go straight from the caller's registered memory.
      n = std::min<size_t>(n, region->end - reinterpret_cast<uintptr_t>(source));
      if (!AppendSge(source, n, region->lkey)) {
        LOCKSTEP_RETURN_IF_ERROR(PostWrite(false, total, message_seq));
        continue;
      }
    } else {
      const uint64_t used = bounce_head_ - bounce_tail_.load();
      const size_t available =
          static_cast<size_t>(std::min<uint64_t>(bounce - used, bounce - bounce_head_ % bounce));
      if (available == 0) {
        if (wr_bytes_ > 0) {
          LOCKSTEP_RETURN_IF_ERROR(PostWrite(false, total, message_seq));
        } else {
          std::unique_lock lock(state_mu_);
          LOCKSTEP_RETURN_IF_ERROR(WaitUntil(
              lock, forever, [&] { return bounce_head_ - bounce_tail_.load() < bounce; },
              /*fail_when_peer_gone=*/true));
        }
        continue;
      }
      n = std::min(n, available);
      uint8_t* copy = bounce_.get() + bounce_head_ % bounce;
      if (!AppendSge(copy, n, bounce_mr_->lkey)) {
        LOCKSTEP_RETURN_IF_ERROR(PostWrite(false, total, message_seq));
        continue;
      }
      std::memcpy(copy, source, n);
      bounce_head_ += n;
      copied += n;
      wr_uses_bounce_ = true;
    }
    wr_bytes_ += n;
    offset += n;
    remaining -= n;
  }
  // The last piece always lands in the request still being built.
  LOCKSTEP_RETURN_IF_ERROR(PostWrite(true, total, message_seq));

  last_seq_.store(message_seq, std::memory_order_release);
  zero_copy_bytes_.fetch_add(total - copied, std::memory_order_relaxed);
  bounce_bytes_.fetch_add(copied, std::memory_order_relaxed);
  messages_sent_.fetch_add(1, std::memory_order_relaxed);
  bytes_sent_.fetch_add(total, std::memory_order_relaxed);
  if (seq != nullptr) *seq = message_seq;
  return Status::Ok();
}

Status RdmaChannel::WaitForCompletion(uint64_t seq, std::chrono::microseconds timeout) {
  if (seq <= CompletedThrough()) return Status::Ok();
  std::unique_lock lock(state_mu_);
  if (seq > last_seq_.load(std::memory_order_acquire)) {
    LOCKSTEP_RETURN_IF_ERROR(UsableLocked(/*fail_when_peer_gone=*/true));
    return Status::FailedPrecondition("message " + std::to_string(seq) + " to " + peer_ +
                                      " was never sent");
  }
  Status status = WaitUntil(
      lock, Deadline(timeout), [&] { return CompletedThrough() >= seq; },
      /*fail_when_peer_gone=*/true);
  if (status.code() == Status::Code::kTimedOut) {
    return Status::TimedOut("message " + std::to_string(seq) + " to " + peer_ +
                            " was not acknowledged in time");
  }
  return status;
}

void RdmaChannel::ReturnCreditLocked() {
  if (failed_ || peer_gone_ || aborted_.load()) return;
  if (wr_posted_ - wr_completed_.load() >= send_depth_) {
    credit_pending_ = true;
    return;
  }
  credit_pending_ = false;
  // A failure here shows on the next call; the message that freed the credit was delivered.
  (void)PostCreditNowLocked();
}

Status RdmaChannel::PostCreditNowLocked() {
  const uint64_t index = wr_posted_ + 1;
  uint8_t* slot = SendSlot(index);  // free: request index - send_depth_ has completed
  PutU32(slot, kCreditWord);
  PutU32(slot + 4, 0);
  PutU64(slot + 8, consumed_bytes_);
  PutU64(slot + 16, consumed_messages_);
  ibv_sge sge{reinterpret_cast<uintptr_t>(slot), kCreditBytes, control_mr_->lkey};
  ibv_send_wr wr{};
  wr.wr_id = index;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.opcode = IBV_WR_SEND;
  const bool signalled = SignalNextLocked();
  if (signalled) wr.send_flags = IBV_SEND_SIGNALED;
  ibv_send_wr* bad = nullptr;
  if (int rc = ::ibv_post_send(qp_, &wr, &bad); rc != 0) {
    return FailLocked(
        Status::PeerLost("posting a credit update to " + peer_ + " failed: " + Errno(rc)));
  }
  ++wr_posted_;
  credit_updates_.fetch_add(1, std::memory_order_relaxed);
  if (signalled) {
    PushSignalledLocked({wr_posted_, 0, kNoBounce});
    last_signalled_ = wr_posted_;
  }
  reported_bytes_ = consumed_bytes_;
  reported_messages_ = consumed_messages_;
  return Status::Ok();
}

Status RdmaChannel::Receive(std::span<uint8_t> into, size_t* size,
                            std::chrono::microseconds timeout) {
  uint32_t length = 0;
  uint64_t start = 0;
  {
    std::unique_lock lock(state_mu_);
    const Deadline deadline(timeout);
    // After the peer closed or went away, the whole messages that arrived are delivered.
    while (true) {
      if (aborted_.load(std::memory_order_acquire)) return AbortedStatus();
      if (failed_ && (!keep_arrived_ || arrived_count_ == 0)) return failure_;
      if (arrived_count_ > 0) break;
      if (peer_gone_) return Status::PeerLost("peer " + peer_ + " closed the connection");
      if (deadline.infinite()) {
        state_cv_.wait(lock);
      } else if (state_cv_.wait_until(lock, deadline.when()) == std::cv_status::timeout &&
                 arrived_count_ == 0 && !failed_ && !peer_gone_ && !aborted_.load()) {
        return Status::TimedOut("no message from " + peer_ + " in time");
      }
    }
    length = arrived_[arrived_head_];
    start = consumed_bytes_;
  }
  if (length > into.size()) {
    return Fail(Status::ResourceExhausted(
        "a message of " + std::to_string(length) + " bytes from " + peer_ +
        " does not fit the receive buffer of " + std::to_string(into.size()) + " bytes"));
  }
  // The peer writes nothing here until the credit below returns this space.
  const size_t ring = ring_.size();
  const size_t at = static_cast<size_t>(start % ring);
  const size_t first = std::min<size_t>(length, ring - at);
  std::memcpy(into.data(), ring_.get() + at, first);
  std::memcpy(into.data() + first, ring_.get(), length - first);

  std::unique_lock lock(state_mu_);
  arrived_head_ = (arrived_head_ + 1) % arrived_.size();
  --arrived_count_;
  consumed_bytes_ += length;
  ++consumed_messages_;
  messages_received_.fetch_add(1, std::memory_order_relaxed);
  bytes_received_.fetch_add(length, std::memory_order_relaxed);
  *size = length;
  // Return credit when the ring is empty (so a blocked sender always gets it) or a
  // quarter of a limit came free.
  if (arrived_count_ == 0 || consumed_bytes_ - reported_bytes_ >= ring / 4 ||
      consumed_messages_ - reported_messages_ >= std::max<uint64_t>(credits_ / 4, 1)) {
    ReturnCreditLocked();
  }
  return Status::Ok();
}

void RdmaChannel::Progress() {
  bool side_open = true;
  while (true) {
    int timeout_ms = -1;
    {
      std::lock_guard lock(state_mu_);
      if (goodbye_seen_ && !peer_gone_ && !failed_) {
        auto left = std::chrono::ceil<std::chrono::milliseconds>(goodbye_deadline_ - Clock::now());
        timeout_ms = static_cast<int>(std::max<int64_t>(left.count(), 0));
      }
    }
    pollfd fds[4] = {{wake_fd_, POLLIN, 0},
                     {comp_->fd, POLLIN, 0},
                     {context_->async_fd, POLLIN, 0},
                     {side_open ? socket_ : -1, POLLIN, 0}};
    int n = ::poll(fds, 4, timeout_ms);
    if (n < 0 && errno != EINTR) {
      (void)Fail(Status::PeerLost("the progress thread of the rdma channel to " + peer_ +
                                  " failed: poll: " + Errno(errno)));
      return;
    }
    if (fds[0].revents != 0) return;  // Abort() or the destructor
    if (fds[1].revents != 0) {
      ibv_cq* cq = nullptr;
      void* context = nullptr;
      while (::ibv_get_cq_event(comp_, &cq, &context) == 0) ++unacked_cq_events_;
      if (unacked_cq_events_ >= 64) {
        ::ibv_ack_cq_events(cq_, unacked_cq_events_);
        unacked_cq_events_ = 0;
      }
      ::ibv_req_notify_cq(cq_, 0);
    }
    // Drained after re-arming, so a completion that raced the re-arm is not missed.
    DrainCq();
    if (fds[2].revents != 0) HandleAsyncEvents();
    if (fds[3].revents != 0) side_open = ReadSideChannel();
    std::lock_guard lock(state_mu_);
    CheckGoodbyeLocked();
  }
}

void RdmaChannel::DrainCq() {
  ibv_wc wcs[32];
  while (true) {
    int n = ::ibv_poll_cq(cq_, 32, wcs);
    if (n < 0) {
      (void)Fail(Status::PeerLost("polling the completion queue of the rdma channel to " + peer_ +
                                  " failed"));
      return;
    }
    if (n == 0) return;
    std::lock_guard lock(state_mu_);
    for (int i = 0; i < n; ++i) HandleCompletionLocked(wcs[i]);
    state_cv_.notify_all();
  }
}

void RdmaChannel::HandleCompletionLocked(const ibv_wc& wc) {
  if (wc.status != IBV_WC_SUCCESS) {
    // Flushes after Abort() or a failure are the teardown itself.
    if (aborted_.load() || failed_ || stopping_.load()) return;
    char vendor[16];
    std::snprintf(vendor, sizeof(vendor), "0x%x", wc.vendor_err);
    (void)FailLocked(Status::PeerLost("an RDMA transfer with " + peer_ +
                                      " failed: " + ::ibv_wc_status_str(wc.status) + " (status " +
                                      std::to_string(wc.status) + ", vendor error " + vendor + ")"),
                     /*keep_arrived=*/true);
    return;
  }
  switch (wc.opcode) {
    case IBV_WC_RDMA_WRITE:
    case IBV_WC_SEND:
      // Every request up to this one completed.
      while (signalled_count_ > 0 && signalled_[signalled_head_].wr_index <= wc.wr_id) {
        const Signalled& record = signalled_[signalled_head_];
        wr_completed_.store(record.wr_index);
        if (record.bounce_head != kNoBounce) bounce_tail_.store(record.bounce_head);
        if (record.seq != 0) completed_through_.store(record.seq, std::memory_order_release);
        signalled_head_ = (signalled_head_ + 1) % signalled_.size();
        --signalled_count_;
      }
      if (credit_pending_) ReturnCreditLocked();  // a slot came free for it
      break;
    case IBV_WC_RECV_RDMA_WITH_IMM: {
      const uint32_t length = be32toh(wc.imm_data);
      if (length == 0 || length > ring_.size() ||
          arrived_bytes_ + length - consumed_bytes_ > ring_.size() ||
          arrived_count_ == arrived_.size()) {
        (void)FailLocked(Status::Corruption(
            "peer " + peer_ + " announced a message of " + std::to_string(length) +
            " bytes beyond its credits (ring " + std::to_string(ring_.size()) + " bytes, " +
            std::to_string(arrived_count_) + " messages waiting)"));
        return;
      }
      arrived_[(arrived_head_ + arrived_count_) % arrived_.size()] = length;
      ++arrived_count_;
      ++arrived_messages_;
      arrived_bytes_ += length;
      last_heard_.store(Clock::now().time_since_epoch().count(), std::memory_order_relaxed);
      if (Status s = PostReceive(static_cast<uint32_t>(wc.wr_id)); !s.ok()) (void)FailLocked(s);
      break;
    }
    case IBV_WC_RECV: {
      const uint8_t* slot = ReceiveSlot(static_cast<uint32_t>(wc.wr_id));
      if (wc.byte_len != kCreditBytes || GetU32(slot) != kCreditWord) {
        (void)FailLocked(Status::Corruption("peer " + peer_ + " sent a malformed credit update (" +
                                            std::to_string(wc.byte_len) + " bytes)"));
        return;
      }
      const uint64_t bytes = GetU64(slot + 8);
      const uint64_t messages = GetU64(slot + 16);
      if (bytes > posted_bytes_ || messages > messages_posted_) {
        // It cannot have consumed what was never sent: a corrupt peer, which would
        // otherwise make us overwrite its ring (or wait forever on a count that went back).
        (void)FailLocked(Status::Corruption("peer " + peer_ + " reports having consumed " +
                                            std::to_string(messages) + " messages and " +
                                            std::to_string(bytes) + " bytes; only " +
                                            std::to_string(messages_posted_) + " and " +
                                            std::to_string(posted_bytes_) + " were sent"));
        return;
      }
      if (bytes > peer_consumed_bytes_.load()) peer_consumed_bytes_.store(bytes);
      if (messages > peer_consumed_messages_.load()) peer_consumed_messages_.store(messages);
      if (Status s = PostReceive(static_cast<uint32_t>(wc.wr_id)); !s.ok()) (void)FailLocked(s);
      break;
    }
    default:
      (void)FailLocked(Status::Corruption("unexpected completion opcode " +
                                          std::to_string(wc.opcode) + " on the rdma channel to " +
                                          peer_));
      break;
  }
}

void RdmaChannel::HandleAsyncEvents() {
  ibv_async_event event;
  while (::ibv_get_async_event(context_, &event) == 0) {
    ibv_event_type type = event.event_type;
    const bool other_port = type == IBV_EVENT_PORT_ERR && event.element.port_num != options_.port;
    ::ibv_ack_async_event(&event);
    if (other_port) continue;  // another port's trouble is not this channel's
    switch (type) {
      case IBV_EVENT_QP_FATAL:
      case IBV_EVENT_QP_REQ_ERR:
      case IBV_EVENT_QP_ACCESS_ERR:
      case IBV_EVENT_CQ_ERR:
      case IBV_EVENT_PORT_ERR:
      case IBV_EVENT_DEVICE_FATAL:
        if (!stopping_.load()) {
          (void)Fail(Status::PeerLost("the rdma channel to " + peer_ +
                                      " broke: " + ::ibv_event_type_str(type)),
                     /*keep_arrived=*/true);
        }
        break;
      default:
        break;
    }
  }
}

bool RdmaChannel::ReadSideChannel() {
  uint8_t scratch[64];
  uint8_t* into = side_received_ < kGoodbyeBytes ? side_ + side_received_ : scratch;
  size_t want = side_received_ < kGoodbyeBytes ? kGoodbyeBytes - side_received_ : sizeof(scratch);
  ssize_t n = ::recv(socket_, into, want, 0);
  const int err = errno;
  if (n < 0 && (err == EINTR || err == EAGAIN || err == EWOULDBLOCK)) return true;
  std::lock_guard lock(state_mu_);
  if (n > 0) {
    if (into == scratch) {
      (void)FailLocked(Status::Corruption("peer " + peer_ + " sent data after its goodbye"));
      return false;
    }
    side_received_ += static_cast<size_t>(n);
    if (side_received_ == kGoodbyeBytes) {
      if (GetU32(side_) != kGoodbyeWord) {
        (void)FailLocked(Status::Corruption("peer " + peer_ + " sent garbage on the side channel"));
        return false;
      }
      goodbye_seen_ = true;
      goodbye_messages_ = GetU64(side_ + 8);
      goodbye_deadline_ = Clock::now() + kGoodbyeGrace;
    }
    return true;
  }
  // The end of the side channel (or an error on it): a goodbye made it an orderly close.
  if (!goodbye_seen_ && !stopping_.load()) {
    (void)FailLocked(
        Status::PeerLost(
            n == 0 ? "peer " + peer_ +
                         " went away without closing the connection (it crashed or aborted)"
                   : "the side channel to " + peer_ + " failed: " + Errno(err)),
        /*keep_arrived=*/true);
  }
  return false;
}

void RdmaChannel::CheckGoodbyeLocked() {
  if (!goodbye_seen_ || peer_gone_ || failed_) return;
  if (arrived_messages_ >= goodbye_messages_) {
    peer_gone_ = true;
    state_cv_.notify_all();
  } else if (Clock::now() >= goodbye_deadline_) {
    (void)FailLocked(Status::PeerLost("peer " + peer_ + " closed the connection but " +
                                      std::to_string(goodbye_messages_ - arrived_messages_) +
                                      " of its acknowledged messages never arrived"),
                     /*keep_arrived=*/true);
  }
}

// Makes a channel over the connected `socket`: resources, hello, QP to RTS, READY.
Result<std::unique_ptr<Channel>> Establish(UniqueFd socket, const RdmaOptions& options,
                                           int abort_fd) {
  sockaddr_storage peer_address{};
  socklen_t peer_length = sizeof(peer_address);
  if (::getpeername(socket.get(), reinterpret_cast<sockaddr*>(&peer_address), &peer_length) != 0) {
    return Status::PeerLost("getpeername failed: " + Errno(errno));
  }
  const std::string peer = FormatAddress(peer_address);
  int one = 1;
  ::setsockopt(socket.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  const Deadline deadline(kHandshakeTimeout);

  // The hello's first kHelloFixedBytes (magic, version, length) need no device: both ends
  // send and check them before opening the device and pinning the ring, so a stranger on
  // the port (a scan, a tcp or dpdk endpoint, another version) costs no pinned memory.
  // The bytes on the wire are the same as one whole hello.
  uint8_t hello[kHelloBytes];
  Hello preamble;
  preamble.version = options.protocol_version;
  preamble.Encode(hello);
  LOCKSTEP_RETURN_IF_ERROR(
      WriteAll(socket.get(), hello, kHelloFixedBytes, abort_fd, deadline, peer));

  uint8_t remote[kHelloBytes];
  LOCKSTEP_RETURN_IF_ERROR(
      ReadAll(socket.get(), remote, kHelloFixedBytes, abort_fd, deadline, peer));
  if (std::memcmp(remote, kMagic, sizeof(kMagic)) != 0) {
    return Status::VersionMismatch("peer " + peer +
                                   " does not speak lockstep's rdma protocol (is it a tcp or "
                                   "dpdk endpoint? use the same transport on both replicas)");
  }
  const uint32_t version = GetU32(remote + 8);
  if (version != options.protocol_version) {
    return Status::VersionMismatch("peer " + peer + " speaks rdma protocol version " +
                                   std::to_string(version) + ", this end version " +
                                   std::to_string(options.protocol_version) +
                                   ": run the same lockstep release on both replicas");
  }
  if (GetU32(remote + 12) != kHelloBytes) {
    return Status::Corruption("peer " + peer + " sent an rdma hello of " +
                              std::to_string(GetU32(remote + 12)) + " bytes, expected " +
                              std::to_string(kHelloBytes));
  }
  auto channel = std::make_unique<RdmaChannel>(options, peer);
  LOCKSTEP_RETURN_IF_ERROR(channel->Open());
  channel->LocalHello().Encode(hello);
  LOCKSTEP_RETURN_IF_ERROR(WriteAll(socket.get(), hello + kHelloFixedBytes,
                                    kHelloBytes - kHelloFixedBytes, abort_fd, deadline, peer));
  LOCKSTEP_RETURN_IF_ERROR(ReadAll(socket.get(), remote + kHelloFixedBytes,
                                   kHelloBytes - kHelloFixedBytes, abort_fd, deadline, peer));
  Hello remote_hello;
  remote_hello.DecodeBody(remote);
  LOCKSTEP_RETURN_IF_ERROR(channel->ConnectQp(remote_hello));

  uint8_t ready[4];
  PutU32(ready, kReadyWord);
  LOCKSTEP_RETURN_IF_ERROR(WriteAll(socket.get(), ready, sizeof(ready), abort_fd, deadline, peer));
  uint8_t remote_ready[4];
  LOCKSTEP_RETURN_IF_ERROR(
      ReadAll(socket.get(), remote_ready, sizeof(remote_ready), abort_fd, deadline, peer));
  if (GetU32(remote_ready) != kReadyWord) {
    return Status::Corruption("peer " + peer + " did not confirm the rdma connection");
  }
  LOCKSTEP_RETURN_IF_ERROR(channel->Start(std::move(socket)));
  return std::unique_ptr<Channel>(std::move(channel));
}

class RdmaListener final : public SocketListener {
 public:
  RdmaListener(ListeningSocket listening, UniqueFd wake, RdmaOptions options)
      : SocketListener(std::move(listening), std::move(wake), "rdma"),
        options_(std::move(options)) {}

  // Waits for a TCP connection within `timeout`, then runs the handshake (which has its
  // own bound, kHandshakeTimeout).
  Result<std::unique_ptr<Channel>> Accept(std::chrono::milliseconds timeout) override {
    Result<UniqueFd> accepted = AcceptSocket(timeout);
    if (!accepted.ok()) return accepted.status();
    Result<std::unique_ptr<Channel>> channel = Establish(std::move(*accepted), options_, wake_fd());
    if (channel.ok() || !aborted()) return channel;
    return Status::Aborted("rdma listener on " + address() + " was aborted");
  }

 private:
  const RdmaOptions options_;
};

class RdmaTransport final : public Transport {
 public:
  explicit RdmaTransport(RdmaOptions options) : options_(std::move(options)) {}

  std::string_view name() const override { return "rdma"; }

  Result<std::unique_ptr<Listener>> Listen(std::string_view address) override {
    Result<SocketAddress> parsed = ParseAddress(address, /*allow_port_zero=*/true, "rdma");
    if (!parsed.ok()) return parsed.status();
    LOCKSTEP_RETURN_IF_ERROR(RdmaAvailable(options_));
    const std::string where = "rdma listen on " + std::string(address);
    return MakeSocketListener<RdmaListener>(*parsed, where, nullptr, nullptr, options_);
  }

  // Returns once the listener's Accept() answered the handshake (or `timeout` passed
  // before the TCP connection was made; the handshake has its own bound).
  Result<std::unique_ptr<Channel>> Connect(std::string_view address,
                                           std::chrono::milliseconds timeout) override {
    Result<SocketAddress> parsed = ParseAddress(address, /*allow_port_zero=*/false, "rdma");
    if (!parsed.ok()) return parsed.status();
    LOCKSTEP_RETURN_IF_ERROR(RdmaAvailable(options_));
    const std::string where = "rdma connect to " + std::string(address);
    auto socket = ConnectTo(*parsed, timeout, where);
    if (!socket.ok()) return socket.status();
    return Establish(std::move(*socket), options_, /*abort_fd=*/-1);
  }

 private:
  const RdmaOptions options_;
};

}  // namespace

Result<RdmaCounters> GetRdmaCounters(const Channel& channel) {
  const auto* rdma = dynamic_cast<const RdmaChannel*>(&channel);
  if (rdma == nullptr) {
    return Status::InvalidArgument("GetRdmaCounters: a " + std::string(channel.transport()) +
                                   " channel is not an rdma channel");
  }
  return rdma->counters();
}

Status RdmaAvailable(const RdmaOptions& options) {
  DeviceList devices;
  Result<ibv_device*> device = devices.Find(options);
  if (!device.ok()) return device.status();
  ibv_context* context = ::ibv_open_device(*device);
  if (context == nullptr) {
    return Status::Unsupported("cannot open RDMA device " +
                               std::string(::ibv_get_device_name(*device)) + ": " + Errno(errno) +
                               " (is ib_uverbs loaded, and /dev/infiniband accessible?)");
  }
  ibv_port_attr port{};
  Status status = CheckPort(context, options, &port);
  ::ibv_close_device(context);
  return status;
}

std::unique_ptr<Transport> MakeRdmaTransport(RdmaOptions options) {
  return std::make_unique<RdmaTransport>(std::move(options));
}

}  // namespace lockstep::channel
