// EpochAssembler: the secondary's gatekeeper. It verifies an epoch, message by message, as
// it lands in the staging arena, and applies it to the replica's RAM only once all of it
// has arrived and checked out. A partial, corrupt, replayed or out-of-order epoch is never
// applied: the replica is always exactly the last committed epoch.
//
// Thread safety: none; one receive thread owns an assembler.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "common/status.h"
#include "lockstep/wire_format.h"

namespace lockstep {

// A replica RAM block as the assembler sees it.
struct ReplicaBlock {
  uint8_t* host = nullptr;
  uint64_t pages = 0;
};

class EpochAssembler {
 public:
  // kRoundCommitted: a pre-copy round (wire_format.h) is complete; Apply() it like an
  // epoch, but it is no checkpoint: nothing to acknowledge, no device state.
  enum class Progress { kNeedMore, kCommitted, kRoundCommitted };

  // `blocks` is the replica's RAM; `last_applied` the epoch it holds (0: none yet, so the
  // next epoch must be epoch 1 and FULL); device state larger than `max_device_bytes` is
  // refused. Allocates the per-epoch page bitmap here.
  EpochAssembler(std::vector<ReplicaBlock> blocks, uint64_t last_applied,
                 uint32_t max_device_bytes = wire::kMaxPayloadBytes);

  // Verifies the records of one message that is part of the open epoch (or opens the
  // next one, or a pre-copy round before epoch 1). The message must stay where it is (in
  // the staging arena) until Apply() or Discard(). Returns kCommitted (kRoundCommitted for
  // a pre-copy round) when the message ended with a valid EPOCH_COMMIT.
  // On error nothing is applied; the caller must Discard() and end the stream.
  // No allocation.
  Result<Progress> Feed(std::span<const uint8_t> message);

  // Applies the committed epoch whose messages, in order and back to back, are `staged`
  // (the bytes Feed() saw since the epoch opened). Returns the epoch's device state (a view
  // into `staged`; empty for a pre-copy round). REQUIRES: the last Feed() returned
  // kCommitted or kRoundCommitted.
  std::span<const uint8_t> Apply(std::span<const uint8_t> staged);

  // Forgets the open epoch, if any.
  void Discard();

  uint64_t last_applied() const { return last_applied_; }
  // The epoch being received; 0 if none is open.
  uint64_t open_epoch() const { return open_ ? epoch_ : 0; }
  uint64_t total_pages() const { return total_pages_; }
  // Pre-copy rounds applied so far (the first of them FULL).
  uint64_t rounds_applied() const { return rounds_applied_; }

 private:
  Status FeedRecord(const wire::RecordView& r, bool* committed);
  Status CheckPage(const wire::RecordView& r);
  Status Fail(const Status& s);

  std::vector<ReplicaBlock> blocks_;
  std::vector<uint64_t> block_first_page_;  // prefix sums, for the seen-bitmap index
  uint64_t total_pages_ = 0;
  std::vector<uint64_t> seen_;  // one bit per page of the replica: in the open epoch
  const uint32_t max_device_bytes_;

  uint64_t last_applied_;
  bool open_ = false;
  bool committed_ = false;
  uint64_t epoch_ = 0;
  bool full_ = false;
  bool precopy_ = false;  // the open unit is a pre-copy round
  uint64_t rounds_applied_ = 0;
  uint64_t expected_pages_ = 0;
  uint64_t pages_ = 0;
  uint32_t expected_device_bytes_ = 0;
  uint64_t device_bytes_ = 0;
  bool have_device_ = false;
  uint32_t records_ = 0;
  uint32_t epoch_crc_ = 0;
};

}  // namespace lockstep
