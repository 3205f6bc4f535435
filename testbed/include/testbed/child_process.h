// A program run by the test bed, with its output in a log file; killed (SIGKILL) and
// reaped when it goes out of scope.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"

namespace lockstep::testbed {

class ChildProcess {
 public:
  // Runs argv (argv[0] a path) inside network namespace `netns` ("" = this one), stdout and
  // stderr to `log_path`, stdin from /dev/null.
  static Result<std::unique_ptr<ChildProcess>> Start(const std::vector<std::string>& argv,
                                                     const std::string& netns,
                                                     const std::string& log_path);
  ~ChildProcess();  // SIGKILL if still running; removes the log
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  pid_t pid() const { return pid_; }
  std::string Log() const;
  bool WaitForLog(const std::string& text, std::chrono::milliseconds timeout) const;
  void Kill(int signal);  // returns at once
  // True if the process exited within `timeout` (reaped); *status as waitpid's.
  bool WaitExit(std::chrono::milliseconds timeout, int* status);

 private:
  ChildProcess() = default;
  std::string log_path_;
  pid_t pid_ = -1;
};

}  // namespace lockstep::testbed
