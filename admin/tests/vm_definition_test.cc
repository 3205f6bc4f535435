// VM definitions: what is accepted, what is refused and how it is said, and the QEMU
// command line a definition becomes.
#include "admin/vm_definition.h"

#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <fstream>
#include <nlohmann/json.hpp>

using namespace lockstep;
using namespace lockstep::admin;
using nlohmann::json;

namespace {

// A kernel file that exists (the definition checks).
const std::string& Kernel() {
  static const std::string path = [] {
    char tmpl[] = "/tmp/lockstep-kernel-XXXXXX";
    int fd = mkstemp(tmpl);
    close(fd);
    static std::string keep = tmpl;
    std::atexit([] { unlink(keep.c_str()); });
    return std::string(tmpl);
  }();
  return path;
}

json Good() {
  return {{"name", "web1"},
          {"memory_mib", 256},
          {"kernel", Kernel()},
          {"append", "console=ttyS0"},
          {"nics", {{{"mac", "52:54:00:12:34:56"}, {"tap", "tap-web1"}}}}};
}

std::string Refusal(const json& j) {
  auto d = ParseVmDefinition(j.dump());
  REQUIRE(!d.ok());
  CHECK(d.status().code() == Status::Code::kInvalidArgument);
  return d.status().message();
}

}  // namespace

TEST_CASE("a good definition parses, and reads back the same", "[admin][definition]") {
  auto d = ParseVmDefinition(Good().dump());
  INFO(d.status().ToString());
  REQUIRE(d.ok());
  CHECK(d->name == "web1");
  CHECK(d->memory_mib == 256);
  CHECK(d->vcpus == 1);
  REQUIRE(d->nics.size() == 1);
  CHECK(d->nics[0].tap == "tap-web1");
  auto again = ParseVmDefinition(VmDefinitionJson(*d));
  REQUIRE(again.ok());
  CHECK(VmDefinitionJson(*again) == VmDefinitionJson(*d));
}

TEST_CASE("a bad definition is refused, naming the member and what it must be",
          "[admin][definition]") {
  json j = Good();
  std::string expect;
  SECTION("not JSON") {
    CHECK(ParseVmDefinition("{name: web1").status().message().find("not valid JSON") !=
          std::string::npos);
    return;
  }
  SECTION("a typo in a member") {
    j["memroy_mib"] = 256;
    expect = "unknown member 'memroy_mib'";
  }
  SECTION("a missing member") {
    j.erase("memory_mib");
    expect = "'memory_mib' is required";
  }
  SECTION("too little memory") {
    j["memory_mib"] = 16;
    expect = "'memory_mib' must be a whole number from 64";
  }
  SECTION("memory as text") {
    j["memory_mib"] = "256";
    expect = "'memory_mib' must be a whole number";
  }
  SECTION("a name with a slash") {
    j["name"] = "../etc";
    expect = "'name' must be 1 to 64 letters";
  }
  SECTION("a kernel that is not there") {
    j["kernel"] = "/nonexistent/vmlinuz";
    expect = "no file at /nonexistent/vmlinuz";
  }
  SECTION("a relative kernel path") {
    j["kernel"] = "vmlinuz";
    expect = "must be an absolute path";
  }
  SECTION("a multicast MAC") {
    j["nics"][0]["mac"] = "01:00:5e:00:00:01";
    expect = "must be a unicast MAC";
  }
  SECTION("a NIC with both backends") {
    j["nics"][0]["user_forward"] = json::array();
    expect = "exactly one of 'tap' and 'user_forward'";
  }
  SECTION("a tap name that would inject QEMU options") {
    j["nics"][0]["tap"] = "t0,script=/bin/sh";
    expect = "is not an interface name";
  }
  SECTION("a malformed port forward") {
    j["nics"][0].erase("tap");
    j["nics"][0]["user_forward"] = {{{"host", "8080"}, {"guest", 7000}}};
    expect = "must be {\"host\": \"ADDR:PORT\", \"guest\": PORT}";
  }
  std::string why = Refusal(j);
  INFO(why);
  CHECK(why.find(expect) != std::string::npos);
  CHECK(why.rfind("VM definition: ", 0) == 0);
}

TEST_CASE("the QEMU command line: headless, QMP, console to a file, held output per NIC",
          "[admin][definition]") {
  json j = Good();
  j["nics"].push_back({{"mac", "52:54:00:00:00:02"},
                       {"user_forward", {{{"host", "127.0.0.1:8080"}, {"guest", 7000}}}}});
  auto d = ParseVmDefinition(j.dump());
  REQUIRE(d.ok());
  auto args = QemuCommandLine(*d, {"/q/qemu", {"/fw"}}, "/s/qmp.sock", "/s/console.log");
  auto has = [&](const std::string& a, const std::string& b) {
    for (size_t i = 0; i + 1 < args.size(); ++i)
      if (args[i] == a && args[i + 1] == b) return true;
    return false;
  };
  CHECK(args[0] == "/q/qemu");
  CHECK(has("-L", "/fw"));
  CHECK(has("-m", "256"));
  CHECK(has("-qmp", "unix:/s/qmp.sock,server=on,wait=off"));
  CHECK(has("-serial", "file:/s/console.log"));
  CHECK(has("-display", "none"));
  CHECK(has("-netdev", "tap,id=n0,ifname=tap-web1,script=no,downscript=no"));
  CHECK(has("-netdev", "user,id=n1,hostfwd=tcp:127.0.0.1:8080-:7000"));
  CHECK(has("-object", "filter-lockstep,id=f0,netdev=n0,queue=rx"));
  CHECK(has("-object", "filter-lockstep,id=f1,netdev=n1,queue=rx"));
  CHECK(has("-device", "virtio-net-pci,netdev=n0,romfile=,mac=52:54:00:12:34:56"));
}

TEST_CASE("a definition may tune the engine, never decide who runs the VM", "[admin][definition]") {
  json j = Good();
  SECTION("tuning and a VIP are taken") {
    j["protection"] = {{"settings", "interval_ms=20;threshold_ms=30;link_protection=aes-gcm"},
                       {"vip", "10.9.0.50"}};
    auto d = ParseVmDefinition(j.dump());
    INFO(d.status().ToString());
    REQUIRE(d.ok());
    CHECK(d->vip == "10.9.0.50");
    CHECK(ParseVmDefinition(VmDefinitionJson(*d)).ok());
    return;
  }
  std::string setting;
  SECTION("the witness") { setting = "witness=this-process"; }
  SECTION("a fence command (run as root by the other host)") { setting = "fence_command=/bin/sh"; }
  SECTION("the role") { setting = "interval_ms=20;role=primary"; }
  SECTION("the key") { setting = "key_file=/tmp/k"; }
  SECTION("a VIP with its interface") { setting = "vip=10.9.0.50@br0"; }
  j["protection"] = {{"settings", setting}};
  std::string why = Refusal(j);
  INFO(why);
  CHECK(why.find("may tune only") != std::string::npos);
}

TEST_CASE("a VIP must be an address", "[admin][definition]") {
  json j = Good();
  j["protection"] = {{"vip", "10.9.0.50@br0"}};
  CHECK(Refusal(j).find("'vip' of protection must be an IPv4 or IPv6 address") !=
        std::string::npos);
}
