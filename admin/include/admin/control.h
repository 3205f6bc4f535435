// The control API of lockstepd, version 1: how lockstepctl (or any tool) talks to the daemon
// of its host. This header is its one description.
//
// Transport: a Unix stream socket (default /run/lockstep/lockstepd.sock), mode 0600 in a
// directory of mode 0700: root only. One request per connection: the client writes one
// JSON object and a newline (at most 1 MiB); the daemon answers one JSON object and a
// newline, then closes.
//   request  {"api": 1, "command": NAME, ...arguments}
//   answer   {"api": 1, "ok": true, ...results}
//            {"api": 1, "ok": false, "error": "what happened, and what to do"}
// A daemon that does not speak the request's "api" answers ok=false naming its own.
//
// Commands (arguments → results):
//   identity                     → "host", "peer_address" (its peer API, "" if none)
//   pair      "peer_host", "peer_address", "pairing_id" (32 hex), "key" (64 hex)
//                                → refused if this host is paired already
//   unpair                       → forgets the pairing (pairing.json, pairing.key)
//   pairing                      → "host", "pairing": checked live with the paired host
//   list                         → "host", "pairing", "vms": [VM summary...]
//   status    "vm"               → "vm": VM status, with "peer": the paired host's
//                                   {"host", "role", "state"} for it (or {"host", "error"})
//   define    "definition": {…}  → "vm": summary (admin/vm_definition.h; refused if the
//                                   name is taken)
//   undefine  "vm"               → refused while the VM runs
//   start     "vm"               → "vm": status, once QEMU answers on QMP (refused for a
//                                   secondary copy)
//   stop      "vm", "force"?     → QMP quit (force: SIGKILL at once); waits for the exit
//   protect   "vm"               → "vm": status; starts the secondary on the paired host
//                                   and the engine here (also re-protects after a failover)
//   unprotect "vm"               → "vm": status; only on the primary's host
//             (protect with "again": true is a re-protection only: refused for a VM whose
//             QEMU never had an engine)
//   failover  "vm", "how"        → on the primary's host, the VM PROTECTED. "how":
//             "planned" (default): the engine's HANDOVER to the paired host, no output lost;
//               this host's copy is then shut down → "from", "to", "handover_ms", "reason"
//             "forced": this host's QEMU is killed; returns once the paired host runs the
//               VM (ACTIVE) → "from", "to", "failover_ms", "reason" (its takeover timeline)
//             "drill": planned there, then (once the other host re-protected it) planned
//               back, then waits until it is protected here again → "legs": [two planned
//               results], "protected_on"
//             The other host re-protects the VM by itself after any of them.
// VM summary: "name", "state" ("stopped" | "running" | "paused" | "unreachable"), "pid"
// (when running), "protection": {"state": "UNPROTECTED" or the engine's state,
// "reason": why it is not protected}. VM status adds "memory_mib", "vcpus", "qemu_log",
// "console_log", "uptime_s" and "lockstep" (query-lockstep, when protection was started).
#pragma once

#include <chrono>
#include <nlohmann/json.hpp>
#include <string>

#include "common/status.h"

namespace lockstep::admin {

using Json = nlohmann::json;

inline constexpr int kControlApi = 1;
inline constexpr size_t kMaxControlMessage = 1 << 20;
inline constexpr const char* kDefaultControlSocket = "/run/lockstep/lockstepd.sock";

// Sends `request` (its "api" is set here) to the daemon at `socket_path` and returns the
// answer. kPeerLost if no daemon listens there (the message says how to start one),
// kTimedOut past `timeout`, kFailedPrecondition with the daemon's error if it refused.
Result<Json> CallDaemon(const std::string& socket_path, Json request,
                        std::chrono::milliseconds timeout);

}  // namespace lockstep::admin
