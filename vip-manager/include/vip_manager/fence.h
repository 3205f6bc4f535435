// Fencing beyond the witness: an external command (STONITH, e.g. one of fence-agents'
// fence_ipmilan, fence_virsh...) that makes sure the peer host can no longer run the VM.
// The replica that won the token runs it before it goes active; only exit status 0 counts
// as "the peer is fenced" (see ReplicationOptions::fence_peer).
//
// The command is executed directly (no shell) as
//     COMMAND VM PEER_HOST
// with LOCKSTEP_VM, LOCKSTEP_HOST (this host) and LOCKSTEP_PEER_HOST in its environment,
// stdin from /dev/null, stdout and stderr inherited (they land in the host's log). A
// command still running at the deadline is killed (SIGKILL) and counts as a failure.
//
// Thread safety: Run() may be called from any thread; it forks with posix_spawn.
#pragma once

#include <chrono>
#include <string>

#include "common/status.h"

namespace lockstep::vip {

class FenceCommand {
 public:
  // `path` must be an absolute path to an executable file: kInvalidArgument otherwise,
  // said at configuration time rather than during a failover.
  static Result<FenceCommand> Open(std::string path, std::chrono::milliseconds timeout);

  // Runs the command once and waits for it. kFailedPrecondition (with the exit status or
  // signal) if it did not exit 0, kTimedOut if it was killed at the deadline, kIoError if
  // it could not be started.
  Status Run(const std::string& vm, const std::string& host, const std::string& peer_host) const;

  const std::string& path() const { return path_; }

 private:
  FenceCommand(std::string path, std::chrono::milliseconds timeout)
      : path_(std::move(path)), timeout_(timeout) {}
  std::string path_;
  std::chrono::milliseconds timeout_;
};

}  // namespace lockstep::vip
