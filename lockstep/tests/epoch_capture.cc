#include "epoch_capture.h"

#include <thread>

#include "epoch_stager.h"
#include "replication_channel/loopback.h"

namespace lockstep::testing {

std::vector<CapturedEpoch> CaptureEpochs(SimulatedGuest& guest, int count, bool delta,
                                         std::chrono::milliseconds run_for, int precopy_rounds) {
  auto blocks = guest.RamBlocks();
  EpochStager stager(blocks, 1 << 20);
  EpochStreamer streamer(blocks, delta);
  auto link = channel::LoopbackLink::Create();
  auto a = link->TakeA();
  auto b = link->TakeB();
  std::vector<CapturedEpoch> out;
  std::vector<uint8_t> buf(channel::kMaxMessageBytes);
  (void)guest.StartDirtyLog();
  for (int i = 1 - precopy_rounds; i <= count; ++i) {
    std::this_thread::sleep_for(run_for);
    (void)guest.StopVcpus();
    const bool round = i <= 0;
    Status s = round ? stager.TakeRound(guest, i == 1 - precopy_rounds)
                     : stager.Capture(guest, i, i == 1 && precopy_rounds == 0);
    CapturedEpoch e;
    e.epoch = round ? 0 : i;
    e.ram_hash = guest.RamHash();
    (void)guest.StartVcpus();
    if (!s.ok()) return out;
    if (round) stager.CopyRound();  // while the guest runs, as the primary does
    StreamStats stats;
    // The loopback link copies on send, so one thread can send then drain.
    if (!streamer.Send(stager, *a, &stats).ok()) return out;
    for (;;) {
      size_t n = 0;
      if (!b->Receive(buf, &n, std::chrono::milliseconds(0)).ok()) break;
      e.messages.emplace_back(buf.begin(), buf.begin() + n);
    }
    out.push_back(std::move(e));
  }
  return out;
}

std::vector<ReplicaBlock> ReplicaBlocksOf(SimulatedGuest& guest) {
  std::vector<ReplicaBlock> out;
  for (const auto& b : guest.RamBlocks()) out.push_back({b.host, b.length / wire::kPageSize});
  return out;
}

Result<bool> FeedEpoch(EpochAssembler& a, const CapturedEpoch& e, std::vector<uint8_t>* staged) {
  staged->clear();
  bool committed = false;
  for (const auto& m : e.messages) {
    auto r = a.Feed(m);
    if (!r.ok()) return r.status();
    staged->insert(staged->end(), m.begin(), m.end());
    committed = *r != EpochAssembler::Progress::kNeedMore;
  }
  return committed;
}

}  // namespace lockstep::testing
