#include "vip_manager/identity.h"

#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netlink/netlink.h>
#include <netlink/route/addr.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <thread>

namespace lockstep::vip {

Result<MacAddress> ParseMac(const std::string& text) {
  MacAddress m{};
  unsigned b[6];
  char tail;
  if (std::sscanf(text.c_str(), "%2x:%2x:%2x:%2x:%2x:%2x%c", &b[0], &b[1], &b[2], &b[3], &b[4],
                  &b[5], &tail) != 6) {
    return Status::InvalidArgument("'" + text + "' is not a MAC address (like 52:54:00:12:34:56)");
  }
  for (int i = 0; i < 6; ++i) m[i] = static_cast<uint8_t>(b[i]);
  return m;
}

namespace frames {
namespace {

constexpr MacAddress kBroadcast = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
constexpr size_t kMinFrame = 60;  // Ethernet minimum without the FCS

void Put16(std::vector<uint8_t>& f, uint16_t v) {
  f.push_back(static_cast<uint8_t>(v >> 8));
  f.push_back(static_cast<uint8_t>(v));
}
template <size_t N>
void Put(std::vector<uint8_t>& f, const std::array<uint8_t, N>& bytes) {
  f.insert(f.end(), bytes.begin(), bytes.end());
}
void Ethernet(std::vector<uint8_t>& f, const MacAddress& dst, const MacAddress& src,
              uint16_t type) {
  Put(f, dst);
  Put(f, src);
  Put16(f, type);
}
// The ARP body for Ethernet/IPv4 (also RARP's).
void ArpBody(std::vector<uint8_t>& f, uint16_t op, const MacAddress& sha,
             const std::array<uint8_t, 4>& spa, const MacAddress& tha,
             const std::array<uint8_t, 4>& tpa) {
  Put16(f, 1);       // hardware: Ethernet
  Put16(f, 0x0800);  // protocol: IPv4
  f.push_back(6);
  f.push_back(4);
  Put16(f, op);
  Put(f, sha);
  Put(f, spa);
  Put(f, tha);
  Put(f, tpa);
}
void Pad(std::vector<uint8_t>& f) {
  if (f.size() < kMinFrame) f.resize(kMinFrame, 0);
}

}  // namespace

std::vector<uint8_t> GratuitousArp(const MacAddress& mac, const std::array<uint8_t, 4>& ip,
                                   bool reply) {
  std::vector<uint8_t> f;
  Ethernet(f, kBroadcast, mac, ETHERTYPE_ARP);
  ArpBody(f, reply ? 2 : 1, mac, ip, reply ? mac : MacAddress{}, ip);
  Pad(f);
  return f;
}

std::vector<uint8_t> Rarp(const MacAddress& mac) {
  std::vector<uint8_t> f;
  Ethernet(f, kBroadcast, mac, ETHERTYPE_REVARP);
  ArpBody(f, 3, mac, {}, mac, {});
  Pad(f);
  return f;
}

std::vector<uint8_t> UnsolicitedNeighborAdvert(const MacAddress& mac,
                                               const std::array<uint8_t, 16>& ip) {
  constexpr std::array<uint8_t, 16> kAllNodes = {0xff, 0x02, 0, 0, 0, 0, 0, 0,
                                                 0,    0,    0, 0, 0, 0, 0, 1};
  constexpr uint16_t kIcmpLength = 24 + 8;  // advertisement + target link-layer option
  std::vector<uint8_t> f;
  Ethernet(f, {0x33, 0x33, 0, 0, 0, 1}, mac, ETHERTYPE_IPV6);
  const size_t ip_at = f.size();
  f.insert(f.end(), {0x60, 0, 0, 0});  // version 6, no traffic class or flow label
  Put16(f, kIcmpLength);
  f.push_back(58);   // next header: ICMPv6
  f.push_back(255);  // hop limit: neighbour discovery requires 255
  Put(f, ip);        // source: the address being advertised, which is ours now
  Put(f, kAllNodes);
  const size_t icmp_at = f.size();
  f.push_back(136);  // neighbour advertisement
  f.push_back(0);
  Put16(f, 0);                         // checksum, below
  f.insert(f.end(), {0x20, 0, 0, 0});  // flags: override (not router, not solicited)
  Put(f, ip);
  f.push_back(2);  // option: target link-layer address
  f.push_back(1);  // length in units of 8 bytes
  Put(f, mac);
  // Checksum over the pseudo-header (source, destination, length, next header) and the
  // ICMPv6 message.
  uint32_t sum = 0;
  auto add = [&sum](const uint8_t* p, size_t n) {
    for (size_t i = 0; i + 1 < n; i += 2) sum += static_cast<uint32_t>(p[i] << 8 | p[i + 1]);
  };
  add(f.data() + ip_at + 8, 32);
  sum += kIcmpLength + 58;
  add(f.data() + icmp_at, kIcmpLength);
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  uint16_t checksum = static_cast<uint16_t>(~sum);
  f[icmp_at + 2] = static_cast<uint8_t>(checksum >> 8);
  f[icmp_at + 3] = static_cast<uint8_t>(checksum);
  return f;
}

}  // namespace frames

struct IdentityClaimer::Impl {
  IdentitySpec spec;
  int ifindex = 0;
  MacAddress host_mac{};
  int family = 0;  // AF_INET, AF_INET6 or 0 (no VIP)
  std::array<uint8_t, 16> vip{};
  nl_sock* netlink = nullptr;
  rtnl_addr* address = nullptr;  // the VIP as rtnetlink adds and deletes it
  int packet_fd = -1;
  std::vector<std::vector<uint8_t>> round;  // the frames of one announcement round
  std::atomic<uint64_t> frames_sent{0};

  std::mutex mu;
  std::condition_variable cv;
  bool stop_rounds = false;  // GUARDED_BY(mu)
  std::thread repeater;

  ~Impl() {
    StopRounds();
    if (packet_fd >= 0) close(packet_fd);
    if (address) rtnl_addr_put(address);
    if (netlink) nl_socket_free(netlink);
  }

  // Sends one round; the first failure is returned, the other frames are still tried.
  Status SendRound() {
    Status first;
    for (const auto& f : round) {
      sockaddr_ll to{};
      to.sll_family = AF_PACKET;
      to.sll_ifindex = ifindex;
      to.sll_halen = 6;
      std::memcpy(to.sll_addr, f.data(), 6);  // the frame's own destination
      if (sendto(packet_fd, f.data(), f.size(), 0, reinterpret_cast<sockaddr*>(&to), sizeof to) <
          0) {
        if (first.ok())
          first = Status::FromErrno("sending an announcement on " + spec.interface, errno);
      } else {
        frames_sent.fetch_add(1);
      }
    }
    return first;
  }

  void StopRounds() {
    {
      std::lock_guard<std::mutex> lock(mu);
      stop_rounds = true;
    }
    cv.notify_all();
    if (repeater.joinable()) repeater.join();
    std::lock_guard<std::mutex> lock(mu);
    stop_rounds = false;
  }
};

IdentityClaimer::IdentityClaimer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
IdentityClaimer::~IdentityClaimer() = default;

Result<std::unique_ptr<IdentityClaimer>> IdentityClaimer::Open(const IdentitySpec& spec) {
  auto m = std::make_unique<Impl>();
  m->spec = spec;
  if (spec.rounds < 1 || spec.rounds > 100) {
    return Status::InvalidArgument("announcement rounds must be 1..100");
  }
  m->ifindex = static_cast<int>(if_nametoindex(spec.interface.c_str()));
  if (m->ifindex == 0) {
    return Status::IoError("no interface '" + spec.interface +
                           "' here: name the host interface the VIP belongs on");
  }
  if (!spec.vip.empty()) {
    if (inet_pton(AF_INET, spec.vip.c_str(), m->vip.data()) == 1) {
      m->family = AF_INET;
    } else if (inet_pton(AF_INET6, spec.vip.c_str(), m->vip.data()) == 1) {
      m->family = AF_INET6;
    } else {
      return Status::InvalidArgument("'" + spec.vip + "' is not an IPv4 or IPv6 address");
    }
  }

  // The interface's MAC: the sender of the VIP's announcements.
  {
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    ifreq req{};
    std::snprintf(req.ifr_name, sizeof req.ifr_name, "%s", spec.interface.c_str());
    int rc = fd < 0 ? -1 : ioctl(fd, SIOCGIFHWADDR, &req);
    int err = errno;
    if (fd >= 0) close(fd);
    if (rc != 0) return Status::FromErrno("reading the MAC of " + spec.interface, err);
    std::memcpy(m->host_mac.data(), req.ifr_hwaddr.sa_data, 6);
  }

  m->packet_fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);  // protocol 0: sends only
  if (m->packet_fd < 0) {
    return Status::FromErrno("opening a packet socket (needs CAP_NET_RAW: run as root)", errno);
  }

  if (m->family != 0) {
    m->netlink = nl_socket_alloc();
    if (m->netlink == nullptr || nl_connect(m->netlink, NETLINK_ROUTE) != 0) {
      return Status::IoError("cannot connect to rtnetlink");
    }
    const unsigned len = m->family == AF_INET ? 4 : 16;
    nl_addr* local = nl_addr_build(m->family, m->vip.data(), len);
    if (local == nullptr) return Status::ResourceExhausted("nl_addr_build");
    nl_addr_set_prefixlen(local, static_cast<int>(len * 8));  // a /32 or /128 of its own
    m->address = rtnl_addr_alloc();
    rtnl_addr_set_ifindex(m->address, m->ifindex);
    rtnl_addr_set_family(m->address, m->family);
    int rc = rtnl_addr_set_local(m->address, local);
    nl_addr_put(local);
    if (rc != 0) return Status::IoError(std::string("rtnl_addr_set_local: ") + nl_geterror(rc));
    // Usable at once: duplicate address detection would hold an IPv6 VIP back for a second.
    if (m->family == AF_INET6) rtnl_addr_set_flags(m->address, IFA_F_NODAD);
  }

  if (m->family == AF_INET) {
    std::array<uint8_t, 4> v4;
    std::memcpy(v4.data(), m->vip.data(), 4);
    m->round.push_back(frames::GratuitousArp(m->host_mac, v4, false));
    m->round.push_back(frames::GratuitousArp(m->host_mac, v4, true));
  } else if (m->family == AF_INET6) {
    m->round.push_back(frames::UnsolicitedNeighborAdvert(m->host_mac, m->vip));
  }
  for (const auto& mac : spec.vm_macs) m->round.push_back(frames::Rarp(mac));
  return std::unique_ptr<IdentityClaimer>(new IdentityClaimer(std::move(m)));
}

Result<ClaimReport> IdentityClaimer::Claim() {
  Impl& m = *impl_;
  m.StopRounds();
  ClaimReport r;
  r.began = std::chrono::steady_clock::now();
  if (m.address != nullptr) {
    int rc = rtnl_addr_add(m.netlink, m.address, NLM_F_EXCL);
    if (rc == -NLE_EXIST) {
      r.address_was_there = true;
    } else if (rc != 0) {
      return Status::IoError("adding " + m.spec.vip + " to " + m.spec.interface + ": " +
                             nl_geterror(rc) + " (needs CAP_NET_ADMIN: run as root)");
    }
  }
  r.address_added = std::chrono::steady_clock::now();
  Status sent = m.SendRound();
  r.first_frame_sent = std::chrono::steady_clock::now();
  if (m.spec.rounds > 1) {
    m.repeater = std::thread([&m] {
      std::unique_lock<std::mutex> lock(m.mu);
      for (int i = 1; i < m.spec.rounds; ++i) {
        if (m.cv.wait_for(lock, m.spec.round_gap, [&m] { return m.stop_rounds; })) return;
        (void)m.SendRound();  // best effort: the first round was checked
      }
    });
  }
  if (!sent.ok()) return sent;
  return r;
}

Status IdentityClaimer::Release() {
  Impl& m = *impl_;
  m.StopRounds();
  if (m.address == nullptr) return Status::Ok();
  int rc = rtnl_addr_delete(m.netlink, m.address, 0);
  if (rc == 0 || rc == -NLE_NOADDR || rc == -NLE_OBJ_NOTFOUND) return Status::Ok();
  return Status::IoError("removing " + m.spec.vip + " from " + m.spec.interface + ": " +
                         nl_geterror(rc));
}

Result<bool> IdentityClaimer::Holds() const {
  const Impl& m = *impl_;
  if (m.address == nullptr) return false;
  // Asked over the claimer's own netlink socket: the answer is about the namespace the
  // claimer was opened in, whichever thread asks.
  nl_cache* cache = nullptr;
  int rc = rtnl_addr_alloc_cache(m.netlink, &cache);
  if (rc != 0) return Status::IoError(std::string("listing addresses: ") + nl_geterror(rc));
  bool found = false;
  for (nl_object* o = nl_cache_get_first(cache); o != nullptr && !found; o = nl_cache_get_next(o)) {
    auto* a = reinterpret_cast<rtnl_addr*>(o);
    found = rtnl_addr_get_ifindex(a) == m.ifindex &&
            nl_addr_cmp(rtnl_addr_get_local(a), rtnl_addr_get_local(m.address)) == 0;
  }
  nl_cache_free(cache);
  return found;
}

uint64_t IdentityClaimer::frames_sent() const { return impl_->frames_sent.load(); }

}  // namespace lockstep::vip
