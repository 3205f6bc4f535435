#include "testbed/workload_client.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <future>

#include "testbed/topology.h"

namespace lockstep::testbed {

uint64_t WorkloadChain(uint64_t prev, uint64_t counter, const std::string& line) {
  uint64_t h = 1469598103934665603ULL;
  auto mix = [&h](const void* p, size_t n) {
    auto* b = static_cast<const unsigned char*>(p);
    for (size_t i = 0; i < n; ++i) {
      h ^= b[i];
      h *= 1099511628211ULL;
    }
  };
  mix(&prev, 8);
  mix(&counter, 8);
  mix(line.data(), line.size());
  return h;
}

double WallSeconds() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
}

namespace {

// Connects from inside `netns`: the namespace is entered by a short-lived thread, and the
// socket it makes stays in that namespace wherever it is used afterwards.
Result<int> ConnectIn(const std::string& netns, const std::string& ip, int port,
                      std::chrono::milliseconds timeout) {
  return InNamespace<int>(netns, [&]() -> Result<int> {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    if (inet_pton(AF_INET, ip.c_str(), &a.sin_addr) != 1) {
      return Status::InvalidArgument("not an IPv4 address: " + ip);
    }
    auto deadline = std::chrono::steady_clock::now() + timeout;
    int err = 0;
    do {
      int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      if (fd < 0) return Status::FromErrno("socket", errno);
      timeval tv{1, 0};
      setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
      if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) return fd;
      err = errno;
      close(fd);
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    } while (std::chrono::steady_clock::now() < deadline);
    return Status::FromErrno(
        "connecting to the guest's workload at " + ip + ":" + std::to_string(port), err);
  });
}

}  // namespace

Result<std::unique_ptr<WorkloadClient>> WorkloadClient::Start(
    const std::string& netns, const std::string& ip, int port,
    std::chrono::milliseconds connect_timeout) {
  auto fd = ConnectIn(netns, ip, port, connect_timeout);
  if (!fd.ok()) return fd.status();
  std::unique_ptr<WorkloadClient> c(new WorkloadClient());
  c->fd_ = *fd;
  int one = 1;
  setsockopt(c->fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  // A reply may take as long as a failover; a wedged connection ends the client.
  timeval tv{30, 0};
  setsockopt(c->fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  c->thread_ = std::thread([p = c.get()] { p->Loop(); });
  return c;
}

WorkloadClient::~WorkloadClient() { Stop(); }

void WorkloadClient::Stop() {
  stop_ = true;
  if (fd_ >= 0) shutdown(fd_, SHUT_RDWR);
  if (thread_.joinable()) thread_.join();
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
}

std::string WorkloadClient::error() const {
  std::lock_guard<std::mutex> lock(mu_);
  return error_;
}

bool WorkloadClient::WaitForReplies(uint64_t total, std::chrono::milliseconds timeout) const {
  auto end = std::chrono::steady_clock::now() + timeout;
  while (replies_.load() < total) {
    if (std::chrono::steady_clock::now() >= end || !error().empty()) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

double WorkloadClient::Mark() {
  std::lock_guard<std::mutex> lock(mu_);
  mark_ = WallSeconds();
  first_after_mark_ = 0;
  longest_gap_ = 0;
  return mark_;
}

double WorkloadClient::FirstReplyAfterMark() const {
  std::lock_guard<std::mutex> lock(mu_);
  return first_after_mark_;
}

double WorkloadClient::LongestGapAfterMark() const {
  std::lock_guard<std::mutex> lock(mu_);
  return longest_gap_;
}

void WorkloadClient::Loop() {
  uint64_t counter = 0, checksum = 0;
  std::string pending;  // bytes of a reply not yet ended by '\n'
  auto fail = [this](const std::string& why) {
    if (stop_.load()) return;
    std::lock_guard<std::mutex> lock(mu_);
    error_ = why;
  };
  for (uint64_t i = 0; !stop_.load(); ++i) {
    std::string line = "req" + std::to_string(i);
    std::string msg = line + "\n";
    double sent = WallSeconds();
    ssize_t wrote;
    do {
      wrote = write(fd_, msg.data(), msg.size());
    } while (wrote < 0 && errno == EINTR && !stop_.load());
    if (wrote != static_cast<ssize_t>(msg.size())) {
      fail("write failed after " + std::to_string(counter) + " replies: " + std::strerror(errno));
      return;
    }
    size_t nl;
    while ((nl = pending.find('\n')) == std::string::npos) {
      char buf[256];
      ssize_t n = read(fd_, buf, sizeof buf);
      // A signal this process got (a child it started exiting, a stop and continue) is not
      // the guest's doing: a socket with SO_RCVTIMEO is never restarted by the kernel.
      if (n < 0 && errno == EINTR && !stop_.load()) continue;
      if (n <= 0) {
        fail(n == 0
                 ? "the guest closed the connection after " + std::to_string(counter) + " replies"
                 : "no reply after " + std::to_string(counter) +
                       " replies: " + std::strerror(errno));
        return;
      }
      pending.append(buf, static_cast<size_t>(n));
    }
    std::string reply = pending.substr(0, nl);
    pending.erase(0, nl + 1);
    double got = WallSeconds();
    unsigned long long c = 0, k = 0;
    bool parsed = std::sscanf(reply.c_str(), "%llu %llu", &c, &k) == 2;
    // The first reply of a connection to a guest that served others before sets the base.
    bool base = i == 0 && parsed && c > 1;
    if (!base && (!parsed || c != counter + 1 || k != WorkloadChain(checksum, counter + 1, line))) {
      ++inconsistent_;
    }
    counter = c;
    checksum = k;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (mark_ > 0 && sent >= mark_ && first_after_mark_ == 0) first_after_mark_ = got;
      // Only the part of a wait that came after the mark counts.
      const double waited = got - std::max(sent, mark_);
      if (mark_ > 0 && got >= mark_ && waited > longest_gap_) longest_gap_ = waited;
    }
    ++replies_;
  }
}

}  // namespace lockstep::testbed
