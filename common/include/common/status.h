// Errors as values, shared by every lockstep library.
//
// A Status is either OK or carries a code and a human-readable message that says what
// happened and, where it helps, what to do. An OK Status holds no heap memory, so
// returning one on the hot path costs nothing. Result<T> holds either a T or a non-OK
// Status. Neither type throws across a module edge.
//
// Thread safety: a Status or Result is a value; distinct objects may be used from
// distinct threads without synchronization.
#pragma once

#include <cassert>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace lockstep {

class [[nodiscard]] Status {
 public:
  enum class Code : unsigned char {
    kOk = 0,
    kInvalidArgument,     // the caller passed something malformed
    kCorruption,          // bytes failed a checksum, bound or sequence check
    kVersionMismatch,     // the peer speaks another wire-format version
    kPeerRejected,        // the peer refused us (pairing, layout) and said why
    kPeerLost,            // the connection to the peer is gone
    kTimedOut,            // nothing happened within the deadline
    kIoError,             // a system call failed
    kResourceExhausted,   // a buffer or limit is too small
    kFailedPrecondition,  // the call is not valid in the current state
    kUnsupported,         // not available on this host or build
    kAborted,             // the operation was cancelled by a shutdown
  };

  Status() = default;  // OK
  Status(Code code, std::string_view message)
      : state_(code == Code::kOk ? nullptr : std::make_unique<State>(code, message)) {}
  Status(const Status& other)
      : state_(other.state_ ? std::make_unique<State>(*other.state_) : nullptr) {}
  Status& operator=(const Status& other) {
    if (this != &other) state_ = other.state_ ? std::make_unique<State>(*other.state_) : nullptr;
    return *this;
  }
  Status(Status&&) noexcept = default;
  Status& operator=(Status&&) noexcept = default;

  static Status Ok() { return Status(); }
  static Status InvalidArgument(std::string_view m) { return {Code::kInvalidArgument, m}; }
  static Status Corruption(std::string_view m) { return {Code::kCorruption, m}; }
  static Status VersionMismatch(std::string_view m) { return {Code::kVersionMismatch, m}; }
  static Status PeerRejected(std::string_view m) { return {Code::kPeerRejected, m}; }
  static Status PeerLost(std::string_view m) { return {Code::kPeerLost, m}; }
  static Status TimedOut(std::string_view m) { return {Code::kTimedOut, m}; }
  static Status IoError(std::string_view m) { return {Code::kIoError, m}; }
  // An IoError whose message ends with strerror(err).
  static Status FromErrno(std::string_view what, int err);
  static Status ResourceExhausted(std::string_view m) { return {Code::kResourceExhausted, m}; }
  static Status FailedPrecondition(std::string_view m) { return {Code::kFailedPrecondition, m}; }
  static Status Unsupported(std::string_view m) { return {Code::kUnsupported, m}; }
  static Status Aborted(std::string_view m) { return {Code::kAborted, m}; }

  bool ok() const { return state_ == nullptr; }
  Code code() const { return state_ ? state_->code : Code::kOk; }
  // Empty for OK.
  const std::string& message() const;
  // "OK" or "<code name>: <message>".
  std::string ToString() const;
  // A copy whose message is "<context>: <message>"; OK stays OK.
  Status WithContext(std::string_view context) const;

 private:
  struct State {
    State(Code c, std::string_view m) : code(c), message(m) {}
    Code code;
    std::string message;
  };
  std::unique_ptr<State> state_;
};

std::string_view CodeName(Status::Code code);

// Either a value or a non-OK Status.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}        // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {  // NOLINT: implicit by design
    assert(!std::get<Status>(v_).ok() && "Result needs a value or a non-OK Status");
  }

  bool ok() const { return std::holds_alternative<T>(v_); }
  // REQUIRES: ok()
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  // OK when a value is held.
  Status status() const { return ok() ? Status::Ok() : std::get<Status>(v_); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace lockstep

// Returns the Status of `expr` from the enclosing function when it is not OK.
#define LOCKSTEP_RETURN_IF_ERROR(expr)           \
  do {                                           \
    ::lockstep::Status _lockstep_st = (expr);    \
    if (!_lockstep_st.ok()) return _lockstep_st; \
  } while (0)
