// engine_bench: checkpoint pause and epoch streaming of the engine over TCP loopback, next
// to this machine's memcpy and raw loopback-socket throughput measured in the same run.
//
// For each dirty size D (0, 1, 10, 64 MiB per epoch) a simulated guest dirties exactly D
// bytes of fresh, incompressible pages after every checkpoint; a PrimaryReplicator streams
// the epochs to a SecondaryReplica in this process over a real TCP connection on 127.0.0.1.
//   pause      stop, sync dirty log, copy D into staging, save device state, barrier,
//              resume — compared with one memcpy of D bytes (the floor of any copy);
//   stream     record bytes per epoch / (ACK time - end of pause), compared with the raw
//              throughput of a plain TCP loopback socket (1 MiB writes, same buffers).
// Every case runs with the default link protection (mac); 10 MiB without deltas runs with
// each of none, mac and aes-gcm, so the cost of authenticating and of encrypting the
// stream shows against the same stream unprotected, in the same run.
// Prints a table, writes CSV (and a PNG if python3-matplotlib is there) under
// benchmarks/results/. Not a test: it asserts nothing; the numbers are the product.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "lockstep/replicator.h"
#include "replication_channel/tcp.h"
#include "simulated_guest.h"

using namespace lockstep;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace {

double MedianOf(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// One memcpy of `bytes` between pre-faulted buffers, median over reps, in microseconds.
// `cold`: before each rep, 256 MiB of other memory is written so that neither buffer is in
// any cache — the condition of the checkpoint pause, whose staging arena was last touched
// an epoch ago. Warm: the same copy repeated, both buffers hot in cache.
double MemcpyMicros(size_t bytes, bool cold) {
  if (bytes == 0) return 0;
  std::vector<uint8_t> src(bytes, 1), dst(bytes, 2);
  std::vector<uint8_t> evict(cold ? 256u << 20 : 0);
  std::vector<double> t;
  for (int rep = 0; rep < 15; ++rep) {
    if (cold) std::memset(evict.data(), rep, evict.size());
    src[rep] = static_cast<uint8_t>(rep);
    auto t0 = Clock::now();
    std::memcpy(dst.data(), src.data(), bytes);
    auto t1 = Clock::now();
    t.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    if (dst[rep] != src[rep]) std::abort();
  }
  return MedianOf(t);
}

// Raw TCP loopback throughput in bytes/s: one connection, 1 MiB writes, TCP_NODELAY and
// the same socket buffers as lockstep's TCP transport, for about `duration`.
double RawSocketBytesPerSecond(std::chrono::milliseconds duration) {
  int lfd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (bind(lfd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || listen(lfd, 1) != 0 ||
      getsockname(lfd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    std::perror("raw socket baseline");
    std::exit(1);
  }
  auto tune = [](int fd) {
    int one = 1, buf = 8 << 20;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
  };
  std::atomic<uint64_t> received{0};
  std::thread reader([&] {
    int fd = accept(lfd, nullptr, nullptr);
    tune(fd);
    std::vector<uint8_t> buf(1 << 20);
    for (;;) {
      ssize_t n = read(fd, buf.data(), buf.size());
      if (n <= 0) break;
      received += static_cast<uint64_t>(n);
    }
    close(fd);
  });
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  tune(fd);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    std::perror("raw socket baseline connect");
    std::exit(1);
  }
  std::vector<uint8_t> chunk(1 << 20, 0x5A);
  auto t0 = Clock::now();
  while (Clock::now() - t0 < duration) {
    size_t off = 0;
    while (off < chunk.size()) {
      ssize_t n = write(fd, chunk.data() + off, chunk.size() - off);
      if (n <= 0) break;
      off += static_cast<size_t>(n);
    }
  }
  shutdown(fd, SHUT_WR);
  reader.join();
  auto secs = std::chrono::duration<double>(Clock::now() - t0).count();
  close(fd);
  close(lfd);
  return static_cast<double>(received.load()) / secs;
}

struct Row {
  double dirty_mib = 0;
  bool delta = true;
  wire::LinkProtection protection = wire::LinkProtection::kMac;
  uint64_t epochs = 0;
  double pages_per_epoch = 0;
  double pause_p50_us = 0, pause_p99_us = 0, memcpy_us = 0, memcpy_cold_us = 0;
  double ack_p50_us = 0, ack_p99_us = 0;
  double stream_bytes_per_epoch = 0, stream_mbps = 0, raw_mbps = 0;
  double epochs_per_sec = 0;
};

Row RunEngine(uint64_t dirty_bytes, bool delta, wire::LinkProtection protection, int epochs,
              double raw_bytes_per_sec) {
  testing::GuestConfig g;
  g.blocks = {{"pc.ram", 128u << 20}, {"vga.vram", 8u << 20}, {"pc.bios", 256u << 10}};
  g.burst = true;
  g.pages_per_epoch = dirty_bytes / 4096;
  g.output_every = 0;
  g.step_delay = 0us;
  testing::SimulatedGuest pg(g), sg(g);
  vip::InProcessWitness witness;
  ReplicationOptions o;
  o.vm_id = "bench";
  o.pairing_key = std::array<uint8_t, 32>{0x6b, 0x65, 0x79};
  o.delta_encoding = delta;
  o.link_protection = protection;
  // Long enough for the guest to finish dirtying D before the next pause.
  o.epoch_interval = std::chrono::microseconds(std::max<uint64_t>(20'000, dirty_bytes / 1000));
  o.peer_loss_threshold = 2000ms;
  ReplicationOptions po = o, so = o;
  po.host_id = "bench-primary";
  so.host_id = "bench-secondary";
  PrimaryReplicator primary(pg, witness, po);
  SecondaryReplica secondary(sg, witness, so);

  auto tcp = channel::MakeTcpTransport();
  auto listener = tcp->Listen("127.0.0.1:0");
  if (!listener.ok()) {
    std::fprintf(stderr, "engine_bench: %s\n", listener.status().ToString().c_str());
    std::exit(1);
  }
  auto sec = std::async(std::launch::async, [&] {
    auto ch = (*listener)->Accept(10000ms);
    return ch.ok() ? secondary.Start(std::move(*ch)) : ch.status();
  });
  pg.Boot();
  auto pch = tcp->Connect((*listener)->address(), 10000ms);
  Status ps = pch.ok() ? primary.Start(std::move(*pch)) : pch.status();
  Status ss = sec.get();
  if (!ps.ok() || !ss.ok() || !primary.WaitForState(ReplicaState::kProtected, 60s)) {
    std::fprintf(stderr, "engine_bench: could not protect the guest: %s / %s\n",
                 ps.ToString().c_str(), ss.ToString().c_str());
    std::exit(1);
  }
  // Let the secondary drain the initial synchronization (epoch 2's ACK waits for the apply
  // of all of epoch 1), then measure a window of epochs.
  for (int caught_up = 0; caught_up < 3;) {
    std::this_thread::sleep_for(o.epoch_interval);
    ReplicationStats s = primary.stats();
    caught_up = s.acked_epoch >= 4 && s.acked_epoch + 1 >= s.current_epoch ? caught_up + 1 : 0;
  }
  primary.ClearLatencyWindows();
  ReplicationStats a = primary.stats();
  auto t0 = Clock::now();
  ReplicationStats b = a;
  while (b.acked_epoch < a.acked_epoch + static_cast<uint64_t>(epochs)) {
    std::this_thread::sleep_for(5ms);
    b = primary.stats();
    if (Clock::now() - t0 > 120s) break;
  }
  double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  primary.Stop();
  secondary.Stop();

  Row r;
  r.dirty_mib = static_cast<double>(dirty_bytes) / (1 << 20);
  r.delta = delta;
  r.protection = protection;
  r.epochs = b.epochs - a.epochs;
  uint64_t pages =
      (b.raw_pages + b.zero_pages + b.delta_pages) - (a.raw_pages + a.zero_pages + a.delta_pages);
  r.pages_per_epoch = r.epochs ? static_cast<double>(pages) / static_cast<double>(r.epochs) : 0;
  r.pause_p50_us = static_cast<double>(b.pause_p50.count());
  r.pause_p99_us = static_cast<double>(b.pause_p99.count());
  r.memcpy_us = MemcpyMicros(dirty_bytes, false);
  r.memcpy_cold_us = MemcpyMicros(dirty_bytes, true);
  r.ack_p50_us = static_cast<double>(b.ack_latency_p50.count());
  r.ack_p99_us = static_cast<double>(b.ack_latency_p99.count());
  r.stream_bytes_per_epoch =
      r.epochs ? static_cast<double>(b.bytes - a.bytes) / static_cast<double>(r.epochs) : 0;
  r.stream_mbps =
      r.ack_p50_us > 0 ? r.stream_bytes_per_epoch / r.ack_p50_us : 0;  // bytes/us = MB/s
  r.raw_mbps = raw_bytes_per_sec / 1e6;
  r.epochs_per_sec = static_cast<double>(r.epochs) / secs;
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  std::string out_dir = "benchmarks/results";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--quick") {
      quick = true;
    } else if (a == "--out" && i + 1 < argc) {
      out_dir = argv[++i];
    } else {
      std::fprintf(stderr,
                   "usage: engine_bench [--quick] [--out DIR]\n"
                   "  --quick   fewer epochs per size (for CI smoke runs)\n"
                   "  --out     where to write engine_bench.csv/.png (default benchmarks/results)\n"
                   "unknown argument: %s\n",
                   a.c_str());
      return 2;
    }
  }
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) {
    std::fprintf(stderr, "engine_bench: cannot create %s: %s\n", out_dir.c_str(),
                 ec.message().c_str());
    return 1;
  }
  const int epochs = quick ? 10 : 40;
  std::printf("engine_bench: %u cores, %d epochs per size; baselines measured in this run\n",
              std::thread::hardware_concurrency(), epochs);
  double raw = RawSocketBytesPerSecond(quick ? 500ms : 1500ms);
  std::printf("raw loopback TCP socket: %.0f MB/s (%.1f Gbit/s)\n\n", raw / 1e6, raw * 8 / 1e9);

  std::vector<Row> rows;
  struct Case {
    uint64_t mib;
    bool delta;
    wire::LinkProtection protection;
  };
  using P = wire::LinkProtection;
  std::vector<Case> cases = {{0, true, P::kMac},    {1, true, P::kMac},   {10, true, P::kMac},
                             {10, false, P::kNone}, {10, false, P::kMac}, {10, false, P::kEncrypt},
                             {64, true, P::kMac}};
  for (const auto& c : cases) {
    rows.push_back(RunEngine(c.mib << 20, c.delta, c.protection, epochs, raw));
    // The loopback socket is noisy: measure the baseline again next to each case.
    raw = RawSocketBytesPerSecond(quick ? 300ms : 800ms);
    rows.back().raw_mbps = (rows.back().raw_mbps + raw / 1e6) / 2;
  }

  std::printf("%-6s %-5s %-7s %6s %8s | %9s %9s %8s %8s %7s | %9s %9s %9s %9s %7s | %7s\n", "dirty",
              "delta", "link", "epochs", "pages/ep", "pause p50", "pause p99", "memcpy", "memcpy",
              "p50 /", "ack p50", "ack p99", "stream", "raw sock", "stream/", "epoch/s");
  std::printf("%-6s %-5s %-7s %6s %8s | %9s %9s %8s %8s %7s | %9s %9s %9s %9s %7s | %7s\n", "MiB",
              "", "", "", "", "us", "us", "warm us", "cold us", "cold", "us", "us", "MB/s", "MB/s",
              "raw", "");
  for (const auto& r : rows) {
    std::printf(
        "%-6.0f %-5s %-7s %6llu %8.0f | %9.0f %9.0f %8.0f %8.0f %7.2f | %9.0f %9.0f %9.0f %9.0f "
        "%6.0f%% | %7.1f\n",
        r.dirty_mib, r.delta ? "on" : "off", wire::LinkProtectionName(r.protection),
        static_cast<unsigned long long>(r.epochs), r.pages_per_epoch, r.pause_p50_us,
        r.pause_p99_us, r.memcpy_us, r.memcpy_cold_us,
        r.memcpy_cold_us > 0 ? r.pause_p50_us / r.memcpy_cold_us : 0.0, r.ack_p50_us, r.ack_p99_us,
        r.stream_mbps, r.raw_mbps, r.raw_mbps > 0 ? 100 * r.stream_mbps / r.raw_mbps : 0.0,
        r.epochs_per_sec);
  }

  std::string csv = out_dir + "/engine_bench.csv";
  FILE* f = std::fopen(csv.c_str(), "w");
  if (!f) {
    std::fprintf(stderr, "engine_bench: cannot write %s: %s\n", csv.c_str(), std::strerror(errno));
    return 1;
  }
  std::time_t now = std::time(nullptr);
  char when[32];
  std::strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  std::fprintf(f,
               "run_at,dirty_mib,delta,link_protection,epochs,pages_per_epoch,pause_p50_us,pause_"
               "p99_us,memcpy_us,"
               "memcpy_cold_us,pause_over_memcpy_cold,ack_p50_us,ack_p99_us,stream_bytes_per_epoch,"
               "stream_mbps,"
               "raw_socket_mbps,stream_over_raw,epochs_per_sec\n");
  for (const auto& r : rows) {
    std::fprintf(
        f, "%s,%.0f,%d,%s,%llu,%.0f,%.0f,%.0f,%.1f,%.1f,%.3f,%.0f,%.0f,%.0f,%.1f,%.1f,%.3f,%.2f\n",
        when, r.dirty_mib, r.delta ? 1 : 0, wire::LinkProtectionName(r.protection),
        static_cast<unsigned long long>(r.epochs), r.pages_per_epoch, r.pause_p50_us,
        r.pause_p99_us, r.memcpy_us, r.memcpy_cold_us,
        r.memcpy_cold_us > 0 ? r.pause_p50_us / r.memcpy_cold_us : 0.0, r.ack_p50_us, r.ack_p99_us,
        r.stream_bytes_per_epoch, r.stream_mbps, r.raw_mbps,
        r.raw_mbps > 0 ? r.stream_mbps / r.raw_mbps : 0.0, r.epochs_per_sec);
  }
  std::fclose(f);
  std::printf("\nwrote %s\n", csv.c_str());
  // The picture, when python3-matplotlib is installed (scripts/bootstrap.sh installs it).
  std::fflush(stdout);
  std::string plot = "/usr/bin/python3 benchmarks/plot_engine_bench.py '" + csv + "' '" + out_dir +
                     "/engine_bench.png' 2>&1";
  if (std::filesystem::exists("benchmarks/plot_engine_bench.py") &&
      std::system(plot.c_str()) != 0) {
    std::fprintf(stderr, "engine_bench: plotting failed (is python3-matplotlib installed?)\n");
  }
  return 0;
}
