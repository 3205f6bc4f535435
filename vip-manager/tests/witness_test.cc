#include "vip_manager/witness.h"

#include <atomic>
#include <catch2/catch.hpp>
#include <thread>
#include <vector>

using lockstep::vip::InProcessWitness;

TEST_CASE("the first request with the current term wins, the other is denied", "[witness]") {
  InProcessWitness w;
  auto term = w.Register("vm1", "hostA");
  REQUIRE(term.ok());
  auto b = w.RequestActive("vm1", "hostB", *term);
  REQUIRE(b.ok());
  REQUIRE(b->granted);
  REQUIRE(b->holder == "hostB");
  auto a = w.RequestActive("vm1", "hostA", *term);
  REQUIRE(a.ok());
  REQUIRE_FALSE(a->granted);
  REQUIRE(a->holder == "hostB");
  REQUIRE(a->term == *term + 1);
}

TEST_CASE("racing candidates: exactly one is granted", "[witness]") {
  for (int round = 0; round < 200; ++round) {
    InProcessWitness w;
    uint64_t term = *w.Register("vm", "p");
    std::atomic<int> granted{0};
    std::thread t1([&] {
      if (w.RequestActive("vm", "p", term)->granted) ++granted;
    });
    std::thread t2([&] {
      if (w.RequestActive("vm", "s", term)->granted) ++granted;
    });
    t1.join();
    t2.join();
    REQUIRE(granted == 1);
  }
}

TEST_CASE("an unreachable witness grants nothing", "[witness]") {
  InProcessWitness w;
  uint64_t term = *w.Register("vm", "p");
  w.SetReachable(false);
  REQUIRE_FALSE(w.RequestActive("vm", "s", term).ok());
  w.SetReachable(true);
  REQUIRE(w.RequestActive("vm", "s", term)->granted);
  REQUIRE(w.requests() == 2);
  auto unknown = w.RequestActive("other", "s", 1);
  REQUIRE_FALSE(unknown.ok());
  REQUIRE(unknown.status().message().find("other") != std::string::npos);
}
