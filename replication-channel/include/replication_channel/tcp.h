// The TCP transport: a Channel over one TCP connection.
//
// Framing: every message is a 4-byte little-endian length followed by that many bytes.
// The socket has TCP_NODELAY on (an epoch's last bytes and every ack must leave at once),
// SO_KEEPALIVE off (the engine heartbeats itself), large SO_SNDBUF/SO_RCVBUF, and sends
// use writev over the caller's gather list, so pages go from staging memory to the kernel
// without another copy. Send() completes before it returns. A connection that ends inside
// a message reports kPeerLost ("peer closed the connection in the middle of a message").
//
// The peer is "heard" (LastHeardFrom()) when Receive() reads bytes of it from the socket:
// bytes waiting unread in the kernel do not count.
//
// Addresses are "HOST:PORT" with a numeric IPv4 address, or "[V6]:PORT"; port 0 in
// Listen() picks a free one (see Listener::address()).
#pragma once

#include <memory>

#include "replication_channel/channel.h"

namespace lockstep::channel {

struct TcpOptions {
  int socket_buffer_bytes = 8 << 20;  // SO_SNDBUF and SO_RCVBUF
};

std::unique_ptr<Transport> MakeTcpTransport(TcpOptions options = {});

}  // namespace lockstep::channel
