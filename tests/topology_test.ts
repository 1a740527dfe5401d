/**
 * Nodes: virtual nodes of a local group (`ranksPerNode`), the nodes of a process group (from the
 * launcher's node-major numbering), and the layout's per-node counts that a two-hop dispatch
 * sends across the network, against the TypeScript reference, on the fixture's backend.
 */

import assert from "node:assert/strict";
import {
  BufferOptions,
  BufferPlan as BufferPlanStruct,
  GroupOptions,
  LayoutArgs,
  LayoutResult,
} from "../ffi/structs.ts";
import { Group, SwitchyardError, Tensor, toBF16 } from "../mod.ts";
import { readDistEnv } from "../src/dist_env.ts";
import { Status } from "../ffi/symbols.ts";
import { check, native, OutHandle } from "../src/native.ts";
import { assertSameArray, bytesOf, fixture, generate, type Scenario, testBackend, upload } from "./helpers.ts";
import { bf16Value, destinations, referenceDispatch, referenceLayout } from "./reference.ts";

/** The float32 value of `v` rounded to BF16. */
const toFloat32OfBF16 = (v: number) => bf16Value(toBF16(new Float32Array([v]))[0]);

const backend = testBackend();
/** The CUDA backend's network puts go through ibverbs (the software NIC here): no link model. */
const verbsNic = backend === "cuda" && Deno.env.get("SWITCHYARD_NIC") === "ibverbs";

function refusal(e: unknown, argument: string): boolean {
  return e instanceof SwitchyardError && e.code === "INVALID_ARGUMENT" && e.argument === argument;
}

Deno.test("virtual nodes: each rank knows its node, and ranksPerNode must divide the ranks", async (t) => {
  await t.step("8 ranks as 2 nodes of 4", () => {
    using group = Group.local({ ranks: 8, ranksPerNode: 4, backend });
    assert.deepEqual(group.ranks.map((r) => r.node), [0, 0, 0, 0, 1, 1, 1, 1]);
    assert.deepEqual(group.ranks.map((r) => r.ranksPerNode), new Array(8).fill(4));
  });
  await t.step("no ranksPerNode: one node of every rank", () => {
    using group = Group.local({ ranks: 3, backend });
    assert.deepEqual(group.ranks.map((r) => [r.node, r.ranksPerNode]), [[0, 3], [0, 3], [0, 3]]);
  });
  await t.step("refused by the binding: 3 does not divide 8, 0 and 9 are out of range", () => {
    for (const ranksPerNode of [3, 0, 9, 2.5]) {
      assert.throws(() => Group.local({ ranks: 8, ranksPerNode, backend }), (e) => refusal(e, "ranksPerNode"));
    }
  });
  await t.step("refused by the C ABI itself, naming the argument", () => {
    for (const perNode of [3, -1, 9]) {
      const opts = GroupOptions.create().set("backend", backend === "host" ? 0 : 1).set("ranks", 8)
        .set("ranks_per_node", perNode);
      const out = new OutHandle();
      assert.throws(
        () => check(native().sy_group_create_local(opts.bytes, out.cell), null, "sy_group_create_local"),
        (e) => refusal(e, "ranksPerNode"),
      );
      assert.equal(out.cell[0], 0n);
    }
  });
});

Deno.test("process groups: nodes come from node-major numbering, anything else is refused", () => {
  const env = (vars: Record<string, string>) => (name: string) => vars[name];
  const torchrun = (rank: number, local: number, localWorld: number, world = 8) =>
    readDistEnv(env({
      RANK: String(rank),
      WORLD_SIZE: String(world),
      LOCAL_RANK: String(local),
      LOCAL_WORLD_SIZE: String(localWorld),
    }));
  assert.equal(torchrun(5, 1, 4).localWorldSize, 4);
  assert.equal(readDistEnv(env({ RANK: "6", WORLD_SIZE: "8" })).localWorldSize, 8); // one node
  // Round-robin (cyclic) placement: rank 5 as local rank 2 of 4.
  assert.throws(() => torchrun(5, 2, 4), (e) => refusal(e, "LOCAL_WORLD_SIZE"));
  // Nodes of different sizes.
  assert.throws(() => torchrun(5, 2, 3), (e) => refusal(e, "LOCAL_WORLD_SIZE"));
  const slurm = { SLURM_PROCID: "3", SLURM_NTASKS: "4", SLURM_NTASKS_PER_NODE: "2" };
  assert.equal(readDistEnv(env({ ...slurm, SLURM_LOCALID: "1" })).localRank, 1);
  assert.throws(() => readDistEnv(env({ ...slurm, SLURM_LOCALID: "0" })), (e) => refusal(e, "SLURM_NTASKS_PER_NODE"));
});

Deno.test("layout counts tokens per node: 8 ranks as 1x8, 2x4, 4x2 and 8x1", async (t) => {
  // Six of 64 experts per token with a quarter dropped (-1): tokens reach several ranks of one
  // node, a node through a rank that comes after another rank of it in top-k order, and no node.
  const s: Scenario = {
    ranks: 8,
    tokens: [37, 0, 91, 5, 64, 1, 23, 50],
    hidden: 16,
    experts: 64,
    topk: 6,
    seed: 7,
    drop: 0.25,
  };
  const d = generate(s);
  for (const ranksPerNode of [8, 4, 2, 1]) {
    await t.step(`${8 / ranksPerNode} nodes of ${ranksPerNode}`, async () => {
      using group = Group.local({ ranks: 8, ranksPerNode, backend });
      const buffers = await group.createBuffers({ hidden: s.hidden, maxTokensPerRank: 128 });
      try {
        await group.all(async (rank, r) => {
          const T = s.tokens[r];
          const ref = referenceLayout(d.inputs[r].topk!, T, s.topk, s.experts, s.ranks, ranksPerNode);
          // i64 ids on even ranks, i32 on odd ones: both kernels.
          const ids = r % 2 === 0 ? d.topkIdx[r] : Int32Array.from(d.topkIdx[r], Number);
          using topkIdx = await Tensor.from(rank, ids, { shape: [T, s.topk] });
          using layout = await buffers[r].layout(topkIdx, { numExperts: s.experts });
          assert.deepEqual(Array.from(await layout.numTokensPerNode.read()), ref.perNode, `rank ${r}: tokens per node`);
          assertSameArray(await layout.isTokenInNode.read(), ref.inNode, `rank ${r}: token in node`);
          assert.deepEqual(Array.from(await layout.numTokensPerRank.read()), ref.perRank, `rank ${r}: tokens per rank`);
          assertSameArray(await layout.isTokenInRank.read(), ref.inRank, `rank ${r}: token in rank`);
        });
      } finally {
        for (const b of buffers) b[Symbol.dispose]();
      }
    });
  }
  await t.step("a caller of ABI 4 (a shorter result struct) gets no node tensors to leak", async () => {
    using group = Group.local({ ranks: 2, ranksPerNode: 1, backend });
    const [buffer] = await group.createBuffers({ hidden: 16, maxTokensPerRank: 4 });
    try {
      const rank = group.ranks[0];
      using topkIdx = await Tensor.from(rank, new BigInt64Array([0n, 3n, -1n, 2n]), { shape: [2, 2] });
      const args = LayoutArgs.create().set("num_experts", 4).setPointer("topk_idx", topkIdx.pointer)
        .setPointer("compute_stream", rank.stream.pointer);
      const res = LayoutResult.create();
      const abi4Size = LayoutResult.offsets.num_tokens_per_node;
      res.set("struct_size", abi4Size);
      assert.equal(native().sy_layout(buffer.pointer, args.bytes, res.bytes), Status.OK);
      assert.equal(res.number("struct_size"), abi4Size);
      assert.equal(res.pointer("num_tokens_per_node"), null);
      assert.equal(res.pointer("is_token_in_node"), null);
      const perRank = new Tensor(res.pointer("num_tokens_per_rank")!, rank);
      for (const f of ["num_tokens_per_expert", "is_token_in_rank"] as const) {
        new Tensor(res.pointer(f)!, rank)[Symbol.dispose]();
      }
      assert.deepEqual(Array.from(await perRank.read() as Int32Array), [1, 2]);
      perRank[Symbol.dispose]();
    } finally {
      buffer[Symbol.dispose]();
    }
  });
});

/** What one two-hop combine puts on the network per rank: partial sums and results. */
interface ChainTraffic {
  partials: number[];
  results: number[];
}

/**
 * A two-hop combine's network traffic, counted from the routing alone (core/internode.h). The
 * chain: each token's float partial goes from node to node in ascending order, the last node
 * sends the BF16 result home unless home is that node, and with biases the source sends the
 * starting partial to the first node unless that is its own. Hierarchical: every node but home
 * sends one BF16 partial home. The rank of node k that carries source s's tokens is the one with
 * s's local index.
 */
function combineTraffic(
  d: ReturnType<typeof generate>,
  ranksPerNode: number,
  reduction: "chain" | "hierarchical",
  biased: boolean,
): ChainTraffic {
  const R = d.inputs.length;
  const traffic: ChainTraffic = { partials: new Array(R).fill(0), results: new Array(R).fill(0) };
  const column = (node: number, s: number) => node * ranksPerNode + (s % ranksPerNode);
  d.inputs.forEach((input, s) => {
    const home = Math.floor(s / ranksPerNode);
    for (let t = 0; t < input.tokens; t++) {
      const nodes = [...new Set(destinations(input, t, d.shape).map((r) => Math.floor(r / ranksPerNode)))]
        .sort((a, b) => a - b);
      if (nodes.length === 0) continue;
      if (reduction === "hierarchical") {
        // Every other node sends its BF16 partial home, as a combine row.
        for (const node of nodes) if (node !== home) traffic.results[column(node, s)]++;
        continue;
      }
      if (biased && nodes[0] !== home) traffic.partials[s]++;
      for (let i = 0; i + 1 < nodes.length; i++) traffic.partials[column(nodes[i], s)]++;
      if (nodes[nodes.length - 1] !== home) traffic.results[column(nodes[nodes.length - 1], s)]++;
    }
  });
  return traffic;
}

// The puts that carry one dispatch's records on the CUDA backend, from a fresh buffer, given how
// many go to each node: runs of consecutive records of at most half the ring (16 from a ring of 32
// or more), none past the ring's end (the ring's counters start at 0).
function dispatchPuts(perNode: number[], entries: number): number {
  const run = entries >= 32 ? 16 : Math.ceil(entries / 2);
  let puts = 0;
  for (const count of perNode) {
    for (let at = 0, left = count; left > 0; puts++) {
      const n = Math.min(run, left, entries - at % entries);
      at += n;
      left -= n;
    }
  }
  return puts;
}

Deno.test("two hops: dispatch puts one record per (token, other node) on the network, combine the chain's partials and results", async (t) => {
  // Rings of one entry (every put waits for the previous one to be taken), a few, and the default.
  for (
    const [ranksPerNode, networkRingEntries] of [[4, undefined], [4, 1], [2, 3], [2, undefined], [1, 2]] as [
      number,
      number | undefined,
    ][]
  ) {
    const ring = networkRingEntries ? `rings of ${networkRingEntries}` : "default rings";
    await t.step(`8 ranks as ${8 / ranksPerNode} nodes of ${ranksPerNode}, ${ring}`, async () => {
      const s: Scenario = {
        ranks: 8,
        tokens: [40, 3, 0, 27, 33, 18, 40, 9],
        hidden: 64,
        experts: 32,
        topk: 4,
        seed: 3,
        drop: 0.2,
        ranksPerNode,
      };
      const d = generate(s);
      const expected = referenceDispatch(d.inputs, d.shape);
      // What crosses the network, counted from the routing alone: each token once per node it
      // goes to, other than its sender's.
      const perNode = d.inputs.map((input, src) => {
        const n = new Array<number>(8 / ranksPerNode).fill(0);
        for (let t = 0; t < input.tokens; t++) {
          const nodes = new Set(destinations(input, t, d.shape).map((r) => Math.floor(r / ranksPerNode)));
          nodes.delete(Math.floor(src / ranksPerNode));
          for (const m of nodes) n[m]++;
        }
        return n;
      });
      const records = perNode.map((n) => n.reduce((a, b) => a + b, 0));
      assert.ok(ranksPerNode === 8 || records.some((n) => n > 0));
      using fx = await fixture(s.ranks, s.hidden, 40, 20000, { networkRingEntries }, ranksPerNode);
      const plan = fx.buffers[0].plan;
      if (ranksPerNode < 8) assert.equal(plan.networkRingEntries, networkRingEntries ?? 40);
      const stats = () => fx.buffers.map((b) => b.networkStats());
      const assertTraffic = (
        before: ReturnType<typeof stats>,
        // puts undefined: runs whose lengths depend on timing; at least one put when anything went,
        // never more than one per entry. Returns the puts and entries of every rank.
        want: (r: number) => { records: number; bytes: number; puts?: number },
        what: string,
      ) => {
        const after = stats();
        let puts = 0, records = 0;
        for (let r = 0; r < s.ranks; r++) {
          const w = want(r), put = after[r].puts - before[r].puts;
          assert.equal(after[r].records - before[r].records, w.records, `rank ${r}: ${what} network records`);
          assert.equal(after[r].bytes - before[r].bytes, w.bytes, `rank ${r}: ${what} network bytes`);
          if (w.puts !== undefined) assert.equal(put, w.puts, `rank ${r}: ${what} network puts`);
          else assert.ok(put <= w.records && (put > 0) === (w.records > 0), `rank ${r}: ${what}: ${put} puts`);
          puts += put;
          records += w.records;
        }
        return { puts, records };
      };
      const ups = await fx.group.all((rank, r) => upload(rank, s, d, r));
      try {
        let before = stats();
        const sent = await fx.group.all(async (_, r) => {
          const up = ups[r];
          const out = await fx.buffers[r].dispatch(up.x, {
            topkIdx: up.topkIdx,
            topkWeights: up.topkWeights,
            numExperts: s.experts,
          });
          assertSameArray(bytesOf(await out.recvX.read()), expected[r].x, `rank ${r}: rows`);
          return out;
        });
        assertTraffic(
          before,
          (r) => ({
            records: records[r],
            bytes: records[r] * plan.networkRecordBytes,
            // The host backend's NIC puts each record alone; the CUDA backend's proxy a run as one.
            puts: backend === "host" ? records[r] : dispatchPuts(perNode[r], plan.networkRingEntries),
          }),
          "dispatch",
        );
        try {
          const variants = [["chain", false], ["chain", true], ["hierarchical", false]] as const;
          for (const [internodeReduction, biased] of variants) {
            const chain = combineTraffic(d, ranksPerNode, internodeReduction, biased);
            assert.ok(ranksPerNode === 8 || chain.results.some((n) => n > 0));
            before = stats();
            // The "experts" return what they received: each token comes back once per rank it
            // visited (plus a zero bias: the starting partials travel, the values stay). The
            // hierarchical combine rounds per node: combine_test checks its values.
            await fx.group.all(async (rank, r) => {
              using zero = await Tensor.from(rank, new Uint16Array(s.tokens[r] * s.hidden), {
                shape: [s.tokens[r], s.hidden],
              });
              using back = await fx.buffers[r].combine(sent[r].recvX, sent[r].handle, {
                internodeReduction,
                ...(biased ? { bias: [zero] } : {}),
              });
              const got = await back.combinedX.readFloat32(); // the operation is done once it is read
              if (internodeReduction === "hierarchical") return;
              const x = await ups[r].x.readFloat32();
              for (let tok = 0; tok < s.tokens[r]; tok++) {
                const visits = destinations(d.inputs[r], tok, d.shape).length;
                for (let c = 0; c < s.hidden; c++) {
                  const want = Math.fround(x[tok * s.hidden + c] * visits);
                  if (got[tok * s.hidden + c] !== toFloat32OfBF16(want)) {
                    assert.fail(`rank ${r}: token ${tok} channel ${c}: ${got[tok * s.hidden + c]} != ${want}`);
                  }
                }
              }
            });
            const what = `${internodeReduction} combine${biased ? " with a bias" : ""}`;
            const carried = assertTraffic(before, (r) => ({
              records: chain.partials[r] + chain.results[r],
              bytes: chain.partials[r] * plan.networkPartialBytes + chain.results[r] * plan.networkResultBytes,
              // One entry per put on the host backend; the CUDA backend puts runs of consecutive
              // entries for one ring, as they are ready.
              puts: backend === "host" ? chain.partials[r] + chain.results[r] : undefined,
            }), what);
            // The hierarchical reduction's parts are ready at once, one after another for each
            // node: with room for runs, the CUDA backend puts fewer than one per entry.
            if (backend !== "host" && internodeReduction === "hierarchical" && plan.networkRingEntries >= 32) {
              assert.ok(carried.puts < carried.records, `${what}: ${carried.puts} puts for ${carried.records}`);
            }
          }
        } finally {
          for (const o of sent) o[Symbol.dispose]();
        }
      } finally {
        for (const u of ups) u[Symbol.dispose]();
      }
      assert.equal(plan.networkRecordBytes > 0, ranksPerNode < 8);
      assert.equal(plan.networkPartialBytes > 0, ranksPerNode < 8);
    });
  }
});

Deno.test("the direct path across nodes: the one-node results, one record per (token, rank of another node)", async () => {
  const s: Scenario = {
    ranks: 8,
    tokens: [31, 7, 0, 25, 40, 12, 33, 19],
    hidden: 96,
    experts: 32,
    topk: 5,
    seed: 11,
    drop: 0.1,
    ranksPerNode: 4,
  };
  const d = generate(s);
  const expected = referenceDispatch(d.inputs, d.shape);
  const node = (r: number) => Math.floor(r / 4);
  // Counted from the routing alone: a record per (token, destination on another node); back, a
  // row per received token whose source is on another node.
  const records = d.inputs.map((input, src) => {
    let n = 0;
    for (let t = 0; t < input.tokens; t++) {
      n += destinations(input, t, d.shape).filter((r) => node(r) !== node(src)).length;
    }
    return n;
  });
  const rows = expected.map((e, r) => e.rows.filter((row) => node(row.src) !== node(r)).length);
  assert.ok(records.some((n) => n > 0) && rows.some((n) => n > 0));
  using group = Group.local({ ranks: 8, ranksPerNode: 4, backend });
  const buffers = await group.createBuffers({ hidden: s.hidden, maxTokensPerRank: 40, internodePath: "direct" });
  try {
    const plan = buffers[0].plan;
    assert.equal(plan.networkRegionBytes, 0);
    assert.equal(plan.networkRecordBytes, 0);
    const twoHop = backend === "host"; // the CUDA backend moves rows in one hop, with no NIC
    const counted = (want: number[], bytes: number, before: { records: number; bytes: number }[], what: string) => {
      buffers.forEach((b, r) => {
        const now = b.networkStats();
        assert.equal(now.records - before[r].records, twoHop ? want[r] : 0, `rank ${r}: ${what} records`);
        assert.equal(now.bytes - before[r].bytes, twoHop ? want[r] * bytes : 0, `rank ${r}: ${what} bytes`);
      });
    };
    const ups = await group.all((rank, r) => upload(rank, s, d, r));
    try {
      let before = buffers.map((b) => b.networkStats());
      const sent = await group.all(async (_, r) => {
        const out = await buffers[r].dispatch(ups[r].x, {
          topkIdx: ups[r].topkIdx,
          topkWeights: ups[r].topkWeights,
          numExperts: s.experts,
        });
        assertSameArray(bytesOf(await out.recvX.read()), expected[r].x, `rank ${r}: rows`);
        return out;
      });
      counted(records, plan.recordBytes, before, "dispatch");
      before = buffers.map((b) => b.networkStats());
      await group.all(async (_, r) => {
        using back = await buffers[r].combine(sent[r].recvX, sent[r].handle);
        const got = await back.combinedX.readFloat32();
        const x = await ups[r].x.readFloat32();
        for (let tok = 0; tok < s.tokens[r]; tok++) {
          const visits = destinations(d.inputs[r], tok, d.shape).length;
          for (let c = 0; c < s.hidden; c++) {
            const want = toFloat32OfBF16(Math.fround(x[tok * s.hidden + c] * visits));
            if (got[tok * s.hidden + c] !== want) assert.fail(`rank ${r}: token ${tok} channel ${c}`);
          }
        }
        sent[r][Symbol.dispose]();
      });
      counted(rows, plan.combineRowBytes, before, "combine");
    } finally {
      for (const u of ups) u[Symbol.dispose]();
    }
  } finally {
    for (const b of buffers) b[Symbol.dispose]();
  }
});

Deno.test("across nodes, the path and the reduction are checked on both sides of the FFI and across ranks", async (t) => {
  await t.step("refused by the binding: an unknown path or reduction", async () => {
    using group = Group.local({ ranks: 4, ranksPerNode: 2, backend });
    assert.throws(
      () => group.ranks[0].createBuffer({ hidden: 64, maxTokensPerRank: 4, internodePath: "sideways" as "direct" }),
      (e) => refusal(e, "internodePath"),
    );
    const buffers = await group.createBuffers({ hidden: 64, maxTokensPerRank: 4 });
    try {
      await assert.rejects(
        // The options are checked before the tensors.
        // deno-lint-ignore no-explicit-any
        () => buffers[0].combine(null as any, null as any, { internodeReduction: "flat" as "chain" }),
        (e) => refusal(e, "internodeReduction"),
      );
    } finally {
      for (const b of buffers) b[Symbol.dispose]();
    }
  });
  await t.step("refused by the C ABI itself, naming the argument", () => {
    const opts = BufferOptions.create().set("hidden", 64).set("max_tokens_per_rank", 4).set("ranks_per_node", 2)
      .set("internode_path", 2);
    assert.throws(
      () => check(native().sy_plan_buffer(opts.bytes, 4, BufferPlanStruct.create().bytes), null, "sy_plan_buffer"),
      (e) => refusal(e, "internodePath"),
    );
  });
  await t.step("ranks whose buffers cross nodes differently are refused, naming the option", () => {
    using group = Group.local({ ranks: 4, ranksPerNode: 2, backend });
    using first = group.ranks[0].createBuffer({ hidden: 64, maxTokensPerRank: 4, internodePath: "direct" });
    assert.throws(
      () => group.ranks[1].createBuffer({ hidden: 64, maxTokensPerRank: 4 }),
      (e) => refusal(e, "internodePath"),
    );
    assert.ok(first);
  });
  await t.step(
    "a combine whose ranks reduce differently fails on every rank, naming the reductions; the next works",
    async () => {
      const s: Scenario = { ranks: 4, tokens: [6, 5, 4, 3], hidden: 64, experts: 8, topk: 2, seed: 9, ranksPerNode: 2 };
      const d = generate(s);
      using fx = await fixture(4, 64, 8, 5000, {}, 2);
      await fx.group.all(async (rank, r) => {
        using up = await upload(rank, s, d, r);
        using sent = await fx.buffers[r].dispatch(up.x, {
          topkIdx: up.topkIdx,
          topkWeights: up.topkWeights,
          numExperts: s.experts,
        });
        const internodeReduction = r === 3 ? "hierarchical" : "chain";
        // A collective's failure surfaces where its result is read.
        const err = await (async () => {
          using back = await fx.buffers[r].combine(sent.recvX, sent.handle, { internodeReduction });
          await back.combinedX.read();
        })().then(() => undefined, (e) => e);
        assert.ok(err instanceof SwitchyardError, `rank ${r}: ${err}`);
        assert.match(err.message, /reductions across nodes/);
        using again = await fx.buffers[r].combine(sent.recvX, sent.handle);
        await again.combinedX.read();
      });
    },
  );
});

Deno.test("the emulated NIC's link model: the network hop takes what its bytes and latency say", async (t) => {
  await t.step("refused: a negative bandwidth, a latency over a second, by the binding and by the C ABI", () => {
    for (const emulatedNic of [{ gbPerSecond: -1 }, { latencyUs: 2e6 }, { gbPerSecond: 1e-6 }]) {
      assert.throws(
        () => Group.local({ ranks: 2, ranksPerNode: 1, emulatedNic }),
        (e) => e instanceof SwitchyardError && e.code === "INVALID_ARGUMENT" && /^emulatedNic\./.test(e.argument ?? ""),
      );
    }
    const opts = GroupOptions.create().set("ranks", 2).set("ranks_per_node", 1)
      .set("emulated_nic_bytes_per_second", 5e5);
    assert.throws(
      () => check(native().sy_group_create_local(opts.bytes, new OutHandle().cell), null, "sy_group_create_local"),
      (e) => refusal(e, "emulatedNic.bytesPerSecond"),
    );
  });
  // The timings need the link model, which only the emulated NIC has.
  const timed = (name: string, fn: () => Promise<void>) => t.step({ name, ignore: verbsNic, fn });
  await timed("1 MB/s and 150 ms: a dispatch across 2 nodes waits for both", async () => {
    const s: Scenario = {
      ranks: 4,
      tokens: [30, 30, 30, 30],
      hidden: 512,
      experts: 8,
      topk: 2,
      seed: 5,
      ranksPerNode: 2,
    };
    const d = generate(s);
    using group = Group.local({
      ranks: 4,
      ranksPerNode: 2,
      backend,
      emulatedNic: { gbPerSecond: 0.001, latencyUs: 150000 },
    });
    const buffers = await group.createBuffers({ hidden: s.hidden, maxTokensPerRank: 30 });
    try {
      const ups = await group.all((rank, r) => upload(rank, s, d, r));
      const started = performance.now();
      await group.all(async (_, r) => {
        using res = await buffers[r].dispatch(ups[r].x, {
          topkIdx: ups[r].topkIdx,
          topkWeights: ups[r].topkWeights,
          numExperts: 8,
        });
        await res.recvX.read(); // the operation is over once its rows are read (the CUDA backend's stream)
      });
      const ms = performance.now() - started;
      const bytes = Math.max(...buffers.map((b) => b.networkStats().bytes));
      const modelled = 150 + bytes / 1e6 * 1000;
      assert.ok(bytes > 20000, `${bytes} bytes crossed the network`);
      assert.ok(ms >= modelled, `the dispatch took ${ms.toFixed(1)} ms, the link alone ${modelled.toFixed(1)} ms`);
      assert.ok(ms < modelled + 5000, `the dispatch took ${ms.toFixed(1)} ms, the link ${modelled.toFixed(1)} ms`);
      for (const u of ups) u[Symbol.dispose]();
    } finally {
      for (const b of buffers) b[Symbol.dispose]();
    }
  });
  await timed("100 ms per hop: the chain across 3 nodes pays one latency per node it passes", async () => {
    // 3 nodes of one rank, every token to every rank: rank 0's tokens go 0 -> 1 -> 2, then the
    // result comes home: two partials and a result, one after the other.
    const s: Scenario = { ranks: 3, tokens: [4, 4, 4], hidden: 64, experts: 3, topk: 3, seed: 2, ranksPerNode: 1 };
    const d = generate(s);
    using group = Group.local({ ranks: 3, ranksPerNode: 1, emulatedNic: { latencyUs: 100000 }, backend });
    const buffers = await group.createBuffers({ hidden: s.hidden, maxTokensPerRank: 4 });
    try {
      const ups = await group.all((rank, r) => upload(rank, s, d, r));
      const sent = await group.all((_, r) =>
        buffers[r].dispatch(ups[r].x, { topkIdx: ups[r].topkIdx, topkWeights: ups[r].topkWeights, numExperts: 3 })
      );
      await Promise.all(sent.map((o) => o.recvX.read()));
      const started = performance.now();
      await group.all(async (_, r) => {
        using back = await buffers[r].combine(sent[r].recvX, sent[r].handle);
        await back.combinedX.read();
      });
      const ms = performance.now() - started;
      assert.ok(ms >= 300, `the combine took ${ms.toFixed(1)} ms, three hops of 100 ms`);
      assert.ok(ms < 300 + 5000, `the combine took ${ms.toFixed(1)} ms`);
      for (const o of [...sent, ...ups]) o[Symbol.dispose]();
    } finally {
      for (const b of buffers) b[Symbol.dispose]();
    }
  });
});

Deno.test("across nodes: a link too slow for the deadline is refused at buffer creation", async () => {
  if (backend !== "host") return;
  // 2 nodes, 4096 tokens of hidden 7168 at 1 MB/s: minutes for a worst-case dispatch.
  using group = Group.local({ ranks: 2, ranksPerNode: 1, timeoutMs: 20000, emulatedNic: { gbPerSecond: 0.001 } });
  await assert.rejects(
    () => group.createBuffers({ hidden: 7168, maxTokensPerRank: 4096 }),
    (e) => refusal(e, "emulatedNic") && /over half the 20000 ms deadline/.test((e as Error).message),
  );
});

Deno.test("across nodes: a dispatch refused on one rank fails everywhere, and the next one is exact", async () => {
  const s: Scenario = { ranks: 4, tokens: [12, 7, 12, 9], hidden: 64, experts: 8, topk: 3, seed: 21, ranksPerNode: 2 };
  const d = generate(s);
  const expected = referenceDispatch(d.inputs, d.shape);
  using fx = await fixture(s.ranks, s.hidden, 12, 5000, {}, 2);
  const ups = await fx.group.all((rank, r) => upload(rank, s, d, r));
  try {
    // Rank 3 routes a token to expert 8 of 8: INVALID_ARGUMENT there, PEER_FAILED at the others.
    using bad = await Tensor.from(fx.group.ranks[3], new BigInt64Array([8n, 0n, 1n]), { shape: [1, 3] });
    const outcomes = await Promise.allSettled(fx.buffers.map((b, r) =>
      b.dispatch(ups[r].x, {
        topkIdx: r === 3 ? bad : ups[r].topkIdx,
        topkWeights: ups[r].topkWeights,
        numExperts: s.experts,
      })
    ));
    for (const [r, o] of outcomes.entries()) {
      assert.equal(o.status, "rejected", `rank ${r}`);
      const e = (o as PromiseRejectedResult).reason;
      assert.ok(e instanceof SwitchyardError, String(e));
      assert.equal(e.code, r === 3 ? "INVALID_ARGUMENT" : "PEER_FAILED", `rank ${r}: ${e.message}`);
    }
    await fx.group.all(async (_, r) => {
      using res = await fx.buffers[r].dispatch(ups[r].x, {
        topkIdx: ups[r].topkIdx,
        topkWeights: ups[r].topkWeights,
        numExperts: s.experts,
      });
      assertSameArray(bytesOf(await res.recvX.read()), expected[r].x, `rank ${r}: rows after the refusal`);
    });
  } finally {
    for (const u of ups) u[Symbol.dispose]();
  }
});

Deno.test("across nodes, CUDA: SWITCHYARD_NIC=gin is refused for virtual ranks, and the buffers then work with the emulated NIC", async () => {
  if (backend !== "cuda" || verbsNic) return;
  const s: Scenario = { ranks: 4, tokens: [5, 9, 0, 7], hidden: 64, experts: 8, topk: 3, seed: 23, ranksPerNode: 2 };
  const d = generate(s);
  const expected = referenceDispatch(d.inputs, d.shape);
  using fx = await fixture(s.ranks, s.hidden, 12, 5000, {}, 2);
  const ups = await fx.group.all((rank, r) => upload(rank, s, d, r));
  const dispatchAll = () =>
    fx.buffers.map((b, r) =>
      b.dispatch(ups[r].x, { topkIdx: ups[r].topkIdx, topkWeights: ups[r].topkWeights, numExperts: s.experts })
    );
  try {
    // NCCL's ranks cannot share a GPU: GIN is for process groups, one GPU each.
    Deno.env.set("SWITCHYARD_NIC", "gin");
    let outcomes: PromiseSettledResult<unknown>[];
    try {
      outcomes = await Promise.allSettled(dispatchAll());
    } finally {
      Deno.env.delete("SWITCHYARD_NIC");
    }
    for (const [r, o] of outcomes.entries()) {
      assert.equal(o.status, "rejected", `rank ${r}`);
      const e = (o as PromiseRejectedResult).reason;
      assert.ok(e instanceof SwitchyardError && e.code === "UNSUPPORTED", `rank ${r}: ${e}`);
      assert.match(e.message, /SWITCHYARD_NIC=gin: NCCL GIN needs a process group, one GPU per rank/);
    }
    const results = await Promise.all(dispatchAll());
    try {
      for (const [r, res] of results.entries()) {
        assertSameArray(bytesOf(await res.recvX.read()), expected[r].x, `rank ${r}: rows after the refusal`);
      }
    } finally {
      for (const res of results) res[Symbol.dispose]();
    }
  } finally {
    for (const u of ups) u[Symbol.dispose]();
  }
});

Deno.test("across nodes, CUDA: ranks that pass handles of different dispatches fail the combine, naming the peer", async () => {
  if (backend !== "cuda") return; // the host backend's chain has no announced counts (a peer times out there)
  // 4 ranks as 2 nodes of 2, one expert per rank. Dispatch A sends every token to every rank;
  // dispatch B keeps each token at home. Rank 3 combines B's handle, the others A's: rank 1
  // passes on, on A's ways, the partials of its own 4 tokens and of rank 3's 4 to rank 3, which
  // takes nothing from it on B's.
  const T = 4, H = 64;
  using fx = await fixture(4, H, T, 2000, {}, 2);
  const handles = await fx.group.all(async (rank, r) => {
    using x = await Tensor.from(rank, new Uint16Array(T * H).fill(0x3f80 + r), { shape: [T, H], dtype: "bf16" });
    using every = await Tensor.from(rank, new BigInt64Array(T * 4).map((_, i) => BigInt(i % 4)), { shape: [T, 4] });
    using home = await Tensor.from(rank, new BigInt64Array(T).fill(BigInt(r)), { shape: [T, 1] });
    using w4 = await Tensor.from(rank, new Float32Array(T * 4).fill(0.25), { shape: [T, 4] });
    using w1 = await Tensor.from(rank, new Float32Array(T).fill(1), { shape: [T, 1] });
    const a = await fx.buffers[r].dispatch(x, { topkIdx: every, topkWeights: w4, numExperts: 4 });
    const b = await fx.buffers[r].dispatch(x, { topkIdx: home, topkWeights: w1, numExperts: 4 });
    await Promise.all([a.recvX.read(), b.recvX.read()]);
    return [a, b] as const;
  });
  try {
    const outcomes = await Promise.allSettled(fx.buffers.map(async (buf, r) => {
      const [a, b] = handles[r];
      const started = performance.now();
      try {
        using back = await buf.combine(r === 3 ? b.recvX : a.recvX, r === 3 ? b.handle : a.handle);
        await back.combinedX.read();
      } finally {
        assert.ok(performance.now() - started < 5000, `rank ${r} took ${performance.now() - started} ms`);
      }
    }));
    const failure = (r: number) => {
      const o = outcomes[r];
      assert.equal(o.status, "rejected", `rank ${r} succeeded`);
      const e = (o as PromiseRejectedResult).reason;
      assert.ok(e instanceof SwitchyardError, String(e));
      return e;
    };
    // Ranks 1 and 3 disagree about what passes between them; each sees it as soon as the other
    // starts (or hears first from a peer that saw it, or that found a row rank 3 does not hold).
    const messages = [1, 3].map((r) => failure(r).message);
    const announced =
      /announced (\d+) network entries in lane (\d) for this rank, which expects (\d+) .*the handle of the same dispatch/;
    for (const [i, m] of messages.entries()) {
      const got = m.match(announced);
      if (!got) continue;
      // Rank 3 takes nothing in lane 0 of the 8 partials rank 1 puts there; rank 1 takes the
      // results of its 4 tokens in lane 1, which rank 3 does not send.
      assert.deepEqual(got.slice(1), i === 1 ? ["8", "0", "0"] : ["0", "1", "4"], m);
    }
    assert.ok(
      outcomes.some((o) => o.status === "rejected" && /handle of the same dispatch/.test(String(o.reason?.message))),
      messages.join("\n"),
    );
  } finally {
    for (const [a, b] of handles) {
      a[Symbol.dispose]();
      b[Symbol.dispose]();
    }
  }
});
