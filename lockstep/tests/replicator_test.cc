// The engine end to end in one process: two simulated guests, a loopback link with fault
// injection, an in-process witness. Output commit, atomicity at random kill points,
// failure detection, the witness rule and handshake refusals.
#include "lockstep/replicator.h"

#include <algorithm>
#include <catch2/catch.hpp>
#include <future>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include "lockstep/wire_format.h"
#include "replication_channel/loopback.h"
#include "simulated_guest.h"

using namespace lockstep;
using namespace lockstep::testing;
using namespace std::chrono_literals;
using S = ReplicaState;

namespace {

// One side's connection to a shared witness that can be cut off, lose answers, or ask late.
class WitnessLink final : public vip::Witness {
 public:
  using vip::Witness::RequestActive;
  explicit WitnessLink(vip::InProcessWitness& w) : w_(w) {}
  Result<uint64_t> Register(std::string_view vm, std::string_view holder) override {
    if (!reachable_) return Status::TimedOut("witness unreachable from this host");
    return w_.Register(vm, holder);
  }
  Result<vip::WitnessDecision> RequestActive(std::string_view vm, std::string_view c, uint64_t term,
                                             std::chrono::milliseconds window) override {
    ++requests_;
    std::this_thread::sleep_for(std::chrono::milliseconds(ask_late_ms_.load()));
    if (!reachable_) return Status::TimedOut("witness unreachable from this host");
    auto decision = w_.RequestActive(vm, c, term, window);
    if (lose_answers_ > 0) {
      --lose_answers_;
      return Status::TimedOut("the witness's answer was lost");  // but it was applied
    }
    return decision;
  }
  Result<vip::WitnessDecision> Confirm(std::string_view vm, std::string_view holder,
                                       uint64_t term) override {
    ++confirms_;
    if (!reachable_) return Status::TimedOut("witness unreachable from this host");
    return w_.Confirm(vm, holder, term);
  }
  Result<vip::WitnessDecision> Reclaim(std::string_view vm, std::string_view c,
                                       uint64_t term) override {
    ++reclaims_;
    if (!reachable_) return Status::TimedOut("witness unreachable from this host");
    return w_.Reclaim(vm, c, term);
  }
  std::atomic<bool> reachable_{true};
  std::atomic<int> lose_answers_{0};
  std::atomic<int> ask_late_ms_{0};  // this side asks for the token this much later
  std::atomic<int> requests_{0};
  std::atomic<int> confirms_{0};
  std::atomic<int> reclaims_{0};

 private:
  vip::InProcessWitness& w_;
};

GuestConfig TestGuest() {
  GuestConfig c;
  c.blocks = {{"pc.ram", 2u << 20}, {"vga.vram", 256u << 10}, {"pc.bios", 64u << 10}};
  c.pages_per_step = 2;
  c.output_every = 4;
  c.step_delay = std::chrono::microseconds(100);
  return c;
}

ReplicationOptions Options(const std::string& host) {
  ReplicationOptions o;
  o.vm_id = "vm-test";
  o.host_id = host;
  o.pairing_id[0] = 0x5A;
  o.pairing_key = std::array<uint8_t, 32>{0x6b, 0x65, 0x79};  // both hosts hold it
  o.epoch_interval = 5ms;
  o.heartbeat_interval = 1ms;
  o.peer_loss_threshold = 50ms;
  return o;
}

struct Pair {
  explicit Pair(GuestConfig pcfg = TestGuest(), GuestConfig scfg = TestGuest(),
                ReplicationOptions popt = Options("hostA"),
                ReplicationOptions sopt = Options("hostB"))
      : pg(pcfg), sg(scfg), pw(witness), sw(witness) {
    link = channel::LoopbackLink::Create();
    pg.SetBarrierHook([this](uint64_t epoch, uint64_t hash) {
      std::lock_guard<std::mutex> lock(mu);
      hashes[epoch] = hash;
    });
    pg.SetEmitHook([this](const Packet& p) {
      // Output commit: ReleaseOutput(N) may run only once the secondary acked N, and only
      // packets of epochs <= N may leave by it. Other releases (a switch to pass-through)
      // are checked by the tests against the final state.
      std::lock_guard<std::mutex> lock(mu);
      released.push_back(p);
      if (p.released_by_ack_of != 0) {
        if (p.released_by_ack_of > secondary->acked_epoch() || p.epoch > p.released_by_ack_of) {
          ++early_releases;
        }
      } else if (p.epoch != 0) {  // epoch 0: sent before protection began
        ++released_without_ack;
      }
    });
    sg.SetStartHook([this] {
      std::lock_guard<std::mutex> lock(mu);
      std::string why;
      resume_invariant_ok = sg.CheckInvariant(&why);
      resume_why = why;
      resume_hash = sg.ImageHash();
      resume_step = sg.steps();
    });
    primary = std::make_unique<PrimaryReplicator>(pg, pw, popt);
    secondary = std::make_unique<SecondaryReplica>(sg, sw, sopt);
  }

  ~Pair() {
    primary->Stop();
    secondary->Stop();
    // The guests' vCPU threads outlive the replicators below them: unhook first.
    pg.SetEmitHook(nullptr);
    (void)pg.StopVcpus();
    (void)sg.StopVcpus();
  }

  // Boots the primary guest and starts both replicas; returns both Start() results.
  std::pair<Status, Status> Start() {
    pg.Boot();
    auto sec = std::async(std::launch::async, [this] { return secondary->Start(link->TakeB()); });
    Status p = primary->Start(link->TakeA());
    return {p, sec.get()};
  }

  void StartProtected() {
    auto [p, s] = Start();
    REQUIRE(p.ok());
    REQUIRE(s.ok());
    REQUIRE(primary->WaitForState(S::kProtected, 10s));
    REQUIRE(secondary->WaitForState(S::kProtected, 10s));
  }

  // The primary host "dies": it can no longer reach the witness, so whatever it notices
  // it fences itself (as a dead host would simply say nothing).
  void KillPrimarySide() { pw.reachable_ = false; }

  SimulatedGuest pg, sg;
  vip::InProcessWitness witness;
  WitnessLink pw, sw;
  std::shared_ptr<channel::LoopbackLink> link;
  std::unique_ptr<PrimaryReplicator> primary;
  std::unique_ptr<SecondaryReplica> secondary;

  std::mutex mu;
  std::map<uint64_t, uint64_t> hashes;  // epoch -> primary image at its pause
  std::vector<Packet> released;
  int early_releases = 0;
  int released_without_ack = 0;  // held, then released by a switch to pass-through
  bool resume_invariant_ok = false;
  std::string resume_why;
  uint64_t resume_hash = 0;
  uint64_t resume_step = 0;
};

std::string Log(const std::vector<Transition>& log) {
  std::string s;
  for (const auto& t : log) {
    s += std::string(ReplicaStateName(t.from)) + " -> " + ReplicaStateName(t.to) + ": " + t.reason +
         "\n";
  }
  return s;
}

// Passes everything to `inner`; subclasses change what Send() does.
class ForwardingChannel : public channel::Channel {
 public:
  explicit ForwardingChannel(std::unique_ptr<channel::Channel> inner) : inner_(std::move(inner)) {}
  std::string_view transport() const override { return inner_->transport(); }
  std::string peer() const override { return inner_->peer(); }
  Status RegisterMemory(const void* base, size_t len) override {
    return inner_->RegisterMemory(base, len);
  }
  Status Send(std::span<const channel::ConstSlice> gather, uint64_t* seq) override {
    return inner_->Send(gather, seq);
  }
  uint64_t CompletedThrough() const override { return inner_->CompletedThrough(); }
  Status WaitForCompletion(uint64_t seq, std::chrono::microseconds t) override {
    return inner_->WaitForCompletion(seq, t);
  }
  Status Receive(std::span<uint8_t> into, size_t* size, std::chrono::microseconds t) override {
    return inner_->Receive(into, size, t);
  }
  channel::Clock::time_point LastHeardFrom() const override { return inner_->LastHeardFrom(); }
  void Abort() override { inner_->Abort(); }
  channel::ChannelStats stats() const override { return inner_->stats(); }

 protected:
  std::unique_ptr<channel::Channel> inner_;
};

// Passes messages through, but flips one bit of the `nth` message of at least 1 KiB.
class CorruptingChannel final : public ForwardingChannel {
 public:
  CorruptingChannel(std::unique_ptr<channel::Channel> inner, int nth)
      : ForwardingChannel(std::move(inner)), nth_(nth) {}
  Status Send(std::span<const channel::ConstSlice> gather, uint64_t* seq) override {
    size_t total = 0;
    for (const auto& g : gather) total += g.size;
    if (total < 1024 || --nth_ != 0) return inner_->Send(gather, seq);
    std::vector<uint8_t> copy;
    for (const auto& g : gather) {
      auto* p = static_cast<const uint8_t*>(g.data);
      copy.insert(copy.end(), p, p + g.size);
    }
    copy[copy.size() / 2] ^= 0x10;
    channel::ConstSlice one{copy.data(), copy.size()};
    return inner_->Send({&one, 1}, seq);
  }

 private:
  int nth_;
};

// The secondary's side of the link, turning every ACK after the first `pass` into a
// HEARTBEAT: a secondary that is alive but no longer makes progress.
class AckSwallowingChannel final : public ForwardingChannel {
 public:
  AckSwallowingChannel(std::unique_ptr<channel::Channel> inner, int pass)
      : ForwardingChannel(std::move(inner)), pass_(pass) {}
  Status Send(std::span<const channel::ConstSlice> gather, uint64_t* seq) override {
    const auto* p = static_cast<const uint8_t*>(gather[0].data);
    const bool ack =
        gather[0].size >= 2 && (p[0] | p[1] << 8) == static_cast<int>(wire::RecordType::kAck);
    if (!ack || pass_-- > 0) return inner_->Send(gather, seq);
    uint8_t beat[wire::kControlRecordBytes];
    channel::ConstSlice one{beat, wire::EncodeHeartbeat(0, beat)};
    return inner_->Send({&one, 1}, seq);
  }

 private:
  std::atomic<int> pass_;
};

}  // namespace

TEST_CASE("epochs flow, output is released on ack, and an orderly stop is not a failover",
          "[replicator]") {
  Pair p;
  p.StartProtected();
  std::this_thread::sleep_for(300ms);
  auto st = p.primary->stats();
  INFO(Log(p.primary->transitions()));
  REQUIRE(st.epochs >= 5);
  REQUIRE(st.acked_epoch >= 3);
  REQUIRE(st.raw_pages + st.zero_pages + st.delta_pages > 0);
  REQUIRE(st.delta_pages > 0);  // small writes into known pages become deltas
  REQUIRE(st.pause_p50.count() > 0);
  p.primary->Stop();
  REQUIRE(p.primary->state() == S::kStopped);
  REQUIRE(p.secondary->WaitForState(S::kStopped, 5s));
  INFO(Log(p.secondary->transitions()));
  REQUIRE(p.secondary->fault_reason().find("ended protection") != std::string::npos);
  // The normal path and an orderly stop never touch the witness.
  REQUIRE(p.witness.requests() == 0);
  REQUIRE_FALSE(p.sg.running());
  std::lock_guard<std::mutex> lock(p.mu);
  REQUIRE(p.early_releases == 0);
  REQUIRE(p.released.size() > 10);
}

TEST_CASE("every link protection carries the same epochs to the same replica",
          "[replicator][sealed]") {
  const auto protection = GENERATE(wire::LinkProtection::kNone, wire::LinkProtection::kMac,
                                   wire::LinkProtection::kEncrypt);
  INFO(wire::LinkProtectionName(protection));
  ReplicationOptions popt = Options("hostA"), sopt = Options("hostB");
  popt.link_protection = sopt.link_protection = protection;
  Pair p(TestGuest(), TestGuest(), popt, sopt);
  p.StartProtected();
  while (p.secondary->acked_epoch() < 20) std::this_thread::sleep_for(5ms);
  // The primary's image at the pause of the epoch the secondary holds is what it holds.
  REQUIRE(p.primary->WaitForState(S::kProtected, 1s));
  p.KillPrimarySide();
  p.link->Cut();
  REQUIRE(p.secondary->WaitForState(S::kActive, 10s));
  std::lock_guard<std::mutex> lock(p.mu);
  REQUIRE(p.resume_invariant_ok);
  REQUIRE(p.hashes.count(p.secondary->applied_epoch()) == 1);
  REQUIRE(p.resume_hash == p.hashes[p.secondary->applied_epoch()]);
  REQUIRE(p.early_releases == 0);
}

TEST_CASE("an encrypted epoch ends in one message: a full batch and a large device state",
          "[replicator][sealed]") {
  // Epochs of 1000 fresh raw pages end in one message with all of them, a 300 KiB device
  // state and the commit: the sealing buffer must hold that sum, not the larger part.
  GuestConfig g = TestGuest();
  g.blocks[0].second = 8u << 20;
  g.burst = true;
  g.pages_per_epoch = 1000;
  g.device_state_bytes = 300u << 10;
  g.output_every = 0;
  ReplicationOptions popt = Options("hostA"), sopt = Options("hostB");
  popt.link_protection = sopt.link_protection = wire::LinkProtection::kEncrypt;
  popt.delta_encoding = false;
  popt.epoch_interval = sopt.epoch_interval = 20ms;
  popt.peer_loss_threshold = sopt.peer_loss_threshold = 2s;
  Pair p(g, g, popt, sopt);
  p.StartProtected();
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  while (p.secondary->acked_epoch() < 12 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(10ms);
  }
  INFO(Log(p.primary->transitions()) << Log(p.secondary->transitions()));
  REQUIRE(p.secondary->acked_epoch() >= 12);
  REQUIRE(p.primary->state() == S::kProtected);
  REQUIRE(p.primary->stats().raw_pages >= 10 * 1000);
}

TEST_CASE("a packet is never released before the secondary acknowledged its epoch",
          "[replicator][output-commit]") {
  GuestConfig g = TestGuest();
  g.output_every = 1;  // a packet every step
  Pair p(g, g);
  p.StartProtected();
  std::this_thread::sleep_for(500ms);
  p.primary->Stop();
  std::lock_guard<std::mutex> lock(p.mu);
  REQUIRE(p.early_releases == 0);
  REQUIRE(p.released.size() > 100);
  for (size_t i = 1; i < p.released.size(); ++i) {
    REQUIRE(p.released[i].step > p.released[i - 1].step);  // in order, none twice
  }
}

TEST_CASE("held output ends an epoch early, but no sooner than the spacing",
          "[replicator][output-commit]") {
  // A long interval: without early epochs a second of running makes one or two.
  auto run = [](std::chrono::microseconds spacing, uint32_t output_every) {
    GuestConfig g = TestGuest();
    g.output_every = output_every;
    ReplicationOptions o = Options("hostA");
    o.epoch_interval = 1s;
    o.output_epoch_spacing = spacing;
    auto p = std::make_unique<Pair>(g, g, o);
    p->pg.SetHeldHook([q = p.get()] { q->primary->OutputPending(); });
    p->StartProtected();
    uint64_t before = p->primary->stats().epochs;
    std::this_thread::sleep_for(1s);
    uint64_t epochs = p->primary->stats().epochs - before;
    p->primary->Stop();
    std::lock_guard<std::mutex> lock(p->mu);
    REQUIRE(p->early_releases == 0);  // early epochs release nothing before its ACK
    return epochs;
  };
  // A packet every ~25 ms (250 steps of ~100 us): about one early epoch per packet.
  uint64_t sparse = run(2ms, 250);
  INFO("epochs in 1 s, sparse output: " << sparse);
  CHECK(sparse >= 10);
  // Without early epochs the same guest waits out the interval.
  uint64_t off = run(0us, 250);
  INFO("epochs in 1 s, early epochs off: " << off);
  CHECK(off <= 3);
  // Output at every step: epochs come as fast as the spacing allows, no faster.
  uint64_t chatty = run(50ms, 1);
  INFO("epochs in 1 s, output every step, 50 ms spacing: " << chatty);
  CHECK(chatty >= 10);
  CHECK(chatty <= 22);
}

TEST_CASE("killing the primary at random points: the secondary resumes exactly an acked epoch",
          "[replicator][kill]") {
  std::mt19937_64 rng(Catch::rngSeed() + 17);
  int promoted = 0, failed_in_sync = 0;
  for (int trial = 0; trial < 12; ++trial) {
    Pair p;
    auto [ps, ss] = p.Start();
    REQUIRE(ps.ok());
    REQUIRE(ss.ok());
    // Some kills land in the initial synchronization, most in later epochs.
    std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 150));
    p.KillPrimarySide();
    p.link->CutAfterBytes(rng() % (256u << 10));  // counted from now
    REQUIRE(p.secondary->WaitForFaultHandled(10s));
    REQUIRE(p.primary->WaitForFaultHandled(10s));
    INFO("trial " << trial << "\nsecondary:\n"
                  << Log(p.secondary->transitions()) << "primary:\n"
                  << Log(p.primary->transitions()));
    // Never two actives: the dead primary fenced itself and drops its output.
    REQUIRE(p.primary->state() == S::kFenced);
    REQUIRE(p.pg.output_mode() == OutputMode::kDropped);
    // Halted, not left inside a pause (QEMU would keep its big lock: a hung main loop).
    REQUIRE(p.pg.halted());
    REQUIRE(p.pg.open_pauses() == 0);
    if (p.secondary->state() == S::kFailed) {
      // Cut before the first complete checkpoint: nothing to resume, nothing resumed.
      REQUIRE(p.secondary->applied_epoch() == 0);
      REQUIRE(p.sw.requests_ == 0);
      REQUIRE_FALSE(p.sg.running());
      ++failed_in_sync;
      continue;
    }
    REQUIRE(p.secondary->state() == S::kActive);
    ++promoted;
    const uint64_t epoch = p.secondary->applied_epoch();
    REQUIRE(epoch == p.secondary->acked_epoch());
    REQUIRE(epoch >= p.primary->stats().acked_epoch);
    std::lock_guard<std::mutex> lock(p.mu);
    REQUIRE(p.resume_invariant_ok);
    REQUIRE(p.hashes.count(epoch) == 1);
    REQUIRE(p.resume_hash == p.hashes[epoch]);  // exactly the primary's image at epoch N
    REQUIRE(p.sg.announcements() == 1);
    REQUIRE(p.early_releases == 0);
    REQUIRE(p.released_without_ack == 0);
    // No reply the client saw is rolled back: every released packet's step is covered.
    for (const auto& pkt : p.released) REQUIRE(pkt.step <= p.resume_step);
  }
  INFO("promoted " << promoted << ", died in initial sync " << failed_in_sync);
  REQUIRE(promoted > 0);
}

TEST_CASE("silence is detected within the threshold plus one interval", "[replicator][detector]") {
  Pair p;
  p.StartProtected();
  auto t0 = std::chrono::steady_clock::now();
  p.link->Stall();  // a pulled cable: no reset, just silence
  REQUIRE(p.secondary->WaitForFaultHandled(10s));
  auto detected_after = std::chrono::steady_clock::now() - t0;
  REQUIRE(p.primary->WaitForFaultHandled(10s));
  INFO(Log(p.secondary->transitions()) << Log(p.primary->transitions()));
  // The threshold is 50 ms: never early, and (generous bound for a loaded 2-core box) soon.
  REQUIRE(detected_after >= 45ms);
  REQUIRE(detected_after < 50ms + 1ms + 450ms);
  REQUIRE(Log(p.secondary->transitions()).find("no word from the primary") != std::string::npos);
  REQUIRE(Log(p.primary->transitions()).find("no word from the secondary") != std::string::npos);
  // Both sides asked; exactly one is active.
  int actives = (p.primary->state() == S::kPrimaryAlone) + (p.secondary->state() == S::kActive);
  REQUIRE(actives == 1);
  int fenced = (p.primary->state() == S::kFenced) + (p.secondary->state() == S::kFenced);
  REQUIRE(fenced == 1);
  REQUIRE(p.pw.requests_ + p.sw.requests_ == 2);  // one question each (and one confirmation)
}

TEST_CASE("no promotion without the witness token", "[replicator][witness]") {
  Pair p;
  p.StartProtected();
  std::this_thread::sleep_for(50ms);
  p.KillPrimarySide();
  p.sw.reachable_ = false;  // and the secondary cannot reach the witness either
  p.link->Cut();
  REQUIRE(p.secondary->WaitForFaultHandled(10s));
  INFO(Log(p.secondary->transitions()));
  REQUIRE(p.secondary->state() == S::kFenced);
  REQUIRE(p.secondary->fault_reason().find("could not be asked") != std::string::npos);
  REQUIRE(p.sw.requests_ == 3);  // asked again, in case only the answer was lost
  REQUIRE_FALSE(p.sg.running());
  REQUIRE(p.sg.emitted().empty());
  REQUIRE(p.sg.announcements() == 0);
}

TEST_CASE("a primary that loses its secondary goes on alone and releases what it held",
          "[replicator][witness]") {
  Pair p;
  p.StartProtected();
  std::this_thread::sleep_for(50ms);
  p.sw.reachable_ = false;  // the secondary host dies
  p.link->Cut();
  REQUIRE(p.primary->WaitForFaultHandled(10s));
  INFO(Log(p.primary->transitions()));
  REQUIRE(p.primary->state() == S::kPrimaryAlone);
  REQUIRE(p.primary->fault_reason().find("UNPROTECTED") != std::string::npos);
  REQUIRE(p.pg.output_mode() == OutputMode::kPassThrough);
  REQUIRE(p.pg.held_packets() == 0);
  uint64_t before = p.pg.steps();
  std::this_thread::sleep_for(20ms);
  REQUIRE(p.pg.steps() > before);  // the guest runs on
}

TEST_CASE("a primary lost during the initial synchronization leaves nothing to resume",
          "[replicator]") {
  GuestConfig big = TestGuest();
  big.blocks = {{"pc.ram", 32u << 20}, {"pc.bios", 64u << 10}};
  Pair p(big, big);
  p.link->CutAfterBytes(64u << 10);  // inside epoch 1 (mostly zero pages: 32 bytes each)
  auto [ps, ss] = p.Start();
  REQUIRE(ps.ok());
  REQUIRE(ss.ok());
  REQUIRE(p.secondary->WaitForFaultHandled(10s));
  INFO(Log(p.secondary->transitions()));
  REQUIRE(p.secondary->state() == S::kFailed);
  REQUIRE(p.secondary->fault_reason().find("never completed") != std::string::npos);
  REQUIRE(p.sw.requests_ == 0);
  REQUIRE_FALSE(p.sg.running());
}

TEST_CASE("handshake refusals leave both guests as they were", "[replicator][handshake]") {
  SECTION("different guest configuration") {
    GuestConfig other = TestGuest();
    other.blocks[0].second = 4u << 20;
    Pair p(TestGuest(), other);
    uint32_t before = p.sg.RamHash();
    auto [ps, ss] = p.Start();
    REQUIRE(ps.code() == Status::Code::kPeerRejected);
    REQUIRE(ps.message().find("guest configurations differ") != std::string::npos);
    REQUIRE(ss.message().find("pc.ram 2048 KiB") != std::string::npos);
    REQUIRE(ss.message().find("pc.ram 4096 KiB") != std::string::npos);
    REQUIRE(p.sg.RamHash() == before);
    REQUIRE(p.pg.running());
    REQUIRE(p.pg.output_mode() == OutputMode::kPassThrough);
  }
  SECTION("another pairing") {
    ReplicationOptions sopt = Options("hostB");
    sopt.pairing_id[0] = 0x11;
    Pair p(TestGuest(), TestGuest(), Options("hostA"), sopt);
    auto [ps, ss] = p.Start();
    REQUIRE(ps.code() == Status::Code::kPeerRejected);
    REQUIRE(ps.message().find("pair the hosts again") != std::string::npos);
    REQUIRE_FALSE(ss.ok());
  }
  SECTION("another pairing key: refused on both sides, the key named") {
    ReplicationOptions sopt = Options("hostB");
    (*sopt.pairing_key)[31] ^= 1;
    Pair p(TestGuest(), TestGuest(), Options("hostA"), sopt);
    auto [ps, ss] = p.Start();
    REQUIRE(ps.code() == Status::Code::kPeerRejected);
    REQUIRE(ps.message().find("pairing key") != std::string::npos);
    REQUIRE(ss.code() == Status::Code::kPeerRejected);
    REQUIRE(ss.message().find("pairing-key proof is wrong") != std::string::npos);
    REQUIRE(p.primary->state() == S::kIdle);
    REQUIRE(p.secondary->state() == S::kIdle);
    REQUIRE(p.pg.running());        // the primary's guest goes on, unprotected
    REQUIRE_FALSE(p.sg.running());  // nothing of it reached the secondary's
    REQUIRE(p.witness.requests() == 0);
  }
  SECTION("no pairing key: refused before anything is sent") {
    ReplicationOptions popt = Options("hostA"), sopt = Options("hostB");
    popt.pairing_key.reset();
    sopt.pairing_key.reset();
    Pair p(TestGuest(), TestGuest(), popt, sopt);
    p.pg.Boot();
    Status ps = p.primary->Start(p.link->TakeA());
    Status ss = p.secondary->Start(p.link->TakeB());
    REQUIRE(ps.code() == Status::Code::kFailedPrecondition);
    REQUIRE(ps.message().find("no pairing key") != std::string::npos);
    REQUIRE(ss.code() == Status::Code::kFailedPrecondition);
  }
  SECTION("another link protection: the secondary says what each side is set for") {
    ReplicationOptions sopt = Options("hostB");
    sopt.link_protection = wire::LinkProtection::kEncrypt;
    Pair p(TestGuest(), TestGuest(), Options("hostA"), sopt);
    auto [ps, ss] = p.Start();
    REQUIRE(ps.code() == Status::Code::kPeerRejected);
    REQUIRE(ps.message().find("protects the stream with 'mac'") != std::string::npos);
    REQUIRE(ps.message().find("set for 'aes-gcm'") != std::string::npos);
    REQUIRE_FALSE(ss.ok());
    REQUIRE(p.pg.running());
  }
  SECTION("another VM") {
    ReplicationOptions sopt = Options("hostB");
    sopt.vm_id = "vm-other";
    Pair p(TestGuest(), TestGuest(), Options("hostA"), sopt);
    auto [ps, ss] = p.Start();
    REQUIRE(ps.code() == Status::Code::kPeerRejected);
    REQUIRE(ps.message().find("vm-other") != std::string::npos);
  }
}

TEST_CASE("a failed checkpoint ends protection on purpose, without a takeover", "[replicator]") {
  Pair p;
  p.StartProtected();
  p.pg.FailNextSave();
  REQUIRE(p.primary->WaitForFaultHandled(10s));
  REQUIRE(p.secondary->WaitForFaultHandled(10s));
  INFO(Log(p.primary->transitions()) << Log(p.secondary->transitions()));
  REQUIRE(p.primary->state() == S::kStopped);
  REQUIRE(p.primary->fault_reason().find("injected device-state failure") != std::string::npos);
  REQUIRE(p.secondary->state() == S::kStopped);
  REQUIRE(p.witness.requests() == 0);
  REQUIRE(p.pg.running());
}

TEST_CASE("ending protection during a partition is a fault, not a release", "[replicator][stop]") {
  Pair p;
  p.StartProtected();
  std::this_thread::sleep_for(50ms);
  p.link->Stall();  // the GOODBYE and any GOODBYE_ACK vanish
  p.primary->Stop();
  REQUIRE(p.secondary->WaitForFaultHandled(10s));
  INFO(Log(p.primary->transitions()) << Log(p.secondary->transitions()));
  REQUIRE(p.primary->fault_reason().find("did not acknowledge the end of protection") !=
          std::string::npos);
  // The witness decided: exactly one of them is active, and only it released held output.
  int actives = (p.primary->state() == S::kPrimaryAlone) + (p.secondary->state() == S::kActive);
  REQUIRE(actives == 1);
  if (p.secondary->state() == S::kActive) {
    std::lock_guard<std::mutex> lock(p.mu);
    REQUIRE(p.released_without_ack == 0);
    REQUIRE(p.pg.output_mode() == OutputMode::kDropped);
  }
}

TEST_CASE("a secondary that rejects the stream does not take over from a live primary",
          "[replicator][corruption]") {
  Pair p;
  auto a = std::make_unique<CorruptingChannel>(p.link->TakeA(), 3);
  p.pg.Boot();
  auto sec = std::async(std::launch::async, [&] { return p.secondary->Start(p.link->TakeB()); });
  REQUIRE(p.primary->Start(std::move(a)).ok());
  REQUIRE(sec.get().ok());
  REQUIRE(p.secondary->WaitForFaultHandled(10s));
  REQUIRE(p.primary->WaitForFaultHandled(10s));
  INFO(Log(p.secondary->transitions()) << Log(p.primary->transitions()));
  REQUIRE(p.secondary->state() == S::kFailed);
  REQUIRE(p.secondary->fault_reason().find("rejected the primary's stream") != std::string::npos);
  // Caught by the link's MAC (the default), before any CRC is looked at.
  REQUIRE(p.secondary->fault_reason().find("failed authentication") != std::string::npos);
  REQUIRE(p.sw.requests_ == 0);
  REQUIRE_FALSE(p.sg.running());
  REQUIRE(p.primary->state() == S::kPrimaryAlone);
  REQUIRE(p.primary->fault_reason().find("the secondary reported") != std::string::npos);
}

TEST_CASE("the takeover steps run in order, and a failed fence means no takeover",
          "[replicator][fence]") {
  ReplicationOptions sopt = Options("hostB"), popt = Options("hostA");
  std::mutex steps_mu;
  std::vector<std::string> steps;  // GUARDED_BY(steps_mu)
  auto note = [&](std::string s) {
    std::lock_guard<std::mutex> lock(steps_mu);
    steps.push_back(std::move(s));
  };
  bool fence_ok = true;
  SECTION("the fence succeeds") { fence_ok = true; }
  SECTION("the fence fails") { fence_ok = false; }
  sopt.fence_peer = [&](const std::string& peer) {
    note("fence " + peer);
    return fence_ok ? Status::Ok() : Status::FailedPrecondition("exit status 1");
  };
  sopt.claim_identity = [&] {
    note("identity");
    return Status::Ok();
  };
  popt.release_identity = [&] { note("primary released"); };
  Pair p(TestGuest(), TestGuest(), popt, sopt);
  p.sg.SetStartHook([&] { note("vcpus"); });
  p.StartProtected();
  std::this_thread::sleep_for(50ms);
  p.KillPrimarySide();
  p.link->Cut();
  REQUIRE(p.secondary->WaitForFaultHandled(10s));
  REQUIRE(p.primary->WaitForFaultHandled(10s));
  INFO(Log(p.secondary->transitions()));
  std::lock_guard<std::mutex> lock(steps_mu);
  // The primary could not reach the witness: fenced, and it gave the identity up.
  REQUIRE(p.primary->state() == S::kFenced);
  if (fence_ok) {
    REQUIRE(p.secondary->state() == S::kActive);
    // The primary's side runs on its own clock; the secondary's steps are ordered.
    std::vector<std::string> secondary_steps;
    for (const auto& s : steps)
      if (s != "primary released") secondary_steps.push_back(s);
    REQUIRE(secondary_steps == std::vector<std::string>{"fence hostA", "identity", "vcpus"});
    REQUIRE(std::count(steps.begin(), steps.end(), "primary released") >= 1);
    std::string r = p.secondary->transitions().back().reason;
    for (const char* step : {"witness ", "device state ", "fence ", "identity ", "vcpus "})
      REQUIRE(r.find(step) != std::string::npos);
  } else {
    REQUIRE(p.secondary->state() == S::kFailed);
    REQUIRE(p.secondary->fault_reason().find("fencing hostA failed") != std::string::npos);
    REQUIRE_FALSE(p.sg.running());
    REQUIRE(p.sg.emitted().empty());
    REQUIRE(std::find(steps.begin(), steps.end(), "vcpus") == steps.end());
  }
}

TEST_CASE("a witness answer lost on the way is asked again and honoured", "[replicator][witness]") {
  Pair p;
  p.StartProtected();
  std::this_thread::sleep_for(50ms);
  p.KillPrimarySide();
  p.sw.lose_answers_ = 1;  // the grant is applied, its answer never arrives
  p.link->Cut();
  REQUIRE(p.secondary->WaitForFaultHandled(10s));
  INFO(Log(p.secondary->transitions()));
  REQUIRE(p.secondary->state() == S::kActive);  // the retry rule: the same grant again
  REQUIRE(p.sw.requests_ == 2);
  REQUIRE(p.sg.running());
}

TEST_CASE("a primary that cannot prove the pairing key gets nothing from the secondary",
          "[replicator][handshake]") {
  // A forged primary: a well-formed HELLO, then an AUTH with a proof made without the key.
  Pair p;
  auto sec = std::async(std::launch::async, [&] { return p.secondary->Start(p.link->TakeB()); });
  auto ch = p.link->TakeA();
  wire::Hello hello;
  hello.pairing_id = Options("hostA").pairing_id;
  hello.witness_term = 1;
  hello.vm_id = "vm-test";
  hello.host_id = "forger";
  for (const auto& b : p.pg.RamBlocks()) hello.blocks.push_back({b.id, b.length});
  hello.nonce[0] = 1;
  auto rec = wire::EncodeHello(hello);
  channel::ConstSlice slice{rec.data(), rec.size()};
  REQUIRE(ch->Send({&slice, 1}).ok());
  std::vector<uint8_t> buf(1 << 16);
  size_t n = 0;
  REQUIRE(ch->Receive(buf, &n, 10s).ok());
  wire::RecordReader reader({buf.data(), n});
  wire::RecordView view;
  REQUIRE(reader.Next(&view).ok());
  wire::HelloReply reply;
  REQUIRE(wire::DecodeHelloReply(view, &reply).ok());
  REQUIRE(reply.accepted);  // the secondary proved itself first; the key never crossed
  wire::Proof guess{};
  guess[0] = 0x42;
  auto auth = wire::EncodeAuth(guess);
  channel::ConstSlice auth_slice{auth.data(), auth.size()};
  REQUIRE(ch->Send({&auth_slice, 1}).ok());
  Status ss = sec.get();
  INFO(ss.ToString());
  REQUIRE(ss.code() == Status::Code::kPeerRejected);
  REQUIRE(ss.message().find("forger did not prove it holds this host's pairing key") !=
          std::string::npos);
  REQUIRE(p.secondary->state() == S::kIdle);
  REQUIRE_FALSE(p.sg.running());
}

TEST_CASE("a primary gives the VIP up while the witness decides, and takes it back if kept",
          "[replicator][witness]") {
  ReplicationOptions popt = Options("hostA");
  std::mutex mu;
  std::vector<std::string> calls;  // GUARDED_BY(mu)
  popt.release_identity = [&] {
    std::lock_guard<std::mutex> lock(mu);
    calls.push_back("release");
  };
  popt.claim_identity = [&] {
    std::lock_guard<std::mutex> lock(mu);
    calls.push_back("claim");
    return Status::Ok();
  };
  Pair p(TestGuest(), TestGuest(), popt, Options("hostB"));
  p.StartProtected();
  std::this_thread::sleep_for(50ms);
  p.sw.reachable_ = false;  // the secondary host dies
  p.link->Cut();
  REQUIRE(p.primary->WaitForFaultHandled(10s));
  REQUIRE(p.primary->state() == S::kPrimaryAlone);
  std::lock_guard<std::mutex> lock(mu);
  REQUIRE(calls == std::vector<std::string>{"release", "claim"});
}

// The grant window (witness.h): a partition of the replication link only, both hosts
// alive; the primary asks the witness late, so the secondary wins provisionally.
struct PartitionedPair {
  explicit PartitionedPair(std::function<Status(const std::string&)> fence,
                           std::chrono::milliseconds window) {
    ReplicationOptions popt = Options("hostA"), sopt = Options("hostB");
    popt.grant_window = sopt.grant_window = window;
    sopt.fence_peer = std::move(fence);
    pair = std::make_unique<Pair>(TestGuest(), TestGuest(), popt, sopt);
    pair->StartProtected();
    registered_term = pair->witness.Snapshot().at(0).term;
    std::this_thread::sleep_for(50ms);
    pair->pw.ask_late_ms_ = 200;  // after the secondary noticed the silence (50 ms)
    pair->link->Cut();
    REQUIRE(pair->secondary->WaitForFaultHandled(20s));
    REQUIRE(pair->primary->WaitForFaultHandled(20s));
  }
  vip::TokenRecord Token() const { return pair->witness.Snapshot().at(0); }
  std::unique_ptr<Pair> pair;
  uint64_t registered_term = 0;
};

TEST_CASE("a secondary that wins but cannot fence: the live primary takes the token back",
          "[replicator][witness][grant-window]") {
  PartitionedPair pp([](const std::string&) { return Status::FailedPrecondition("exit 1"); },
                     300ms);
  Pair& p = *pp.pair;
  INFO(Log(p.primary->transitions()) << Log(p.secondary->transitions()));
  REQUIRE(p.secondary->state() == S::kFailed);
  REQUIRE(p.secondary->fault_reason().find("the primary may take it back") != std::string::npos);
  REQUIRE_FALSE(p.sg.running());
  REQUIRE(p.sg.emitted().empty());
  REQUIRE(p.primary->state() == S::kPrimaryAlone);
  REQUIRE(p.primary->fault_reason().find("hostB won the token but never confirmed it") !=
          std::string::npos);
  REQUIRE(p.pg.output_mode() == OutputMode::kPassThrough);
  vip::TokenRecord t = pp.Token();
  REQUIRE(t.holder == "hostA");
  REQUIRE(t.term == pp.registered_term + 2);  // granted to hostB, then taken back
  REQUIRE(t.confirmed);
  REQUIRE(p.sw.confirms_ == 0);
  REQUIRE(p.pw.reclaims_ >= 1);
}

TEST_CASE("a winner that confirms keeps the token, and the loser stops waiting at once",
          "[replicator][witness][grant-window]") {
  // A long window: the primary learns of the confirmation by asking, not by the window.
  PartitionedPair pp([](const std::string&) { return Status::Ok(); }, 30s);
  Pair& p = *pp.pair;
  INFO(Log(p.primary->transitions()) << Log(p.secondary->transitions()));
  REQUIRE(p.secondary->state() == S::kActive);
  REQUIRE(p.secondary->fault_reason().find("confirm ") != std::string::npos);  // timeline step
  REQUIRE(p.primary->state() == S::kFenced);
  REQUIRE(p.primary->fault_reason().find("the witness gave the token to hostB") !=
          std::string::npos);
  REQUIRE(p.pg.output_mode() == OutputMode::kDropped);
  vip::TokenRecord t = pp.Token();
  REQUIRE(t.holder == "hostB");
  REQUIRE(t.term == pp.registered_term + 1);
  REQUIRE(t.confirmed);
  REQUIRE(p.sw.confirms_ == 1);
}

TEST_CASE("a winner still fencing when its window lapsed does not go active",
          "[replicator][witness][grant-window]") {
  // The fence outlasts the window: the primary takes the token back meanwhile, and the
  // secondary's confirmation is refused. Exactly one replica goes on.
  PartitionedPair pp(
      [](const std::string&) {
        std::this_thread::sleep_for(1500ms);
        return Status::Ok();
      },
      200ms);
  Pair& p = *pp.pair;
  INFO(Log(p.primary->transitions()) << Log(p.secondary->transitions()));
  REQUIRE(p.primary->state() == S::kPrimaryAlone);
  REQUIRE(p.secondary->state() == S::kFenced);
  REQUIRE(p.secondary->fault_reason().find("did not confirm it within its window, and hostA "
                                           "took it back") != std::string::npos);
  REQUIRE_FALSE(p.sg.running());
  REQUIRE(p.sg.emitted().empty());
  REQUIRE(pp.Token().holder == "hostA");
}

TEST_CASE("a secondary alive but no longer acknowledging is a fault, not a hang",
          "[replicator][detector]") {
  ReplicationOptions popt = Options("hostA"), sopt = Options("hostB");
  popt.ack_timeout = 200ms;
  // The channel below stands for the secondary's own software going wrong, so it must sit
  // inside the link protection (which would otherwise refuse its made-up heartbeats).
  popt.link_protection = sopt.link_protection = wire::LinkProtection::kNone;
  Pair p(TestGuest(), TestGuest(), popt, sopt);
  p.pg.Boot();
  auto sec = std::async(std::launch::async, [&] {
    return p.secondary->Start(std::make_unique<AckSwallowingChannel>(p.link->TakeB(), 3));
  });
  REQUIRE(p.primary->Start(p.link->TakeA()).ok());
  REQUIRE(sec.get().ok());
  REQUIRE(p.primary->WaitForState(S::kProtected, 10s));
  // Its heartbeats go on, so no silence is ever seen; the missing ACKs are the fault.
  REQUIRE(p.primary->WaitForFaultHandled(10s));
  REQUIRE(p.secondary->WaitForFaultHandled(10s));
  INFO(Log(p.primary->transitions()) << Log(p.secondary->transitions()));
  REQUIRE(p.primary->fault_reason().find("not making progress") != std::string::npos);
  // Then the usual rule: the primary closed the link, both asked, exactly one goes on.
  // (This secondary did apply the epochs it did not acknowledge, so it may win: the
  // primary released nothing of them, and resuming from the last one contradicts nothing.)
  const bool primary_on = p.primary->state() == S::kPrimaryAlone;
  const bool secondary_on = p.secondary->state() == S::kActive;
  REQUIRE(primary_on != secondary_on);
  REQUIRE(p.sg.running() == secondary_on);
  REQUIRE(p.early_releases == 0);
}

namespace {

// Records the page count of epoch 1's EPOCH_BEGIN as the primary sends it (link protection
// none: the records go by in the clear).
class BeginWatchingChannel final : public ForwardingChannel {
 public:
  BeginWatchingChannel(std::unique_ptr<channel::Channel> inner, std::atomic<int64_t>* pages)
      : ForwardingChannel(std::move(inner)), pages_(pages) {}
  Status Send(std::span<const channel::ConstSlice> gather, uint64_t* seq) override {
    if (gather.size() >= 2 && gather[0].size == wire::kHeaderBytes) {
      const auto* h = static_cast<const uint8_t*>(gather[0].data);
      if (wire::GetU16(h) == static_cast<uint16_t>(wire::RecordType::kEpochBegin) &&
          wire::GetU64(h + 8) == 1) {
        pages_->store(
            static_cast<int64_t>(wire::GetU64(static_cast<const uint8_t*>(gather[1].data))));
      }
    }
    return inner_->Send(gather, seq);
  }

 private:
  std::atomic<int64_t>* pages_;
};

uint64_t TotalPages(SimulatedGuest& g) {
  uint64_t n = 0;
  for (const auto& b : g.RamBlocks()) n += b.length / wire::kPageSize;
  return n;
}

}  // namespace

TEST_CASE("the initial synchronization copies RAM while the guest runs, epoch 1 takes the rest",
          "[replicator][precopy]") {
  const int rounds = GENERATE(0, 30);
  INFO("precopy_max_rounds " << rounds);
  ReplicationOptions popt = Options("hostA"), sopt = Options("hostB");
  popt.link_protection = sopt.link_protection = wire::LinkProtection::kNone;
  popt.precopy_max_rounds = rounds;
  Pair p(TestGuest(), TestGuest(), popt, sopt);
  std::atomic<int64_t> epoch1_pages{-1};
  p.pg.Boot();
  auto sec = std::async(std::launch::async, [&] { return p.secondary->Start(p.link->TakeB()); });
  REQUIRE(p.primary->Start(std::make_unique<BeginWatchingChannel>(p.link->TakeA(), &epoch1_pages))
              .ok());
  REQUIRE(sec.get().ok());
  REQUIRE(p.primary->WaitForState(S::kProtected, 10s));
  while (p.secondary->acked_epoch() < 10) std::this_thread::sleep_for(2ms);
  const auto st = p.primary->stats();
  const uint64_t total = TotalPages(p.pg);
  if (rounds == 0) {
    REQUIRE(st.sync_rounds == 0);
    REQUIRE(epoch1_pages.load() == static_cast<int64_t>(total));  // stop-and-copy
  } else {
    // The guest dirties a few pages per step: the rounds converge, and epoch 1's pause
    // copies only what the last round left dirty.
    REQUIRE(st.sync_rounds >= 2);
    REQUIRE(epoch1_pages.load() >= 0);
    REQUIRE(epoch1_pages.load() < static_cast<int64_t>(total / 4));
  }
  REQUIRE(p.secondary->stats().sync_rounds == st.sync_rounds);
  // The copy built from the rounds is exact: a takeover resumes the primary's image.
  p.KillPrimarySide();
  p.link->Cut();
  REQUIRE(p.secondary->WaitForState(S::kActive, 10s));
  std::lock_guard<std::mutex> lock(p.mu);
  REQUIRE(p.resume_invariant_ok);
  REQUIRE(p.resume_hash == p.hashes[p.secondary->applied_epoch()]);
  REQUIRE(p.early_releases == 0);
}

TEST_CASE("a planned handover loses no output: the secondary goes on from the last epoch",
          "[replicator][handover]") {
  Pair p;
  std::mutex out_mu;
  std::vector<Packet> secondary_out;
  p.sg.SetEmitHook([&](const Packet& pkt) {
    std::lock_guard<std::mutex> lock(out_mu);
    secondary_out.push_back(pkt);
  });
  REQUIRE(p.primary->RequestHandover().code() == Status::Code::kFailedPrecondition);  // idle
  p.StartProtected();
  while (p.secondary->acked_epoch() < 10) std::this_thread::sleep_for(2ms);
  REQUIRE(p.primary->RequestHandover().ok());
  REQUIRE_FALSE(p.primary->RequestHandover().ok());  // under way, or already done
  REQUIRE(p.primary->WaitForState(S::kHandedOver, 10s));
  REQUIRE(p.secondary->WaitForState(S::kActive, 10s));
  INFO("primary:\n"
       << Log(p.primary->transitions()) << "secondary:\n"
       << Log(p.secondary->transitions()));
  REQUIRE(p.secondary->fault_reason().find("planned handover") != std::string::npos);
  // The old primary is stopped for good, outside any pause, and says nothing more.
  REQUIRE(p.pg.halted());
  REQUIRE(p.pg.open_pauses() == 0);
  REQUIRE(p.pg.output_mode() == OutputMode::kDropped);
  // Only the secondary asked the witness, and confirmed before it started the guest.
  REQUIRE(p.pw.requests_ == 0);
  REQUIRE(p.sw.requests_ == 1);
  REQUIRE(p.sw.confirms_ == 1);
  for (int i = 0; i < 1000; ++i) {  // the resumed guest's first packet, within 5 s
    {
      std::lock_guard<std::mutex> lock(out_mu);
      if (!secondary_out.empty()) break;
    }
    std::this_thread::sleep_for(5ms);
  }
  std::lock_guard<std::mutex> lock(p.mu);
  const uint64_t epoch = p.secondary->applied_epoch();
  REQUIRE(p.resume_invariant_ok);
  REQUIRE(p.resume_hash == p.hashes[epoch]);
  REQUIRE(p.early_releases == 0);
  REQUIRE(p.released_without_ack == 0);
  // Zero lost output: the primary released every packet up to the epoch handed over and
  // none after it, and the secondary's first packet is the very next one.
  uint64_t last_step = 0;
  for (const auto& pkt : p.released) {
    REQUIRE(pkt.epoch <= epoch);
    REQUIRE(pkt.step <= p.resume_step);
    last_step = std::max(last_step, pkt.step);
  }
  REQUIRE(p.resume_step - last_step < TestGuest().output_every);
  std::lock_guard<std::mutex> out_lock(out_mu);
  REQUIRE_FALSE(secondary_out.empty());
  REQUIRE(secondary_out.front().step == last_step + TestGuest().output_every);
}

TEST_CASE("a handover the secondary declines leaves protection as it was",
          "[replicator][handover]") {
  Pair p;
  p.StartProtected();
  while (p.secondary->acked_epoch() < 5) std::this_thread::sleep_for(2ms);
  p.sw.reachable_ = false;  // the secondary cannot get the token
  REQUIRE(p.primary->RequestHandover().ok());
  auto declined = [&] {
    for (const auto& t : p.primary->transitions()) {
      if (t.to == S::kProtected && t.reason.find("declined the handover") != std::string::npos)
        return true;
    }
    return false;
  };
  for (int i = 0; i < 2000 && !declined(); ++i) std::this_thread::sleep_for(5ms);
  INFO(Log(p.primary->transitions()));
  REQUIRE(declined());
  // Epochs go on, and both sides are as they were.
  const uint64_t at = p.secondary->acked_epoch();
  while (p.secondary->acked_epoch() < at + 5) std::this_thread::sleep_for(2ms);
  REQUIRE(p.primary->state() == S::kProtected);
  REQUIRE(p.secondary->state() == S::kProtected);
  REQUIRE_FALSE(p.sg.running());
  REQUIRE_FALSE(p.pg.halted());
  // Once the witness answers, the same request goes through.
  p.sw.reachable_ = true;
  REQUIRE(p.primary->RequestHandover().ok());
  REQUIRE(p.primary->WaitForState(S::kHandedOver, 10s));
  REQUIRE(p.secondary->WaitForState(S::kActive, 10s));
  std::lock_guard<std::mutex> lock(p.mu);
  REQUIRE(p.resume_hash == p.hashes[p.secondary->applied_epoch()]);
  REQUIRE(p.early_releases == 0);
}

TEST_CASE("a handover nobody answers is a fault: the witness decides, one side goes on",
          "[replicator][handover]") {
  ReplicationOptions popt = Options("hostA");
  popt.handover_timeout = 200ms;
  Pair p(TestGuest(), TestGuest(), popt);
  p.StartProtected();
  while (p.secondary->acked_epoch() < 5) std::this_thread::sleep_for(2ms);
  p.sw.ask_late_ms_ = 2000;  // the secondary's witness request hangs past the timeout
  REQUIRE(p.primary->RequestHandover().ok());
  REQUIRE(p.primary->WaitForState(S::kPrimaryAlone, 10s));
  REQUIRE(p.secondary->WaitForFaultHandled(20s));
  INFO("primary:\n"
       << Log(p.primary->transitions()) << "secondary:\n"
       << Log(p.secondary->transitions()));
  REQUIRE(p.primary->fault_reason().find("neither took over nor declined") != std::string::npos);
  REQUIRE(p.secondary->state() == S::kFenced);
  REQUIRE_FALSE(p.sg.running());
  REQUIRE_FALSE(p.pg.halted());
  REQUIRE(p.pg.output_mode() == OutputMode::kPassThrough);
  std::lock_guard<std::mutex> lock(p.mu);
  REQUIRE(p.early_releases == 0);
}

TEST_CASE(
    "a secondary that fails after the witness granted it the handover: a fault, "
    "the primary takes the token back and goes on",
    "[replicator][handover]") {
  ReplicationOptions sopt = Options("hostB");
  sopt.grant_window = 300ms;
  Pair p(TestGuest(), TestGuest(), Options("hostA"), sopt);
  p.StartProtected();
  while (p.secondary->acked_epoch() < 5) std::this_thread::sleep_for(2ms);
  p.sg.FailNextLoad();  // the secondary wins the token, then cannot load epoch N
  REQUIRE(p.primary->RequestHandover().ok());
  REQUIRE(p.secondary->WaitForFaultHandled(10s));
  REQUIRE(p.primary->WaitForFaultHandled(10s));
  INFO("primary:\n"
       << Log(p.primary->transitions()) << "secondary:\n"
       << Log(p.secondary->transitions()));
  REQUIRE(p.secondary->state() == S::kFailed);
  // Not a decline ("nothing changed" would be false: the token was the secondary's): an
  // ERROR, a fault, and the grant it never confirmed is taken back once its window lapsed.
  REQUIRE(p.primary->state() == S::kPrimaryAlone);
  REQUIRE(p.primary->fault_reason().find("failed after the witness granted") != std::string::npos);
  REQUIRE(p.primary->fault_reason().find("taken back") != std::string::npos);
  REQUIRE(p.pw.reclaims_ > 0);
  REQUIRE_FALSE(p.sg.running());
  REQUIRE_FALSE(p.pg.halted());
  REQUIRE(p.pg.output_mode() == OutputMode::kPassThrough);
  std::lock_guard<std::mutex> lock(p.mu);
  REQUIRE(p.early_releases == 0);
}
