/**
 * Keys and tenants against a real daemon: a key is required once one exists, another
 * tenant's sandbox is indistinguishable from one that does not exist on every route, and
 * quotas and the host memory budget refuse with 429 and 503 while counters stay exact.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { promisify } from "node:util";
import { createLogger, KeyStore, loadConfig, repoRoot, Store, startDaemon } from "@podflare/daemon";
import { startTestDaemon, type TestDaemon } from "./harness.js";

const execFileP = promisify(execFile);
const CHARGE = 1024 + 256; // default shape + the default per-VM overhead (its cgroup limit)

interface Reply {
  status: number;
  body: string;
}

describe("API keys and tenants", () => {
  let d: TestDaemon;
  let keyA: string;
  let keyB: string;
  let keyC: string;
  let keyBId: string;

  async function call(
    key: string | null,
    method: string,
    path: string,
    body?: unknown,
    raw?: Buffer,
  ): Promise<Reply> {
    const headers: Record<string, string> = {};
    if (key) headers.authorization = `Bearer ${key}`;
    if (body !== undefined) headers["content-type"] = "application/json";
    if (raw) headers["content-type"] = "application/octet-stream";
    const res = await fetch(`${d.url}${path}`, {
      method,
      headers,
      body: raw ?? (body === undefined ? undefined : JSON.stringify(body)),
    });
    return { status: res.status, body: await res.text() };
  }

  async function create(key: string): Promise<string> {
    const r = await call(key, "POST", "/v1/sandboxes", {});
    assert.equal(r.status, 201, r.body);
    return (JSON.parse(r.body) as { id: string }).id;
  }

  before(async () => {
    // Room for exactly three sandboxes of the default shape, and the default template's
    // memory (charged at most twice its guest size: pool/template-cache.ts).
    d = await startTestDaemon({ memoryBudgetMib: 3 * CHARGE + 2 * 1024, poolSize: 1 });
  });
  after(async () => {
    await d?.close();
  });

  it("is open while no key exists, and closed once one does", async () => {
    assert.equal((await call(null, "GET", "/v1/sandboxes")).status, 200);
    const env = { ...process.env, PODFLARE_STATE_DIR: d.config.stateDir };
    const cli = join(repoRoot, "packages/cli/dist/main.js");
    const a = await execFileP(
      process.execPath,
      [cli, "keys", "create", "--name", "tenant-a", "--max-sandboxes", "2"],
      { env },
    );
    keyA = a.stdout.trim();
    assert.match(keyA, /^pf_[\w-]{43}$/);
    const store = new Store(join(d.config.stateDir, "podflare.db"));
    const keys = new KeyStore(store.db);
    const b = keys.create("tenant-b", { maxSandboxes: null, maxMemMib: null });
    const c = keys.create("tenant-c", { maxSandboxes: null, maxMemMib: null });
    store.close();
    keyB = b.secret;
    keyBId = b.record.id;
    keyC = c.secret;
    const listed = await execFileP(process.execPath, [cli, "keys", "list"], { env });
    assert.match(listed.stdout, /tenant-a\tactive\tmax_sandboxes=2/);
    assert.ok(!listed.stdout.includes(keyA), "a listed key never shows the secret");

    for (const path of ["/v1/sandboxes", "/v1/capacity", "/v1/sandboxes/sbx_0"]) {
      const r = await call(null, "GET", path);
      assert.equal(r.status, 401, path);
      assert.equal(JSON.parse(r.body).code, "unauthorized");
      assert.equal((await call(`${keyA}x`, "GET", path)).status, 401);
    }
    assert.equal((await call(null, "GET", "/v1/healthz")).status, 200);
    assert.equal((await call(keyA, "GET", "/v1/sandboxes")).status, 200);
  });

  it("answers another tenant's sandbox exactly as one that does not exist, on every route", async () => {
    const mine = await create(keyA);
    const theirs = await create(keyB);
    const ghost = `sbx_${"0".repeat(16)}`;
    const routes: [string, string, unknown?, Buffer?][] = [
      ["GET", "/v1/sandboxes/{id}"],
      ["POST", "/v1/sandboxes/{id}/exec", { code: "print(1)" }],
      ["POST", "/v1/sandboxes/{id}/fork", { n: 1 }],
      ["PUT", "/v1/sandboxes/{id}/files?path=/tmp/x", undefined, Buffer.from("hi")],
      ["GET", "/v1/sandboxes/{id}/files?path=/etc/hostname"],
      ["POST", `/v1/sandboxes/{id}/merge_into/${theirs}`],
      ["POST", `/v1/sandboxes/${theirs}/merge_into/{id}`],
      ["DELETE", "/v1/sandboxes/{id}"],
    ];
    for (const [method, path, body, raw] of routes) {
      const other = await call(keyB, method, path.replace("{id}", mine), body, raw);
      const none = await call(keyB, method, path.replace("{id}", ghost), body, raw);
      assert.equal(other.status, 404, `${method} ${path}: ${other.body}`);
      assert.equal(none.status, 404, `${method} ${path}: ${none.body}`);
      assert.equal(other.body.replaceAll(mine, "<id>"), none.body.replaceAll(ghost, "<id>"));
    }
    const listB = JSON.parse((await call(keyB, "GET", "/v1/sandboxes")).body);
    assert.deepEqual(
      listB.sandboxes.map((s: { id: string }) => s.id),
      [theirs],
    );
    // Nothing B tried touched A's sandbox.
    const exec = await call(keyA, "POST", `/v1/sandboxes/${mine}/exec`, { code: "print(6*7)" });
    assert.equal(exec.status, 200);
    assert.match(exec.body, /"data":"42\\n"/);
    assert.equal((await call(keyA, "DELETE", `/v1/sandboxes/${mine}`)).status, 204);
    assert.equal((await call(keyB, "DELETE", `/v1/sandboxes/${theirs}`)).status, 204);
    await d.daemon.service.settled();
  });

  it("enforces a key's quota with 429 and the memory budget with 503, counting exactly", async () => {
    const a1 = await create(keyA);
    const a2 = await create(keyA);
    const over = await call(keyA, "POST", "/v1/sandboxes", {});
    assert.equal(over.status, 429, over.body);
    assert.match(JSON.parse(over.body).error, /your key may hold 2 sandboxes/);
    const fork = await call(keyA, "POST", `/v1/sandboxes/${a1}/fork`, { n: 1 });
    assert.equal(fork.status, 429, fork.body);

    const c1 = await create(keyC); // the third of three that fit the budget
    const full = await call(keyC, "POST", "/v1/sandboxes", {});
    assert.equal(full.status, 503, full.body);
    assert.equal(JSON.parse(full.body).code, "no_capacity");
    assert.match(JSON.parse(full.body).error, /memory budget/);

    const cap = JSON.parse((await call(keyA, "GET", "/v1/capacity")).body);
    assert.equal(cap.running, 3);
    assert.deepEqual(cap.tenant, {
      sandboxes: 2,
      mem_mib: 2048,
      forks_mib: 0,
      max_sandboxes: 2,
      max_mem_mib: cap.tenant.max_mem_mib,
      streams: 0,
      stream_buffered_bytes: 0,
      max_streams: cap.tenant.max_streams,
      max_stream_buffered_bytes: cap.tenant.max_stream_buffered_bytes,
    });
    assert.equal(cap.memory.sandboxes_mib, 3 * CHARGE);
    assert.ok(
      cap.memory.sandboxes_mib + cap.memory.pool_mib + cap.memory.templates_mib <=
        cap.memory.budget_mib,
      "the pool gave way",
    );

    // Room returns once a sandbox is gone, and the refused calls left nothing behind.
    assert.equal((await call(keyA, "DELETE", `/v1/sandboxes/${a2}`)).status, 204);
    await d.daemon.service.settled();
    const c2 = await create(keyC);
    const capC = JSON.parse((await call(keyC, "GET", "/v1/capacity")).body);
    assert.equal(capC.tenant.sandboxes, 2);
    assert.equal(capC.running, 3);
    for (const [key, id] of [
      [keyA, a1],
      [keyC, c1],
      [keyC, c2],
    ] as const) {
      assert.equal((await call(key, "DELETE", `/v1/sandboxes/${id}`)).status, 204);
    }
  });

  it("refuses a revoked key", async () => {
    const store = new Store(join(d.config.stateDir, "podflare.db"));
    new KeyStore(store.db).revoke(keyBId);
    store.close();
    const r = await call(keyB, "GET", "/v1/sandboxes");
    assert.equal(r.status, 401);
    assert.match(JSON.parse(r.body).error, /revoked/);
  });
});

describe("listening beyond loopback", () => {
  it("is refused without keys unless explicitly allowed", async () => {
    const config = loadConfig({
      stateDir: `/tmp/podflare-bind-${process.pid}`,
      host: "0.0.0.0",
      port: 0,
      apiKeys: [],
    });
    await assert.rejects(
      startDaemon(config, createLogger("silent")),
      /refusing to listen on 0\.0\.0\.0 without API keys/,
    );
    const { rm } = await import("node:fs/promises");
    await rm(config.stateDir, { recursive: true, force: true });
  });
});
