// RequestWorkers: lockstepd serves each request (control or peer API) on a thread of its
// own, so a long one — a failover drill takes minutes — holds up nobody else, and a client
// that connects and says nothing holds up only its own thread.
//
// Thread safety: Run() and Reap() from one thread (the accepting loop).
#pragma once

#include <atomic>
#include <cstddef>
#include <list>
#include <memory>
#include <thread>
#include <utility>

namespace lockstep::admin {

class RequestWorkers {
 public:
  explicit RequestWorkers(size_t limit) : limit_(limit) {}
  ~RequestWorkers() { JoinAll(); }
  RequestWorkers(const RequestWorkers&) = delete;
  RequestWorkers& operator=(const RequestWorkers&) = delete;

  // Starts `work` (any callable, move-only ones too) on a new thread; false (and `work`
  // dropped unrun) when `limit` requests are being served already.
  template <typename Work>
  bool Run(Work work) {
    Reap();
    if (workers_.size() >= limit_) return false;
    auto done = std::make_shared<std::atomic<bool>>(false);
    workers_.emplace_back(std::thread([work = std::move(work), done]() mutable {
                            work();
                            done->store(true);
                          }),
                          done);
    return true;
  }

  // Joins the threads whose request is finished.
  void Reap() {
    for (auto it = workers_.begin(); it != workers_.end();) {
      if (!it->second->load()) {
        ++it;
        continue;
      }
      it->first.join();
      it = workers_.erase(it);
    }
  }

  size_t active() const { return workers_.size(); }

  // Waits for every request in progress to finish.
  void JoinAll() {
    for (auto& w : workers_) w.first.join();
    workers_.clear();
  }

 private:
  const size_t limit_;
  std::list<std::pair<std::thread, std::shared_ptr<std::atomic<bool>>>> workers_;
};

}  // namespace lockstep::admin
