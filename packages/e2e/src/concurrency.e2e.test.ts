/**
 * Many concurrent execs on one sandbox through the TypeScript SDK: each caller gets
 * exactly its own output (stdout, stderr, large outputs), nothing of anyone else's, and
 * the calls run one at a time in the order the daemon received them. The guest agent
 * queues at most 64 execs; the daemon holds the rest in its own FIFO (guest/exec.ts)
 * and refuses with 429 only past a generous bound.
 */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { RateLimitError, Sandbox } from "podflare";
import { startTestDaemon, type TestDaemon } from "./harness.js";

const N = 100;
/** packages/daemon/src/guest/exec.ts (exported by agent-client.ts): execs kept in the guest, and waiting on the host. */
const MAX_AGENT_EXECS = 4;
const MAX_QUEUED_EXECS = 256;
const BIG = 50_000; // repetitions of a 6-character token: 300 KB of stdout

/** Code for caller i: a unique token, the REPL-wide sequence number, sometimes more. */
function codeFor(i: number): string {
  const lines = ["import sys", "_seq = globals().get('_seq', 0) + 1", `print('tok-${i}', _seq)`];
  if (i % 3 === 0) lines.push(`_ = sys.stderr.write('err-${i}\\n')`);
  if (i % 10 === 0) lines.push(`print('L${String(i).padStart(4, "0")}_' * ${BIG})`);
  if (i % 7 === 0) lines.push(`print('tail-${i}', file=sys.stderr)`);
  return lines.join("\n");
}

function expectedFor(i: number, seq: number): { stdout: string; stderr: string } {
  let stdout = `tok-${i} ${seq}\n`;
  let stderr = "";
  if (i % 3 === 0) stderr += `err-${i}\n`;
  if (i % 10 === 0) stdout += `${`L${String(i).padStart(4, "0")}_`.repeat(BIG)}\n`;
  if (i % 7 === 0) stderr += `tail-${i}\n`;
  return { stdout, stderr };
}

describe("concurrent execs on one sandbox", () => {
  let d: TestDaemon;
  let sbx: Sandbox;
  /** The code of every exec in the order the daemon's service received it. */
  const arrivals: string[] = [];
  let onArrival: (() => void) | null = null;

  before(async () => {
    // This file tests the per-sandbox exec queue (260 calls at once): the per-key and
    // per-daemon stream bounds (64 and 256 by default) would refuse them first.
    d = await startTestDaemon({ tenantMaxStreams: 1024, maxStreams: 1024 });
    sbx = await Sandbox.create({ host: d.url });
    // Observe arrival order where the API hands the call to the service (in-process).
    const service = d.daemon.service as unknown as Record<string, (...a: unknown[]) => unknown>;
    const exec = service.exec?.bind(service);
    assert.ok(exec);
    service.exec = (...args: unknown[]) => {
      const req = args.find((a) => typeof a === "object" && a !== null && "code" in a) as
        | { code: string }
        | undefined;
      arrivals.push(req?.code ?? "?");
      onArrival?.();
      return exec(...args);
    };
  });
  after(async () => {
    await d?.close();
  });

  /** Resolves once `count` execs have arrived at the service. */
  function arrived(count: number): Promise<void> {
    return new Promise((resolve) => {
      const check = () => {
        if (arrivals.length >= count) {
          onArrival = null;
          resolve();
        }
      };
      onArrival = check;
      check();
    });
  }

  /** An exec that blocks the sandbox until /tmp/<name> is uploaded (handled while code runs). */
  function gate(name: string): Promise<{ exitCode: number }> {
    return sbx.runCode(
      `import os, time\nwhile not os.path.exists('/tmp/${name}'):\n    time.sleep(0.005)`,
    );
  }

  it(`${N} concurrent runCode calls each get exactly their own output, in arrival order`, async () => {
    const t0 = performance.now();
    const base = arrivals.length;
    // All N are queued at once behind the gate: more than the agent's 64.
    const gated = gate("go");
    await arrived(base + 1);
    const calls = Array.from({ length: N }, (_, i) => sbx.runCode(codeFor(i)));
    await arrived(base + 1 + N);
    await sbx.upload("/tmp/go", "");
    const [gateResult, ...results] = await Promise.all([gated, ...calls]);
    assert.equal(gateResult?.exitCode, 0);
    const ms = performance.now() - t0;

    // Each result holds its own token and nothing else.
    const seqOf = new Map<number, number>();
    results.forEach((r, i) => {
      assert.equal(r.exitCode, 0, `call ${i}: ${r.stderr.slice(0, 300)}`);
      const m = /^tok-(\d+) (\d+)\n/.exec(r.stdout);
      assert.ok(m, `call ${i} stdout starts with its token: ${r.stdout.slice(0, 80)}`);
      assert.equal(Number(m[1]), i, `call ${i} got call ${m[1]}'s output`);
      const seq = Number(m[2]);
      seqOf.set(i, seq);
      const want = expectedFor(i, seq);
      assert.ok(
        r.stdout === want.stdout,
        `call ${i}: stdout is exactly its own (${r.stdout.length} vs ${want.stdout.length} chars)`,
      );
      assert.equal(r.stderr, want.stderr, `call ${i}: stderr is exactly its own`);
    });
    // They ran one at a time (sequence numbers 1..N, each once) ...
    assert.deepEqual(
      [...seqOf.values()].sort((a, b) => a - b),
      Array.from({ length: N }, (_, k) => k + 1),
    );
    // ... in the order the daemon received them.
    const order = arrivals.slice(base + 1).map((code) => Number(/'tok-(\d+)'/.exec(code)?.[1]));
    assert.deepEqual(
      order.map((i) => seqOf.get(i)),
      Array.from({ length: N }, (_, k) => k + 1),
      "execution order is arrival order",
    );
    const bytes = results.reduce((s, r) => s + r.stdout.length + r.stderr.length, 0);
    console.log(
      `concurrency: ${N} execs queued at once behind a gate (agent limit 64, host keeps ${MAX_AGENT_EXECS} in the guest), all correct and in arrival order; ${(bytes / 1e6).toFixed(1)} MB of output in ${(ms / 1000).toFixed(1)} s`,
    );
  });

  it("refuses execs past the host queue's bound with 429, and the queue drains", async () => {
    const base = arrivals.length;
    const gated = gate("go2");
    await arrived(base + 1);
    // The gate holds one slot in the guest: MAX_AGENT_EXECS - 1 more go to the agent, then
    // MAX_QUEUED_EXECS wait on the host.
    const fits = MAX_AGENT_EXECS - 1 + MAX_QUEUED_EXECS;
    const calls = Array.from({ length: fits }, (_, i) => sbx.runCode(`print(${i})`));
    await arrived(base + 1 + fits);
    await assert.rejects(sbx.runCode("print('one too many')"), (err: unknown) => {
      assert.ok(err instanceof RateLimitError, String(err));
      assert.match((err as Error).message, /waiting/);
      return true;
    });
    await sbx.upload("/tmp/go2", "");
    await gated;
    const results = await Promise.all(calls);
    results.forEach((r, i) => {
      assert.equal(r.stdout, `${i}\n`);
    });
    assert.equal((await sbx.runCode("print('after')")).stdout, "after\n");
  });
});
