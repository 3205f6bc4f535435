// The admin plane end to end: the real lockstepd and lockstepctl binaries, the real guest
// in lockstep's QEMU. Define, start, status, a daemon killed and restarted under a running
// VM, stop, and bad input that changes nothing.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "free_port.h"
#include "replication_channel/tcp.h"
#include "testbed/child_process.h"
#include "testbed/topology.h"
#include "testbed/workload_client.h"

using namespace std::chrono_literals;
using lockstep::testbed::ChildProcess;
using lockstep::testbed::WorkloadClient;
using nlohmann::json;

namespace {

struct Ran {
  int exit = -1;
  std::string out;  // stdout and stderr
};

// Runs lockstepctl with `args` against the daemon at `socket`.
Ran Ctl(const std::string& socket, const std::vector<std::string>& args) {
  std::string cmd = std::string(LOCKSTEPCTL_PATH) + " --socket '" + socket + "'";
  for (const auto& a : args) cmd += " '" + a + "'";
  Ran r;
  if (FILE* f = popen((cmd + " 2>&1").c_str(), "r")) {
    char buf[4096];
    while (size_t n = fread(buf, 1, sizeof buf, f)) r.out.append(buf, n);
    int status = pclose(f);
    r.exit = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  return r;
}

json CtlJson(const std::string& socket, std::vector<std::string> args) {
  args.insert(args.begin(), "--json");
  Ran r = Ctl(socket, args);
  INFO(r.out);
  REQUIRE(r.exit == 0);
  return json::parse(r.out);
}

bool Alive(pid_t pid) { return kill(pid, 0) == 0; }

// GET /metrics from 127.0.0.1:`port` (in `netns`, if given): the body, or "" on failure.
std::string Scrape(int port, const std::string& netns = "") {
  auto get = [port]() -> lockstep::Result<std::string> {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    std::string reply;
    if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
      const std::string req = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
      if (write(fd, req.data(), req.size()) == static_cast<ssize_t>(req.size())) {
        char buf[4096];
        ssize_t n;
        while ((n = read(fd, buf, sizeof buf)) > 0) reply.append(buf, static_cast<size_t>(n));
      }
    }
    close(fd);
    size_t body = reply.find("\r\n\r\n");
    return body == std::string::npos ? std::string() : reply.substr(body + 4);
  };
  auto r = lockstep::testbed::InNamespace<std::string>(netns, get);
  return r.ok() ? *r : "";
}

struct Host {
  explicit Host(std::string id = "hostA", std::string ns = "", std::vector<std::string> flags = {})
      : host_id(std::move(id)), netns(std::move(ns)), extra_flags(std::move(flags)) {
    char tmpl[] = "/tmp/lsd-XXXXXX";
    dir = mkdtemp(tmpl);
    socket = dir + "/ctl.sock";
    state = dir + "/state";
  }
  ~Host() {
    // Whatever a test left running goes, also after a failed REQUIRE: every QEMU the daemon
    // recorded (they live in sessions of their own), then the daemon.
    std::error_code ec;
    for (const auto& vm : std::filesystem::directory_iterator(state + "/vms", ec)) {
      pid_t pid = 0;
      if (std::ifstream(vm.path() / "qemu.pid") >> pid && pid > 0) qemu_pids.push_back(pid);
    }
    for (pid_t pid : qemu_pids) kill(pid, SIGKILL);
    daemon.reset();
    std::filesystem::remove_all(dir);
  }
  void StartDaemon() {
    std::vector<std::string> argv = {LOCKSTEPD_PATH, "--host-id", host_id,  "--state",    state,
                                     "--socket",     socket,      "--qemu", LOCKSTEP_QEMU};
    if (extra_flags.empty()) {
      argv.insert(argv.end(), {"--peer-listen", "127.0.0.1:" + std::to_string(peer_port)});
    }
    argv.insert(argv.end(), extra_flags.begin(), extra_flags.end());
    argv.insert(argv.end(), {"--metrics-listen", "127.0.0.1:" + std::to_string(metrics_port)});
    auto d =
        ChildProcess::Start(argv, netns, dir + "/lockstepd-" + std::to_string(++starts) + ".log");
    INFO(d.status().ToString());
    REQUIRE(d.ok());
    daemon = std::move(*d);
    REQUIRE(daemon->WaitForLog("event=started", 10s));
  }
  // A definition of the test guest, its workload forwarded to 127.0.0.1:`port`.
  std::string Definition(const std::string& name, int port) {
    json j = {
        {"name", name},
        {"memory_mib", 256},
        {"kernel", std::string(LOCKSTEP_GUEST_DIR) + "/vmlinuz"},
        {"initrd", std::string(LOCKSTEP_GUEST_DIR) + "/initrd.gz"},
        {"append", "console=ttyS0 quiet panic=-1 idle=halt lockstep.ip=10.0.2.15/24"},
        {"nics",
         {{{"mac", "52:54:00:12:34:56"},
           {"user_forward", {{{"host", "127.0.0.1:" + std::to_string(port)}, {"guest", 7000}}}}}}}};
    std::string path = dir + "/" + name + ".json";
    std::ofstream(path) << j.dump(2);
    return path;
  }
  std::string host_id, netns;
  std::vector<std::string> extra_flags;
  std::string dir, socket, state;
  int peer_port = lockstep::testing::FreePort();  // the same across restarts
  int metrics_port = lockstep::testing::FreePort();
  std::unique_ptr<ChildProcess> daemon;
  std::vector<pid_t> qemu_pids;
  int starts = 0;
};

}  // namespace

TEST_CASE("lockstepctl and lockstepd: define, start, status, restart the daemon, stop",
          "[admin][qemu]") {
  Host h;
  h.StartDaemon();
  struct stat st;
  REQUIRE(stat(h.socket.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);  // root only

  const int port = lockstep::testing::FreePort();
  Ran defined = Ctl(h.socket, {"define", h.Definition("web1", port)});
  INFO(defined.out);
  REQUIRE(defined.exit == 0);
  json list = CtlJson(h.socket, {"list"});
  REQUIRE(list["vms"].size() == 1);
  CHECK(list["vms"][0]["state"] == "stopped");

  json started = CtlJson(h.socket, {"start", "web1"});
  const pid_t pid = started["vm"]["pid"].get<pid_t>();
  h.qemu_pids.push_back(pid);
  CHECK(started["vm"]["state"] == "running");
  CHECK(started["vm"]["protection"]["state"] == "UNPROTECTED");
  CHECK(!started["vm"]["protection"]["reason"].get<std::string>().empty());
  // The guest really runs: its workload answers through the forwarded port.
  auto client = WorkloadClient::Start("", "127.0.0.1", port, 60s);
  INFO(client.status().ToString());
  REQUIRE(client.ok());
  REQUIRE((*client)->WaitForReplies(5, 60s));

  // Prometheus sees it too.
  const std::string metrics = Scrape(h.metrics_port);
  INFO(metrics);
  CHECK(metrics.find("lockstep_vm_running{vm=\"web1\"} 1") != std::string::npos);
  CHECK(metrics.find("lockstep_protection_state{vm=\"web1\",state=\"UNPROTECTED\",role=\"\"} 1") !=
        std::string::npos);
  CHECK(metrics.find("# TYPE lockstep_pause_seconds summary") != std::string::npos);

  // The daemon dies hard; the VM does not notice.
  h.daemon->Kill(SIGKILL);
  int status = 0;
  REQUIRE(h.daemon->WaitExit(10s, &status));
  const uint64_t before = (*client)->replies();
  std::this_thread::sleep_for(500ms);
  CHECK(Alive(pid));
  CHECK((*client)->replies() > before);
  Ran unreachable = Ctl(h.socket, {"list"});
  CHECK(unreachable.exit == 3);
  CHECK(unreachable.out.find("is lockstepd running") != std::string::npos);

  // A new daemon adopts it: same QEMU, still running, still serving.
  h.StartDaemon();
  CHECK(h.daemon->WaitForLog("event=vm_adopted vm=web1", 10s));
  json status_json = CtlJson(h.socket, {"status", "web1"});
  CHECK(status_json["vm"]["pid"].get<pid_t>() == pid);
  CHECK(status_json["vm"]["state"] == "running");
  CHECK((*client)->inconsistent() == 0);
  Ran human = Ctl(h.socket, {"status", "web1"});
  CHECK(human.exit == 0);
  CHECK(human.out.find("protection  UNPROTECTED") != std::string::npos);

  // Bad input: a clear error, and nothing changes.
  Ran again = Ctl(h.socket, {"start", "web1"});
  CHECK(again.exit == 1);
  CHECK(again.out.find("already running (pid " + std::to_string(pid) + ")") != std::string::npos);
  Ran unknown = Ctl(h.socket, {"status", "nosuch"});
  CHECK(unknown.exit == 1);
  CHECK(unknown.out.find("no VM named 'nosuch'") != std::string::npos);
  Ran busy = Ctl(h.socket, {"undefine", "web1"});
  CHECK(busy.exit == 1);
  CHECK(busy.out.find("stop it first") != std::string::npos);
  Ran taken = Ctl(h.socket, {"define", h.Definition("web1", port)});
  CHECK(taken.exit == 1);
  CHECK(taken.out.find("already defined") != std::string::npos);
  Ran usage = Ctl(h.socket, {"stop"});
  CHECK(usage.exit == 2);
  CHECK(Alive(pid));

  (*client)->Stop();
  Ran stopped = Ctl(h.socket, {"stop", "web1"});
  INFO(stopped.out);
  CHECK(stopped.exit == 0);
  CHECK(!Alive(pid));
  CHECK(CtlJson(h.socket, {"status", "web1"})["vm"]["state"] == "stopped");
  CHECK(Ctl(h.socket, {"undefine", "web1"}).exit == 0);
  CHECK(CtlJson(h.socket, {"list"})["vms"].empty());
}

TEST_CASE("a malformed VM definition is refused with the reason, and nothing is defined",
          "[admin][qemu]") {
  Host h;
  h.StartDaemon();
  const std::string bad = h.dir + "/bad.json";
  SECTION("an unknown member") {
    json j = json::parse(std::ifstream(h.Definition("web2", 1)));
    j["memroy_mib"] = 512;
    std::ofstream(bad) << j.dump();
    Ran r = Ctl(h.socket, {"define", bad});
    CHECK(r.exit == 1);
    CHECK(r.out.find("unknown member 'memroy_mib'") != std::string::npos);
  }
  SECTION("a kernel that is not there") {
    json j = json::parse(std::ifstream(h.Definition("web2", 1)));
    j["kernel"] = "/nonexistent/vmlinuz";
    std::ofstream(bad) << j.dump();
    Ran r = Ctl(h.socket, {"define", bad});
    CHECK(r.exit == 1);
    CHECK(r.out.find("no file at /nonexistent/vmlinuz") != std::string::npos);
  }
  SECTION("not JSON at all") {
    std::ofstream(bad) << "name = web2\n";
    Ran r = Ctl(h.socket, {"define", bad});
    CHECK(r.exit == 1);
    CHECK(r.out.find("is not JSON") != std::string::npos);
  }
  CHECK(CtlJson(h.socket, {"list"})["vms"].empty());
  CHECK(!std::filesystem::exists(h.state + "/vms/web2"));
}

TEST_CASE("one lockstepd per state directory and per socket", "[admin]") {
  Host h;
  h.StartDaemon();
  auto second = ChildProcess::Start({LOCKSTEPD_PATH, "--state", h.state, "--socket",
                                     h.dir + "/other.sock", "--qemu", LOCKSTEP_QEMU},
                                    "", h.dir + "/second.log");
  REQUIRE(second.ok());
  int status = 0;
  REQUIRE((*second)->WaitExit(10s, &status));
  CHECK(WEXITSTATUS(status) == 1);
  CHECK((*second)->Log().find("another lockstepd uses the state directory") != std::string::npos);
  CHECK(CtlJson(h.socket, {"list"})["host"] == "hostA");  // the first goes on
}

TEST_CASE("pairing: one new key on both hosts, each proves it, a wrong key is refused by both",
          "[admin]") {
  Host a("hostA"), b("hostB"), c("hostC");
  a.StartDaemon();
  b.StartDaemon();
  c.StartDaemon();
  Ran paired = Ctl(a.socket, {"pair", a.socket, b.socket});
  INFO(paired.out);
  REQUIRE(paired.exit == 0);
  CHECK(paired.out.find("paired hostA and hostB") != std::string::npos);
  // The same key on both, root's only, in the file the engine's key_file= reads.
  auto read = [](const std::string& f) {
    std::ifstream in(f);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  };
  const std::string key = read(a.state + "/pairing.key");
  CHECK(key.size() == 65);
  CHECK(read(b.state + "/pairing.key") == key);
  struct stat st;
  REQUIRE(stat((a.state + "/pairing.key").c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  json pa = CtlJson(a.socket, {"pairing"});
  CHECK(pa["pairing"]["peer_host"] == "hostB");
  CHECK(pa["pairing"]["last_check"] == "both hosts proved they hold the pairing key");
  CHECK(CtlJson(b.socket, {"pairing"})["pairing"]["peer_host"] == "hostA");

  // Pairing hostA again, with hostC, is refused while it is paired: nothing changes.
  Ran again = Ctl(a.socket, {"pair", a.socket, c.socket});
  CHECK(again.exit == 1);
  CHECK(again.out.find("unpair it first") != std::string::npos);
  CHECK(read(a.state + "/pairing.key") == key);
  CHECK(!std::filesystem::exists(c.state + "/pairing.key"));

  // hostB comes back with another key (a restored backup, a botched re-pairing).
  b.daemon.reset();
  std::ofstream(b.state + "/pairing.key") << std::string(64, '7') << "\n";
  b.StartDaemon();
  Ran from_a = Ctl(a.socket, {"pairing"});
  INFO(from_a.out);
  CHECK(from_a.exit == 1);
  CHECK(from_a.out.find("hostB did not prove it holds this host's pairing key") !=
        std::string::npos);
  Ran from_b = Ctl(b.socket, {"pairing"});
  INFO(from_b.out);
  CHECK(from_b.exit == 1);
  CHECK(from_b.out.find("hostA did not prove it holds this host's pairing key") !=
        std::string::npos);
  // Each side said no to the other, in its own log, naming the key.
  CHECK(b.daemon->WaitForLog("pairing key", 5s));
  CHECK(a.daemon->WaitForLog("event=peer_check_failed", 5s));

  // Garbage on the peer API (a wrong type in the HELLO) is refused; the daemon goes on.
  {
    auto link = lockstep::channel::MakeTcpTransport()->Connect(
        "127.0.0.1:" + std::to_string(a.peer_port), 5000ms);
    REQUIRE(link.ok());
    const std::string hello = R"({"protocol": "lockstep-peer", "peer_api": 1, "host": 17})";
    lockstep::channel::ConstSlice g{hello.data(), hello.size()};
    REQUIRE((*link)->Send({&g, 1}).ok());
    CHECK(a.daemon->WaitForLog("event=peer_malformed", 5s));
  }
  CHECK(Ctl(a.socket, {"list"}).exit == 0);

  // An unpaired host refuses the peer API, and says what to do.
  Ran none = Ctl(c.socket, {"pairing"});
  CHECK(none.exit == 1);
  CHECK(none.out.find("not paired with any host (lockstepctl pair)") != std::string::npos);
  CHECK(Ctl(a.socket, {"unpair"}).exit == 0);
  CHECK(!std::filesystem::exists(a.state + "/pairing.key"));
  CHECK(CtlJson(a.socket, {"list"})["pairing"]["paired"] == false);
}

namespace {

using lockstep::testbed::Topology;

// Two hosts' daemons in network namespaces (hostA and hostB, each with its replication
// link address, then the extra flags given for it) and the witness on a third, for the
// tests that protect a VM.
struct NamespacedHosts {
  explicit NamespacedHosts(const std::string& prefix, const std::vector<std::string>& a_flags = {},
                           const std::vector<std::string>& b_flags = {})
      : witness_dir("/tmp/" + prefix + "-witness-" + std::to_string(getpid())) {
    auto t = Topology::Create(prefix);
    INFO(t.status().ToString());
    REQUIRE(t.ok());
    net = std::move(*t);
    std::filesystem::create_directories(witness_dir);
    StartWitness();
    auto flags = [&](const char* ip, const char* link_ip, const std::vector<std::string>& extra) {
      std::vector<std::string> f = {"--peer-listen",
                                    std::string(ip) + ":7400",
                                    "--replication-address",
                                    link_ip,
                                    "--witness",
                                    std::string("tcp:") + Topology::kWitnessIp + ":7700"};
      f.insert(f.end(), extra.begin(), extra.end());
      return f;
    };
    a = std::make_unique<Host>("hostA", net->primary_ns(),
                               flags(Topology::kPrimaryHostIp, Topology::kPrimaryLinkIp, a_flags));
    b = std::make_unique<Host>(
        "hostB", net->secondary_ns(),
        flags(Topology::kSecondaryHostIp, Topology::kSecondaryLinkIp, b_flags));
    a->StartDaemon();
    b->StartDaemon();
    Ran paired = Ctl(a->socket, {"pair", a->socket, b->socket});
    INFO(paired.out);
    REQUIRE(paired.exit == 0);
  }
  ~NamespacedHosts() { std::filesystem::remove_all(witness_dir); }

  // (Again, after a test killed it: the same state.)
  void StartWitness() {
    auto w = ChildProcess::Start(
        {LOCKSTEP_WITNESS_PATH, "--listen", std::string(Topology::kWitnessIp) + ":7700", "--state",
         witness_dir + "/state"},
        net->witness_ns(), witness_dir + "/witness-" + std::to_string(++witness_starts) + ".log");
    REQUIRE(w.ok());
    witness = std::move(*w);
    REQUIRE(witness->WaitForLog("listening on", 10s));
  }

  // Defines the test guest on hostA: on each host's tap0, reached by the client through
  // the switch.
  void DefineOnA(const std::string& name, const std::string& mac) {
    json def = {{"name", name},
                {"memory_mib", 256},
                {"kernel", std::string(LOCKSTEP_GUEST_DIR) + "/vmlinuz"},
                {"initrd", std::string(LOCKSTEP_GUEST_DIR) + "/initrd.gz"},
                {"append", std::string("console=ttyS0 quiet panic=-1 idle=halt lockstep.ip=") +
                               Topology::kGuestCidr},
                {"nics", {{{"mac", mac}, {"tap", Topology::kTap}}}},
                {"protection", {{"settings", "interval_ms=20;threshold_ms=300"}}}};
    const std::string path = a->dir + "/" + name + ".json";
    std::ofstream(path) << def.dump(2);
    REQUIRE(Ctl(a->socket, {"define", path}).exit == 0);
  }

  std::string witness_dir;
  int witness_starts = 0;
  std::unique_ptr<Topology> net;
  std::unique_ptr<ChildProcess> witness;
  std::unique_ptr<Host> a, b;
};

// The engine's state of `vm` as `host`'s daemon reports it ("" if none).
std::string ProtectionState(const Host& host, const std::string& vm) {
  Ran r = Ctl(host.socket, {"--json", "status", vm});
  if (r.exit != 0) return "";
  json j = json::parse(r.out, nullptr, false);
  return j.is_object() ? j["vm"]["protection"].value("state", std::string()) : "";
}

bool WaitForProtection(const Host& host, const std::string& vm, const std::string& state,
                       std::chrono::seconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (ProtectionState(host, vm) == state) return true;
    std::this_thread::sleep_for(200ms);
  }
  return false;
}

// Whether `host` took VM `vm` over from `from` within `timeout`, read from its history:
// its daemon may protect the VM again (ACTIVE → SYNCING) before a poll of the state sees
// ACTIVE.
bool WaitForTakeover(const Host& host, const std::string& vm, const std::string& from,
                     std::chrono::seconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    json j = json::parse(Ctl(host.socket, {"--json", "status", vm}).out, nullptr, false);
    if (j.is_object() && j["vm"].contains("events")) {
      for (const json& e : j["vm"]["events"]) {
        if (e.value("state", std::string()) == "ACTIVE" &&
            e.value("reason", std::string()).find("took over from " + from) != std::string::npos)
          return true;
      }
    }
    std::this_thread::sleep_for(200ms);
  }
  return false;
}

}  // namespace

TEST_CASE(
    // Catch2's console reporter aborts on a name whose first ": " comes past ~78 columns.
    "protect with lockstepctl: kill -9 of the primary host's daemon and QEMU, automatic "
    "re-protection when it is back, kill -9 again, unprotect, the client goes on",
    "[admin][qemu][protect]") {
  NamespacedHosts hosts("lsa");
  Host& a = *hosts.a;
  Host& b = *hosts.b;
  hosts.DefineOnA("web1", "52:54:00:12:34:56");
  json started = CtlJson(a.socket, {"start", "web1"});
  const pid_t primary_qemu = started["vm"]["pid"].get<pid_t>();
  a.qemu_pids.push_back(primary_qemu);
  auto client = WorkloadClient::Start(hosts.net->client_ns(), Topology::kGuestIp, 7000, 60s);
  INFO(client.status().ToString());
  REQUIRE(client.ok());
  REQUIRE((*client)->WaitForReplies(5, 60s));

  Ran protect = Ctl(a.socket, {"protect", "web1"});
  INFO(protect.out << "\nA:\n" << a.daemon->Log() << "\nB:\n" << b.daemon->Log());
  REQUIRE(protect.exit == 0);
  REQUIRE(WaitForProtection(a, "web1", "PROTECTED", 60s));
  REQUIRE(WaitForProtection(b, "web1", "PROTECTED", 10s));
  json sec = CtlJson(b.socket, {"status", "web1"});
  b.qemu_pids.push_back(sec["vm"]["pid"].get<pid_t>());
  CHECK(sec["vm"]["state"] == "paused");  // the secondary's guest never runs while protected
  CHECK(sec["vm"]["lockstep"][0]["role"] == "secondary");
  Ran human = Ctl(a.socket, {"status", "web1"});
  INFO(human.out);
  CHECK(human.out.find("role        primary") != std::string::npos);
  CHECK(human.out.find("peer        hostB: secondary (PROTECTED)") != std::string::npos);
  CHECK(human.out.find("MB/s on average since protection began") != std::string::npos);
  Ran all = Ctl(a.socket, {"status"});  // no VM: the list
  CHECK(all.exit == 0);
  CHECK(all.out.find("web1") != std::string::npos);
  CHECK(all.out.find("PROTECTION") != std::string::npos);
  const std::string metrics = Scrape(a.metrics_port, a.netns);
  INFO(metrics);
  CHECK(metrics.find(
            "lockstep_protection_state{vm=\"web1\",state=\"PROTECTED\",role=\"primary\"} 1") !=
        std::string::npos);
  CHECK(metrics.find("lockstep_epochs_total{vm=\"web1\"}") != std::string::npos);
  CHECK(metrics.find("lockstep_pause_seconds{vm=\"web1\",quantile=\"0.99\"}") != std::string::npos);
  CHECK(metrics.find("lockstepd_paired{host=\"hostA\"} 1") != std::string::npos);
  Ran twice = Ctl(a.socket, {"protect", "web1"});
  CHECK(twice.exit == 1);
  CHECK(twice.out.find("already protected") != std::string::npos);
  // Unprotecting on the secondary's host is refused: the primary, and its VM, stay.
  Ran wrong_host = Ctl(b.socket, {"unprotect", "web1"});
  CHECK(wrong_host.exit == 1);
  CHECK(wrong_host.out.find("unprotect it on the host that runs it as the primary") !=
        std::string::npos);
  Ran wrong_start = Ctl(b.socket, {"start", "web1"});
  CHECK(wrong_start.exit == 1);
  CHECK(wrong_start.out.find("already running") != std::string::npos);
  CHECK(ProtectionState(a, "web1") == "PROTECTED");

  // The primary host dies: its daemon and its QEMU, kill -9. The secondary takes over and
  // the client goes on; hostB keeps trying to protect the VM again while hostA is away.
  const uint64_t before = (*client)->replies();
  a.daemon->Kill(SIGKILL);
  kill(primary_qemu, SIGKILL);
  REQUIRE(WaitForProtection(b, "web1", "ACTIVE", 30s));
  CHECK(CtlJson(b.socket, {"status", "web1"})["vm"]["state"] == "running");
  const bool went_on = (*client)->WaitForReplies(before + 20, 60s);
  INFO("client: " << (*client)->replies() << " replies, error '" << (*client)->error()
                  << "'\nB: " << Ctl(b.socket, {"status", "web1"}).out << "\nB's log:\n"
                  << b.daemon->Log());
  REQUIRE(went_on);
  CHECK((*client)->inconsistent() == 0);
  CHECK((*client)->error().empty());
  CHECK(b.daemon->WaitForLog("event=reprotect_waiting vm=web1", 10s));
  // hostB's daemon kept the engine's role changes: the takeover is in its event log and
  // counted for Prometheus.
  json history = CtlJson(b.socket, {"status", "web1"})["vm"]["events"];
  bool took_over = false;
  for (const json& e : history) took_over = took_over || e["state"] == "ACTIVE";
  INFO(history.dump(2));
  CHECK(took_over);
  CHECK(Scrape(b.metrics_port, b.netns).find("lockstep_takeovers_total{vm=\"web1\"} 1") !=
        std::string::npos);
  CHECK(Ctl(b.socket, {"status", "web1"}).out.find("ACTIVE        took over from hostA") !=
        std::string::npos);

  // hostA comes back (its daemon restarts): hostB re-protects the VM by itself, hostA's
  // old copy becoming the secondary. Then hostB's QEMU dies and the VM comes back to hostA,
  // which re-protects it to hostB in turn: the client is on its first connection throughout.
  int status = 0;
  a.daemon->WaitExit(5s, &status);
  a.StartDaemon();
  const bool reprotected = WaitForProtection(a, "web1", "PROTECTED", 60s);
  INFO("A: " << Ctl(a.socket, {"status", "web1"}).out
             << "\nB: " << Ctl(b.socket, {"status", "web1"}).out << "\nB's log:\n"
             << b.daemon->Log());
  REQUIRE(reprotected);
  REQUIRE(WaitForProtection(b, "web1", "PROTECTED", 10s));
  CHECK(b.daemon->WaitForLog("event=vm_reprotected vm=web1", 5s));
  json back = CtlJson(a.socket, {"status", "web1"});
  CHECK(back["vm"]["lockstep"][0]["role"] == "secondary");
  const uint64_t before_second = (*client)->replies();
  kill(CtlJson(b.socket, {"status", "web1"})["vm"]["pid"].get<pid_t>(), SIGKILL);
  REQUIRE(WaitForTakeover(a, "web1", "hostB", 30s));
  REQUIRE((*client)->WaitForReplies(before_second + 20, 60s));
  CHECK((*client)->inconsistent() == 0);
  CHECK((*client)->error().empty());
  REQUIRE(WaitForProtection(b, "web1", "PROTECTED", 60s));  // hostA re-protected it to hostB

  // Protected once more, then unprotected on purpose: no failover, the secondary goes away,
  // the VM runs on here, unprotected, and the client never notices.
  REQUIRE(WaitForProtection(a, "web1", "PROTECTED", 10s));
  Ran unprotect = Ctl(a.socket, {"unprotect", "web1"});
  INFO(unprotect.out);
  CHECK(unprotect.exit == 0);
  CHECK(ProtectionState(a, "web1") == "UNPROTECTED");
  CHECK(CtlJson(b.socket, {"list"})["vms"].empty());
  const uint64_t before_third = (*client)->replies();
  REQUIRE((*client)->WaitForReplies(before_third + 20, 30s));
  CHECK((*client)->inconsistent() == 0);
  CHECK((*client)->error().empty());
  (*client)->Stop();
}

TEST_CASE(
    "failover with lockstepctl: a drill there and back loses no reply, a forced failover, "
    "reprotect",
    "[admin][qemu][failover]") {
  NamespacedHosts hosts("lso");
  Host& a = *hosts.a;
  Host& b = *hosts.b;
  hosts.DefineOnA("db1", "52:54:00:12:34:57");
  REQUIRE(Ctl(a.socket, {"start", "db1"}).exit == 0);
  auto client = WorkloadClient::Start(hosts.net->client_ns(), Topology::kGuestIp, 7000, 60s);
  INFO(client.status().ToString());
  REQUIRE(client.ok());
  REQUIRE((*client)->WaitForReplies(5, 60s));

  // Refusals that change nothing: not protected yet; a reprotect of a VM never protected.
  Ran early = Ctl(a.socket, {"failover", "db1"});
  CHECK(early.exit == 1);
  CHECK(early.out.find("not protected") != std::string::npos);
  Ran never = Ctl(a.socket, {"reprotect", "db1"});
  CHECK(never.exit == 1);
  CHECK(never.out.find("never protected") != std::string::npos);
  Ran both = Ctl(a.socket, {"failover", "db1", "--drill", "--forced"});
  CHECK(both.exit == 2);

  REQUIRE(Ctl(a.socket, {"protect", "db1"}).exit == 0);
  REQUIRE(WaitForProtection(b, "db1", "PROTECTED", 30s));
  // With the witness away the secondary cannot take the token: it declines, and the VM
  // stays PROTECTED where it was.
  hosts.witness->Kill(SIGKILL);
  int witness_status = 0;
  REQUIRE(hosts.witness->WaitExit(5s, &witness_status));
  Ran declined = Ctl(a.socket, {"failover", "db1"});
  INFO(declined.out);
  CHECK(declined.exit == 1);
  CHECK(declined.out.find("declined the handover") != std::string::npos);
  CHECK(declined.out.find("witness could not be asked") != std::string::npos);
  CHECK(ProtectionState(a, "db1") == "PROTECTED");
  CHECK(ProtectionState(b, "db1") == "PROTECTED");
  hosts.StartWitness();
  // The secondary's host cannot start one: the primary, and its VM, stay as they are.
  Ran wrong_host = Ctl(b.socket, {"failover", "db1"});
  CHECK(wrong_host.exit == 1);
  CHECK(wrong_host.out.find("starts on the host that runs it as the primary") != std::string::npos);
  CHECK(ProtectionState(a, "db1") == "PROTECTED");

  // The drill: over to hostB with no reply lost, re-protected there, back, re-protected here.
  const uint64_t before = (*client)->replies();
  (*client)->Mark();
  Ran drill = Ctl(a.socket, {"failover", "db1", "--drill"});
  INFO(drill.out << "\nA:\n" << a.daemon->Log() << "\nB:\n" << b.daemon->Log());
  REQUIRE(drill.exit == 0);
  CHECK(drill.out.find("hostA -> hostB") != std::string::npos);
  CHECK(drill.out.find("hostB -> hostA") != std::string::npos);
  CHECK(drill.out.find("drill done") != std::string::npos);
  CHECK(ProtectionState(a, "db1") == "PROTECTED");
  CHECK(ProtectionState(b, "db1") == "PROTECTED");
  CHECK(CtlJson(a.socket, {"status", "db1"})["vm"]["lockstep"][0]["role"] == "primary");
  REQUIRE((*client)->WaitForReplies(before + 20, 60s));
  INFO("longest wait for a reply during the drill: " << (*client)->LongestGapAfterMark() << " s");
  CHECK((*client)->inconsistent() == 0);           // no reply lost, repeated or rolled back
  CHECK((*client)->error().empty());               // the same TCP connection throughout
  CHECK((*client)->LongestGapAfterMark() < 10.0);  // sanity bound: two initial syncs under TCG
  CHECK(a.daemon->WaitForLog("event=vm_handed_over vm=db1", 1s));
  CHECK(b.daemon->WaitForLog("event=vm_handed_over vm=db1", 1s));

  // Forced: hostA's QEMU is killed, hostB takes over and re-protects the VM to hostA.
  const uint64_t before_forced = (*client)->replies();
  Ran forced = Ctl(a.socket, {"--json", "failover", "db1", "--forced"});
  INFO(forced.out);
  REQUIRE(forced.exit == 0);
  json f = json::parse(forced.out);
  CHECK(f["to"] == "hostB");
  CHECK(f["reason"].get<std::string>().find("timeline") != std::string::npos);
  REQUIRE((*client)->WaitForReplies(before_forced + 20, 60s));
  CHECK((*client)->inconsistent() == 0);
  CHECK((*client)->error().empty());
  REQUIRE(WaitForProtection(a, "db1", "PROTECTED", 60s));  // hostA's copy: the secondary now
  REQUIRE(WaitForProtection(b, "db1", "PROTECTED", 10s));

  // Unprotected on purpose, then protected again with reprotect.
  REQUIRE(Ctl(b.socket, {"unprotect", "db1"}).exit == 0);
  Ran again = Ctl(b.socket, {"reprotect", "db1"});
  INFO(again.out);
  CHECK(again.exit == 0);
  CHECK(WaitForProtection(a, "db1", "PROTECTED", 30s));
  const uint64_t before_last = (*client)->replies();
  REQUIRE((*client)->WaitForReplies(before_last + 10, 30s));
  CHECK((*client)->inconsistent() == 0);
  CHECK((*client)->error().empty());

  // Unprotected while the secondary's host daemon is down: hostA's copy ends STOPPED and
  // nobody can discard it. Once hostA's daemon is back it shuts the copy down itself, so
  // hostB can protect the VM there again (refused while the old copy runs).
  a.daemon->Kill(SIGKILL);
  int daemon_status = 0;
  REQUIRE(a.daemon->WaitExit(5s, &daemon_status));
  Ran unprotect = Ctl(b.socket, {"--json", "unprotect", "db1"});
  INFO(unprotect.out);
  REQUIRE(unprotect.exit == 0);
  CHECK(unprotect.out.find("could not be stopped") != std::string::npos);
  a.StartDaemon();
  CHECK(a.daemon->WaitForLog("event=secondary_reaped vm=db1 engine=STOPPED", 15s));
  CHECK(ProtectionState(b, "db1") == "UNPROTECTED");
  CHECK(CtlJson(a.socket, {"status", "db1"})["vm"]["state"] == "stopped");
  Ran protect_again = Ctl(b.socket, {"protect", "db1"});
  INFO(protect_again.out);
  CHECK(protect_again.exit == 0);
  CHECK(WaitForProtection(a, "db1", "PROTECTED", 30s));
  CHECK((*client)->inconsistent() == 0);
  CHECK((*client)->error().empty());
  (*client)->Stop();
}

TEST_CASE(
    "a spare host paired in advance takes the lost partner's place: the VM is protected "
    "there by itself",
    "[admin][qemu][spare]") {
  NamespacedHosts hosts("lsr", {"--spare-after", "3"});
  Host& a = *hosts.a;
  Host& b = *hosts.b;
  hosts.DefineOnA("app1", "52:54:00:12:34:58");
  json started = CtlJson(a.socket, {"start", "app1"});
  a.qemu_pids.push_back(started["vm"]["pid"].get<pid_t>());
  auto client = WorkloadClient::Start(hosts.net->client_ns(), Topology::kGuestIp, 7000, 60s);
  INFO(client.status().ToString());
  REQUIRE(client.ok());
  REQUIRE((*client)->WaitForReplies(5, 60s));
  REQUIRE(Ctl(a.socket, {"protect", "app1"}).exit == 0);
  REQUIRE(WaitForProtection(b, "app1", "PROTECTED", 30s));

  // hostC: the spare, on the secondary's side of the network (as replacement hardware
  // would be), paired with hostA in advance.
  Host c("hostC", hosts.net->secondary_ns(),
         {"--peer-listen", std::string(Topology::kSecondaryHostIp) + ":7401",
          "--replication-address", Topology::kSecondaryLinkIp, "--witness",
          std::string("tcp:") + Topology::kWitnessIp + ":7700"});
  c.StartDaemon();
  Ran spare = Ctl(a.socket, {"pair", a.socket, c.socket, "--spare"});
  INFO(spare.out);
  REQUIRE(spare.exit == 0);
  CHECK(spare.out.find("hostA has hostC as its spare") != std::string::npos);
  json pairing = CtlJson(a.socket, {"pairing"})["pairing"];
  CHECK(pairing["peer_host"] == "hostB");
  CHECK(pairing["spare"]["peer_host"] == "hostC");
  // The spare may check the pairing, not run VMs on hostA: that is the partner's.
  Ran twice = Ctl(a.socket, {"pair", a.socket, c.socket, "--spare"});
  CHECK(twice.exit == 1);

  // hostB is lost for good: its daemon and QEMU, kill -9. hostA goes on alone, waits
  // --spare-after for hostB, then protects the VM on hostC.
  const uint64_t before = (*client)->replies();
  b.daemon->Kill(SIGKILL);
  for (const auto& vm : std::filesystem::directory_iterator(b.state + "/vms")) {
    pid_t pid = 0;
    if (std::ifstream(vm.path() / "qemu.pid") >> pid && pid > 0) kill(pid, SIGKILL);
  }
  const bool promoted = a.daemon->WaitForLog("event=spare_promoted lost=hostB partner=hostC", 30s);
  INFO("A's log:\n" << a.daemon->Log() << "\nC's log:\n" << c.daemon->Log());
  REQUIRE(promoted);
  REQUIRE(WaitForProtection(a, "app1", "PROTECTED", 60s));
  REQUIRE(WaitForProtection(c, "app1", "PROTECTED", 10s));
  CHECK(CtlJson(c.socket, {"status", "app1"})["vm"]["lockstep"][0]["role"] == "secondary");
  pairing = CtlJson(a.socket, {"pairing"})["pairing"];
  CHECK(pairing["peer_host"] == "hostC");
  CHECK_FALSE(pairing.contains("spare"));
  REQUIRE((*client)->WaitForReplies(before + 20, 60s));

  // And it is real protection: hostA's QEMU dies, hostC runs the VM, the client goes on.
  const uint64_t before_kill = (*client)->replies();
  kill(CtlJson(a.socket, {"status", "app1"})["vm"]["pid"].get<pid_t>(), SIGKILL);
  const bool took_over = WaitForTakeover(c, "app1", "hostA", 30s);
  INFO("C: " << Ctl(c.socket, {"status", "app1"}).out << "\nC's log:\n" << c.daemon->Log());
  REQUIRE(took_over);
  REQUIRE((*client)->WaitForReplies(before_kill + 20, 60s));
  CHECK((*client)->inconsistent() == 0);
  CHECK((*client)->error().empty());
  (*client)->Stop();
}

TEST_CASE(
    "over DPDK: protected on af_packet across the replication link, kill -9 of the primary's "
    "QEMU, the other host takes over, the client goes on, protected again over DPDK",
    "[admin][qemu][dpdk]") {
  // Both hosts' ports are on their end of the replication link ("repl"); each host's QEMU
  // processes get a core of their own.
  auto dpdk = [](const std::string& core) {
    return std::vector<std::string>{
        "--dpdk-port", "net_af_packet0,iface=repl,framecnt=4096", "--dpdk-eal",
        "--no-huge -m 256 --no-pci --no-shconf --no-telemetry --log-level=*:error -l " + core};
  };
  NamespacedHosts hosts("lsk", dpdk("0"), dpdk("1"));
  Host& a = *hosts.a;
  Host& b = *hosts.b;
  hosts.DefineOnA("kv1", "52:54:00:12:34:59");
  const pid_t primary_qemu = CtlJson(a.socket, {"start", "kv1"})["vm"]["pid"].get<pid_t>();
  auto client = WorkloadClient::Start(hosts.net->client_ns(), Topology::kGuestIp, 7000, 60s);
  INFO(client.status().ToString());
  REQUIRE(client.ok());
  REQUIRE((*client)->WaitForReplies(5, 60s));

  Ran protect = Ctl(a.socket, {"protect", "kv1", "--transport", "dpdk"});
  INFO(protect.out);
  REQUIRE(protect.exit == 0);
  const bool is_protected = WaitForProtection(a, "kv1", "PROTECTED", 60s);
  INFO("A: " << Ctl(a.socket, {"status", "kv1"}).out
             << "\nB: " << Ctl(b.socket, {"status", "kv1"}).out << "\nA's log:\n"
             << a.daemon->Log() << "\nB's log:\n"
             << b.daemon->Log());
  REQUIRE(is_protected);
  REQUIRE(WaitForProtection(b, "kv1", "PROTECTED", 10s));
  CHECK(Ctl(a.socket, {"status", "kv1"}).out.find("transport   dpdk") != std::string::npos);
  // The secondary's engine object, as its QEMU was started: this host's port, a link number.
  const pid_t secondary_qemu = CtlJson(b.socket, {"status", "kv1"})["vm"]["pid"].get<pid_t>();
  std::ifstream cmdline_file("/proc/" + std::to_string(secondary_qemu) + "/cmdline");
  const std::string cmdline((std::istreambuf_iterator<char>(cmdline_file)),
                            std::istreambuf_iterator<char>());
  CHECK(cmdline.find("listen=net_af_packet0+iface=repl+framecnt=4096#") != std::string::npos);
  CHECK(cmdline.find("transport=dpdk") != std::string::npos);

  const uint64_t before = (*client)->replies();
  kill(primary_qemu, SIGKILL);
  const bool took_over = WaitForTakeover(b, "kv1", "hostA", 30s);
  INFO("B: " << Ctl(b.socket, {"status", "kv1"}).out);
  REQUIRE(took_over);
  REQUIRE((*client)->WaitForReplies(before + 20, 60s));
  CHECK((*client)->inconsistent() == 0);  // every reply chained, none lost
  CHECK((*client)->error().empty());      // the same TCP connection throughout
  // hostB protects it again to hostA, from the same QEMU and port; then unprotected.
  REQUIRE(WaitForProtection(a, "kv1", "PROTECTED", 60s));
  Ran unprotect = Ctl(b.socket, {"unprotect", "kv1"});
  INFO(unprotect.out);
  CHECK(unprotect.exit == 0);
  CHECK(CtlJson(a.socket, {"list"})["vms"].empty());
  CHECK((*client)->inconsistent() == 0);
  CHECK((*client)->error().empty());
  (*client)->Stop();
}
