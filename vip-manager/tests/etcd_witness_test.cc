// The etcd backend of the witness on a real etcd: durability across an etcd crash, a dead,
// frozen or foreign endpoint, several endpoints, names it refuses.
#include "vip_manager/etcd_witness.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <string>
#include <thread>

#include "etcd_server.h"
#include "free_port.h"

using namespace std::chrono_literals;
using lockstep::Status;
using lockstep::testing::EtcdServer;
using lockstep::testing::FreePort;
using lockstep::vip::EtcdWitness;

namespace {

using Clock = std::chrono::steady_clock;

std::string DeadEndpoint() { return "127.0.0.1:" + std::to_string(FreePort()); }

bool Contains(const Status& s, const std::string& text) {
  return s.message().find(text) != std::string::npos;
}

// An HTTP/1.1 response as a server would send it.
std::string Response(const std::string& status, const std::string& body) {
  return "HTTP/1.1 " + status + "\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n" +
         body;
}

// A TCP server on 127.0.0.1 that answers every connection with the same bytes, whatever it
// was sent, then closes it: something that is not etcd at an etcd endpoint.
class CannedServer {
 public:
  explicit CannedServer(std::string reply) : reply_(std::move(reply)) {
    fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    REQUIRE(bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    REQUIRE(listen(fd_, 16) == 0);
    getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len);
    endpoint_ = "127.0.0.1:" + std::to_string(ntohs(a.sin_port));
    thread_ = std::thread([this] { Serve(); });
  }
  ~CannedServer() {
    stop_ = true;
    thread_.join();
    close(fd_);
  }
  const std::string& endpoint() const { return endpoint_; }

 private:
  void Serve() {
    while (!stop_) {
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, 50) <= 0) continue;
      int c = accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (c < 0) continue;
      (void)!write(c, reply_.data(), reply_.size());
      // Half-close, then read what the client sent until it closes: closing with unread
      // bytes would reset the connection before the client read our reply.
      shutdown(c, SHUT_WR);
      char sink[4096];
      pollfd q{c, POLLIN, 0};
      while (poll(&q, 1, 1000) > 0 && read(c, sink, sizeof sink) > 0) {
      }
      close(c);
    }
  }

  std::string reply_;
  int fd_ = -1;
  std::string endpoint_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// POSTs `json` to etcd's gateway at `endpoint` the plain way, for keys lockstep would not
// write; true on HTTP 200.
bool RawPost(const std::string& endpoint, const std::string& target, const std::string& json) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<uint16_t>(std::stoi(endpoint.substr(endpoint.rfind(':') + 1))));
  std::string request = "POST " + target + " HTTP/1.1\r\nHost: etcd\r\nConnection: close\r\n" +
                        "Content-Length: " + std::to_string(json.size()) + "\r\n\r\n" + json;
  std::string reply;
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
      write(fd, request.data(), request.size()) == static_cast<ssize_t>(request.size())) {
    char buf[4096];
    for (ssize_t n; (n = read(fd, buf, sizeof buf)) > 0;) reply.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  return reply.starts_with("HTTP/1.1 200");
}

}  // namespace

TEST_CASE("etcd: a decision survives an etcd crash and restart on the same data",
          "[etcd-witness]") {
  EtcdServer etcd;
  EtcdWitness w({etcd.endpoint()});
  auto term = w.Register("vm1", "hostA");
  INFO(term.status().ToString());
  REQUIRE(term.ok());
  auto won = w.RequestActive("vm1", "hostB", *term);
  REQUIRE(won.ok());
  REQUIRE(won->granted);
  etcd.Kill();  // SIGKILL: only what etcd had made durable is left
  etcd.Start();
  auto stale = w.RequestActive("vm1", "hostA", *term);
  INFO(stale.status().ToString());
  REQUIRE(stale.ok());
  CHECK(!stale->granted);
  CHECK(stale->term == *term + 1);
  CHECK(stale->holder == "hostB");
  auto next = w.Register("vm1", "hostA");
  REQUIRE(next.ok());
  CHECK(*next == *term + 2);  // terms never go backwards
}

TEST_CASE("etcd: nothing listening is an error at once, naming the endpoint", "[etcd-witness]") {
  std::string dead = DeadEndpoint();
  EtcdWitness w({dead}, "/t/", 500ms);
  auto t0 = Clock::now();
  auto d = w.RequestActive("vm1", "hostB", 1);
  auto r = w.Register("vm1", "hostB");
  auto took = Clock::now() - t0;
  REQUIRE(!d.ok());
  REQUIRE(!r.ok());
  INFO(d.status().ToString());
  CHECK(d.status().code() == Status::Code::kIoError);
  CHECK(Contains(d.status(), dead));
  CHECK(Contains(d.status(), "check that etcd runs"));
  CHECK(Contains(r.status(), "registering VM 'vm1'"));
  CHECK(took < 3s);
}

TEST_CASE("etcd: a frozen etcd is an error within the deadline, and answers again once thawed",
          "[etcd-witness]") {
  EtcdServer etcd;
  EtcdWitness w({etcd.endpoint()}, "/lockstep/witness/", 500ms);
  auto term = w.Register("vm1", "hostA");
  REQUIRE(term.ok());
  etcd.Signal(SIGSTOP);
  auto t0 = Clock::now();
  auto d = w.RequestActive("vm1", "hostB", *term);
  auto took = Clock::now() - t0;
  etcd.Signal(SIGCONT);
  REQUIRE(!d.ok());
  INFO(d.status().ToString());
  CHECK(d.status().code() == Status::Code::kTimedOut);
  CHECK(Contains(d.status(), "nothing within 500 ms"));
  CHECK(took >= 450ms);  // the deadline, not something sooner
  CHECK(took < 3s);
  // etcd may apply the request it received while frozen once it runs again: asking again
  // is granted either way (the retry rule), and the other side still loses.
  auto again = w.RequestActive("vm1", "hostB", *term);
  INFO(again.status().ToString());
  REQUIRE(again.ok());
  CHECK(again->granted);
  CHECK(again->term == *term + 1);
  CHECK(!w.RequestActive("vm1", "hostA", *term)->granted);
}

TEST_CASE("etcd: endpoints are tried in order, a dead first one leaves the second to answer",
          "[etcd-witness]") {
  EtcdServer etcd;
  EtcdWitness w({DeadEndpoint(), etcd.endpoint()});
  auto term = w.Register("vm1", "hostA");
  INFO(term.status().ToString());
  REQUIRE(term.ok());
  CHECK(*term == 1);
  auto d = w.RequestActive("vm1", "hostB", *term);
  REQUIRE(d.ok());
  CHECK(d->granted);
  // All dead: every endpoint and its error are named.
  std::string dead1 = DeadEndpoint(), dead2 = DeadEndpoint();
  EtcdWitness none({dead1, dead2});
  auto e = none.RequestActive("vm1", "hostB", 1);
  REQUIRE(!e.ok());
  CHECK(Contains(e.status(), dead1 + ": connecting"));
  CHECK(Contains(e.status(), dead2 + ": connecting"));
}

TEST_CASE("etcd: a peer that is not etcd gets a clear error", "[etcd-witness]") {
  struct Case {
    std::string reply;
    std::string says;
  };
  const Case c = GENERATE(
      // No Content-Length: the body runs until the server closes.
      Case{"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello, I am not etcd",
           "the body is not JSON: 'hello, I am not etcd'"},
      Case{Response("200 OK", R"({"a": 1})"), "no 'header' object"},
      Case{Response("200 OK", R"({"header": {}, "responses": "many"})"),
           "'responses' is not an array"},
      Case{Response("404 Not Found", "Not Found"), "HTTP 404, 'Not Found'"},
      Case{"SSH-2.0-OpenSSH_9.2p1\r\n", "HTTP: "});
  INFO("reply: " << c.reply);
  CannedServer foreign(c.reply);
  EtcdWitness w({foreign.endpoint()}, "/t/", 500ms);
  auto t0 = Clock::now();
  auto d = w.RequestActive("vm1", "hostB", 1);
  CHECK(Clock::now() - t0 < 3s);
  REQUIRE(!d.ok());
  INFO(d.status().ToString());
  CHECK(d.status().code() == Status::Code::kCorruption);
  CHECK(Contains(d.status(), foreign.endpoint() + " did not answer like etcd's v3 JSON API"));
  CHECK(Contains(d.status(), c.says));
  auto r = w.Register("vm1", "hostB");
  REQUIRE(!r.ok());
  CHECK(Contains(r.status(), "did not answer like etcd's v3 JSON API"));
}

TEST_CASE("etcd: an etcd that refuses is an error with its reason", "[etcd-witness]") {
  CannedServer refusing(
      Response("503 Service Unavailable",
               R"({"error":"etcdserver: no leader","message":"etcdserver: no leader","code":14})"));
  EtcdWitness w({refusing.endpoint()});
  auto d = w.RequestActive("vm1", "hostB", 1);
  REQUIRE(!d.ok());
  INFO(d.status().ToString());
  CHECK(d.status().code() == Status::Code::kPeerRejected);
  CHECK(Contains(d.status(), "etcd at " + refusing.endpoint() +
                                 " refused the request (HTTP 503): etcdserver: no leader"));
}

TEST_CASE("etcd: a foreign or refusing first endpoint leaves the second to answer",
          "[etcd-witness]") {
  const std::string first = GENERATE(
      Response("200 OK", "ok"), Response("503 Service Unavailable", R"({"error":"no leader"})"));
  EtcdServer etcd;
  CannedServer foreign(first);
  EtcdWitness w({foreign.endpoint(), etcd.endpoint()});
  auto term = w.Register("vm1", "hostA");
  INFO(term.status().ToString());
  REQUIRE(term.ok());
  CHECK(w.RequestActive("vm1", "hostB", *term)->granted);
}

TEST_CASE("etcd: keys that lockstep did not write are reported, not trusted", "[etcd-witness]") {
  EtcdServer etcd;
  EtcdWitness w({etcd.endpoint()}, "/bad/");
  // /bad/vm1/term = "seven"; /bad/vm2/term = "3" with no holder.
  REQUIRE(RawPost(etcd.endpoint(), "/v3/kv/put",
                  R"({"key":"L2JhZC92bTEvdGVybQ==","value":"c2V2ZW4="})"));
  REQUIRE(
      RawPost(etcd.endpoint(), "/v3/kv/put", R"({"key":"L2JhZC92bTIvdGVybQ==","value":"Mw=="})"));
  auto d = w.RequestActive("vm1", "hostA", 1);
  REQUIRE(!d.ok());
  INFO(d.status().ToString());
  CHECK(d.status().code() == lockstep::Status::Code::kCorruption);
  CHECK(Contains(d.status(), "etcd key /bad/vm1/term holds 'seven', not a decimal term"));
  auto r = w.Register("vm1", "hostA");
  REQUIRE(!r.ok());
  CHECK(Contains(r.status(), "not a decimal term"));
  auto h = w.RequestActive("vm2", "hostA", 1);
  REQUIRE(!h.ok());
  CHECK(Contains(h.status(), "a term but no /bad/vm2/holder"));
  // Register repairs the second (the term goes on from 3).
  auto again = w.Register("vm2", "hostA");
  REQUIRE(again.ok());
  CHECK(*again == 4);
}

TEST_CASE("etcd: bad names and no endpoint are refused before anything is sent", "[etcd-witness]") {
  EtcdWitness w({DeadEndpoint()});
  for (const std::string& bad :
       {std::string(""), std::string("a b"), std::string("tab\tx"), std::string("line\n"),
        std::string("\x01"), std::string("nul\0x", 5), std::string(256, 'v')}) {
    INFO("name: '" << bad << "'");
    CHECK(w.Register(bad, "hostA").status().code() == Status::Code::kInvalidArgument);
    CHECK(w.Register("vm1", bad).status().code() == Status::Code::kInvalidArgument);
    CHECK(w.RequestActive(bad, "hostA", 1).status().code() == Status::Code::kInvalidArgument);
    CHECK(w.RequestActive("vm1", bad, 1).status().code() == Status::Code::kInvalidArgument);
  }
  EtcdWitness nowhere({});
  CHECK(nowhere.RequestActive("vm1", "hostA", 1).status().code() == Status::Code::kInvalidArgument);
  EtcdWitness malformed({"no-port-here"});
  auto m = malformed.RequestActive("vm1", "hostA", 1);
  REQUIRE(!m.ok());
  CHECK(Contains(m.status(), "'no-port-here' is not HOST:PORT"));
}

TEST_CASE("etcd: the longest name allowed and any byte of a holder round-trip", "[etcd-witness]") {
  EtcdServer etcd;
  EtcdWitness w({etcd.endpoint()});
  std::string vm(255, 'v'), holder = "h\xc3\xa9/\x7f=+";  // UTF-8, '/', base64's own signs
  auto term = w.Register(vm, holder);
  INFO(term.status().ToString());
  REQUIRE(term.ok());
  auto d = w.RequestActive(vm, "other", *term + 5);
  REQUIRE(d.ok());
  CHECK(!d->granted);
  CHECK(d->holder == holder);
  CHECK(d->term == *term);
}
