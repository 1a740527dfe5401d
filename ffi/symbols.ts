/**
 * The symbol table of libswitchyard: one entry per C function of `csrc/include/switchyard.h`,
 * with its C prototype. Structs travel as `buffer` (a Uint8Array holding the C layout, see
 * `structs.ts`); out-parameter handles as an 8-byte `buffer`.
 *
 * Functions that may wait (stream/event synchronize, tensor copies, exact-size dispatch) also
 * have a `nonblocking` twin so the JS thread never waits on native work.
 *
 * @module
 */

/** The ABI version this binding was written for (`SY_ABI_VERSION`). */
export const ABI_VERSION = 9;

/** Every libswitchyard function, as `Deno.dlopen` wants it. */
export const symbols = {
  // uint32_t sy_abi_version(void)
  sy_abi_version: { parameters: [], result: "u32" },
  // const char* sy_version_string(void)
  sy_version_string: { parameters: [], result: "pointer" },
  // sy_status sy_last_error(const void* handle, sy_error_info* info)
  sy_last_error: { parameters: ["pointer", "buffer"], result: "i32" },
  // const char* sy_status_name(int32_t status)
  sy_status_name: { parameters: ["i32"], result: "pointer" },
  // sy_status sy_struct_sizes(uint32_t* sizes, uint32_t count)
  sy_struct_sizes: { parameters: ["buffer", "u32"], result: "i32" },
  // sy_status sy_backend_probe(int32_t backend, sy_backend_info* info)
  sy_backend_probe: { parameters: ["i32", "buffer"], result: "i32" },
  // sy_status sy_convert(int32_t src_dtype, const void* src, int32_t dst_dtype, void* dst, uint64_t count)
  sy_convert: { parameters: ["i32", "buffer", "i32", "buffer", "u64"], result: "i32" },

  // sy_status sy_group_create_local(const sy_group_options* options, sy_group* out)
  sy_group_create_local: { parameters: ["buffer", "buffer"], result: "i32" },
  // sy_status sy_group_create_process(const sy_process_group_options* options, sy_group* out)
  sy_group_create_process: { parameters: ["buffer", "buffer"], result: "i32" },
  // sy_status sy_group_destroy(sy_group group)
  sy_group_destroy: { parameters: ["pointer"], result: "i32" },
  // sy_status sy_group_rank(sy_group group, int32_t index, sy_rank* out)
  sy_group_rank: { parameters: ["pointer", "i32", "buffer"], result: "i32" },
  // sy_status sy_rank_destroy(sy_rank rank)
  sy_rank_destroy: { parameters: ["pointer"], result: "i32" },
  // sy_status sy_rank_info_get(sy_rank rank, sy_rank_info* info)
  sy_rank_info_get: { parameters: ["pointer", "buffer"], result: "i32" },

  // sy_status sy_stream_create(sy_rank rank, sy_stream* out)
  sy_stream_create: { parameters: ["pointer", "buffer"], result: "i32" },
  // sy_status sy_stream_destroy(sy_stream stream)
  sy_stream_destroy: { parameters: ["pointer"], result: "i32" },
  // sy_status sy_stream_wait_event(sy_stream stream, sy_event event)
  sy_stream_wait_event: { parameters: ["pointer", "pointer"], result: "i32" },
  // sy_status sy_stream_synchronize(sy_stream stream, int64_t timeout_ms)
  sy_stream_synchronize: {
    parameters: ["pointer", "i64"],
    result: "i32",
    nonblocking: true,
  },

  // sy_status sy_stream_native(sy_stream stream, void** out)
  sy_stream_native: { parameters: ["pointer", "buffer"], result: "i32" },

  // sy_status sy_event_create(sy_rank rank, sy_event* out)
  sy_event_create: { parameters: ["pointer", "buffer"], result: "i32" },
  // sy_status sy_event_destroy(sy_event event)
  sy_event_destroy: { parameters: ["pointer"], result: "i32" },
  // sy_status sy_event_record(sy_event event, sy_stream stream)
  sy_event_record: { parameters: ["pointer", "pointer"], result: "i32" },
  // sy_status sy_event_query(sy_event event)
  sy_event_query: { parameters: ["pointer"], result: "i32" },
  // sy_status sy_event_synchronize(sy_event event, int64_t timeout_ms)
  sy_event_synchronize: {
    parameters: ["pointer", "i64"],
    result: "i32",
    nonblocking: true,
  },
  // sy_status sy_event_elapsed(sy_event start, sy_event end, double* ms)
  sy_event_elapsed: { parameters: ["pointer", "pointer", "buffer"], result: "i32" },

  // sy_status sy_tensor_create(sy_rank rank, const sy_tensor_desc* desc, sy_tensor* out)
  sy_tensor_create: { parameters: ["pointer", "buffer", "buffer"], result: "i32" },
  // sy_status sy_tensor_destroy(sy_tensor tensor)
  sy_tensor_destroy: { parameters: ["pointer"], result: "i32" },
  // sy_status sy_tensor_describe(sy_tensor tensor, sy_tensor_desc* out)
  sy_tensor_describe: { parameters: ["pointer", "buffer"], result: "i32" },
  // sy_status sy_tensor_write(sy_tensor t, sy_stream s, const void* src, uint64_t bytes, int64_t timeout_ms)
  sy_tensor_write: {
    parameters: ["pointer", "pointer", "buffer", "u64", "i64"],
    result: "i32",
    nonblocking: true,
  },
  // sy_status sy_tensor_read(sy_tensor t, sy_stream s, void* dst, uint64_t bytes, int64_t timeout_ms)
  sy_tensor_read: {
    parameters: ["pointer", "pointer", "buffer", "u64", "i64"],
    result: "i32",
    nonblocking: true,
  },

  // sy_status sy_tensor_copy(sy_tensor dst, sy_tensor src, sy_stream stream): enqueues only
  sy_tensor_copy: { parameters: ["pointer", "pointer", "pointer"], result: "i32" },

  // sy_status sy_default_config(int32_t ranks, sy_config* out)
  sy_default_config: { parameters: ["i32", "buffer"], result: "i32" },
  // sy_status sy_plan_buffer(const sy_buffer_options* options, int32_t ranks, sy_buffer_plan* out)
  sy_plan_buffer: { parameters: ["buffer", "i32", "buffer"], result: "i32" },
  // sy_status sy_buffer_create(sy_rank rank, const sy_buffer_options* options, sy_buffer* out)
  sy_buffer_create: { parameters: ["pointer", "buffer", "buffer"], result: "i32" },
  // sy_status sy_buffer_destroy(sy_buffer buffer)
  sy_buffer_destroy: { parameters: ["pointer"], result: "i32" },
  // sy_status sy_buffer_export(sy_buffer buffer, sy_buffer_share* out)
  sy_buffer_export: { parameters: ["pointer", "buffer"], result: "i32" },
  // sy_status sy_buffer_import(sy_buffer buffer, const sy_buffer_share* share)
  sy_buffer_import: { parameters: ["pointer", "buffer"], result: "i32" },
  // sy_status sy_buffer_seal(sy_buffer buffer)
  sy_buffer_seal: { parameters: ["pointer"], result: "i32" },
  // sy_status sy_buffer_abandon(sy_buffer buffer, int32_t peer)
  sy_buffer_abandon: { parameters: ["pointer", "i32"], result: "i32" },
  // sy_status sy_buffer_comm_stream(sy_buffer buffer, sy_stream* out)
  sy_buffer_comm_stream: { parameters: ["pointer", "buffer"], result: "i32" },
  // sy_status sy_buffer_plan_get(sy_buffer buffer, sy_buffer_plan* out)
  sy_buffer_plan_get: { parameters: ["pointer", "buffer"], result: "i32" },
  // sy_status sy_buffer_network_stats(sy_buffer buffer, sy_network_stats* out)
  sy_buffer_network_stats: { parameters: ["pointer", "buffer"], result: "i32" },

  // sy_status sy_layout(sy_buffer buffer, const sy_layout_args* args, sy_layout_result* out)
  sy_layout: { parameters: ["pointer", "buffer", "buffer"], result: "i32" },
  // sy_status sy_dispatch(sy_buffer buffer, const sy_dispatch_args* args, sy_dispatch_result* out)
  sy_dispatch: { parameters: ["pointer", "buffer", "buffer"], result: "i32" },
  // The same function for exact-size mode, where it waits for the peers' counts.
  sy_dispatch_waiting: {
    name: "sy_dispatch",
    parameters: ["pointer", "buffer", "buffer"],
    result: "i32",
    nonblocking: true,
  },
  // sy_status sy_combine(sy_buffer buffer, const sy_combine_args* args, sy_combine_result* out)
  sy_combine: { parameters: ["pointer", "buffer", "buffer"], result: "i32" },
  // sy_status sy_reject(sy_buffer buffer, int32_t operation)
  sy_reject: { parameters: ["pointer", "i32"], result: "i32" },

  // sy_status sy_handle_destroy(sy_handle handle)
  sy_handle_destroy: { parameters: ["pointer"], result: "i32" },
  // sy_status sy_handle_info_get(sy_handle handle, sy_handle_info* info)
  sy_handle_info_get: { parameters: ["pointer", "buffer"], result: "i32" },
  // sy_status sy_handle_tensor(sy_handle handle, int32_t kind, sy_tensor* out)
  sy_handle_tensor: { parameters: ["pointer", "i32", "buffer"], result: "i32" },
  // sy_status sy_handle_expert_counts(sy_handle handle, int32_t* counts, int32_t capacity)
  sy_handle_expert_counts: { parameters: ["pointer", "buffer", "i32"], result: "i32" },

  // sy_status sy_ll_dispatch(sy_buffer buffer, const sy_ll_dispatch_args* args, sy_ll_dispatch_result* out)
  sy_ll_dispatch: { parameters: ["pointer", "buffer", "buffer"], result: "i32" },
  // sy_status sy_ll_combine(sy_buffer buffer, const sy_ll_combine_args* args, sy_ll_combine_result* out)
  sy_ll_combine: { parameters: ["pointer", "buffer", "buffer"], result: "i32" },
  // sy_status sy_hook_run(sy_hook hook)
  sy_hook_run: { parameters: ["pointer"], result: "i32" },
  // sy_status sy_hook_destroy(sy_hook hook)
  sy_hook_destroy: { parameters: ["pointer"], result: "i32" },
  // sy_status sy_ll_handle_destroy(sy_ll_handle handle)
  sy_ll_handle_destroy: { parameters: ["pointer"], result: "i32" },
  // sy_status sy_ll_handle_info_get(sy_ll_handle handle, sy_ll_handle_info* info)
  sy_ll_handle_info_get: { parameters: ["pointer", "buffer"], result: "i32" },
  // sy_status sy_ll_handle_tensor(sy_ll_handle handle, int32_t kind, sy_tensor* out)
  sy_ll_handle_tensor: { parameters: ["pointer", "i32", "buffer"], result: "i32" },
  // sy_status sy_ll_next_combine_buffer(sy_buffer buffer, sy_ll_handle handle, sy_tensor* out)
  sy_ll_next_combine_buffer: { parameters: ["pointer", "pointer", "buffer"], result: "i32" },
  // sy_status sy_ll_clean(sy_buffer buffer, sy_stream compute_stream, sy_event* done)
  sy_ll_clean: { parameters: ["pointer", "pointer", "buffer"], result: "i32" },
  // sy_status sy_mask_update(sy_buffer buffer, int32_t rank, int32_t masked)
  sy_mask_update: { parameters: ["pointer", "i32", "i32"], result: "i32" },
  // sy_status sy_mask_query(sy_buffer buffer, int32_t* mask, int32_t capacity)
  sy_mask_query: { parameters: ["pointer", "buffer", "i32"], result: "i32" },
  // sy_status sy_mask_clean(sy_buffer buffer)
  sy_mask_clean: { parameters: ["pointer"], result: "i32" },

  // sy_status sy_nccl_probe(const char* path, sy_nccl_info* info)
  sy_nccl_probe: { parameters: ["buffer", "buffer"], result: "i32" },
  // sy_status sy_group_nccl_unique_id(sy_group group, const char* path, uint8_t* id)
  sy_group_nccl_unique_id: { parameters: ["pointer", "buffer", "buffer"], result: "i32" },
  // sy_status sy_group_nccl_init(sy_group group, const char* path, const uint8_t* id)
  sy_group_nccl_init: { parameters: ["pointer", "buffer", "buffer"], result: "i32", nonblocking: true },
  // sy_status sy_host_info_get(sy_host_info* info)
  sy_host_info_get: { parameters: ["buffer"], result: "i32" },
  // sy_status sy_cuda_peer_access(int32_t a, int32_t b, int32_t* can_access, int32_t* native_atomics)
  sy_cuda_peer_access: { parameters: ["i32", "i32", "buffer", "buffer"], result: "i32" },
} as const satisfies Deno.ForeignLibraryInterface;

/** The opened library's functions. */
export type Symbols = Deno.DynamicLibrary<typeof symbols>["symbols"];

/** `sy_status` values. */
export const Status = {
  OK: 0,
  NOT_READY: 1,
  INVALID_ARGUMENT: 2,
  WRONG_HANDLE: 3,
  DISPOSED: 4,
  OUT_OF_MEMORY: 5,
  NO_DEVICE: 6,
  UNSUPPORTED: 7,
  TIMEOUT: 8,
  PEER_FAILED: 9,
  CUDA: 10,
  ABI_MISMATCH: 11,
  INTERNAL: 12,
} as const;

/** `sy_ll_flags` bits. */
export const LLFlags = {
  FP8: 1,
  ROUND_SCALE: 2,
  UE8M0: 4,
  ASYNC_FINISH: 8,
  RETURN_HOOK: 16,
  LOGFMT: 32,
  ZERO_COPY: 64,
} as const;

/** `sy_operation` values (sy_reject). */
export const Operation = {
  DISPATCH: 1,
  COMBINE: 2,
  LOW_LATENCY_DISPATCH: 3,
  LOW_LATENCY_COMBINE: 4,
} as const;

/** `sy_handle_tensor_kind` values. */
export const HandleTensorKind = {
  RANK_PREFIX_MATRIX: 0,
  RECV_SRC_IDX: 1,
  IS_TOKEN_IN_RANK: 2,
  SEND_SLOT: 3,
  RECV_SRC_RANK: 4,
  EXPANDED_ROW: 5,
} as const;
