// The TCP transport (see tcp.h for the wire format and socket options).
//
// Every socket is non-blocking; a call that has to wait does so in ppoll() on the socket
// and on an eventfd that Abort() signals, so Abort() wakes blocked calls on any kernel.
// Send() and Receive() pass caller memory straight to sendmsg()/recv() and allocate
// nothing on success.

#include "replication_channel/tcp.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <climits>
#include <cstring>
#include <ctime>
#include <mutex>
#include <string>
#include <utility>

#include "common/pi_mutex.h"
#include "gather.h"
#include "socket_util.h"

namespace lockstep::channel {

namespace {

using namespace internal;

constexpr size_t kFrameHeaderBytes = 4;
// Most iovecs one sendmsg() takes.
constexpr size_t kIovBatch = IOV_MAX;
Status SetIntOption(int fd, int level, int name, int value, const char* what) {
  if (::setsockopt(fd, level, name, &value, sizeof(value)) != 0) {
    return Status::FromErrno(std::string("setsockopt ") + what, errno);
  }
  return Status::Ok();
}

// Buffer sizes; set on listeners too so that accepted sockets inherit them before the
// handshake fixes the TCP window scale. A non-positive size keeps the kernel's default.
Status SetBufferSizes(int fd, const TcpOptions& options) {
  if (options.socket_buffer_bytes <= 0) return Status::Ok();
  LOCKSTEP_RETURN_IF_ERROR(
      SetIntOption(fd, SOL_SOCKET, SO_SNDBUF, options.socket_buffer_bytes, "SO_SNDBUF"));
  return SetIntOption(fd, SOL_SOCKET, SO_RCVBUF, options.socket_buffer_bytes, "SO_RCVBUF");
}

// The options of a connected (or connecting) socket.
Status ConfigureStreamSocket(int fd, const TcpOptions& options) {
  LOCKSTEP_RETURN_IF_ERROR(SetIntOption(fd, IPPROTO_TCP, TCP_NODELAY, 1, "TCP_NODELAY"));
  LOCKSTEP_RETURN_IF_ERROR(SetIntOption(fd, SOL_SOCKET, SO_KEEPALIVE, 0, "SO_KEEPALIVE"));
  return SetBufferSizes(fd, options);
}

Status SetupListener(int fd, const void* options) {
  return SetBufferSizes(fd, *static_cast<const TcpOptions*>(options));
}
Status SetupConnecting(int fd, const void* options) {
  return ConfigureStreamSocket(fd, *static_cast<const TcpOptions*>(options));
}

class TcpChannel final : public Channel {
 public:
  TcpChannel(UniqueFd socket, UniqueFd wake, std::string peer)
      : fd_(socket.release()),
        wake_fd_(wake.release()),
        peer_(std::move(peer)),
        last_heard_(Clock::now().time_since_epoch().count()) {}

  ~TcpChannel() override {
    ::close(fd_);
    ::close(wake_fd_);
  }

  std::string_view transport() const override { return "tcp"; }
  std::string peer() const override { return peer_; }

  // TCP sends straight from any memory; nothing to register.
  Status RegisterMemory(const void* base, size_t len) override {
    if (base == nullptr || len == 0) {
      return Status::InvalidArgument("RegisterMemory needs a non-empty region");
    }
    return Status::Ok();
  }

  Status Send(std::span<const ConstSlice> gather, uint64_t* seq) override;

  uint64_t CompletedThrough() const override {
    return completed_through_.load(std::memory_order_acquire);
  }

  // Sends complete before Send() returns, so there is never anything to wait for.
  Status WaitForCompletion(uint64_t seq, std::chrono::microseconds /*timeout*/) override {
    if (seq <= CompletedThrough()) return Status::Ok();
    LOCKSTEP_RETURN_IF_ERROR(CheckUsable());
    return Status::FailedPrecondition("message " + std::to_string(seq) + " to " + peer_ +
                                      " was never sent");
  }

  Status Receive(std::span<uint8_t> into, size_t* size, std::chrono::microseconds timeout) override;

  Clock::time_point LastHeardFrom() const override {
    return Clock::time_point(Clock::duration(last_heard_.load(std::memory_order_relaxed)));
  }

  void Abort() override {
    if (aborted_.exchange(true)) return;
    ::shutdown(fd_, SHUT_RDWR);
    Signal(wake_fd_);
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
  // OK, kAborted after Abort(), or the kPeerLost recorded by Fail().
  Status CheckUsable() const {
    if (aborted_.load(std::memory_order_acquire)) {
      return Status::Aborted("tcp channel to " + peer_ + " was aborted");
    }
    if (failed_.load(std::memory_order_acquire)) {
      std::lock_guard lock(failure_mu_);
      return failure_;
    }
    return Status::Ok();
  }

  // Marks the connection unusable: tears it down (so the peer notices too) and makes every
  // later call return kPeerLost carrying `error`'s message. Returns `error`, or kAborted
  // when Abort() is what broke the connection.
  Status Fail(Status error) {
    if (aborted_.load(std::memory_order_acquire)) {
      return Status::Aborted("tcp channel to " + peer_ + " was aborted");
    }
    {
      std::lock_guard lock(failure_mu_);
      if (!failed_.load(std::memory_order_relaxed)) {
        failure_ = Status::PeerLost(error.message());
        failed_.store(true, std::memory_order_release);
      }
    }
    ::shutdown(fd_, SHUT_RDWR);
    return error;
  }

  // The Status for a recv() that returned `n` <= 0 with `err` set from errno: OK when
  // the caller should simply retry (after waiting for data until `deadline`), otherwise
  // the error to return.
  Status HandleRecvShortfall(ssize_t n, int err, const Deadline& deadline);

  void NoteHeard() {
    last_heard_.store(Clock::now().time_since_epoch().count(), std::memory_order_relaxed);
  }

  const int fd_;
  const int wake_fd_;  // an eventfd; readable once Abort() ran
  const std::string peer_;

  std::atomic<bool> aborted_{false};
  std::atomic<bool> failed_{false};  // set once, under failure_mu_
  mutable std::mutex failure_mu_;
  Status failure_;  // GUARDED_BY(failure_mu_); kPeerLost once failed_

  std::atomic<Clock::rep> last_heard_;
  std::atomic<uint64_t> completed_through_{0};
  std::atomic<uint64_t> messages_sent_{0};
  std::atomic<uint64_t> bytes_sent_{0};
  std::atomic<uint64_t> messages_received_{0};
  std::atomic<uint64_t> bytes_received_{0};

  // Serializes senders so that messages never interleave on the stream. Priority
  // inheritance: a real-time heartbeat thread waiting here lends its priority to whoever
  // holds the lock (an ACK or an epoch being sent by a normal thread), so a busy host
  // cannot delay the heartbeat behind a preempted sender (a false failover at short
  // thresholds).
  PriorityInheritanceMutex send_mu_;
  uint64_t last_seq_ = 0;      // GUARDED_BY(send_mu_)
  iovec send_iov_[kIovBatch];  // GUARDED_BY(send_mu_); scratch for one sendmsg()

  // State of the message being received, kept across Receive() calls that time out in
  // the middle of it. Only the (single) receiving thread touches these.
  uint8_t header_[kFrameHeaderBytes] = {};
  size_t header_received_ = 0;
  uint32_t payload_size_ = 0;        // valid once header_received_ == kFrameHeaderBytes
  size_t payload_received_ = 0;      // bytes of the payload already in payload_dest_
  uint8_t* payload_dest_ = nullptr;  // the caller's buffer; non-null once the header
                                     // was decoded and the message fits
};

Status TcpChannel::Send(std::span<const ConstSlice> gather, uint64_t* seq) {
  size_t total = 0;
  LOCKSTEP_RETURN_IF_ERROR(internal::CheckGather(gather, &total));

  std::lock_guard lock(send_mu_);
  LOCKSTEP_RETURN_IF_ERROR(CheckUsable());

  const uint8_t header[kFrameHeaderBytes] = {
      static_cast<uint8_t>(total), static_cast<uint8_t>(total >> 8),
      static_cast<uint8_t>(total >> 16), static_cast<uint8_t>(total >> 24)};
  // Cursor: header bytes sent, then (slice index, offset into that slice).
  size_t header_sent = 0;
  size_t slice = 0;
  size_t offset = 0;
  size_t remaining = kFrameHeaderBytes + total;
  const Deadline forever(kForever);

  while (remaining > 0) {
    size_t iov_count = 0;
    if (header_sent < kFrameHeaderBytes) {
      send_iov_[iov_count++] = {const_cast<uint8_t*>(header) + header_sent,
                                kFrameHeaderBytes - header_sent};
    }
    for (size_t i = slice, off = offset; i < gather.size() && iov_count < kIovBatch; ++i, off = 0) {
      if (gather[i].size > off) {
        send_iov_[iov_count++] = {
            const_cast<uint8_t*>(static_cast<const uint8_t*>(gather[i].data)) + off,
            gather[i].size - off};
      }
    }
    msghdr msg{};
    msg.msg_iov = send_iov_;
    msg.msg_iovlen = iov_count;
    ssize_t n = ::sendmsg(fd_, &msg, MSG_NOSIGNAL);
    if (n < 0) {
      int err = errno;
      if (err == EINTR) continue;
      if (err == EAGAIN || err == EWOULDBLOCK) {
        Status waited = WaitFor(fd_, POLLOUT, wake_fd_, forever, "send");
        if (waited.ok()) continue;
        if (waited.code() == Status::Code::kAborted) {
          return Status::Aborted("tcp channel to " + peer_ + " was aborted during a send");
        }
        return Fail(waited);
      }
      return Fail(Status::PeerLost("send to " + peer_ + " failed: " + Errno(err)));
    }

    // Advance the cursor past the n bytes the kernel took.
    size_t taken = static_cast<size_t>(n);
    remaining -= taken;
    size_t header_part = std::min(taken, kFrameHeaderBytes - header_sent);
    header_sent += header_part;
    taken -= header_part;
    while (taken > 0) {
      size_t left_in_slice = gather[slice].size - offset;
      if (taken < left_in_slice) {
        offset += taken;
        taken = 0;
      } else {
        taken -= left_in_slice;
        ++slice;
        offset = 0;
      }
    }
  }

  ++last_seq_;
  completed_through_.store(last_seq_, std::memory_order_release);
  messages_sent_.fetch_add(1, std::memory_order_relaxed);
  bytes_sent_.fetch_add(total, std::memory_order_relaxed);
  if (seq != nullptr) *seq = last_seq_;
  return Status::Ok();
}

Status TcpChannel::HandleRecvShortfall(ssize_t n, int err, const Deadline& deadline) {
  if (aborted_.load(std::memory_order_acquire)) {
    return Status::Aborted("tcp channel to " + peer_ + " was aborted");
  }
  bool mid_message = header_received_ > 0;
  if (n == 0) {
    return Fail(Status::PeerLost(
        mid_message ? "peer " + peer_ + " closed the connection in the middle of a message"
                    : "peer " + peer_ + " closed the connection"));
  }
  if (err == EINTR) return Status::Ok();
  if (err == EAGAIN || err == EWOULDBLOCK) {
    Status waited = WaitFor(fd_, POLLIN, wake_fd_, deadline, "receive");
    if (waited.ok()) return Status::Ok();
    if (waited.code() == Status::Code::kTimedOut) {
      return Status::TimedOut(mid_message ? "no complete message from " + peer_ + " in time"
                                          : "no message from " + peer_ + " in time");
    }
    if (waited.code() == Status::Code::kAborted) {
      return Status::Aborted("tcp channel to " + peer_ + " was aborted");
    }
    return Fail(waited);
  }
  return Fail(Status::PeerLost("receive from " + peer_ + " failed: " + Errno(err)));
}

// REQUIRES: after a kTimedOut in the middle of a message, the next call passes the same
// buffer `into` again (the bytes received so far are already in it); a different buffer
// fails with kFailedPrecondition and makes the channel unusable.
Status TcpChannel::Receive(std::span<uint8_t> into, size_t* size,
                           std::chrono::microseconds timeout) {
  LOCKSTEP_RETURN_IF_ERROR(CheckUsable());
  const Deadline deadline(timeout);

  if (payload_dest_ != nullptr && (into.data() != payload_dest_ || into.size() < payload_size_)) {
    return Fail(Status::FailedPrecondition("Receive() resumed a partly received message from " +
                                           peer_ +
                                           " into a different buffer than the one it started in"));
  }

  while (header_received_ < kFrameHeaderBytes) {
    ssize_t n = ::recv(fd_, header_ + header_received_, kFrameHeaderBytes - header_received_, 0);
    if (n > 0) {
      header_received_ += static_cast<size_t>(n);
      NoteHeard();
      continue;
    }
    LOCKSTEP_RETURN_IF_ERROR(HandleRecvShortfall(n, errno, deadline));
  }

  if (payload_dest_ == nullptr) {
    payload_size_ = static_cast<uint32_t>(header_[0]) | static_cast<uint32_t>(header_[1]) << 8 |
                    static_cast<uint32_t>(header_[2]) << 16 |
                    static_cast<uint32_t>(header_[3]) << 24;
    if (payload_size_ == 0 || payload_size_ > kMaxMessageBytes) {
      return Fail(Status::Corruption("peer " + peer_ + " sent a frame of " +
                                     std::to_string(payload_size_) + " bytes, outside 1.." +
                                     std::to_string(kMaxMessageBytes)));
    }
    if (payload_size_ > into.size()) {
      return Fail(Status::ResourceExhausted(
          "a message of " + std::to_string(payload_size_) + " bytes from " + peer_ +
          " does not fit the receive buffer of " + std::to_string(into.size()) + " bytes"));
    }
    payload_dest_ = into.data();
    payload_received_ = 0;
  }

  while (payload_received_ < payload_size_) {
    ssize_t n =
        ::recv(fd_, payload_dest_ + payload_received_, payload_size_ - payload_received_, 0);
    if (n > 0) {
      payload_received_ += static_cast<size_t>(n);
      NoteHeard();
      continue;
    }
    LOCKSTEP_RETURN_IF_ERROR(HandleRecvShortfall(n, errno, deadline));
  }

  *size = payload_size_;
  messages_received_.fetch_add(1, std::memory_order_relaxed);
  bytes_received_.fetch_add(payload_size_, std::memory_order_relaxed);
  header_received_ = 0;
  payload_dest_ = nullptr;
  payload_received_ = 0;
  return Status::Ok();
}

// Wraps a connected socket into a TcpChannel.
Result<std::unique_ptr<Channel>> MakeChannel(UniqueFd socket, const TcpOptions& options) {
  LOCKSTEP_RETURN_IF_ERROR(ConfigureStreamSocket(socket.get(), options));
  Result<UniqueFd> wake = MakeWakeFd();
  if (!wake.ok()) return wake.status();
  sockaddr_storage peer{};
  socklen_t peer_length = sizeof(peer);
  if (::getpeername(socket.get(), reinterpret_cast<sockaddr*>(&peer), &peer_length) != 0) {
    return Status::PeerLost("getpeername failed: " + Errno(errno));
  }
  return std::unique_ptr<Channel>(
      new TcpChannel(std::move(socket), std::move(*wake), FormatAddress(peer)));
}

class TcpListener final : public SocketListener {
 public:
  TcpListener(ListeningSocket listening, UniqueFd wake, TcpOptions options)
      : SocketListener(std::move(listening), std::move(wake), "tcp"), options_(options) {}

  Result<std::unique_ptr<Channel>> Accept(std::chrono::milliseconds timeout) override {
    Result<UniqueFd> accepted = AcceptSocket(timeout);
    if (!accepted.ok()) return accepted.status();
    return MakeChannel(std::move(*accepted), options_);
  }

 private:
  const TcpOptions options_;
};

class TcpTransport final : public Transport {
 public:
  explicit TcpTransport(TcpOptions options) : options_(options) {}

  std::string_view name() const override { return "tcp"; }

  Result<std::unique_ptr<Listener>> Listen(std::string_view address) override {
    Result<SocketAddress> parsed = ParseAddress(address, /*allow_port_zero=*/true, "tcp");
    if (!parsed.ok()) return parsed.status();
    const std::string where = "listen on " + std::string(address);
    // Buffer sizes on the listener: accepted sockets inherit them before the handshake
    // fixes the TCP window scale.
    return MakeSocketListener<TcpListener>(*parsed, where, &SetupListener, &options_, options_);
  }

  // The socket stays non-blocking after the handshake: every wait of the channel is a
  // ppoll() that Abort() can interrupt.
  Result<std::unique_ptr<Channel>> Connect(std::string_view address,
                                           std::chrono::milliseconds timeout) override {
    Result<SocketAddress> parsed = ParseAddress(address, /*allow_port_zero=*/false, "tcp");
    if (!parsed.ok()) return parsed.status();
    const std::string where = "connect to " + std::string(address);
    // Options before connect(): the receive buffer size decides the handshake's window scale.
    auto socket = ConnectTo(*parsed, timeout, where, &SetupConnecting, &options_);
    if (!socket.ok()) return socket.status();
    return MakeChannel(std::move(*socket), options_);
  }

 private:
  const TcpOptions options_;
};

}  // namespace

std::unique_ptr<Transport> MakeTcpTransport(TcpOptions options) {
  return std::make_unique<TcpTransport>(options);
}

}  // namespace lockstep::channel
