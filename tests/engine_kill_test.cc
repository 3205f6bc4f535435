// kill -9 of a real primary process at random moments, over real TCP.
//
// The primary replica runs in a forked child process with its own simulated guest and
// streams epochs to the secondary in this process over a TCP connection on 127.0.0.1.
// The child writes, at every checkpoint pause, the image hash of its guest for that epoch
// and, for every packet its guest releases, the packet, to a journal file (a write()
// survives the kill). After SIGKILL the secondary must take over by itself and resume
// exactly the image of the epoch it acknowledged last, with every released packet
// covered by that image.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdio>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include "lockstep/replicator.h"
#include "replication_channel/tcp.h"
#include "simulated_guest.h"

using namespace lockstep;
using namespace lockstep::testing;
using namespace std::chrono_literals;

namespace {

struct JournalEntry {
  uint64_t kind;  // 1: epoch image hash, 2: released packet
  uint64_t a;     // epoch | packet step
  uint64_t b;     // hash  | packet epoch
};

GuestConfig Guest() {
  GuestConfig c;
  c.blocks = {{"pc.ram", 8u << 20}, {"vga.vram", 512u << 10}, {"pc.bios", 128u << 10}};
  c.pages_per_step = 4;
  c.output_every = 2;
  c.step_delay = 100us;
  return c;
}

ReplicationOptions Options(const std::string& host) {
  ReplicationOptions o;
  o.vm_id = "vm-kill";
  o.host_id = host;
  o.pairing_id[3] = 0x77;
  o.pairing_key = std::array<uint8_t, 32>{0x6b, 0x65, 0x79};  // both hosts hold it
  o.epoch_interval = 10ms;
  o.peer_loss_threshold = 100ms;
  return o;
}

[[noreturn]] void RunPrimaryChild(const std::string& address, const std::string& journal) {
  int fd = open(journal.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0600);
  if (fd < 0) _exit(10);
  SimulatedGuest guest(Guest());
  auto record = [fd](uint64_t kind, uint64_t a, uint64_t b) {
    JournalEntry e{kind, a, b};
    if (write(fd, &e, sizeof e) != static_cast<ssize_t>(sizeof e)) _exit(11);
  };
  guest.SetBarrierHook([&](uint64_t epoch, uint64_t hash) { record(1, epoch, hash); });
  guest.SetEmitHook([&](const Packet& p) { record(2, p.step, p.epoch); });
  guest.Boot();
  vip::InProcessWitness witness;  // never consulted: this process dies by SIGKILL
  PrimaryReplicator primary(guest, witness, Options("hostA"));
  auto tcp = channel::MakeTcpTransport();
  auto ch = channel::ConnectWithRetry(*tcp, address, channel::Clock::now() + 10s);
  if (!ch.ok()) _exit(12);
  if (!primary.Start(std::move(*ch)).ok()) _exit(13);
  for (;;) pause();
}

}  // namespace

TEST_CASE("kill -9 of the primary process: the secondary resumes an acknowledged epoch",
          "[integration][kill]") {
  std::mt19937_64 rng(Catch::rngSeed() + 99);
  const int kTrials = 5;
  for (int trial = 0; trial < kTrials; ++trial) {
    auto tcp = channel::MakeTcpTransport();
    auto listener = tcp->Listen("127.0.0.1:0");
    REQUIRE(listener.ok());
    char journal[] = "/tmp/lockstep-kill-XXXXXX";
    int jfd = mkstemp(journal);
    REQUIRE(jfd >= 0);
    close(jfd);

    pid_t child = fork();
    REQUIRE(child >= 0);
    if (child == 0) RunPrimaryChild((*listener)->address(), journal);

    SimulatedGuest guest(Guest());
    vip::InProcessWitness witness;
    REQUIRE(*witness.Register("vm-kill", "hostA") == 1);  // as the primary did at its start
    std::mutex mu;
    bool invariant_ok = false;
    std::string why;
    uint64_t resume_hash = 0, resume_step = 0;
    guest.SetStartHook([&] {
      std::lock_guard<std::mutex> lock(mu);
      invariant_ok = guest.CheckInvariant(&why);
      resume_hash = guest.ImageHash();
      resume_step = guest.steps();
    });
    SecondaryReplica secondary(guest, witness, Options("hostB"));
    auto ch = (*listener)->Accept(10000ms);
    REQUIRE(ch.ok());
    REQUIRE(secondary.Start(std::move(*ch)).ok());
    REQUIRE(secondary.WaitForState(ReplicaState::kProtected, 20s));

    std::this_thread::sleep_for(std::chrono::milliseconds(30 + rng() % 400));
    auto killed_at = std::chrono::system_clock::now();
    REQUIRE(kill(child, SIGKILL) == 0);
    int status = 0;
    REQUIRE(waitpid(child, &status, 0) == child);
    REQUIRE(WIFSIGNALED(status));

    REQUIRE(secondary.WaitForFaultHandled(10s));
    auto log = secondary.transitions();
    std::string text;
    for (const auto& t : log) text += std::string(ReplicaStateName(t.to)) + ": " + t.reason + "\n";
    INFO("trial " << trial << "\n" << text);
    REQUIRE(secondary.state() == ReplicaState::kActive);
    auto active_after =
        std::chrono::duration_cast<std::chrono::microseconds>(log.back().at - killed_at);
    WARN("trial " << trial << ": kill -9 to ACTIVE in " << active_after.count() / 1000.0
                  << " ms at epoch " << secondary.applied_epoch());

    // Read what the dead primary recorded.
    std::map<uint64_t, uint64_t> hashes;
    std::vector<JournalEntry> released;
    FILE* f = fopen(journal, "rb");
    REQUIRE(f != nullptr);
    JournalEntry e;
    while (fread(&e, sizeof e, 1, f) == 1) {
      if (e.kind == 1) hashes[e.a] = e.b;
      if (e.kind == 2) released.push_back(e);
    }
    fclose(f);
    unlink(journal);

    const uint64_t epoch = secondary.applied_epoch();
    std::lock_guard<std::mutex> lock(mu);
    INFO("invariant: " << why);
    REQUIRE(invariant_ok);
    REQUIRE(hashes.count(epoch) == 1);
    REQUIRE(resume_hash == hashes[epoch]);
    REQUIRE(guest.announcements() == 1);
    REQUIRE_FALSE(released.empty());
    for (const auto& r : released) {
      REQUIRE(r.a <= resume_step);  // no released reply is rolled back
      REQUIRE(r.b <= epoch);        // and none came from an epoch the secondary lacks
    }
    // The resumed guest runs on from there.
    uint64_t before = guest.steps();
    std::this_thread::sleep_for(20ms);
    REQUIRE(guest.steps() > before);
    secondary.Stop();
  }
}

TEST_CASE("a long apply on the secondary is not mistaken for a silent primary",
          "[integration][detector]") {
  // Over TCP, LastHeardFrom() advances when bytes are read; a secondary busy applying a
  // 192 MiB initial synchronization (first touch of its RAM: 300 ms and more here) reads
  // nothing for longer than the threshold. The threshold stays generous enough for a
  // loaded 2-core machine.
  GuestConfig g = Guest();
  g.blocks = {{"pc.ram", 192u << 20}, {"pc.bios", 128u << 10}};
  SimulatedGuest pg(g), sg(g);
  vip::InProcessWitness witness;
  ReplicationOptions po = Options("hostA"), so = Options("hostB");
  po.peer_loss_threshold = so.peer_loss_threshold = 100ms;
  PrimaryReplicator primary(pg, witness, po);
  SecondaryReplica secondary(sg, witness, so);
  auto tcp = channel::MakeTcpTransport();
  auto listener = tcp->Listen("127.0.0.1:0");
  REQUIRE(listener.ok());
  pg.Boot();
  std::thread accept([&] {
    auto ch = (*listener)->Accept(10000ms);
    REQUIRE(ch.ok());
    REQUIRE(secondary.Start(std::move(*ch)).ok());
  });
  auto ch = tcp->Connect((*listener)->address(), 10000ms);
  REQUIRE(ch.ok());
  REQUIRE(primary.Start(std::move(*ch)).ok());
  accept.join();
  // The secondary turns PROTECTED once the 192 MiB are applied (first touch of its RAM:
  // slow on a loaded machine); the primary as soon as they are verified.
  primary.WaitForState(ReplicaState::kProtected, 30s);
  secondary.WaitForState(ReplicaState::kProtected, 30s);
  std::this_thread::sleep_for(1s);
  INFO("secondary: " << ReplicaStateName(secondary.state()) << " acked " << secondary.acked_epoch()
                     << " applied " << secondary.applied_epoch() << " " << secondary.fault_reason()
                     << "\nprimary: " << ReplicaStateName(primary.state()) << " acked "
                     << primary.stats().acked_epoch << " " << primary.fault_reason());
  REQUIRE(secondary.state() == ReplicaState::kProtected);
  REQUIRE(primary.state() == ReplicaState::kProtected);
  REQUIRE(witness.requests() == 0);
}
