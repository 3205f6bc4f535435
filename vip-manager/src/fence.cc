#include "vip_manager/fence.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <thread>
#include <vector>

extern char** environ;

namespace lockstep::vip {

Result<FenceCommand> FenceCommand::Open(std::string path, std::chrono::milliseconds timeout) {
  if (path.empty() || path[0] != '/') {
    return Status::InvalidArgument("the fence command '" + path +
                                   "' must be an absolute path to an executable");
  }
  struct stat st {};
  if (stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode) || access(path.c_str(), X_OK) != 0) {
    return Status::InvalidArgument("the fence command " + path +
                                   " is not an executable file; install it or fix the path");
  }
  if (timeout.count() <= 0) return Status::InvalidArgument("the fence timeout must be positive");
  // Under a seccomp filter (QEMU's -sandbox, libvirt's default, denies spawning and kills
  // the process that tries) the command could never run: say so now, not mid-failover.
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("Seccomp:", 0) == 0 && line.find('2') != std::string::npos) {
      return Status::Unsupported(
          "a fence command cannot run from this process: it runs under a seccomp filter "
          "(QEMU's -sandbox), which forbids starting programs; start QEMU without "
          "-sandbox spawn=deny, or leave fencing to the witness");
    }
  }
  return FenceCommand(std::move(path), timeout);
}

Status FenceCommand::Run(const std::string& vm, const std::string& host,
                         const std::string& peer_host) const {
  std::vector<std::string> env_strings = {"LOCKSTEP_VM=" + vm, "LOCKSTEP_HOST=" + host,
                                          "LOCKSTEP_PEER_HOST=" + peer_host};
  std::vector<char*> envp;
  for (char** e = environ; e && *e; ++e) {
    if (std::strncmp(*e, "LOCKSTEP_", 9) != 0) envp.push_back(*e);
  }
  for (auto& e : env_strings) envp.push_back(e.data());
  envp.push_back(nullptr);
  std::string a0 = path_, a1 = vm, a2 = peer_host;
  char* argv[] = {a0.data(), a1.data(), a2.data(), nullptr};

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  // A clean signal state (the host process may block or ignore signals a fence agent's
  // own timeouts rely on) and a process group of its own, so a timeout kills the agent's
  // children too (an ipmitool left behind could still power the peer off later).
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &all);
  posix_spawnattr_setpgroup(&attr, 0);
  posix_spawnattr_setflags(&attr,
                           POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP);
  pid_t pid = -1;
  int rc = posix_spawn(&pid, path_.c_str(), &actions, &attr, argv, envp.data());
  posix_spawnattr_destroy(&attr);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) {
    return Status::IoError("could not start the fence command " + path_ + ": " + std::strerror(rc));
  }
  const auto deadline = std::chrono::steady_clock::now() + timeout_;
  int status = 0;
  for (;;) {
    pid_t done = waitpid(pid, &status, WNOHANG);
    if (done == pid) break;
    if (done < 0 && errno != EINTR) {
      int err = errno;
      kill(-pid, SIGKILL);
      return Status::IoError("waiting for the fence command " + path_ + ": " + std::strerror(err));
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      kill(-pid, SIGKILL);  // its whole process group
      while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
      return Status::TimedOut("the fence command " + path_ + " did not finish within " +
                              std::to_string(timeout_.count()) + " ms and was killed");
    }
    std::this_thread::sleep_for(std::chrono::microseconds(500));
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return Status::Ok();
  if (WIFEXITED(status)) {
    return Status::FailedPrecondition("the fence command " + path_ + " exited with status " +
                                      std::to_string(WEXITSTATUS(status)));
  }
  return Status::FailedPrecondition("the fence command " + path_ + " was killed by signal " +
                                    std::to_string(WTERMSIG(status)));
}

}  // namespace lockstep::vip
