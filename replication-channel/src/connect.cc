// ConnectWithRetry: one Transport::Connect after another, with exponential backoff.

#include <algorithm>
#include <chrono>
#include <string>
#include <thread>

#include "replication_channel/channel.h"

namespace lockstep::channel {

namespace {

constexpr std::chrono::milliseconds kFirstBackoff{1};
constexpr std::chrono::milliseconds kMaxBackoff{100};
// Each attempt gets the time left until the deadline, but at least this much, so that
// a deadline already past still makes one real attempt.
constexpr std::chrono::milliseconds kMinAttemptTimeout{1};

std::chrono::milliseconds MillisUntil(Clock::time_point deadline) {
  auto left = deadline - Clock::now();
  if (left <= Clock::duration::zero()) return std::chrono::milliseconds::zero();
  // Round up so that a sub-millisecond remainder is not lost.
  return std::chrono::ceil<std::chrono::milliseconds>(left);
}

}  // namespace

Result<std::unique_ptr<Channel>> ConnectWithRetry(Transport& transport, std::string_view address,
                                                  Clock::time_point deadline) {
  auto backoff = kFirstBackoff;
  int attempts = 0;
  while (true) {
    ++attempts;
    auto attempt_timeout = std::max(MillisUntil(deadline), kMinAttemptTimeout);
    Result<std::unique_ptr<Channel>> channel = transport.Connect(address, attempt_timeout);
    if (channel.ok()) return channel;
    Status error = channel.status();
    // A malformed address stays malformed: retrying cannot help.
    if (error.code() == Status::Code::kInvalidArgument) return error;

    auto left = deadline - Clock::now();
    if (left <= Clock::duration::zero()) {
      return error.WithContext(std::string(transport.name()) + " connect to " +
                               std::string(address) + " gave up at the deadline after " +
                               std::to_string(attempts) + " attempt(s); last error");
    }
    std::this_thread::sleep_for(std::min<Clock::duration>(backoff, left));
    backoff = std::min(backoff * 2, kMaxBackoff);
  }
}

}  // namespace lockstep::channel
