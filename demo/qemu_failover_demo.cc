// The failover demo: a real Linux guest in QEMU, protected by lockstep, survives kill -9 of
// its primary QEMU; a client on another host keeps its TCP connection and loses no reply.
//
// The hosts are network namespaces on this machine (testbed/include/testbed/topology.h): a
// client, a switch, a witness, a primary and a secondary host, and a dedicated replication
// link between the two hosts. Each host runs lockstepd, and the demo does what an
// administrator would, with lockstepctl only: pair the hosts, define the VM, start it,
// protect it, watch its status. The guest (guest/) answers a workload whose replies chain a
// checksum, so the client proves that no reply was lost, repeated or rolled back. After a
// few seconds of protection the demo kills the primary QEMU with SIGKILL (the failure) and
// prints the takeover as lockstepctl shows it, in milliseconds from the kill.
#include <signal.h>
#include <unistd.h>

#include <boost/program_options.hpp>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>

#include "testbed/child_process.h"
#include "testbed/qemu_vm.h"  // Parts
#include "testbed/topology.h"
#include "testbed/workload_client.h"

namespace po = boost::program_options;
using namespace std::chrono_literals;
using lockstep::Result;
using lockstep::Status;
using namespace lockstep::testbed;

namespace {

constexpr const char* kBuildHint =
    "sudo scripts/demo.sh builds QEMU (qemu-patches/build-qemu.sh), the guest "
    "(guest/build-guest.sh) and the plugin (scripts/build.sh lockstep_plugin), then runs "
    "this demo";

struct Flags {
  Parts parts;
  int seconds = 5;
  std::string prefix = "lsdemo";
  bool help = false;
};

// Boost.program_options reports errors by exception; they stop here, as a Status.
Result<Flags> ParseFlags(int argc, char** argv) {
  Flags f;
  // A path CMake knew (scripts/demo.sh passes them) is the default; without one the flag is
  // required, since guessing would run some other QEMU or guest.
  auto path = [](std::string* into, const char* built_in) {
    auto* v = po::value(into);
    return *built_in ? v->default_value(built_in) : v->required();
  };
  po::options_description opts("usage: lockstep_qemu_demo [SECONDS] [options]");
  opts.add_options()("help,h", "this help")(
      "qemu", path(&f.parts.qemu, LOCKSTEP_QEMU),
      "qemu-system-x86_64 built by qemu-patches/build-qemu.sh")(
      "guest-dir", path(&f.parts.guest_dir, LOCKSTEP_GUEST_DIR),
      "vmlinuz and initrd.gz built by guest/build-guest.sh")(
      "plugin", path(&f.parts.plugin, LOCKSTEP_PLUGIN_PATH),
      "liblockstep_plugin.so (scripts/build.sh lockstep_plugin)")(
      "seconds", po::value(&f.seconds)->default_value(f.seconds),
      "seconds of protection before the kill (1..3600; also the first positional argument)")(
      "namespace-prefix", po::value(&f.prefix)->default_value(f.prefix),
      "names of the network namespaces: PREFIX-cli, -sw, -pri, -sec (1..8 of a-z 0-9)");
  po::positional_options_description positional;
  positional.add("seconds", 1);  // `scripts/demo.sh 2`, as .ci/run calls it
  try {
    po::variables_map vm;
    po::store(po::command_line_parser(argc, argv).options(opts).positional(positional).run(), vm);
    if (vm.count("help")) {
      std::cout << opts << "\n";
      f.help = true;
      return f;
    }
    po::notify(vm);
  } catch (const po::required_option& e) {
    return Status::InvalidArgument(std::string(e.what()) +
                                   ": this build has no path compiled in; " + kBuildHint);
  } catch (const po::error& e) {
    std::ostringstream usage;
    usage << opts;
    return Status::InvalidArgument(std::string(e.what()) + "\n" + usage.str());
  }
  if (f.seconds < 1 || f.seconds > 3600) {
    return Status::InvalidArgument("--seconds must be 1..3600");
  }
  // The prefix ends up in `ip netns` command lines run by a shell.
  if (f.prefix.empty() || f.prefix.size() > 8 ||
      f.prefix.find_first_not_of("abcdefghijklmnopqrstuvwxyz0123456789") != std::string::npos) {
    return Status::InvalidArgument("--namespace-prefix must be 1..8 of a-z 0-9");
  }
  return f;
}

// A host-level virtual IP that moves with the VM (vip-manager's identity takeover).
constexpr const char* kVip = "10.9.0.50";

// The embedded witness, on a host of its own.
const std::string kWitnessAt = std::string(Topology::kWitnessIp) + ":7900";

double Ms(double seconds) { return 1000.0 * seconds; }

// One of the two hosts: its lockstepd, started in its namespace.
struct DemoHost {
  std::string name, netns, dir, socket;
  std::unique_ptr<ChildProcess> daemon;
};

// Runs lockstepctl as the operator would type it (shown with a "$"), against `host`.
// Returns its output; a failure is an error carrying that output.
Result<std::string> Ctl(const DemoHost& host, const std::vector<std::string>& args,
                        bool show = true) {
  std::string shown = "lockstepctl";
  std::string cmd = std::string(LOCKSTEPCTL_PATH) + " --socket '" + host.socket + "'";
  for (const auto& a : args) {
    shown += " " + a;
    cmd += " '" + a + "'";
  }
  if (show) std::printf("  [%s]$ %s\n", host.name.c_str(), shown.c_str());
  std::string out;
  int status = -1;
  if (FILE* f = popen((cmd + " 2>&1").c_str(), "r")) {
    char buf[4096];
    while (size_t n = fread(buf, 1, sizeof buf, f)) out.append(buf, n);
    status = pclose(f);
  }
  if (status != 0) return Status::FailedPrecondition(shown + " failed:\n" + out);
  return out;
}

// What `host`'s daemon says of `vm` (the control API, as lockstepctl --json status).
Result<Json> VmStatus(const DemoHost& host, const std::string& vm) {
  auto out = Ctl(host, {"--json", "status", vm}, /*show=*/false);
  if (!out.ok()) return out.status();
  Json j = Json::parse(*out, nullptr, false);
  if (!j.is_object()) return Status::Corruption("lockstepctl printed no JSON: " + *out);
  return j["vm"];
}

std::string Indent(const std::string& text) {
  std::string out = "    ";
  for (char ch : text) {
    out += ch;
    if (ch == '\n') out += "    ";
  }
  while (!out.empty() && (out.back() == ' ' || out.back() == '\n')) out.pop_back();
  return out + "\n";
}

Status RunDemo(const Flags& f) {
  auto net = Topology::Create(f.prefix);
  if (!net.ok()) return net.status();
  Topology& t = **net;
  std::printf(
      "hosts (network namespaces): client %s, switch %s, primary %s, secondary %s, witness %s\n",
      t.client_ns().c_str(), t.switch_ns().c_str(), t.primary_ns().c_str(),
      t.secondary_ns().c_str(), t.witness_ns().c_str());

  // The witness decides which replica may be active after a fault; its decisions persist.
  const std::string work = "/tmp/lockstep-demo-" + std::to_string(getpid());
  std::filesystem::remove_all(work);
  std::filesystem::create_directories(work);
  struct Cleanup {
    std::string dir;
    ~Cleanup() {
      // The VMs run in sessions of their own (lockstepd's design): whatever a failed run
      // left behind is killed from the daemons' pid files.
      for (const char* host : {"/a/vms", "/b/vms"}) {
        std::error_code ec;
        for (const auto& vm : std::filesystem::directory_iterator(dir + host, ec)) {
          pid_t pid = 0;
          if (std::ifstream(vm.path() / "qemu.pid") >> pid && pid > 0) kill(pid, SIGKILL);
        }
      }
      std::filesystem::remove_all(dir);
    }
  } cleanup{work};
  auto witness = ChildProcess::Start(
      {LOCKSTEP_WITNESS_PATH, "--listen", kWitnessAt, "--state", work + "/witness.state"},
      t.witness_ns(), work + "/witness.log");
  if (!witness.ok()) return witness.status().WithContext("starting lockstep-witness");
  if (!(*witness)->WaitForLog("listening on", 10s)) {
    return Status::FailedPrecondition("lockstep-witness did not start: " + (*witness)->Log());
  }

  // One lockstepd per host: its peer API on the host's address, its secondaries listening
  // on the dedicated replication link, both hosts asking the same witness.
  DemoHost a{"host-a", t.primary_ns(), work + "/a", work + "/a.sock", nullptr};
  DemoHost b{"host-b", t.secondary_ns(), work + "/b", work + "/b.sock", nullptr};
  for (auto [host, ip, link] :
       {std::tuple{&a, Topology::kPrimaryHostIp, Topology::kPrimaryLinkIp},
        std::tuple{&b, Topology::kSecondaryHostIp, Topology::kSecondaryLinkIp}}) {
    auto d = ChildProcess::Start(
        {LOCKSTEPD_PATH, "--host-id", host->name, "--state", host->dir, "--socket", host->socket,
         "--qemu", f.parts.qemu, "--plugin", f.parts.plugin, "--peer-listen",
         std::string(ip) + ":7400", "--replication-address", link, "--witness", "tcp:" + kWitnessAt,
         "--vip-interface", "br0"},
        host->netns, work + "/" + host->name + ".log");
    if (!d.ok() || !(*d)->WaitForLog("event=started", 10s)) {
      return Status::FailedPrecondition("lockstepd on " + host->name + " did not start" +
                                        (d.ok() ? ": " + (*d)->Log() : ""));
    }
    host->daemon = std::move(*d);
  }
  std::printf("lockstepd runs on host-a and host-b; the administrator:\n\n");
  auto fail = [&](const Status& s) {
    std::fprintf(stderr, "--- host-a's lockstepd\n%s\n--- host-b's lockstepd\n%s\n",
                 a.daemon->Log().c_str(), b.daemon->Log().c_str());
    return s;
  };
  auto run = [&](const DemoHost& h, const std::vector<std::string>& args) -> Status {
    auto out = Ctl(h, args);
    if (!out.ok()) return fail(out.status());
    std::printf("%s\n", Indent(*out).c_str());
    return Status::Ok();
  };

  // Pair the hosts: one new key on both, each proves it to the other.
  if (Status s = run(a, {"pair", a.socket, b.socket}); !s.ok()) return s;
  // Define the VM: the test guest on each host's tap0, its VIP following the active replica.
  const std::string definition = work + "/demo-vm.json";
  Json def = {{"name", "demo"},
              {"memory_mib", 256},
              {"kernel", f.parts.guest_dir + "/vmlinuz"},
              {"initrd", f.parts.guest_dir + "/initrd.gz"},
              {"append", std::string("console=ttyS0 quiet panic=-1 idle=halt lockstep.ip=") +
                             Topology::kGuestCidr},
              {"nics", {{{"mac", "52:54:00:12:34:56"}, {"tap", Topology::kTap}}}},
              {"protection",
               {{"settings", "interval_ms=20;heartbeat_ms=1;threshold_ms=30"}, {"vip", kVip}}}};
  std::ofstream(definition) << def.dump(2) << "\n";
  if (Status s = run(a, {"define", definition}); !s.ok()) return s;
  if (Status s = run(a, {"start", "demo"}); !s.ok()) return s;

  auto client = WorkloadClient::Start(t.client_ns(), Topology::kGuestIp, 7000, 60s);
  if (!client.ok()) return fail(client.status().WithContext("the guest's workload"));
  WorkloadClient& c = **client;
  std::printf(
      "  (the guest is up: client %s -> guest %s:7000, one TCP connection, one request "
      "at a time, every reply checked)\n\n",
      Topology::kClientIp, Topology::kGuestIp);

  auto t0 = std::chrono::steady_clock::now();
  if (Status s = run(a, {"protect", "demo"}); !s.ok()) return s;
  for (;;) {
    auto st = VmStatus(b, "demo");
    if (st.ok() && (*st)["protection"].value("state", std::string()) == "PROTECTED") break;
    if (std::chrono::steady_clock::now() - t0 > 60s) {
      return fail(Status::TimedOut("the secondary never became PROTECTED"));
    }
    std::this_thread::sleep_for(50ms);
  }
  std::printf(
      "  (PROTECTED %.0f ms after protect: the guest's 256 MiB copied to host-b)\n\n",
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());

  for (int i = 1; i <= f.seconds; ++i) {
    std::this_thread::sleep_for(1s);
    auto st = VmStatus(a, "demo");
    if (!st.ok()) return fail(st.status());
    const Json& p = (*st)["protection"];
    if (p.value("state", std::string()) != "PROTECTED" || !(*st).contains("lockstep")) {
      return fail(Status::FailedPrecondition("the primary left PROTECTED: " + p.dump()));
    }
    if (!c.error().empty()) return fail(Status::IoError("client: " + c.error()));
    const Json& e = (*st)["lockstep"][0];
    std::printf(
        "  %2d s  PROTECTED  epochs %5llu  pause p50 %5.2f ms p99 %5.2f ms  output held p50 "
        "%5.2f ms  client replies %6llu\n",
        i, e["epochs"].get<unsigned long long>(), e["pause-p50-us"].get<double>() / 1000,
        e["pause-p99-us"].get<double>() / 1000, e["ack-latency-p50-us"].get<double>() / 1000,
        static_cast<unsigned long long>(c.replies()));
  }
  std::printf("\n");
  if (Status s = run(a, {"status", "demo"}); !s.ok()) return s;

  // A drill first: a planned switchover to host-b and back (each host re-protects the VM
  // with the other by itself), under the client's load.
  c.Mark();
  const uint64_t before_drill = c.replies();
  if (Status s = run(a, {"failover", "demo", "--drill"}); !s.ok()) return s;
  if (!c.WaitForReplies(before_drill + 10, 30s) || c.inconsistent() != 0) {
    return fail(Status::Corruption("the client lost its way during the drill: " + c.error()));
  }
  std::printf(
      "  (drill done: %llu replies meanwhile, 0 inconsistent, same TCP connection; the "
      "client's longest wait %.0f ms)\n\n",
      static_cast<unsigned long long>(c.replies() - before_drill), Ms(c.LongestGapAfterMark()));

  auto st = VmStatus(a, "demo");
  if (!st.ok()) return fail(st.status());
  const pid_t qemu = (*st)["pid"].get<pid_t>();
  const double killed_at = c.Mark();
  kill(qemu, SIGKILL);
  const uint64_t before = c.replies();
  std::printf("*** kill -9 of host-a's QEMU (pid %d): the primary is gone ***\n\n", qemu);

  Json active;
  double active_seen = 0;
  for (;;) {
    auto sb = VmStatus(b, "demo");
    if (sb.ok()) {
      const std::string state = (*sb)["protection"].value("state", std::string());
      if (state == "ACTIVE") {
        active_seen = WallSeconds();
        active = *sb;
        break;
      }
      if (state == "FENCED" || state == "FAILED") {
        return fail(
            Status::FailedPrecondition("host-b went " + state + ": " + (*sb)["protection"].dump()));
      }
    }
    if (WallSeconds() - killed_at > 30) return fail(Status::TimedOut("host-b never took over"));
    std::this_thread::sleep_for(5ms);
  }
  for (int i = 0; i < 3000 && c.FirstReplyAfterMark() == 0 && c.error().empty(); ++i) {
    std::this_thread::sleep_for(10ms);
  }
  const double first_reply = c.FirstReplyAfterMark();
  std::printf("timeline (ms after the kill):\n");
  std::printf("  %8.1f  host-a's QEMU killed (kill -9)\n", 0.0);
  std::printf("  %8.1f  lockstepctl on host-b sees the VM ACTIVE (guest resumed, VIP %s)\n",
              Ms(active_seen - killed_at), kVip);
  if (first_reply > 0) {
    std::printf("  %8.1f  client: first reply after the kill\n", Ms(first_reply - killed_at));
  }
  std::printf("  (host-b's takeover: %s)\n\n",
              active["protection"].value("reason", std::string()).c_str());
  // host-a's daemon is still there: host-b protects the VM again by itself, host-a's old
  // copy becoming the secondary, while the client goes on. (Had host-a died whole, host-b
  // would do it when host-a's lockstepd is back.)
  const auto reprotect_from = std::chrono::steady_clock::now();
  bool reprotected = false;
  while (!reprotected && std::chrono::steady_clock::now() - reprotect_from < 60s) {
    auto sa = VmStatus(a, "demo");
    reprotected = sa.ok() && (*sa)["protection"].value("state", std::string()) == "PROTECTED";
    if (!reprotected) std::this_thread::sleep_for(100ms);
  }
  std::printf(
      "  (re-protected automatically %.1f s after the takeover)\n\n",
      std::chrono::duration<double>(std::chrono::steady_clock::now() - reprotect_from).count());
  if (Status s = run(b, {"list"}); !s.ok()) return s;
  if (Status s = run(a, {"list"}); !s.ok()) return s;
  if (!reprotected) return fail(Status::TimedOut("the VM was not re-protected within 60 s"));

  // Let the client run on for a while: a takeover that only looks good for one reply is
  // not a takeover.
  std::this_thread::sleep_for(2s);
  const uint64_t after = c.replies() - before;
  const uint64_t inconsistent = c.inconsistent();
  // The client never reconnects: any reply after the kill came on the connection it opened
  // to the primary, so "no error" is "the same connection".
  const std::string error = c.error();
  std::printf("verdict:\n");
  std::printf("  replies before the kill   %8llu\n", static_cast<unsigned long long>(before));
  std::printf(
      "  replies after the kill    %8llu  (from the survivor, unprotected and then protected "
      "again)\n",
      static_cast<unsigned long long>(after));
  std::printf("  inconsistent replies      %8llu  (lost, repeated or rolled back; must be 0)\n",
              static_cast<unsigned long long>(inconsistent));
  std::printf("  same TCP connection       %8s%s%s\n", error.empty() ? "yes" : "NO",
              error.empty() ? "" : "  ", error.c_str());
  std::printf("  longest wait for a reply  %8.1f ms\n", Ms(c.LongestGapAfterMark()));
  c.Stop();
  // The VMs run in sessions of their own (lockstepd's design): stop both copies.
  (void)Ctl(b, {"stop", "demo", "--force"}, /*show=*/false);
  (void)Ctl(a, {"stop", "demo", "--force"}, /*show=*/false);
  if (after == 0 || inconsistent != 0 || !error.empty()) {
    return fail(Status::Aborted("the guest did not survive the loss of its primary intact"));
  }
  std::printf(
      "\nOK: the guest survived kill -9 of its primary QEMU; the client's connection went on "
      "and no reply was lost.\n");
  return Status::Ok();
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // progress lines show at once, also when piped
  auto flags = ParseFlags(argc, argv);
  if (!flags.ok()) {
    std::fprintf(stderr, "demo: %s\n", flags.status().message().c_str());
    return 2;
  }
  if (flags->help) return 0;
  if (Status s = flags->parts.Check(); !s.ok()) {
    std::fprintf(stderr, "demo: %s\ndemo: %s\n", s.message().c_str(), kBuildHint);
    return 2;
  }
  if (geteuid() != 0) {
    std::fprintf(stderr,
                 "demo: must run as root: it builds network namespaces (one per host) and taps "
                 "for QEMU (try: sudo scripts/demo.sh)\n");
    return 2;
  }
  std::printf(
      "lockstep QEMU failover demo: a Linux guest on the primary host, replicated to the "
      "secondary host\nover a dedicated link, kill -9 of the primary QEMU after %d s of "
      "protection.\n",
      flags->seconds);
  Status s = RunDemo(*flags);
  if (!s.ok()) {
    std::fprintf(stderr, "demo: FAILED: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
