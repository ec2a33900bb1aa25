import assert from "node:assert/strict";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, it } from "node:test";
import { chainUsageMib, mayFork } from "./disk-quota.js";

describe("disk quota", () => {
  it("sums what the chain's files occupy, not their apparent size", async () => {
    const dir = await mkdtemp(join(tmpdir(), "podflare-quota-"));
    try {
      const a = join(dir, "a.qcow2");
      const b = join(dir, "b.qcow2");
      await writeFile(a, Buffer.alloc(3 * 2 ** 20, 1));
      await writeFile(b, Buffer.alloc(2 * 2 ** 20, 1));
      const sparse = join(dir, "sparse.qcow2");
      await writeFile(sparse, "");
      const { truncate } = await import("node:fs/promises");
      await truncate(sparse, 2 ** 30); // 1 GiB apparent, nothing written
      assert.equal(await chainUsageMib([a, b, sparse]), 5);
      assert.equal(
        await chainUsageMib([join(dir, "gone.qcow2")]),
        0,
        "a missing layer adds nothing",
      );
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("lets a sandbox fork up to its limit, not past it", () => {
    assert.ok(mayFork(0, 1));
    assert.ok(mayFork(100, 100));
    assert.ok(!mayFork(101, 100));
  });
});
