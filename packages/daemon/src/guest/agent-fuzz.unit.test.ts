/**
 * Property-based fuzzing of the host side of the guest-agent protocol: the frame decoder
 * and a real AgentClient fed hostile byte streams by a fake agent over an in-process
 * duplex. The guest is untrusted, so whatever it sends must never throw out of the
 * client's event handlers (an uncaught exception would take the whole daemon down), never
 * make the host buffer more than one maximal frame, and never leave a request hanging once
 * the channel ends.
 *
 * Reproduce a failure with the seed printed at the start: FUZZ_SEED=<n> npm run test:unit.
 */
import assert from "node:assert/strict";
import { Duplex } from "node:stream";
import { describe, it } from "node:test";
import fc from "fast-check";
import {
  AgentClient,
  AgentError,
  type ExecEvent,
  ExecQueueFullError,
  MAX_AGENT_EXECS,
  MAX_QUEUED_EXECS,
} from "./agent-client.js";
import {
  encodeFrame,
  type Frame,
  FrameDecoder,
  type FrameHeader,
  MAGIC,
  MAX_HEADER_BYTES,
  MAX_PAYLOAD_BYTES,
  PREAMBLE_BYTES,
} from "./frames.js";

const SEED = Number(process.env.FUZZ_SEED ?? 20_260_611);
const RUNS = Number(process.env.FUZZ_RUNS ?? 1);
console.log(`agent protocol fuzz: seed ${SEED} (set FUZZ_SEED to reproduce, FUZZ_RUNS to scale)`);
const params = (numRuns: number): fc.Parameters<unknown> => ({
  seed: SEED,
  numRuns: numRuns * RUNS,
  endOnFailure: false,
});
const MAX_FRAME = PREAMBLE_BYTES + MAX_HEADER_BYTES + MAX_PAYLOAD_BYTES;

// ---------------------------------------------------------------------------------------
// Building blocks: frames with arbitrary (also invalid) headers and lengths.

function rawFrame(header: Buffer, payload: Buffer, lengths?: { hl?: number; pl?: number }): Buffer {
  const pre = Buffer.alloc(PREAMBLE_BYTES);
  MAGIC.copy(pre);
  pre.writeUInt32BE(lengths?.hl ?? header.length, 4);
  pre.writeUInt32BE(lengths?.pl ?? payload.length, 8);
  return Buffer.concat([pre, header, payload]);
}

/** Split `bytes` at the given cut points (positions taken modulo its length). */
function split(bytes: Buffer, cuts: number[]): Buffer[] {
  if (bytes.length === 0) return [bytes];
  const points = [...new Set(cuts.map((c) => c % bytes.length))].sort((a, b) => a - b);
  const out: Buffer[] = [];
  let at = 0;
  for (const p of points) {
    if (p > at) out.push(bytes.subarray(at, p));
    at = Math.max(at, p);
  }
  out.push(bytes.subarray(at));
  return out;
}

const noMagic = (b: Uint8Array): Buffer => {
  const buf = Buffer.from(b);
  // Any "PF\x01\x00" inside becomes "PF\x01\x01": garbage that carries no frame start.
  for (let i = buf.indexOf(MAGIC); i >= 0; i = buf.indexOf(MAGIC, i + 1)) buf[i + 3] = 1;
  return buf;
};

const deepArray = (depth: number) => `${"[".repeat(depth)}${"]".repeat(depth)}`;
const deepObject = (depth: number) => `${'{"a":'.repeat(depth)}1${"}".repeat(depth)}`;

/** Values built to break naive handling: String()/Number() throw on some, recursion on others. */
const nastyValue: fc.Arbitrary<string> = fc.oneof(
  fc.constantFrom(
    '{"toString":1}',
    '{"toString":1,"valueOf":1}',
    '{"valueOf":{}}',
    '{"__proto__":{"code":7}}',
    '{"constructor":{"prototype":1}}',
    "null",
    "-0",
    "1e308",
    "-1e308",
    "9007199254740993",
    "1.5",
    '"\\ud800"',
    '"\\u0000"',
    "[]",
    "true",
  ),
  fc.integer({ min: 1000, max: 30_000 }).map(deepArray),
  fc.integer({ min: 1000, max: 10_000 }).map(deepObject),
  fc.jsonValue({ maxDepth: 3 }).map((v) => JSON.stringify(v) ?? "null"),
);

const TYPES = [
  "pong",
  "hello",
  "ok",
  "exit",
  "output",
  "error",
  "read_begin",
  "data",
  "read_end",
  "started",
  "busy",
  "exec",
  "",
  "x".repeat(65),
];
const FIELDS = [
  "code",
  "message",
  "stream",
  "size",
  "error",
  "version",
  "agent",
  "python",
  "pid",
  "timed_out",
  "truncated",
  "cancelled",
];

/** An id as the fake agent picks it: one the host has in flight, or something hostile. */
type IdChoice = { known: number } | { raw: string } | { absent: true };
const idChoice: fc.Arbitrary<IdChoice> = fc.oneof(
  { weight: 6, arbitrary: fc.nat().map((known) => ({ known })) },
  {
    weight: 3,
    arbitrary: fc
      .constantFrom(
        "0",
        "-1",
        "1.5",
        "9007199254740992",
        "9007199254740991",
        "1e300",
        "-1e300",
        '"5"',
        "null",
        "true",
        "[1]",
        '{"id":1}',
        "123456789",
      )
      .map((raw) => ({ raw })),
  },
  { weight: 1, arbitrary: fc.constant({ absent: true as const }) },
);

/** One piece of the hostile stream. Headers are JSON text, so ids and fields can be anything. */
type Piece =
  | { kind: "garbage"; bytes: Uint8Array }
  | {
      kind: "frame";
      type: string | null;
      id: IdChoice;
      fields: [string, string][];
      payload: Uint8Array;
      bigPayload: number;
    }
  | { kind: "raw_header"; header: Uint8Array; payload: Uint8Array }
  | { kind: "bad_lengths"; hl: number; pl: number; tail: Uint8Array }
  | { kind: "duplicate_last" };

const piece: fc.Arbitrary<Piece> = fc.oneof(
  {
    weight: 2,
    arbitrary: fc.record({
      kind: fc.constant("garbage" as const),
      bytes: fc.oneof(
        fc.uint8Array({ maxLength: 300 }),
        // Bytes drawn from the magic's own alphabet make partial and overlapping magics.
        fc
          .array(fc.constantFrom(0x50, 0x46, 0x01, 0x00, 0xff), { maxLength: 64 })
          .map((a) => new Uint8Array(a)),
      ),
    }),
  },
  {
    weight: 6,
    arbitrary: fc.record({
      kind: fc.constant("frame" as const),
      type: fc.oneof(
        { weight: 8, arbitrary: fc.constantFrom(...TYPES) },
        { weight: 1, arbitrary: fc.constant(null) },
        { weight: 1, arbitrary: fc.string({ maxLength: 10 }) },
      ),
      id: idChoice,
      fields: fc.array(fc.tuple(fc.constantFrom(...FIELDS), nastyValue), { maxLength: 3 }),
      payload: fc.oneof(
        fc.uint8Array({ maxLength: 200 }),
        // Invalid and truncated UTF-8.
        fc.constantFrom(
          new Uint8Array([0xff, 0xfe, 0xfd]),
          new Uint8Array([0xe2, 0x82]),
          new Uint8Array([0xed, 0xa0, 0x80]),
          new Uint8Array([0xc0, 0xaf]),
        ),
      ),
      bigPayload: fc.oneof(
        { weight: 20, arbitrary: fc.constant(0) },
        { weight: 1, arbitrary: fc.constantFrom(64 * 1024, MAX_PAYLOAD_BYTES) },
      ),
    }),
  },
  {
    weight: 1,
    arbitrary: fc.record({
      kind: fc.constant("raw_header" as const),
      header: fc.oneof(
        fc.uint8Array({ minLength: 2, maxLength: 100 }),
        fc.constantFrom(
          ...[
            "{not json",
            "[1,2]",
            '"str"',
            "{}",
            '{"type":5}',
            '{"type":"exit","id":1,}',
            "\u0000\u0000",
          ].map((s) => new Uint8Array(Buffer.from(s))),
        ),
      ),
      payload: fc.uint8Array({ maxLength: 50 }),
    }),
  },
  {
    weight: 1,
    arbitrary: fc.record({
      kind: fc.constant("bad_lengths" as const),
      hl: fc.oneof(
        fc.constantFrom(0, 1, MAX_HEADER_BYTES + 1, 0xffffffff, 0x50460100),
        fc.integer({ min: 0, max: 0xffffffff }),
      ),
      pl: fc.oneof(
        fc.constantFrom(0, MAX_PAYLOAD_BYTES + 1, 0xffffffff),
        fc.integer({ min: 0, max: 0xffffffff }),
      ),
      tail: fc.uint8Array({ maxLength: 40 }),
    }),
  },
  { weight: 1, arbitrary: fc.constant({ kind: "duplicate_last" as const }) },
);

function encodePiece(p: Piece, knownIds: readonly number[], previous: Buffer | null): Buffer {
  switch (p.kind) {
    case "garbage":
      return Buffer.from(p.bytes);
    case "raw_header":
      return rawFrame(Buffer.from(p.header), Buffer.from(p.payload));
    case "bad_lengths": {
      const pre = Buffer.alloc(PREAMBLE_BYTES);
      MAGIC.copy(pre);
      pre.writeUInt32BE(p.hl, 4);
      pre.writeUInt32BE(p.pl, 8);
      return Buffer.concat([pre, p.tail]);
    }
    case "duplicate_last":
      return previous ?? Buffer.alloc(0);
    case "frame": {
      const parts: string[] = [];
      if (p.type !== null) parts.push(`"type":${JSON.stringify(p.type)}`);
      if ("known" in p.id) {
        const id = knownIds.length > 0 ? knownIds[p.id.known % knownIds.length] : 1;
        parts.push(`"id":${id}`);
      } else if ("raw" in p.id) parts.push(`"id":${p.id.raw}`);
      for (const [k, v] of p.fields) parts.push(`${JSON.stringify(k)}:${v}`);
      let header = Buffer.from(`{${parts.join(",")}}`);
      if (header.length > MAX_HEADER_BYTES) header = header.subarray(0, MAX_HEADER_BYTES);
      const payload = p.bigPayload > 0 ? Buffer.alloc(p.bigPayload, 0x41) : Buffer.from(p.payload);
      return rawFrame(header, payload);
    }
  }
}

// ---------------------------------------------------------------------------------------
// The fake agent: an in-process duplex. What the host writes is decoded into `sent`; what
// the agent "sends" is delivered to the client's data handler synchronously, so a throw
// from the handler surfaces here (in a real daemon it would be an uncaught exception).

class FakeAgent {
  readonly stream: Duplex;
  readonly sent: Frame[] = [];
  private readonly hostFrames = new FrameDecoder((p) => {
    throw new Error(`the host wrote a bad frame: ${JSON.stringify(p)}`);
  });

  constructor() {
    this.stream = new Duplex({
      read() {},
      write: (chunk: Buffer, _enc, cb) => {
        this.sent.push(...this.hostFrames.push(chunk));
        cb();
      },
    });
  }

  feed(bytes: Buffer): void {
    this.stream.emit("data", bytes);
  }

  send(header: FrameHeader, payload?: Buffer): void {
    this.feed(encodeFrame(header, payload));
  }

  /** Ids of requests the host sent, in order. */
  get ids(): number[] {
    return this.sent.map((f) => f.header.id).filter((id): id is number => typeof id === "number");
  }

  sentOfType(type: string): Frame[] {
    return this.sent.filter((f) => f.header.type === type);
  }
}

function decoderOf(client: AgentClient): FrameDecoder {
  return (client as unknown as { conn: { decoder: FrameDecoder } }).conn.decoder;
}

/** Yield to the event loop (stream callbacks, promise chains) without a timer. */
const turn = () => new Promise<void>((r) => setImmediate(r));

async function settleWithin<T>(what: string, p: Promise<T>, ms = 5_000): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const guard = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`${what} did not settle after the channel closed`)),
      ms,
    );
  });
  try {
    return await Promise.race([p, guard]);
  } finally {
    clearTimeout(timer);
  }
}

function assertExecEvents(events: ExecEvent[]): void {
  const exits = events.filter((e) => e.type === "exit");
  assert.equal(exits.length, 1, "an exec that completes has exactly one exit event");
  assert.equal(events.at(-1)?.type, "exit", "the exit event is the last");
  for (const e of events) {
    if (e.type === "exit") {
      assert.ok(Number.isSafeInteger(e.code));
      if (e.error) {
        assert.equal(typeof e.error.name, "string");
        assert.equal(typeof e.error.value, "string");
        assert.equal(typeof e.error.traceback, "string");
      }
    } else {
      assert.ok(e.type === "stdout" || e.type === "stderr");
      assert.equal(typeof e.data, "string");
    }
  }
}

type Outcome = { ok: true } | { ok: false; err: unknown };
const outcome = (p: Promise<unknown>): Promise<Outcome> =>
  p.then(
    () => ({ ok: true }) as const,
    (err: unknown) => ({ ok: false, err }) as const,
  );

/** Requests of every kind in flight on `client`; each resolves to its outcome. */
function startRequests(client: AgentClient, execs: number): Promise<Outcome>[] {
  const out: Promise<Outcome>[] = [];
  out.push(outcome(client.ping(60_000)));
  out.push(outcome(client.hello(60_000)));
  out.push(
    outcome(
      client.restore(
        { entropy: Buffer.alloc(32), timeNs: 1n, hostname: "h", machineId: "0".repeat(32) },
        60_000,
      ),
    ),
  );
  for (let i = 0; i < execs; i++) {
    out.push(
      outcome(
        (async () => {
          const events: ExecEvent[] = [];
          for await (const e of client.exec(`print(${i})`)) events.push(e);
          assertExecEvents(events);
        })(),
      ),
    );
  }
  out.push(
    outcome(
      (async () => {
        const { stream } = await client.readFile("/root/f", 60_000);
        for await (const chunk of stream) assert.ok(Buffer.isBuffer(chunk));
      })(),
    ),
  );
  out.push(
    outcome(
      client.writeFile(
        "/root/g",
        (async function* () {
          yield Buffer.from("abc");
          yield new Uint8Array([1, 2, 3]);
        })(),
        { maxBytes: 1 << 20, timeoutMs: 60_000 },
      ),
    ),
  );
  return out;
}

/** Proper answers to every request the host has sent so far (the good frames). */
function answerAll(agent: FakeAgent, from: number): number {
  const frames = agent.sent.slice(from);
  for (const { header: h } of frames) {
    const id = h.id as number;
    switch (h.type) {
      case "hello":
        agent.send({ type: "hello", id, version: 1, agent: "fake/1", python: "3", pid: 9 });
        break;
      case "ping":
        agent.send({ type: "pong", id });
        break;
      case "restore":
      case "cancel":
      case "write_begin":
      case "write_abort":
        agent.send({ type: "ok", id });
        break;
      case "write_end":
        agent.send({ type: "ok", id, size: h.size as number });
        break;
      case "exec":
        agent.send({ type: "output", id, stream: "stdout" }, Buffer.from(`out ${id}\n`));
        agent.send({ type: "exit", id, code: 0 });
        break;
      case "read":
        agent.send({ type: "read_begin", id, size: 3 });
        agent.send({ type: "data", id }, Buffer.from("abc"));
        agent.send({ type: "read_end", id, size: 3 });
        break;
    }
  }
  return from + frames.length;
}

// ---------------------------------------------------------------------------------------

describe("agent protocol fuzzing (host side)", () => {
  it("decoder: arbitrary bytes in arbitrary chunks never throw and never over-buffer", () => {
    fc.assert(
      fc.property(
        fc.array(fc.oneof(piece, piece), { maxLength: 30 }),
        fc.array(fc.nat(), { maxLength: 40 }),
        (pieces, cuts) => {
          let prev: Buffer | null = null;
          const bytes = Buffer.concat(
            pieces.map((p) => {
              const b = encodePiece(p, [1, 2, 3], prev);
              prev = b;
              return b;
            }),
          );
          const d = new FrameDecoder();
          for (const chunk of split(bytes, cuts)) {
            for (const f of d.push(chunk)) {
              assert.equal(typeof f.header.type, "string");
              assert.ok(f.payload.length <= MAX_PAYLOAD_BYTES);
              const id = f.header.id;
              assert.ok(id === undefined || id === null || (Number.isSafeInteger(id) && id >= 1));
            }
            assert.ok(d.buffered <= MAX_FRAME, `buffered ${d.buffered} bytes`);
          }
        },
      ),
      params(800),
    );
  });

  it("decoder: the frames decoded do not depend on how the stream is chunked", () => {
    fc.assert(
      fc.property(
        fc.array(piece, { maxLength: 20 }),
        fc.array(fc.nat(), { maxLength: 60 }),
        (pieces, cuts) => {
          let prev: Buffer | null = null;
          const bytes = Buffer.concat(
            pieces.map((p) => {
              const b = encodePiece(p, [7, 8], prev);
              prev = b;
              return b;
            }),
          );
          const whole = new FrameDecoder().push(Buffer.from(bytes));
          const d = new FrameDecoder();
          const chunked = split(bytes, cuts).flatMap((c) => d.push(c));
          // (Headers may nest too deeply for a recursive deepEqual: compare a digest.)
          const digest = (f: Frame) =>
            `${f.header.type}|${f.header.id}|${Object.keys(f.header).join()}|${f.payload.toString("hex")}`;
          assert.deepEqual(chunked.map(digest), whole.map(digest));
          const w = new FrameDecoder();
          w.push(bytes);
          assert.equal(d.buffered, w.buffered);
        },
      ),
      params(400),
    );
  });

  it("decoder: valid frames round-trip whatever the split", () => {
    const header = fc.record({
      type: fc.string({ minLength: 1, maxLength: 64 }),
      id: fc.option(fc.integer({ min: 1, max: Number.MAX_SAFE_INTEGER }), { nil: undefined }),
      x: fc.jsonValue({ maxDepth: 4 }),
    });
    fc.assert(
      fc.property(
        fc.array(fc.tuple(header, fc.uint8Array({ maxLength: 3000 })), {
          minLength: 1,
          maxLength: 10,
        }),
        fc.array(fc.nat(), { maxLength: 40 }),
        (frames, cuts) => {
          const clean = frames.map(([h, p]) => {
            const obj: FrameHeader = JSON.parse(JSON.stringify(h));
            return { header: obj, payload: Buffer.from(p) };
          });
          const bytes = Buffer.concat(clean.map((f) => encodeFrame(f.header, f.payload)));
          const problems: unknown[] = [];
          const d = new FrameDecoder((p) => problems.push(p));
          const out = split(bytes, cuts).flatMap((c) => d.push(c));
          assert.deepEqual(problems, []);
          assert.equal(out.length, clean.length);
          out.forEach((f, i) => {
            assert.deepEqual(f.header, clean[i]?.header);
            assert.ok(f.payload.equals(clean[i]?.payload ?? Buffer.alloc(0)));
          });
          assert.equal(d.buffered, 0);
        },
      ),
      params(300),
    );
  });

  it("decoder: a good frame after garbage or bad frames is understood (resync at the next magic)", () => {
    const junk = fc.oneof(
      fc.uint8Array({ maxLength: 500 }).map(noMagic),
      // Complete but undecodable frames: skipped, the stream continues with the next frame.
      fc.constantFrom(
        rawFrame(Buffer.from("{not json"), Buffer.alloc(3)),
        rawFrame(Buffer.from("[1]"), Buffer.alloc(0)),
        rawFrame(Buffer.from('{"type":"exit","id":-1}'), Buffer.alloc(0)),
        rawFrame(Buffer.from('{"type":"exit","id":1.5}'), Buffer.alloc(0)),
        rawFrame(Buffer.from('{"type":"exit","id":9007199254740992}'), Buffer.alloc(0)),
        rawFrame(Buffer.from(`{"code":${deepArray(30_000)}}`), Buffer.alloc(0)),
        rawFrame(Buffer.from(`{"type":"exit","id":0,"x":${deepObject(10_000)}}`), Buffer.alloc(0)),
        rawFrame(Buffer.from([0xff, 0xfe, 0x7b, 0x7d]), Buffer.alloc(0)),
      ),
      // Out-of-bounds lengths (the bytes after them are garbage, scanned for the magic).
      fc
        .tuple(
          fc.constantFrom(0, 1, MAX_HEADER_BYTES + 1, 0xffffffff),
          fc.integer({ min: 0, max: 0xffffffff }),
        )
        .map(([hl, pl]) => rawFrame(Buffer.alloc(0), Buffer.alloc(0), { hl, pl })),
    );
    fc.assert(
      fc.property(
        fc.array(junk, { maxLength: 8 }),
        fc.integer({ min: 1, max: Number.MAX_SAFE_INTEGER }),
        fc.array(fc.nat(), { maxLength: 20 }),
        (junks, id, cuts) => {
          const good = encodeFrame({ type: "pong", id }, Buffer.from("ok"));
          const d = new FrameDecoder();
          const out = split(Buffer.concat([...junks, good]), cuts).flatMap((c) => d.push(c));
          assert.equal(out.length, 1, "exactly the good frame");
          assert.deepEqual(out[0]?.header, { type: "pong", id });
          assert.equal(out[0]?.payload.toString(), "ok");
          assert.equal(d.buffered, 0);
        },
      ),
      params(1000),
    );
  });

  it("client: hostile streams never throw, never over-buffer, and every request ends", async () => {
    let runs = 0;
    await fc.assert(
      fc.asyncProperty(
        fc.array(piece, { maxLength: 25 }),
        fc.array(fc.nat(), { maxLength: 30 }),
        fc.boolean(),
        fc.constantFrom("answer", "close", "end-stream", "error-stream"),
        fc.integer({ min: 0, max: MAX_AGENT_EXECS + 3 }),
        async (pieces, cuts, handshake, finale, execs) => {
          runs++;
          const agent = new FakeAgent();
          const logged: unknown[] = [];
          // A logger that serialises what it is given, as a real one does.
          const client = new AgentClient(agent.stream, (msg, extra) =>
            logged.push(JSON.stringify({ msg, extra })),
          );
          if (handshake) client.assumeHandshake();
          const requests = startRequests(client, execs);
          await turn();
          let prev: Buffer | null = null;
          for (const p of pieces) {
            const bytes = encodePiece(p, agent.ids, prev);
            prev = bytes;
            for (const chunk of split(bytes, cuts)) {
              agent.feed(chunk); // throws here if the client's data handler would
              assert.ok(decoderOf(client).buffered <= MAX_FRAME);
            }
            await turn();
          }
          let answered = 0;
          if (finale === "answer") {
            // Good frames after the hostile ones. They are understood unless the hostile
            // stream left a valid-looking frame incomplete (which swallows them, as the
            // protocol says); either way the close below ends everything.
            for (let i = 0; i < 5; i++) {
              answered = answerAll(agent, answered);
              await turn();
            }
            client.close("test over");
          } else if (finale === "close") {
            client.close("test over");
          } else if (finale === "end-stream") {
            agent.stream.emit("close");
          } else {
            agent.stream.emit("error", new Error("EPIPE"));
          }
          const outcomes = await settleWithin("a request", Promise.all(requests));
          for (const o of outcomes) {
            if (!o.ok && o.err instanceof assert.AssertionError) throw o.err;
            if (!o.ok) assert.ok(o.err instanceof Error, `rejected with ${String(o.err)}`);
          }
          assert.ok(client.closed);
          for (const line of logged) assert.equal(typeof line, "string");
        },
      ),
      params(1000),
    );
    assert.ok(runs > 0);
  });

  it("client: garbage (no magic) before good replies: every request completes normally", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.uint8Array({ maxLength: 200 }).map(noMagic), { maxLength: 5 }),
        fc.array(fc.nat(), { maxLength: 20 }),
        async (junks, cuts) => {
          const agent = new FakeAgent();
          const client = new AgentClient(agent.stream);
          const requests = startRequests(client, MAX_AGENT_EXECS + 2);
          await turn();
          let answered = 0;
          for (let round = 0; round < 6; round++) {
            const before = answered;
            for (const j of junks) for (const c of split(j, cuts)) agent.feed(c);
            answered = answerAll(agent, answered);
            await turn();
            if (answered === before && round > 0) break;
          }
          const outcomes = await settleWithin("a request", Promise.all(requests));
          assert.deepEqual(
            outcomes.map((o) => (o.ok ? "ok" : String((o as { err: unknown }).err))),
            outcomes.map(() => "ok"),
          );
          client.close();
        },
      ),
      params(300),
    );
  });

  it("client: replies to nothing, duplicated exits and output for unknown execs are ignored", async () => {
    const agent = new FakeAgent();
    const client = new AgentClient(agent.stream);
    const events: ExecEvent[] = [];
    const done = (async () => {
      for await (const e of client.exec("print(1)")) events.push(e);
    })();
    await turn();
    const [id] = agent.ids;
    assert.ok(id);
    agent.send({ type: "pong", id: id + 1000 });
    agent.send({ type: "output", id: id + 1, stream: "stdout" }, Buffer.from("not mine"));
    agent.send({ type: "error", id: null, code: "bad_frame", message: "x" });
    agent.send({ type: "output", id, stream: "stderr" }, Buffer.from([0x61, 0xff, 0x62]));
    agent.send({ type: "exit", id, code: 3 });
    agent.send({ type: "exit", id, code: 4 });
    agent.send({ type: "output", id, stream: "stdout" }, Buffer.from("late"));
    await done;
    assert.deepEqual(events, [
      { type: "stderr", data: "a\ufffdb" },
      { type: "exit", code: 3 },
    ]);
    client.close();
  });

  it("client: hostile field values are clipped, never thrown (toString traps, deep nesting)", async () => {
    const agent = new FakeAgent();
    const client = new AgentClient(agent.stream, (m, e) => JSON.stringify({ m, e }));
    const run = async () => {
      const events: ExecEvent[] = [];
      for await (const e of client.exec("1")) events.push(e);
      return events;
    };
    const a = run();
    const b = outcome(run());
    const hello = client.hello(60_000);
    await turn();
    const [ida, idb, idh] = agent.ids as [number, number, number];
    const trap = '{"toString":1,"valueOf":1}';
    agent.feed(
      rawFrame(
        Buffer.from(
          `{"type":"exit","id":${ida},"code":${trap},"error":{"name":${trap},"value":${deepArray(15_000)},"traceback":${deepObject(3000)}}}`,
        ),
        Buffer.alloc(0),
      ),
    );
    agent.feed(
      rawFrame(
        Buffer.from(`{"type":"error","id":${idb},"code":${deepArray(30_000)},"message":${trap}}`),
        Buffer.alloc(0),
      ),
    );
    agent.feed(
      rawFrame(
        Buffer.from(
          `{"type":"hello","id":${idh},"version":1,"agent":${trap},"python":${deepArray(100)},"pid":${trap}}`,
        ),
        Buffer.alloc(0),
      ),
    );
    agent.feed(rawFrame(Buffer.from(`{"type":"error","id":null,"code":${trap}}`), Buffer.alloc(0)));
    assert.deepEqual(await a, [
      { type: "exit", code: -1, error: { name: "", value: "", traceback: "" } },
    ]);
    const ob = await b;
    assert.ok(!ob.ok && ob.err instanceof AgentError && ob.err.code === "error");
    assert.deepEqual(await hello, { version: 1, agent: "", python: "", pid: 0 });
    client.close();
  });

  it("client: execs wait in a bounded host FIFO, run in call order, and at most a few are in the guest", async () => {
    const agent = new FakeAgent();
    const client = new AgentClient(agent.stream);
    const N = 100;
    const results: string[] = new Array(N).fill("");
    const runs = Array.from({ length: N }, (_, i) =>
      (async () => {
        for await (const e of client.exec(`job ${i}`))
          if (e.type === "stdout") results[i] += e.data;
      })(),
    );
    const order: string[] = [];
    let answered = 0;
    let maxOutstanding = 0;
    while (order.length < N) {
      await turn();
      const execs = agent.sentOfType("exec");
      maxOutstanding = Math.max(maxOutstanding, execs.length - answered);
      assert.ok(execs.length - answered <= MAX_AGENT_EXECS, "outstanding execs in the agent");
      const next = execs[answered];
      assert.ok(next, "the next exec was sent once a slot freed");
      const code = next.payload.toString();
      order.push(code);
      agent.send({ type: "output", id: next.header.id, stream: "stdout" }, Buffer.from(code));
      agent.send({ type: "exit", id: next.header.id, code: 0 });
      answered++;
    }
    await Promise.all(runs);
    assert.equal(maxOutstanding, MAX_AGENT_EXECS);
    assert.deepEqual(
      order,
      results.map((_, i) => `job ${i}`),
    );
    assert.deepEqual(
      results,
      results.map((_, i) => `job ${i}`),
    );

    // Bounded: past MAX_QUEUED_EXECS waiting, exec() refuses at once with a 429-class error.
    const held: AsyncIterable<ExecEvent>[] = [];
    for (let i = 0; i < MAX_AGENT_EXECS + MAX_QUEUED_EXECS; i++) held.push(client.exec("x"));
    assert.throws(() => client.exec("one too many"), ExecQueueFullError);
    const sentBefore = agent.sentOfType("exec").length;
    // An agent restart fails everything in flight, waiting or sent.
    client.assumeHandshake();
    const ends = held.map((h) =>
      outcome(
        (async () => {
          for await (const _ of h) {
          }
        })(),
      ),
    );
    await turn();
    agent.send({ type: "started", id: null, version: 1 });
    const outcomes = await settleWithin("held execs", Promise.all(ends));
    assert.ok(
      outcomes.every(
        (o) => !o.ok && o.err instanceof AgentError && o.err.code === "agent_restarted",
      ),
    );
    assert.equal(
      agent.sentOfType("exec").length,
      sentBefore,
      "waiting execs never reached the agent",
    );

    // Abandoning a running exec cancels it; its slot frees only when the agent ends it.
    const slots = Array.from({ length: MAX_AGENT_EXECS }, (_, i) => client.exec(`slot ${i}`));
    const waiting = client.exec("waits");
    await turn();
    const firstId = agent.sentOfType("exec").at(-MAX_AGENT_EXECS)?.header.id as number;
    assert.equal(
      agent.sentOfType("exec").at(-1)?.payload.toString(),
      `slot ${MAX_AGENT_EXECS - 1}`,
    );
    const consume = (async () => {
      for await (const e of slots[0] as AsyncIterable<ExecEvent>) if (e.type === "stdout") break;
    })();
    agent.send({ type: "output", id: firstId, stream: "stdout" }, Buffer.from("x"));
    await consume;
    await turn();
    const cancel = agent.sentOfType("cancel").at(-1);
    assert.equal(cancel?.header.target, firstId);
    assert.notEqual(agent.sentOfType("exec").at(-1)?.payload.toString(), "waits");
    agent.send({ type: "ok", id: cancel?.header.id as number });
    agent.send({ type: "exit", id: firstId, code: 130, cancelled: true });
    await turn();
    assert.equal(agent.sentOfType("exec").at(-1)?.payload.toString(), "waits");
    void waiting;
    client.close();
  });

  it("client: a hostile agent cannot make the host buffer unbounded output or downloads", async () => {
    const agent = new FakeAgent();
    const client = new AgentClient(agent.stream);
    const iter = client.exec("flood")[Symbol.asyncIterator]();
    await turn();
    const [id] = agent.ids as [number];
    const chunk = Buffer.alloc(MAX_PAYLOAD_BYTES, 0x61);
    for (let i = 0; i < 40; i++) agent.send({ type: "output", id, stream: "stdout" }, chunk); // 40 MiB
    agent.send({ type: "exit", id, code: 0 });
    let bytes = 0;
    let last: ExecEvent | undefined;
    for (let r = await iter.next(); !r.done; r = await iter.next()) {
      last = r.value;
      if (r.value.type === "stdout") bytes += r.value.data.length;
    }
    assert.ok(bytes <= 17 * MAX_PAYLOAD_BYTES, `${bytes} bytes of output kept`);
    assert.deepEqual(last, { type: "exit", code: 0, truncated: true });

    // A download that ignores its window: the host stops it instead of buffering it all.
    const opened = client.readFile("/f", 60_000);
    await turn();
    const rid = agent.ids.at(-1) as number;
    agent.send({ type: "read_begin", id: rid, size: 1 << 30 });
    const { stream } = await opened;
    const piece256k = Buffer.alloc(256 * 1024);
    for (let i = 0; i < 40; i++) agent.send({ type: "data", id: rid }, piece256k); // 10 MiB, no acks
    assert.ok(stream.readableLength <= 5 * 1024 * 1024, `${stream.readableLength} bytes held`);
    await assert.rejects(
      (async () => {
        for await (const _ of stream) {
        }
      })(),
      (err: unknown) => err instanceof AgentError && err.code === "bad_reply",
    );
    assert.ok(agent.sent.some((f) => f.header.type === "read_abort" && f.header.id === rid));
    assert.ok(decoderOf(client).buffered <= MAX_FRAME);

    // read_end before read_begin: an error, not a download that never opens.
    const early = client.readFile("/g", 60_000);
    await turn();
    agent.send({ type: "read_end", id: agent.ids.at(-1) as number, size: 0 });
    await assert.rejects(early, (err: unknown) => err instanceof AgentError);
    client.close();
  });
});
