import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { Admission } from "./admission.js";
import { NoCapacityError, OverLimitError } from "./errors.js";

const shape = { vcpuCount: 1, memSizeMib: 512 };
const none = { maxSandboxes: null, maxMemMib: null };
const limits = {
  maxSandboxes: 4,
  memoryBudgetMib: 4 * 576,
  vmOverheadMib: 64,
  tenantMaxSandboxes: 3,
  tenantMaxMemMib: 100_000,
};

describe("Admission", () => {
  it("counts exactly what it admitted, per host and per owner", () => {
    const a = new Admission(limits);
    a.admit(["s1", "s2"], "k1", none, shape);
    a.admit(["s3"], "k2", none, shape);
    assert.deepEqual(a.usage(), { sandboxes: 3, memMib: 1536, chargedMib: 1728 });
    assert.deepEqual(a.usage("k1"), { sandboxes: 2, memMib: 1024, chargedMib: 1152 });
    a.release("s1");
    a.release("s1"); // releasing twice changes nothing
    assert.equal(a.usage().sandboxes, 2);
    assert.equal(a.usage("k1").sandboxes, 1);
  });

  it("refuses past the host's sandbox count with 429 and holds nothing", () => {
    const a = new Admission({ ...limits, tenantMaxSandboxes: 10 });
    a.admit(["a", "b", "c"], null, none, shape);
    assert.throws(() => a.admit(["d", "e"], null, none, shape), OverLimitError);
    assert.equal(a.usage().sandboxes, 3);
    a.admit(["d"], null, none, shape);
  });

  it("applies the key's own quota before the host default", () => {
    const a = new Admission(limits);
    a.admit(["a"], "k1", { maxSandboxes: 1, maxMemMib: null }, shape);
    assert.throws(
      () => a.admit(["b"], "k1", { maxSandboxes: 1, maxMemMib: null }, shape),
      /your key may hold 1 sandboxes/,
    );
    a.admit(["b"], "k2", none, shape); // another tenant is unaffected
    assert.throws(
      () => a.admit(["c"], "k3", { maxSandboxes: null, maxMemMib: 256 }, shape),
      /256 MiB/,
    );
  });

  it("refuses past the memory budget with 503", () => {
    const a = new Admission({ ...limits, memoryBudgetMib: 1300, tenantMaxSandboxes: 10 });
    a.admit(["a", "b"], null, none, shape); // 2 x 576 = 1152
    assert.throws(() => a.admit(["c"], null, none, shape), NoCapacityError);
    a.admit(["c"], null, none, { vcpuCount: 1, memSizeMib: 64 }); // 128 MiB still fits
  });

  it("lets the pool grow only into memory sandboxes do not hold", () => {
    const a = new Admission({ ...limits, memoryBudgetMib: 2000 });
    let pool = 0;
    a.attachPool(() => pool);
    assert.ok(a.poolMayGrow(576));
    pool = 3 * 576;
    assert.ok(!a.poolMayGrow(576));
    assert.equal(a.excessMib(), 0);
    a.admit(["a"], null, none, shape); // admission ignores the pool: it gives way
    assert.equal(a.excessMib(), 4 * 576 - 2000);
  });

  it("moves a sandbox's charge to the shape it runs after a merge", () => {
    const a = new Admission(limits);
    a.admit(["a"], "k", none, shape);
    a.reshape("a", { vcpuCount: 2, memSizeMib: 1024 });
    assert.equal(a.usage("k").memMib, 1024);
  });
});
