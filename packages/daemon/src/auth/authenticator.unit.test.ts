import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { Store } from "../store/db.js";
import { Authenticator, isLoopback } from "./authenticator.js";
import { KeyStore } from "./keys.js";

function keyStore(): { keys: KeyStore; store: Store } {
  const store = new Store(":memory:");
  return { keys: new KeyStore(store.db), store };
}

describe("Authenticator", () => {
  it("lets everyone in as the anonymous tenant while no key exists", () => {
    const { keys, store } = keyStore();
    const auth = new Authenticator(keys, []);
    assert.equal(auth.required(), false);
    assert.deepEqual(auth.authenticate(undefined), { ok: true, tenant: null });
    store.close();
  });

  it("stores only a hash and maps each key to its own tenant", () => {
    const { keys, store } = keyStore();
    const a = keys.create("a", { maxSandboxes: 2, maxMemMib: null });
    const b = keys.create("b", { maxSandboxes: null, maxMemMib: null });
    const rows = store.db.prepare("SELECT * FROM api_keys").all() as Record<string, unknown>[];
    for (const row of rows) {
      for (const value of Object.values(row)) {
        assert.ok(!String(value).includes(a.secret.slice(10)), "the secret is not stored");
      }
    }
    const auth = new Authenticator(keys, []);
    assert.equal(auth.required(), true);
    const ra = auth.authenticate(`Bearer ${a.secret}`);
    const rb = auth.authenticate(`bearer ${b.secret}`);
    assert.ok(ra.ok && ra.tenant?.id === a.record.id && ra.tenant.quota.maxSandboxes === 2);
    assert.ok(rb.ok && rb.tenant?.id === b.record.id);
    store.close();
  });

  it("refuses a missing, wrong, malformed or revoked key, and never reopens", () => {
    const { keys, store } = keyStore();
    const a = keys.create("a", { maxSandboxes: null, maxMemMib: null });
    const auth = new Authenticator(keys, []);
    for (const header of [
      undefined,
      "",
      "Bearer",
      `Basic ${a.secret}`,
      `Bearer ${a.secret}x`,
      `Bearer ${"x".repeat(10_000)}`,
    ]) {
      const r = auth.authenticate(header);
      assert.equal(r.ok, false, String(header).slice(0, 40));
    }
    assert.equal(keys.revoke(a.record.id), true);
    assert.equal(keys.revoke(a.record.id), false);
    assert.equal(auth.authenticate(`Bearer ${a.secret}`).ok, false);
    assert.equal(auth.required(), true, "revoking every key does not open the API");
    assert.throws(() => keys.revoke("key_unknown"), /no key/);
    assert.throws(() => keys.create("../x", { maxSandboxes: null, maxMemMib: null }), /name/);
    store.close();
  });

  it("accepts PODFLARE_API_KEYS keys as tenants of their own", () => {
    const auth = new Authenticator(null, ["one", "two"]);
    const r1 = auth.authenticate("Bearer one");
    const r2 = auth.authenticate("Bearer two");
    assert.ok(r1.ok && r2.ok && r1.tenant?.id !== r2.tenant?.id);
    assert.equal(auth.authenticate("Bearer three").ok, false);
  });

  it("knows loopback addresses", () => {
    for (const h of ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"])
      assert.ok(isLoopback(h), h);
    for (const h of ["0.0.0.0", "::", "10.0.0.1", "192.168.1.2", "example.com"])
      assert.ok(!isLoopback(h), h);
  });
});
