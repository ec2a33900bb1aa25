/**
 * Fork carries every page a sandbox owns: 200 MiB of Python objects built in the parent
 * arrive intact in each child; a line of forks (a child of a child of a child, and a
 * sibling) each sees its ancestors' memory as of its own fork, its own writes and nothing
 * of a sibling's or of what an ancestor did later. Once all are destroyed, no memory
 * file, fork directory, disk layer, QEMU process or VM cgroup of the daemon is left, and
 * the memory it charged (sandboxes, forks) is back to where it started.
 *
 * These check behaviour through the SDK, not how a fork copies memory.
 */
import assert from "node:assert/strict";
import { readdir } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { Sandbox } from "podflare";
import { eventually, listDir, qemuPids, startTestDaemon, type TestDaemon } from "./harness.js";

interface Capacity {
  running: number;
  memory: { forks_mib: number; sandboxes_mib: number; pool_mib: number; budget_mib: number };
  tenant: { sandboxes: number; mem_mib: number; forks_mib: number };
}

/** Under TCG on a loaded 2-core host hashing 200 MiB takes seconds: be generous. */
const SLOW = { timeoutMs: 300_000 };

/** 200 one-MiB bytes objects (each distinct) and a dict of 100k entries; prints its digest. */
const BUILD = `import hashlib, os
seed = os.urandom(1 << 20)
blobs = [i.to_bytes(8, 'little') + seed[(i * 4099) % len(seed):] + seed[:(i * 4099) % len(seed)] for i in range(200)]
table = {f'k{i}': (i * i, str(i) * 3) for i in range(100_000)}
def digest():
    h = hashlib.sha256()
    for b in blobs:
        h.update(b)
    h.update(repr(sorted(table.items())).encode())
    return h.hexdigest()
print(digest(), sum(map(len, blobs)) >> 20, len(table))`;

/** Every file (not directory) under `dir`, as paths relative to it. */
async function filesUnder(dir: string): Promise<string[]> {
  const entries = await readdir(dir, { recursive: true, withFileTypes: true }).catch(() => []);
  return entries
    .filter((e) => !e.isDirectory())
    .map((e) => join(e.parentPath ?? (e as { path?: string }).path ?? "", e.name));
}

describe("fork pages", () => {
  let d: TestDaemon;
  let start: Capacity;
  const capacity = async () => (await (await fetch(`${d.url}/v1/capacity`)).json()) as Capacity;

  before(async () => {
    // No pool: every VM the daemon runs is one of this file's, so leftovers are exact.
    d = await startTestDaemon({ poolSize: 0 });
    start = await capacity();
  });
  after(async () => {
    await d?.close();
  });

  it("200 MiB of Python objects built in the parent arrive intact in each child", {
    timeout: 240_000,
  }, async () => {
    const parent = await Sandbox.create({ host: d.url });
    const boxes: Sandbox[] = [parent];
    try {
      const built = await parent.runCode(BUILD, SLOW);
      assert.equal(built.exitCode, 0, built.stderr);
      const [sum, mib, entries] = built.stdout.trim().split(" ");
      assert.equal(mib, "200");
      assert.equal(entries, "100000");
      assert.match(sum ?? "", /^[0-9a-f]{64}$/);

      const children = await parent.fork(2);
      assert.equal(children.length, 2);
      boxes.push(...children);
      const held = await capacity();
      assert.equal(held.memory.forks_mib, start.memory.forks_mib, "no page buffer after the call");
      assert.equal(
        held.tenant.mem_mib,
        start.tenant.mem_mib + 3 * parent.info.mem_size_mib,
        "the parent and each child charged as sandboxes (a child's copy of the pages is its own)",
      );
      // The parent changes its objects at once: the children must not see it.
      await parent.runCode("blobs[0] = b'changed'\ntable.clear()");
      for (const child of children) {
        const r = await child.runCode("print(digest(), len(blobs), len(table))", SLOW);
        assert.equal(r.exitCode, 0, r.stderr);
        assert.equal(r.stdout, `${sum} 200 100000\n`, `child ${child.id} has the parent's objects`);
      }
      assert.notEqual(
        (await parent.runCode("print(digest())", SLOW)).stdout.trim(),
        sum,
        "the parent's own change stayed in the parent",
      );
    } finally {
      await Promise.all(boxes.map((s) => s.close()));
    }
  });

  it("a line of forks sees its lineage's pages as of each fork, its own, and no sibling's", {
    timeout: 240_000,
  }, async () => {
    const sums: Record<string, Record<string, string>> = {};
    /** Written by `box` after it was forked: its marker and 4 MiB of its own data. */
    const write = async (box: Sandbox, name: string) => {
      const r = await box.runCode(
        `import hashlib, os\nlineage.append('${name}')\nmine = '${name}'\n${name}_data = os.urandom(4 << 20)\nprint(hashlib.sha256(${name}_data).hexdigest())`,
        SLOW,
      );
      assert.equal(r.exitCode, 0, r.stderr);
      return r.stdout.trim();
    };
    /** What a sandbox changes after its children were forked (they must not see it). */
    const later = async (box: Sandbox, name: string) => {
      const r = await box.runCode(
        `lineage.append('${name}-late')\nmine = '${name}-late'\n${name}_data = os.urandom(1 << 20)\nprint(hashlib.sha256(${name}_data).hexdigest())`,
        SLOW,
      );
      assert.equal(r.exitCode, 0, r.stderr);
      return r.stdout.trim();
    };
    const probe = async (box: Sandbox) => {
      const r = await box.runCode(
        "import json\nprint(json.dumps({'lineage': lineage, 'mine': mine, 'data': {n: hashlib.sha256(globals()[n + '_data']).hexdigest() for n in ['p', 'c1', 'c2', 's', 'c3'] if n + '_data' in globals()}}))",
        SLOW,
      );
      assert.equal(r.exitCode, 0, r.stderr);
      return JSON.parse(r.stdout) as {
        lineage: string[];
        mine: string;
        data: Record<string, string>;
      };
    };

    const p = await Sandbox.create({ host: d.url });
    const boxes: Sandbox[] = [p];
    /** One child of `from`, closed with the rest at the end. */
    const forkOne = async (from: Sandbox) => {
      const [child] = await from.fork(1);
      assert.ok(child);
      boxes.push(child);
      return child;
    };
    try {
      await p.runCode("lineage = []");
      const p0 = await write(p, "p");
      const c1 = await forkOne(p);
      const c10 = await write(c1, "c1");
      const pLate = await later(p, "p");
      // C1 forked twice: C2 and its sibling S.
      const c2 = await forkOne(c1);
      const s = await forkOne(c1);
      const c20 = await write(c2, "c2");
      const s0 = await write(s, "s");
      const c1Late = await later(c1, "c1");
      const c3 = await forkOne(c2);
      const c30 = await write(c3, "c3");
      const c2Late = await later(c2, "c2");
      sums.p = { lineage: "p,p-late", mine: "p-late", p: pLate };
      sums.c1 = { lineage: "p,c1,c1-late", mine: "c1-late", p: p0, c1: c1Late };
      sums.c2 = { lineage: "p,c1,c2,c2-late", mine: "c2-late", p: p0, c1: c10, c2: c2Late };
      sums.s = { lineage: "p,c1,s", mine: "s", p: p0, c1: c10, s: s0 };
      sums.c3 = { lineage: "p,c1,c2,c3", mine: "c3", p: p0, c1: c10, c2: c20, c3: c30 };

      const named: [string, Sandbox][] = [
        ["p", p],
        ["c1", c1],
        ["c2", c2],
        ["s", s],
        ["c3", c3],
      ];
      for (const [name, box] of named) {
        const got = await probe(box);
        const { lineage, mine, ...data } = sums[name] as Record<string, string>;
        assert.equal(
          got.lineage.join(","),
          lineage,
          `${name}: its lineage's values as of its fork`,
        );
        assert.equal(got.mine, mine, `${name}: its own marker`);
        assert.deepEqual(got.data, data, `${name}: its ancestors' data, its own, no sibling's`);
      }
    } finally {
      await Promise.all(boxes.map((b) => b.close()));
    }
  });

  it("leaves no memory file, fork directory, layer, QEMU or VM cgroup, and frees the charges", async () => {
    await d.daemon.service.settled();
    await eventually(
      "the forks' memory to be released",
      async () => (await capacity()).memory.forks_mib === start.memory.forks_mib,
      60_000,
    );
    const end = await capacity();
    assert.equal(end.running, start.running);
    assert.equal(end.memory.sandboxes_mib, start.memory.sandboxes_mib, "sandbox charges");
    assert.equal(end.memory.pool_mib, start.memory.pool_mib, "pool charges");
    assert.equal(end.memory.forks_mib, start.memory.forks_mib, "fork holds");
    assert.equal(end.tenant.mem_mib, start.tenant.mem_mib);
    assert.equal(end.tenant.forks_mib, start.tenant.forks_mib);
    const held = (c: Capacity) => c.memory.sandboxes_mib + c.memory.pool_mib + c.memory.forks_mib;
    assert.equal(held(end), held(start), "the held budget is back to its start");

    const { paths } = d.config;
    await eventually(
      "every QEMU of this daemon to exit",
      async () =>
        (await qemuPids(paths.stateDir)).length + (await qemuPids(paths.shmDir)).length === 0,
      30_000,
    );
    assert.deepEqual(await listDir(paths.vmsDir), [], "no VM directory");
    assert.deepEqual(await listDir(paths.vmMemDir), [], "no guest memory file");
    assert.deepEqual(await listDir(paths.forksDir), [], "no fork directory");
    assert.deepEqual(await listDir(paths.layersDir), [], "no disk layer");
    assert.deepEqual(await filesUnder(paths.shmDir), [], "no file at all in the memory directory");
    const cg = await d.daemon.engine.cgroups();
    for (const parent of cg?.parents ?? []) {
      const left = (await readdir(parent, { withFileTypes: true }).catch(() => []))
        .filter((e) => e.isDirectory())
        .map((e) => e.name);
      assert.deepEqual(left, [], `no VM cgroup left under ${parent}`);
    }
  });
});
