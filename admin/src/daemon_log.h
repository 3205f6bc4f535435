// lockstepd's log: one line per event on stderr, in logfmt ("ts=... level=info
// event=vm_started vm=web1 pid=1234"), so journald and log shippers can parse it.
#pragma once

#include <chrono>
#include <cstdio>
#include <ctime>
#include <string>
#include <utility>
#include <vector>

namespace lockstep::admin {

inline std::string LogValue(const std::string& v) {
  bool plain = !v.empty();
  for (char c : v) plain = plain && c > ' ' && c != '"' && c != '=' && c != '\\';
  if (plain) return v;
  std::string q = "\"";
  for (char c : v) {
    if (c == '"' || c == '\\') q += '\\';
    q += c == '\n' ? ' ' : c;
  }
  return q + "\"";
}

inline void LogEvent(const char* level, const char* event,
                     const std::vector<std::pair<std::string, std::string>>& fields) {
  auto now = std::chrono::system_clock::now();
  std::time_t t = std::chrono::system_clock::to_time_t(now);
  char ts[32];
  std::strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  std::string line = std::string("ts=") + ts + " level=" + level + " event=" + event;
  for (const auto& [k, v] : fields) line += " " + k + "=" + LogValue(v);
  std::fprintf(stderr, "%s\n", line.c_str());
  std::fflush(stderr);
}

}  // namespace lockstep::admin
