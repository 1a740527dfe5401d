/**
 * NCCL, the engine across nodes: found by absolute path (`SWITCHYARD_NCCL`, or a few standard
 * places), loaded privately, version-checked, and bootstrapped for process groups on the CUDA
 * backend through the rendezvous. Without it everything within a node still works, and the
 * group says why NCCL is off.
 *
 * @module
 */

import { NcclInfo as InfoStruct } from "../ffi/structs.ts";
import { denoEnv } from "./dist_env.ts";
import { check, native } from "./native.ts";

/** The environment variable naming the NCCL library to use. */
export const NCCL_ENV = "SWITCHYARD_NCCL";

/** Where NCCL is looked for when `SWITCHYARD_NCCL` is not set. */
export const NCCL_DEFAULT_PATHS: readonly string[] = [
  "/usr/lib/x86_64-linux-gnu/libnccl.so.2",
  "/usr/local/cuda/lib64/libnccl.so.2",
  "/usr/local/lib/libnccl.so.2",
  "/usr/lib64/libnccl.so.2",
];

/** What loading NCCL from one path gave. */
export interface NcclProbe {
  /** The path tried. */
  readonly path: string;
  /** Whether it is a usable NCCL. */
  readonly loaded: boolean;
  /** Its version code (e.g. 22907 for 2.29.7), 0 if not loaded. */
  readonly version: number;
  /** Whether it has the device API (2.28+). */
  readonly deviceApi: boolean;
  /** The NCCL headers the library was compiled against (0 if none). */
  readonly headerVersion: number;
  /** Why it cannot be used. */
  readonly error: string;
}

/** Whether NCCL is in use by a group, and if not, why. */
export interface NcclStatus {
  /** True when the group has an NCCL communicator. */
  readonly enabled: boolean;
  /** Its version, when enabled. */
  readonly version?: number;
  /** The library, when enabled. */
  readonly path?: string;
  /** Why it is off. */
  readonly reason?: string;
}

/** Tries NCCL at `path`. */
export function probeNccl(path: string): NcclProbe {
  const info = InfoStruct.create();
  check(native().sy_nccl_probe(new TextEncoder().encode(path + "\0"), info.bytes), null, "probeNccl");
  return {
    path,
    loaded: info.number("loaded") !== 0,
    version: info.number("version"),
    deviceApi: info.number("device_api") !== 0,
    headerVersion: info.number("header_version"),
    error: info.string("error"),
  };
}

/** Formats a version code: 22907 -> "2.29.7". */
export function ncclVersionString(code: number): string {
  return `${Math.floor(code / 10000)}.${Math.floor((code % 10000) / 100)}.${code % 100}`;
}

/** The first NCCL version whose GIN kernels may be built with older headers than it. */
const GIN_RUNTIME_VERSIONED = 23100;

/**
 * Whether `SWITCHYARD_NIC=gin` can work with this library and the NCCL `found` (from
 * {@linkcode findNccl}): the library built against NCCL's headers, and the NCCL loaded of the
 * device API and, before NCCL 2.31, of exactly the headers' version (GIN kernels need it; from
 * 2.31 on, at least it, as NCCL's notes say; not tried). Whether the NICs give NCCL a GIN backend is known only once a
 * communicator exists.
 */
export function ginReadiness(found: NcclProbe | undefined, headerVersion: number): { ready: boolean; text: string } {
  const no = (why: string) => ({ ready: false, text: `NCCL GIN (SWITCHYARD_NIC=gin): ${why}` });
  if (headerVersion === 0) {
    return no("this library was built without NCCL's headers (SWITCHYARD_NCCL_ROOT when it is built)");
  }
  const headers = ncclVersionString(headerVersion);
  if (!found?.loaded) return no(`no NCCL found (it needs NCCL ${headers}, the version of this library's headers)`);
  const at = `NCCL ${ncclVersionString(found.version)} at ${found.path}`;
  if (!found.deviceApi) return no(`${at} has no device API`);
  if (headerVersion < GIN_RUNTIME_VERSIONED ? found.version !== headerVersion : found.version < headerVersion) {
    return no(
      `${at}, this library's headers are ${headers}: ` +
        (headerVersion < GIN_RUNTIME_VERSIONED
          ? "before NCCL 2.31 GIN needs the same version"
          : "it needs at least that"),
    );
  }
  return {
    ready: true,
    text: `NCCL GIN (SWITCHYARD_NIC=gin): ${at} fits this library's headers; whether the NICs give NCCL a GIN ` +
      "backend is known once a communicator exists",
  };
}

/** The first usable NCCL among `SWITCHYARD_NCCL` (alone, when set) or the standard places. */
export function findNccl(): { found?: NcclProbe; tried: NcclProbe[] } {
  const override = denoEnv(NCCL_ENV);
  const paths = override ? [override] : NCCL_DEFAULT_PATHS;
  const tried: NcclProbe[] = [];
  for (const path of paths) {
    const p = probeNccl(path);
    tried.push(p);
    if (p.loaded) return { found: p, tried };
  }
  return { tried };
}

/** Why NCCL was not found, in one line. */
export function ncclNotFound(tried: readonly NcclProbe[]): string {
  const absent = tried.filter((t) => /No such file/.test(t.error)).map((t) => t.path);
  const other = tried.filter((t) => !/No such file/.test(t.error)).map((t) => t.error);
  const parts = [...(absent.length ? [`not at ${absent.join(", ")}`] : []), ...other];
  return `no usable NCCL (${parts.join("; ")}); set ${NCCL_ENV} to the absolute path of libnccl.so.2 ` +
    "(>= 2.29.7), e.g. from the nvidia-nccl-cu13 wheel";
}
