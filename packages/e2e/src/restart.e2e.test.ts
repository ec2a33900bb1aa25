/**
 * `kill -9` of the daemon while sandboxes run, then a restart: no orphan process, no
 * stray file, and a list that tells the truth.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { after, describe, it } from "node:test";
import { Sandbox } from "podflare";
import { eventually, listDir, qemuPids, serve, serveEnv } from "./harness.js";

describe("daemon restart after kill -9", () => {
  const cleanup: (() => Promise<void>)[] = [];
  after(async () => {
    for (const c of cleanup.reverse()) await c();
  });

  it("ends the old sandboxes, kills their VMs and removes their files", async () => {
    const { config, env, remove } = await serveEnv({ poolSize: 1 });
    cleanup.push(remove);
    const vmsDir = join(config.stateDir, "vms");

    const first = await serve(env);
    cleanup.push(async () => void first.child.kill("SIGKILL"));
    const [a, b] = await Promise.all([
      Sandbox.create({ host: first.url, vcpuCount: 1, memSizeMib: 256 }),
      Sandbox.create({ host: first.url, vcpuCount: 1, memSizeMib: 256 }),
    ]);
    await a.runCode("open('/root/x', 'w').write('x')");
    // Two sandboxes and one warm pool VM.
    await eventually("the pool to refill", async () => (await qemuPids(vmsDir)).length === 3);
    const oldVmDirs = await listDir(vmsDir);
    assert.equal(oldVmDirs.length, 3);

    first.child.kill("SIGKILL");
    await new Promise((r) => first.child.once("exit", r));
    // QEMU runs with a parent-death signal: the VMs die with the daemon.
    await eventually(
      "the VMs to die with the daemon",
      async () => (await qemuPids(vmsDir)).length === 0,
      10_000,
    );

    const second = await serve(env);
    cleanup.push(async () => void second.child.kill("SIGKILL"));
    assert.deepEqual(await Sandbox.list({ host: second.url }), []);
    // Only the new daemon's own pool VM is there: nothing of the old run.
    const left = await listDir(vmsDir);
    assert.ok(left.length <= 1, `at most the new pool VM, found ${left.join(", ")}`);
    assert.deepEqual(
      left.filter((d) => oldVmDirs.includes(d)),
      [],
    );
    assert.deepEqual(await listDir(join(config.shmDir, "vms")), []);
    for (const s of [a, b]) {
      const res = await fetch(`${second.url}/v1/sandboxes/${s.id}`);
      assert.equal(res.status, 404);
    }
    // The restarted daemon works.
    const c = await Sandbox.create({ host: second.url, vcpuCount: 1, memSizeMib: 256 });
    assert.equal((await c.runCode("print(6*7)")).stdout, "42\n");
    await c.close();
    second.child.kill("SIGTERM");
    await new Promise((r) => second.child.once("exit", r));
    assert.deepEqual(await listDir(vmsDir), [], "a stopped daemon leaves no VM directory");
  });
});
