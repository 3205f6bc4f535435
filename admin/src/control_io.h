// Line-at-a-time I/O with a deadline on a stream socket, for the control API (control.h).
#pragma once

#include <poll.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <string>

#include "admin/control.h"
#include "common/status.h"

namespace lockstep::admin {

struct FdCloser {
  int fd;
  ~FdCloser() {
    if (fd >= 0) close(fd);
  }
};

inline Status WaitFd(int fd, short events, std::chrono::steady_clock::time_point deadline) {
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return Status::TimedOut("no answer in time");
    pollfd p{fd, events, 0};
    int r = poll(&p, 1, static_cast<int>(left.count()));
    if (r > 0) return Status::Ok();
    if (r < 0 && errno != EINTR) return Status::FromErrno("poll", errno);
  }
}

// Writes `text` and a newline.
inline Status WriteLine(int fd, std::string text, std::chrono::steady_clock::time_point deadline) {
  text += '\n';
  for (size_t off = 0; off < text.size();) {
    LOCKSTEP_RETURN_IF_ERROR(WaitFd(fd, POLLOUT, deadline));
    ssize_t n = ::send(fd, text.data() + off, text.size() - off, MSG_NOSIGNAL);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) return Status::FromErrno("writing to the control socket", errno);
    off += static_cast<size_t>(n);
  }
  return Status::Ok();
}

// Reads up to the first newline (not included); at most kMaxControlMessage bytes.
inline Result<std::string> ReadLine(int fd, std::chrono::steady_clock::time_point deadline) {
  std::string line;
  char buf[4096];
  for (;;) {
    LOCKSTEP_RETURN_IF_ERROR(WaitFd(fd, POLLIN, deadline));
    ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n < 0) return Status::FromErrno("reading the control socket", errno);
    if (n == 0) return Status::PeerLost("the connection closed before a whole line");
    line.append(buf, static_cast<size_t>(n));
    if (auto eol = line.find('\n'); eol != std::string::npos) return line.substr(0, eol);
    if (line.size() > kMaxControlMessage) {
      return Status::InvalidArgument("a control message over " +
                                     std::to_string(kMaxControlMessage) + " bytes");
    }
  }
}

}  // namespace lockstep::admin
