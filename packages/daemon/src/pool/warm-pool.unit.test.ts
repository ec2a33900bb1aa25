/**
 * The warm pool above the VM backend seam, on the fake backend (testing/fake-backend.ts):
 * real TemplateManager, Admission and Metrics, template files in a temp dir.
 */
import assert from "node:assert/strict";
import { mkdtemp, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, it } from "node:test";
import type { GuestImage } from "../image/build.js";
import { Metrics } from "../metrics/metrics.js";
import { Admission } from "../sandboxes/admission.js";
import { eventually } from "../testing/eventually.js";
import { FakeBackend, type FakeVm } from "../testing/fake-backend.js";
import { silentLogger } from "../util/logger.js";
import { BootError } from "../vm/backend.js";
import { TemplateManager } from "./templates.js";
import { WarmPool } from "./warm-pool.js";

const SHAPE = { vcpuCount: 2, memSizeMib: 1024 };
const OTHER = { vcpuCount: 1, memSizeMib: 256 };
const IMAGE = { key: "0123456789abcdef" } as GuestImage;

interface Setup {
  backend: FakeBackend;
  templates: TemplateManager;
  admission: Admission;
  pool: WarmPool;
}

let dir: string;
let setups: Setup[] = [];

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "podflare-pool-"));
});
afterEach(async () => {
  for (const s of setups) {
    await s.pool.close();
    await s.templates.close();
  }
  setups = [];
  await rm(dir, { recursive: true, force: true });
});

function setup(opts: { target?: number; budgetMib?: number; backend?: FakeBackend } = {}): Setup {
  const backend = opts.backend ?? new FakeBackend(64);
  const admission = new Admission({
    maxSandboxes: 64,
    memoryBudgetMib: opts.budgetMib ?? 64 * 1024,
    vmOverheadMib: backend.memOverheadMib,
    tenantMaxSandboxes: 64,
    tenantMaxMemMib: 64 * 1024,
  });
  const templates = new TemplateManager(
    backend,
    join(dir, "templates"),
    () => IMAGE,
    silentLogger(),
    () => {},
    {
      admission,
    },
  );
  const pool = new WarmPool(
    backend,
    templates,
    admission,
    { target: opts.target ?? 2, maxConcurrentRestores: 2, defaultShape: SHAPE, maxDiskChain: 8 },
    new Metrics(),
    silentLogger(),
  );
  const s = { backend, templates, admission, pool };
  setups.push(s);
  return s;
}

describe("warm pool (fake backend)", () => {
  it("builds the default template once and fills to its target at refill priority", async () => {
    const { backend, pool, templates } = setup({ target: 3 });
    await pool.start();
    await eventually("the pool to fill", () => pool.stats().ready === 3);
    assert.equal(backend.snapshots, 1);
    assert.equal(templates.builds, 1);
    assert.equal(backend.restores, 3);
    assert.equal(pool.stats().refilling, 0);
    assert.equal(pool.readyPids().length, 3);
    for (const vm of backend.live) assert.equal((vm as FakeVm).nice, 10);
    assert.deepEqual(pool.templateNames(), ["default"]);
    assert.deepEqual(pool.defaultShape("default"), SHAPE);
  });

  it("hands out a ready VM (renice to 0) and refills behind it", async () => {
    const { backend, pool } = setup({ target: 2 });
    await pool.start();
    await eventually("the pool to fill", () => pool.stats().ready === 2);
    const { vm, pooled } = await pool.acquire("default", SHAPE);
    assert.equal(pooled, true);
    await eventually("the renice", () => (vm as FakeVm).nice === 0);
    await eventually("the refill", () => pool.stats().ready === 2);
    assert.equal(backend.restores, 3);
    let out = "";
    for await (const e of vm.agent.exec("print('handed out')"))
      if (e.type === "stdout") out += e.data;
    assert.equal(out, "handed out\n");
    await vm.destroy();
  });

  it("restores another shape on demand (a miss) without touching the pool", async () => {
    const { backend, pool, templates } = setup({ target: 1 });
    await pool.start();
    await eventually("the pool to fill", () => pool.stats().ready === 1);
    const { vm, pooled } = await pool.acquire("default", OTHER);
    assert.equal(pooled, false);
    assert.deepEqual(vm.shape, OTHER);
    assert.equal(templates.builds, 2, "the new shape got its template");
    assert.equal(pool.stats().ready, 1);
    await vm.destroy();
    assert.equal(backend.live.size, 1);
  });

  it("replaces a pooled VM that dies, never handing it out", async () => {
    const { backend, pool } = setup({ target: 2 });
    await pool.start();
    await eventually("the pool to fill", () => pool.stats().ready === 2);
    const [victim] = [...backend.live] as FakeVm[];
    victim?.crash();
    await eventually("the replacement", () => backend.restores === 3 && pool.stats().ready === 2);
    assert.ok(!backend.live.has(victim as FakeVm), "the dead VM was destroyed");
    assert.ok(!pool.readyPids().includes(victim?.pid as number));
  });

  it("never hands out a pooled VM stopped on a full host disk (it would hang its first call)", async () => {
    const { backend, pool } = setup({ target: 2 });
    await pool.start();
    await eventually("the pool to fill", () => pool.stats().ready === 2);
    const [stopped] = [...backend.live] as FakeVm[];
    stopped?.fillDisk();
    await eventually("the stopped VM to go", () => !backend.live.has(stopped as FakeVm));
    assert.equal(pool.stats().ready, 1, "no refill into the full disk until the next create");
    const { vm, pooled } = await pool.acquire("default", SHAPE);
    assert.equal(pooled, true);
    assert.notEqual(vm, stopped);
    assert.equal(vm.stoppedForDisk, false);
    await vm.destroy();
  });

  it("shrinks when sandboxes need the memory it holds", async () => {
    const { backend, pool, admission } = setup({ target: 2 });
    await pool.start();
    const other = await pool.acquire("default", OTHER); // OTHER's template, built now
    await other.vm.destroy();
    await eventually("the pool to fill", () => pool.stats().ready === 2);
    // Sandboxes take every MiB the templates leave: the pool's VMs are over the budget.
    const free = 64 * 1024 - admission.heldMib() - admission.usage().chargedMib;
    admission.admit(
      ["sbx_big"],
      null,
      { maxSandboxes: null, maxMemMib: null },
      {
        vcpuCount: 1,
        memSizeMib: free - backend.memOverheadMib,
      },
    );
    assert.equal(admission.excessMib(), pool.chargedMib());
    const { vm, pooled } = await pool.acquire("default", OTHER);
    assert.equal(pooled, false);
    assert.equal(pool.stats().ready, 0, "both pooled VMs gave way");
    assert.equal(admission.excessMib(), 0);
    await eventually("the pooled VMs' destroy", () => backend.live.size === 1);
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(
      pool.stats().ready + pool.stats().refilling,
      0,
      "no refill into sandboxes' memory",
    );
    await vm.destroy();
    admission.release("sbx_big");
  });

  it("a failing restore leaves no VM, no slot and no template lease; refills back off", async () => {
    const backend = new FakeBackend(64);
    backend.failRestores = 1_000;
    const { pool, templates } = setup({ target: 2, backend });
    await pool.start();
    await eventually(
      "the refills to fail",
      () => backend.restores >= 2 && pool.stats().refilling === 0,
    );
    assert.equal(pool.stats().ready, 0);
    await assert.rejects(pool.acquire("default", SHAPE), BootError);
    assert.equal(backend.live.size, 0, "only the template build's VM ever ran, and it is gone");
    assert.equal(templates.stats().inUse, 1, "the pinned default template, used by nothing");
    // A later restore gets a slot: the failures gave theirs back.
    backend.failRestores = 0;
    const { vm } = await pool.acquire("default", SHAPE);
    await vm.destroy();
  });

  it("a failing template build leaves no files, charge or VM", async () => {
    const backend = new FakeBackend(64);
    const { pool, templates, admission } = setup({ target: 1, backend });
    await pool.start();
    await eventually("the pool to fill", () => pool.stats().ready === 1);
    backend.failSnapshots = 1;
    await assert.rejects(pool.acquire("default", OTHER), BootError);
    assert.equal(templates.stats().count, 1, "only the default template is held");
    assert.equal(admission.heldMib({ kind: "template_build" }), 0);
    const left = (await readdir(join(dir, "templates"))).filter((e) => e.startsWith(".build"));
    assert.deepEqual(left, []);
    assert.equal(backend.live.size, 1, "the pooled VM alone");
  });

  it("close destroys every pooled VM", async () => {
    const { backend, pool } = setup({ target: 2 });
    await pool.start();
    await eventually("the pool to fill", () => pool.stats().ready === 2);
    await pool.close();
    assert.equal(backend.live.size, 0);
    assert.equal(pool.stats().ready, 0);
  });
});
