// transport_bench: the replication channel's transports side by side, each next to the raw
// medium it runs on, measured in the same run (these machines are noisy).
//
// For every transport (tcp on 127.0.0.1, dpdk over net_memif between two ports of this
// process, dpdk over net_af_packet across a veth between two namespaces with --af-packet,
// rdma where a device exists) and every epoch size:
//   stream   one-way throughput: epochs sent back to back, the receiver drains them;
//   epoch    an epoch, then a 16-byte ACK back; epochs per second and the ACK latency
//            (send start to ACK received, p50/p99) — the engine's round;
//   reader   the same with the ACK read by another thread, which tells the sender (the
//            engine's shape: its ack reader runs beside its epoch sender).
// Baselines, same run: the raw memif (and af_packet) frame rate (two raw ports, frames of the
// size the DPDK transport uses, transmitted and received with nothing of ours in the way;
// and again with the payload copied in and out, as any user's must be) and a plain
// loopback TCP socket (the same epoch sizes written and read, an ACK back).
// The aim (issue 6): DPDK over memif carries epochs at 50% or more of the raw memif rate.
// Prints a table and writes CSV (and a PNG with python3-matplotlib) under --out.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <rte_dev.h>
#include <rte_ethdev.h>
#include <rte_lcore.h>
#include <rte_mbuf.h>
#include <sched.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <boost/program_options.hpp>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <iostream>
#include <map>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "replication_channel/transports.h"

namespace po = boost::program_options;
using namespace lockstep;
using namespace lockstep::channel;
using namespace std::chrono_literals;
using SteadyClock = std::chrono::steady_clock;

namespace {

const std::string kEal =
    "--no-huge -m 512 --no-pci --no-shconf --no-telemetry --log-level=error -l 0";

// The raw medium is measured just before and just after each stream; if the two differ by
// more than this (the machine's speed changed under the pair: raw memif has measured 5.7
// and 30 GB/s a minute apart), the pair says nothing and is measured again, up to
// kPairTries attempts in all (then kept, and counted as unsteady; --quick: one attempt).
// Only the raw rate is checked (raw+copy moves with it).
constexpr double kSteady = 0.25;
constexpr int kPairTries = 3;

// One transport and epoch size: the medians of --repeat measurements, each taken right
// beside a measurement of the raw medium (the ratios are medians of those pairs' ratios:
// the machine's speed drifts between measurements, two adjacent ones see the same).
struct Row {
  std::string transport, medium;
  size_t epoch_bytes = 0;
  double stream_mbps = 0, epochs_per_s = 0, ack_p50_us = 0, ack_p99_us = 0;
  double reader_ack_p50_us = 0, reader_ack_p99_us = 0;  // the engine's shape, see below
  double baseline_mbps = 0;       // the raw medium's rate measured in this run
  double baseline_copy_mbps = 0;  // memif: the raw rate with the payload copied in and out
  double ratio_pct = 0, copy_ratio_pct = 0;  // stream against each baseline
  int repeats = 0;
  int unsteady = 0;  // pairs whose raw medium moved more than kSteady across the stream
  std::string note;
};

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * v.size()))];
}

// The middle value; the mean of the two middle ones for an even count.
double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t half = v.size() / 2;
  return v.size() % 2 ? v[half] : (v[half - 1] + v[half]) / 2;
}

double Seconds(SteadyClock::time_point since) {
  return std::chrono::duration<double>(SteadyClock::now() - since).count();
}

// ----- over a Channel pair -----

struct Measured {
  double stream_mbps = 0, epochs_per_s = 0, ack_p50_us = 0, ack_p99_us = 0;
  double reader_ack_p50_us = 0, reader_ack_p99_us = 0;  // ACK read by another thread
  std::string error;
};

// `source`: the epoch's bytes, registered with `a` once by the caller (a region stays
// registered for the channel's life: registering a new buffer per measurement would pile
// them up).
// `after_stream` runs between the stream and the rest (the raw medium measured on both sides
// of the stream).
Measured MeasureChannel(Channel& a, Channel& b, const std::vector<uint8_t>& source, double seconds,
                        const std::function<void()>& after_stream) {
  Measured m;
  const size_t epoch = source.size();
  std::vector<uint8_t> sink(epoch + 64);
  std::vector<ConstSlice> pages;
  for (size_t at = 0; at < epoch; at += 4096)
    pages.push_back({source.data() + at, std::min<size_t>(4096, epoch - at)});

  // Stream: the sender sends for `seconds`, then a 1-byte end marker.
  std::atomic<bool> stop{false};
  Status send_status;
  uint64_t sent = 0;
  std::thread sender([&] {
    while (!stop && send_status.ok()) {
      send_status = a.Send(pages);
      ++sent;
    }
    uint8_t end = 0;
    ConstSlice marker{&end, 1};
    if (send_status.ok()) send_status = a.Send(std::span(&marker, 1));
  });
  auto start = SteadyClock::now();
  std::thread timer([&] {
    std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
    stop = true;
  });
  uint64_t bytes = 0;
  while (true) {
    size_t n = 0;
    Status s = b.Receive(sink, &n, 20s);
    if (!s.ok()) {
      m.error = s.ToString();
      break;
    }
    if (n == 1) break;
    bytes += n;
  }
  double elapsed = Seconds(start);
  timer.join();
  sender.join();
  if (!send_status.ok() && m.error.empty()) m.error = send_status.ToString();
  m.stream_mbps = bytes / elapsed / 1e6;
  if (!m.error.empty()) return m;
  after_stream();

  // Epoch and ACK, one at a time.
  std::vector<double> acks;
  uint8_t ack[16] = {};
  ConstSlice ack_slice{ack, sizeof(ack)};
  std::vector<uint8_t> ack_in(64);
  std::thread responder([&] {
    for (;;) {
      size_t n = 0;
      if (!b.Receive(sink, &n, 20s).ok() || n == 1) return;
      if (!b.Send(std::span(&ack_slice, 1)).ok()) return;
    }
  });
  start = SteadyClock::now();
  while (Seconds(start) < seconds) {
    auto t0 = SteadyClock::now();
    if (Status s = a.Send(pages); !s.ok()) {
      m.error = s.ToString();
      break;
    }
    size_t n = 0;
    if (Status s = a.Receive(ack_in, &n, 20s); !s.ok()) {
      m.error = s.ToString();
      break;
    }
    acks.push_back(std::chrono::duration<double, std::micro>(SteadyClock::now() - t0).count());
  }
  elapsed = Seconds(start);
  m.epochs_per_s = acks.size() / elapsed;
  m.ack_p50_us = Percentile(acks, 0.5);
  m.ack_p99_us = Percentile(acks, 0.99);

  // The same, shaped like the engine: the ACKs are read by another thread, which tells the
  // sender (the primary's ack reader beside its epoch sender).
  std::vector<double> reader_acks;
  std::atomic<uint32_t> arrived{0};
  std::atomic<bool> done{false};
  std::jthread reader([&] {
    while (!done) {
      size_t n = 0;
      if (!a.Receive(ack_in, &n, 100ms).ok()) continue;
      arrived.fetch_add(1);
      arrived.notify_one();
    }
  });
  start = SteadyClock::now();
  while (m.error.empty() && Seconds(start) < seconds) {
    auto t0 = SteadyClock::now();
    uint32_t before = arrived.load();
    if (Status s = a.Send(pages); !s.ok()) {
      m.error = s.ToString();
      break;
    }
    arrived.wait(before);
    reader_acks.push_back(
        std::chrono::duration<double, std::micro>(SteadyClock::now() - t0).count());
  }
  done = true;
  reader.join();
  m.reader_ack_p50_us = Percentile(reader_acks, 0.5);
  m.reader_ack_p99_us = Percentile(reader_acks, 0.99);

  uint8_t end = 0;
  ConstSlice marker{&end, 1};
  (void)a.Send(std::span(&marker, 1));
  responder.join();
  return m;
}

// ----- baseline: a plain loopback TCP socket -----

int LoopbackPair(int fds[2]) {
  int listener = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof(address);
  if (bind(listener, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0 ||
      listen(listener, 1) != 0 ||
      getsockname(listener, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    return -1;
  }
  fds[0] = socket(AF_INET, SOCK_STREAM, 0);
  if (connect(fds[0], reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) return -1;
  fds[1] = accept(listener, nullptr, nullptr);
  close(listener);
  int one = 1;
  for (int i = 0; i < 2; ++i) setsockopt(fds[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return 0;
}

bool WriteAll(int fd, const uint8_t* p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

// Raw loopback socket streaming `epoch`-byte writes for `seconds`: MB/s.
double LoopbackSocketMbps(size_t epoch, double seconds) {
  int fds[2];
  if (LoopbackPair(fds) != 0) return 0;
  std::vector<uint8_t> source(epoch, 0x5A), sink(epoch);
  std::atomic<bool> stop{false};
  std::thread writer([&] {
    while (!stop && WriteAll(fds[0], source.data(), epoch)) {
    }
    shutdown(fds[0], SHUT_WR);
  });
  auto start = SteadyClock::now();
  uint64_t bytes = 0;
  while (true) {
    if (Seconds(start) >= seconds) stop = true;
    ssize_t r = read(fds[1], sink.data(), sink.size());
    if (r <= 0) break;
    bytes += static_cast<uint64_t>(r);
  }
  double elapsed = Seconds(start);
  writer.join();
  close(fds[0]);
  close(fds[1]);
  return bytes / elapsed / 1e6;
}

// ----- baseline: raw memif frames -----

struct RawPort {
  uint16_t id = 0;
  bool ok = false;
};

RawPort OpenRawPort(const std::string& devargs, rte_mempool* pool) {
  RawPort port;
  if (rte_dev_probe(devargs.c_str()) != 0) return port;
  std::string name = devargs.substr(0, devargs.find(','));
  if (rte_eth_dev_get_port_by_name(name.c_str(), &port.id) != 0) return port;
  rte_eth_conf conf{};
  port.ok = rte_eth_dev_configure(port.id, 1, 1, &conf) == 0 &&
            rte_eth_rx_queue_setup(port.id, 0, 1024, SOCKET_ID_ANY, nullptr, pool) == 0 &&
            rte_eth_tx_queue_setup(port.id, 0, 1024, SOCKET_ID_ANY, nullptr) == 0 &&
            rte_eth_dev_start(port.id) == 0;
  return port;
}

// Runs `body` with this thread in network namespace `name` ("" = where it is).
void InNamespace(const std::string& name, const std::function<void()>& body) {
  if (name.empty()) return body();
  int own = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
  int target = open(("/var/run/netns/" + name).c_str(), O_RDONLY | O_CLOEXEC);
  if (own < 0 || target < 0 || setns(target, CLONE_NEWNET) != 0) {
    std::fprintf(stderr, "transport_bench: cannot enter network namespace %s\n", name.c_str());
    std::exit(1);
  }
  close(target);
  body();
  setns(own, CLONE_NEWNET);
  close(own);
}

rte_mempool* RawPool() {
  static rte_mempool* pool = rte_pktmbuf_pool_create_by_ops(
      "raw_frames", 4095, 256, 0, RTE_MBUF_DEFAULT_BUF_SIZE, SOCKET_ID_ANY, "lf_stack");
  return pool;
}

// Frames of `frame_bytes` from raw port `from` to raw port `to` for `seconds`: MB/s of
// frames received. `copy`: the sender copies each frame's bytes out of a buffer of `span`
// bytes, over and over, and the receiver into another, as any user of the frames must (the
// transport does the same two copies, from the caller's epoch and into its receive buffer,
// which are as big as an epoch: hot in cache for small ones, not for large ones).
double RawFramesMbps(const RawPort& from, const RawPort& to, size_t frame_bytes, double seconds,
                     bool copy, size_t span) {
  const size_t kSpan = std::max(span, 4 * frame_bytes);
  std::vector<uint8_t> source(copy ? kSpan : 0, 0x5A), sink(copy ? kSpan : 0);
  rte_mempool* pool = RawPool();
  if (!pool || !from.ok || !to.ok) return 0;
  const RawPort& client = from;
  const RawPort& server = to;
  for (int i = 0; i < 5000; ++i) {
    rte_eth_link link{};
    if (rte_eth_link_get_nowait(client.id, &link) == 0 && link.link_status) break;
    std::this_thread::sleep_for(1ms);
  }
  std::atomic<bool> stop{false};
  std::thread sender([&] {
    rte_thread_register();  // a per-thread mempool cache, as the transport's threads have
    rte_mbuf* frames[32];
    size_t sent_at = 0;
    while (!stop) {
      if (rte_pktmbuf_alloc_bulk(pool, frames, 32) != 0) {
        std::this_thread::yield();
        continue;
      }
      for (rte_mbuf* m : frames) {
        m->data_len = static_cast<uint16_t>(frame_bytes);
        m->pkt_len = m->data_len;
        if (copy) {
          std::memcpy(rte_pktmbuf_mtod(m, uint8_t*), source.data() + sent_at, frame_bytes);
          sent_at = (sent_at + frame_bytes) % (kSpan - frame_bytes);
        }
      }
      uint16_t sent = rte_eth_tx_burst(client.id, 0, frames, 32);
      if (sent < 32) rte_pktmbuf_free_bulk(frames + sent, 32 - sent);
    }
    // The frames this thread's cache holds go back to the pool (the next measurement's).
    if (rte_mempool_cache* cache = rte_mempool_default_cache(pool, rte_lcore_id())) {
      rte_mempool_cache_flush(cache, pool);
    }
    rte_thread_unregister();
  });
  // (Registering a thread DPDK knows already would give it another lcore and strand the
  // frames its old cache holds.)
  if (rte_lcore_id() == LCORE_ID_ANY) rte_thread_register();
  auto start = SteadyClock::now();
  uint64_t bytes = 0;
  rte_mbuf* frames[32];
  while (Seconds(start) < seconds) {
    uint16_t n = rte_eth_rx_burst(server.id, 0, frames, 32);
    for (uint16_t i = 0; i < n; ++i) {
      if (copy) {
        std::memcpy(sink.data() + bytes % (kSpan - frame_bytes),
                    rte_pktmbuf_mtod(frames[i], const uint8_t*), frames[i]->pkt_len);
      }
      bytes += frames[i]->pkt_len;
    }
    if (n) rte_pktmbuf_free_bulk(frames, n);
  }
  double elapsed = Seconds(start);
  stop = true;
  sender.join();
  while (uint16_t n = rte_eth_rx_burst(server.id, 0, frames, 32)) rte_pktmbuf_free_bulk(frames, n);
  return bytes / elapsed / 1e6;
}

// The raw rate and the raw+copy rate. `copy_first`: raw+copy measured first, so the raw
// rate is measured right beside whatever comes after (before a stream: copy, raw; after it:
// raw, copy).
std::pair<double, double> RawAndCopyMbps(const RawPort& from, const RawPort& to, size_t frame,
                                         double seconds, bool copy_first, size_t span) {
  if (copy_first) {
    double copy = RawFramesMbps(from, to, frame, seconds, true, span);
    return {RawFramesMbps(from, to, frame, seconds, false, span), copy};
  }
  double raw = RawFramesMbps(from, to, frame, seconds, false, span);
  return {raw, RawFramesMbps(from, to, frame, seconds, true, span)};
}

// Raw memif: two more ports on their own socket.
std::pair<double, double> RawMemif(size_t frame, double seconds, const std::string& socket,
                                   bool copy_first, size_t span) {
  static RawPort server =
      OpenRawPort("net_memif90,role=server,socket=" + socket + ",socket-abstract=no", RawPool());
  static RawPort client =
      OpenRawPort("net_memif91,role=client,socket=" + socket + ",socket-abstract=no", RawPool());
  return RawAndCopyMbps(client, server, frame, seconds, copy_first, span);
}

// Raw af_packet: two more ports on a second veth between the same namespaces.
std::pair<double, double> RawAfPacket(size_t frame, double seconds, const std::string& ns_a,
                                      const std::string& ns_b, bool copy_first, size_t span) {
  static RawPort receiver, sender;  // opened once: a DPDK device is probed once
  static bool opened = false;
  if (!std::exchange(opened, true)) {
    InNamespace(ns_a, [&] {
      receiver = OpenRawPort("net_af_packet90,iface=lstb1a,framecnt=4096", RawPool());
    });
    InNamespace(ns_b, [&] {
      sender = OpenRawPort("net_af_packet91,iface=lstb1b,framecnt=4096", RawPool());
    });
  }
  return RawAndCopyMbps(sender, receiver, frame, seconds, copy_first, span);
}

std::string Human(size_t bytes) {
  if (bytes >= (1u << 20)) return std::to_string(bytes >> 20) + " MiB";
  return std::to_string(bytes >> 10) + " KiB";
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  std::string out = "benchmarks/results";
  double seconds = 1.0;
  std::string only;
  bool af_packet = false;
  int repeat = 3;
  std::vector<size_t> epoch_kib;
  po::options_description options("transport_bench options");
  options.add_options()("help,h", "this text")("quick", po::bool_switch(&quick),
                                               "a short run (CI smoke test)")(
      "out", po::value(&out)->default_value(out), "directory for the CSV and PNG")(
      "seconds", po::value(&seconds)->default_value(seconds), "seconds per measurement")(
      "repeat", po::value(&repeat)->default_value(repeat),
      "measurements per transport and size, each beside one of the raw medium (medians "
      "reported)")("epoch-kib", po::value(&epoch_kib)->multitoken(),
                   "epoch sizes in KiB (default 64 1024 4096 16384; --quick: 64 4096)")(
      "transport", po::value(&only), "measure only this transport (tcp, dpdk, rdma)")(
      "af-packet", po::bool_switch(&af_packet),
      "also DPDK over net_af_packet across a veth between two namespaces (made and removed "
      "here)");
  po::variables_map vm;
  try {
    po::store(po::parse_command_line(argc, argv, options), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    std::cerr << "transport_bench: " << e.what() << "\n" << options;
    return 2;
  }
  if (vm.count("help")) {
    std::cout << options;
    return 0;
  }
  if (quick) {
    seconds = std::min(seconds, 0.3);
    repeat = 1;
  }
  if (repeat < 1 || !(seconds > 0)) {
    std::cerr << "transport_bench: --repeat must be 1 or more and --seconds more than 0\n";
    return 2;
  }
  std::vector<size_t> sizes = quick ? std::vector<size_t>{64 << 10, 4 << 20}
                                    : std::vector<size_t>{64 << 10, 1 << 20, 4 << 20, 16 << 20};
  if (!epoch_kib.empty()) {
    sizes.clear();
    for (size_t kib : epoch_kib) {
      if (kib == 0 || kib > (kMaxMessageBytes >> 10)) {
        std::cerr << "transport_bench: --epoch-kib " << kib << " is not between 1 and "
                  << (kMaxMessageBytes >> 10) << "\n";
        return 2;
      }
      sizes.push_back(kib << 10);
    }
  }
  const std::string socket_dir = "/tmp/lockstep-transport-bench-" + std::to_string(getpid());
  std::filesystem::create_directories(socket_dir);
  TransportOptions transport_options;
  transport_options.dpdk.eal_args = kEal;
  std::vector<Row> rows;
  // Every measurement beside its raw one, for transport_bench_runs.csv: the medians hide
  // how much this machine's speed moves (raw memif has measured 5.7 and 30 GB/s minutes
  // apart).
  std::vector<std::string> runs;

  struct Pair {
    std::string transport, medium, listen, connect;
    std::string listen_ns, connect_ns;  // network namespaces ("" = this one)
  };
  std::vector<Pair> pairs = {
      {"tcp", "loopback", "127.0.0.1:0", "", "", ""},
      {"dpdk", "memif",
       "net_memif0,role=server,socket=" + socket_dir + "/memif.sock,socket-abstract=no",
       "net_memif1,role=client,socket=" + socket_dir + "/memif.sock,socket-abstract=no", "", ""},
  };
  const std::string ns_a = "lstb" + std::to_string(getpid()) + "a";
  const std::string ns_b = "lstb" + std::to_string(getpid()) + "b";
  if (af_packet) {
    // Two veth pairs between two namespaces: one for the transport, one for the raw baseline.
    const std::string setup =
        "ip netns add " + ns_a + " && ip netns add " + ns_b + " && ip link add lstb0a netns " +
        ns_a + " type veth peer name lstb0b netns " + ns_b + " && ip link add lstb1a netns " +
        ns_a + " type veth peer name lstb1b netns " + ns_b + " && ip -n " + ns_a +
        " link set lstb0a up && ip -n " + ns_a + " link set lstb1a up" + " && ip -n " + ns_b +
        " link set lstb0b up && ip -n " + ns_b + " link set lstb1b up";
    if (std::system(setup.c_str()) != 0) {
      std::fprintf(stderr, "transport_bench: --af-packet needs root (ip netns, veth)\n");
      return 1;
    }
    pairs.push_back({"dpdk", "af_packet", "net_af_packet0,iface=lstb0a,framecnt=4096",
                     "net_af_packet1,iface=lstb0b,framecnt=4096", ns_a, ns_b});
  }
  if (Status rdma = RdmaAvailable(transport_options.rdma); rdma.ok()) {
    pairs.push_back({"rdma", "verbs", "127.0.0.1:0", "", "", ""});
  } else {
    Row row;
    row.transport = "rdma";
    row.medium = "verbs";
    row.note = "not measured: " + rdma.message();
    rows.push_back(row);
  }

  // The DPDK transport starts the EAL; the raw memif baseline then uses the same EAL.
  for (const Pair& p : pairs) {
    if (!only.empty() && p.transport != only) continue;
    auto transport = MakeTransport(p.transport, transport_options);
    Result<std::unique_ptr<Listener>> listener = Status::Aborted("");
    InNamespace(p.listen_ns, [&] { listener = (*transport)->Listen(p.listen); });
    if (!listener.ok()) {
      std::fprintf(stderr, "transport_bench: %s: %s\n", p.transport.c_str(),
                   listener.status().ToString().c_str());
      return 1;
    }
    std::string address = p.connect.empty() ? (*listener)->address() : p.connect;
    for (size_t epoch : sizes) {
      // A fresh connection per size: what one size leaves queued does not slow the next.
      Result<std::unique_ptr<Channel>> a = Status::Aborted("");
      std::thread connector(
          [&] { InNamespace(p.connect_ns, [&] { a = (*transport)->Connect(address, 10s); }); });
      auto b = (*listener)->Accept(10s);
      connector.join();
      if (!a.ok() || !b.ok()) {
        std::fprintf(stderr, "transport_bench: %s connect: %s / %s\n", p.transport.c_str(),
                     a.status().ToString().c_str(), b.status().ToString().c_str());
        return 1;
      }
      Row row;
      row.transport = p.transport;
      row.medium = p.medium;
      row.epoch_bytes = epoch;
      std::vector<double> stream, epochs, p50, p99, reader_p50, reader_p99, raw, raw_copy, ratio,
          copy_ratio;
      const std::vector<uint8_t> source(epoch, 0x5A);
      (void)(*a)->RegisterMemory(source.data(), source.size());
      const bool frames = p.medium == "memif" || p.medium == "af_packet";
      // The transport's frames: 2048 bytes on memif, the veth's MTU (1500) on af_packet.
      const size_t frame = p.medium == "memif" ? 2048 : 1514;
      const std::string raw_name =
          frames ? std::to_string(frame) + "-byte frames" : "loopback socket";
      // The raw rate is measured right beside the stream on both sides (raw+copy further out).
      auto measure_raw = [&](bool copy_first) -> std::pair<double, double> {
        if (!frames) return {LoopbackSocketMbps(epoch, seconds), 0.0};
        return p.medium == "memif"
                   ? RawMemif(frame, seconds, socket_dir + "/raw.sock", copy_first, epoch)
                   : RawAfPacket(frame, seconds, ns_a, ns_b, copy_first, epoch);
      };
      const int tries = quick ? 1 : kPairTries;
      for (int r = 0; r < repeat && row.note.empty(); ++r) {
        for (int attempt = 1; attempt <= tries; ++attempt) {
          std::pair<double, double> before = measure_raw(/*copy_first=*/true), after;
          Measured m = MeasureChannel(**a, **b, source, seconds,
                                      [&] { after = measure_raw(/*copy_first=*/false); });
          if (!m.error.empty()) {
            // The channel is unusable now: this size ends with the repeats that succeeded.
            row.note = "repeat " + std::to_string(r + 1) + " failed: " + m.error;
            break;
          }
          const double low = std::min(before.first, after.first);
          const double high = std::max(before.first, after.first);
          const bool steady = high > 0 && low / high >= 1 - kSteady;
          const double base = (before.first + after.first) / 2;
          const double base_copy = (before.second + after.second) / 2;
          std::printf("%s %s %s: %.0f MB/s; raw %s %.0f then %.0f MB/s", p.transport.c_str(),
                      p.medium.c_str(), Human(epoch).c_str(), m.stream_mbps, raw_name.c_str(),
                      before.first, after.first);
          if (frames) {
            std::printf(", with the payload copied in and out %.0f then %.0f MB/s", before.second,
                        after.second);
          }
          std::printf("%s\n", steady ? "" : " (unsteady: the machine's speed moved)");
          std::fflush(stdout);
          char run[256];
          std::snprintf(run, sizeof(run), "%s,%s,%zu,%d,%d,%.1f,%.1f,%.1f,%.1f,%.1f,%d\n",
                        p.transport.c_str(), p.medium.c_str(), epoch, r + 1, attempt, m.stream_mbps,
                        before.first, after.first, before.second, after.second, steady ? 1 : 0);
          runs.push_back(run);
          if (!steady && attempt < tries) continue;
          row.unsteady += steady ? 0 : 1;
          ++row.repeats;
          stream.push_back(m.stream_mbps);
          epochs.push_back(m.epochs_per_s);
          p50.push_back(m.ack_p50_us);
          p99.push_back(m.ack_p99_us);
          reader_p50.push_back(m.reader_ack_p50_us);
          reader_p99.push_back(m.reader_ack_p99_us);
          raw.push_back(base);
          raw_copy.push_back(base_copy);
          ratio.push_back(base > 0 ? 100 * m.stream_mbps / base : 0);
          copy_ratio.push_back(base_copy > 0 ? 100 * m.stream_mbps / base_copy : 0);
          break;
        }
      }
      row.stream_mbps = Median(stream);
      row.epochs_per_s = Median(epochs);
      row.ack_p50_us = Median(p50);
      row.ack_p99_us = Median(p99);
      row.reader_ack_p50_us = Median(reader_p50);
      row.reader_ack_p99_us = Median(reader_p99);
      row.baseline_mbps = Median(raw);
      row.baseline_copy_mbps = Median(raw_copy);
      row.ratio_pct = Median(ratio);
      row.copy_ratio_pct = Median(copy_ratio);
      if (row.unsteady > 0) {
        row.note += (row.note.empty() ? "" : "; ") + std::to_string(row.unsteady) +
                    " of the pairs unsteady after " + std::to_string(tries) +
                    (tries == 1 ? " try" : " tries");
      }
      if (uint64_t resent = (*a)->stats().retransmissions + (*b)->stats().retransmissions) {
        row.note += (row.note.empty() ? "" : "; ") + std::to_string(resent) +
                    " frames resent (all attempts)";
      }
      rows.push_back(row);
    }
  }

  std::printf("\n%-6s %-9s %8s %11s %11s %6s %11s %6s %9s %9s %9s %9s\n", "trans.", "medium",
              "epoch", "stream MB/s", "raw MB/s", "ratio", "raw+copy", "ratio", "epochs/s",
              "ack p50us", "ack p99us", "2thr p50");
  for (const Row& r : rows) {
    if (r.epoch_bytes == 0) {
      std::printf("%-6s %-9s %s\n", r.transport.c_str(), r.medium.c_str(), r.note.c_str());
      continue;
    }
    std::printf("%-6s %-9s %8s %11.0f %11.0f %5.0f%% %11.0f %5.0f%% %9.0f %9.0f %9.0f %9.0f %s\n",
                r.transport.c_str(), r.medium.c_str(), Human(r.epoch_bytes).c_str(), r.stream_mbps,
                r.baseline_mbps, r.ratio_pct, r.baseline_copy_mbps, r.copy_ratio_pct,
                r.epochs_per_s, r.ack_p50_us, r.ack_p99_us, r.reader_ack_p50_us, r.note.c_str());
  }
  std::printf(
      "raw: memif or af_packet frames of the transport's size with nothing of ours in the way "
      "(dpdk rows; af_packet counts the frames that arrived), a plain loopback TCP socket with "
      "the same write size (tcp rows); raw+copy: the frames' payload copied from and into "
      "buffers of the epoch's size, as any user's must be; same run. 2thr p50: the ACK read by "
      "another thread "
      "than the sender's, as the engine does. Medians of %d measurements; each stream has the "
      "raw medium measured just before and just after it and its ratio is against their "
      "mean (a ratio is the median of those); a pair whose two raw measurements differ by "
      "more than %.0f%% is measured again (%d attempts in all).\n",
      repeat, 100 * kSteady, quick ? 1 : kPairTries);

  std::filesystem::create_directories(out);
  if (FILE* f = std::fopen((out + "/transport_bench_runs.csv").c_str(), "w")) {
    std::fprintf(f,
                 "transport,medium,epoch_bytes,repeat,attempt,stream_mbps,baseline_before_mbps,"
                 "baseline_after_mbps,baseline_copy_before_mbps,baseline_copy_after_mbps,"
                 "steady\n");
    for (const std::string& run : runs) std::fputs(run.c_str(), f);
    std::fclose(f);
    std::printf("wrote %s/transport_bench_runs.csv\n", out.c_str());
  }
  std::string csv = out + "/transport_bench.csv";
  if (FILE* f = std::fopen(csv.c_str(), "w")) {
    std::fprintf(f,
                 "transport,medium,epoch_bytes,stream_mbps,baseline_mbps,baseline_copy_mbps,"
                 "ratio_pct,copy_ratio_pct,epochs_per_s,ack_p50_us,ack_p99_us,"
                 "reader_ack_p50_us,reader_ack_p99_us,repeats,note\n");
    for (const Row& r : rows) {
      std::fprintf(f, "%s,%s,%zu,%.1f,%.1f,%.1f,%.1f,%.1f,%.1f,%.1f,%.1f,%.1f,%.1f,%d,\"%s\"\n",
                   r.transport.c_str(), r.medium.c_str(), r.epoch_bytes, r.stream_mbps,
                   r.baseline_mbps, r.baseline_copy_mbps, r.ratio_pct, r.copy_ratio_pct,
                   r.epochs_per_s, r.ack_p50_us, r.ack_p99_us, r.reader_ack_p50_us,
                   r.reader_ack_p99_us, r.repeats, r.note.c_str());
    }
    std::fclose(f);
    std::printf("wrote %s\n", csv.c_str());
  }
  std::string plot = std::string(LOCKSTEP_SOURCE_DIR) + "/benchmarks/plot_transport_bench.py";
  if (std::system(("python3 -c 'import matplotlib' 2>/dev/null && python3 " + plot + " " + csv +
                   " >/dev/null")
                      .c_str()) == 0) {
    std::printf("wrote %s\n", (out + "/transport_bench.png").c_str());
  }
  std::filesystem::remove_all(socket_dir);
  if (af_packet) {
    (void)std::system(("ip netns del " + ns_a + "; ip netns del " + ns_b).c_str());
  }
  std::fflush(stdout);
  // DPDK's ports and threads stay up to the process's end; leave without tearing them down.
  std::_Exit(0);
}
