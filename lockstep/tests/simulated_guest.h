// SimulatedGuest: a Hypervisor over real memory, for the engine's tests and benchmarks.
//
// Guest RAM is real anonymous memory in several blocks (like QEMU's pc.ram, vga.vram and a
// ROM). A vCPU thread mutates it in steps and keeps an invariant that any mix of two
// different moments breaks:
//   * every page's first 8 bytes are its stamp;
//   * the ledger (block 0, page 0) holds the step count and the XOR of all other stamps;
//   * the device state (the "registers") holds the same step count and the PRNG state.
// A replica that applied part of an epoch, or RAM of one epoch with device state of
// another, fails CheckInvariant(). Resuming from a loaded device state continues the exact
// same deterministic sequence.
//
// Output: every `output_every` steps the vCPU emits a packet {step, ledger xor}; the
// packet goes through the OutputMode / barrier logic of the Hypervisor interface.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "epoch_stager.h"  // PageArena
#include "lockstep/hypervisor.h"

namespace lockstep::testing {

struct GuestConfig {
  std::vector<std::pair<std::string, uint64_t>> blocks = {
      {"pc.ram", 16u << 20}, {"vga.vram", 1u << 20}, {"pc.bios", 256u << 10}};
  // Blocks whose name starts with this are ROM: filled once, never written.
  std::string rom_prefix = "pc.bios";
  uint32_t pages_per_step = 4;               // pages written per step
  uint32_t bytes_per_write = 64;             // bytes changed per written page (8..4096)
  uint32_t output_every = 8;                 // steps between packets; 0 = no output
  std::chrono::microseconds step_delay{50};  // pause between steps (0 = flat out)
  // Burst mode, for benchmarks: after each StartVcpus() the vCPU writes exactly
  // `pages_per_epoch` distinct whole pages of fresh (incompressible) content, then idles
  // until the next stop. With 0 pages the guest is idle: nothing is dirtied at all.
  bool burst = false;
  uint64_t pages_per_epoch = 0;
  uint32_t device_state_bytes = 8192;
  uint64_t seed = 1;
};

struct Packet {
  uint64_t step = 0;
  uint64_t ledger_xor = 0;
  uint64_t epoch = 0;  // the epoch open when it was emitted (0: unbuffered)
  // How it left: ReleaseOutput(N) gives N; a pass-through send or a switch of the output
  // mode gives 0.
  uint64_t released_by_ack_of = 0;
};

class SimulatedGuest final : public Hypervisor {
 public:
  explicit SimulatedGuest(GuestConfig config);
  ~SimulatedGuest() override;

  // Starts the vCPU thread running from the initial state (a freshly booted primary).
  void Boot();

  // ---- Hypervisor ----
  std::vector<RamBlock> RamBlocks() override;
  Status StopVcpus() override;
  Status StartVcpus() override;
  Status Halt() override;
  Status StartDirtyLog() override;
  Status StopDirtyLog() override;
  Status SyncDirtyLog() override;
  Status TakeDirtyBitmap(size_t block, std::span<uint64_t> bitmap) override;
  Result<size_t> SaveDeviceState(std::span<uint8_t> out) override;
  Status LoadDeviceState(std::span<const uint8_t> state) override;
  void CloseOutputBarrier(uint64_t epoch) override;
  void ReleaseOutput(uint64_t epoch) override;
  void SetOutputMode(OutputMode mode) override;
  Status Announce() override;

  // ---- for tests ----
  bool running() const;
  bool halted() const { return halted_.load(); }
  // StopVcpus() calls not (yet) followed by a StartVcpus(): a host like QEMU holds its lock
  // across that window, so the engine must bring it back to 0 (Halt() is the way to stop
  // for good).
  int open_pauses() const { return open_pauses_.load(); }
  uint64_t steps() const;  // steps executed so far (the "register")
  // Checks the invariant. REQUIRES: vCPUs stopped.
  bool CheckInvariant(std::string* why) const;
  // CRC32C of all RAM and the registers. REQUIRES: vCPUs stopped.
  uint64_t ImageHash() const;
  // CRC32C of all RAM only (for replicas that never loaded device state).
  uint32_t RamHash() const;
  // When set, called with (epoch, ImageHash()) at every CloseOutputBarrier (in the pause).
  void SetBarrierHook(std::function<void(uint64_t epoch, uint64_t image_hash)> hook);
  // When set, called inside StartVcpus() before the vCPUs run (they are still stopped).
  void SetStartHook(std::function<void()> hook) { start_hook_ = std::move(hook); }
  // Called for every packet that leaves (released or passed through), under the output lock.
  void SetEmitHook(std::function<void(const Packet&)> hook);
  // Called on the vCPU thread whenever a packet is held (buffered), as QEMU's
  // filter-lockstep tells the engine (PrimaryReplicator::OutputPending). Set before Boot().
  void SetHeldHook(std::function<void()> hook) { held_hook_ = std::move(hook); }
  std::vector<Packet> emitted() const;
  size_t held_packets() const;
  uint64_t dropped_packets() const;
  int announcements() const { return announcements_.load(); }
  OutputMode output_mode() const;
  // Fault injection: make the next SaveDeviceState / LoadDeviceState fail.
  void FailNextSave() { fail_next_save_.store(true); }
  void FailNextLoad() { fail_next_load_.store(true); }

 private:
  struct Regs {
    uint64_t magic;
    uint64_t step;
    uint64_t rng;
    uint64_t burst_cursor;
  };
  void Run();
  void Step();
  void WritePage(uint32_t block, uint64_t page, uint64_t stamp, uint64_t salt, uint32_t bytes);
  void MarkDirty(uint32_t block, uint64_t page);
  void Emit();
  uint64_t NextRandom();

  GuestConfig config_;
  std::vector<PageArena> ram_;
  std::vector<std::string> names_;
  std::vector<bool> rom_;
  std::vector<std::unique_ptr<std::atomic<uint64_t>[]>> dirty_;
  std::vector<size_t> dirty_words_;
  std::atomic<bool> dirty_log_on_{false};
  std::vector<std::pair<uint32_t, uint64_t>> writable_;  // (block, page) the vCPU may write
  std::vector<uint8_t> noise_;                           // random bytes that burst writes copy from

  Regs regs_{};  // owned by the vCPU thread while running; by the caller while stopped

  mutable std::mutex run_mu_;
  std::condition_variable run_cv_;
  bool run_requested_ = false;  // GUARDED_BY(run_mu_)
  bool parked_ = true;          // GUARDED_BY(run_mu_)
  bool exit_ = false;           // GUARDED_BY(run_mu_)
  uint64_t burst_left_ = 0;     // GUARDED_BY(run_mu_)
  std::atomic<uint64_t> steps_{0};
  std::thread vcpu_;

  mutable std::mutex out_mu_;
  OutputMode mode_ = OutputMode::kPassThrough;  // GUARDED_BY(out_mu_)
  uint64_t open_epoch_ = 1;                     // GUARDED_BY(out_mu_)
  std::deque<Packet> held_;                     // GUARDED_BY(out_mu_)
  std::vector<Packet> emitted_;                 // GUARDED_BY(out_mu_)
  uint64_t dropped_ = 0;                        // GUARDED_BY(out_mu_)
  std::function<void(const Packet&)> emit_hook_;
  std::function<void()> held_hook_;
  std::atomic<bool> halted_{false};
  std::atomic<int> open_pauses_{0};
  std::function<void(uint64_t, uint64_t)> barrier_hook_;
  std::function<void()> start_hook_;

  std::atomic<int> announcements_{0};
  std::atomic<bool> fail_next_save_{false};
  std::atomic<bool> fail_next_load_{false};
};

}  // namespace lockstep::testing
