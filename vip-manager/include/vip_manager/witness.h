// The witness: the single authority on which replica of a VM may be active.
//
// Each protected VM has one token: (term, holder, confirmed). When protection starts the
// primary registers itself as holder (confirmed) and learns the term; it tells the
// secondary the term in the handshake. On a fault — and only then — each side asks to
// become (or stay) the active replica with RequestActive(vm, candidate, term_it_knows).
// The witness grants the first request whose term still matches (compare-and-swap), bumps
// the term and records the new holder; every later request with the old term is denied
// and told who holds the token. So at most one side ever acts on a given fault, whatever
// the timing of the two requests.
//
// The grant window (the token's lease). A winner that still has work to do before it
// releases output — a secondary loads the device state and fences the old primary — asks
// for a PROVISIONAL grant with a window: it must Confirm() the token before it releases
// any output, and it releases nothing if the confirmation is refused. While the window is
// open only the winner can confirm; once it has lapsed unconfirmed, the loser may
// Reclaim() the token (term + 1, confirmed at once). This buys liveness when the winner
// dies or fails between its grant and its takeover (its host crashes, its fence command
// fails, the device state does not load): without it the loser, already told it lost,
// would stay fenced and the VM would be down. A winner with nothing left to do (a primary
// keeping the token) asks with a zero window: the grant is confirmed at once.
//
// Why this is safe whatever the clocks do: Confirm and Reclaim are compare-and-swaps on the
// same token, taken one at a time by the witness, so exactly one of them can succeed for a
// given grant; a replica releases output only once it holds a confirmed token. The window
// is measured by the witness alone (one clock), and only decides WHEN a loser may try:
// a window that ends too early costs liveness (the winner's confirmation is refused and it
// stays fenced), never a second active replica. A confirmed token cannot be reclaimed.
//
// The in-process witness below is for tests and single-process setups. The embedded
// witness service (witness_service.h) and the etcd backend (etcd_witness.h) implement the
// same interface with the same rule; vip-manager/tests/witness_conformance_test.cc runs one
// set of checks against all three.
#pragma once

#include <chrono>
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
  // Whether `holder` has confirmed the token under `term` (and may be releasing output).
  // False while a provisional grant waits for its holder's confirmation — and by default:
  // a decision that forgot to say is never taken for a confirmed one.
  bool confirmed = false;
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
  // `confirm_within` zero: the grant is confirmed at once. Otherwise it is provisional:
  // the candidate must Confirm() it before releasing any output, and after
  // `confirm_within` (measured by the witness; a backend may round it up, e.g. etcd to
  // whole seconds of its lease TTL) the loser may Reclaim() it.
  //
  // Retry rule: if the token already is (expected_term + 1, candidate), the answer is
  // granted again, with that term and no change. This is a request asked again after its
  // answer was lost (a timeout, a witness that applied it and then failed over); it is
  // safe because the token really is the candidate's under that term. Any other request
  // with a term that is no longer current is denied and told the current token.
  //
  // A VM never registered: kFailedPrecondition ("the witness knows no VM named ...").
  // Other errors mean the witness could not be asked (unreachable): the caller must then
  // treat it as denied. An error does not prove the request was not applied; asking again
  // with the same candidate and term then answers granted (the retry rule).
  virtual Result<WitnessDecision> RequestActive(std::string_view vm, std::string_view candidate,
                                                uint64_t expected_term,
                                                std::chrono::milliseconds confirm_within) = 0;
  // A grant confirmed at once (confirm_within zero).
  Result<WitnessDecision> RequestActive(std::string_view vm, std::string_view candidate,
                                        uint64_t expected_term) {
    return RequestActive(vm, candidate, expected_term, std::chrono::milliseconds(0));
  }

  // The winner of a provisional grant confirms it before releasing output: granted (and
  // confirmed) if the token still is (term, holder), also when it was confirmed already
  // (a confirmation asked again) or its window has lapsed but nobody reclaimed it. Denied,
  // with the current token, if it moved on: the caller must not go active. Errors as for
  // RequestActive (an unanswered confirmation is not one: the caller must not go active).
  virtual Result<WitnessDecision> Confirm(std::string_view vm, std::string_view holder,
                                          uint64_t term) = 0;

  // A loser takes back a provisional grant whose window lapsed unconfirmed: if the token is
  // (term, someone else, unconfirmed) and its window is over, grants it to `candidate`
  // under term + 1, confirmed. Denied with the current token otherwise: `confirmed` true
  // means the winner went ahead (give up), false means the window is still open (ask again
  // later) — unless the term is no longer `term`. Retry rule: (term + 1, candidate) is
  // granted again.
  virtual Result<WitnessDecision> Reclaim(std::string_view vm, std::string_view candidate,
                                          uint64_t term) = 0;
};

// One VM's token, as a witness keeps it.
struct TokenRecord {
  std::string vm;
  uint64_t term = 0;
  std::string holder;
  bool confirmed = true;
  // A provisional grant's window. A witness that starts again from its records opens the
  // window anew (it cannot know how much of it had passed): a loser waits longer, never
  // less.
  std::chrono::milliseconds window{0};
};

// A witness living in this process. Thread-safe.
class InProcessWitness final : public Witness {
 public:
  using Witness::RequestActive;
  Result<uint64_t> Register(std::string_view vm, std::string_view holder) override;
  Result<WitnessDecision> RequestActive(std::string_view vm, std::string_view candidate,
                                        uint64_t expected_term,
                                        std::chrono::milliseconds confirm_within) override;
  Result<WitnessDecision> Confirm(std::string_view vm, std::string_view holder,
                                  uint64_t term) override;
  Result<WitnessDecision> Reclaim(std::string_view vm, std::string_view candidate,
                                  uint64_t term) override;
  // Makes every later call fail as if the witness were unreachable (fault injection).
  void SetReachable(bool reachable);
  // Number of RequestActive, Confirm and Reclaim calls so far (to prove the normal path
  // never asks).
  uint64_t requests() const;
  // Every token, and a way to start from them again (the embedded witness's disk).
  std::vector<TokenRecord> Snapshot() const;
  void Restore(const std::vector<TokenRecord>& tokens);

 private:
  struct Token {
    uint64_t term = 0;
    std::string holder;
    bool confirmed = true;
    std::chrono::milliseconds window{0};
    std::chrono::steady_clock::time_point window_end{};  // unconfirmed: reclaimable after
  };
  // REQUIRES: mu_ held. Counts a request and finds the token of `vm`: an error if the
  // witness is unreachable (SetReachable) or knows no such VM.
  Result<Token*> Ask(std::string_view vm);
  static WitnessDecision Answer(bool granted, const Token& t);

  mutable std::mutex mu_;
  std::map<std::string, Token, std::less<>> tokens_;  // GUARDED_BY(mu_)
  bool reachable_ = true;                             // GUARDED_BY(mu_)
  uint64_t requests_ = 0;                             // GUARDED_BY(mu_)
};

}  // namespace lockstep::vip
