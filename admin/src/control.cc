#include "admin/control.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "control_io.h"

namespace lockstep::admin {

Result<Json> CallDaemon(const std::string& socket_path, Json request,
                        std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  if (socket_path.size() >= sizeof a.sun_path) {
    return Status::InvalidArgument("control socket path too long: " + socket_path);
  }
  std::memcpy(a.sun_path, socket_path.c_str(), socket_path.size() + 1);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::FromErrno("socket", errno);
  FdCloser closer{fd};
  if (connect(fd, reinterpret_cast<const sockaddr*>(&a), sizeof a) != 0) {
    const int err = errno;
    if (err == EACCES || err == EPERM) {
      return Status::FailedPrecondition("no permission to use " + socket_path +
                                        ": the control socket is root's (run as root)");
    }
    return Status::PeerLost("no lockstepd answers at " + socket_path + " (" + std::strerror(err) +
                            "): is lockstepd running on this host? (or give --socket)");
  }
  request["api"] = kControlApi;
  LOCKSTEP_RETURN_IF_ERROR(WriteLine(fd, request.dump(), deadline));
  auto line = ReadLine(fd, deadline);
  if (!line.ok()) return line.status().WithContext("waiting for lockstepd at " + socket_path);
  Json answer = Json::parse(*line, nullptr, /*allow_exceptions=*/false);
  if (!answer.is_object()) {
    return Status::Corruption("lockstepd at " + socket_path + " answered something not JSON");
  }
  if (!answer.value("ok", false)) {
    return Status::FailedPrecondition(answer.value("error", std::string("refused, no reason")));
  }
  return answer;
}

}  // namespace lockstep::admin
