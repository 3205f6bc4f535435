#include "vip_manager/witness.h"

namespace lockstep::vip {

Result<uint64_t> InProcessWitness::Register(std::string_view vm, std::string_view holder) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!reachable_) return Status::TimedOut("witness unreachable");
  auto it = tokens_.find(vm);
  if (it == tokens_.end()) it = tokens_.emplace(std::string(vm), Token{}).first;
  it->second.term += 1;
  it->second.holder = holder;
  return it->second.term;
}

Result<WitnessDecision> InProcessWitness::RequestActive(std::string_view vm,
                                                        std::string_view candidate,
                                                        uint64_t expected_term) {
  std::lock_guard<std::mutex> lock(mu_);
  ++requests_;
  if (!reachable_) return Status::TimedOut("witness unreachable");
  auto it = tokens_.find(vm);
  if (it == tokens_.end()) {
    return Status::FailedPrecondition("the witness knows no VM named '" + std::string(vm) +
                                      "': protection was never registered");
  }
  Token& t = it->second;
  WitnessDecision d;
  if (t.term == expected_term) {
    t.term += 1;
    t.holder = candidate;
    d.granted = true;
  } else if (t.term == expected_term + 1 && t.holder == candidate) {
    d.granted = true;  // the retry rule (witness.h): this request was granted already
  }
  d.term = t.term;
  d.holder = t.holder;
  return d;
}

void InProcessWitness::SetReachable(bool reachable) {
  std::lock_guard<std::mutex> lock(mu_);
  reachable_ = reachable;
}

std::vector<TokenRecord> InProcessWitness::Snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<TokenRecord> out;
  for (const auto& [vm, t] : tokens_) out.push_back({vm, t.term, t.holder});
  return out;
}

void InProcessWitness::Restore(const std::vector<TokenRecord>& tokens) {
  std::lock_guard<std::mutex> lock(mu_);
  tokens_.clear();
  for (const auto& t : tokens) tokens_[t.vm] = Token{t.term, t.holder};
}

uint64_t InProcessWitness::requests() const {
  std::lock_guard<std::mutex> lock(mu_);
  return requests_;
}

}  // namespace lockstep::vip
