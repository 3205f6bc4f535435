// A client of the guest's workload (guest/workload.cc): one TCP connection, requests back
// to back, every reply checked against the documented checksum chain. The guest's counter
// runs since its boot: a first reply with a counter above 1 (earlier clients) is taken as
// the base the chain is checked from.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "common/status.h"

namespace lockstep::testbed {

// checksum(n) = Chain(checksum(n-1), n, request line), as guest/workload.cc documents it;
// recomputed here independently so that a bug on either side shows as a mismatch.
uint64_t WorkloadChain(uint64_t prev, uint64_t counter, const std::string& line);

// Seconds since the Unix epoch (CLOCK_REALTIME), the clock of QMP event timestamps.
double WallSeconds();

class WorkloadClient {
 public:
  // Connects from namespace `netns` ("" = this one) to ip:port, retrying until
  // `connect_timeout`, then sends requests back to back on its own thread until Stop().
  static Result<std::unique_ptr<WorkloadClient>> Start(const std::string& netns,
                                                       const std::string& ip, int port,
                                                       std::chrono::milliseconds connect_timeout);
  ~WorkloadClient();  // Stop()
  void Stop();

  uint64_t replies() const { return replies_.load(); }
  // Replies that do not follow from the one before (lost, repeated, rolled back, invented).
  uint64_t inconsistent() const { return inconsistent_.load(); }
  // Why the client stopped on its own ("" while it runs or after Stop()).
  std::string error() const;
  // True once `total` replies arrived; false on timeout or if the client failed.
  bool WaitForReplies(uint64_t total, std::chrono::milliseconds timeout) const;

  // Marks a moment (WallSeconds()): FirstReplyAfterMark() then tells when the reply to the
  // first request sent after it arrived, and LongestGapAfterMark() the longest the client
  // waited for a reply after it (a wait that began before the mark counts from the mark).
  double Mark();                       // returns the moment
  double FirstReplyAfterMark() const;  // 0 until then
  double LongestGapAfterMark() const;  // seconds

 private:
  WorkloadClient() = default;
  void Loop();
  int fd_ = -1;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> replies_{0}, inconsistent_{0};
  mutable std::mutex mu_;
  std::string error_;            // GUARDED_BY(mu_)
  double mark_ = 0;              // GUARDED_BY(mu_)
  double first_after_mark_ = 0;  // GUARDED_BY(mu_)
  double longest_gap_ = 0;       // GUARDED_BY(mu_)
};

}  // namespace lockstep::testbed
