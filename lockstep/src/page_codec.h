// Page encodings of the wire format (see lockstep/wire_format.h): zero detection and the
// XOR + run-length delta. Pure functions over caller-owned memory; no allocation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "common/status.h"

namespace lockstep {

// True if all `n` bytes (a multiple of 8) are zero.
bool IsZeroPage(const uint8_t* page, size_t n);

// Encodes `page` XOR `base` (both `n` bytes, n a multiple of 8 and < 65536) as runs of
// {u16 skip, u16 len, len bytes} into `out`. Returns the encoded length, or 0 when the
// encoding would not fit in `out` (the caller then sends the page raw). Works on 8-byte
// words, so runs start and end on word boundaries.
size_t EncodeXorRle(const uint8_t* page, const uint8_t* base, size_t n, std::span<uint8_t> out);

// A cheap guess whether a delta of `page` against `base` could pay: false when at least 3
// of 4 words sampled across the page differ (a page rewritten wholesale), so the caller
// can skip the encoder's full scan. Four samples keep the cache misses on a cold base few.
bool DeltaLikelyPays(const uint8_t* page, const uint8_t* base, size_t n);

// Checks that `runs` is a well-formed delta for an `n`-byte page (every run in bounds,
// skips and lens adding up to exactly n). kCorruption says what is wrong.
Status ValidateXorRle(std::span<const uint8_t> runs, size_t n);

// Applies validated `runs` to `page` in place (page ^= delta).
void ApplyXorRle(std::span<const uint8_t> runs, uint8_t* page);

// CRC32C of the page that applying `runs` to `base` would give, without writing it.
uint32_t XorRleResultCrc(std::span<const uint8_t> runs, const uint8_t* base, size_t n);

}  // namespace lockstep
