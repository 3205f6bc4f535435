// Test support: real epochs of a SimulatedGuest, captured as the messages the primary
// would put on the wire, for feeding to an EpochAssembler directly.
#pragma once

#include <cstdint>
#include <vector>

#include "epoch_assembler.h"
#include "simulated_guest.h"

namespace lockstep::testing {

struct CapturedEpoch {
  uint64_t epoch = 0;  // 0: a pre-copy round
  std::vector<std::vector<uint8_t>> messages;
  uint32_t ram_hash = 0;  // the primary's RAM at the pause
};

// Boots nothing: runs `guest` (already booted) through `count` epochs of about `run_for`
// each, capturing them with EpochStager/EpochStreamer over a loopback link. With
// `precopy_rounds`, that many pre-copy rounds (copied while the guest runs) come first in
// the result, and epoch 1 is not FULL.
std::vector<CapturedEpoch> CaptureEpochs(SimulatedGuest& guest, int count, bool delta,
                                         std::chrono::milliseconds run_for, int precopy_rounds = 0);

// The assembler view of a guest's RAM.
std::vector<ReplicaBlock> ReplicaBlocksOf(SimulatedGuest& guest);

// Feeds every message of `e`; returns the first error, or whether it committed (an epoch
// or a pre-copy round).
Result<bool> FeedEpoch(EpochAssembler& a, const CapturedEpoch& e, std::vector<uint8_t>* staged);

}  // namespace lockstep::testing
