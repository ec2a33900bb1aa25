import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { DEFAULT_VM_MEM_OVERHEAD_MIB } from "../../config/config.js";
import { QEMU_OVERHEAD_MIB } from "./sizing.js";

describe("QEMU sizing", () => {
  it("the configuration's default VM overhead is QEMU's (translation cache bound + 128 MiB)", () => {
    assert.equal(DEFAULT_VM_MEM_OVERHEAD_MIB, QEMU_OVERHEAD_MIB);
  });
});
