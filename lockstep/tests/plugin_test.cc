// The C ABI end to end: liblockstep_plugin.so is dlopened as QEMU's object will, given a
// host-operations table backed by simulated guests, and protects one over real TCP.
#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "free_port.h"
#include "lockstep/plugin_abi.h"
#include "process_dir.h"
#include "simulated_guest.h"

using namespace lockstep;
using namespace lockstep::testing;
using namespace std::chrono_literals;

namespace {

struct Host {
  explicit Host(GuestConfig c) : guest(std::move(c)), blocks(guest.RamBlocks()) {}
  SimulatedGuest guest;
  std::vector<RamBlock> blocks;
  std::mutex mu;
  std::vector<std::string> states;

  static Host& Of(void* o) { return *static_cast<Host*>(o); }
  static int Rc(const Status& s) { return s.ok() ? 0 : -EIO; }
  lockstep_host_ops Ops() {
    lockstep_host_ops o{};
    o.abi_version = LOCKSTEP_PLUGIN_ABI_VERSION;
    o.opaque = this;
    o.ram_block_count = [](void* h) { return static_cast<int>(Of(h).blocks.size()); };
    o.ram_block_info = [](void* h, int i, const char** id, uint8_t** host, uint64_t* len) {
      auto& b = Of(h).blocks.at(static_cast<size_t>(i));
      *id = b.id.c_str();
      *host = b.host;
      *len = b.length;
      return 0;
    };
    o.stop_vcpus = [](void* h) { return Rc(Of(h).guest.StopVcpus()); };
    o.start_vcpus = [](void* h) { return Rc(Of(h).guest.StartVcpus()); };
    o.halt = [](void* h) { return Rc(Of(h).guest.Halt()); };
    o.dirty_log_start = [](void* h) { return Rc(Of(h).guest.StartDirtyLog()); };
    o.dirty_log_stop = [](void* h) { return Rc(Of(h).guest.StopDirtyLog()); };
    o.dirty_log_sync = [](void* h) { return Rc(Of(h).guest.SyncDirtyLog()); };
    o.take_dirty_bitmap = [](void* h, int i, uint64_t* bm, size_t words) {
      return Rc(Of(h).guest.TakeDirtyBitmap(static_cast<size_t>(i), {bm, words}));
    };
    o.save_device_state = [](void* h, uint8_t* buf, size_t cap) -> int64_t {
      auto r = Of(h).guest.SaveDeviceState({buf, cap});
      return r.ok() ? static_cast<int64_t>(*r) : -ENOSPC;
    };
    o.load_device_state = [](void* h, const uint8_t* buf, size_t len) {
      return Rc(Of(h).guest.LoadDeviceState({buf, len}));
    };
    o.close_output_barrier = [](void* h, uint64_t e) { Of(h).guest.CloseOutputBarrier(e); };
    o.release_output = [](void* h, uint64_t e) { Of(h).guest.ReleaseOutput(e); };
    o.set_output_mode = [](void* h, int m) {
      Of(h).guest.SetOutputMode(m == LOCKSTEP_OUTPUT_BUFFERED  ? OutputMode::kBuffered
                                : m == LOCKSTEP_OUTPUT_DROPPED ? OutputMode::kDropped
                                                               : OutputMode::kPassThrough);
    };
    o.announce = [](void* h) { return Rc(Of(h).guest.Announce()); };
    o.describe_error = nullptr;
    o.state_changed = [](void* h, const char* state, const char*) {
      std::lock_guard<std::mutex> lock(Of(h).mu);
      Of(h).states.push_back(state);
    };
    return o;
  }
};

const lockstep_plugin_api* LoadPlugin() {
  void* so = dlopen(LOCKSTEP_PLUGIN_PATH, RTLD_NOW | RTLD_LOCAL);
  INFO(dlerror());
  REQUIRE(so != nullptr);
  auto entry =
      reinterpret_cast<decltype(&lockstep_plugin_entry)>(dlsym(so, "lockstep_plugin_entry"));
  REQUIRE(entry != nullptr);
  REQUIRE(entry(LOCKSTEP_PLUGIN_ABI_VERSION + 1) == nullptr);  // another ABI: refused
  return entry(LOCKSTEP_PLUGIN_ABI_VERSION);
}

std::string StatusJson(const lockstep_plugin_api* api, void* r) {
  char buf[2048];
  REQUIRE(api->query_status(r, buf, sizeof buf) > 0);
  return buf;
}

// Polls both replicas' status every 10 ms until `done(primary, secondary)` or `tries` polls;
// returns the last two.
template <typename Done>
std::pair<std::string, std::string> PollStatus(const lockstep_plugin_api* api, void* p, void* s,
                                               int tries, Done done) {
  std::string ps, ss;
  for (int i = 0; i < tries; ++i) {
    ps = StatusJson(api, p);
    ss = StatusJson(api, s);
    if (done(ps, ss)) break;
    std::this_thread::sleep_for(10ms);
  }
  return {ps, ss};
}

GuestConfig SmallGuest() {
  GuestConfig g;
  g.blocks = {{"pc.ram", 4u << 20}, {"pc.bios", 64u << 10}};
  g.step_delay = 100us;
  return g;
}

const std::string& ProcessDirPath() {
  return lockstep::testing::ProcessDir("lockstep-plugin-test");
}

// A pairing key file as `lockstepctl pair` writes it (mode 0600), made once per process.
const std::string& KeyFile() {
  static const std::string path = [] {
    std::string p = ProcessDirPath() + "/key";
    std::ofstream(p) << "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n";
    chmod(p.c_str(), 0600);
    return p;
  }();
  return path;
}

}  // namespace

TEST_CASE("the plugin refuses bad configuration with a reason", "[plugin]") {
  const lockstep_plugin_api* api = LoadPlugin();
  REQUIRE(api != nullptr);
  Host host(SmallGuest());
  lockstep_host_ops ops = host.Ops();
  char err[512];
  struct Case {
    const char* config;
    const char* says;
  } cases[] = {
      {"vm=a,host=b,witness=this-process", "role must be"},
      {"role=primary,host=b,peer=127.0.0.1:1,witness=this-process", "vm=NAME"},
      {"role=primary,vm=a,host=b,witness=this-process", "peer=ADDRESS"},
      {"role=secondary,vm=a,host=b,witness=this-process", "listen=ADDRESS"},
      {"role=primary,vm=a,host=b,peer=x,witness=this-process,transport=pigeon",
       "unknown transport 'pigeon': use one of tcp|dpdk|rdma"},
      // This host has no RDMA device (CI's neither): refused when created, with the reason.
      {"role=primary,vm=a,host=b,peer=x,witness=this-process,transport=rdma", "transport=rdma: "},
      {"role=primary,vm=a,host=b,peer=127.0.0.1:1", "witness=tcp:HOST:PORT"},
      {"role=primary,vm=a,host=b,peer=127.0.0.1:1,witness=etcd", "witness=tcp:HOST:PORT"},
      {"role=primary,vm=a,host=b,peer=x,witness=this-process,colour=red",
       "unknown setting 'colour'"},
      {"role=primary,vm=a,host=b,peer=x,witness=this-process,interval_ms=0", "interval_ms"},
      {"role=primary,vm=a,host=b,peer=x,witness=this-process,pairing=xyz", "pairing"},
      {"role=primary,vm=a,host=b,peer=x,witness=this-process,output_spacing_ms=-1",
       "output_spacing_ms"},
      {"role=primary,vm=a,host=b,peer=x,witness=this-process", "key_file=PATH"},
      {"role=primary,vm=a,host=b,peer=x,witness=this-process,key_file=/nonexistent/key",
       "/nonexistent/key"},
  };
  for (const auto& c : cases) {
    INFO(c.config);
    err[0] = 0;
    REQUIRE(api->create(&ops, c.config, err, sizeof err) == nullptr);
    REQUIRE(std::string(err).find(c.says) != std::string::npos);
  }
  // A key others can read, or that is not a key, is refused with what to do.
  const std::string loose = KeyFile() + ".loose", junk = KeyFile() + ".junk";
  std::ofstream(loose) << "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n";
  chmod(loose.c_str(), 0644);
  std::ofstream(junk) << "not a key\n";
  chmod(junk.c_str(), 0600);
  for (auto [file, says] :
       {std::pair<std::string, const char*>{loose, "chmod 600"}, {junk, "64 hex digits"}}) {
    std::string config = "role=primary,vm=a,host=b,peer=x,witness=this-process,key_file=" + file;
    INFO(config);
    REQUIRE(api->create(&ops, config.c_str(), err, sizeof err) == nullptr);
    REQUIRE(std::string(err).find(says) != std::string::npos);
  }
  std::remove(loose.c_str());
  std::remove(junk.c_str());
  lockstep_host_ops old = ops;
  old.abi_version = 0;
  REQUIRE(api->create(&old, "role=primary", err, sizeof err) == nullptr);
  REQUIRE(std::string(err).find("ABI version") != std::string::npos);
}

// Listen and peer addresses of a pair over `transport` in this process (DPDK: two memif
// ports on one socket, `ports` tells the pairs of ports of two tests apart).
std::pair<std::string, std::string> PairAddresses(const std::string& transport, int ports) {
  if (transport != "dpdk") {
    std::string address = "127.0.0.1:" + std::to_string(FreePort());
    return {address, address};
  }
  const std::string socket = "+socket=" + ProcessDirPath() + "/memif-" + std::to_string(ports) +
                             ".sock+socket-abstract=no";
  return {"net_memif" + std::to_string(ports) + "+role=server" + socket + "#7",
          "net_memif" + std::to_string(ports + 1) + "+role=client" + socket + "#7"};
}

TEST_CASE("a guest protected through the plugin ABI over TCP and over DPDK memif", "[plugin]") {
  const lockstep_plugin_api* api = LoadPlugin();
  Host primary_host(SmallGuest()), secondary_host(SmallGuest());
  lockstep_host_ops pops = primary_host.Ops(), sops = secondary_host.Ops();
  const std::string transport = GENERATE("tcp", "dpdk");
  CAPTURE(transport);
  auto [listen, peer] = PairAddresses(transport, 20);
  std::string common =
      ",vm=vm1,witness=this-process,interval_ms=10,output_spacing_ms=0,"
      "pairing=00112233445566778899aabbccddeeff,transport=" +
      transport + ",key_file=" + KeyFile();
  char err[512];
  void* s = api->create(&sops, ("role=secondary,host=b,listen=" + listen + common).c_str(), err,
                        sizeof err);
  INFO(err);
  REQUIRE(s != nullptr);
  void* p =
      api->create(&pops, ("role=primary,host=a,peer=" + peer + common).c_str(), err, sizeof err);
  REQUIRE(p != nullptr);
  REQUIRE(api->start(s, err, sizeof err) == 0);
  // As QEMU's filter-lockstep does: held output may end an epoch early (a no-op with
  // output_spacing_ms=0 above, but it must be callable at any time).
  // Packets are held only while protected, and the orderly destroy below first switches to
  // pass-through, so the hook never sees a destroyed replica.
  primary_host.guest.SetHeldHook([api, p] { api->output_pending(p); });
  primary_host.guest.Boot();
  REQUIRE(api->start(p, err, sizeof err) == 0);
  auto [ps, ss] = PollStatus(api, p, s, 500, [](const std::string& ps, const std::string& ss) {
    return ps.find("\"state\":\"PROTECTED\"") != std::string::npos &&
           ss.find("\"state\":\"PROTECTED\"") != std::string::npos &&
           ps.find("\"acked_epoch\":1,") == std::string::npos;
  });
  INFO(ps << "\n" << ss);
  REQUIRE(ps.find("\"role\":\"primary\",\"state\":\"PROTECTED\"") != std::string::npos);
  REQUIRE(ss.find("\"role\":\"secondary\",\"state\":\"PROTECTED\"") != std::string::npos);
  REQUIRE(ps.find("\"acked_epoch\":0,") == std::string::npos);
  api->destroy(p);  // orderly: GOODBYE, acknowledged
  for (int i = 0; i < 300 && StatusJson(api, s).find("STOPPED") == std::string::npos; ++i) {
    std::this_thread::sleep_for(10ms);
  }
  REQUIRE(StatusJson(api, s).find("\"state\":\"STOPPED\"") != std::string::npos);
  api->destroy(s);
  std::lock_guard<std::mutex> lock(primary_host.mu);
  REQUIRE(primary_host.states == std::vector<std::string>{"SYNCING", "PROTECTED", "STOPPED"});
}

TEST_CASE("a primary with another pairing key is refused, over TCP and over DPDK memif",
          "[plugin]") {
  const lockstep_plugin_api* api = LoadPlugin();
  Host primary_host(SmallGuest()), secondary_host(SmallGuest());
  lockstep_host_ops pops = primary_host.Ops(), sops = secondary_host.Ops();
  const std::string transport = GENERATE("tcp", "dpdk");
  CAPTURE(transport);
  auto [listen, peer] = PairAddresses(transport, 30);
  const std::string other_key = KeyFile() + ".other";
  std::ofstream(other_key) << "ff0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n";
  chmod(other_key.c_str(), 0600);
  std::string common =
      ",vm=vm1,witness=this-process,pairing=00112233445566778899aabbccddeeff,"
      "transport=" +
      transport;
  char err[512] = {};
  void* s = api->create(
      &sops, ("role=secondary,host=b,listen=" + listen + common + ",key_file=" + KeyFile()).c_str(),
      err, sizeof err);
  INFO(err);
  REQUIRE(s != nullptr);
  void* p = api->create(
      &pops, ("role=primary,host=a,peer=" + peer + common + ",key_file=" + other_key).c_str(), err,
      sizeof err);
  REQUIRE(p != nullptr);
  REQUIRE(api->start(s, err, sizeof err) == 0);
  primary_host.guest.Boot();
  REQUIRE(api->start(p, err, sizeof err) == 0);
  auto [ps, ss] = PollStatus(api, p, s, 1000, [](const std::string& ps, const std::string& ss) {
    return ps.find("pairing key") != std::string::npos &&
           ss.find("refused a connection") != std::string::npos;
  });
  INFO(ps << "\n" << ss);
  // Each side names the other's wrong proof; nothing was replicated; the secondary waits on
  // for the real primary.
  CHECK(ps.find("\"state\":\"IDLE\"") != std::string::npos);
  CHECK(ps.find("did not prove it holds this host's pairing key") != std::string::npos);
  CHECK(ps.find("\"epochs\":0,") != std::string::npos);
  CHECK(ss.find("\"state\":\"IDLE\"") != std::string::npos);
  CHECK(ss.find("refused a connection") != std::string::npos);
  CHECK(ss.find("pairing-key proof is wrong") != std::string::npos);
  api->destroy(p);
  api->destroy(s);
  std::remove(other_key.c_str());
}

TEST_CASE("a secondary given an address it cannot listen on says so at once", "[plugin]") {
  const lockstep_plugin_api* api = LoadPlugin();
  Host host(SmallGuest());
  lockstep_host_ops ops = host.Ops();
  char err[512];
  void* s = api->create(
      &ops,
      ("role=secondary,vm=a,host=b,witness=this-process,listen=nonsense,key_file=" + KeyFile())
          .c_str(),
      err, sizeof err);
  REQUIRE(s != nullptr);
  REQUIRE(api->start(s, err, sizeof err) == -1);
  REQUIRE(std::string(err).find("cannot listen on nonsense") != std::string::npos);
  api->destroy(s);
}

TEST_CASE("a handover is refused where there is nothing to hand over, with the reason",
          "[plugin]") {
  const lockstep_plugin_api* api = LoadPlugin();
  Host host(SmallGuest());
  lockstep_host_ops ops = host.Ops();
  const std::string common = ",vm=vm7,witness=this-process,key_file=" + KeyFile();
  char err[512];
  void* s = api->create(&ops, ("role=secondary,host=b,listen=127.0.0.1:0" + common).c_str(), err,
                        sizeof err);
  INFO(err);
  REQUIRE(s != nullptr);
  SECTION("a secondary: asked of the primary") {
    REQUIRE(api->handover(s, err, sizeof err) == -1);
    CHECK(std::string(err) ==
          "lockstep: this replica is the secondary of VM vm7; a handover is asked of the primary");
  }
  SECTION("an error buffer too small: cut short, terminated") {
    char small[16];
    std::memset(small, 'x', sizeof small);
    REQUIRE(api->handover(s, small, sizeof small) == -1);
    CHECK(std::string(small) == "lockstep: this ");
    REQUIRE(api->handover(s, nullptr, 0) == -1);  // no buffer: refused all the same
  }
  SECTION("a primary never started") {
    Host primary_host(SmallGuest());
    lockstep_host_ops pops = primary_host.Ops();
    void* p = api->create(&pops, ("role=primary,host=a,peer=127.0.0.1:1" + common).c_str(), err,
                          sizeof err);
    REQUIRE(p != nullptr);
    REQUIRE(api->handover(p, err, sizeof err) == -1);
    CHECK(std::string(err).find("protection of VM vm7 was never started") != std::string::npos);
    {
      std::lock_guard<std::mutex> lock(primary_host.mu);
      CHECK(primary_host.states.empty());  // a refusal changes nothing
    }
    api->destroy(p);
  }
  {
    std::lock_guard<std::mutex> lock(host.mu);
    CHECK(host.states.empty());  // a refusal changes nothing
  }
  api->destroy(s);
}
