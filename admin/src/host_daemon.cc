#include "host_daemon.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>

#include "common/file_util.h"
#include "daemon_log.h"

extern char** environ;

namespace lockstep::admin {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

namespace {

// A DPDK address inside engine settings: '+' for ',' (replication_channel/dpdk.h).
std::string PlusForComma(std::string address) {
  std::replace(address.begin(), address.end(), ',', '+');
  return address;
}

// A link number for a VM's DPDK channel: random, so two VMs on one wire do not share one.
uint32_t RandomLink() {
  static std::mutex mu;
  static std::mt19937 random(std::random_device{}());
  std::lock_guard<std::mutex> lock(mu);
  return 1 + random() % 0x7FFFFFFF;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// Field 22 of /proc/PID/stat (start time in clock ticks since boot); 0 if no such process.
uint64_t StartTime(pid_t pid) {
  std::string stat = ReadFile("/proc/" + std::to_string(pid) + "/stat");
  size_t paren = stat.rfind(')');
  if (paren == std::string::npos) return 0;
  std::istringstream fields(stat.substr(paren + 2));
  std::string field;
  for (int i = 3; i <= 22 && fields >> field; ++i) {
    if (i == 22) return std::strtoull(field.c_str(), nullptr, 10);
  }
  return 0;
}

// The last `max` bytes of a file, for error messages.
std::string Tail(const std::string& path, size_t max = 600) {
  std::string all = ReadFile(path);
  return all.size() > max ? "..." + all.substr(all.size() - max) : all;
}

// Starts `argv` in a session of its own (so it outlives the daemon and its signals),
// stdin from /dev/null, stdout and stderr appended to `log`.
Result<pid_t> SpawnDetached(const std::vector<std::string>& argv, const std::string& log) {
  posix_spawn_file_actions_t actions;
  posix_spawnattr_t attr;
  posix_spawn_file_actions_init(&actions);
  posix_spawnattr_init(&attr);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  // Nothing else of the daemon's: QEMU outlives it, and must not keep its sockets (a port a
  // restarted daemon wants again) whatever a library forgot to mark close-on-exec.
  posix_spawn_file_actions_addclosefrom_np(&actions, 3);
  sigset_t none, defaults;
  sigemptyset(&none);
  sigemptyset(&defaults);
  for (int s : {SIGTERM, SIGINT, SIGHUP, SIGPIPE, SIGCHLD}) sigaddset(&defaults, s);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &defaults);
  posix_spawnattr_setflags(&attr,
                           POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = 0;
  int rc = posix_spawn(&pid, argv[0].c_str(), &actions, &attr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) return Status::FromErrno("starting " + argv[0], rc);
  return pid;
}

Json Fail(const std::string& why) { return {{"api", kControlApi}, {"ok", false}, {"error", why}}; }

// Reads <state>/pairing.json and pairing.key; empty if the host is not paired.
// `stem`: "pairing" (the partner) or "spare".
Result<std::optional<Pairing>> LoadPairing(const std::string& state_dir, const std::string& stem) {
  const std::string info_path = state_dir + "/" + stem + ".json";
  if (access(info_path.c_str(), F_OK) != 0) return std::optional<Pairing>();
  Json info = Json::parse(ReadFile(info_path), nullptr, false);
  Pairing p;
  p.peer_host = info.is_object() ? info.value("peer_host", std::string()) : "";
  p.peer_address = info.is_object() ? info.value("peer_address", std::string()) : "";
  auto id = FromHex<16>(info.is_object() ? info.value("pairing_id", std::string()) : "");
  std::string key_text = ReadFile(state_dir + "/" + stem + ".key");
  while (!key_text.empty() && std::isspace(static_cast<unsigned char>(key_text.back()))) {
    key_text.pop_back();
  }
  auto key = FromHex<32>(key_text);
  if (p.peer_host.empty() || p.peer_address.empty() || !id.ok() || !key.ok()) {
    return Status::Corruption("the pairing in " + state_dir + " (" + stem + ".json, " + stem +
                              ".key) is damaged: pair the hosts again");
  }
  p.pairing_id = *id;
  p.key = *key;
  return std::optional<Pairing>(p);
}

// Writes `p` as <stem>.key and <stem>.json: the key first, as a .json without its key
// would be a damaged pairing.
Status SavePairing(const std::string& state_dir, const std::string& stem, const Pairing& p) {
  LOCKSTEP_RETURN_IF_ERROR(
      WriteFileAtomic(state_dir + "/" + stem + ".key", ToHex(p.key.data(), p.key.size()) + "\n"));
  return WriteFileAtomic(state_dir + "/" + stem + ".json",
                         Json{{"peer_host", p.peer_host},
                              {"peer_address", p.peer_address},
                              {"pairing_id", ToHex(p.pairing_id.data(), p.pairing_id.size())}}
                                 .dump(2) +
                             "\n");
}

}  // namespace

std::string HostDaemon::VmDir(const std::string& name) const {
  return config_.state_dir + "/vms/" + name;
}

Result<std::unique_ptr<HostDaemon>> HostDaemon::Open(const DaemonConfig& config) {
  if (access(config.parts.qemu.c_str(), X_OK) != 0) {
    return Status::FailedPrecondition("no QEMU at " + config.parts.qemu +
                                      ": build it (qemu-patches/build-qemu.sh) or give --qemu");
  }
  std::error_code ec;
  const bool fresh = !fs::exists(config.state_dir, ec);
  fs::create_directories(config.state_dir + "/vms", ec);
  if (ec) {
    return Status::FailedPrecondition("cannot use the state directory " + config.state_dir + ": " +
                                      ec.message());
  }
  // Made root's only when this daemon creates it; an existing directory is the operator's
  // (the key and the definitions inside are 0600 anyway).
  if (fresh) fs::permissions(config.state_dir, fs::perms::owner_all, ec);
  std::unique_ptr<HostDaemon> d(new HostDaemon(config));
  auto pairing = LoadPairing(config.state_dir, "pairing");
  if (!pairing.ok()) return pairing.status();
  d->pairing_ = *pairing;
  auto spare = LoadPairing(config.state_dir, "spare");
  if (!spare.ok()) return spare.status();
  d->spare_ = *spare;
  for (const auto& entry : fs::directory_iterator(config.state_dir + "/vms", ec)) {
    const std::string name = entry.path().filename().string();
    const std::string dir = entry.path().string();
    auto def = ParseVmDefinition(ReadFile(dir + "/definition.json"));
    if (!def.ok()) {
      LogEvent("error", "vm_unreadable", {{"vm", name}, {"why", def.status().message()}});
      continue;
    }
    Vm vm;
    vm.def = *def;
    std::istringstream pidfile(ReadFile(dir + "/qemu.pid"));
    pid_t pid = 0;
    uint64_t start = 0;
    for (auto [file, field] : {std::pair{"/secondary_of", &vm.secondary_of},
                               std::pair{"/protected_with", &vm.protected_with}}) {
      *field = ReadFile(dir + file);
      while (!field->empty() && std::isspace(static_cast<unsigned char>(field->back()))) {
        field->pop_back();
      }
    }
    if (pidfile >> pid >> start && pid > 0 && start > 0 && StartTime(pid) == start) {
      vm.pid = pid;
      vm.starttime = start;
      auto q = Qmp::Connect(dir + "/qmp.sock", 5s);
      if (q.ok()) {
        vm.qmp = std::move(*q);
        d->WatchEvents(name, vm);
      } else {
        vm.note = "QMP does not answer: " + q.status().message();
      }
      LogEvent("info", "vm_adopted", {{"vm", name}, {"pid", std::to_string(pid)}});
    } else {
      unlink((dir + "/qemu.pid").c_str());
    }
    d->vms_.emplace(name, std::move(vm));
  }
  return d;
}

HostDaemon::~HostDaemon() = default;

void HostDaemon::ReapChildren() {
  int status = 0;
  pid_t pid;
  while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [name, vm] : vms_) {
      if (vm.pid != pid) continue;
      LogEvent("warn", "qemu_exited", {{"vm", name}, {"status", std::to_string(status)}});
      vm.note = "QEMU exited on its own (wait status " + std::to_string(status) + "); see " +
                VmDir(name) + "/qemu.log";
      vm.pid = 0;
      vm.qmp.reset();
      unlink((VmDir(name) + "/qemu.pid").c_str());
    }
  }
}

bool HostDaemon::Alive(Vm& vm) {
  if (vm.pid == 0) return false;
  if (StartTime(vm.pid) == vm.starttime) return true;
  vm.note = "QEMU (pid " + std::to_string(vm.pid) + ") is gone";
  vm.pid = 0;
  vm.qmp.reset();
  return false;
}

Result<HostDaemon::Vm*> HostDaemon::Find(const std::string& name) {
  auto it = vms_.find(name);
  if (it == vms_.end()) {
    return Status::FailedPrecondition("no VM named '" + name +
                                      "' on this host (lockstepctl list shows them)");
  }
  return &it->second;
}

Json HostDaemon::Summary(const std::string& name, Vm& vm) {
  Json s = {{"name", name}};
  Json protection = {{"state", "UNPROTECTED"}};
  if (!Alive(vm)) {
    s["state"] = "stopped";
    protection["reason"] = "the VM is not running";
  } else {
    s["pid"] = vm.pid;
    auto st = vm.qmp ? vm.qmp->Execute("query-status", Json::object(), 5s)
                     : Result<Json>(Status::PeerLost(vm.note));
    if (!st.ok()) {
      s["state"] = "unreachable";
      s["note"] = "QMP: " + st.status().message();
      protection["reason"] = "QEMU does not answer on QMP";
    } else {
      s["state"] = st->value("running", false) ? "running" : "paused";
      auto ls = vm.qmp->Execute("query-lockstep", Json::object(), 5s);
      if (ls.ok() && ls->is_array() && !ls->empty()) {
        protection["state"] = (*ls)[0].value("state", std::string("?"));
        protection["reason"] = (*ls)[0].value("reason", std::string());
      } else {
        protection["reason"] = "protection was not started for this VM (lockstepctl protect)";
      }
    }
  }
  if (!vm.note.empty() && !s.contains("note")) s["note"] = vm.note;
  s["protection"] = protection;
  return s;
}

Json HostDaemon::Describe(const std::string& name, Vm& vm) {
  Json s = Summary(name, vm);
  s["memory_mib"] = vm.def.memory_mib;
  s["transport"] = TransportOf(vm.def);
  s["vcpus"] = vm.def.vcpus;
  s["qemu_log"] = VmDir(name) + "/qemu.log";
  // The engine's role changes on this host, newest last (at most 20).
  auto events = Events(name);
  if (events.size() > 20) events.erase(events.begin(), events.end() - 20);
  s["events"] = events;
  s["console_log"] = VmDir(name) + "/console.log";
  if (vm.pid != 0) {
    const long ticks = sysconf(_SC_CLK_TCK);
    std::istringstream up(ReadFile("/proc/uptime"));
    double since_boot = 0;
    up >> since_boot;
    s["uptime_s"] = since_boot - static_cast<double>(vm.starttime) / static_cast<double>(ticks);
    if (vm.qmp) {
      auto ls = vm.qmp->Execute("query-lockstep", Json::object(), 5s);
      if (ls.ok() && ls->is_array() && !ls->empty()) s["lockstep"] = *ls;
    }
  }
  return s;
}

Result<Json> HostDaemon::Define(const Json& definition) {
  if (!definition.is_object()) {
    return Status::InvalidArgument("'definition' must be a VM definition (a JSON object)");
  }
  auto def = ParseVmDefinition(definition.dump());
  if (!def.ok()) return def.status();
  if (vms_.count(def->name)) {
    return Status::FailedPrecondition("a VM named '" + def->name +
                                      "' is already defined here; undefine it first, or pick "
                                      "another name");
  }
  const std::string dir = VmDir(def->name);
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return Status::IoError("creating " + dir + ": " + ec.message());
  Status saved = WriteFileAtomic(dir + "/definition.json", VmDefinitionJson(*def));
  if (!saved.ok()) {
    fs::remove_all(dir, ec);
    return saved;
  }
  Vm vm;
  vm.def = *def;
  auto& placed = vms_.emplace(def->name, std::move(vm)).first->second;
  LogEvent("info", "vm_defined", {{"vm", def->name}});
  return Summary(def->name, placed);
}

Result<Json> HostDaemon::Undefine(const std::string& name) {
  auto vm = Find(name);
  if (!vm.ok()) return vm.status();
  if (busy_.count(name)) {
    return Status::FailedPrecondition("VM '" + name + "' is being protected; wait for that");
  }
  if (Alive(**vm)) {
    return Status::FailedPrecondition("VM '" + name + "' is running (pid " +
                                      std::to_string((*vm)->pid) + "); stop it first");
  }
  std::error_code ec;
  fs::remove_all(VmDir(name), ec);
  if (ec) return Status::IoError("removing " + VmDir(name) + ": " + ec.message());
  vms_.erase(name);
  LogEvent("info", "vm_undefined", {{"vm", name}});
  return Json::object();
}

Result<Json> HostDaemon::Start(const std::string& name) {
  auto found = Find(name);
  if (!found.ok()) return found.status();
  Vm& vm = **found;
  if (Alive(vm)) {
    return Status::FailedPrecondition("VM '" + name + "' is already running (pid " +
                                      std::to_string(vm.pid) + ")");
  }
  if (!vm.secondary_of.empty()) {
    return Status::FailedPrecondition(
        "VM '" + name + "' here is the secondary copy of " + vm.secondary_of +
        "'s VM: started on its own it would be a second VM with the same addresses. It runs "
        "when it takes over; to run it here, undefine it and define it anew");
  }
  return Launch(name, vm, {});
}

Result<Json> HostDaemon::Launch(const std::string& name, Vm& vm,
                                const std::vector<std::string>& extra) {
  const std::string dir = VmDir(name);
  const std::string qmp = dir + "/qmp.sock";
  if (qmp.size() >= sizeof(sockaddr_un::sun_path)) {
    return Status::FailedPrecondition("the state directory's path is too long for a socket (" +
                                      qmp + "); use a shorter --state");
  }
  unlink(qmp.c_str());
  auto argv = QemuCommandLine(vm.def, config_.parts, qmp, dir + "/console.log", extra);
  const std::string log = dir + "/qemu.log";
  { std::ofstream(log, std::ios::app) << "---- lockstepd starts QEMU\n"; }
  auto pid = SpawnDetached(argv, log);
  if (!pid.ok()) return pid.status();
  vm.pid = *pid;
  vm.starttime = StartTime(*pid);
  vm.note.clear();
  Status saved = WriteFileAtomic(
      dir + "/qemu.pid", std::to_string(vm.pid) + " " + std::to_string(vm.starttime) + "\n");
  if (!saved.ok()) {
    kill(vm.pid, SIGKILL);
    vm.pid = 0;
    return saved.WithContext("not starting VM '" + name + "'");
  }
  // QEMU opens its QMP socket early; one that exits first says why in its log.
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  for (;;) {
    auto q = Qmp::Connect(qmp, 200ms);
    if (q.ok()) {
      vm.qmp = std::move(*q);
      WatchEvents(name, vm);
      break;
    }
    int status = 0;
    (void)waitpid(vm.pid, &status, WNOHANG);  // ours; ReapChildren may have been first
    const bool exited = vm.starttime == 0 || StartTime(vm.pid) != vm.starttime;
    if (exited || std::chrono::steady_clock::now() > deadline) {
      if (!exited) kill(vm.pid, SIGKILL);
      vm.pid = 0;
      unlink((dir + "/qemu.pid").c_str());
      return Status::FailedPrecondition("QEMU for VM '" + name +
                                        "' did not come up; its log says:\n" + Tail(log));
    }
  }
  LogEvent("info", "vm_started", {{"vm", name}, {"pid", std::to_string(vm.pid)}});
  return Describe(name, vm);
}

Result<Json> HostDaemon::Stop(const std::string& name, bool force) {
  auto found = Find(name);
  if (!found.ok()) return found.status();
  Vm& vm = **found;
  if (!Alive(vm)) return Status::FailedPrecondition("VM '" + name + "' is not running");
  bool asked = false;
  if (!force && vm.qmp) asked = vm.qmp->Execute("quit", Json::object(), 5s).ok();
  if (!asked) kill(vm.pid, SIGKILL);
  auto deadline = std::chrono::steady_clock::now() + 15s;
  bool killed = !asked;
  for (;;) {
    int status = 0;
    (void)waitpid(vm.pid, &status, WNOHANG);  // ours if this daemon started it
    if (StartTime(vm.pid) != vm.starttime) break;
    if (std::chrono::steady_clock::now() > deadline) {
      if (killed) {
        return Status::FailedPrecondition("QEMU of VM '" + name + "' (pid " +
                                          std::to_string(vm.pid) +
                                          ") does not exit even when killed (stuck in the "
                                          "kernel?); look at the host");
      }
      kill(vm.pid, SIGKILL);  // it did not quit when asked
      asked = false;
      killed = true;
      deadline = std::chrono::steady_clock::now() + 10s;
    }
    std::this_thread::sleep_for(20ms);
  }
  LogEvent("info", "vm_stopped",
           {{"vm", name}, {"pid", std::to_string(vm.pid)}, {"how", asked ? "quit" : "killed"}});
  vm.pid = 0;
  vm.qmp.reset();
  vm.note.clear();
  unlink((VmDir(name) + "/qemu.pid").c_str());
  return Json::object();
}

Status HostDaemon::Ping(const Pairing& pairing, std::chrono::milliseconds connect_timeout,
                        std::chrono::milliseconds answer_timeout) {
  auto ch = ConnectPeer(config_.host_id, pairing, connect_timeout);
  if (!ch.ok()) return ch.status();
  if (!SendJson(**ch, {{"command", "ping"}}).ok()) return Status::PeerLost("the peer closed");
  auto pong = ReceiveJson(**ch, answer_timeout);
  if (!pong.ok()) return pong.status();
  if (!pong->value("ok", false)) {
    return Status::PeerRejected(pong->value("error", std::string("refused")));
  }
  return Status::Ok();
}

bool HostDaemon::PromoteSpare(const std::string& silent_partner) {
  std::optional<Pairing> spare;
  {
    std::lock_guard<std::mutex> lock(pairing_mu_);
    spare = spare_;
  }
  if (!spare) return false;
  if (!Ping(*spare).ok()) return false;  // both gone: keep waiting for either
  std::lock_guard<std::mutex> lock(pairing_mu_);
  if (!spare_ || !pairing_ || pairing_->peer_host != silent_partner) return false;
  Status saved = SavePairing(config_.state_dir, "pairing", *spare_);
  if (!saved.ok()) {
    LogEvent("error", "spare_not_promoted", {{"why", saved.message()}});
    return false;
  }
  unlink((config_.state_dir + "/spare.json").c_str());
  unlink((config_.state_dir + "/spare.key").c_str());
  pairing_ = spare_;
  spare_.reset();
  pairing_note_ = "the spare, paired in place of " + silent_partner + " after it was silent for " +
                  std::to_string(config_.spare_after.count()) + " s";
  LogEvent("warn", "spare_promoted", {{"lost", silent_partner}, {"partner", pairing_->peer_host}});
  return true;
}

void HostDaemon::ReprotectLostVms() {
  auto pairing = CurrentPairing();
  if (!pairing) return;
  std::vector<std::string> lost;
  bool replicating = false;  // some VM here still replicates with the partner
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [name, vm] : vms_) {
      const auto [role, state] = EngineRole(vm);
      if (state == "ACTIVE" || state == "PRIMARY_ALONE") lost.push_back(name);
      replicating = replicating || state == "IDLE" || state == "SYNCING" || state == "PROTECTED" ||
                    state == "PROMOTING";
      // A secondary copy whose engine ended without taking over (its primary ended
      // protection, or it rejected the primary's stream, or lost the token) never runs
      // the guest: shut it down, so that the primary's host can protect the VM here again
      // (it refuses to while the old copy runs). Its definition stays for that.
      if (role == "secondary" && !busy_.count(name) &&
          (state == "STOPPED" || state == "FAILED" || state == "FENCED")) {
        auto stopped = Stop(name, /*force=*/true);
        LogEvent(stopped.ok() ? "info" : "warn", "secondary_reaped",
                 {{"vm", name},
                  {"engine", state},
                  {"why", stopped.ok() ? std::string("its engine ended; it will not run")
                                       : stopped.status().message()}});
      }
    }
  }
  if (lost.empty()) return;
  // Is the other host back? Asked without the VMs' lock: a host that is down costs a
  // timeout, which must not hold up the control API.
  Status back = Ping(*pairing);
  if (back.ok()) {
    partner_silent_since_.reset();
  } else if (!partner_silent_since_) {
    partner_silent_since_ = std::chrono::steady_clock::now();
  } else if (!replicating &&  // only its daemon is silent: the partner is not lost
             std::chrono::steady_clock::now() - *partner_silent_since_ > config_.spare_after &&
             PromoteSpare(pairing->peer_host)) {
    partner_silent_since_.reset();
    pairing = CurrentPairing();
    back = Status::Ok();
  }
  for (const std::string& name : lost) {
    std::string& last = reprotect_errors_[name];
    Result<Json> again = back.ok() ? Protect(name) : Result<Json>(back);
    if (again.ok()) {
      LogEvent("info", "vm_reprotected", {{"vm", name}, {"with", pairing->peer_host}});
      last.clear();
    } else if (again.status().message() != last) {
      last = again.status().message();
      LogEvent("warn", "reprotect_waiting", {{"vm", name}, {"why", last}});
    }
  }
}

void HostDaemon::WatchEvents(const std::string& name, Vm& vm) {
  vm.qmp->set_keep_events(false);
  const std::string log = VmDir(name) + "/events.log";
  vm.qmp->set_event_handler([log](const Json& e) {
    if (e.value("event", std::string()) != "LOCKSTEP_STATE_CHANGE" || !e.contains("data")) return;
    const Json& d = e["data"];
    Json line = {{"at", Qmp::EventTime(e)},
                 {"state", d.value("state", std::string())},
                 {"reason", d.value("reason", std::string())}};
    std::ofstream(log, std::ios::app) << line.dump() << "\n";
  });
}

std::vector<Json> HostDaemon::Events(const std::string& name) {
  std::vector<Json> out;
  std::ifstream in(VmDir(name) + "/events.log");
  for (std::string line; std::getline(in, line);) {
    Json e = Json::parse(line, nullptr, false);
    if (e.is_object()) out.push_back(std::move(e));
  }
  return out;
}

std::string HostDaemon::MetricsText() {
  std::string out;
  auto family = [&out](const char* name, const char* type, const char* help) {
    out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
  };
  auto sample = [&out](const std::string& name, const std::string& labels, double value) {
    char v[64];
    std::snprintf(v, sizeof v, "%.9g", value);
    out += name + "{" + labels + "} " + v + "\n";
  };
  const bool paired = CurrentPairing().has_value();
  std::lock_guard<std::mutex> lock(mu_);
  // One row per VM and family; the engine's numbers where it has an object.
  struct Row {
    std::string labels;
    bool running = false;
    Json engine;  // query-lockstep's entry, or null
  };
  std::vector<Row> rows;
  for (auto& [name, vm] : vms_) {
    Row r;
    r.labels = "vm=\"" + name + "\"";  // VM names are [A-Za-z0-9._-]: nothing to escape
    r.running = Alive(vm);
    if (r.running && vm.qmp) {
      auto ls = vm.qmp->Execute("query-lockstep", Json::object(), 5s);
      if (ls.ok() && ls->is_array() && !ls->empty()) r.engine = (*ls)[0];
    }
    rows.push_back(std::move(r));
  }
  family("lockstep_takeovers_total", "counter",
         "times the VM went on alone here after a fault (ACTIVE or PRIMARY_ALONE), from its "
         "event log");
  for (auto& [name, vm] : vms_) {
    (void)vm;
    int takeovers = 0;
    for (const Json& e : Events(name)) {
      const std::string state = e.value("state", std::string());
      const bool planned =
          e.value("reason", std::string()).find("planned handover") != std::string::npos;
      takeovers += (state == "ACTIVE" && !planned) || state == "PRIMARY_ALONE";
    }
    sample("lockstep_takeovers_total", "vm=\"" + name + "\"", takeovers);
  }
  family("lockstepd_paired", "gauge", "1 if this host is paired with another");
  sample("lockstepd_paired", "host=\"" + config_.host_id + "\"", paired ? 1 : 0);
  family("lockstep_vm_running", "gauge", "1 if the VM's QEMU runs on this host");
  for (const Row& r : rows) sample("lockstep_vm_running", r.labels, r.running ? 1 : 0);
  family("lockstep_protection_state", "gauge",
         "1 for the engine's current state (UNPROTECTED: no engine object)");
  for (const Row& r : rows) {
    const std::string state = r.engine.is_object() ? r.engine.value("state", std::string("?"))
                                                   : std::string("UNPROTECTED");
    const std::string role = r.engine.is_object() ? r.engine.value("role", std::string()) : "";
    sample("lockstep_protection_state", r.labels + ",state=\"" + state + "\",role=\"" + role + "\"",
           1);
  }
  struct Counter {
    const char* metric;
    const char* type;
    const char* help;
    const char* field;
    double scale;
  };
  const Counter counters[] = {
      {"lockstep_epochs_total", "counter", "epochs sent (primary) or applied (secondary)", "epochs",
       1},
      {"lockstep_epoch", "gauge", "the last epoch captured", "epoch", 1},
      {"lockstep_acked_epoch", "gauge", "the last epoch the secondary acknowledged", "acked-epoch",
       1},
      {"lockstep_lag_epochs", "gauge", "epochs captured but not yet acknowledged", "lag-epochs", 1},
      {"lockstep_bytes_total", "counter", "replication bytes sent or received", "bytes", 1},
      {"lockstep_last_pause_seconds", "gauge", "the last checkpoint pause", "last-pause-us", 1e-6},
  };
  for (const Counter& c : counters) {
    family(c.metric, c.type, c.help);
    for (const Row& r : rows) {
      if (r.engine.is_object() && r.engine.contains(c.field)) {
        sample(c.metric, r.labels, r.engine[c.field].get<double>() * c.scale);
      }
    }
  }
  // The engine keeps percentiles over its recent pauses, not buckets: a summary.
  family("lockstep_pause_seconds", "summary", "checkpoint pauses (recent window)");
  family("lockstep_output_held_seconds", "summary",
         "from the end of a pause to its acknowledgement: how long output is held");
  for (const Row& r : rows) {
    if (!r.engine.is_object()) continue;
    for (auto [q, field] : {std::pair{"0.5", "pause-p50-us"}, std::pair{"0.99", "pause-p99-us"}}) {
      if (r.engine.contains(field)) {
        sample("lockstep_pause_seconds", r.labels + ",quantile=\"" + q + "\"",
               r.engine[field].get<double>() * 1e-6);
      }
    }
    if (r.engine.contains("ack-latency-p50-us")) {
      sample("lockstep_output_held_seconds", r.labels + ",quantile=\"0.5\"",
             r.engine["ack-latency-p50-us"].get<double>() * 1e-6);
    }
  }
  return out;
}

std::optional<Pairing> HostDaemon::CurrentPairing() {
  std::lock_guard<std::mutex> lock(pairing_mu_);
  return pairing_;
}

Json HostDaemon::PairingSummary() {
  std::lock_guard<std::mutex> lock(pairing_mu_);
  if (!pairing_) return Json{{"paired", false}};
  Json j = {{"paired", true},
            {"peer_host", pairing_->peer_host},
            {"peer_address", pairing_->peer_address}};
  if (!pairing_note_.empty()) j["last_check"] = pairing_note_;
  if (spare_) {
    j["spare"] = {{"peer_host", spare_->peer_host}, {"peer_address", spare_->peer_address}};
  }
  return j;
}

Result<Json> HostDaemon::Pair(const Json& request) {
  Pairing p;
  p.peer_host = request.value("peer_host", std::string());
  p.peer_address = request.value("peer_address", std::string());
  auto id = FromHex<16>(request.value("pairing_id", std::string()));
  auto key = FromHex<32>(request.value("key", std::string()));
  if (p.peer_host.empty() || p.peer_address.empty() || !id.ok() || !key.ok()) {
    return Status::InvalidArgument(
        "pair needs peer_host, peer_address, pairing_id (32 hex digits) and key (64 hex "
        "digits); lockstepctl pair makes them");
  }
  if (p.peer_host == config_.host_id) {
    return Status::InvalidArgument("a host cannot be paired with itself (" + p.peer_host + ")");
  }
  p.pairing_id = *id;
  p.key = *key;
  std::lock_guard<std::mutex> lock(pairing_mu_);
  if (request.value("spare", false)) {
    if (!pairing_) {
      return Status::FailedPrecondition(config_.host_id +
                                        " has no partner yet: pair it with one first, then "
                                        "add the spare");
    }
    if (spare_ || p.peer_host == pairing_->peer_host) {
      return Status::FailedPrecondition(
          config_.host_id + " has " +
          (spare_ ? "a spare already (" + spare_->peer_host + ")" : p.peer_host + " as partner") +
          "; unpair --spare first");
    }
    LOCKSTEP_RETURN_IF_ERROR(SavePairing(config_.state_dir, "spare", p));
    spare_ = p;
    LogEvent("info", "spare_paired", {{"spare", p.peer_host}, {"address", p.peer_address}});
    return Json{{"spare", Json{{"peer_host", p.peer_host}, {"peer_address", p.peer_address}}}};
  }
  if (pairing_) {
    return Status::FailedPrecondition(config_.host_id + " is paired with " + pairing_->peer_host +
                                      " already; unpair it first (lockstepctl unpair)");
  }
  LOCKSTEP_RETURN_IF_ERROR(SavePairing(config_.state_dir, "pairing", p));
  pairing_ = p;
  pairing_note_.clear();
  LogEvent("info", "paired", {{"peer", p.peer_host}, {"address", p.peer_address}});
  return Json{{"pairing", Json{{"peer_host", p.peer_host}, {"peer_address", p.peer_address}}}};
}

Result<Json> HostDaemon::Unpair(bool spare) {
  std::lock_guard<std::mutex> lock(pairing_mu_);
  if (spare) {
    if (!spare_) return Status::FailedPrecondition(config_.host_id + " has no spare");
    const std::string host = spare_->peer_host;
    unlink((config_.state_dir + "/spare.json").c_str());
    unlink((config_.state_dir + "/spare.key").c_str());
    spare_.reset();
    LogEvent("info", "spare_unpaired", {{"spare", host}});
    return Json{{"unpaired", host}};
  }
  if (!pairing_) return Status::FailedPrecondition(config_.host_id + " is not paired");
  const std::string peer = pairing_->peer_host;
  unlink((config_.state_dir + "/pairing.json").c_str());
  unlink((config_.state_dir + "/pairing.key").c_str());
  pairing_.reset();
  pairing_note_.clear();
  LogEvent("info", "unpaired", {{"peer", peer}});
  return Json{{"unpaired", peer}};
}

Result<Json> HostDaemon::CheckPairing(bool spare) {
  std::optional<Pairing> pairing;
  {
    std::lock_guard<std::mutex> lock(pairing_mu_);
    pairing = spare ? spare_ : pairing_;
  }
  if (!pairing) {
    return Status::FailedPrecondition(
        config_.host_id +
        (spare ? " has no spare" : " is not paired with any host (lockstepctl pair)"));
  }
  const Status outcome = Ping(*pairing, 5s, 5s);
  const std::string note =
      outcome.ok() ? "both hosts proved they hold the pairing key" : outcome.message();
  if (!spare) {
    std::lock_guard<std::mutex> lock(pairing_mu_);
    pairing_note_ = note;
  }
  if (!outcome.ok()) {
    LogEvent("warn", "peer_check_failed", {{"peer", pairing->peer_host}, {"why", note}});
    return Status::FailedPrecondition("the pairing with " + pairing->peer_host +
                                      " does not work: " + note);
  }
  return Json{{"host", config_.host_id}, {"pairing", PairingSummary()}};
}

void HostDaemon::ServePeer(std::unique_ptr<channel::Channel> link) {
  const std::string from = link->peer();
  try {
    ServePeerUnchecked(std::move(link), from);
  } catch (const std::exception& e) {  // a malformed message (nlohmann type errors)
    LogEvent("warn", "peer_malformed", {{"from", from}, {"why", e.what()}});
  }
}

void HostDaemon::ServePeerUnchecked(std::unique_ptr<channel::Channel> link,
                                    const std::string& from) {
  std::vector<Pairing> pairings;
  std::string partner;
  {
    std::lock_guard<std::mutex> lock(pairing_mu_);
    if (pairing_) {
      pairings.push_back(*pairing_);
      partner = pairing_->peer_host;
    }
    if (spare_) pairings.push_back(*spare_);
  }
  std::string client;
  auto ch = AcceptPeer(std::move(link), config_.host_id, pairings, 5s, &client);
  if (!ch.ok()) {
    LogEvent("warn", "peer_refused", {{"from", from}, {"why", ch.status().message()}});
    return;
  }
  auto request = ReceiveJson(**ch, 5s);
  if (!request.ok()) return;
  const std::string command = request->value("command", std::string());
  Json answer;
  auto reply = [](Result<Json> r) {
    if (!r.ok()) return Json{{"ok", false}, {"error", r.status().message()}};
    Json j = *r;
    j["ok"] = true;
    return j;
  };
  if (command == "ping") {
    answer = {{"ok", true}, {"host", config_.host_id}};
  } else if (client != partner && command != "vm-state") {
    // A spare may check the pairing, not run VMs here: their engines hold the partner's key.
    answer = {{"ok", false},
              {"error", client + " is " + config_.host_id + "'s spare, not its partner (" +
                            partner + "): it may check the pairing only"}};
  } else if (command == "prepare-secondary") {
    std::lock_guard<std::mutex> lock(mu_);
    // The client proved it is the partner.
    answer = reply(PrepareSecondary(request->value("definition", Json()), client));
  } else if (command == "discard-secondary") {
    std::lock_guard<std::mutex> lock(mu_);
    answer = reply(DiscardSecondary(request->value("vm", std::string()), client));
  } else if (command == "vm-state") {
    std::lock_guard<std::mutex> lock(mu_);
    auto vm = Find(request->value("vm", std::string()));
    Result<Json> st = vm.status();
    if (vm.ok()) {
      const Json summary = Summary(request->value("vm", std::string()), **vm);
      const auto [role, state] = EngineRole(**vm);
      st = Json{{"role", role},
                {"state", state},
                {"reason", summary["protection"].value("reason", std::string())}};
    }
    answer = reply(st);
  } else if (command == "handover") {
    // The way back of a drill the paired host runs: this host is the primary now.
    answer = reply(HandOver(request->value("vm", std::string())));
  } else {
    answer = {{"ok", false}, {"error", "unknown peer command '" + command + "'"}};
  }
  (void)SendJson(**ch, answer);
}

std::string HostDaemon::EngineSettings(const VmDefinition& def, const Pairing& pairing) const {
  // The definition's tuning first, this host's own parts last: the engine takes the last
  // value of a key, and these must never come from a definition (the paired host sends it).
  std::string s = def.protection_settings;
  auto add = [&s](const std::string& item) { s += (s.empty() ? "" : ";") + item; };
  if (!def.vip.empty() && !config_.vip_interface.empty())
    add("vip=" + def.vip + "@" + config_.vip_interface);
  if (!config_.fence_command.empty()) add("fence_command=" + config_.fence_command);
  const std::string transport = TransportOf(def);
  if (transport == "dpdk" && !config_.dpdk_eal.empty()) add("dpdk_eal=" + config_.dpdk_eal);
  if (transport == "rdma" && !config_.rdma_device.empty())
    add("rdma_device=" + config_.rdma_device);
  add("key_file=" + config_.state_dir + "/pairing.key");
  add("pairing=" + ToHex(pairing.pairing_id.data(), pairing.pairing_id.size()));
  return s;
}

std::pair<std::string, std::string> HostDaemon::EngineRole(Vm& vm) {
  if (!Alive(vm) || !vm.qmp) return {"", ""};
  auto objects = vm.qmp->Execute("query-lockstep", Json::object(), 5s);
  if (!objects.ok() || !objects->is_array() || objects->empty()) return {"", ""};
  return {(*objects)[0].value("role", std::string()), (*objects)[0].value("state", std::string())};
}

Status HostDaemon::SetMark(const std::string& name, const char* file, std::string* field,
                           const std::string& value) {
  const std::string path = VmDir(name) + "/" + file;
  if (value.empty()) {
    unlink(path.c_str());
  } else {
    LOCKSTEP_RETURN_IF_ERROR(WriteFileAtomic(path, value + "\n"));
  }
  *field = value;
  return Status::Ok();
}

Result<std::string> HostDaemon::PrepareOnPeer(const Pairing& pairing,
                                              const std::string& definition) {
  auto ch = ConnectPeer(config_.host_id, pairing, 10s);
  if (!ch.ok()) return ch.status();
  LOCKSTEP_RETURN_IF_ERROR(
      SendJson(**ch, {{"command", "prepare-secondary"}, {"definition", Json::parse(definition)}}));
  auto prepared = ReceiveJson(**ch, 60s);
  if (!prepared.ok()) return prepared.status().WithContext("waiting for " + pairing.peer_host);
  if (!prepared->value("ok", false)) {
    return Status::FailedPrecondition(pairing.peer_host + " cannot run the secondary: " +
                                      prepared->value("error", std::string("no reason")));
  }
  return prepared->value("listen", std::string());
}

Status HostDaemon::DiscardOnPeer(const Pairing& pairing, const std::string& name) {
  auto ch = ConnectPeer(config_.host_id, pairing, 10s);
  if (!ch.ok()) return ch.status();
  LOCKSTEP_RETURN_IF_ERROR(SendJson(**ch, {{"command", "discard-secondary"}, {"vm", name}}));
  auto done = ReceiveJson(**ch, 30s);
  if (!done.ok()) return done.status();
  if (!done->value("ok", false)) {
    return Status::FailedPrecondition(done->value("error", std::string("refused")));
  }
  return Status::Ok();
}

Result<Json> HostDaemon::Protect(const std::string& name, bool again,
                                 const std::string& transport) {
  std::unique_lock<std::mutex> lock(mu_);
  auto found = Find(name);
  if (!found.ok()) return found.status();
  Vm& vm = **found;
  if (!Alive(vm) || !vm.qmp) {
    return Status::FailedPrecondition("VM '" + name + "' is not running here; start it first");
  }
  if (busy_.count(name)) {
    return Status::FailedPrecondition("VM '" + name + "' is being protected or unprotected " +
                                      "already; wait for that to finish");
  }
  auto pairing = CurrentPairing();
  if (!pairing) {
    return Status::FailedPrecondition(config_.host_id +
                                      " is not paired with another host (lockstepctl pair)");
  }
  if (!vm.def.vip.empty() && config_.vip_interface.empty()) {
    return Status::FailedPrecondition("VM '" + name + "' has a VIP but this lockstepd has no " +
                                      "--vip-interface to put it on");
  }
  if (config_.witness.empty() || config_.plugin.empty()) {
    return Status::FailedPrecondition(
        "this lockstepd has no --witness (and --plugin): protection needs both");
  }
  std::string old_engine;  // the state of the engine of an earlier protection, if any
  auto objects = vm.qmp->Execute("query-lockstep", Json::object(), 5s);
  if (objects.ok() && objects->is_array() && !objects->empty()) {
    old_engine = (*objects)[0].value("state", std::string("?"));
    if (old_engine == "FENCED" || old_engine == "FAILED" || old_engine == "HANDED_OVER") {
      return Status::FailedPrecondition("VM '" + name + "' here ended " + old_engine +
                                        ": this copy must not run on; stop it (lockstepctl stop)");
    }
    if (old_engine != "ACTIVE" && old_engine != "PRIMARY_ALONE" && old_engine != "STOPPED") {
      return Status::FailedPrecondition("VM '" + name + "' is already protected (state " +
                                        old_engine + "); unprotect it first");
    }
  }
  if (again && old_engine.empty() && vm.protected_with.empty()) {
    return Status::FailedPrecondition("VM '" + name +
                                      "' was never protected from this host: use protect");
  }
  if (!transport.empty() && transport != TransportOf(vm.def)) {
    // The VM's setting from now on (re-protections too); the paired host gets it with the
    // definition.
    VmDefinition changed = vm.def;
    LOCKSTEP_RETURN_IF_ERROR(SetTransport(&changed, transport));
    LOCKSTEP_RETURN_IF_ERROR(
        WriteFileAtomic(VmDir(name) + "/definition.json", VmDefinitionJson(changed)));
    vm.def = changed;
  }
  if (TransportOf(vm.def) == "dpdk" && config_.dpdk_port.empty()) {
    return Status::FailedPrecondition("VM '" + name + "' replicates over DPDK (transport=dpdk) " +
                                      "but this lockstepd has no --dpdk-port");
  }
  busy_.insert(name);
  const std::string definition = VmDefinitionJson(vm.def);
  const std::string settings = EngineSettings(vm.def, *pairing);
  const std::string vm_transport = TransportOf(vm.def);
  // The secondary first — its QEMU, paused, listening on its host's replication address —
  // without the VMs' lock: the other host's daemon may be asking this one meanwhile.
  lock.unlock();
  auto listen = PrepareOnPeer(*pairing, definition);
  lock.lock();
  busy_.erase(name);
  if (!listen.ok()) return listen.status().WithContext("protecting VM '" + name + "'");
  // Then the engine in the running primary: it connects, pairs and starts the initial
  // synchronization; the guest runs on.
  found = Find(name);
  Result<Json> added = Status::Aborted("VM '" + name + "' went away meanwhile");
  if (found.ok() && Alive(**found) && (*found)->qmp && !old_engine.empty()) {
    // Re-protection: the VM runs here after a failover (ACTIVE), or alone (PRIMARY_ALONE),
    // or protection was ended. The old engine object goes only now that a secondary waits.
    added = (*found)->qmp->Execute("object-del", {{"id", "ft0"}}, 30s);
    if (added.ok()) LogEvent("info", "vm_reprotecting", {{"vm", name}, {"after", old_engine}});
  }
  if (found.ok() && Alive(**found) && (*found)->qmp && (added.ok() || old_engine.empty())) {
    Json object = {{"qom-type", "lockstep"},
                   {"id", "ft0"},
                   {"plugin", config_.plugin},
                   {"role", "primary"},
                   {"vm", name},
                   {"host", config_.host_id},
                   {"peer", PrimaryPeerAddress(vm_transport, *listen)},
                   {"witness", config_.witness},
                   {"settings", settings}};
    added = (*found)->qmp->Execute("object-add", object, 60s);
  }
  if (!added.ok()) {
    lock.unlock();
    Status discarded = DiscardOnPeer(*pairing, name);
    if (!discarded.ok()) {
      LogEvent("warn", "secondary_left", {{"vm", name}, {"why", discarded.message()}});
    }
    return Status::FailedPrecondition("QEMU refused to start protecting VM '" + name +
                                      "': " + added.status().message());
  }
  Vm& primary = **found;
  // This copy is the primary now (after a failover it was the other's secondary).
  Status marked = SetMark(name, "secondary_of", &primary.secondary_of, "");
  if (marked.ok()) {
    marked = SetMark(name, "protected_with", &primary.protected_with, pairing->peer_host);
  }
  if (!marked.ok()) LogEvent("warn", "vm_mark_failed", {{"vm", name}, {"why", marked.message()}});
  LogEvent("info", "vm_protecting",
           {{"vm", name}, {"secondary", pairing->peer_host}, {"listen", *listen}});
  return Describe(name, primary);
}

std::string HostDaemon::PrimaryPeerAddress(const std::string& transport,
                                           const std::string& listen) const {
  if (transport != "dpdk") return listen;
  const size_t hash = listen.rfind('#');
  return PlusForComma(config_.dpdk_port) + (hash == std::string::npos ? "" : listen.substr(hash));
}

Result<Json> HostDaemon::Unprotect(const std::string& name) {
  std::unique_lock<std::mutex> lock(mu_);
  auto found = Find(name);
  if (!found.ok()) return found.status();
  Vm& vm = **found;
  LOCKSTEP_RETURN_IF_ERROR(CheckPrimaryHere(
      name, vm, /*protected_only=*/false, "unprotect it on the host that runs it as the primary"));
  // The engine says GOODBYE: the secondary promises not to take over, held output goes.
  auto removed = vm.qmp->Execute("object-del", {{"id", "ft0"}}, 30s);
  if (!removed.ok()) {
    return Status::FailedPrecondition("VM '" + name + "' is not protected here (" +
                                      removed.status().message() + ")");
  }
  LogEvent("info", "vm_unprotected", {{"vm", name}});
  Json out = Describe(name, vm);
  lock.unlock();  // the secondary's host is asked without the VMs' lock
  if (auto pairing = CurrentPairing()) {
    Status discarded = DiscardOnPeer(*pairing, name);
    if (!discarded.ok()) {
      out["note"] = "the secondary's QEMU on " + pairing->peer_host + " could not be stopped (" +
                    discarded.message() + "): stop it there";
    }
  }
  return out;
}

Status HostDaemon::CheckPrimaryHere(const std::string& name, Vm& vm, bool protected_only,
                                    const std::string& otherwise) {
  if (!Alive(vm) || !vm.qmp)
    return Status::FailedPrecondition("VM '" + name + "' is not running here");
  if (busy_.count(name)) {
    return Status::FailedPrecondition("VM '" + name + "' is being protected, unprotected or " +
                                      "failed over already; wait for that to finish");
  }
  const auto [role, state] = EngineRole(vm);
  if (role != "primary" || (protected_only && state != "PROTECTED")) {
    return Status::FailedPrecondition(
        "VM '" + name + "' here is " +
        (role.empty() ? std::string("not protected") : "the " + role + " (" + state + ")") + ": " +
        otherwise);
  }
  return Status::Ok();
}

Result<std::pair<HostDaemon::Vm*, Pairing>> HostDaemon::BeginFailover(const std::string& name) {
  auto found = Find(name);
  if (!found.ok()) return found.status();
  Vm& vm = **found;
  LOCKSTEP_RETURN_IF_ERROR(CheckPrimaryHere(name, vm, /*protected_only=*/true,
                                            "a failover starts on the host that runs it as the "
                                            "primary, once it is PROTECTED (lockstepctl status " +
                                                name + ")"));
  auto pairing = CurrentPairing();
  if (!pairing) {
    return Status::FailedPrecondition(config_.host_id + " is not paired with another host");
  }
  busy_.insert(name);
  return std::make_pair(&vm, *pairing);
}

Result<Json> HostDaemon::AwaitOutcome(const std::function<Result<std::optional<Json>>()>& probe,
                                      std::chrono::milliseconds every,
                                      std::chrono::milliseconds timeout, const std::string& what) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    auto r = probe();
    if (!r.ok()) return r.status();
    if (*r) return **r;
    if (std::chrono::steady_clock::now() > deadline) {
      return Status::TimedOut(what + ": no outcome after " +
                              std::to_string(timeout.count() / 1000) + " s");
    }
    std::this_thread::sleep_for(every);
  }
}

Result<Json> HostDaemon::PeerVmState(const Pairing& pairing, const std::string& name,
                                     std::chrono::milliseconds connect_timeout) {
  auto ch = ConnectPeer(config_.host_id, pairing, connect_timeout);
  if (!ch.ok()) return ch.status();
  LOCKSTEP_RETURN_IF_ERROR(SendJson(**ch, {{"command", "vm-state"}, {"vm", name}}));
  auto answer = ReceiveJson(**ch, 10s);
  if (!answer.ok()) return answer.status();
  if (!answer->value("ok", false)) {
    return Status::FailedPrecondition(pairing.peer_host + ": " +
                                      answer->value("error", std::string("refused")));
  }
  return *answer;
}

Result<Json> HostDaemon::HandOver(const std::string& name) {
  std::unique_lock<std::mutex> lock(mu_);
  auto begun = BeginFailover(name);
  if (!begun.ok()) return begun.status();
  const Pairing pairing = begun->second;
  // Busy until this returns, however it does (mu_ is held again at every return).
  struct Unbusy {
    std::set<std::string>& busy;
    const std::string& name;
    ~Unbusy() { busy.erase(name); }
  } unbusy{busy_, name};
  const size_t seen = Events(name).size();
  const auto t0 = std::chrono::steady_clock::now();
  auto asked = begun->first->qmp->Execute("lockstep-handover", {{"id", "ft0"}}, 10s);
  // A refusal changed nothing; an unanswered request may have started one: look.
  if (!asked.ok() && asked.status().code() != Status::Code::kTimedOut) {
    return Status::FailedPrecondition("QEMU refused the handover of VM '" + name +
                                      "': " + asked.status().message());
  }
  LogEvent("info", "vm_handing_over", {{"vm", name}, {"to", pairing.peer_host}});
  // The engine ends the epoch, waits for its ACK, and the secondary asks the witness: a
  // few epochs' time, or the engine's handover timeout if the secondary does not answer.
  auto outcome = AwaitOutcome(
      [&]() -> Result<std::optional<Json>> {
        lock.unlock();
        std::this_thread::sleep_for(20ms);
        lock.lock();
        auto vm = Find(name);
        if (!vm.ok() || !Alive(**vm) || !(*vm)->qmp) {
          return Status::Aborted("VM '" + name + "' stopped during the handover");
        }
        auto ls = (*vm)->qmp->Execute("query-lockstep", Json::object(), 5s);
        if (!ls.ok() || !ls->is_array() || ls->empty()) return std::optional<Json>();
        const std::string state = (*ls)[0].value("state", std::string());
        const std::string reason = (*ls)[0].value("reason", std::string());
        if (state == "HANDED_OVER") return std::optional<Json>(Json{{"reason", reason}});
        if (state == "FENCED") {
          // The VM went to the other host by the fault path: this copy must not run on.
          (void)Stop(name, /*force=*/true);
          return Status::FailedPrecondition(
              "the handover of VM '" + name + "' became a fault, and the witness gave the VM to " +
              pairing.peer_host + ", where it runs now; this host's copy ended FENCED and was " +
              "stopped (" + reason + ")");
        }
        if (state != "PROTECTED") {
          return Status::FailedPrecondition("the handover of VM '" + name + "' became a fault (" +
                                            state + "), and the VM runs on here: " + reason);
        }
        auto events = Events(name);
        for (size_t i = seen; i < events.size(); ++i) {
          const std::string why = events[i].value("reason", std::string());
          if (why.find("declined the handover") != std::string::npos) {
            return Status::FailedPrecondition(pairing.peer_host + " " +
                                              why.substr(why.find("declined")));
          }
        }
        return std::optional<Json>();
      },
      // The engine's handover_timeout (at most 10 min) and grant window bound the outcome.
      0ms, 12min, "handing VM '" + name + "' over");
  if (!outcome.ok()) return outcome.status();
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  // This copy is stopped for good: shut it down, so the other host can make it its
  // secondary when it re-protects the VM.
  auto vm = Find(name);
  if (vm.ok() && Alive(**vm)) {
    auto stopped = Stop(name, /*force=*/true);
    if (!stopped.ok()) {
      LogEvent("warn", "vm_stop_failed", {{"vm", name}, {"why", stopped.status().message()}});
    }
  }
  LogEvent("info", "vm_handed_over", {{"vm", name}, {"to", pairing.peer_host}});
  return Json{{"from", config_.host_id},
              {"to", pairing.peer_host},
              {"handover_ms", ms},
              {"reason", (*outcome)["reason"]}};
}

Result<Json> HostDaemon::ForceFailover(const std::string& name) {
  std::unique_lock<std::mutex> lock(mu_);
  auto begun = BeginFailover(name);
  if (!begun.ok()) return begun.status();
  const Pairing pairing = begun->second;
  const auto t0 = std::chrono::steady_clock::now();
  // What a host crash does to the VM: no GOODBYE, no last epoch; the secondary notices the
  // silence and takes over from the last acknowledged epoch.
  auto killed = Stop(name, /*force=*/true);
  busy_.erase(name);
  lock.unlock();
  if (!killed.ok()) return killed.status();
  LogEvent("info", "vm_failover_forced", {{"vm", name}, {"to", pairing.peer_host}});
  auto outcome = AwaitOutcome(
      [&]() -> Result<std::optional<Json>> {
        auto st = PeerVmState(pairing, name);
        if (!st.ok()) return std::optional<Json>();  // its daemon may be busy: ask again
        const std::string state = st->value("state", std::string());
        // ACTIVE, or already protected again by that host's automatic re-protection.
        if (state == "ACTIVE" || st->value("role", std::string()) == "primary") {
          return std::optional<Json>(*st);
        }
        if (state == "FENCED" || state == "FAILED" || state == "STOPPED") {
          return Status::FailedPrecondition("VM '" + name + "' did not fail over to " +
                                            pairing.peer_host + " (" + state +
                                            "): " + st->value("reason", std::string()));
        }
        return std::optional<Json>();
      },
      50ms, 60s, "waiting for " + pairing.peer_host + " to take VM '" + name + "' over");
  if (!outcome.ok()) return outcome.status();
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  return Json{{"from", config_.host_id},
              {"to", pairing.peer_host},
              {"failover_ms", ms},
              {"reason", (*outcome)["reason"]}};
}

Result<Json> HostDaemon::Drill(const std::string& name) {
  auto pairing = CurrentPairing();
  if (!pairing) return Status::FailedPrecondition(config_.host_id + " is not paired");
  auto there = HandOver(name);
  if (!there.ok()) return there.status().WithContext("drill, switching over");
  // The other host re-protects the VM by itself (automatic re-protection), with this
  // host's copy as its secondary; the way back starts once that is PROTECTED.
  auto reprotected = AwaitOutcome(
      [&]() -> Result<std::optional<Json>> {
        auto st = PeerVmState(*pairing, name);
        if (st.ok() && st->value("role", std::string()) == "primary" &&
            st->value("state", std::string()) == "PROTECTED") {
          return std::optional<Json>(*st);
        }
        return std::optional<Json>();
      },
      200ms, 10min,
      "drill: waiting for " + pairing->peer_host + " to re-protect VM '" + name + "'");
  if (!reprotected.ok()) return reprotected.status();
  auto ch = ConnectPeer(config_.host_id, *pairing, 10s);
  if (!ch.ok()) return ch.status().WithContext("drill, switching back");
  LOCKSTEP_RETURN_IF_ERROR(SendJson(**ch, {{"command", "handover"}, {"vm", name}}));
  auto back = ReceiveJson(**ch, 15min);  // that host's HandOver, with its own bounds
  if (!back.ok()) return back.status().WithContext("drill, switching back");
  if (!back->value("ok", false)) {
    return Status::FailedPrecondition("drill, switching back: " + pairing->peer_host + ": " +
                                      back->value("error", std::string("refused")));
  }
  back->erase("ok");
  // Home again: this host re-protects it (automatic re-protection) with the other's copy.
  auto home = AwaitOutcome(
      [&]() -> Result<std::optional<Json>> {
        std::lock_guard<std::mutex> lock(mu_);
        auto vm = Find(name);
        if (!vm.ok()) return vm.status();
        const auto [role, state] = EngineRole(**vm);
        if (role == "primary" && state == "PROTECTED") return std::optional<Json>(Json{});
        return std::optional<Json>();
      },
      200ms, 10min, "drill: waiting for VM '" + name + "' to be protected here again");
  if (!home.ok()) return home.status();
  return Json{{"legs", {*there, *back}}, {"protected_on", config_.host_id}};
}

Result<Json> HostDaemon::PrepareSecondary(const Json& definition, const std::string& primary_host) {
  if (config_.replication_address.empty() || config_.plugin.empty() || config_.witness.empty()) {
    return Status::FailedPrecondition(config_.host_id +
                                      "'s lockstepd has no --replication-address, --plugin or "
                                      "--witness: it cannot run secondaries");
  }
  auto def = ParseVmDefinition(definition.dump());
  if (!def.ok()) return def.status();
  const std::string name = def->name;
  auto pairing = CurrentPairing();
  if (!pairing) return Status::FailedPrecondition(config_.host_id + " is not paired");
  if (!def->vip.empty() && config_.vip_interface.empty()) {
    return Status::FailedPrecondition(config_.host_id +
                                      "'s lockstepd has no --vip-interface "
                                      "for the VM's VIP");
  }
  if (auto it = vms_.find(name); it != vms_.end()) {
    // Ours to reuse: this host's secondary of the asking host already, or the copy this
    // host ran as the primary with it before a failover. Any other VM of the same name is
    // the operator's, and stays.
    if (it->second.secondary_of != primary_host && it->second.protected_with != primary_host) {
      return Status::FailedPrecondition("a VM named '" + name + "' is defined on " +
                                        config_.host_id + " and is not " + primary_host +
                                        "'s secondary; undefine it there or rename the VM");
    }
    if (Alive(it->second)) {
      return Status::FailedPrecondition("VM '" + name + "' already runs on " + config_.host_id);
    }
  }
  const bool existed = vms_.count(name) != 0;
  const std::string dir = VmDir(name);
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return Status::IoError("creating " + dir + ": " + ec.message());
  Vm& vm = vms_[name];
  // Undone if anything below fails: a half-made secondary must not stay defined.
  auto undo = [&](Status why) {
    if (!existed) {
      vms_.erase(name);
      fs::remove_all(dir, ec);
    }
    return why;
  };
  Status saved = WriteFileAtomic(dir + "/definition.json", VmDefinitionJson(*def));
  if (saved.ok()) saved = SetMark(name, "secondary_of", &vm.secondary_of, primary_host);
  if (saved.ok()) saved = SetMark(name, "protected_with", &vm.protected_with, "");
  if (!saved.ok()) return undo(saved);
  vm.def = *def;
  // A free port on the replication address (bound and released: the secondary takes it a
  // moment later; another taker in between makes QEMU fail, which is reported).
  int probe = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  socklen_t len = sizeof a;
  if (inet_pton(AF_INET, config_.replication_address.c_str(), &a.sin_addr) != 1 ||
      bind(probe, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      getsockname(probe, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    const int err = errno;
    close(probe);
    return undo(Status::FromErrno(
        "binding on the replication address " + config_.replication_address, err));
  }
  close(probe);
  std::string listen = config_.replication_address + ":" + std::to_string(ntohs(a.sin_port));
  if (TransportOf(*def) == "dpdk") {
    if (config_.dpdk_port.empty()) {
      return undo(Status::FailedPrecondition("VM '" + name +
                                             "' replicates over DPDK (transport=dpdk) but "
                                             "lockstepd on " +
                                             config_.host_id + " has no --dpdk-port"));
    }
    // This host's port; the link number tells this VM's frames from other VMs' on the wire.
    listen = PlusForComma(config_.dpdk_port) + "#" + std::to_string(RandomLink());
  }
  const std::string object = "lockstep,id=ft0,plugin=" + config_.plugin +
                             ",role=secondary,vm=" + name + ",host=" + config_.host_id +
                             ",listen=" + listen + ",witness=" + config_.witness +
                             ",settings=" + EngineSettings(vm.def, *pairing);
  auto launched = Launch(name, vm, {"-S", "-object", object});
  if (!launched.ok()) return undo(launched.status());
  LogEvent("info", "secondary_started",
           {{"vm", name}, {"primary", primary_host}, {"listen", listen}});
  return Json{{"listen", listen}};
}

Result<Json> HostDaemon::DiscardSecondary(const std::string& name,
                                          const std::string& primary_host) {
  auto found = Find(name);
  if (!found.ok()) return Json::object();  // nothing to discard
  Vm& vm = **found;
  if (vm.secondary_of != primary_host) {
    return Status::FailedPrecondition("VM '" + name + "' on " + config_.host_id + " is not " +
                                      primary_host + "'s secondary: not discarding it");
  }
  if (const auto [role, state] = EngineRole(vm); state == "ACTIVE" || state == "PROMOTING") {
    return Status::FailedPrecondition("VM '" + name + "' took over on " + config_.host_id + " (" +
                                      state + "): it is the one running, not discarding it");
  }
  if (Alive(vm)) LOCKSTEP_RETURN_IF_ERROR(Stop(name, /*force=*/true).status());
  return Undefine(name);
}

Json HostDaemon::Handle(const Json& request) {
  try {
    if (!request.is_object()) return Fail("a request is a JSON object");
    const int api = request.value("api", 0);
    if (api != kControlApi) {
      return Fail("this lockstepd speaks control API " + std::to_string(kControlApi) + ", not " +
                  std::to_string(api) + "; use the lockstepctl of the same release");
    }
    const std::string command = request.value("command", std::string());
    const std::string name = request.value("vm", std::string());
    auto done = [](Result<Json> r) {
      if (!r.ok()) return Fail(r.status().message());
      Json answer = *r;
      answer["api"] = kControlApi;
      answer["ok"] = true;
      return answer;
    };
    // Pairing: without the VMs' lock (a check waits for the peer).
    if (command == "identity") {
      return done(Json{{"host", config_.host_id}, {"peer_address", config_.peer_address}});
    } else if (command == "pair") {
      return done(Pair(request));
    } else if (command == "unpair") {
      return done(Unpair(request.value("spare", false)));
    } else if (command == "pairing") {
      return done(CheckPairing(request.value("spare", false)));
    } else if (command == "protect" || command == "unprotect") {
      // They take the VMs' lock themselves, and let go of it while the peer works.
      auto r = command == "protect" ? Protect(name, request.value("again", false),
                                              request.value("transport", std::string()))
                                    : Unprotect(name);
      return done(r.ok() ? Result<Json>(Json{{"vm", *r}}) : r);
    } else if (command == "failover") {
      const std::string how = request.value("how", std::string("planned"));
      if (how == "drill") return done(Drill(name));
      if (how == "planned") return done(HandOver(name));
      if (how == "forced") return done(ForceFailover(name));
      return Fail("failover \"how\" is planned, forced or drill, not '" + how + "'");
    } else if (command == "status") {
      Result<Json> st = [&]() -> Result<Json> {
        std::lock_guard<std::mutex> lock(mu_);
        auto vm = Find(name);
        if (!vm.ok()) return vm.status();
        return Json{{"vm", Describe(name, **vm)}};
      }();
      // The paired host's role for the same VM, asked without the VMs' lock.
      if (auto pairing = CurrentPairing(); st.ok() && pairing) {
        auto peer = PeerVmState(*pairing, name, 1s);
        (*st)["vm"]["peer"] =
            peer.ok() ? Json{{"host", pairing->peer_host},
                             {"role", peer->value("role", std::string())},
                             {"state", peer->value("state", std::string())}}
                      : Json{{"host", pairing->peer_host}, {"error", peer.status().message()}};
      }
      return done(st);
    }
    std::lock_guard<std::mutex> lock(mu_);
    Result<Json> r = Json::object();
    if (command == "list") {
      Json list = Json::array();
      for (auto& [n, vm] : vms_) list.push_back(Summary(n, vm));
      r = Json{{"host", config_.host_id}, {"pairing", PairingSummary()}, {"vms", list}};
    } else if (command == "define") {
      auto d = Define(request.value("definition", Json()));
      r = d.ok() ? Result<Json>(Json{{"vm", *d}}) : d;
    } else if (command == "undefine") {
      r = Undefine(name);
    } else if (command == "start") {
      auto s = Start(name);
      r = s.ok() ? Result<Json>(Json{{"vm", *s}}) : s;
    } else if (command == "stop") {
      r = Stop(name, request.value("force", false));
    } else {
      return Fail("unknown command '" + command +
                  "' (identity, pair, unpair, pairing, list, status, define, undefine, start, "
                  "stop, protect, unprotect, failover)");
    }
    return done(r);
  } catch (const std::exception& e) {  // a malformed member (nlohmann type errors)
    return Fail(std::string("malformed request: ") + e.what());
  }
}

}  // namespace lockstep::admin
