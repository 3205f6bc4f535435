#include "lockstep/wire_format.h"

#include <string_view>

#include "common/crc32c.h"

namespace lockstep::wire {

std::string RecordTypeName(uint16_t type) {
  switch (static_cast<RecordType>(type)) {
    case RecordType::kHello:
      return "HELLO";
    case RecordType::kHelloReply:
      return "HELLO_REPLY";
    case RecordType::kAuth:
      return "AUTH";
    case RecordType::kEpochBegin:
      return "EPOCH_BEGIN";
    case RecordType::kPageRaw:
      return "PAGE_RAW";
    case RecordType::kPageZero:
      return "PAGE_ZERO";
    case RecordType::kPageXorRle:
      return "PAGE_XOR_RLE";
    case RecordType::kDeviceState:
      return "DEVICE_STATE";
    case RecordType::kEpochCommit:
      return "EPOCH_COMMIT";
    case RecordType::kAck:
      return "ACK";
    case RecordType::kHeartbeat:
      return "HEARTBEAT";
    case RecordType::kGoodbye:
      return "GOODBYE";
    case RecordType::kError:
      return "ERROR";
    case RecordType::kGoodbyeAck:
      return "GOODBYE_ACK";
    case RecordType::kHandover:
      return "HANDOVER";
    case RecordType::kHandoverReply:
      return "HANDOVER_REPLY";
  }
  return "type " + std::to_string(type);
}

namespace {

bool KnownType(uint16_t t) { return RecordTypeName(t).rfind("type ", 0) != 0; }

void PutHeaderFields(const RecordHeader& h, uint8_t* out) {
  PutU16(out + 0, static_cast<uint16_t>(h.type));
  PutU16(out + 2, h.flags);
  PutU32(out + 4, h.block);
  PutU64(out + 8, h.epoch);
  PutU64(out + 16, h.page);
  PutU32(out + 24, h.payload_len);
}

// A little writer for the handshake and reason payloads (off the hot path).
class PayloadWriter {
 public:
  void U8(uint8_t v) { buf_.push_back(v); }
  void U32(uint32_t v) { Append(&v, 4); }
  void U64(uint64_t v) { Append(&v, 8); }
  void Bytes(const void* p, size_t n) { Append(p, n); }
  void Str(std::string_view s) {
    uint16_t n = static_cast<uint16_t>(s.size() > 0xFFFF ? 0xFFFF : s.size());
    Append(&n, 2);
    Append(s.data(), n);
  }
  // Prepends the header and returns the whole record.
  std::vector<uint8_t> Finish(RecordType type, uint64_t epoch = 0, uint16_t flags = 0) {
    std::vector<uint8_t> rec(kHeaderBytes + buf_.size());
    RecordHeader h;
    h.type = type;
    h.epoch = epoch;
    h.flags = flags;
    h.payload_len = static_cast<uint32_t>(buf_.size());
    EncodeHeader(h, buf_, rec.data());
    std::memcpy(rec.data() + kHeaderBytes, buf_.data(), buf_.size());
    return rec;
  }

 private:
  void Append(const void* p, size_t n) {
    auto* b = static_cast<const uint8_t*>(p);
    buf_.insert(buf_.end(), b, b + n);
  }
  std::vector<uint8_t> buf_;
};

// Bounds-checked reader of a payload; every getter fails once the payload is exhausted.
class PayloadReader {
 public:
  explicit PayloadReader(std::span<const uint8_t> p) : p_(p) {}
  bool U8(uint8_t* v) { return Take(v, 1); }
  bool U32(uint32_t* v) { return Take(v, 4); }
  bool U64(uint64_t* v) { return Take(v, 8); }
  bool Bytes(void* v, size_t n) { return Take(v, n); }
  bool Str(std::string* s) {
    uint16_t n;
    if (!Take(&n, 2) || n > p_.size()) return false;
    s->assign(reinterpret_cast<const char*>(p_.data()), n);
    p_ = p_.subspan(n);
    return true;
  }
  size_t left() const { return p_.size(); }

 private:
  bool Take(void* v, size_t n) {
    if (p_.size() < n) return false;
    std::memcpy(v, p_.data(), n);
    p_ = p_.subspan(n);
    return true;
  }
  std::span<const uint8_t> p_;
};

Status ExpectType(const RecordView& r, RecordType t) {
  if (r.header.type != t) {
    return Status::Corruption("expected a " + RecordTypeName(static_cast<uint16_t>(t)) +
                              " record, got " +
                              RecordTypeName(static_cast<uint16_t>(r.header.type)));
  }
  return Status::Ok();
}

// Reads magic and version, which every version keeps at the start of its handshake.
Status ReadMagicAndVersion(PayloadReader& in, uint32_t* version, std::string_view what) {
  uint64_t magic;
  if (!in.U64(&magic) || !in.U32(version)) {
    return Status::Corruption(std::string(what) + " is too short to be a lockstep handshake");
  }
  if (magic != kMagic) {
    return Status::Corruption(std::string(what) +
                              " does not start with the lockstep magic: the peer is not a "
                              "lockstep replica (check the address)");
  }
  if (*version != kWireVersion) {
    return Status::VersionMismatch(std::string(what) + ": the peer speaks wire format version " +
                                   std::to_string(*version) + ", this build speaks version " +
                                   std::to_string(kWireVersion) +
                                   "; run the same lockstep release on both hosts");
  }
  return Status::Ok();
}

}  // namespace

void EncodeHeader(RecordHeader& h, std::span<const uint8_t> payload, uint8_t out[kHeaderBytes]) {
  h.payload_len = static_cast<uint32_t>(payload.size());
  PutHeaderFields(h, out);
  uint32_t crc = Crc32c(out, 28);
  if (!payload.empty()) crc = Crc32cExtend(crc, payload.data(), payload.size());
  h.crc = crc;
  PutU32(out + 28, crc);
}

Status RecordReader::Next(RecordView* out) {
  if (rest_.size() < kHeaderBytes) {
    return Status::Corruption("truncated record header: " + std::to_string(rest_.size()) +
                              " bytes left, a header needs " + std::to_string(kHeaderBytes));
  }
  const uint8_t* p = rest_.data();
  RecordHeader& h = out->header;
  uint16_t type = GetU16(p);
  if (!KnownType(type)) {
    return Status::Corruption("unknown record " + RecordTypeName(type));
  }
  h.type = static_cast<RecordType>(type);
  h.flags = GetU16(p + 2);
  h.block = GetU32(p + 4);
  h.epoch = GetU64(p + 8);
  h.page = GetU64(p + 16);
  h.payload_len = GetU32(p + 24);
  h.crc = GetU32(p + 28);
  if (h.payload_len > kMaxPayloadBytes || h.payload_len > rest_.size() - kHeaderBytes) {
    return Status::Corruption(RecordTypeName(type) + " record of epoch " + std::to_string(h.epoch) +
                              " claims " + std::to_string(h.payload_len) +
                              " payload bytes but only " +
                              std::to_string(rest_.size() - kHeaderBytes) + " follow");
  }
  uint32_t crc = Crc32cExtend(Crc32c(p, 28), p + kHeaderBytes, h.payload_len);
  if (crc != h.crc) {
    return Status::Corruption(RecordTypeName(type) + " record of epoch " + std::to_string(h.epoch) +
                              " failed its CRC32C check");
  }
  out->payload = rest_.subspan(kHeaderBytes, h.payload_len);
  rest_ = rest_.subspan(kHeaderBytes + h.payload_len);
  return Status::Ok();
}

const char* LinkProtectionName(LinkProtection p) {
  switch (p) {
    case LinkProtection::kNone:
      return "none";
    case LinkProtection::kMac:
      return "mac";
    case LinkProtection::kEncrypt:
      return "aes-gcm";
  }
  return "?";
}

std::vector<uint8_t> EncodeHello(const Hello& hello) {
  PayloadWriter w;
  w.U64(kMagic);
  w.U32(hello.version);
  w.U32(hello.page_size);
  w.Bytes(hello.pairing_id.data(), hello.pairing_id.size());
  w.U64(hello.witness_term);
  w.U32(hello.max_device_state_bytes);
  w.Str(hello.vm_id);
  w.Str(hello.host_id);
  w.U32(static_cast<uint32_t>(hello.blocks.size()));
  for (const auto& b : hello.blocks) {
    w.Str(b.id);
    w.U64(b.length);
  }
  w.Bytes(hello.nonce.data(), hello.nonce.size());
  w.U8(hello.link_protection);
  return w.Finish(RecordType::kHello);
}

Status DecodeHello(const RecordView& record, Hello* out) {
  LOCKSTEP_RETURN_IF_ERROR(ExpectType(record, RecordType::kHello));
  PayloadReader in(record.payload);
  LOCKSTEP_RETURN_IF_ERROR(ReadMagicAndVersion(in, &out->version, "HELLO"));
  uint32_t nblocks = 0;
  if (!in.U32(&out->page_size) || !in.Bytes(out->pairing_id.data(), out->pairing_id.size()) ||
      !in.U64(&out->witness_term) || !in.U32(&out->max_device_state_bytes) ||
      !in.Str(&out->vm_id) || !in.Str(&out->host_id) || !in.U32(&nblocks)) {
    return Status::Corruption("HELLO payload is truncated");
  }
  // Each block needs at least 10 bytes; this bounds the allocation below.
  if (nblocks > in.left() / 10) return Status::Corruption("HELLO claims too many RAM blocks");
  out->blocks.resize(nblocks);
  for (auto& b : out->blocks) {
    if (!in.Str(&b.id) || !in.U64(&b.length)) {
      return Status::Corruption("HELLO RAM block list is truncated");
    }
  }
  if (!in.Bytes(out->nonce.data(), out->nonce.size())) {
    return Status::Corruption("HELLO has no nonce");
  }
  if (!in.U8(&out->link_protection)) return Status::Corruption("HELLO has no link protection");
  if (out->link_protection > static_cast<uint8_t>(LinkProtection::kEncrypt)) {
    return Status::Corruption("HELLO asks for an unknown link protection " +
                              std::to_string(out->link_protection));
  }
  if (in.left() != 0) return Status::Corruption("HELLO has trailing bytes");
  return Status::Ok();
}

std::vector<uint8_t> EncodeHelloReply(const HelloReply& reply) {
  PayloadWriter w;
  w.U64(kMagic);
  w.U32(reply.version);
  w.U8(reply.accepted ? 1 : 0);
  w.Str(reply.host_id);
  w.Str(reply.reason);
  w.Bytes(reply.nonce.data(), reply.nonce.size());
  w.Bytes(reply.proof.data(), reply.proof.size());
  return w.Finish(RecordType::kHelloReply);
}

Status DecodeHelloReply(const RecordView& record, HelloReply* out) {
  LOCKSTEP_RETURN_IF_ERROR(ExpectType(record, RecordType::kHelloReply));
  PayloadReader in(record.payload);
  LOCKSTEP_RETURN_IF_ERROR(ReadMagicAndVersion(in, &out->version, "HELLO_REPLY"));
  uint8_t accepted;
  if (!in.U8(&accepted) || !in.Str(&out->host_id) || !in.Str(&out->reason) ||
      !in.Bytes(out->nonce.data(), out->nonce.size()) ||
      !in.Bytes(out->proof.data(), out->proof.size()) || in.left() != 0) {
    return Status::Corruption("HELLO_REPLY payload is malformed");
  }
  out->accepted = accepted == 1;
  return Status::Ok();
}

std::vector<uint8_t> EncodeAuth(const Proof& proof) {
  PayloadWriter w;
  w.Bytes(proof.data(), proof.size());
  return w.Finish(RecordType::kAuth);
}

Status DecodeAuth(const RecordView& record, Proof* out) {
  LOCKSTEP_RETURN_IF_ERROR(ExpectType(record, RecordType::kAuth));
  if (record.payload.size() != out->size()) {
    return Status::Corruption("AUTH payload has " + std::to_string(record.payload.size()) +
                              " bytes, expected " + std::to_string(out->size()));
  }
  std::memcpy(out->data(), record.payload.data(), out->size());
  return Status::Ok();
}

void EncodeEpochBegin(const EpochBeginPayload& p, uint8_t out[kEpochBeginPayloadBytes]) {
  PutU64(out, p.page_count);
  PutU32(out + 8, p.device_bytes);
  PutU32(out + 12, 0);
}

Status DecodeEpochBegin(std::span<const uint8_t> payload, EpochBeginPayload* out) {
  if (payload.size() != kEpochBeginPayloadBytes) {
    return Status::Corruption("EPOCH_BEGIN payload has " + std::to_string(payload.size()) +
                              " bytes, expected " + std::to_string(kEpochBeginPayloadBytes));
  }
  out->page_count = GetU64(payload.data());
  out->device_bytes = GetU32(payload.data() + 8);
  return Status::Ok();
}

void EncodeEpochCommit(const EpochCommitPayload& p, uint8_t out[kEpochCommitPayloadBytes]) {
  PutU64(out, p.page_records);
  PutU64(out + 8, p.device_bytes);
  PutU32(out + 16, p.record_count);
  PutU32(out + 20, p.epoch_crc);
}

Status DecodeEpochCommit(std::span<const uint8_t> payload, EpochCommitPayload* out) {
  if (payload.size() != kEpochCommitPayloadBytes) {
    return Status::Corruption("EPOCH_COMMIT payload has " + std::to_string(payload.size()) +
                              " bytes, expected " + std::to_string(kEpochCommitPayloadBytes));
  }
  out->page_records = GetU64(payload.data());
  out->device_bytes = GetU64(payload.data() + 8);
  out->record_count = GetU32(payload.data() + 16);
  out->epoch_crc = GetU32(payload.data() + 20);
  return Status::Ok();
}

namespace {
// A control record with no payload.
size_t EncodeBare(RecordType type, uint64_t epoch, uint8_t out[kControlRecordBytes]) {
  RecordHeader h;
  h.type = type;
  h.epoch = epoch;
  EncodeHeader(h, {}, out);
  return kHeaderBytes;
}
}  // namespace

size_t EncodeAck(uint64_t epoch, uint8_t out[kControlRecordBytes]) {
  return EncodeBare(RecordType::kAck, epoch, out);
}

size_t EncodeGoodbyeAck(uint8_t out[kControlRecordBytes]) {
  return EncodeBare(RecordType::kGoodbyeAck, 0, out);
}

size_t EncodeHeartbeat(uint64_t latest_epoch, uint8_t out[kControlRecordBytes]) {
  RecordHeader h;
  h.type = RecordType::kHeartbeat;
  PutU64(out + kHeaderBytes, latest_epoch);
  EncodeHeader(h, {out + kHeaderBytes, 8}, out);
  return kHeaderBytes + 8;
}

size_t EncodeHandover(uint64_t epoch, uint8_t out[kControlRecordBytes]) {
  return EncodeBare(RecordType::kHandover, epoch, out);
}

std::vector<uint8_t> EncodeReasonRecord(RecordType type, std::string_view reason, uint64_t epoch,
                                        uint16_t flags) {
  PayloadWriter w;
  w.Str(reason);
  return w.Finish(type, epoch, flags);
}

std::string DecodeReason(const RecordView& record) {
  PayloadReader in(record.payload);
  std::string s;
  if (!in.Str(&s)) return "(no reason given)";
  return s;
}

}  // namespace lockstep::wire
