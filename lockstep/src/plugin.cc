// liblockstep_plugin.so: the engine behind the C ABI of lockstep/plugin_abi.h.
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "lockstep/pairing_auth.h"
#include "lockstep/plugin_abi.h"
#include "lockstep/replicator.h"
#include "replica_common.h"
#include "replication_channel/transports.h"
#include "vip_manager/etcd_witness.h"
#include "vip_manager/fence.h"
#include "vip_manager/identity.h"
#include "vip_manager/witness_service.h"

namespace lockstep {
namespace {

void CopyError(const std::string& msg, char* err, size_t len) {
  if (err == nullptr || len == 0) return;
  std::snprintf(err, len, "%s", msg.c_str());
}

// The Hypervisor interface over the host's C operations.
class HostHypervisor final : public Hypervisor {
 public:
  explicit HostHypervisor(const lockstep_host_ops& ops) : ops_(ops) {}

  std::vector<RamBlock> RamBlocks() override {
    std::vector<RamBlock> out;
    int n = ops_.ram_block_count(ops_.opaque);
    for (int i = 0; i < n; ++i) {
      const char* id = nullptr;
      uint8_t* host = nullptr;
      uint64_t length = 0;
      if (ops_.ram_block_info(ops_.opaque, i, &id, &host, &length) != 0) return {};
      out.push_back({id ? id : "", host, length});
    }
    return out;
  }
  Status StopVcpus() override { return Check(ops_.stop_vcpus(ops_.opaque), "stopping the vCPUs"); }
  Status StartVcpus() override {
    return Check(ops_.start_vcpus(ops_.opaque), "starting the vCPUs");
  }
  Status Halt() override { return Check(ops_.halt(ops_.opaque), "halting the guest"); }
  Status StartDirtyLog() override {
    return Check(ops_.dirty_log_start(ops_.opaque), "starting dirty logging");
  }
  Status StopDirtyLog() override {
    return Check(ops_.dirty_log_stop(ops_.opaque), "stopping dirty logging");
  }
  Status SyncDirtyLog() override {
    return Check(ops_.dirty_log_sync(ops_.opaque), "syncing the dirty log");
  }
  Status TakeDirtyBitmap(size_t block, std::span<uint64_t> bitmap) override {
    return Check(
        ops_.take_dirty_bitmap(ops_.opaque, static_cast<int>(block), bitmap.data(), bitmap.size()),
        "reading the dirty bitmap");
  }
  Result<size_t> SaveDeviceState(std::span<uint8_t> out) override {
    int64_t n = ops_.save_device_state(ops_.opaque, out.data(), out.size());
    if (n == -ENOSPC) {
      return Status::ResourceExhausted("the device state does not fit in " +
                                       std::to_string(out.size()) +
                                       " bytes; raise max_device_state");
    }
    if (n < 0) return Check(static_cast<int>(n), "saving the device state");
    return static_cast<size_t>(n);
  }
  Status LoadDeviceState(std::span<const uint8_t> state) override {
    return Check(ops_.load_device_state(ops_.opaque, state.data(), state.size()),
                 "loading the device state");
  }
  void CloseOutputBarrier(uint64_t epoch) override {
    ops_.close_output_barrier(ops_.opaque, epoch);
  }
  void ReleaseOutput(uint64_t epoch) override { ops_.release_output(ops_.opaque, epoch); }
  void SetOutputMode(OutputMode mode) override {
    ops_.set_output_mode(ops_.opaque, mode == OutputMode::kPassThrough
                                          ? LOCKSTEP_OUTPUT_PASS_THROUGH
                                      : mode == OutputMode::kBuffered ? LOCKSTEP_OUTPUT_BUFFERED
                                                                      : LOCKSTEP_OUTPUT_DROPPED);
  }
  Status Announce() override { return Check(ops_.announce(ops_.opaque), "announcing the NICs"); }

 private:
  Status Check(int rc, const char* what) {
    if (rc == 0) return Status::Ok();
    const char* why = ops_.describe_error ? ops_.describe_error(ops_.opaque) : nullptr;
    std::string m = std::string(what) + " failed: " +
                    (why && *why ? std::string(why) : std::string(std::strerror(-rc)));
    return Status::IoError(m);
  }
  const lockstep_host_ops ops_;
};

// A witness that grants the token to the first request it receives in this process. It
// is sound only where the other replica can never ask (its process is dead), which is
// what the kill -9 tests exercise; the embedded and etcd witnesses replace it.
class ThisProcessWitness final : public vip::Witness {
 public:
  using vip::Witness::RequestActive;
  Result<uint64_t> Register(std::string_view, std::string_view) override { return uint64_t{1}; }
  // Confirmed at once: nobody else can ever ask, so there is nothing to wait for.
  Result<vip::WitnessDecision> RequestActive(std::string_view, std::string_view candidate,
                                             uint64_t term, std::chrono::milliseconds) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (holder_.empty()) holder_ = candidate;
    return vip::WitnessDecision{holder_ == candidate, term + 1, holder_, true};
  }
  Result<vip::WitnessDecision> Confirm(std::string_view, std::string_view holder,
                                       uint64_t term) override {
    std::lock_guard<std::mutex> lock(mu_);
    return vip::WitnessDecision{holder_ == holder, term, holder_, true};
  }
  Result<vip::WitnessDecision> Reclaim(std::string_view, std::string_view, uint64_t term) override {
    std::lock_guard<std::mutex> lock(mu_);
    return vip::WitnessDecision{false, term, holder_, true};
  }

 private:
  std::mutex mu_;
  std::string holder_;  // GUARDED_BY(mu_)
};

struct PluginReplica {
  lockstep_host_ops ops{};
  std::unique_ptr<HostHypervisor> hv;
  std::unique_ptr<vip::Witness> witness;
  std::optional<vip::FenceCommand> fence;          // fence_command=
  std::unique_ptr<vip::IdentityClaimer> identity;  // vip=
  ReplicationOptions options;
  bool primary = false;
  std::string peer;    // primary
  std::string listen;  // secondary
  std::unique_ptr<PrimaryReplicator> primary_replica;
  std::unique_ptr<SecondaryReplica> secondary_replica;
  channel::TransportOptions transport_options;    // dpdk_eal=, rdma_device=
  std::unique_ptr<channel::Transport> transport;  // transport= (tcp by default)
  std::unique_ptr<channel::Listener> listener;
  std::thread starter;
  bool started = false;  // Start() succeeded (host thread only: the API's single caller)
  std::mutex mu;
  std::string start_error;  // GUARDED_BY(mu)

  Replica& replica() {
    return primary ? static_cast<Replica&>(*primary_replica)
                   : static_cast<Replica&>(*secondary_replica);
  }
};

bool ParseMillis(const std::string& v, Micros* out) {
  char* end = nullptr;
  long ms = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || ms <= 0 || ms > 600000) return false;
  *out = std::chrono::milliseconds(ms);
  return true;
}

bool ParseHex16(const std::string& v, std::array<uint8_t, 16>* out) {
  if (v.size() != 32) return false;
  for (size_t i = 0; i < 16; ++i) {
    unsigned b;
    if (std::sscanf(v.c_str() + 2 * i, "%2x", &b) != 1) return false;
    (*out)[i] = static_cast<uint8_t>(b);
  }
  return true;
}

// Fills `r` from "key=value,key=value"; returns the first problem, or "".
std::string ParseConfig(const char* config, PluginReplica* r) {
  std::string role, witness, fence_command, vip, transport = "tcp";
  std::chrono::milliseconds fence_timeout{30'000};
  std::optional<std::chrono::milliseconds> grant_window;
  std::string s = config ? config : "";
  size_t at = 0;
  while (at <= s.size()) {
    size_t comma = s.find(',', at);
    std::string item = s.substr(at, comma == std::string::npos ? std::string::npos : comma - at);
    at = comma == std::string::npos ? s.size() + 1 : comma + 1;
    if (item.empty()) continue;
    size_t eq = item.find('=');
    if (eq == std::string::npos) return "'" + item + "' is not key=value";
    std::string k = item.substr(0, eq), v = item.substr(eq + 1);
    if (k == "role") {
      role = v;
    } else if (k == "vm") {
      r->options.vm_id = v;
    } else if (k == "host") {
      r->options.host_id = v;
    } else if (k == "peer") {
      r->peer = v;
    } else if (k == "listen") {
      r->listen = v;
    } else if (k == "transport") {
      transport = v;
    } else if (k == "dpdk_eal") {
      r->transport_options.dpdk.eal_args = v;
    } else if (k == "rdma_device") {
      r->transport_options.rdma.device = v;
    } else if (k == "witness") {
      witness = v;
    } else if (k == "key_file") {
      auto key = LoadPairingKey(v);
      if (!key.ok()) return key.status().message();
      r->options.pairing_key = *key;
    } else if (k == "pairing") {
      if (!ParseHex16(v, &r->options.pairing_id)) return "pairing must be 32 hex digits";
    } else if (k == "interval_ms") {
      if (!ParseMillis(v, &r->options.epoch_interval)) return "interval_ms must be 1..600000";
    } else if (k == "heartbeat_ms") {
      if (!ParseMillis(v, &r->options.heartbeat_interval)) return "heartbeat_ms must be 1..600000";
    } else if (k == "threshold_ms") {
      if (!ParseMillis(v, &r->options.peer_loss_threshold)) return "threshold_ms must be 1..600000";
    } else if (k == "sync_threshold_ms") {
      if (!ParseMillis(v, &r->options.sync_loss_threshold))
        return "sync_threshold_ms must be 1..600000";
    } else if (k == "ack_timeout_ms") {
      if (!ParseMillis(v, &r->options.ack_timeout)) return "ack_timeout_ms must be 1..600000";
    } else if (k == "output_spacing_ms") {
      Micros spacing{0};
      if (v != "0" && !ParseMillis(v, &spacing)) return "output_spacing_ms must be 0..600000";
      r->options.output_epoch_spacing = spacing;
    } else if (k == "fence_command") {
      fence_command = v;
    } else if (k == "fence_timeout_ms") {
      Micros t{0};
      if (!ParseMillis(v, &t)) return "fence_timeout_ms must be 1..600000";
      fence_timeout = std::chrono::duration_cast<std::chrono::milliseconds>(t);
    } else if (k == "grant_window_ms") {
      Micros t{0};
      if (!ParseMillis(v, &t)) return "grant_window_ms must be 1..600000";
      grant_window = std::chrono::duration_cast<std::chrono::milliseconds>(t);
    } else if (k == "vip") {
      vip = v;
    } else if (k == "link_protection") {
      if (v == "mac") {
        r->options.link_protection = wire::LinkProtection::kMac;
      } else if (v == "aes-gcm") {
        r->options.link_protection = wire::LinkProtection::kEncrypt;
      } else if (v == "none") {
        r->options.link_protection = wire::LinkProtection::kNone;
      } else {
        return "link_protection must be mac (authenticated, the default), aes-gcm (also "
               "encrypted) or none (a CRC only: a dedicated, trusted link)";
      }
    } else if (k == "delta") {
      if (v != "on" && v != "off") return "delta must be on or off";
      r->options.delta_encoding = v == "on";
    } else if (k == "precopy_rounds") {
      char* end = nullptr;
      const long n = std::strtol(v.c_str(), &end, 10);
      if (v.empty() || *end != '\0' || n < 0 || n > 1000) return "precopy_rounds must be 0..1000";
      r->options.precopy_max_rounds = static_cast<int>(n);
    } else if (k == "handover_timeout_ms") {
      Micros t{0};
      if (!ParseMillis(v, &t)) return "handover_timeout_ms must be 1..600000";
      r->options.handover_timeout = std::chrono::duration_cast<std::chrono::milliseconds>(t);
    } else {
      return "unknown setting '" + k + "'";
    }
  }
  if (role != "primary" && role != "secondary") return "role must be primary or secondary";
  r->primary = role == "primary";
  if (r->options.vm_id.empty()) return "vm=NAME is required";
  if (r->options.host_id.empty()) return "host=NAME is required";
  auto made = channel::MakeTransport(transport, r->transport_options);
  if (!made.ok()) return "transport: " + made.status().message();
  if (transport == "rdma") {
    // Refused here, with the reason, rather than failing in the background later.
    if (Status rdma = channel::RdmaAvailable(r->transport_options.rdma); !rdma.ok())
      return "transport=rdma: " + rdma.message();
  }
  r->transport = std::move(*made);
  if (r->primary && r->peer.empty())
    return "a primary needs peer=ADDRESS (tcp, rdma: the secondary's HOST:PORT; dpdk: this "
           "host's port and the secondary's link, DEVARGS#LINK with '+' for ',')";
  if (!r->primary && r->listen.empty())
    return "a secondary needs listen=ADDRESS (tcp, rdma: HOST:PORT; dpdk: DEVARGS#LINK with "
           "'+' for ',')";
  // The window must cover the secondary's takeover steps, the fence command included
  // (ReplicationOptions::grant_window).
  const std::chrono::milliseconds fence_budget =
      fence_command.empty() ? std::chrono::milliseconds(0) : fence_timeout;
  if (grant_window && *grant_window <= fence_budget) {
    return "grant_window_ms (" + std::to_string(grant_window->count()) +
           ") must be longer than fence_timeout_ms (" + std::to_string(fence_budget.count()) +
           "): a winner still fencing when its window ends would lose the token";
  }
  r->options.grant_window = grant_window.value_or(std::chrono::milliseconds(2'000) + fence_budget);
  if (!fence_command.empty()) {
    auto f = vip::FenceCommand::Open(fence_command, fence_timeout);
    if (!f.ok()) return f.status().message();
    r->fence = std::move(*f);
    r->options.fence_peer = [r](const std::string& peer_host) {
      return r->fence->Run(r->options.vm_id, r->options.host_id, peer_host);
    };
  }
  if (!vip.empty()) {
    // ADDRESS@INTERFACE: a host-level address that follows the active replica.
    size_t at_sign = vip.find('@');
    if (at_sign == std::string::npos || at_sign == 0 || at_sign + 1 == vip.size())
      return "vip must be ADDRESS@INTERFACE, e.g. vip=10.9.0.50@br0";
    vip::IdentitySpec spec;
    spec.vip = vip.substr(0, at_sign);
    spec.interface = vip.substr(at_sign + 1);
    auto claimer = vip::IdentityClaimer::Open(spec);
    if (!claimer.ok()) return "vip=" + vip + ": " + claimer.status().message();
    r->identity = std::move(*claimer);
    r->options.claim_identity = [r] {
      auto report = r->identity->Claim();
      return report.ok() ? Status::Ok() : report.status();
    };
    r->options.release_identity = [r] { (void)r->identity->Release(); };
  }
  if (witness == "this-process") {
    r->witness = std::make_unique<ThisProcessWitness>();
  } else if (witness.rfind("tcp:", 0) == 0 && witness.size() > 4) {
    // The embedded witness (vip-manager's lockstep-witness) on a third host.
    r->witness = std::make_unique<vip::WitnessClient>(witness.substr(4));
  } else if (witness.rfind("etcd:", 0) == 0 && witness.size() > 5) {
    // etcd's v3 API; members of one cluster as HOST:PORT+HOST:PORT (',' ends a setting).
    std::vector<std::string> endpoints;
    std::string list = witness.substr(5);
    for (size_t at = 0; at <= list.size();) {
      size_t plus = list.find('+', at);
      if (plus == std::string::npos) plus = list.size();
      if (plus > at) endpoints.push_back(list.substr(at, plus - at));
      at = plus + 1;
    }
    if (endpoints.empty()) return "witness=etcd:HOST:PORT[+HOST:PORT...] needs an endpoint";
    r->witness = std::make_unique<vip::EtcdWitness>(std::move(endpoints));
  } else {
    return "witness=tcp:HOST:PORT (the embedded witness, lockstep-witness), "
           "witness=etcd:HOST:PORT[+HOST:PORT...] (etcd) or "
           "witness=this-process (tests only: sound only when a failed replica cannot ask "
           "again) is required";
  }
  if (!r->options.pairing_key)
    return "key_file=PATH (the hosts' pairing key: 64 hex digits, mode 0600) is required";
  return "";
}

void* Create(const lockstep_host_ops* ops, const char* config, char* err, size_t err_len) {
  if (ops == nullptr || ops->abi_version != LOCKSTEP_PLUGIN_ABI_VERSION) {
    CopyError("the host's operations table is missing or of another ABI version", err, err_len);
    return nullptr;
  }
  auto r = std::make_unique<PluginReplica>();
  r->ops = *ops;
  std::string problem = ParseConfig(config, r.get());
  if (!problem.empty()) {
    CopyError("lockstep: bad configuration: " + problem, err, err_len);
    return nullptr;
  }
  r->hv = std::make_unique<HostHypervisor>(r->ops);
  if (r->ops.state_changed) {
    lockstep_host_ops o = r->ops;
    r->options.on_transition = [o](const Transition& t) {
      o.state_changed(o.opaque, ReplicaStateName(t.to), t.reason.c_str());
    };
  }
  if (r->primary) {
    r->primary_replica = std::make_unique<PrimaryReplicator>(*r->hv, *r->witness, r->options);
  } else {
    r->secondary_replica = std::make_unique<SecondaryReplica>(*r->hv, *r->witness, r->options);
  }
  return r.release();
}

int Start(void* handle, char* err, size_t err_len) {
  auto* r = static_cast<PluginReplica*>(handle);
  if (r->starter.joinable()) {
    CopyError("lockstep: already started", err, err_len);
    return -1;
  }
  if (!r->primary) {
    // Listen now, so a wrong address is refused at once, not in the background.
    auto l = r->transport->Listen(r->listen);
    if (!l.ok()) {
      CopyError("lockstep: cannot listen on " + r->listen + ": " + l.status().ToString(), err,
                err_len);
      return -1;
    }
    r->listener = std::move(*l);
  }
  if (r->identity) {
    // The VIP lives where the guest runs: with the primary; a secondary drops a stale one
    // (say, from before a failover back).
    if (r->primary) {
      auto claimed = r->identity->Claim();
      if (!claimed.ok()) {
        CopyError("lockstep: cannot claim the VIP: " + claimed.status().ToString(), err, err_len);
        return -1;
      }
    } else if (Status released = r->identity->Release(); !released.ok()) {
      CopyError("lockstep: cannot release the VIP: " + released.ToString(), err, err_len);
      return -1;
    }
  }
  r->starter = std::thread([r] {
    Status s;
    if (r->primary) {
      auto ch = channel::ConnectWithRetry(*r->transport, r->peer,
                                          channel::Clock::now() + std::chrono::seconds(30));
      s = ch.ok() ? r->primary_replica->Start(std::move(*ch)) : ch.status();
    } else {
      // A peer refused at the handshake (another version or VM, a wrong key, a port
      // scanner) must not cost the real primary its secondary: report it, listen on.
      for (;;) {
        auto ch = r->listener->Accept(std::chrono::hours(24 * 365));
        s = ch.ok() ? r->secondary_replica->Start(std::move(*ch)) : ch.status();
        if (s.ok() || !ch.ok() || r->secondary_replica->state() != ReplicaState::kIdle ||
            s.code() == Status::Code::kAborted) {
          break;
        }
        std::lock_guard<std::mutex> lock(r->mu);
        r->start_error = "refused a connection: " + s.ToString() +
                         "; still waiting for the "
                         "primary on " +
                         r->listen;
        if (r->ops.state_changed)
          r->ops.state_changed(r->ops.opaque, "IDLE", r->start_error.c_str());
      }
    }
    if (!s.ok()) {
      std::lock_guard<std::mutex> lock(r->mu);
      r->start_error = s.ToString();
      if (r->ops.state_changed)
        r->ops.state_changed(r->ops.opaque, "FAILED", r->start_error.c_str());
    }
  });
  r->started = true;
  return 0;
}

void Stop(void* handle) {
  auto* r = static_cast<PluginReplica*>(handle);
  if (r->listener) r->listener->Abort();
  if (r->starter.joinable()) r->starter.join();
  if (r->primary)
    r->primary_replica->Stop();
  else
    r->secondary_replica->Stop();
}

std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

int QueryStatus(void* handle, char* json, size_t capacity) {
  auto* r = static_cast<PluginReplica*>(handle);
  ReplicationStats st = r->primary ? r->primary_replica->stats() : r->secondary_replica->stats();
  std::string reason = r->replica().fault_reason();
  {
    std::lock_guard<std::mutex> lock(r->mu);
    if (!r->start_error.empty()) reason = r->start_error;
  }
  std::string s =
      "{\"role\":" + JsonString(r->primary ? "primary" : "secondary") +
      ",\"state\":" + JsonString(ReplicaStateName(r->replica().state())) +
      ",\"reason\":" + JsonString(reason) + ",\"epoch\":" + std::to_string(st.current_epoch) +
      ",\"acked_epoch\":" + std::to_string(st.acked_epoch) +
      ",\"epochs\":" + std::to_string(st.epochs) + ",\"bytes\":" + std::to_string(st.bytes) +
      ",\"last_pause_us\":" + std::to_string(st.last_pause.count()) +
      ",\"pause_p50_us\":" + std::to_string(st.pause_p50.count()) +
      ",\"pause_p99_us\":" + std::to_string(st.pause_p99.count()) +
      ",\"ack_latency_p50_us\":" + std::to_string(st.ack_latency_p50.count()) + "}";
  if (s.size() + 1 > capacity) return -1;
  std::memcpy(json, s.c_str(), s.size() + 1);
  return static_cast<int>(s.size());
}

void OutputPending(void* handle) {
  auto* r = static_cast<PluginReplica*>(handle);
  if (r->primary) r->primary_replica->OutputPending();
}

int Handover(void* handle, char* err, size_t err_len) {
  auto* r = static_cast<PluginReplica*>(handle);
  if (!r->primary) {
    CopyError("lockstep: this replica is the secondary of VM " + r->options.vm_id +
                  "; a handover is asked of the primary",
              err, err_len);
    return -1;
  }
  if (!r->started) {
    CopyError("lockstep: protection of VM " + r->options.vm_id +
                  " was never started; there is nothing to hand over",
              err, err_len);
    return -1;
  }
  if (Status s = r->primary_replica->RequestHandover(); !s.ok()) {
    CopyError("lockstep: handover refused: " + s.ToString(), err, err_len);
    return -1;
  }
  return 0;
}

void Destroy(void* handle) {
  auto* r = static_cast<PluginReplica*>(handle);
  Stop(r);
  delete r;
}

const lockstep_plugin_api kApi = {.abi_version = LOCKSTEP_PLUGIN_ABI_VERSION,
                                  .create = Create,
                                  .start = Start,
                                  .stop = Stop,
                                  .query_status = QueryStatus,
                                  .destroy = Destroy,
                                  .output_pending = OutputPending,
                                  .handover = Handover};

}  // namespace
}  // namespace lockstep

extern "C" __attribute__((visibility("default"))) const lockstep_plugin_api* lockstep_plugin_entry(
    uint32_t abi_version) {
  return abi_version == LOCKSTEP_PLUGIN_ABI_VERSION ? &lockstep::kApi : nullptr;
}
