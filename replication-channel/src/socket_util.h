// Socket plumbing shared by the transports that speak TCP: the TCP transport itself and the
// RDMA transport's side channel. Internal to replication-channel.
#pragma once

#include <poll.h>
#include <sys/socket.h>
#include <time.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <string_view>
#include <utility>

#include "common/status.h"
#include "replication_channel/channel.h"

namespace lockstep::channel::internal {

// Timeouts at least this long wait forever (and cannot overflow a time_point).
inline constexpr std::chrono::microseconds kForever = std::chrono::hours(24 * 365);

std::string Errno(int err);

// Closes a file descriptor when it goes out of scope unless released.
class UniqueFd {
 public:
  explicit UniqueFd(int fd = -1) : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : fd_(other.release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) {
      reset();
      fd_ = other.release();
    }
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }
  void reset();

 private:
  int fd_;
};

// When a wait ends; infinite for very long timeouts (kForever and more).
class Deadline {
 public:
  explicit Deadline(std::chrono::microseconds timeout)
      : infinite_(timeout >= kForever),
        when_(infinite_ ? Clock::time_point::max()
                        : Clock::now() + std::max(timeout, std::chrono::microseconds::zero())) {}

  bool infinite() const { return infinite_; }
  Clock::time_point when() const { return when_; }
  bool passed() const { return !infinite_ && Clock::now() >= when_; }
  // The time left, for ppoll(): nullptr when infinite, else a non-negative span in *ts.
  const timespec* Remaining(timespec* ts) const;

 private:
  bool infinite_;
  Clock::time_point when_;
};

// A non-blocking eventfd; Signal() makes it readable for good (Abort()'s wake-up).
Result<UniqueFd> MakeWakeFd();
void Signal(int wake_fd);

Status SetNonBlocking(int fd, const char* what);

// Waits until `fd` reports `events` (or an error/hang-up, which the next system call on it
// will report), `wake_fd` (if >= 0) becomes readable (kAborted) or `deadline` passes
// (kTimedOut). `what` names the operation for messages.
Status WaitFor(int fd, short events, int wake_fd, const Deadline& deadline, const char* what);

// A parsed "HOST:PORT" / "[V6]:PORT".
struct SocketAddress {
  sockaddr_storage storage{};
  socklen_t length = 0;

  int family() const { return storage.ss_family; }
  const sockaddr* get() const { return reinterpret_cast<const sockaddr*>(&storage); }
};

// Numeric addresses only (host names are not resolved). `transport` names it in messages.
Result<SocketAddress> ParseAddress(std::string_view address, bool allow_port_zero,
                                   std::string_view transport);

// "a.b.c.d:port" or "[v6]:port".
std::string FormatAddress(const sockaddr_storage& storage);

// Applied to a fresh socket before bind() or connect() (socket options). May be empty.
using SocketSetup = Status (*)(int fd, const void* context);

// A non-blocking TCP socket listening on `address` (SO_REUSEADDR; `setup` first), and the
// address it is bound to ("HOST:PORT", the chosen port for port 0). `where` prefixes errors.
struct ListeningSocket {
  UniqueFd socket;
  std::string address;
};
Result<ListeningSocket> ListenOn(const SocketAddress& address, const std::string& where,
                                 SocketSetup setup = nullptr, const void* context = nullptr);

// Accepts one connection on `listening` (non-blocking, close-on-exec), waiting until
// `deadline` (kTimedOut, saying `timeout`), or until `wake_fd` is signalled and `aborted`
// is true (kAborted). `transport` and `address` name the listener in messages.
Result<UniqueFd> AcceptOn(int listening, int wake_fd, const std::atomic<bool>& aborted,
                          std::chrono::milliseconds timeout, std::string_view transport,
                          const std::string& address);

// A non-blocking TCP socket connected to `address` within `timeout` (`setup` first).
// kPeerLost when refused or unreachable ("is the secondary listening?"), kTimedOut past
// `timeout`.
Result<UniqueFd> ConnectTo(const SocketAddress& address, std::chrono::milliseconds timeout,
                           const std::string& where, SocketSetup setup = nullptr,
                           const void* context = nullptr);

// A Listener on a TCP socket: its address, Abort(), and AcceptSocket() for the transport's
// Accept(), which makes the channel of the accepted socket. Thread-safe as Listener says.
class SocketListener : public Listener {
 public:
  SocketListener(ListeningSocket listening, UniqueFd wake, std::string_view transport)
      : socket_(std::move(listening.socket)),
        wake_(std::move(wake)),
        address_(std::move(listening.address)),
        transport_(transport) {}

  std::string address() const override { return address_; }
  void Abort() override {
    if (aborted_.exchange(true)) return;
    Signal(wake_.get());
  }

 protected:
  Result<UniqueFd> AcceptSocket(std::chrono::milliseconds timeout) {
    return AcceptOn(socket_.get(), wake_.get(), aborted_, timeout, transport_, address_);
  }
  int wake_fd() const { return wake_.get(); }
  bool aborted() const { return aborted_.load(std::memory_order_acquire); }

 private:
  const UniqueFd socket_;
  const UniqueFd wake_;  // an eventfd; readable once Abort() ran
  const std::string address_;
  const std::string_view transport_;
  std::atomic<bool> aborted_{false};
};

// Listens on `address` (`where` prefixes errors) and makes a `ListenerType` of it: a
// SocketListener constructed from (ListeningSocket, UniqueFd wake, extra...).
template <typename ListenerType, typename... Extra>
Result<std::unique_ptr<Listener>> MakeSocketListener(const SocketAddress& address,
                                                     const std::string& where, SocketSetup setup,
                                                     const void* context, Extra&&... extra) {
  auto listening = ListenOn(address, where, setup, context);
  if (!listening.ok()) return listening.status();
  Result<UniqueFd> wake = MakeWakeFd();
  if (!wake.ok()) return wake.status().WithContext(where);
  return std::unique_ptr<Listener>(
      new ListenerType(std::move(*listening), std::move(*wake), std::forward<Extra>(extra)...));
}

// `timeout` in microseconds, without overflowing for huge values (milliseconds::max()).
std::chrono::microseconds ToMicros(std::chrono::milliseconds timeout);

}  // namespace lockstep::channel::internal
