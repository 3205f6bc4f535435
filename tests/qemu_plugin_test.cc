// Real QEMU (built by qemu-patches/build-qemu.sh) with the engine loaded as a plugin,
// booting the test guest (guest/build-guest.sh) under TCG: protection of a running VM
// between two QEMU processes over TCP, and refusals of bad input with clear messages.
//
// Configured only when CMake is given LOCKSTEP_QEMU and LOCKSTEP_GUEST_DIR (scripts/test.sh
// builds both first).
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>

#include "free_port.h"
#include <chrono>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using lockstep::testing::FreePort;

namespace {


// One QEMU process with its output in a log file; killed when it goes out of scope.
class Qemu {
 public:
  Qemu(const std::string& name, std::vector<std::string> extra, int fwd_port,
       const char* mem = "256")
      : log_("/tmp/lockstep-qemu-" + name + "-" + std::to_string(getpid()) + ".log") {
    std::string guest = LOCKSTEP_GUEST_DIR;
    std::vector<std::string> args = {
        LOCKSTEP_QEMU,
        "-L",
        "/usr/share/qemu",
        "-L",
        "/usr/share/seabios",
        "-accel",
        "tcg",
        "-m",
        mem,
        "-nographic",
        "-no-reboot",
        "-kernel",
        guest + "/vmlinuz",
        "-initrd",
        guest + "/initrd.gz",
        "-append",
        "console=ttyS0 quiet panic=-1 lockstep.ip=10.0.2.15/24",
        "-device",
        "virtio-net-pci,netdev=n0,romfile=",
        "-netdev",
        "user,id=n0,hostfwd=tcp:127.0.0.1:" + std::to_string(fwd_port) + "-:7000"};
    args.insert(args.end(), extra.begin(), extra.end());
    pid_ = fork();
    if (pid_ == 0) {
      int fd = open(log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      dup2(fd, 1);
      dup2(fd, 2);
      int devnull = open("/dev/null", O_RDONLY);
      dup2(devnull, 0);
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
  }
  ~Qemu() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    unlink(log_.c_str());
  }
  std::string Log() const {
    std::ifstream f(log_);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
  }
  bool WaitForLog(const std::string& text, std::chrono::seconds timeout) const {
    auto end = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < end) {
      if (Log().find(text) != std::string::npos) return true;
      std::this_thread::sleep_for(100ms);
    }
    return false;
  }
  // True if the process exited (reaps it) within `timeout`; sets *status.
  bool WaitExit(std::chrono::seconds timeout, int* status) {
    auto end = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < end) {
      if (waitpid(pid_, status, WNOHANG) == pid_) {
        pid_ = -1;
        return true;
      }
      std::this_thread::sleep_for(50ms);
    }
    return false;
  }

 private:
  std::string log_;
  pid_t pid_ = -1;
};

// Sends one request line to the guest's workload; returns the reply ("" on failure).
std::string Ask(int port, const std::string& line) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  timeval tv{10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  std::string reply;
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
      write(fd, (line + "\n").data(), line.size() + 1) > 0) {
    char buf[256];
    ssize_t n = read(fd, buf, sizeof buf);
    if (n > 0) reply.assign(buf, static_cast<size_t>(n));
  }
  close(fd);
  return reply;
}

std::string Object(const std::string& role, const std::string& where, const std::string& host) {
  return std::string("lockstep,id=ft0,plugin=") + LOCKSTEP_PLUGIN_PATH + ",role=" + role +
         ",vm=vm1,host=" + host + "," + where + ",witness=this-process,settings=interval_ms=20";
}

}  // namespace

TEST_CASE("a real QEMU guest is protected by a second QEMU over TCP", "[qemu]") {
  int link = FreePort(), pfwd = FreePort(), sfwd = FreePort();
  std::string addr = "127.0.0.1:" + std::to_string(link);
  Qemu secondary("sec", {"-S", "-object", Object("secondary", "listen=" + addr, "hostB")}, sfwd);
  Qemu primary("pri", {"-object", Object("primary", "peer=" + addr, "hostA")}, pfwd);
  INFO("primary log:\n" << primary.Log() << "\nsecondary log:\n" << secondary.Log());
  REQUIRE(primary.WaitForLog("lockstep: PROTECTED", 60s));
  REQUIRE(secondary.WaitForLog("lockstep: PROTECTED", 60s));
  REQUIRE(primary.WaitForLog("LOCKSTEP-GUEST-READY", 60s));
  // The protected guest serves; its replies chain (counter 1, then 2).
  std::string r1 = Ask(pfwd, "hello");
  std::string r2 = Ask(pfwd, "again");
  INFO(r1 << r2);
  REQUIRE(r1.rfind("1 ", 0) == 0);
  REQUIRE(r2.rfind("2 ", 0) == 0);
  // Still protected a while later: checkpoints do not disturb the guest or the link.
  std::this_thread::sleep_for(2s);
  REQUIRE(primary.Log().find("lockstep: FAILED") == std::string::npos);
  REQUIRE(secondary.Log().find("lockstep: PROMOTING") == std::string::npos);
}

TEST_CASE("QEMU refuses a missing plugin with the reason", "[qemu]") {
  Qemu q("noplugin",
         {"-object",
          "lockstep,id=ft0,plugin=/nonexistent/liblockstep_plugin.so,role=primary,"
          "vm=vm1,host=a,peer=127.0.0.1:1,witness=this-process"},
         FreePort());
  int status = 0;
  REQUIRE(q.WaitExit(30s, &status));
  INFO(q.Log());
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) != 0);
  REQUIRE(q.Log().find("cannot load the plugin") != std::string::npos);
  REQUIRE(q.Log().find("/nonexistent/liblockstep_plugin.so") != std::string::npos);
}

TEST_CASE("a secondary with another guest configuration refuses, the primary runs on", "[qemu]") {
  int link = FreePort(), pfwd = FreePort(), sfwd = FreePort();
  std::string addr = "127.0.0.1:" + std::to_string(link);
  Qemu secondary("sec128", {"-S", "-object", Object("secondary", "listen=" + addr, "hostB")}, sfwd,
                 "128");
  Qemu primary("pri256", {"-object", Object("primary", "peer=" + addr, "hostA")}, pfwd);
  INFO("primary log:\n" << primary.Log() << "\nsecondary log:\n" << secondary.Log());
  REQUIRE(secondary.WaitForLog("the guest configurations differ", 60s));
  REQUIRE(primary.WaitForLog("refused protection of vm1", 60s));
  REQUIRE(primary.WaitForLog("LOCKSTEP-GUEST-READY", 60s));
  REQUIRE(Ask(pfwd, "still here").rfind("1 ", 0) == 0);
}
