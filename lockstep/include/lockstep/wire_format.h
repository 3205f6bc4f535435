// lockstep's replication wire format, version 4. This header is its one description.
// (Version 2 added the pairing-key proof to the handshake: nonces, proofs, AUTH. Version 3
// added link protection after it: HELLO's protection byte, sealed messages. Version 4 added
// the live initial synchronization — pre-copy rounds — and the planned HANDOVER.)
//
// Everything on the replication channel is a RECORD. A channel message carries one or
// more whole records back to back; a record never spans two messages. All integers are
// little-endian.
//
// Record header, 32 bytes:
//   off size field
//    0   2   type          RecordType below
//    2   2   flags         per type; 0 where a type defines none
//    4   4   block         RAM block index (page records); 0 otherwise
//    8   8   epoch         the epoch the record belongs to (0 in the handshake)
//   16   8   page          page index within the block (page records); 0 otherwise
//   24   4   payload_len   bytes of payload following the header
//   28   4   crc           CRC32C of header bytes 0..27 followed by the payload
//
// The handshake (before any epoch):
//   HELLO        primary -> secondary. Payload:
//                  u64 magic "LOCKSTEP" (0x50455453'4B434F4C), u32 version (kWireVersion),
//                  u32 page_size, 16 bytes pairing id, u64 witness term,
//                  u32 largest device state the primary will send,
//                  str vm_id, str primary host id, u32 block count, then per block:
//                  str block id, u64 length in bytes,        (str = u16 length + bytes)
//                  32 bytes primary nonce (random, fresh for every connection),
//                  u8 link protection (LinkProtection: 0 none, 1 MAC, 2 encrypted).
//                A secondary configured for another protection refuses the HELLO.
//                A receiver that does not speak `version` answers HELLO_REPLY rejected.
//                The magic and version sit at the same place in every version, so a
//                peer of any version can read them and say what it speaks.
//   HELLO_REPLY  secondary -> primary. Payload: u64 magic, u32 version the secondary
//                speaks, u8 accepted (1/0), str secondary host id, str reason (empty if
//                accepted), 32 bytes secondary nonce, 32 bytes secondary proof (zeros if
//                rejected). A rejected handshake ends the connection.
//   AUTH         primary -> secondary, once the secondary's proof checked out. Payload:
//                32 bytes primary proof. Nothing else is sent before it; a secondary
//                whose check fails sends ERROR and closes.
//                A proof is HMAC-SHA256 under the hosts' 32-byte pairing key of: the label
//                "lockstep-v2-secondary" or "lockstep-v2-primary", the SHA-256 of the HELLO
//                payload as sent (pairing id, witness term, VM, primary host, RAM layout,
//                primary nonce), str secondary host id, the secondary nonce, and — in the
//                primary's proof only — the secondary's proof. Each side proves it holds
//                the key for this very connection without sending it; a recorded
//                handshake proves nothing later; a byte of HELLO changed on the way makes
//                the proofs disagree. A peer whose proof fails is refused, the reason
//                naming the pairing key. The HELLO's protection byte is covered too, so a
//                man in the middle cannot lower it.
//
// Link protection: every message after AUTH, both ways, is sealed (lockstep/
// sealed_channel.h) as HELLO said:
//   none      the message as is: records carry a CRC only; for a trusted, dedicated link.
//   MAC       the message, then a 16-byte AES-256-GCM tag over it (GMAC: the message is
//             the associated data, nothing is encrypted).
//   encrypted the message encrypted with AES-256-GCM, then its 16-byte tag.
// Keys: HKDF-SHA256 of the pairing key, salt = primary nonce || secondary nonce, info =
// "lockstep-v3 link primary->secondary" or "lockstep-v3 link secondary->primary"; 32 bytes
// each. GCM nonce (12 bytes): 4 zero bytes, then the message's number in its direction
// (u64 LE, from 0; the first message after AUTH is 0). A message whose tag does not check
// out is refused with the connection, like a bad CRC.
//
// An epoch N (N = 1, 2, ... with no gaps; epoch 1 completes the initial synchronization):
//   EPOCH_BEGIN   flags bit 0 = FULL (every page of every block follows), bit 1 = PRECOPY
//                 (a pre-copy round, below). Payload: u64 page count, u32 device-state
//                 bytes, u32 reserved (0).
//   PAGE_RAW      payload: the page (page_size bytes).
//   PAGE_ZERO     no payload: the page is all zeros.
//   PAGE_XOR_RLE  the page XORed with the copy the secondary holds (its state as of
//                 epoch N-1), run-length coded. Payload: u32 CRC32C of the resulting
//                 page, then runs of {u16 skip, u16 len, len bytes} where `skip` bytes are
//                 unchanged (XOR 0) and `len` bytes are XORed in; skips and lens add up to
//                 exactly page_size, no run is {0, 0}, and the payload is at most
//                 kMaxDeltaPayloadBytes (a larger delta is sent as PAGE_RAW).
//   DEVICE_STATE  payload: the hypervisor's device state (vCPUs included), opaque.
//                 Exactly one per epoch, after the pages.
//   EPOCH_COMMIT  payload: u64 page records, u64 device-state bytes, u32 records before
//                 this one (BEGIN included), u32 epoch checksum = CRC32C over the `crc`
//                 fields (as u32 LE) of every record of the epoch from BEGIN to the last
//                 record before COMMIT, in order.
// Every page appears at most once in an epoch. Records of one epoch are never interleaved
// with another epoch's; control records (below) may appear between them.
//
// The live initial synchronization. Before epoch 1 the primary may send PRE-COPY ROUNDS,
// copied from the guest's RAM while it runs: framed like an epoch (BEGIN with PRECOPY set,
// pages, COMMIT; record epoch fields 0; no DEVICE_STATE, so COMMIT counts 0 device bytes),
// applied by the secondary as they commit, each answered with ACK(0) once applied (the
// primary sends the next round, or epoch 1, only then). A round is not a checkpoint and
// its ACK(0) releases nothing: pages copied from a running guest may be torn, and the
// dirty log sends them again. The first round is FULL|PRECOPY (every page, deltas not allowed); each later one
// carries the pages dirtied since the previous round was taken, deltas allowed against what
// the secondary holds. Epoch 1 is then not FULL: it carries the pages dirtied since the
// last round, with the device state, and makes the secondary's copy a checkpoint. Without
// pre-copy, epoch 1 is FULL. A receiver refuses a round after epoch 1, a first round that
// is not FULL, and a non-FULL epoch 1 that no FULL round preceded.
//
// Control records:
//   ACK        secondary -> primary: epoch N is complete and verified at the secondary.
//              ACK(0): a pre-copy round is applied (above).
//   HEARTBEAT  both ways; payload u64: the sender's latest epoch (primary: last sent;
//              secondary: last acknowledged).
//   GOODBYE    primary -> secondary: protection ends on purpose; do not take over.
//              Payload: str reason. The primary releases held output only after
//              GOODBYE_ACK; without it, ending protection is handled as a fault.
//   GOODBYE_ACK  secondary -> primary: "I will not take over". No payload.
//   HANDOVER   primary -> secondary, a planned switchover: "take over from epoch N (the
//              record's epoch)". Sent only once epoch N is acknowledged; no epoch follows
//              until the answer. No payload. The secondary answers with
//   HANDOVER_REPLY  secondary -> primary, epoch N; flags bit 0 = accepted. Payload: str
//              reason (why not, or empty). Accepted: the secondary holds the witness's
//              confirmed token and starts the guest from epoch N; the primary stops its
//              copy for good and never releases its output after N. Declined: the
//              secondary did not get the token (e.g. the witness could not be asked) and
//              nothing changed; the primary goes on with epoch N+1. A secondary that got
//              the token but then fails (the device state does not load, the
//              confirmation is refused) sends ERROR instead: a fault, the witness decides.
//              A HANDOVER for another epoch than the last one acknowledged is declined.
//   ERROR      either way: the sender found the stream bad and is closing. Payload: str.
//
// What a receiver rejects (and never applies): an unknown type, a bad CRC, a payload that
// runs past the message, a record shorter than its type needs, an unknown handshake
// version, an epoch that is not the next one (replayed or out of order), a record whose
// epoch differs from the open epoch, a block or page out of range, a page twice in one
// epoch, a delta whose runs do not cover exactly one page or whose result has the wrong
// CRC, a FULL epoch that misses a page, counts or epoch checksum that disagree at commit.
#pragma once

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"

namespace lockstep::wire {

inline constexpr uint32_t kWireVersion = 4;
inline constexpr uint64_t kMagic = 0x50455453'4B434F4CULL;  // "LOCKSTEP" read as LE u64
inline constexpr size_t kHeaderBytes = 32;
inline constexpr uint32_t kPageSize = 4096;
// Largest payload of any record. Device state larger than this is refused at save time.
inline constexpr uint32_t kMaxPayloadBytes = 32u << 20;

enum class RecordType : uint16_t {
  kHello = 1,
  kHelloReply = 2,
  kAuth = 3,
  kEpochBegin = 10,
  kPageRaw = 11,
  kPageZero = 12,
  kPageXorRle = 13,
  kDeviceState = 14,
  kEpochCommit = 15,
  kAck = 20,
  kHeartbeat = 21,
  kGoodbye = 22,
  kError = 23,
  kGoodbyeAck = 24,
  kHandover = 25,
  kHandoverReply = 26,
};

inline constexpr uint16_t kFlagFullEpoch = 1;
inline constexpr uint16_t kFlagPrecopy = 2;
inline constexpr uint16_t kFlagAccepted = 1;  // HANDOVER_REPLY
// Largest PAGE_XOR_RLE payload: the result CRC and half a page of runs.
inline constexpr uint32_t kMaxDeltaPayloadBytes = 4 + kPageSize / 2;

// A record's header, decoded.
struct RecordHeader {
  RecordType type{};
  uint16_t flags = 0;
  uint32_t block = 0;
  uint64_t epoch = 0;
  uint64_t page = 0;
  uint32_t payload_len = 0;
  uint32_t crc = 0;
};

// Name of a record type for messages ("PAGE_RAW"); "type 77" for unknown ones.
std::string RecordTypeName(uint16_t type);

// Writes the 32-byte header for `h` (payload_len set from `payload`) with the CRC
// computed over the header and `payload`. Sets h.crc. No allocation.
void EncodeHeader(RecordHeader& h, std::span<const uint8_t> payload, uint8_t out[kHeaderBytes]);

// A record found in a message: its header and payload (pointing into the message).
struct RecordView {
  RecordHeader header;
  std::span<const uint8_t> payload;
};

// Reads the records of one message in order, checking bounds and CRCs.
class RecordReader {
 public:
  explicit RecordReader(std::span<const uint8_t> message) : rest_(message) {}
  // True when every byte has been read.
  bool done() const { return rest_.empty(); }
  // Reads the next record. kCorruption on a truncated header or payload, a bad CRC or an
  // unknown type. No allocation on success.
  Status Next(RecordView* out);

 private:
  std::span<const uint8_t> rest_;
};

// ---- payloads -------------------------------------------------------------------------

struct BlockLayout {
  std::string id;
  uint64_t length = 0;  // bytes
  bool operator==(const BlockLayout&) const = default;
};

struct Hello {
  uint32_t version = kWireVersion;
  uint32_t page_size = kPageSize;
  std::array<uint8_t, 16> pairing_id{};
  uint64_t witness_term = 0;
  uint32_t max_device_state_bytes = 0;
  std::string vm_id;
  std::string host_id;
  std::vector<BlockLayout> blocks;
  std::array<uint8_t, 32> nonce{};  // a Nonce (below)
  uint8_t link_protection = 1;      // a LinkProtection (below)
};

// How the messages after AUTH are protected (see "Link protection" above).
enum class LinkProtection : uint8_t { kNone = 0, kMac = 1, kEncrypt = 2 };
const char* LinkProtectionName(LinkProtection p);  // "none", "mac", "aes-gcm"
inline constexpr size_t kLinkTagBytes = 16;        // what MAC and encrypted add per message

inline constexpr size_t kNonceBytes = 32;
inline constexpr size_t kProofBytes = 32;
using Nonce = std::array<uint8_t, kNonceBytes>;
using Proof = std::array<uint8_t, kProofBytes>;

struct HelloReply {
  uint32_t version = kWireVersion;
  bool accepted = false;
  std::string host_id;
  std::string reason;
  Nonce nonce{};
  Proof proof{};
};

// A whole HELLO / HELLO_REPLY record (header included), ready to send.
std::vector<uint8_t> EncodeHello(const Hello& hello);
std::vector<uint8_t> EncodeHelloReply(const HelloReply& reply);
// Decode a record read by RecordReader. kVersionMismatch for another version (the version
// is still stored in out->version so the caller can say which), kCorruption otherwise.
Status DecodeHello(const RecordView& record, Hello* out);
Status DecodeHelloReply(const RecordView& record, HelloReply* out);
std::vector<uint8_t> EncodeAuth(const Proof& proof);
Status DecodeAuth(const RecordView& record, Proof* out);

struct EpochBeginPayload {
  uint64_t page_count = 0;
  uint32_t device_bytes = 0;
};
inline constexpr size_t kEpochBeginPayloadBytes = 16;

struct EpochCommitPayload {
  uint64_t page_records = 0;
  uint64_t device_bytes = 0;
  uint32_t record_count = 0;  // records before COMMIT, BEGIN included
  uint32_t epoch_crc = 0;
};
inline constexpr size_t kEpochCommitPayloadBytes = 24;

void EncodeEpochBegin(const EpochBeginPayload& p, uint8_t out[kEpochBeginPayloadBytes]);
Status DecodeEpochBegin(std::span<const uint8_t> payload, EpochBeginPayload* out);
void EncodeEpochCommit(const EpochCommitPayload& p, uint8_t out[kEpochCommitPayloadBytes]);
Status DecodeEpochCommit(std::span<const uint8_t> payload, EpochCommitPayload* out);

// A complete control record (ACK, HEARTBEAT) in a fixed buffer: no allocation.
inline constexpr size_t kControlRecordBytes = kHeaderBytes + 8;
// ACK and GOODBYE_ACK have no payload (kHeaderBytes long); HEARTBEAT carries
// `latest_epoch`.
size_t EncodeAck(uint64_t epoch, uint8_t out[kControlRecordBytes]);
size_t EncodeGoodbyeAck(uint8_t out[kControlRecordBytes]);
size_t EncodeHeartbeat(uint64_t latest_epoch, uint8_t out[kControlRecordBytes]);
size_t EncodeHandover(uint64_t epoch, uint8_t out[kControlRecordBytes]);
// GOODBYE, ERROR and HANDOVER_REPLY with a reason (allocates; not a hot-path record).
std::vector<uint8_t> EncodeReasonRecord(RecordType type, std::string_view reason,
                                        uint64_t epoch = 0, uint16_t flags = 0);
std::string DecodeReason(const RecordView& record);

// ---- little-endian helpers ------------------------------------------------------------

inline void PutU16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }
inline void PutU32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }
inline void PutU64(uint8_t* p, uint64_t v) { std::memcpy(p, &v, 8); }
inline uint16_t GetU16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
inline uint32_t GetU32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline uint64_t GetU64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
static_assert(std::endian::native == std::endian::little,
              "lockstep's wire format assumes a little-endian host");

}  // namespace lockstep::wire
