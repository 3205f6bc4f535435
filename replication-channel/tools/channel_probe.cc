// lockstep-channel-probe: one end of a replication channel in a process of its own, to test
// and measure a transport between two processes, namespaces or machines.
//
//   lockstep-channel-probe --transport dpdk --listen 'net_memif0,role=server,socket=/tmp/s'
//   lockstep-channel-probe --transport dpdk --connect 'net_memif1,role=client,socket=/tmp/s'
//       --messages 1000 --size 65536 --eal '--no-huge -m 512 --no-pci --no-shconf -l 1'
// (the second command on one line)
//
// The connecting end sends --messages messages of --size bytes (0 messages: until killed),
// message i filled with a pattern seeded by i, then "DONE"; the listening end checks every
// byte and the order, and answers DONE with its verdict. Both print one line:
//   probe: <role> ok messages=N bytes=B seconds=S gbit_s=G
//   probe: <role> failed: <why>
// Exit codes: 0 all intact, 1 a message was wrong or missing, 2 usage, 3 the peer was lost
// (the listening end prints how many intact messages it had by then).
#include <boost/program_options.hpp>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "replication_channel/transports.h"

namespace po = boost::program_options;
using namespace lockstep;
using namespace lockstep::channel;
using std::chrono::milliseconds;

namespace {

constexpr std::string_view kDone = "DONE";

void Fill(std::vector<uint8_t>& bytes, uint64_t seed) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (size_t i = 0; i + 8 <= bytes.size(); i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(bytes.data() + i, &x, 8);
  }
  if (bytes.size() >= 8) std::memcpy(bytes.data(), &seed, 8);
}

int Fail(const std::string& role, const Status& status, int code) {
  std::printf("probe: %s failed: %s\n", role.c_str(), status.ToString().c_str());
  return status.code() == Status::Code::kPeerLost ? 3 : code;
}

void Report(const std::string& role, uint64_t messages, uint64_t bytes,
            std::chrono::steady_clock::time_point start) {
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("probe: %s ok messages=%llu bytes=%llu seconds=%.3f gbit_s=%.3f\n", role.c_str(),
              static_cast<unsigned long long>(messages), static_cast<unsigned long long>(bytes),
              seconds, seconds > 0 ? bytes * 8 / seconds / 1e9 : 0.0);
}

int RunListener(Transport& transport, const std::string& address, milliseconds timeout,
                size_t size) {
  auto listener = transport.Listen(address);
  if (!listener.ok()) return Fail("listen", listener.status(), 1);
  std::printf("probe: listening on %s\n", (*listener)->address().c_str());
  std::fflush(stdout);
  auto channel = (*listener)->Accept(timeout);
  if (!channel.ok()) return Fail("listen", channel.status(), 1);
  std::vector<uint8_t> buffer(std::max<size_t>(size, 64));
  std::vector<uint8_t> expected(size);
  uint64_t messages = 0, bytes = 0;
  auto start = std::chrono::steady_clock::now();
  while (true) {
    size_t got = 0;
    Status status = (*channel)->Receive(buffer, &got, timeout);
    if (!status.ok()) {
      std::printf("probe: listen intact=%llu before the end\n",
                  static_cast<unsigned long long>(messages));
      return Fail("listen", status, 1);
    }
    if (std::string_view(reinterpret_cast<const char*>(buffer.data()), got) == kDone) break;
    Fill(expected, messages);
    if (got != size || std::memcmp(buffer.data(), expected.data(), size) != 0) {
      uint64_t index = 0;
      if (got >= 8) std::memcpy(&index, buffer.data(), 8);
      std::printf("probe: listen failed: message %llu is wrong (%zu bytes, claims index %llu)\n",
                  static_cast<unsigned long long>(messages), got,
                  static_cast<unsigned long long>(index));
      return 1;
    }
    ++messages;
    bytes += got;
  }
  std::string verdict = "OK " + std::to_string(messages);
  ConstSlice slice{verdict.data(), verdict.size()};
  if (Status sent = (*channel)->Send(std::span(&slice, 1)); !sent.ok()) {
    return Fail("listen", sent, 1);
  }
  Report("listen", messages, bytes, start);
  return 0;
}

int RunConnector(Transport& transport, const std::string& address, milliseconds timeout,
                 uint64_t count, size_t size) {
  auto channel = ConnectWithRetry(transport, address, Clock::now() + timeout);
  if (!channel.ok()) return Fail("connect", channel.status(), 1);
  std::vector<uint8_t> message(size);
  auto start = std::chrono::steady_clock::now();
  uint64_t sent = 0;
  for (; count == 0 || sent < count; ++sent) {
    Fill(message, sent);
    ConstSlice slice{message.data(), message.size()};
    if (Status status = (*channel)->Send(std::span(&slice, 1)); !status.ok()) {
      return Fail("connect", status, 1);
    }
  }
  ConstSlice done{kDone.data(), kDone.size()};
  if (Status status = (*channel)->Send(std::span(&done, 1)); !status.ok()) {
    return Fail("connect", status, 1);
  }
  std::vector<uint8_t> reply(64);
  size_t got = 0;
  if (Status status = (*channel)->Receive(reply, &got, timeout); !status.ok()) {
    return Fail("connect", status, 1);
  }
  std::string verdict(reinterpret_cast<const char*>(reply.data()), got);
  if (verdict != "OK " + std::to_string(sent)) {
    std::printf("probe: connect failed: the listener answered '%s' after %llu messages\n",
                verdict.c_str(), static_cast<unsigned long long>(sent));
    return 1;
  }
  Report("connect", sent, sent * size, start);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string transport_name, listen, connect, eal;
  uint64_t messages = 1000;
  size_t size = 65536;
  int timeout_ms = 10000;
  po::options_description options("lockstep-channel-probe options");
  options.add_options()("help,h", "this text")(
      "transport", po::value(&transport_name)->default_value("tcp"),
      std::string(kTransportNames).c_str())("listen", po::value(&listen), "address to listen on")(
      "connect", po::value(&connect), "address to connect to")(
      "messages", po::value(&messages)->default_value(messages), "messages to send (0: endless)")(
      "size", po::value(&size)->default_value(size), "bytes per message (8 or more)")(
      "eal", po::value(&eal), "DPDK EAL arguments (default: the transport's)")(
      "timeout-ms", po::value(&timeout_ms)->default_value(timeout_ms),
      "how long to wait for the peer and for each message");
  po::variables_map vm;
  try {
    po::store(po::parse_command_line(argc, argv, options), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    std::cerr << "lockstep-channel-probe: " << e.what() << "\n" << options;
    return 2;
  }
  if (vm.count("help")) {
    std::cout << options;
    return 0;
  }
  if (listen.empty() == connect.empty() || size < 8 || size > kMaxMessageBytes) {
    std::cerr << "lockstep-channel-probe: give exactly one of --listen and --connect, and a "
                 "--size from 8 to "
              << kMaxMessageBytes << "\n"
              << options;
    return 2;
  }
  TransportOptions transport_options;
  if (!eal.empty()) transport_options.dpdk.eal_args = eal;
  auto transport = MakeTransport(transport_name, transport_options);
  if (!transport.ok()) {
    std::cerr << "lockstep-channel-probe: " << transport.status().message() << "\n";
    return 2;
  }
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  if (!listen.empty()) return RunListener(**transport, listen, milliseconds(timeout_ms), size);
  return RunConnector(**transport, connect, milliseconds(timeout_ms), messages, size);
}
