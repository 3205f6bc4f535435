// The embedded witness: a small service of ours on a third host (or inside the admin
// daemon) that decides the single active replica of each VM for the replicas on two other
// hosts, and keeps its decisions on disk so that a restart changes none of them.
//
// The decision rule is InProcessWitness's (compare-and-swap on the term, witness.h); this
// file adds the network and the disk.
//
// Wire format, version 2 (TCP; one request per connection; integers big-endian;
// str = u16 length + bytes, at most 255 bytes, no whitespace):
//   every message   u32 length of what follows (at most 4096), then the body
//   request body    u32 magic 0x4C535754 ("LSWT"), u16 version (2), u16 op
//                   (1 = REGISTER, 2 = REQUEST_ACTIVE, 3 = CONFIRM, 4 = RECLAIM), u64 term
//                   (REGISTER: 0), u32 grant window in ms (REQUEST_ACTIVE; else 0; at most
//                   an hour), str vm, str candidate (REGISTER: the holder; CONFIRM: the
//                   holder confirming)
//   reply body      u32 magic, u16 version the witness speaks, u16 code (0 = answered,
//                   1 = refused: see error), u8 granted, u64 term, str holder, str error,
//                   and only when answered (code 0): u8 confirmed
// A witness that does not speak the request's version answers code 1 with its own version;
// a refusal has version 1's layout, so any client can read why.
//
// State file, version 3: "lockstep-witness 3" on the first line, then one line per
// decision that changed a token, "<vm> <term> <holder> confirmed" or
// "<vm> <term> <holder> pending <window ms>"; a VM's last line wins. A decision is appended
// and fdatasync'd before it is answered (one sync per decision on the failover path), so an
// answer the witness gave is never forgotten by a crash; a decision that cannot be written
// is taken back and refused (and if the half-written line cannot be cut off again, the
// witness takes no more decisions). A pending grant read back at start has its window
// opened anew (witness.h). A last line that does not parse is an append a crash cut
// short — never synced, never answered — and is dropped; a bad line anywhere else is
// damage, and the witness does not start. One witness per state file: <state>.lock is
// flock'ed for as long as it runs. At start the file is compacted to one line per VM
// (temporary file, fsync, rename, fsync of the directory), which also proves it writable
// before anything is served. Version 1 and 2 files (lines of three fields, every token
// confirmed) read the same.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "vip_manager/witness.h"

namespace lockstep::vip {

class WitnessServer {
 public:
  // Serves on `listen` ("HOST:PORT"; port 0 picks one) with its state in `state_file`
  // (loaded if it exists; kCorruption, naming the line, if it cannot be read).
  static Result<std::unique_ptr<WitnessServer>> Start(const std::string& listen,
                                                      const std::string& state_file);
  ~WitnessServer();  // stops serving; the state file stays
  WitnessServer(const WitnessServer&) = delete;
  WitnessServer& operator=(const WitnessServer&) = delete;

  std::string address() const;  // "HOST:PORT" as clients should dial it
  uint64_t requests() const;    // requests answered so far

 private:
  struct Impl;
  explicit WitnessServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The replicas' side: a Witness that asks a WitnessServer. Every call is one connection
// with a deadline of `timeout`; an unreachable or silent witness is an error (the caller
// treats it as denied: witness.h). Thread-safe.
class WitnessClient final : public Witness {
 public:
  explicit WitnessClient(std::string address,
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
  Result<WitnessDecision> Ask(uint16_t op, std::string_view vm, std::string_view candidate,
                              uint64_t term, uint32_t window_ms);
  std::string address_;
  std::chrono::milliseconds timeout_;
};

}  // namespace lockstep::vip
