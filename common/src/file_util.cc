#include "common/file_util.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>

namespace lockstep {

Status WriteFileAtomic(const std::string& path, std::string_view text) {
  const std::string tmp = path + ".tmp";
  int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return Status::FromErrno("writing " + tmp, errno);
  bool ok =
      write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()) && fsync(fd) == 0;
  int err = errno;
  close(fd);
  if (!ok) {
    unlink(tmp.c_str());
    return Status::FromErrno("writing " + path + " (disk full?)", err);
  }
  if (rename(tmp.c_str(), path.c_str()) != 0) {
    err = errno;
    unlink(tmp.c_str());
    return Status::FromErrno("renaming " + tmp + " into " + path, err);
  }
  const std::string dir = std::filesystem::path(path).parent_path().string();
  int dfd = open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return Status::FromErrno("opening the directory of " + path, errno);
  int synced = fsync(dfd);
  err = errno;
  close(dfd);
  if (synced != 0) return Status::FromErrno("syncing the directory of " + path, err);
  return Status::Ok();
}

}  // namespace lockstep
