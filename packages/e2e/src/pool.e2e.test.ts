/**
 * Template snapshots and the warm pool: every sandbox is a restore of one template, so
 * each must get its own entropy, PRNG state, identity and clock; the pool must never
 * hand a VM out twice, survive bursts and replace VMs that die.
 */
import assert from "node:assert/strict";
import { rm } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { createLogger, TemplateManager } from "@podflare/daemon";
import { Sandbox } from "podflare";
import { eventually, listDir, startTestDaemon, type TestDaemon } from "./harness.js";

describe("templates and the warm pool", () => {
  let d: TestDaemon;
  const host = () => d.url;

  before(async () => {
    // 50 idle sandboxes at once touch about 50 MiB each, far below the guest memory the
    // budget charges them: this suite tests the pool's hand-out, so the budget is lifted
    // (overcommitting on purpose, as PODFLARE_MEMORY_BUDGET_MIB allows an operator to).
    d = await startTestDaemon({ poolSize: 2, maxSandboxes: 64, memoryBudgetMib: 64 * 1280 });
  });
  after(async () => {
    await d?.close();
  });

  it("gives every sandbox its own entropy, PRNG, identity and clock", async () => {
    const probe =
      "import os, random, socket, time\nprint(os.urandom(16).hex(), random.random(), socket.gethostname(), open('/etc/machine-id').read().strip(), time.time())";
    const [a, b] = await Promise.all([
      Sandbox.create({ host: host() }),
      Sandbox.create({ host: host() }),
    ]);
    try {
      const [ra, rb] = await Promise.all([a.runCode(probe), b.runCode(probe)]);
      const hostNow = Date.now() / 1000;
      const [ua, pa, ha, ma, ta] = ra.stdout.trim().split(" ");
      const [ub, pb, hb, mb, tb] = rb.stdout.trim().split(" ");
      assert.notEqual(ua, ub, "os.urandom differs");
      assert.notEqual(pa, pb, "random.random differs");
      assert.notEqual(ha, hb, "hostnames differ");
      assert.notEqual(ma, mb, "machine-ids differ");
      assert.ok(
        Math.abs(Number(ta) - hostNow) < 1,
        `clock a within 1 s of the host (${ta} vs ${hostNow})`,
      );
      assert.ok(
        Math.abs(Number(tb) - hostNow) < 1,
        `clock b within 1 s of the host (${tb} vs ${hostNow})`,
      );
      const resolved = await a.runCode(
        "import socket; print(socket.gethostbyname(socket.gethostname()))",
      );
      assert.equal(resolved.stdout, "127.0.1.1\n", "the new hostname resolves");
    } finally {
      await Promise.all([a.close(), b.close()]);
    }
  });

  it("hands a pooled VM out without waiting, warm", async () => {
    await eventually("the pool to be full", async () => d.daemon.pool.stats().ready === 2);
    const started = performance.now();
    const s = await Sandbox.create({ host: host() });
    const createMs = performance.now() - started;
    try {
      const res = await fetch(`${host()}/metrics`);
      const text = await res.text();
      assert.match(text, /podflare_create_seconds_count\{result="hit"\} [1-9]/);
      assert.ok(
        createMs < 1000,
        `a pool hit is a hand-over, not a restore (${createMs.toFixed(0)} ms)`,
      );
      assert.equal((await s.runCode("print(6*7)")).stdout, "42\n");
    } finally {
      await s.close();
    }
  });

  it("never hands out one VM twice: 50 concurrent creates", async () => {
    const boxes = await Promise.all(
      Array.from({ length: 50 }, () => Sandbox.create({ host: host() })),
    );
    try {
      const pids = boxes.map((b) => d.daemon.service.vmPid(b.id));
      assert.equal(new Set(pids).size, 50, "50 distinct QEMU processes");
      const names = await Promise.all(
        boxes.map(
          async (b) => (await b.runCode("import socket; print(socket.gethostname())")).stdout,
        ),
      );
      assert.equal(new Set(names).size, 50, "50 distinct hostnames");
    } finally {
      await Promise.all(boxes.map((b) => b.close()));
    }
    // The burst was three times the pool and more; the pool recovers by itself.
    await eventually(
      "the pool to refill after the burst",
      async () => d.daemon.pool.stats().ready === 2,
      120_000,
    );
    assert.deepEqual(await Sandbox.list({ host: host() }), []);
  });

  it("replaces a pooled VM that dies and never hands it out", async () => {
    await eventually("the pool to be full", async () => d.daemon.pool.stats().ready === 2);
    const [victim] = d.daemon.pool.readyPids();
    assert.ok(victim);
    process.kill(victim, "SIGKILL");
    await eventually(
      "the dead VM to leave the pool",
      async () => !d.daemon.pool.readyPids().includes(victim),
    );
    const s = await Sandbox.create({ host: host() });
    try {
      assert.notEqual(d.daemon.service.vmPid(s.id), victim);
      assert.equal((await s.runCode("print('alive')")).stdout, "alive\n");
    } finally {
      await s.close();
    }
    await eventually(
      "the pool to be full again",
      async () => d.daemon.pool.stats().ready === 2,
      60_000,
    );
  });

  it("rebuilds the template when the image changes", async () => {
    const dir = join(d.config.stateDir, "rebuild-templates");
    const log = createLogger("warn");
    const image = d.daemon.engine.opts.image;
    const shape = { vcpuCount: 1, memSizeMib: 256 };
    try {
      const first = new TemplateManager(d.daemon.backend, dir, () => image, log);
      const a = await first.ensure(shape);
      assert.equal(first.builds, 1);
      await first.ensure(shape);
      assert.equal(first.builds, 1, "the same key is built once");

      // The same files under another image hash stand for a changed image.
      const changed = new TemplateManager(
        d.daemon.backend,
        dir,
        () => ({ ...image, key: `${image.key.slice(0, 15)}x` }),
        log,
      );
      const b = await changed.ensure(shape);
      assert.equal(changed.builds, 1, "a changed image builds a new template");
      assert.notEqual(a.key, b.key);
      assert.deepEqual(
        (await listDir(dir)).filter((e) => !e.startsWith(".")),
        [b.key],
        "the stale template is pruned",
      );
      const vm = await d.daemon.backend.restore("vm_rebuilt", b);
      try {
        let out = "";
        for await (const e of vm.agent.exec("print(1+1)")) if (e.type === "stdout") out += e.data;
        assert.equal(out, "2\n");
      } finally {
        await vm.destroy();
      }
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
