// One set of checks, every witness: InProcessWitness, the embedded witness (WitnessClient
// asking a WitnessServer over TCP, its state in a temporary directory) and EtcdWitness on a
// real etcd. What one grants, denies or refuses, all do (the rule is witness.h's).
#include <atomic>
#include <catch2/catch.hpp>
#include <memory>
#include <string>
#include <thread>

#include "etcd_server.h"
#include "vip_manager/etcd_witness.h"
#include "vip_manager/witness.h"
#include "vip_manager/witness_service.h"

using lockstep::Status;
using lockstep::testing::EtcdServer;
using lockstep::testing::TemporaryDirectory;
using lockstep::vip::EtcdWitness;
using lockstep::vip::InProcessWitness;
using lockstep::vip::Witness;
using lockstep::vip::WitnessClient;
using lockstep::vip::WitnessDecision;
using lockstep::vip::WitnessServer;

namespace {

// One etcd for every check of this file; each witness on it gets keys of its own.
EtcdServer& SharedEtcd() {
  static EtcdServer etcd;
  return etcd;
}

// A fresh witness of one kind (no VM registered), with whatever it needs kept alive.
class Backend {
 public:
  explicit Backend(const std::string& kind) {
    if (kind == "in-process") {
      witness_ = std::make_unique<InProcessWitness>();
    } else if (kind == "embedded") {
      auto server = WitnessServer::Start("127.0.0.1:0", dir_.path + "/state");
      INFO(server.status().ToString());
      REQUIRE(server.ok());
      server_ = std::move(*server);
      witness_ = std::make_unique<WitnessClient>(server_->address());
    } else {
      REQUIRE(kind == "etcd");
      static int instances = 0;
      witness_ = std::make_unique<EtcdWitness>(std::vector<std::string>{SharedEtcd().endpoint()},
                                               "/conformance/" + std::to_string(++instances) + "/");
    }
  }
  Witness& witness() { return *witness_; }

 private:
  TemporaryDirectory dir_;
  std::unique_ptr<WitnessServer> server_;
  std::unique_ptr<Witness> witness_;
};

uint64_t MustRegister(Witness& w, const std::string& vm, const std::string& holder) {
  auto term = w.Register(vm, holder);
  INFO(term.status().ToString());
  REQUIRE(term.ok());
  return *term;
}

WitnessDecision MustAsk(Witness& w, const std::string& vm, const std::string& candidate,
                        uint64_t expected_term) {
  auto d = w.RequestActive(vm, candidate, expected_term);
  INFO(d.status().ToString());
  REQUIRE(d.ok());
  return *d;
}

}  // namespace

TEST_CASE("conformance: Register counts the terms from 1, per VM, after any decision",
          "[witness-conformance]") {
  const std::string kind = GENERATE(as<std::string>{}, "in-process", "embedded", "etcd");
  INFO("witness: " << kind);
  Backend backend(kind);
  Witness& w = backend.witness();
  CHECK(MustRegister(w, "vm1", "hostA") == 1);
  CHECK(MustRegister(w, "vm1", "hostB") == 2);
  CHECK(MustRegister(w, "vm2", "hostA") == 1);
  CHECK(MustAsk(w, "vm1", "hostA", 2).granted);  // term 3
  CHECK(MustRegister(w, "vm1", "hostB") == 4);
  WitnessDecision d = MustAsk(w, "vm1", "hostA", 3);  // a request of before the Register
  CHECK(!d.granted);
  CHECK(d.term == 4);
  CHECK(d.holder == "hostB");
}

TEST_CASE(
    "conformance: the first request with the current term wins, a late one is told the "
    "holder",
    "[witness-conformance]") {
  const std::string kind = GENERATE(as<std::string>{}, "in-process", "embedded", "etcd");
  INFO("witness: " << kind);
  Backend backend(kind);
  Witness& w = backend.witness();
  uint64_t term = MustRegister(w, "vm1", "hostA");
  WitnessDecision won = MustAsk(w, "vm1", "hostB", term);
  CHECK(won.granted);
  CHECK(won.term == term + 1);
  CHECK(won.holder == "hostB");
  CHECK(won.confirmed);                                     // no window asked for
  WitnessDecision lost = MustAsk(w, "vm1", "hostA", term);  // the same fault, asked later
  CHECK(!lost.granted);
  CHECK(lost.term == term + 1);
  CHECK(lost.holder == "hostB");
}

TEST_CASE("conformance: the holder asking with its own term stays active under a new term",
          "[witness-conformance]") {
  const std::string kind = GENERATE(as<std::string>{}, "in-process", "embedded", "etcd");
  INFO("witness: " << kind);
  Backend backend(kind);
  Witness& w = backend.witness();
  uint64_t term = MustRegister(w, "vm1", "hostA");
  WitnessDecision stay = MustAsk(w, "vm1", "hostA", term);
  CHECK(stay.granted);
  CHECK(stay.term == term + 1);
  CHECK(stay.holder == "hostA");
  WitnessDecision late = MustAsk(w, "vm1", "hostB", term);
  CHECK(!late.granted);
  CHECK(late.holder == "hostA");
}

TEST_CASE("conformance: a granted request asked again is granted again, until the token moves on",
          "[witness-conformance]") {
  const std::string kind = GENERATE(as<std::string>{}, "in-process", "embedded", "etcd");
  INFO("witness: " << kind);
  Backend backend(kind);
  Witness& w = backend.witness();
  uint64_t term = MustRegister(w, "vm1", "hostA");
  REQUIRE(MustAsk(w, "vm1", "hostB", term).granted);
  // Its answer was lost; hostB asks again, the same question.
  WitnessDecision again = MustAsk(w, "vm1", "hostB", term);
  CHECK(again.granted);
  CHECK(again.term == term + 1);
  CHECK(again.holder == "hostB");
  CHECK(!MustAsk(w, "vm1", "hostA", term).granted);  // the other side still loses
  // Once the token moved on, the old question is denied.
  REQUIRE(MustAsk(w, "vm1", "hostA", term + 1).granted);
  WitnessDecision stale = MustAsk(w, "vm1", "hostB", term);
  CHECK(!stale.granted);
  CHECK(stale.term == term + 2);
  CHECK(stale.holder == "hostA");
}

TEST_CASE("conformance: a VM never registered is refused, naming it", "[witness-conformance]") {
  const std::string kind = GENERATE(as<std::string>{}, "in-process", "embedded", "etcd");
  INFO("witness: " << kind);
  Backend backend(kind);
  Witness& w = backend.witness();
  for (uint64_t term : {0, 1}) {
    auto d = w.RequestActive("vm9", "hostA", term);
    REQUIRE(!d.ok());
    CHECK(d.status().code() == Status::Code::kFailedPrecondition);
    CHECK(d.status().message().find("knows no VM named 'vm9'") != std::string::npos);
  }
  for (auto d : {w.Confirm("vm9", "hostA", 1), w.Reclaim("vm9", "hostA", 1)}) {
    REQUIRE(!d.ok());
    CHECK(d.status().code() == Status::Code::kFailedPrecondition);
  }
}

TEST_CASE("conformance: two replicas asking at once, 50 times: exactly one wins each time",
          "[witness-conformance]") {
  const std::string kind = GENERATE(as<std::string>{}, "in-process", "embedded", "etcd");
  INFO("witness: " << kind);
  Backend backend(kind);
  Witness& w = backend.witness();
  for (int round = 0; round < 50; ++round) {
    std::string vm = "race" + std::to_string(round);
    uint64_t term = MustRegister(w, vm, "hostA");
    lockstep::Result<WitnessDecision> a = Status::Aborted("not asked");
    lockstep::Result<WitnessDecision> b = Status::Aborted("not asked");
    std::atomic<bool> go{false};
    std::thread ta([&] {
      while (!go) std::this_thread::yield();
      a = w.RequestActive(vm, "hostA", term);
    });
    std::thread tb([&] {
      while (!go) std::this_thread::yield();
      b = w.RequestActive(vm, "hostB", term);
    });
    go = true;
    ta.join();
    tb.join();
    INFO("round " << round << ": " << a.status().ToString() << " / " << b.status().ToString());
    REQUIRE(a.ok());
    REQUIRE(b.ok());
    REQUIRE(a->granted + b->granted == 1);
    const WitnessDecision& loser = a->granted ? *b : *a;
    REQUIRE(loser.holder == (a->granted ? "hostA" : "hostB"));
    REQUIRE(loser.term == term + 1);
  }
}

TEST_CASE("conformance: a provisional grant is confirmed by its holder only, then kept",
          "[witness-conformance]") {
  const std::string kind = GENERATE(as<std::string>{}, "in-process", "embedded", "etcd");
  INFO("witness: " << kind);
  Backend backend(kind);
  Witness& w = backend.witness();
  uint64_t term = MustRegister(w, "vm1", "hostA");
  auto won = w.RequestActive("vm1", "hostB", term, std::chrono::seconds(60));
  REQUIRE(won.ok());
  CHECK(won->granted);
  CHECK(!won->confirmed);
  CHECK(won->term == term + 1);
  // The loser is told the grant is provisional, and cannot take it while the window is open.
  WitnessDecision lost = MustAsk(w, "vm1", "hostA", term);
  CHECK(!lost.granted);
  CHECK(!lost.confirmed);
  auto early = w.Reclaim("vm1", "hostA", term + 1);
  REQUIRE(early.ok());
  CHECK(!early->granted);
  CHECK(!early->confirmed);
  CHECK(early->term == term + 1);
  // Only the holder confirms, and asking again is answered the same.
  auto other = w.Confirm("vm1", "hostA", term + 1);
  REQUIRE(other.ok());
  CHECK(!other->granted);
  CHECK(other->holder == "hostB");
  for (int i = 0; i < 2; ++i) {
    auto confirmed = w.Confirm("vm1", "hostB", term + 1);
    REQUIRE(confirmed.ok());
    CHECK(confirmed->granted);
    CHECK(confirmed->confirmed);
    CHECK(confirmed->term == term + 1);
  }
  auto late = w.Reclaim("vm1", "hostA", term + 1);
  REQUIRE(late.ok());
  CHECK(!late->granted);
  CHECK(late->confirmed);  // the winner went ahead: the loser gives up
  CHECK(late->holder == "hostB");
  // A confirmation of an old term is refused.
  CHECK(!w.Confirm("vm1", "hostA", term)->granted);
}

TEST_CASE("conformance: a grant whose window lapsed is taken back, its winner then cannot confirm",
          "[witness-conformance]") {
  const std::string kind = GENERATE(as<std::string>{}, "in-process", "embedded", "etcd");
  INFO("witness: " << kind);
  Backend backend(kind);
  Witness& w = backend.witness();
  uint64_t term = MustRegister(w, "vm1", "hostA");
  // etcd rounds the window up to its least lease TTL (about 2 s) and notices an expiry
  // within about half a second more.
  auto won = w.RequestActive("vm1", "hostB", term, std::chrono::milliseconds(100));
  REQUIRE(won.ok());
  REQUIRE(won->granted);
  REQUIRE(!won->confirmed);
  lockstep::Result<WitnessDecision> taken = Status::Aborted("not asked");
  auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  do {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    taken = w.Reclaim("vm1", "hostA", term + 1);
    REQUIRE(taken.ok());
    REQUIRE(taken->term == (taken->granted ? term + 2 : term + 1));
  } while (!taken->granted && std::chrono::steady_clock::now() < give_up);
  REQUIRE(taken->granted);
  CHECK(taken->confirmed);
  CHECK(taken->holder == "hostA");
  // Asked again (its answer lost): granted again, nothing changes.
  auto again = w.Reclaim("vm1", "hostA", term + 1);
  REQUIRE(again.ok());
  CHECK(again->granted);
  CHECK(again->term == term + 2);
  // The first winner's confirmation is refused: it must not go active.
  auto refused = w.Confirm("vm1", "hostB", term + 1);
  REQUIRE(refused.ok());
  CHECK(!refused->granted);
  CHECK(refused->holder == "hostA");
  CHECK(refused->term == term + 2);
  // Nor can it reclaim in turn: the token is confirmed.
  auto back = w.Reclaim("vm1", "hostB", term + 2);
  REQUIRE(back.ok());
  CHECK(!back->granted);
}

TEST_CASE("conformance: a confirmation and a reclaim racing for a lapsed grant: one wins",
          "[witness-conformance]") {
  const std::string kind = GENERATE(as<std::string>{}, "in-process", "embedded");
  INFO("witness: " << kind);  // etcd: the same compare-and-swap, but each round waits seconds
  Backend backend(kind);
  Witness& w = backend.witness();
  for (int round = 0; round < 20; ++round) {
    std::string vm = "lapse" + std::to_string(round);
    uint64_t term = MustRegister(w, vm, "hostA");
    REQUIRE(w.RequestActive(vm, "hostB", term, std::chrono::milliseconds(1))->granted);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    lockstep::Result<WitnessDecision> confirm = Status::Aborted("not asked");
    lockstep::Result<WitnessDecision> reclaim = Status::Aborted("not asked");
    std::atomic<bool> go{false};
    std::thread tb([&] {
      while (!go) std::this_thread::yield();
      confirm = w.Confirm(vm, "hostB", term + 1);
    });
    std::thread ta([&] {
      while (!go) std::this_thread::yield();
      reclaim = w.Reclaim(vm, "hostA", term + 1);
    });
    go = true;
    ta.join();
    tb.join();
    REQUIRE(confirm.ok());
    REQUIRE(reclaim.ok());
    REQUIRE(confirm->granted + reclaim->granted == 1);
  }
}
