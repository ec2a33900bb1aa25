/**
 * The sandbox service above the VM backend seam: the real service, warm pool, templates,
 * admission, disk guard and SQLite store (in a temp dir), on the fake backend
 * (testing/fake-backend.ts) instead of QEMU.
 */
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, it } from "node:test";
import type { Tenant } from "../auth/authenticator.js";
import type { ExecEvent } from "../guest/agent-client.js";
import type { GuestImage } from "../image/build.js";
import { Metrics } from "../metrics/metrics.js";
import { TemplateManager } from "../pool/templates.js";
import { WarmPool } from "../pool/warm-pool.js";
import { Store } from "../store/db.js";
import { eventually } from "../testing/eventually.js";
import { FakeBackend, type FakeVm } from "../testing/fake-backend.js";
import { silentLogger } from "../util/logger.js";
import { Admission } from "./admission.js";
import { DiskGuard } from "./disk-guard.js";
import {
  BadRequestError,
  NoCapacityError,
  OverLimitError,
  SandboxDeadError,
  SandboxNotFoundError,
} from "./errors.js";
import { SandboxService } from "./service.js";

const SHAPE = { vcpuCount: 2, memSizeMib: 1024 };
const OVERHEAD = 64;
const ALICE: Tenant = { id: "key_alice", quota: { maxSandboxes: null, maxMemMib: null } };
const BOB: Tenant = { id: "key_bob", quota: { maxSandboxes: null, maxMemMib: null } };

async function run(events: AsyncIterable<ExecEvent>): Promise<{ out: string; code: number }> {
  let out = "";
  let code = Number.NaN;
  for await (const e of events) {
    if (e.type === "stdout") out += e.data;
    if (e.type === "exit") code = e.code;
  }
  return { out, code };
}

let dir: string;
let backend: FakeBackend;
let store: Store;
let admission: Admission;
let templates: TemplateManager;
let pool: WarmPool;
let disk: DiskGuard;
let service: SandboxService;

async function start(
  opts: { maxSandboxes?: number; budgetMib?: number; poolSize?: number } = {},
): Promise<void> {
  backend = new FakeBackend(OVERHEAD);
  store = new Store(join(dir, "podflare.db"));
  admission = new Admission({
    maxSandboxes: opts.maxSandboxes ?? 8,
    memoryBudgetMib: opts.budgetMib ?? 64 * 1024,
    vmOverheadMib: backend.memOverheadMib,
    tenantMaxSandboxes: 8,
    tenantMaxMemMib: 32 * 1024,
  });
  templates = new TemplateManager(
    backend,
    join(dir, "templates"),
    () => ({ key: "0123456789abcdef" }) as GuestImage,
    silentLogger(),
    () => {},
    { admission },
  );
  const metrics = new Metrics();
  pool = new WarmPool(
    backend,
    templates,
    admission,
    { target: opts.poolSize ?? 1, maxConcurrentRestores: 2, defaultShape: SHAPE, maxDiskChain: 8 },
    metrics,
    silentLogger(),
  );
  await pool.start();
  const target = opts.poolSize ?? 1;
  await eventually("the pool to fill", () => pool.stats().ready === target);
  disk = new DiskGuard(dir, 0, silentLogger());
  service = new SandboxService(
    store,
    pool,
    {
      maxVcpuCount: 4,
      maxMemSizeMib: 4096,
      defaultSandboxTimeoutMs: 60_000,
      maxSandboxTimeoutMs: 3_600_000,
      maxUploadBytes: 1024 * 1024,
    },
    admission,
    silentLogger(),
    metrics,
    disk,
  );
}

/** The fake VM behind a live sandbox. */
function vmOf(id: string): FakeVm {
  const pid = service.vmPid(id);
  const vm = [...backend.live].find((v) => v.pid === pid);
  if (!vm) throw new Error(`no VM for ${id}`);
  return vm;
}

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "podflare-service-"));
});
afterEach(async () => {
  await pool.close();
  await templates.close();
  await service.destroyAll("the test ended");
  disk.close();
  store.close();
  await rm(dir, { recursive: true, force: true });
});

describe("sandbox service (fake backend)", () => {
  it("create, exec, destroy: the row follows, the VM and its charge are gone after", async () => {
    await start();
    const info = await service.create(ALICE, { metadata: { job: "unit" } });
    assert.equal(info.state, "ready");
    assert.equal(info.template, "default");
    assert.equal(info.vcpu_count, 2);
    assert.equal(info.mem_size_mib, 1024);
    assert.deepEqual(info.metadata, { job: "unit" });
    assert.equal(store.getSandbox(info.id)?.pid, service.vmPid(info.id));
    assert.equal(service.liveCount, 1);
    assert.deepEqual(admission.usage(ALICE.id), {
      sandboxes: 1,
      memMib: 1024,
      chargedMib: 1024 + OVERHEAD,
    });

    assert.deepEqual(await run(service.exec(ALICE, info.id, { code: "print('hi')" })), {
      out: "hi\n",
      code: 0,
    });
    assert.equal((await run(service.exec(ALICE, info.id, { code: "exit(3)" }))).code, 3);
    assert.deepEqual(
      service.list(ALICE).map((s) => s.id),
      [info.id],
    );
    assert.deepEqual(service.list(BOB), [], "another tenant sees nothing");
    assert.throws(() => service.exec(BOB, info.id, { code: "1" }), SandboxNotFoundError);

    const vm = vmOf(info.id);
    await service.destroy(ALICE, info.id);
    await service.settled();
    assert.equal(store.getSandbox(info.id)?.state, "ended");
    assert.equal(store.getSandbox(info.id)?.end_reason, "destroyed");
    assert.ok(!backend.live.has(vm), "its VM was destroyed");
    assert.throws(() => service.info(ALICE, info.id), SandboxNotFoundError);
    assert.equal(admission.usage().sandboxes, 0);
    assert.equal(service.liveCount, 0);
    await service.destroy(ALICE, info.id); // idempotent
  });

  it("refuses an unknown template and bad shapes before anything is made", async () => {
    await start();
    const restores = backend.restores;
    await assert.rejects(
      service.create(ALICE, { template: "nope" }),
      (e) => e instanceof BadRequestError && /available: default$/.test(e.message),
    );
    await assert.rejects(service.create(ALICE, { vcpu_count: 9 }), BadRequestError);
    await assert.rejects(service.create(ALICE, { mem_size_mib: 64 }), BadRequestError);
    assert.equal(backend.restores, restores);
    assert.equal(store.listOwned(ALICE.id, ["creating", "ready"]).length, 0);
  });

  it("capacity: the host's sandbox cap and memory budget refuse a create, which leaves no row", async () => {
    await start({ maxSandboxes: 2 });
    await service.create(ALICE, {});
    await service.create(BOB, {});
    await assert.rejects(service.create(ALICE, {}), OverLimitError);
    assert.equal(store.listOwned(ALICE.id, ["creating", "ready", "dead"]).length, 1);
    assert.equal(admission.usage().sandboxes, 2);
  });

  it("capacity: past the memory budget a create gets a 503", async () => {
    await start({ budgetMib: 4 * 1024 });
    await assert.rejects(service.create(ALICE, { mem_size_mib: 4096 }), NoCapacityError);
    assert.equal(admission.usage().sandboxes, 0);
  });

  it("a failing restore leaves no row, charge or VM", async () => {
    await start({ poolSize: 0 }); // no refill in the background takes the failure
    backend.failRestores = 1;
    await assert.rejects(service.create(ALICE, { vcpu_count: 1, mem_size_mib: 256 }));
    assert.equal(store.listOwned(ALICE.id, ["creating", "ready", "dead"]).length, 0);
    assert.equal(admission.usage().sandboxes, 0);
    assert.equal(backend.live.size, 0);
  });

  it("fork: n children with the parent's shape and expiry; the fork's hold lasts while the call runs", async () => {
    await start();
    const parent = await service.create(ALICE, {});
    let inFlight!: () => void;
    const gate = new Promise<void>((resolve) => {
      inFlight = resolve;
    });
    let entered = false;
    backend.forkGate = () => {
      entered = true;
      return gate;
    };
    const forking = service.fork(ALICE, parent.id, 2);
    await eventually("the fork to reach the backend", () => entered);
    // The parent's pages are buffered while the fork runs: its guest memory at most, the tenant's.
    assert.equal(admission.heldMib({ kind: "fork" }), 1024);
    assert.equal(admission.heldMib({ kind: "fork", owner: ALICE.id }), 1024);
    inFlight();
    const ids = await forking;
    backend.forkGate = null;
    assert.equal(ids.length, 2);
    assert.equal(backend.forks, 1);
    for (const id of ids) {
      const child = service.info(ALICE, id);
      assert.equal(child.state, "ready");
      assert.equal(child.mem_size_mib, parent.mem_size_mib);
      assert.equal(child.expires_at, parent.expires_at);
      assert.equal((await run(service.exec(ALICE, id, { code: "print('child')" }))).out, "child\n");
    }
    assert.equal(admission.usage(ALICE.id).sandboxes, 3);
    assert.equal(admission.usage(ALICE.id).memMib, 3 * 1024, "each child its own charge");
    assert.equal(admission.heldMib({ kind: "fork" }), 0, "nothing of the fork is held after it");
    await service.destroy(ALICE, ids[0] as string);
    await service.destroy(ALICE, ids[1] as string);
    await service.settled();
    assert.equal(admission.usage(ALICE.id).sandboxes, 1);
    assert.equal(service.info(ALICE, parent.id).state, "ready", "the parent runs on");
    await assert.rejects(service.fork(ALICE, parent.id, 0), BadRequestError);
  });

  it("a sandbox destroyed while its fork runs is ended once its VM is live: no VM escapes", async () => {
    await start({ poolSize: 0 });
    const parent = await service.create(ALICE, {});
    let open!: () => void;
    const gate = new Promise<void>((resolve) => {
      open = resolve;
    });
    const fork = backend.fork.bind(backend);
    backend.fork = async (p, ids) => {
      await gate;
      return fork(p, ids);
    };
    const forking = service.fork(ALICE, parent.id, 2);
    await eventually("the children's rows", () =>
      service.list(ALICE).some((s) => s.state === "creating"),
    );
    const doomed = service.list(ALICE).find((s) => s.state === "creating")?.id as string;
    await service.destroy(ALICE, doomed);
    open();
    const ids = await forking;
    assert.ok(ids.includes(doomed));
    await service.settled();
    assert.equal(store.getSandbox(doomed)?.state, "ended");
    assert.equal(store.getSandbox(doomed)?.end_reason, "destroyed");
    assert.deepEqual(
      service
        .list(ALICE)
        .map((s) => s.id)
        .sort(),
      [parent.id, ...ids.filter((i) => i !== doomed)].sort(),
    );
    assert.equal(backend.live.size, 2, "the parent and the one child kept");
    assert.equal(admission.usage(ALICE.id).sandboxes, 2);
  });

  it("a sandbox destroyed while it is created is ended once its VM is live", async () => {
    await start({ poolSize: 0 });
    let open!: () => void;
    const gate = new Promise<void>((resolve) => {
      open = resolve;
    });
    const restore = backend.restore.bind(backend);
    backend.restore = async (i, t, n) => {
      await gate;
      return restore(i, t, n);
    };
    const creating = service.create(ALICE, {});
    await eventually("its row", () => service.list(ALICE).some((s) => s.state === "creating"));
    const id = service.list(ALICE)[0]?.id as string;
    await service.destroy(ALICE, id);
    assert.equal(admission.usage(ALICE.id).sandboxes, 1, "charged while its create runs");
    open();
    const info = await creating;
    assert.equal(info.id, id);
    assert.notEqual(info.state, "ready", "the answer says it is gone");
    await service.settled();
    assert.equal(store.getSandbox(id)?.state, "ended");
    assert.equal(backend.live.size, 0, "its VM is destroyed");
    assert.equal(admission.usage(ALICE.id).sandboxes, 0);
  });

  it("a failing fork leaves no child row, charge or hold", async () => {
    await start({ poolSize: 0 });
    const parent = await service.create(ALICE, {});
    backend.failRestores = 1;
    await assert.rejects(service.fork(ALICE, parent.id, 2));
    assert.deepEqual(
      service.list(ALICE).map((s) => s.id),
      [parent.id],
    );
    assert.equal(admission.usage(ALICE.id).sandboxes, 1);
    assert.equal(admission.heldMib({ kind: "fork" }), 0);
    assert.ok([...backend.live].every((vm) => vm.alive));
    assert.equal(backend.live.size, 1, "the parent alone");
  });

  it("expiry ends a sandbox and frees its VM and charge", async () => {
    await start();
    const info = await service.create(ALICE, { timeout_ms: 30 });
    const vm = vmOf(info.id);
    await eventually("the expiry", () => store.getSandbox(info.id)?.state === "ended");
    assert.equal(store.getSandbox(info.id)?.end_reason, "expired");
    await service.settled();
    assert.ok(!backend.live.has(vm));
    assert.equal(admission.usage().sandboxes, 0);
  });

  it("a VM that dies makes its sandbox dead (its memory is released at once)", async () => {
    await start();
    const info = await service.create(ALICE, {});
    vmOf(info.id).crash();
    await eventually("the dead state", () => store.getSandbox(info.id)?.state === "dead");
    assert.equal(admission.usage().sandboxes, 0);
    assert.throws(() => service.exec(ALICE, info.id, { code: "1" }), SandboxDeadError);
    await service.destroy(ALICE, info.id);
    assert.equal(store.getSandbox(info.id)?.state, "ended");
  });

  it("the disk guard does not resume a parent while its fork runs", async () => {
    await start({ poolSize: 0 });
    const parent = await service.create(ALICE, {});
    const vm = vmOf(parent.id);
    let open!: () => void;
    const gate = new Promise<void>((resolve) => {
      open = resolve;
    });
    const fork = backend.fork.bind(backend);
    let forking = false;
    backend.fork = async (p, ids) => {
      forking = true;
      vm.fillDisk(); // QEMU paused it for a full host disk during the capture
      await gate;
      return fork(p, ids);
    };
    const forked = service.fork(ALICE, parent.id, 1);
    await eventually("the fork", () => forking);
    // The guard checks every second (min free here: 0 MiB, so there is room): it waits.
    await new Promise((resolve) => setTimeout(resolve, 1_500));
    assert.ok(vm.paused, "not resumed in the middle of the fork");
    open();
    await forked;
    await eventually(
      "the resume after the fork",
      () => !vm.paused && disk.pausedCount === 0,
      3_000,
    );
  });

  it("a VM paused on a full host disk gets a 503 until the guard resumes it", async () => {
    await start();
    const info = await service.create(ALICE, {});
    const vm = vmOf(info.id);
    vm.fillDisk();
    assert.equal(disk.pausedCount, 1);
    assert.throws(() => service.exec(ALICE, info.id, { code: "1" }), NoCapacityError);
    // The guard checks the free space every second (min free here: 0 MiB).
    await eventually("the resume", () => !vm.paused && disk.pausedCount === 0, 3_000);
    assert.equal(
      (await run(service.exec(ALICE, info.id, { code: "print('back')" }))).out,
      "back\n",
    );
  });
});
