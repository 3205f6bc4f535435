#include "common/crc32c.h"

#include <isa-l/crc.h>

#include <climits>

namespace lockstep {

uint32_t Crc32cExtend(uint32_t crc, const void* data, size_t n) {
  // crc32_iscsi neither pre- nor post-inverts; the standard CRC32C does both.
  uint32_t c = ~crc;
  auto* p = static_cast<unsigned char*>(const_cast<void*>(data));
  while (n > 0) {
    int chunk = n > static_cast<size_t>(INT_MAX) ? INT_MAX : static_cast<int>(n);
    c = crc32_iscsi(p, chunk, c);
    p += chunk;
    n -= static_cast<size_t>(chunk);
  }
  return ~c;
}

}  // namespace lockstep
