/**
 * The attack of issue 10 item 2: a tenant opens 300 exec streams that each print 16 MiB
 * and never reads them. Without bounds the daemon would queue every byte (about 4.8 GB)
 * and die with every VM. With them: past the key's stream bound the opens get 429
 * too_many_streams; the streams that were let in hold at most the key's byte bound; the
 * daemon's RSS stays bounded (measured from /proc, printed); another tenant's create and
 * exec (a normally read 16 MiB print arrives whole, not truncated) still work; and once
 * the attacker's sockets go, its budget is back to zero.
 *
 * The daemon runs as its own process (`podflare serve`) so its RSS is its own.
 */
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { type IncomingMessage, request } from "node:http";
import { connect, type Socket } from "node:net";
import { after, describe, it } from "node:test";
import { eventually, serve, serveEnv } from "./harness.js";

const KEY_A = "pf_stream_bounds_attacker_0123456789abcdef";
const KEY_B = "pf_stream_bounds_bystander_0123456789abcdef";
const MiB = 2 ** 20;
const STREAMS = 300;
const SANDBOXES_A = 3;
const PRINT_16_MIB = "import sys\n_ = sys.stdout.write('x' * (16 * 2**20))";

interface Capacity {
  tenant: {
    streams: number;
    stream_buffered_bytes: number;
    max_streams: number;
    max_stream_buffered_bytes: number;
  };
  streams: {
    open: number;
    buffered_bytes: number;
    max_streams: number;
    max_buffered_bytes: number;
    stream_max_buffered_bytes: number;
  };
}

async function rssMib(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, "utf8");
  const kb = Number(/^VmRSS:\s+(\d+) kB/m.exec(status)?.[1]);
  assert.ok(kb > 0, "VmRSS readable");
  return kb / 1024;
}

describe("stream bounds: 300 unread 16 MiB exec streams", () => {
  const cleanup: (() => Promise<void>)[] = [];
  after(async () => {
    for (const c of cleanup.reverse()) await c().catch(() => {});
  });

  it("refuses past the bounds, keeps the daemon's memory bounded, serves others, releases all", async () => {
    const { env, remove } = await serveEnv({ poolSize: 2 });
    cleanup.push(remove);
    env.PODFLARE_API_KEYS = `${KEY_A},${KEY_B}`;
    const daemon = await serve(env);
    const pid = daemon.child.pid as number;
    cleanup.push(async () => {
      if (daemon.child.exitCode !== null) return;
      daemon.child.kill("SIGTERM");
      await new Promise((r) => daemon.child.once("exit", r));
    });
    const url = new URL(daemon.url);

    const api = async (key: string, method: string, path: string, body?: unknown) => {
      const res = await fetch(`${daemon.url}${path}`, {
        method,
        headers: {
          authorization: `Bearer ${key}`,
          ...(body === undefined ? {} : { "content-type": "application/json" }),
        },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      const text = await res.text();
      return { status: res.status, text, json: () => JSON.parse(text) };
    };
    const capacity = async (key: string) =>
      (await api(key, "GET", "/v1/capacity")).json() as Capacity;
    const metric = async (name: string, labels = ""): Promise<number> => {
      const text = (await api(KEY_A, "GET", "/metrics")).text;
      const line = text.split("\n").find((l) => l.startsWith(`${name}${labels} `));
      return line ? Number(line.split(" ")[1]) : 0;
    };
    const create = async (key: string): Promise<string> => {
      const r = await api(key, "POST", "/v1/sandboxes", {});
      assert.equal(r.status, 201, r.text);
      return r.json().id as string;
    };
    /** An exec read to the end, as a normal client does. */
    const run = async (key: string, id: string, code: string) => {
      const r = await api(key, "POST", `/v1/sandboxes/${id}/exec`, { code });
      assert.equal(r.status, 200, r.text);
      let stdout = "";
      let exit: Record<string, unknown> = {};
      for (const line of r.text.split("\n").filter(Boolean)) {
        const e = JSON.parse(line);
        if (e.type === "stdout") stdout += e.data;
        if (e.type === "exit") exit = e;
      }
      return { stdout, exit };
    };

    const before = await capacity(KEY_A);
    const limits = {
      tenantStreams: before.tenant.max_streams,
      tenantBytes: before.tenant.max_stream_buffered_bytes,
      ...before.streams,
    };
    const sandboxesA: string[] = [];
    for (let i = 0; i < SANDBOXES_A; i++) sandboxesA.push(await create(KEY_A));
    for (const id of sandboxesA) assert.equal((await run(KEY_A, id, "print(1)")).stdout, "1\n");
    const rssStart = await rssMib(pid);
    // What the attacker can make the daemon hold: its byte bound, as JS strings (1 byte a
    // character for this output) plus the frames' buffers until the GC frees them: twice
    // it; plus 128 MiB for the bystander's 16 MiB stream in flight (as frames, strings and
    // JSON lines at once) and the GC's slack. Unbounded it would be 300 x 16 MiB: by the
    // time this test measures, the guests have printed three times the key's byte bound.
    const rssBound = rssStart + (2 * limits.tenantBytes) / MiB + 128;
    console.log(
      `stream-bounds: limits per key ${limits.tenantStreams} streams / ${limits.tenantBytes / MiB} MiB, per daemon ${limits.max_streams} streams / ${limits.max_buffered_bytes / MiB} MiB, per stream ${limits.stream_max_buffered_bytes / MiB} MiB; daemon RSS at start ${rssStart.toFixed(0)} MiB, bound ${rssBound.toFixed(0)} MiB`,
    );

    let rssMax = rssStart;
    let sampling = true;
    cleanup.push(async () => {
      sampling = false;
    });
    const sampler = (async () => {
      while (sampling) {
        rssMax = Math.max(rssMax, await rssMib(pid).catch(() => 0));
        await new Promise((r) => setTimeout(r, 100));
      }
    })();

    // The attack: raw sockets, the request written, the reply never read beyond its
    // status line (the socket is paused as soon as that has arrived).
    const sockets: Socket[] = [];
    cleanup.push(async () => {
      for (const sock of sockets) sock.destroy(); // on a failure too: they hold the loop open
    });
    const statuses: { status: number; body: string }[] = [];
    const t0 = performance.now();
    for (let i = 0; i < STREAMS; i++) {
      const body = JSON.stringify({ code: PRINT_16_MIB });
      const sock = connect(Number(url.port), url.hostname);
      sockets.push(sock);
      sock.on("error", () => {});
      let head = "";
      const onData = (chunk: Buffer) => {
        head += chunk.toString("latin1");
        const end = head.indexOf("\r\n\r\n");
        if (end < 0) return;
        const status = Number(head.slice(9, 12));
        if (status === 200) {
          sock.off("data", onData);
          sock.pause(); // never read the body
          statuses.push({ status, body: "" });
          return;
        }
        const length = Number(/content-length: (\d+)/i.exec(head)?.[1] ?? -1);
        if (head.length - end - 4 < length) return;
        sock.off("data", onData);
        statuses.push({ status, body: head.slice(end + 4) });
        sock.destroy();
      };
      sock.on("data", onData);
      sock.write(
        `POST /v1/sandboxes/${sandboxesA[i % SANDBOXES_A]}/exec HTTP/1.1\r\nhost: ${url.host}\r\nauthorization: Bearer ${KEY_A}\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\n\r\n${body}`,
      );
    }
    const refusedExpected = STREAMS - limits.tenantStreams;
    await eventually(
      "the opens past the key's stream bound to be refused",
      async () => statuses.filter((s) => s.status === 429).length >= refusedExpected,
      60_000,
    );
    const refused = statuses.filter((s) => s.status === 429);
    assert.equal(refused.length, refusedExpected);
    for (const r of refused) {
      const err = JSON.parse(r.body);
      assert.equal(err.code, "too_many_streams");
      assert.match(
        err.error,
        /limit per key is \d+ \(PODFLARE_TENANT_MAX_STREAMS\): read or close/,
      );
    }
    assert.equal(
      statuses.filter((s) => s.status !== 429 && s.status !== 200).length,
      0,
      JSON.stringify(statuses.filter((s) => s.status !== 429 && s.status !== 200).slice(0, 3)),
    );
    assert.equal((await capacity(KEY_A)).tenant.streams, limits.tenantStreams);
    // A download is a stream too: refused while the key is at its bound.
    const download = await api(
      KEY_A,
      "GET",
      `/v1/sandboxes/${sandboxesA[0]}/files?path=/etc/hostname`,
    );
    assert.equal(download.status, 429, download.text);
    assert.equal(download.json().code, "too_many_streams");
    console.log(
      `stream-bounds: ${refused.length} of ${STREAMS} opens refused with 429 in ${((performance.now() - t0) / 1000).toFixed(1)} s`,
    );

    // Let the guests print unread: wait until what they printed past the bounds is twice
    // the key's byte bound (every byte of it would be in the daemon without the bounds).
    const droppedGoal = 2 * limits.tenantBytes;
    await eventually(
      "the guests to print past the bounds",
      async () => (await metric("podflare_stream_dropped_bytes_total")) >= droppedGoal,
      300_000,
    );
    const held = await capacity(KEY_A);
    assert.ok(
      // Checked as output arrives; an event's JSON framing (and the exit line) is charged
      // as it moves into the response: at most one line a stream beyond the bound.
      held.tenant.stream_buffered_bytes <= limits.tenantBytes + limits.tenantStreams * 1024,
      `the key holds ${held.tenant.stream_buffered_bytes} bytes`,
    );
    assert.ok((await metric("podflare_streams_truncated_total", '{bound="stream"}')) >= 1);
    console.log(
      `stream-bounds: ${(performance.now() - t0) / 1000 > 0 ? ((performance.now() - t0) / 1000).toFixed(1) : 0} s in, the guests printed ${((await metric("podflare_stream_dropped_bytes_total")) / MiB).toFixed(0)} MiB past the bounds; the key holds ${(held.tenant.stream_buffered_bytes / MiB).toFixed(1)} MiB unread; truncated by bound: stream ${await metric("podflare_streams_truncated_total", '{bound="stream"}')}, tenant ${await metric("podflare_streams_truncated_total", '{bound="tenant"}')}`,
    );

    // Another tenant, while the attacker's streams are open and its guests still print.
    const sandboxB = await create(KEY_B);
    assert.equal((await run(KEY_B, sandboxB, "print(6 * 7)")).stdout, "42\n");
    const normal = await run(KEY_B, sandboxB, PRINT_16_MIB);
    assert.equal(normal.stdout.length, 16 * MiB, "a normally read 16 MiB print arrives whole");
    assert.equal(normal.exit.code, 0);
    assert.equal(normal.exit.truncated, undefined);
    // A download read normally, by the other tenant: whole, and released at its end.
    const put = await fetch(`${daemon.url}/v1/sandboxes/${sandboxB}/files?path=/tmp/f`, {
      method: "PUT",
      headers: { authorization: `Bearer ${KEY_B}`, "content-type": "application/octet-stream" },
      body: Buffer.alloc(8 * MiB, 7),
    });
    assert.equal(put.status, 204);
    const got = await fetch(`${daemon.url}/v1/sandboxes/${sandboxB}/files?path=/tmp/f`, {
      headers: { authorization: `Bearer ${KEY_B}` },
    });
    assert.equal(got.status, 200);
    assert.deepEqual(Buffer.from(await got.arrayBuffer()), Buffer.alloc(8 * MiB, 7));
    // A reader that keeps up stays far below the per-stream bound: every exec stream
    // closed so far (the other tenant's 16 MiB print among them) peaked under half of it.
    const closed = await metric("podflare_stream_peak_buffered_bytes_count");
    const underHalf = await metric(
      "podflare_stream_peak_buffered_bytes_bucket",
      `{le="${limits.stream_max_buffered_bytes / 2}"}`,
    );
    assert.equal(underHalf, closed, "closed exec streams that peaked under half the bound");
    const peakBuckets = (await api(KEY_A, "GET", "/metrics")).text
      .split("\n")
      .filter((l) => l.startsWith("podflare_stream_peak_buffered_bytes_bucket"))
      .map((l) => l.replace("podflare_stream_peak_buffered_bytes_bucket", ""));
    console.log(
      `stream-bounds: peak held per closed exec stream (cumulative): ${peakBuckets.join(" ")}`,
    );
    assert.equal((await capacity(KEY_B)).tenant.streams, 0);

    // The attacker goes: everything it held is released.
    for (const s of sockets) s.destroy();
    await eventually("the budget to be back to zero", async () => {
      const c = await capacity(KEY_A);
      return c.tenant.streams === 0 && c.tenant.stream_buffered_bytes === 0 && c.streams.open === 0
        ? c
        : undefined;
    });
    assert.equal(await metric("podflare_streams_open"), 0);
    assert.equal(await metric("podflare_stream_buffered_bytes"), 0);
    sampling = false;
    await sampler;
    console.log(
      `stream-bounds: daemon RSS at start ${rssStart.toFixed(0)} MiB, worst ${rssMax.toFixed(0)} MiB, bound ${rssBound.toFixed(0)} MiB (unbounded: ${STREAMS} x 16 MiB)`,
    );
    assert.ok(rssMax < rssBound, `daemon RSS ${rssMax.toFixed(0)} MiB`);

    // The sandboxes still answer after the attack.
    for (const id of sandboxesA) {
      const after = await run(KEY_A, id, "print(2)");
      assert.equal(after.stdout, "2\n", `after the attack: ${JSON.stringify(after.exit)}`);
    }

    // A reader that stops, then comes back: it gets an unbroken prefix and an exit that
    // says truncated (not a silently shortened stream).
    const truncatedBefore = await metric("podflare_streams_truncated_total", '{bound="stream"}');
    const body = JSON.stringify({ code: PRINT_16_MIB });
    const res = await new Promise<IncomingMessage>((resolve, reject) => {
      const r = request(`${daemon.url}/v1/sandboxes/${sandboxesA[1]}/exec`, {
        method: "POST",
        headers: {
          authorization: `Bearer ${KEY_A}`,
          "content-type": "application/json",
          "content-length": Buffer.byteLength(body),
        },
      });
      r.on("response", (m) => {
        m.pause(); // not read until the daemon has dropped output
        resolve(m);
      });
      r.on("error", reject);
      r.end(body);
    });
    cleanup.push(async () => void res.destroy());
    assert.equal(res.statusCode, 200);
    await eventually(
      "the stopped reader's output to be dropped",
      async () =>
        (await metric("podflare_streams_truncated_total", '{bound="stream"}')) > truncatedBefore,
      120_000,
    );
    let late = "";
    res.setEncoding("utf8");
    for await (const chunk of res) late += chunk;
    let lateOut = "";
    let lateExit: Record<string, unknown> = {};
    for (const line of late.split("\n").filter(Boolean)) {
      const e = JSON.parse(line);
      if (e.type === "stdout") lateOut += e.data;
      if (e.type === "exit") lateExit = e;
    }
    console.log(
      `stream-bounds: a reader that stopped got ${(lateOut.length / MiB).toFixed(1)} MiB of 16, exit ${JSON.stringify(lateExit)}`,
    );
    assert.equal(lateExit.truncated, true);
    assert.equal(lateExit.code, 0);
    assert.ok(lateOut.length >= limits.stream_max_buffered_bytes / 2 && lateOut.length < 16 * MiB);
    assert.match(lateOut, /^x+$/);
    assert.equal((await capacity(KEY_A)).tenant.streams, 0);

    // Then the sandboxes go.
    for (const id of sandboxesA)
      assert.equal((await api(KEY_A, "DELETE", `/v1/sandboxes/${id}`)).status, 204);
    assert.equal((await api(KEY_B, "DELETE", `/v1/sandboxes/${sandboxB}`)).status, 204);
  });
});
