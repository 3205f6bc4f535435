// A directory of this test process's own under /tmp, made on first use and removed when the
// process exits, for its sockets and files. (Names made of the pid were left behind by
// every run, and a later process given the same pid failed to bind its memif socket:
// "Address already in use".)
#pragma once

#include <stdlib.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <string>
#include <system_error>

namespace lockstep::testing {

// `stem`: the directory's name before a unique suffix (e.g. "lockstep-dpdk-test"); the
// first call names it, later calls get the same directory.
inline const std::string& ProcessDir(const std::string& stem) {
  static const struct Dir {
    std::string path;
    explicit Dir(const std::string& stem) {
      std::string name = "/tmp/" + stem + "-XXXXXX";
      REQUIRE(mkdtemp(name.data()) != nullptr);
      path = name;
    }
    ~Dir() {
      std::error_code ignored;
      std::filesystem::remove_all(path, ignored);
    }
  } dir(stem);
  return dir.path;
}

}  // namespace lockstep::testing
