import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, it } from "node:test";
import Database from "better-sqlite3";
import { BootError } from "../vm/backend.js";
import { NoCapacityError, VmStartError } from "./errors.js";
import { isDiskFull, translateHostError } from "./host-errors.js";

/** A real ENOSPC: every write to /dev/full fails with it. */
function enospc(): unknown {
  try {
    writeFileSync("/dev/full", "x");
  } catch (err) {
    return err;
  }
  throw new Error("writing /dev/full did not fail");
}

/** A real SQLITE_FULL: a database capped at a few pages, then filled. */
function sqliteFull(): unknown {
  const dir = mkdtempSync(join(tmpdir(), "podflare-full-"));
  const db = new Database(join(dir, "full.db"));
  try {
    db.pragma("max_page_count = 8");
    db.exec("CREATE TABLE t (x BLOB)");
    const insert = db.prepare("INSERT INTO t VALUES (?)");
    for (let i = 0; i < 100; i++) insert.run(Buffer.alloc(4096));
  } catch (err) {
    return err;
  } finally {
    db.close();
    rmSync(dir, { recursive: true, force: true });
  }
  throw new Error("the capped database did not fill");
}

const DISK_FULL =
  "the host's disk is full: cannot create a sandbox now; free disk space on the host and retry";

describe("translateHostError", () => {
  it("tells a full disk by the error's code: errno ENOSPC", () => {
    const err = enospc();
    assert.equal((err as { code?: string }).code, "ENOSPC");
    const out = translateHostError(err, "create a sandbox");
    assert.ok(out instanceof NoCapacityError);
    assert.equal(out.message, DISK_FULL);
  });

  it("tells a full disk by the error's code: better-sqlite3's SQLITE_FULL", () => {
    const err = sqliteFull();
    assert.equal((err as { code?: string }).code, "SQLITE_FULL");
    const out = translateHostError(err, "fork");
    assert.ok(out instanceof NoCapacityError);
    assert.equal(
      out.message,
      "the host's disk is full: cannot fork now; free disk space on the host and retry",
    );
  });

  it("finds the code in the error's causes", () => {
    assert.equal(isDiskFull(new Error("wrapped", { cause: enospc() })), true);
  });

  it("does not read the message: text alone is not a full disk", () => {
    const text = new Error("ENOSPC: No space left on device; database or disk is full");
    assert.equal(isDiskFull(text), false);
    assert.equal(translateHostError(text, "fork"), text);
  });

  it("turns a BootError into a 503 naming its first line", () => {
    const out = translateHostError(new BootError("QEMU exited during boot.\nconsole..."), "fork");
    assert.ok(out instanceof VmStartError);
    assert.equal((out as VmStartError).code, "no_capacity");
    assert.equal((out as VmStartError).message, "could not start a VM: QEMU exited during boot.");
  });
});
