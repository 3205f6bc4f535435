// Who is speaking for the guest: a capture on the switch's ports that records every IPv4
// frame a host sends with the guest's source MAC and IP. Two hosts both sending such
// frames after a fault would be two active replicas; the partition tests assert the
// capture never shows that.
#pragma once

#include <array>
#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/status.h"

namespace lockstep::testbed {

struct GuestFrame {
  double at = 0;  // WallSeconds() when captured
  int port = 0;   // index into the ports given to Start()
};

class PortCapture {
 public:
  // Captures, inside `switch_ns`, the frames entering the switch from each of `ports`
  // (switch-side interface names) whose source is `guest_mac` / `guest_ip`.
  static Result<std::unique_ptr<PortCapture>> Start(const std::string& switch_ns,
                                                    const std::vector<std::string>& ports,
                                                    const std::array<uint8_t, 6>& guest_mac,
                                                    const std::string& guest_ip);
  ~PortCapture();  // stops capturing
  PortCapture(const PortCapture&) = delete;
  PortCapture& operator=(const PortCapture&) = delete;

  // Every guest frame so far, in capture order.
  std::vector<GuestFrame> frames() const;
  // Frames from `port` captured at or after `since` (a WallSeconds() value).
  size_t CountFrom(int port, double since = 0) const;
  // True if frames of two ports interleave after `since`: some port sent a frame after
  // another port had already sent one (the moments two replicas both spoke). `*why` says
  // which frames.
  bool Interleaved(double since, std::string* why) const;

 private:
  PortCapture() = default;
  void Run();
  std::vector<int> fds_;
  std::array<uint8_t, 6> mac_{};
  uint32_t ip_ = 0;  // network byte order
  int stop_pipe_[2] = {-1, -1};
  std::thread thread_;
  mutable std::mutex mu_;
  std::vector<GuestFrame> frames_;  // GUARDED_BY(mu_)
};

}  // namespace lockstep::testbed
