// Identity takeover on real interfaces: two hosts and a client as network namespaces on
// one bridge. The claims run in the hosts' namespaces; the client's neighbour table and a
// packet socket on its interface show what the network saw. Needs root.
#include "vip_manager/identity.h"

#include <arpa/inet.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>

#include "testbed/topology.h"

using namespace std::chrono_literals;
using lockstep::Result;
using lockstep::Status;
using lockstep::testbed::InNamespace;
using lockstep::testbed::Run;
using lockstep::vip::IdentityClaimer;
using lockstep::vip::IdentitySpec;
using lockstep::vip::MacAddress;

namespace {

const MacAddress kMacA = {0x02, 0x11, 0, 0, 0, 0xa1};
const MacAddress kMacB = {0x02, 0x11, 0, 0, 0, 0xb2};
const MacAddress kVmMac = {0x52, 0x54, 0x00, 0x12, 0x34, 0x56};

std::string MacText(const MacAddress& m) {
  char b[18];
  std::snprintf(b, sizeof b, "%02x:%02x:%02x:%02x:%02x:%02x", m[0], m[1], m[2], m[3], m[4], m[5]);
  return b;
}

// lsv-a and lsv-b (eth0 10.77.0.11/.12, fd77::11/.12) and lsv-cli (10.77.0.2, fd77::2),
// each with a veth to the bridge in lsv-sw.
struct Hosts {
  Hosts() {
    Teardown();
    std::vector<std::string> cmds = {"ip netns add lsv-sw", "ip -n lsv-sw link add sw type bridge",
                                     "ip -n lsv-sw link set sw up"};
    struct Host {
      const char* ns;
      const char* ip;
      const char* ip6;
      std::string mac;
    } hosts[] = {{"lsv-a", "10.77.0.11/24", "fd77::11/64", MacText(kMacA)},
                 {"lsv-b", "10.77.0.12/24", "fd77::12/64", MacText(kMacB)},
                 {"lsv-cli", "10.77.0.2/24", "fd77::2/64", "02:11:00:00:00:cc"}};
    int port = 0;
    for (const Host& h : hosts) {
      std::string ns = h.ns, p = "p" + std::to_string(port++);
      for (std::string c : {"ip netns add " + ns, "ip -n " + ns + " link set lo up",
                            "ip -n " + ns + " link add eth0 address " + h.mac +
                                " type veth peer name " + p + " netns lsv-sw",
                            "ip -n lsv-sw link set " + p + " master sw up",
                            "ip -n " + ns + " addr add " + h.ip + " dev eth0",
                            "ip -n " + ns + " addr add " + h.ip6 + " dev eth0 nodad",
                            "ip -n " + ns + " link set eth0 up"}) {
        cmds.push_back(c);
      }
    }
    for (const auto& c : cmds) {
      Status s = Run(c);
      INFO(s.ToString());
      REQUIRE(s.ok());
    }
  }
  ~Hosts() { Teardown(); }
  static void Teardown() {
    for (const char* ns : {"lsv-sw", "lsv-a", "lsv-b", "lsv-cli"}) {
      (void)Run(std::string("ip netns del ") + ns + " 2>/dev/null || true");
    }
  }
};

std::unique_ptr<IdentityClaimer> OpenIn(const std::string& ns, const IdentitySpec& spec) {
  auto c = InNamespace<std::unique_ptr<IdentityClaimer>>(
      ns, [&]() { return IdentityClaimer::Open(spec); });
  INFO(c.status().ToString());
  REQUIRE(c.ok());
  return std::move(*c);
}

// The client's neighbour entry for `ip` ("" if none), e.g. "02:11:00:00:00:a1".
std::string Neighbour(const std::string& ip) {
  std::string cmd = "ip -n lsv-cli neigh show " + ip + " dev eth0";
  FILE* p = popen(cmd.c_str(), "r");
  char line[256] = "";
  std::string out;
  if (p && fgets(line, sizeof line, p)) out = line;
  if (p) pclose(p);
  size_t at = out.find("lladdr ");
  return at == std::string::npos ? "" : out.substr(at + 7, 17);
}

// Waits until the client's entry for `ip` is `mac`; the time it took, or -1.
double WaitNeighbour(const std::string& ip, const MacAddress& mac,
                     std::chrono::steady_clock::time_point since) {
  auto end = since + 3s;
  while (std::chrono::steady_clock::now() < end) {
    if (Neighbour(ip) == MacText(mac)) {
      return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - since)
          .count();
    }
    std::this_thread::sleep_for(1ms);
  }
  return -1;
}

}  // namespace

TEST_CASE("announcement frames have the documented layout", "[identity]") {
  std::array<uint8_t, 4> ip = {10, 77, 0, 50};
  auto req = lockstep::vip::frames::GratuitousArp(kMacA, ip, false);
  REQUIRE(req.size() == 60);
  CHECK(req[12] == 0x08);
  CHECK(req[13] == 0x06);                                           // ARP
  CHECK(req[21] == 1);                                              // request
  CHECK(std::equal(kMacA.begin(), kMacA.end(), req.begin() + 22));  // sender MAC
  CHECK(std::equal(ip.begin(), ip.end(), req.begin() + 28));        // sender IP
  CHECK(std::equal(ip.begin(), ip.end(), req.begin() + 38));        // target IP = sender IP
  auto reply = lockstep::vip::frames::GratuitousArp(kMacA, ip, true);
  CHECK(reply[21] == 2);
  CHECK(std::equal(kMacA.begin(), kMacA.end(), reply.begin() + 32));  // target MAC
  auto rarp = lockstep::vip::frames::Rarp(kVmMac);
  CHECK(rarp[12] == 0x80);
  CHECK(rarp[13] == 0x35);
  CHECK(rarp[21] == 3);
  CHECK(std::equal(kVmMac.begin(), kVmMac.end(), rarp.begin() + 6));  // source MAC
  CHECK(lockstep::vip::ParseMac("52:54:00:12:34:56").ok());
  CHECK(!lockstep::vip::ParseMac("52:54:00:12:34").ok());
  CHECK(!lockstep::vip::ParseMac("52:54:00:12:34:56:78").ok());
}

TEST_CASE("a claimed VIP moves the client's neighbour entry at once, and release is idempotent",
          "[identity][netns]") {
  Hosts hosts;
  IdentitySpec spec;
  spec.interface = "eth0";
  spec.vip = "10.77.0.50";
  spec.rounds = 3;
  spec.round_gap = 20ms;
  auto a = OpenIn("lsv-a", spec);
  auto b = OpenIn("lsv-b", spec);
  // Host A holds the VIP and the client knows A's MAC for it.
  REQUIRE(a->Claim().ok());
  REQUIRE(*a->Holds());
  REQUIRE(Run("ip -n lsv-cli neigh replace 10.77.0.50 lladdr " + MacText(kMacA) +
              " dev eth0 nud reachable")
              .ok());
  REQUIRE(WaitNeighbour("10.77.0.50", kMacA, std::chrono::steady_clock::now()) >= 0);
  std::this_thread::sleep_for(1100ms);  // past the neighbour table's locktime (1 s)

  // A is lost; B takes the identity over. The client's entry must move without waiting for
  // it to expire (REACHABLE for tens of seconds otherwise).
  auto claimed = b->Claim();
  REQUIRE(claimed.ok());
  CHECK(!claimed->address_was_there);
  double ms = WaitNeighbour("10.77.0.50", kMacB, claimed->began);
  INFO("neighbour entry moved " << ms << " ms after the claim");
  REQUIRE(ms >= 0);
  WARN("IPv4 VIP: client's neighbour entry moved to the new host " << ms << " ms after the claim");
  CHECK(b->frames_sent() >= 2);
  std::this_thread::sleep_for(100ms);
  CHECK(b->frames_sent() == 6);  // 3 rounds of request + reply

  // Claiming again is harmless; releasing twice is too.
  auto again = b->Claim();
  REQUIRE(again.ok());
  CHECK(again->address_was_there);
  REQUIRE(b->Release().ok());
  REQUIRE(b->Release().ok());
  CHECK(!*b->Holds());
  REQUIRE(a->Release().ok());
}

TEST_CASE("an IPv6 VIP is announced by an unsolicited neighbour advertisement",
          "[identity][netns]") {
  Hosts hosts;
  IdentitySpec spec;
  spec.interface = "eth0";
  spec.vip = "fd77::50";
  spec.rounds = 1;
  auto b = OpenIn("lsv-b", spec);
  REQUIRE(Run("ip -n lsv-cli -6 neigh replace fd77::50 lladdr " + MacText(kMacA) +
              " dev eth0 nud reachable")
              .ok());
  std::this_thread::sleep_for(1100ms);
  auto claimed = b->Claim();
  REQUIRE(claimed.ok());
  REQUIRE(*b->Holds());  // added without duplicate address detection: usable at once
  double ms = WaitNeighbour("fd77::50", kMacB, claimed->began);
  INFO("neighbour entry moved " << ms << " ms after the claim");
  REQUIRE(ms >= 0);  // the kernel accepted the advertisement: checksum and flags are right
  REQUIRE(b->Release().ok());
  CHECK(!*b->Holds());
}

TEST_CASE("the VM's MACs are announced by RARP", "[identity][netns]") {
  Hosts hosts;
  // The client listens for RARP on its interface.
  auto fd = InNamespace<int>("lsv-cli", []() -> Result<int> {
    int s = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, htons(ETH_P_RARP));
    if (s < 0) return Status::FromErrno("packet socket", errno);
    sockaddr_ll at{};
    at.sll_family = AF_PACKET;
    at.sll_protocol = htons(ETH_P_RARP);
    at.sll_ifindex = static_cast<int>(if_nametoindex("eth0"));
    if (bind(s, reinterpret_cast<sockaddr*>(&at), sizeof at) != 0) {
      close(s);
      return Status::FromErrno("bind", errno);
    }
    return s;
  });
  REQUIRE(fd.ok());
  IdentitySpec spec;
  spec.interface = "eth0";
  spec.vm_macs = {kVmMac};  // no VIP: the VM's own addresses move with its MAC
  spec.rounds = 2;
  spec.round_gap = 10ms;
  auto b = OpenIn("lsv-b", spec);
  REQUIRE(b->Claim().ok());
  int seen = 0;
  for (int i = 0; i < 2; ++i) {
    pollfd p{*fd, POLLIN, 0};
    if (poll(&p, 1, 2000) != 1) break;
    uint8_t frame[128];
    ssize_t n = read(*fd, frame, sizeof frame);
    if (n >= 42 && std::equal(kVmMac.begin(), kVmMac.end(), frame + 6) && frame[21] == 3) ++seen;
  }
  close(*fd);
  CHECK(seen == 2);          // both rounds arrived, from the VM's MAC
  CHECK(b->Release().ok());  // nothing to release: fine
}

TEST_CASE("bad identity specs are refused with the reason", "[identity][netns]") {
  Hosts hosts;
  IdentitySpec spec;
  spec.interface = "eth0";
  spec.vip = "10.77.0.500";
  auto bad = InNamespace<std::unique_ptr<IdentityClaimer>>(
      "lsv-b", [&]() { return IdentityClaimer::Open(spec); });
  REQUIRE(!bad.ok());
  CHECK(bad.status().message().find("not an IPv4 or IPv6 address") != std::string::npos);
  spec.vip = "10.77.0.50";
  spec.interface = "nosuch0";
  bad = InNamespace<std::unique_ptr<IdentityClaimer>>(
      "lsv-b", [&]() { return IdentityClaimer::Open(spec); });
  REQUIRE(!bad.ok());
  CHECK(bad.status().message().find("no interface 'nosuch0'") != std::string::npos);
}
