#include "epoch_assembler.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "common/crc32c.h"
#include "page_codec.h"

namespace lockstep {

using wire::RecordType;
using wire::RecordView;

EpochAssembler::EpochAssembler(std::vector<ReplicaBlock> blocks, uint64_t last_applied,
                               uint32_t max_device_bytes)
    : blocks_(std::move(blocks)), max_device_bytes_(max_device_bytes), last_applied_(last_applied) {
  for (const auto& b : blocks_) {
    block_first_page_.push_back(total_pages_);
    total_pages_ += b.pages;
  }
  seen_.assign((total_pages_ + 63) / 64, 0);
}

void EpochAssembler::Discard() {
  open_ = false;
  committed_ = false;
}

Status EpochAssembler::Fail(const Status& s) {
  Discard();
  return s.WithContext("epoch " + std::to_string(epoch_) + " rejected, nothing applied");
}

Result<EpochAssembler::Progress> EpochAssembler::Feed(std::span<const uint8_t> message) {
  if (committed_) return Fail(Status::FailedPrecondition("data after EPOCH_COMMIT"));
  wire::RecordReader reader(message);
  if (reader.done()) return Fail(Status::Corruption("empty message"));
  bool committed = false;
  while (!reader.done()) {
    if (committed) return Fail(Status::Corruption("records follow EPOCH_COMMIT in its message"));
    RecordView r;
    Status s = reader.Next(&r);
    if (!s.ok()) return Fail(s);
    s = FeedRecord(r, &committed);
    if (!s.ok()) return Fail(s);
  }
  committed_ = committed;
  if (!committed) return Progress::kNeedMore;
  return precopy_ ? Progress::kRoundCommitted : Progress::kCommitted;
}

Status EpochAssembler::CheckPage(const RecordView& r) {
  const auto& h = r.header;
  if (h.block >= blocks_.size()) {
    return Status::Corruption("page record names RAM block " + std::to_string(h.block) +
                              "; the replica has " + std::to_string(blocks_.size()));
  }
  const ReplicaBlock& b = blocks_[h.block];
  if (h.page >= b.pages) {
    return Status::Corruption("page " + std::to_string(h.page) + " is outside RAM block " +
                              std::to_string(h.block) + " (" + std::to_string(b.pages) + " pages)");
  }
  uint64_t bit = block_first_page_[h.block] + h.page;
  uint64_t mask = 1ULL << (bit % 64);
  if (seen_[bit / 64] & mask) {
    return Status::Corruption("page " + std::to_string(h.page) + " of block " +
                              std::to_string(h.block) + " appears twice");
  }
  seen_[bit / 64] |= mask;
  const uint8_t* current = b.host + h.page * wire::kPageSize;
  switch (h.type) {
    case RecordType::kPageRaw:
      if (r.payload.size() != wire::kPageSize) {
        return Status::Corruption("PAGE_RAW payload is " + std::to_string(r.payload.size()) +
                                  " bytes, not one page");
      }
      break;
    case RecordType::kPageZero:
      if (!r.payload.empty()) return Status::Corruption("PAGE_ZERO carries a payload");
      break;
    case RecordType::kPageXorRle: {
      // The secondary's copy is the base of a delta: it has none before a FULL unit.
      if (full_) return Status::Corruption("PAGE_XOR_RLE in a FULL epoch or round");
      if (r.payload.size() < 4) return Status::Corruption("PAGE_XOR_RLE payload is truncated");
      if (r.payload.size() > wire::kMaxDeltaPayloadBytes) {
        return Status::Corruption("PAGE_XOR_RLE payload of " + std::to_string(r.payload.size()) +
                                  " bytes is larger than a delta may be");
      }
      auto runs = r.payload.subspan(4);
      LOCKSTEP_RETURN_IF_ERROR(ValidateXorRle(runs, wire::kPageSize));
      // The replica still holds epoch N-1 here, the base the delta was made against; a
      // wrong result means the two sides' copies diverged.
      if (XorRleResultCrc(runs, current, wire::kPageSize) != wire::GetU32(r.payload.data())) {
        return Status::Corruption("PAGE_XOR_RLE for page " + std::to_string(h.page) +
                                  " does not reproduce the primary's page: the replicas' "
                                  "copies diverged");
      }
      break;
    }
    default:
      break;
  }
  return Status::Ok();
}

Status EpochAssembler::FeedRecord(const RecordView& r, bool* committed) {
  const auto& h = r.header;
  if (!open_) {
    if (h.type != RecordType::kEpochBegin) {
      return Status::Corruption("expected EPOCH_BEGIN, got " +
                                wire::RecordTypeName(static_cast<uint16_t>(h.type)));
    }
    epoch_ = h.epoch;
    const bool full = (h.flags & wire::kFlagFullEpoch) != 0;
    const bool precopy = (h.flags & wire::kFlagPrecopy) != 0;
    if (precopy) {
      if (last_applied_ != 0) {
        return Status::Corruption("a pre-copy round after epoch " + std::to_string(last_applied_) +
                                  ": rounds come before epoch 1 only");
      }
      if (h.epoch != 0) return Status::Corruption("a pre-copy round must carry epoch 0");
      if (rounds_applied_ == 0 && !full) {
        return Status::Corruption("the first pre-copy round must be FULL");
      }
    } else {
      if (h.epoch != last_applied_ + 1) {
        return Status::Corruption("epoch " + std::to_string(h.epoch) + " arrived but " +
                                  std::to_string(last_applied_ + 1) + " is next (" +
                                  (h.epoch <= last_applied_ ? "replayed" : "out of order") + ")");
      }
      if (last_applied_ == 0 && !full && rounds_applied_ == 0) {
        return Status::Corruption(
            "the first epoch must be a FULL synchronization unless pre-copy rounds came first");
      }
    }
    wire::EpochBeginPayload p;
    LOCKSTEP_RETURN_IF_ERROR(wire::DecodeEpochBegin(r.payload, &p));
    if (precopy && p.device_bytes != 0) {
      return Status::Corruption("a pre-copy round announces device state");
    }
    if (full && p.page_count != total_pages_) {
      return Status::Corruption("FULL epoch announces " + std::to_string(p.page_count) +
                                " pages; the replica has " + std::to_string(total_pages_));
    }
    if (p.page_count > total_pages_) {
      return Status::Corruption("epoch announces more pages than the replica has");
    }
    if (p.device_bytes > max_device_bytes_) {
      return Status::Corruption("epoch announces " + std::to_string(p.device_bytes) +
                                " bytes of device state; at most " +
                                std::to_string(max_device_bytes_) + " were agreed");
    }
    std::fill(seen_.begin(), seen_.end(), 0);
    open_ = true;
    full_ = full;
    precopy_ = precopy;
    expected_pages_ = p.page_count;
    expected_device_bytes_ = p.device_bytes;
    pages_ = 0;
    device_bytes_ = 0;
    have_device_ = false;
    records_ = 1;
    epoch_crc_ = Crc32c(&h.crc, 4);
    return Status::Ok();
  }
  if (h.epoch != epoch_) {
    return Status::Corruption(wire::RecordTypeName(static_cast<uint16_t>(h.type)) +
                              " record of epoch " + std::to_string(h.epoch) + " inside epoch " +
                              std::to_string(epoch_));
  }
  switch (h.type) {
    case RecordType::kPageRaw:
    case RecordType::kPageZero:
    case RecordType::kPageXorRle:
      if (have_device_) return Status::Corruption("page record after DEVICE_STATE");
      if (++pages_ > expected_pages_) {
        return Status::Corruption("more page records than EPOCH_BEGIN announced (" +
                                  std::to_string(expected_pages_) + ")");
      }
      LOCKSTEP_RETURN_IF_ERROR(CheckPage(r));
      break;
    case RecordType::kDeviceState:
      if (have_device_) return Status::Corruption("a second DEVICE_STATE record");
      if (precopy_) return Status::Corruption("DEVICE_STATE in a pre-copy round");
      if (r.payload.size() != expected_device_bytes_) {
        return Status::Corruption("DEVICE_STATE has " + std::to_string(r.payload.size()) +
                                  " bytes; EPOCH_BEGIN announced " +
                                  std::to_string(expected_device_bytes_));
      }
      have_device_ = true;
      device_bytes_ = r.payload.size();
      break;
    case RecordType::kEpochCommit: {
      wire::EpochCommitPayload c;
      LOCKSTEP_RETURN_IF_ERROR(wire::DecodeEpochCommit(r.payload, &c));
      if (!have_device_ && !precopy_) {
        return Status::Corruption("EPOCH_COMMIT without DEVICE_STATE");
      }
      if (c.page_records != pages_ || pages_ != expected_pages_) {
        return Status::Corruption("EPOCH_COMMIT counts " + std::to_string(c.page_records) +
                                  " page records; " + std::to_string(pages_) + " arrived, " +
                                  std::to_string(expected_pages_) + " were announced");
      }
      if (c.device_bytes != device_bytes_ || c.record_count != records_) {
        return Status::Corruption("EPOCH_COMMIT record or device-state count disagrees");
      }
      if (c.epoch_crc != epoch_crc_) {
        return Status::Corruption("epoch checksum mismatch: records were lost or reordered");
      }
      *committed = true;
      return Status::Ok();
    }
    default:
      return Status::Corruption("unexpected " +
                                wire::RecordTypeName(static_cast<uint16_t>(h.type)) +
                                " record inside epoch " + std::to_string(epoch_));
  }
  ++records_;
  epoch_crc_ = Crc32cExtend(epoch_crc_, &h.crc, 4);
  return Status::Ok();
}

std::span<const uint8_t> EpochAssembler::Apply(std::span<const uint8_t> staged) {
  std::span<const uint8_t> device;
  // Every record was verified by Feed(): walk the headers without checking CRCs again.
  size_t o = 0;
  while (o + wire::kHeaderBytes <= staged.size()) {
    const uint8_t* p = staged.data() + o;
    auto type = static_cast<RecordType>(wire::GetU16(p));
    uint32_t block = wire::GetU32(p + 4);
    uint64_t page = wire::GetU64(p + 16);
    uint32_t len = wire::GetU32(p + 24);
    const uint8_t* payload = p + wire::kHeaderBytes;
    switch (type) {
      case RecordType::kPageRaw:
        std::memcpy(blocks_[block].host + page * wire::kPageSize, payload, wire::kPageSize);
        break;
      case RecordType::kPageZero:
        std::memset(blocks_[block].host + page * wire::kPageSize, 0, wire::kPageSize);
        break;
      case RecordType::kPageXorRle:
        ApplyXorRle({payload + 4, len - 4u}, blocks_[block].host + page * wire::kPageSize);
        break;
      case RecordType::kDeviceState:
        device = {payload, len};
        break;
      default:
        break;
    }
    o += wire::kHeaderBytes + len;
  }
  if (precopy_)
    ++rounds_applied_;
  else
    last_applied_ = epoch_;
  open_ = false;
  committed_ = false;
  return device;
}

}  // namespace lockstep
