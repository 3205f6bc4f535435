// lockstepctl: the administrator's command line. Talks to the lockstepd of this host over
// its control socket (admin/control.h). See docs/admin-plane.md.
//
// Exit status: 0 done; 1 the daemon refused (the message says why and what to do);
// 2 a usage error; 3 no daemon could be reached.
#include <openssl/rand.h>
#include <unistd.h>

#include <algorithm>
#include <boost/program_options.hpp>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "admin/control.h"
#include "admin/peer_link.h"

namespace po = boost::program_options;
using namespace lockstep;
using namespace lockstep::admin;

namespace {

constexpr int kRefused = 1, kUsage = 2, kUnreachable = 3;

struct Command {
  const char* name;
  const char* args;  // for the usage line
  const char* help;
};
const Command kCommands[] = {
    {"pair", "HOST_A HOST_B [--spare]",
     "pair two hosts (HOST_x: the control socket of that host's lockstepd): makes a key, "
     "gives it to both, checks each proves it; --spare: HOST_B becomes HOST_A's spare"},
    {"unpair", "", "forget this host's pairing"},
    {"pairing", "", "this host's pairing, checked live with the other host"},
    {"list", "", "the VMs of this host, with their state and protection"},
    {"status", "[VM]",
     "one VM in detail: state, protection and why, both hosts' roles, link, logs (no VM: "
     "list)"},
    {"define", "FILE", "define a VM from a definition file (JSON; docs/admin-plane.md)"},
    {"undefine", "VM", "forget a stopped VM"},
    {"start", "VM", "start a defined VM"},
    {"stop", "VM [--force]", "stop a VM (QMP quit; --force: kill it)"},
    {"protect", "VM",
     "protect a running VM: a secondary on the paired host, the initial sync, then epochs"},
    {"unprotect", "VM", "end protection on purpose (no failover); the secondary is removed"},
    {"reprotect", "VM",
     "protect a VM again now (after a failover or unprotect) instead of waiting for the "
     "automatic re-protection"},
    {"failover", "VM [--drill|--forced]",
     "move a protected VM to the paired host: planned (no output lost), --drill (there and "
     "back, timed) or --forced (its QEMU here is killed, as a host crash would)"},
};

std::string Usage() {
  std::ostringstream o;
  o << "usage: lockstepctl [--socket PATH] [--json] COMMAND [ARGS] [--help]\n\ncommands:\n";
  for (const auto& c : kCommands) {
    char line[160];
    std::snprintf(line, sizeof line, "  %-10s %-22s %s\n", c.name, c.args, c.help);
    o << line;
  }
  o << "\nglobal options:\n  --socket PATH  lockstepd's control socket (default "
    << kDefaultControlSocket << ")\n  --json         print the daemon's answer as JSON\n";
  return o.str();
}

int Report(const std::string& command, const Status& s) {
  std::cerr << "lockstepctl " << command << ": " << s.message() << "\n";
  if (s.code() == Status::Code::kPeerLost) return kUnreachable;  // no daemon answers there
  if (s.code() == Status::Code::kInvalidArgument) return kUsage;
  return kRefused;
}

// pair HOST_A HOST_B: both daemons get the same new key and each other's name and peer
// address, then each checks the other proves the key. All or nothing: if the second host
// refuses, the first forgets the pairing again.
// With `spare`, b becomes a's spare (a keeps its partner) and b is paired with a.
int Pair(const std::string& a, const std::string& b, bool json, bool spare) {
  const auto timeout = std::chrono::seconds(20);
  auto ida = CallDaemon(a, {{"command", "identity"}}, timeout);
  if (!ida.ok()) return Report("pair", ida.status());
  auto idb = CallDaemon(b, {{"command", "identity"}}, timeout);
  if (!idb.ok()) return Report("pair", idb.status());
  for (const auto* id : {&*ida, &*idb}) {
    if (id->value("peer_address", std::string()).empty()) {
      return Report("pair", Status::FailedPrecondition(
                                id->value("host", std::string()) +
                                "'s lockstepd has no peer API: start it with --peer-listen"));
    }
  }
  std::array<uint8_t, 32> key{};
  std::array<uint8_t, 16> id{};
  if (RAND_bytes(key.data(), key.size()) != 1 || RAND_bytes(id.data(), id.size()) != 1) {
    return Report("pair", Status::IoError("no random bytes from OpenSSL for the key"));
  }
  auto request = [&](const Json& other) {
    return Json{{"command", "pair"},
                {"peer_host", other["host"]},
                {"peer_address", other["peer_address"]},
                {"pairing_id", ToHex(id.data(), id.size())},
                {"key", ToHex(key.data(), key.size())}};
  };
  Json to_a = request(*idb);
  if (spare) to_a["spare"] = true;
  const Json undo_a = {{"command", "unpair"}, {"spare", spare}};
  auto pa = CallDaemon(a, to_a, timeout);
  if (!pa.ok()) return Report("pair", pa.status());
  auto pb = CallDaemon(b, request(*ida), timeout);
  if (!pb.ok()) {
    (void)CallDaemon(a, undo_a, timeout);
    return Report("pair", pb.status());
  }
  for (const std::string& s : {a, b}) {
    auto check = CallDaemon(s, {{"command", "pairing"}, {"spare", spare && s == a}}, timeout);
    if (!check.ok()) {
      // All or nothing: a pairing that does not work is not left behind.
      (void)CallDaemon(a, undo_a, timeout);
      (void)CallDaemon(b, {{"command", "unpair"}}, timeout);
      return Report("pair", check.status());
    }
  }
  const std::string ha = (*ida)["host"], hb = (*idb)["host"];
  if (json) {
    std::cout << Json{{"paired", {ha, hb}}}.dump(2) << "\n";
  } else {
    std::printf(spare ? "%s has %s as its spare: each proved it holds the new key\n"
                      : "paired %s and %s: each proved it holds the new key\n",
                ha.c_str(), hb.c_str());
  }
  return 0;
}

// Polls the VM's status until the engine reports PROTECTED, drawing the initial
// synchronization's progress on stderr when `bar` (guest RAM sent so far: the first epoch
// carries every non-zero page, so the bar may stop short of 100% before it is done).
Result<Json> WaitUntilProtected(const std::string& socket, const std::string& vm, bool bar) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(10);
  for (;;) {
    auto st = CallDaemon(socket, {{"command", "status"}, {"vm", vm}}, std::chrono::seconds(20));
    if (!st.ok()) return st.status();
    const Json& v = (*st)["vm"];
    const std::string state = v["protection"].value("state", std::string());
    if (bar) {
      const double ram = v.value("memory_mib", 0.0) * (1 << 20);
      const double sent = v.contains("lockstep") && !v["lockstep"].empty()
                              ? v["lockstep"][0].value("bytes", 0.0)
                              : 0;
      const double done = state == "PROTECTED" ? 1.0 : std::min(0.99, ram > 0 ? sent / ram : 0);
      const int filled = static_cast<int>(done * 30);
      std::fprintf(stderr, "\rinitial sync [%s%s] %3.0f%%  %.0f MiB sent  %-10s",
                   std::string(static_cast<size_t>(filled), '#').c_str(),
                   std::string(static_cast<size_t>(30 - filled), '-').c_str(), done * 100,
                   sent / (1 << 20), state.c_str());
    }
    if (state == "PROTECTED") {
      if (bar) std::fprintf(stderr, "\n");
      return v;
    }
    if (state != "IDLE" && state != "SYNCING") {
      if (bar) std::fprintf(stderr, "\n");
      return Status::FailedPrecondition("protection of " + vm + " ended " + state + ": " +
                                        v["protection"].value("reason", std::string()));
    }
    if (std::chrono::steady_clock::now() > deadline) {
      return Status::TimedOut("VM " + vm + " not PROTECTED after 10 minutes (state " + state +
                              "); lockstepctl status " + vm + " tells more");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
}

void PrintVmLine(const Json& v) {
  const Json& p = v.value("protection", Json::object());
  std::printf("%-20s %-11s %-8s %-14s %s\n", v.value("name", std::string("?")).c_str(),
              v.value("state", std::string("?")).c_str(),
              v.contains("pid") ? std::to_string(v["pid"].get<long>()).c_str() : "-",
              p.value("state", std::string("?")).c_str(), p.value("reason", std::string()).c_str());
}

void PrintStatus(const Json& v) {
  const Json& p = v.value("protection", Json::object());
  std::printf(
      "VM %s\n  state       %s%s\n  protection  %s\n", v.value("name", std::string()).c_str(),
      v.value("state", std::string("?")).c_str(),
      v.contains("pid") ? (" (QEMU pid " + std::to_string(v["pid"].get<long>()) + ")").c_str() : "",
      p.value("state", std::string("?")).c_str());
  if (!p.value("reason", std::string()).empty()) {
    std::printf("  why         %s\n", p["reason"].get<std::string>().c_str());
  }
  if (v.contains("note")) std::printf("  note        %s\n", v["note"].get<std::string>().c_str());
  if (v.contains("transport")) {
    std::printf("  transport   %s\n", v["transport"].get<std::string>().c_str());
  }
  std::printf("  memory      %llu MiB, %d vCPU(s)\n",
              static_cast<unsigned long long>(v.value("memory_mib", 0ull)), v.value("vcpus", 0));
  if (v.contains("uptime_s")) std::printf("  up          %.0f s\n", v["uptime_s"].get<double>());
  if (v.contains("lockstep") && v["lockstep"].is_array() && !v["lockstep"].empty()) {
    const Json& e = v["lockstep"][0];
    auto num = [&](const char* k) { return e.contains(k) ? e[k].dump() : std::string("-"); };
    std::printf(
        "  role        %s\n  epoch       %s (acknowledged %s, lag %s epochs)\n"
        "  pause       p50 %s us, p99 %s us (last %s us)\n  ack         p50 %s us\n"
        "  sent        %s bytes in %s epochs\n",
        e.value("role", std::string("?")).c_str(), num("epoch").c_str(), num("acked-epoch").c_str(),
        num("lag-epochs").c_str(), num("pause-p50-us").c_str(), num("pause-p99-us").c_str(),
        num("last-pause-us").c_str(), num("ack-latency-p50-us").c_str(), num("bytes").c_str(),
        num("epochs").c_str());
  }
  if (v.contains("peer")) {
    const Json& p = v["peer"];
    if (p.contains("error")) {
      std::printf("  peer        %s does not answer: %s\n", p.value("host", std::string()).c_str(),
                  p["error"].get<std::string>().c_str());
    } else {
      const std::string role = p.value("role", std::string());
      std::printf("  peer        %s: %s\n", p.value("host", std::string()).c_str(),
                  role.empty() ? "no copy of this VM protected there"
                               : (role + " (" + p.value("state", std::string()) + ")").c_str());
    }
  }
  if (v.contains("lockstep") && v["lockstep"].is_array() && !v["lockstep"].empty() &&
      v.contains("events") && v["events"].is_array()) {
    // The link's average since this protection began (the last SYNCING here).
    double since = 0;
    for (const Json& e : v["events"]) {
      if (e.value("state", std::string()) == "SYNCING") since = e.value("at", 0.0);
    }
    const double now =
        std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
    const double bytes = v["lockstep"][0].value("bytes", 0.0);
    if (since > 0 && now > since) {
      std::printf("  link        %.1f MB/s on average since protection began (%.0f s ago)\n",
                  bytes / (now - since) / 1e6, now - since);
    }
  }
  if (v.contains("events") && v["events"].is_array() && !v["events"].empty()) {
    std::printf("  history     (the engine's state changes here, newest last)\n");
    const Json& events = v["events"];
    for (size_t i = events.size() > 5 ? events.size() - 5 : 0; i < events.size(); ++i) {
      const Json& e = events[i];
      const double at = e.value("at", 0.0);
      std::time_t secs = static_cast<std::time_t>(at);
      char when[32];
      std::strftime(when, sizeof when, "%H:%M:%S", std::localtime(&secs));
      std::printf("    %s.%03d  %-13s %s\n", when, static_cast<int>((at - secs) * 1000),
                  e.value("state", std::string()).c_str(),
                  e.value("reason", std::string()).substr(0, 110).c_str());
    }
  }
  std::printf("  logs        %s\n              %s\n", v.value("qemu_log", std::string()).c_str(),
              v.value("console_log", std::string()).c_str());
}

}  // namespace

int main(int argc, char** argv) {
  std::string socket_path = kDefaultControlSocket;
  bool json = false;
  // Global options come before the command; the rest belongs to the command.
  int at = 1;
  for (; at < argc; ++at) {
    std::string a = argv[at];
    if (a == "--json") {
      json = true;
    } else if (a == "--socket" && at + 1 < argc) {
      socket_path = argv[++at];
    } else if (a.rfind("--socket=", 0) == 0) {
      socket_path = a.substr(9);
    } else if (a == "--help" || a == "-h") {
      std::cout << Usage();
      return 0;
    } else if (!a.empty() && a[0] == '-') {
      std::cerr << "lockstepctl: unknown option '" << a << "'\n\n" << Usage();
      return kUsage;
    } else {
      break;
    }
  }
  if (at >= argc) {
    std::cerr << Usage();
    return kUsage;
  }
  std::string command = argv[at];
  const Command* known = nullptr;
  for (const auto& c : kCommands) {
    if (command == c.name) known = &c;
  }
  if (known == nullptr) {
    std::cerr << "lockstepctl: unknown command '" << command << "'\n\n" << Usage();
    return kUsage;
  }

  // The command's own options: positional arguments, --force, --json, --help.
  po::options_description opts(std::string("lockstepctl ") + known->name + " " + known->args +
                               "\n  " + known->help + "\n\noptions");
  std::vector<std::string> positional;
  opts.add_options()("help,h", "this help")("json", "print the daemon's answer as JSON");
  if (command == "stop") opts.add_options()("force", "kill QEMU instead of asking it to quit");
  if (command == "pair") {
    opts.add_options()("spare",
                       "HOST_B becomes HOST_A's spare: when HOST_A's partner is lost for good "
                       "(silent past lockstepd --spare-after), HOST_A protects its VMs on "
                       "HOST_B instead");
  }
  if (command == "unpair") opts.add_options()("spare", "forget this host's spare only");
  if (command == "failover") {
    opts.add_options()("drill",
                       "a drill: switch over to the paired host, wait until it protects the "
                       "VM, switch back, wait until it is protected here again; prints both "
                       "legs' timings")("forced",
                                        "kill the VM's QEMU here (SIGKILL) and let the "
                                        "secondary detect it and take over, as on a host crash");
  }
  if (command == "protect" || command == "reprotect") {
    opts.add_options()("no-wait",
                       "return once protection started, without waiting for the initial "
                       "synchronization (by default: wait, with a progress bar, until "
                       "PROTECTED)")(
        "transport", po::value<std::string>(),
        "the replication transport for this VM from now on: tcp (default), dpdk (both "
        "lockstepd need --dpdk-port) or rdma (both hosts need an RDMA device)");
  }
  po::options_description hidden;  // the positional arguments: not listed in --help
  hidden.add_options()("args", po::value(&positional));
  po::options_description all;
  all.add(opts).add(hidden);
  po::positional_options_description pos;
  pos.add("args", -1);
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(argc - at, argv + at).options(all).positional(pos).run(), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    std::cerr << "lockstepctl " << command << ": " << e.what() << "\n";
    return kUsage;
  }
  if (vm.count("help")) {
    std::cout << opts << "\n";
    return 0;
  }
  json = json || vm.count("json");
  size_t want = 0;  // the words of the usage line that are not [optional]
  {
    std::istringstream words(known->args);
    for (std::string w; words >> w;) want += w[0] != '[';
  }
  if (command == "status" && positional.empty()) command = "list";
  if (positional.size() != want &&
      !(known->args == std::string("[VM]") && positional.size() == 1)) {
    std::cerr << "lockstepctl " << command << ": expected " << (want ? known->args : "no arguments")
              << "\n  usage: lockstepctl " << command << " " << known->args << "\n";
    return kUsage;
  }

  if (command == "pair") return Pair(positional[0], positional[1], json, vm.count("spare") > 0);
  Json request = {{"command", command}};
  if (command == "define") {
    std::ifstream in(positional[0]);
    if (!in) {
      std::cerr << "lockstepctl define: cannot read " << positional[0] << "\n";
      return kUsage;
    }
    std::stringstream text;
    text << in.rdbuf();
    Json definition = Json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
    if (definition.is_discarded()) {
      std::cerr << "lockstepctl define: " << positional[0]
                << " is not JSON (docs/admin-plane.md shows a VM definition)\n";
      return kRefused;
    }
    request["definition"] = definition;
  } else if (positional.size() == 1) {
    request["vm"] = positional[0];
  }
  request["command"] = command;
  if (command == "stop") request["force"] = vm.count("force") > 0;
  if (command == "unpair") request["spare"] = vm.count("spare") > 0;
  if (command == "reprotect")
    request = {{"command", "protect"}, {"vm", positional[0]}, {"again", true}};
  if (vm.count("transport")) {
    const std::string transport = vm["transport"].as<std::string>();
    if (transport != "tcp" && transport != "dpdk" && transport != "rdma") {
      std::cerr << "lockstepctl " << command << ": --transport must be tcp, dpdk or rdma, not '"
                << transport << "'\n";
      return kUsage;
    }
    request["transport"] = transport;
  }
  if (command == "failover") {
    if (vm.count("drill") && vm.count("forced")) {
      std::cerr << "lockstepctl failover: --drill and --forced do not go together\n";
      return kUsage;
    }
    request["how"] = vm.count("drill") ? "drill" : vm.count("forced") ? "forced" : "planned";
  }

  // protect waits for the paired host's daemon (its QEMU started) and for QEMU's object-add.
  // A drill waits for two re-protections (two initial synchronizations).
  const auto timeout = command == "failover" ? std::chrono::seconds(1500)
                       : command == "protect" || command == "unprotect" || command == "reprotect"
                           ? std::chrono::seconds(180)
                           : std::chrono::seconds(60);
  if (command == "failover" && !json) {
    std::fprintf(stderr, "%s\n",
                 vm.count("drill") ? "failover drill: there and back, waiting for each "
                                     "re-protection (minutes for a large VM)..."
                                   : "failing over...");
  }
  auto answer = CallDaemon(socket_path, request, timeout);
  if (!answer.ok()) return Report(command, answer.status());
  if ((command == "protect" || command == "reprotect") && !vm.count("no-wait")) {
    auto done = WaitUntilProtected(socket_path, positional[0], !json && isatty(STDERR_FILENO));
    if (!done.ok()) return Report(command, done.status());
    answer = Json{{"vm", *done}};
  }
  if (json) {
    Json out = *answer;
    out.erase("api");
    out.erase("ok");
    std::cout << out.dump(2) << "\n";
    return 0;
  }
  if (command == "list" || command == "pairing") {
    const Json& p = (*answer)["pairing"];
    std::printf("host %s, %s\n", answer->value("host", std::string()).c_str(),
                p.value("paired", false)
                    ? ("paired with " + p.value("peer_host", std::string()) + " (" +
                       p.value("peer_address", std::string()) + ")" +
                       (p.contains("last_check") ? ": " + p["last_check"].get<std::string>() : "") +
                       (p.contains("spare")
                            ? "; spare " + p["spare"].value("peer_host", std::string()) + " (" +
                                  p["spare"].value("peer_address", std::string()) + ")"
                            : ""))
                          .c_str()
                    : "not paired");
  }
  if (command == "list") {
    std::printf("%-20s %-11s %-8s %-14s %s\n", "VM", "STATE", "PID", "PROTECTION", "WHY");
    for (const Json& v : (*answer)["vms"]) PrintVmLine(v);
  } else if (command == "status" || command == "start" || command == "protect" ||
             command == "unprotect" || command == "reprotect") {
    PrintStatus((*answer)["vm"]);
  } else if (command == "failover") {
    auto leg = [](const Json& l) {
      const double ms = l.value("handover_ms", l.value("failover_ms", 0.0));
      std::printf("%s -> %s in %.1f ms\n  %s\n", l.value("from", std::string()).c_str(),
                  l.value("to", std::string()).c_str(), ms,
                  l.value("reason", std::string()).c_str());
    };
    if (answer->contains("legs")) {
      for (const Json& l : (*answer)["legs"]) leg(l);
      std::printf("drill done: VM %s is protected on %s again\n", positional[0].c_str(),
                  answer->value("protected_on", std::string()).c_str());
    } else {
      leg(*answer);
    }
  } else if (command == "pairing") {
    // printed above
  } else if (command == "define") {
    std::printf("defined %s\n", (*answer)["vm"].value("name", std::string()).c_str());
  } else {
    std::printf("%s: done\n", command.c_str());
  }
  return 0;
}
