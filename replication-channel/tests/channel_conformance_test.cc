// The conformance suite (channel_conformance.h) over TCP on 127.0.0.1 and the in-process
// loopback transport.
#include "channel_test_util.h"

#define LOCKSTEP_CONFORMANCE_PAIRS TcpPair, LoopbackPair
#include "channel_conformance.h"
