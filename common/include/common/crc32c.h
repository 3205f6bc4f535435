// CRC32C (Castagnoli), the checksum of lockstep's wire format.
//
// Backed by Intel ISA-L's crc32_iscsi (SSE4.2/PCLMUL where the CPU has them).
// Crc32c(data) of "123456789" is 0xE3069283. Extend() continues a running CRC so that
// Extend(Crc32c(a), b) == Crc32c(a + b).
#pragma once

#include <cstddef>
#include <cstdint>

namespace lockstep {

uint32_t Crc32cExtend(uint32_t crc, const void* data, size_t n);
inline uint32_t Crc32c(const void* data, size_t n) { return Crc32cExtend(0, data, n); }

}  // namespace lockstep
