import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { TooManyStreamsError } from "./errors.js";
import { type StreamBound, StreamBudget, type StreamLimits } from "./stream-budget.js";

const MiB = 2 ** 20;
const LIMITS: StreamLimits = {
  streamMaxBufferedBytes: 4 * MiB,
  tenantMaxStreams: 3,
  tenantMaxBufferedBytes: 10 * MiB,
  maxStreams: 5,
  maxBufferedBytes: 16 * MiB,
};
const FRAME = 64 * 1024;

function budget(limits: Partial<StreamLimits> = {}) {
  const events = { refused: [] as string[], truncated: [] as StreamBound[], dropped: 0 };
  const b = new StreamBudget(
    { ...LIMITS, ...limits },
    {
      onRefused: (bound) => events.refused.push(bound),
      onTruncated: (bound) => events.truncated.push(bound),
      onDropped: (bytes) => {
        events.dropped += bytes;
      },
    },
  );
  return { b, events };
}

/** Admit frames until one is refused; returns the bytes kept. */
function fill(lease: { admit(n: number): boolean }, max = 1000): number {
  let kept = 0;
  for (let i = 0; i < max && lease.admit(FRAME); i++) kept += FRAME;
  return kept;
}

function refusal(fn: () => unknown, pattern: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof TooManyStreamsError, String(err));
    assert.equal(err.code, "too_many_streams");
    assert.match(err.message, pattern);
    return true;
  });
}

describe("stream budget", () => {
  it("counts streams per tenant and refuses past the tenant's bound with what to do", () => {
    const { b, events } = budget();
    const leases = [b.open("a", "exec"), b.open("a", "download"), b.open("a", "exec")];
    refusal(() => b.open("a", "exec"), /3 streams open.*limit per key is 3.*read or close/);
    assert.deepEqual(events.refused, ["tenant"]);
    // Another tenant is not affected.
    const other = b.open("b", "exec");
    assert.deepEqual(b.usage("a"), { streams: 3, bytes: 0 });
    assert.deepEqual(b.usage(), { streams: 4, bytes: 0 });
    leases[0]?.close();
    leases[0]?.close(); // idempotent
    b.open("a", "exec");
    other.close();
    assert.equal(b.usage().streams, 3);
  });

  it("refuses past the daemon's stream count", () => {
    const { b, events } = budget();
    for (const t of ["a", "a", "b", "b", "c"]) b.open(t, "exec");
    refusal(() => b.open("d", "exec"), /daemon already has 5 streams open.*PODFLARE_MAX_STREAMS/);
    assert.deepEqual(events.refused, ["daemon"]);
  });

  it("drops an exec stream's output past its own bound, and all of its later output", () => {
    const { b, events } = budget();
    const lease = b.open("a", "exec");
    assert.equal(fill(lease), 4 * MiB);
    assert.equal(lease.dropped, "stream");
    assert.deepEqual(events.truncated, ["stream"]);
    // The reader catches up, but the stream stays truncated: no hole in the middle.
    lease.taken(4 * MiB);
    assert.equal(lease.admit(FRAME), false);
    assert.equal(events.dropped, 2 * FRAME);
    assert.equal(b.usage("a").bytes, 0);
    lease.close();
    assert.deepEqual(b.usage(), { streams: 0, bytes: 0 });
  });

  it("a reader that keeps up never loses output", () => {
    const { b } = budget();
    const lease = b.open("a", "exec");
    for (let i = 0; i < 16 * 16; i++) {
      assert.equal(lease.admit(FRAME), true, `frame ${i}`);
      if (i % 4 === 3) lease.taken(4 * FRAME); // the reader lags by up to 4 frames
    }
    assert.equal(lease.dropped, null);
    assert.equal(lease.peakBytes, 4 * FRAME);
    lease.close();
  });

  it("counts what the transport holds, read live", () => {
    const { b } = budget();
    const lease = b.open("a", "exec");
    let socket = 0;
    lease.heldElsewhere = () => socket;
    assert.equal(lease.admit(FRAME), true);
    lease.taken(FRAME);
    socket = 3 * MiB; // handed over, not yet sent
    assert.equal(lease.admit(FRAME), true);
    assert.equal(b.usage("a").bytes, 3 * MiB + FRAME);
    assert.equal(fill(lease), 15 * FRAME);
    assert.equal(lease.dropped, "stream");
    socket = 0;
    lease.taken(16 * FRAME);
    assert.equal(b.usage("a").bytes, 0);
    // A throwing or nonsense probe counts as nothing rather than breaking the stream.
    const other = b.open("a", "exec");
    other.heldElsewhere = () => {
      throw new Error("socket gone");
    };
    assert.equal(other.admit(FRAME), true);
    other.heldElsewhere = () => Number.NaN;
    assert.equal(other.admit(FRAME), true);
    assert.equal(other.bytes, 2 * FRAME);
  });

  it("bounds a tenant's bytes over all its streams, then refuses it new ones", () => {
    const { b, events } = budget({ tenantMaxStreams: 5, maxStreams: 10 });
    const [s1, s2, s3] = [b.open("a", "exec"), b.open("a", "exec"), b.open("a", "exec")];
    assert.equal(fill(s1), 4 * MiB);
    assert.equal(fill(s2), 4 * MiB);
    assert.equal(fill(s3), 2 * MiB); // 10 MiB for the tenant
    assert.deepEqual(events.truncated, ["stream", "stream", "tenant"]);
    assert.equal(b.usage("a").bytes, 10 * MiB);
    s1.close();
    // At its bytes bound a tenant gets 429 for a new stream even below its stream count.
    const s4 = fill(b.open("a", "exec"));
    assert.equal(s4, 4 * MiB);
    refusal(() => b.open("a", "exec"), /already hold 10\.0 MiB.*limit per key is 10\.0 MiB/);
    s2.close();
    // Another tenant still gets its own share.
    const other = b.open("b", "exec");
    assert.equal(fill(other), 4 * MiB);
    s3.close();
    other.close();
    assert.deepEqual(b.usage("a"), { streams: 1, bytes: 4 * MiB });
  });

  it("bounds the daemon's bytes over all tenants", () => {
    const { b, events } = budget({ maxBufferedBytes: 6 * MiB });
    const a = b.open("a", "exec");
    const c = b.open("c", "exec");
    assert.equal(fill(a), 4 * MiB);
    assert.equal(fill(c), 2 * MiB);
    assert.equal(c.dropped, "daemon");
    refusal(() => b.open("d", "exec"), /daemon's open streams already hold 6\.0 MiB/);
    assert.deepEqual(events.truncated, ["stream", "daemon"]);
    assert.deepEqual(events.refused, ["daemon"]);
  });

  it("charges a download its reservation, refused when it does not fit", () => {
    const { b } = budget();
    const d1 = b.open("a", "download", 4 * MiB);
    const d2 = b.open("a", "download", 4 * MiB);
    assert.equal(b.usage("a").bytes, 8 * MiB);
    refusal(() => b.open("a", "download", 4 * MiB), /already hold 8\.0 MiB/);
    // An exec still opens (it charges only what it holds) but gets at most what is left.
    const e = b.open("a", "exec");
    assert.equal(fill(e), 2 * MiB);
    d1.close();
    d2.close();
    e.close();
    assert.deepEqual(b.usage(), { streams: 0, bytes: 0 });
  });

  it("the anonymous caller is a tenant of its own", () => {
    const { b } = budget();
    b.open(null, "exec");
    assert.deepEqual(b.usage(null), { streams: 1, bytes: 0 });
    assert.deepEqual(b.usage("a"), { streams: 0, bytes: 0 });
  });

  it("a closed lease admits nothing and holds nothing", () => {
    const { b, events } = budget();
    const lease = b.open("a", "exec");
    assert.equal(lease.admit(FRAME), true);
    lease.close();
    assert.equal(lease.admit(FRAME), false);
    lease.taken(FRAME);
    assert.deepEqual(b.usage(), { streams: 0, bytes: 0 });
    assert.equal(events.dropped, 0);
  });
});
