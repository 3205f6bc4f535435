#include "testbed/protected_pair.h"

#include <unistd.h>

#include <cstdio>
#include <filesystem>

namespace lockstep::testbed {

using namespace std::chrono_literals;

const char* WitnessKindName(WitnessKind k) { return k == WitnessKind::kEtcd ? "etcd" : "embedded"; }

ProtectedPair::~ProtectedPair() {
  client_.reset();
  capture_.reset();
  primary_.reset();
  secondary_.reset();
  witness_.reset();
  if (!witness_state_.empty()) std::filesystem::remove_all(witness_state_);
  net_.reset();
}

std::string ProtectedPair::Logs() const {
  std::string s;
  if (primary_) s += "primary log:\n" + primary_->Log() + "\n";
  if (secondary_) s += "secondary log:\n" + secondary_->Log() + "\n";
  if (witness_)
    s += "witness log (tail):\n" +
         witness_->Log().substr(witness_->Log().size() > 4000 ? witness_->Log().size() - 4000 : 0);
  return s;
}

Result<std::unique_ptr<ProtectedPair>> ProtectedPair::Start(const Parts& parts,
                                                            const PairOptions& o) {
  std::unique_ptr<ProtectedPair> p(new ProtectedPair());
  auto fail = [&p](const Status& s, const std::string& step) -> Status {
    return Status(s.code(), step + ": " + s.message() + "\n" + p->Logs());
  };
  auto net = Topology::Create(o.prefix);
  if (!net.ok()) return net.status().WithContext("building the hosts");
  p->net_ = std::move(*net);

  // The witness, on a host of its own; its state in a fresh place each run.
  const std::string ip = Topology::kWitnessIp, port = std::to_string(kWitnessPort);
  p->witness_state_ = "/tmp/lockstep-witness-" + o.prefix + "-" + std::to_string(getpid());
  std::filesystem::remove_all(p->witness_state_);
  std::filesystem::create_directories(p->witness_state_);
  std::vector<std::string> argv;
  std::string ready, witness_setting;
  if (o.witness == WitnessKind::kEtcd) {
    argv = {o.etcd_binary,
            "--name",
            "wit",
            "--data-dir",
            p->witness_state_ + "/etcd",
            "--listen-client-urls",
            "http://" + ip + ":" + port,
            "--advertise-client-urls",
            "http://" + ip + ":" + port,
            "--listen-peer-urls",
            "http://" + ip + ":7901",
            "--initial-advertise-peer-urls",
            "http://" + ip + ":7901",
            "--initial-cluster",
            "wit=http://" + ip + ":7901"};
    ready = "ready to serve client requests";
    witness_setting = "etcd:" + ip + ":" + port;
  } else {
    argv = {o.witness_binary, "--listen", ip + ":" + port, "--state", p->witness_state_ + "/state"};
    ready = "listening on";
    witness_setting = "tcp:" + ip + ":" + port;
  }
  auto w = ChildProcess::Start(argv, p->net_->witness_ns(), p->witness_state_ + ".log");
  if (!w.ok()) return w.status().WithContext("starting the witness " + argv[0]);
  p->witness_ = std::move(*w);
  if (!p->witness_->WaitForLog(ready, 30s))
    return fail(Status::TimedOut("not ready within 30 s"), "the witness");

  const std::string addr = std::string(Topology::kSecondaryLinkIp) + ":7700";
  LockstepConfig sc, pc;
  sc.role = "secondary";
  pc.role = "primary";
  sc.address = pc.address = addr;
  sc.host = "hostB";
  pc.host = "hostA";
  sc.witness = pc.witness = witness_setting;
  sc.settings = pc.settings = o.settings;
  if (!o.vip.empty()) {
    sc.settings += ";vip=" + o.vip + "@br0";
    pc.settings += ";vip=" + o.vip + "@br0";
  }
  if (!o.primary_settings.empty()) pc.settings += ";" + o.primary_settings;
  if (!o.secondary_settings.empty()) sc.settings += ";" + o.secondary_settings;

  VmOptions so, po;
  so.name = o.prefix + "-sec";
  so.netns = p->net_->secondary_ns();
  so.start_paused = true;
  so.extra = {"-object", LockstepObjectArg(parts, sc)};
  po.name = o.prefix + "-pri";
  po.netns = p->net_->primary_ns();
  so.tap = po.tap = Topology::kTap;
  so.smp = po.smp = o.smp;
  auto sec = QemuVm::Launch(parts, so);
  if (!sec.ok()) return fail(sec.status(), "launching the secondary QEMU");
  p->secondary_ = std::move(*sec);
  const double launched = WallSeconds();
  auto pri = QemuVm::Launch(parts, po);
  if (!pri.ok()) return fail(pri.status(), "launching the primary QEMU");
  p->primary_ = std::move(*pri);
  if (!p->primary_->WaitForLog("LOCKSTEP-GUEST-READY", 90s))
    return fail(Status::TimedOut("the guest did not boot within 90 s"), "booting");
  p->boot_seconds_ = WallSeconds() - launched;

  auto cap = PortCapture::Start(p->net_->switch_ns(), {"pri", "sec"},
                                {0x52, 0x54, 0x00, 0x12, 0x34, 0x56}, Topology::kGuestIp);
  if (!cap.ok()) return fail(cap.status(), "capturing on the switch");
  p->capture_ = std::move(*cap);

  auto added = p->primary_->qmp().Execute("object-add", LockstepObjectAdd(parts, pc));
  if (!added.ok()) return fail(added.status(), "object-add lockstep on the primary");
  auto protected_ = p->secondary_->WaitForState("PROTECTED", 90s);
  if (!protected_.ok()) return fail(protected_.status(), "waiting for PROTECTED");
  auto c = WorkloadClient::Start(p->net_->client_ns(), Topology::kGuestIp, 7000, 30s);
  if (!c.ok()) return fail(c.status(), "connecting the client");
  p->client_ = std::move(*c);
  if (!p->client_->WaitForReplies(5, 30s))
    return fail(Status::TimedOut("fewer than 5 replies in 30 s: " + p->client_->error()),
                "the client");
  return p;
}

}  // namespace lockstep::testbed
