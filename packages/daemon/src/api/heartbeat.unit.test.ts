import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { withHeartbeat } from "./heartbeat.js";

async function* lines(gapsMs: number[]): AsyncGenerator<string> {
  for (const [i, gap] of gapsMs.entries()) {
    await sleep(gap);
    yield `{"n":${i}}\n`;
  }
}

async function collect(it: AsyncIterable<string>): Promise<string[]> {
  const out: string[] = [];
  for await (const chunk of it) out.push(chunk);
  return out;
}

describe("exec stream heartbeat", () => {
  it("opens with an empty line and keeps every line, in order", async () => {
    assert.deepEqual(await collect(withHeartbeat(lines([0, 0, 0]), 1000)), [
      "\n",
      '{"n":0}\n',
      '{"n":1}\n',
      '{"n":2}\n',
    ]);
  });

  it("sends an empty line for each interval of silence, and none when lines flow", async () => {
    const out = await collect(withHeartbeat(lines([0, 260, 0]), 50));
    assert.equal(out[0], "\n");
    assert.deepEqual(
      out.filter((l) => l !== "\n"),
      ['{"n":0}\n', '{"n":1}\n', '{"n":2}\n'],
    );
    const between = out.slice(out.indexOf('{"n":0}\n') + 1, out.indexOf('{"n":1}\n'));
    assert.ok(between.length >= 3 && between.length <= 6, `${between.length} beats in 260 ms`);
    assert.equal(out.indexOf('{"n":2}\n'), out.indexOf('{"n":1}\n') + 1);
  });

  it("stops its source when the reader stops (a client that left)", async () => {
    let closed = false;
    async function* source(): AsyncGenerator<string> {
      try {
        for (;;) {
          await sleep(5);
          yield "x\n";
        }
      } finally {
        closed = true;
      }
    }
    for await (const chunk of withHeartbeat(source(), 1000)) if (chunk === "x\n") break;
    assert.ok(closed);
  });

  it("with an interval of 0, only opens the stream", async () => {
    assert.deepEqual(await collect(withHeartbeat(lines([30]), 0)), ["\n", '{"n":0}\n']);
  });
});
