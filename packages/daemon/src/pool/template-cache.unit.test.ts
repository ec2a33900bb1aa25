import assert from "node:assert/strict";
import { describe, it } from "node:test";
import {
  type CachedTemplate,
  evictionChoice,
  templateBoundMib,
  templateChargeMib,
} from "./template-cache.js";

const t = (key: string, lastUsed: number, more: Partial<CachedTemplate> = {}): CachedTemplate => ({
  key,
  users: 0,
  loading: false,
  pinned: false,
  lastUsed,
  ...more,
});

describe("template cache", () => {
  it("makes room only at the cap, evicting the least recently used unused template", () => {
    const all = [t("a", 30), t("b", 10), t("c", 20)];
    assert.equal(evictionChoice(all, 4), null, "below the cap: nothing goes");
    assert.equal((evictionChoice(all, 3) as CachedTemplate).key, "b");
    assert.equal((evictionChoice(all, 2) as CachedTemplate).key, "b");
  });

  it("never evicts one in use, being built, or pinned; full when none is free", () => {
    const busy = [
      t("used", 1, { users: 2 }),
      t("building", 2, { loading: true }),
      t("pool", 3, { pinned: true }),
      t("idle", 99),
    ];
    assert.equal((evictionChoice(busy, 4) as CachedTemplate).key, "idle");
    assert.equal(evictionChoice(busy.slice(0, 3), 3), "full");
    assert.equal(evictionChoice([], 1), null);
  });

  it("charges a template what its memory can grow to", () => {
    const shape = { vcpuCount: 1, memSizeMib: 512 };
    // Clones map the file itself: it grows to the guest's size.
    assert.equal(templateBoundMib(shape, false), 512);
    assert.equal(templateChargeMib(shape, 100, false), 512);
    assert.equal(templateChargeMib(shape, 600, false), 600, "never below what it holds");
    // Clones map a sealed copy: the file keeps what the build wrote, the copy can grow.
    assert.equal(templateBoundMib(shape, true), 1024);
    assert.equal(templateChargeMib(shape, 100.2, true), 101 + 512);
    assert.equal(templateChargeMib(shape, 9999, true), 1024, "at most the bound");
    assert.ok(templateChargeMib(shape, 0, true) <= templateBoundMib(shape, true));
  });
});
