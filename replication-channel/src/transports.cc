#include "replication_channel/transports.h"

#include <string>

namespace lockstep::channel {

Result<std::unique_ptr<Transport>> MakeTransport(std::string_view name,
                                                 const TransportOptions& options) {
  if (name == "tcp") return MakeTcpTransport(options.tcp);
  if (name == "dpdk") return MakeDpdkTransport(options.dpdk);
  if (name == "rdma") return MakeRdmaTransport(options.rdma);
  return Status::InvalidArgument("unknown transport '" + std::string(name) + "': use one of " +
                                 std::string(kTransportNames));
}

}  // namespace lockstep::channel
