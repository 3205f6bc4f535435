// Choosing a transport by name, as a VM's `transport=` setting does.
#pragma once

#include <memory>
#include <string_view>

#include "common/status.h"
#include "replication_channel/channel.h"
#include "replication_channel/dpdk.h"
#include "replication_channel/rdma.h"
#include "replication_channel/tcp.h"

namespace lockstep::channel {

struct TransportOptions {
  TcpOptions tcp;
  DpdkOptions dpdk;
  RdmaOptions rdma;
};

// "tcp", "dpdk" or "rdma". kInvalidArgument for another name (the message lists these).
// Making a transport checks nothing of the host: Listen()/Connect() report what is missing.
Result<std::unique_ptr<Transport>> MakeTransport(std::string_view name,
                                                 const TransportOptions& options = {});

// The names MakeTransport() accepts, for help texts.
inline constexpr std::string_view kTransportNames = "tcp|dpdk|rdma";

}  // namespace lockstep::channel
