// The primary's side of an epoch.
//
// EpochStager::Capture is the checkpoint pause: with the vCPUs stopped it takes the dirty
// set, copies those pages and the device state into memory allocated once up front, and
// closes the output barrier. EpochStreamer then turns the captured epoch into wire records
// (zero pages, XOR+RLE deltas against the last copy sent, raw pages) and sends them while
// the guest runs on.
//
// Thread safety: none; the primary's epoch thread owns both.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "common/status.h"
#include "lockstep/hypervisor.h"
#include "lockstep/wire_format.h"
#include "replication_channel/channel.h"

namespace lockstep {

// One anonymous mapping, page aligned, zero filled, released on destruction.
class PageArena {
 public:
  PageArena() = default;
  explicit PageArena(size_t bytes);
  ~PageArena();
  PageArena(PageArena&& o) noexcept;
  PageArena& operator=(PageArena&& o) noexcept;
  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

struct PageRef {
  uint32_t block;
  uint64_t page;
};

class EpochStager {
 public:
  // Allocates room for every page of `blocks` and `max_device_bytes` of device state.
  EpochStager(const std::vector<RamBlock>& blocks, size_t max_device_bytes);

  // The checkpoint pause for epoch `epoch`. REQUIRES: vCPUs stopped (the caller stops and
  // restarts them so it can time the whole pause). With `full`, every page is taken
  // (and the hypervisor's log is cleared); otherwise only the pages dirtied since the
  // previous Capture. No allocation.
  Status Capture(Hypervisor& hv, uint64_t epoch, bool full);

  // A pre-copy round (wire_format.h), in two steps. TakeRound, inside a short pause
  // (REQUIRES: vCPUs stopped), takes the pages dirtied since the previous call — every page
  // with `full` — and drains the log, copying nothing. CopyRound then copies those pages
  // while the guest runs: a page it writes meanwhile may be copied torn, but it is dirty
  // again and goes out in a later round or epoch. No allocation.
  Status TakeRound(Hypervisor& hv, bool full);
  void CopyRound();

  uint64_t epoch() const { return epoch_; }  // 0 for a pre-copy round
  bool full() const { return full_; }
  bool precopy() const { return precopy_; }
  size_t page_count() const { return count_; }
  const PageRef& ref(size_t i) const { return refs_[i]; }
  const uint8_t* page(size_t i) const { return pages_.data() + i * wire::kPageSize; }
  std::span<const uint8_t> device_state() const { return {device_.data(), device_len_}; }
  const std::vector<RamBlock>& blocks() const { return blocks_; }
  // The memory a transport should register as a send source.
  std::span<const uint8_t> page_memory() const { return {pages_.data(), pages_.size()}; }
  std::span<const uint8_t> device_memory() const { return {device_.data(), device_.size()}; }

 private:
  std::vector<RamBlock> blocks_;
  std::vector<std::vector<uint64_t>> bitmaps_;  // one per block, reused every pause
  PageArena pages_;
  std::vector<PageRef> refs_;
  PageArena device_;
  size_t device_len_ = 0;
  // The pages of the dirty log (all of them with `full`) into refs_; drains the log.
  Status TakeDirtySet(Hypervisor& hv, bool full);
  void CopyTakenPages();

  size_t count_ = 0;
  uint64_t epoch_ = 0;
  bool full_ = false;
  bool precopy_ = false;
};

struct StreamStats {
  uint64_t raw_pages = 0;
  uint64_t zero_pages = 0;
  uint64_t delta_pages = 0;
  uint64_t bytes = 0;  // record bytes handed to the channel
};

class EpochStreamer {
 public:
  // With `delta`, keeps a shadow copy of guest RAM (as last sent) to encode XOR deltas.
  EpochStreamer(const std::vector<RamBlock>& blocks, bool delta);

  // Registers the streamer's and `stager`'s buffers with `channel` as send sources.
  Status Register(channel::Channel& channel, const EpochStager& stager);

  // Sends the captured epoch (or pre-copy round) as records in messages of about
  // kBatchPages pages. A FULL one resets the shadow, so deltas are always against what
  // the secondary holds.
  // Accumulates into `stats`. No allocation.
  Status Send(const EpochStager& stager, channel::Channel& channel, StreamStats* stats);

  static constexpr size_t kBatchPages = 1024;

 private:
  // Flushes the current batch as one message.
  Status Flush(channel::Channel& channel, StreamStats* stats);
  uint8_t* NextHeader();

  bool delta_;
  std::vector<RamBlock> blocks_;
  std::vector<PageArena> shadow_;  // per block, when delta_
  // Per batch: headers, delta payloads and the gather list point into these.
  PageArena headers_;
  PageArena deltas_;
  std::vector<channel::ConstSlice> gather_;
  size_t nheaders_ = 0;
  size_t delta_used_ = 0;
  size_t ngather_ = 0;
  uint32_t epoch_crc_ = 0;
  uint32_t records_ = 0;
};

}  // namespace lockstep
