#include "simulated_guest.h"

#include <algorithm>
#include <cstring>

#include "common/crc32c.h"
#include "lockstep/wire_format.h"

namespace lockstep::testing {

namespace {
constexpr uint64_t kLedgerMagic = 0x4C45444745523031ULL;  // "LEDGER01"
constexpr uint64_t kRegsMagic = 0x5245475331303030ULL;
constexpr size_t kPage = wire::kPageSize;

uint64_t Load(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
void Store(uint8_t* p, uint64_t v) { std::memcpy(p, &v, 8); }

uint64_t Mix(uint64_t x) {  // splitmix64 finalizer
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}
}  // namespace

SimulatedGuest::SimulatedGuest(GuestConfig config) : config_(std::move(config)) {
  config_.bytes_per_write = std::clamp<uint32_t>(config_.bytes_per_write, 8, kPage);
  for (const auto& [name, len] : config_.blocks) {
    names_.push_back(name);
    ram_.emplace_back(len);
    bool rom = !config_.rom_prefix.empty() && name.rfind(config_.rom_prefix, 0) == 0;
    rom_.push_back(rom);
    size_t words = (len / kPage + 63) / 64;
    dirty_words_.push_back(words);
    dirty_.emplace_back(new std::atomic<uint64_t>[words]);
    for (size_t w = 0; w < words; ++w) dirty_.back()[w].store(0);
  }
  uint64_t rom_xor = 0;
  for (uint32_t b = 0; b < ram_.size(); ++b) {
    uint64_t pages = ram_[b].size() / kPage;
    for (uint64_t p = 0; p < pages; ++p) {
      uint8_t* page = ram_[b].data() + p * kPage;
      if (rom_[b]) {
        for (size_t o = 0; o < kPage; o += 8)
          Store(page + o, Mix(config_.seed ^ (uint64_t{b} << 40) ^ (p << 12) ^ o));
        rom_xor ^= Load(page);
      } else if (!(b == 0 && p == 0)) {
        writable_.push_back({b, p});
      }
    }
  }
  if (config_.burst) {
    noise_.resize(1u << 20);
    for (size_t o = 0; o < noise_.size(); o += 8) Store(noise_.data() + o, Mix(config_.seed + o));
  }
  uint8_t* ledger = ram_[0].data();
  Store(ledger, kLedgerMagic);
  Store(ledger + 8, 0);
  Store(ledger + 16, rom_xor);
  regs_ = {kRegsMagic, 0, Mix(config_.seed), 0};
}

SimulatedGuest::~SimulatedGuest() {
  {
    std::lock_guard<std::mutex> lock(run_mu_);
    exit_ = true;
  }
  run_cv_.notify_all();
  if (vcpu_.joinable()) vcpu_.join();
}

void SimulatedGuest::Boot() { (void)StartVcpus(); }

std::vector<RamBlock> SimulatedGuest::RamBlocks() {
  std::vector<RamBlock> out;
  for (size_t b = 0; b < ram_.size(); ++b)
    out.push_back({names_[b], ram_[b].data(), ram_[b].size()});
  return out;
}

uint64_t SimulatedGuest::NextRandom() {
  regs_.rng = Mix(regs_.rng);
  return regs_.rng;
}

void SimulatedGuest::MarkDirty(uint32_t block, uint64_t page) {
  if (!dirty_log_on_.load(std::memory_order_relaxed)) return;
  dirty_[block][page / 64].fetch_or(1ULL << (page % 64), std::memory_order_relaxed);
}

void SimulatedGuest::WritePage(uint32_t block, uint64_t page, uint64_t stamp, uint64_t salt,
                               uint32_t bytes) {
  uint8_t* p = ram_[block].data() + page * kPage;
  uint8_t* ledger = ram_[0].data();
  Store(ledger + 16, Load(ledger + 16) ^ Load(p) ^ stamp);
  Store(p, stamp);
  // The rest of the write lands at a word-aligned offset derived from `salt`.
  uint32_t body = bytes - 8;
  if (body > 0) {
    uint32_t span = static_cast<uint32_t>(kPage - 8);
    uint32_t off = 8 + static_cast<uint32_t>((salt % ((span - body) / 8 + 1)) * 8);
    for (uint32_t o = 0; o + 8 <= body; o += 8) Store(p + off + o, Mix(salt + o));
  }
  MarkDirty(block, page);
}

void SimulatedGuest::Step() {
  uint64_t step = ++regs_.step;
  uint64_t n = config_.pages_per_step;
  const bool burst = config_.burst;
  if (burst) {
    std::lock_guard<std::mutex> lock(run_mu_);
    n = std::min<uint64_t>(burst_left_, 256);
    burst_left_ -= n;
  }
  for (uint64_t i = 0; i < n; ++i) {
    uint64_t r = NextRandom();
    auto [b, p] = burst ? writable_[regs_.burst_cursor++ % writable_.size()]
                        : writable_[r % writable_.size()];
    uint64_t stamp = Mix(step * 1315423911ULL + i) | 1;
    if (burst) {
      // A whole page of new content, copied (fast) from the noise at a moving offset.
      uint8_t* page = ram_[b].data() + p * kPage;
      uint64_t old_stamp = Load(page);
      std::memcpy(page, noise_.data() + (r % (noise_.size() / 8 - kPage / 8)) * 8, kPage);
      Store(page, old_stamp);  // WritePage swaps the stamp and keeps the ledger right
    }
    WritePage(b, p, stamp, r, burst ? 8 : config_.bytes_per_write);
  }
  Store(ram_[0].data() + 8, step);
  MarkDirty(0, 0);
  steps_.store(step, std::memory_order_release);
  if (config_.output_every != 0 && step % config_.output_every == 0) Emit();
}

void SimulatedGuest::Run() {
  const bool burst = config_.burst;
  std::unique_lock<std::mutex> lock(run_mu_);
  auto can_run = [&] { return run_requested_ && !(burst && burst_left_ == 0); };
  while (!exit_) {
    if (!can_run()) {
      parked_ = true;
      run_cv_.notify_all();
      run_cv_.wait(lock, [&] { return exit_ || can_run(); });
      continue;
    }
    parked_ = false;
    lock.unlock();
    Step();
    if (config_.step_delay.count() > 0) std::this_thread::sleep_for(config_.step_delay);
    lock.lock();
  }
  parked_ = true;
  run_cv_.notify_all();
}

Status SimulatedGuest::Halt() {
  halted_.store(true);
  Status s = StopVcpus();
  open_pauses_.fetch_sub(1);  // no StartVcpus() follows a halt
  return s;
}

Status SimulatedGuest::StopVcpus() {
  open_pauses_.fetch_add(1);
  std::unique_lock<std::mutex> lock(run_mu_);
  run_requested_ = false;
  run_cv_.notify_all();
  run_cv_.wait(lock, [&] { return parked_; });
  return Status::Ok();
}

Status SimulatedGuest::StartVcpus() {
  if (open_pauses_.load() > 0) open_pauses_.fetch_sub(1);
  if (start_hook_) start_hook_();
  std::lock_guard<std::mutex> lock(run_mu_);
  if (!vcpu_.joinable()) vcpu_ = std::thread([this] { Run(); });
  run_requested_ = true;
  burst_left_ = config_.pages_per_epoch;
  run_cv_.notify_all();
  return Status::Ok();
}

bool SimulatedGuest::running() const {
  std::lock_guard<std::mutex> lock(run_mu_);
  return run_requested_;
}

uint64_t SimulatedGuest::steps() const { return steps_.load(std::memory_order_acquire); }

Status SimulatedGuest::StartDirtyLog() {
  dirty_log_on_.store(true);
  return Status::Ok();
}

Status SimulatedGuest::StopDirtyLog() {
  dirty_log_on_.store(false);
  return Status::Ok();
}

Status SimulatedGuest::SyncDirtyLog() { return Status::Ok(); }

Status SimulatedGuest::TakeDirtyBitmap(size_t block, std::span<uint64_t> bitmap) {
  if (block >= dirty_.size() || bitmap.size() < dirty_words_[block]) {
    return Status::InvalidArgument("bad block or bitmap size");
  }
  for (size_t w = 0; w < dirty_words_[block]; ++w) bitmap[w] |= dirty_[block][w].exchange(0);
  return Status::Ok();
}

Result<size_t> SimulatedGuest::SaveDeviceState(std::span<uint8_t> out) {
  if (fail_next_save_.exchange(false)) return Status::IoError("injected device-state failure");
  size_t n = std::max<size_t>(sizeof(Regs), config_.device_state_bytes);
  if (out.size() < n)
    return Status::ResourceExhausted("device state needs " + std::to_string(n) + " bytes");
  std::memcpy(out.data(), &regs_, sizeof(Regs));
  // Filler that changes with the state, like real device registers would.
  for (size_t o = sizeof(Regs); o + 8 <= n; o += 8) Store(out.data() + o, Mix(regs_.step ^ o));
  return n;
}

Status SimulatedGuest::LoadDeviceState(std::span<const uint8_t> state) {
  if (fail_next_load_.exchange(false)) return Status::IoError("injected device-state load failure");
  Regs r;
  if (state.size() < sizeof(Regs)) return Status::InvalidArgument("device state is too short");
  std::memcpy(&r, state.data(), sizeof(Regs));
  if (r.magic != kRegsMagic)
    return Status::InvalidArgument("device state is not a simulated guest's");
  for (size_t o = sizeof(Regs); o + 8 <= state.size(); o += 8) {
    if (Load(state.data() + o) != Mix(r.step ^ o)) {
      return Status::Corruption("device state filler does not match its step");
    }
  }
  regs_ = r;
  steps_.store(r.step);
  return Status::Ok();
}

void SimulatedGuest::Emit() {
  bool held = false;
  {
    std::lock_guard<std::mutex> lock(out_mu_);
    Packet p{regs_.step, Load(ram_[0].data() + 16),
             mode_ == OutputMode::kBuffered ? open_epoch_ : 0};
    switch (mode_) {
      case OutputMode::kPassThrough:
        emitted_.push_back(p);
        if (emit_hook_) emit_hook_(p);
        break;
      case OutputMode::kBuffered:
        held_.push_back(p);
        held = true;
        break;
      case OutputMode::kDropped:
        ++dropped_;
        break;
    }
  }
  if (held && held_hook_) held_hook_();
}

void SimulatedGuest::CloseOutputBarrier(uint64_t epoch) {
  {
    std::lock_guard<std::mutex> lock(out_mu_);
    open_epoch_ = epoch + 1;
  }
  if (barrier_hook_) barrier_hook_(epoch, ImageHash());
}

void SimulatedGuest::ReleaseOutput(uint64_t epoch) {
  std::lock_guard<std::mutex> lock(out_mu_);
  while (!held_.empty() && held_.front().epoch <= epoch) {
    held_.front().released_by_ack_of = epoch;
    emitted_.push_back(held_.front());
    if (emit_hook_) emit_hook_(held_.front());
    held_.pop_front();
  }
}

void SimulatedGuest::SetOutputMode(OutputMode mode) {
  std::lock_guard<std::mutex> lock(out_mu_);
  mode_ = mode;
  if (mode == OutputMode::kPassThrough) {
    for (const auto& p : held_) {
      emitted_.push_back(p);
      if (emit_hook_) emit_hook_(p);
    }
    held_.clear();
  } else if (mode == OutputMode::kDropped) {
    dropped_ += held_.size();
    held_.clear();
  }
}

Status SimulatedGuest::Announce() {
  announcements_.fetch_add(1);
  return Status::Ok();
}

bool SimulatedGuest::CheckInvariant(std::string* why) const {
  const uint8_t* ledger = ram_[0].data();
  if (Load(ledger) != kLedgerMagic) {
    *why = "ledger page has no magic";
    return false;
  }
  if (Load(ledger + 8) != regs_.step) {
    *why = "ledger step " + std::to_string(Load(ledger + 8)) + " != register step " +
           std::to_string(regs_.step) + " (RAM and device state from different epochs)";
    return false;
  }
  uint64_t x = 0;
  for (uint32_t b = 0; b < ram_.size(); ++b) {
    uint64_t pages = ram_[b].size() / kPage;
    for (uint64_t p = (b == 0 ? 1 : 0); p < pages; ++p) x ^= Load(ram_[b].data() + p * kPage);
  }
  if (x != Load(ledger + 16)) {
    *why = "XOR of page stamps disagrees with the ledger (pages from different epochs)";
    return false;
  }
  return true;
}

uint32_t SimulatedGuest::RamHash() const {
  uint32_t crc = 0;
  for (const auto& r : ram_) crc = Crc32cExtend(crc, r.data(), r.size());
  return crc;
}

uint64_t SimulatedGuest::ImageHash() const {
  uint32_t crc = Crc32cExtend(RamHash(), &regs_, sizeof(regs_));
  return (regs_.step << 32) ^ crc;
}

void SimulatedGuest::SetBarrierHook(std::function<void(uint64_t, uint64_t)> hook) {
  barrier_hook_ = std::move(hook);
}

void SimulatedGuest::SetEmitHook(std::function<void(const Packet&)> hook) {
  std::lock_guard<std::mutex> lock(out_mu_);
  emit_hook_ = std::move(hook);
}

std::vector<Packet> SimulatedGuest::emitted() const {
  std::lock_guard<std::mutex> lock(out_mu_);
  return emitted_;
}

size_t SimulatedGuest::held_packets() const {
  std::lock_guard<std::mutex> lock(out_mu_);
  return held_.size();
}

uint64_t SimulatedGuest::dropped_packets() const {
  std::lock_guard<std::mutex> lock(out_mu_);
  return dropped_;
}

OutputMode SimulatedGuest::output_mode() const {
  std::lock_guard<std::mutex> lock(out_mu_);
  return mode_;
}

}  // namespace lockstep::testing
