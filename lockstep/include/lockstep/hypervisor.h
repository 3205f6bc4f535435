// The one narrow interface through which the engine drives a hypervisor.
//
// The QEMU plugin implements it over QEMU's internals (BQL-safe); the tests implement it
// over a simulated guest. The engine knows nothing else of the hypervisor.
//
// Calls marked HOT run inside the checkpoint pause, while the guest is stopped: they must
// not allocate, block on I/O, or take locks a vCPU may hold.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"

namespace lockstep {

// One region of guest RAM (main RAM, ROMs, video RAM, ...). All of them are replicated.
struct RamBlock {
  std::string id;           // stable name, the same on both hosts ("pc.ram")
  uint8_t* host = nullptr;  // where the hypervisor maps it in this process
  uint64_t length = 0;      // bytes, a multiple of the page size (4096)
};

// What happens to packets the guest transmits.
enum class OutputMode {
  kPassThrough,  // sent at once (unprotected, or the surviving replica)
  kBuffered,     // held behind epoch barriers until released
  kDropped,      // fenced: everything held and everything new is dropped
};

class Hypervisor {
 public:
  virtual ~Hypervisor() = default;

  // The guest's RAM layout. Called at setup; the layout must not change while protected.
  virtual std::vector<RamBlock> RamBlocks() = 0;

  // Stops every vCPU and waits until they are stopped, for a checkpoint: StartVcpus()
  // follows (a host may hold its locks in between). HOT.
  virtual Status StopVcpus() = 0;
  // Restarts the vCPUs. HOT.
  virtual Status StartVcpus() = 0;
  // Stops the guest for good (a fenced primary): no checkpoint and no StartVcpus()
  // follow, so the host keeps no lock for them. The default is StopVcpus().
  virtual Status Halt() { return StopVcpus(); }

  // Begins / ends dirty-page tracking for the engine (a log of its own, apart from live
  // migration's). StartDirtyLog marks nothing dirty: the engine copies everything once.
  virtual Status StartDirtyLog() = 0;
  virtual Status StopDirtyLog() = 0;
  // Brings the dirty log up to date (QEMU: must hold the BQL under TCG). REQUIRES: vCPUs
  // stopped. HOT.
  virtual Status SyncDirtyLog() = 0;
  // ORs the pages of block `block` dirtied since the previous call into `bitmap` (bit i of
  // word i/64 = page i) and clears them in the log. `bitmap` has ceil(pages/64) words.
  // REQUIRES: SyncDirtyLog() was called in this pause. HOT.
  virtual Status TakeDirtyBitmap(size_t block, std::span<uint64_t> bitmap) = 0;

  // Writes the device state (vCPU registers included) into `out` and returns its length;
  // kResourceExhausted if it does not fit. REQUIRES: vCPUs stopped. HOT.
  virtual Result<size_t> SaveDeviceState(std::span<uint8_t> out) = 0;
  // Loads device state saved by SaveDeviceState on the peer. REQUIRES: vCPUs stopped.
  virtual Status LoadDeviceState(std::span<const uint8_t> state) = 0;

  // Output commit. In kBuffered mode every packet the guest sends is held, tagged with the
  // epoch that is open when it is sent. CloseOutputBarrier(N) ends epoch N's output: later
  // packets belong to N+1. REQUIRES: vCPUs stopped. HOT.
  virtual void CloseOutputBarrier(uint64_t epoch) = 0;
  // Sends every held packet of epochs <= `epoch`, in order. Any thread.
  virtual void ReleaseOutput(uint64_t epoch) = 0;
  // Switching to kPassThrough sends everything held; to kDropped drops it. Any thread.
  virtual void SetOutputMode(OutputMode mode) = 0;

  // Tells the network the guest's NICs are here now (RARP / gratuitous ARP).
  virtual Status Announce() = 0;
};

}  // namespace lockstep
