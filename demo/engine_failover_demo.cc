// The engine failover demo: a protected (simulated) guest survives kill -9 of its primary.
//
// Two "hosts" on this machine: the primary is a child process, the secondary is this
// process; they replicate over TCP on 127.0.0.1. The guest is lockstep's simulated guest
// (real memory, a vCPU thread, output packets), standing in for the QEMU VM that the
// hypervisor plugin will protect. A "client" here reads every packet the active replica
// releases. After a few seconds of protection the demo sends SIGKILL to the primary and
// prints the timeline of the takeover and the continuity of the client's stream.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>

#include "lockstep/replicator.h"
#include "replication_channel/tcp.h"
#include "simulated_guest.h"

using namespace lockstep;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace {

testing::GuestConfig Guest() {
  testing::GuestConfig c;
  c.blocks = {{"pc.ram", 64u << 20}, {"vga.vram", 8u << 20}, {"pc.bios", 256u << 10}};
  c.pages_per_step = 8;
  c.output_every = 4;
  c.step_delay = 200us;
  return c;
}

ReplicationOptions Options(const std::string& host) {
  ReplicationOptions o;
  o.vm_id = "demo-vm";
  o.host_id = host;
  o.pairing_id = {0x6c, 0x6f, 0x63, 0x6b, 0x73, 0x74, 0x65, 0x70};
  o.pairing_key = std::array<uint8_t, 32>{0x6b, 0x65, 0x79};  // both hosts hold it
  o.epoch_interval = 10ms;
  o.peer_loss_threshold = 30ms;
  return o;
}

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

// The primary host: protects its guest and writes every released packet's step to `out`.
[[noreturn]] void PrimaryHost(const std::string& address, int out) {
  testing::SimulatedGuest guest(Guest());
  guest.SetEmitHook([out](const testing::Packet& p) {
    if (write(out, &p.step, sizeof p.step) != sizeof p.step) _exit(3);
  });
  guest.Boot();
  vip::InProcessWitness witness;
  PrimaryReplicator primary(guest, witness, Options("host-a"));
  auto tcp = channel::MakeTcpTransport();
  auto ch = channel::ConnectWithRetry(*tcp, address, channel::Clock::now() + 10s);
  if (!ch.ok()) {
    std::fprintf(stderr, "primary: %s\n", ch.status().ToString().c_str());
    _exit(1);
  }
  Status s = primary.Start(std::move(*ch));
  if (!s.ok()) {
    std::fprintf(stderr, "primary: %s\n", s.ToString().c_str());
    _exit(2);
  }
  // The real witness lives with host-b in this demo (a copy of it was all host-a had for
  // registering): from now on host-a cannot reach it, so on any fault it fences itself
  // rather than risk a second active replica.
  witness.SetReachable(false);
  for (;;) {
    std::this_thread::sleep_for(500ms);
    auto st = primary.stats();
    std::printf(
        "  [host-a] %-9s epoch %5llu acked %5llu  pause p50 %5.2f ms p99 %5.2f ms  "
        "output held %5.2f ms (p50)\n",
        ReplicaStateName(primary.state()), static_cast<unsigned long long>(st.current_epoch),
        static_cast<unsigned long long>(st.acked_epoch), st.pause_p50.count() / 1000.0,
        st.pause_p99.count() / 1000.0, st.ack_latency_p50.count() / 1000.0);
    std::fflush(stdout);
  }
}

}  // namespace

int main(int argc, char** argv) {
  int protect_seconds = 3;
  if (argc > 1) {
    protect_seconds = std::atoi(argv[1]);
    if (protect_seconds <= 0 || protect_seconds > 3600) {
      std::fprintf(stderr, "usage: %s [SECONDS_PROTECTED_BEFORE_THE_KILL (1..3600, default 3)]\n",
                   argv[0]);
      return 2;
    }
  }
  std::printf(
      "lockstep engine failover demo: primary host-a (child process), secondary host-b "
      "(this process),\nreplicating over TCP on 127.0.0.1; a client reads every packet "
      "the active replica releases.\n\n");
  auto tcp = channel::MakeTcpTransport();
  auto listener = tcp->Listen("127.0.0.1:0");
  if (!listener.ok()) {
    std::fprintf(stderr, "demo: %s\n", listener.status().ToString().c_str());
    return 1;
  }
  int pipefd[2];
  if (pipe(pipefd) != 0) {
    std::perror("demo: pipe");
    return 1;
  }
  std::fflush(stdout);
  pid_t child = fork();
  if (child < 0) {
    std::perror("demo: fork");
    return 1;
  }
  if (child == 0) {
    close(pipefd[0]);
    PrimaryHost((*listener)->address(), pipefd[1]);
  }
  close(pipefd[1]);

  // The client: packets from host-a arrive on the pipe, from host-b through its guest.
  std::mutex mu;
  uint64_t last_step_from_a = 0, packets_from_a = 0, first_step_from_b = 0;
  Clock::time_point first_from_b_at{};
  std::thread client([&] {
    uint64_t step;
    while (read(pipefd[0], &step, sizeof step) == sizeof step) {
      std::lock_guard<std::mutex> lock(mu);
      last_step_from_a = step;
      ++packets_from_a;
    }
  });

  testing::SimulatedGuest guest(Guest());
  guest.SetEmitHook([&](const testing::Packet& p) {
    std::lock_guard<std::mutex> lock(mu);
    if (first_step_from_b == 0) {
      first_step_from_b = p.step;
      first_from_b_at = Clock::now();
    }
  });
  vip::InProcessWitness witness;
  (void)witness.Register("demo-vm", "host-a");  // as host-a did when protection began
  SecondaryReplica secondary(guest, witness, Options("host-b"));
  auto give_up = [&](const std::string& why) {
    std::fprintf(stderr, "demo: %s\n", why.c_str());
    kill(child, SIGKILL);
    waitpid(child, nullptr, 0);
    close(pipefd[0]);
    client.join();
    return 1;
  };
  auto ch = (*listener)->Accept(10000ms);
  Status s = ch.ok() ? secondary.Start(std::move(*ch)) : ch.status();
  if (!s.ok()) return give_up("the secondary could not start: " + s.ToString());
  auto sync_start = Clock::now();
  secondary.WaitForState(ReplicaState::kProtected, 60s);
  if (secondary.state() != ReplicaState::kProtected) {
    return give_up(std::string("demo-vm did not become protected: ") +
                   ReplicaStateName(secondary.state()) + ": " + secondary.fault_reason());
  }
  std::printf("initial synchronization of 72 MiB done in %.0f ms; demo-vm is PROTECTED\n",
              Ms(Clock::now() - sync_start));
  std::fflush(stdout);
  std::this_thread::sleep_for(std::chrono::seconds(protect_seconds));

  uint64_t acked_before = secondary.acked_epoch();
  auto killed_at = Clock::now();
  auto killed_wall = std::chrono::system_clock::now();
  kill(child, SIGKILL);
  std::printf("\n*** kill -9 host-a (pid %d) at epoch %llu ***\n\n", child,
              static_cast<unsigned long long>(acked_before));
  waitpid(child, nullptr, 0);
  bool handled = secondary.WaitForFaultHandled(10s);
  // Wait for the first packet from the new active replica.
  for (int i = 0; i < 1000; ++i) {
    std::lock_guard<std::mutex> lock(mu);
    if (first_step_from_b != 0) break;
    mu.unlock();
    std::this_thread::sleep_for(1ms);
    mu.lock();
  }
  close(pipefd[0]);
  client.join();

  auto since_kill = [&](std::chrono::system_clock::time_point t) {
    return std::chrono::duration<double, std::milli>(t - killed_wall).count();
  };
  std::printf("timeline (ms after the kill):\n");
  std::printf("  %8.2f  host-a killed\n", 0.0);
  for (const auto& t : secondary.transitions()) {
    if (t.at < killed_wall) continue;
    std::printf("  %8.2f  host-b %s: %s\n", since_kill(t.at), ReplicaStateName(t.to),
                t.reason.c_str());
  }
  std::lock_guard<std::mutex> lock(mu);
  if (first_step_from_b != 0) {
    std::printf("  %8.2f  first packet from host-b reaches the client\n",
                Ms(first_from_b_at - killed_at));
  }
  std::printf(
      "\nclient: %llu packets from host-a, the last at guest step %llu; host-b resumed "
      "at epoch %llu and its first packet is step %llu\n",
      static_cast<unsigned long long>(packets_from_a),
      static_cast<unsigned long long>(last_step_from_a),
      static_cast<unsigned long long>(secondary.applied_epoch()),
      static_cast<unsigned long long>(first_step_from_b));
  bool ok = handled && secondary.state() == ReplicaState::kActive && first_step_from_b != 0 &&
            first_step_from_b > last_step_from_a;
  std::printf("%s\n", ok ? "OK: demo-vm survived the loss of its primary; no packet the client "
                           "saw was rolled back."
                         : "FAILED: see the timeline above.");
  secondary.Stop();
  return ok ? 0 : 1;
}
