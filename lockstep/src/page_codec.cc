#include "page_codec.h"

#include <cstring>
#include <string>

#include "common/crc32c.h"
#include "lockstep/wire_format.h"

namespace lockstep {

namespace {
inline uint64_t LoadWord(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
}  // namespace

bool IsZeroPage(const uint8_t* page, size_t n) {
  uint64_t acc = 0;
  for (size_t i = 0; i < n; i += 64) {
    // Eight words per step lets the compiler vectorize; the early exit keeps
    // non-zero pages (the common case) cheap.
    for (size_t j = 0; j < 64 && i + j < n; j += 8) acc |= LoadWord(page + i + j);
    if (acc != 0) return false;
  }
  return true;
}

bool DeltaLikelyPays(const uint8_t* page, const uint8_t* base, size_t n) {
  const size_t stride = (n / 4) & ~size_t{7};
  int differ = 0;
  for (size_t i = 0; i < 4; ++i)
    differ += LoadWord(page + i * stride + 8) != LoadWord(base + i * stride + 8);
  return differ < 3;
}

size_t EncodeXorRle(const uint8_t* page, const uint8_t* base, size_t n, std::span<uint8_t> out) {
  size_t o = 0;
  size_t i = 0;
  while (i < n) {
    size_t skip_start = i;
    while (i < n && LoadWord(page + i) == LoadWord(base + i)) i += 8;
    size_t skip = i - skip_start;
    size_t lit_start = i;
    // A literal run ends at the first two equal words in a row: one equal word costs
    // 8 bytes as literal but 4 as a new run header plus skip, so short gaps stay inside.
    while (i < n) {
      if (LoadWord(page + i) == LoadWord(base + i) &&
          (i + 8 >= n || LoadWord(page + i + 8) == LoadWord(base + i + 8))) {
        break;
      }
      i += 8;
      if (o + 4 + (i - lit_start) > out.size()) return 0;  // a mostly new page: give up early
    }
    size_t len = i - lit_start;
    if (o + 4 + len > out.size()) return 0;
    wire::PutU16(out.data() + o, static_cast<uint16_t>(skip));
    wire::PutU16(out.data() + o + 2, static_cast<uint16_t>(len));
    o += 4;
    for (size_t k = 0; k < len; k += 8) {
      uint64_t x = LoadWord(page + lit_start + k) ^ LoadWord(base + lit_start + k);
      std::memcpy(out.data() + o + k, &x, 8);
    }
    o += len;
  }
  return o;
}

Status ValidateXorRle(std::span<const uint8_t> runs, size_t n) {
  size_t covered = 0;
  size_t o = 0;
  while (o < runs.size()) {
    if (runs.size() - o < 4) return Status::Corruption("delta run header is truncated");
    size_t skip = wire::GetU16(runs.data() + o);
    size_t len = wire::GetU16(runs.data() + o + 2);
    o += 4;
    if (len > runs.size() - o) return Status::Corruption("delta run runs past its record");
    if (skip == 0 && len == 0) return Status::Corruption("delta has an empty run");
    covered += skip + len;
    if (covered > n) {
      return Status::Corruption("delta runs cover " + std::to_string(covered) + " bytes of a " +
                                std::to_string(n) + "-byte page");
    }
    o += len;
  }
  if (covered != n) {
    return Status::Corruption("delta runs cover " + std::to_string(covered) + " bytes, not the " +
                              std::to_string(n) + " of a page");
  }
  return Status::Ok();
}

void ApplyXorRle(std::span<const uint8_t> runs, uint8_t* page) {
  size_t pos = 0;
  size_t o = 0;
  while (o < runs.size()) {
    size_t skip = wire::GetU16(runs.data() + o);
    size_t len = wire::GetU16(runs.data() + o + 2);
    o += 4;
    pos += skip;
    for (size_t k = 0; k < len; ++k) page[pos + k] ^= runs[o + k];
    pos += len;
    o += len;
  }
}

uint32_t XorRleResultCrc(std::span<const uint8_t> runs, const uint8_t* base, size_t n) {
  uint32_t crc = 0;
  size_t pos = 0;
  size_t o = 0;
  uint8_t tmp[256];
  while (o < runs.size()) {
    size_t skip = wire::GetU16(runs.data() + o);
    size_t len = wire::GetU16(runs.data() + o + 2);
    o += 4;
    crc = Crc32cExtend(crc, base + pos, skip);
    pos += skip;
    for (size_t done = 0; done < len;) {
      size_t chunk = len - done < sizeof(tmp) ? len - done : sizeof(tmp);
      for (size_t k = 0; k < chunk; ++k) tmp[k] = base[pos + done + k] ^ runs[o + done + k];
      crc = Crc32cExtend(crc, tmp, chunk);
      done += chunk;
    }
    pos += len;
    o += len;
  }
  if (pos < n) crc = Crc32cExtend(crc, base + pos, n - pos);
  return crc;
}

}  // namespace lockstep
