#include "vip_manager/witness_service.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <sstream>
#include <thread>
#include <vector>

#include "common/file_util.h"

namespace lockstep::vip {
namespace {

constexpr uint32_t kMagic = 0x4C535754;  // "LSWT"
constexpr uint16_t kVersion = 2;
constexpr uint16_t kOpRegister = 1;
constexpr uint16_t kOpRequestActive = 2;
constexpr uint16_t kOpConfirm = 3;
constexpr uint16_t kOpReclaim = 4;
constexpr uint32_t kMaxWindowMs = 3'600'000;  // an hour: anything longer is a mistake
constexpr uint32_t kMaxMessage = 4096;
constexpr size_t kMaxName = 255;
constexpr const char* kStateHeader = "lockstep-witness 3";
// Older files read alike: their lines have no confirmation field (every token confirmed).
constexpr const char* kStateHeaderV2 = "lockstep-witness 2";
constexpr const char* kStateHeaderV1 = "lockstep-witness 1";

using Clock = std::chrono::steady_clock;

// ---- encoding ----
void Put16(std::string& b, uint16_t v) {
  b.push_back(static_cast<char>(v >> 8));
  b.push_back(static_cast<char>(v));
}
void Put32(std::string& b, uint32_t v) {
  Put16(b, static_cast<uint16_t>(v >> 16));
  Put16(b, static_cast<uint16_t>(v));
}
void Put64(std::string& b, uint64_t v) {
  Put32(b, static_cast<uint32_t>(v >> 32));
  Put32(b, static_cast<uint32_t>(v));
}
void PutStr(std::string& b, std::string_view s) {
  Put16(b, static_cast<uint16_t>(s.size()));
  b.append(s);
}

// Reads fields off a received body; any overrun marks it bad.
class Reader {
 public:
  explicit Reader(std::string_view b) : b_(b) {}
  uint64_t N(size_t bytes) {
    if (at_ + bytes > b_.size()) {
      bad_ = true;
      return 0;
    }
    uint64_t v = 0;
    for (size_t i = 0; i < bytes; ++i) v = v << 8 | static_cast<uint8_t>(b_[at_ + i]);
    at_ += bytes;
    return v;
  }
  std::string Str() {
    size_t n = N(2);
    if (bad_ || at_ + n > b_.size()) {
      bad_ = true;
      return "";
    }
    std::string s(b_.substr(at_, n));
    at_ += n;
    return s;
  }
  bool ok() const { return !bad_ && at_ == b_.size(); }

 private:
  std::string_view b_;
  size_t at_ = 0;
  bool bad_ = false;
};

bool ValidName(std::string_view s) {
  if (s.empty() || s.size() > kMaxName) return false;
  for (char c : s) {
    if (static_cast<unsigned char>(c) <= ' ') return false;
  }
  return true;
}

// ---- sockets with deadlines ----
Status WaitFor(int fd, short events, Clock::time_point deadline) {
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) return Status::TimedOut("the witness did not answer in time");
    pollfd p{fd, events, 0};
    int r = poll(&p, 1, static_cast<int>(left.count()));
    if (r > 0) return Status::Ok();
    if (r < 0 && errno != EINTR) return Status::FromErrno("poll", errno);
  }
}

Status WriteAll(int fd, const std::string& data, Clock::time_point deadline) {
  for (size_t off = 0; off < data.size();) {
    LOCKSTEP_RETURN_IF_ERROR(WaitFor(fd, POLLOUT, deadline));
    ssize_t n = send(fd, data.data() + off, data.size() - off, MSG_NOSIGNAL);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) return Status::FromErrno("sending to the witness", errno);
    off += static_cast<size_t>(n);
  }
  return Status::Ok();
}

Status ReadExactly(int fd, char* out, size_t len, Clock::time_point deadline) {
  for (size_t off = 0; off < len;) {
    LOCKSTEP_RETURN_IF_ERROR(WaitFor(fd, POLLIN, deadline));
    ssize_t n = recv(fd, out + off, len - off, 0);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n == 0) return Status::PeerLost("the connection closed mid-message");
    if (n < 0) return Status::FromErrno("receiving", errno);
    off += static_cast<size_t>(n);
  }
  return Status::Ok();
}

Status SendMessage(int fd, const std::string& body, Clock::time_point deadline) {
  std::string m;
  Put32(m, static_cast<uint32_t>(body.size()));
  m += body;
  return WriteAll(fd, m, deadline);
}

Result<std::string> ReceiveMessage(int fd, Clock::time_point deadline) {
  char len[4];
  LOCKSTEP_RETURN_IF_ERROR(ReadExactly(fd, len, 4, deadline));
  uint32_t n = static_cast<uint32_t>(Reader(std::string_view(len, 4)).N(4));
  if (n > kMaxMessage)
    return Status::Corruption("a witness message of " + std::to_string(n) + " bytes");
  std::string body(n, '\0');
  LOCKSTEP_RETURN_IF_ERROR(ReadExactly(fd, body.data(), n, deadline));
  return body;
}

Result<sockaddr_in> ParseAddress(const std::string& address) {
  size_t colon = address.rfind(':');
  sockaddr_in a{};
  a.sin_family = AF_INET;
  char* end = nullptr;
  long port = colon == std::string::npos ? -1 : std::strtol(address.c_str() + colon + 1, &end, 10);
  if (colon == std::string::npos || *end != '\0' || port < 0 || port > 65535 ||
      inet_pton(AF_INET, address.substr(0, colon).c_str(), &a.sin_addr) != 1) {
    return Status::InvalidArgument("'" + address + "' is not an IPv4 HOST:PORT");
  }
  a.sin_port = htons(static_cast<uint16_t>(port));
  return a;
}

// ---- the state file ----
// One token: "<vm> <term> <holder> confirmed" or "<vm> <term> <holder> pending <window ms>".
std::string Line(const TokenRecord& t) {
  return t.vm + " " + std::to_string(t.term) + " " + t.holder +
         (t.confirmed ? " confirmed\n" : " pending " + std::to_string(t.window.count()) + "\n");
}

// Reads one line's fields; `current` is the format of today (older lines have three fields,
// every token confirmed). False if they do not parse.
bool ParseLine(std::istringstream& fields, bool current, TokenRecord* t) {
  std::string state, extra;
  if (!(fields >> t->vm >> t->term >> t->holder)) return false;
  if (current) {
    int64_t window_ms = 0;
    if (!(fields >> state)) return false;
    if (state == "pending") {
      if (!(fields >> window_ms) || window_ms <= 0 || window_ms > kMaxWindowMs) return false;
      t->confirmed = false;
      t->window = std::chrono::milliseconds(window_ms);
    } else if (state != "confirmed") {
      return false;
    }
  }
  return !(fields >> extra);
}

// Loads the tokens: the last line of a VM wins. A last line without its newline is an
// append that a crash cut short: never synced, so never answered; it is dropped.
Result<std::vector<TokenRecord>> LoadState(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::vector<TokenRecord>{};  // a new witness
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  size_t eol = all.find('\n');
  std::string header = all.substr(0, eol);
  if (eol == std::string::npos ||
      (header != kStateHeader && header != kStateHeaderV2 && header != kStateHeaderV1)) {
    return Status::Corruption("witness state " + path + ": line 1 is not '" + kStateHeader +
                              "'; restore it from a backup (starting afresh forgets every decision "
                              "and restarts the terms: re-protect every VM before relying on it)");
  }
  std::vector<TokenRecord> out;
  std::map<std::string, size_t> index;
  size_t at = eol + 1;
  for (int n = 2; at < all.size(); ++n) {
    size_t end = all.find('\n', at);
    if (end == std::string::npos) break;  // torn append: see above
    std::istringstream fields(all.substr(at, end - at));
    at = end + 1;
    TokenRecord t;
    if (!ParseLine(fields, header == kStateHeader, &t)) {
      // Only the last line can be an append that was never synced (its newline may have
      // reached the disk before its bytes): never answered, so dropped. Anywhere else a
      // bad line is damage.
      if (at == all.size()) break;
      return Status::Corruption("witness state " + path + ": line " + std::to_string(n) +
                                " is not '<vm> <term> <holder> confirmed|pending <ms>'");
    }
    auto [it, inserted] = index.emplace(t.vm, out.size());
    if (inserted) {
      out.push_back(t);
    } else {
      out[it->second] = t;
    }
  }
  return out;
}

// Writes the whole state anew (temporary file, fsync, rename, fsync of the directory).
Status SaveState(const std::string& path, const std::vector<TokenRecord>& tokens) {
  std::string text = std::string(kStateHeader) + "\n";
  for (const auto& t : tokens) text += Line(t);
  return WriteFileAtomic(path, text);
}

// Appends one decision and syncs it: one fdatasync on the failover path instead of a
// rewrite, a rename and two fsyncs. A failed append is cut off again, so the file never
// holds half a line followed by more.
Status AppendDecision(int fd, const std::string& path, const TokenRecord& t) {
  const std::string line = Line(t);
  off_t size = lseek(fd, 0, SEEK_END);
  ssize_t n = write(fd, line.data(), line.size());
  if (n == static_cast<ssize_t>(line.size()) && fdatasync(fd) == 0) return Status::Ok();
  int err = n < 0 ? errno : (n == static_cast<ssize_t>(line.size()) ? errno : ENOSPC);
  if (size < 0 || ftruncate(fd, size) != 0) {
    // The file may now end in half a line that more lines would follow: stop deciding.
    return Status::Corruption("writing the witness state " + path +
                              " failed and could not be undone; this witness takes no more "
                              "decisions: free the disk and restart it");
  }
  return Status::FromErrno("writing the witness state " + path + " (disk full?)", err);
}

std::string Reply(uint16_t code, const WitnessDecision& d, std::string_view error) {
  std::string b;
  Put32(b, kMagic);
  Put16(b, kVersion);
  Put16(b, code);
  b.push_back(d.granted ? 1 : 0);
  Put64(b, d.term);
  PutStr(b, d.holder);
  PutStr(b, error.substr(0, kMaxName));
  // Last, and only in an answer: a refusal keeps version 1's layout, so a client of any
  // version can read why it was refused.
  if (code == 0) b.push_back(d.confirmed ? 1 : 0);
  return b;
}

}  // namespace

struct WitnessServer::Impl {
  std::string state_file;
  int lock_fd = -1;       // <state>.lock, flock'ed: one witness per state file
  int journal_fd = -1;    // the state file, open for appending decisions
  Status journal_broken;  // set once an append could not be undone; then refuse
  InProcessWitness decisions;
  int listen_fd = -1;
  int wake[2] = {-1, -1};  // a byte on wake[1] stops the loop
  std::string address;
  std::thread loop;
  std::atomic<uint64_t> requests{0};

  ~Impl() {
    if (wake[1] >= 0) (void)!write(wake[1], "x", 1);
    if (loop.joinable()) loop.join();
    for (int fd : {listen_fd, wake[0], wake[1], journal_fd, lock_fd}) {
      if (fd >= 0) close(fd);
    }
  }

  // One connection, one request. Decisions are taken one at a time (this thread only).
  void Serve(int fd) {
    // Short: decisions are taken one at a time, so a silent client (a probe, a half-open
    // socket) must not hold up a replica's request during a failover for long.
    auto deadline = Clock::now() + std::chrono::milliseconds(200);
    auto body = ReceiveMessage(fd, deadline);
    if (!body.ok()) return;
    Reader r(*body);
    uint32_t magic = static_cast<uint32_t>(r.N(4));
    uint16_t version = static_cast<uint16_t>(r.N(2));
    uint16_t op = static_cast<uint16_t>(r.N(2));
    uint64_t term = r.N(8);
    uint32_t window_ms = static_cast<uint32_t>(r.N(4));
    std::string vm = r.Str(), candidate = r.Str();
    WitnessDecision none;
    std::string reply;
    if (magic != kMagic) {
      return;  // not one of ours: say nothing
    } else if (version != kVersion) {
      reply = Reply(1, none, "this witness speaks version " + std::to_string(kVersion));
    } else if (!r.ok() || !ValidName(vm) || !ValidName(candidate) || window_ms > kMaxWindowMs) {
      reply = Reply(1, none,
                    "malformed request (names: 1..255 bytes, no whitespace; window at most an "
                    "hour)");
    } else if (op < kOpRegister || op > kOpReclaim) {
      reply = Reply(1, none, "unknown operation " + std::to_string(op));
    } else {
      requests.fetch_add(1);
      auto decided = Decide(op, vm, candidate, term, std::chrono::milliseconds(window_ms));
      reply = decided.ok() ? Reply(0, *decided, "") : Reply(1, none, decided.status().ToString());
    }
    (void)SendMessage(fd, reply, deadline);
  }

  // Takes one decision and, if it changed the token, puts it on disk before anyone hears of
  // it; a change that cannot be written is taken back and refused.
  Result<WitnessDecision> Decide(uint16_t op, const std::string& vm, const std::string& candidate,
                                 uint64_t term, std::chrono::milliseconds window) {
    auto before = decisions.Snapshot();
    Result<WitnessDecision> d = Status::Aborted("no decision");
    if (op == kOpRegister) {
      auto registered = decisions.Register(vm, candidate);
      if (!registered.ok()) return registered.status();
      d = WitnessDecision{true, *registered, candidate, true};
    } else if (op == kOpRequestActive) {
      d = decisions.RequestActive(vm, candidate, term, window);
    } else if (op == kOpConfirm) {
      d = decisions.Confirm(vm, candidate, term);
    } else {
      d = decisions.Reclaim(vm, candidate, term);
    }
    if (!d.ok()) return d;
    TokenRecord now{vm, d->term, d->holder, d->confirmed, {}};
    for (const auto& t : decisions.Snapshot()) {
      if (t.vm == vm) now = t;
    }
    bool changed = true;
    for (const auto& t : before) {
      if (t.vm == vm) {
        changed = t.term != now.term || t.holder != now.holder || t.confirmed != now.confirmed;
      }
    }
    if (!changed) return d;
    Status saved =
        journal_broken.ok() ? AppendDecision(journal_fd, state_file, now) : journal_broken;
    if (!saved.ok()) {
      decisions.Restore(before);
      if (saved.code() == Status::Code::kCorruption) journal_broken = saved;
      return saved;
    }
    return d;
  }

  void Loop() {
    for (;;) {
      pollfd p[2] = {{listen_fd, POLLIN, 0}, {wake[0], POLLIN, 0}};
      if (poll(p, 2, -1) < 0) {
        if (errno == EINTR) continue;
        return;
      }
      if (p[1].revents) return;
      int fd = accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;
      Serve(fd);
      close(fd);
    }
  }
};

WitnessServer::WitnessServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
WitnessServer::~WitnessServer() = default;

Result<std::unique_ptr<WitnessServer>> WitnessServer::Start(const std::string& listen,
                                                            const std::string& state_file) {
  auto m = std::make_unique<Impl>();
  m->state_file = state_file;
  // One witness per state file: a second one would rename the file under the first, whose
  // later decisions would then go to a file nobody reads.
  const std::string lock_path = state_file + ".lock";
  m->lock_fd = open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (m->lock_fd < 0) {
    return Status::FromErrno("the witness cannot keep its decisions: " + lock_path, errno);
  }
  if (flock(m->lock_fd, LOCK_EX | LOCK_NB) != 0) {
    return Status::FailedPrecondition("another lockstep-witness is using " + state_file +
                                      "; stop it first, or give this one its own --state");
  }
  auto a = ParseAddress(listen);
  if (!a.ok()) return a.status();
  m->listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1;
  setsockopt(m->listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(m->listen_fd, reinterpret_cast<const sockaddr*>(&*a), sizeof *a) != 0 ||
      ::listen(m->listen_fd, 64) != 0) {
    return Status::FromErrno("the witness cannot listen on " + listen, errno);
  }
  auto tokens = LoadState(state_file);
  if (!tokens.ok()) return tokens.status();
  m->decisions.Restore(*tokens);
  // Compacted to one line per VM, and created if new, before serving: the failover path
  // then only appends.
  if (Status saved = SaveState(state_file, *tokens); !saved.ok()) {
    return saved.WithContext("the witness cannot keep its decisions");
  }
  m->journal_fd = open(state_file.c_str(), O_WRONLY | O_APPEND | O_CLOEXEC);
  if (m->journal_fd < 0) return Status::FromErrno("opening the witness state " + state_file, errno);
  sockaddr_in bound{};
  socklen_t len = sizeof bound;
  getsockname(m->listen_fd, reinterpret_cast<sockaddr*>(&bound), &len);
  char ip[INET_ADDRSTRLEN];
  inet_ntop(AF_INET, &bound.sin_addr, ip, sizeof ip);
  m->address = std::string(ip) + ":" + std::to_string(ntohs(bound.sin_port));
  if (pipe2(m->wake, O_CLOEXEC) != 0) return Status::FromErrno("pipe", errno);
  m->loop = std::thread([p = m.get()] { p->Loop(); });
  return std::unique_ptr<WitnessServer>(new WitnessServer(std::move(m)));
}

std::string WitnessServer::address() const { return impl_->address; }
uint64_t WitnessServer::requests() const { return impl_->requests.load(); }

WitnessClient::WitnessClient(std::string address, std::chrono::milliseconds timeout)
    : address_(std::move(address)), timeout_(timeout) {}

Result<uint64_t> WitnessClient::Register(std::string_view vm, std::string_view holder) {
  auto d = Ask(kOpRegister, vm, holder, 0, 0);
  if (!d.ok()) return d.status();
  return d->term;
}

Result<WitnessDecision> WitnessClient::RequestActive(std::string_view vm,
                                                     std::string_view candidate,
                                                     uint64_t expected_term,
                                                     std::chrono::milliseconds confirm_within) {
  if (confirm_within.count() < 0 || confirm_within.count() > kMaxWindowMs) {
    return Status::InvalidArgument("a grant window is 0 ms to an hour");
  }
  return Ask(kOpRequestActive, vm, candidate, expected_term,
             static_cast<uint32_t>(confirm_within.count()));
}

Result<WitnessDecision> WitnessClient::Confirm(std::string_view vm, std::string_view holder,
                                               uint64_t term) {
  return Ask(kOpConfirm, vm, holder, term, 0);
}

Result<WitnessDecision> WitnessClient::Reclaim(std::string_view vm, std::string_view candidate,
                                               uint64_t term) {
  return Ask(kOpReclaim, vm, candidate, term, 0);
}

Result<WitnessDecision> WitnessClient::Ask(uint16_t op, std::string_view vm,
                                           std::string_view candidate, uint64_t term,
                                           uint32_t window_ms) {
  if (!ValidName(vm) || !ValidName(candidate)) {
    return Status::InvalidArgument(
        "VM and host names for the witness: 1..255 bytes, no whitespace");
  }
  auto a = ParseAddress(address_);
  if (!a.ok()) return a.status();
  auto deadline = Clock::now() + timeout_;
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::FromErrno("socket", errno);
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  Status s;
  if (connect(fd, reinterpret_cast<const sockaddr*>(&*a), sizeof *a) != 0 && errno != EINPROGRESS) {
    s = Status::FromErrno("connecting to the witness at " + address_, errno);
  } else {
    s = WaitFor(fd, POLLOUT, deadline);
    int err = 0;
    socklen_t len = sizeof err;
    if (s.ok() && (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0)) {
      s = Status::FromErrno("connecting to the witness at " + address_, err);
    }
  }
  std::string body;
  Put32(body, kMagic);
  Put16(body, kVersion);
  Put16(body, op);
  Put64(body, term);
  Put32(body, window_ms);
  PutStr(body, vm);
  PutStr(body, candidate);
  if (s.ok()) s = SendMessage(fd, body, deadline);
  Result<std::string> reply = s.ok() ? ReceiveMessage(fd, deadline) : Result<std::string>(s);
  close(fd);
  if (!reply.ok()) return reply.status().WithContext("asking the witness at " + address_);
  Reader r(*reply);
  uint32_t magic = static_cast<uint32_t>(r.N(4));
  uint16_t version = static_cast<uint16_t>(r.N(2));
  uint16_t code = static_cast<uint16_t>(r.N(2));
  WitnessDecision d;
  d.granted = r.N(1) != 0;
  d.term = r.N(8);
  d.holder = r.Str();
  std::string error = r.Str();
  if (code == 0) d.confirmed = r.N(1) != 0;
  if (magic != kMagic || !r.ok()) {
    return Status::Corruption("the witness at " + address_ + " sent a malformed reply");
  }
  if (code != 0) {
    return version != kVersion
               ? Status::VersionMismatch("the witness at " + address_ + ": " + error)
               : Status::FailedPrecondition("the witness at " + address_ + " refused: " + error);
  }
  return d;
}

}  // namespace lockstep::vip
