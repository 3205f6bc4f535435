#include "testbed/qemu_vm.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

namespace lockstep::testbed {

Status Parts::Check() const {
  struct stat st;
  if (stat(qemu.c_str(), &st) != 0) {
    return Status::InvalidArgument("no QEMU at '" + qemu +
                                   "': build it with qemu-patches/build-qemu.sh");
  }
  for (const char* f : {"/vmlinuz", "/initrd.gz"}) {
    if (stat((guest_dir + f).c_str(), &st) != 0) {
      return Status::InvalidArgument("no guest " + std::string(f + 1) + " in '" + guest_dir +
                                     "': build it with guest/build-guest.sh");
    }
  }
  if (stat(plugin.c_str(), &st) != 0) {
    return Status::InvalidArgument("no engine plugin at '" + plugin +
                                   "': build it with scripts/build.sh lockstep_plugin");
  }
  return Status::Ok();
}

const std::string& TestPairingKeyFile() {
  static const std::string path = [] {
    char tmpl[] = "/tmp/lockstep-testbed-key-XXXXXX";
    int fd = mkstemp(tmpl);  // 0600, a fresh name: never someone else's file
    std::string p = fd >= 0 ? tmpl : "";
    std::random_device rd;
    std::string hex;
    for (int i = 0; i < 32; ++i) {
      char b[3];
      std::snprintf(b, sizeof b, "%02x", static_cast<unsigned>(rd() & 0xff));
      hex += b;
    }
    if (fd >= 0) {
      if (write(fd, (hex + "\n").data(), hex.size() + 1) != static_cast<ssize_t>(hex.size() + 1))
        p.clear();  // the plugin then says key_file= is required
      close(fd);
      // Removed when the process ends, whatever the outcome.
      static std::string to_remove = p;
      std::atexit([] { unlink(to_remove.c_str()); });
    }
    return p;
  }();
  return path;
}

namespace {
// The settings with the key file among them.
std::string SettingsOf(const LockstepConfig& c) {
  std::string s = c.settings;
  if (!c.key_file.empty()) s += (s.empty() ? "" : ";") + std::string("key_file=") + c.key_file;
  return s;
}
}  // namespace

std::string LockstepObjectArg(const Parts& parts, const LockstepConfig& c) {
  const std::string settings = SettingsOf(c);
  return "lockstep,id=" + c.id + ",plugin=" + parts.plugin + ",role=" + c.role + ",vm=" + c.vm +
         ",host=" + c.host + (c.role == "primary" ? ",peer=" : ",listen=") + c.address +
         ",witness=" + c.witness + (settings.empty() ? "" : ",settings=" + settings);
}

Json LockstepObjectAdd(const Parts& parts, const LockstepConfig& c) {
  Json j = {{"qom-type", "lockstep"}, {"id", c.id}, {"plugin", parts.plugin},
            {"role", c.role},         {"vm", c.vm}, {"host", c.host},
            {"witness", c.witness}};
  j[c.role == "primary" ? "peer" : "listen"] = c.address;
  if (const std::string settings = SettingsOf(c); !settings.empty()) j["settings"] = settings;
  return j;
}

Result<std::unique_ptr<QemuVm>> QemuVm::Launch(const Parts& parts, const VmOptions& o) {
  std::unique_ptr<QemuVm> vm(new QemuVm());
  std::string base = "/tmp/lockstep-" + o.name + "-" + std::to_string(getpid());
  vm->qmp_path_ = base + ".qmp";
  unlink(vm->qmp_path_.c_str());

  std::vector<std::string> args;
  // idle=halt: the AMD E400 idle routine does not survive a TCG save/load
  // (qemu-patches/README.md).
  std::string append = "console=ttyS0 quiet panic=-1 idle=halt lockstep.ip=";
  append += o.tap.empty() ? "10.0.2.15/24" : "10.9.0.10/24";
  if (!o.workload_args.empty()) append += " lockstep.args=\"" + o.workload_args + "\"";
  for (std::string a : {parts.qemu,
                        std::string("-L"),
                        std::string("/usr/share/qemu"),
                        std::string("-L"),
                        std::string("/usr/share/seabios"),
                        std::string("-accel"),
                        std::string("tcg"),
                        std::string("-m"),
                        o.memory_mib,
                        std::string("-smp"),
                        std::to_string(o.smp),
                        std::string("-nographic"),
                        std::string("-kernel"),
                        parts.guest_dir + "/vmlinuz",
                        std::string("-initrd"),
                        parts.guest_dir + "/initrd.gz",
                        std::string("-append"),
                        append,
                        std::string("-qmp"),
                        "unix:" + vm->qmp_path_ + ",server=on,wait=off",
                        std::string("-device"),
                        std::string("virtio-net-pci,netdev=n0,romfile=,mac=52:54:00:12:34:56")}) {
    args.push_back(a);
  }
  if (!o.tap.empty()) {
    args.insert(args.end(), {"-netdev", "tap,id=n0,ifname=" + o.tap + ",script=no,downscript=no",
                             "-object", "filter-lockstep,id=f0,netdev=n0,queue=rx"});
  } else if (o.forward_port > 0) {
    args.insert(args.end(), {"-netdev", "user,id=n0,hostfwd=tcp:127.0.0.1:" +
                                            std::to_string(o.forward_port) + "-:7000"});
  } else {
    args.insert(args.end(), {"-netdev", "user,id=n0"});
  }
  if (o.start_paused) args.push_back("-S");
  if (o.exit_on_reboot) args.push_back("-no-reboot");
  args.insert(args.end(), o.extra.begin(), o.extra.end());

  auto child = ChildProcess::Start(args, o.netns, base + ".log");
  if (!child.ok()) return child.status();
  vm->process_ = std::move(*child);
  // QEMU creates its QMP socket early; one that exits first (bad arguments) says why in
  // its log.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  for (;;) {
    auto q = Qmp::Connect(vm->qmp_path_, std::chrono::milliseconds(200));
    if (q.ok()) {
      vm->qmp_ = std::move(*q);
      return vm;
    }
    int status = 0;
    if (vm->WaitExit(std::chrono::milliseconds(0), &status)) {
      return Status::FailedPrecondition("QEMU exited (status " + std::to_string(status) +
                                        ") before its QMP socket opened; its log:\n" + vm->Log());
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      return q.status().WithContext("QEMU '" + o.name + "' (log: " + vm->Log() + ")");
    }
  }
}

QemuVm::~QemuVm() {
  process_.reset();  // SIGKILL, reaped, log removed
  unlink(qmp_path_.c_str());
}

std::string QemuVm::Log() const { return process_->Log(); }

bool QemuVm::WaitForLog(const std::string& text, std::chrono::milliseconds timeout) const {
  return process_->WaitForLog(text, timeout);
}

void QemuVm::Kill() { process_->Kill(SIGKILL); }

bool QemuVm::WaitExit(std::chrono::milliseconds timeout, int* status) {
  return process_->WaitExit(timeout, status);
}

Result<Json> QemuVm::LockstepStatus(const std::string& id) {
  auto r = qmp_.Execute("query-lockstep");
  if (!r.ok()) return r.status();
  for (const Json& o : *r) {
    if (o.value("id", std::string()) == id) return o;
  }
  return Status::FailedPrecondition("query-lockstep lists no object '" + id + "'");
}

Result<Json> QemuVm::WaitForState(const std::string& state, std::chrono::milliseconds timeout,
                                  const std::string& id) {
  return qmp_.WaitForEvent("LOCKSTEP_STATE_CHANGE", timeout, [&](const Json& e) {
    const Json& d = e.at("data");
    return d.value("id", std::string()) == id && d.value("state", std::string()) == state;
  });
}

}  // namespace lockstep::testbed
