#include "testbed/port_capture.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>

#include "testbed/topology.h"
#include "testbed/workload_client.h"

namespace lockstep::testbed {

Result<std::unique_ptr<PortCapture>> PortCapture::Start(const std::string& switch_ns,
                                                        const std::vector<std::string>& ports,
                                                        const std::array<uint8_t, 6>& guest_mac,
                                                        const std::string& guest_ip) {
  std::unique_ptr<PortCapture> c(new PortCapture());
  c->mac_ = guest_mac;
  if (inet_pton(AF_INET, guest_ip.c_str(), &c->ip_) != 1)
    return Status::InvalidArgument("not an IPv4 address: " + guest_ip);
  // The sockets are made inside the switch's namespace and stay bound to its ports.
  auto fds = InNamespace<std::vector<int>>(switch_ns, [&]() -> Result<std::vector<int>> {
    std::vector<int> out;
    for (const auto& port : ports) {
      // ETH_P_ALL: on a bridge port, only "all protocols" taps see frames before the
      // bridge takes them.
      int fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, htons(ETH_P_ALL));
      if (fd < 0) return Status::FromErrno("AF_PACKET socket (needs CAP_NET_RAW)", errno);
      out.push_back(fd);
      sockaddr_ll sll{};
      sll.sll_family = AF_PACKET;
      sll.sll_protocol = htons(ETH_P_ALL);
      sll.sll_ifindex = static_cast<int>(if_nametoindex(port.c_str()));
      if (sll.sll_ifindex == 0 || bind(fd, reinterpret_cast<sockaddr*>(&sll), sizeof sll) != 0) {
        for (int f : out) close(f);
        return Status::FromErrno("binding a capture to switch port " + port, errno);
      }
    }
    return out;
  });
  if (!fds.ok()) return fds.status();
  c->fds_ = std::move(*fds);
  if (pipe2(c->stop_pipe_, O_CLOEXEC) != 0) return Status::FromErrno("pipe", errno);
  c->thread_ = std::thread([p = c.get()] { p->Run(); });
  return c;
}

PortCapture::~PortCapture() {
  if (thread_.joinable()) {
    char b = 0;
    (void)!write(stop_pipe_[1], &b, 1);
    thread_.join();
  }
  for (int fd : fds_) close(fd);
  for (int fd : stop_pipe_)
    if (fd >= 0) close(fd);
}

void PortCapture::Run() {
  std::vector<pollfd> pfds;
  for (int fd : fds_) pfds.push_back({fd, POLLIN, 0});
  pfds.push_back({stop_pipe_[0], POLLIN, 0});
  uint8_t buf[256];
  for (;;) {
    if (poll(pfds.data(), pfds.size(), -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (pfds.back().revents) return;
    for (size_t i = 0; i + 1 < pfds.size(); ++i) {
      if (!(pfds[i].revents & POLLIN)) continue;
      sockaddr_ll from{};
      socklen_t len = sizeof from;
      ssize_t n =
          recvfrom(fds_[i], buf, sizeof buf, MSG_TRUNC, reinterpret_cast<sockaddr*>(&from), &len);
      // Only frames entering the switch from the host on this port, IPv4 from the guest.
      if (n < 34 || from.sll_pkttype == PACKET_OUTGOING) continue;
      if (std::memcmp(buf + 6, mac_.data(), 6) != 0 || buf[12] != 0x08 || buf[13] != 0x00) continue;
      uint32_t src;
      std::memcpy(&src, buf + 14 + 12, 4);
      if (src != ip_) continue;
      std::lock_guard<std::mutex> lock(mu_);
      frames_.push_back({WallSeconds(), static_cast<int>(i)});
    }
  }
}

std::vector<GuestFrame> PortCapture::frames() const {
  std::lock_guard<std::mutex> lock(mu_);
  return frames_;
}

size_t PortCapture::CountFrom(int port, double since) const {
  std::lock_guard<std::mutex> lock(mu_);
  size_t n = 0;
  for (const auto& f : frames_) n += f.port == port && f.at >= since;
  return n;
}

bool PortCapture::Interleaved(double since, std::string* why) const {
  std::lock_guard<std::mutex> lock(mu_);
  // One pass: a port that handed over (another port spoke after it) must stay silent.
  std::vector<double> retired_at;  // per port: when another took over; 0 = not retired
  int current = -1;
  for (const auto& f : frames_) {
    if (f.at < since) continue;
    if (static_cast<size_t>(f.port) >= retired_at.size()) retired_at.resize(f.port + 1, 0);
    if (retired_at[f.port] != 0) {
      *why = "port " + std::to_string(f.port) + " spoke for the guest at " + std::to_string(f.at) +
             " after port " + std::to_string(current) + " took over at " +
             std::to_string(retired_at[f.port]);
      return true;
    }
    if (current != -1 && f.port != current) retired_at[current] = f.at;
    current = f.port;
  }
  return false;
}

}  // namespace lockstep::testbed
