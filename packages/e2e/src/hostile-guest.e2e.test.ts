/**
 * Hostile guests on real VMs.
 *
 * - Downloads: a background process in the sandbox keeps growing (or truncating and
 *   rewriting) a file while it is downloaded. The agent states the size at open, then
 *   streams until EOF, so the bytes it sends differ from the declared size. On one
 *   keep-alive connection the file is downloaded, then the sandbox's info is asked for:
 *   the second response must be intact and correct, the first exactly its content-length
 *   or cut.
 * - Garbage: root in the guest takes a duplicate of the agent's virtio port descriptor
 *   (pidfd_getfd) and writes garbage into the channel: the daemon logs a bounded number of
 *   lines, closes the channel, and the sandbox ends dead with a clear reason.
 */
import assert from "node:assert/strict";
import type { ChildProcess } from "node:child_process";
import { once } from "node:events";
import { connect } from "node:net";
import { after, before, describe, it } from "node:test";
import { Sandbox } from "podflare";
import {
  eventually,
  qemuPids,
  serve,
  serveEnv,
  startTestDaemon,
  type TestDaemon,
} from "./harness.js";

let d: TestDaemon | undefined;
let sbx: Sandbox | undefined;
const D = () => d as TestDaemon;
const S = () => sbx as Sandbox;

interface RawResponse {
  status: number;
  headers: string;
  length: number;
  body: Buffer;
  complete: boolean;
}

/** Split raw HTTP/1.1 bytes into responses by their content-length; throws on anything else. */
function parseResponses(bytes: Buffer): RawResponse[] {
  const out: RawResponse[] = [];
  let at = 0;
  while (at < bytes.length) {
    const end = bytes.indexOf("\r\n\r\n", at);
    if (end < 0) throw new Error(`bytes that are no HTTP response at ${at}`);
    const headers = bytes.subarray(at, end).toString("latin1");
    const status = /^HTTP\/1\.1 (\d{3}) /.exec(headers);
    if (!status)
      throw new Error(`not an HTTP status line: ${JSON.stringify(headers.slice(0, 80))}`);
    const length = Number(/\r\ncontent-length: *(\d+)/i.exec(headers)?.[1] ?? "0");
    const body = bytes.subarray(end + 4, Math.min(bytes.length, end + 4 + length));
    out.push({
      status: Number(status[1]),
      headers,
      length,
      body,
      complete: body.length === length,
    });
    at = end + 4 + length;
  }
  return out;
}

/**
 * On one connection: download `path`, then (once the download's headers are in, as a
 * keep-alive client does) ask for the sandbox's info. Returns all bytes received until
 * the server closes or both responses are complete.
 */
async function downloadThenInfo(path: string): Promise<{ bytes: Buffer; closed: boolean }> {
  const url = new URL(D().url);
  const sock = connect(Number(url.port), url.hostname);
  await once(sock, "connect");
  const host = `host: ${url.host}\r\n`;
  const chunks: Buffer[] = [];
  let size = 0;
  let closed = false;
  let wake: () => void = () => {};
  sock.on("data", (c: Buffer) => {
    chunks.push(c);
    size += c.length;
    wake();
  });
  sock.on("error", () => {});
  sock.on("close", () => {
    closed = true;
    wake();
  });
  const next = () =>
    new Promise<void>((r) => {
      wake = r;
    });
  const all = () => Buffer.concat(chunks, size);
  sock.write(
    `GET /v1/sandboxes/${S().id}/files?path=${encodeURIComponent(path)} HTTP/1.1\r\n${host}\r\n`,
  );
  while (!closed && !all().includes("\r\n\r\n")) await next();
  if (!closed) sock.write(`GET /v1/sandboxes/${S().id} HTTP/1.1\r\n${host}\r\n`);
  for (;;) {
    if (closed) break;
    const rs = parseResponses(all());
    if (rs.length >= 2 && rs.every((r) => r.complete)) break;
    await next();
  }
  sock.destroy();
  return { bytes: all(), closed };
}

/** Check one attempt; returns what happened to the download. */
function check(raw: { bytes: Buffer; closed: boolean }): string {
  const responses = parseResponses(raw.bytes); // throws if stray bytes follow a response
  const [first, second] = responses;
  assert.ok(first, "the download answered");
  let outcome: string;
  if (first.status === 200) {
    assert.ok(first.complete || raw.closed, "a short body is followed by a cut connection");
    outcome = first.complete
      ? `exact ${first.length} bytes`
      : `cut at ${first.body.length}/${first.length}`;
  } else {
    // Failed before a byte of the body went out: a complete error in the contract's shape.
    assert.ok(first.complete);
    const err = JSON.parse(first.body.toString()) as { error: string; code: string };
    assert.match(err.error, /(grew|shrank) while it was downloaded/);
    assert.match(first.headers, /\r\nconnection: close/i);
    outcome = `error ${first.status} before the body`;
  }
  if (second) {
    assert.equal(responses.length, 2);
    assert.equal(second.status, 200, second.headers);
    assert.ok(second.complete);
    const info = JSON.parse(second.body.toString()) as { id: string; state: string };
    assert.equal(info.id, S().id);
    assert.equal(info.state, "ready");
  } else {
    assert.ok(raw.closed, "no second response only because the connection was closed");
  }
  return second ? `${outcome}; next response intact` : `${outcome}; connection closed`;
}

describe("a guest that sends more or fewer bytes than it declared for a download", () => {
  before(async () => {
    d = await startTestDaemon({ poolSize: 1 });
    sbx = await Sandbox.create({ host: D().url });
  });
  after(async () => {
    await sbx?.close().catch(() => {});
    await d?.close();
  });

  it("a file grown while downloaded never corrupts the next response on the connection", async () => {
    // A background process (it outlives the call) appends 64 KiB pieces (at most one per
    // 5 ms) up to 48 MiB.
    const started = await S().runCode(
      [
        "import subprocess, sys",
        "open('/root/grow', 'wb').write(b'a' * (2 << 20))",
        'grow = \'import time\\nf = open("/root/grow", "ab", buffering=0)\\nfor _ in range(768):\\n    f.write(b"b" * 65536)\\n    time.sleep(0.005)\'',
        "grower = subprocess.Popen([sys.executable, '-c', grow], start_new_session=True)",
        // Python starts slowly under TCG: return once the file is growing.
        "import os, time",
        "deadline = time.monotonic() + 60",
        "while os.path.getsize('/root/grow') <= (2 << 20) and time.monotonic() < deadline:",
        "    time.sleep(0.05)",
        "print(grower.pid, os.path.getsize('/root/grow'))",
      ].join("\n"),
    );
    assert.equal(started.exitCode, 0, started.stderr);
    assert.ok(Number(started.stdout.split(" ")[1]) > 2 << 20, `not growing: ${started.stdout}`);
    const outcomes: string[] = [];
    for (let i = 0; i < 3; i++) outcomes.push(check(await downloadThenInfo("/root/grow")));
    console.log(`growing file: ${outcomes.join(" | ")}`);
    const stop = await S().runCode("grower.kill()\n_ = grower.wait()");
    assert.equal(stop.exitCode, 0, stop.stderr);
    // The attack took place: at least one download was cut or refused for its size.
    assert.ok(
      outcomes.some((o) => !o.startsWith("exact")),
      `every download matched its size: ${outcomes.join(" | ")}`,
    );
    const after = await S().runCode("print(6 * 7)");
    assert.equal(after.stdout, "42\n");
  });

  it("a file truncated and rewritten while downloaded never corrupts the next response", async () => {
    const started = await S().runCode(
      [
        "import subprocess, sys",
        'churn = \'import os\\nwhile True:\\n    with open("/root/churn", "wb", buffering=0) as f:\\n        for _ in range(64):\\n            f.write(b"c" * 65536)\'',
        "open('/root/churn', 'wb').write(b'c' * (4 << 20))",
        "churner = subprocess.Popen([sys.executable, '-c', churn], start_new_session=True)",
        "import os, time",
        "deadline = time.monotonic() + 60",
        "while os.path.getsize('/root/churn') == (4 << 20) and time.monotonic() < deadline:",
        "    time.sleep(0.05)",
        "print(churner.pid, os.path.getsize('/root/churn'))",
      ].join("\n"),
    );
    assert.equal(started.exitCode, 0, started.stderr);
    assert.notEqual(
      Number(started.stdout.split(" ")[1]),
      4 << 20,
      `not churning: ${started.stdout}`,
    );
    const outcomes: string[] = [];
    for (let i = 0; i < 3; i++) outcomes.push(check(await downloadThenInfo("/root/churn")));
    console.log(`truncated file: ${outcomes.join(" | ")}`);
    const stop = await S().runCode("churner.kill()\n_ = churner.wait()");
    assert.equal(stop.exitCode, 0, stop.stderr);
    const after = await S().runCode("print(6 * 7)");
    assert.equal(after.stdout, "42\n");
  });
});

/**
 * Root in the guest duplicates the agent's port descriptor out of the agent process
 * (pidfd_getfd) and writes garbage into the channel: 8 KiB pieces with no frame magic,
 * 64 MiB of them unless the channel closes first.
 */
const SPEW = `
import ctypes, os
port = None
for pid in os.listdir('/proc'):
    if not pid.isdigit() or int(pid) == os.getpid():
        continue
    try:
        for fd in os.listdir(f'/proc/{pid}/fd'):
            if os.readlink(f'/proc/{pid}/fd/{fd}').startswith('/dev/vport'):
                port = (int(pid), int(fd))
    except OSError:
        pass
libc = ctypes.CDLL(None, use_errno=True)
pidfd = libc.syscall(434, port[0], 0)  # pidfd_open
fd = libc.syscall(438, pidfd, port[1], 0)  # pidfd_getfd
assert fd >= 0, ctypes.get_errno()
print('spewing into', port, flush=True)
junk = b'garbage!' * 1024
n = 0
while n < (64 << 20):
    n += os.write(fd, junk)
print('wrote', n)
`;

describe("a guest that spews garbage into the agent channel", () => {
  let child: ChildProcess | undefined;
  let url = "";
  let remove: () => Promise<void> = async () => {};
  /** The daemon's own log (its stderr), one JSON object per line. */
  const lines: Record<string, unknown>[] = [];

  before(async () => {
    const env = await serveEnv({ poolSize: 1 });
    remove = env.remove;
    const served = await serve(env.env);
    child = served.child;
    url = served.url;
    let partial = "";
    child.stderr?.on("data", (chunk: string) => {
      const parts = (partial + chunk).split("\n");
      partial = parts.pop() ?? "";
      for (const p of parts) if (p.trim()) lines.push(JSON.parse(p));
    });
  });
  after(async () => {
    if (child && child.exitCode === null) {
      child.kill("SIGTERM");
      await once(child, "exit");
    }
    await remove();
  });

  it("is cut off after a bounded number of log lines and its sandbox ends dead with the reason", async () => {
    const victim = await Sandbox.create({ host: url });
    const bystander = await Sandbox.create({ host: url });
    const before = lines.length;
    const result = await victim.runCode(SPEW, { timeoutMs: 120_000 });
    // The call ends in-band: the sandbox stopped under it.
    assert.equal(result.exitCode, -1);
    assert.equal(result.error?.name, "SandboxDied");
    assert.doesNotMatch(result.stdout, /wrote/, "the channel closed before 64 MiB got through");
    const info = await eventually("the sandbox marked dead", async () => {
      const i = await victim.getInfo();
      return i.state === "dead" ? i : undefined;
    });
    assert.equal(info.state, "dead");
    await assert.rejects(victim.runCode("print(1)"), (e: Error) => {
      assert.match(e.message, /no longer running \(its guest agent broke the protocol: .*garbage/);
      return true;
    });
    // Its QEMU is gone, the daemon and the other sandbox are fine.
    const died = lines.find((l) => l.msg === "sandbox VM died" && l.sandbox === victim.id);
    assert.ok(died, "the daemon logged the sandbox's end");
    await eventually(
      "the victim's QEMU gone",
      async () => (await qemuPids(String(died.vm))).length === 0,
    );
    assert.equal((await bystander.runCode("print(6 * 7)")).stdout, "42\n");
    const attack = lines.slice(before);
    const frameProblems = attack.filter((l) => l.msg === "agent frame problem").length;
    const fromAgent = attack.filter((l) => l.vm === died.vm).length;
    console.log(
      `garbage spewer: ${frameProblems} 'agent frame problem' lines, ${fromAgent} lines about its VM in all; closed with: ${String(attack.find((l) => l.msg === "guest agent channel closed for garbage")?.bytes)} bytes skipped; suppressed: ${String(attack.find((l) => l.msg === "agent warnings suppressed")?.suppressed)}`,
    );
    assert.ok(frameProblems <= 20, `${frameProblems} frame-problem lines`);
    assert.ok(fromAgent <= 30, `${fromAgent} lines about the VM`);
    await bystander.close();
    await victim.close();
  });
});
