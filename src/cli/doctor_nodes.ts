/**
 * What `doctor` says about running across nodes: the RDMA NICs the kernel knows
 * (`/sys/class/infiniband`), whether `libibverbs` loads, and which NICs share a NUMA node with
 * each GPU (GPU-NIC affinity: traffic between a GPU and a NIC on another socket crosses the CPU
 * interconnect). Read from sysfs and procfs, so the checks work without CUDA; tests point them at
 * a made-up tree.
 *
 * @module
 */

/** Where the probes read the machine's description. */
export interface SystemRoots {
  /** sysfs, normally `/sys`. */
  readonly sys: string;
  /** procfs, normally `/proc`. */
  readonly proc: string;
}

/** One finding, as `doctor` prints it. */
export interface NodeFinding {
  /** OK: works; NOTE: works with a caveat; FIX: something is missing, and how to get it. */
  readonly level: "OK" | "NOTE" | "FIX";
  /** What was checked and what was found. */
  readonly text: string;
}

/** One port of an RDMA device. */
export interface RdmaPort {
  readonly port: number;
  /** `ACTIVE`, `DOWN`, ... (the kernel's `state` without its number). */
  readonly state: string;
  /** `InfiniBand` or `Ethernet` (RoCE). */
  readonly linkLayer: string;
  /** As the kernel says it, e.g. `400 Gb/sec (4X NDR)`. */
  readonly rate: string;
  /** Ethernet (RoCE): the indices of its populated RoCE v2 GIDs. */
  readonly rocev2Gids: number[];
}

/** An RDMA device the kernel knows. */
export interface RdmaDevice {
  readonly name: string;
  readonly ports: RdmaPort[];
  /** The NUMA node of its PCI device (-1: unknown). */
  readonly numaNode: number;
}

/** A GPU the NVIDIA driver knows, by PCI bus id. */
export interface GpuPlace {
  readonly busId: string;
  /** The NUMA node of its PCI device (-1: unknown). */
  readonly numaNode: number;
}

function read(path: string): string | undefined {
  try {
    return Deno.readTextFileSync(path).trim();
  } catch {
    return undefined;
  }
}

function names(dir: string): string[] {
  try {
    return [...Deno.readDirSync(dir)].map((e) => e.name).sort();
  } catch {
    return [];
  }
}

function numaNode(path: string): number {
  const n = Number(read(path));
  return Number.isInteger(n) ? n : -1;
}

/** The RDMA devices under `<sys>/class/infiniband`, with their ports and NUMA nodes. */
export function rdmaDevices(roots: SystemRoots): RdmaDevice[] {
  const base = `${roots.sys}/class/infiniband`;
  return names(base).map((name) => ({
    name,
    numaNode: numaNode(`${base}/${name}/device/numa_node`),
    ports: names(`${base}/${name}/ports`).filter((p) => /^\d+$/.test(p)).map((p) => {
      const dir = `${base}/${name}/ports/${p}`;
      return {
        port: Number(p),
        state: (read(`${dir}/state`) ?? "unknown").replace(/^\d+:\s*/, ""),
        linkLayer: read(`${dir}/link_layer`) ?? "unknown",
        rate: read(`${dir}/rate`) ?? "unknown",
        rocev2Gids: names(`${dir}/gid_attrs/types`).filter((i) => /^\d+$/.test(i))
          .filter((i) => read(`${dir}/gid_attrs/types/${i}`) === "RoCE v2")
          .filter((i) => !/^[0:]*$/.test(read(`${dir}/gids/${i}`) ?? ""))
          .map(Number).sort((a, b) => a - b),
      };
    }),
  }));
}

/** The GPUs under `<proc>/driver/nvidia/gpus` (named by bus id), with their NUMA nodes. */
export function gpuPlaces(roots: SystemRoots): GpuPlace[] {
  return names(`${roots.proc}/driver/nvidia/gpus`).map((busId) => ({
    busId,
    numaNode: numaNode(`${roots.sys}/bus/pci/devices/${busId.toLowerCase()}/numa_node`),
  }));
}

/**
 * How GPU memory can be registered with a NIC here: the `nvidia-peermem` module loaded (for
 * `ibv_reg_mr`), and NVIDIA's open kernel module (whose driver exports GPU memory as dma-buf).
 */
export function gpuMemoryRegistration(roots: SystemRoots): { peermem: boolean; openKernelModule: boolean } {
  let peermem = false;
  try {
    peermem = Deno.statSync(`${roots.sys}/module/nvidia_peermem`).isDirectory;
  } catch {
    // not loaded
  }
  return { peermem, openKernelModule: /Open Kernel Module/.test(read(`${roots.proc}/driver/nvidia/version`) ?? "") };
}

/** Whether `libibverbs.so.1` loads here (it is opened and closed again, no symbol bound). */
export function ibverbsLoads(): { ok: true } | { ok: false; reason: string } {
  try {
    Deno.dlopen("libibverbs.so.1", {}).close();
    return { ok: true };
  } catch (e) {
    return { ok: false, reason: e instanceof Error ? e.message.split("\n")[0] : String(e) };
  }
}

/**
 * The findings about running across nodes: NICs and their ports, `libibverbs`, GPU-NIC affinity,
 * and what Switchyard does across nodes today.
 */
export function acrossNodesFindings(
  roots: SystemRoots = { sys: "/sys", proc: "/proc" },
  verbs: () => ReturnType<typeof ibverbsLoads> = ibverbsLoads,
): NodeFinding[] {
  const out: NodeFinding[] = [{
    level: "NOTE",
    text: "across nodes: two hops over an emulated NIC on one machine (virtual nodes with ranksPerNode, or " +
      "launch --nproc-per-node), and on the CUDA backend over ibverbs (SWITCHYARD_NIC=ibverbs, tested on a " +
      "software NIC, not yet on a real one); between processes also over NCCL GIN (SWITCHYARD_NIC=gin, needs the " +
      "headers' NCCL version at run time; never run yet)",
  }];
  const nics = rdmaDevices(roots);
  if (nics.length === 0) {
    out.push({ level: "NOTE", text: `RDMA: no device in ${roots.sys}/class/infiniband (no NIC, or no driver)` });
  }
  for (const nic of nics) {
    const ports = nic.ports.map((p) => `port ${p.port} ${p.state} ${p.linkLayer} ${p.rate}`).join("; ") || "no ports";
    const up = nic.ports.some((p) => p.state === "ACTIVE");
    out.push({
      level: up ? "OK" : "NOTE",
      text: `RDMA NIC ${nic.name} (NUMA node ${nic.numaNode}): ${ports}` + (up ? "" : "; no port is ACTIVE"),
    });
    for (const p of nic.ports.filter((p) => p.linkLayer === "Ethernet" && p.state === "ACTIVE")) {
      out.push(
        p.rocev2Gids.length
          ? { level: "OK", text: `RoCE ${nic.name} port ${p.port}: RoCE v2 GIDs ${p.rocev2Gids.join(", ")}` }
          : {
            level: "NOTE",
            text: `RoCE ${nic.name} port ${p.port}: no RoCE v2 GID (no IP address on its interface?); the ibverbs ` +
              "engine would use GID 0, RoCE v1, which does not cross an IP router (SWITCHYARD_IBVERBS_GID_INDEX)",
          },
      );
    }
  }
  const v = verbs();
  if (v.ok) {
    out.push({ level: "OK", text: "libibverbs.so.1 loads" });
  } else if (nics.length > 0) {
    out.push({ level: "FIX", text: `libibverbs.so.1 does not load (${v.reason}): install rdma-core (libibverbs1)` });
  } else {
    out.push({ level: "NOTE", text: "libibverbs.so.1 does not load (no RDMA NIC either)" });
  }
  const gpus = gpuPlaces(roots);
  if (nics.length > 0 && gpus.length > 0) {
    const r = gpuMemoryRegistration(roots);
    out.push(
      r.peermem || r.openKernelModule
        ? {
          level: "OK",
          text: "GPU memory registers with the NIC " + [
            r.openKernelModule ? "through dma-buf (NVIDIA's open kernel module; rdma-core 34 or later)" : "",
            r.peermem ? "with ibv_reg_mr (nvidia-peermem is loaded)" : "",
          ].filter((x) => x).join(", or "),
        }
        : {
          level: "FIX",
          text: "GPU memory cannot be registered with the NIC: nvidia-peermem is not loaded (modprobe " +
            "nvidia-peermem) and the driver is not NVIDIA's open kernel module (which exports dma-buf)",
        },
    );
  }
  for (const gpu of gpus) {
    if (nics.length === 0) break;
    const near = nics.filter((n) => n.numaNode >= 0 && n.numaNode === gpu.numaNode).map((n) => n.name);
    out.push({
      level: near.length ? "OK" : "NOTE",
      text: near.length
        ? `GPU ${gpu.busId} (NUMA node ${gpu.numaNode}): RDMA NICs on its node: ${near.join(", ")}`
        : `GPU ${gpu.busId} (NUMA node ${gpu.numaNode}): no RDMA NIC on its NUMA node; its traffic would cross ` +
          "the CPU interconnect",
    });
  }
  return out;
}
