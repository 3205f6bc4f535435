#include "admin/peer_link.h"

#include <openssl/crypto.h>

#include <cctype>
#include <vector>

#include "lockstep/pairing_auth.h"
#include "lockstep/sealed_channel.h"
#include "replication_channel/tcp.h"

namespace lockstep::admin {

namespace {

constexpr size_t kMaxPeerMessage = 4 << 20;  // a VM definition, a status: far below

Status Refused(const std::string& why) { return Status::PeerRejected(why); }

// Wraps `link` for sealing once the handshake is done (allocated before it begins).
Result<std::unique_ptr<SealedChannel>> Wrap(std::unique_ptr<channel::Channel> link) {
  return SealedChannel::Create(std::move(link), wire::LinkProtection::kEncrypt, kMaxPeerMessage);
}

Digest DigestOf(const std::string& message) {
  return HelloDigest({reinterpret_cast<const uint8_t*>(message.data()), message.size()});
}

}  // namespace

std::string ToHex(const uint8_t* data, size_t n) {
  std::vector<char> text(2 * n + 1);
  size_t len = 0;
  if (n == 0 || OPENSSL_buf2hexstr_ex(text.data(), text.size(), &len, data, n, '\0') != 1) {
    return "";
  }
  std::string hex(text.data());
  for (char& c : hex) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return hex;
}

Status FromHex(const std::string& hex, uint8_t* out, size_t n) {
  size_t len = 0;
  if (hex.size() != 2 * n || OPENSSL_hexstr2buf_ex(out, n, &len, hex.c_str(), '\0') != 1 ||
      len != n) {
    return Status::InvalidArgument("expected " + std::to_string(2 * n) + " hex digits, not '" +
                                   hex.substr(0, 80) + "'");
  }
  return Status::Ok();
}

Status SendJson(channel::Channel& ch, const Json& message) {
  const std::string text = message.dump();
  channel::ConstSlice slice{text.data(), text.size()};
  return ch.Send({&slice, 1});
}

Result<Json> ReceiveJson(channel::Channel& ch, std::chrono::milliseconds timeout) {
  std::vector<uint8_t> buf(kMaxPeerMessage + 64);
  size_t n = 0;
  LOCKSTEP_RETURN_IF_ERROR(ch.Receive(buf, &n, timeout));
  Json j = Json::parse(buf.begin(), buf.begin() + static_cast<long>(n), nullptr, false);
  if (!j.is_object()) return Status::Corruption("the peer sent something that is not JSON");
  return j;
}

Result<std::unique_ptr<channel::Channel>> ConnectPeer(const std::string& my_host,
                                                      const Pairing& pairing,
                                                      std::chrono::milliseconds timeout) {
  const std::string& peer = pairing.peer_host;
  auto tcp = channel::MakeTcpTransport();
  auto link = tcp->Connect(pairing.peer_address, timeout);
  if (!link.ok()) {
    return link.status().WithContext("reaching " + peer + "'s lockstepd at " +
                                     pairing.peer_address +
                                     " (is it running, with --peer-listen?)");
  }
  auto sealed = Wrap(std::move(*link));
  if (!sealed.ok()) return sealed.status();
  auto ch = std::move(*sealed);
  auto nonce = FreshNonce();
  if (!nonce.ok()) return nonce.status();
  const std::string hello = Json{{"peer_api", kPeerApi},
                                 {"protocol", "lockstep-peer"},
                                 {"host", my_host},
                                 {"pairing_id", ToHex(pairing.pairing_id.data(), 16)},
                                 {"nonce", ToHex(nonce->data(), nonce->size())}}
                                .dump();
  channel::ConstSlice slice{hello.data(), hello.size()};
  LOCKSTEP_RETURN_IF_ERROR(ch->Send({&slice, 1}));
  auto reply = ReceiveJson(*ch, timeout);
  if (!reply.ok()) return reply.status().WithContext("waiting for " + peer + "'s answer");
  if (!reply->value("ok", false)) {
    return Refused(peer + " refused this host: " + reply->value("error", std::string("no reason")));
  }
  auto their_nonce = FromHex<32>(reply->value("nonce", std::string()));
  auto their_proof = FromHex<32>(reply->value("proof", std::string()));
  if (!their_nonce.ok() || !their_proof.ok()) {
    return Status::Corruption(peer + " answered the handshake without a nonce or proof");
  }
  ProofContext proof;
  proof.hello_digest = DigestOf(hello);
  proof.secondary_host = reply->value("host", std::string());
  proof.secondary_nonce = *their_nonce;
  proof.secondary_proof = *their_proof;
  auto expected = ComputeProof(pairing.key, ProofRole::kSecondary, proof);
  if (!expected.ok()) return expected.status();
  if (proof.secondary_host != peer || !ProofMatches(*their_proof, *expected)) {
    (void)SendJson(*ch, {{"error", my_host + " refused: your proof of the pairing key is wrong "
                                             "(the hosts hold different keys: pair them again)"}});
    return Refused(peer + " did not prove it holds this host's pairing key (or is not " + peer +
                   "): the hosts hold different keys; pair them again (lockstepctl pair)");
  }
  auto mine = ComputeProof(pairing.key, ProofRole::kPrimary, proof);
  if (!mine.ok()) return mine.status();
  LOCKSTEP_RETURN_IF_ERROR(SendJson(*ch, {{"proof", ToHex(mine->data(), mine->size())}}));
  auto keys = DeriveLinkKeys(pairing.key, *nonce, *their_nonce);
  if (!keys.ok()) return keys.status();
  LOCKSTEP_RETURN_IF_ERROR(ch->Seal(*keys, /*primary=*/true));
  return std::unique_ptr<channel::Channel>(std::move(ch));
}

Result<std::unique_ptr<channel::Channel>> AcceptPeer(std::unique_ptr<channel::Channel> link,
                                                     const std::string& my_host,
                                                     const std::vector<Pairing>& pairings,
                                                     std::chrono::milliseconds timeout,
                                                     std::string* client_host) {
  auto sealed = Wrap(std::move(link));
  if (!sealed.ok()) return sealed.status();
  auto ch = std::move(*sealed);
  std::vector<uint8_t> buf(64 << 10);
  size_t n = 0;
  LOCKSTEP_RETURN_IF_ERROR(ch->Receive(buf, &n, timeout));
  const std::string hello(buf.begin(), buf.begin() + static_cast<long>(n));
  Json h = Json::parse(hello, nullptr, false);
  auto refuse = [&](const std::string& why) -> Status {
    (void)SendJson(*ch, {{"ok", false}, {"error", why}});
    return Refused(why);
  };
  if (!h.is_object() || h.value("protocol", std::string()) != "lockstep-peer") {
    return Status::Corruption("a connection that is not a lockstep peer");
  }
  const std::string client = h.value("host", std::string());
  if (h.value("peer_api", 0) != kPeerApi) {
    return refuse(my_host + " speaks peer API " + std::to_string(kPeerApi) +
                  "; upgrade both hosts to the same release");
  }
  if (pairings.empty()) return refuse(my_host + " is not paired with any host (lockstepctl pair)");
  const Pairing* pairing = nullptr;
  for (const Pairing& p : pairings) {
    if (p.peer_host == client) pairing = &p;
  }
  if (pairing == nullptr ||
      h.value("pairing_id", std::string()) != ToHex(pairing->pairing_id.data(), 16)) {
    return refuse(my_host + " is paired with " + pairings.front().peer_host + ", not with " +
                  client + " under this pairing; pair them again");
  }
  auto their_nonce = FromHex<32>(h.value("nonce", std::string()));
  if (!their_nonce.ok()) return refuse("the HELLO has no nonce");
  auto nonce = FreshNonce();
  if (!nonce.ok()) return nonce.status();
  ProofContext proof;
  proof.hello_digest = DigestOf(hello);
  proof.secondary_host = my_host;
  proof.secondary_nonce = *nonce;
  auto mine = ComputeProof(pairing->key, ProofRole::kSecondary, proof);
  if (!mine.ok()) return mine.status();
  proof.secondary_proof = *mine;
  LOCKSTEP_RETURN_IF_ERROR(SendJson(*ch, {{"ok", true},
                                          {"host", my_host},
                                          {"nonce", ToHex(nonce->data(), nonce->size())},
                                          {"proof", ToHex(mine->data(), mine->size())}}));
  auto answer = ReceiveJson(*ch, timeout);
  if (!answer.ok()) return answer.status().WithContext("waiting for " + client + "'s proof");
  if (answer->contains("error")) {
    return Refused(client + " refused this host: " + answer->value("error", std::string()));
  }
  auto their_proof = FromHex<32>(answer->value("proof", std::string()));
  auto expected = ComputeProof(pairing->key, ProofRole::kPrimary, proof);
  if (!expected.ok()) return expected.status();
  if (!their_proof.ok() || !ProofMatches(*their_proof, *expected)) {
    return Refused(client +
                   " did not prove it holds this host's pairing key: the hosts hold different "
                   "keys; pair them again (lockstepctl pair)");
  }
  auto keys = DeriveLinkKeys(pairing->key, *their_nonce, *nonce);
  if (!keys.ok()) return keys.status();
  LOCKSTEP_RETURN_IF_ERROR(ch->Seal(*keys, /*primary=*/false));
  if (client_host != nullptr) *client_host = client;
  return std::unique_ptr<channel::Channel>(std::move(ch));
}

}  // namespace lockstep::admin
