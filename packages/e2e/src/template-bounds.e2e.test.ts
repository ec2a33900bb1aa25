/**
 * Shapes cannot create unbounded templates: a tenant who loops over 50 shapes (each a
 * template's cold boot) leaves the number of templates and the /dev/shm they use bounded
 * by PODFLARE_MAX_TEMPLATES, while another tenant's creates and execs keep working. When
 * every template is in use, a new shape gets a clear 503; one tenant's concurrent builds
 * are bounded (429). The daemon has a templates directory of its own, so that evicting
 * templates disturbs no other test daemon.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { readdir, rm, stat } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { KeyStore, Store } from "@podflare/daemon";
import { CapacityError, RateLimitError, Sandbox } from "podflare";
import { eventually, startTestDaemon, type TestDaemon } from "./harness.js";

const MAX_TEMPLATES = 4;
const SHAPES = Number(process.env.PODFLARE_TEST_SHAPES ?? 50);
const MIN_MEM = 128; // the smallest guest the API accepts (and the guest boots with)
/** The attacker's shapes: 1 vCPU, 128.. MiB, one MiB apart (each a template key of its own). */
const shapeAt = (i: number) => ({ vcpuCount: 1, memSizeMib: MIN_MEM + 1 + i });
const DEFAULT = { vcpuCount: 1, memSizeMib: MIN_MEM };

/** Bytes the files below `dir` occupy (tmpfs: resident memory), and its template count. */
async function templatesOnDisk(dir: string): Promise<{ templates: number; bytes: number }> {
  let templates = 0;
  let bytes = 0;
  const walk = async (path: string, top: boolean): Promise<void> => {
    for (const e of await readdir(path, { withFileTypes: true }).catch(() => [])) {
      const p = join(path, e.name);
      if (e.isDirectory()) {
        // A finished template, or one being built (renamed into place once complete).
        if (top && (!e.name.startsWith(".") || e.name.startsWith(".build-"))) templates++;
        await walk(p, false);
      } else bytes += ((await stat(p).catch(() => null))?.blocks ?? 0) * 512;
    }
  };
  await walk(dir, true);
  return { templates, bytes };
}

describe("template bounds", () => {
  let d: TestDaemon;
  let attacker: string;
  let other: string;
  const templatesDir = join(
    "/dev/shm",
    `podflare-test-tpl-bounds-${randomBytes(4).toString("hex")}`,
  );
  const opts = (apiKey: string) => ({ host: d.url, apiKey });

  before(async () => {
    d = await startTestDaemon({
      templatesDir,
      maxTemplates: MAX_TEMPLATES,
      tenantMaxTemplateBuilds: 2,
      maxConcurrentRestores: 2,
      poolSize: 1,
      defaultVcpuCount: DEFAULT.vcpuCount,
      defaultMemSizeMib: DEFAULT.memSizeMib,
      // 52 cold boots on a shared, loaded host: one slow boot must not fail the attack.
      bootTimeoutMs: 180_000,
    });
    const store = new Store(join(d.config.stateDir, "podflare.db"));
    const keys = new KeyStore(store.db);
    attacker = keys.create("attacker", { maxSandboxes: null, maxMemMib: null }).secret;
    other = keys.create("other", { maxSandboxes: null, maxMemMib: null }).secret;
    store.close();
  });
  after(async () => {
    await d?.close();
    await rm(templatesDir, { recursive: true, force: true });
  });

  const capacity = async (key: string) =>
    (await (
      await fetch(`${d.url}/v1/capacity`, { headers: { authorization: `Bearer ${key}` } })
    ).json()) as {
      memory: { templates_mib: number; budget_mib: number };
      templates: { count: number; in_use: number; max: number };
    };

  /** Wait until fewer than all templates are in use (destroyed sandboxes' QEMUs exited). */
  const roomForATemplate = () =>
    eventually(
      "a template no longer in use",
      async () => {
        const c = await capacity(attacker);
        return c.templates.in_use < c.templates.max;
      },
      60_000,
    );

  it("refuses a tenant's builds past its bound with 429, and a new shape with 503 while every template is in use", async () => {
    // Three builds at once from one key: its bound is two, so one is refused at once.
    const results = await Promise.allSettled(
      [0, 1, 2].map((i) => Sandbox.create({ ...opts(attacker), ...shapeAt(i) })),
    );
    const boxes = results.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []));
    const refused = results.flatMap((r) => (r.status === "rejected" ? [r.reason] : []));
    try {
      assert.equal(boxes.length, 2, `two builds run: ${refused.map(String).join("; ")}`);
      assert.equal(refused.length, 1);
      assert.ok(refused[0] instanceof RateLimitError, String(refused[0]));
      assert.match(String(refused[0].message), /building 2 VM template/);

      // Default + two held = 3 in use; a third shape fills the cap; a fourth finds none free.
      boxes.push(await Sandbox.create({ ...opts(attacker), ...shapeAt(3) }));
      const c = await capacity(attacker);
      assert.equal(c.templates.count, MAX_TEMPLATES);
      assert.equal(c.templates.in_use, MAX_TEMPLATES);
      await assert.rejects(
        Sandbox.create({ ...opts(attacker), ...shapeAt(4) }),
        (err: Error) =>
          err instanceof CapacityError &&
          /at most 4 VM templates .* all are in use/.test(err.message),
      );
      // The other tenant's default shape still works, and the refusal left nothing behind.
      const ok = await Sandbox.create(opts(other));
      assert.equal((await ok.runCode("print(6*7)")).stdout, "42\n");
      await ok.close();
      assert.equal((await templatesOnDisk(templatesDir)).templates, MAX_TEMPLATES);
    } finally {
      await Promise.all(boxes.map((b) => b.close()));
    }
    await roomForATemplate();
  });

  it(`keeps templates and /dev/shm bounded over ${SHAPES} shapes while another tenant works`, async () => {
    const started = performance.now();
    let maxTemplates = 0;
    let maxBytes = 0;
    let sampling = true;
    const sampler = (async () => {
      while (sampling) {
        const s = await templatesOnDisk(templatesDir);
        maxTemplates = Math.max(maxTemplates, s.templates);
        maxBytes = Math.max(maxBytes, s.bytes);
        await new Promise((r) => setTimeout(r, 100));
      }
    })();

    let next = 0;
    let refusedFull = 0;
    // The other tenant works in step with the attack (an exec per shape built, a create
    // every few), so that it is interleaved without adding a restore loop of its own.
    let attacking = true;
    let progress = 0;
    let onProgress: (() => void) | null = null;
    const shapeDone = () => {
      progress++;
      onProgress?.();
    };
    const nextShape = (after: number) =>
      new Promise<void>((resolve) => {
        if (progress > after || !attacking) return resolve();
        onProgress = () => {
          onProgress = null;
          resolve();
        };
      });
    const attackerWorker = async () => {
      for (let i = next++; i < SHAPES; i = next++) {
        const shape = shapeAt(i);
        for (;;) {
          try {
            const box = await Sandbox.create({ ...opts(attacker), ...shape });
            try {
              const r = await box.runCode("import os; print(os.cpu_count())");
              assert.equal(r.stdout, "1\n");
            } finally {
              await box.close();
            }
            shapeDone();
            break;
          } catch (err) {
            // Every template busy (the last sandboxes' QEMUs are still exiting): wait for one.
            if (!(err instanceof CapacityError && /all are in use/.test(err.message))) throw err;
            refusedFull++;
            await roomForATemplate();
          }
        }
      }
    };
    let otherRuns = 0;
    let otherCreates = 0;
    const otherWorker = async () => {
      const kept = await Sandbox.create({ ...opts(other), timeoutMs: 3600_000 });
      try {
        while (attacking) {
          const seen = progress;
          const t = performance.now();
          const r = await kept.runCode(`print(${otherRuns} + 1)`);
          assert.equal(r.stdout, `${otherRuns + 1}\n`);
          otherRuns++;
          if (otherRuns % 4 === 0) {
            const box = await Sandbox.create(opts(other));
            try {
              assert.equal((await box.runCode("print('fresh')")).stdout, "fresh\n");
            } finally {
              await box.close();
            }
            otherCreates++;
          }
          assert.ok(performance.now() - t < 120_000, "the other tenant's calls were slow");
          await nextShape(seen);
        }
      } finally {
        await kept.close();
      }
    };
    const otherDone = otherWorker();
    try {
      await Promise.all([attackerWorker(), attackerWorker()]);
    } finally {
      attacking = false;
      (onProgress as (() => void) | null)?.();
      sampling = false;
      await sampler;
      await otherDone;
    }
    const seconds = (performance.now() - started) / 1000;
    const maxMib = Math.round(maxBytes / 2 ** 20);
    const c = await capacity(attacker);
    console.log(
      `template bounds: ${SHAPES} shapes in ${seconds.toFixed(0)} s; max templates seen ${maxTemplates} (cap ${MAX_TEMPLATES}); max ${maxMib} MiB in /dev/shm; builds ${d.daemon.templates.builds}, evictions ${d.daemon.templates.evictions}; 503s (all in use) ${refusedFull}; other tenant's execs ${otherRuns} and creates ${otherCreates} ok; templates_mib now ${c.memory.templates_mib}`,
    );
    assert.ok(d.daemon.templates.builds >= SHAPES, "every shape was built");
    assert.ok(maxTemplates <= MAX_TEMPLATES, `at most ${MAX_TEMPLATES} templates at once`);
    // Each template's memory file is at most its guest size; one more may be being removed.
    const boundMib = (MAX_TEMPLATES + 1) * (MIN_MEM + 1 + SHAPES + 16);
    assert.ok(maxMib <= boundMib, `${maxMib} MiB in /dev/shm exceeds ${boundMib}`);
    assert.ok(otherRuns >= SHAPES / 2, "the other tenant's execs ran during the loop");
    assert.ok(otherCreates >= 1, "the other tenant got new sandboxes during the loop");
    assert.ok(c.templates.count <= MAX_TEMPLATES);
  });
});
