// Loopback-specific behaviour: fault injection and the name registry.

#include "replication_channel/loopback.h"

#include <atomic>
#include <catch2/catch.hpp>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "channel_test_util.h"

namespace lockstep::channel::testing {
namespace {

using Code = Status::Code;

struct Link {
  std::shared_ptr<LoopbackLink> link = LoopbackLink::Create();
  std::unique_ptr<Channel> a = link->TakeA();
  std::unique_ptr<Channel> b = link->TakeB();
};

TEST_CASE("loopback: each end can be taken once", "[loopback]") {
  std::shared_ptr<LoopbackLink> link = LoopbackLink::Create();
  std::unique_ptr<Channel> a = link->TakeA();
  REQUIRE(a != nullptr);
  CHECK(link->TakeA() == nullptr);
  CHECK(link->TakeB() != nullptr);
  CHECK(link->TakeB() == nullptr);
  CHECK(a->transport() == "loopback");
}

TEST_CASE("loopback: Cut makes both ends lose the peer at once", "[loopback]") {
  Link l;
  REQUIRE(SendText(*l.a, "queued, never received").ok());
  REQUIRE(SendText(*l.b, "nor this").ok());
  l.link->Cut();
  CHECK(ReceiveText(*l.b, 10ms).first.code() == Code::kPeerLost);
  CHECK(ReceiveText(*l.a, 10ms).first.code() == Code::kPeerLost);
  CHECK(SendText(*l.a, "x").code() == Code::kPeerLost);
  CHECK(SendText(*l.b, "x").code() == Code::kPeerLost);
}

TEST_CASE("loopback: Cut wakes a blocked Receive", "[loopback]") {
  Link l;
  Status status;
  std::jthread receiver([&] { status = ReceiveText(*l.b, 30s).first; });
  std::this_thread::sleep_for(20ms);
  l.link->Cut();
  receiver.join();
  CHECK(status.code() == Code::kPeerLost);
}

TEST_CASE("loopback: Stall drops messages silently and stops LastHeardFrom", "[loopback]") {
  Link l;
  REQUIRE(SendText(*l.a, "before").ok());
  REQUIRE(SendText(*l.a, "queued before the stall").ok());
  REQUIRE(ReceiveText(*l.b).second == "before");
  const Clock::time_point b_heard = l.b->LastHeardFrom();
  const Clock::time_point a_heard = l.a->LastHeardFrom();
  const uint64_t delivered = l.link->BytesDeliveredAtoB();

  l.link->Stall();
  std::this_thread::sleep_for(5ms);
  for (int i = 0; i < 3; ++i) CHECK(SendText(*l.a, "into the void").ok());
  CHECK(SendText(*l.b, "nor back").ok());
  uint64_t seq_after = 0;
  REQUIRE(SendBytes(*l.a, Pattern(10, 1), &seq_after).ok());
  CHECK(seq_after == 6);  // sends still complete and count

  // What was queued before the stall is still there; nothing after it arrives.
  CHECK(ReceiveText(*l.b).second == "queued before the stall");
  CHECK(ReceiveText(*l.b, 50ms).first.code() == Code::kTimedOut);
  CHECK(ReceiveText(*l.a, 50ms).first.code() == Code::kTimedOut);
  CHECK(l.b->LastHeardFrom() == b_heard);
  CHECK(l.a->LastHeardFrom() == a_heard);
  CHECK(l.link->BytesDeliveredAtoB() == delivered);

  l.link->Cut();
  CHECK(ReceiveText(*l.b, 10ms).first.code() == Code::kPeerLost);
}

TEST_CASE("loopback: CutAfterBytes delivers whole messages up to n bytes", "[loopback]") {
  Link l;
  std::vector<uint8_t> hundred = Pattern(100, 4);

  SECTION("n between message boundaries") {
    l.link->CutAfterBytes(250);
    CHECK(SendBytes(*l.a, hundred).ok());
    CHECK(SendBytes(*l.a, hundred).ok());
    CHECK(SendBytes(*l.a, hundred).code() == Code::kPeerLost);  // would cross 250
    CHECK(l.link->BytesDeliveredAtoB() == 200);
  }
  SECTION("n on a message boundary") {
    l.link->CutAfterBytes(200);
    CHECK(SendBytes(*l.a, hundred).ok());
    CHECK(SendBytes(*l.a, hundred).ok());
    CHECK(l.link->BytesDeliveredAtoB() == 200);
    CHECK(SendBytes(*l.a, Pattern(1, 1)).code() == Code::kPeerLost);
  }
  SECTION("n counts from the call") {
    REQUIRE(SendBytes(*l.a, hundred).ok());
    REQUIRE(ReceiveText(*l.b).first.ok());
    l.link->CutAfterBytes(150);
    CHECK(SendBytes(*l.a, hundred).ok());
    CHECK(SendBytes(*l.a, hundred).code() == Code::kPeerLost);
    CHECK(l.link->BytesDeliveredAtoB() == 200);
  }
  SECTION("B to A does not count") {
    l.link->CutAfterBytes(150);
    for (int i = 0; i < 5; ++i) CHECK(SendBytes(*l.b, hundred).ok());
    for (int i = 0; i < 5; ++i) CHECK(ReceiveText(*l.a).first.ok());
    CHECK(SendBytes(*l.a, hundred).ok());
    CHECK(SendBytes(*l.a, hundred).code() == Code::kPeerLost);
    CHECK(ReceiveText(*l.b).first.ok());  // the one delivered before the cut
  }

  // Whatever was delivered is received intact; then the stream ends with kPeerLost.
  std::vector<uint8_t> buffer(1000);
  size_t size = 0;
  Status status;
  while ((status = l.b->Receive(buffer, &size, 1s)).ok()) {
    CHECK(std::vector<uint8_t>(buffer.begin(), buffer.begin() + size) ==
          (size == 100 ? hundred : Pattern(size, 1)));
  }
  CHECK(status.code() == Code::kPeerLost);
  CHECK(SendText(*l.a, "x").code() == Code::kPeerLost);
  CHECK(SendText(*l.b, "x").code() == Code::kPeerLost);
}

TEST_CASE("loopback: CutAfterBytes delivers exactly the longest prefix within n", "[loopback]") {
  const uint64_t seed = GENERATE(1, 2, 3, 4, 5);
  std::mt19937_64 random(seed);
  Link l;
  const uint64_t n = 1 + random() % 20000;
  l.link->CutAfterBytes(n);
  std::vector<size_t> sent_sizes;
  Status status;
  for (uint64_t i = 0; i < 1000; ++i) {
    size_t size = 1 + random() % 1000;
    status = SendBytes(*l.a, Pattern(size, i));
    if (!status.ok()) {
      sent_sizes.push_back(size);  // the crossing one, for the boundary check
      break;
    }
    sent_sizes.push_back(size);
  }
  REQUIRE(status.code() == Code::kPeerLost);

  std::vector<uint8_t> buffer(1000);
  std::vector<size_t> received_sizes;
  size_t size = 0;
  uint64_t index = 0;
  while (l.b->Receive(buffer, &size, 1s).ok()) {
    CHECK(MatchesPattern(std::span(buffer).first(size), index++));
    received_sizes.push_back(size);
  }
  uint64_t received_bytes = std::accumulate(received_sizes.begin(), received_sizes.end(), 0ull);
  CHECK(received_bytes <= n);
  CHECK(received_bytes == l.link->BytesDeliveredAtoB());
  // Everything but the crossing message arrived, and that one would have crossed n.
  REQUIRE(received_sizes.size() + 1 == sent_sizes.size());
  CHECK(received_bytes + sent_sizes.back() > n);
}

TEST_CASE("loopback: a full queue blocks Send until the receiver catches up", "[loopback]") {
  Link l;
  REQUIRE(SendBytes(*l.a, Pattern(8 << 20, 1)).ok());  // fills the queue
  std::atomic<bool> sent{false};
  Status status;
  std::jthread sender([&] {
    status = SendBytes(*l.a, Pattern(1 << 20, 2));
    sent = true;
  });
  std::this_thread::sleep_for(50ms);
  CHECK(!sent);
  std::vector<uint8_t> buffer(8 << 20);
  size_t size = 0;
  REQUIRE(l.b->Receive(buffer, &size, kLong).ok());
  sender.join();
  CHECK(sent);
  CHECK(status.ok());
  REQUIRE(l.b->Receive(buffer, &size, kLong).ok());
  CHECK(size == (1u << 20));
}

TEST_CASE("loopback: the transport connects through named listeners", "[loopback]") {
  std::unique_ptr<Transport> transport = MakeLoopbackTransport();
  CHECK(transport->name() == "loopback");
  auto listener = transport->Listen("registry-test");
  REQUIRE(listener.ok());
  CHECK((*listener)->address() == "registry-test");

  // The registry is per process: another transport object finds the same listener.
  std::unique_ptr<Transport> other = MakeLoopbackTransport();
  auto a = other->Connect("registry-test", 1s);
  REQUIRE(a.ok());
  auto b = (*listener)->Accept(std::chrono::milliseconds::max());
  REQUIRE(b.ok());
  REQUIRE(SendText(**a, "to b").ok());
  REQUIRE(SendText(**b, "to a").ok());
  CHECK(ReceiveText(**b).second == "to b");
  CHECK(ReceiveText(**a).second == "to a");
  CHECK(!(*a)->peer().empty());

  auto duplicate = transport->Listen("registry-test");
  REQUIRE(!duplicate.ok());
  CHECK(duplicate.status().code() == Code::kFailedPrecondition);

  auto unknown = transport->Connect("nobody-here", 1s);
  REQUIRE(!unknown.ok());
  CHECK(unknown.status().code() == Code::kPeerLost);
  CHECK_THAT(unknown.status().message(), Catch::Contains("no loopback listener named nobody-here"));

  CHECK((*listener)->Accept(10ms).status().code() == Code::kTimedOut);
  listener = Status::Aborted("dropped");  // destroys the listener, freeing the name
  CHECK(transport->Connect("registry-test", 1s).status().code() == Code::kPeerLost);
  CHECK(transport->Listen("registry-test").ok());
  CHECK(transport->Listen("").status().code() == Code::kInvalidArgument);
}

TEST_CASE("loopback: Abort wakes Accept", "[loopback]") {
  std::unique_ptr<Transport> transport = MakeLoopbackTransport();
  auto listener = transport->Listen("abort-test");
  REQUIRE(listener.ok());
  Status status;
  std::jthread acceptor([&] { status = (*listener)->Accept(30s).status(); });
  std::this_thread::sleep_for(20ms);
  (*listener)->Abort();
  acceptor.join();
  CHECK(status.code() == Code::kAborted);
  CHECK(transport->Connect("abort-test", 1s).status().code() == Code::kPeerLost);
}

TEST_CASE("loopback: ConnectWithRetry finds a listener that comes up late", "[loopback]") {
  std::unique_ptr<Transport> transport = MakeLoopbackTransport();
  std::unique_ptr<Listener> listener;
  std::jthread starter([&] {
    std::this_thread::sleep_for(30ms);
    auto listening = transport->Listen("late-test");
    if (listening.ok()) listener = std::move(*listening);
  });
  auto channel = ConnectWithRetry(*transport, "late-test", Clock::now() + 10s);
  starter.join();
  REQUIRE(channel.ok());
  REQUIRE(listener != nullptr);
  auto accepted = listener->Accept(1s);
  REQUIRE(accepted.ok());

  auto failed = ConnectWithRetry(*transport, "never-test", Clock::now() + 50ms);
  REQUIRE(!failed.ok());
  CHECK(failed.status().code() == Code::kPeerLost);
  CHECK_THAT(failed.status().message(), Catch::Contains("no loopback listener named never-test"));
}

}  // namespace
}  // namespace lockstep::channel::testing
