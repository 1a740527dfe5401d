/**
 * What each backend offers on this machine.
 *
 * @module
 */

import { BackendInfo as InfoStruct } from "../ffi/structs.ts";
import type { Backend } from "./group.ts";
import { check, native } from "./native.ts";

/** A backend's availability on this machine. */
export interface BackendInfo {
  /** The backend described. */
  readonly backend: Backend;
  /** Whether this build of the library contains it. */
  readonly compiled: boolean;
  /** Whether groups can be created on it now. */
  readonly available: boolean;
  /** Whether dispatch and combine run on it in this build. */
  readonly dispatchSupported: boolean;
  /**
   * CUDA: this build runs the CUDA backend's kernels on CPU threads (`SWITCHYARD_CUDA=CPU`, the
   * test build of `tests/cuda_on_cpu`), not on a GPU: nothing about GPU speed follows from it.
   */
  readonly executedOnCpu: boolean;
  /** CUDA devices found. */
  readonly deviceCount: number;
  /** The first device, e.g. "NVIDIA H100 80GB HBM3 (sm_90)". */
  readonly deviceName: string;
  /** CUDA runtime version linked into the library (e.g. 13000), 0 if none. */
  readonly cudaRuntimeVersion: number;
  /** CUDA driver version, 0 without a driver. */
  readonly cudaDriverVersion: number;
  /** NCCL headers the library was compiled against (e.g. 22907), 0 if none. */
  readonly ncclHeaderVersion: number;
  /** GPU architectures compiled in. */
  readonly compiledArchs: string;
  /** Why it is unavailable, if it is. */
  readonly reason: string;
}

/** Probes `backend` without creating anything. */
export function backendInfo(backend: Backend): BackendInfo {
  const info = InfoStruct.create();
  check(native().sy_backend_probe(backend === "cuda" ? 1 : 0, info.bytes), null, "backendInfo");
  return {
    backend,
    compiled: info.number("compiled") !== 0,
    available: info.number("available") !== 0,
    dispatchSupported: info.number("dispatch_supported") !== 0,
    executedOnCpu: info.number("executed_on_cpu") !== 0,
    deviceCount: info.number("device_count"),
    deviceName: info.string("device_name"),
    cudaRuntimeVersion: info.number("cuda_runtime_version"),
    cudaDriverVersion: info.number("cuda_driver_version"),
    ncclHeaderVersion: info.number("nccl_header_version"),
    compiledArchs: info.string("compiled_archs"),
    reason: info.string("reason"),
  };
}
