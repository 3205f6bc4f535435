// The external fence command: what counts as success, the deadline, what it is told, and
// a bad path refused when configured rather than during a failover.
#include "vip_manager/fence.h"

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

using namespace lockstep;
using namespace lockstep::vip;
using namespace std::chrono_literals;

namespace {

// A shell script in a fresh temporary directory; removed with it.
struct Script {
  explicit Script(const std::string& body) {
    char tmpl[] = "/tmp/lockstep-fence-XXXXXX";
    dir = mkdtemp(tmpl);
    path = dir + "/fence";
    std::ofstream(path) << "#!/bin/sh\n" << body << "\n";
    chmod(path.c_str(), 0755);
  }
  ~Script() { std::filesystem::remove_all(dir); }
  std::string dir, path;
};

}  // namespace

TEST_CASE("a fence command that exits 0 fenced the peer, and is told whom", "[fence]") {
  Script s(
      "echo \"$1 $2 $LOCKSTEP_VM $LOCKSTEP_HOST $LOCKSTEP_PEER_HOST\" > \"$(dirname \"$0\")/out\"");
  auto f = FenceCommand::Open(s.path, 5s);
  REQUIRE(f.ok());
  REQUIRE(f->Run("vm1", "hostB", "hostA").ok());
  std::ifstream in(s.dir + "/out");
  std::string line;
  std::getline(in, line);
  REQUIRE(line == "vm1 hostA vm1 hostB hostA");
}

TEST_CASE("a fence command that fails or hangs did not fence", "[fence]") {
  SECTION("non-zero exit") {
    Script s("exit 3");
    auto f = FenceCommand::Open(s.path, 5s);
    REQUIRE(f.ok());
    Status st = f->Run("vm1", "hostB", "hostA");
    REQUIRE(st.code() == Status::Code::kFailedPrecondition);
    REQUIRE(st.message().find("exited with status 3") != std::string::npos);
  }
  SECTION("killed by a signal") {
    Script s("kill -9 $$");
    auto f = FenceCommand::Open(s.path, 5s);
    REQUIRE(f.ok());
    REQUIRE(f->Run("vm1", "hostB", "hostA").message().find("signal 9") != std::string::npos);
  }
  SECTION("past the deadline: killed, children too") {
    Script s("sleep 30 & echo $! > \"$(dirname \"$0\")/child\"; wait");
    auto f = FenceCommand::Open(s.path, 200ms);
    REQUIRE(f.ok());
    auto t0 = std::chrono::steady_clock::now();
    Status st = f->Run("vm1", "hostB", "hostA");
    auto took = std::chrono::steady_clock::now() - t0;
    REQUIRE(st.code() == Status::Code::kTimedOut);
    REQUIRE(took >= 200ms);
    REQUIRE(took < 5s);  // generous: the sleep was killed, not waited for
    // The agent's child went with it (its process group was killed).
    std::ifstream in(s.dir + "/child");
    pid_t child = 0;
    REQUIRE(in >> child);
    bool gone = false;
    for (int i = 0; i < 200 && !gone; ++i) {
      // Gone, or dead and waiting for whoever reaps orphans here.
      std::ifstream stat("/proc/" + std::to_string(child) + "/stat");
      std::string pid_field, comm, state;
      gone = kill(child, 0) != 0 || !(stat >> pid_field >> comm >> state) || state == "Z";
      if (!gone) std::this_thread::sleep_for(10ms);
    }
    CHECK(gone);
  }
}

TEST_CASE("a bad fence command is refused when configured", "[fence]") {
  REQUIRE(FenceCommand::Open("fence_ipmilan", 1s).status().code() ==
          Status::Code::kInvalidArgument);  // not absolute
  REQUIRE(
      FenceCommand::Open("/nonexistent/fence", 1s).status().message().find("not an executable") !=
      std::string::npos);
  Script s("exit 0");
  chmod(s.path.c_str(), 0644);
  REQUIRE_FALSE(FenceCommand::Open(s.path, 1s).ok());
  REQUIRE_FALSE(FenceCommand::Open("/bin/true", 0ms).ok());
}
