import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { UidAllocator, type UidClaims, UidExhaustedError } from "./uids.js";

/** Claims held by "other daemons" plus ours, in memory. */
function claims(taken: number[] = []): UidClaims & { held: Set<number> } {
  const held = new Set(taken);
  return {
    held,
    claim: (uid) => (held.has(uid) ? false : (held.add(uid), true)),
    unclaim: (uid) => void held.delete(uid),
  };
}

describe("VM uid allocator", () => {
  it("hands out distinct uids from its range, skipping those other daemons claimed", () => {
    const c = claims([1_000_001]);
    const a = new UidAllocator({ base: 1_000_000, count: 4 }, c);
    assert.deepEqual([a.allocate(), a.allocate(), a.allocate()], [1_000_000, 1_000_002, 1_000_003]);
    assert.throws(() => a.allocate(), UidExhaustedError);
    assert.equal(a.inUse, 3);
  });

  it("releases uids (and their claims) and does not reuse one at once", () => {
    const c = claims();
    const a = new UidAllocator({ base: 5000, count: 3 }, c);
    const u1 = a.allocate();
    a.allocate();
    a.release(u1);
    assert.ok(!c.held.has(u1));
    assert.equal(a.allocate(), 5002, "the next uid, not the one just released");
    assert.equal(a.allocate(), u1, "then it wraps round");
    a.release(4242); // not ours: ignored
    assert.equal(a.inUse, 3);
  });

  it("rejects ranges that reach root, system accounts or (uid_t)-1", () => {
    assert.throws(() => new UidAllocator({ base: 0, count: 10 }, claims()), RangeError);
    assert.throws(() => new UidAllocator({ base: 2 ** 32 - 10, count: 10 }, claims()), RangeError);
    assert.ok(
      new UidAllocator({ base: 2_000_000_000, count: 65_536 }, claims()).owns(2_000_000_001),
    );
  });
});
