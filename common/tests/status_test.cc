#include "common/status.h"

#include <catch2/catch.hpp>
#include <cerrno>

using lockstep::Result;
using lockstep::Status;

TEST_CASE("OK status has no message and reads OK", "[status]") {
  Status s;
  REQUIRE(s.ok());
  REQUIRE(s.ToString() == "OK");
  REQUIRE(s.message().empty());
}

TEST_CASE("error status carries code, message and context", "[status]") {
  Status s = Status::Corruption("record 3 has a bad checksum");
  REQUIRE_FALSE(s.ok());
  REQUIRE(s.code() == Status::Code::kCorruption);
  REQUIRE(s.ToString() == "corruption: record 3 has a bad checksum");
  Status c = s.WithContext("epoch 7");
  REQUIRE(c.message() == "epoch 7: record 3 has a bad checksum");
  Status copy = c;
  REQUIRE(copy.ToString() == c.ToString());
  REQUIRE(Status::FromErrno("open /x", ENOENT).message() == "open /x: No such file or directory");
}

TEST_CASE("Result holds a value or an error", "[status]") {
  Result<int> good = 42;
  REQUIRE(good.ok());
  REQUIRE(*good == 42);
  REQUIRE(good.status().ok());
  Result<int> bad = Status::TimedOut("no answer within 5 ms");
  REQUIRE_FALSE(bad.ok());
  REQUIRE(bad.status().code() == Status::Code::kTimedOut);
}
