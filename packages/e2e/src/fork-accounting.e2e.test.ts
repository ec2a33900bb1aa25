/**
 * Everything a fork uses is charged. While a fork runs, the parent's private pages it
 * buffers count against the host's budget and the forking tenant's quota (the unit test
 * on the fake backend holds a fork in flight to see it); after the call nothing of it is
 * left in memory: each child's copy of the pages is its own charge, and the template
 * memory the lineage maps stays its template's. The disk layers a fork freezes are shown
 * in /v1/capacity and /metrics until the last VM stacking each is gone, and the disk a
 * sandbox holds through them counts against the per-sandbox disk limit: a sandbox that
 * fills its disk past the limit across forks cannot fork again.
 */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { RateLimitError, Sandbox } from "podflare";
import { eventually, startTestDaemon, type TestDaemon } from "./harness.js";

const LIMIT_MIB = 128;

interface Capacity {
  running: number;
  disk: { fork_layers: number; fork_layers_mib: number };
  memory: { forks_mib: number; budget_mib: number; sandboxes_mib: number };
  tenant: { forks_mib: number; mem_mib: number; sandboxes: number };
}

describe("fork accounting", () => {
  let d: TestDaemon;
  const capacity = async () => (await (await fetch(`${d.url}/v1/capacity`)).json()) as Capacity;
  const metric = async (name: string) => {
    const text = await (await fetch(`${d.url}/metrics`)).text();
    return Number(new RegExp(`^${name} (\\d+)`, "m").exec(text)?.[1]);
  };

  before(async () => {
    d = await startTestDaemon({ poolSize: 1, maxDiskMib: LIMIT_MIB });
  });
  after(async () => {
    await d?.close();
  });

  it("holds nothing in memory after a fork; its frozen layers are reported until their last VM is gone", async () => {
    const parent = await Sandbox.create({ host: d.url });
    const mem = parent.info.mem_size_mib;
    const boxes: Sandbox[] = [parent];
    const layersGone = (n: number) =>
      eventually(`${n} fork layers left`, async () => (await capacity()).disk.fork_layers === n);
    try {
      let cap = await capacity();
      assert.equal(cap.memory.forks_mib, 0);
      assert.equal(cap.disk.fork_layers, 0);
      const mine = cap.tenant.mem_mib;
      // 24 MiB on the parent's disk: frozen into the fork's layer.
      await parent.runCode(
        "import os\nwith open('/root/blob', 'wb') as f:\n    f.write(os.urandom(24 << 20))\n    f.flush()\n    os.fsync(f.fileno())",
      );
      const [a, b] = await parent.fork(2);
      assert.ok(a && b);
      boxes.push(a, b);
      cap = await capacity();
      assert.equal(cap.memory.forks_mib, 0, "the page buffer went with the call");
      assert.equal(cap.tenant.forks_mib, 0);
      assert.equal(cap.tenant.mem_mib, mine + 2 * mem, "each child is charged as a sandbox");
      assert.equal(cap.disk.fork_layers, 1, "one frozen layer");
      assert.ok(
        cap.disk.fork_layers_mib >= 24,
        `the layer holds the blob: ${cap.disk.fork_layers_mib} MiB`,
      );
      assert.equal(await metric("podflare_fork_layers"), 1);
      assert.ok((await metric("podflare_fork_layers_bytes")) >= 24 * 2 ** 20);
      assert.equal(await metric("podflare_forks_memory_mib"), 0);
      const [c] = await a.fork(1);
      assert.ok(c);
      boxes.push(c);
      assert.equal((await capacity()).disk.fork_layers, 2, "a's fork froze a's layer too");

      await c.close();
      await d.daemon.service.settled();
      assert.equal((await capacity()).disk.fork_layers, 2, "a still stacks its frozen layer");
      await a.close();
      await layersGone(1); // a's frozen layer: no VM stacks it now
      await b.close();
      await d.daemon.service.settled();
      assert.equal((await capacity()).disk.fork_layers, 1, "the parent still stacks the first");
      await parent.close();
      await layersGone(0);
      assert.equal(await metric("podflare_fork_layers"), 0);
      assert.equal((await capacity()).tenant.mem_mib, mine - mem);
    } finally {
      await Promise.all(boxes.map((s) => s.close()));
    }
  });

  it("refuses to fork a sandbox whose disk and fork layers exceed its disk limit", async () => {
    const parent = await Sandbox.create({ host: d.url });
    const boxes: Sandbox[] = [parent];
    // 80 MiB of incompressible data, flushed to the VM's disk (its qcow2 overlay).
    const fill = (name: string) =>
      parent.runCode(
        `import os\nwith open('/root/${name}', 'wb') as f:\n    for _ in range(80):\n        f.write(os.urandom(1 << 20))\nos.sync()\nprint('ok')`,
        { timeoutMs: 300_000 },
      );
    try {
      assert.equal((await fill("a.bin")).stdout, "ok\n");
      // 80 MiB is under the limit: the fork goes, freezing those 80 MiB into a shared layer.
      const [child] = await parent.fork(1);
      assert.ok(child);
      boxes.push(child);
      assert.equal((await fill("b.bin")).stdout, "ok\n");
      // Now 80 MiB frozen below + 80 MiB in its overlay: merging the layers frees nothing.
      const before = await capacity();
      await assert.rejects(parent.fork(1), (err: Error) => {
        assert.ok(err instanceof RateLimitError, String(err));
        assert.match(err.message, new RegExp(`per-sandbox limit of ${LIMIT_MIB} MiB`));
        return true;
      });
      const after = await capacity();
      assert.equal(after.running, before.running, "the refused fork made no sandbox");
      assert.equal(after.memory.forks_mib, before.memory.forks_mib, "and holds no memory");
      assert.equal((await Sandbox.list({ host: d.url })).length, 2);
      // The parent's files are intact after the merge, and the child can still fork.
      assert.equal(
        (
          await parent.runCode(
            "import os; print(os.path.getsize('/root/a.bin') >> 20, os.path.getsize('/root/b.bin') >> 20)",
          )
        ).stdout,
        "80 80\n",
      );
      assert.equal(d.daemon.service.diskChainLength(parent.id), 1, "its layers were merged");
      const [grandchild] = await child.fork(1);
      assert.ok(grandchild);
      boxes.push(grandchild);
    } finally {
      await Promise.all(boxes.map((s) => s.close()));
    }
  });
});
