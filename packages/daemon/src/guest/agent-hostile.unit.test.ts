/**
 * A hostile guest agent against the real AgentClient over a real unix socket pair (the
 * daemon's agent channel is a socket too): garbage spewed forever, downloads longer or
 * shorter than declared, requests never answered. Each test performs the attack and
 * asserts the safe outcome: bounded log lines and a closed channel, a download that stops
 * at its declared size, per-request state released.
 */
import assert from "node:assert/strict";
import { once } from "node:events";
import { mkdtemp, rm } from "node:fs/promises";
import { connect, createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Duplex } from "node:stream";
import { after, before, describe, it, mock } from "node:test";
import { buildServer } from "../api/server.js";
import { Authenticator } from "../auth/authenticator.js";
import type { SandboxService } from "../sandboxes/service.js";
import { silentLogger } from "../util/logger.js";
import {
  AgentClient,
  AgentClosedError,
  DownloadSizeError,
  type ExecEvent,
  GARBAGE_LIMIT,
  WARN_BURST,
} from "./agent-client.js";
import { encodeFrame, type Frame, FrameDecoder, type FrameHeader, MAGIC } from "./frames.js";

/** The guest's end of a real socket pair: frames the host sent, and a way to answer. */
class SocketAgent {
  readonly sent: Frame[] = [];
  private readonly decoder = new FrameDecoder();
  private waiters: (() => void)[] = [];

  constructor(readonly sock: Socket) {
    sock.on("data", (c: Buffer) => {
      this.sent.push(...this.decoder.push(c));
      for (const w of this.waiters.splice(0)) w();
    });
    sock.on("error", () => {});
  }

  send(header: FrameHeader, payload?: Buffer): boolean {
    return this.sock.write(encodeFrame(header, payload));
  }

  /** Wait until the host has sent a frame of `type` (an event, not a sleep). */
  async frame(type: string): Promise<Frame> {
    for (;;) {
      const f = this.sent.find((x) => x.header.type === type);
      if (f) return f;
      await new Promise<void>((r) => this.waiters.push(r));
    }
  }
}

let dir: string;
let server: Server;
let path: string;
const accepted: Socket[] = [];

before(async () => {
  dir = await mkdtemp(join(tmpdir(), "podflare-agent-"));
  path = join(dir, "agent.sock");
  server = createServer((s) => accepted.push(s));
  await new Promise<void>((r) => server.listen(path, r));
});
after(async () => {
  for (const s of accepted) s.destroy();
  await new Promise((r) => server.close(r));
  await rm(dir, { recursive: true, force: true });
});

/** A real socket pair: the host's AgentClient on one end, a hostile agent on the other. */
async function channel() {
  const n = accepted.length;
  const hostSock = connect(path);
  await once(hostSock, "connect");
  while (accepted.length === n) await new Promise((r) => setImmediate(r));
  const agent = new SocketAgent(accepted[n] as Socket);
  const lines: { msg: string; extra?: Record<string, unknown> }[] = [];
  const client = new AgentClient(hostSock, (msg, extra) => {
    JSON.stringify(extra); // as a real logger would: must not throw
    lines.push({ msg, extra });
  });
  return { client, agent, lines, hostSock };
}

/** Write `chunk` until the peer is gone; resolves with the bytes written. */
async function spew(sock: Socket, chunk: () => Buffer): Promise<number> {
  let bytes = 0;
  while (!sock.destroyed && sock.writable) {
    const c = chunk();
    bytes += c.length;
    if (!sock.write(c)) {
      const drained = await new Promise<boolean>((resolve) => {
        const done = (v: boolean) => () => {
          sock.off("drain", onDrain);
          sock.off("close", onClose);
          resolve(v);
        };
        const onDrain = done(true);
        const onClose = done(false);
        sock.once("drain", onDrain);
        sock.once("close", onClose);
      });
      if (!drained) break;
    }
  }
  return bytes;
}

describe("hostile guest agent: garbage", () => {
  it("a channel that spews garbage is closed after a bounded number of log lines", async () => {
    const { client, agent, lines, hostSock } = await channel();
    const pending = assert.rejects(client.ping(60_000), (e) => {
      assert.ok(e instanceof AgentClosedError, String(e));
      assert.match(e.message, /kept sending garbage \(\d+ bytes skipped/);
      return true;
    });
    // 12-byte pieces of garbage (no magic), forever: each was one ~150-byte log line.
    const garbage = Buffer.from("garbage!\xff\xfe\x00\x01", "latin1");
    const sent = await spew(agent.sock, () => garbage);
    await pending;
    assert.ok(client.closed);
    assert.match(await client.violation, /garbage/);
    assert.ok(hostSock.destroyed);
    console.log(
      `garbage spewer: ${sent} bytes sent, ${lines.length} log lines, closed: ${lines.at(-2)?.msg ?? lines.at(-1)?.msg}`,
    );
    assert.ok(sent >= GARBAGE_LIMIT, "closed only past the garbage bound");
    assert.ok(sent < 8 * GARBAGE_LIMIT, `closed late: ${sent} bytes`);
    // The burst, the close, and the suppressed count: never one line per problem.
    assert.ok(lines.length <= WARN_BURST + 2, `${lines.length} log lines`);
    assert.ok(lines.some((l) => l.msg === "guest agent channel closed for garbage"));
    const summary = lines.find((l) => l.msg === "agent warnings suppressed");
    assert.ok(summary && (summary.extra?.suppressed as number) > 0);
  });

  it("a channel that sends undecodable frames forever is closed too", async () => {
    const { client, agent, lines } = await channel();
    const bad = Buffer.alloc(12 + 9);
    MAGIC.copy(bad);
    bad.writeUInt32BE(9, 4);
    bad.write("{not json", 12);
    let frames = 0;
    await spew(agent.sock, () => {
      frames++;
      return bad;
    });
    assert.ok(client.closed);
    console.log(`bad-frame spewer: ${frames} frames sent, ${lines.length} log lines`);
    assert.ok(lines.length <= WARN_BURST + 2, `${lines.length} log lines`);
    assert.match(await client.violation, /undecodable frames/);
  });

  it("occasional garbage is logged rate-limited with a count of what was suppressed", async () => {
    // In-process duplex: each chunk arrives as one push (a socket may coalesce them).
    const stream = new Duplex({ read() {}, write: (_c, _e, cb) => cb() });
    const lines: { msg: string; extra?: Record<string, unknown> }[] = [];
    const client = new AgentClient(stream, (msg, extra) => lines.push({ msg, extra }));
    for (let i = 0; i < 300; i++) stream.emit("data", Buffer.from("twelve bytes"));
    assert.ok(!client.closed, "300 small problems are under the bound");
    assert.equal(lines.length, WARN_BURST);
    client.close();
    assert.deepEqual(lines.at(-1), {
      msg: "agent warnings suppressed",
      extra: { suppressed: 300 - WARN_BURST },
    });
  });
});

describe("hostile guest agent: downloads", () => {
  async function download(answer: (agent: SocketAgent, id: number) => void) {
    const { client, agent } = await channel();
    const opened = client.readFile("/root/f", 5_000);
    const read = await agent.frame("read");
    answer(agent, read.header.id as number);
    const { size, stream } = await opened;
    const chunks: Buffer[] = [];
    let error: Error | null = null;
    try {
      for await (const c of stream) chunks.push(c as Buffer);
    } catch (err) {
      error = err as Error;
    }
    return { client, agent, size, body: Buffer.concat(chunks), error };
  }

  it("bytes past the declared size fail the stream before any excess is delivered", async () => {
    const r = await download((agent, id) => {
      agent.send({ type: "read_begin", id, size: 10 });
      agent.send({ type: "data", id }, Buffer.from("0123456"));
      agent.send({ type: "data", id }, Buffer.from("789abcdef")); // 6 too many
      agent.send({ type: "read_end", id, size: 16 });
    });
    assert.equal(r.size, 10);
    assert.ok(r.error instanceof DownloadSizeError);
    assert.match(r.error.message, /grew while it was downloaded.*more than the 10 bytes/);
    assert.ok(r.body.length <= 10, `${r.body.length} bytes delivered`);
    await r.agent.frame("read_abort"); // the guest is told to stop streaming
    assert.equal(r.client.pendingRequests, 0);
    r.client.close();
  });

  it("a read_end short of the declared size fails the stream", async () => {
    const r = await download((agent, id) => {
      agent.send({ type: "read_begin", id, size: 10 });
      agent.send({ type: "data", id }, Buffer.from("0123"));
      agent.send({ type: "read_end", id, size: 4 });
    });
    assert.ok(r.error instanceof DownloadSizeError);
    assert.match(r.error.message, /shrank while it was downloaded: the guest sent 4 of the 10/);
    assert.equal(r.client.pendingRequests, 0);
    r.client.close();
  });

  it("exactly the declared size ends normally", async () => {
    const r = await download((agent, id) => {
      agent.send({ type: "read_begin", id, size: 10 });
      agent.send({ type: "data", id }, Buffer.from("01234"));
      agent.send({ type: "data", id }, Buffer.from("56789"));
      agent.send({ type: "read_end", id, size: 10 });
    });
    assert.equal(r.error, null);
    assert.equal(r.body.toString(), "0123456789");
    r.client.close();
  });

  it("over HTTP keep-alive, a longer or shorter download never corrupts the next response", async () => {
    const cases: [
      string,
      (a: SocketAgent, id: number, headersIn: Promise<void>) => Promise<void>,
    ][] = [
      ["more, at once", async (a, id) => sendFile(a, id, 10, ["0123456789EXTRA-", LEAK])],
      ["fewer, at once", async (a, id) => sendFile(a, id, 10, ["0123"])],
      [
        "more, after the headers",
        async (a, id, headersIn) => {
          sendFile(a, id, 10, ["01234"], false);
          await headersIn;
          sendFile(a, id, 10, ["56789EXTRA-", LEAK], true, false);
        },
      ],
      [
        "fewer, after the headers",
        async (a, id, headersIn) => {
          sendFile(a, id, 10, ["01234"], false);
          await headersIn;
          sendFile(a, id, 10, [], true, false);
        },
      ],
    ];
    for (const [name, answer] of cases) {
      const { client, agent } = await channel();
      let headersIn: () => void = () => {};
      const headers = new Promise<void>((r) => {
        headersIn = r;
      });
      void agent.frame("read").then((read) => answer(agent, read.header.id as number, headers));
      const app = buildServer({
        service: {
          download: (_c: unknown, _id: string, p: string) => client.readFile(p),
        } as unknown as SandboxService,
        auth: new Authenticator(null, []),
        capacity: async () => ({}),
        log: silentLogger(),
      });
      await app.listen({ host: "127.0.0.1", port: 0 });
      const port = (app.server.address() as { port: number }).port;
      const raw = await keepAliveTwice(
        port,
        "GET /v1/sandboxes/sb-1/files?path=/root/f HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n",
        "GET /v1/healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n",
        () => headersIn(),
      );
      const responses = parseResponses(raw.bytes);
      console.log(
        `download with ${name}: ${responses.map((r) => `${r.status} ${r.body.length}/${r.length}${r.complete ? "" : " (cut)"}`).join(", ")}; connection ${raw.closed ? "closed" : "open"}`,
      );
      const [first, second] = responses;
      assert.ok(first, "a first response (headers) arrived");
      assert.ok(!raw.bytes.toString("latin1").includes("forgd"), "no guest bytes leak");
      if (first.status === 200) {
        // Either the whole declared size, or the connection cut before it: never more.
        assert.ok(first.body.length <= 10);
        assert.ok(first.complete || raw.closed);
      } else {
        // Failed before any byte went out: a complete error answer, then the connection closes.
        assert.equal(first.status, 500);
        assert.ok(first.complete);
        const err = JSON.parse(first.body.toString()) as { error: string; code: string };
        assert.equal(err.code, "internal");
        assert.match(err.error, /(grew|shrank) while it was downloaded/);
        assert.ok(raw.closed);
      }
      // Anything after the first response is the healthz answer, intact.
      if (second) {
        assert.equal(second.status, 200);
        assert.equal(second.body.toString(), "ok");
        assert.equal(responses.length, 2);
      } else {
        assert.ok(raw.closed, "no second response: the connection was cut");
      }
      await app.close();
      client.close();
    }
  });
});

/** An AgentClient whose guest reads every frame the host sends (into `sent`) and answers none. */
function agentThatNeverAnswers(): { stream: Duplex; sent: Frame[]; client: AgentClient } {
  const sent: Frame[] = [];
  const hostFrames = new FrameDecoder();
  const stream = new Duplex({
    read() {},
    write(c: Buffer, _e, cb) {
      sent.push(...hostFrames.push(c));
      cb();
    },
  });
  return { stream, sent, client: new AgentClient(stream) };
}

describe("hostile guest agent: requests never answered", () => {
  it("cancel, abandoned-exec and write routes are released by timers", async () => {
    mock.timers.enable({ apis: ["setTimeout"] });
    try {
      const { stream, sent, client } = agentThatNeverAnswers();
      const feed = (h: FrameHeader, p?: Buffer) => stream.emit("data", encodeFrame(h, p));

      for (let i = 0; i < 50; i++) client.cancel(12345 + i);
      assert.equal(client.pendingRequests, 50);

      // Three execs each print once, then the caller stops listening: each is cancelled,
      // and the agent never answers the cancels nor reports the execs' exits.
      const iters = [0, 1, 2].map(() => client.exec("while True: pass"));
      const got: ExecEvent[] = [];
      await Promise.all(
        iters.map(async (it) => {
          const iter = it[Symbol.asyncIterator]();
          const next = iter.next();
          await new Promise((r) => setImmediate(r));
          feed({ type: "output", id: it.id, stream: "stdout" }, Buffer.from("x"));
          got.push((await next).value as ExecEvent);
          await iter.return?.(undefined);
        }),
      );
      assert.equal(got.length, 3);
      assert.equal(sent.filter((f) => f.header.type === "cancel").length, 53);
      assert.equal(client.pendingRequests, 50 + 3 + 3); // cancels + abandoned execs

      // An upload whose end is never answered: its route lingers only briefly.
      const write = client.writeFile(
        "/root/x",
        (async function* () {
          yield Buffer.from("abc");
        })(),
        { maxBytes: 10, timeoutMs: 1_000 },
      );
      await new Promise((r) => setImmediate(r));
      const begin = sent.find((f) => f.header.type === "write_begin");
      feed({ type: "ok", id: begin?.header.id as number });
      await new Promise((r) => setImmediate(r));
      mock.timers.tick(1_000); // write_end times out
      await assert.rejects(write, /did not answer write_end/);

      mock.timers.tick(61_000);
      assert.equal(client.pendingRequests, 0, "every route released");
      // The abandoned execs' slots were released too: a new exec is sent at once.
      client.exec("print(1)");
      assert.equal(sent.filter((f) => f.header.type === "exec").length, 4);
      client.close();
    } finally {
      mock.timers.reset();
    }
  });

  it("an upload to a guest that stops reading fails after its timeout, route released", async () => {
    mock.timers.enable({ apis: ["setTimeout"] });
    try {
      const sent: Frame[] = [];
      const hostFrames = new FrameDecoder();
      let reading = true;
      const stream = new Duplex({
        read() {},
        write(c: Buffer, _e, cb) {
          sent.push(...hostFrames.push(c));
          if (reading) cb(); // then never again: the guest stopped reading its port
        },
      });
      const client = new AgentClient(stream);
      const upload = client.writeFile(
        "/root/big",
        (async function* () {
          for (let i = 0; i < 8; i++) yield Buffer.alloc(1 << 20, i);
        })(),
        { maxBytes: 64 << 20, timeoutMs: 30_000 },
      );
      upload.catch(() => {});
      await new Promise((r) => setImmediate(r));
      const begin = sent.find((f) => f.header.type === "write_begin");
      reading = false;
      stream.emit("data", encodeFrame({ type: "ok", id: begin?.header.id as number }));
      for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
      mock.timers.tick(30_000);
      await assert.rejects(upload, /read none of the upload for 30000 ms/);
      mock.timers.tick(5_000);
      assert.equal(client.pendingRequests, 0);
      client.close();
    } finally {
      mock.timers.reset();
    }
  });

  it("a download whose guest stops sending is failed and its route released", async () => {
    mock.timers.enable({ apis: ["setTimeout"] });
    try {
      const { stream, sent, client } = agentThatNeverAnswers();
      const opened = client.readFile("/root/f");
      const id = sent.find((f) => f.header.type === "read")?.header.id as number;
      stream.emit("data", encodeFrame({ type: "read_begin", id, size: 100 }));
      const { stream: body } = await opened;
      stream.emit("data", encodeFrame({ type: "data", id }, Buffer.from("partial")));
      const reading = (async () => {
        for await (const _ of body) {
          // the guest then never sends another byte
        }
      })();
      await new Promise((r) => setImmediate(r));
      mock.timers.tick(60_000);
      await assert.rejects(reading, /sent no data for \/root\/f within 60000 ms \(7 of 100/);
      assert.equal(client.pendingRequests, 0);
      assert.ok(sent.some((f) => f.header.type === "read_abort"));
      client.close();
    } finally {
      mock.timers.reset();
    }
  });
});

/** What a hostile guest appends to a download: bytes shaped as the next HTTP response. */
const LEAK = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nforgd";

/** A download's frames: read_begin declaring `size` (if `begin`), data pieces, read_end. */
function sendFile(
  a: SocketAgent,
  id: number,
  size: number,
  pieces: string[],
  end = true,
  begin = true,
) {
  if (begin) a.send({ type: "read_begin", id, size });
  let sent = 0;
  for (const p of pieces) {
    a.send({ type: "data", id }, Buffer.from(p));
    sent += p.length;
  }
  if (end) a.send({ type: "read_end", id, size: sent });
}

/** Two requests on one keep-alive connection; all bytes until the server closes or goes quiet. */
async function keepAliveTwice(
  port: number,
  first: string,
  second: string,
  onHeaders: () => void,
): Promise<{ bytes: Buffer; closed: boolean }> {
  const sock = connect(port, "127.0.0.1");
  await once(sock, "connect");
  const chunks: Buffer[] = [];
  let closed = false;
  sock.on("data", (c: Buffer) => chunks.push(c));
  sock.on("error", () => {});
  const ended = new Promise<void>((r) =>
    sock.on("close", () => {
      closed = true;
      r();
    }),
  );
  sock.write(first);
  // The second request is sent once the first response's headers are in (pipelining
  // would work as well, but this is what a keep-alive client does).
  while (!Buffer.concat(chunks).includes("\r\n\r\n") && !closed) {
    await Promise.race([once(sock, "data"), ended]);
  }
  onHeaders();
  if (!closed) sock.write(second);
  // Done when the connection closes, or both responses are complete.
  for (;;) {
    const rs = parseResponses(Buffer.concat(chunks));
    if (closed || (rs.length >= 2 && rs.every((r) => r.complete))) break;
    await Promise.race([once(sock, "data"), ended]);
  }
  sock.destroy();
  return { bytes: Buffer.concat(chunks), closed };
}

interface RawResponse {
  status: number;
  length: number;
  body: Buffer;
  complete: boolean;
}

/** Split raw HTTP/1.1 bytes into responses by their content-length. */
function parseResponses(bytes: Buffer): RawResponse[] {
  const out: RawResponse[] = [];
  let at = 0;
  while (at < bytes.length) {
    const end = bytes.indexOf("\r\n\r\n", at);
    if (end < 0)
      throw new Error(
        `not an HTTP response at byte ${at}: ${bytes.subarray(at, at + 80).toString("latin1")}`,
      );
    const head = bytes.subarray(at, end).toString("latin1");
    const status = /^HTTP\/1\.1 (\d{3}) /.exec(head);
    if (!status) throw new Error(`not an HTTP status line: ${head.slice(0, 80)}`);
    const length = Number(/\r\ncontent-length: *(\d+)/i.exec(head)?.[1] ?? "0");
    const body = bytes.subarray(end + 4, Math.min(bytes.length, end + 4 + length));
    out.push({ status: Number(status[1]), length, body, complete: body.length === length });
    at = end + 4 + length;
  }
  return out;
}
