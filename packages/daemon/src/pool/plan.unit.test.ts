import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { backoffMs, defaultPoolSize, refillsToStart } from "./plan.js";

const base = {
  target: 4,
  ready: 0,
  refilling: 0,
  restoring: 0,
  waitingMisses: 0,
  maxConcurrent: 2,
  backoffUntil: 0,
  now: 1000,
};

describe("pool refill plan", () => {
  it("fills up to the target within the restore slots", () => {
    assert.equal(refillsToStart(base), 2);
    assert.equal(refillsToStart({ ...base, maxConcurrent: 8 }), 4);
    assert.equal(refillsToStart({ ...base, ready: 3, maxConcurrent: 8 }), 1);
    assert.equal(refillsToStart({ ...base, ready: 4 }), 0);
    assert.equal(refillsToStart({ ...base, ready: 2, refilling: 2, restoring: 2 }), 0);
  });

  it("leaves restore slots to waiting misses first", () => {
    assert.equal(refillsToStart({ ...base, restoring: 1, waitingMisses: 1 }), 0);
    assert.equal(refillsToStart({ ...base, maxConcurrent: 4, waitingMisses: 3 }), 1);
  });

  it("pauses during backoff, which grows and is capped", () => {
    assert.equal(refillsToStart({ ...base, backoffUntil: 2000 }), 0);
    assert.deepEqual([0, 1, 2, 3].map(backoffMs), [0, 500, 1000, 2000]);
    assert.equal(backoffMs(20), 30_000);
  });

  it("sizes the pool to the host", () => {
    assert.equal(defaultPoolSize(1), 2);
    assert.equal(defaultPoolSize(2), 4);
    assert.equal(defaultPoolSize(64), 8);
  });
});
