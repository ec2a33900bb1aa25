/**
 * Fork: children start from the parent's exact state, diverge in isolation, get their
 * own entropy and identity, can be forked again, and leave nothing behind.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { InvalidArgumentError, NotFoundError, Sandbox } from "podflare";
import { eventually, listDir, startTestDaemon, type TestDaemon } from "./harness.js";

describe("fork", () => {
  let d: TestDaemon;
  const host = () => d.url;

  before(async () => {
    d = await startTestDaemon({ poolSize: 1, maxDiskChain: 2 });
  });
  after(async () => {
    await d?.close();
  });

  it("children inherit REPL state, unflushed writes and running processes, in isolation", async () => {
    const parent = await Sandbox.create({ host: host() });
    const boxes: Sandbox[] = [parent];
    try {
      await parent.runCode(
        "import os, subprocess\nx = 'parent'\nf = open('/root/buffered.txt', 'w'); f.write('in python buffer')\nfd = os.open('/root/cached.txt', os.O_WRONLY | os.O_CREAT); os.write(fd, b'in page cache'); os.close(fd)\nbg = subprocess.Popen(['sleep', '1000'])",
      );
      const [a, b] = await parent.fork(2);
      assert.ok(a && b);
      boxes.push(a, b);
      for (const child of [a, b]) {
        const r = await child.runCode(
          "f.flush()\nprint(x, open('/root/buffered.txt').read(), open('/root/cached.txt').read(), bg.poll() is None)",
        );
        assert.equal(r.stdout, "parent in python buffer in page cache True\n");
      }
      await a.runCode("x = 'a'\nopen('/root/only-a.txt', 'w').write('a')");
      await parent.runCode("x = 'changed'\nopen('/root/only-parent.txt', 'w').write('p')");
      const probe =
        "import os; print(x, os.path.exists('/root/only-a.txt'), os.path.exists('/root/only-parent.txt'))";
      assert.equal((await parent.runCode(probe)).stdout, "changed False True\n");
      assert.equal((await a.runCode(probe)).stdout, "a True False\n");
      assert.equal((await b.runCode(probe)).stdout, "parent False False\n");
      assert.deepEqual((await b.diff(a)).added, ["/root/only-a.txt"]);
    } finally {
      await Promise.all(boxes.map((s) => s.close()));
    }
  });

  it("gives eight children eight different entropies, PRNG states and hostnames", async () => {
    const parent = await Sandbox.create({ host: host() });
    const boxes: Sandbox[] = [parent];
    try {
      await parent.runCode("import os, random, socket");
      const children = await parent.fork(8);
      boxes.push(...children);
      const outs = await Promise.all(
        children.map(async (c) =>
          (
            await c.runCode("print(os.urandom(16).hex(), random.random(), socket.gethostname())")
          ).stdout
            .trim()
            .split(" "),
        ),
      );
      for (const k of [0, 1, 2])
        assert.equal(new Set(outs.map((o) => o[k])).size, 8, `field ${k} differs in every child`);
    } finally {
      await Promise.all(boxes.map((s) => s.close()));
    }
  });

  it("forks a fork of a fork; destroy order does not matter; nothing is left", async () => {
    const root = await Sandbox.create({ host: host() });
    await root.runCode("depth = 0");
    const [c1] = await root.fork(1);
    assert.ok(c1);
    await c1.runCode("depth = 1");
    const [c2] = await c1.fork(1);
    assert.ok(c2);
    await c2.runCode("depth = 2");
    const [c3] = await c2.fork(1);
    assert.ok(c3);
    assert.equal((await c3.runCode("print(depth)")).stdout, "2\n");
    // Three forks deep, but chains are merged past two layers; the data is all there.
    await eventually("the chains to be flattened", async () =>
      [root, c1, c2, c3].every((s) => (d.daemon.service.diskChainLength(s.id) ?? 0) <= 2),
    );
    await c2.runCode("open('/root/deep.txt', 'w').write('kept')");
    assert.equal(
      (await c3.runCode("import os; print(depth, os.path.exists('/root/deep.txt'))")).stdout,
      "2 False\n",
    );
    const [c4] = await c3.fork(1);
    assert.ok(c4);
    assert.equal((await c4.runCode("print(depth)")).stdout, "2\n", "a fork of a flattened VM");
    await c4.close();
    // Destroy in an order that removes parents before their children.
    for (const s of [c1, root, c3, c2]) await s.close();
    await d.daemon.service.settled();
    assert.deepEqual(await Sandbox.list({ host: host() }), []);
    assert.equal(d.daemon.engine.layers.size, (await listDir(d.daemon.engine.layers.dir)).length);
    await eventually(
      "only pool VMs' layers to remain",
      async () => (await listDir(d.daemon.engine.layers.dir)).length <= d.config.poolSize,
    );
    assert.deepEqual(await listDir(join(d.config.shmDir, "forks")), []);
  });

  it("forks mid-call: the parent's call completes; each child finishes it unheard, then runs its own", async () => {
    const parent = await Sandbox.create({ host: host() });
    const boxes: Sandbox[] = [parent];
    try {
      await parent.runCode("marker = 'before'");
      const running = parent.runCode(
        "import time\ntime.sleep(2)\nmarker = 'after'\nprint('parent call done')",
      );
      await new Promise((r) => setTimeout(r, 500)); // the call is under way
      const [child] = await parent.fork(1);
      assert.ok(child);
      boxes.push(child);
      const r = await running;
      assert.equal(r.stdout, "parent call done\n");
      assert.equal(r.exitCode, 0);
      const c = await child.runCode("print(marker)");
      assert.equal(
        c.stdout,
        "after\n",
        "the child's call ran after the inherited one ended, and got only its own output",
      );
    } finally {
      await Promise.all(boxes.map((s) => s.close()));
    }
  });

  it("rejects bad n and unknown sandboxes", async () => {
    const s = await Sandbox.create({ host: host() });
    try {
      for (const n of [0, 33]) await assert.rejects(s.fork(n), InvalidArgumentError, `n=${n}`);
      const res = await fetch(`${host()}/v1/sandboxes/sbx_nope/fork`, {
        method: "POST",
        body: '{"n":1}',
        headers: { "content-type": "application/json" },
      });
      assert.equal(res.status, 404);
      await assert.rejects(
        (await Sandbox.connect(s.id, { host: host() })).fork(1.5),
        InvalidArgumentError,
      );
    } finally {
      await s.close();
    }
    await assert.rejects(s.fork(1), NotFoundError);
  });
});
