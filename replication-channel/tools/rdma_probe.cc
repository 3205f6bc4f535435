// rdma_probe: one end of an RDMA channel that exchanges checked pattern messages, to prove
// real traffic between two machines (tests/rdma_guests_test.sh runs it in two guests).
//
//   rdma_probe listen ADDRESS  [options]   accepts one connection, echoes every message
//   rdma_probe connect ADDRESS [options]   sends COUNT messages, checks every echo
// options:
//   --count N            messages (default 100)
//   --sizes A,B,...      message sizes in bytes, used in turn (default 64,4096,65536,1048576)
//   --ring BYTES         receive ring of this end (default 8 MiB)
//   --timeout-seconds S  how long to wait for the peer (default 300)
//
// Even-numbered messages are sent zero-copy from registered memory, odd ones through the
// bounce buffer. Both ends check every byte (a pattern seeded by the message's number).
// Prints one summary line "rdma_probe: <role> ok: ..." and exits 0, or
// "rdma_probe: <role> FAILED: ..." and exits 1.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "replication_channel/rdma.h"

namespace lockstep::channel {
namespace {

struct Flags {
  std::string role;
  std::string address;
  uint64_t count = 100;
  std::vector<size_t> sizes = {64, 4096, 65536, 1 << 20};
  size_t ring = 8 << 20;
  int timeout_seconds = 300;
};

// Pseudo-random bytes determined by (seed, length).
void FillPattern(uint8_t* out, size_t size, uint64_t seed) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull;
  for (size_t i = 0; i < size; ++i) {
    if (i % 8 == 0) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
    }
    out[i] = static_cast<uint8_t>(x >> (8 * (i % 8)));
  }
}

// The index of the first byte of `data` that differs from the pattern; `size` if none.
size_t FirstMismatch(const uint8_t* data, size_t size, uint64_t seed,
                     std::vector<uint8_t>& scratch) {
  FillPattern(scratch.data(), size, seed);
  for (size_t i = 0; i < size; ++i) {
    if (data[i] != scratch[i]) return i;
  }
  return size;
}

bool ParseFlags(int argc, char** argv, Flags* flags) {
  if (argc < 3) return false;
  flags->role = argv[1];
  flags->address = argv[2];
  if (flags->role != "listen" && flags->role != "connect") return false;
  for (int i = 3; i + 1 < argc; i += 2) {
    std::string_view name = argv[i];
    const char* value = argv[i + 1];
    if (name == "--count") {
      flags->count = std::strtoull(value, nullptr, 10);
    } else if (name == "--ring") {
      flags->ring = std::strtoull(value, nullptr, 10);
    } else if (name == "--timeout-seconds") {
      flags->timeout_seconds = std::atoi(value);
    } else if (name == "--sizes") {
      flags->sizes.clear();
      for (const char* p = value; *p != '\0';) {
        char* end = nullptr;
        flags->sizes.push_back(std::strtoull(p, &end, 10));
        p = *end == ',' ? end + 1 : end;
        if (end == p && *p != '\0') return false;
      }
    } else {
      return false;
    }
  }
  if ((argc - 3) % 2 != 0 || flags->count == 0 || flags->sizes.empty()) return false;
  for (size_t size : flags->sizes) {
    if (size == 0 || size > kMaxMessageBytes || size > flags->ring) return false;
  }
  return true;
}

int Failed(const Flags& flags, const std::string& what) {
  std::printf("rdma_probe: %s FAILED: %s\n", flags.role.c_str(), what.c_str());
  std::fflush(stdout);
  return 1;
}

int Run(const Flags& flags) {
  RdmaOptions options;
  options.ring_bytes = flags.ring;
  options.bounce_bytes = 1 << 20;
  std::unique_ptr<Transport> transport = MakeRdmaTransport(options);
  const auto deadline = Clock::now() + std::chrono::seconds(flags.timeout_seconds);

  std::unique_ptr<Listener> listener;
  std::unique_ptr<Channel> channel;
  if (flags.role == "listen") {
    auto listening = transport->Listen(flags.address);
    if (!listening.ok()) return Failed(flags, listening.status().ToString());
    listener = std::move(*listening);
    std::printf("rdma_probe: listening on %s\n", listener->address().c_str());
    std::fflush(stdout);
    auto accepted = listener->Accept(std::chrono::seconds(flags.timeout_seconds));
    if (!accepted.ok()) return Failed(flags, accepted.status().ToString());
    channel = std::move(*accepted);
  } else {
    auto connected = ConnectWithRetry(*transport, flags.address, deadline);
    if (!connected.ok()) return Failed(flags, connected.status().ToString());
    channel = std::move(*connected);
  }
  const auto start = Clock::now();

  size_t largest = 0;
  for (size_t size : flags.sizes) largest = std::max(largest, size);
  std::vector<uint8_t> registered(largest);
  std::vector<uint8_t> unregistered(largest);
  std::vector<uint8_t> received(largest);
  std::vector<uint8_t> scratch(largest);
  if (Status s = channel->RegisterMemory(registered.data(), registered.size()); !s.ok()) {
    return Failed(flags, s.ToString());
  }
  const auto timeout = std::chrono::seconds(flags.timeout_seconds);
  uint64_t bytes = 0;
  double worst_round_trip = 0;

  for (uint64_t i = 0; i < flags.count; ++i) {
    const size_t size = flags.sizes[i % flags.sizes.size()];
    const uint64_t seed = 1000003 * i + size;
    const auto round_start = Clock::now();
    if (flags.role == "connect") {
      std::vector<uint8_t>& source = i % 2 == 0 ? registered : unregistered;
      FillPattern(source.data(), size, seed);
      ConstSlice slice{source.data(), size};
      uint64_t seq = 0;
      if (Status s = channel->Send(std::span(&slice, 1), &seq); !s.ok()) {
        return Failed(flags, "send " + std::to_string(i) + ": " + s.ToString());
      }
      if (Status s = channel->WaitForCompletion(seq, timeout); !s.ok()) {
        return Failed(flags, "completion of " + std::to_string(i) + ": " + s.ToString());
      }
    }
    size_t got = 0;
    if (Status s = channel->Receive(received, &got, timeout); !s.ok()) {
      return Failed(flags, "receive " + std::to_string(i) + ": " + s.ToString());
    }
    if (got != size) {
      return Failed(flags, "message " + std::to_string(i) + " has " + std::to_string(got) +
                               " bytes, expected " + std::to_string(size));
    }
    if (size_t at = FirstMismatch(received.data(), size, seed, scratch); at != size) {
      return Failed(flags, "message " + std::to_string(i) + " of " + std::to_string(size) +
                               " bytes differs at byte " + std::to_string(at));
    }
    if (flags.role == "listen") {
      // Echo it back, from registered memory every other time.
      std::vector<uint8_t>& source = i % 2 == 0 ? registered : unregistered;
      std::memcpy(source.data(), received.data(), size);
      ConstSlice slice{source.data(), size};
      uint64_t seq = 0;
      if (Status s = channel->Send(std::span(&slice, 1), &seq); !s.ok()) {
        return Failed(flags, "echo " + std::to_string(i) + ": " + s.ToString());
      }
      if (Status s = channel->WaitForCompletion(seq, timeout); !s.ok()) {
        return Failed(flags, "completion of echo " + std::to_string(i) + ": " + s.ToString());
      }
    }
    bytes += size;
    worst_round_trip = std::max(worst_round_trip,
                                std::chrono::duration<double>(Clock::now() - round_start).count());
  }

  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  Result<RdmaCounters> counters = GetRdmaCounters(*channel);
  std::printf(
      "rdma_probe: %s ok: %llu messages, %llu bytes each way with %s, %.2f s, %.1f MB/s each "
      "way, slowest round trip %.3f s, zero-copy %llu bytes, bounce %llu bytes, %llu writes, "
      "%llu credit updates\n",
      flags.role.c_str(), static_cast<unsigned long long>(flags.count),
      static_cast<unsigned long long>(bytes), channel->peer().c_str(), seconds,
      seconds > 0 ? bytes / seconds / 1e6 : 0.0, worst_round_trip,
      static_cast<unsigned long long>(counters.ok() ? counters->zero_copy_bytes : 0),
      static_cast<unsigned long long>(counters.ok() ? counters->bounce_bytes : 0),
      static_cast<unsigned long long>(counters.ok() ? counters->work_requests : 0),
      static_cast<unsigned long long>(counters.ok() ? counters->credit_updates : 0));
  std::fflush(stdout);
  return 0;
}

}  // namespace
}  // namespace lockstep::channel

int main(int argc, char** argv) {
  lockstep::channel::Flags flags;
  if (!lockstep::channel::ParseFlags(argc, argv, &flags)) {
    std::fprintf(stderr,
                 "usage: rdma_probe listen|connect HOST:PORT [--count N] [--sizes A,B,...] "
                 "[--ring BYTES] [--timeout-seconds S]\n");
    return 2;
  }
  return lockstep::channel::Run(flags);
}
