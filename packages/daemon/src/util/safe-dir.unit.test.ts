import assert from "node:assert/strict";
import {
  chmodSync,
  chownSync,
  lchownSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, it } from "node:test";
import { ensureSafeDir, UnsafeDirError } from "./safe-dir.js";
import { createExclusive, handSocketTo, seizeTree } from "./safe-file.js";

const root = process.geteuid?.() === 0;
const OTHER_UID = 2_147_000_123; // no account: stands for "someone else"
const base = mkdtempSync(join(tmpdir(), "podflare-safe-dir-"));
after(() => rmSync(base, { recursive: true, force: true }));
let n = 0;
const fresh = () => join(base, `case-${n++}`);
const modeOf = (p: string) => lstatSync(p).mode & 0o7777;

describe("ensureSafeDir", () => {
  it("creates a missing directory (and missing parents) with exactly the mode asked for", () => {
    const old = process.umask(0o077);
    try {
      const dir = join(fresh(), "a", "b");
      assert.equal(ensureSafeDir(dir, 0o711), dir);
      assert.ok(lstatSync(dir).isDirectory());
      assert.equal(modeOf(dir), 0o711, "the umask does not narrow it");
      assert.equal(modeOf(join(dir, "..")), 0o711);
      assert.equal(lstatSync(dir).uid, process.geteuid?.());
      const private_ = fresh();
      ensureSafeDir(private_, 0o700);
      assert.equal(modeOf(private_), 0o700);
    } finally {
      process.umask(old);
    }
  });

  it("accepts its own directory again and puts its mode right (0711 <-> 0700)", () => {
    const dir = fresh();
    mkdirSync(dir, { mode: 0o711 });
    chmodSync(dir, 0o711);
    writeFileSync(join(dir, "kept"), "x");
    ensureSafeDir(dir, 0o700);
    assert.equal(modeOf(dir), 0o700);
    assert.equal(readFileSync(join(dir, "kept"), "utf8"), "x", "its content is left alone");
  });

  it("refuses a symbolic link in its place, saying what to remove, and follows nothing", () => {
    const target = fresh();
    mkdirSync(target, { mode: 0o755 });
    chmodSync(target, 0o755);
    const link = fresh();
    symlinkSync(target, link);
    assert.throws(
      () => ensureSafeDir(link, 0o700, "the shm directory (PODFLARE_SHM_DIR)"),
      (err: Error) =>
        err instanceof UnsafeDirError &&
        /symbolic link/.test(err.message) &&
        err.message.includes(`rm ${link}`) &&
        err.message.includes("PODFLARE_SHM_DIR"),
    );
    assert.equal(modeOf(target), 0o755, "the link's target was not chmodded");
  });

  it("refuses a directory writable by group or others", () => {
    const dir = fresh();
    mkdirSync(dir);
    chmodSync(dir, 0o777);
    assert.throws(
      () => ensureSafeDir(dir, 0o700),
      (err: Error) =>
        err instanceof UnsafeDirError &&
        /writable by group or others \(mode 0777\)/.test(err.message),
    );
    assert.equal(modeOf(dir), 0o777, "left as it was");
    chmodSync(dir, 0o770);
    assert.throws(() => ensureSafeDir(dir, 0o700), UnsafeDirError);
  });

  it("refuses a file in its place", () => {
    const file = fresh();
    writeFileSync(file, "");
    assert.throws(
      () => ensureSafeDir(file, 0o700),
      (err: Error) => err instanceof UnsafeDirError && /not a directory/.test(err.message),
    );
  });

  it("refuses a directory below a parent others can write without the sticky bit", () => {
    const parent = fresh();
    mkdirSync(parent);
    chmodSync(parent, 0o777);
    const dir = join(parent, "d");
    assert.throws(
      () => ensureSafeDir(dir, 0o700),
      (err: Error) =>
        err instanceof UnsafeDirError &&
        err.message.includes(`its parent ${parent}`) &&
        /not sticky/.test(err.message),
    );
    assert.throws(() => statSync(dir), "nothing was created");
    chmodSync(parent, 0o1777); // like /tmp and /dev/shm: our entry cannot be renamed by others
    ensureSafeDir(dir, 0o700);
    assert.equal(modeOf(dir), 0o700);
  });

  it("refuses a directory another uid owns, and a parent another uid owns", { skip: !root }, () => {
    const dir = fresh();
    mkdirSync(dir, { mode: 0o700 });
    chownSync(dir, OTHER_UID, OTHER_UID);
    assert.throws(
      () => ensureSafeDir(dir, 0o700),
      (err: Error) =>
        err instanceof UnsafeDirError &&
        err.message.includes(`owned by uid ${OTHER_UID}`) &&
        err.message.includes(`rm -r ${dir}`),
    );
    assert.throws(() => ensureSafeDir(join(dir, "below"), 0o700), /its parent/);
  });

  it("follows a link on the way only when the link is ours", { skip: !root }, () => {
    const realParent = fresh();
    mkdirSync(realParent, { mode: 0o755 });
    const link = fresh();
    symlinkSync(realParent, link);
    ensureSafeDir(join(link, "d"), 0o700);
    assert.ok(lstatSync(join(realParent, "d")).isDirectory());
    lchownSync(link, OTHER_UID, OTHER_UID);
    assert.throws(() => ensureSafeDir(join(link, "e"), 0o700), /owned by uid/);
  });
});

describe("createExclusive and handSocketTo", () => {
  it("never write through a planted link", () => {
    const dir = fresh();
    mkdirSync(dir, { mode: 0o700 });
    const canary = join(dir, "canary");
    writeFileSync(canary, "canary", { mode: 0o644 });
    const planted = join(dir, "qemu.pid");
    symlinkSync(canary, planted);
    assert.throws(() => createExclusive(planted, 0o600), /EEXIST/);
    assert.equal(readFileSync(canary, "utf8"), "canary");
    assert.equal(statSync(canary).mode & 0o777, 0o644);
    assert.throws(() => handSocketTo(planted, { uid: 0, gid: 0 }), /not a socket/);
    assert.equal(statSync(canary).mode & 0o777, 0o644, "not chmodded through the link");
    const made = join(dir, "made");
    createExclusive(made, 0o640, root ? { uid: OTHER_UID, gid: OTHER_UID } : null);
    assert.equal(statSync(made).mode & 0o777, 0o640);
    if (root) assert.equal(statSync(made).uid, OTHER_UID);
  });

  it("hand over a real socket, and only one made by the expected uid", async () => {
    const dir = fresh();
    mkdirSync(dir, { mode: 0o700 });
    const path = join(dir, "s.sock");
    const server = createServer();
    await new Promise<void>((r) => server.listen(path, r));
    try {
      const me = process.geteuid?.() ?? 0;
      assert.throws(
        () => handSocketTo(path, { uid: me, gid: me }, 0o600, me + 1),
        /belongs to uid/,
      );
      handSocketTo(path, { uid: root ? OTHER_UID : me, gid: root ? OTHER_UID : me }, 0o600, me);
      assert.equal(statSync(path).mode & 0o777, 0o600);
      if (root) assert.equal(statSync(path).uid, OTHER_UID);
    } finally {
      server.close();
    }
  });
});

describe("seizeTree", () => {
  it("takes a directory tree back top-down and follows no link in it", { skip: !root }, () => {
    const dir = fresh();
    mkdirSync(join(dir, "rcv", "sub"), { recursive: true });
    const canaryDir = fresh();
    mkdirSync(canaryDir, { mode: 0o755 });
    chmodSync(canaryDir, 0o755);
    chownSync(canaryDir, OTHER_UID, OTHER_UID);
    symlinkSync(canaryDir, join(dir, "rcv", "evil"));
    lchownSync(join(dir, "rcv", "evil"), OTHER_UID, OTHER_UID);
    for (const p of [join(dir, "rcv"), join(dir, "rcv", "sub")]) {
      chownSync(p, OTHER_UID, OTHER_UID);
      chmodSync(p, 0o777);
    }
    seizeTree(join(dir, "rcv"));
    for (const p of [join(dir, "rcv"), join(dir, "rcv", "sub")]) {
      assert.equal(lstatSync(p).uid, 0, `${p} is root's again`);
      assert.equal(modeOf(p), 0o700);
    }
    assert.equal(lstatSync(canaryDir).uid, OTHER_UID, "the link's target was not touched");
    assert.equal(modeOf(canaryDir), 0o755);
  });
});
