/**
 * Everything a fork uses is charged. The memory file behind a fork (which its children map
 * privately, alive until the last of them is gone) is held against the host's budget and
 * the forking tenant's quota, shown in /v1/capacity and /metrics, and freed with the last
 * child. The disk a sandbox holds through its fork layers counts against the per-sandbox
 * disk limit: a sandbox that fills its disk past the limit across forks cannot fork again.
 */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { RateLimitError, Sandbox } from "podflare";
import { eventually, startTestDaemon, type TestDaemon } from "./harness.js";

const LIMIT_MIB = 128;

interface Capacity {
  running: number;
  memory: { forks_mib: number; budget_mib: number; sandboxes_mib: number };
  tenant: { forks_mib: number };
}

describe("fork accounting", () => {
  let d: TestDaemon;
  const capacity = async () => (await (await fetch(`${d.url}/v1/capacity`)).json()) as Capacity;
  const forksMetric = async () => {
    const text = await (await fetch(`${d.url}/metrics`)).text();
    return Number(/^podflare_forks_memory_mib (\d+)/m.exec(text)?.[1]);
  };

  before(async () => {
    d = await startTestDaemon({ poolSize: 1, maxDiskMib: LIMIT_MIB });
  });
  after(async () => {
    await d?.close();
  });

  it("charges a fork's memory until its last child ends, then frees it", async () => {
    const parent = await Sandbox.create({ host: d.url });
    const mem = parent.info.mem_size_mib;
    const boxes: Sandbox[] = [parent];
    try {
      assert.equal((await capacity()).memory.forks_mib, 0);
      const [a, b] = await parent.fork(2);
      assert.ok(a && b);
      boxes.push(a, b);
      let cap = await capacity();
      assert.equal(cap.memory.forks_mib, mem, "one fork: one memory file");
      assert.equal(cap.tenant.forks_mib, mem, "charged to the forking tenant");
      assert.equal(await forksMetric(), mem);
      const [c] = await a.fork(1);
      assert.ok(c);
      boxes.push(c);
      assert.equal((await capacity()).memory.forks_mib, 2 * mem, "a second fork: a second file");

      await c.close(); // the second fork's only child: its memory goes once its QEMU exits
      await eventually("the second fork's memory to be freed", async () => {
        return (await capacity()).memory.forks_mib === mem;
      });
      await a.close();
      await d.daemon.service.settled();
      cap = await capacity();
      assert.equal(cap.memory.forks_mib, mem, "b still maps the first fork's memory");
      await parent.runCode("print('the parent holds no fork memory')");
      await b.close();
      await eventually("the first fork's memory to be freed", async () => {
        return (await capacity()).memory.forks_mib === 0;
      });
      assert.equal(await forksMetric(), 0);
      assert.equal((await capacity()).tenant.forks_mib, 0);
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
