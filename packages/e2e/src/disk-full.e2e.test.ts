/**
 * Host disk full: the state directory (database, VM overlays) on a small tmpfs, filled
 * from the host. Creates fail cleanly with 503; a sandbox whose disk write meets the full
 * disk is paused with its data kept, its calls get a clear 503, and it resumes by itself
 * once space returns, its write completed and its files intact.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtemp, rm, statfs } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, it } from "node:test";
import { promisify } from "node:util";
import { Sandbox } from "podflare";
import { eventually, listDir, startTestDaemon, type TestDaemon } from "./harness.js";

const run = promisify(execFile);
const isRoot = process.getuid?.() === 0;
const MIN_FREE_MIB = 64;

describe("host disk full", { skip: !isRoot && "needs root to mount a small tmpfs" }, () => {
  let d: TestDaemon | undefined;
  let mountPoint = "";
  after(async () => {
    await d?.close().catch(() => {});
    if (mountPoint) {
      await run("umount", ["-l", mountPoint]).catch(() => {});
      await rm(mountPoint, { recursive: true, force: true });
    }
  });

  it("fails creates cleanly, pauses and resumes a writing sandbox with its data kept", async () => {
    mountPoint = await mkdtemp(join(tmpdir(), "podflare-diskfull-"));
    await run("mount", ["-t", "tmpfs", "-o", "size=256m,mode=0755", "tmpfs", mountPoint]);
    const stateDir = join(mountPoint, "state");
    d = await startTestDaemon({ stateDir, poolSize: 1, minFreeDiskMib: MIN_FREE_MIB });
    const url = d.url;
    const sbx = await Sandbox.create({ host: url });
    const keep = await sbx.runCode(
      "import hashlib, os\ndata = os.urandom(1 << 20)\nopen('/root/keep', 'wb').write(data)\nos.sync()\nprint(hashlib.sha256(data).hexdigest())",
    );
    assert.equal(keep.exitCode, 0, keep.stderr);

    // Fill the host file system to 8 MiB short of full.
    const filler = join(mountPoint, "filler");
    const s = await statfs(mountPoint);
    const freeBytes = s.bavail * s.bsize;
    await run("fallocate", ["-l", String(freeBytes - 8 * 2 ** 20), filler]);

    const vmsBefore = await listDir(join(stateDir, "vms"));
    const refused = await fetch(`${url}/v1/sandboxes`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: "{}",
    });
    const refusedBody = (await refused.json()) as { code: string; error: string };
    assert.equal(refused.status, 503, JSON.stringify(refusedBody));
    assert.equal(refusedBody.code, "no_capacity");
    assert.match(refusedBody.error, /disk is full/);
    assert.deepEqual(
      (await Sandbox.list({ host: url })).map((x) => x.id),
      [sbx.id],
    );
    const forkRefused = await fetch(`${url}/v1/sandboxes/${sbx.id}/fork`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: "{}",
    });
    assert.equal(forkRefused.status, 503);
    assert.deepEqual(
      await listDir(join(stateDir, "vms")),
      vmsBefore,
      "no file left by a refused create",
    );

    // 40 MiB written with fsync cannot fit in 8 MiB: QEMU pauses the VM, keeping the write.
    const writeStarted = performance.now();
    const writing = sbx.runCode(
      "import hashlib, os\nblock = bytes(range(256)) * 4096\nwith open('/root/big', 'wb') as f:\n    for _ in range(40):\n        f.write(block)\n    f.flush()\n    os.fsync(f.fileno())\nprint(hashlib.sha256(block * 40).hexdigest())",
    );
    const pausedAt = await eventually("the sandbox to be paused for disk space", async () => {
      const cap = (await (await fetch(`${url}/v1/capacity`)).json()) as {
        disk: { paused_sandboxes: number; free_mib: number };
      };
      return cap.disk.paused_sandboxes === 1 ? performance.now() : undefined;
    });
    const blocked = await fetch(`${url}/v1/sandboxes/${sbx.id}/exec`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ code: "print(1)" }),
    });
    const blockedBody = (await blocked.json()) as { error: string };
    assert.equal(blocked.status, 503);
    assert.match(blockedBody.error, /paused because the host's disk is full.*resumes by itself/);

    await rm(filler);
    const freedAt = performance.now();
    const wrote = await writing;
    const resumedMs = performance.now() - freedAt;
    assert.equal(wrote.exitCode, 0, wrote.stderr);
    const check = await sbx.runCode(
      "import hashlib\nprint(hashlib.sha256(open('/root/keep','rb').read()).hexdigest())\nprint(hashlib.sha256(open('/root/big','rb').read()).hexdigest())",
    );
    assert.equal(check.stdout, `${keep.stdout}${wrote.stdout}`, "both files intact");
    const again = await Sandbox.create({ host: url });
    assert.equal((await again.runCode("print(6*7)")).stdout, "42\n");
    await again.close();
    await sbx.close();
    console.log(
      `disk full: paused ${Math.round(pausedAt - writeStarted)} ms after the 40 MiB write began; the write finished ${resumedMs.toFixed(0)} ms after space was freed; files intact`,
    );
  });
});
