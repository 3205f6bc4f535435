// lockstep-workload: the service the test guest runs (statically linked, no libraries).
//
// A TCP service on port 7000 (or --port). Every request is one line; the reply is
//   "<counter> <checksum>\n"
// where counter counts the requests answered since boot and
//   checksum(n) = Chain(checksum(n-1), n, request line)      (checksum(0) = 0)
// so a client that remembers its own requests can check that every reply follows from the
// previous one: no reply lost, repeated, rolled back or invented, across any failover.
// Each request also writes its line into a block of memory (--block-mib) at a place
// derived from the counter, and a second thread dirties --dirty-pages pages per second of
// that block, so checkpoints always have pages to carry.
//
// One client at a time is served (the tests drive one connection); a second one waits.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

// FNV-1a over the previous checksum, the counter and the line: simple for any client to
// recompute.
uint64_t Chain(uint64_t prev, uint64_t counter, const std::string& line) {
  uint64_t h = 1469598103934665603ULL;
  auto mix = [&h](const void* p, size_t n) {
    auto* b = static_cast<const unsigned char*>(p);
    for (size_t i = 0; i < n; ++i) {
      h ^= b[i];
      h *= 1099511628211ULL;
    }
  };
  mix(&prev, sizeof prev);
  mix(&counter, sizeof counter);
  mix(line.data(), line.size());
  return h;
}

struct Options {
  int port = 7000;
  size_t block_mib = 16;
  long dirty_pages_per_sec = 200;
};

bool ParseArgs(int argc, char** argv, Options* o) {
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&](long* v) {
      if (i + 1 >= argc) return false;
      char* end = nullptr;
      *v = std::strtol(argv[++i], &end, 10);
      return end && *end == '\0' && *v >= 0;
    };
    long v = 0;
    if (a == "--port" && next(&v) && v > 0 && v < 65536) {
      o->port = static_cast<int>(v);
    } else if (a == "--block-mib" && next(&v) && v > 0 && v <= 4096) {
      o->block_mib = static_cast<size_t>(v);
    } else if (a == "--dirty-pages" && next(&v)) {
      o->dirty_pages_per_sec = v;
    } else {
      std::fprintf(stderr,
                   "usage: lockstep-workload [--port N] [--block-mib N] [--dirty-pages N/s]\n"
                   "bad argument: %s\n",
                   a.c_str());
      return false;
    }
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  if (!ParseArgs(argc, argv, &opt)) return 2;
  std::vector<unsigned char> block(opt.block_mib << 20);
  const size_t pages = block.size() / 4096;

  std::thread dirtier([&] {
    if (opt.dirty_pages_per_sec == 0) return;
    uint64_t x = 88172645463325252ULL;
    auto period = std::chrono::microseconds(1000000 / opt.dirty_pages_per_sec);
    auto next = std::chrono::steady_clock::now();
    for (;;) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      size_t page = x % pages;
      std::memcpy(&block[page * 4096 + (x >> 40) % 4000], &x, sizeof x);
      next += period;
      std::this_thread::sleep_until(next);
    }
  });
  dirtier.detach();

  int lfd = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(opt.port));
  if (bind(lfd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || listen(lfd, 4) != 0) {
    std::perror("lockstep-workload: listen");
    return 1;
  }
  std::printf("lockstep-workload: serving on port %d, %zu MiB block, %ld dirty pages/s\n",
              opt.port, opt.block_mib, opt.dirty_pages_per_sec);
  std::fflush(stdout);

  uint64_t counter = 0, checksum = 0;
  for (;;) {
    int fd = accept(lfd, nullptr, nullptr);
    if (fd < 0) continue;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    std::string pending;
    char buf[4096];
    for (;;) {
      ssize_t n = read(fd, buf, sizeof buf);
      if (n <= 0) break;
      pending.append(buf, static_cast<size_t>(n));
      size_t eol;
      std::string out;
      while ((eol = pending.find('\n')) != std::string::npos) {
        std::string line = pending.substr(0, eol);
        pending.erase(0, eol + 1);
        ++counter;
        checksum = Chain(checksum, counter, line);
        size_t at = (counter * 4096 + counter % 3000) % (block.size() - line.size() - 1);
        std::memcpy(&block[at], line.data(), line.size());
        out += std::to_string(counter) + " " + std::to_string(checksum) + "\n";
      }
      if (!out.empty() && write(fd, out.data(), out.size()) < 0) break;
    }
    close(fd);
  }
}
