/**
 * The C structs of `switchyard.h`, described field by field in header order. Offsets follow the
 * x86-64 System V rules (each field aligned to its size, the struct to its largest field); the
 * loader compares every size with `sy_struct_sizes()` before the first call.
 *
 * @module
 */

/** A field's C type. `char[N]` is written `chars:N`. */
export type FieldType = "u32" | "i32" | "i64" | "u64" | "f64" | "ptr" | `chars:${number}` | `i64x${number}`;

/** A struct layout: field offsets and the total size. */
export class StructLayout<F extends string> {
  /** Byte offset of each field. */
  readonly offsets: Readonly<Record<F, number>>;
  /** The field types, by name. */
  readonly types: Readonly<Record<F, FieldType>>;
  /** sizeof() of the struct. */
  readonly size: number;

  /** Lays out `fields` (in C declaration order). */
  constructor(readonly name: string, fields: readonly (readonly [F, FieldType])[]) {
    const offsets = {} as Record<F, number>;
    const types = {} as Record<F, FieldType>;
    let offset = 0;
    let maxAlign = 1;
    for (const [field, type] of fields) {
      const [size, align] = sizeOf(type);
      offset = Math.ceil(offset / align) * align;
      offsets[field] = offset;
      types[field] = type;
      offset += size;
      maxAlign = Math.max(maxAlign, align);
    }
    this.offsets = offsets;
    this.types = types;
    this.size = Math.ceil(offset / maxAlign) * maxAlign;
  }

  /** A zeroed instance with `struct_size` set. */
  create(): StructBuffer<F> {
    const s = new StructBuffer(this);
    s.set("struct_size" as F, this.size);
    return s;
  }
}

function sizeOf(type: FieldType): [number, number] {
  if (type.startsWith("chars:")) return [Number(type.slice(6)), 1];
  if (type.startsWith("i64x")) return [8 * Number(type.slice(4)), 8];
  switch (type) {
    case "u32":
    case "i32":
      return [4, 4];
    default:
      return [8, 8];
  }
}

/** One struct's bytes, readable and writable by field name. */
export class StructBuffer<F extends string> {
  /** The bytes handed to C. */
  readonly bytes: Uint8Array;
  readonly #view: DataView;

  /** A zeroed struct of `layout`. */
  constructor(readonly layout: StructLayout<F>) {
    this.bytes = new Uint8Array(layout.size);
    this.#view = new DataView(this.bytes.buffer);
  }

  /** Writes a numeric field (bigint for 64-bit fields is accepted too). */
  set(field: F, value: number | bigint): this {
    const off = this.layout.offsets[field];
    switch (this.layout.types[field]) {
      case "u32":
        this.#view.setUint32(off, Number(value), true);
        break;
      case "i32":
        this.#view.setInt32(off, Number(value), true);
        break;
      case "i64":
        this.#view.setBigInt64(off, BigInt(value), true);
        break;
      case "f64":
        this.#view.setFloat64(off, Number(value), true);
        break;
      default:
        this.#view.setBigUint64(off, BigInt(value), true);
    }
    return this;
  }

  /** Writes a pointer field from a handle (null = NULL). */
  setPointer(field: F, pointer: Deno.PointerObject | null): this {
    const v = pointer === null ? 0n : BigInt(Deno.UnsafePointer.value(pointer));
    this.#view.setBigUint64(this.layout.offsets[field], v, true);
    return this;
  }

  /** Writes a NUL-terminated `char[N]` field (throws if it does not fit). */
  setString(field: F, value: string): this {
    const off = this.layout.offsets[field];
    const n = Number(this.layout.types[field].slice(6));
    const bytes = new TextEncoder().encode(value);
    if (bytes.length >= n) throw new RangeError(`${String(field)}: ${bytes.length} bytes do not fit in char[${n}]`);
    this.bytes.fill(0, off, off + n);
    this.bytes.set(bytes, off);
    return this;
  }

  /** Writes element `index` of an `i64xN` array field. */
  setArray(field: F, index: number, value: bigint): this {
    this.#view.setBigInt64(this.layout.offsets[field] + 8 * index, value, true);
    return this;
  }

  /** Reads element `index` of an `i64xN` array field. */
  getArray(field: F, index: number): bigint {
    return this.#view.getBigInt64(this.layout.offsets[field] + 8 * index, true);
  }

  /** Reads a 32-bit or f64 field as a number. */
  number(field: F): number {
    const off = this.layout.offsets[field];
    switch (this.layout.types[field]) {
      case "u32":
        return this.#view.getUint32(off, true);
      case "i32":
        return this.#view.getInt32(off, true);
      case "f64":
        return this.#view.getFloat64(off, true);
      default:
        return Number(this.#view.getBigInt64(off, true));
    }
  }

  /** Reads a 64-bit field as a bigint. */
  bigint(field: F): bigint {
    return this.#view.getBigInt64(this.layout.offsets[field], true);
  }

  /** Reads a pointer field (null for NULL). */
  pointer(field: F): Deno.PointerObject | null {
    const v = this.#view.getBigUint64(this.layout.offsets[field], true);
    return v === 0n ? null : Deno.UnsafePointer.create(v);
  }

  /** Reads a NUL-terminated `char[N]` field. */
  string(field: F): string {
    const off = this.layout.offsets[field];
    const n = Number(this.layout.types[field].slice(6));
    let end = off;
    while (end < off + n && this.bytes[end] !== 0) end++;
    return new TextDecoder().decode(this.bytes.subarray(off, end));
  }
}

/** `sy_error_info` */
export const ErrorInfo = new StructLayout(
  "sy_error_info",
  [
    ["struct_size", "u32"],
    ["status", "i32"],
    ["rank", "i32"],
    ["peer_rank", "i32"],
    ["role", "i32"],
    ["channel", "i32"],
    ["expected", "i64"],
    ["observed", "i64"],
    ["waited_seconds", "f64"],
    ["argument", "chars:64"],
    ["message", "chars:1024"],
  ] as const,
);

/** `sy_backend_info` */
export const BackendInfo = new StructLayout(
  "sy_backend_info",
  [
    ["struct_size", "u32"],
    ["backend", "i32"],
    ["compiled", "u32"],
    ["available", "u32"],
    ["device_count", "i32"],
    ["cuda_runtime_version", "i32"],
    ["cuda_driver_version", "i32"],
    ["nccl_header_version", "i32"],
    ["dispatch_supported", "u32"],
    ["executed_on_cpu", "u32"],
    ["device_name", "chars:256"],
    ["compiled_archs", "chars:128"],
    ["reason", "chars:512"],
  ] as const,
);

/** `sy_group_options` */
export const GroupOptions = new StructLayout(
  "sy_group_options",
  [
    ["struct_size", "u32"],
    ["backend", "i32"],
    ["ranks", "i32"],
    ["first_device", "i32"],
    ["timeout_ms", "i64"],
    ["ranks_per_node", "i32"],
    ["reserved", "i32"],
    ["emulated_nic_bytes_per_second", "f64"],
    ["emulated_nic_latency_ns", "i64"],
  ] as const,
);

/** `sy_rank_info` */
export const RankInfo = new StructLayout(
  "sy_rank_info",
  [
    ["struct_size", "u32"],
    ["rank", "i32"],
    ["num_ranks", "i32"],
    ["backend", "i32"],
    ["device", "i32"],
    ["local_ranks", "i32"],
    ["timeout_ms", "i64"],
    ["node", "i32"],
    ["ranks_per_node", "i32"],
  ] as const,
);

/** `sy_tensor_desc` */
export const TensorDesc = new StructLayout(
  "sy_tensor_desc",
  [
    ["struct_size", "u32"],
    ["dtype", "i32"],
    ["ndim", "i32"],
    ["reserved", "i32"],
    ["shape", "i64x8"],
    ["strides", "i64x8"],
    ["data", "u64"],
    ["device", "i32"],
    ["reserved2", "i32"],
  ] as const,
);

/** `sy_buffer_options` */
export const BufferOptions = new StructLayout(
  "sy_buffer_options",
  [
    ["struct_size", "u32"],
    ["hidden", "i32"],
    ["max_tokens_per_rank", "i32"],
    ["num_sms", "i32"],
    ["timeout_ms", "i64"],
    ["ll_num_experts", "i32"],
    ["enable_masking", "u32"],
    ["ranks_per_node", "i32"],
    ["internode_path", "i32"],
    ["network_ring_entries", "i32"],
    ["reserved", "i32"],
  ] as const,
);

/** `sy_buffer_plan` */
export const BufferPlan = new StructLayout(
  "sy_buffer_plan",
  [
    ["struct_size", "u32"],
    ["record_bytes", "i32"],
    ["combine_row_bytes", "i32"],
    ["max_topk", "i32"],
    ["header_bytes", "u64"],
    ["dispatch_region_bytes", "u64"],
    ["combine_region_bytes", "u64"],
    ["total_bytes", "u64"],
    ["max_recv_rows", "i64"],
    ["ll_half_bytes", "u64"],
    ["ll_message_bytes", "i32"],
    ["ll_combine_row_bytes", "i32"],
    ["net_record_bytes", "i32"],
    ["net_partial_bytes", "i32"],
    ["net_region_bytes", "u64"],
    ["net_result_bytes", "i32"],
    ["net_ring_entries", "i32"],
  ] as const,
);

/** `sy_config` */
export const ConfigStruct = new StructLayout(
  "sy_config",
  [
    ["struct_size", "u32"],
    ["num_sms", "i32"],
    ["nvl_chunk_send", "i32"],
    ["nvl_chunk_recv", "i32"],
    ["rdma_chunk_send", "i32"],
    ["rdma_chunk_recv", "i32"],
  ] as const,
);

/** `sy_layout_args` */
export const LayoutArgs = new StructLayout(
  "sy_layout_args",
  [
    ["struct_size", "u32"],
    ["num_experts", "i32"],
    ["topk_idx", "ptr"],
    ["compute_stream", "ptr"],
    ["previous_event", "ptr"],
    ["async_finish", "u32"],
    ["allocate_on_comm_stream", "u32"],
  ] as const,
);

/** `sy_layout_result` */
export const LayoutResult = new StructLayout(
  "sy_layout_result",
  [
    ["struct_size", "u32"],
    ["reserved", "u32"],
    ["num_tokens_per_rank", "ptr"],
    ["num_tokens_per_expert", "ptr"],
    ["is_token_in_rank", "ptr"],
    ["event", "ptr"],
    ["num_tokens_per_node", "ptr"],
    ["is_token_in_node", "ptr"],
  ] as const,
);

/** `sy_dispatch_args` */
export const DispatchArgs = new StructLayout(
  "sy_dispatch_args",
  [
    ["struct_size", "u32"],
    ["num_experts", "i32"],
    ["x", "ptr"],
    ["x_scales", "ptr"],
    ["topk_idx", "ptr"],
    ["topk_weights", "ptr"],
    ["is_token_in_rank", "ptr"],
    ["handle", "ptr"],
    ["compute_stream", "ptr"],
    ["previous_event", "ptr"],
    ["num_worst_tokens", "i64"],
    ["timeout_ms", "i64"],
    ["expert_alignment", "i32"],
    ["layout", "i32"],
    ["async_finish", "u32"],
    ["allocate_on_comm_stream", "u32"],
    ["zero_padding", "u32"],
    ["reserved", "u32"],
  ] as const,
);

/** `sy_dispatch_result` */
export const DispatchResult = new StructLayout(
  "sy_dispatch_result",
  [
    ["struct_size", "u32"],
    ["num_local_experts", "i32"],
    ["recv_x", "ptr"],
    ["recv_x_scales", "ptr"],
    ["recv_topk_idx", "ptr"],
    ["recv_topk_weights", "ptr"],
    ["recv_count", "ptr"],
    ["handle", "ptr"],
    ["event", "ptr"],
    ["num_recv_tokens", "i64"],
    ["num_rows", "i64"],
  ] as const,
);

/** `sy_combine_args` */
export const CombineArgs = new StructLayout(
  "sy_combine_args",
  [
    ["struct_size", "u32"],
    ["internode_reduction", "u32"],
    ["x", "ptr"],
    ["handle", "ptr"],
    ["topk_weights", "ptr"],
    ["bias0", "ptr"],
    ["bias1", "ptr"],
    ["out", "ptr"],
    ["compute_stream", "ptr"],
    ["previous_event", "ptr"],
    ["async_finish", "u32"],
    ["allocate_on_comm_stream", "u32"],
  ] as const,
);

/** `sy_combine_result` */
export const CombineResult = new StructLayout(
  "sy_combine_result",
  [
    ["struct_size", "u32"],
    ["reserved", "u32"],
    ["combined_x", "ptr"],
    ["combined_topk_weights", "ptr"],
    ["event", "ptr"],
  ] as const,
);

/** `sy_handle_info` */
export const HandleInfo = new StructLayout(
  "sy_handle_info",
  [
    ["struct_size", "u32"],
    ["rank", "i32"],
    ["num_ranks", "i32"],
    ["num_experts", "i32"],
    ["num_local_experts", "i32"],
    ["num_topk", "i32"],
    ["layout", "i32"],
    ["expert_alignment", "i32"],
    ["hidden", "i32"],
    ["reserved", "i32"],
    ["num_tokens", "i64"],
    ["num_recv_tokens", "i64"],
    ["num_rows", "i64"],
  ] as const,
);

/** `sy_ll_dispatch_args` */
export const LLDispatchArgs = new StructLayout(
  "sy_ll_dispatch_args",
  [
    ["struct_size", "u32"],
    ["flags", "u32"],
    ["x", "ptr"],
    ["topk_idx", "ptr"],
    ["cumulative_local_expert_recv_stats", "ptr"],
    ["dispatch_wait_recv_cost_stats", "ptr"],
    ["compute_stream", "ptr"],
  ] as const,
);

/** `sy_ll_dispatch_result` */
export const LLDispatchResult = new StructLayout(
  "sy_ll_dispatch_result",
  [
    ["struct_size", "u32"],
    ["num_local_experts", "i32"],
    ["recv_x", "ptr"],
    ["recv_x_scales", "ptr"],
    ["recv_count", "ptr"],
    ["handle", "ptr"],
    ["event", "ptr"],
    ["hook", "ptr"],
  ] as const,
);

/** `sy_ll_combine_args` */
export const LLCombineArgs = new StructLayout(
  "sy_ll_combine_args",
  [
    ["struct_size", "u32"],
    ["flags", "u32"],
    ["x", "ptr"],
    ["topk_idx", "ptr"],
    ["topk_weights", "ptr"],
    ["handle", "ptr"],
    ["out", "ptr"],
    ["combine_wait_recv_cost_stats", "ptr"],
    ["compute_stream", "ptr"],
  ] as const,
);

/** `sy_ll_combine_result` */
export const LLCombineResult = new StructLayout(
  "sy_ll_combine_result",
  [
    ["struct_size", "u32"],
    ["reserved", "u32"],
    ["combined_x", "ptr"],
    ["event", "ptr"],
    ["hook", "ptr"],
  ] as const,
);

/** `sy_ll_handle_info` */
export const LLHandleInfo = new StructLayout(
  "sy_ll_handle_info",
  [
    ["struct_size", "u32"],
    ["rank", "i32"],
    ["num_ranks", "i32"],
    ["num_experts", "i32"],
    ["num_local_experts", "i32"],
    ["max_tokens_per_rank", "i32"],
    ["hidden", "i32"],
    ["num_tokens", "i32"],
    ["call", "u32"],
    ["received", "u32"],
  ] as const,
);

/** `sy_process_group_options` */
export const ProcessGroupOptions = new StructLayout(
  "sy_process_group_options",
  [
    ["struct_size", "u32"],
    ["backend", "i32"],
    ["world_size", "i32"],
    ["rank", "i32"],
    ["local_rank", "i32"],
    ["local_world_size", "i32"],
    ["device", "i32"],
    ["reserved", "i32"],
    ["timeout_ms", "i64"],
    ["emulated_nic_bytes_per_second", "f64"],
    ["emulated_nic_latency_ns", "i64"],
  ] as const,
);

/** `sy_buffer_share` */
export const BufferShare = new StructLayout(
  "sy_buffer_share",
  [
    ["struct_size", "u32"],
    ["rank", "i32"],
    ["hidden", "i32"],
    ["max_tokens_per_rank", "i32"],
    ["ll_num_experts", "i32"],
    ["enable_masking", "i32"],
    ["bytes", "u64"],
    ["name", "chars:256"],
    ["ranks_per_node", "i32"],
    ["internode_path", "i32"],
    ["network_ring_entries", "i32"],
    ["reserved", "i32"],
    ["network_endpoint", "chars:1024"],
  ] as const,
);

/** `sy_nccl_info` */
export const NcclInfo = new StructLayout(
  "sy_nccl_info",
  [
    ["struct_size", "u32"],
    ["loaded", "i32"],
    ["version", "i32"],
    ["device_api", "i32"],
    ["header_version", "i32"],
    ["reserved", "i32"],
    ["error", "chars:512"],
  ] as const,
);

/** `sy_host_info` */
export const HostInfo = new StructLayout(
  "sy_host_info",
  [
    ["struct_size", "u32"],
    ["cpus", "i32"],
    ["shm_total_bytes", "u64"],
    ["shm_free_bytes", "u64"],
  ] as const,
);

/** `sy_network_stats` */
export const NetworkStats = new StructLayout(
  "sy_network_stats",
  [
    ["struct_size", "u32"],
    ["reserved", "u32"],
    ["records", "u64"],
    ["bytes", "u64"],
    ["puts", "u64"],
  ] as const,
);

/** Every struct in `sy_struct_id` order, for the load-time size check. */
export const ALL_STRUCTS: readonly StructLayout<string>[] = [
  ErrorInfo,
  BackendInfo,
  GroupOptions,
  RankInfo,
  TensorDesc,
  BufferOptions,
  BufferPlan,
  ConfigStruct,
  LayoutArgs,
  LayoutResult,
  DispatchArgs,
  DispatchResult,
  CombineArgs,
  CombineResult,
  HandleInfo,
  LLDispatchArgs,
  LLDispatchResult,
  LLCombineArgs,
  LLCombineResult,
  LLHandleInfo,
  ProcessGroupOptions,
  BufferShare,
  NcclInfo,
  HostInfo,
  NetworkStats,
];
