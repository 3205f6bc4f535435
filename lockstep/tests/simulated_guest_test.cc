// The simulated guest is the yardstick of the engine's tests: these show its invariant
// holds at every stop and breaks when RAM or device state of two moments are mixed.
#include "simulated_guest.h"

#include <catch2/catch.hpp>
#include <cstring>
#include <thread>
#include <vector>

using namespace lockstep;
using namespace lockstep::testing;

namespace {
GuestConfig Small() {
  GuestConfig c;
  c.blocks = {{"pc.ram", 1u << 20}, {"pc.bios", 64u << 10}};
  c.step_delay = std::chrono::microseconds(20);
  return c;
}
}  // namespace

TEST_CASE("the invariant holds at every stop of a running guest", "[guest]") {
  SimulatedGuest g(Small());
  g.Boot();
  std::string why;
  for (int i = 0; i < 20; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    REQUIRE(g.StopVcpus().ok());
    REQUIRE(g.CheckInvariant(&why));
    REQUIRE(g.StartVcpus().ok());
  }
  REQUIRE(g.steps() > 0);
}

TEST_CASE("mixing two moments breaks the invariant", "[guest]") {
  SimulatedGuest g(Small());
  std::vector<uint8_t> dev(8192);
  g.Boot();
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  REQUIRE(g.StopVcpus().ok());
  auto blocks = g.RamBlocks();
  std::vector<uint8_t> old_ram(blocks[0].host, blocks[0].host + blocks[0].length);
  REQUIRE(*g.SaveDeviceState(dev) > 0);
  const uint64_t first_moment = g.steps();
  REQUIRE(g.StartVcpus().ok());
  // Two moments must differ: on a loaded machine the vCPU thread may not run for a while,
  // so wait for it to step rather than for a fixed time.
  for (int i = 0; i < 5000 && g.steps() < first_moment + 8; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  REQUIRE(g.StopVcpus().ok());
  REQUIRE(g.steps() >= first_moment + 8);
  std::string why;
  SECTION("old device state with new RAM") {
    REQUIRE(g.LoadDeviceState(dev).ok());
    REQUIRE_FALSE(g.CheckInvariant(&why));
  }
  SECTION("half of the old RAM with the new") {
    std::memcpy(blocks[0].host + blocks[0].length / 2, old_ram.data() + blocks[0].length / 2,
                blocks[0].length / 2);
    REQUIRE_FALSE(g.CheckInvariant(&why));
  }
}

TEST_CASE("resuming from saved state continues the same sequence", "[guest]") {
  SimulatedGuest a(Small()), b(Small());
  a.Boot();
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  REQUIRE(a.StopVcpus().ok());
  std::vector<uint8_t> dev(8192);
  size_t n = *a.SaveDeviceState(dev);
  auto ab = a.RamBlocks(), bb = b.RamBlocks();
  for (size_t i = 0; i < ab.size(); ++i) std::memcpy(bb[i].host, ab[i].host, ab[i].length);
  REQUIRE(b.LoadDeviceState({dev.data(), n}).ok());
  REQUIRE(a.ImageHash() == b.ImageHash());
  std::string why;
  REQUIRE(b.CheckInvariant(&why));
  REQUIRE(b.LoadDeviceState({dev.data(), 4}).code() == Status::Code::kInvalidArgument);
}
