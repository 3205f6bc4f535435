/* The C ABI between a hypervisor and the lockstep engine loaded into it as a plugin.
 *
 * QEMU's `lockstep` object (qemu-patches/) dlopens the engine (liblockstep_plugin.so),
 * calls lockstep_plugin_entry() and drives the returned API. It hands the engine a table
 * of host operations, the primitives of lockstep/hypervisor.h in C. Nothing else crosses:
 * no C++ types, no allocation across the boundary, strings are NUL-terminated and copied.
 *
 * Versioning: LOCKSTEP_PLUGIN_ABI_VERSION changes with any change to these structs.
 * lockstep_plugin_entry(version) returns NULL for a version it does not speak, and the
 * host must then refuse to start with a message naming both versions.
 *
 * Threads: host operations are called from engine threads, never from the host's own
 * threads; each must take whatever lock the host needs (QEMU: the BQL) itself. Operations
 * marked HOT run inside the checkpoint pause and must not block on I/O. The API functions
 * may be called from any single host thread.
 *
 * Errors: host operations return 0 or a negative errno; the engine then asks
 * describe_error() (may be NULL) for a message. API functions return 0 or -1 and write a
 * message into the caller's `err` buffer.
 */
#ifndef LOCKSTEP_PLUGIN_ABI_H_
#define LOCKSTEP_PLUGIN_ABI_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LOCKSTEP_PLUGIN_ABI_VERSION 4u

enum lockstep_output_mode {
  LOCKSTEP_OUTPUT_PASS_THROUGH = 0,
  LOCKSTEP_OUTPUT_BUFFERED = 1,
  LOCKSTEP_OUTPUT_DROPPED = 2,
};

/* Provided by the host. `opaque` is passed back to every operation. */
struct lockstep_host_ops {
  uint32_t abi_version; /* LOCKSTEP_PLUGIN_ABI_VERSION */
  void* opaque;

  /* RAM blocks, all of them (main RAM, ROMs, video RAM). Called at setup only. */
  int (*ram_block_count)(void* opaque);
  int (*ram_block_info)(void* opaque, int index, const char** id, uint8_t** host, uint64_t* length);

  /* A checkpoint's pause: start_vcpus always follows stop_vcpus, and the host may keep its
   * locks (QEMU: the BQL) from one to the other. */
  int (*stop_vcpus)(void* opaque);  /* HOT */
  int (*start_vcpus)(void* opaque); /* HOT */
  /* Stops the guest for good (a fenced primary); nothing follows, no lock is kept. */
  int (*halt)(void* opaque);
  int (*dirty_log_start)(void* opaque);
  int (*dirty_log_stop)(void* opaque);
  int (*dirty_log_sync)(void* opaque); /* HOT; must hold the BQL under TCG */
  /* ORs the pages of block `index` dirtied since the last call into `bitmap` (bit i of
   * word i/64 = page i) and clears them. HOT. */
  int (*take_dirty_bitmap)(void* opaque, int index, uint64_t* bitmap, size_t words);
  /* Returns the number of bytes written, or a negative errno (-ENOSPC: does not fit). HOT */
  int64_t (*save_device_state)(void* opaque, uint8_t* buf, size_t capacity);
  int (*load_device_state)(void* opaque, const uint8_t* buf, size_t length);

  void (*close_output_barrier)(void* opaque, uint64_t epoch); /* HOT */
  void (*release_output)(void* opaque, uint64_t epoch);
  void (*set_output_mode)(void* opaque, int mode); /* enum lockstep_output_mode */
  int (*announce)(void* opaque);

  /* The message for the last error of this thread; may be NULL. */
  const char* (*describe_error)(void* opaque);
  /* A replica state change ("PROTECTED", "ACTIVE", ...) with its reason; may be NULL.
   * Called from an engine thread; the host turns it into its own event (QMP). */
  void (*state_changed)(void* opaque, const char* state, const char* reason);
};

/* Provided by the engine. */
struct lockstep_plugin_api {
  uint32_t abi_version;
  /* Creates a replica from `config`, a comma-separated key=value list:
   *   role=primary|secondary (required), vm=NAME (required), host=NAME (required),
   *   key_file=PATH (required: the hosts' pairing key, 64 hex digits, mode 0600),
   *   witness=tcp:HOST:PORT (the embedded witness), witness=etcd:HOST:PORT[+HOST:PORT...]
   *   or witness=this-process (tests),
   *   peer=HOST:PORT (primary: where the secondary listens),
   *   listen=HOST:PORT (secondary: where to accept the primary),
   *   pairing=32 hex digits, interval_ms=N, heartbeat_ms=N, threshold_ms=N,
   *   sync_threshold_ms=N, delta=on|off, output_spacing_ms=N (0 = epochs end on the
   *   interval only), vip=ADDRESS@INTERFACE, fence_command=PATH, fence_timeout_ms=N
   *   (docs/qemu-plugin.md has the table).
   * Validates everything; starts nothing. NULL on error, with the reason in `err`. */
  void* (*create)(const struct lockstep_host_ops* ops, const char* config, char* err,
                  size_t err_len);
  /* Starts protection in the background (connect or accept, handshake, epochs); progress
   * is reported through state_changed and query_status. */
  int (*start)(void* replica, char* err, size_t err_len);
  /* Ends protection on purpose (primary: GOODBYE; secondary: stop receiving). */
  void (*stop)(void* replica);
  /* A JSON object describing the replica, with exactly these keys: "role", "state",
   * "reason" (strings); "epoch", "acked_epoch", "epochs", "bytes" (counts);
   * "last_pause_us", "pause_p50_us", "pause_p99_us", "ack_latency_p50_us" (microseconds).
   * The meanings are those of lockstep::ReplicationStats (lockstep/replicator.h).
   * Returns the length written (always NUL-terminated), or -1 if `capacity` is too small. */
  int (*query_status)(void* replica, char* json, size_t capacity);
  void (*destroy)(void* replica);
  /* The host holds guest output sent in the open epoch (output barrier mode BUFFERED): the
   * engine may end the epoch early. Call it at least for the first packet held after each
   * close_output_barrier; it is cheap and never blocks on I/O. A secondary ignores it. */
  void (*output_pending)(void* replica);
  /* Starts a planned switchover (primary only): the open epoch ends at once and, once the
   * secondary has acknowledged it, the secondary runs the guest from exactly that epoch
   * (no output lost) while this replica's guest stops for good. Returns at once: 0, or -1
   * with the reason in err (not a primary, not PROTECTED, protection never started). The
   * outcome is reported through state_changed (HANDED_OVER, or PROTECTED again with the
   * secondary's reason) and query_status. Never blocks on the guest or the network, so it
   * may be called with the host's lock (QEMU: the BQL) held. */
  int (*handover)(void* replica, char* err, size_t err_len);
};

/* The one exported symbol. NULL if the host's `abi_version` is not spoken. */
const struct lockstep_plugin_api* lockstep_plugin_entry(uint32_t abi_version);

#ifdef __cplusplus
}
#endif

#endif /* LOCKSTEP_PLUGIN_ABI_H_ */
