// qemu_bench: lockstep on the real test guest beside stock COLO, same QEMU binary, same run.
//
// Measures, under TCG on this machine:
//   - the guest's workload throughput (requests/s from a client on another "host") with
//     the guest unprotected and protected by lockstep;
//   - lockstep's checkpoint pause (p50/p99) and epochs/s, idle and under that load;
//   - lockstep's initial synchronization of the guest under the client's load, twice: as a
//     stop-and-copy (precopy_rounds=0: epoch 1 copies all RAM in its pause) and live (the
//     default: pre-copy rounds while the guest runs): epoch 1's pause, the rounds, and the
//     longest the client waited for a reply meanwhile;
//   - COLO's checkpoint pause and checkpoints/s on the same idle guest, twice: as upstream
//     (only the BQL fix that lets it run under TCG, qemu-patches 0004) and with
//     TCP_NODELAY (-global migration.x-colo-nodelay=on, 0005).
// Lockstep's pause is the engine's own measure (stop_vcpus to start_vcpus returning);
// COLO's is the time between its 'run' => 'stop' and 'stop' => 'run' trace events,
// which starts after vm_stop returned, so it slightly flatters COLO.
//
// Prints a table, writes CSV (and a PNG if python3-matplotlib is there) under
// benchmarks/results/. Not a test: it asserts nothing; the numbers are the product.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "free_port.h"
#include "testbed/qemu_vm.h"
#include "testbed/topology.h"
#include "testbed/workload_client.h"

namespace {

using namespace std::chrono_literals;
using lockstep::Result;
using lockstep::Status;
using namespace lockstep::testbed;

struct Row {
  std::string system, load;
  double epochs_per_s = 0, pause_p50_ms = 0, pause_p99_ms = 0, throughput_rps = 0;
  uint64_t pauses = 0;  // pauses the percentiles are over
};

struct SyncRow {
  std::string mode;  // "stop-and-copy" or "pre-copy"
  int rounds = 0;
  double epoch1_pause_ms = 0, client_longest_wait_ms = 0, sync_s = 0;
};

struct Options {
  Parts parts;
  int seconds = 20;
  int interval_ms = 10;
  int colo_delay_ms = 100;
  std::string out_dir = "benchmarks/results";
};

#define BENCH_TRY(expr)      \
  do {                       \
    Status _s = (expr);      \
    if (!_s.ok()) return _s; \
  } while (0)

template <typename T>
Status Assign(Result<T> r, T* out) {
  if (!r.ok()) return r.status();
  *out = std::move(*r);
  return Status::Ok();
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())))];
}

// Replies per second of a client running for `seconds`.
Status MeasureThroughput(const Topology& net, int seconds, double* rps) {
  std::unique_ptr<WorkloadClient> c;
  BENCH_TRY(Assign(WorkloadClient::Start(net.client_ns(), Topology::kGuestIp, 7000, 60s), &c));
  if (!c->WaitForReplies(20, 30s)) return Status::TimedOut("the guest does not answer");
  uint64_t before = c->replies();
  std::this_thread::sleep_for(std::chrono::seconds(seconds));
  uint64_t after = c->replies();
  c->Stop();
  if (c->inconsistent() != 0) {
    return Status::Corruption("the workload's replies do not chain: measurement void");
  }
  *rps = static_cast<double>(after - before) / seconds;
  return Status::Ok();
}

// A lockstep pair in the namespaces of `net`: the primary's engine settings (`*pc`, for
// object-add later) and both QEMUs' options, the secondary paused with its engine.
struct PairSetup {
  LockstepConfig pc, sc;
  VmOptions po, so;
};
PairSetup LockstepPair(const Options& o, const Topology& net, const std::string& name,
                       const std::string& extra_settings) {
  PairSetup p;
  p.pc.role = "primary";
  p.pc.host = "hostA";
  p.sc.role = "secondary";
  p.sc.host = "hostB";
  p.pc.address = p.sc.address = std::string(Topology::kSecondaryLinkIp) + ":7700";
  p.pc.settings = p.sc.settings =
      "interval_ms=" + std::to_string(o.interval_ms) + ";threshold_ms=300" + extra_settings;
  p.po.name = name + "-pri";
  p.po.netns = net.primary_ns();
  p.so.name = name + "-sec";
  p.so.netns = net.secondary_ns();
  p.po.tap = p.so.tap = Topology::kTap;
  p.so.start_paused = true;
  p.so.extra = {"-object", LockstepObjectArg(o.parts, p.sc)};
  return p;
}

// Launches the primary's QEMU and waits for its guest.
Status BootPrimary(const Options& o, const VmOptions& po, std::unique_ptr<QemuVm>* primary) {
  BENCH_TRY(Assign(QemuVm::Launch(o.parts, po), primary));
  if (!(*primary)->WaitForLog("LOCKSTEP-GUEST-READY", 60s)) {
    return Status::TimedOut("the guest did not boot: " + (*primary)->Log());
  }
  return Status::Ok();
}

// Unprotected, then protected by lockstep (idle, then under the client's load).
Status RunLockstep(const Options& o, std::vector<Row>* rows) {
  std::unique_ptr<Topology> net;
  BENCH_TRY(Assign(Topology::Create("lsb"), &net));
  auto [pc, sc, po, so] = LockstepPair(o, *net, "bench", "");
  std::unique_ptr<QemuVm> primary, secondary;
  BENCH_TRY(BootPrimary(o, po, &primary));
  Row unprotected{"none", "client", 0, 0, 0, 0, 0};
  std::printf("unprotected guest: client for %d s...\n", o.seconds);
  BENCH_TRY(MeasureThroughput(*net, o.seconds, &unprotected.throughput_rps));
  rows->push_back(unprotected);

  BENCH_TRY(Assign(QemuVm::Launch(o.parts, so), &secondary));
  Json ignored;
  BENCH_TRY(Assign(primary->qmp().Execute("object-add", LockstepObjectAdd(o.parts, pc)), &ignored));
  BENCH_TRY(Assign(primary->WaitForState("PROTECTED", 120s), &ignored));
  std::this_thread::sleep_for(2s);  // past the initial synchronization
  for (const char* load : {"idle", "client"}) {
    std::printf("lockstep, %s guest: %d s...\n", load, o.seconds);
    Json before, after;
    BENCH_TRY(Assign(primary->LockstepStatus(), &before));
    Row r{"lockstep", load, 0, 0, 0, 0, 0};
    if (std::strcmp(load, "idle") == 0) {
      std::this_thread::sleep_for(std::chrono::seconds(o.seconds));
    } else {
      BENCH_TRY(MeasureThroughput(*net, o.seconds, &r.throughput_rps));
    }
    BENCH_TRY(Assign(primary->LockstepStatus(), &after));
    if (after["state"] != "PROTECTED") {
      return Status::FailedPrecondition("protection ended during the run: " + after.dump());
    }
    uint64_t epochs = after["epochs"].get<uint64_t>() - before["epochs"].get<uint64_t>();
    r.epochs_per_s = static_cast<double>(epochs) / o.seconds;
    r.pause_p50_ms = after["pause-p50-us"].get<double>() / 1000;
    r.pause_p99_ms = after["pause-p99-us"].get<double>() / 1000;
    r.pauses = std::min<uint64_t>(epochs, 1024);  // the engine keeps the last 1024 pauses
    rows->push_back(r);
  }
  return Status::Ok();
}

// Protects the running guest while the client sends requests, with (`live`) or without
// pre-copy rounds; how long epoch 1 paused the guest comes from the engine's PROTECTED
// event ("initial synchronization done (N pre-copy rounds, then epoch 1 paused the guest
// X ms)").
Status RunInitialSync(const Options& o, bool live, std::vector<SyncRow>* rows) {
  std::unique_ptr<Topology> net;
  BENCH_TRY(Assign(Topology::Create("lsb"), &net));
  auto [pc, sc, po, so] = LockstepPair(o, *net, "sync", live ? "" : ";precopy_rounds=0");
  std::unique_ptr<QemuVm> primary, secondary;
  BENCH_TRY(BootPrimary(o, po, &primary));
  std::unique_ptr<WorkloadClient> c;
  BENCH_TRY(Assign(WorkloadClient::Start(net->client_ns(), Topology::kGuestIp, 7000, 60s), &c));
  if (!c->WaitForReplies(20, 30s)) return Status::TimedOut("the guest does not answer");
  BENCH_TRY(Assign(QemuVm::Launch(o.parts, so), &secondary));
  std::printf("initial synchronization, %s, client on...\n", live ? "pre-copy" : "stop-and-copy");
  c->Mark();
  const auto t0 = std::chrono::steady_clock::now();
  Json ignored, protected_event;
  BENCH_TRY(Assign(primary->qmp().Execute("object-add", LockstepObjectAdd(o.parts, pc)), &ignored));
  BENCH_TRY(Assign(primary->WaitForState("PROTECTED", 120s), &protected_event));
  SyncRow r;
  r.mode = live ? "pre-copy" : "stop-and-copy";
  r.sync_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const std::string reason = protected_event["data"].value("reason", std::string());
  const size_t rounds_at = reason.find('('), pause_at = reason.find("paused the guest ");
  if (rounds_at == std::string::npos || pause_at == std::string::npos) {
    return Status::FailedPrecondition("the PROTECTED event does not say epoch 1's pause: " +
                                      reason);
  }
  r.rounds = std::atoi(reason.c_str() + rounds_at + 1);
  r.epoch1_pause_ms = std::strtod(reason.c_str() + pause_at + 17, nullptr);
  std::this_thread::sleep_for(1s);  // the client's next replies, after the pause
  r.client_longest_wait_ms = c->LongestGapAfterMark() * 1000;
  c->Stop();
  if (c->inconsistent() != 0) {
    return Status::Corruption("the workload's replies do not chain: measurement void");
  }
  rows->push_back(r);
  return Status::Ok();
}

// Pauses (ms) between COLO's stop and run trace events, for stops in [from, to] (wall s).
std::vector<double> ColoPauses(const std::string& log, double from, double to) {
  std::vector<double> out;
  std::istringstream in(log);
  std::string line;
  double stopped = -1;
  while (std::getline(in, line)) {
    size_t at = line.find('@'), colon = line.find(":colo_vm_state_change");
    if (at == std::string::npos || colon == std::string::npos || colon < at) continue;
    double t = std::strtod(line.c_str() + at + 1, nullptr);
    if (line.find("'run' => 'stop'") != std::string::npos) {
      stopped = t;
    } else if (line.find("'stop' => 'run'") != std::string::npos && stopped > 0) {
      if (stopped >= from && stopped <= to) out.push_back((t - stopped) * 1000);
      stopped = -1;
    }
  }
  return out;
}

// COLO between two QEMUs on loopback, the same guest idle; no network proxies (they
// compare output, which an idle guest has none of).
Status RunColo(const Options& o, bool nodelay, std::vector<Row>* rows) {
  const int port = lockstep::testing::FreePort();
  VmOptions po, so;
  po.name = "colo-pri";
  so.name = "colo-sec";
  std::vector<std::string> common = {"-msg", "timestamp=on", "-trace", "colo_vm_state_change"};
  if (nodelay) common.insert(common.end(), {"-global", "migration.x-colo-nodelay=on"});
  po.extra = common;
  so.extra = common;
  so.extra.insert(so.extra.end(), {"-incoming", "tcp:127.0.0.1:" + std::to_string(port)});
  // COLO's secondary runs its own copy of the guest between checkpoints; under TCG that
  // copy goes astray (see the note in qemu-patches/README.md) and panics. Let it reboot
  // rather than end QEMU: each checkpoint overwrites it anyway.
  so.exit_on_reboot = false;
  std::unique_ptr<QemuVm> primary, secondary;
  BENCH_TRY(Assign(QemuVm::Launch(o.parts, so), &secondary));
  BENCH_TRY(Assign(QemuVm::Launch(o.parts, po), &primary));
  if (!primary->WaitForLog("LOCKSTEP-GUEST-READY", 60s)) {
    return Status::TimedOut("the guest did not boot: " + primary->Log());
  }
  Json caps = {{"capabilities", Json::array({{{"capability", "x-colo"}, {"state", true}}})}};
  Json ignored;
  BENCH_TRY(Assign(secondary->qmp().Execute("migrate-set-capabilities", caps), &ignored));
  BENCH_TRY(Assign(primary->qmp().Execute("migrate-set-capabilities", caps), &ignored));
  BENCH_TRY(Assign(
      primary->qmp().Execute("migrate-set-parameters", {{"x-checkpoint-delay", o.colo_delay_ms}}),
      &ignored));
  BENCH_TRY(
      Assign(primary->qmp().Execute("migrate", {{"uri", "tcp:127.0.0.1:" + std::to_string(port)}}),
             &ignored));
  if (!primary->WaitForLog("'stop' => 'run'", 120s)) {
    return Status::TimedOut("COLO made no checkpoint: " + primary->Log());
  }
  std::printf("COLO%s, idle guest: %d s...\n", nodelay ? " + TCP_NODELAY" : "", o.seconds);
  std::this_thread::sleep_for(2s);
  double from = WallSeconds();
  std::this_thread::sleep_for(std::chrono::seconds(o.seconds));
  double to = WallSeconds();
  Json st;
  BENCH_TRY(Assign(primary->qmp().Execute("query-colo-status"), &st));
  if (st.value("mode", std::string()) != "primary") {
    return Status::FailedPrecondition("COLO left primary mode during the run: " + st.dump());
  }
  std::vector<double> pauses = ColoPauses(primary->Log(), from, to);
  Row r{nodelay ? "colo+nodelay" : "colo", "idle", 0, 0, 0, 0, 0};
  r.epochs_per_s = static_cast<double>(pauses.size()) / (to - from);
  r.pause_p50_ms = Percentile(pauses, 0.5);
  r.pause_p99_ms = Percentile(pauses, 0.99);
  r.pauses = pauses.size();
  rows->push_back(r);
  return Status::Ok();
}

int Usage() {
  std::fprintf(
      stderr,
      "usage: qemu_bench [--seconds N] [--quick] [--interval-ms N] [--colo-delay-ms N]\n"
      "                  [--qemu PATH] [--guest-dir DIR] [--plugin PATH] [--out DIR]\n"
      "  --seconds        length of each measured phase (default 20; --quick: 5)\n"
      "  --interval-ms    lockstep's epoch interval (default 10)\n"
      "  --colo-delay-ms  COLO's x-checkpoint-delay (default 100)\n"
      "  --out            where to write qemu_bench.csv/.png (default benchmarks/results)\n"
      "Needs root (network namespaces), QEMU from qemu-patches/build-qemu.sh and the\n"
      "guest from guest/build-guest.sh: scripts/test.sh builds both, and this program\n"
      "with their paths as defaults.\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
#ifdef LOCKSTEP_QEMU
  o.parts = {LOCKSTEP_QEMU, LOCKSTEP_GUEST_DIR, LOCKSTEP_PLUGIN_PATH};
#endif
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](std::string* out) {
      if (i + 1 >= argc) return false;
      *out = argv[++i];
      return true;
    };
    auto number = [&](int* out) {
      std::string v;
      if (!value(&v)) return false;
      char* end = nullptr;
      long n = std::strtol(v.c_str(), &end, 10);
      if (v.empty() || *end != '\0' || n <= 0 || n > 3600) return false;
      *out = static_cast<int>(n);
      return true;
    };
    bool ok = true;
    if (a == "--seconds")
      ok = number(&o.seconds);
    else if (a == "--quick")
      o.seconds = 5;
    else if (a == "--interval-ms")
      ok = number(&o.interval_ms);
    else if (a == "--colo-delay-ms")
      ok = number(&o.colo_delay_ms);
    else if (a == "--qemu")
      ok = value(&o.parts.qemu);
    else if (a == "--guest-dir")
      ok = value(&o.parts.guest_dir);
    else if (a == "--plugin")
      ok = value(&o.parts.plugin);
    else if (a == "--out")
      ok = value(&o.out_dir);
    else
      ok = false;
    if (!ok) {
      std::fprintf(stderr, "qemu_bench: bad argument '%s'\n", a.c_str());
      return Usage();
    }
  }
  if (Status s = o.parts.Check(); !s.ok()) {
    std::fprintf(stderr, "qemu_bench: %s\n", s.ToString().c_str());
    return Usage();
  }
  if (geteuid() != 0) {
    std::fprintf(stderr, "qemu_bench: needs root for the network namespaces; run it with sudo\n");
    return 2;
  }

  std::vector<Row> rows;
  std::vector<SyncRow> syncs;
  for (int phase = 0; phase < 5; ++phase) {
    Status s = phase == 0   ? RunLockstep(o, &rows)
               : phase <= 2 ? RunInitialSync(o, /*live=*/phase == 2, &syncs)
                            : RunColo(o, phase == 4, &rows);
    if (!s.ok()) {
      std::fprintf(stderr, "qemu_bench: %s\n", s.ToString().c_str());
      return 1;
    }
  }

  std::printf("\n%-13s %-7s %10s %11s %11s %8s %12s\n", "system", "load", "epochs/s", "pause p50",
              "pause p99", "pauses", "requests/s");
  for (const Row& r : rows) {
    std::printf("%-13s %-7s %10.1f %8.2f ms %8.2f ms %8llu %12.0f\n", r.system.c_str(),
                r.load.c_str(), r.epochs_per_s, r.pause_p50_ms, r.pause_p99_ms,
                static_cast<unsigned long long>(r.pauses), r.throughput_rps);
  }
  auto find = [&](const std::string& system, const std::string& load) -> const Row* {
    for (const Row& r : rows)
      if (r.system == system && r.load == load) return &r;
    return nullptr;
  };
  const Row *ls = find("lockstep", "idle"), *colo = find("colo", "idle"),
            *tuned = find("colo+nodelay", "idle"), *none = find("none", "client"),
            *busy = find("lockstep", "client");
  if (ls && colo && tuned && none && busy && ls->pause_p50_ms > 0) {
    std::printf(
        "\nidle guest: lockstep's median pause is %.1fx shorter than COLO's (%.1fx than COLO "
        "with TCP_NODELAY), at %.0f epochs/s; protected throughput %.0f%% of unprotected\n",
        colo->pause_p50_ms / ls->pause_p50_ms, tuned->pause_p50_ms / ls->pause_p50_ms,
        ls->epochs_per_s,
        none->throughput_rps > 0 ? 100 * busy->throughput_rps / none->throughput_rps : 0.0);
  }

  std::printf("\ninitial synchronization of the 256 MiB guest under the client's load:\n");
  std::printf("%-14s %7s %15s %20s %10s\n", "mode", "rounds", "epoch 1 pause",
              "client's longest wait", "sync took");
  for (const SyncRow& r : syncs) {
    std::printf("%-14s %7d %12.1f ms %17.1f ms %8.2f s\n", r.mode.c_str(), r.rounds,
                r.epoch1_pause_ms, r.client_longest_wait_ms, r.sync_s);
  }

  std::filesystem::create_directories(o.out_dir);
  {
    const std::string sync_csv = o.out_dir + "/qemu_bench_initial_sync.csv";
    FILE* sf = std::fopen(sync_csv.c_str(), "w");
    if (sf == nullptr) {
      std::fprintf(stderr, "qemu_bench: cannot write %s: %s\n", sync_csv.c_str(),
                   std::strerror(errno));
      return 1;
    }
    std::fprintf(sf, "mode,precopy_rounds,epoch1_pause_ms,client_longest_wait_ms,sync_s\n");
    for (const SyncRow& r : syncs) {
      std::fprintf(sf, "%s,%d,%.3f,%.1f,%.3f\n", r.mode.c_str(), r.rounds, r.epoch1_pause_ms,
                   r.client_longest_wait_ms, r.sync_s);
    }
    std::fclose(sf);
    std::printf("wrote %s\n", sync_csv.c_str());
  }
  std::string csv = o.out_dir + "/qemu_bench.csv";
  FILE* f = std::fopen(csv.c_str(), "w");
  if (f == nullptr) {
    std::fprintf(stderr, "qemu_bench: cannot write %s: %s\n", csv.c_str(), std::strerror(errno));
    return 1;
  }
  std::fprintf(f,
               "system,load,epochs_per_s,pause_p50_ms,pause_p99_ms,pauses,requests_per_s,"
               "seconds,interval_ms,colo_delay_ms\n");
  for (const Row& r : rows) {
    std::fprintf(f, "%s,%s,%.2f,%.3f,%.3f,%llu,%.1f,%d,%d,%d\n", r.system.c_str(), r.load.c_str(),
                 r.epochs_per_s, r.pause_p50_ms, r.pause_p99_ms,
                 static_cast<unsigned long long>(r.pauses), r.throughput_rps, o.seconds,
                 o.interval_ms, o.colo_delay_ms);
  }
  std::fclose(f);
  std::printf("\nwrote %s\n", csv.c_str());
  std::string plot = "/usr/bin/python3 benchmarks/plot_qemu_bench.py '" + csv + "' '" + o.out_dir +
                     "/qemu_bench.png'";
  if (std::filesystem::exists("benchmarks/plot_qemu_bench.py") && std::system(plot.c_str()) != 0) {
    std::fprintf(stderr, "qemu_bench: plotting failed (is python3-matplotlib installed?)\n");
  }
  return 0;
}
