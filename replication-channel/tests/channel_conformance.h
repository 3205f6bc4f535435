// The Channel contract, checked once for every transport.
//
// Included by one test binary per group of transports, after it defines
// LOCKSTEP_CONFORMANCE_PAIRS as the list of pair factories to run every case with (e.g.
// `TcpPair, LoopbackPair`). Each factory's Make() returns a fresh connected pair whose
// `again` makes another connection the same way (over the same listener or ports).
// Catch2 assertions are not thread-safe, so helper threads only record what happened and
// the test thread asserts on it.
#pragma once

#ifndef LOCKSTEP_CONFORMANCE_PAIRS
#error "define LOCKSTEP_CONFORMANCE_PAIRS before including channel_conformance.h"
#endif

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "channel_test_util.h"
#include "common/crc32c.h"

namespace lockstep::channel::testing {
namespace {

using Code = Status::Code;

#define CONFORMANCE_TEST(name) TEMPLATE_TEST_CASE(name, "[conformance]", LOCKSTEP_CONFORMANCE_PAIRS)

CONFORMANCE_TEST("Channel: small messages arrive whole, in order, with increasing seqs") {
  ChannelPair pair = TestType::Make();
  CHECK(!pair.a->transport().empty());
  CHECK(!pair.a->peer().empty());
  CHECK(pair.a->RegisterMemory(&pair, sizeof(pair)).ok());

  constexpr uint64_t kMessages = 20000;
  std::atomic<uint64_t> bad_seqs{0};
  std::atomic<uint64_t> send_failures{0};
  uint64_t payload_bytes = 0;
  for (uint64_t i = 0; i < kMessages; ++i) payload_bytes += 8 + i % 50;

  std::jthread sender([&] {
    std::vector<uint8_t> message;
    for (uint64_t i = 0; i < kMessages; ++i) {
      message.resize(8 + i % 50);
      std::memcpy(message.data(), &i, 8);
      FillPattern(std::span(message).subspan(8), i);
      uint64_t seq = 0;
      // The buffer is reused, so wait for completion as the contract requires.
      if (!SendBytes(*pair.a, message, &seq).ok() || !pair.a->WaitForCompletion(seq, kLong).ok()) {
        ++send_failures;
      }
      if (seq != i + 1) ++bad_seqs;
    }
  });

  uint64_t out_of_order = 0;
  uint64_t corrupt = 0;
  std::vector<uint8_t> buffer(1024);
  for (uint64_t i = 0; i < kMessages; ++i) {
    size_t size = 0;
    Status status = pair.b->Receive(buffer, &size, kLong);
    REQUIRE(status.ToString() == "OK");
    uint64_t index = 0;
    REQUIRE(size >= 8);
    std::memcpy(&index, buffer.data(), 8);
    if (index != i || size != 8 + i % 50) ++out_of_order;
    if (!MatchesPattern(std::span(buffer).subspan(8, size - 8), index)) ++corrupt;
  }
  sender.join();
  CHECK(send_failures == 0);
  CHECK(bad_seqs == 0);
  CHECK(out_of_order == 0);
  CHECK(corrupt == 0);

  CHECK(pair.a->CompletedThrough() == kMessages);
  CHECK(pair.a->WaitForCompletion(kMessages, 1s).ok());
  ChannelStats sent = pair.a->stats();
  ChannelStats received = pair.b->stats();
  CHECK(sent.messages_sent == kMessages);
  CHECK(sent.bytes_sent == payload_bytes);
  CHECK(received.messages_received == kMessages);
  CHECK(received.bytes_received == payload_bytes);
  CHECK(sent.messages_received == 0);

  // And the other way round.
  REQUIRE(SendText(*pair.b, "reply").ok());
  CHECK(ReceiveText(*pair.a).second == "reply");
}

CONFORMANCE_TEST("Channel: a gather list arrives as one intact message") {
  const size_t slice_count = GENERATE(as<size_t>{}, 1, 2, 1023, 1024, 1025, 4097, kMaxGatherSlices);
  CAPTURE(slice_count);
  ChannelPair pair = TestType::Make();

  std::mt19937_64 random(slice_count);
  // Slices point into a source of pages at random offsets: whole aligned 4096-byte pages,
  // small unaligned pieces (record headers), empty slices and odd medium sizes.
  constexpr size_t kSourceBytes = 8 << 20;
  std::vector<uint8_t> source = Pattern(kSourceBytes, 7);
  std::vector<ConstSlice> gather;
  std::vector<uint8_t> expected;
  for (size_t i = 0; i < slice_count; ++i) {
    size_t size = 0;
    size_t offset = 0;
    switch (random() % 4) {
      case 0:
        size = 4096;
        offset = (random() % (kSourceBytes / 4096)) * 4096;
        break;
      case 1:
        size = random() % 64;
        break;
      case 2:
        size = random() % 4;  // often empty
        break;
      default:
        size = 1 + random() % 4096;
        break;
    }
    if (offset == 0) offset = random() % (kSourceBytes - size);
    gather.push_back({source.data() + offset, size});
    expected.insert(expected.end(), source.begin() + offset, source.begin() + offset + size);
  }
  if (expected.empty()) {  // a one-slice list may have drawn an empty slice
    gather.back() = {source.data(), 4096};
    expected.assign(source.begin(), source.begin() + 4096);
  }

  Status send_status;
  std::jthread sender([&] { send_status = pair.a->Send(gather); });
  std::vector<uint8_t> received(expected.size() + 100);
  size_t size = 0;
  Status status = pair.b->Receive(received, &size, kLong);
  sender.join();
  REQUIRE(send_status.ok());
  REQUIRE(status.ToString() == "OK");
  REQUIRE(size == expected.size());
  CHECK(Crc32c(received.data(), size) == Crc32c(expected.data(), expected.size()));
  CHECK(std::memcmp(received.data(), expected.data(), size) == 0);
}

CONFORMANCE_TEST("Channel: large messages arrive whole") {
  ChannelPair pair = TestType::Make();
  // Two 32 MiB messages back to back, then one of the largest size allowed.
  const std::vector<size_t> sizes = {32 << 20, 32 << 20, kMaxMessageBytes};
  std::vector<Status> send_status(sizes.size());
  std::jthread sender([&] {
    for (size_t i = 0; i < sizes.size(); ++i) {
      std::vector<uint8_t> message = Pattern(sizes[i], 100 + i);
      uint64_t seq = 0;
      send_status[i] = SendBytes(*pair.a, message, &seq);
      if (send_status[i].ok()) send_status[i] = pair.a->WaitForCompletion(seq, kLong);
    }
  });
  std::vector<uint8_t> buffer(kMaxMessageBytes);
  for (size_t i = 0; i < sizes.size(); ++i) {
    size_t size = 0;
    REQUIRE(pair.b->Receive(buffer, &size, kLong).ToString() == "OK");
    REQUIRE(size == sizes[i]);
    CHECK(MatchesPattern(std::span(buffer).first(size), 100 + i));
  }
  sender.join();
  for (const Status& status : send_status) CHECK(status.ok());
}

CONFORMANCE_TEST("Channel: a message larger than the receive buffer is refused") {
  ChannelPair pair = TestType::Make();
  std::vector<uint8_t> message = Pattern(1000, 1);
  REQUIRE(SendBytes(*pair.a, message).ok());
  REQUIRE(SendBytes(*pair.a, message).ok());

  // One that exactly fits is fine.
  std::vector<uint8_t> exact(1000);
  size_t size = 0;
  REQUIRE(pair.b->Receive(exact, &size, kLong).ok());
  CHECK(size == 1000);
  CHECK(exact == message);

  std::vector<uint8_t> small(999);
  Status status = pair.b->Receive(small, &size, kLong);
  CHECK(status.code() == Code::kResourceExhausted);
  // The stream cannot skip the message: the channel stays unusable.
  Status next = pair.b->Receive(exact, &size, 100ms);
  CHECK(!next.ok());
  CHECK(next.code() != Code::kTimedOut);
}

CONFORMANCE_TEST("Channel: a Receive timeout leaves the channel usable") {
  ChannelPair pair = TestType::Make();
  auto start = Clock::now();
  auto [status, text] = ReceiveText(*pair.b, 30ms);
  CHECK(status.code() == Code::kTimedOut);
  CHECK(SecondsSince(start) >= 0.02);
  CHECK(SecondsSince(start) < 5);

  CHECK(ReceiveText(*pair.b, 0us).first.code() == Code::kTimedOut);

  REQUIRE(SendText(*pair.a, "after the timeout").ok());
  auto [status2, text2] = ReceiveText(*pair.b);
  CHECK(status2.ok());
  CHECK(text2 == "after the timeout");

  // An "infinite" timeout neither overflows nor expires.
  REQUIRE(SendText(*pair.a, "forever").ok());
  CHECK(ReceiveText(*pair.b, std::chrono::microseconds::max()).second == "forever");
}

CONFORMANCE_TEST("Channel: the peer's loss is reported as kPeerLost") {
  ChannelPair pair = TestType::Make();

  SECTION("when the peer is destroyed") {
    pair.a.reset();
    auto start = Clock::now();
    Status status = ReceiveText(*pair.b, kPrompt + 1s).first;
    CHECK(status.code() == Code::kPeerLost);
    CHECK(SecondsSince(start) < kPrompt.count());
    CHECK(SendText(*pair.b, "anyone?").code() == Code::kPeerLost);
    CHECK(ReceiveText(*pair.b, 10ms).first.code() == Code::kPeerLost);
  }

  SECTION("when the peer aborts") {
    pair.a->Abort();
    pair.a->Abort();  // idempotent
    auto start = Clock::now();
    CHECK(ReceiveText(*pair.b, kPrompt + 1s).first.code() == Code::kPeerLost);
    CHECK(SecondsSince(start) < kPrompt.count());
    CHECK(SendText(*pair.b, "anyone?").code() == Code::kPeerLost);
    // The aborting end reports kAborted, not a peer loss.
    CHECK(SendText(*pair.a, "x").code() == Code::kAborted);
    CHECK(ReceiveText(*pair.a, 10ms).first.code() == Code::kAborted);
  }

  SECTION("to a receiver blocked when the peer goes away") {
    Status status;
    double waited = 0;
    std::jthread receiver([&] {
      auto start = Clock::now();
      status = ReceiveText(*pair.b, 30s).first;
      waited = SecondsSince(start);
    });
    std::this_thread::sleep_for(50ms);
    pair.a.reset();
    receiver.join();
    CHECK(status.code() == Code::kPeerLost);
    CHECK(waited < 10);
  }
}

CONFORMANCE_TEST("Channel: Abort unblocks blocked calls") {
  ChannelPair pair = TestType::Make();

  SECTION("a Receive") {
    Status status;
    double waited = 0;
    std::jthread receiver([&] {
      auto start = Clock::now();
      status = ReceiveText(*pair.b, 30s).first;
      waited = SecondsSince(start);
    });
    std::this_thread::sleep_for(50ms);
    pair.b->Abort();
    receiver.join();
    CHECK(status.code() == Code::kAborted);
    CHECK(waited < 10);
    CHECK(ReceiveText(*pair.a, kPrompt + 1s).first.code() == Code::kPeerLost);
  }

  SECTION("a back-pressured Send") {
    // Nobody receives, so the sender blocks once the transport's buffers are full.
    constexpr int kMaxMessages = 256;
    std::vector<uint8_t> message = Pattern(4 << 20, 3);
    Status status;
    int sent = 0;
    std::jthread sender([&] {
      for (; sent < kMaxMessages; ++sent) {
        status = SendBytes(*pair.a, message);
        if (!status.ok()) break;
      }
    });
    std::this_thread::sleep_for(200ms);
    pair.a->Abort();
    sender.join();
    CHECK(sent < kMaxMessages);
    CHECK(status.code() == Code::kAborted);
  }
}

CONFORMANCE_TEST("Channel: concurrent senders never interleave messages") {
  ChannelPair pair = TestType::Make();
  constexpr uint32_t kSenders = 2;
  constexpr uint32_t kPerSender = 200;

  // Message layout: [sender u32][index u32][body size u32] body. The body is gathered
  // from three slices so that a sender's writes are split.
  struct Header {
    uint32_t sender, index, body_size;
  };
  std::atomic<int> failures{0};
  std::vector<std::jthread> senders;
  for (uint32_t s = 0; s < kSenders; ++s) {
    senders.emplace_back([&, s] {
      std::mt19937 random(s);
      for (uint32_t i = 0; i < kPerSender; ++i) {
        Header header{s, i, static_cast<uint32_t>(1 + random() % (128 << 10))};
        std::vector<uint8_t> body = Pattern(header.body_size, uint64_t{s} << 32 | i);
        size_t third = body.size() / 3;
        ConstSlice gather[] = {{&header, sizeof(header)},
                               {body.data(), third},
                               {body.data() + third, third},
                               {body.data() + 2 * third, body.size() - 2 * third}};
        uint64_t seq = 0;
        if (!pair.a->Send(gather, &seq).ok() || !pair.a->WaitForCompletion(seq, kLong).ok()) {
          ++failures;
        }
      }
    });
  }

  std::vector<uint32_t> next_index(kSenders, 0);
  int bad = 0;
  std::vector<uint8_t> buffer(256 << 10);
  for (uint32_t m = 0; m < kSenders * kPerSender; ++m) {
    size_t size = 0;
    REQUIRE(pair.b->Receive(buffer, &size, kLong).ToString() == "OK");
    REQUIRE(size >= sizeof(Header));
    Header header;
    std::memcpy(&header, buffer.data(), sizeof(header));
    REQUIRE(header.sender < kSenders);
    if (header.index != next_index[header.sender]++) ++bad;
    if (size != sizeof(Header) + header.body_size) {
      ++bad;
      continue;
    }
    if (!MatchesPattern(std::span(buffer).subspan(sizeof(Header), header.body_size),
                        uint64_t{header.sender} << 32 | header.index)) {
      ++bad;
    }
  }
  for (auto& sender : senders) sender.join();
  CHECK(failures == 0);
  CHECK(bad == 0);
  CHECK(pair.a->CompletedThrough() == kSenders * kPerSender);
}

CONFORMANCE_TEST("Channel: LastHeardFrom advances when something arrives") {
  ChannelPair pair = TestType::Make();
  Clock::time_point established = pair.b->LastHeardFrom();
  CHECK(established <= Clock::now());
  CHECK(Clock::now() - established < 10s);  // the connection time, not some epoch

  std::this_thread::sleep_for(5ms);
  CHECK(pair.b->LastHeardFrom() == established);  // nothing arrived yet
  REQUIRE(SendText(*pair.a, "ping").ok());
  REQUIRE(ReceiveText(*pair.b).first.ok());
  Clock::time_point heard = pair.b->LastHeardFrom();
  CHECK(heard > established);
  CHECK(heard <= Clock::now());
  // The sender heard nothing.
  CHECK(pair.a->LastHeardFrom() < heard);
}

CONFORMANCE_TEST("Channel: malformed sends are refused and send nothing") {
  ChannelPair pair = TestType::Make();
  std::vector<uint8_t> megabyte(1 << 20, 0xAB);

  CHECK(pair.a->Send({}).code() == Code::kInvalidArgument);
  ConstSlice empty{megabyte.data(), 0};
  CHECK(pair.a->Send(std::span(&empty, 1)).code() == Code::kInvalidArgument);
  std::vector<ConstSlice> too_many(kMaxGatherSlices + 1, ConstSlice{megabyte.data(), 1});
  CHECK(pair.a->Send(too_many).code() == Code::kInvalidArgument);
  // kMaxMessageBytes + 1 in total.
  std::vector<ConstSlice> too_big(kMaxMessageBytes / megabyte.size(),
                                  ConstSlice{megabyte.data(), megabyte.size()});
  too_big.push_back({megabyte.data(), 1});
  CHECK(pair.a->Send(too_big).code() == Code::kInvalidArgument);
  CHECK(pair.a->CompletedThrough() == 0);

  uint64_t seq = 0;
  std::string_view text = "the first real message";
  REQUIRE(SendBytes(*pair.a, std::span(reinterpret_cast<const uint8_t*>(text.data()), text.size()),
                    &seq)
              .ok());
  CHECK(seq == 1);
  auto [status, received] = ReceiveText(*pair.b);
  CHECK(status.ok());
  CHECK(received == text);
  CHECK(ReceiveText(*pair.b, 50ms).first.code() == Code::kTimedOut);
}

CONFORMANCE_TEST("Channel: a slow receiver back-pressures the sender without loss") {
  ChannelPair pair = TestType::Make();
  constexpr int kMessages = 64;  // of 1 MiB each, gathered from 4096-byte pages
  constexpr size_t kPage = 4096;
  constexpr size_t kMessageBytes = 1 << 20;
  Status send_status;
  std::jthread sender([&] {
    std::vector<uint8_t> message(kMessageBytes);
    std::vector<ConstSlice> pages;
    for (size_t offset = 0; offset < kMessageBytes; offset += kPage) {
      pages.push_back({message.data() + offset, kPage});
    }
    for (int i = 0; i < kMessages && send_status.ok(); ++i) {
      FillPattern(message, 1000 + i);
      uint64_t seq = 0;
      send_status = pair.a->Send(pages, &seq);
      if (send_status.ok()) send_status = pair.a->WaitForCompletion(seq, kLong);
    }
  });
  std::vector<uint8_t> buffer(kMessageBytes);
  int intact = 0;
  for (int i = 0; i < kMessages; ++i) {
    std::this_thread::sleep_for(2ms);
    size_t size = 0;
    REQUIRE(pair.b->Receive(buffer, &size, kLong).ToString() == "OK");
    if (size == kMessageBytes && MatchesPattern(buffer, 1000 + i)) ++intact;
  }
  sender.join();
  CHECK(send_status.ok());
  CHECK(intact == kMessages);
  CHECK(pair.b->stats().bytes_received == uint64_t{kMessages} * kMessageBytes);
}

CONFORMANCE_TEST("Channel: a new connection works after the old one ended") {
  ChannelPair pair = TestType::Make();
  REQUIRE(pair.again);
  REQUIRE(SendText(*pair.a, "first").ok());
  CHECK(ReceiveText(*pair.b).second == "first");
  pair.a.reset();
  CHECK(ReceiveText(*pair.b, kPrompt + 1s).first.code() == Code::kPeerLost);

  // The way a restarted primary reconnects: the old end stays dead, the new one works both
  // ways, and nothing of the old connection leaks into it.
  ChannelPair next = pair.again();
  REQUIRE(SendText(*next.a, "second").ok());
  auto [status, text] = ReceiveText(*next.b);
  CHECK(status.ok());
  CHECK(text == "second");
  REQUIRE(SendText(*next.b, "answer").ok());
  CHECK(ReceiveText(*next.a).second == "answer");
  CHECK(next.a->CompletedThrough() >= 1);
  CHECK(ReceiveText(*pair.b, 10ms).first.code() == Code::kPeerLost);
}

}  // namespace
}  // namespace lockstep::channel::testing
