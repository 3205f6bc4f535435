// Test support: a real etcd, and a temporary directory.
//
// EtcdServer runs /usr/bin/etcd (Debian's etcd-server) as a one-member cluster of its own on
// free ports of 127.0.0.1, its data in a temporary directory that Kill/Start keep and the
// destructor removes. It is forked here rather than with testbed::ChildProcess so that it
// can ask to die with the test (PR_SET_PDEATHSIG): a test killed by ctest's timeout leaves
// no etcd behind. Not thread-safe; used from the test's thread.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "free_port.h"
#include "vip_manager/etcd_witness.h"

namespace lockstep::testing {

struct TemporaryDirectory {
  TemporaryDirectory() {
    char tmpl[] = "/tmp/lockstep-witness-XXXXXX";
    path = mkdtemp(tmpl);
  }
  ~TemporaryDirectory() { std::filesystem::remove_all(path); }
  TemporaryDirectory(const TemporaryDirectory&) = delete;
  TemporaryDirectory& operator=(const TemporaryDirectory&) = delete;
  std::string path;
};

class EtcdServer {
 public:
  static constexpr const char* kBinary = "/usr/bin/etcd";

  // Starts etcd and waits until it answers; fails the test with etcd's log if it does not.
  EtcdServer() : client_port_(FreePort()), peer_port_(FreePort()) {
    if (access(kBinary, X_OK) != 0) {
      FAIL(kBinary << " is missing: install etcd-server (scripts/bootstrap.sh does)");
    }
    Start();
  }
  ~EtcdServer() { Kill(); }
  EtcdServer(const EtcdServer&) = delete;
  EtcdServer& operator=(const EtcdServer&) = delete;

  std::string endpoint() const { return "127.0.0.1:" + std::to_string(client_port_); }

  // Starts etcd (again: same data directory, same ports) and waits until it answers.
  void Start() {
    REQUIRE(pid_ < 0);
    std::string client = "http://" + endpoint();
    std::string peer = "http://127.0.0.1:" + std::to_string(peer_port_);
    std::vector<std::string> args = {kBinary,
                                     "--name=t",
                                     "--data-dir=" + dir_.path + "/data",
                                     "--listen-client-urls=" + client,
                                     "--advertise-client-urls=" + client,
                                     "--listen-peer-urls=" + peer,
                                     "--initial-advertise-peer-urls=" + peer,
                                     "--initial-cluster=t=" + peer,
                                     "--logger=zap"};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    std::string log = log_path();
    pid_t parent = getpid();
    pid_ = fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {  // only async-signal-safe calls from here on
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(127);
      int out = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      int in = open("/dev/null", O_RDONLY);
      if (out < 0 || in < 0) _exit(127);
      dup2(out, 1);
      dup2(out, 2);
      dup2(in, 0);
      execv(argv[0], argv.data());
      _exit(127);
    }
    WaitUntilAnswering();
  }

  // SIGKILL and reap: etcd crashes; its data directory stays.
  void Kill() {
    if (pid_ < 0) return;
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

  void Signal(int signal) { kill(pid_, signal); }  // SIGSTOP, SIGCONT

  std::string Log() const {
    std::ifstream f(log_path());
    std::stringstream text;
    text << f.rdbuf();
    std::string all = text.str();
    return all.size() > 3000 ? "..." + all.substr(all.size() - 3000) : all;
  }

 private:
  std::string log_path() const { return dir_.path + "/etcd.log"; }

  // Until a transaction is answered (for a VM nobody registered: kFailedPrecondition).
  void WaitUntilAnswering() {
    vip::EtcdWitness probe({endpoint()}, "/lockstep-test-probe/", std::chrono::milliseconds(300));
    auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    Status last;
    for (;;) {
      auto d = probe.RequestActive("probe", "probe", 0);
      if (d.ok() || d.status().code() == Status::Code::kFailedPrecondition) return;
      last = d.status();
      if (waitpid(pid_, nullptr, WNOHANG) == pid_) {
        pid_ = -1;
        FAIL("etcd exited at start; its log:\n" << Log());
      }
      if (std::chrono::steady_clock::now() > give_up) {
        Kill();
        FAIL("etcd did not answer within 30 s (" << last.ToString() << "); its log:\n" << Log());
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }

  TemporaryDirectory dir_;
  int client_port_;
  int peer_port_;
  pid_t pid_ = -1;
};

}  // namespace lockstep::testing
