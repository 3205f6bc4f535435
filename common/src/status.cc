#include "common/status.h"

#include <cstring>

namespace lockstep {

namespace {
const std::string kEmpty;
}

std::string_view CodeName(Status::Code code) {
  switch (code) {
    case Status::Code::kOk:
      return "OK";
    case Status::Code::kInvalidArgument:
      return "invalid argument";
    case Status::Code::kCorruption:
      return "corruption";
    case Status::Code::kVersionMismatch:
      return "version mismatch";
    case Status::Code::kPeerRejected:
      return "rejected by peer";
    case Status::Code::kPeerLost:
      return "peer lost";
    case Status::Code::kTimedOut:
      return "timed out";
    case Status::Code::kIoError:
      return "I/O error";
    case Status::Code::kResourceExhausted:
      return "resource exhausted";
    case Status::Code::kFailedPrecondition:
      return "failed precondition";
    case Status::Code::kUnsupported:
      return "unsupported";
    case Status::Code::kAborted:
      return "aborted";
  }
  return "unknown";
}

Status Status::FromErrno(std::string_view what, int err) {
  std::string m(what);
  m += ": ";
  m += std::strerror(err);
  return {Code::kIoError, m};
}

const std::string& Status::message() const { return state_ ? state_->message : kEmpty; }

std::string Status::ToString() const {
  if (ok()) return "OK";
  std::string s(CodeName(state_->code));
  s += ": ";
  s += state_->message;
  return s;
}

Status Status::WithContext(std::string_view context) const {
  if (ok()) return Status();
  std::string m(context);
  m += ": ";
  m += state_->message;
  return {state_->code, m};
}

}  // namespace lockstep
