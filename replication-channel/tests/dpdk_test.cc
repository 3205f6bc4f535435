// The DPDK transport, for real: the conformance suite over net_memif (two ports of this
// process joined by a memif socket) and over net_af_packet (two ports on the ends of a veth
// pair whose ends live in two network namespaces), then DPDK-specific cases: addresses,
// a peer of another protocol version, frames lost on the way.
//
// One EAL per process: every transport here is made with the same TestOptions().

#include "replication_channel/dpdk.h"

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>
#include <thread>
#include <utility>

#include "channel_test_util.h"
#include "process_dir.h"

namespace lockstep::channel::testing {
namespace {

using Code = Status::Code;

DpdkOptions TestOptions() {
  DpdkOptions options;
  options.eal_args = "--no-huge -m 512 --no-pci --no-shconf --no-telemetry --log-level=error -l 0";
  return options;
}

std::shared_ptr<Transport> SharedTransport() {
  static std::shared_ptr<Transport> transport = MakeDpdkTransport(TestOptions());
  return transport;
}

const std::string& TestDir() { return lockstep::testing::ProcessDir("lockstep-dpdk-test"); }

std::string MemifSocket() { return TestDir() + "/memif.sock"; }

// Runs `body` with this thread in network namespace `name` (/var/run/netns/NAME).
void InNamespace(const std::string& name, const std::function<void()>& body) {
  int own = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
  REQUIRE(own >= 0);
  int target = open(("/var/run/netns/" + name).c_str(), O_RDONLY | O_CLOEXEC);
  REQUIRE(target >= 0);
  REQUIRE(setns(target, CLONE_NEWNET) == 0);
  close(target);
  body();
  REQUIRE(setns(own, CLONE_NEWNET) == 0);
  close(own);
}

void Run(const std::string& command) {
  INFO(command);
  REQUIRE(std::system(command.c_str()) == 0);
}

// Two namespaces joined by a veth pair, made once per process and removed at exit.
struct VethNamespaces {
  std::string a = "lsdp" + std::to_string(getpid()) + "a";
  std::string b = "lsdp" + std::to_string(getpid()) + "b";
  VethNamespaces() {
    Run("ip netns add " + a + " && ip netns add " + b);
    Run("ip link add lsdpa0 netns " + a + " type veth peer name lsdpb0 netns " + b);
    Run("ip -n " + a + " link set lsdpa0 up && ip -n " + b + " link set lsdpb0 up");
  }
  ~VethNamespaces() {
    std::system(("ip netns del " + a + " 2>/dev/null; ip netns del " + b + " 2>/dev/null").c_str());
  }
  static VethNamespaces& Get() {
    static VethNamespaces namespaces;
    return namespaces;
  }
};

// A pair over ports whose devices are made (and kept) on first use.
ChannelPair DpdkPair(const std::string& listen, const std::string& connect,
                     const std::function<void(const std::function<void()>&)>& in_listen_ns,
                     const std::function<void(const std::function<void()>&)>& in_connect_ns) {
  std::shared_ptr<Transport> transport = SharedTransport();
  std::shared_ptr<Listener> listener;
  in_listen_ns([&] {
    auto made = transport->Listen(listen);
    REQUIRE(made.status().ToString() == "OK");
    listener = std::move(*made);
  });
  std::function<ChannelPair()> again = [=] {
    ChannelPair pair;
    in_connect_ns([&] { pair = ConnectPair(*transport, *listener, connect); });
    return pair;
  };
  ChannelPair pair = again();
  pair.again = again;
  return pair;
}

void Here(const std::function<void()>& body) { body(); }

struct DpdkMemifPair {
  static ChannelPair Make() {
    std::string socket = ",socket=" + MemifSocket() + ",socket-abstract=no";
    return DpdkPair("net_memif0,role=server" + socket, "net_memif1,role=client" + socket, Here,
                    Here);
  }
};

struct DpdkAfPacketPair {
  static ChannelPair Make() {
    VethNamespaces& ns = VethNamespaces::Get();
    return DpdkPair(
        "net_af_packet0,iface=lsdpa0,framecnt=4096", "net_af_packet1,iface=lsdpb0,framecnt=4096",
        [&](const std::function<void()>& body) { InNamespace(ns.a, body); },
        [&](const std::function<void()>& body) { InNamespace(ns.b, body); });
  }
};

}  // namespace
}  // namespace lockstep::channel::testing

#define LOCKSTEP_CONFORMANCE_PAIRS DpdkMemifPair, DpdkAfPacketPair
#include "channel_conformance.h"

namespace lockstep::channel::testing {
namespace {

std::string MemifArgs() { return ",socket=" + MemifSocket() + ",socket-abstract=no"; }

TEST_CASE("DPDK: malformed addresses and unknown devices are refused clearly", "[dpdk]") {
  std::shared_ptr<Transport> transport = SharedTransport();
  auto empty = transport->Listen("");
  CHECK(empty.status().code() == Code::kInvalidArgument);
  CHECK(empty.status().message().find("names no device") != std::string::npos);
  auto link = transport->Listen("net_memif7,role=server" + MemifArgs() + "#seven");
  CHECK(link.status().code() == Code::kInvalidArgument);
  CHECK(link.status().message().find("not a link number") != std::string::npos);
  auto unknown = transport->Connect("net_nosuchdevice0,x=1", 1s);
  CHECK(!unknown.ok());
  CHECK(unknown.status().message().find("net_nosuchdevice0") != std::string::npos);
  // The same device name with other arguments is another port: refused.
  DpdkMemifPair::Make();  // makes net_memif0 with its usual arguments
  auto other = transport->Listen("net_memif0,role=server,socket=/tmp/elsewhere.sock");
  CHECK(other.status().code() == Code::kInvalidArgument);
  CHECK(other.status().message().find("already in use") != std::string::npos);
}

TEST_CASE("DPDK: a port has one listener, and a listening port does not connect out", "[dpdk]") {
  ChannelPair pair = DpdkMemifPair::Make();  // the pair's listener is alive in `again`
  auto second = SharedTransport()->Listen("net_memif0,role=server" + MemifArgs());
  CHECK(second.status().code() == Code::kFailedPrecondition);
  // The connecting port already carries pair.a.
  auto busy = SharedTransport()->Connect("net_memif1,role=client" + MemifArgs(), 1s);
  CHECK(busy.status().code() == Code::kFailedPrecondition);
}

TEST_CASE("DPDK: a peer speaking another protocol version is refused, the listener goes on",
          "[dpdk]") {
  std::shared_ptr<Transport> transport = SharedTransport();
  auto listener = transport->Listen("net_memif0,role=server" + MemifArgs());
  REQUIRE(listener.ok());
  DpdkOptions newer = TestOptions();
  newer.protocol_version = 2;
  auto refused = MakeDpdkTransport(newer)->Connect("net_memif1,role=client" + MemifArgs(), 5s);
  REQUIRE(!refused.ok());
  CHECK(refused.status().code() == Code::kVersionMismatch);
  CHECK(refused.status().message().find("version 1") != std::string::npos);
  CHECK(refused.status().message().find("connecting end 2") != std::string::npos);
  CHECK((*listener)->Accept(50ms).status().code() == Code::kTimedOut);

  ChannelPair pair = ConnectPair(*transport, **listener, "net_memif1,role=client" + MemifArgs());
  REQUIRE(SendText(*pair.a, "same version").ok());
  CHECK(ReceiveText(*pair.b).second == "same version");
}

// Every 7th frame the receiver gets is discarded: the sender must resend them, and every
// message still arrives once, whole and in order.
template <typename Ports>
void LossyTransfer(const std::string& listen, const std::string& connect, Ports in_namespaces) {
  DpdkOptions lossy = TestOptions();
  lossy.drop_every_nth_frame = 7;
  std::shared_ptr<Transport> receiver_side = MakeDpdkTransport(lossy);
  std::unique_ptr<Listener> listener;
  in_namespaces.first([&] {
    auto made = receiver_side->Listen(listen);
    REQUIRE(made.status().ToString() == "OK");
    listener = std::move(*made);
  });
  ChannelPair pair;
  in_namespaces.second([&] { pair = ConnectPair(*SharedTransport(), *listener, connect); });

  constexpr uint64_t kMessages = 300;
  Status send_status;
  std::jthread sender([&] {
    for (uint64_t i = 0; i < kMessages && send_status.ok(); ++i) {
      std::vector<uint8_t> message = Pattern(1 + (i * 7919) % (256 << 10), i);
      send_status = SendBytes(*pair.a, message);
    }
  });
  std::vector<uint8_t> buffer(256 << 10);
  uint64_t intact = 0;
  for (uint64_t i = 0; i < kMessages; ++i) {
    size_t size = 0;
    REQUIRE(pair.b->Receive(buffer, &size, kLong).ToString() == "OK");
    if (size == 1 + (i * 7919) % (256 << 10) && MatchesPattern(std::span(buffer).first(size), i)) {
      ++intact;
    }
  }
  sender.join();
  CHECK(send_status.ok());
  CHECK(intact == kMessages);
  CHECK(ReceiveText(*pair.b, 50ms).first.code() == Code::kTimedOut);  // nothing twice
  CHECK(pair.a->stats().retransmissions > 0);
}

TEST_CASE("DPDK: lost frames are sent again, nothing is lost or repeated", "[dpdk]") {
  SECTION("memif") {
    LossyTransfer("net_memif0,role=server" + MemifArgs(), "net_memif1,role=client" + MemifArgs(),
                  std::pair(&Here, &Here));
  }
  SECTION("af_packet across namespaces") {
    VethNamespaces& ns = VethNamespaces::Get();
    LossyTransfer("net_af_packet0,iface=lsdpa0,framecnt=4096",
                  "net_af_packet1,iface=lsdpb0,framecnt=4096",
                  std::pair([&](const std::function<void()>& body) { InNamespace(ns.a, body); },
                            [&](const std::function<void()>& body) { InNamespace(ns.b, body); }));
  }
}

TEST_CASE("DPDK: a cut wire is a lost peer once nothing is acknowledged for peer_timeout",
          "[dpdk]") {
  VethNamespaces& ns = VethNamespaces::Get();
  std::unique_ptr<Listener> listener;
  InNamespace(ns.a, [&] {
    auto made = SharedTransport()->Listen("net_af_packet0,iface=lsdpa0,framecnt=4096");
    REQUIRE(made.ok());
    listener = std::move(*made);
  });
  DpdkOptions impatient = TestOptions();
  impatient.peer_timeout = 300ms;
  std::shared_ptr<Transport> sender_side = MakeDpdkTransport(impatient);
  ChannelPair pair;
  InNamespace(ns.b, [&] {
    pair = ConnectPair(*sender_side, *listener, "net_af_packet1,iface=lsdpb0,framecnt=4096");
  });
  REQUIRE(SendText(*pair.a, "before the cut").ok());
  REQUIRE(ReceiveText(*pair.b).second == "before the cut");

  Run("ip -n " + ns.b + " link set lsdpb0 down");
  auto start = Clock::now();
  Status status;
  std::vector<uint8_t> message = Pattern(64 << 10, 1);
  for (int i = 0; i < 100000 && status.ok(); ++i) {
    status = SendBytes(*pair.a, message);
    if (status.ok()) std::this_thread::sleep_for(1ms);
  }
  double waited = SecondsSince(start);
  Run("ip -n " + ns.b + " link set lsdpb0 up");
  CHECK(status.code() == Code::kPeerLost);
  CHECK(waited < 5);
  CHECK(status.message().find("no acknowledgement") != std::string::npos);
}

TEST_CASE("DPDK: memif with buffers smaller than a frame (bsize=1024) still carries messages",
          "[dpdk]") {
  const std::string socket = ",socket=" + TestDir() + "/small.sock,socket-abstract=no,bsize=1024";
  std::shared_ptr<Transport> transport = SharedTransport();
  auto listener = transport->Listen("net_memif40,role=server" + socket);
  REQUIRE(listener.ok());
  ChannelPair pair = ConnectPair(*transport, **listener, "net_memif41,role=client" + socket);
  // 3 MiB is more 1024-byte frames than the receiver queues: the sender must wait for it.
  std::vector<uint8_t> message = Pattern(3 << 20, 9);
  Status sent;
  std::jthread sender([&] { sent = SendBytes(*pair.a, message); });
  std::vector<uint8_t> buffer(message.size());
  size_t size = 0;
  REQUIRE(pair.b->Receive(buffer, &size, kLong).ToString() == "OK");
  sender.join();
  CHECK(sent.ok());
  CHECK(size == message.size());
  CHECK(buffer == message);
}

// ----- two processes -----

std::string ProbeCommand(const std::string& transport_args) {
  return std::string(LOCKSTEP_CHANNEL_PROBE) + " --transport dpdk " + transport_args;
}

// Runs `command` in the background with its output to `log`; returns its pid.
pid_t Spawn(const std::string& command, const std::string& log) {
  pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    execl("/bin/sh", "sh", "-c", ("exec " + command + " > " + log + " 2>&1").c_str(), nullptr);
    _exit(127);
  }
  return pid;
}

int Reap(pid_t pid) {
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST_CASE("DPDK between two processes: memif, and af_packet across two namespaces", "[dpdk]") {
  std::string dir = TestDir() + "/probe";
  Run("mkdir -p " + dir);
  std::string listen, connect;
  SECTION("memif") {
    std::string socket = ",socket=" + dir + "/memif.sock,socket-abstract=no";
    listen = ProbeCommand(
        "--eal '--no-huge -m 512 --no-pci --no-shconf -l 0' --listen "
        "'net_memif0,role=server" +
        socket + "'");
    connect = ProbeCommand(
        "--eal '--no-huge -m 512 --no-pci --no-shconf -l 1' --connect "
        "'net_memif0,role=client" +
        socket + "'");
  }
  SECTION("af_packet") {
    VethNamespaces& ns = VethNamespaces::Get();
    listen = "ip netns exec " + ns.a + " " +
             ProbeCommand(
                 "--eal '--no-huge -m 512 --no-pci --no-shconf -l 0' --listen "
                 "net_af_packet0,iface=lsdpa0,framecnt=4096");
    connect = "ip netns exec " + ns.b + " " +
              ProbeCommand(
                  "--eal '--no-huge -m 512 --no-pci --no-shconf -l 1' --connect "
                  "net_af_packet0,iface=lsdpb0,framecnt=4096");
  }
  pid_t listener = Spawn(listen + " --size 100000 --messages 500", dir + "/listen.log");
  pid_t connector = Spawn(connect + " --size 100000 --messages 500", dir + "/connect.log");
  int connector_rc = Reap(connector);
  int listener_rc = Reap(listener);
  std::string listen_log = ReadFile(dir + "/listen.log");
  std::string connect_log = ReadFile(dir + "/connect.log");
  INFO("listener: " << listen_log << "connector: " << connect_log);
  CHECK(listener_rc == 0);
  CHECK(connector_rc == 0);
  CHECK(listen_log.find("probe: listen ok messages=500 bytes=50000000") != std::string::npos);
  CHECK(connect_log.find("probe: connect ok messages=500") != std::string::npos);
  Run("rm -rf " + dir);
}

TEST_CASE("DPDK between two processes: kill -9 of the sender is a lost peer, promptly", "[dpdk]") {
  std::string dir = TestDir() + "/kill";
  Run("mkdir -p " + dir);
  std::string socket = ",socket=" + dir + "/memif.sock,socket-abstract=no";
  pid_t listener = Spawn(ProbeCommand("--eal '--no-huge -m 512 --no-pci --no-shconf -l 0' "
                                      "--timeout-ms 30000 --size 4096 --listen "
                                      "'net_memif0,role=server" +
                                      socket + "'"),
                         dir + "/listen.log");
  pid_t connector = Spawn(ProbeCommand("--eal '--no-huge -m 512 --no-pci --no-shconf -l 1' "
                                       "--size 4096 --messages 0 --connect "
                                       "'net_memif0,role=client" +
                                       socket + "'"),
                          dir + "/connect.log");
  // Let it stream a while, then kill the sender at some point in its stream.
  std::this_thread::sleep_for(std::chrono::milliseconds(1500 + std::rand() % 1000));
  auto killed = Clock::now();
  REQUIRE(kill(connector, SIGKILL) == 0);
  Reap(connector);
  int listener_rc = Reap(listener);
  double noticed = SecondsSince(killed);
  std::string log = ReadFile(dir + "/listen.log");
  INFO(log);
  CHECK(listener_rc == 3);  // the peer was lost; every message before it was intact
  CHECK(log.find("peer lost: ") != std::string::npos);
  CHECK(log.find("intact=0 ") == std::string::npos);
  CHECK(noticed < 5);  // memif: the link goes down with the process (30 s receive timeout)
  Run("rm -rf " + dir);
}

}  // namespace
}  // namespace lockstep::channel::testing
