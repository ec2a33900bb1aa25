import assert from "node:assert/strict";
import { describe, it } from "node:test";
import {
  type DecodeProblem,
  encodeFrame,
  FrameDecoder,
  MAGIC,
  MAX_HEADER_BYTES,
  MAX_PAYLOAD_BYTES,
} from "./frames.js";

function decoder() {
  const problems: DecodeProblem[] = [];
  return { d: new FrameDecoder((p) => problems.push(p)), problems };
}

describe("guest frames", () => {
  it("round-trips header and payload, also when split byte by byte", () => {
    const bytes = Buffer.concat([
      encodeFrame({ type: "exec", id: 7 }, Buffer.from("print(1)")),
      encodeFrame({ type: "ping", id: 8 }),
    ]);
    const { d, problems } = decoder();
    const frames = [];
    for (const b of bytes) frames.push(...d.push(Buffer.from([b])));
    assert.equal(frames.length, 2);
    assert.deepEqual(frames[0]?.header, { type: "exec", id: 7 });
    assert.equal(frames[0]?.payload.toString(), "print(1)");
    assert.deepEqual(frames[1]?.header, { type: "ping", id: 8 });
    assert.equal(problems.length, 0);
    assert.equal(d.buffered, 0);
  });

  it("resynchronises after garbage and still decodes the next frame", () => {
    const { d, problems } = decoder();
    const frames = d.push(
      Buffer.concat([Buffer.from("garbage PF junk"), encodeFrame({ type: "pong", id: 1 })]),
    );
    assert.equal(frames.length, 1);
    assert.equal(frames[0]?.header.type, "pong");
    assert.ok(problems.some((p) => p.kind === "resync"));
  });

  it("rejects out-of-bounds lengths without buffering them", () => {
    const { d, problems } = decoder();
    const bad = Buffer.alloc(12);
    MAGIC.copy(bad);
    bad.writeUInt32BE(MAX_HEADER_BYTES + 1, 4);
    const frames = d.push(Buffer.concat([bad, encodeFrame({ type: "pong", id: 2 })]));
    assert.deepEqual(
      frames.map((f) => f.header.id),
      [2],
    );
    assert.ok(problems.some((p) => p.kind === "resync" && /out of bounds/.test(p.reason)));

    const huge = Buffer.alloc(12);
    MAGIC.copy(huge);
    huge.writeUInt32BE(10, 4);
    huge.writeUInt32BE(MAX_PAYLOAD_BYTES + 1, 8);
    assert.deepEqual(d.push(huge), []);
    assert.ok(d.buffered < 12, "an oversized frame is not waited for");
  });

  it("reports undecodable headers and continues", () => {
    const { d, problems } = decoder();
    const raw = (header: string) => {
      const h = Buffer.from(header);
      const pre = Buffer.alloc(12);
      MAGIC.copy(pre);
      pre.writeUInt32BE(h.length, 4);
      return Buffer.concat([pre, h]);
    };
    const frames = d.push(
      Buffer.concat([
        raw("{not json"),
        raw("[1,2]"),
        raw('{"id":3}'),
        raw('{"type":"x","id":-4}'),
        encodeFrame({ type: "ok", id: 5 }),
      ]),
    );
    assert.deepEqual(
      frames.map((f) => f.header.id),
      [5],
    );
    assert.deepEqual(
      problems.map((p) => p.kind),
      ["bad_header", "bad_header", "bad_header", "bad_header"],
    );
  });

  it("waits for a truncated frame and never holds more than one frame", () => {
    const { d } = decoder();
    const whole = encodeFrame({ type: "data", id: 1 }, Buffer.alloc(1000, 1));
    assert.deepEqual(d.push(whole.subarray(0, 500)), []);
    assert.equal(d.buffered, 500);
    assert.equal(d.push(whole.subarray(500)).length, 1);
  });

  it("refuses to encode oversized frames", () => {
    assert.throws(
      () => encodeFrame({ type: "x" }, Buffer.alloc(MAX_PAYLOAD_BYTES + 1)),
      RangeError,
    );
    assert.throws(() => encodeFrame({ type: "x", pad: "a".repeat(MAX_HEADER_BYTES) }), RangeError);
  });
});

describe("guest frames: reassembly cost", () => {
  it("parses a maximal frame sent in 16-byte pieces in linear time", () => {
    const payload = Buffer.alloc(MAX_PAYLOAD_BYTES);
    for (let i = 0; i < payload.length; i++) payload[i] = i % 251;
    const bytes = encodeFrame({ type: "data", id: 1 }, payload);
    const { d, problems } = decoder();
    const frames = [];
    const t0 = performance.now();
    for (let off = 0; off < bytes.length; off += 16) {
      frames.push(...d.push(bytes.subarray(off, off + 16)));
      assert.ok(d.buffered <= bytes.length);
    }
    const ms = performance.now() - t0;
    console.log(
      `1 MiB frame in 16-byte pieces (${Math.ceil(bytes.length / 16)} pushes): ${ms.toFixed(1)} ms`,
    );
    assert.equal(frames.length, 1);
    assert.ok(frames[0]?.payload.equals(payload));
    assert.deepEqual(problems, []);
    assert.equal(d.buffered, 0);
    // Quadratic reassembly took about 21 s here; linear takes a few tens of ms.
    assert.ok(ms < 1000, `took ${ms} ms`);
  });

  it("holds no reference to a large chunk once its frames are decoded", () => {
    const { d } = decoder();
    const big = Buffer.concat([encodeFrame({ type: "a", id: 1 }, Buffer.alloc(100_000)), MAGIC]);
    assert.equal(d.push(big).length, 1);
    assert.equal(d.buffered, MAGIC.length);
    // The tail is a copy: mutating the chunk does not change what the decoder holds.
    big.fill(0);
    const frames = d.push(encodeFrame({ type: "b", id: 2 }).subarray(MAGIC.length));
    assert.deepEqual(
      frames.map((f) => f.header.type),
      ["b"],
    );
  });
});
