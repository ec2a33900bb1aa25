/**
 * The agent's error codes reach callers on AgentError.code as the agent sent them, on
 * every path (a request, an exec, an upload, a download): callers match codes, never
 * messages. Codes the host does not know yet pass through too; hostile ones are still
 * bounded by sanitize.ts.
 */
import assert from "node:assert/strict";
import { Duplex } from "node:stream";
import { describe, it } from "node:test";
import { AgentClient, AgentError } from "./agent-client.js";
import { encodeFrame, FrameDecoder, type FrameHeader } from "./frames.js";

/** A client whose agent answers every request with `{type: "error", id, ...reply}`. */
function clientOfAgentAnswering(reply: Record<string, unknown>): AgentClient {
  const requests = new FrameDecoder();
  const stream: Duplex = new Duplex({
    read() {},
    write(chunk: Buffer, _enc, done) {
      for (const { header } of requests.push(chunk))
        stream.push(encodeFrame({ ...reply, type: "error", id: header.id } as FrameHeader));
      done();
    },
  });
  return new AgentClient(stream);
}

/** Every path by which an agent error reaches a caller, each resolving to what it threw. */
const paths: Record<string, (c: AgentClient) => Promise<unknown>> = {
  request: (c) => c.ping(5_000),
  exec: async (c) => {
    for await (const _ of c.exec("print(1)"));
  },
  upload: (c) => c.writeFile("/root/f", (async function* () {})(), { maxBytes: 10 }),
  download: (c) => c.readFile("/root/f", 5_000),
};

async function thrown(path: string, reply: Record<string, unknown>): Promise<AgentError> {
  const client = clientOfAgentAnswering(reply);
  try {
    await paths[path]?.(client);
  } catch (err) {
    assert.ok(err instanceof AgentError, `${path}: ${String(err)}`);
    return err;
  } finally {
    client.close();
  }
  assert.fail(`${path}: the agent's error was not thrown`);
}

describe("agent error codes", () => {
  for (const code of ["not_a_file", "no_space", "not_found", "some_code_of_a_newer_agent"]) {
    it(`${code} reaches the caller untouched on every path`, async () => {
      const message = `the agent says ${code}`;
      for (const path of Object.keys(paths)) {
        const err = await thrown(path, { code, message });
        assert.equal(err.code, code, path);
        assert.equal(err.message, message, path);
      }
    });
  }

  it("hostile codes and messages are still bounded", async () => {
    const trap = { toString: 1 };
    const cases: [unknown, string][] = [
      ["x".repeat(41), "x".repeat(40)],
      [trap, "error"],
      [[["deep"]], "error"],
      [undefined, "error"],
      [7, "7"],
    ];
    for (const path of Object.keys(paths)) {
      for (const [code, expected] of cases) {
        const err = await thrown(path, { code, message: "m".repeat(3_000) });
        assert.equal(err.code, expected, `${path}: ${JSON.stringify(code)}`);
        assert.equal(err.message, "m".repeat(2_000), path);
      }
      const silent = await thrown(path, { code: "io_error", message: trap });
      assert.equal(silent.message, "the guest agent reported an error", path);
    }
  });
});
