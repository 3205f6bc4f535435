// The test bed's QMP client is the admin plane's (admin/qmp.h).
#pragma once

#include "admin/qmp.h"

namespace lockstep::testbed {
using Json = admin::Json;
using Qmp = admin::Qmp;
}  // namespace lockstep::testbed
