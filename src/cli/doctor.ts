/**
 * `switchyard doctor` (`deno task doctor`): what this machine offers Switchyard and what is
 * missing. Every line starts with OK, NOTE or FIX; a FIX line says what to do.
 *
 * @module
 */

import { HostInfo } from "../../ffi/structs.ts";
import { LIBRARY_ENV, loadLibrary } from "../../ffi/library.ts";
import { ABI_VERSION } from "../../ffi/symbols.ts";
import { backendInfo } from "../backend.ts";
import { bufferSizeHint } from "../config.ts";
import { findNccl, ginReadiness, NCCL_ENV, ncclNotFound, ncclVersionString, probeNccl } from "../nccl.ts";
import { check, native } from "../native.ts";
import { denoEnv } from "../dist_env.ts";
import { jobSecretPlace } from "../job_secret.ts";
import { acrossNodesFindings } from "./doctor_nodes.ts";

/** One finding. */
export interface Finding {
  /** OK: works; NOTE: works with a caveat; FIX: something is missing, and how to get it. */
  readonly level: "OK" | "NOTE" | "FIX";
  /** What was checked and what was found. */
  readonly text: string;
}

const gib = (b: number) => `${(b / 2 ** 30).toFixed(1)} GiB`;

function permissions(): Finding {
  const wanted = ["ffi", "env", "read", "net", "run"] as const;
  const missing = wanted.filter((name) => Deno.permissions.querySync({ name }).state !== "granted");
  return missing.length
    ? {
      level: missing.includes("ffi") ? "FIX" : "NOTE",
      text: `Deno ${Deno.version.deno}: missing --allow-${missing.join(", --allow-")} ` +
        "(ffi loads the library; env reads RANK etc.; net is the rendezvous; run starts ranks)",
    }
    : { level: "OK", text: `Deno ${Deno.version.deno}, permissions ffi env read net run` };
}

/** A Python wheel's NCCL (nvidia-nccl-cu13), if python3 can find one. */
async function wheelNccl(): Promise<string | undefined> {
  try {
    const out = await new Deno.Command("python3", {
      args: ["-c", "import nvidia.nccl, os; print(os.path.join(nvidia.nccl.__path__[0], 'lib', 'libnccl.so.2'))"],
      stdout: "piped",
      stderr: "null",
    }).output();
    const path = new TextDecoder().decode(out.stdout).trim();
    return out.code === 0 && path ? path : undefined;
  } catch {
    return undefined;
  }
}

/** Runs every check. */
export async function diagnose(): Promise<Finding[]> {
  const out: Finding[] = [permissions()];
  const lib = loadLibrary();
  if (!lib.ok) {
    out.push({ level: "FIX", text: `${lib.failure.message}` });
    return out;
  }
  const version = native().sy_version_string();
  out.push({
    level: "OK",
    text:
      `libswitchyard ${
        version ? Deno.UnsafePointerView.getCString(version) : "?"
      }, ABI ${ABI_VERSION}, at ${lib.path}` +
      ` (${LIBRARY_ENV} overrides)`,
  });
  out.push({ level: "OK", text: "host backend: dispatch, combine and the low-latency mode on CPU threads" });

  const cuda = backendInfo("cuda");
  if (!cuda.compiled) {
    out.push({ level: "FIX", text: `CUDA backend not built: ${cuda.reason}` });
  } else if (!cuda.available) {
    out.push({
      level: "NOTE",
      text: `CUDA backend built for ${cuda.compiledArchs} (runtime ${cuda.cudaRuntimeVersion}) but unavailable: ` +
        `${cuda.reason}; install an NVIDIA driver on a GPU machine, or use backend "host"`,
    });
  } else if (cuda.executedOnCpu) {
    out.push({
      level: "NOTE",
      text: `${cuda.deviceName}: this library is the test build (SWITCHYARD_CUDA=CPU) that runs the CUDA ` +
        "backend's kernels on CPU threads; for a GPU, build with nvcc (deno task build)",
    });
    out.push({ level: "OK", text: "CUDA IPC: the CPU executor shares device memory between this user's processes" });
  } else {
    out.push({
      level: cuda.dispatchSupported ? "OK" : "NOTE",
      text: `CUDA: ${cuda.deviceCount} device(s), ${cuda.deviceName}, driver ${cuda.cudaDriverVersion}, runtime ` +
        `${cuda.cudaRuntimeVersion}, kernels for ${cuda.compiledArchs}` +
        (cuda.dispatchSupported ? "" : "; dispatch/combine do not run on CUDA in this build yet"),
    });
    for (let a = 0; a < cuda.deviceCount; a++) {
      for (let b = 0; b < cuda.deviceCount; b++) {
        if (a === b) continue;
        const can = new Int32Array(1), atomics = new Int32Array(1);
        check(native().sy_cuda_peer_access(a, b, can, atomics), null, "peer access");
        out.push({
          level: can[0] ? "OK" : "FIX",
          text: can[0]
            ? `GPU ${a} -> GPU ${b}: peer access, native atomics ${atomics[0] ? "yes (NVLink-class)" : "no (PCIe?)"}`
            : `GPU ${a} -> GPU ${b}: no peer access; intranode kernels need P2P (NVLink or a P2P-capable PCIe switch)`,
        });
      }
    }
    out.push(cudaIpcNote());
  }

  const { found, tried } = findNccl();
  const wheel = found ? undefined : await wheelNccl();
  const nccl = found ?? (wheel ? probeNccl(wheel) : undefined);
  if (nccl?.loaded) {
    const old = nccl.version < 22907;
    out.push({
      level: old ? "FIX" : "OK",
      text: `NCCL ${ncclVersionString(nccl.version)} at ${nccl.path}, device API ${nccl.deviceApi ? "yes" : "no"}` +
        (old ? "; the transports need >= 2.29.7" : "") +
        (found ? "" : `; set ${NCCL_ENV}=${nccl.path} to use it`) +
        "; the GIN type is known once a communicator exists",
    });
  } else {
    out.push({
      level: "NOTE",
      text: `NCCL: ${ncclNotFound(wheel ? [...tried, probeNccl(wheel)] : tried)}. Within one node nothing needs it.`,
    });
  }
  if (cuda.compiled && !cuda.executedOnCpu) {
    const gin = ginReadiness(nccl, cuda.ncclHeaderVersion);
    out.push({ level: gin.ready ? "OK" : "NOTE", text: gin.text });
  }

  out.push(...acrossNodesFindings());

  const host = HostInfo.create();
  check(native().sy_host_info_get(host.bytes), null, "host info");
  const shmTotal = host.number("shm_total_bytes"), shmFree = host.number("shm_free_bytes");
  const need = bufferSizeHint({ ranks: 8, hidden: 7168, maxTokensPerRank: 4096 }).totalBytes;
  if (shmTotal === 0) {
    out.push({ level: "FIX", text: "no /dev/shm: process groups on the host backend need POSIX shared memory" });
  } else {
    out.push({
      level: shmFree >= 8 * need ? "OK" : "NOTE",
      text: `/dev/shm: ${gib(shmFree)} free of ${gib(shmTotal)}; 8 host-backend ranks at 4096 tokens x 7168 need ` +
        `${gib(8 * need)} (pages are committed as used)` +
        (shmFree >= 8 * need ? "" : "; enlarge it (e.g. docker --shm-size) for large host-backend jobs"),
    });
  }
  out.push({ level: "OK", text: `${host.number("cpus")} CPUs` });
  out.push({ level: "OK", text: rendezvousRule(denoEnv) });
  return out;
}

/** Who may join a process group's rendezvous, as the environment has it now. */
/**
 * What one rank per process on the CUDA backend needs beyond peer access: the processes open each
 * other's buffers by CUDA IPC handle, which crosses containers only when they share the IPC and
 * PID namespaces; processes on one GPU run side by side only under MPS.
 */
function cudaIpcNote(): Finding {
  const pipes = Deno.env.get("CUDA_MPS_PIPE_DIRECTORY") ?? "/tmp/nvidia-mps";
  let mps = false;
  try {
    mps = Deno.statSync(`${pipes}/control`).isFile === false;
  } catch {
    mps = false;
  }
  return {
    level: "NOTE",
    text: "CUDA IPC (process groups): the ranks open each other's buffers by IPC handle; ranks in separate " +
      "containers need shared IPC and PID namespaces (docker --ipc=host --pid=host). MPS " +
      (mps ? `is running (${pipes}): processes on one GPU run side by side` : "is not running: processes that " +
        "share a GPU take turns on it (nvidia-cuda-mps-control -d runs them side by side)"),
  };
}

function rendezvousRule(get: (name: string) => string | undefined): string {
  if (get("SWITCHYARD_TOKEN")) return "rendezvous: SWITCHYARD_TOKEN is set; every rank must present it";
  const { dir } = jobSecretPlace(get, Number(get("MASTER_PORT") ?? 29500));
  return `rendezvous: no SWITCHYARD_TOKEN, so the ranks of one host share a per-job secret in ${dir} ` +
    "(this user only: rank 0 writes it, needing --allow-write); a store beyond loopback needs SWITCHYARD_TOKEN " +
    "(deno task launch sets one)";
}

if (import.meta.main) {
  const findings = await diagnose();
  for (const f of findings) console.log(`${f.level.padEnd(4)} ${f.text}`);
  Deno.exit(findings.some((f) => f.level === "FIX") ? 1 : 0);
}
