#include "lockstep/sealed_channel.h"

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <optional>
#include <string_view>

namespace lockstep {

namespace {

constexpr size_t kIvBytes = 12;

// The GCM nonce of message number `n`: 4 zero bytes, then n as u64 LE (wire_format.h).
std::array<uint8_t, kIvBytes> Iv(uint64_t n) {
  std::array<uint8_t, kIvBytes> iv{};
  for (int i = 0; i < 8; ++i) iv[4 + i] = static_cast<uint8_t>(n >> (8 * i));
  return iv;
}

Status OpenSslFailed(std::string_view what) {
  return Status::IoError("link protection: OpenSSL failed " + std::string(what));
}

Status Hkdf(const std::array<uint8_t, 32>& key, std::span<const uint8_t> salt,
            std::string_view info, std::array<uint8_t, 32>* out) {
  EVP_KDF* kdf = EVP_KDF_fetch(nullptr, "HKDF", nullptr);
  if (kdf == nullptr) return OpenSslFailed("to provide HKDF");
  EVP_KDF_CTX* ctx = EVP_KDF_CTX_new(kdf);
  EVP_KDF_free(kdf);
  if (ctx == nullptr) return OpenSslFailed("to make an HKDF context");
  char digest[] = "SHA256";
  OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, digest, 0),
                         OSSL_PARAM_construct_octet_string(
                             OSSL_KDF_PARAM_KEY, const_cast<uint8_t*>(key.data()), key.size()),
                         OSSL_PARAM_construct_octet_string(
                             OSSL_KDF_PARAM_SALT, const_cast<uint8_t*>(salt.data()), salt.size()),
                         OSSL_PARAM_construct_octet_string(
                             OSSL_KDF_PARAM_INFO, const_cast<char*>(info.data()), info.size()),
                         OSSL_PARAM_construct_end()};
  const bool ok = EVP_KDF_derive(ctx, out->data(), out->size(), params) == 1;
  EVP_KDF_CTX_free(ctx);
  return ok ? Status::Ok() : OpenSslFailed("to derive a link key (HKDF)");
}

}  // namespace

Result<LinkKeys> DeriveLinkKeys(const std::array<uint8_t, 32>& pairing_key,
                                const wire::Nonce& primary_nonce,
                                const wire::Nonce& secondary_nonce) {
  std::array<uint8_t, 2 * wire::kNonceBytes> salt;
  std::memcpy(salt.data(), primary_nonce.data(), wire::kNonceBytes);
  std::memcpy(salt.data() + wire::kNonceBytes, secondary_nonce.data(), wire::kNonceBytes);
  LinkKeys keys;
  LOCKSTEP_RETURN_IF_ERROR(
      Hkdf(pairing_key, salt, "lockstep-v3 link primary->secondary", &keys.primary_to_secondary));
  LOCKSTEP_RETURN_IF_ERROR(
      Hkdf(pairing_key, salt, "lockstep-v3 link secondary->primary", &keys.secondary_to_primary));
  return keys;
}

// One direction: an AES-256-GCM context keyed once, and the number of the next message.
struct SealedChannel::Cipher {
  EVP_CIPHER_CTX* ctx = nullptr;
  uint64_t next = 0;
  ~Cipher() { EVP_CIPHER_CTX_free(ctx); }

  static Result<std::unique_ptr<Cipher>> Make(const std::array<uint8_t, 32>& key, bool encrypt) {
    auto c = std::make_unique<Cipher>();
    c->ctx = EVP_CIPHER_CTX_new();
    if (c->ctx == nullptr || EVP_CipherInit_ex(c->ctx, EVP_aes_256_gcm(), nullptr, key.data(),
                                               nullptr, encrypt ? 1 : 0) != 1) {
      return OpenSslFailed("to set up AES-256-GCM");
    }
    return c;
  }

  // Starts the next message (its nonce). No allocation.
  bool Begin() {
    auto iv = Iv(next++);
    return EVP_CipherInit_ex(ctx, nullptr, nullptr, nullptr, iv.data(), -1) == 1;
  }
};

Result<std::unique_ptr<SealedChannel>> SealedChannel::Create(
    std::unique_ptr<channel::Channel> inner, wire::LinkProtection protection,
    size_t max_send_bytes) {
  std::unique_ptr<SealedChannel> c(new SealedChannel(std::move(inner), protection));
  if (protection == wire::LinkProtection::kEncrypt) {
    try {
      c->sealed_buffer_.resize(max_send_bytes + wire::kLinkTagBytes);
    } catch (const std::bad_alloc&) {
      return Status::ResourceExhausted("cannot allocate the encryption buffer (" +
                                       std::to_string(max_send_bytes >> 20) + " MiB)");
    }
    LOCKSTEP_RETURN_IF_ERROR(
        c->inner_->RegisterMemory(c->sealed_buffer_.data(), c->sealed_buffer_.size()));
  } else if (protection == wire::LinkProtection::kMac) {
    c->with_tag_.resize(channel::kMaxGatherSlices);
  }
  return c;
}

SealedChannel::SealedChannel(std::unique_ptr<channel::Channel> inner,
                             wire::LinkProtection protection)
    : inner_(std::move(inner)), protection_(protection) {}

SealedChannel::~SealedChannel() = default;

Status SealedChannel::Seal(const LinkKeys& keys, bool primary) {
  if (protection_ == wire::LinkProtection::kNone) return Status::Ok();
  auto send = Cipher::Make(primary ? keys.primary_to_secondary : keys.secondary_to_primary, true);
  if (!send.ok()) return send.status();
  auto receive =
      Cipher::Make(primary ? keys.secondary_to_primary : keys.primary_to_secondary, false);
  if (!receive.ok()) return receive.status();
  std::lock_guard<PriorityInheritanceMutex> lock(send_mu_);
  send_ = std::move(*send);
  receive_ = std::move(*receive);
  sealed_ = true;
  return Status::Ok();
}

Status SealedChannel::RegisterMemory(const void* base, size_t len) {
  // Encrypted, the transport only ever sends from our buffer, registered at Create().
  if (protection_ == wire::LinkProtection::kEncrypt) return Status::Ok();
  return inner_->RegisterMemory(base, len);
}

Status SealedChannel::Send(std::span<const channel::ConstSlice> gather, uint64_t* seq) {
  if (!sealed_) return inner_->Send(gather, seq);
  std::lock_guard<PriorityInheritanceMutex> lock(send_mu_);
  EVP_CIPHER_CTX* ctx = send_->ctx;
  int n = 0;
  if (protection_ == wire::LinkProtection::kMac) {
    if (gather.size() + 1 > with_tag_.size()) {
      return Status::InvalidArgument("a message of more than " +
                                     std::to_string(with_tag_.size() - 1) + " slices");
    }
    if (!send_->Begin()) return OpenSslFailed("to start a message");
    for (size_t i = 0; i < gather.size(); ++i) {
      // Associated data only: authenticated, not encrypted.
      if (EVP_EncryptUpdate(ctx, nullptr, &n, static_cast<const uint8_t*>(gather[i].data),
                            static_cast<int>(gather[i].size)) != 1) {
        return OpenSslFailed("authenticating a message");
      }
      with_tag_[i] = gather[i];
    }
    if (EVP_EncryptFinal_ex(ctx, nullptr, &n) != 1 ||
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, static_cast<int>(tag_.size()),
                            tag_.data()) != 1) {
      return OpenSslFailed("authenticating a message");
    }
    with_tag_[gather.size()] = {tag_.data(), tag_.size()};
    uint64_t sent = 0;
    LOCKSTEP_RETURN_IF_ERROR(inner_->Send({with_tag_.data(), gather.size() + 1}, &sent));
    // The tag slice is ours and reused by the next message.
    LOCKSTEP_RETURN_IF_ERROR(inner_->WaitForCompletion(sent, std::chrono::seconds(30)));
    if (seq != nullptr) *seq = sent;
    return Status::Ok();
  }
  size_t total = 0;
  for (const auto& g : gather) total += g.size;
  if (total + wire::kLinkTagBytes > sealed_buffer_.size()) {
    return Status::InvalidArgument(
        "a message of " + std::to_string(total) + " bytes is larger than this side's largest (" +
        std::to_string(sealed_buffer_.size() - wire::kLinkTagBytes) + ")");
  }
  if (!send_->Begin()) return OpenSslFailed("to start a message");
  uint8_t* out = sealed_buffer_.data();
  for (const auto& g : gather) {
    if (EVP_EncryptUpdate(ctx, out, &n, static_cast<const uint8_t*>(g.data),
                          static_cast<int>(g.size)) != 1) {
      return OpenSslFailed("encrypting a message");
    }
    out += n;
  }
  if (EVP_EncryptFinal_ex(ctx, out, &n) != 1) return OpenSslFailed("encrypting a message");
  out += n;
  if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, wire::kLinkTagBytes, out) != 1) {
    return OpenSslFailed("encrypting a message");
  }
  out += wire::kLinkTagBytes;
  channel::ConstSlice one{sealed_buffer_.data(), static_cast<size_t>(out - sealed_buffer_.data())};
  uint64_t sent = 0;
  LOCKSTEP_RETURN_IF_ERROR(inner_->Send({&one, 1}, &sent));
  // The caller's buffers were copied; ours is reused by the next message.
  LOCKSTEP_RETURN_IF_ERROR(inner_->WaitForCompletion(sent, std::chrono::seconds(30)));
  if (seq != nullptr) *seq = sent;
  return Status::Ok();
}

uint64_t SealedChannel::CompletedThrough() const { return inner_->CompletedThrough(); }

Status SealedChannel::WaitForCompletion(uint64_t seq, std::chrono::microseconds timeout) {
  return inner_->WaitForCompletion(seq, timeout);
}

Status SealedChannel::Receive(std::span<uint8_t> into, size_t* size,
                              std::chrono::microseconds timeout) {
  if (!broken_.ok()) return broken_;
  size_t n = 0;
  LOCKSTEP_RETURN_IF_ERROR(inner_->Receive(into, &n, timeout));
  if (!sealed_) {
    *size = n;
    return Status::Ok();
  }
  auto refuse = [&](std::string why) {
    broken_ = Status::Corruption("a message from " + inner_->peer() + " " + why);
    return broken_;
  };
  // The first message after the handshake may be the peer's refusal of it, sent before the
  // peer sealed anything (an ERROR: it did not accept our AUTH). Kept to be told as such.
  std::vector<uint8_t> first;
  if (receive_->next == 0) first.assign(into.data(), into.data() + std::min<size_t>(n, 1 << 17));
  auto refused_handshake = [&]() -> std::optional<std::string> {
    if (first.empty()) return std::nullopt;
    wire::RecordReader reader(first);
    wire::RecordView r;
    if (!reader.Next(&r).ok() || r.header.type != wire::RecordType::kError) return std::nullopt;
    return wire::DecodeReason(r);
  };
  if (n < wire::kLinkTagBytes) {
    if (auto reason = refused_handshake()) {
      return broken_ = Status::PeerRejected(inner_->peer() + " ended the handshake: " + *reason);
    }
    return refuse("is shorter than its authentication tag");
  }
  const size_t body = n - wire::kLinkTagBytes;
  EVP_CIPHER_CTX* ctx = receive_->ctx;
  int out = 0;
  const bool decrypt = protection_ == wire::LinkProtection::kEncrypt;
  if (!receive_->Begin() ||
      EVP_DecryptUpdate(ctx, decrypt ? into.data() : nullptr, &out, into.data(),
                        static_cast<int>(body)) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, wire::kLinkTagBytes, into.data() + body) !=
          1) {
    return refuse("could not be checked (OpenSSL failed)");
  }
  if (EVP_DecryptFinal_ex(ctx, decrypt ? into.data() + out : nullptr, &out) != 1) {
    if (auto reason = refused_handshake()) {
      return broken_ = Status::PeerRejected(inner_->peer() + " ended the handshake: " + *reason);
    }
    return refuse(
        "failed authentication (AES-GCM tag): changed, replayed or dropped on the way, or not "
        "sealed with this pairing key");
  }
  *size = body;
  return Status::Ok();
}

}  // namespace lockstep
