// One QEMU process running the test guest, with its log and its QMP socket.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "testbed/child_process.h"
#include "testbed/qmp.h"

namespace lockstep::testbed {

// Where the parts are: qemu-patches/build-qemu.sh, guest/build-guest.sh, the engine.
struct Parts {
  std::string qemu;       // qemu-system-x86_64 with the lockstep series
  std::string guest_dir;  // vmlinuz and initrd.gz
  std::string plugin;     // liblockstep_plugin.so
  // kInvalidArgument naming the missing file and the script that makes it.
  Status Check() const;
};

struct VmOptions {
  std::string name;      // for the log and socket file names
  std::string netns;     // run inside this namespace ("" = here)
  std::string tap;       // with netns: the tap, output held by filter-lockstep
  int forward_port = 0;  // without tap: user networking, 127.0.0.1:port -> guest:7000 (0: none)
  std::string memory_mib = "256";
  int smp = 1;
  bool start_paused = false;       // -S (a secondary)
  bool exit_on_reboot = true;      // -no-reboot: a guest panic ends QEMU
  std::string workload_args;       // lockstep.args for the guest's workload
  std::vector<std::string> extra;  // more QEMU arguments
};

// A pairing key file (mode 0600, a random key) shared by every replica this process
// starts, made on first use; as `lockstepctl pair` would give both hosts.
const std::string& TestPairingKeyFile();

// The -object value of a lockstep object (use with "-object" or object-add's JSON below).
struct LockstepConfig {
  std::string role;     // primary | secondary
  std::string address;  // primary: the secondary's HOST:PORT; secondary: where to listen
  std::string host;     // this host's name
  std::string settings = "interval_ms=20;threshold_ms=300";
  std::string id = "ft0";
  std::string vm = "vm1";
  std::string witness = "this-process";         // or "tcp:HOST:PORT" (lockstep-witness)
  std::string key_file = TestPairingKeyFile();  // "" = none (refused by the plugin)
};
std::string LockstepObjectArg(const Parts& parts, const LockstepConfig& c);
Json LockstepObjectAdd(const Parts& parts, const LockstepConfig& c);  // object-add arguments

class QemuVm {
 public:
  // Starts QEMU and connects to its QMP socket.
  static Result<std::unique_ptr<QemuVm>> Launch(const Parts& parts, const VmOptions& options);
  ~QemuVm();  // SIGKILL if still running, removes the log and the socket
  QemuVm(const QemuVm&) = delete;
  QemuVm& operator=(const QemuVm&) = delete;

  Qmp& qmp() { return qmp_; }
  pid_t pid() const { return process_->pid(); }
  std::string Log() const;
  bool WaitForLog(const std::string& text, std::chrono::milliseconds timeout) const;
  // kill -9; returns at once (the process is reaped by WaitExit or the destructor).
  void Kill();
  // True if the process exited within `timeout` (reaped); *status as waitpid's.
  bool WaitExit(std::chrono::milliseconds timeout, int* status);
  // query-lockstep's entry for object `id`, or an error naming what QMP said.
  Result<Json> LockstepStatus(const std::string& id = "ft0");
  // Waits for a LOCKSTEP_STATE_CHANGE to `state` for object `id`.
  Result<Json> WaitForState(const std::string& state, std::chrono::milliseconds timeout,
                            const std::string& id = "ft0");

 private:
  QemuVm() = default;
  std::unique_ptr<ChildProcess> process_;
  std::string qmp_path_;
  Qmp qmp_;
};

}  // namespace lockstep::testbed
