// The witness: the single authority on which replica of a VM may be active.
//
// Each protected VM has one token: (term, holder). When protection starts the primary
// registers itself as holder and learns the term; it tells the secondary the term in the
// handshake. On a fault — and only then — each side asks to become (or stay) the active
// replica with RequestActive(vm, candidate, term_it_knows). The witness grants the first
// request whose term still matches (compare-and-swap), bumps the term and records the new
// holder; every later request with the old term is denied and told who holds the token.
// So at most one side ever acts on a given fault, whatever the timing of the two requests.
//
// The in-process witness below is for tests and single-process setups. The embedded
// witness service (witness_service.h) and the etcd backend (etcd_witness.h) implement the
// same interface with the same rule; vip-manager/tests/witness_conformance_test.cc runs one
// set of checks against all three.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace lockstep::vip {

struct WitnessDecision {
  bool granted = false;
  uint64_t term = 0;   // the term after the decision
  std::string holder;  // who holds the token after the decision
};

class Witness {
 public:
  virtual ~Witness() = default;

  // Makes `holder` the active replica of `vm` unconditionally and returns the new term.
  // Called when protection (re)starts, never on the fault path.
  virtual Result<uint64_t> Register(std::string_view vm, std::string_view holder) = 0;

  // Compare-and-swap: if the token's term is `expected_term`, grants it to `candidate`
  // under term + 1. A candidate that already holds the token under `expected_term`
  // (the primary staying active) is granted too, likewise with a new term.
  //
  // Retry rule: if the token already is (expected_term + 1, candidate), the answer is
  // granted again, with that term and no change. This is a request asked again after its
  // answer was lost (a timeout, a witness that applied it and then failed over); it is
  // safe because the token really is the candidate's under that term. Any other request
  // with a term that is no longer current is denied and told the current term and holder.
  //
  // A VM never registered: kFailedPrecondition ("the witness knows no VM named ...").
  // Other errors mean the witness could not be asked (unreachable): the caller must then
  // treat it as denied. An error does not prove the request was not applied; asking again
  // with the same candidate and term then answers granted (the retry rule).
  virtual Result<WitnessDecision> RequestActive(std::string_view vm, std::string_view candidate,
                                                uint64_t expected_term) = 0;
};

// One VM's token, as a witness keeps it.
struct TokenRecord {
  std::string vm;
  uint64_t term = 0;
  std::string holder;
};

// A witness living in this process. Thread-safe.
class InProcessWitness final : public Witness {
 public:
  Result<uint64_t> Register(std::string_view vm, std::string_view holder) override;
  Result<WitnessDecision> RequestActive(std::string_view vm, std::string_view candidate,
                                        uint64_t expected_term) override;
  // Makes every later call fail as if the witness were unreachable (fault injection).
  void SetReachable(bool reachable);
  // Number of RequestActive calls so far (to prove the normal path never asks).
  uint64_t requests() const;
  // Every token, and a way to start from them again (the embedded witness's disk).
  std::vector<TokenRecord> Snapshot() const;
  void Restore(const std::vector<TokenRecord>& tokens);

 private:
  struct Token {
    uint64_t term = 0;
    std::string holder;
  };
  mutable std::mutex mu_;
  std::map<std::string, Token, std::less<>> tokens_;  // GUARDED_BY(mu_)
  bool reachable_ = true;                             // GUARDED_BY(mu_)
  uint64_t requests_ = 0;                             // GUARDED_BY(mu_)
};

}  // namespace lockstep::vip
