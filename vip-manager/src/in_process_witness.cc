#include "vip_manager/witness.h"

namespace lockstep::vip {

using SteadyClock = std::chrono::steady_clock;

Result<InProcessWitness::Token*> InProcessWitness::Ask(std::string_view vm) {
  ++requests_;
  if (!reachable_) return Status::TimedOut("witness unreachable");
  auto it = tokens_.find(vm);
  if (it == tokens_.end()) {
    return Status::FailedPrecondition("the witness knows no VM named '" + std::string(vm) +
                                      "': protection was never registered");
  }
  return &it->second;
}

WitnessDecision InProcessWitness::Answer(bool granted, const Token& t) {
  return {granted, t.term, t.holder, t.confirmed};
}

Result<uint64_t> InProcessWitness::Register(std::string_view vm, std::string_view holder) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!reachable_) return Status::TimedOut("witness unreachable");
  auto it = tokens_.find(vm);
  if (it == tokens_.end()) it = tokens_.emplace(std::string(vm), Token{}).first;
  Token& t = it->second;
  t = Token{t.term + 1, std::string(holder), true, {}, {}};
  return t.term;
}

Result<WitnessDecision> InProcessWitness::RequestActive(std::string_view vm,
                                                        std::string_view candidate,
                                                        uint64_t expected_term,
                                                        std::chrono::milliseconds confirm_within) {
  std::lock_guard<std::mutex> lock(mu_);
  auto token = Ask(vm);
  if (!token.ok()) return token.status();
  Token* t = *token;
  if (t->term == expected_term) {
    const bool confirmed = confirm_within.count() <= 0;
    *t = Token{t->term + 1, std::string(candidate), confirmed,
               confirmed ? std::chrono::milliseconds(0) : confirm_within,
               SteadyClock::now() + confirm_within};
    return Answer(true, *t);
  }
  // The retry rule (witness.h): this request was granted already.
  return Answer(t->term == expected_term + 1 && t->holder == candidate, *t);
}

Result<WitnessDecision> InProcessWitness::Confirm(std::string_view vm, std::string_view holder,
                                                  uint64_t term) {
  std::lock_guard<std::mutex> lock(mu_);
  auto token = Ask(vm);
  if (!token.ok()) return token.status();
  Token* t = *token;
  if (t->term != term || t->holder != holder) return Answer(false, *t);
  t->confirmed = true;
  t->window = {};
  return Answer(true, *t);
}

Result<WitnessDecision> InProcessWitness::Reclaim(std::string_view vm, std::string_view candidate,
                                                  uint64_t term) {
  std::lock_guard<std::mutex> lock(mu_);
  auto token = Ask(vm);
  if (!token.ok()) return token.status();
  Token* t = *token;
  if (t->term == term && t->holder != candidate && !t->confirmed &&
      SteadyClock::now() >= t->window_end) {
    *t = Token{term + 1, std::string(candidate), true, {}, {}};
    return Answer(true, *t);
  }
  return Answer(t->term == term + 1 && t->holder == candidate, *t);  // the retry rule
}

void InProcessWitness::SetReachable(bool reachable) {
  std::lock_guard<std::mutex> lock(mu_);
  reachable_ = reachable;
}

std::vector<TokenRecord> InProcessWitness::Snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<TokenRecord> out;
  for (const auto& [vm, t] : tokens_) out.push_back({vm, t.term, t.holder, t.confirmed, t.window});
  return out;
}

void InProcessWitness::Restore(const std::vector<TokenRecord>& tokens) {
  std::lock_guard<std::mutex> lock(mu_);
  tokens_.clear();
  const auto now = SteadyClock::now();
  for (const auto& t : tokens) {
    tokens_[t.vm] = Token{t.term, t.holder, t.confirmed,
                          t.confirmed ? std::chrono::milliseconds(0) : t.window, now + t.window};
  }
}

uint64_t InProcessWitness::requests() const {
  std::lock_guard<std::mutex> lock(mu_);
  return requests_;
}

}  // namespace lockstep::vip
