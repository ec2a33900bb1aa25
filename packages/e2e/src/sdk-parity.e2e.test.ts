/**
 * One scenario through both SDKs against one real daemon: the TypeScript half is here, the
 * Python half in sdk-parity.py (run as a python3 process). Both write the same transcript:
 * what each call answered (Python's snake_case names; absent flags as false, no error as
 * null) and, for each failure, its error class, status, code and message.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { promisify } from "node:util";
import { repoRoot } from "@podflare/daemon";
import { type ExecResult, PodflareError, Sandbox } from "podflare";
import { startTestDaemon, type TestDaemon } from "./harness.js";

const FILE = new Uint8Array([0, 255, 1, 254, ...new TextEncoder().encode("podflare ✓\n")]);

async function failure(call: () => Promise<unknown>, hide?: string) {
  try {
    await call();
  } catch (e) {
    if (!(e instanceof PodflareError)) throw e;
    const message = hide ? e.message.replaceAll(hide, "<id>") : e.message;
    return { class: e.name, status: e.status, code: e.code, message };
  }
  return null;
}

function result(r: ExecResult) {
  return {
    stdout: r.stdout,
    stderr: r.stderr,
    exit_code: r.exitCode,
    error: r.error ?? null,
    timed_out: r.timedOut ?? false,
    truncated: r.truncated ?? false,
    cancelled: r.cancelled ?? false,
  };
}

const same = (a: Uint8Array, b: Uint8Array) => Buffer.from(a).equals(Buffer.from(b));

async function scenario(host: string): Promise<Record<string, unknown>> {
  const out: Record<string, unknown> = {};
  const s = await Sandbox.create({
    host,
    template: "default",
    metadata: { suite: "sdk-parity" },
    timeoutMs: 600_000,
  });
  const { info } = s;
  out.created = {
    id_prefix: s.id.slice(0, 4),
    fields: Object.keys(info).sort(),
    state: info.state,
    template: info.template,
    metadata: info.metadata,
  };
  await s.runCode("x = 42; import sys, time");
  out.state_kept = result(await s.runCode("print(x)"));
  out.streams = result(await s.runCode("print('out'); print('err', file=sys.stderr)"));
  const events = [];
  for await (const { ts, ...e } of s.runCodeStream("print(1); print(2, file=sys.stderr)"))
    events.push(e);
  out.events = events;
  const error = result(await s.runCode("1/0"));
  out.error = {
    exit_code: error.exit_code,
    name: error.error?.name,
    value: error.error?.value,
    traceback_in_stderr: error.stderr.includes("ZeroDivisionError"),
  };
  out.after_error = result(await s.runCode("print(x)"));
  const timeout = result(await s.runCode("time.sleep(60)", { timeoutMs: 1000 }));
  out.timeout = { exit_code: timeout.exit_code, timed_out: timeout.timed_out };
  out.after_timeout = result(await s.runCode("print(x)"));
  out.bash = result(await s.runCode("echo $((6*7))", { language: "bash" }));
  out.bad_timeout = await failure(() => s.runCode("1", { timeoutMs: 0 }));
  await s.upload("/root/data/f.bin", FILE);
  out.download_same = same(await s.download("/root/data/f.bin"), FILE);
  out.seen_by_code = result(await s.runCode("print(open('/root/data/f.bin','rb').read().hex())"));
  out.missing_file = await failure(() => s.download("/root/nope"));
  const [child] = await s.fork();
  assert.ok(child);
  out.fork = {
    child_is_new: child.id !== s.id && child.id.startsWith("sbx_"),
    child_info: {
      state: child.info.state,
      template: child.info.template,
      metadata: child.info.metadata,
    },
    child_state: result(await child.runCode("print(x)")),
    child_file: same(await child.download("/root/data/f.bin"), FILE),
  };
  await child.runCode("x = 7");
  (out.fork as Record<string, unknown>).parent_untouched = result(await s.runCode("print(x)"));
  const now = await s.getInfo();
  out.get_info = { state: now.state, metadata: now.metadata, same_id: now.id === s.id };
  const listed = (await Sandbox.list({ host })).map((i) => i.id);
  out.list = { parent: listed.includes(s.id), child: listed.includes(child.id) };
  await child.close();
  await child.close(); // idempotent
  out.destroyed = await failure(() => child.getInfo(), child.id);
  out.list_after = { child: (await Sandbox.list({ host })).some((i) => i.id === child.id) };
  await s.close();
  out.unknown = await failure(() => Sandbox.connect("sbx_does_not_exist", { host }));
  return out;
}

describe("the TypeScript and Python SDKs, one scenario", () => {
  let d: TestDaemon;
  before(async () => {
    d = await startTestDaemon();
  });
  after(async () => {
    await d?.close();
  });

  it("answers the same in both, error classes included", async () => {
    const ts = await scenario(d.url);
    const py = await promisify(execFile)(
      "python3",
      [join(repoRoot, "packages/e2e/src/sdk-parity.py")],
      { env: { ...process.env, PODFLARE_HOST: d.url, PYTHONPATH: join(repoRoot, "python") } },
    );
    const fromPython = JSON.parse(py.stdout) as Record<string, unknown>;
    assert.deepEqual(fromPython, ts);

    // And the transcript says what the scenario is about.
    assert.deepEqual(ts.state_kept, result({ stdout: "42\n", stderr: "", exitCode: 0 }));
    assert.deepEqual(ts.streams, result({ stdout: "out\n", stderr: "err\n", exitCode: 0 }));
    assert.deepEqual(ts.timeout, { exit_code: 124, timed_out: true });
    assert.equal((ts.error as { name: string }).name, "ZeroDivisionError");
    assert.equal(ts.download_same, true);
    assert.deepEqual((ts.fork as { child_state: unknown }).child_state, ts.state_kept);
    assert.deepEqual((ts.fork as { parent_untouched: unknown }).parent_untouched, ts.state_kept);
    assert.deepEqual(ts.list, { parent: true, child: true });
    assert.deepEqual(ts.list_after, { child: false });
    for (const key of ["missing_file", "destroyed", "unknown"])
      assert.equal((ts[key] as { class: string; status: number }).class, "NotFoundError", key);
    assert.equal((ts.bad_timeout as { class: string }).class, "InvalidArgumentError");
    assert.deepEqual(await Sandbox.list({ host: d.url }), [], "both halves cleaned up");
  });
});
