// lockstepd: the host daemon. Runs this host's VMs (QEMU with lockstep's patches, from VM
// definitions) and serves the control API (admin/control.h) on a root-only Unix socket.
// Stopping or restarting it leaves the VMs running; it adopts them when it starts again.
// See docs/admin-plane.md.
#include <signal.h>
#include <sys/file.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <boost/program_options.hpp>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <memory>
#include <thread>

#include "control_io.h"
#include "daemon_log.h"
#include "host_daemon.h"
#include "metrics_server.h"
#include "replication_channel/tcp.h"
#include "request_workers.h"

#ifndef LOCKSTEP_PLUGIN_PATH
#define LOCKSTEP_PLUGIN_PATH "/usr/lib/lockstep/liblockstep_plugin.so"
#endif
#ifndef LOCKSTEP_QEMU
#define LOCKSTEP_QEMU "/usr/lib/lockstep/qemu-system-x86_64"
#endif

namespace po = boost::program_options;
using namespace lockstep;
using namespace lockstep::admin;

namespace {

int Die(const std::string& what) {
  LogEvent("error", "not_started", {{"why", what}});
  std::cerr << "lockstepd: " << what << "\n";
  return 1;
}

// Binds the control socket: its directory 0700, the socket 0600. Refuses if another daemon
// answers there; a stale socket file (nobody listening) is replaced.
Result<int> ListenControl(const std::string& path) {
  std::error_code ec;
  const auto dir = std::filesystem::path(path).parent_path();
  if (!dir.empty()) {
    // A directory of its own is made root's; an existing one (/run, /tmp) is left as it
    // is: the socket itself is 0600.
    if (!std::filesystem::exists(dir, ec)) {
      std::filesystem::create_directories(dir, ec);
      if (ec) {
        return Status::FailedPrecondition("cannot create " + dir.string() + ": " + ec.message());
      }
      chmod(dir.c_str(), 0700);
    }
  }
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  if (path.size() >= sizeof a.sun_path)
    return Status::InvalidArgument("socket path too long: " + path);
  std::memcpy(a.sun_path, path.c_str(), path.size() + 1);
  int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (connect(probe, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
    close(probe);
    return Status::FailedPrecondition("another lockstepd already serves " + path +
                                      "; stop it first, or give this one its own --socket");
  }
  close(probe);
  unlink(path.c_str());
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  const mode_t old = umask(0177);  // the socket is made 0600, never briefly wider
  int bound = bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  umask(old);
  if (bound != 0 || listen(fd, 16) != 0) {
    int err = errno;
    close(fd);
    return Status::FromErrno("listening on " + path, err);
  }
  return fd;
}

void Serve(HostDaemon& daemon, int fd) {
  FdCloser closer{fd};
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  auto line = ReadLine(fd, deadline);
  if (!line.ok()) return;  // a client that said nothing whole: nothing to answer
  Json request = Json::parse(*line, nullptr, /*allow_exceptions=*/false);
  Json answer = request.is_discarded()
                    ? Json{{"api", kControlApi}, {"ok", false}, {"error", "not JSON"}}
                    : daemon.Handle(request);
  (void)WriteLine(fd, answer.dump(), std::chrono::steady_clock::now() + std::chrono::seconds(5));
}

}  // namespace

int main(int argc, char** argv) {
  DaemonConfig config;
  std::string socket_path, peer_listen, metrics_listen;
  std::vector<std::string> data_dirs;
  char host[256] = {};
  gethostname(host, sizeof host - 1);
  int spare_after_s = 60;
  po::options_description options("lockstepd: lockstep's host daemon\n\nOptions");
  options.add_options()("help,h", "this help")(
      "host-id", po::value(&config.host_id)->default_value(host),
      "this host's name, as its peer and the witness know it")(
      "state", po::value(&config.state_dir)->default_value("/var/lib/lockstep"),
      "state directory: VM definitions, pid files, logs")(
      "socket", po::value(&socket_path)->default_value(kDefaultControlSocket),
      "the control socket (root only)")(
      "peer-listen", po::value(&peer_listen),
      "ADDR:PORT of the peer API on the management network, for the paired host's daemon "
      "(needed to pair)")("qemu", po::value(&config.parts.qemu)->default_value(LOCKSTEP_QEMU),
                          "QEMU with lockstep's patches (qemu-patches/build-qemu.sh)")(
      "plugin", po::value(&config.plugin)->default_value(LOCKSTEP_PLUGIN_PATH),
      "the lockstep engine QEMU loads (liblockstep_plugin.so)")(
      "witness", po::value(&config.witness),
      "the witness both hosts ask on a fault: tcp:HOST:PORT (lockstep-witness) or "
      "etcd:HOST:PORT[+HOST:PORT...]; needed to protect")(
      "metrics-listen", po::value(&metrics_listen),
      "ADDR:PORT for Prometheus: GET /metrics (per VM: running, protection state and role, "
      "epochs, lag, bytes, pause and output-held quantiles)")(
      "vip-interface", po::value(&config.vip_interface),
      "the interface this host puts a VM's VIP on (a VM definition names the address)")(
      "fence-command", po::value(&config.fence_command),
      "a program this host runs as `PROGRAM VM PEER_HOST` to power the other host off "
      "before it takes a VM over (STONITH; absolute path)")(
      "replication-address", po::value(&config.replication_address),
      "this host's IPv4 address on the dedicated replication link, where its secondaries "
      "listen; needed to run secondaries")(
      "dpdk-port", po::value(&config.dpdk_port),
      "this host's DPDK port on the replication link, for VMs with transport=dpdk: DPDK "
      "device arguments, e.g. net_af_packet0,iface=eth2,framecnt=4096")(
      "dpdk-eal", po::value(&config.dpdk_eal),
      "DPDK EAL arguments for this host's QEMU processes (default: the transport's, "
      "--no-huge -m 256 --no-pci --no-shconf -l 0)")(
      "rdma-device", po::value(&config.rdma_device),
      "the RDMA device for VMs with transport=rdma (default: the first one)")(
      "spare-after", po::value(&spare_after_s)->default_value(60),
      "seconds the paired host may stay silent, while VMs here wait to be protected again, "
      "before a spare (lockstepctl pair --spare) takes its place")(
      "qemu-data-dir", po::value(&data_dirs)->composing(),
      "firmware directories for QEMU's -L (default: /usr/share/qemu /usr/share/seabios)");
  po::variables_map vm;
  try {
    po::store(po::parse_command_line(argc, argv, options), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    std::cerr << "lockstepd: " << e.what() << "\n\n" << options << "\n";
    return 2;
  }
  if (vm.count("help")) {
    std::cout << options << "\n";
    return 0;
  }
  if (spare_after_s < 1 || spare_after_s > 86400) {
    std::cerr << "lockstepd: --spare-after must be 1..86400 seconds\n";
    return 2;
  }
  config.spare_after = std::chrono::seconds(spare_after_s);
  config.parts.data_dirs = data_dirs.empty()
                               ? std::vector<std::string>{"/usr/share/qemu", "/usr/share/seabios"}
                               : data_dirs;

  // Signals are read from a signalfd by the main loop, so every thread blocks them.
  sigset_t signals;
  sigemptyset(&signals);
  for (int s : {SIGTERM, SIGINT, SIGCHLD, SIGHUP}) sigaddset(&signals, s);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);
  int sigfd = signalfd(-1, &signals, SFD_CLOEXEC);

  std::error_code ec;
  std::filesystem::create_directories(config.state_dir, ec);
  const std::string lock_path = config.state_dir + "/lockstepd.lock";
  int lock_fd = open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (lock_fd < 0 || flock(lock_fd, LOCK_EX | LOCK_NB) != 0) {
    return Die("another lockstepd uses the state directory " + config.state_dir +
               " (or it is not writable); one daemon per host");
  }
  std::unique_ptr<lockstep::channel::Listener> peer_listener;
  if (!peer_listen.empty()) {
    auto l = lockstep::channel::MakeTcpTransport()->Listen(peer_listen);
    if (!l.ok())
      return Die("the peer API cannot listen on " + peer_listen + ": " + l.status().message());
    peer_listener = std::move(*l);
    config.peer_address = peer_listener->address();
  }
  auto daemon = HostDaemon::Open(config);
  if (!daemon.ok()) return Die(daemon.status().message());
  auto listen_fd = ListenControl(socket_path);
  if (!listen_fd.ok()) return Die(listen_fd.status().message());
  std::unique_ptr<MetricsServer> metrics;
  if (!metrics_listen.empty()) {
    auto m = MetricsServer::Start(metrics_listen, [&d = **daemon] { return d.MetricsText(); });
    if (!m.ok()) return Die(m.status().message());
    metrics = std::move(*m);
  }
  LogEvent("info", "started",
           {{"host", config.host_id},
            {"socket", socket_path},
            {"state", config.state_dir},
            {"peer_api", config.peer_address},
            {"metrics", metrics ? metrics->address() : std::string()}});
  // The peer API on a thread of its own: a request from the paired host must not wait for
  // a local command that is itself waiting for that host.
  std::atomic<bool> stopping{false};
  std::thread peer_thread;
  if (peer_listener) {
    peer_thread = std::thread([&] {
      // A thread per connection: one that says nothing (or a failover's way back, which
      // takes seconds) holds up no other; past the limit a connection is closed at once.
      RequestWorkers peers(16);
      while (!stopping.load()) {
        auto link = peer_listener->Accept(std::chrono::milliseconds(500));
        peers.Reap();
        if (!link.ok()) continue;
        // Past the limit the lambda, and with it the connection, is dropped: closed.
        (void)peers.Run(
            [&daemon, l = std::move(*link)]() mutable { (*daemon)->ServePeer(std::move(l)); });
      }
    });
  }

  // Re-protection after a failover, as soon as the other host is back.
  std::thread reprotect_thread([&] {
    while (!stopping.load()) {
      (*daemon)->ReprotectLostVms();
      for (int i = 0; i < 20 && !stopping.load(); ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });

  RequestWorkers workers(32);
  for (;;) {
    pollfd p[2] = {{*listen_fd, POLLIN, 0}, {sigfd, POLLIN, 0}};
    int r = poll(p, 2, 1000);
    (*daemon)->ReapChildren();
    if (r < 0 && errno != EINTR) break;
    if (p[1].revents & POLLIN) {
      signalfd_siginfo info{};
      if (read(sigfd, &info, sizeof info) == sizeof info &&
          (info.ssi_signo == SIGTERM || info.ssi_signo == SIGINT)) {
        break;
      }
    }
    if (p[0].revents & POLLIN) {
      int fd = accept4(*listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
      // A thread per request: a failover drill takes minutes, and status must answer
      // meanwhile. HostDaemon serializes what needs it (its lock, and a VM being busy).
      if (fd >= 0 && !workers.Run([&daemon, fd] { Serve(**daemon, fd); })) {
        (void)WriteLine(fd,
                        Json{{"api", kControlApi},
                             {"ok", false},
                             {"error", "lockstepd is serving too many requests; try again"}}
                            .dump(),
                        std::chrono::steady_clock::now() + std::chrono::seconds(1));
        close(fd);
      }
    }
    workers.Reap();
  }
  if (workers.active() > 0) {
    LogEvent("info", "stopping", {{"waiting_for", std::to_string(workers.active()) + " requests"}});
  }
  workers.JoinAll();  // a failover in progress is seen through
  // The VMs run on: they are in sessions of their own, and a new daemon adopts them.
  stopping = true;
  if (peer_listener) peer_listener->Abort();
  if (peer_thread.joinable()) peer_thread.join();
  reprotect_thread.join();
  metrics.reset();
  unlink(socket_path.c_str());
  LogEvent("info", "stopped", {{"vms", "left running"}});
  return 0;
}
