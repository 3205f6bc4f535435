// A QMP client: commands, replies and events over QEMU's unix socket. Used by lockstepd
// to run its VMs and by the test bed. Not thread-safe: one user at a time.
#pragma once

#include <chrono>
#include <deque>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>

#include "common/status.h"

namespace lockstep::admin {

using Json = nlohmann::json;

class Qmp {
 public:
  Qmp() = default;
  ~Qmp();
  Qmp(Qmp&& other) noexcept;
  Qmp& operator=(Qmp&& other) noexcept;

  // Connects to `socket_path` (retrying until `timeout`: QEMU creates it as it starts) and
  // leaves capabilities negotiation mode.
  static Result<Qmp> Connect(const std::string& socket_path, std::chrono::milliseconds timeout);

  // Runs `command`; the "return" member, or the QMP error as kFailedPrecondition with
  // QEMU's description. Events that arrive meanwhile are kept for WaitForEvent.
  Result<Json> Execute(const std::string& command, const Json& arguments = Json::object(),
                       std::chrono::milliseconds timeout = std::chrono::seconds(30));

  // The first event called `name` (since the connection) whose message satisfies `match`
  // (all of it: "event", "data", "timestamp"), consuming it and the events before it.
  Result<Json> WaitForEvent(const std::string& name, std::chrono::milliseconds timeout,
                            const std::function<bool(const Json&)>& match = nullptr);

  // An event's QEMU timestamp as seconds since the Unix epoch (CLOCK_REALTIME).
  static double EventTime(const Json& event);

  // Whether events read while waiting for a reply are kept for WaitForEvent (default).
  // A long-lived user that never waits for events (lockstepd) turns this off: a protected
  // guest stops and resumes ~100 times a second, and each is an event.
  void set_keep_events(bool keep) { keep_events_ = keep; }
  // Called with every event read while waiting for a reply (kept or not), on the caller's
  // thread, inside Execute().
  void set_event_handler(std::function<void(const Json&)> handler) {
    event_handler_ = std::move(handler);
  }

 private:
  explicit Qmp(int fd) : fd_(fd) {}
  Result<Json> ReadMessage(std::chrono::steady_clock::time_point deadline);
  int fd_ = -1;
  std::string buffer_;
  std::deque<Json> events_;
  bool keep_events_ = true;
  std::function<void(const Json&)> event_handler_;
  uint64_t next_id_ = 0;
};

}  // namespace lockstep::admin
