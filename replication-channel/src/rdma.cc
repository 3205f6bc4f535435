// The RDMA transport (see rdma.h). Placeholder until the verbs implementation lands.
#include "replication_channel/rdma.h"

namespace lockstep::channel {
namespace {

Status NotYet() {
  return Status::Unsupported("the RDMA transport is not built yet: use transport=tcp");
}

class RdmaTransport final : public Transport {
 public:
  std::string_view name() const override { return "rdma"; }
  Result<std::unique_ptr<Listener>> Listen(std::string_view) override { return NotYet(); }
  Result<std::unique_ptr<Channel>> Connect(std::string_view, std::chrono::milliseconds) override {
    return NotYet();
  }
};

}  // namespace

Status RdmaAvailable(const RdmaOptions&) { return NotYet(); }

std::unique_ptr<Transport> MakeRdmaTransport(RdmaOptions) { return std::make_unique<RdmaTransport>(); }

}  // namespace lockstep::channel
