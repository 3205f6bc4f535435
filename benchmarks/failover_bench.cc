// failover_bench: kill -9 of the primary QEMU under client load, many times, on the real
// guest, with the embedded witness and with etcd; every step of each failover timed.
//
// Per trial (a fresh protected pair each time; see testbed/protected_pair.h):
//   detect     kill -9 -> the secondary's PROMOTING event (it noticed the loss)
//   witness    the witness's answer (from the takeover timeline in the ACTIVE event)
//   restore    loading the last acknowledged epoch's device state
//   confirm    confirming the provisional grant at the witness (the grant window)
//   identity   claiming the VIP and the first gratuitous ARP round
//   active     kill -9 -> ACTIVE: vCPUs running, identity announced
//   first      kill -9 -> the reply to the first request the client sent after the kill
//   gap        the client's longest wait for a reply after the kill (the service gap it saw;
//              a wait that began before the kill counts from the kill)
// detect and active are QMP event timestamps, taken when QEMU's main loop emits the event
// (a main-loop hop after the engine's transition): they include that hop.
// and, measured in the same trial as baselines:
//   exit       kill -9 -> the kernel finished the process (pidfd): the floor for noticing
//              a dead QEMU by its closed socket
//   boot       launching a QEMU to the guest's workload ready: what restarting the VM
//              elsewhere (classic HA) costs at least, before any failure detection
//
// Prints p50/p95/p99/max, writes failover_bench.csv (one row per trial) and a PNG (CDFs)
// under benchmarks/results/. Not a test: it asserts nothing, but a trial whose client saw
// a contradicted reply is reported loudly and makes the exit status 1.
#include <poll.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <boost/program_options.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <future>
#include <iostream>
#include <limits>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "testbed/protected_pair.h"

namespace po = boost::program_options;

namespace {

using namespace std::chrono_literals;
using lockstep::Result;
using lockstep::Status;
using namespace lockstep::testbed;

struct Trial {
  std::string witness;
  int n = 0;
  double exit_ms = 0, detect_ms = 0, witness_ms = 0, restore_ms = 0, confirm_ms = 0,
         identity_ms = 0, active_ms = 0, first_ms = 0, gap_ms = 0, boot_ms = 0;
  bool consistent = true;
};

struct Options {
  Parts parts;
  std::string witness_binary;
  int trials = 30;
  std::vector<WitnessKind> witnesses = {WitnessKind::kEmbedded, WitnessKind::kEtcd};
  std::string settings = "interval_ms=20;heartbeat_ms=1;threshold_ms=5";
  int client_rto_min_ms = 0;  // 0: the client's kernel default (200 ms on Linux)
  std::string out_dir = "benchmarks/results";
  std::string name = "failover_bench";  // of the CSV and PNG files
};

// "name 1.23 ms" inside the takeover timeline of an ACTIVE reason; NaN if absent (left out
// of the percentiles, not counted as zero).
double Step(const std::string& reason, const std::string& name) {
  const double absent = std::numeric_limits<double>::quiet_NaN();
  size_t at = reason.find("timeline: ");
  if (at == std::string::npos) return absent;
  at = reason.find(name + " ", at);
  if (at == std::string::npos) return absent;
  return std::atof(reason.c_str() + at + name.size() + 1);
}

// Waits for `pid` to end (pidfd: no polling interval) and returns WallSeconds() then.
double WaitForExit(int pidfd) {
  pollfd p{pidfd, POLLIN, 0};
  while (poll(&p, 1, 30000) < 0 && errno == EINTR) {
  }
  return WallSeconds();
}

Result<Trial> RunTrial(const Options& o, WitnessKind kind, int n, std::mt19937_64& rng) {
  PairOptions po;
  po.prefix = "lsf";
  po.witness = kind;
  po.witness_binary = o.witness_binary;
  po.settings = o.settings;
  po.vip = "10.9.0.50";
  auto started = ProtectedPair::Start(o.parts, po);
  if (!started.ok()) return started.status();
  ProtectedPair& pair = **started;
  if (o.client_rto_min_ms > 0) {
    // The client's retransmission floor for the guest, on its route (takes effect for the
    // connection already open: TCP reads the route's metric on every timer).
    Status s = Run("ip -n " + pair.net().client_ns() + " route replace " + Topology::kGuestIp +
                   "/32 dev eth0 rto_min " + std::to_string(o.client_rto_min_ms) + "ms");
    if (!s.ok()) return s;
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300 + rng() % 1200));

  // A pair that failed over on its own before the kill (a threshold too short for this
  // machine) is not a trial: say so.
  auto before_p = pair.primary().LockstepStatus(), before_s = pair.secondary().LockstepStatus();
  std::string ps = before_p.ok() ? (*before_p)["state"].get<std::string>() : "?",
              ss = before_s.ok() ? (*before_s)["state"].get<std::string>() : "?";
  if (ps != "PROTECTED" || ss != "PROTECTED") {
    return Status::FailedPrecondition(
        "FALSE FAILOVER: before the kill the primary was " + ps + " (" +
        (before_p.ok() ? (*before_p).value("reason", "") : "") + ") and the secondary " + ss +
        " (" + (before_s.ok() ? (*before_s).value("reason", "") : "") + ")");
  }
  int pidfd = static_cast<int>(syscall(SYS_pidfd_open, pair.primary().pid(), 0));
  if (pidfd < 0) return Status::FromErrno("pidfd_open", errno);
  const double killed = pair.client().Mark();
  pair.primary().Kill();
  auto exited = std::async(std::launch::async, [pidfd] { return WaitForExit(pidfd); });
  auto promoting = pair.secondary().WaitForState("PROMOTING", 30s);
  auto active = pair.secondary().WaitForState("ACTIVE", 30s);
  const double exit_at = exited.get();
  close(pidfd);
  if (!promoting.ok() || !active.ok()) {
    return Status::TimedOut(
        "no takeover: " + (active.ok() ? promoting.status() : active.status()).ToString() + "\n" +
        pair.Logs());
  }
  const uint64_t from = pair.client().replies();
  const bool more = pair.client().WaitForReplies(from + 20, 60s);
  Trial t;
  t.witness = WitnessKindName(kind);
  t.n = n;
  std::string reason = (*active)["data"].value("reason", "");
  t.exit_ms = 1000 * (exit_at - killed);
  t.detect_ms = 1000 * (Qmp::EventTime(*promoting) - killed);
  t.witness_ms = Step(reason, "witness");
  t.restore_ms = Step(reason, "device state");
  t.confirm_ms = Step(reason, "confirm");
  t.identity_ms = Step(reason, "identity");
  t.active_ms = 1000 * (Qmp::EventTime(*active) - killed);
  t.first_ms = 1000 * (pair.client().FirstReplyAfterMark() - killed);
  t.gap_ms = 1000 * pair.client().LongestGapAfterMark();
  t.boot_ms = 1000 * pair.boot_seconds();
  t.consistent = more && pair.client().inconsistent() == 0 && pair.client().error().empty();
  if (!t.consistent) {
    std::fprintf(stderr, "failover_bench: trial %d (%s): the client saw a problem: %s\n%s\n", n,
                 t.witness.c_str(), pair.client().error().c_str(), pair.Logs().c_str());
  }
  return t;
}

// Nearest rank; with 30 trials p99 is the maximum. NaNs (absent steps) are left out.
double Percentile(std::vector<double> v, double p) {
  std::erase_if(v, [](double x) { return std::isnan(x); });
  if (v.empty()) return std::numeric_limits<double>::quiet_NaN();
  std::sort(v.begin(), v.end());
  size_t i = static_cast<size_t>(p * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(i, v.size() - 1)];
}

// Boost.program_options reports errors by exception; they stop here, as a Status. *help
// is set (and the usage printed) for --help.
Result<Options> ParseOptions(int argc, char** argv, bool* help) {
  Options o;
#ifdef LOCKSTEP_QEMU
  o.parts = {LOCKSTEP_QEMU, LOCKSTEP_GUEST_DIR, LOCKSTEP_PLUGIN_PATH};
  o.witness_binary = LOCKSTEP_WITNESS_PATH;
#endif
  std::string witness = "both";
  po::options_description opts(
      "usage: failover_bench [options]\n"
      "Needs root (network namespaces), QEMU and the guest (scripts/test.sh builds both, and\n"
      "this program with their paths as defaults) and etcd-server for the etcd witness");
  opts.add_options()("help,h", "this help")("trials", po::value(&o.trials)->default_value(o.trials),
                                            "failovers per witness (1..1000)")(
      "quick", "5 trials per witness (CI)")("witness", po::value(&witness)->default_value(witness),
                                            "embedded, etcd or both")(
      "settings", po::value(&o.settings)->default_value(o.settings),
      "the plugin settings of both replicas (docs/qemu-plugin.md)")(
      "client-rto-min-ms", po::value(&o.client_rto_min_ms),
      "the client's TCP retransmission floor towards the guest (default: its kernel's, 200 ms)")(
      "qemu", po::value(&o.parts.qemu), "qemu-system-x86_64 built by qemu-patches/build-qemu.sh")(
      "guest-dir", po::value(&o.parts.guest_dir), "vmlinuz and initrd.gz (guest/build-guest.sh)")(
      "plugin", po::value(&o.parts.plugin), "liblockstep_plugin.so")(
      "witness-binary", po::value(&o.witness_binary), "lockstep-witness")(
      "out", po::value(&o.out_dir)->default_value(o.out_dir), "where to write the results")(
      "name", po::value(&o.name)->default_value(o.name), "their file names: NAME.csv, NAME.png");
  try {
    po::variables_map vm;
    po::store(po::parse_command_line(argc, argv, opts), vm);
    if (vm.count("help")) {
      std::cout << opts << "\n";
      *help = true;
      return o;
    }
    po::notify(vm);
    if (vm.count("quick")) o.trials = 5;
  } catch (const po::error& e) {
    std::ostringstream usage;
    usage << opts;
    return Status::InvalidArgument(std::string(e.what()) + "\n" + usage.str());
  }
  if (o.trials < 1 || o.trials > 1000) return Status::InvalidArgument("--trials must be 1..1000");
  if (o.client_rto_min_ms < 0 || o.client_rto_min_ms > 1000)
    return Status::InvalidArgument("--client-rto-min-ms must be 1..1000");
  if (o.name.empty() || o.name.find('/') != std::string::npos)
    return Status::InvalidArgument("--name must be a file name, without '/'");
  if (witness == "embedded") {
    o.witnesses = {WitnessKind::kEmbedded};
  } else if (witness == "etcd") {
    o.witnesses = {WitnessKind::kEtcd};
  } else if (witness != "both") {
    return Status::InvalidArgument("--witness must be embedded, etcd or both");
  }
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  bool help = false;
  auto parsed = ParseOptions(argc, argv, &help);
  if (!parsed.ok()) {
    std::fprintf(stderr, "failover_bench: %s\n", parsed.status().message().c_str());
    return 2;
  }
  if (help) return 0;
  const Options& o = *parsed;
  if (Status s = o.parts.Check(); !s.ok()) {
    std::fprintf(stderr, "failover_bench: %s\n", s.ToString().c_str());
    return 2;
  }
  if (geteuid() != 0) {
    std::fprintf(stderr, "failover_bench: needs root for the network namespaces; use sudo\n");
    return 2;
  }
  for (WitnessKind k : o.witnesses) {
    if (k == WitnessKind::kEtcd && access("/usr/bin/etcd", X_OK) != 0) {
      std::fprintf(stderr,
                   "failover_bench: /usr/bin/etcd is missing; install etcd-server "
                   "(scripts/bootstrap.sh) or use --witness embedded\n");
      return 2;
    }
  }

  std::mt19937_64 rng(std::random_device{}());
  std::vector<Trial> trials;
  int failures = 0;
  for (WitnessKind k : o.witnesses) {
    for (int n = 1; n <= o.trials; ++n) {
      auto t = RunTrial(o, k, n, rng);
      if (!t.ok()) {
        std::fprintf(stderr, "failover_bench: %s trial %d failed: %s\n", WitnessKindName(k), n,
                     t.status().ToString().c_str());
        ++failures;
        continue;
      }
      failures += !t->consistent;
      std::printf(
          "%-8s trial %2d: exit %6.1f  detect %6.1f  witness %5.1f  restore %5.1f  confirm "
          "%5.1f  identity %4.2f  active %6.1f  first reply %6.1f  gap %6.1f ms\n",
          t->witness.c_str(), n, t->exit_ms, t->detect_ms, t->witness_ms, t->restore_ms,
          t->confirm_ms, t->identity_ms, t->active_ms, t->first_ms, t->gap_ms);
      std::fflush(stdout);
      trials.push_back(*t);
    }
  }

  struct Metric {
    const char* name;
    double Trial::*field;
  };
  const Metric metrics[] = {
      {"exit (baseline)", &Trial::exit_ms}, {"detect", &Trial::detect_ms},
      {"witness", &Trial::witness_ms},      {"restore", &Trial::restore_ms},
      {"confirm", &Trial::confirm_ms},      {"identity", &Trial::identity_ms},
      {"active", &Trial::active_ms},        {"first reply", &Trial::first_ms},
      {"client gap", &Trial::gap_ms},       {"boot (baseline)", &Trial::boot_ms}};
  for (WitnessKind k : o.witnesses) {
    std::vector<const Trial*> mine;
    for (const Trial& t : trials)
      if (t.witness == WitnessKindName(k)) mine.push_back(&t);
    if (mine.empty()) continue;
    std::printf("\nwitness %s, %zu trials (ms after kill -9)\n%-16s %9s %9s %9s %9s\n",
                WitnessKindName(k), mine.size(), "step", "p50", "p95", "p99", "max");
    for (const Metric& m : metrics) {
      std::vector<double> v;
      for (const Trial* t : mine) v.push_back(t->*m.field);
      std::printf("%-16s %9.2f %9.2f %9.2f %9.2f\n", m.name, Percentile(v, 0.5),
                  Percentile(v, 0.95), Percentile(v, 0.99), Percentile(v, 1.0));
    }
  }

  std::filesystem::create_directories(o.out_dir);
  std::string csv = o.out_dir + "/" + o.name + ".csv";
  FILE* f = std::fopen(csv.c_str(), "w");
  if (f == nullptr) {
    std::fprintf(stderr, "failover_bench: cannot write %s: %s\n", csv.c_str(),
                 std::strerror(errno));
    return 1;
  }
  std::fprintf(f,
               "witness,trial,exit_ms,detect_ms,witness_ms,restore_ms,confirm_ms,identity_ms,"
               "active_ms,first_reply_ms,client_gap_ms,boot_ms,consistent,settings,"
               "client_rto_min_ms\n");
  for (const Trial& t : trials) {
    std::fprintf(f, "%s,%d,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.1f,%d,%s,%d\n",
                 t.witness.c_str(), t.n, t.exit_ms, t.detect_ms, t.witness_ms, t.restore_ms,
                 t.confirm_ms, t.identity_ms, t.active_ms, t.first_ms, t.gap_ms, t.boot_ms,
                 t.consistent ? 1 : 0, o.settings.c_str(), o.client_rto_min_ms);
  }
  std::fclose(f);
  std::printf("\nwrote %s\n", csv.c_str());
  std::string plot = "/usr/bin/python3 benchmarks/plot_failover_bench.py '" + csv + "' '" +
                     o.out_dir + "/" + o.name + ".png'";
  if (std::filesystem::exists("benchmarks/plot_failover_bench.py") &&
      std::system(plot.c_str()) != 0) {
    std::fprintf(stderr, "failover_bench: plotting failed (is python3-matplotlib installed?)\n");
  }
  if (failures > 0) {
    std::fprintf(stderr, "failover_bench: %d trial(s) failed or saw a contradicted reply\n",
                 failures);
    return 1;
  }
  return 0;
}
