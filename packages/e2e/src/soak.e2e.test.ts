/**
 * A short soak: create -> exec -> destroy cycles through the TypeScript SDK, several in
 * parallel, against a real daemon. Zero errors; the process's file descriptors back to
 * where they started (within a small margin); nothing of any sandbox left on disk or
 * running. The long version with figures is `npm run soak` (bench/soak.ts).
 */
import assert from "node:assert/strict";
import { readdir } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { Sandbox } from "podflare";
import { qemuPids, startTestDaemon, type TestDaemon } from "./harness.js";

const CYCLES = Number(process.env.PODFLARE_SOAK_CYCLES ?? 100);
const PARALLEL = 8;
const FD_MARGIN = 8;

const fds = async () => (await readdir("/proc/self/fd")).length;
const entries = async (dir: string) => (await readdir(dir).catch(() => [])).sort();

async function poolSettled(url: string): Promise<void> {
  for (;;) {
    const cap = (await (await fetch(`${url}/v1/capacity`)).json()) as {
      pool: { target: number; ready: number; refilling: number };
    };
    if (cap.pool.ready >= cap.pool.target && cap.pool.refilling === 0) return;
    await new Promise((r) => setTimeout(r, 25));
  }
}

describe("soak", () => {
  let d: TestDaemon;

  before(async () => {
    d = await startTestDaemon();
  });
  after(async () => {
    await d?.close();
  });

  it(`${CYCLES} create -> exec -> destroy cycles, ${PARALLEL} in parallel: no errors, no leaks`, async () => {
    // Warm-up, not counted: one cycle per worker opens the HTTP keep-alive connections (two
    // fds each in this process: client and server end) that the run then reuses.
    await Promise.all(
      Array.from({ length: PARALLEL }, async () => {
        const s = await Sandbox.create({ host: d.url });
        await s.runCode("1");
        await s.close();
      }),
    );
    await d.daemon.service.settled();
    await poolSettled(d.url);
    const vmsDir = join(d.config.stateDir, "vms");
    const start = {
      fds: await fds(),
      rss: process.memoryUsage().rss,
      vms: await entries(vmsDir),
      shm: await entries(d.config.shmDir),
    };
    const errors: string[] = [];
    let next = 0;
    const t0 = performance.now();
    await Promise.all(
      Array.from({ length: PARALLEL }, async () => {
        for (let k = next++; k < CYCLES; k = next++) {
          try {
            const s = await Sandbox.create({ host: d.url });
            try {
              const r = await s.runCode(`print(${k} * 3)`);
              assert.equal(r.stdout, `${k * 3}\n`);
              assert.equal(r.exitCode, 0);
            } finally {
              await s.close();
            }
          } catch (err) {
            errors.push(`cycle ${k}: ${(err as Error).message}`);
          }
        }
      }),
    );
    const seconds = (performance.now() - t0) / 1000;
    assert.deepEqual(errors, []);
    assert.deepEqual(await Sandbox.list({ host: d.url }), []);

    // Every destroy's background cleanup done, the pool back to its size: comparable.
    await d.daemon.service.settled();
    await poolSettled(d.url);
    const end = {
      fds: await fds(),
      rss: process.memoryUsage().rss,
      vms: await entries(vmsDir),
      shm: await entries(d.config.shmDir),
    };
    console.log(
      `soak: ${CYCLES} cycles x ${PARALLEL} in ${seconds.toFixed(1)} s (${(CYCLES / seconds).toFixed(2)}/s); fds ${start.fds} -> ${end.fds}; RSS ${(start.rss / 2 ** 20).toFixed(0)} -> ${(end.rss / 2 ** 20).toFixed(0)} MiB; VM dirs ${start.vms.length} -> ${end.vms.length}`,
    );
    assert.ok(end.fds <= start.fds + FD_MARGIN, `fds ${start.fds} -> ${end.fds}`);
    // Only the pool's VMs have directories, as at the start (the pool's members change).
    assert.equal(end.vms.length, start.vms.length, `vms/: ${end.vms.join(" ")}`);
    assert.equal(end.shm.length, start.shm.length, `shm: ${end.shm.join(" ")}`);

    // After shutdown nothing of any VM is left: no QEMU, no VM directory, no layer.
    await d.daemon.close();
    assert.deepEqual(await qemuPids(d.config.stateDir), []);
    assert.deepEqual(await entries(vmsDir), []);
    assert.deepEqual(await entries(join(d.config.stateDir, "layers")), []);
  });
});
