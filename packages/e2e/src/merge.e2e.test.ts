/**
 * merge_into and diff between two sandboxes, through both SDKs.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { promisify } from "node:util";
import { repoRoot } from "@podflare/daemon";
import { InvalidArgumentError, NotFoundError, Sandbox } from "podflare";
import { eventually, qemuPids, startTestDaemon, type TestDaemon } from "./harness.js";

const execFileP = promisify(execFile);

describe("merge_into and diff", () => {
  let d: TestDaemon;
  const host = () => d.url;

  before(async () => {
    d = await startTestDaemon({ poolSize: 2 });
  });
  after(async () => {
    await d?.close();
  });

  it("diffs the files of two sandboxes under /root and /tmp, in both SDKs", async () => {
    const [a, b] = await Promise.all([
      Sandbox.create({ host: host() }),
      Sandbox.create({ host: host() }),
    ]);
    try {
      await a.runCode(
        "import os\nos.makedirs('/root/d', exist_ok=True)\nopen('/root/same.txt','w').write('s')\nopen('/root/d/changed.txt','w').write('a')\nopen('/tmp/only-a.txt','w').write('a')\nx = 1",
      );
      await b.runCode(
        "import os\nos.makedirs('/root/d', exist_ok=True)\nopen('/root/same.txt','w').write('s')\nopen('/root/d/changed.txt','w').write('b')\nopen('/root/only-b.txt','w').write('b')\nos.symlink('/etc/hostname', '/tmp/link')",
      );
      const expected = {
        added: ["/root/only-b.txt", "/tmp/link"],
        removed: ["/tmp/only-a.txt"],
        modified: ["/root/d/changed.txt"],
      };
      const diff = await a.diff(b);
      for (const key of ["added", "removed", "modified"] as const) {
        assert.deepEqual(
          diff[key].filter((p) => !p.startsWith("/tmp/podflare") && !p.includes("__pycache__")),
          expected[key],
          key,
        );
      }
      assert.deepEqual(await a.diff(b, { paths: ["/root/d"] }), {
        added: [],
        removed: [],
        modified: ["/root/d/changed.txt"],
      });
      assert.equal((await a.runCode("print(x)")).stdout, "1\n", "diff leaves the REPL alone");

      const py = await execFileP(
        "python3",
        [
          "-c",
          `from podflare import Sandbox\nimport json\na = Sandbox.connect(${JSON.stringify(a.id)}); b = Sandbox.connect(${JSON.stringify(b.id)})\nprint(json.dumps(a.diff(b, paths=['/root'])))`,
        ],
        { env: { ...process.env, PODFLARE_HOST: host(), PYTHONPATH: join(repoRoot, "python") } },
      );
      assert.deepEqual(JSON.parse(py.stdout), {
        added: ["/root/only-b.txt"],
        removed: [],
        modified: ["/root/d/changed.txt"],
      });
    } finally {
      await Promise.all([a.close(), b.close()]);
    }
  });

  it("merges the winner into the sandbox: its VM under the old id, the winner's id gone", async () => {
    const create = () => Sandbox.create({ host: host() });
    const [parent, winner, sibling] = await Promise.all([create(), create(), create()]);
    try {
      await parent.runCode("x = 'parent'");
      await winner.runCode("x = 'winner'\nopen('/root/result.txt','w').write('42')");
      await sibling.runCode("x = 'sibling'");
      const parentPid = d.daemon.service.vmPid(parent.id);
      const winnerPid = d.daemon.service.vmPid(winner.id);

      await assert.rejects(parent.mergeInto(parent), InvalidArgumentError);
      await assert.rejects(parent.mergeInto("sbx_does_not_exist"), NotFoundError);
      await parent.mergeInto(winner);

      assert.equal(
        (await parent.runCode("print(x, open('/root/result.txt').read())")).stdout,
        "winner 42\n",
      );
      assert.equal(d.daemon.service.vmPid(parent.id), winnerPid);
      assert.equal((await parent.getInfo()).state, "ready");
      await assert.rejects(winner.runCode("print(1)"), NotFoundError);
      await assert.rejects(
        parent.mergeInto(winner),
        NotFoundError,
        "a winner already merged is gone",
      );
      assert.equal(
        (await sibling.runCode("print(x)")).stdout,
        "sibling\n",
        "siblings are untouched",
      );
      await eventually(
        "the parent's former VM to be gone",
        async () => !(await qemuPids(join(d.config.stateDir, "vms"))).includes(parentPid as number),
      );
      const ids = (await Sandbox.list({ host: host() })).map((s) => s.id).sort();
      assert.deepEqual(ids, [parent.id, sibling.id].sort());
    } finally {
      await Promise.all([parent.close(), sibling.close()]);
    }
  });
});
