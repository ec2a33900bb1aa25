/**
 * Faults survived. The daemon is killed (SIGKILL, at a named crash point) at each step of
 * create, fork and destroy; each restart must find a consistent store, no VM process and
 * no file left of the run that died. A sandbox whose QEMU is killed is marked dead at
 * once and its calls fail fast with a clear error.
 */
import assert from "node:assert/strict";
import type { ChildProcess } from "node:child_process";
import { join } from "node:path";
import { after, describe, it } from "node:test";
import { CRASH_POINTS, Store } from "@podflare/daemon";
import { Sandbox, SandboxStateError } from "podflare";
import {
  eventually,
  listDir,
  qemuPids,
  serve,
  serveEnv,
  startTestDaemon,
  type TestDaemon,
} from "./harness.js";

const exited = (child: ChildProcess) =>
  new Promise<NodeJS.Signals | null>((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) resolve(child.signalCode);
    else child.once("exit", (_code, signal) => resolve(signal));
  });

describe("daemon killed at each step of create, fork and destroy", () => {
  const cleanup: (() => Promise<void>)[] = [];
  after(async () => {
    for (const c of cleanup.reverse()) await c();
  });

  it("restarts into a consistent state with no orphan process and no stray file", async () => {
    const { config, env, remove } = await serveEnv({ poolSize: 0 });
    cleanup.push(remove);
    const shape = { vcpuCount: 1, memSizeMib: 256 };

    /** What a freshly started daemon must find after any crash. */
    async function assertClean(url: string, after: string): Promise<void> {
      assert.deepEqual(await Sandbox.list({ host: url }), [], `no sandbox listed (${after})`);
      const store = new Store(join(config.stateDir, "podflare.db"));
      try {
        const open = store.db
          .prepare("SELECT id, state FROM sandboxes WHERE state != 'ended'")
          .all();
        assert.deepEqual(open, [], `every row of the dead run ended (${after})`);
      } finally {
        store.close();
      }
      for (const dir of [
        join(config.stateDir, "vms"),
        join(config.stateDir, "layers"),
        join(config.shmDir, "vms"),
        join(config.shmDir, "forks"),
      ]) {
        assert.deepEqual(await listDir(dir), [], `${dir} is empty (${after})`);
      }
      assert.deepEqual(await qemuPids(config.stateDir), [], `no QEMU left (${after})`);
    }

    let previous = "a fresh state directory";
    for (const point of CRASH_POINTS) {
      const d = await serve({ ...env, PODFLARE_CRASH_AT: point });
      cleanup.push(async () => void d.child.kill("SIGKILL"));
      await assertClean(d.url, `restart after ${previous}`);
      const died = exited(d.child);
      const [step] = point.split(":");
      const op = (async () => {
        if (step === "create") await Sandbox.create({ host: d.url, ...shape });
        const s = await Sandbox.create({ host: d.url, ...shape });
        await s.runCode("open('/root/data', 'w').write('x' * 4096)");
        if (step === "fork") await s.fork(1);
        if (step === "destroy") await s.close();
        await new Promise(() => {}); // the daemon dies before this matters
      })();
      const outcome = await Promise.race([died, op.catch(() => died)]);
      assert.equal(outcome, "SIGKILL", `the daemon died at ${point}`);
      // QEMU runs with a parent-death signal: the VMs die with the daemon.
      await eventually(
        `the VMs to die with the daemon (${point})`,
        async () => (await qemuPids(config.stateDir)).length === 0,
        10_000,
      );
      previous = `a crash at ${point}`;
    }
    const last = await serve(env);
    cleanup.push(async () => void last.child.kill("SIGKILL"));
    await assertClean(last.url, `restart after ${previous}`);
    const s = await Sandbox.create({ host: last.url, ...shape });
    const forked = await s.fork(1);
    assert.equal((await forked[0]?.runCode("print(6*7)"))?.stdout, "42\n");
    last.child.kill("SIGTERM");
    await exited(last.child);
    assert.deepEqual(await listDir(join(config.stateDir, "vms")), []);
  });
});

describe("a sandbox whose QEMU is killed", () => {
  let d: TestDaemon;
  after(async () => {
    await d?.close();
  });

  it("is dead within a second and its calls fail fast with a clear error", async () => {
    d = await startTestDaemon({ poolSize: 1 });
    const sbx = await Sandbox.create({ host: d.url });
    const pid = d.daemon.service.vmPid(sbx.id);
    assert.ok(pid);
    const events = sbx.runCodeStream("import time; print('go', flush=True); time.sleep(60)");
    let killedAt = 0;
    let exit: { code?: number; error?: { name: string } } | undefined;
    for await (const e of events) {
      if (e.type === "stdout" && killedAt === 0) {
        killedAt = performance.now(); // the code runs: now kill its VM
        process.kill(pid, "SIGKILL");
      }
      if (e.type === "exit") exit = e as typeof exit;
    }
    const streamEndedMs = performance.now() - killedAt;
    assert.equal(exit?.code, -1);
    assert.equal(exit?.error?.name, "SandboxDied");
    const info = await eventually("the sandbox to be dead", async () => {
      const i = await sbx.getInfo();
      return i.state === "dead" ? i : undefined;
    });
    const deadMs = performance.now() - killedAt;
    assert.equal(info.state, "dead");
    assert.ok(deadMs < 1000, `dead after ${deadMs} ms`);
    const t0 = performance.now();
    await assert.rejects(sbx.runCode("print(1)"), (err: Error) => {
      assert.ok(err instanceof SandboxStateError, String(err));
      assert.equal(err.code, "sandbox_dead");
      assert.match(err.message, /no longer running .*create a new one/);
      return true;
    });
    const failMs = performance.now() - t0;
    const cap = (await (await fetch(`${d.url}/v1/capacity`)).json()) as { running: number };
    assert.equal(cap.running, 0, "a dead sandbox is not counted as running");
    console.log(
      `qemu killed: running exec ended after ${streamEndedMs.toFixed(0)} ms, state dead after ${deadMs.toFixed(0)} ms, next call failed in ${failMs.toFixed(1)} ms`,
    );
    await sbx.close();
  });
});
