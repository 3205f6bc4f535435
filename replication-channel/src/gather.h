// Validation of a Send() gather list, shared by the transports.
#pragma once

#include <cstddef>
#include <span>
#include <string>

#include "common/status.h"
#include "replication_channel/channel.h"

namespace lockstep::channel::internal {

// OK when `gather` is a sendable message (1..kMaxMessageBytes bytes in at most
// kMaxGatherSlices slices; empty slices are allowed), and then sets `*total` to its size.
// Allocates nothing unless it fails.
inline Status CheckGather(std::span<const ConstSlice> gather, size_t* total) {
  if (gather.size() > kMaxGatherSlices) {
    return Status::InvalidArgument("a message may have at most " +
                                   std::to_string(kMaxGatherSlices) + " slices, not " +
                                   std::to_string(gather.size()));
  }
  size_t sum = 0;
  for (const ConstSlice& slice : gather) {
    // Checked per slice so that the sum cannot overflow.
    if (slice.size > kMaxMessageBytes || sum + slice.size > kMaxMessageBytes) {
      return Status::InvalidArgument("a message may have at most " +
                                     std::to_string(kMaxMessageBytes) + " bytes");
    }
    sum += slice.size;
  }
  if (sum == 0) return Status::InvalidArgument("cannot send an empty message");
  *total = sum;
  return Status::Ok();
}

}  // namespace lockstep::channel::internal
