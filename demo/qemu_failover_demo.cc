// The failover demo: a real Linux guest in QEMU, protected by lockstep, survives kill -9 of
// its primary QEMU; a client on another host keeps its TCP connection and loses no reply.
//
// The hosts are network namespaces on this machine (testbed/include/testbed/topology.h): a
// client, a switch, a primary and a secondary host, and a dedicated replication link
// between the two hosts. Each host runs lockstep's QEMU (qemu-patches/) with the engine
// loaded as a plugin. The guest (guest/) answers a workload whose replies chain a checksum,
// so the client proves that no reply was lost, repeated or rolled back. After a few seconds
// of protection the demo kills the primary QEMU with SIGKILL and prints the takeover's
// timeline in milliseconds from the kill.
#include <unistd.h>

#include <boost/program_options.hpp>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>

#include "testbed/child_process.h"
#include "testbed/qemu_vm.h"
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

LockstepConfig Config(const std::string& role, const std::string& host) {
  LockstepConfig c;
  c.role = role;
  c.address = std::string(Topology::kSecondaryLinkIp) + ":7700";  // the replication link
  c.host = host;
  c.witness = "tcp:" + kWitnessAt;
  // 30 ms of silence is a lost peer; the host-level VIP follows the active replica.
  c.settings = "interval_ms=20;heartbeat_ms=1;threshold_ms=30;vip=" + std::string(kVip) + "@br0";
  return c;
}

// The next LOCKSTEP_STATE_CHANGE of the lockstep object: waiting for "the next one" rather
// than for a given state means a secondary that fenced itself or failed is reported at
// once, with QEMU's reason, instead of after a timeout.
Result<Json> NextState(QemuVm& vm, std::chrono::milliseconds timeout) {
  return vm.qmp().WaitForEvent("LOCKSTEP_STATE_CHANGE", timeout, [](const Json& e) {
    return e.at("data").value("id", std::string()) == "ft0";
  });
}

Status Expect(const Result<Json>& event, const std::string& state, const std::string& who) {
  if (!event.ok()) return event.status().WithContext(who + " never reached " + state);
  const Json& d = event->at("data");
  if (d.at("state") != state) {
    return Status::FailedPrecondition(who + " went to " + d.at("state").get<std::string>() +
                                      " instead of " + state + ": " +
                                      d.at("reason").get<std::string>());
  }
  return Status::Ok();
}

std::string Tail(const std::string& log, int lines) {
  size_t at = log.size();
  while (lines-- > 0 && at > 0) at = log.rfind('\n', at - 1);
  return at == std::string::npos || at == 0 ? log : log.substr(at + 1);
}

double Ms(double seconds) { return 1000.0 * seconds; }

Status RunDemo(const Flags& f) {
  auto net = Topology::Create(f.prefix);
  if (!net.ok()) return net.status();
  Topology& t = **net;
  std::printf(
      "hosts (network namespaces): client %s, switch %s, primary %s, secondary %s, witness %s\n",
      t.client_ns().c_str(), t.switch_ns().c_str(), t.primary_ns().c_str(),
      t.secondary_ns().c_str(), t.witness_ns().c_str());

  // The witness decides which replica may be active after a fault; its decisions persist.
  const std::string witness_state = "/tmp/lockstep-demo-witness-" + std::to_string(getpid());
  std::remove(witness_state.c_str());
  auto witness =
      ChildProcess::Start({LOCKSTEP_WITNESS_PATH, "--listen", kWitnessAt, "--state", witness_state},
                          t.witness_ns(), witness_state + ".log");
  if (!witness.ok()) return witness.status().WithContext("starting lockstep-witness");
  if (!(*witness)->WaitForLog("listening on", 10s)) {
    return Status::FailedPrecondition("lockstep-witness did not start: " + (*witness)->Log());
  }

  // The secondary waits, paused, for the primary to connect over the replication link.
  VmOptions sec_options, pri_options;
  sec_options.name = "demo-sec";
  sec_options.netns = t.secondary_ns();
  sec_options.start_paused = true;
  sec_options.extra = {"-object", LockstepObjectArg(f.parts, Config("secondary", "host-b"))};
  pri_options.name = "demo-pri";
  pri_options.netns = t.primary_ns();
  sec_options.tap = pri_options.tap = Topology::kTap;
  auto secondary = QemuVm::Launch(f.parts, sec_options);
  if (!secondary.ok()) return secondary.status().WithContext("starting the secondary QEMU");
  auto primary = QemuVm::Launch(f.parts, pri_options);
  if (!primary.ok()) return primary.status().WithContext("starting the primary QEMU");
  QemuVm& pri = **primary;
  QemuVm& sec = **secondary;
  // On any failure from here on, QEMU's own words are the best clue.
  auto fail = [&](const Status& s) {
    std::fprintf(stderr, "--- primary QEMU log (tail)\n%s\n--- secondary QEMU log (tail)\n%s\n",
                 Tail(pri.Log(), 15).c_str(), Tail(sec.Log(), 15).c_str());
    return s;
  };

  auto t0 = std::chrono::steady_clock::now();
  auto since = [&t0] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  std::printf("booting the guest on the primary (QEMU pid %d, TCG)...\n", pri.pid());
  if (!pri.WaitForLog("LOCKSTEP-GUEST-READY", 60s)) {
    return fail(Status::TimedOut("the guest did not boot within 60 s"));
  }
  std::printf("  guest up in %.1f s; protecting it: QMP object-add lockstep on the primary\n",
              since());

  t0 = std::chrono::steady_clock::now();
  auto added =
      pri.qmp().Execute("object-add", LockstepObjectAdd(f.parts, Config("primary", "host-a")));
  if (!added.ok()) return fail(added.status().WithContext("object-add"));
  // The secondary's PROTECTED means it holds a complete epoch: from now on it can take over.
  Status s = Expect(sec.WaitForState("PROTECTED", 60s), "PROTECTED", "the secondary");
  if (!s.ok()) return fail(s);
  auto st = pri.LockstepStatus();
  if (!st.ok()) return fail(st.status());
  std::printf("  PROTECTED after %.0f ms (initial copy of %s MiB of guest RAM: %.0f MiB sent)\n",
              Ms(since()), pri_options.memory_mib.c_str(),
              (*st)["bytes"].get<double>() / (1 << 20));

  auto client = WorkloadClient::Start(t.client_ns(), Topology::kGuestIp, 7000, 30s);
  if (!client.ok()) return fail(client.status());
  WorkloadClient& c = **client;
  // Each reply waits for the acknowledgement of the epoch that produced it (output commit),
  // so a client that sends one request at a time gets about one reply per epoch.
  std::printf(
      "client %s -> guest %s:7000: one TCP connection, one request at a time, every reply "
      "checked\n\n",
      Topology::kClientIp, Topology::kGuestIp);

  for (int i = 1; i <= f.seconds; ++i) {
    std::this_thread::sleep_for(1s);
    st = pri.LockstepStatus();
    if (!st.ok()) return fail(st.status());
    if ((*st)["state"] != "PROTECTED") {
      return fail(Status::FailedPrecondition(
          "the primary left PROTECTED: " + (*st)["state"].get<std::string>() + ", " +
          (*st)["reason"].get<std::string>()));
    }
    if (!c.error().empty()) return fail(Status::IoError("client: " + c.error()));
    std::printf(
        "  %2d s  PROTECTED  epochs %5llu  pause p50 %5.2f ms p99 %5.2f ms  output held p50 "
        "%5.2f ms  client replies %6llu\n",
        i, (*st)["epochs"].get<unsigned long long>(), (*st)["pause-p50-us"].get<double>() / 1000,
        (*st)["pause-p99-us"].get<double>() / 1000,
        (*st)["ack-latency-p50-us"].get<double>() / 1000,
        static_cast<unsigned long long>(c.replies()));
  }

  const double killed_at = c.Mark();
  pri.Kill();
  const uint64_t before = c.replies();
  std::printf("\n*** kill -9 of the primary QEMU (pid %d) ***\n\n", pri.pid());

  auto promoting = NextState(sec, 30s);
  if (s = Expect(promoting, "PROMOTING", "the secondary"); !s.ok()) return fail(s);
  auto active = NextState(sec, 30s);
  if (s = Expect(active, "ACTIVE", "the secondary"); !s.ok()) return fail(s);
  // The first request sent after the kill waits out the takeover; its reply comes from the
  // survivor, through the switch that learned the guest's new port from the announcement.
  for (int i = 0; i < 3000 && c.FirstReplyAfterMark() == 0 && c.error().empty(); ++i) {
    std::this_thread::sleep_for(10ms);
  }
  const double first_reply = c.FirstReplyAfterMark();

  std::printf("timeline (ms after the kill):\n");
  std::printf("  %8.1f  primary QEMU killed (kill -9)\n", 0.0);
  std::printf("  %8.1f  secondary: peer loss detected (PROMOTING)\n",
              Ms(Qmp::EventTime(*promoting) - killed_at));
  std::printf("  %8.1f  secondary: ACTIVE (guest resumed, VIP %s claimed, announced)\n",
              Ms(Qmp::EventTime(*active) - killed_at), kVip);
  if (first_reply > 0) {
    std::printf("  %8.1f  client: first reply after the kill\n", Ms(first_reply - killed_at));
  }
  std::printf("  (PROMOTING: %s)\n  (ACTIVE: %s)\n\n",
              promoting->at("data").at("reason").get<std::string>().c_str(),
              active->at("data").at("reason").get<std::string>().c_str());

  // Let the client run on the survivor for a while: a takeover that only looks good for one
  // reply is not a takeover.
  std::this_thread::sleep_for(2s);
  const uint64_t after = c.replies() - before;
  const uint64_t inconsistent = c.inconsistent();
  // The client never reconnects: any reply after the kill came on the connection it opened
  // to the primary, so "no error" is "the same connection".
  const std::string error = c.error();
  st = sec.LockstepStatus();
  const std::string state = st.ok() ? (*st)["state"].get<std::string>() : st.status().ToString();
  std::printf("verdict:\n");
  std::printf("  replies before the kill   %8llu\n", static_cast<unsigned long long>(before));
  std::printf(
      "  replies after the kill    %8llu  (from the survivor in ~2 s, unprotected: no output "
      "held)\n",
      static_cast<unsigned long long>(after));
  std::printf("  inconsistent replies      %8llu  (lost, repeated or rolled back; must be 0)\n",
              static_cast<unsigned long long>(inconsistent));
  std::printf("  same TCP connection       %8s%s%s\n", error.empty() ? "yes" : "NO",
              error.empty() ? "" : "  ", error.c_str());
  std::printf("  longest wait for a reply  %8.1f ms\n", Ms(c.LongestGapAfterMark()));
  std::printf("  secondary state           %8s\n", state.c_str());
  c.Stop();
  if (after == 0 || inconsistent != 0 || !error.empty() || state != "ACTIVE") {
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
