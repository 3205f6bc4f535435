// A mutex with priority inheritance (PTHREAD_PRIO_INHERIT), usable with std::lock_guard.
//
// For locks a real-time thread (the heartbeaters) may wait on while a normal thread holds
// them: the holder runs at the waiter's priority until it unlocks, so a busy CPU cannot
// park the heartbeat behind a preempted epoch send. Uncontended it costs what a
// std::mutex does.
#pragma once

#include <pthread.h>

namespace lockstep {

class PriorityInheritanceMutex {
 public:
  PriorityInheritanceMutex() {
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_setprotocol(&attr, PTHREAD_PRIO_INHERIT);
    pthread_mutex_init(&mu_, &attr);
    pthread_mutexattr_destroy(&attr);
  }
  ~PriorityInheritanceMutex() { pthread_mutex_destroy(&mu_); }
  PriorityInheritanceMutex(const PriorityInheritanceMutex&) = delete;
  PriorityInheritanceMutex& operator=(const PriorityInheritanceMutex&) = delete;
  void lock() { pthread_mutex_lock(&mu_); }
  void unlock() { pthread_mutex_unlock(&mu_); }
  bool try_lock() { return pthread_mutex_trylock(&mu_) == 0; }

 private:
  pthread_mutex_t mu_;
};

}  // namespace lockstep
