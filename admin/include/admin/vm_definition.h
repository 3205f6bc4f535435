// A VM definition: what lockstepd needs to run a VM, as an operator writes it (JSON), and
// the QEMU command line it becomes. The operator never writes a QEMU command line.
//
// Format, version 1 (a JSON object; unknown members are refused, so a typo is an error,
// not a silent default):
//   "name"        required; 1..64 of [A-Za-z0-9._-], starting with a letter or digit
//   "memory_mib"  required; 64..1048576
//   "vcpus"       1..64 (default 1)
//   "kernel"      required; absolute path of the guest kernel (direct kernel boot)
//   "initrd"      absolute path of an initramfs (optional)
//   "append"      the kernel command line (optional)
//   "nics"        a list (optional) of {"mac": "52:54:00:xx:xx:xx", and one of
//                   "tap": "IFNAME"        an existing tap on the host (production), or
//                   "user_forward": [{"host": "ADDR:PORT", "guest": PORT}, ...]
//                                          QEMU user networking with forwarded TCP ports
//                                          (for trying things out)}
//   "protection"  {"settings": "key=value;...", "vip": "ADDRESS"} (optional): the
//                 engine's tuning for this VM when it is protected — only interval_ms,
//                 output_spacing_ms, heartbeat_ms, threshold_ms, sync_threshold_ms,
//                 ack_timeout_ms, grant_window_ms, fence_timeout_ms, delta and
//                 link_protection (docs/qemu-plugin.md) — and a host-level VIP that follows
//                 the active replica. Everything that decides who may run the VM (role,
//                 witness, key, pairing, fence command) or where (the VIP's interface) is
//                 each host's own configuration, never the definition's: the paired host
//                 sends the definition
// Example (the repository's test guest): admin/examples/demo-vm.json.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace lockstep::admin {

struct PortForward {
  std::string host;  // "ADDR:PORT"
  int guest = 0;
};

struct Nic {
  std::string mac;
  std::string tap;                        // set: a tap backend
  std::vector<PortForward> user_forward;  // with tap empty: user networking
};

struct VmDefinition {
  std::string name;
  uint64_t memory_mib = 0;
  int vcpus = 1;
  std::string kernel, initrd, append;
  std::vector<Nic> nics;
  std::string protection_settings;
  std::string vip;  // IPv4 or IPv6 address, "" = none
};

// Parses and checks a definition. kInvalidArgument naming the member and what it must be;
// the files it names must exist (checked here, so a mistake shows when it is defined).
Result<VmDefinition> ParseVmDefinition(std::string_view json_text);

// The definition as JSON text (what ParseVmDefinition reads back the same).
std::string VmDefinitionJson(const VmDefinition& d);

// The replication transport the definition's protection settings ask for ("transport=",
// one of tcp|dpdk|rdma; "tcp" when unset).
std::string TransportOf(const VmDefinition& d);

// Sets `transport` in the definition's protection settings (kInvalidArgument for a name
// that is not tcp, dpdk or rdma).
Status SetTransport(VmDefinition* d, const std::string& transport);

// Whether `name` is a valid VM name (see above).
bool ValidVmName(std::string_view name);

// Where the host's parts are, for QemuCommandLine.
struct QemuParts {
  std::string qemu;                    // qemu-system-x86_64 with lockstep's patches
  std::vector<std::string> data_dirs;  // -L directories (firmware)
};

// QEMU's arguments (argv[0] included) for running `d`: headless, its QMP on `qmp_socket`,
// its serial console appended to `console_log`, every NIC's guest output passing through a
// filter-lockstep object (held only while protected).
// `extra`: more arguments, appended (a secondary's -S and its lockstep object).
std::vector<std::string> QemuCommandLine(const VmDefinition& d, const QemuParts& parts,
                                         const std::string& qmp_socket,
                                         const std::string& console_log,
                                         const std::vector<std::string>& extra = {});

}  // namespace lockstep::admin
