// The RDMA transport: a Channel over one reliable-connected (RC) queue pair, libibverbs.
//
// (Being written. Until it lands, Listen() and Connect() report kUnsupported.)
#pragma once

#include <memory>
#include <string>

#include "common/status.h"
#include "replication_channel/channel.h"

namespace lockstep::channel {

struct RdmaOptions {
  // The verbs device to use ("rxe0", "mlx5_0"); empty: the first one found.
  std::string device;
};

// OK when at least one RDMA device (or `options.device`) is usable here; otherwise
// kUnsupported saying why.
Status RdmaAvailable(const RdmaOptions& options = {});

std::unique_ptr<Transport> MakeRdmaTransport(RdmaOptions options = {});

}  // namespace lockstep::channel
