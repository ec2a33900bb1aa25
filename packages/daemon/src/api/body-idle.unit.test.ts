import assert from "node:assert/strict";
import { PassThrough, Writable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { describe, it } from "node:test";
import { BodyIdleGuard } from "./body-idle.js";

describe("BodyIdleGuard", () => {
  it("fires when its reader waits and no byte comes", async () => {
    const source = new PassThrough();
    const fired = new Promise<number>((resolve) => {
      const t0 = Date.now();
      const guard = new BodyIdleGuard(100, () => resolve(Date.now() - t0));
      source.pipe(guard).resume();
      source.write("a");
    });
    const ms = await fired;
    assert.ok(ms >= 90, `fired after ${ms} ms`);
    source.destroy();
  });

  it("does not fire while bytes keep coming, however long the whole body takes", async () => {
    let fired = false;
    const guard = new BodyIdleGuard(150, () => {
      fired = true;
    });
    const source = new PassThrough();
    let got = 0;
    const done = pipeline(
      source,
      guard,
      new Writable({
        write(chunk: Buffer, _e, cb) {
          got += chunk.length;
          cb();
        },
      }),
    );
    for (let i = 0; i < 10; i++) {
      source.write(Buffer.alloc(1000));
      await new Promise((r) => setTimeout(r, 50)); // 10 x 50 ms = well past 150 ms in all
    }
    source.end();
    await done;
    assert.equal(got, 10_000);
    assert.equal(fired, false);
    await new Promise((r) => setTimeout(r, 250));
    assert.equal(fired, false, "a finished body never fires");
  });

  it("does not fire while its own reader holds the body back (back-pressure)", async () => {
    let fired = false;
    const guard = new BodyIdleGuard(100, () => {
      fired = true;
    });
    const source = new PassThrough();
    source.pipe(guard); // nobody reads the guard: the daemon is not waiting for the client
    source.write(Buffer.alloc(1 << 20));
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(fired, false);
    guard.destroy();
    source.destroy();
  });
});
