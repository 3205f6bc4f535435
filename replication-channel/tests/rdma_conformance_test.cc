// The conformance suite (channel_conformance.h) over the RDMA transport, and the cases
// only RDMA has: the protocol version check, messages larger than the receive ring, and
// zero-copy from registered memory versus the bounce buffer.
//
// Needs an RDMA device with an active port (soft-RoCE in a guest: see
// tests/rdma_guests_test.sh), so this binary is not registered with ctest directly.
// LOCKSTEP_RDMA_LISTEN sets where the listener binds (default 127.0.0.1:0); both ends of a
// pair use the same device.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <string>
#include <thread>

#include "channel_test_util.h"
#include "replication_channel/rdma.h"

namespace lockstep::channel::testing {

// The rings of a guest's pairs: one largest message fits (the conformance suite sends
// kMaxMessageBytes), and a small bounce buffer so that its recycling is exercised.
inline RdmaOptions TestOptions() {
  RdmaOptions options;
  options.ring_bytes = kMaxMessageBytes;
  options.bounce_bytes = 4u << 20;
  return options;
}

inline std::string ListenAddress() {
  const char* address = std::getenv("LOCKSTEP_RDMA_LISTEN");
  return address != nullptr && *address != '\0' ? address : "127.0.0.1:0";
}

// Connect() returns only once the listener's Accept() answered the handshake, so it runs
// on another thread.
inline ChannelPair ConnectRdmaPair(Transport& connector, Listener& listener) {
  Result<std::unique_ptr<Channel>> a = Status::Aborted("the connecting thread did not run");
  std::thread connecting([&] { a = connector.Connect(listener.address(), 30s); });
  auto b = listener.Accept(30s);
  connecting.join();
  REQUIRE(a.status().ToString() == "OK");
  REQUIRE(b.status().ToString() == "OK");
  return {std::move(*a), std::move(*b), nullptr};
}

// A pair whose ends may use different options: `listening` for b, `connecting` for a.
inline ChannelPair MakeRdmaPair(const RdmaOptions& connecting, const RdmaOptions& listening) {
  std::shared_ptr<Transport> connector = MakeRdmaTransport(connecting);
  std::shared_ptr<Transport> acceptor = MakeRdmaTransport(listening);
  auto listener = acceptor->Listen(ListenAddress());
  REQUIRE(listener.status().ToString() == "OK");
  std::shared_ptr<Listener> shared = std::move(*listener);
  std::function<ChannelPair()> again = [connector, acceptor, shared] {
    return ConnectRdmaPair(*connector, *shared);
  };
  ChannelPair pair = again();
  pair.again = again;
  return pair;
}

struct RdmaPair {
  static ChannelPair Make() { return MakeRdmaPair(TestOptions(), TestOptions()); }
};

}  // namespace lockstep::channel::testing

#define LOCKSTEP_CONFORMANCE_PAIRS RdmaPair
#include "channel_conformance.h"

namespace lockstep::channel::testing {
namespace {

TEST_CASE("rdma: this host has an RDMA device (else nothing here can pass)") {
  Status available = RdmaAvailable();
  INFO(available.ToString());
  REQUIRE(available.ok());
}

TEST_CASE("rdma: a peer of another protocol version is refused on both ends") {
  RdmaOptions newer = TestOptions();
  newer.protocol_version = kRdmaProtocolVersion + 1;
  std::unique_ptr<Transport> connector = MakeRdmaTransport(TestOptions());
  std::unique_ptr<Transport> acceptor = MakeRdmaTransport(newer);
  auto listener = acceptor->Listen(ListenAddress());
  REQUIRE(listener.ok());
  Result<std::unique_ptr<Channel>> a = Status::Aborted("not run");
  std::thread connecting([&] { a = connector->Connect((*listener)->address(), 30s); });
  auto b = (*listener)->Accept(30s);
  connecting.join();
  CHECK(a.status().code() == Code::kVersionMismatch);
  CHECK(b.status().code() == Code::kVersionMismatch);
  CHECK_THAT(a.status().message(), Catch::Matchers::Contains("version 2, this end version 1"));
  CHECK_THAT(b.status().message(), Catch::Matchers::Contains("version 1, this end version 2"));

  // The listener still serves peers of its own version.
  std::unique_ptr<Transport> same = MakeRdmaTransport(newer);
  ChannelPair pair = ConnectRdmaPair(*same, **listener);
  REQUIRE(SendText(*pair.a, "same version").ok());
  CHECK(ReceiveText(*pair.b).second == "same version");
}

TEST_CASE("rdma: a tcp peer is refused as not speaking the rdma protocol") {
  std::unique_ptr<Transport> tcp = MakeTcpTransport();
  auto tcp_listener = tcp->Listen("127.0.0.1:0");
  REQUIRE(tcp_listener.ok());
  std::unique_ptr<Transport> rdma = MakeRdmaTransport(TestOptions());
  Result<std::unique_ptr<Channel>> a = Status::Aborted("not run");
  std::thread connecting([&] { a = rdma->Connect((*tcp_listener)->address(), 30s); });
  auto b = (*tcp_listener)->Accept(30s);
  REQUIRE(b.ok());
  // The tcp end sends one small frame; the rdma end finds no hello in it.
  REQUIRE(SendText(**b, "not a hello, but 16 bytes long at least").ok());
  connecting.join();
  CHECK(a.status().code() == Code::kVersionMismatch);
  CHECK_THAT(a.status().message(), Catch::Matchers::Contains("does not speak"));
}

// This process's pinned memory (VmPin, kB), which registering an RDMA region raises; -1
// if the kernel does not report it.
long PinnedKib() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("VmPin:", 0) == 0) return std::strtol(line.c_str() + 6, nullptr, 10);
  }
  return -1;
}

// A plain TCP connection to an IPv4 "a.b.c.d:port"; -1 on failure.
int ConnectPlainTcp(const std::string& address) {
  sockaddr_in to{};
  to.sin_family = AF_INET;
  size_t colon = address.rfind(':');
  to.sin_port = htons(static_cast<uint16_t>(std::stoi(address.substr(colon + 1))));
  if (inet_pton(AF_INET, address.substr(0, colon).c_str(), &to.sin_addr) != 1) return -1;
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd >= 0 && ::connect(fd, reinterpret_cast<sockaddr*>(&to), sizeof(to)) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

TEST_CASE("rdma: a stranger on the listener's port pins nothing before it says who it is") {
  std::unique_ptr<Transport> rdma = MakeRdmaTransport(TestOptions());
  auto listener = rdma->Listen(ListenAddress());
  REQUIRE(listener.ok());
  const long before = PinnedKib();
  REQUIRE(before >= 0);
  Result<std::unique_ptr<Channel>> accepted = Status::Aborted("not run");
  std::jthread accepting([&] { accepted = (*listener)->Accept(30s); });
  int stranger = ConnectPlainTcp((*listener)->address());
  // Should a REQUIRE below fail, the listener is aborted and the stranger hung up before
  // `accepting` is joined (destroyed first: declared last).
  struct Cleanup {
    Listener& listener;
    int& fd;
    ~Cleanup() {
      listener.Abort();
      if (fd >= 0) ::close(fd);
    }
  } cleanup{**listener, stranger};
  REQUIRE(stranger >= 0);
  // The listener's first 16 bytes (magic, version, length) come before it opens the device
  // and pins its ring; once they are here, nothing may be pinned yet.
  char first[16];
  REQUIRE(::recv(stranger, first, sizeof(first), MSG_WAITALL) == sizeof(first));
  CHECK(std::string(first, 8) == "LSTPRDMA");
  CHECK(PinnedKib() == before);
  // 16 bytes that are not lockstep's: refused, and still nothing pinned.
  REQUIRE(::send(stranger, "GET / HTTP/1.1\r\n", 16, MSG_NOSIGNAL) == 16);
  accepting.join();
  CHECK(accepted.status().code() == Code::kVersionMismatch);
  CHECK(PinnedKib() == before);

  // The measure works: a real channel does pin its ring.
  std::unique_ptr<Transport> connector = MakeRdmaTransport(TestOptions());
  ChannelPair pair = ConnectRdmaPair(*connector, **listener);
  CHECK(PinnedKib() > before + 1024);
}

TEST_CASE("rdma: a message larger than the peer's ring is refused, the channel stays usable") {
  RdmaOptions small = TestOptions();
  small.ring_bytes = 1 << 20;
  ChannelPair pair = MakeRdmaPair(TestOptions(), small);

  std::vector<uint8_t> too_big = Pattern((1 << 20) + 1, 1);
  Status refused = SendBytes(*pair.a, too_big);
  CHECK(refused.code() == Code::kInvalidArgument);
  CHECK_THAT(refused.message(), Catch::Matchers::Contains("ring_bytes"));
  CHECK(pair.a->CompletedThrough() == 0);

  // A message of exactly the ring's size, then many that wrap around the ring's end and
  // wait for credits: all intact, in order.
  constexpr int kMessages = 40;
  std::vector<Status> sent(kMessages + 1);
  std::jthread sender([&] {
    std::vector<uint8_t> exact = Pattern(1 << 20, 2);
    sent[0] = SendBytes(*pair.a, exact);
    for (int i = 0; i < kMessages; ++i) {
      std::vector<uint8_t> message = Pattern(300000 + 1000 * i, 100 + i);
      uint64_t seq = 0;
      sent[i + 1] = SendBytes(*pair.a, message, &seq);
      if (sent[i + 1].ok()) sent[i + 1] = pair.a->WaitForCompletion(seq, kLong);
    }
  });
  std::vector<uint8_t> buffer(1 << 20);
  size_t size = 0;
  REQUIRE(pair.b->Receive(buffer, &size, kLong).ToString() == "OK");
  CHECK(size == buffer.size());
  CHECK(MatchesPattern(buffer, 2));
  int intact = 0;
  for (int i = 0; i < kMessages; ++i) {
    REQUIRE(pair.b->Receive(buffer, &size, kLong).ToString() == "OK");
    if (size == 300000u + 1000u * i && MatchesPattern(std::span(buffer).first(size), 100 + i)) {
      ++intact;
    }
  }
  sender.join();
  for (const Status& status : sent) CHECK(status.ToString() == "OK");
  CHECK(intact == kMessages);
  auto counters = GetRdmaCounters(*pair.b);
  REQUIRE(counters.ok());
  CHECK(counters->credit_updates > 0);
}

TEST_CASE("rdma: registered memory goes zero-copy, other memory through the bounce buffer") {
  RdmaOptions tiny_bounce = TestOptions();
  tiny_bounce.bounce_bytes = 64 << 10;  // forces the bounce buffer to be recycled
  ChannelPair pair = MakeRdmaPair(tiny_bounce, TestOptions());

  constexpr size_t kPage = 4096;
  constexpr size_t kPages = 2048;  // 8 MiB of "guest pages"
  std::vector<uint8_t> registered = Pattern(kPages * kPage, 5);
  std::vector<uint8_t> unregistered = Pattern(kPages * kPage, 6);
  REQUIRE(pair.a->RegisterMemory(registered.data(), registered.size()).ok());

  // Every other page registered, with record headers from the stack between them.
  std::vector<ConstSlice> gather;
  std::vector<uint8_t> expected;
  uint32_t header[2];
  for (size_t page = 0; page < kPages; ++page) {
    const std::vector<uint8_t>& source = page % 2 == 0 ? registered : unregistered;
    gather.push_back({source.data() + page * kPage, kPage});
    expected.insert(expected.end(), source.begin() + page * kPage,
                    source.begin() + (page + 1) * kPage);
  }
  header[0] = 0xfeedbeef;
  header[1] = kPages;
  gather.push_back({header, sizeof(header)});
  const auto* header_bytes = reinterpret_cast<const uint8_t*>(header);
  expected.insert(expected.end(), header_bytes, header_bytes + sizeof(header));

  std::vector<uint8_t> buffer(expected.size());
  for (int round = 0; round < 3; ++round) {
    uint64_t seq = 0;
    Status sent;
    std::jthread sender([&] {
      sent = pair.a->Send(gather, &seq);
      if (sent.ok()) sent = pair.a->WaitForCompletion(seq, kLong);
    });
    size_t size = 0;
    REQUIRE(pair.b->Receive(buffer, &size, kLong).ToString() == "OK");
    sender.join();
    REQUIRE(sent.ToString() == "OK");
    REQUIRE(size == expected.size());
    CHECK(buffer == expected);
  }
  auto counters = GetRdmaCounters(*pair.a);
  REQUIRE(counters.ok());
  CHECK(counters->zero_copy_bytes == 3 * kPages / 2 * kPage);
  CHECK(counters->bounce_bytes == 3 * (kPages / 2 * kPage + sizeof(header)));
  // 4 MiB through a 64 KiB bounce buffer: many requests, one message each round.
  CHECK(counters->work_requests >= 3 * 64);
  CHECK(pair.a->stats().messages_sent == 3);
}

TEST_CASE("rdma: a long stream through small rings and a small bounce buffer stays intact") {
  RdmaOptions small = TestOptions();
  small.ring_bytes = 256 << 10;
  small.bounce_bytes = 64 << 10;
  small.receive_credits = 4;
  small.send_queue_depth = 16;
  ChannelPair pair = MakeRdmaPair(small, small);

  constexpr int kMessages = 600;
  auto size_of = [](int i) -> size_t { return 1 + (static_cast<size_t>(i) * 7919) % (200 << 10); };
  Status send_status;
  std::jthread sender([&] {
    std::vector<uint8_t> message;
    for (int i = 0; i < kMessages && send_status.ok(); ++i) {
      message.resize(size_of(i));
      FillPattern(message, 7000 + i);
      uint64_t seq = 0;
      send_status = SendBytes(*pair.a, message, &seq);
      if (send_status.ok()) send_status = pair.a->WaitForCompletion(seq, kLong);
    }
  });
  std::vector<uint8_t> buffer(200 << 10);
  int intact = 0;
  for (int i = 0; i < kMessages; ++i) {
    size_t size = 0;
    REQUIRE(pair.b->Receive(buffer, &size, kLong).ToString() == "OK");
    if (size == size_of(i) && MatchesPattern(std::span(buffer).first(size), 7000 + i)) {
      ++intact;
    }
  }
  sender.join();
  CHECK(send_status.ToString() == "OK");
  CHECK(intact == kMessages);
}

TEST_CASE("rdma: messages that arrived before the peer closed are still delivered") {
  ChannelPair pair = RdmaPair::Make();
  for (int i = 0; i < 5; ++i) REQUIRE(SendText(*pair.a, "last words " + std::to_string(i)).ok());
  pair.a.reset();  // an orderly close: waits for the acknowledgements, says goodbye
  for (int i = 0; i < 5; ++i) {
    auto [status, text] = ReceiveText(*pair.b);
    CHECK(status.ToString() == "OK");
    CHECK(text == "last words " + std::to_string(i));
  }
  CHECK(ReceiveText(*pair.b, kPrompt).first.code() == Code::kPeerLost);
}

TEST_CASE("rdma: a listener's Abort ends a blocked Accept") {
  std::unique_ptr<Transport> transport = MakeRdmaTransport(TestOptions());
  auto listener = transport->Listen(ListenAddress());
  REQUIRE(listener.ok());
  Status accepted;
  std::jthread accepting([&] { accepted = (*listener)->Accept(30s).status(); });
  std::this_thread::sleep_for(50ms);
  (*listener)->Abort();
  accepting.join();
  CHECK(accepted.code() == Code::kAborted);
}

}  // namespace
}  // namespace lockstep::channel::testing
