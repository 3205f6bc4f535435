// The RDMA transport where no RDMA device exists (every CI host: its kernel has no
// InfiniBand support) and, inside a guest with soft-RoCE, where one does: each case checks
// whichever is true here. The conformance suite over real verbs is
// rdma_conformance_test.cc, run inside TCG guests by tests/rdma_guests_test.sh.
#include "replication_channel/rdma.h"

#include <catch2/catch.hpp>
#include <chrono>
#include <string>

#include "replication_channel/tcp.h"
#include "replication_channel/transports.h"

namespace lockstep::channel {
namespace {

using namespace std::chrono_literals;
using Code = Status::Code;
using Catch::Matchers::Contains;

bool DevicePresent() { return RdmaAvailable().ok(); }

TEST_CASE("rdma: RdmaAvailable says whether a device exists, and if not how to fix it") {
  Status available = RdmaAvailable();
  if (DevicePresent()) {
    SUCCEED("an RDMA device with an active port is present");
    return;
  }
  CHECK(available.code() == Code::kUnsupported);
  CHECK_THAT(available.message(), Contains("no RDMA device"));
  CHECK_THAT(available.message(), Contains("ibv_get_device_list"));
  CHECK_THAT(available.message(), Contains("rdma link add rxe0 type rxe"));
  CHECK_THAT(available.message(), Contains("transport=tcp"));
}

TEST_CASE("rdma: a named device that does not exist is reported with the ones that do") {
  RdmaOptions options;
  options.device = "mlx5_99";
  Status status = RdmaAvailable(options);
  CHECK(status.code() == Code::kUnsupported);
  if (DevicePresent()) {
    CHECK_THAT(status.message(), Contains("'mlx5_99' not found"));
    CHECK_THAT(status.message(), Contains("devices here:"));
  } else {
    CHECK_THAT(status.message(), Contains("no RDMA device"));
  }
}

TEST_CASE("rdma: Listen and Connect fail with kUnsupported without a device") {
  std::unique_ptr<Transport> transport = MakeRdmaTransport();
  CHECK(transport->name() == "rdma");
  auto listener = transport->Listen("127.0.0.1:0");
  // Nothing listens on port 1 (a privileged port nobody uses).
  auto channel = transport->Connect("127.0.0.1:1", 2s);
  if (DevicePresent()) {
    REQUIRE(listener.status().ToString() == "OK");
    CHECK_THAT((*listener)->address(), Contains("127.0.0.1:"));
    CHECK((*listener)->address() != "127.0.0.1:0");
    CHECK(channel.status().code() == Code::kPeerLost);
    return;
  }
  REQUIRE(!listener.ok());
  CHECK(listener.status().code() == Code::kUnsupported);
  CHECK_THAT(listener.status().message(), Contains("rdma_rxe"));
  CHECK_THAT(listener.status().message(), Contains("transport=tcp"));
  REQUIRE(!channel.ok());
  CHECK(channel.status().code() == Code::kUnsupported);
  CHECK_THAT(channel.status().message(), Contains("no RDMA device"));
}

TEST_CASE("rdma: malformed addresses are refused before the device is looked at") {
  std::unique_ptr<Transport> transport = MakeRdmaTransport();
  for (const char* address : {"nohost", "127.0.0.1:99999", "127.0.0.1:", "::1:5", "[::1"}) {
    CAPTURE(address);
    CHECK(transport->Listen(address).status().code() == Code::kInvalidArgument);
    CHECK(transport->Connect(address, 1s).status().code() == Code::kInvalidArgument);
  }
  CHECK(transport->Connect("127.0.0.1:0", 1s).status().code() == Code::kInvalidArgument);
  CHECK(transport->Connect("localhost:7000", 1s).status().code() == Code::kInvalidArgument);
}

TEST_CASE("rdma: MakeTransport makes the rdma transport by name") {
  auto transport = MakeTransport("rdma");
  REQUIRE(transport.ok());
  CHECK((*transport)->name() == "rdma");
}

TEST_CASE("rdma: GetRdmaCounters refuses a channel of another transport") {
  std::unique_ptr<Transport> tcp = MakeTcpTransport();
  auto listener = tcp->Listen("127.0.0.1:0");
  REQUIRE(listener.ok());
  auto a = tcp->Connect((*listener)->address(), 5s);
  REQUIRE(a.ok());
  auto counters = GetRdmaCounters(**a);
  CHECK(counters.status().code() == Code::kInvalidArgument);
  CHECK_THAT(counters.status().message(), Contains("tcp"));
}

}  // namespace
}  // namespace lockstep::channel
