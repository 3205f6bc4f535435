#include "vip_manager/etcd_witness.h"

#include <openssl/evp.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <charconv>
#include <exception>
#include <nlohmann/json.hpp>
#include <optional>
#include <stdexcept>
#include <utility>

namespace lockstep::vip {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using nlohmann::json;

constexpr size_t kMaxName = 255;
constexpr int kRegisterAttempts = 5;
constexpr uint64_t kMaxReplyBytes = 64 * 1024;  // ours are a few hundred bytes

// As the embedded witness's wire format: 1..255 bytes, no whitespace or control byte.
Status CheckNames(std::string_view vm, std::string_view host) {
  for (std::string_view name : {vm, host}) {
    bool ok = !name.empty() && name.size() <= kMaxName;
    for (char c : name) ok = ok && static_cast<unsigned char>(c) > ' ';
    if (!ok) {
      return Status::InvalidArgument(
          "VM and host names for the witness: 1..255 bytes, no whitespace or control "
          "character");
    }
  }
  return Status::Ok();
}

// ---- base64 (etcd's JSON gateway carries keys and values so) ----
std::string ToBase64(std::string_view bytes) {
  std::string text(4 * ((bytes.size() + 2) / 3) + 1, '\0');  // + the NUL OpenSSL writes
  int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(text.data()),
                          reinterpret_cast<const unsigned char*>(bytes.data()),
                          static_cast<int>(bytes.size()));
  text.resize(static_cast<size_t>(n));
  return text;
}

std::optional<std::string> FromBase64(std::string_view text) {
  if (text.size() % 4 != 0) return std::nullopt;
  std::string bytes(text.size() / 4 * 3 + 1, '\0');
  int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(bytes.data()),
                          reinterpret_cast<const unsigned char*>(text.data()),
                          static_cast<int>(text.size()));
  if (n < 0) return std::nullopt;
  // EVP_DecodeBlock counts the bytes the padding stands for, as zeros.
  size_t padding = text.ends_with("==") ? 2 : text.ends_with("=") ? 1 : 0;
  bytes.resize(static_cast<size_t>(n) - padding);
  return bytes;
}

std::optional<uint64_t> ParseTerm(std::string_view text) {
  uint64_t term = 0;
  auto [end, err] = std::from_chars(text.data(), text.data() + text.size(), term);
  if (text.empty() || err != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return term;
}

// At most 60 printable bytes of what a peer sent, for an error message.
std::string Excerpt(std::string_view bytes) {
  std::string out;
  for (char c : bytes.substr(0, 60)) out += (c >= ' ' && c < 127) ? c : '?';
  return "'" + out + (bytes.size() > 60 ? "...'" : "'");
}

std::string NotEtcd(const std::string& endpoint, std::string_view what) {
  return endpoint + " did not answer like etcd's v3 JSON API (" + std::string(what) +
         "): is it the client URL of an etcd member?";
}

// ---- one HTTP exchange with one endpoint ----
struct HttpReply {
  unsigned status = 0;
  std::string body;
};

// Runs one asynchronous operation to completion on `ioc`, in this thread. Asynchronous
// because beast::tcp_stream's deadline (expires_after) applies to asynchronous operations
// only; to the caller the call is synchronous.
template <typename Start>
beast::error_code RunStep(asio::io_context& ioc, Start&& start) {
  beast::error_code result;
  ioc.restart();
  start([&result](beast::error_code ec, auto&&...) { result = ec; });
  ioc.run();
  return result;
}

Status StepFailed(const std::string& endpoint, std::string_view step, const beast::error_code& ec,
                  std::chrono::milliseconds timeout) {
  std::string at = "etcd at " + endpoint;
  if (ec == beast::error::timeout) {
    return Status::TimedOut(at + ": " + std::string(step) + ": nothing within " +
                            std::to_string(timeout.count()) + " ms");
  }
  if (ec == http::error::end_of_stream || ec == asio::error::eof) {
    return Status::PeerLost(at + " closed the connection while " + std::string(step));
  }
  if (ec.category() == boost::system::system_category()) {
    return Status::IoError(at + ": " + std::string(step) + ": " + ec.message());
  }
  return Status::Corruption(NotEtcd(endpoint, "HTTP: " + ec.message()));
}

// Posts `body` (JSON) to `target` on `endpoint` ("HOST:PORT" or "[ADDR]:PORT"), everything
// within `timeout`.
Result<HttpReply> Post(const std::string& endpoint, const std::string& target,
                       const std::string& body, std::chrono::milliseconds timeout) {
  size_t colon = endpoint.rfind(':');
  std::string host = colon == std::string::npos ? "" : endpoint.substr(0, colon);
  std::string port = colon == std::string::npos ? "" : endpoint.substr(colon + 1);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  std::optional<uint64_t> port_number = ParseTerm(port);
  if (host.empty() || !port_number || *port_number == 0 || *port_number > 65535) {
    return Status::InvalidArgument("etcd endpoint '" + endpoint + "' is not HOST:PORT");
  }
  try {
    asio::io_context ioc;
    std::vector<tcp::endpoint> addresses;
    beast::error_code ec;
    asio::ip::address address = asio::ip::make_address(host, ec);
    if (!ec) {
      addresses.emplace_back(address, static_cast<unsigned short>(*port_number));
    } else {
      tcp::resolver resolver(ioc);
      auto found = resolver.resolve(host, port, tcp::resolver::numeric_service, ec);
      if (ec) return Status::IoError("etcd at " + endpoint + ": resolving: " + ec.message());
      for (const auto& entry : found) addresses.push_back(entry.endpoint());
    }
    beast::tcp_stream stream(ioc);
    stream.expires_after(timeout);  // one deadline for the whole exchange
    ec = RunStep(ioc, [&](auto done) { stream.async_connect(addresses, std::move(done)); });
    if (ec) return StepFailed(endpoint, "connecting", ec, timeout);

    http::request<http::string_body> request(http::verb::post, target, 11);
    request.set(http::field::host, endpoint);
    request.set(http::field::content_type, "application/json");
    request.keep_alive(false);
    request.body() = body;
    request.prepare_payload();
    ec = RunStep(ioc, [&](auto done) { http::async_write(stream, request, std::move(done)); });
    if (ec) return StepFailed(endpoint, "sending the request", ec, timeout);

    beast::flat_buffer buffer;
    http::response_parser<http::string_body> parser;
    parser.body_limit(kMaxReplyBytes);
    ec =
        RunStep(ioc, [&](auto done) { http::async_read(stream, buffer, parser, std::move(done)); });
    if (ec) return StepFailed(endpoint, "waiting for the answer", ec, timeout);
    beast::error_code ignored;
    stream.socket().shutdown(tcp::socket::shutdown_both, ignored);
    return HttpReply{parser.get().result_int(), std::move(parser.get().body())};
  } catch (const std::exception& e) {  // Asio and Beast report through ec; this is a backstop
    return Status::IoError("etcd at " + endpoint + ": " + e.what());
  }
}

// ---- etcd's answers ----
// A reply not shaped like etcd's; thrown by the parsers below, caught in Interpret.
struct NotEtcdShape : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// An int64 field: the gateway writes them as strings and leaves out zeros.
int64_t Int64Field(const json& object, const char* name) {
  auto it = object.find(name);
  if (it == object.end()) return 0;
  if (it->is_number_integer()) return it->get<int64_t>();
  std::string text = it->is_string() ? it->get<std::string>() : "";
  int64_t v = 0;
  auto [end, err] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (text.empty() || err != std::errc() || end != text.data() + text.size()) {
    throw NotEtcdShape(std::string("'") + name + "' is not an integer");
  }
  return v;
}

struct KeyValue {
  std::string value;
  int64_t mod_revision = 0;
};

// The first key of a range response; none when the key does not exist (no "kvs").
std::optional<KeyValue> FirstKeyValue(const json& range) {
  if (!range.is_object()) throw NotEtcdShape("a range response is not an object");
  auto kvs = range.find("kvs");
  if (kvs == range.end()) return std::nullopt;
  if (!kvs->is_array()) throw NotEtcdShape("'kvs' is not an array");
  if (kvs->empty()) return std::nullopt;
  const json& kv = kvs->front();
  if (!kv.is_object()) throw NotEtcdShape("an element of 'kvs' is not an object");
  KeyValue out;
  auto value = kv.find("value");  // left out when empty
  if (value != kv.end()) {
    std::optional<std::string> bytes =
        value->is_string() ? FromBase64(value->get<std::string>()) : std::nullopt;
    if (!bytes) throw NotEtcdShape("a value is not base64");
    out.value = std::move(*bytes);
  }
  out.mod_revision = Int64Field(kv, "mod_revision");
  return out;
}

struct TxnReply {
  bool succeeded = false;
  std::vector<std::optional<KeyValue>> ranges;  // one per range request of the branch taken
};

TxnReply ParseTxn(const json& reply) {
  TxnReply out;
  auto succeeded = reply.find("succeeded");  // left out when false
  if (succeeded != reply.end()) {
    if (!succeeded->is_boolean()) throw NotEtcdShape("'succeeded' is not a boolean");
    out.succeeded = succeeded->get<bool>();
  }
  auto responses = reply.find("responses");
  if (responses == reply.end()) return out;
  if (!responses->is_array()) throw NotEtcdShape("'responses' is not an array");
  for (const json& r : *responses) {
    if (!r.is_object()) throw NotEtcdShape("an element of 'responses' is not an object");
    auto range = r.find("response_range");
    if (range != r.end()) out.ranges.push_back(FirstKeyValue(*range));
  }
  return out;
}

// What an HTTP reply from `endpoint` means: `parse`'s value if it is a proper answer of
// etcd's JSON gateway, else an error that says what came instead.
template <typename Parse>
auto Interpret(const std::string& endpoint, const HttpReply& reply, const Parse& parse)
    -> Result<decltype(parse(json()))> {
  json doc = json::parse(reply.body, nullptr, /*allow_exceptions=*/false);
  if (reply.status != 200) {
    auto error = doc.is_object() ? doc.find("error") : doc.end();
    if (doc.is_object() && error != doc.end() && error->is_string()) {
      return Status::PeerRejected("etcd at " + endpoint + " refused the request (HTTP " +
                                  std::to_string(reply.status) + "): " + error->get<std::string>());
    }
    return Status::Corruption(
        NotEtcd(endpoint, "HTTP " + std::to_string(reply.status) + ", " + Excerpt(reply.body)));
  }
  if (doc.is_discarded()) {
    return Status::Corruption(NotEtcd(endpoint, "the body is not JSON: " + Excerpt(reply.body)));
  }
  try {
    auto header = doc.is_object() ? doc.find("header") : doc.end();
    if (!doc.is_object() || header == doc.end() || !header->is_object()) {
      throw NotEtcdShape("no 'header' object");
    }
    return parse(doc);
  } catch (const std::exception& e) {  // NotEtcdShape, nlohmann's type errors
    return Status::Corruption(NotEtcd(endpoint, e.what()));
  }
}

// Sends `request` to `target` on each endpoint in turn until one answers like etcd, and
// returns what `parse` makes of that answer.
template <typename Parse>
auto Ask(const std::vector<std::string>& endpoints, std::chrono::milliseconds timeout,
         const std::string& target, const json& request, const Parse& parse)
    -> Result<decltype(parse(json()))> {
  if (endpoints.empty()) {
    return Status::InvalidArgument(
        "the etcd witness has no endpoint: give it the HOST:PORT of at least one etcd member");
  }
  const std::string body = request.dump();
  Status last;
  std::string failures;
  for (const std::string& endpoint : endpoints) {
    Result<HttpReply> reply = Post(endpoint, target, body, timeout);
    if (reply.ok()) {
      auto answer = Interpret(endpoint, *reply, parse);
      if (answer.ok()) return answer;
      last = answer.status();
    } else {
      last = reply.status();
    }
    failures += (failures.empty() ? "" : "; ") + last.message();
  }
  return Status(last.code(), "no etcd endpoint answered " + target + " [" + failures +
                                 "]; check that etcd runs and serves clients there");
}

json PutRequest(const std::string& key, std::string_view value, int64_t lease = 0) {
  json put = {{"key", ToBase64(key)}, {"value", ToBase64(value)}};
  if (lease != 0) put["lease"] = std::to_string(lease);
  return {{"request_put", put}};
}

// A compare of a key's value (`result`: "EQUAL", "NOT_EQUAL") with `value`.
json CompareValue(const std::string& key, const char* result, std::string_view value) {
  return {
      {"key", ToBase64(key)}, {"target", "VALUE"}, {"result", result}, {"value", ToBase64(value)}};
}

json RangeRequest(const std::string& key) { return {{"request_range", {{"key", ToBase64(key)}}}}; }

// The keys of one VM's token (etcd_witness.h).
struct TokenKeys {
  TokenKeys(const std::string& prefix, std::string_view vm)
      : term(prefix + std::string(vm) + "/term"),
        holder(prefix + std::string(vm) + "/holder"),
        confirmed(prefix + std::string(vm) + "/confirmed"),
        window(prefix + std::string(vm) + "/window") {}
  std::string term, holder, confirmed, window;
};

// What a failed compare reads back: the token.
json TokenRanges(const TokenKeys& keys) {
  return json::array(
      {RangeRequest(keys.term), RangeRequest(keys.holder), RangeRequest(keys.confirmed)});
}

// Runs `txn` (its failure branch: TokenRanges) and tells the decision: granted to
// `candidate` under `granted_term` (confirmed as `confirmed_if_granted`) if its compare
// held, else the token as it is, granted only by the retry rule (witness.h).
Result<WitnessDecision> Decide(const std::vector<std::string>& endpoints,
                               std::chrono::milliseconds timeout, const TokenKeys& keys,
                               std::string_view vm, std::string_view candidate, const json& txn,
                               uint64_t granted_term, bool confirmed_if_granted,
                               const std::string& context) {
  auto reply = Ask(endpoints, timeout, "/v3/kv/txn", txn, ParseTxn);
  if (!reply.ok()) return reply.status().WithContext(context);
  if (reply->succeeded) {
    return WitnessDecision{true, granted_term, std::string(candidate), confirmed_if_granted};
  }
  if (reply->ranges.size() != 3) {
    return Status::Corruption("etcd answered a failed compare with " +
                              std::to_string(reply->ranges.size()) +
                              " ranges instead of the 3 asked for");
  }
  const std::optional<KeyValue>& term_kv = reply->ranges[0];
  const std::optional<KeyValue>& holder_kv = reply->ranges[1];
  const std::optional<KeyValue>& confirmed_kv = reply->ranges[2];
  if (!term_kv) {
    return Status::FailedPrecondition("the witness knows no VM named '" + std::string(vm) +
                                      "': protection was never registered");
  }
  std::optional<uint64_t> term = ParseTerm(term_kv->value);
  if (!term) {
    return Status::Corruption("etcd key " + keys.term + " holds " + Excerpt(term_kv->value) +
                              ", not a decimal term: something other than lockstep wrote it; "
                              "put back the last term (or a larger one)");
  }
  if (!holder_kv) {
    return Status::Corruption("etcd has a term but no " + keys.holder +
                              ": something other than lockstep deleted it; register the VM "
                              "again");
  }
  WitnessDecision d;
  d.term = *term;
  d.holder = holder_kv->value;
  // No confirmation key: a token written before grant windows existed, always confirmed.
  d.confirmed = !confirmed_kv || ParseTerm(confirmed_kv->value) == d.term;
  d.granted = d.term == granted_term && d.holder == candidate;
  return d;
}

}  // namespace

EtcdWitness::EtcdWitness(std::vector<std::string> endpoints, std::string key_prefix,
                         std::chrono::milliseconds timeout)
    : endpoints_(std::move(endpoints)), key_prefix_(std::move(key_prefix)), timeout_(timeout) {}

Result<uint64_t> EtcdWitness::Register(std::string_view vm, std::string_view holder) {
  LOCKSTEP_RETURN_IF_ERROR(CheckNames(vm, holder));
  const TokenKeys keys(key_prefix_, vm);
  const std::string& term_key = keys.term;
  const std::string context = "registering VM '" + std::string(vm) + "' with the etcd witness";
  for (int attempt = 0; attempt < kRegisterAttempts; ++attempt) {
    auto current = Ask(endpoints_, timeout_, "/v3/kv/range", json{{"key", ToBase64(term_key)}},
                       [](const json& reply) { return FirstKeyValue(reply); });
    if (!current.ok()) return current.status().WithContext(context);
    uint64_t term = 0;
    int64_t revision = 0;  // what etcd compares an absent key's mod_revision as
    if (*current) {
      std::optional<uint64_t> parsed = ParseTerm((*current)->value);
      if (!parsed) {
        return Status::Corruption("etcd key " + term_key + " holds " + Excerpt((*current)->value) +
                                  ", not a decimal term: something other than lockstep wrote "
                                  "it; put back the last term (or a larger one)");
      }
      term = *parsed;
      revision = (*current)->mod_revision;
    }
    json txn = {{"compare", json::array({{{"key", ToBase64(term_key)},
                                          {"target", "MOD"},
                                          {"result", "EQUAL"},
                                          {"mod_revision", std::to_string(revision)}}})},
                {"success", json::array({PutRequest(term_key, std::to_string(term + 1)),
                                         PutRequest(keys.holder, holder),
                                         PutRequest(keys.confirmed, std::to_string(term + 1))})},
                {"failure", json::array()}};
    auto reply = Ask(endpoints_, timeout_, "/v3/kv/txn", txn, ParseTxn);
    if (!reply.ok()) return reply.status().WithContext(context);
    if (reply->succeeded) return term + 1;
    // Someone changed the term between our read and our write: read it again.
  }
  return Status::FailedPrecondition(context + ": the term changed between read and write " +
                                    std::to_string(kRegisterAttempts) +
                                    " times in a row (others registering or requesting the same "
                                    "VM at the same time?); try again");
}

Result<WitnessDecision> EtcdWitness::RequestActive(std::string_view vm, std::string_view candidate,
                                                   uint64_t expected_term,
                                                   std::chrono::milliseconds confirm_within) {
  LOCKSTEP_RETURN_IF_ERROR(CheckNames(vm, candidate));
  const TokenKeys keys(key_prefix_, vm);
  const std::string context = "asking the etcd witness for VM '" + std::string(vm) + "'";
  const uint64_t next = expected_term + 1;
  const bool confirmed = confirm_within.count() <= 0;
  json success = json::array(
      {PutRequest(keys.term, std::to_string(next)), PutRequest(keys.holder, candidate)});
  if (confirmed) {
    success.push_back(PutRequest(keys.confirmed, std::to_string(next)));
  } else {
    // The window is a lease: etcd deletes the window key when it expires. TTLs are whole
    // seconds (etcd raises one below its minimum, about 2 s by default): rounded up.
    const int64_t ttl = (confirm_within.count() + 999) / 1000;
    auto lease = Ask(endpoints_, timeout_, "/v3/lease/grant", json{{"TTL", ttl}},
                     [](const json& reply) { return Int64Field(reply, "ID"); });
    if (!lease.ok()) return lease.status().WithContext(context + ": granting a lease");
    if (*lease == 0) {  // a window key without a lease would never lapse
      return Status::Corruption("etcd granted a lease without an ID: " + context);
    }
    success.push_back(PutRequest(keys.window, std::to_string(next), *lease));
  }
  json txn = {
      {"compare", json::array({CompareValue(keys.term, "EQUAL", std::to_string(expected_term))})},
      {"success", success},
      {"failure", TokenRanges(keys)}};
  return Decide(endpoints_, timeout_, keys, vm, candidate, txn, next, confirmed, context);
}

Result<WitnessDecision> EtcdWitness::Confirm(std::string_view vm, std::string_view holder,
                                             uint64_t term) {
  LOCKSTEP_RETURN_IF_ERROR(CheckNames(vm, holder));
  const TokenKeys keys(key_prefix_, vm);
  json txn = {{"compare", json::array({CompareValue(keys.term, "EQUAL", std::to_string(term)),
                                       CompareValue(keys.holder, "EQUAL", holder)})},
              {"success", json::array({PutRequest(keys.confirmed, std::to_string(term))})},
              {"failure", TokenRanges(keys)}};
  return Decide(endpoints_, timeout_, keys, vm, holder, txn, term, true,
                "confirming VM '" + std::string(vm) + "' with the etcd witness");
}

Result<WitnessDecision> EtcdWitness::Reclaim(std::string_view vm, std::string_view candidate,
                                             uint64_t term) {
  LOCKSTEP_RETURN_IF_ERROR(CheckNames(vm, candidate));
  const TokenKeys keys(key_prefix_, vm);
  const uint64_t next = term + 1;
  // The window has lapsed when etcd has deleted the window key with its lease (an absent
  // key's version compares as 0).
  json txn = {
      {"compare", json::array({CompareValue(keys.term, "EQUAL", std::to_string(term)),
                               CompareValue(keys.holder, "NOT_EQUAL", candidate),
                               CompareValue(keys.confirmed, "NOT_EQUAL", std::to_string(term)),
                               {{"key", ToBase64(keys.window)},
                                {"target", "VERSION"},
                                {"result", "EQUAL"},
                                {"version", "0"}}})},
      {"success",
       json::array({PutRequest(keys.term, std::to_string(next)), PutRequest(keys.holder, candidate),
                    PutRequest(keys.confirmed, std::to_string(next))})},
      {"failure", TokenRanges(keys)}};
  return Decide(endpoints_, timeout_, keys, vm, candidate, txn, next, true,
                "reclaiming VM '" + std::string(vm) + "' from the etcd witness");
}

}  // namespace lockstep::vip
