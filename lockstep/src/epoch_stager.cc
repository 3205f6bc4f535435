#include "epoch_stager.h"

#include <sys/mman.h>

#include <bit>
#include <cstring>
#include <new>
#include <string>

#include "common/crc32c.h"
#include "page_codec.h"

namespace lockstep {

using wire::kHeaderBytes;
using wire::kPageSize;
using wire::RecordType;

PageArena::PageArena(size_t bytes) : size_(bytes) {
  if (bytes == 0) return;
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();  // setup only; constructors have no Status
  data_ = static_cast<uint8_t*>(p);
}

PageArena::~PageArena() {
  if (data_) munmap(data_, size_);
}

PageArena::PageArena(PageArena&& o) noexcept : data_(o.data_), size_(o.size_) {
  o.data_ = nullptr;
  o.size_ = 0;
}

PageArena& PageArena::operator=(PageArena&& o) noexcept {
  if (this != &o) {
    if (data_) munmap(data_, size_);
    data_ = o.data_;
    size_ = o.size_;
    o.data_ = nullptr;
    o.size_ = 0;
  }
  return *this;
}

namespace {
uint64_t TotalPages(const std::vector<RamBlock>& blocks) {
  uint64_t n = 0;
  for (const auto& b : blocks) n += b.length / kPageSize;
  return n;
}
}  // namespace

EpochStager::EpochStager(const std::vector<RamBlock>& blocks, size_t max_device_bytes)
    : blocks_(blocks),
      pages_(TotalPages(blocks) * kPageSize),
      refs_(TotalPages(blocks)),
      device_(max_device_bytes) {
  for (const auto& b : blocks_) bitmaps_.emplace_back((b.length / kPageSize + 63) / 64, 0);
}

Status EpochStager::TakeDirtySet(Hypervisor& hv, bool full) {
  count_ = 0;
  LOCKSTEP_RETURN_IF_ERROR(hv.SyncDirtyLog());
  for (size_t b = 0; b < blocks_.size(); ++b) {
    auto& bm = bitmaps_[b];
    std::fill(bm.begin(), bm.end(), 0);
    // Always drain the log, so a FULL capture starts the next epoch clean.
    LOCKSTEP_RETURN_IF_ERROR(hv.TakeDirtyBitmap(b, bm));
    const uint64_t npages = blocks_[b].length / kPageSize;
    if (full) {
      for (uint64_t p = 0; p < npages; ++p) refs_[count_++] = {static_cast<uint32_t>(b), p};
      continue;
    }
    for (size_t w = 0; w < bm.size(); ++w) {
      uint64_t word = bm[w];
      while (word) {
        uint64_t p = w * 64 + static_cast<uint64_t>(std::countr_zero(word));
        word &= word - 1;
        if (p >= npages) break;  // bits past the end of the block: ignore
        refs_[count_++] = {static_cast<uint32_t>(b), p};
      }
    }
  }
  return Status::Ok();
}

void EpochStager::CopyTakenPages() {
  // refs_ is in block and page order: copy runs of consecutive pages with one memcpy each.
  size_t i = 0;
  while (i < count_) {
    size_t j = i + 1;
    while (j < count_ && refs_[j].block == refs_[i].block &&
           refs_[j].page == refs_[i].page + (j - i))
      ++j;
    std::memcpy(pages_.data() + i * kPageSize,
                blocks_[refs_[i].block].host + refs_[i].page * kPageSize, (j - i) * kPageSize);
    i = j;
  }
}

Status EpochStager::TakeRound(Hypervisor& hv, bool full) {
  epoch_ = 0;
  full_ = full;
  precopy_ = true;
  device_len_ = 0;
  return TakeDirtySet(hv, full);
}

void EpochStager::CopyRound() { CopyTakenPages(); }

Status EpochStager::Capture(Hypervisor& hv, uint64_t epoch, bool full) {
  epoch_ = epoch;
  full_ = full;
  precopy_ = false;
  LOCKSTEP_RETURN_IF_ERROR(TakeDirtySet(hv, full));
  CopyTakenPages();
  Result<size_t> dev = hv.SaveDeviceState({device_.data(), device_.size()});
  if (!dev.ok()) return dev.status().WithContext("saving device state");
  if (*dev > wire::kMaxPayloadBytes) {
    return Status::ResourceExhausted("device state of " + std::to_string(*dev) +
                                     " bytes exceeds the wire format's record limit");
  }
  device_len_ = *dev;
  return Status::Ok();
}

// ---- EpochStreamer --------------------------------------------------------------------

namespace {
// A delta is worth sending only when it is clearly smaller than the raw page.
constexpr size_t kMaxDeltaBytes = kPageSize / 2;
// Headers per batch: one per page plus BEGIN, DEVICE_STATE and COMMIT with payloads.
constexpr size_t kHeaderSlot = kHeaderBytes + 32;
}  // namespace

EpochStreamer::EpochStreamer(const std::vector<RamBlock>& blocks, bool delta)
    : delta_(delta),
      blocks_(blocks),
      headers_((kBatchPages + 4) * kHeaderSlot),
      deltas_(kBatchPages * (4 + kMaxDeltaBytes)),
      gather_(2 * (kBatchPages + 4)) {
  if (delta_) {
    for (const auto& b : blocks_) shadow_.emplace_back(b.length);
  }
}

Status EpochStreamer::Register(channel::Channel& channel, const EpochStager& stager) {
  LOCKSTEP_RETURN_IF_ERROR(channel.RegisterMemory(headers_.data(), headers_.size()));
  LOCKSTEP_RETURN_IF_ERROR(channel.RegisterMemory(deltas_.data(), deltas_.size()));
  auto pm = stager.page_memory();
  if (!pm.empty()) LOCKSTEP_RETURN_IF_ERROR(channel.RegisterMemory(pm.data(), pm.size()));
  auto dm = stager.device_memory();
  if (!dm.empty()) LOCKSTEP_RETURN_IF_ERROR(channel.RegisterMemory(dm.data(), dm.size()));
  return Status::Ok();
}

uint8_t* EpochStreamer::NextHeader() { return headers_.data() + (nheaders_++) * kHeaderSlot; }

Status EpochStreamer::Flush(channel::Channel& channel, StreamStats* stats) {
  if (ngather_ == 0) return Status::Ok();
  size_t bytes = 0;
  for (size_t i = 0; i < ngather_; ++i) bytes += gather_[i].size;
  uint64_t seq = 0;
  LOCKSTEP_RETURN_IF_ERROR(channel.Send({gather_.data(), ngather_}, &seq));
  // The batch buffers are reused next: wait until the transport is done with them.
  LOCKSTEP_RETURN_IF_ERROR(channel.WaitForCompletion(seq, std::chrono::seconds(30)));
  stats->bytes += bytes;
  nheaders_ = 0;
  delta_used_ = 0;
  ngather_ = 0;
  return Status::Ok();
}

Status EpochStreamer::Send(const EpochStager& stager, channel::Channel& channel,
                           StreamStats* stats) {
  const uint64_t epoch = stager.epoch();
  epoch_crc_ = 0;
  records_ = 0;
  nheaders_ = delta_used_ = ngather_ = 0;

  auto add_record = [&](wire::RecordHeader& h, std::span<const uint8_t> payload) {
    uint8_t* hdr = NextHeader();
    wire::EncodeHeader(h, payload, hdr);
    gather_[ngather_++] = {hdr, kHeaderBytes};
    if (!payload.empty()) gather_[ngather_++] = {payload.data(), payload.size()};
    epoch_crc_ = records_ == 0 ? Crc32c(&h.crc, 4) : Crc32cExtend(epoch_crc_, &h.crc, 4);
    ++records_;
  };

  // EPOCH_BEGIN: its payload lives in the header slot right after the header.
  {
    wire::RecordHeader h;
    h.type = RecordType::kEpochBegin;
    h.flags = static_cast<uint16_t>((stager.full() ? wire::kFlagFullEpoch : 0) |
                                    (stager.precopy() ? wire::kFlagPrecopy : 0));
    h.epoch = epoch;
    uint8_t* slot = headers_.data() + nheaders_ * kHeaderSlot;
    wire::EncodeEpochBegin(
        {stager.page_count(), static_cast<uint32_t>(stager.device_state().size())},
        slot + kHeaderBytes);
    add_record(h, {slot + kHeaderBytes, wire::kEpochBeginPayloadBytes});
  }

  const bool use_delta = delta_ && !stager.full();
  for (size_t i = 0; i < stager.page_count(); ++i) {
    if (nheaders_ >= kBatchPages) LOCKSTEP_RETURN_IF_ERROR(Flush(channel, stats));
    const PageRef& ref = stager.ref(i);
    const uint8_t* page = stager.page(i);
    uint8_t* shadow = delta_ ? shadow_[ref.block].data() + ref.page * kPageSize : nullptr;
    wire::RecordHeader h;
    h.block = ref.block;
    h.page = ref.page;
    h.epoch = epoch;
    if (IsZeroPage(page, kPageSize)) {
      h.type = RecordType::kPageZero;
      add_record(h, {});
      ++stats->zero_pages;
      if (shadow) std::memset(shadow, 0, kPageSize);
      continue;
    }
    if (use_delta && DeltaLikelyPays(page, shadow, kPageSize)) {
      uint8_t* out = deltas_.data() + delta_used_;
      size_t n = EncodeXorRle(page, shadow, kPageSize, {out + 4, kMaxDeltaBytes});
      if (n != 0) {
        wire::PutU32(out, Crc32c(page, kPageSize));
        delta_used_ += 4 + n;
        h.type = RecordType::kPageXorRle;
        add_record(h, {out, 4 + n});
        ++stats->delta_pages;
        std::memcpy(shadow, page, kPageSize);
        continue;
      }
    }
    h.type = RecordType::kPageRaw;
    add_record(h, {page, kPageSize});
    ++stats->raw_pages;
    if (shadow) std::memcpy(shadow, page, kPageSize);
  }

  if (!stager.precopy()) {
    wire::RecordHeader h;
    h.type = RecordType::kDeviceState;
    h.epoch = epoch;
    add_record(h, stager.device_state());
  }
  {
    wire::RecordHeader h;
    h.type = RecordType::kEpochCommit;
    h.epoch = epoch;
    uint8_t* slot = headers_.data() + nheaders_ * kHeaderSlot;
    wire::EncodeEpochCommit(
        {stager.page_count(), stager.device_state().size(), records_, epoch_crc_},
        slot + kHeaderBytes);
    add_record(h, {slot + kHeaderBytes, wire::kEpochCommitPayloadBytes});
  }
  return Flush(channel, stats);
}

}  // namespace lockstep
