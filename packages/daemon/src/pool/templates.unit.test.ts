import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { templateKey } from "./templates.js";

const base = {
  imageKey: "3a58a9270f483c8f",
  qemuVersion: "QEMU emulator version 7.2.22",
  accel: "tcg" as const,
  shape: { vcpuCount: 2, memSizeMib: 1024 },
};

describe("template key", () => {
  it("changes with everything a snapshot depends on, and only with that", () => {
    const k = templateKey(base);
    assert.match(k, /^[0-9a-f]{16}$/);
    assert.equal(templateKey({ ...base, shape: { ...base.shape } }), k, "stable");
    const variants = [
      { ...base, imageKey: "3a58a9270f483c8e" },
      { ...base, qemuVersion: "QEMU emulator version 8.2.0" },
      { ...base, accel: "kvm" as const },
      { ...base, shape: { vcpuCount: 1, memSizeMib: 1024 } },
      { ...base, shape: { vcpuCount: 2, memSizeMib: 512 } },
    ];
    const keys = new Set([k, ...variants.map(templateKey)]);
    assert.equal(keys.size, variants.length + 1);
  });
});

describe("template key of a named template", () => {
  it("the default template keeps the key it had before templates had names", () => {
    // Computed by the code before named templates (main at f7b716f): caches stay valid.
    assert.equal(templateKey(base), "c26ed3d2281f134c");
  });

  it("another template's key differs from the default's of the same image and shape", () => {
    assert.notEqual(templateKey({ ...base, template: "data-science" }), templateKey(base));
  });
});
