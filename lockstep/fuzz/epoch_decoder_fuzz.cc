// libFuzzer target for the secondary's decoder (RecordReader + EpochAssembler + Apply).
//
// Random bytes rarely get past CRC32C, so besides raw input the target mutates two real
// epochs (a FULL one and a delta one, made by the real EpochStager/EpochStreamer) and can
// re-seal the mutated record's CRC, which drives the fuzzer into the semantic checks:
// bounds, counts, sequence, delta runs. Whatever the input, the decoder must not crash,
// and a rejected epoch must leave the replica as it was.
//
// Input: byte 0 = mode bits (0: raw bytes as one message; 1: re-seal CRCs; 2: mutate the
// delta epoch; 4: one message per record), then triples {u16 offset, u8 xor}, and a final
// u16 (if any) truncates the epoch to that many bytes.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/crc32c.h"
#include "epoch_assembler.h"
#include "epoch_stager.h"
#include "replication_channel/loopback.h"

using namespace lockstep;

namespace {

constexpr size_t kPages[2] = {12, 4};

// A hypervisor over plain memory whose every page is dirty at every sync.
class FuzzHypervisor final : public Hypervisor {
 public:
  FuzzHypervisor() {
    for (int b = 0; b < 2; ++b) ram_[b].assign(kPages[b] * wire::kPageSize, 0);
  }
  std::vector<RamBlock> RamBlocks() override {
    return {{"ram", ram_[0].data(), ram_[0].size()}, {"rom", ram_[1].data(), ram_[1].size()}};
  }
  Status StopVcpus() override { return Status::Ok(); }
  Status StartVcpus() override { return Status::Ok(); }
  Status StartDirtyLog() override { return Status::Ok(); }
  Status StopDirtyLog() override { return Status::Ok(); }
  Status SyncDirtyLog() override { return Status::Ok(); }
  Status TakeDirtyBitmap(size_t block, std::span<uint64_t> bitmap) override {
    bitmap[0] = (1ULL << kPages[block]) - 1;
    return Status::Ok();
  }
  Result<size_t> SaveDeviceState(std::span<uint8_t> out) override {
    std::memset(out.data(), 0xD5, 64);
    return size_t{64};
  }
  Status LoadDeviceState(std::span<const uint8_t>) override { return Status::Ok(); }
  void CloseOutputBarrier(uint64_t) override {}
  void ReleaseOutput(uint64_t) override {}
  void SetOutputMode(OutputMode) override {}
  Status Announce() override { return Status::Ok(); }
  std::vector<uint8_t> ram_[2];
};

struct Corpus {
  std::vector<uint8_t> epoch1, epoch2;  // each as the concatenation of its messages
  std::vector<uint8_t> replica_after1[2];
};

std::vector<uint8_t> Capture(FuzzHypervisor& hv, EpochStager& stager, EpochStreamer& streamer,
                             uint64_t epoch) {
  auto link = channel::LoopbackLink::Create();
  auto a = link->TakeA();
  auto b = link->TakeB();
  if (!stager.Capture(hv, epoch, epoch == 1).ok()) abort();
  StreamStats stats;
  if (!streamer.Send(stager, *a, &stats).ok()) abort();
  std::vector<uint8_t> all, buf(1 << 20);
  size_t n;
  while (b->Receive(buf, &n, std::chrono::microseconds(0)).ok())
    all.insert(all.end(), buf.begin(), buf.begin() + n);
  return all;
}

const Corpus& GetCorpus() {
  static Corpus* c = [] {
    auto* c = new Corpus;
    FuzzHypervisor hv;
    for (size_t i = 0; i < hv.ram_[0].size(); i += 8) hv.ram_[0][i] = static_cast<uint8_t>(i / 8);
    std::memset(hv.ram_[0].data() + 3 * wire::kPageSize, 0, wire::kPageSize);  // a zero page
    auto blocks = hv.RamBlocks();
    EpochStager stager(blocks, 4096);
    EpochStreamer streamer(blocks, true);
    c->epoch1 = Capture(hv, stager, streamer, 1);
    c->replica_after1[0] = hv.ram_[0];
    c->replica_after1[1] = hv.ram_[1];
    hv.ram_[0][100] ^= 0x5A;  // small changes: deltas
    hv.ram_[0][5 * wire::kPageSize + 17] ^= 1;
    c->epoch2 = Capture(hv, stager, streamer, 2);
    return c;
  }();
  return *c;
}

// Splits a concatenation of whole records into one message per record (stops at damage).
std::vector<std::vector<uint8_t>> PerRecord(const std::vector<uint8_t>& bytes) {
  std::vector<std::vector<uint8_t>> out;
  size_t at = 0;
  while (at + wire::kHeaderBytes <= bytes.size()) {
    size_t len = wire::kHeaderBytes + wire::GetU32(bytes.data() + at + 24);
    if (len > bytes.size() - at) break;
    out.emplace_back(bytes.begin() + at, bytes.begin() + at + len);
    at += len;
  }
  if (at < bytes.size()) out.emplace_back(bytes.begin() + at, bytes.end());
  return out;
}

// Recomputes the CRC of the record that contains `offset`, if the framing still holds.
void Reseal(std::vector<uint8_t>& bytes, size_t offset) {
  size_t at = 0;
  while (at + wire::kHeaderBytes <= bytes.size()) {
    size_t len = wire::kHeaderBytes + wire::GetU32(bytes.data() + at + 24);
    if (len > bytes.size() - at) return;
    if (offset < at + len) {
      uint32_t crc = Crc32cExtend(Crc32c(bytes.data() + at, 28), bytes.data() + at + 32, len - 32);
      wire::PutU32(bytes.data() + at + 28, crc);
      return;
    }
    at += len;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Corpus& corpus = GetCorpus();
  std::vector<uint8_t> ram[2] = {std::vector<uint8_t>(kPages[0] * wire::kPageSize),
                                 std::vector<uint8_t>(kPages[1] * wire::kPageSize)};
  std::vector<ReplicaBlock> blocks = {{ram[0].data(), kPages[0]}, {ram[1].data(), kPages[1]}};
  uint8_t mode = size > 0 ? data[0] : 0;
  std::vector<uint8_t> epoch;
  uint64_t last = 0;
  if (mode == 0) {
    epoch.assign(data + (size > 0), data + size);
  } else {
    bool second = mode & 2;
    if (second) {
      ram[0] = corpus.replica_after1[0];
      ram[1] = corpus.replica_after1[1];
      blocks = {{ram[0].data(), kPages[0]}, {ram[1].data(), kPages[1]}};
      last = 1;
    }
    epoch = second ? corpus.epoch2 : corpus.epoch1;
    size_t i = 1;
    for (; i + 3 <= size; i += 3) {
      size_t off = (data[i] | (data[i + 1] << 8)) % epoch.size();
      epoch[off] ^= data[i + 2];
      if (mode & 1) Reseal(epoch, off);
    }
    if (i + 2 <= size) epoch.resize((data[i] | (data[i + 1] << 8)) % (epoch.size() + 1));
  }
  std::vector<uint8_t> before0 = ram[0], before1 = ram[1];
  EpochAssembler assembler(blocks, last);
  std::vector<std::vector<uint8_t>> messages;
  if (mode & 4)
    messages = PerRecord(epoch);
  else
    messages.push_back(epoch);
  std::vector<uint8_t> staged;
  for (const auto& m : messages) {
    auto r = assembler.Feed(m);
    if (!r.ok()) break;
    staged.insert(staged.end(), m.begin(), m.end());
    if (*r != EpochAssembler::Progress::kNeedMore) {  // an epoch, or a pre-copy round
      assembler.Apply(staged);
      return 0;
    }
  }
  // Not committed: nothing may have changed.
  if (ram[0] != before0 || ram[1] != before1) abort();
  return 0;
}
