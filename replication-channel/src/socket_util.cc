#include "socket_util.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <climits>
#include <cstring>

namespace lockstep::channel::internal {

namespace {
constexpr int kListenBacklog = 16;
}  // namespace

std::string Errno(int err) { return std::strerror(err); }

void UniqueFd::reset() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

const timespec* Deadline::Remaining(timespec* ts) const {
  if (infinite_) return nullptr;
  auto left = std::max(when_ - Clock::now(), Clock::duration::zero());
  auto secs = std::chrono::duration_cast<std::chrono::seconds>(left);
  ts->tv_sec = static_cast<time_t>(secs.count());
  ts->tv_nsec = static_cast<long>(std::chrono::nanoseconds(left - secs).count());
  return ts;
}

Result<UniqueFd> MakeWakeFd() {
  int fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (fd < 0) return Status::FromErrno("eventfd", errno);
  return UniqueFd(fd);
}

void Signal(int wake_fd) {
  uint64_t one = 1;
  // Can only fail if the counter would overflow, which a handful of writes cannot do.
  [[maybe_unused]] ssize_t n = ::write(wake_fd, &one, sizeof(one));
}

Status SetNonBlocking(int fd, const char* what) {
  int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0) {
    return Status::FromErrno(std::string("making the ") + what + " non-blocking", errno);
  }
  return Status::Ok();
}

Status WaitFor(int fd, short events, int wake_fd, const Deadline& deadline, const char* what) {
  while (true) {
    pollfd fds[2] = {{fd, events, 0}, {wake_fd, POLLIN, 0}};
    timespec ts;
    int n = ::ppoll(fds, 2, deadline.Remaining(&ts), nullptr);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(std::string("poll while waiting to ") + what, errno);
    }
    if (fds[1].revents != 0) return Status::Aborted(std::string(what) + ": aborted");
    if (fds[0].revents != 0) return Status::Ok();
    return Status::TimedOut(std::string(what) + ": timed out");
  }
}

Result<SocketAddress> ParseAddress(std::string_view address, bool allow_port_zero,
                                   std::string_view transport) {
  auto bad = [&](std::string_view why) {
    return Status::InvalidArgument("bad " + std::string(transport) + " address '" +
                                   std::string(address) + "': " + std::string(why));
  };
  std::string host;
  std::string_view port_text;
  bool v6 = false;
  if (!address.empty() && address.front() == '[') {
    size_t close = address.find(']');
    if (close == std::string_view::npos) return bad("missing ']' after an IPv6 address");
    host = std::string(address.substr(1, close - 1));
    std::string_view rest = address.substr(close + 1);
    if (rest.empty() || rest.front() != ':') return bad("expected ':PORT' after ']'");
    port_text = rest.substr(1);
    v6 = true;
  } else {
    size_t colon = address.rfind(':');
    if (colon == std::string_view::npos) return bad("expected HOST:PORT");
    host = std::string(address.substr(0, colon));
    if (host.find(':') != std::string::npos) {
      return bad("an IPv6 address must be written in brackets, as [ADDRESS]:PORT");
    }
    port_text = address.substr(colon + 1);
  }
  if (host.empty()) return bad("missing host");

  unsigned port = 0;
  auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
  if (port_text.empty() || ec != std::errc() || end != port_text.data() + port_text.size() ||
      port > 65535) {
    return bad("the port must be a number from 0 to 65535");
  }
  if (port == 0 && !allow_port_zero) return bad("cannot connect to port 0");

  SocketAddress result;
  if (v6) {
    auto* sin6 = reinterpret_cast<sockaddr_in6*>(&result.storage);
    sin6->sin6_family = AF_INET6;
    sin6->sin6_port = htons(static_cast<uint16_t>(port));
    if (::inet_pton(AF_INET6, host.c_str(), &sin6->sin6_addr) != 1) {
      return bad("'" + host + "' is not a numeric IPv6 address");
    }
    result.length = sizeof(sockaddr_in6);
  } else {
    auto* sin = reinterpret_cast<sockaddr_in*>(&result.storage);
    sin->sin_family = AF_INET;
    sin->sin_port = htons(static_cast<uint16_t>(port));
    if (::inet_pton(AF_INET, host.c_str(), &sin->sin_addr) != 1) {
      return bad("'" + host + "' is not a numeric IPv4 address (host names are not resolved)");
    }
    result.length = sizeof(sockaddr_in);
  }
  return result;
}

std::string FormatAddress(const sockaddr_storage& storage) {
  char text[INET6_ADDRSTRLEN] = {};
  if (storage.ss_family == AF_INET) {
    const auto* sin = reinterpret_cast<const sockaddr_in*>(&storage);
    ::inet_ntop(AF_INET, &sin->sin_addr, text, sizeof(text));
    return std::string(text) + ":" + std::to_string(ntohs(sin->sin_port));
  }
  if (storage.ss_family == AF_INET6) {
    const auto* sin6 = reinterpret_cast<const sockaddr_in6*>(&storage);
    ::inet_ntop(AF_INET6, &sin6->sin6_addr, text, sizeof(text));
    return "[" + std::string(text) + "]:" + std::to_string(ntohs(sin6->sin6_port));
  }
  return "unknown address family " + std::to_string(storage.ss_family);
}

std::chrono::microseconds ToMicros(std::chrono::milliseconds timeout) {
  if (timeout >= std::chrono::duration_cast<std::chrono::milliseconds>(kForever)) return kForever;
  return timeout;
}

Result<ListeningSocket> ListenOn(const SocketAddress& address, const std::string& where,
                                 SocketSetup setup, const void* context) {
  UniqueFd socket(
      ::socket(address.family(), SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, IPPROTO_TCP));
  if (socket.get() < 0) return Status::FromErrno(where + ": socket", errno);
  int one = 1;
  if (::setsockopt(socket.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0) {
    return Status::FromErrno(where + ": setsockopt SO_REUSEADDR", errno);
  }
  if (setup) LOCKSTEP_RETURN_IF_ERROR(setup(socket.get(), context).WithContext(where));
  if (::bind(socket.get(), address.get(), address.length) != 0) {
    return Status::FromErrno(where + ": bind", errno);
  }
  if (::listen(socket.get(), kListenBacklog) != 0) {
    return Status::FromErrno(where + ": listen", errno);
  }
  sockaddr_storage bound{};
  socklen_t bound_length = sizeof(bound);
  if (::getsockname(socket.get(), reinterpret_cast<sockaddr*>(&bound), &bound_length) != 0) {
    return Status::FromErrno(where + ": getsockname", errno);
  }
  return ListeningSocket{std::move(socket), FormatAddress(bound)};
}

Result<UniqueFd> AcceptOn(int listening, int wake_fd, const std::atomic<bool>& aborted,
                          std::chrono::milliseconds timeout, std::string_view transport,
                          const std::string& address) {
  const Deadline deadline(ToMicros(timeout));
  while (true) {
    if (aborted.load(std::memory_order_acquire)) {
      return Status::Aborted(std::string(transport) + " listener on " + address + " was aborted");
    }
    int fd = ::accept4(listening, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd >= 0) return UniqueFd(fd);
    int err = errno;
    if (err == EINTR || err == ECONNABORTED) continue;
    if (err != EAGAIN && err != EWOULDBLOCK) return Status::FromErrno("accept on " + address, err);
    Status waited = WaitFor(listening, POLLIN, wake_fd, deadline, "accept");
    if (waited.code() == Status::Code::kTimedOut) {
      return Status::TimedOut("no connection to " + address + " within " +
                              std::to_string(timeout.count()) + " ms");
    }
    if (!waited.ok() && waited.code() != Status::Code::kAborted) return waited;
  }
}

Result<UniqueFd> ConnectTo(const SocketAddress& address, std::chrono::milliseconds timeout,
                           const std::string& where, SocketSetup setup, const void* context) {
  UniqueFd socket(
      ::socket(address.family(), SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, IPPROTO_TCP));
  if (socket.get() < 0) return Status::FromErrno(where + ": socket", errno);
  if (setup) LOCKSTEP_RETURN_IF_ERROR(setup(socket.get(), context).WithContext(where));
  int err = 0;
  if (::connect(socket.get(), address.get(), address.length) != 0) {
    err = errno;
    if (err == EINPROGRESS || err == EINTR) {
      pollfd pfd = {socket.get(), POLLOUT, 0};
      int n;
      do {
        n = ::poll(&pfd, 1, static_cast<int>(std::clamp<int64_t>(timeout.count(), 0, INT_MAX)));
      } while (n < 0 && errno == EINTR);
      if (n < 0) return Status::FromErrno(where + ": poll", errno);
      if (n == 0) {
        return Status::TimedOut(where + " timed out after " + std::to_string(timeout.count()) +
                                " ms");
      }
      socklen_t len = sizeof(err);
      if (::getsockopt(socket.get(), SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
    }
  }
  switch (err) {
    case 0:
      return socket;
    case ECONNREFUSED:
      return Status::PeerLost(where + " failed: " + Errno(err) + " (is the secondary listening?)");
    case ECONNRESET:
    case ETIMEDOUT:
    case EHOSTUNREACH:
    case ENETUNREACH:
    case EHOSTDOWN:
    case ENETDOWN:
      return Status::PeerLost(where + " failed: " + Errno(err));
    default:
      return Status::FromErrno(where + " failed", err);
  }
}

}  // namespace lockstep::channel::internal
