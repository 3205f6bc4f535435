// Test support: real epochs of a SimulatedGuest, captured as the messages the primary
// would put on the wire, for feeding to an EpochAssembler directly.
#pragma once

#include <cstdint>
#include <vector>

#include "epoch_assembler.h"
#include "simulated_guest.h"

namespace lockstep::testing {

struct CapturedEpoch {
  uint64_t epoch = 0;
  std::vector<std::vector<uint8_t>> messages;
  uint32_t ram_hash = 0;  // the primary's RAM at the pause
};

// Boots nothing: runs `guest` (already booted) through `count` epochs of about `run_for`
// each, capturing them with EpochStager/EpochStreamer over a loopback link.
std::vector<CapturedEpoch> CaptureEpochs(SimulatedGuest& guest, int count, bool delta,
                                         std::chrono::milliseconds run_for);

// The assembler view of a guest's RAM.
std::vector<ReplicaBlock> ReplicaBlocksOf(SimulatedGuest& guest);

// Feeds every message of `e`; returns the first error, or whether it committed.
Result<bool> FeedEpoch(EpochAssembler& a, const CapturedEpoch& e, std::vector<uint8_t>* staged);

}  // namespace lockstep::testing
