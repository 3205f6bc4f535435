// The DPDK transport, for real: the conformance suite over net_memif (two ports of this
// process joined by a memif socket) and over net_af_packet (two ports on the ends of a veth
// pair whose ends live in two network namespaces), then DPDK-specific cases: addresses,
// a peer of another protocol version, frames lost on the way.
//
// One EAL per process: every transport here is made with the same TestOptions().

#include "replication_channel/dpdk.h"

#include <fcntl.h>
#include <sched.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <functional>
#include <string>

#include "channel_test_util.h"

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

std::string MemifSocket() {
  return "/tmp/lockstep-dpdk-test-" + std::to_string(getpid()) + ".sock";
}

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
