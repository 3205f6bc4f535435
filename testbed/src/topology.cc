#include "testbed/topology.h"

#include <fcntl.h>
#include <sched.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <vector>

namespace lockstep::testbed {

Status Run(const std::string& command) {
  std::string full = command + " 2>&1";
  FILE* p = popen(full.c_str(), "r");
  if (p == nullptr) return Status::FromErrno("popen", errno);
  std::string out;
  char buf[256];
  while (size_t n = fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  int rc = pclose(p);
  if (rc != 0) {
    return Status::IoError("'" + command + "' failed (status " + std::to_string(rc) + "): " + out);
  }
  return Status::Ok();
}

Status EnterNamespace(const std::string& netns) {
  if (netns.empty()) return Status::Ok();
  int fd = open(("/var/run/netns/" + netns).c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno("opening namespace " + netns, errno);
  int rc = setns(fd, CLONE_NEWNET);
  int err = errno;
  close(fd);
  if (rc != 0) return Status::FromErrno("entering namespace " + netns, err);
  return Status::Ok();
}

Result<std::unique_ptr<Topology>> Topology::Create(const std::string& prefix) {
  if (prefix.empty() || prefix.size() > 8) {
    return Status::InvalidArgument("the namespace prefix must have 1..8 characters");
  }
  std::unique_ptr<Topology> t(new Topology(prefix));
  t->Remove();
  const std::string cli = t->client_ns(), sw = t->switch_ns();
  std::vector<std::string> cmds = {
      "ip netns add " + cli,
      "ip netns add " + sw,
      "ip -n " + sw + " link add sw type bridge",
      "ip -n " + sw + " link set sw up",
      // The client's port.
      "ip -n " + cli + " link add eth0 type veth peer name cli netns " + sw,
      "ip -n " + sw + " link set cli master sw up",
      "ip -n " + cli + " addr add " + kClientIp + "/24 dev eth0",
      "ip -n " + cli + " link set eth0 up",
      "ip -n " + cli + " link set lo up",
      // The witness's port.
      "ip netns add " + t->witness_ns(),
      "ip -n " + t->witness_ns() + " link set lo up",
      "ip -n " + t->witness_ns() + " link add eth0 type veth peer name wit netns " + sw,
      "ip -n " + sw + " link set wit master sw up",
      "ip -n " + t->witness_ns() + " addr add " + kWitnessIp + "/24 dev eth0",
      "ip -n " + t->witness_ns() + " link set eth0 up",
  };
  for (bool primary : {true, false}) {
    const std::string ns = primary ? t->primary_ns() : t->secondary_ns();
    const std::string port = primary ? "pri" : "sec";
    const std::string host_ip = primary ? kPrimaryHostIp : kSecondaryHostIp;
    for (std::string c : {
             "ip netns add " + ns,
             "ip -n " + ns + " link set lo up",
             "ip -n " + ns + " link add br0 type bridge",
             "ip -n " + ns + " link set br0 up",
             "ip -n " + ns + " addr add " + host_ip + "/24 dev br0",
             "ip -n " + ns + " tuntap add dev " + std::string(kTap) + " mode tap",
             "ip -n " + ns + " link set " + std::string(kTap) + " master br0 up",
             "ip -n " + ns + " link add uplink type veth peer name " + port + " netns " + sw,
             "ip -n " + ns + " link set uplink master br0 up",
             "ip -n " + sw + " link set " + port + " master sw up",
         }) {
      cmds.push_back(c);
    }
  }
  for (std::string c : {
           "ip -n " + t->primary_ns() + " link add repl type veth peer name repl netns " +
               t->secondary_ns(),
           "ip -n " + t->primary_ns() + " addr add " + std::string(kPrimaryLinkIp) + "/30 dev repl",
           "ip -n " + t->secondary_ns() + " addr add " + std::string(kSecondaryLinkIp) +
               "/30 dev repl",
           "ip -n " + t->primary_ns() + " link set repl up",
           "ip -n " + t->secondary_ns() + " link set repl up",
       }) {
    cmds.push_back(c);
  }
  for (const auto& c : cmds) {
    Status s = Run(c);
    if (!s.ok()) {
      return s.WithContext("building the test network (needs root and network namespaces)");
    }
  }
  return t;
}

Topology::~Topology() { Remove(); }

void Topology::Remove() {
  for (const auto& ns : {client_ns(), switch_ns(), primary_ns(), secondary_ns(), witness_ns()}) {
    (void)Run("ip netns del " + ns + " 2>/dev/null || true");
  }
}

Status Topology::SetHostPortUp(bool primary, bool up) {
  return Run("ip -n " + switch_ns() + " link set " + (primary ? "pri" : "sec") +
             (up ? " up" : " down"));
}

Status Topology::SetWitnessPortUp(bool up) {
  return Run("ip -n " + switch_ns() + " link set wit" + (up ? " up" : " down"));
}

Status Topology::SetReplicationLinkUp(bool up) {
  return Run("ip -n " + primary_ns() + " link set repl" + (up ? " up" : " down"));
}

}  // namespace lockstep::testbed
