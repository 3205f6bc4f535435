// The etcd backend of the witness: the tokens live in an etcd cluster (v3 API). etcd makes
// each decision durable before it answers: a transaction is committed through raft, i.e.
// written and fsynced on a majority of the members, so a granted request survives a restart
// of etcd and the loss of any minority of its members. The decision rule is the one of
// witness.h, retry rule included; vip-manager/tests/witness_conformance_test.cc checks this
// backend and the others against the same expectations.
//
// Keys, for VM `vm` under `key_prefix`:
//   <prefix><vm>/term       the term, in decimal ("7")
//   <prefix><vm>/holder     the host that holds the token under that term
//   <prefix><vm>/confirmed  the last term whose holder confirmed it (witness.h)
//   <prefix><vm>/window     a provisional grant's window: the term, under an etcd lease of
//                           the window's length; etcd deletes it when the lease expires
// The term and holder are written by the same transaction, so they always agree.
//
// Each decision is ONE transaction, so one round trip, applied atomically (a provisional
// grant first asks etcd for its lease: one more):
//   RequestActive  compare term == expected; success: term = expected + 1, holder =
//                  candidate, and confirmed = term (zero window) or window = term under
//                  the lease
//   Confirm        compare term == T, holder == holder; success: confirmed = T
//   Reclaim        compare term == T, holder != candidate, confirmed != T, version(window)
//                  == 0 (lapsed: etcd deleted it); success: term = T + 1, holder =
//                  candidate, confirmed = T + 1
// and every failure branch reads term, holder and confirmed back, which is the answer.
// etcd orders every transaction in its log, so of two replicas asking with the same term
// exactly one compare succeeds, and of a Confirm and a Reclaim of the same grant exactly
// one does. One round trip keeps the failover path short and needs no lock: the compare
// is the whole decision. When a compare fails but the token already is what the request
// would have made it (term + 1, candidate), the answer is granted (witness.h's retry rule:
// the same request, applied once, whose answer was lost). A term key that does not exist
// is a VM never registered: kFailedPrecondition, as for the other witnesses.
//
// Register reads the term key (value and mod_revision), then writes term + 1, the holder
// and confirmed in a transaction whose compare is mod_revision(term key) == what it read
// (0 when the key is absent, which etcd compares as 0); a lost race is read and tried
// again, up to 5 times.
//
// The lease is on the window key only, never on the term: terms must never go backwards.
// A lease on the term would delete it when it expired, the next Register would count from
// 1 again, and a replica still holding an old term could then win the token with it. A
// lease's TTL is whole seconds, and etcd raises one below its minimum (about 2 s with the
// default election timeout) and notices an expiry within about half a second: an etcd
// grant window is at least that long. It only delays a Reclaim (witness.h: the window
// decides liveness, never safety).
//
// Transport: HTTP/1.1 to etcd's JSON gateway (POST /v3/kv/range, /v3/kv/txn and
// /v3/lease/grant, keys and values base64), one connection per request. Endpoints ("HOST:PORT" of
// the members' client URLs, plain http) are tried in order until one answers like etcd; one that is
// unreachable, silent, not etcd, or an etcd that refuses (no leader, ...) moves the request
// to the next. Each exchange with one endpoint (connect, send, answer) has a deadline of
// `timeout`, so a Confirm or Reclaim, or a RequestActive with a zero window, takes at most
// timeout × endpoints; a provisional RequestActive (lease, then transaction) and a
// Register (read, then transaction) two such round trips per attempt. When no endpoint answers, the
// error names every endpoint and what went wrong with each, with the code of the last one.
// Resending a request to the next endpoint is safe even if the first applied it: the retry rule
// answers RequestActive the same way, and Register's compare sees the change and bumps again. Use
// IP addresses: a host name is resolved by the system's resolver, outside the deadline.
//
// Names: VM and holder names are 1..255 bytes, each above ' ' (no whitespace, no control
// character below 0x20), as in the embedded witness's wire format; anything else is
// kInvalidArgument, before any request.
//
// Thread safety: thread-safe. The object holds only its configuration, which nothing
// changes after construction; every call makes its own connections.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "vip_manager/witness.h"

namespace lockstep::vip {

class EtcdWitness final : public Witness {
 public:
  // `endpoints`: "HOST:PORT" (IPv6 as "[ADDR]:PORT") of one or more members of the same etcd
  // cluster, tried in this order. `key_prefix` is put as is in front of the VM's name.
  explicit EtcdWitness(std::vector<std::string> endpoints,
                       std::string key_prefix = "/lockstep/witness/",
                       std::chrono::milliseconds timeout = std::chrono::milliseconds(500));

  Result<uint64_t> Register(std::string_view vm, std::string_view holder) override;
  using Witness::RequestActive;
  Result<WitnessDecision> RequestActive(std::string_view vm, std::string_view candidate,
                                        uint64_t expected_term,
                                        std::chrono::milliseconds confirm_within) override;
  Result<WitnessDecision> Confirm(std::string_view vm, std::string_view holder,
                                  uint64_t term) override;
  Result<WitnessDecision> Reclaim(std::string_view vm, std::string_view candidate,
                                  uint64_t term) override;

 private:
  const std::vector<std::string> endpoints_;
  const std::string key_prefix_;
  const std::chrono::milliseconds timeout_;
};

}  // namespace lockstep::vip
