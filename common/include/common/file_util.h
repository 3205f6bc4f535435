// Files written whole or not at all.
#pragma once

#include <string>
#include <string_view>

#include "common/status.h"

namespace lockstep {

// Replaces `path` with `text`, mode 0600: a temporary file beside it, written and fsync'd,
// renamed over `path`, then the directory fsync'd. After a crash `path` holds the old text
// or the new, never a mixture; on an error nothing changed and the error says what (a full
// disk is the usual cause).
Status WriteFileAtomic(const std::string& path, std::string_view text);

}  // namespace lockstep
