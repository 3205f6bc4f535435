// The embedded witness over real TCP sockets, with its state on disk.
#include "vip_manager/witness_service.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <thread>

using namespace std::chrono_literals;
using lockstep::Status;
using lockstep::vip::WitnessClient;
using lockstep::vip::WitnessServer;

namespace {

struct TempDir {
  TempDir() {
    char tmpl[] = "/tmp/lockstep-witness-XXXXXX";
    path = mkdtemp(tmpl);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
  std::string path;
};

std::unique_ptr<WitnessServer> Serve(const std::string& state,
                                     const std::string& at = "127.0.0.1:0") {
  auto s = WitnessServer::Start(at, state);
  INFO(s.status().ToString());
  REQUIRE(s.ok());
  return std::move(*s);
}

}  // namespace

TEST_CASE("the witness grants one active replica per term, over the network", "[witness-service]") {
  TempDir dir;
  auto server = Serve(dir.path + "/state");
  WitnessClient a(server->address()), b(server->address());
  auto term = a.Register("vm1", "hostA");
  REQUIRE(term.ok());
  CHECK(*term == 1);
  auto won = b.RequestActive("vm1", "hostB", 1);
  REQUIRE(won.ok());
  CHECK(won->granted);
  CHECK(won->term == 2);
  CHECK(won->holder == "hostB");
  auto lost = a.RequestActive("vm1", "hostA", 1);  // the same fault, asked later
  REQUIRE(lost.ok());
  CHECK(!lost->granted);
  CHECK(lost->holder == "hostB");
  CHECK(lost->term == 2);
  auto unknown = a.RequestActive("vm9", "hostA", 1);
  REQUIRE(!unknown.ok());
  CHECK(unknown.status().message().find("knows no VM named 'vm9'") != std::string::npos);
}

TEST_CASE("two replicas asking at once: exactly one wins, every time", "[witness-service]") {
  TempDir dir;
  auto server = Serve(dir.path + "/state");
  for (int round = 0; round < 50; ++round) {
    std::string vm = "vm" + std::to_string(round);
    WitnessClient setup(server->address());
    auto term = setup.Register(vm, "hostA");
    REQUIRE(term.ok());
    std::atomic<int> granted{0}, answered{0};
    auto ask = [&](const char* host) {
      WitnessClient c(server->address());
      auto d = c.RequestActive(vm, host, *term);
      if (d.ok()) {
        ++answered;
        if (d->granted) ++granted;
      }
    };
    std::thread t1(ask, "hostA"), t2(ask, "hostB");
    t1.join();
    t2.join();
    REQUIRE(answered == 2);
    REQUIRE(granted == 1);
  }
}

TEST_CASE("a restarted witness keeps its decisions", "[witness-service]") {
  TempDir dir;
  std::string state = dir.path + "/state";
  std::string address;
  {
    auto server = Serve(state);
    address = server->address();
    WitnessClient c(address);
    REQUIRE(c.Register("vm1", "hostA").ok());
    REQUIRE(c.RequestActive("vm1", "hostB", 1)->granted);
  }
  // A new process on the same state, even on the same port: hostA's old term is stale.
  auto server = Serve(state, address);
  WitnessClient c(server->address());
  auto stale = c.RequestActive("vm1", "hostA", 1);
  REQUIRE(stale.ok());
  CHECK(!stale->granted);
  CHECK(stale->holder == "hostB");
  CHECK(stale->term == 2);
}

TEST_CASE("a corrupt state file is refused with the line, and nothing is overwritten",
          "[witness-service]") {
  TempDir dir;
  std::string state = dir.path + "/state";
  {
    std::ofstream f(state);
    f << "lockstep-witness 1\nvm1 2 hostB\nvm2 seven hostA\nvm3 1 hostA\n";
  }
  auto s = WitnessServer::Start("127.0.0.1:0", state);
  REQUIRE(!s.ok());
  CHECK(s.status().code() == Status::Code::kCorruption);
  CHECK(s.status().message().find("line 3") != std::string::npos);
  std::ifstream f(state);
  std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  CHECK(all.find("vm2 seven hostA") != std::string::npos);
}

TEST_CASE("a witness that cannot write its state does not start", "[witness-service]") {
  TempDir dir;
  auto s = WitnessServer::Start("127.0.0.1:0", dir.path + "/no/such/dir/state");
  REQUIRE(!s.ok());
  CHECK(s.status().message().find("cannot keep its decisions") != std::string::npos);
}

TEST_CASE("a decision that cannot be written on a full disk is not given", "[witness-service]") {
  // A tiny tmpfs of our own, filled up after the witness started.
  TempDir dir;
  const std::string mnt = dir.path + "/small";
  std::filesystem::create_directories(mnt);
  if (mount("lockstep-witness-test", mnt.c_str(), "tmpfs", 0, "size=64k") != 0) {
    FAIL("mounting a tmpfs needs root: " << std::strerror(errno));
  }
  struct Unmount {
    std::string at;
    ~Unmount() { umount2(at.c_str(), MNT_DETACH); }
  } unmount{mnt};
  // tmpfs gives space by the page: a state file that ends 2 bytes short of a page needs a
  // new page for the next decision's line, and there will be none.
  {
    std::string text = "lockstep-witness 3\nvm1 1 hostA confirmed\n";
    for (int i = 0; text.size() < 3900; ++i) text += "p" + std::to_string(i) + " 1 h confirmed\n";
    text += "q 1 " + std::string(4079 - text.size(), 'h') + " confirmed\n";
    REQUIRE(text.size() == 4094);
    std::ofstream(mnt + "/state") << text;
  }
  auto server = Serve(mnt + "/state");
  REQUIRE(std::filesystem::file_size(mnt + "/state") == 4094);  // compacted, same lines
  WitnessClient c(server->address());
  {
    std::ofstream fill(mnt + "/fill", std::ios::binary);
    std::string block(4096, 'x');
    while (fill.write(block.data(), block.size())) {
    }
  }
  auto lost = c.RequestActive("vm1", "hostB", 1);
  REQUIRE(!lost.ok());
  CHECK(lost.status().message().find("disk full") != std::string::npos);
  // Taken back: with room again, the same request is decided afresh, and granted.
  std::filesystem::remove(mnt + "/fill");
  auto again = c.RequestActive("vm1", "hostB", 1);
  REQUIRE(again.ok());
  CHECK(again->granted);
  CHECK(again->term == 2);
  // And the file holds whole lines only.
  server.reset();
  auto reloaded = Serve(mnt + "/state");
  WitnessClient c2(reloaded->address());
  auto stale = c2.RequestActive("vm1", "hostA", 1);
  REQUIRE(stale.ok());
  CHECK(stale->holder == "hostB");
}

TEST_CASE("the state file: later lines win, a torn last line is dropped, restart compacts",
          "[witness-service]") {
  TempDir dir;
  std::string state = dir.path + "/state";
  SECTION("a torn last line") {
    std::ofstream f(state);
    f << "lockstep-witness 2\nvm1 1 hostA\nvm2 4 hostB\nvm1 2 hostB\nvm1 3 hos";
  }
  SECTION("a whole last line that is garbage (its newline reached the disk, not its bytes)") {
    std::ofstream f(state);
    const std::string zeros(4, '\0');  // what a crash can leave of a line's bytes
    f << "lockstep-witness 2\nvm1 1 hostA\nvm2 4 hostB\nvm1 2 hostB\n" << zeros << "\n";
  }
  auto server = Serve(state);
  WitnessClient c(server->address());
  auto d = c.RequestActive("vm1", "hostA", 1);
  REQUIRE(d.ok());
  CHECK(!d->granted);
  CHECK(d->term == 2);  // the torn "vm1 3 hos" was never answered
  CHECK(d->holder == "hostB");
  std::ifstream f(state);
  std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  // In today's format: the version 2 lines had every token confirmed.
  CHECK(all == "lockstep-witness 3\nvm1 2 hostB confirmed\nvm2 4 hostB confirmed\n");
}

TEST_CASE("a provisional grant survives a restart, its window opened anew", "[witness-service]") {
  TempDir dir;
  const std::string state = dir.path + "/state";
  auto server = Serve(state);
  WitnessClient a(server->address()), b(server->address());
  uint64_t term = *a.Register("vm1", "hostA");
  auto won = b.RequestActive("vm1", "hostB", term, 300ms);
  REQUIRE(won.ok());
  REQUIRE(won->granted);
  REQUIRE(!won->confirmed);
  std::this_thread::sleep_for(400ms);  // lapsed here, but the witness restarts now
  server.reset();
  {
    std::ifstream f(state);
    std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    CHECK(all.ends_with("vm1 2 hostB pending 300\n"));
  }
  server = Serve(state);
  WitnessClient a2(server->address()), b2(server->address());
  auto early = a2.Reclaim("vm1", "hostA", term + 1);  // the window starts again
  REQUIRE(early.ok());
  CHECK(!early->granted);
  CHECK(!early->confirmed);
  CHECK(early->holder == "hostB");
  std::this_thread::sleep_for(400ms);
  auto taken = a2.Reclaim("vm1", "hostA", term + 1);
  REQUIRE(taken.ok());
  CHECK(taken->granted);
  CHECK(taken->confirmed);
  CHECK(taken->term == term + 2);
  auto refused = b2.Confirm("vm1", "hostB", term + 1);
  REQUIRE(refused.ok());
  CHECK(!refused->granted);
  CHECK(refused->holder == "hostA");
  // Asked again, a confirmation writes nothing new: one line per change of the token.
  REQUIRE(a2.Confirm("vm1", "hostA", term + 2)->granted);
  server.reset();
  std::ifstream f(state);
  std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  CHECK(all == "lockstep-witness 3\nvm1 2 hostB pending 300\nvm1 3 hostA confirmed\n");
}

TEST_CASE("a state line with a bad confirmation field is damage", "[witness-service]") {
  TempDir dir;
  const std::string state = dir.path + "/state";
  const std::string bad =
      GENERATE(as<std::string>{}, "vm1 2 hostB pending", "vm1 2 hostB pending 0",
               "vm1 2 hostB maybe", "vm1 2 hostB", "vm1 2 hostB confirmed 5");
  INFO(bad);
  {
    std::ofstream f(state);
    f << "lockstep-witness 3\n" << bad << "\nvm2 1 hostA confirmed\n";
  }
  auto s = WitnessServer::Start("127.0.0.1:0", state);
  REQUIRE(!s.ok());
  CHECK(s.status().code() == Status::Code::kCorruption);
  CHECK(s.status().message().find("line 2") != std::string::npos);
}

TEST_CASE("an unreachable or silent witness is an error within the deadline", "[witness-service]") {
  // Nobody listens: refused at once.
  int probe = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  bind(probe, reinterpret_cast<sockaddr*>(&a), sizeof a);
  getsockname(probe, reinterpret_cast<sockaddr*>(&a), &len);
  std::string address = "127.0.0.1:" + std::to_string(ntohs(a.sin_port));
  WitnessClient refused(address, 300ms);
  CHECK(!refused.RequestActive("vm1", "hostB", 1).ok());
  // Listening but never answering: a timeout, not a hang.
  REQUIRE(listen(probe, 4) == 0);
  WitnessClient silent(address, 300ms);
  auto t0 = std::chrono::steady_clock::now();
  auto d = silent.RequestActive("vm1", "hostB", 1);
  auto took = std::chrono::steady_clock::now() - t0;
  close(probe);
  REQUIRE(!d.ok());
  CHECK(d.status().code() == Status::Code::kTimedOut);
  CHECK(took < 2s);
}

TEST_CASE("a request of another protocol version is refused, naming ours", "[witness-service]") {
  TempDir dir;
  auto server = Serve(dir.path + "/state");
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  std::string addr = server->address();
  inet_pton(AF_INET, addr.substr(0, addr.rfind(':')).c_str(), &a.sin_addr);
  a.sin_port = htons(static_cast<uint16_t>(std::stoi(addr.substr(addr.rfind(':') + 1))));
  REQUIRE(connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  // length 20: magic, version 3, op 2, term 1, two empty strings
  const unsigned char req[] = {0, 0, 0, 20, 'L', 'S', 'W', 'T', 0, 3, 0, 2,
                               0, 0, 0, 0,  0,   0,   0,   1,   0, 0, 0, 0};
  REQUIRE(write(fd, req, sizeof req) == static_cast<ssize_t>(sizeof req));
  char reply[512];
  ssize_t n = 0, got;
  while ((got = read(fd, reply + n, sizeof reply - static_cast<size_t>(n))) > 0) n += got;
  close(fd);
  std::string text(reply, static_cast<size_t>(n));
  REQUIRE(n > 12);
  CHECK(reply[11] == 1);  // code: refused
  CHECK(text.find("speaks version 2") != std::string::npos);
}

TEST_CASE("a second witness on the same state file is refused, the first goes on",
          "[witness-service]") {
  TempDir dir;
  std::string state = dir.path + "/state";
  auto first = Serve(state);
  auto second = WitnessServer::Start("127.0.0.1:0", state);
  REQUIRE(!second.ok());
  CHECK(second.status().message().find("another lockstep-witness") != std::string::npos);
  WitnessClient c(first->address());
  REQUIRE(c.Register("vm1", "hostA").ok());
  first.reset();
  auto again = Serve(state);  // the lock went with the first
  WitnessClient c2(again->address());
  auto d = c2.RequestActive("vm1", "hostB", 1);
  REQUIRE(d.ok());
  CHECK(d->granted);
}
