// Helpers shared by the replication-channel tests.
#pragma once

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "replication_channel/channel.h"
#include "replication_channel/loopback.h"
#include "replication_channel/tcp.h"

namespace lockstep::channel::testing {

using namespace std::chrono_literals;

// A generous bound for anything that should happen "promptly".
inline constexpr std::chrono::seconds kPrompt{2};
// For blocking calls that are expected to succeed.
inline constexpr std::chrono::seconds kLong{20};

// Two connected ends: `a` connected to `b`. `again` makes another pair the same way (over
// the same listener), for reconnection tests.
struct ChannelPair {
  std::unique_ptr<Channel> a;
  std::unique_ptr<Channel> b;
  std::function<ChannelPair()> again;
};

// Connects `transport` to `listener` once: a = the connecting end, b = the accepted one.
// `address` is what the connecting end dials (the listener's address by default).
inline ChannelPair ConnectPair(Transport& transport, Listener& listener,
                               const std::string& address = "") {
  auto a = transport.Connect(address.empty() ? listener.address() : address, 5s);
  REQUIRE(a.status().ToString() == "OK");
  auto b = listener.Accept(5s);
  REQUIRE(b.status().ToString() == "OK");
  return {std::move(*a), std::move(*b), nullptr};
}

// Factories for the conformance suite; each makes one fresh connected pair.
struct TcpPair {
  static ChannelPair Make() {
    std::shared_ptr<Transport> transport = MakeTcpTransport();
    auto listener = transport->Listen("127.0.0.1:0");
    REQUIRE(listener.ok());
    std::shared_ptr<Listener> shared = std::move(*listener);
    std::function<ChannelPair()> again = [transport, shared] {
      return ConnectPair(*transport, *shared);
    };
    ChannelPair pair = again();
    pair.again = again;
    return pair;
  }
};

struct LoopbackPair {
  static ChannelPair Make() {
    std::shared_ptr<LoopbackLink> link = LoopbackLink::Create();
    return {link->TakeA(), link->TakeB(), &LoopbackPair::Make};
  }
};

// Deterministic pseudo-random bytes: the same (seed, length) always gives the same bytes.
inline void FillPattern(std::span<uint8_t> out, uint64_t seed) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull;
  size_t i = 0;
  for (; i + 8 <= out.size(); i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(out.data() + i, &x, 8);
  }
  for (; i < out.size(); ++i) out[i] = static_cast<uint8_t>(x >> (8 * (i % 8)));
}

inline std::vector<uint8_t> Pattern(size_t size, uint64_t seed) {
  std::vector<uint8_t> bytes(size);
  FillPattern(bytes, seed);
  return bytes;
}

inline bool MatchesPattern(std::span<const uint8_t> bytes, uint64_t seed) {
  return std::vector<uint8_t>(bytes.begin(), bytes.end()) == Pattern(bytes.size(), seed);
}

// Sends `bytes` as a one-slice message.
inline Status SendBytes(Channel& channel, std::span<const uint8_t> bytes, uint64_t* seq = nullptr) {
  ConstSlice slice{bytes.data(), bytes.size()};
  return channel.Send(std::span<const ConstSlice>(&slice, 1), seq);
}

inline Status SendText(Channel& channel, std::string_view text) {
  return SendBytes(channel, std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(text.data()),
                                                     text.size()));
}

// Receives one message of at most `capacity` bytes; "" plus the Status on failure.
inline std::pair<Status, std::string> ReceiveText(Channel& channel,
                                                  std::chrono::microseconds timeout = kLong,
                                                  size_t capacity = 1 << 16) {
  std::vector<uint8_t> buffer(capacity);
  size_t size = 0;
  Status status = channel.Receive(buffer, &size, timeout);
  if (!status.ok()) return {status, ""};
  return {status, std::string(reinterpret_cast<const char*>(buffer.data()), size)};
}

inline double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

}  // namespace lockstep::channel::testing
