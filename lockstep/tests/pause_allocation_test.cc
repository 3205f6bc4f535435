// The hot path allocates nothing: the checkpoint pause (EpochStager::Capture) and the
// streaming of an epoch over real TCP (EpochStreamer::Send), sealed in each link
// protection, are run with every heap allocation of this thread counted — C++'s and
// OpenSSL's.
// GCC pairs the replaced operator delete with malloc'd memory and warns; the pairing is
// intended here (both replaced together).
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"

#include <openssl/crypto.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <cstdlib>
#include <new>
#include <thread>

#include "epoch_stager.h"
#include "lockstep/sealed_channel.h"
#include "replica_common.h"
#include "replication_channel/tcp.h"
#include "simulated_guest.h"

namespace {
thread_local bool g_counting = false;
thread_local uint64_t g_allocations = 0;
}  // namespace

void* operator new(std::size_t n) {
  if (g_counting) ++g_allocations;
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

// OpenSSL allocates with its own functions; they are counted too. They can only be
// replaced before OpenSSL's first allocation, hence at static initialization.
namespace {
void* CountingMalloc(size_t n, const char*, int) {
  if (g_counting) ++g_allocations;
  return std::malloc(n);
}
void* CountingRealloc(void* p, size_t n, const char*, int) {
  if (g_counting) ++g_allocations;
  return std::realloc(p, n);
}
void PlainFree(void* p, const char*, int) { std::free(p); }
const bool g_openssl_counted =
    CRYPTO_set_mem_functions(CountingMalloc, CountingRealloc, PlainFree) == 1;
}  // namespace

using namespace lockstep;
using namespace lockstep::testing;
using namespace std::chrono_literals;

TEST_CASE("neither the pause nor the stream allocates", "[hot-path]") {
  const auto protection = GENERATE(wire::LinkProtection::kNone, wire::LinkProtection::kMac,
                                   wire::LinkProtection::kEncrypt);
  INFO("link protection " << wire::LinkProtectionName(protection));
  REQUIRE(g_openssl_counted);
  GuestConfig cfg;
  cfg.blocks = {{"pc.ram", 4u << 20}, {"pc.bios", 64u << 10}};
  cfg.pages_per_step = 8;
  cfg.step_delay = 20us;
  SimulatedGuest guest(cfg);
  auto blocks = guest.RamBlocks();
  EpochStager stager(blocks, 1 << 20);
  EpochStreamer streamer(blocks, true);

  auto tcp = channel::MakeTcpTransport();
  auto listener = tcp->Listen("127.0.0.1:0");
  REQUIRE(listener.ok());
  std::atomic<bool> done{false};
  std::thread drain([&] {
    auto ch = (*listener)->Accept(5000ms);
    REQUIRE(ch.ok());
    std::vector<uint8_t> buf(channel::kMaxMessageBytes);
    size_t n;
    while (!done.load()) (void)(*ch)->Receive(buf, &n, 10ms);
  });
  auto tcp_ch = tcp->Connect((*listener)->address(), 5000ms);
  REQUIRE(tcp_ch.ok());
  auto ch = SealedChannel::Create(std::move(*tcp_ch), protection, LargestEpochMessage(1 << 20));
  REQUIRE(ch.ok());
  REQUIRE(streamer.Register(**ch, stager).ok());
  LinkKeys keys;
  keys.primary_to_secondary[0] = 1;
  REQUIRE((*ch)->Seal(keys, /*primary=*/true).ok());

  guest.Boot();
  REQUIRE(guest.StartDirtyLog().ok());
  uint64_t pause_allocs = 0, send_allocs = 0, pages = 0;
  for (uint64_t epoch = 1; epoch <= 20; ++epoch) {
    std::this_thread::sleep_for(3ms);
    REQUIRE(guest.StopVcpus().ok());
    g_counting = true;
    Status s = stager.Capture(guest, epoch, epoch == 1);
    guest.CloseOutputBarrier(epoch);
    pause_allocs += g_allocations;
    g_allocations = 0;
    g_counting = false;
    REQUIRE(guest.StartVcpus().ok());
    REQUIRE(s.ok());
    pages += stager.page_count();
    StreamStats stats;
    g_counting = true;
    s = streamer.Send(stager, **ch, &stats);
    send_allocs += g_allocations;
    g_allocations = 0;
    g_counting = false;
    REQUIRE(s.ok());
  }
  done = true;
  drain.join();
  REQUIRE(pages > 1024);  // the full sync plus real dirty pages went through
  REQUIRE(pause_allocs == 0);
  REQUIRE(send_allocs == 0);
}
