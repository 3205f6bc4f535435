#include "admin/vm_definition.h"

#include <arpa/inet.h>
#include <sys/stat.h>

#include <nlohmann/json.hpp>
#include <set>

namespace lockstep::admin {

namespace {

using nlohmann::json;

Status Bad(const std::string& what) { return Status::InvalidArgument("VM definition: " + what); }

// kInvalidArgument naming the first member of `object` not in `known`.
Status OnlyKnown(const json& object, const std::set<std::string>& known, const std::string& where) {
  for (const auto& [key, value] : object.items()) {
    if (known.count(key) == 0) {
      std::string list;
      for (const auto& k : known) list += (list.empty() ? "" : ", ") + k;
      return Bad("unknown member '" + key + "'" + where + " (known: " + list + ")");
    }
  }
  return Status::Ok();
}

Status ReadString(const json& o, const char* key, bool required, std::string* out) {
  auto it = o.find(key);
  if (it == o.end()) return required ? Bad(std::string("'") + key + "' is required") : Status::Ok();
  if (!it->is_string()) return Bad(std::string("'") + key + "' must be a string");
  *out = it->get<std::string>();
  return Status::Ok();
}

Status ReadInt(const json& o, const char* key, bool required, int64_t lo, int64_t hi,
               int64_t* out) {
  auto it = o.find(key);
  if (it == o.end()) return required ? Bad(std::string("'") + key + "' is required") : Status::Ok();
  if (!it->is_number_integer() || it->get<int64_t>() < lo || it->get<int64_t>() > hi) {
    return Bad(std::string("'") + key + "' must be a whole number from " + std::to_string(lo) +
               " to " + std::to_string(hi));
  }
  *out = it->get<int64_t>();
  return Status::Ok();
}

Status CheckFile(const std::string& path, const char* what) {
  if (path.empty() || path[0] != '/')
    return Bad(std::string("'") + what + "' must be an absolute path");
  struct stat st;
  if (stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
    return Bad(std::string("'") + what + "': no file at " + path);
  }
  return Status::Ok();
}

bool ValidMac(const std::string& mac) {
  if (mac.size() != 17) return false;
  for (size_t i = 0; i < mac.size(); ++i) {
    if (i % 3 == 2 ? mac[i] != ':' : !std::isxdigit(static_cast<unsigned char>(mac[i])))
      return false;
  }
  // A unicast address: the low bit of the first octet clear.
  return (std::stoi(mac.substr(0, 2), nullptr, 16) & 1) == 0;
}

// The engine settings a definition may carry: tuning only (see vm_definition.h).
Status CheckTuning(const std::string& settings) {
  static const std::set<std::string> kTuning = {
      "interval_ms",     "output_spacing_ms", "heartbeat_ms",
      "threshold_ms",    "sync_threshold_ms", "ack_timeout_ms",
      "grant_window_ms", "fence_timeout_ms",  "delta",
      "link_protection", "precopy_rounds",    "handover_timeout_ms",
      "transport"};
  size_t at = 0;
  while (at < settings.size()) {
    size_t end = settings.find(';', at);
    if (end == std::string::npos) end = settings.size();
    const std::string item = settings.substr(at, end - at);
    at = end + 1;
    if (item.empty()) continue;
    const size_t eq = item.find('=');
    bool plain = eq != std::string::npos && eq > 0;
    for (char c : item) plain = plain && c != ',' && static_cast<unsigned char>(c) > ' ';
    if (!plain) {
      return Bad(
          "'settings' of protection: key=value items separated by ';' (no ',' or spaces), "
          "not '" +
          item + "'");
    }
    if (item.substr(0, eq) == "transport") {
      const std::string value = item.substr(eq + 1);
      if (value != "tcp" && value != "dpdk" && value != "rdma") {
        return Bad("'settings' of protection: transport must be tcp, dpdk or rdma, not '" + value +
                   "'");
      }
    }
    if (kTuning.count(item.substr(0, eq)) == 0) {
      std::string list;
      for (const auto& k : kTuning) list += (list.empty() ? "" : ", ") + k;
      return Bad("'settings' of protection may tune only " + list + "; '" + item.substr(0, eq) +
                 "' is each host's own configuration (lockstepd's flags), not the VM's");
    }
  }
  return Status::Ok();
}

// The items of a ';'-separated settings string other than `key`'s.
std::string WithoutSetting(const std::string& settings, const std::string& key) {
  std::string kept;
  size_t at = 0;
  while (at <= settings.size()) {
    size_t end = settings.find(';', at);
    if (end == std::string::npos) end = settings.size();
    const std::string item = settings.substr(at, end - at);
    at = end + 1;
    if (item.empty() || item.rfind(key + "=", 0) == 0) continue;
    kept += (kept.empty() ? "" : ";") + item;
  }
  return kept;
}

bool ValidInterfaceName(const std::string& name) {
  if (name.empty() || name.size() > 15) return false;
  for (char c : name) {
    if (c == '/' || c == ',' || c == '=' || static_cast<unsigned char>(c) <= ' ') return false;
  }
  return true;
}

Status ParseNic(const json& j, size_t index, Nic* nic) {
  const std::string where = " of nics[" + std::to_string(index) + "]";
  if (!j.is_object()) return Bad("nics[" + std::to_string(index) + "] must be an object");
  LOCKSTEP_RETURN_IF_ERROR(OnlyKnown(j, {"mac", "tap", "user_forward"}, where));
  LOCKSTEP_RETURN_IF_ERROR(ReadString(j, "mac", true, &nic->mac));
  if (!ValidMac(nic->mac)) {
    return Bad("'mac'" + where + " must be a unicast MAC like 52:54:00:12:34:56, not '" + nic->mac +
               "'");
  }
  LOCKSTEP_RETURN_IF_ERROR(ReadString(j, "tap", false, &nic->tap));
  const bool has_user = j.contains("user_forward");
  if (nic->tap.empty() == !has_user) {
    return Bad("nics[" + std::to_string(index) + "] needs exactly one of 'tap' and 'user_forward'");
  }
  if (!nic->tap.empty() && !ValidInterfaceName(nic->tap)) {
    return Bad("'tap'" + where + " is not an interface name: '" + nic->tap + "'");
  }
  if (has_user) {
    const json& fw = j["user_forward"];
    if (!fw.is_array()) return Bad("'user_forward'" + where + " must be a list");
    for (const json& f : fw) {
      PortForward p;
      int64_t guest = 0;
      if (!f.is_object() || OnlyKnown(f, {"host", "guest"}, where).code() != Status::Code::kOk ||
          !ReadString(f, "host", true, &p.host).ok() ||
          !ReadInt(f, "guest", true, 1, 65535, &guest).ok() ||
          p.host.find(':') == std::string::npos || p.host.find(',') != std::string::npos) {
        return Bad("each of 'user_forward'" + where +
                   " must be {\"host\": \"ADDR:PORT\", \"guest\": PORT}");
      }
      p.guest = static_cast<int>(guest);
      nic->user_forward.push_back(p);
    }
  }
  return Status::Ok();
}

}  // namespace

bool ValidVmName(std::string_view name) {
  if (name.empty() || name.size() > 64 || !std::isalnum(static_cast<unsigned char>(name[0]))) {
    return false;
  }
  for (char c : name) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') {
      return false;
    }
  }
  return true;
}

Result<VmDefinition> ParseVmDefinition(std::string_view json_text) {
  json j = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Bad("not valid JSON");
  if (!j.is_object()) return Bad("must be a JSON object");
  LOCKSTEP_RETURN_IF_ERROR(OnlyKnown(
      j, {"name", "memory_mib", "vcpus", "kernel", "initrd", "append", "nics", "protection"}, ""));
  VmDefinition d;
  LOCKSTEP_RETURN_IF_ERROR(ReadString(j, "name", true, &d.name));
  if (!ValidVmName(d.name)) {
    return Bad(
        "'name' must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter "
        "or digit, not '" +
        d.name + "'");
  }
  int64_t memory = 0, vcpus = 1;
  LOCKSTEP_RETURN_IF_ERROR(ReadInt(j, "memory_mib", true, 64, 1 << 20, &memory));
  LOCKSTEP_RETURN_IF_ERROR(ReadInt(j, "vcpus", false, 1, 64, &vcpus));
  d.memory_mib = static_cast<uint64_t>(memory);
  d.vcpus = static_cast<int>(vcpus);
  LOCKSTEP_RETURN_IF_ERROR(ReadString(j, "kernel", true, &d.kernel));
  LOCKSTEP_RETURN_IF_ERROR(CheckFile(d.kernel, "kernel"));
  LOCKSTEP_RETURN_IF_ERROR(ReadString(j, "initrd", false, &d.initrd));
  if (!d.initrd.empty()) LOCKSTEP_RETURN_IF_ERROR(CheckFile(d.initrd, "initrd"));
  LOCKSTEP_RETURN_IF_ERROR(ReadString(j, "append", false, &d.append));
  if (j.contains("nics")) {
    if (!j["nics"].is_array()) return Bad("'nics' must be a list");
    for (size_t i = 0; i < j["nics"].size(); ++i) {
      Nic nic;
      LOCKSTEP_RETURN_IF_ERROR(ParseNic(j["nics"][i], i, &nic));
      d.nics.push_back(nic);
    }
  }
  if (j.contains("protection")) {
    const json& p = j["protection"];
    if (!p.is_object()) return Bad("'protection' must be an object");
    LOCKSTEP_RETURN_IF_ERROR(OnlyKnown(p, {"settings", "vip"}, " of protection"));
    LOCKSTEP_RETURN_IF_ERROR(ReadString(p, "settings", false, &d.protection_settings));
    LOCKSTEP_RETURN_IF_ERROR(ReadString(p, "vip", false, &d.vip));
    LOCKSTEP_RETURN_IF_ERROR(CheckTuning(d.protection_settings));
    if (!d.vip.empty()) {
      unsigned char addr[16];
      if (inet_pton(AF_INET, d.vip.c_str(), addr) != 1 &&
          inet_pton(AF_INET6, d.vip.c_str(), addr) != 1) {
        return Bad("'vip' of protection must be an IPv4 or IPv6 address, not '" + d.vip + "'");
      }
    }
  }
  return d;
}

std::string VmDefinitionJson(const VmDefinition& d) {
  json j = {
      {"name", d.name}, {"memory_mib", d.memory_mib}, {"vcpus", d.vcpus}, {"kernel", d.kernel}};
  if (!d.initrd.empty()) j["initrd"] = d.initrd;
  if (!d.append.empty()) j["append"] = d.append;
  json nics = json::array();
  for (const Nic& n : d.nics) {
    json nic = {{"mac", n.mac}};
    if (!n.tap.empty()) {
      nic["tap"] = n.tap;
    } else {
      json fw = json::array();
      for (const auto& f : n.user_forward) fw.push_back({{"host", f.host}, {"guest", f.guest}});
      nic["user_forward"] = fw;
    }
    nics.push_back(nic);
  }
  if (!nics.empty()) j["nics"] = nics;
  if (!d.protection_settings.empty() || !d.vip.empty()) {
    j["protection"] = json::object();
    if (!d.protection_settings.empty()) j["protection"]["settings"] = d.protection_settings;
    if (!d.vip.empty()) j["protection"]["vip"] = d.vip;
  }
  return j.dump(2) + "\n";
}

std::vector<std::string> QemuCommandLine(const VmDefinition& d, const QemuParts& parts,
                                         const std::string& qmp_socket,
                                         const std::string& console_log,
                                         const std::vector<std::string>& extra) {
  std::vector<std::string> a = {parts.qemu};
  for (const auto& dir : parts.data_dirs) a.insert(a.end(), {"-L", dir});
  a.insert(a.end(), {"-name", d.name, "-accel", "tcg", "-m", std::to_string(d.memory_mib), "-smp",
                     std::to_string(d.vcpus), "-display", "none", "-monitor", "none", "-serial",
                     "file:" + console_log, "-qmp", "unix:" + qmp_socket + ",server=on,wait=off",
                     "-kernel", d.kernel});
  if (!d.initrd.empty()) a.insert(a.end(), {"-initrd", d.initrd});
  if (!d.append.empty()) a.insert(a.end(), {"-append", d.append});
  for (size_t i = 0; i < d.nics.size(); ++i) {
    const Nic& n = d.nics[i];
    const std::string id = "n" + std::to_string(i);
    std::string netdev;
    if (!n.tap.empty()) {
      netdev = "tap,id=" + id + ",ifname=" + n.tap + ",script=no,downscript=no";
    } else {
      netdev = "user,id=" + id;
      for (const auto& f : n.user_forward) {
        netdev += ",hostfwd=tcp:" + f.host + "-:" + std::to_string(f.guest);
      }
    }
    a.insert(a.end(), {"-netdev", netdev, "-device",
                       "virtio-net-pci,netdev=" + id + ",romfile=,mac=" + n.mac, "-object",
                       "filter-lockstep,id=f" + std::to_string(i) + ",netdev=" + id + ",queue=rx"});
  }
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

std::string TransportOf(const VmDefinition& d) {
  std::string transport = "tcp";
  size_t at = 0;
  const std::string& settings = d.protection_settings;
  while (at <= settings.size()) {
    size_t end = settings.find(';', at);
    if (end == std::string::npos) end = settings.size();
    const std::string item = settings.substr(at, end - at);
    at = end + 1;
    if (item.rfind("transport=", 0) == 0) transport = item.substr(10);  // the last one counts
  }
  return transport;
}

Status SetTransport(VmDefinition* d, const std::string& transport) {
  std::string settings = WithoutSetting(d->protection_settings, "transport");
  settings += (settings.empty() ? "" : ";") + ("transport=" + transport);
  LOCKSTEP_RETURN_IF_ERROR(CheckTuning(settings));
  d->protection_settings = settings;
  return Status::Ok();
}

}  // namespace lockstep::admin
