/**
 * Private disk layers (issue 10, item 5). A sandbox writes a secret, forks, and its
 * forks fork again; then, as an unprivileged local user and as another VM's uid, the
 * test tries to read every disk layer the daemon keeps (with qemu-img and with a plain
 * read, by path and through /proc/<qemu>/fd): each attempt must fail with EACCES. Every
 * layer is root's and 0600 in a root-only directory, and no QEMU command line names one
 * (the chain reaches QEMU as file descriptors). The children still read their parent's
 * files and write their own, and destroying in any order leaves nothing behind.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { lstat, readdir, readFile, readlink, stat } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { Sandbox } from "podflare";
import { eventually, listDir, qemuPids, startTestDaemon, type TestDaemon } from "./harness.js";

const NOBODY = 65_534;
const isRoot = process.getuid?.() === 0;

/** Every regular file below `dir` (symlinks are not followed). */
async function filesUnder(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const entry of await readdir(dir).catch(() => [] as string[])) {
    const p = join(dir, entry);
    const st = await lstat(p).catch(() => null);
    if (st?.isDirectory()) out.push(...(await filesUnder(p)));
    else if (st?.isFile()) out.push(p);
  }
  return out;
}

/** Run argv as uid/gid `id` with no groups; returns the exit status and stderr. */
function runAs(
  id: number,
  argv: string[],
): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(
    "setpriv",
    [`--reuid=${id}`, `--regid=${id}`, "--clear-groups", "--", ...argv],
    { encoding: "utf8", timeout: 30_000 },
  );
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** The attacker's attempts on one file: qemu-img info, then a plain read; both refused. */
function assertUnreadable(id: number, path: string): void {
  const info = runAs(id, ["qemu-img", "info", "-U", path]);
  assert.notEqual(info.status, 0, `uid ${id} ran qemu-img info on ${path}`);
  assert.match(info.stderr, /Permission denied/, `qemu-img on ${path}: ${info.stderr}`);
  const read = runAs(id, ["head", "-c", "1", path]);
  assert.notEqual(read.status, 0, `uid ${id} read ${path}`);
  assert.match(read.stderr, /Permission denied/, `read of ${path}: ${read.stderr}`);
}

describe("private disk layers", { skip: !isRoot && "needs root (VM uids, setpriv)" }, () => {
  let d: TestDaemon;
  const host = () => d.url;

  before(async () => {
    d = await startTestDaemon({ poolSize: 1, maxDiskChain: 3 });
  });
  after(async () => {
    await d?.close();
  });

  it("no local user or other VM uid reads a fork's layers; no QEMU names them", async () => {
    const secret = randomBytes(24).toString("hex");
    const parent = await Sandbox.create({ host: host() });
    const boxes: Sandbox[] = [parent];
    try {
      await parent.runCode(
        `import os\nopen('/root/secret.txt', 'w').write('${secret}')\nos.sync()`,
      );
      const [a, b] = await parent.fork(2);
      assert.ok(a && b);
      boxes.push(a, b);
      // A fork of a fork of a fork: each child reads all it inherited and writes its own.
      const [a1] = await a.fork(1);
      assert.ok(a1);
      boxes.push(a1);
      const [a2] = await a1.fork(1);
      assert.ok(a2);
      boxes.push(a2);
      for (const [i, box] of [a, b, a1, a2].entries()) {
        const r = await box.runCode(
          `import os\nopen('/root/own-${i}.txt', 'w').write('${i}')\nos.sync()\nprint(open('/root/secret.txt').read(), open('/root/own-${i}.txt').read())`,
        );
        assert.equal(r.stdout, `${secret} ${i}\n`);
      }

      // Chains past 3 layers are merged; a merged layer is closed in every QEMU (none keeps
      // a deleted layer open through a leftover fdset entry or node).
      await eventually("the chains to be flattened", async () =>
        boxes.every((s) => (d.daemon.service.diskChainLength(s.id) ?? 0) <= 3),
      );
      const layersDir = d.daemon.engine.layers.dir;
      await eventually("merged layers to be closed", async () => {
        for (const pid of await qemuPids(d.config.stateDir))
          for (const fd of await readdir(`/proc/${pid}/fd`).catch(() => [] as string[])) {
            const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => "");
            if (target.startsWith(layersDir) && target.endsWith("(deleted)")) return false;
          }
        return true;
      });
      const layers = await filesUnder(layersDir);
      // Parent, a, b, a1, a2 and the frozen layers below them (flattened past 3).
      assert.ok(layers.length >= 5, `layers: ${layers.join(" ")}`);
      const dirSt = await stat(layersDir);
      assert.equal(dirSt.mode & 0o777, 0o700, "the layers directory is root's alone");
      assert.equal(dirSt.uid, 0);
      // Every disk layer anywhere in the daemon's directories, not only the layers one.
      const disks = [
        ...(await filesUnder(d.config.stateDir)),
        ...(await filesUnder(d.config.shmDir)),
      ].filter((p) => p.endsWith(".qcow2"));
      for (const p of layers) assert.ok(disks.includes(p));
      for (const p of disks) {
        const st = await stat(p);
        assert.equal(st.mode & 0o777, 0o600, `${p} is 0${(st.mode & 0o777).toString(8)}`);
        assert.equal(st.uid, 0, `${p} belongs to uid ${st.uid}`);
      }
      // The attack is real: root finds the secret in the layers (so a reader would too).
      let holders = 0;
      for (const p of layers) if ((await readFile(p)).includes(secret)) holders++;
      assert.ok(holders >= 1, "the secret is in some layer file");

      // The attackers: an unprivileged local user, and another tenant's VM uid (b's
      // QEMU attacking the others' layers, its own included: all are root's).
      const pids = await qemuPids(d.config.stateDir);
      assert.ok(pids.length >= 5, `QEMUs: ${pids.join(" ")}`);
      const uids = new Set<number>();
      for (const pid of pids) uids.add((await stat(`/proc/${pid}`)).uid);
      assert.ok(![...uids].includes(0), "every QEMU runs under a VM uid");
      const vmUid = [...uids][0] as number;
      for (const id of [NOBODY, vmUid]) {
        for (const p of [...disks, ...(await filesUnder(d.config.shmDir))]) assertUnreadable(id, p);
        const grep = runAs(id, ["grep", "-rl", secret, d.config.stateDir, d.config.shmDir]);
        assert.equal(grep.stdout, "", `uid ${id} found the secret in ${grep.stdout}`);
        assert.notEqual(grep.status, 0, `uid ${id}'s grep found the secret`);
      }

      // No command line names a layer; the chain is /dev/fdset/N. And the open layers are
      // out of reach through /proc/<qemu>/fd for anyone but that QEMU's own uid.
      for (const pid of pids) {
        const cmdline = (await readFile(`/proc/${pid}/cmdline`, "utf8")).split("\0").join(" ");
        assert.ok(!cmdline.includes(".qcow2"), `QEMU ${pid} names a disk: ${cmdline}`);
        assert.ok(!cmdline.includes(layersDir), `QEMU ${pid} names the layers directory`);
        assert.match(cmdline, /file\.filename=\/dev\/fdset\/1/);
        const owner = (await stat(`/proc/${pid}`)).uid;
        const other = [...uids].find((u) => u !== owner) ?? NOBODY;
        for (const fd of await readdir(`/proc/${pid}/fd`).catch(() => [] as string[])) {
          const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => "");
          if (!target.startsWith(layersDir)) continue;
          const r = runAs(other, ["head", "-c", "1", `/proc/${pid}/fd/${fd}`]);
          assert.notEqual(r.status, 0, `uid ${other} read ${target} through QEMU ${pid}'s fd`);
        }
      }
    } finally {
      // Parents before their children.
      for (const s of boxes) await s.close();
    }
    await d.daemon.service.settled();
    assert.equal(d.daemon.engine.layers.size, (await listDir(d.daemon.engine.layers.dir)).length);
    await eventually(
      "only pool VMs' layers to remain",
      async () => (await listDir(d.daemon.engine.layers.dir)).length <= d.config.poolSize,
    );
    assert.deepEqual(await listDir(join(d.config.shmDir, "forks")), []);
  });
});
