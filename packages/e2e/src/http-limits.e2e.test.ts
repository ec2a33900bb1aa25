/**
 * The HTTP server's timeouts and limits, attacked over raw sockets: a client that sends
 * nothing or its headers byte by byte (slowloris) is cut after the headers timeout; a
 * body that stops arriving is cut after the body-idle timeout; one that trickles past the
 * request timeout is cut; connections past the cap are closed while existing clients are
 * still answered. What must not be cut: an exec response that stays quiet longer than
 * every timeout, an upload that keeps moving for longer than the idle timeout, and a large
 * upload at full speed (its rate is printed).
 */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { eventually, sandboxRows, startTestDaemon, type TestDaemon } from "./harness.js";
import { openSocket, parseReply, portOf, rawRequest, requestText } from "./raw-http.js";

const HEADERS_MS = 1000;
const REQUEST_MS = 6000;
const BODY_IDLE_MS = 1000;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** `p`, or null once `ms` have passed (the timer is cleared either way). */
async function within<T>(p: Promise<T>, ms: number): Promise<T | null> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<null>((r) => {
    timer = setTimeout(() => r(null), ms);
  });
  try {
    return await Promise.race([p, late]);
  } finally {
    clearTimeout(timer);
  }
}

/** Write `text` a piece at a time until the server hangs up; how much went out, and when. */
async function trickle(
  port: number,
  text: string,
  piece: number,
  everyMs: number,
  prefix = "",
): Promise<{ sent: number; ms: number; reply: string }> {
  const c = await openSocket(port);
  const t0 = Date.now();
  if (prefix) c.socket.write(prefix);
  let sent = 0;
  let closed = false;
  void c.closed.then(() => {
    closed = true;
  });
  while (!closed && sent < text.length) {
    c.socket.write(text.slice(sent, sent + piece));
    sent += piece;
    await within(c.closed, everyMs);
  }
  const reply = (await within(c.closed, 60_000)) ?? "(still open)";
  c.socket.destroy();
  return { sent: Math.min(sent, text.length), ms: Date.now() - t0, reply };
}

async function createSandbox(url: string): Promise<string> {
  const r = await fetch(`${url}/v1/sandboxes`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: "{}",
  });
  const text = await r.text();
  assert.equal(r.status, 201, text);
  return (JSON.parse(text) as { id: string }).id;
}

describe("HTTP timeouts (set low)", () => {
  let d: TestDaemon;
  let port: number;
  before(async () => {
    d = await startTestDaemon({
      poolSize: 0,
      httpHeadersTimeoutMs: HEADERS_MS,
      httpRequestTimeoutMs: REQUEST_MS,
      httpBodyIdleTimeoutMs: BODY_IDLE_MS,
      httpKeepAliveTimeoutMs: 1000,
    });
    port = portOf(d.url);
  });
  after(async () => {
    await d?.close();
  });

  it("cuts a connection that sends nothing, and a slowloris client", async () => {
    const silent = await openSocket(port);
    const t0 = Date.now();
    const reply = await within(silent.closed, 30_000);
    const silentMs = Date.now() - t0;
    assert.notEqual(reply, null, "a silent connection was never closed");
    assert.ok(silentMs >= HEADERS_MS * 0.9, `closed after ${silentMs} ms`);
    assert.equal(parseReply(reply ?? "").status, 408, String(reply));

    // Headers one byte every 100 ms: 200 bytes would take 20 s; the timeout is 1 s.
    const headers = `GET /v1/healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ${"a".repeat(160)}\r\n\r\n`;
    const slow = await trickle(port, headers, 1, 100);
    console.log(
      `# slowloris: cut after ${slow.ms} ms, ${slow.sent} of ${headers.length} header bytes sent`,
    );
    assert.ok(slow.sent < headers.length, "the server waited for every header byte");
    assert.ok(slow.ms < 15_000, `cut only after ${slow.ms} ms`);
    assert.equal(parseReply(slow.reply).status, 408, slow.reply);
    assert.match(parseReply(slow.reply).body, /PODFLARE_HTTP_HEADERS_TIMEOUT_MS/);
    // Meanwhile, and after, ordinary requests are answered.
    assert.equal((await rawRequest(port, requestText("GET", "/v1/healthz", {}))).status, 200);
  });

  it("cuts a body that stops arriving, and one that trickles past the request timeout", async () => {
    const body = `{"metadata": {"a": "${"b".repeat(200)}"}}`;
    const head = `POST /v1/sandboxes HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\ncontent-length: ${body.length}\r\n\r\n`;
    // The headers and 10 bytes of body, then nothing.
    const stalled = await openSocket(port);
    stalled.socket.write(head + body.slice(0, 10));
    const t0 = Date.now();
    const got = await within(stalled.closed, 30_000);
    const stalledMs = Date.now() - t0;
    console.log(`# stalled body: cut after ${stalledMs} ms (idle timeout ${BODY_IDLE_MS} ms)`);
    assert.notEqual(got, null, "a stalled body was never cut");
    assert.ok(stalledMs >= BODY_IDLE_MS * 0.9 && stalledMs < 15_000, `${stalledMs} ms`);

    // The headers at once, then one body byte every 300 ms: never idle for 1 s, but the
    // whole body would take over a minute.
    const slow = await trickle(port, body, 1, 300, head);
    console.log(
      `# trickled body: cut after ${slow.ms} ms, ${slow.sent} of ${body.length} body bytes (request timeout ${REQUEST_MS} ms)`,
    );
    assert.ok(slow.sent < body.length, "the whole trickled body was accepted");
    assert.ok(slow.ms >= REQUEST_MS * 0.9 && slow.ms < 30_000, `${slow.ms} ms`);
    assert.equal(parseReply(slow.reply).status, 408, slow.reply);
    assert.equal(sandboxRows(d), 0, "no create ran on a cut body");
  });

  it("never cuts a quiet exec response, nor an upload that keeps moving", async () => {
    const id = await createSandbox(d.url);
    const quietS = (REQUEST_MS + 3000) / 1000; // longer than every timeout configured
    const t0 = Date.now();
    const r = await fetch(`${d.url}/v1/sandboxes/${id}/exec`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ code: `import time\ntime.sleep(${quietS})\nprint("done")` }),
    });
    assert.equal(r.status, 200);
    const events = (await r.text())
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as { type: string; data?: string; code?: number });
    const ms = Date.now() - t0;
    console.log(`# quiet exec: ${ms} ms with no event on the wire, completed`);
    assert.ok(ms >= quietS * 1000, `${ms} ms`);
    assert.deepEqual(
      events.filter((e) => e.type === "stdout").map((e) => e.data),
      ["done\n"],
    );
    assert.equal(events.at(-1)?.type, "exit");
    assert.equal(events.at(-1)?.code, 0);

    // 8 pieces 500 ms apart: 3.5 s in all, far past the 1 s idle timeout, never idle.
    const piece = Buffer.alloc(64 * 1024, 0x61);
    async function* pieces() {
      for (let i = 0; i < 8; i++) {
        if (i > 0) await sleep(500);
        yield piece;
      }
    }
    const u = await fetch(`${d.url}/v1/sandboxes/${id}/files?path=/tmp/slow`, {
      method: "PUT",
      headers: { "content-type": "application/octet-stream" },
      body: pieces(),
      duplex: "half",
    } as RequestInit);
    assert.equal(u.status, 204, await u.text());
    const back = await fetch(`${d.url}/v1/sandboxes/${id}/files?path=/tmp/slow`);
    assert.equal((await back.arrayBuffer()).byteLength, 8 * piece.length);

    // An upload that stalls halfway is cut, leaves no file, and the sandbox goes on.
    const stalled = await openSocket(port);
    stalled.socket.write(
      `PUT /v1/sandboxes/${id}/files?path=/tmp/stalled HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/octet-stream\r\ncontent-length: ${1 << 20}\r\n\r\n`,
    );
    stalled.socket.write(Buffer.alloc(256 * 1024, 0x63));
    const t1 = Date.now();
    assert.notEqual(await within(stalled.closed, 30_000), null, "a stalled upload was never cut");
    console.log(`# stalled upload: cut after ${Date.now() - t1} ms`);
    const gone = await fetch(`${d.url}/v1/sandboxes/${id}/files?path=/tmp/stalled`);
    assert.equal(gone.status, 404, await gone.text());
    const again = await fetch(`${d.url}/v1/sandboxes/${id}/exec`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ code: "print(6 * 7)" }),
    });
    assert.match(await again.text(), /"data":"42\\n"/);
  });
});

describe("HTTP connection cap", () => {
  const CAP = 8;
  let d: TestDaemon;
  let port: number;
  before(async () => {
    d = await startTestDaemon({
      poolSize: 0,
      httpMaxConnections: CAP,
      httpKeepAliveTimeoutMs: 120_000,
    });
    port = portOf(d.url);
  });
  after(async () => {
    await d?.close();
  });

  const keepAliveHealthz = "GET /v1/healthz HTTP/1.1\r\nHost: localhost\r\n\r\n";

  it("closes connections past the cap while existing clients are still answered", async () => {
    // CAP clients, each answered once on a kept-alive connection: the server holds them all.
    const held = [];
    for (let i = 0; i < CAP; i++) {
      const c = await openSocket(port);
      c.socket.write(keepAliveHealthz);
      await eventually(`client ${i} answered`, async () => / 200 /.test(c.received()));
      held.push(c);
    }
    // Five more: each is closed by the server without an answer, even to a full request.
    const t0 = Date.now();
    for (let i = 0; i < 5; i++) {
      const extra = await openSocket(port).catch(() => null);
      if (!extra) continue; // refused outright: as good
      extra.socket.write(keepAliveHealthz);
      const got = await within(extra.closed, 15_000);
      assert.notEqual(got, null, `extra connection ${i} stayed open`);
      assert.equal(got, "", `extra connection ${i} was answered`);
    }
    console.log(`# 5 connections past a cap of ${CAP}: all closed in ${Date.now() - t0} ms`);
    // The existing clients are still answered on their connections.
    for (const c of held) {
      const before = c.received().length;
      c.socket.write(keepAliveHealthz);
      await eventually("a held client answered again", async () =>
        / 200 /.test(c.received().slice(before)),
      );
    }
    // One leaves: a new client gets its place.
    const leaving = held.pop();
    leaving?.socket.end();
    await leaving?.closed;
    await eventually(
      "a new client answered once a place is free",
      async () => (await rawRequest(port, requestText("GET", "/v1/healthz", {}))).status === 200,
    );
    for (const c of held) c.socket.destroy();
  });

  it("takes a large upload at full speed under the default request timeouts", async () => {
    const id = await createSandbox(d.url);
    const mib = 32;
    const chunk = Buffer.alloc(1 << 20, 0x62);
    async function* body() {
      for (let i = 0; i < mib; i++) yield chunk;
    }
    const t0 = Date.now();
    const u = await fetch(`${d.url}/v1/sandboxes/${id}/files?path=/tmp/big`, {
      method: "PUT",
      headers: { "content-type": "application/octet-stream", "content-length": String(mib << 20) },
      body: body(),
      duplex: "half",
    } as RequestInit);
    assert.equal(u.status, 204, await u.text());
    const s = (Date.now() - t0) / 1000;
    console.log(
      `# upload ${mib} MiB: ${s.toFixed(1)} s, ${(mib / s).toFixed(1)} MiB/s (1 GiB at this rate: ${Math.round(1024 / (mib / s))} s; request timeout ${d.config.httpRequestTimeoutMs / 1000} s)`,
    );
  });
});

describe("quiet exec streams", () => {
  const HEARTBEAT_MS = 300;
  const CLIENT_IDLE_MS = 1000; // a client (or proxy) that cuts a response idle this long
  let d: TestDaemon;
  before(async () => {
    d = await startTestDaemon({ poolSize: 1, httpStreamHeartbeatMs: HEARTBEAT_MS });
  });
  after(async () => {
    await d?.close();
  });

  it("answer at once and keep the line busy while the code is silent", async () => {
    const id = await createSandbox(d.url);
    const { request } = await import("node:http");
    const silentS = 3.5; // 3.5 times the client's idle limit
    const t0 = performance.now();
    const result = await new Promise<{ headersMs: number; chunks: string[]; cut: boolean }>(
      (resolve, reject) => {
        const body = JSON.stringify({
          code: `import time\ntime.sleep(${silentS})\nprint("done")`,
        });
        const req = request(
          `${d.url}/v1/sandboxes/${id}/exec`,
          {
            method: "POST",
            headers: { "content-type": "application/json", "content-length": body.length },
            timeout: CLIENT_IDLE_MS, // fires after this long without a byte
          },
          (res) => {
            const headersMs = performance.now() - t0;
            const chunks: string[] = [];
            res.setEncoding("utf8");
            res.on("data", (c: string) => chunks.push(c));
            res.on("end", () => resolve({ headersMs, chunks, cut: false }));
            res.on("error", reject);
          },
        );
        req.on("timeout", () => {
          req.destroy();
          resolve({ headersMs: Number.NaN, chunks: [], cut: true });
        });
        req.on("error", (err) => (req.destroyed ? undefined : reject(err)));
        req.end(body);
      },
    );
    const text = result.chunks.join("");
    const lines = text.split("\n");
    const empty = lines.slice(0, -1).filter((l) => l === "").length;
    console.log(
      `# quiet exec (${silentS} s silent): headers after ${result.headersMs.toFixed(0)} ms, ${empty} empty lines, cut by the client: ${result.cut}`,
    );
    assert.equal(result.cut, false, "a client idle limit of 1 s never fired");
    assert.ok(result.headersMs < 1000, `headers after ${result.headersMs} ms`);
    assert.ok(empty >= 5, `${empty} empty lines`); // one at once, then one a 300 ms
    const events = lines
      .filter(Boolean)
      .map((l) => JSON.parse(l) as { type: string; data?: string; code?: number });
    assert.deepEqual(
      events.filter((e) => e.type === "stdout").map((e) => e.data),
      ["done\n"],
    );
    assert.equal(events.at(-1)?.type, "exit");
    assert.equal(events.at(-1)?.code, 0);
  });
});
