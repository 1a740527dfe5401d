/*
 * switchyard.h — the C ABI of libswitchyard.
 *
 * Switchyard moves Mixture-of-Experts tokens between ranks: `sy_dispatch` sends every token to
 * the ranks that host its top-k experts, `sy_combine` brings the expert outputs back and reduces
 * them. The same ABI serves two backends: "host" (CPU memory and threads; the oracle) and "cuda".
 *
 * Conventions:
 *  - Every function returns an `sy_status`; results come back through out-parameters.
 *  - Handles are opaque. Every handle a function hands out is an owned reference and is released
 *    with its `*_destroy` function. Objects live until their last reference (including the ones
 *    that in-flight operations hold) is gone, so destroying a tensor that a stream still reads is
 *    safe. A destroyed handle passed again is reported as SY_ERROR_DISPOSED, never dereferenced.
 *  - Option/argument/result structs begin with `struct_size` (bytes, set by the caller). The
 *    library reads only the fields that fit in that size and uses defaults for the rest, so a
 *    caller built against an older header keeps working.
 *  - After a failure, `sy_last_error(handle, &info)` returns the status, the argument at fault and
 *    a message, recorded on the handle the call was made on (so it survives calls made on worker
 *    threads; successful calls do not erase it). With `handle == NULL` it returns the calling
 *    thread's last failure. Handles are never reused: a destroyed one stays invalid.
 *  - Tensors are described like DLPack's DLTensor: dtype, shape and strides counted in elements.
 */
#ifndef SWITCHYARD_H
#define SWITCHYARD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define SY_API __attribute__((visibility("default")))
#else
#define SY_API
#endif

/* Bumped on every incompatible change of this header. The loader refuses a library whose
 * `sy_abi_version()` differs from the version it was written for. */
#define SY_ABI_VERSION 9u

#define SY_MAX_DIMS 8
#define SY_ERROR_ARGUMENT_CAPACITY 64
#define SY_ERROR_MESSAGE_CAPACITY 1024

typedef enum sy_status {
  SY_OK = 0,
  SY_NOT_READY = 1,                /* sy_event_query: the event has not completed yet */
  SY_ERROR_INVALID_ARGUMENT = 2,   /* bad shape, dtype, stride, range, option; names the argument */
  SY_ERROR_WRONG_HANDLE = 3,       /* a handle of another kind, rank or buffer */
  SY_ERROR_DISPOSED = 4,           /* a handle that was destroyed (or never created) */
  SY_ERROR_OUT_OF_MEMORY = 5,
  SY_ERROR_NO_DEVICE = 6,          /* the backend has no usable device */
  SY_ERROR_UNSUPPORTED = 7,        /* valid request this build or backend does not provide */
  SY_ERROR_TIMEOUT = 8,            /* a deadline expired; sy_error_info names whom we waited for */
  SY_ERROR_PEER_FAILED = 9,        /* another rank gave up on this operation first */
  SY_ERROR_CUDA = 10,              /* the CUDA runtime reported an error */
  SY_ERROR_ABI_MISMATCH = 11,
  SY_ERROR_INTERNAL = 12
} sy_status;

typedef enum sy_backend {
  SY_BACKEND_HOST = 0,
  SY_BACKEND_CUDA = 1
} sy_backend;

typedef enum sy_dtype {
  SY_DTYPE_INVALID = 0,
  SY_DTYPE_BF16 = 1,
  SY_DTYPE_FP8_E4M3 = 2,
  SY_DTYPE_F32 = 3,
  SY_DTYPE_I32 = 4,
  SY_DTYPE_I64 = 5,
  SY_DTYPE_BOOL = 6
} sy_dtype;

/* What a deadline-bounded wait was waiting for (sy_error_info.role). */
typedef enum sy_wait_role {
  SY_WAIT_NONE = 0,
  SY_WAIT_BARRIER = 1,          /* start-of-operation barrier: the peer had not arrived */
  SY_WAIT_DISPATCH_NOTIFY = 2,  /* dispatch: the peer had not delivered its counts and tokens */
  SY_WAIT_COMBINE_NOTIFY = 3,   /* combine: the peer had not delivered its expert outputs */
  SY_WAIT_HOST_COUNTER = 4,     /* exact-size dispatch: the host waited for the received counts */
  SY_WAIT_EVENT = 5,            /* a stream or the host waited for an event */
  SY_WAIT_STREAM = 6,           /* the host waited for a stream to drain */
  SY_WAIT_BUFFER_PEERS = 7,     /* a peer had not created its matching buffer */
  SY_WAIT_LL_DISPATCH = 8,      /* low-latency dispatch receive: the peer's messages */
  SY_WAIT_LL_COMBINE = 9,       /* low-latency combine receive: the peer's expert outputs */
  SY_WAIT_DISPATCH_NETWORK = 10, /* two-hop dispatch: a peer had not put its network records, or had not
                                    taken ours (its network ring was full) */
  SY_WAIT_DISPATCH_FORWARD = 11, /* two-hop dispatch: the forwarder had not delivered its node's records */
  SY_WAIT_COMBINE_NETWORK = 12   /* two-hop combine: a peer had not put its partial sums or results, or
                                    had not taken ours */
} sy_wait_role;

typedef enum sy_dispatch_layout {
  SY_LAYOUT_COMPACT = 0,   /* one row per (token, receiving rank), by source rank then token */
  SY_LAYOUT_EXPANDED = 1   /* one row per (token, local expert), grouped by expert, padded */
} sy_dispatch_layout;

typedef enum sy_handle_tensor_kind {
  SY_HANDLE_RANK_PREFIX_MATRIX = 0,  /* [R, R] i32: tokens from ranks 0..i to rank j (inclusive) */
  SY_HANDLE_RECV_SRC_IDX = 1,        /* [N] i32: sender's token index of each received row */
  SY_HANDLE_IS_TOKEN_IN_RANK = 2,    /* [T, R] bool: this rank's routing */
  SY_HANDLE_SEND_SLOT = 3,           /* [T, R] i32: slot of token t at rank r, -1 if not sent */
  SY_HANDLE_RECV_SRC_RANK = 4,       /* [N] i32: source rank of each received row */
  SY_HANDLE_EXPANDED_ROW = 5         /* [N, K] i32 (expanded only): row of (token, k), -1 if none */
} sy_handle_tensor_kind;

typedef struct sy_group_s* sy_group;
typedef struct sy_rank_s* sy_rank;
typedef struct sy_buffer_s* sy_buffer;
typedef struct sy_tensor_s* sy_tensor;
typedef struct sy_stream_s* sy_stream;
typedef struct sy_event_s* sy_event;
typedef struct sy_handle_s* sy_handle; /* the routing a dispatch produced, reused by combine */
typedef struct sy_ll_handle_s* sy_ll_handle; /* the layout a low-latency dispatch produced */
typedef struct sy_hook_s* sy_hook;     /* a deferred receive phase (send/receive split) */

/* ------------------------------------------------------------------------------------------ */
/* Errors                                                                                      */

typedef struct sy_error_info {
  uint32_t struct_size;
  int32_t status;          /* sy_status */
  int32_t rank;            /* rank that reported the failure, -1 if none */
  int32_t peer_rank;       /* rank it waited for (timeouts), -1 if none */
  int32_t role;            /* sy_wait_role */
  int32_t channel;         /* channel / slot the wait belonged to, -1 if none */
  int64_t expected;        /* counter value waited for */
  int64_t observed;        /* counter value seen at the deadline */
  double waited_seconds;
  char argument[SY_ERROR_ARGUMENT_CAPACITY];  /* argument at fault, "" if none */
  char message[SY_ERROR_MESSAGE_CAPACITY];
} sy_error_info;

/* The last failure recorded on `handle` (any sy_* handle), or the calling thread's last failure
 * when `handle` is NULL. info->status is SY_OK when nothing failed. */
SY_API sy_status sy_last_error(const void* handle, sy_error_info* info);
SY_API const char* sy_status_name(int32_t status);

/* ------------------------------------------------------------------------------------------ */
/* Library                                                                                     */

SY_API uint32_t sy_abi_version(void);
SY_API const char* sy_version_string(void);

/* sizeof() of every struct in this header, in the order of sy_struct_id, so bindings can check
 * their own layout at load time. Writes min(count, SY_STRUCT_COUNT) values. */
typedef enum sy_struct_id {
  SY_STRUCT_ERROR_INFO = 0,
  SY_STRUCT_BACKEND_INFO,
  SY_STRUCT_GROUP_OPTIONS,
  SY_STRUCT_RANK_INFO,
  SY_STRUCT_TENSOR_DESC,
  SY_STRUCT_BUFFER_OPTIONS,
  SY_STRUCT_BUFFER_PLAN,
  SY_STRUCT_CONFIG,
  SY_STRUCT_LAYOUT_ARGS,
  SY_STRUCT_LAYOUT_RESULT,
  SY_STRUCT_DISPATCH_ARGS,
  SY_STRUCT_DISPATCH_RESULT,
  SY_STRUCT_COMBINE_ARGS,
  SY_STRUCT_COMBINE_RESULT,
  SY_STRUCT_HANDLE_INFO,
  SY_STRUCT_LL_DISPATCH_ARGS,
  SY_STRUCT_LL_DISPATCH_RESULT,
  SY_STRUCT_LL_COMBINE_ARGS,
  SY_STRUCT_LL_COMBINE_RESULT,
  SY_STRUCT_LL_HANDLE_INFO,
  SY_STRUCT_PROCESS_GROUP_OPTIONS,
  SY_STRUCT_BUFFER_SHARE,
  SY_STRUCT_NCCL_INFO,
  SY_STRUCT_HOST_INFO,
  SY_STRUCT_NETWORK_STATS,
  SY_STRUCT_COUNT
} sy_struct_id;
SY_API sy_status sy_struct_sizes(uint32_t* sizes, uint32_t count);

typedef struct sy_backend_info {
  uint32_t struct_size;
  int32_t backend;               /* sy_backend */
  uint32_t compiled;             /* 1 if this build contains the backend */
  uint32_t available;            /* 1 if it can create groups now */
  int32_t device_count;
  int32_t cuda_runtime_version;  /* e.g. 13000, 0 if none */
  int32_t cuda_driver_version;   /* 0 if no driver */
  int32_t nccl_header_version;   /* NCCL_VERSION_CODE compiled against, 0 if none */
  uint32_t dispatch_supported;   /* 1 if dispatch/combine run on this backend */
  uint32_t executed_on_cpu;      /* cuda: 1 if this build runs the CUDA backend on CPU threads
                                    (SWITCHYARD_CUDA=CPU, a test build: no GPU is involved) */
  char device_name[256];
  char compiled_archs[128];      /* e.g. "sm_90" */
  char reason[512];              /* why it is not available */
} sy_backend_info;

SY_API sy_status sy_backend_probe(int32_t backend, sy_backend_info* info);

/* Host-side element conversion with the library's rounding rules (round to nearest even for
 * BF16; saturating round to nearest even for FP8 E4M3). Converts `count` dense elements. */
SY_API sy_status sy_convert(int32_t src_dtype, const void* src, int32_t dst_dtype, void* dst,
                            uint64_t count);

/* ------------------------------------------------------------------------------------------ */
/* Groups and ranks                                                                            */

typedef struct sy_group_options {
  uint32_t struct_size;
  int32_t backend;         /* sy_backend */
  int32_t ranks;           /* virtual ranks in this process, 1..SY_MAX_LOCAL_RANKS */
  int32_t first_device;    /* cuda: first device to use; ranks spread round-robin; default 0 */
  int64_t timeout_ms;      /* deadline of every wait, default 20000 */
  /* Virtual nodes: ranks [n * ranks_per_node, (n + 1) * ranks_per_node) form node n. 0 = one
   * node of every rank. Must divide `ranks`. (Absent from callers of ABI 4: one node.) */
  int32_t ranks_per_node;
  int32_t reserved;
  /* The emulated NIC of the host backend's network hop: a link of this many bytes per second
   * per rank and this one-way latency (0, 0 = copies at memory speed). */
  double emulated_nic_bytes_per_second;
  int64_t emulated_nic_latency_ns;
} sy_group_options;

#define SY_MAX_LOCAL_RANKS 64

/* A group of `ranks` virtual ranks living in this process. */
SY_API sy_status sy_group_create_local(const sy_group_options* options, sy_group* out);
SY_API sy_status sy_group_destroy(sy_group group);
SY_API sy_status sy_group_rank(sy_group group, int32_t index, sy_rank* out);

typedef struct sy_rank_info {
  uint32_t struct_size;
  int32_t rank;
  int32_t num_ranks;
  int32_t backend;
  int32_t device;          /* cuda device ordinal, -1 on the host backend */
  int32_t local_ranks;     /* ranks of the group living in this process */
  int64_t timeout_ms;
  int32_t node;            /* rank / ranks_per_node */
  int32_t ranks_per_node;  /* process groups: local_world_size */
} sy_rank_info;

/* One rank of a group whose ranks are separate processes (one rank per process, the production
 * shape). The processes find each other through a rendezvous of the caller's (the TypeScript
 * layer runs one over TCP) and exchange their buffers with sy_buffer_export/import. */
typedef struct sy_process_group_options {
  uint32_t struct_size;
  int32_t backend;
  int32_t world_size;
  int32_t rank;
  int32_t local_rank;        /* this process's index on its node */
  int32_t local_world_size;
  int32_t device;            /* cuda: the device; -1 = local_rank */
  int32_t reserved;
  int64_t timeout_ms;
  /* Since ABI 5: the emulated NIC between nodes, as in sy_group_options (0, 0 = memory speed). */
  double emulated_nic_bytes_per_second;
  int64_t emulated_nic_latency_ns;
} sy_process_group_options;

SY_API sy_status sy_group_create_process(const sy_process_group_options* options, sy_group* out);

SY_API sy_status sy_rank_destroy(sy_rank rank);
SY_API sy_status sy_rank_info_get(sy_rank rank, sy_rank_info* info);

/* ------------------------------------------------------------------------------------------ */
/* Streams and events (CUDA semantics on both backends)                                       */

SY_API sy_status sy_stream_create(sy_rank rank, sy_stream* out);
SY_API sy_status sy_stream_destroy(sy_stream stream);
SY_API sy_status sy_stream_wait_event(sy_stream stream, sy_event event);
/* Blocks until all work enqueued so far has run; reports (and clears) a failure of that work.
 * timeout_ms <= 0 waits twice the group's deadline plus a second, so that a wait inside the work
 * times out first and its report (naming the peer) is what comes back. Meant for worker
 * threads. The same default applies to every host wait below. */
SY_API sy_status sy_stream_synchronize(sy_stream stream, int64_t timeout_ms);
/* The backend's own stream: the cudaStream_t on the CUDA backend, so that other libraries'
 * kernels can be ordered with Switchyard's work (valid while the stream lives). The host
 * backend has none: SY_ERROR_UNSUPPORTED. */
SY_API sy_status sy_stream_native(sy_stream stream, void** out);

SY_API sy_status sy_event_create(sy_rank rank, sy_event* out);
SY_API sy_status sy_event_destroy(sy_event event);
SY_API sy_status sy_event_record(sy_event event, sy_stream stream);
/* SY_OK when complete, SY_NOT_READY while pending, or the failure of the work it follows. */
SY_API sy_status sy_event_query(sy_event event);
SY_API sy_status sy_event_synchronize(sy_event event, int64_t timeout_ms);
/* Milliseconds from `start`'s completion to `end`'s, by the backend's clock: the GPU's event
 * timer on CUDA, the stream thread's steady clock on the host backend. Both events of one rank,
 * recorded (SY_ERROR_INVALID_ARGUMENT otherwise) and complete (SY_NOT_READY otherwise).
 * Negative when `end` completed first. */
SY_API sy_status sy_event_elapsed(sy_event start, sy_event end, double* ms);

/* ------------------------------------------------------------------------------------------ */
/* Tensors                                                                                     */

typedef struct sy_tensor_desc {
  uint32_t struct_size;
  int32_t dtype;                    /* sy_dtype */
  int32_t ndim;                     /* 0..SY_MAX_DIMS */
  int32_t reserved;
  int64_t shape[SY_MAX_DIMS];
  int64_t strides[SY_MAX_DIMS];     /* in elements; all zero = dense row-major */
  uint64_t data;                    /* sy_tensor_describe: address of element 0 */
  int32_t device;                   /* sy_tensor_describe: cuda device, -1 for host memory */
  int32_t reserved2;
} sy_tensor_desc;

/* Allocates a tensor on the rank's memory (zero-filled). Strides, when given, must be
 * non-negative and describe non-overlapping elements. */
SY_API sy_status sy_tensor_create(sy_rank rank, const sy_tensor_desc* desc, sy_tensor* out);
SY_API sy_status sy_tensor_destroy(sy_tensor tensor);
SY_API sy_status sy_tensor_describe(sy_tensor tensor, sy_tensor_desc* out);
/* Stream-ordered copies between the tensor and dense row-major host memory of exactly
 * numel * element size bytes. They return once the copy is done (meant for worker threads). */
SY_API sy_status sy_tensor_write(sy_tensor tensor, sy_stream stream, const void* src,
                                 uint64_t bytes, int64_t timeout_ms);
SY_API sy_status sy_tensor_read(sy_tensor tensor, sy_stream stream, void* dst, uint64_t bytes,
                                int64_t timeout_ms);
/* Since ABI 7. Stream-ordered copy of `src` into `dst`: tensors of one rank, both dense, of
 * the same dtype and element count (shapes may differ). Enqueued on `stream` and returns at
 * once; a device-to-device copy on the CUDA backend (the baseline the benchmarks time next to
 * each operation). It copies the bytes as they are when the stream gets there. */
SY_API sy_status sy_tensor_copy(sy_tensor dst, sy_tensor src, sy_stream stream);

/* ------------------------------------------------------------------------------------------ */
/* Configuration and sizing                                                                    */

typedef struct sy_config {
  uint32_t struct_size;
  int32_t num_sms;                   /* SM budget of the communication kernels (even) */
  int32_t nvl_chunk_send;            /* tokens per NVLink publication */
  int32_t nvl_chunk_recv;            /* NVLink receive ring capacity, tokens */
  int32_t rdma_chunk_send;
  int32_t rdma_chunk_recv;
} sy_config;

/* The tuned defaults for `ranks` ranks (DeepEP's tables for 2..160, extrapolated otherwise). */
SY_API sy_status sy_default_config(int32_t ranks, sy_config* out);

/* How the normal mode crosses nodes. */
typedef enum sy_internode_path {
  SY_INTERNODE_TWO_HOP = 0,  /* once per (token, node), then forwarded inside it (core/internode.h) */
  SY_INTERNODE_DIRECT = 1    /* once per (token, rank), straight to it: the baseline the two hops save on */
} sy_internode_path;

typedef struct sy_buffer_options {
  uint32_t struct_size;
  int32_t hidden;                    /* channels per token */
  int32_t max_tokens_per_rank;       /* most tokens any rank dispatches in one call */
  int32_t num_sms;                   /* 0 = default for the rank count */
  int64_t timeout_ms;                /* 0 = the rank's deadline */
  /* Since the low-latency mode (callers passing the 24-byte v1 struct get the defaults): */
  int32_t ll_num_experts;            /* > 0: a low-latency double buffer for this many experts */
  uint32_t enable_masking;           /* 1: a timed-out peer is masked instead of failing the call */
  /* Since ABI 5: the group's ranks per node (0 = the group's own; sy_plan_buffer: one node). */
  int32_t ranks_per_node;
  int32_t internode_path;            /* sy_internode_path: how normal mode crosses nodes */
  /* Since ABI 6: */
  int32_t network_ring_entries;      /* two hops: entries of each network ring (0: the default for
                                        the rank count; at most max_tokens_per_rank are used) */
  int32_t reserved;
} sy_buffer_options;

#define SY_BUFFER_OPTIONS_V1_SIZE 24u

typedef struct sy_buffer_plan {
  uint32_t struct_size;
  int32_t record_bytes;              /* bytes of one dispatched token record */
  int32_t combine_row_bytes;         /* bytes of one combine row */
  int32_t max_topk;
  uint64_t header_bytes;
  uint64_t dispatch_region_bytes;
  uint64_t combine_region_bytes;
  uint64_t total_bytes;              /* what one rank allocates on the host backend (the CUDA backend
                                        allocates the header, the low-latency halves and an exchange
                                        page; a process group also the staging regions) */
  int64_t max_recv_rows;             /* ranks * max_tokens_per_rank */
  uint64_t ll_half_bytes;            /* one half of the low-latency double buffer, 0 if none */
  int32_t ll_message_bytes;          /* one low-latency dispatch message */
  int32_t ll_combine_row_bytes;      /* one low-latency combine row */
  int32_t net_record_bytes;          /* one network record of the two-hop dispatch, 0 on one node */
  int32_t net_partial_bytes;         /* one partial sum of the two-hop combine on the network, 0 on one node */
  uint64_t net_region_bytes;         /* the network rings of the two hops, 0 on one node */
  /* Since ABI 6: */
  int32_t net_result_bytes;          /* one result (or hierarchical partial) of the two-hop combine */
  int32_t net_ring_entries;          /* entries of each network ring (one ring per sender node) */
} sy_buffer_plan;

/* Buffer size hint: what a buffer with these options allocates per rank. */
SY_API sy_status sy_plan_buffer(const sy_buffer_options* options, int32_t ranks,
                                sy_buffer_plan* out);

/* ------------------------------------------------------------------------------------------ */
/* Buffers and the normal-mode operations                                                      */

/* Creates rank's communication buffer. Collective: every rank of the group creates its buffers
 * in the same order; the n-th buffer of each rank forms one set. */
SY_API sy_status sy_buffer_create(sy_rank rank, const sy_buffer_options* options,
                                  sy_buffer* out);
SY_API sy_status sy_buffer_destroy(sy_buffer buffer);
/* What another process needs to map this rank's buffer (process groups): the name of a shared
 * memory segment (host backend) or a CUDA IPC handle, and the plan it must agree with. */
typedef struct sy_buffer_share {
  uint32_t struct_size;
  int32_t rank;
  int32_t hidden;
  int32_t max_tokens_per_rank;
  int32_t ll_num_experts;
  int32_t enable_masking; /* must agree too: a masked rank is masked everywhere */
  uint64_t bytes;
  char name[256];
  int32_t ranks_per_node; /* since ABI 5; must agree (0 from older callers: one node) */
  int32_t internode_path; /* must agree */
  int32_t network_ring_entries; /* since ABI 6; must agree (0: the default) */
  int32_t reserved;
  /* Since ABI 9: what the peers need to reach this rank's network engine across nodes, as
   * NUL-terminated lowercase hex; "" where they need nothing (the emulated NIC maps the peers'
   * buffers). SWITCHYARD_NIC=ibverbs: its queue pairs, port address and registered window. */
  char network_endpoint[1024];
} sy_buffer_share;

SY_API sy_status sy_buffer_export(sy_buffer buffer, sy_buffer_share* out);
/* Maps peer `share->rank`'s buffer into this process; refuses a plan that differs. */
SY_API sy_status sy_buffer_import(sy_buffer buffer, const sy_buffer_share* share);
/* Once every peer has imported this rank's buffer: drop its name, so the memory is freed with the
 * last mapping (even when a process dies). */
SY_API sy_status sy_buffer_seal(sy_buffer buffer);
/* This rank gives up on the buffer set because rank `peer` failed before the first operation
 * (the rendezvous lost it while the buffers were being mapped, say): every peer's wait on this
 * set ends at once with SY_ERROR_PEER_FAILED naming `peer`, instead of timing out on this rank.
 * The set cannot be used again. */
SY_API sy_status sy_buffer_abandon(sy_buffer buffer, int32_t peer);

/* The stream the buffer's operations run on (a new reference). */
SY_API sy_status sy_buffer_comm_stream(sy_buffer buffer, sy_stream* out);
SY_API sy_status sy_buffer_plan_get(sy_buffer buffer, sy_buffer_plan* out);

/* What this rank's buffer has put on the network so far, summed over its operations (across
 * nodes; counted by the emulated NIC of the host backend or of the CUDA backend's CPU proxy;
 * nothing on the direct path of the CUDA backend, which pulls). */
typedef struct sy_network_stats {
  uint32_t struct_size;
  uint32_t reserved;
  uint64_t records;  /* entries: dispatch records and combine entries */
  uint64_t bytes;    /* their bytes */
  uint64_t puts;     /* the one-sided puts that carried them (a NIC's work requests): one per entry on
                        the host backend; one per proxy descriptor on the CUDA backend, which
                        puts a run of up to 16 consecutive entries for one ring as one */
} sy_network_stats;
SY_API sy_status sy_buffer_network_stats(sy_buffer buffer, sy_network_stats* out);

/* Stream semantics shared by every operation: the communication stream first waits for
 * `previous_event` (or, without one, for `compute_stream`); the work runs on the communication
 * stream; with `async_finish` the result carries an event recorded after it, otherwise
 * `compute_stream` waits for it. `allocate_on_comm_stream` (needs both) gives the outputs to the
 * communication stream. */

typedef struct sy_layout_args {
  uint32_t struct_size;
  int32_t num_experts;
  sy_tensor topk_idx;                /* [T, K] i64 or i32, -1 = no expert */
  sy_stream compute_stream;
  sy_event previous_event;           /* optional */
  uint32_t async_finish;
  uint32_t allocate_on_comm_stream;
} sy_layout_args;

typedef struct sy_layout_result {
  uint32_t struct_size;
  uint32_t reserved;
  sy_tensor num_tokens_per_rank;     /* [R] i32, a token counts once per rank */
  sy_tensor num_tokens_per_expert;   /* [E] i32 */
  sy_tensor is_token_in_rank;        /* [T, R] bool */
  sy_event event;                    /* with async_finish */
  sy_tensor num_tokens_per_node;     /* [N] i32, a token counts once per node (N = ranks / ranks_per_node) */
  sy_tensor is_token_in_node;        /* [T, N] bool */
} sy_layout_result;

SY_API sy_status sy_layout(sy_buffer buffer, const sy_layout_args* args,
                           sy_layout_result* out);

typedef struct sy_dispatch_args {
  uint32_t struct_size;
  int32_t num_experts;               /* required with topk_idx */
  sy_tensor x;                       /* [T, H] bf16 or fp8 e4m3, row-contiguous */
  sy_tensor x_scales;                /* fp8 only: [T, S] f32 or i32, any strides */
  sy_tensor topk_idx;                /* [T, K] i64 or i32 (optional in cached mode) */
  sy_tensor topk_weights;            /* [T, K] f32, with topk_idx */
  sy_tensor is_token_in_rank;        /* [T, R] bool from sy_layout (optional) */
  sy_handle handle;                  /* cached dispatch: reuse this routing */
  sy_stream compute_stream;
  sy_event previous_event;
  int64_t num_worst_tokens;          /* > 0: worst-case mode, no host wait, this many rows */
  int64_t timeout_ms;                /* host wait deadline, 0 = the buffer's */
  int32_t expert_alignment;          /* >= 1 */
  int32_t layout;                    /* sy_dispatch_layout */
  uint32_t async_finish;
  uint32_t allocate_on_comm_stream;
  uint32_t zero_padding;             /* expanded: zero the padding rows' payload */
  uint32_t reserved;
} sy_dispatch_args;

typedef struct sy_dispatch_result {
  uint32_t struct_size;
  int32_t num_local_experts;
  sy_tensor recv_x;                  /* [N, H] */
  sy_tensor recv_x_scales;           /* [N, S] (fp8), else NULL */
  sy_tensor recv_topk_idx;           /* compact: [N, K] local ids or -1; expanded: NULL */
  sy_tensor recv_topk_weights;       /* compact: [N, K], 0 where not local; expanded: [N] */
  sy_tensor recv_count;              /* [1] i32: valid rows (meaningful on the stream) */
  sy_handle handle;
  sy_event event;                    /* with async_finish */
  int64_t num_recv_tokens;           /* received (token, rank) rows; -1 if not known on host */
  int64_t num_rows;                  /* rows of recv_x */
} sy_dispatch_result;

SY_API sy_status sy_dispatch(sy_buffer buffer, const sy_dispatch_args* args,
                             sy_dispatch_result* out);

/* How combine reduces across nodes (buffers whose group spans nodes, two-hop mode). */
typedef enum sy_internode_reduction {
  SY_INTERNODE_CHAIN = 0,        /* a token's float sum travels node to node: the one-node result bit for
                                    bit, whatever the split (core/internode.h) */
  SY_INTERNODE_HIERARCHICAL = 1  /* each node sends one BF16 partial home, in parallel (DeepEP's way):
                                    fewer bytes, results that depend on the split */
} sy_internode_reduction;

typedef struct sy_combine_args {
  uint32_t struct_size;
  uint32_t internode_reduction;      /* sy_internode_reduction (0 before ABI 5: the chain) */
  sy_tensor x;                       /* [N, H] bf16 rows in dispatch's output layout */
  sy_handle handle;
  sy_tensor topk_weights;            /* compact only: [N, K] f32 (optional) */
  sy_tensor bias0;                   /* [T, H] bf16 (optional) */
  sy_tensor bias1;                   /* [T, H] bf16 (optional) */
  sy_tensor out;                     /* [T, H] bf16 to write into (optional) */
  sy_stream compute_stream;
  sy_event previous_event;
  uint32_t async_finish;
  uint32_t allocate_on_comm_stream;
} sy_combine_args;

typedef struct sy_combine_result {
  uint32_t struct_size;
  uint32_t reserved;
  sy_tensor combined_x;              /* [T, H] bf16 */
  sy_tensor combined_topk_weights;   /* [T, K] f32 when topk_weights was given */
  sy_event event;
} sy_combine_result;

SY_API sy_status sy_combine(sy_buffer buffer, const sy_combine_args* args,
                            sy_combine_result* out);

/* The collectives a caller may refuse (sy_reject). */
typedef enum sy_operation {
  SY_OPERATION_DISPATCH = 1,
  SY_OPERATION_COMBINE = 2,
  SY_OPERATION_LOW_LATENCY_DISPATCH = 3,
  SY_OPERATION_LOW_LATENCY_COMBINE = 4
} sy_operation;

/* This rank will not make the collective its peers are making (a binding found its arguments
 * invalid before calling sy_dispatch, sy_combine, sy_ll_dispatch or sy_ll_combine): the peers
 * fail that operation at once with SY_ERROR_PEER_FAILED naming this rank, the buffers stay
 * usable, and every rank's next call lines up (a low-latency refusal takes its call number and
 * half of the double buffer, and acknowledges what the peers sent into it). The four calls do
 * the same for the arguments they refuse themselves. */
SY_API sy_status sy_reject(sy_buffer buffer, int32_t operation);

typedef struct sy_handle_info {
  uint32_t struct_size;
  int32_t rank;
  int32_t num_ranks;
  int32_t num_experts;               /* 0 when dispatched without top-k */
  int32_t num_local_experts;
  int32_t num_topk;
  int32_t layout;                    /* sy_dispatch_layout */
  int32_t expert_alignment;
  int32_t hidden;
  int32_t reserved;
  int64_t num_tokens;                /* T on this rank */
  int64_t num_recv_tokens;           /* -1 while unknown on the host (worst-case mode) */
  int64_t num_rows;                  /* rows of recv_x */
} sy_handle_info;

SY_API sy_status sy_handle_destroy(sy_handle handle);
SY_API sy_status sy_handle_info_get(sy_handle handle, sy_handle_info* info);
/* One of the handle's tensors (a new reference), see sy_handle_tensor_kind. */
SY_API sy_status sy_handle_tensor(sy_handle handle, int32_t kind, sy_tensor* out);
/* Received tokens per local expert, rounded up to expert_alignment. Known on the host after an
 * exact-size or cached dispatch; SY_NOT_READY in worst-case mode. Writes min(capacity, E_local). */
SY_API sy_status sy_handle_expert_counts(sy_handle handle, int32_t* counts, int32_t capacity);

/* ------------------------------------------------------------------------------------------ */
/* Low-latency (decode) mode                                                                   */
/*                                                                                             */
/* Fixed slots per (local expert, source rank), a double buffer that alternates on every      */
/* low-latency call (the data of one call survives the next one), FP8 quantisation done by the */
/* library, and an optional split of send and receive phases (a hook that runs the receive     */
/* phase later and holds nothing in between). Received rows are ordered by source rank, then  */
/* by the sender's token order. Collective: every rank makes the same low-latency calls.      */

typedef enum sy_ll_flags {
  SY_LL_FP8 = 1,            /* dispatch: quantise to FP8 E4M3 with per-128 scales */
  SY_LL_ROUND_SCALE = 2,    /* dispatch: power-of-two scales */
  SY_LL_UE8M0 = 4,          /* dispatch: scales as packed UE8M0 exponents (needs ROUND_SCALE) */
  SY_LL_ASYNC_FINISH = 8,   /* return an event instead of ordering the compute stream */
  SY_LL_RETURN_HOOK = 16,   /* send now, return a hook that runs the receive phase later */
  SY_LL_LOGFMT = 32,        /* combine: LogFMT-10 rows (BF16 fallback per block) */
  SY_LL_ZERO_COPY = 64      /* combine: the outputs are already in the next combine buffer */
} sy_ll_flags;

typedef struct sy_ll_dispatch_args {
  uint32_t struct_size;
  uint32_t flags;                        /* sy_ll_flags */
  sy_tensor x;                           /* [T, H] bf16, T <= max_tokens_per_rank */
  sy_tensor topk_idx;                    /* [T, K] i64 or i32, -1 = none, K <= 32 */
  sy_tensor cumulative_local_expert_recv_stats;  /* [E_local] i32, incremented (optional) */
  sy_tensor dispatch_wait_recv_cost_stats;       /* [R] i64 ns waited per source (optional) */
  sy_stream compute_stream;
} sy_ll_dispatch_args;

typedef struct sy_ll_dispatch_result {
  uint32_t struct_size;
  int32_t num_local_experts;
  sy_tensor recv_x;          /* [E_local, R * max_tokens, H] bf16 or fp8 */
  sy_tensor recv_x_scales;   /* FP8: [E_local, R * max_tokens, S] f32 (or i32 UE8M0), column-major
                                in the last two dimensions */
  sy_tensor recv_count;      /* [E_local] i32: valid rows per local expert */
  sy_ll_handle handle;
  sy_event event;            /* with SY_LL_ASYNC_FINISH */
  sy_hook hook;              /* with SY_LL_RETURN_HOOK */
} sy_ll_dispatch_result;

SY_API sy_status sy_ll_dispatch(sy_buffer buffer, const sy_ll_dispatch_args* args,
                                sy_ll_dispatch_result* out);

typedef struct sy_ll_combine_args {
  uint32_t struct_size;
  uint32_t flags;            /* sy_ll_flags */
  sy_tensor x;               /* [E_local, R * max_tokens, H] bf16 expert outputs (not read with
                                SY_LL_ZERO_COPY) */
  sy_tensor topk_idx;        /* this rank's [T, K] routing of the dispatch */
  sy_tensor topk_weights;    /* [T, K] f32 */
  sy_ll_handle handle;
  sy_tensor out;             /* [T, H] bf16 to write into (optional) */
  sy_tensor combine_wait_recv_cost_stats;  /* [R] i64 ns waited per source (optional) */
  sy_stream compute_stream;
} sy_ll_combine_args;

typedef struct sy_ll_combine_result {
  uint32_t struct_size;
  uint32_t reserved;
  sy_tensor combined_x;      /* [T, H] bf16 = sum_k w_k y_k, float32 in top-k order */
  sy_event event;
  sy_hook hook;
} sy_ll_combine_result;

SY_API sy_status sy_ll_combine(sy_buffer buffer, const sy_ll_combine_args* args,
                               sy_ll_combine_result* out);

/* Enqueues the receive phase a SY_LL_RETURN_HOOK call deferred; once only. It fails when a later
 * low-latency call has already reused the half of the double buffer the data is in. */
SY_API sy_status sy_hook_run(sy_hook hook);
SY_API sy_status sy_hook_destroy(sy_hook hook);

typedef enum sy_ll_handle_tensor_kind {
  SY_LL_HANDLE_SRC_INFO = 0,       /* [E_local, R * max_tokens] i32: sender's token index */
  SY_LL_HANDLE_LAYOUT_RANGE = 1    /* [E_local, R] i64: begin << 32 | count per source */
} sy_ll_handle_tensor_kind;

typedef struct sy_ll_handle_info {
  uint32_t struct_size;
  int32_t rank;
  int32_t num_ranks;
  int32_t num_experts;
  int32_t num_local_experts;
  int32_t max_tokens_per_rank;
  int32_t hidden;
  int32_t num_tokens;        /* T of this rank's dispatch */
  uint32_t call;             /* the low-latency call number of the dispatch */
  uint32_t received;         /* 1 once the receive phase has run */
} sy_ll_handle_info;

SY_API sy_status sy_ll_handle_destroy(sy_ll_handle handle);
SY_API sy_status sy_ll_handle_info_get(sy_ll_handle handle, sy_ll_handle_info* info);
SY_API sy_status sy_ll_handle_tensor(sy_ll_handle handle, int32_t kind, sy_tensor* out);

/* The buffer the next low-latency combine sends from, as [E_local, R * max_tokens, H] bf16: write
 * the expert outputs there and combine with SY_LL_ZERO_COPY. Using it after another
 * low-latency call took its half is an error. */
SY_API sy_status sy_ll_next_combine_buffer(sy_buffer buffer, sy_ll_handle handle, sy_tensor* out);

/* Resets the low-latency double buffer on every rank (collective, stream-ordered: the compute
 * stream waits for it): needed after a masked call sequence, or to restart the call numbering.
 * `done` (optional) receives an event that reports the reset's outcome. */
SY_API sy_status sy_ll_clean(sy_buffer buffer, sy_stream compute_stream, sy_event* done);

/* Rank masking (buffers created with enable_masking): masked ranks are skipped in sends,
 * receives and reductions. Local to this rank's view. */
SY_API sy_status sy_mask_update(sy_buffer buffer, int32_t rank, int32_t masked);
SY_API sy_status sy_mask_query(sy_buffer buffer, int32_t* mask, int32_t capacity);
SY_API sy_status sy_mask_clean(sy_buffer buffer);

/* ------------------------------------------------------------------------------------------ */
/* The machine: NCCL, CUDA peers, shared memory                                                */

typedef struct sy_nccl_info {
  uint32_t struct_size;
  int32_t loaded;            /* 1 if the library at `path` is a usable NCCL */
  int32_t version;           /* its NCCL_VERSION_CODE, e.g. 22907 */
  int32_t device_api;        /* 1 if it has the device API (ncclDevCommCreate) */
  int32_t header_version;    /* the NCCL headers this library was compiled against, 0 if none */
  int32_t reserved;
  char error[512];           /* why it cannot be used */
} sy_nccl_info;

/* Opens NCCL at the absolute `path` (RTLD_LOCAL, kept for the process) and reports it. Returns
 * SY_OK with info->loaded = 0 and the reason when it is not usable. */
SY_API sy_status sy_nccl_probe(const char* path, sy_nccl_info* info);

/* Process groups on the CUDA backend: rank 0 makes a unique id (128 bytes), every rank passes it
 * to sy_group_nccl_init (which blocks until all ranks joined: call it off the JS thread). */
SY_API sy_status sy_group_nccl_unique_id(sy_group group, const char* path, uint8_t* id);
SY_API sy_status sy_group_nccl_init(sy_group group, const char* path, const uint8_t* id);

typedef struct sy_host_info {
  uint32_t struct_size;
  int32_t cpus;
  uint64_t shm_total_bytes;  /* /dev/shm size, 0 if absent */
  uint64_t shm_free_bytes;
} sy_host_info;

SY_API sy_status sy_host_info_get(sy_host_info* info);

/* Whether device a can map device b's memory, and whether atomics between them are native (a
 * sign of NVLink). */
SY_API sy_status sy_cuda_peer_access(int32_t a, int32_t b, int32_t* can_access, int32_t* native_atomics);

#ifdef __cplusplus
}
#endif

#endif /* SWITCHYARD_H */
