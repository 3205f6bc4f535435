// TCP-specific behaviour: addresses, connection set-up, framing on the wire, and peers
// that misbehave at the byte level (played by raw sockets).

#include "replication_channel/tcp.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <string>
#include <thread>
#include <vector>

#include "channel_test_util.h"

namespace lockstep::channel::testing {
namespace {

using Code = Status::Code;

// A raw IPv4 socket connected to "127.0.0.1:PORT"; closed on destruction.
class RawSocket {
 public:
  explicit RawSocket(const std::string& address) {
    size_t colon = address.rfind(':');
    REQUIRE(colon != std::string::npos);
    sockaddr_in sin{};
    sin.sin_family = AF_INET;
    sin.sin_port = htons(static_cast<uint16_t>(std::stoi(address.substr(colon + 1))));
    REQUIRE(inet_pton(AF_INET, address.substr(0, colon).c_str(), &sin.sin_addr) == 1);
    fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(fd_ >= 0);
    REQUIRE(connect(fd_, reinterpret_cast<sockaddr*>(&sin), sizeof(sin)) == 0);
  }
  ~RawSocket() { Close(); }
  RawSocket(const RawSocket&) = delete;
  RawSocket& operator=(const RawSocket&) = delete;

  void Write(const std::vector<uint8_t>& bytes) {
    size_t done = 0;
    while (done < bytes.size()) {
      ssize_t n = send(fd_, bytes.data() + done, bytes.size() - done, MSG_NOSIGNAL);
      REQUIRE(n > 0);
      done += static_cast<size_t>(n);
    }
  }
  std::vector<uint8_t> Read(size_t size) {
    std::vector<uint8_t> bytes(size);
    size_t done = 0;
    while (done < size) {
      ssize_t n = recv(fd_, bytes.data() + done, size - done, 0);
      REQUIRE(n > 0);
      done += static_cast<size_t>(n);
    }
    return bytes;
  }
  uint16_t LocalPort() const {
    sockaddr_in sin{};
    socklen_t len = sizeof(sin);
    REQUIRE(getsockname(fd_, reinterpret_cast<sockaddr*>(&sin), &len) == 0);
    return ntohs(sin.sin_port);
  }
  void Close() {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

std::vector<uint8_t> LittleEndian32(uint32_t value) {
  return {static_cast<uint8_t>(value), static_cast<uint8_t>(value >> 8),
          static_cast<uint8_t>(value >> 16), static_cast<uint8_t>(value >> 24)};
}

std::vector<uint8_t> Concat(std::vector<uint8_t> a, const std::vector<uint8_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// An address on which nobody listens (a port that was free a moment ago).
std::string ClosedAddress(Transport& transport) {
  auto listener = transport.Listen("127.0.0.1:0");
  REQUIRE(listener.ok());
  return (*listener)->address();
}

// A listener plus one channel accepted from a raw socket connected to it.
struct RawPeer {
  std::unique_ptr<Transport> transport = MakeTcpTransport();
  std::unique_ptr<Listener> listener;
  std::unique_ptr<RawSocket> raw;
  std::unique_ptr<Channel> channel;

  RawPeer() {
    auto listening = transport->Listen("127.0.0.1:0");
    REQUIRE(listening.ok());
    listener = std::move(*listening);
    raw = std::make_unique<RawSocket>(listener->address());
    auto accepted = listener->Accept(5s);
    REQUIRE(accepted.ok());
    channel = std::move(*accepted);
  }
};

TEST_CASE("tcp: Listen on port 0 picks a real port", "[tcp]") {
  std::unique_ptr<Transport> transport = MakeTcpTransport();
  CHECK(transport->name() == "tcp");
  auto listener = transport->Listen("127.0.0.1:0");
  REQUIRE(listener.ok());
  std::string address = (*listener)->address();
  REQUIRE(address.rfind("127.0.0.1:", 0) == 0);
  int port = std::stoi(address.substr(std::string("127.0.0.1:").size()));
  CHECK(port > 0);
  CHECK(port <= 65535);

  RawSocket raw(address);
  auto channel = (*listener)->Accept(std::chrono::milliseconds::max());
  REQUIRE(channel.ok());
  CHECK((*channel)->transport() == "tcp");
  CHECK((*channel)->peer() == "127.0.0.1:" + std::to_string(raw.LocalPort()));

  auto connected = transport->Connect(address, 5s);
  REQUIRE(connected.ok());
  CHECK((*connected)->peer() == address);
}

TEST_CASE("tcp: connecting to a closed port names the address", "[tcp]") {
  std::unique_ptr<Transport> transport = MakeTcpTransport();
  std::string address = ClosedAddress(*transport);
  auto channel = transport->Connect(address, 2s);
  REQUIRE(!channel.ok());
  Status status = channel.status();
  CHECK((status.code() == Code::kPeerLost || status.code() == Code::kIoError));
  CHECK_THAT(status.message(), Catch::Contains(address));
  CHECK_THAT(status.message(), Catch::Contains("refused"));
}

TEST_CASE("tcp: malformed addresses are kInvalidArgument", "[tcp]") {
  std::unique_ptr<Transport> transport = MakeTcpTransport();
  const std::string address =
      GENERATE(as<std::string>{}, "", "127.0.0.1", "127.0.0.1:", ":80", "127.0.0.1:abc",
               "127.0.0.1:65536", "127.0.0.1:-1", "127.0.0.1:80x", "localhost:80", "300.1.1.1:80",
               "::1:80", "[::1]80", "[::1:80", "[nonsense]:80", "[]:80");
  CAPTURE(address);
  auto listener = transport->Listen(address);
  REQUIRE(!listener.ok());
  CHECK(listener.status().code() == Code::kInvalidArgument);
  CHECK_THAT(listener.status().message(), Catch::Contains("'" + address + "'"));
  auto channel = transport->Connect(address, 100ms);
  REQUIRE(!channel.ok());
  CHECK(channel.status().code() == Code::kInvalidArgument);
}

TEST_CASE("tcp: port 0 is for listening only", "[tcp]") {
  std::unique_ptr<Transport> transport = MakeTcpTransport();
  auto channel = transport->Connect("127.0.0.1:0", 100ms);
  REQUIRE(!channel.ok());
  CHECK(channel.status().code() == Code::kInvalidArgument);
}

TEST_CASE("tcp: IPv6 addresses in brackets", "[tcp]") {
  std::unique_ptr<Transport> transport = MakeTcpTransport();
  auto listener = transport->Listen("[::1]:0");
  if (!listener.ok()) {
    WARN("no IPv6 loopback here: " << listener.status().ToString());
    CHECK(listener.status().code() != Code::kInvalidArgument);
    return;
  }
  std::string address = (*listener)->address();
  REQUIRE(address.rfind("[::1]:", 0) == 0);
  auto a = transport->Connect(address, 5s);
  REQUIRE(a.ok());
  auto b = (*listener)->Accept(5s);
  REQUIRE(b.ok());
  CHECK((*b)->peer().rfind("[::1]:", 0) == 0);
  REQUIRE(SendText(**a, "over v6").ok());
  CHECK(ReceiveText(**b).second == "over v6");
}

TEST_CASE("tcp: Accept times out, and Abort wakes it", "[tcp]") {
  std::unique_ptr<Transport> transport = MakeTcpTransport();
  auto listener = transport->Listen("127.0.0.1:0");
  REQUIRE(listener.ok());
  CHECK((*listener)->Accept(20ms).status().code() == Code::kTimedOut);

  Status status;
  std::jthread acceptor([&] { status = (*listener)->Accept(30s).status(); });
  std::this_thread::sleep_for(50ms);
  (*listener)->Abort();
  acceptor.join();
  CHECK(status.code() == Code::kAborted);
  CHECK((*listener)->Accept(0ms).status().code() == Code::kAborted);
}

TEST_CASE("tcp: ConnectWithRetry waits for a listener that comes up late", "[tcp]") {
  std::unique_ptr<Transport> transport = MakeTcpTransport();
  std::string address = ClosedAddress(*transport);

  std::unique_ptr<Listener> late_listener;
  Status listen_status = Status::Aborted("not yet");
  std::jthread starter([&] {
    std::this_thread::sleep_for(50ms);
    auto listening = transport->Listen(address);
    listen_status = listening.status();
    if (listening.ok()) late_listener = std::move(*listening);
  });
  auto start = Clock::now();
  auto channel = ConnectWithRetry(*transport, address, Clock::now() + 10s);
  double waited = SecondsSince(start);
  starter.join();
  REQUIRE(listen_status.ok());
  REQUIRE(channel.status().ToString() == "OK");
  CHECK(waited >= 0.04);  // it cannot have connected before the listener existed
  CHECK(waited < 5);

  auto accepted = late_listener->Accept(5s);
  REQUIRE(accepted.ok());
  REQUIRE(SendText(**channel, "made it").ok());
  CHECK(ReceiveText(**accepted).second == "made it");
}

TEST_CASE("tcp: ConnectWithRetry gives up at the deadline", "[tcp]") {
  std::unique_ptr<Transport> transport = MakeTcpTransport();
  std::string address = ClosedAddress(*transport);
  auto start = Clock::now();
  auto channel = ConnectWithRetry(*transport, address, start + 300ms);
  double waited = SecondsSince(start);
  REQUIRE(!channel.ok());
  CHECK((channel.status().code() == Code::kPeerLost || channel.status().code() == Code::kIoError));
  CHECK_THAT(channel.status().message(), Catch::Contains(address));
  CHECK(waited >= 0.3);
  CHECK(waited < 5);
}

TEST_CASE("tcp: ConnectWithRetry does not retry a malformed address", "[tcp]") {
  std::unique_ptr<Transport> transport = MakeTcpTransport();
  auto start = Clock::now();
  auto channel = ConnectWithRetry(*transport, "not an address", start + 10s);
  CHECK(channel.status().code() == Code::kInvalidArgument);
  CHECK(SecondsSince(start) < 5);
}

TEST_CASE("tcp: frames are a little-endian length and the payload", "[tcp]") {
  RawPeer peer;
  REQUIRE(SendText(*peer.channel, "abc").ok());
  CHECK(peer.raw->Read(7) == std::vector<uint8_t>{3, 0, 0, 0, 'a', 'b', 'c'});

  std::vector<uint8_t> big = Pattern(0x010203, 5);
  REQUIRE(SendBytes(*peer.channel, big).ok());
  CHECK(peer.raw->Read(4) == LittleEndian32(0x010203));
  CHECK(peer.raw->Read(big.size()) == big);

  peer.raw->Write(Concat(LittleEndian32(2), {'h', 'i'}));
  CHECK(ReceiveText(*peer.channel).second == "hi");
}

TEST_CASE("tcp: a peer that closes in the middle of a message", "[tcp]") {
  RawPeer peer;
  peer.raw->Write(Concat(LittleEndian32(100), Pattern(10, 1)));
  peer.raw->Close();
  Status status = ReceiveText(*peer.channel, 5s).first;
  CHECK(status.code() == Code::kPeerLost);
  CHECK_THAT(status.message(), Catch::Contains("middle of a message"));
  CHECK(SendText(*peer.channel, "x").code() == Code::kPeerLost);
}

TEST_CASE("tcp: a peer that closes between messages", "[tcp]") {
  RawPeer peer;
  peer.raw->Write(Concat(LittleEndian32(5), {'h', 'e', 'l', 'l', 'o'}));
  peer.raw->Close();
  auto [status, text] = ReceiveText(*peer.channel, 5s);
  CHECK(status.ok());
  CHECK(text == "hello");
  Status closed = ReceiveText(*peer.channel, 5s).first;
  CHECK(closed.code() == Code::kPeerLost);
  CHECK_THAT(closed.message(), Catch::Contains("closed the connection"));
  CHECK_THAT(closed.message(), !Catch::Contains("middle"));
}

TEST_CASE("tcp: a Receive that times out mid-message resumes it", "[tcp]") {
  RawPeer peer;
  std::vector<uint8_t> payload = Pattern(100, 9);
  std::vector<uint8_t> frame = Concat(LittleEndian32(100), payload);
  std::vector<uint8_t> buffer(200);
  size_t size = 0;

  Clock::time_point heard = peer.channel->LastHeardFrom();
  // Half a header...
  peer.raw->Write({frame.begin(), frame.begin() + 2});
  std::this_thread::sleep_for(5ms);
  CHECK(peer.channel->Receive(buffer, &size, 50ms).code() == Code::kTimedOut);
  CHECK(peer.channel->LastHeardFrom() > heard);
  // ...the rest of it and part of the payload...
  peer.raw->Write({frame.begin() + 2, frame.begin() + 44});
  CHECK(peer.channel->Receive(buffer, &size, 50ms).code() == Code::kTimedOut);
  // ...and the rest, with a whole second message behind it.
  peer.raw->Write(
      Concat({frame.begin() + 44, frame.end()}, Concat(LittleEndian32(3), {'e', 'n', 'd'})));
  REQUIRE(peer.channel->Receive(buffer, &size, 5s).ok());
  CHECK(size == 100);
  CHECK(std::vector<uint8_t>(buffer.begin(), buffer.begin() + 100) == payload);
  CHECK(ReceiveText(*peer.channel).second == "end");
  CHECK(peer.channel->stats().messages_received == 2);
}

TEST_CASE("tcp: resuming a partial message into another buffer is refused", "[tcp]") {
  RawPeer peer;
  peer.raw->Write(Concat(LittleEndian32(100), Pattern(10, 1)));
  std::vector<uint8_t> first(200);
  std::vector<uint8_t> second(200);
  size_t size = 0;
  CHECK(peer.channel->Receive(first, &size, 50ms).code() == Code::kTimedOut);
  CHECK(peer.channel->Receive(second, &size, 50ms).code() == Code::kFailedPrecondition);
  CHECK(peer.channel->Receive(first, &size, 50ms).code() == Code::kPeerLost);
}

TEST_CASE("tcp: a zero-length frame is corruption", "[tcp]") {
  RawPeer peer;
  peer.raw->Write(LittleEndian32(0));
  Status status = ReceiveText(*peer.channel, 5s).first;
  CHECK(status.code() == Code::kCorruption);
}

TEST_CASE("tcp: sending to a vanished peer fails without SIGPIPE", "[tcp]") {
  RawPeer peer;
  peer.raw->Close();
  std::vector<uint8_t> message = Pattern(64 << 10, 2);
  Status status;
  // The first sends may still be accepted by the kernel; the reset follows promptly.
  for (int i = 0; i < 1000 && status.ok(); ++i) {
    status = SendBytes(*peer.channel, message);
    if (status.ok()) std::this_thread::sleep_for(1ms);
  }
  CHECK(status.code() == Code::kPeerLost);  // and the process is still alive
}

}  // namespace
}  // namespace lockstep::channel::testing
