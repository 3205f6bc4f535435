#include "admin/qmp.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

namespace lockstep::admin {

Qmp::~Qmp() {
  if (fd_ >= 0) close(fd_);
}

Qmp::Qmp(Qmp&& other) noexcept
    : fd_(other.fd_),
      buffer_(std::move(other.buffer_)),
      events_(std::move(other.events_)),
      keep_events_(other.keep_events_),
      event_handler_(std::move(other.event_handler_)),
      next_id_(other.next_id_) {
  other.fd_ = -1;
}

Qmp& Qmp::operator=(Qmp&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) close(fd_);
    fd_ = other.fd_;
    buffer_ = std::move(other.buffer_);
    events_ = std::move(other.events_);
    keep_events_ = other.keep_events_;
    event_handler_ = std::move(other.event_handler_);
    next_id_ = other.next_id_;
    other.fd_ = -1;
  }
  return *this;
}

Result<Qmp> Qmp::Connect(const std::string& socket_path, std::chrono::milliseconds timeout) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  if (socket_path.size() >= sizeof a.sun_path) {
    return Status::InvalidArgument("QMP socket path too long: " + socket_path);
  }
  std::memcpy(a.sun_path, socket_path.c_str(), socket_path.size() + 1);
  auto deadline = std::chrono::steady_clock::now() + timeout;
  int err = 0;
  for (;;) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return Status::FromErrno("socket", errno);
    if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
      Qmp q(fd);
      auto greeting = q.ReadMessage(deadline);
      if (!greeting.ok()) return greeting.status().WithContext("reading the QMP greeting");
      auto caps = q.Execute("qmp_capabilities");
      if (!caps.ok()) return caps.status();
      return q;
    }
    err = errno;
    close(fd);
    if (std::chrono::steady_clock::now() >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return Status::FromErrno("connecting to QMP at " + socket_path, err);
}

Result<Json> Qmp::ReadMessage(std::chrono::steady_clock::time_point deadline) {
  for (;;) {
    size_t nl = buffer_.find('\n');
    if (nl != std::string::npos) {
      std::string line = buffer_.substr(0, nl);
      buffer_.erase(0, nl + 1);
      Json j = Json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (j.is_discarded()) return Status::Corruption("QMP sent something not JSON: " + line);
      return j;
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return Status::TimedOut("no QMP message in time");
    pollfd p{fd_, POLLIN, 0};
    int r = poll(&p, 1, static_cast<int>(left.count()));
    if (r < 0 && errno != EINTR) return Status::FromErrno("poll on QMP", errno);
    if (r <= 0) continue;
    char buf[4096];
    ssize_t n = read(fd_, buf, sizeof buf);
    if (n == 0) return Status::PeerLost("QEMU closed its QMP socket (did it exit?)");
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno("reading QMP", errno);
    }
    buffer_.append(buf, static_cast<size_t>(n));
  }
}

Result<Json> Qmp::Execute(const std::string& command, const Json& arguments,
                          std::chrono::milliseconds timeout) {
  // An id per command: a reply that comes after its command timed out is recognised as
  // stale and skipped, never taken for the answer to the next command.
  const uint64_t id = ++next_id_;
  Json msg = {{"execute", command}, {"id", id}};
  if (!arguments.empty()) msg["arguments"] = arguments;
  std::string text = msg.dump() + "\n";
  for (size_t off = 0; off < text.size();) {
    ssize_t n = write(fd_, text.data() + off, text.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return Status::FromErrno("writing QMP command " + command, errno);
    off += static_cast<size_t>(n);
  }
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    auto m = ReadMessage(deadline);
    if (!m.ok()) return m.status().WithContext("waiting for the reply to " + command);
    if (m->contains("event")) {
      if (event_handler_) event_handler_(*m);
      if (keep_events_) events_.push_back(std::move(*m));
      continue;
    }
    if (m->value("id", uint64_t{0}) != id) continue;  // a stale reply
    if (m->contains("error")) {
      return Status::FailedPrecondition(command + ": " +
                                        (*m)["error"].value("desc", std::string("error")));
    }
    if (m->contains("return")) return (*m)["return"];
  }
}

Result<Json> Qmp::WaitForEvent(const std::string& name, std::chrono::milliseconds timeout,
                               const std::function<bool(const Json&)>& match) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    while (!events_.empty()) {
      Json e = std::move(events_.front());
      events_.pop_front();
      if (e.value("event", std::string()) == name && (!match || match(e))) return e;
    }
    auto m = ReadMessage(deadline);
    if (!m.ok()) return m.status().WithContext("waiting for QMP event " + name);
    if (m->contains("event")) events_.push_back(std::move(*m));
  }
}

double Qmp::EventTime(const Json& event) {
  const Json& t = event.at("timestamp");
  return t.at("seconds").get<double>() + t.at("microseconds").get<double>() / 1e6;
}

}  // namespace lockstep::admin
