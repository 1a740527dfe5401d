/** The command-line tools: doctor reports every area, the launcher refuses bad usage. */

import assert from "node:assert/strict";
import { ABI_VERSION } from "../ffi/symbols.ts";
import { acrossNodesFindings } from "../src/cli/doctor_nodes.ts";

const root = new URL("..", import.meta.url).pathname;
const run = (args: string[]) =>
  new Deno.Command(Deno.execPath(), {
    args,
    stdout: "piped",
    stderr: "piped",
    cwd: root,
    signal: AbortSignal.timeout(60000),
  })
    .output();
const text = (o: Deno.CommandOutput) => new TextDecoder().decode(o.stdout) + new TextDecoder().decode(o.stderr);

Deno.test("doctor: one verdict per line, covering the library, backends, NCCL and shared memory", async () => {
  const o = await run([
    "run",
    "--allow-ffi",
    "--allow-env",
    "--allow-read",
    "--allow-run",
    "--allow-net",
    "src/cli/doctor.ts",
  ]);
  const lines = text(o).trim().split("\n");
  assert.ok(lines.every((l) => /^(OK|NOTE|FIX) +\S/.test(l)), text(o));
  for (
    const topic of [
      new RegExp(`^OK +libswitchyard .* ABI ${ABI_VERSION}`),
      /^OK +host backend/,
      /CUDA/,
      /NCCL/,
      /\/dev\/shm/,
      /^NOTE +across nodes: /,
      /libibverbs/,
      /^OK +rendezvous: /,
    ]
  ) {
    assert.ok(lines.some((l) => topic.test(l)), `${topic} in:\n${text(o)}`);
  }
  assert.equal(o.code, lines.some((l) => l.startsWith("FIX")) ? 1 : 0);
});

Deno.test("doctor across nodes: NICs, their ports, libibverbs and GPU-NIC affinity, from sysfs", async (t) => {
  const dir = await Deno.makeTempDir();
  try {
    const put = async (path: string, text: string) => {
      await Deno.mkdir(`${dir}/${path.slice(0, path.lastIndexOf("/"))}`, { recursive: true });
      await Deno.writeTextFile(`${dir}/${path}`, text + "\n");
    };
    const roots = { sys: `${dir}/sys`, proc: `${dir}/proc` };
    await t.step("no NIC: said so; libibverbs missing is then only a note", () => {
      const f = acrossNodesFindings(roots, () => ({ ok: false, reason: "not found" }));
      assert.match(f[0].text, /^across nodes: two hops over an emulated NIC .* over ibverbs/);
      assert.ok(f.some((x) => x.level === "NOTE" && /no device in .*class\/infiniband/.test(x.text)));
      assert.ok(f.some((x) => x.level === "NOTE" && /libibverbs.so.1 does not load/.test(x.text)));
    });
    // Two NICs on NUMA nodes 0 and 1 (one port down), two GPUs on nodes 1 and 2.
    await put("sys/class/infiniband/mlx5_0/device/numa_node", "0");
    await put("sys/class/infiniband/mlx5_0/ports/1/state", "4: ACTIVE");
    await put("sys/class/infiniband/mlx5_0/ports/1/link_layer", "InfiniBand");
    await put("sys/class/infiniband/mlx5_0/ports/1/rate", "400 Gb/sec (4X NDR)");
    await put("sys/class/infiniband/mlx5_1/device/numa_node", "1");
    await put("sys/class/infiniband/mlx5_1/ports/1/state", "1: DOWN");
    await put("sys/class/infiniband/mlx5_1/ports/1/link_layer", "Ethernet");
    await put("sys/class/infiniband/mlx5_1/ports/1/rate", "200 Gb/sec (4X HDR)");
    // mlx5_2: RoCE, up, with a RoCE v1 and a RoCE v2 GID of an IPv4 address and an empty v2 entry.
    await put("sys/class/infiniband/mlx5_2/device/numa_node", "3");
    await put("sys/class/infiniband/mlx5_2/ports/1/state", "4: ACTIVE");
    await put("sys/class/infiniband/mlx5_2/ports/1/link_layer", "Ethernet");
    await put("sys/class/infiniband/mlx5_2/ports/1/rate", "400 Gb/sec (4X NDR)");
    for (
      const [i, type, gid] of [[2, "IB/RoCE v1", "0000:0000:0000:0000:0000:ffff:0a4d:0001"], [
        3,
        "RoCE v2",
        "0000:0000:0000:0000:0000:ffff:0a4d:0001",
      ], [5, "RoCE v2", "0000:0000:0000:0000:0000:0000:0000:0000"]]
    ) {
      await put(`sys/class/infiniband/mlx5_2/ports/1/gid_attrs/types/${i}`, String(type));
      await put(`sys/class/infiniband/mlx5_2/ports/1/gids/${i}`, String(gid));
    }
    await put("proc/driver/nvidia/gpus/0000:1A:00.0/information", "Model: H200");
    await put("sys/bus/pci/devices/0000:1a:00.0/numa_node", "1");
    await put("proc/driver/nvidia/gpus/0000:9B:00.0/information", "Model: H200");
    await put("sys/bus/pci/devices/0000:9b:00.0/numa_node", "2");
    await t.step("two NICs, two GPUs: ports, states, and which NIC shares each GPU's NUMA node", () => {
      const f = acrossNodesFindings(roots, () => ({ ok: false, reason: "libibverbs.so.1: cannot open" }));
      const line = (re: RegExp) => f.find((x) => re.test(x.text));
      assert.equal(
        line(/mlx5_0/)?.text,
        "RDMA NIC mlx5_0 (NUMA node 0): port 1 ACTIVE InfiniBand 400 Gb/sec (4X NDR)",
      );
      assert.equal(line(/mlx5_0/)?.level, "OK");
      assert.equal(line(/RDMA NIC mlx5_1/)?.level, "NOTE");
      assert.match(line(/RDMA NIC mlx5_1/)!.text, /port 1 DOWN Ethernet .*; no port is ACTIVE/);
      assert.equal(line(/libibverbs/)?.level, "FIX");
      assert.match(line(/libibverbs/)!.text, /install rdma-core/);
      assert.equal(line(/GPU 0000:1A:00.0/)?.text, "GPU 0000:1A:00.0 (NUMA node 1): RDMA NICs on its node: mlx5_1");
      assert.equal(line(/GPU 0000:9B:00.0/)?.level, "NOTE");
      assert.match(line(/GPU 0000:9B:00.0/)!.text, /no RDMA NIC on its NUMA node/);
      assert.equal(
        acrossNodesFindings(roots, () => ({ ok: true })).find((x) => /libibverbs/.test(x.text))?.level,
        "OK",
      );
      assert.equal(line(/^RoCE mlx5_2/)?.text, "RoCE mlx5_2 port 1: RoCE v2 GIDs 3");
      assert.equal(line(/^RoCE mlx5_2/)?.level, "OK");
      assert.ok(!f.some((x) => /^RoCE mlx5_1/.test(x.text)), "a port that is down is not checked");
    });
    await t.step("RoCE without a RoCE v2 GID: the fallback to RoCE v1 is said", async () => {
      await put("sys/class/infiniband/mlx5_2/ports/1/gid_attrs/types/3", "IB/RoCE v1");
      const f = acrossNodesFindings(roots, () => ({ ok: true }));
      const roce = f.find((x) => /^RoCE mlx5_2/.test(x.text));
      assert.equal(roce?.level, "NOTE");
      assert.match(roce!.text, /no RoCE v2 GID .* GID 0, RoCE v1/);
    });
    await t.step("GPU memory registration: peer memory, dma-buf, or neither", async () => {
      const registration = () =>
        acrossNodesFindings(roots, () => ({ ok: true })).find((x) => /^GPU memory/.test(x.text))!;
      assert.equal(registration().level, "FIX");
      assert.match(registration().text, /modprobe nvidia-peermem/);
      await put("proc/driver/nvidia/version", "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  575.57.08");
      assert.equal(registration().level, "OK");
      assert.match(registration().text, /through dma-buf/);
      assert.doesNotMatch(registration().text, /nvidia-peermem/);
      await Deno.mkdir(`${dir}/sys/module/nvidia_peermem`, { recursive: true });
      assert.match(registration().text, /through dma-buf .*, or with ibv_reg_mr \(nvidia-peermem is loaded\)/);
      await put("proc/driver/nvidia/version", "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01");
      assert.equal(registration().text, "GPU memory registers with the NIC with ibv_reg_mr (nvidia-peermem is loaded)");
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("launch: usage errors exit 2 with the usage line", async () => {
  const o = await run([
    "run",
    "--allow-run",
    "--allow-env",
    "--allow-net",
    "--allow-read",
    "src/cli/launch.ts",
    "--nproc",
    "0",
    "x.ts",
  ]);
  assert.equal(o.code, 2);
  assert.match(text(o), /usage: deno task launch --nproc N/);
});

Deno.test("CI's summary counts tests and their steps apart, as Deno does", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const c = (name: string, failed = false) =>
      `<testcase name="${name}" classname="x">${failed ? "<failure>boom</failure>" : ""}</testcase>`;
    const xml =
      `<testsuites><testsuite name="host: ./a.ts">${c("one")}${c("two")}${c("two &gt; s1")}${c("two &gt; s2")}` +
      `</testsuite><testsuite name="cuda-on-cpu: ./a.ts">${c("three", true)}${
        c("three &gt; s", true)
      }</testsuite></testsuites>`;
    await Deno.writeTextFile(`${dir}/junit.xml`, xml);
    const out = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "--allow-read",
        new URL("../scripts/junit_summary.ts", import.meta.url).pathname,
        `${dir}/junit.xml`,
      ],
      stdout: "piped",
    }).output();
    assert.equal(out.code, 1);
    assert.deepEqual(new TextDecoder().decode(out.stdout).trim().split("\n"), [
      "host: 2 passed (2 steps), 0 failed",
      "cuda-on-cpu: 0 passed, 1 failed (1 step)",
      "2 passed, 1 failed",
    ]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
