#include "lockstep/pairing_auth.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <sys/stat.h>

#include <cctype>
#include <fstream>
#include <sstream>
#include <vector>

namespace lockstep {
namespace {

void PutStr(std::vector<uint8_t>& out, const void* p, size_t n) {
  out.push_back(static_cast<uint8_t>(n));
  out.push_back(static_cast<uint8_t>(n >> 8));
  auto* b = static_cast<const uint8_t*>(p);
  out.insert(out.end(), b, b + n);
}

}  // namespace

Result<wire::Nonce> FreshNonce() {
  wire::Nonce n{};
  if (RAND_bytes(n.data(), static_cast<int>(n.size())) != 1) {
    return Status::IoError("the random generator (OpenSSL RAND_bytes) failed");
  }
  return n;
}

Digest HelloDigest(std::span<const uint8_t> payload) {
  Digest d{};
  unsigned int len = 0;
  EVP_Digest(payload.data(), payload.size(), d.data(), &len, EVP_sha256(), nullptr);
  return d;
}

Result<wire::Proof> ComputeProof(const std::array<uint8_t, 32>& key, ProofRole role,
                                 const ProofContext& c) {
  std::vector<uint8_t> msg;
  const std::string label =
      role == ProofRole::kPrimary ? "lockstep-v2-primary" : "lockstep-v2-secondary";
  msg.insert(msg.end(), label.begin(), label.end());
  msg.insert(msg.end(), c.hello_digest.begin(), c.hello_digest.end());
  PutStr(msg, c.secondary_host.data(), c.secondary_host.size());
  msg.insert(msg.end(), c.secondary_nonce.begin(), c.secondary_nonce.end());
  if (role == ProofRole::kPrimary)
    msg.insert(msg.end(), c.secondary_proof.begin(), c.secondary_proof.end());
  wire::Proof out{};
  unsigned int len = 0;
  if (HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), msg.data(), msg.size(),
           out.data(), &len) == nullptr ||
      len != out.size()) {
    return Status::IoError("computing the pairing-key proof failed (OpenSSL HMAC)");
  }
  return out;
}

Result<std::array<uint8_t, 32>> LoadPairingKey(const std::string& path) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) {
    return Status::FromErrno("the pairing key file " + path, errno);
  }
  if ((st.st_mode & 077) != 0) {
    return Status::FailedPrecondition("the pairing key file " + path +
                                      " can be read by other users; chmod 600 it");
  }
  std::ifstream in(path);
  if (!in) {
    return Status::FromErrno("the pairing key file " + path +
                                 " cannot be read by this process (the user it runs as must "
                                 "be able to read it)",
                             errno);
  }
  std::stringstream text;
  text << in.rdbuf();
  std::string hex;
  for (char ch : text.str())
    if (!std::isspace(static_cast<unsigned char>(ch))) hex += ch;
  std::array<uint8_t, 32> key{};
  size_t len = 0;
  const bool ok = hex.size() == 64 &&
                  OPENSSL_hexstr2buf_ex(key.data(), key.size(), &len, hex.c_str(), '\0') == 1 &&
                  len == key.size();
  if (!ok) {
    return Status::InvalidArgument(
        "the pairing key file " + path +
        " does not hold 64 hex digits (a 32-byte key); make one with `openssl rand -hex 32 > " +
        path + " && chmod 600 " + path + "` and copy it to both hosts");
  }
  return key;
}

bool ProofMatches(const wire::Proof& received, const wire::Proof& expected) {
  return CRYPTO_memcmp(received.data(), expected.data(), received.size()) == 0;
}

}  // namespace lockstep
