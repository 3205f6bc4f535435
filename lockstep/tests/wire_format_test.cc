#include "lockstep/wire_format.h"

#include <catch2/catch.hpp>

using namespace lockstep;
using namespace lockstep::wire;

namespace {
RecordView ReadOne(const std::vector<uint8_t>& rec) {
  RecordReader reader(rec);
  RecordView r;
  REQUIRE(reader.Next(&r).ok());
  REQUIRE(reader.done());
  return r;
}
}  // namespace

TEST_CASE("HELLO round-trips with layout and pairing", "[wire]") {
  Hello h;
  h.pairing_id[0] = 0xAB;
  h.pairing_id[15] = 0x01;
  h.witness_term = 42;
  h.max_device_state_bytes = 1 << 20;
  h.vm_id = "web-1";
  h.host_id = "hostA";
  h.blocks = {{"pc.ram", 256u << 20}, {"pc.bios", 256u << 10}};
  h.nonce[0] = 7;
  h.nonce[31] = 9;
  auto rec = EncodeHello(h);
  Hello out;
  REQUIRE(DecodeHello(ReadOne(rec), &out).ok());
  REQUIRE(out.nonce == h.nonce);
  REQUIRE(out.pairing_id == h.pairing_id);
  REQUIRE(out.witness_term == 42);
  REQUIRE(out.max_device_state_bytes == 1u << 20);
  REQUIRE(out.vm_id == "web-1");
  REQUIRE(out.host_id == "hostA");
  REQUIRE(out.blocks == h.blocks);
  REQUIRE(out.version == kWireVersion);
}

TEST_CASE("HELLO_REPLY round-trips", "[wire]") {
  HelloReply r{kWireVersion, false, "hostB", "the guest configurations differ", {}, {}};
  r.nonce[3] = 1;
  r.proof[30] = 2;
  HelloReply out;
  REQUIRE(DecodeHelloReply(ReadOne(EncodeHelloReply(r)), &out).ok());
  REQUIRE(out.nonce == r.nonce);
  REQUIRE(out.proof == r.proof);
  REQUIRE_FALSE(out.accepted);
  REQUIRE(out.host_id == "hostB");
  REQUIRE(out.reason == r.reason);
}

TEST_CASE("AUTH round-trips, and a short one is refused", "[wire]") {
  Proof p{};
  p[0] = 0x5A;
  Proof out{};
  REQUIRE(DecodeAuth(ReadOne(EncodeAuth(p)), &out).ok());
  REQUIRE(out == p);
  auto rec = EncodeReasonRecord(RecordType::kError, "x");
  REQUIRE(DecodeAuth(ReadOne(rec), &out).code() == Status::Code::kCorruption);
}

TEST_CASE("a HELLO of another version is refused with both versions named", "[wire]") {
  Hello h;
  h.version = kWireVersion + 1;
  Hello out;
  Status s = DecodeHello(ReadOne(EncodeHello(h)), &out);
  REQUIRE(s.code() == Status::Code::kVersionMismatch);
  REQUIRE(out.version == kWireVersion + 1);
  REQUIRE(s.message().find("version " + std::to_string(kWireVersion + 1)) != std::string::npos);
  REQUIRE(s.message().find("speaks version " + std::to_string(kWireVersion)) != std::string::npos);
}

TEST_CASE("a HELLO without the magic is not taken for lockstep", "[wire]") {
  Hello h;
  auto rec = EncodeHello(h);
  rec[kHeaderBytes] ^= 0xFF;  // break the magic, then fix the CRC so only the magic is wrong
  RecordHeader hdr;
  hdr.type = RecordType::kHello;
  EncodeHeader(hdr, {rec.data() + kHeaderBytes, rec.size() - kHeaderBytes}, rec.data());
  Hello out;
  Status s = DecodeHello(ReadOne(rec), &out);
  REQUIRE(s.code() == Status::Code::kCorruption);
  REQUIRE(s.message().find("magic") != std::string::npos);
}

TEST_CASE("epoch begin and commit payloads round-trip", "[wire]") {
  uint8_t b[kEpochBeginPayloadBytes];
  EncodeEpochBegin({12345, 8192}, b);
  EpochBeginPayload bp;
  REQUIRE(DecodeEpochBegin(b, &bp).ok());
  REQUIRE(bp.page_count == 12345);
  REQUIRE(bp.device_bytes == 8192);
  REQUIRE_FALSE(DecodeEpochBegin({b, 15}, &bp).ok());

  uint8_t c[kEpochCommitPayloadBytes];
  EncodeEpochCommit({7, 8192, 10, 0xDEADBEEF}, c);
  EpochCommitPayload cp;
  REQUIRE(DecodeEpochCommit(c, &cp).ok());
  REQUIRE(cp.page_records == 7);
  REQUIRE(cp.device_bytes == 8192);
  REQUIRE(cp.record_count == 10);
  REQUIRE(cp.epoch_crc == 0xDEADBEEF);
}

TEST_CASE("control records round-trip", "[wire]") {
  uint8_t buf[kControlRecordBytes];
  size_t n = EncodeAck(77, buf);
  RecordReader ack({buf, n});
  RecordView r;
  REQUIRE(ack.Next(&r).ok());
  REQUIRE(r.header.type == RecordType::kAck);
  REQUIRE(r.header.epoch == 77);

  n = EncodeHeartbeat(99, buf);
  RecordReader hb({buf, n});
  REQUIRE(hb.Next(&r).ok());
  REQUIRE(r.header.type == RecordType::kHeartbeat);
  REQUIRE(GetU64(r.payload.data()) == 99);

  n = EncodeGoodbyeAck(buf);
  RecordReader gack({buf, n});
  REQUIRE(gack.Next(&r).ok());
  REQUIRE(r.header.type == RecordType::kGoodbyeAck);

  auto bye = EncodeReasonRecord(RecordType::kGoodbye, "maintenance");
  RecordView g = ReadOne(bye);
  REQUIRE(g.header.type == RecordType::kGoodbye);
  REQUIRE(DecodeReason(g) == "maintenance");
}

TEST_CASE("the record reader rejects damage of every kind", "[wire]") {
  uint8_t buf[kControlRecordBytes];
  size_t n = EncodeHeartbeat(5, buf);
  RecordView r;
  SECTION("a flipped bit anywhere") {
    for (size_t bit = 0; bit < n * 8; ++bit) {
      uint8_t copy[kControlRecordBytes];
      std::memcpy(copy, buf, n);
      copy[bit / 8] ^= static_cast<uint8_t>(1u << (bit % 8));
      RecordReader reader({copy, n});
      REQUIRE_FALSE(reader.Next(&r).ok());
    }
  }
  SECTION("every truncation") {
    for (size_t len = 0; len < n; ++len) {
      RecordReader reader({buf, len});
      REQUIRE_FALSE(reader.Next(&r).ok());
    }
  }
  SECTION("an unknown type, even with a good CRC") {
    RecordHeader h;
    h.type = static_cast<RecordType>(77);
    uint8_t rec[kHeaderBytes];
    EncodeHeader(h, {}, rec);
    RecordReader reader({rec, kHeaderBytes});
    Status s = reader.Next(&r);
    REQUIRE(s.code() == Status::Code::kCorruption);
    REQUIRE(s.message().find("type 77") != std::string::npos);
  }
}
