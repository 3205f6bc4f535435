// lockstepd's Prometheus endpoint: GET /metrics over HTTP/1.1 (Boost.Beast), answered with
// what `render` returns (text format 0.0.4). One thread, one request at a time; each
// connection has 5 s to send its request.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "common/status.h"

namespace lockstep::admin {

class MetricsServer {
 public:
  // Listens on `address` ("IPv4:PORT"; port 0 picks one) and serves on a thread of its own.
  static Result<std::unique_ptr<MetricsServer>> Start(const std::string& address,
                                                      std::function<std::string()> render);
  ~MetricsServer();  // stops serving
  std::string address() const;

 private:
  struct Impl;
  explicit MetricsServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace lockstep::admin
