// Corruption and fault-injection tests of the secondary's gatekeeper, over real epochs of a
// running simulated guest: flipped bits, truncation, lost, reordered, replayed and forged
// records are all rejected, and the replica's RAM never changes unless a whole, verified
// epoch is applied.
#include <catch2/catch.hpp>
#include <map>
#include <random>

#include "common/crc32c.h"
#include "epoch_assembler.h"
#include "epoch_capture.h"

using namespace lockstep;
using namespace lockstep::testing;

namespace {

GuestConfig SmallGuest() {
  GuestConfig c;
  c.blocks = {{"pc.ram", 2u << 20}, {"vga.vram", 256u << 10}, {"pc.bios", 64u << 10}};
  c.pages_per_step = 2;
  c.step_delay = std::chrono::microseconds(100);
  return c;
}

struct Fixture {
  SimulatedGuest primary{SmallGuest()};
  SimulatedGuest replica{SmallGuest()};
  std::vector<CapturedEpoch> epochs;
  std::vector<uint8_t> staged;

  explicit Fixture(bool delta = true) {
    primary.Boot();
    epochs = CaptureEpochs(primary, 6, delta, std::chrono::milliseconds(15));
    REQUIRE(epochs.size() == 6);
  }

  // Applies epochs [1, upto] to the replica through a fresh assembler, returns it.
  std::unique_ptr<EpochAssembler> ApplyThrough(uint64_t upto) {
    auto a = std::make_unique<EpochAssembler>(ReplicaBlocksOf(replica), 0);
    for (uint64_t e = 1; e <= upto; ++e) {
      auto r = FeedEpoch(*a, epochs[e - 1], &staged);
      REQUIRE(r.ok());
      REQUIRE(*r);
      a->Apply(staged);
      REQUIRE(replica.RamHash() == epochs[e - 1].ram_hash);
    }
    return a;
  }
};

// Splits each message into one message per record (records are whole in messages, so
// this is a valid way to send the same epoch).
std::vector<std::vector<uint8_t>> SplitRecords(const std::vector<std::vector<uint8_t>>& messages) {
  std::vector<std::vector<uint8_t>> out;
  for (const auto& m : messages) {
    wire::RecordReader reader(m);
    size_t at = 0;
    while (!reader.done()) {
      wire::RecordView r;
      REQUIRE(reader.Next(&r).ok());
      size_t len = wire::kHeaderBytes + r.payload.size();
      out.emplace_back(m.begin() + static_cast<long>(at), m.begin() + static_cast<long>(at + len));
      at += len;
    }
  }
  return out;
}

// Feeds `messages` as epoch data; true if any Feed committed.
bool Committed(EpochAssembler& a, const std::vector<std::vector<uint8_t>>& messages,
               Status* first_error) {
  for (const auto& m : messages) {
    auto r = a.Feed(m);
    if (!r.ok()) {
      *first_error = r.status();
      return false;
    }
    if (*r == EpochAssembler::Progress::kCommitted) return true;
  }
  return false;
}

}  // namespace

TEST_CASE("real epochs apply to an exact copy, with and without deltas", "[corruption]") {
  for (bool delta : {true, false}) {
    Fixture f(delta);
    f.ApplyThrough(6);
    // Every epoch record type went through the round trip (deltas only when enabled).
    std::map<wire::RecordType, int> seen;
    for (const auto& e : f.epochs) {
      for (const auto& m : e.messages) {
        wire::RecordReader reader(m);
        wire::RecordView r;
        while (!reader.done()) {
          REQUIRE(reader.Next(&r).ok());
          ++seen[r.header.type];
        }
      }
    }
    REQUIRE(seen[wire::RecordType::kEpochBegin] == 6);
    REQUIRE(seen[wire::RecordType::kEpochCommit] == 6);
    REQUIRE(seen[wire::RecordType::kDeviceState] == 6);
    REQUIRE(seen[wire::RecordType::kPageRaw] > 0);
    REQUIRE(seen[wire::RecordType::kPageZero] > 0);
    REQUIRE((seen[wire::RecordType::kPageXorRle] > 0) == delta);
  }
}

TEST_CASE("a flipped bit anywhere in an epoch is rejected and nothing is applied", "[corruption]") {
  Fixture f;
  auto base = f.ApplyThrough(3);
  const uint32_t before = f.replica.RamHash();
  const auto& victim = f.epochs[3];
  std::mt19937_64 rng(11);
  for (int trial = 0; trial < 300; ++trial) {
    auto msgs = victim.messages;
    auto& m = msgs[rng() % msgs.size()];
    size_t bit = rng() % (m.size() * 8);
    m[bit / 8] ^= static_cast<uint8_t>(1u << (bit % 8));
    EpochAssembler a(ReplicaBlocksOf(f.replica), 3);
    Status err;
    REQUIRE_FALSE(Committed(a, msgs, &err));
    REQUIRE(err.code() == Status::Code::kCorruption);
    REQUIRE(f.replica.RamHash() == before);
  }
}

TEST_CASE("a truncated epoch never commits", "[corruption]") {
  Fixture f;
  f.ApplyThrough(2);
  const uint32_t before = f.replica.RamHash();
  const auto& victim = f.epochs[2];
  std::mt19937_64 rng(5);
  for (int trial = 0; trial < 200; ++trial) {
    auto msgs = victim.messages;
    size_t keep = rng() % msgs.size();  // whole messages kept
    msgs.resize(keep + 1);
    auto& last = msgs.back();
    last.resize(rng() % last.size());  // the last one cut at any byte
    EpochAssembler a(ReplicaBlocksOf(f.replica), 2);
    Status err;
    REQUIRE_FALSE(Committed(a, msgs, &err));
    REQUIRE(f.replica.RamHash() == before);
  }
}

TEST_CASE("lost, reordered, replayed and skipped epochs are rejected", "[corruption]") {
  Fixture f;
  f.ApplyThrough(3);
  const uint32_t before = f.replica.RamHash();
  Status err;
  SECTION("replaying an applied epoch") {
    EpochAssembler a(ReplicaBlocksOf(f.replica), 3);
    REQUIRE_FALSE(Committed(a, f.epochs[2].messages, &err));
    REQUIRE(err.message().find("replayed") != std::string::npos);
  }
  SECTION("skipping an epoch") {
    EpochAssembler a(ReplicaBlocksOf(f.replica), 3);
    REQUIRE_FALSE(Committed(a, f.epochs[4].messages, &err));
    REQUIRE(err.message().find("out of order") != std::string::npos);
  }
  auto records = SplitRecords(f.epochs[3].messages);
  REQUIRE(records.size() >= 4);  // BEGIN, at least one page, DEVICE_STATE, COMMIT
  SECTION("the records, one per message, still commit") {
    EpochAssembler a(ReplicaBlocksOf(f.replica), 3);
    REQUIRE(Committed(a, records, &err));
  }
  SECTION("a record of another epoch spliced in") {
    auto other = SplitRecords(f.epochs[4].messages);
    records.insert(records.begin() + 1, other[1]);
    EpochAssembler a(ReplicaBlocksOf(f.replica), 3);
    REQUIRE_FALSE(Committed(a, records, &err));
    REQUIRE(err.message().find("inside epoch 4") != std::string::npos);
  }
  SECTION("any one record lost") {
    for (size_t drop = 0; drop + 1 < records.size(); ++drop) {
      auto msgs = records;
      msgs.erase(msgs.begin() + static_cast<long>(drop));
      EpochAssembler a(ReplicaBlocksOf(f.replica), 3);
      REQUIRE_FALSE(Committed(a, msgs, &err));
    }
  }
  SECTION("two records swapped") {
    for (size_t i = 0; i + 2 < records.size(); ++i) {
      auto msgs = records;
      std::swap(msgs[i], msgs[i + 1]);
      EpochAssembler a(ReplicaBlocksOf(f.replica), 3);
      REQUIRE_FALSE(Committed(a, msgs, &err));
    }
  }
  REQUIRE(f.replica.RamHash() == before);
}

TEST_CASE("well-formed but forged records are rejected", "[corruption]") {
  Fixture f;
  f.ApplyThrough(1);
  const uint32_t before = f.replica.RamHash();
  auto record = [](wire::RecordType t, uint64_t epoch, uint32_t block, uint64_t page,
                   std::vector<uint8_t> payload, uint16_t flags = 0) {
    std::vector<uint8_t> rec(wire::kHeaderBytes + payload.size());
    wire::RecordHeader h;
    h.type = t;
    h.epoch = epoch;
    h.block = block;
    h.page = page;
    h.flags = flags;
    wire::EncodeHeader(h, payload, rec.data());
    std::copy(payload.begin(), payload.end(), rec.begin() + wire::kHeaderBytes);
    return rec;
  };
  auto begin = [&](uint64_t pages) {
    std::vector<uint8_t> p(wire::kEpochBeginPayloadBytes);
    wire::EncodeEpochBegin({pages, 0}, p.data());
    return record(wire::RecordType::kEpochBegin, 2, 0, 0, p);
  };
  EpochAssembler a(ReplicaBlocksOf(f.replica), 1);
  Status err;
  SECTION("block out of range") {
    REQUIRE_FALSE(Committed(a, {begin(1), record(wire::RecordType::kPageZero, 2, 9, 0, {})}, &err));
    REQUIRE(err.message().find("RAM block 9") != std::string::npos);
  }
  SECTION("page out of range") {
    REQUIRE_FALSE(
        Committed(a, {begin(1), record(wire::RecordType::kPageZero, 2, 0, 1u << 30, {})}, &err));
    REQUIRE(err.message().find("outside RAM block") != std::string::npos);
  }
  SECTION("the same page twice") {
    REQUIRE_FALSE(Committed(a,
                            {begin(2), record(wire::RecordType::kPageZero, 2, 0, 5, {}),
                             record(wire::RecordType::kPageZero, 2, 0, 5, {})},
                            &err));
    REQUIRE(err.message().find("twice") != std::string::npos);
  }
  SECTION("more pages than announced") {
    REQUIRE_FALSE(Committed(a,
                            {begin(1), record(wire::RecordType::kPageZero, 2, 0, 5, {}),
                             record(wire::RecordType::kPageZero, 2, 0, 6, {})},
                            &err));
  }
  SECTION("a raw page of the wrong size") {
    REQUIRE_FALSE(Committed(
        a, {begin(1), record(wire::RecordType::kPageRaw, 2, 0, 5, std::vector<uint8_t>(100))},
        &err));
  }
  SECTION("a delta against a base the replica does not have") {
    std::vector<uint8_t> delta(4 + 4 + 8);
    wire::PutU32(delta.data(), 0x12345678);  // CRC of a page nobody has
    wire::PutU16(delta.data() + 4, 0);
    wire::PutU16(delta.data() + 6, 8);
    delta.resize(4 + 4 + 8 + 4);
    wire::PutU16(delta.data() + 16, 4096 - 8);
    wire::PutU16(delta.data() + 18, 0);
    REQUIRE_FALSE(
        Committed(a, {begin(1), record(wire::RecordType::kPageXorRle, 2, 0, 5, delta)}, &err));
    REQUIRE(err.message().find("diverged") != std::string::npos);
  }
  SECTION("a commit whose counts disagree") {
    std::vector<uint8_t> c(wire::kEpochCommitPayloadBytes);
    wire::EncodeEpochCommit({0, 0, 2, 0}, c.data());
    REQUIRE_FALSE(Committed(a,
                            {begin(0), record(wire::RecordType::kDeviceState, 2, 0, 0, {}),
                             record(wire::RecordType::kEpochCommit, 2, 0, 0, c)},
                            &err));
  }
  SECTION("more device state than agreed") {
    EpochAssembler small(ReplicaBlocksOf(f.replica), 1, 4096);
    std::vector<uint8_t> p(wire::kEpochBeginPayloadBytes);
    wire::EncodeEpochBegin({0, 4097}, p.data());
    REQUIRE_FALSE(Committed(small, {record(wire::RecordType::kEpochBegin, 2, 0, 0, p)}, &err));
    REQUIRE(err.message().find("were agreed") != std::string::npos);
  }
  SECTION("a delta larger than a delta may be") {
    std::vector<uint8_t> delta(wire::kMaxDeltaPayloadBytes + 8);
    REQUIRE_FALSE(
        Committed(a, {begin(1), record(wire::RecordType::kPageXorRle, 2, 0, 5, delta)}, &err));
    REQUIRE(err.message().find("larger than a delta") != std::string::npos);
  }
  SECTION("a first epoch that is not FULL") {
    EpochAssembler fresh(ReplicaBlocksOf(f.replica), 0);
    std::vector<uint8_t> p(wire::kEpochBeginPayloadBytes);
    wire::EncodeEpochBegin({0, 0}, p.data());
    REQUIRE_FALSE(Committed(fresh, {record(wire::RecordType::kEpochBegin, 1, 0, 0, p)}, &err));
    REQUIRE(err.message().find("FULL") != std::string::npos);
  }
  REQUIRE(f.replica.RamHash() == before);
}

namespace {

// Three pre-copy rounds of a running guest, then epochs 1..3 (epoch 1 not FULL).
struct PrecopyFixture {
  SimulatedGuest primary{SmallGuest()};
  SimulatedGuest replica{SmallGuest()};
  std::vector<CapturedEpoch> rounds, epochs;
  std::vector<uint8_t> staged;

  PrecopyFixture() {
    primary.Boot();
    auto all = CaptureEpochs(primary, 3, /*delta=*/true, std::chrono::milliseconds(15), 3);
    REQUIRE(all.size() == 6);
    rounds.assign(all.begin(), all.begin() + 3);
    epochs.assign(all.begin() + 3, all.end());
  }
};

uint16_t BeginFlags(const CapturedEpoch& e) {
  wire::RecordReader reader(e.messages.front());
  wire::RecordView r;
  REQUIRE(reader.Next(&r).ok());
  REQUIRE(r.header.type == wire::RecordType::kEpochBegin);
  return r.header.flags;
}

uint64_t BeginPages(const CapturedEpoch& e) {
  wire::RecordReader reader(e.messages.front());
  wire::RecordView r;
  REQUIRE(reader.Next(&r).ok());
  wire::EpochBeginPayload p;
  REQUIRE(wire::DecodeEpochBegin(r.payload, &p).ok());
  return p.page_count;
}

}  // namespace

TEST_CASE("pre-copy rounds then a partial epoch 1 make an exact copy", "[corruption][precopy]") {
  PrecopyFixture f;
  EpochAssembler a(ReplicaBlocksOf(f.replica), 0);
  REQUIRE(BeginFlags(f.rounds[0]) == (wire::kFlagFullEpoch | wire::kFlagPrecopy));
  REQUIRE(BeginFlags(f.rounds[1]) == wire::kFlagPrecopy);
  REQUIRE(BeginFlags(f.epochs[0]) == 0);  // epoch 1 carries only what the rounds left
  REQUIRE(BeginPages(f.epochs[0]) < a.total_pages() / 2);
  for (const auto& r : f.rounds) {
    for (const auto& m : r.messages) {
      auto p = a.Feed(m);
      REQUIRE(p.ok());
      f.staged.insert(f.staged.end(), m.begin(), m.end());
      if (*p == EpochAssembler::Progress::kRoundCommitted) {
        REQUIRE(a.Apply(f.staged).empty());  // no device state in a round
        f.staged.clear();
      } else {
        REQUIRE(*p == EpochAssembler::Progress::kNeedMore);
      }
    }
  }
  REQUIRE(a.rounds_applied() == 3);
  REQUIRE(a.last_applied() == 0);  // a round is no checkpoint
  for (const auto& e : f.epochs) {
    auto r = FeedEpoch(a, e, &f.staged);
    REQUIRE(r.ok());
    REQUIRE(*r);
    REQUIRE_FALSE(a.Apply(f.staged).empty());
    // Torn pages of the rounds were all sent again: the copy is the primary at the pause.
    REQUIRE(f.replica.RamHash() == e.ram_hash);
  }
}

TEST_CASE("pre-copy rounds out of place are refused and nothing is applied",
          "[corruption][precopy]") {
  PrecopyFixture f;
  SECTION("epoch 1 without the rounds it completes") {
    EpochAssembler a(ReplicaBlocksOf(f.replica), 0);
    const uint32_t before = f.replica.RamHash();
    auto r = FeedEpoch(a, f.epochs[0], &f.staged);
    REQUIRE_FALSE(r.ok());
    REQUIRE(r.status().message().find("FULL") != std::string::npos);
    REQUIRE(f.replica.RamHash() == before);
  }
  SECTION("a later round without the FULL first one") {
    EpochAssembler a(ReplicaBlocksOf(f.replica), 0);
    auto r = FeedEpoch(a, f.rounds[1], &f.staged);
    REQUIRE_FALSE(r.ok());
    REQUIRE(r.status().message().find("first pre-copy round must be FULL") != std::string::npos);
  }
  SECTION("a round after epoch 1") {
    EpochAssembler a(ReplicaBlocksOf(f.replica), 0);
    for (const auto& e : {f.rounds[0], f.rounds[1], f.rounds[2], f.epochs[0]}) {
      auto r = FeedEpoch(a, e, &f.staged);
      REQUIRE(r.ok());
      a.Apply(f.staged);
    }
    const uint32_t before = f.replica.RamHash();
    auto r = FeedEpoch(a, f.rounds[2], &f.staged);
    REQUIRE_FALSE(r.ok());
    REQUIRE(r.status().message().find("rounds come before epoch 1") != std::string::npos);
    REQUIRE(f.replica.RamHash() == before);
    // The stream is still good for the next real epoch.
    a.Discard();
    r = FeedEpoch(a, f.epochs[1], &f.staged);
    REQUIRE(r.ok());
  }
  SECTION("a flipped bit in a round") {
    EpochAssembler a(ReplicaBlocksOf(f.replica), 0);
    const uint32_t before = f.replica.RamHash();
    auto round = f.rounds[0];
    auto& m = round.messages[round.messages.size() / 2];
    m[m.size() / 3] ^= 0x04;
    auto r = FeedEpoch(a, round, &f.staged);
    REQUIRE_FALSE(r.ok());
    REQUIRE(f.replica.RamHash() == before);
  }
}
