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

  it("counts holds (templates, forks) against the budget, and a fork's against its tenant", () => {
    const a = new Admission({ ...limits, memoryBudgetMib: 2000, tenantMaxMemMib: 1500 });
    a.hold("template:x", "template", 700);
    assert.equal(a.heldMib(), 700);
    assert.equal(a.usage().sandboxes, 0, "a hold is no sandbox");
    a.admit(["a", "b"], "k", none, shape); // 1152 + 700 = 1852
    assert.throws(() => a.hold("template_build:y", "template_build", 576), NoCapacityError);
    assert.equal(a.heldMib(), 700, "a refused hold holds nothing");
    // Re-holding an id replaces it: the new size is what is checked.
    a.hold("template:x", "template", 800);
    assert.equal(a.heldMib({ kind: "template" }), 800);
    a.unhold("template:x");
    // The fork's memory: the tenant's quota (1500) counts 2 x 512 held + 1 x 512 + 512 held.
    assert.throws(
      () => a.admit(["c"], "k", none, shape, { id: "fork:c", kind: "fork", mib: 512 }),
      (err: Error) => err instanceof OverLimitError && /fork's memory/.test(err.message),
    );
    assert.equal(a.usage("k").sandboxes, 2, "nothing held after a refusal");
    assert.equal(a.heldMib(), 0);
    a.admit(["c"], "j", none, shape, { id: "fork:c", kind: "fork", mib: 200 });
    assert.equal(a.heldMib({ owner: "j", kind: "fork" }), 200);
    assert.equal(a.heldMib({ owner: "k", kind: "fork" }), 0);
    // Holds count for the pool too.
    assert.equal(a.excessMib(), Math.max(0, 3 * 576 + 200 - 2000));
    a.unhold("fork:c");
    assert.equal(a.heldMib(), 0);
  });

  it("asks for idle templates' room back before refusing for the budget", () => {
    const a = new Admission({ ...limits, memoryBudgetMib: 2000 });
    a.hold("template:idle", "template", 900);
    a.hold("template:pinned", "template", 300);
    const asked: number[] = [];
    a.attachReclaimer((mib) => {
      asked.push(mib);
      a.unhold("template:idle"); // what the template manager does for an unused one
    });
    a.admit(["a", "b"], null, none, shape); // 1152 + 1200 > 2000: the idle one goes
    assert.deepEqual(asked, [1152 + 1200 - 2000]);
    assert.equal(a.heldMib(), 300);
    assert.throws(
      () => a.admit(["c"], null, none, shape),
      NoCapacityError,
      "nothing left to reclaim",
    );
  });
});
