/**
 * The HTTP API and both SDKs against a real daemon with real VMs.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { promisify } from "node:util";
import { repoRoot } from "@podflare/daemon";
import { InvalidArgumentError, NotFoundError, PayloadTooLargeError, Sandbox } from "podflare";
import { eventually, qemuPids, startTestDaemon, type TestDaemon } from "./harness.js";

const execFileP = promisify(execFile);
const UPLOAD_CAP = 64 * 1024 * 1024;

describe("HTTP API and SDKs", () => {
  let d: TestDaemon;
  let sbx: Sandbox;
  const host = () => d.url;

  before(async () => {
    d = await startTestDaemon({ maxUploadBytes: UPLOAD_CAP });
    sbx = await Sandbox.create({ host: host(), metadata: { suite: "api" } });
  });
  after(async () => {
    await d?.close();
  });

  it("runs the hosted service's example unchanged in Python and TypeScript", async () => {
    const env = { ...process.env, PODFLARE_HOST: host(), PYTHONPATH: join(repoRoot, "python") };
    const [py, ts] = await Promise.all([
      execFileP("python3", [join(repoRoot, "examples/hello.py")], { env }),
      execFileP(process.execPath, [join(repoRoot, "examples/dist/hello.js")], { env }),
    ]);
    assert.equal(py.stdout, '42 {"ok": true}\n\n');
    assert.equal(ts.stdout, '42 {"ok": true}\n\n');
    // Both examples destroyed their sandboxes on the way out.
    assert.deepEqual(
      (await Sandbox.list({ host: host() })).map((s) => s.id),
      [sbx.id],
    );
  });

  it("reports sandbox info, lists, and destroys idempotently", async () => {
    const info = await sbx.getInfo();
    assert.equal(info.state, "ready");
    assert.equal(info.template, "default");
    assert.equal(info.vcpu_count, 2);
    assert.equal(info.mem_size_mib, 1024);
    assert.deepEqual(info.metadata, { suite: "api" });
    assert.ok(Date.parse(info.expires_at) > Date.parse(info.created_at));
    const cap = (await (await fetch(`${host()}/v1/capacity`)).json()) as Record<string, unknown>;
    assert.equal(cap.running, 1);
    assert.ok(cap.accelerator === "tcg" || cap.accelerator === "kvm");
  });

  it("streams exec events in order with seq and ts, ending with exit", async () => {
    const events = [];
    for await (const e of sbx.runCodeStream(
      "import sys, time\nprint('a', flush=True)\nprint('b', file=sys.stderr, flush=True)\ntime.sleep(0.3)\nprint('c')",
    )) {
      events.push(e);
    }
    assert.deepEqual(
      events.map((e) => e.seq),
      events.map((_, i) => i),
    );
    assert.ok(events.every((e) => typeof e.ts === "number" && e.ts > 1.7e12));
    const text = events
      .filter((e) => e.type !== "exit")
      .map((e) => `${e.type}:${"data" in e ? e.data : ""}`)
      .join("");
    assert.equal(text, "stdout:a\nstderr:b\nstdout:c\n");
    const last = events.at(-1);
    assert.equal(last?.type, "exit");
    assert.equal(last?.type === "exit" && last.code, 0);
  });

  it("queues concurrent execs; each reply holds only its own output", async () => {
    const results = await Promise.all(
      Array.from({ length: 6 }, (_, i) =>
        sbx.runCode(
          `import time\nfor k in range(3):\n    print('job${i}', k, flush=True)\n    time.sleep(0.02)`,
        ),
      ),
    );
    results.forEach((r, i) => {
      assert.equal(r.exitCode, 0);
      assert.equal(r.stdout, `job${i} 0\njob${i} 1\njob${i} 2\n`);
    });
  });

  it("cancels the code in the guest when the client abandons the stream", async () => {
    const seen: string[] = [];
    for await (const e of sbx.runCodeStream(
      "import time\nfor i in range(200):\n    print(i, flush=True)\n    time.sleep(0.1)",
    )) {
      if (e.type === "stdout") seen.push(e.data);
      if (seen.length >= 2) break; // closes the HTTP response
    }
    // Were the loop still running, this call would queue behind its 20 seconds.
    const started = Date.now();
    const next = await sbx.runCode("print('next')");
    assert.equal(next.stdout, "next\n");
    assert.ok(
      Date.now() - started < 5_000,
      `the abandoned exec was cancelled (${Date.now() - started} ms)`,
    );
  });

  it("answers bad input with a clear 400/404 and the contract's error body", async () => {
    const raw = (method: string, path: string, body?: string, type = "application/json") =>
      fetch(`${host()}${path}`, {
        method,
        body,
        headers: body === undefined ? {} : { "content-type": type },
      });
    const cases: [string, Promise<Response>, number, RegExp][] = [
      ["unknown sandbox", raw("GET", "/v1/sandboxes/sbx_nope"), 404, /does not exist/],
      [
        "exec on unknown sandbox",
        raw("POST", "/v1/sandboxes/sbx_nope/exec", '{"code":"1"}'),
        404,
        /does not exist/,
      ],
      ["delete unknown sandbox", raw("DELETE", "/v1/sandboxes/sbx_nope"), 404, /does not exist/],
      ["malformed JSON", raw("POST", `/v1/sandboxes/${sbx.id}/exec`, '{"code": '), 400, /JSON/i],
      [
        "unknown language",
        raw("POST", `/v1/sandboxes/${sbx.id}/exec`, '{"code":"1","language":"ruby"}'),
        400,
        /language/,
      ],
      ["missing code", raw("POST", `/v1/sandboxes/${sbx.id}/exec`, "{}"), 400, /code/],
      [
        "code of the wrong type",
        raw("POST", `/v1/sandboxes/${sbx.id}/exec`, '{"code":5}'),
        400,
        /code/,
      ],
      [
        "relative path",
        raw("GET", `/v1/sandboxes/${sbx.id}/files?path=etc/passwd`),
        400,
        /absolute/,
      ],
      [
        "NUL in path",
        raw(
          "PUT",
          `/v1/sandboxes/${sbx.id}/files?path=/tmp/a%00b`,
          "x",
          "application/octet-stream",
        ),
        400,
        /NUL/,
      ],
      [
        "directory as a file",
        raw("GET", `/v1/sandboxes/${sbx.id}/files?path=/etc`),
        400,
        /directory/,
      ],
      [
        "missing file",
        raw("GET", `/v1/sandboxes/${sbx.id}/files?path=/no/such/file`),
        404,
        /no file/,
      ],
      ["bad vcpu_count", raw("POST", "/v1/sandboxes", '{"vcpu_count":0}'), 400, /vcpu_count/],
      [
        "unknown template",
        raw("POST", "/v1/sandboxes", '{"template":"gpu"}'),
        400,
        /unknown template/,
      ],
      ["fork out of range", raw("POST", `/v1/sandboxes/${sbx.id}/fork`, '{"n":33}'), 400, /n/],
    ];
    for (const [name, response, status, message] of cases) {
      const res = await response;
      const body = (await res.json()) as { error: string; code: string };
      assert.equal(res.status, status, `${name}: status`);
      assert.match(body.error, message, `${name}: message`);
      assert.equal(typeof body.code, "string", `${name}: code`);
    }
    await assert.rejects(sbx.runCode("1", { language: "ruby" as "bash" }), InvalidArgumentError);
    await assert.rejects(sbx.download("/no/such/file"), NotFoundError);
  });

  it("moves a 50 MiB file in and out byte-exactly", async () => {
    const data = randomBytes(50 * 1024 * 1024);
    const sha = createHash("sha256").update(data).digest("hex");
    async function* pieces() {
      for (let off = 0; off < data.length; off += 3 * 1024 * 1024 + 17)
        yield data.subarray(off, off + 3 * 1024 * 1024 + 17);
    }
    await sbx.upload("/root/big/blob.bin", pieces());
    const inGuest = await sbx.runCode(
      "import hashlib; print(hashlib.sha256(open('/root/big/blob.bin','rb').read()).hexdigest())",
    );
    assert.equal(inGuest.stdout.trim(), sha);
    const back = await sbx.download("/root/big/blob.bin");
    assert.equal(createHash("sha256").update(back).digest("hex"), sha);
    await sbx.upload("/root/small.txt", "héllo\n");
    assert.equal(Buffer.from(await sbx.download("/root/small.txt")).toString(), "héllo\n");
  });

  it("refuses an upload over the cap with 413 and leaves nothing in the guest", async () => {
    const over = Buffer.alloc(UPLOAD_CAP + 1024, 7);
    await assert.rejects(sbx.upload("/root/over/declared.bin", over), PayloadTooLargeError);
    async function* streamed() {
      for (let off = 0; off < over.length; off += 1024 * 1024)
        yield over.subarray(off, off + 1024 * 1024);
    }
    await assert.rejects(sbx.upload("/root/streamed.bin", streamed()), PayloadTooLargeError);
    const left = await sbx.runCode(
      "import os\nprint(sorted(n for n in os.listdir('/root') if 'streamed' in n or 'podflare' in n or n == 'over'))",
    );
    assert.equal(left.stdout, "[]\n");
  });

  it("destroys a sandbox when its lifetime ends", async () => {
    const short = await Sandbox.create({
      host: host(),
      timeoutMs: 1500,
      vcpuCount: 1,
      memSizeMib: 256,
    });
    const pid = d.daemon.service.vmPid(short.id);
    assert.ok(pid, "the sandbox has a VM");
    await eventually("the expired sandbox to be gone", async () => {
      const ids = (await Sandbox.list({ host: host() })).map((s) => s.id);
      return !ids.includes(short.id);
    });
    await assert.rejects(short.runCode("1"), NotFoundError);
    assert.ok(!(await qemuPids(join(d.config.stateDir, "vms"))).includes(pid), "its QEMU is gone");
    const res = await fetch(`${host()}/v1/sandboxes/${short.id}`, { method: "DELETE" });
    assert.equal(res.status, 204, "deleting an ended sandbox is idempotent");
  });
});
