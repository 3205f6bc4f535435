// lockstep-witness: the embedded witness as a daemon, for a third host (or a namespace of
// its own in tests). It decides the single active replica of each protected VM and keeps
// its decisions in a state file across restarts (vip_manager/witness_service.h).
//
//   lockstep-witness --listen HOST:PORT --state FILE
//
// Runs until SIGINT or SIGTERM. Prints "lockstep-witness: listening on HOST:PORT" once
// ready.
#include <signal.h>

#include <cstdio>
#include <cstring>
#include <string>

#include "vip_manager/witness_service.h"

int main(int argc, char** argv) {
  std::string listen, state;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--listen" && i + 1 < argc) {
      listen = argv[++i];
    } else if (a == "--state" && i + 1 < argc) {
      state = argv[++i];
    } else {
      std::fprintf(stderr,
                   "lockstep-witness: unexpected '%s'\n"
                   "usage: lockstep-witness --listen HOST:PORT --state FILE\n",
                   a.c_str());
      return 2;
    }
  }
  if (listen.empty() || state.empty()) {
    std::fprintf(stderr, "usage: lockstep-witness --listen HOST:PORT --state FILE\n");
    return 2;
  }
  // Block the signals before any thread starts, then wait for one of them here.
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGINT);
  sigaddset(&stop, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);
  auto server = lockstep::vip::WitnessServer::Start(listen, state);
  if (!server.ok()) {
    std::fprintf(stderr, "lockstep-witness: %s\n", server.status().ToString().c_str());
    return 1;
  }
  std::printf("lockstep-witness: listening on %s, state in %s\n", (*server)->address().c_str(),
              state.c_str());
  std::fflush(stdout);
  int sig = 0;
  sigwait(&stop, &sig);
  std::printf("lockstep-witness: %s, stopping after %llu requests\n", strsignal(sig),
              static_cast<unsigned long long>((*server)->requests()));
  return 0;
}
