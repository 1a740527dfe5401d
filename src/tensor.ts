/**
 * Tensors: memory on one rank (host memory or GPU memory), described like DLPack's DLTensor by
 * dtype, shape and strides in elements.
 *
 * @module
 */

import { TensorDesc } from "../ffi/structs.ts";
import {
  arrayFits,
  type DType,
  type DTypeArray,
  dtypeCode,
  dtypeFromCode,
  dtypeSize,
  fromBF16,
  fromFP8E4M3,
  impliedDType,
  isDType,
  newArray,
  type TensorArray,
  toBF16,
  toFP8E4M3,
} from "./dtype.ts";
import { SwitchyardError } from "./errors.ts";
import { check, instanceArg, integerArg, native, NativeResource, OutHandle } from "./native.ts";
import type { Rank } from "./rank.ts";
import { Stream } from "./stream.ts";

const MAX_DIMS = 8;

/** The description of a new tensor. */
export interface TensorSpec<D extends DType = DType> {
  /** Element type. */
  readonly dtype: D;
  /** Size of each dimension. */
  readonly shape: readonly number[];
  /** Elements between neighbours along each dimension; dense row-major when omitted. */
  readonly strides?: readonly number[];
}

/** The dtype a typed array implies (Uint8Array: bool or fp8_e4m3, so both). */
export type DTypeOf<A> = A extends Float32Array ? "f32"
  : A extends Int32Array ? "i32"
  : A extends BigInt64Array ? "i64"
  : A extends Uint16Array ? "bf16"
  : "bool" | "fp8_e4m3";

/** Options of the stream-ordered copies. */
export interface CopyOptions {
  /** The stream the copy is ordered on (default: the rank's compute stream). */
  readonly stream?: Stream;
  /** Deadline in milliseconds (default: the group's). */
  readonly timeoutMs?: number;
}

function checkDims(name: string, dims: readonly number[]): void {
  if (!Array.isArray(dims) || dims.length > MAX_DIMS) {
    throw new SwitchyardError("INVALID_ARGUMENT", `${name}: expected an array of at most ${MAX_DIMS} sizes`, {
      argument: name,
    });
  }
  for (const d of dims) {
    if (!Number.isSafeInteger(d) || d < 0) {
      throw new SwitchyardError("INVALID_ARGUMENT", `${name}: sizes must be non-negative integers, got ${d}`, {
        argument: name,
      });
    }
  }
}

function denseSize(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

/** A tensor living on one rank. Dispose it (`using`) when done; in-flight work keeps it alive. */
export class Tensor<D extends DType = DType> extends NativeResource {
  /** The rank whose memory holds the tensor. */
  readonly rank: Rank;
  #described?: { dtype: D; shape: readonly number[]; strides: readonly number[] };

  /** Wraps an owned `sy_tensor` handle. */
  constructor(pointer: Deno.PointerObject, rank: Rank) {
    super(pointer, (p) => native().sy_tensor_destroy(p), "tensor");
    this.rank = rank;
  }

  // Read from the library on first use: most outputs are passed on, never inspected.
  #describe(): { dtype: D; shape: readonly number[]; strides: readonly number[] } {
    if (this.#described) return this.#described;
    const p = this.pointer;
    const desc = TensorDesc.create();
    check(native().sy_tensor_describe(p, desc.bytes), p, "tensor describe");
    const ndim = desc.number("ndim");
    const shape: number[] = [];
    const strides: number[] = [];
    for (let i = 0; i < ndim; i++) {
      shape.push(Number(desc.getArray("shape", i)));
      strides.push(Number(desc.getArray("strides", i)));
    }
    this.#described = {
      dtype: dtypeFromCode(desc.number("dtype")) as D,
      shape: Object.freeze(shape),
      strides: Object.freeze(strides),
    };
    return this.#described;
  }

  /** Element type. */
  get dtype(): D {
    return this.#describe().dtype;
  }

  /** Size of each dimension. */
  get shape(): readonly number[] {
    return this.#describe().shape;
  }

  /** Elements between neighbours along each dimension. */
  get strides(): readonly number[] {
    return this.#describe().strides;
  }

  /** Number of elements. */
  get numel(): number {
    return denseSize(this.shape);
  }

  /** Bytes of the elements, densely packed (what `read` returns). */
  get byteLength(): number {
    return this.numel * dtypeSize(this.dtype);
  }

  /** A new zero-filled tensor on `rank`. */
  static empty<D extends DType>(rank: Rank, spec: TensorSpec<D>): Tensor<D> {
    if (!isDType(spec.dtype)) {
      throw new SwitchyardError("INVALID_ARGUMENT", `dtype: unknown dtype ${String(spec.dtype)}`, {
        argument: "dtype",
      });
    }
    checkDims("shape", spec.shape);
    const desc = TensorDesc.create().set("dtype", dtypeCode(spec.dtype)).set("ndim", spec.shape.length);
    spec.shape.forEach((d, i) => desc.setArray("shape", i, BigInt(d)));
    if (spec.strides) {
      checkDims("strides", spec.strides);
      if (spec.strides.length !== spec.shape.length) {
        throw new SwitchyardError("INVALID_ARGUMENT", "strides: needs one stride per dimension", {
          argument: "strides",
        });
      }
      spec.strides.forEach((s, i) => desc.setArray("strides", i, BigInt(s)));
    }
    const out = new OutHandle();
    check(native().sy_tensor_create(rank.pointer, desc.bytes, out.cell), rank.pointer, "tensor create");
    return new Tensor<D>(out.take(), rank);
  }

  /**
   * A new tensor on `rank` holding `data` (dense, row-major). The dtype comes from the array
   * when it implies one (Float32Array, Int32Array, BigInt64Array, Uint16Array = bf16); a
   * Uint8Array needs `dtype` (`"bool"` or `"fp8_e4m3"`).
   */
  static async from<A extends TensorArray, D extends DType = DTypeOf<A>>(
    rank: Rank,
    data: A,
    spec: { readonly dtype?: D; readonly shape: readonly number[]; readonly strides?: readonly number[] },
    options: CopyOptions = {},
  ): Promise<Tensor<D>> {
    const dtype = (spec.dtype ?? impliedDType(data)) as D | undefined;
    if (!dtype) {
      throw new SwitchyardError("INVALID_ARGUMENT", "dtype: a Uint8Array needs an explicit dtype (bool or fp8_e4m3)", {
        argument: "dtype",
      });
    }
    const t = Tensor.empty(rank, { dtype, shape: spec.shape, strides: spec.strides });
    try {
      await t.write(data, options);
    } catch (e) {
      t[Symbol.dispose]();
      throw e;
    }
    return t;
  }

  /** A new bf16, fp8_e4m3 or f32 tensor on `rank` from floats, rounded by the library. */
  static fromFloat32(
    rank: Rank,
    values: Float32Array,
    spec: { readonly dtype: "bf16" | "fp8_e4m3" | "f32"; readonly shape: readonly number[] },
    options: CopyOptions = {},
  ): Promise<Tensor> {
    switch (spec.dtype) {
      case "bf16":
        return Tensor.from(rank, toBF16(values), { dtype: "bf16", shape: spec.shape }, options);
      case "fp8_e4m3":
        return Tensor.from(rank, toFP8E4M3(values), { dtype: "fp8_e4m3", shape: spec.shape }, options);
      default:
        return Tensor.from(rank, values, { dtype: "f32", shape: spec.shape }, options);
    }
  }

  #stream(options: CopyOptions): Stream {
    const s = options.stream ?? this.rank.stream;
    return instanceArg("stream", s, Stream, "Stream");
  }

  /** Copies dense row-major `data` into the tensor, in stream order; resolves when done. */
  async write(data: TensorArray, options: CopyOptions = {}): Promise<void> {
    if (!ArrayBuffer.isView(data) || !arrayFits(this.dtype, data)) {
      throw new SwitchyardError(
        "INVALID_ARGUMENT",
        `data: a ${this.dtype} tensor needs a ${newArray(this.dtype, 0).constructor.name}`,
        {
          argument: "data",
        },
      );
    }
    if (data.byteLength !== this.byteLength) {
      throw new SwitchyardError(
        "INVALID_ARGUMENT",
        `data: the tensor [${
          this.shape.join(", ")
        }] ${this.dtype} holds ${this.byteLength} bytes, got ${data.byteLength}`,
        { argument: "data" },
      );
    }
    const stream = this.#stream(options);
    const p = this.pointer;
    const rc = await native().sy_tensor_write(
      p,
      stream.pointer,
      data,
      BigInt(data.byteLength),
      BigInt(integerArg("timeoutMs", options.timeoutMs ?? 0, 0, 2 ** 40)),
    );
    check(rc, p, "tensor write");
  }

  /**
   * Copies the tensor out, dense and row-major, in stream order: like `.cpu()`, it waits for the
   * work enqueued on the stream before it, and rejects with that work's failure.
   */
  async read(options: CopyOptions = {}): Promise<DTypeArray[D]> {
    const out = newArray(this.dtype, this.numel);
    const stream = this.#stream(options);
    const p = this.pointer;
    const rc = await native().sy_tensor_read(
      p,
      stream.pointer,
      out,
      BigInt(out.byteLength),
      BigInt(integerArg("timeoutMs", options.timeoutMs ?? 0, 0, 2 ** 40)),
    );
    check(rc, p, "tensor read");
    return out;
  }

  /**
   * Enqueues a copy of `src` into this tensor on the stream (default: the rank's compute stream)
   * and returns at once: both dense, of one rank, with the same dtype and element count. On the
   * CUDA backend it is a device-to-device copy, the baseline the benchmarks time next to each
   * operation.
   */
  copyFrom(src: Tensor<D>, options: { readonly stream?: Stream } = {}): void {
    instanceArg("src", src, Tensor, "Tensor");
    const stream = this.#stream(options);
    const p = this.pointer;
    check(native().sy_tensor_copy(p, src.pointer, stream.pointer), p, "tensor copy");
  }

  /** Reads a bf16, fp8_e4m3 or f32 tensor as floats. */
  async readFloat32(options: CopyOptions = {}): Promise<Float32Array> {
    const raw: TensorArray = await this.read(options);
    switch (this.dtype) {
      case "bf16":
        return fromBF16(raw as Uint16Array);
      case "fp8_e4m3":
        return fromFP8E4M3(raw as Uint8Array);
      case "f32":
        return raw as Float32Array;
      default:
        throw new SwitchyardError("INVALID_ARGUMENT", `readFloat32: a ${this.dtype} tensor holds no floats`, {
          argument: "dtype",
        });
    }
  }
}
