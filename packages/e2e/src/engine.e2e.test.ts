/**
 * The VM engine end to end: a real microVM (TCG here), its agent, the REPL semantics,
 * and a destroy that leaves nothing behind.
 */
import assert from "node:assert/strict";
import { access } from "node:fs/promises";
import { after, before, describe, it } from "node:test";
import { type Config, createLogger, prepareEngine } from "@podflare/daemon";
import { eventually, qemuPids, removeTestDirs, testConfig } from "./harness.js";

type Engine = Awaited<ReturnType<typeof prepareEngine>>["engine"];
type BootedVm = Awaited<ReturnType<Engine["boot"]>>;

async function run(
  vm: BootedVm,
  code: string,
  opts: { language?: "python" | "bash"; timeoutMs?: number } = {},
) {
  const events = [];
  let stdout = "";
  let stderr = "";
  for await (const e of vm.agent.exec(code, opts)) {
    events.push(e);
    if (e.type === "stdout") stdout += e.data;
    if (e.type === "stderr") stderr += e.data;
  }
  const exit = events.at(-1);
  assert.equal(exit?.type, "exit", "every exec ends with one exit event");
  return { stdout, stderr, exit: exit as Extract<typeof exit, { type: "exit" }>, events };
}

describe("VM engine", () => {
  let engine: Engine;
  let vm: BootedVm;

  let config: Config | undefined;

  before(async () => {
    config = await testConfig();
    ({ engine } = await prepareEngine(config, createLogger("warn")));
    vm = await engine.boot("vm_engine_e2e", { vcpuCount: 2, memSizeMib: 1024 });
  });

  after(async () => {
    await vm?.destroy();
    // Its own state and memory directories, as a test daemon's close() removes them.
    if (config) await removeTestDirs(config);
  });

  it("keeps state between calls: the contract's example", async () => {
    const first = await run(vm, "x = 42; import json");
    assert.equal(first.exit.code, 0);
    assert.equal(first.stdout, "");
    const second = await run(vm, "print(x, json.dumps({'ok': True}))");
    assert.equal(second.stdout, '42 {"ok": true}\n');
    assert.equal(second.exit.code, 0);
  });

  it("reports an exception with its traceback, and the next call works", async () => {
    const bad = await run(vm, "def f():\n    raise ValueError('boom')\nf()");
    assert.notEqual(bad.exit.code, 0);
    assert.match(bad.stderr, /ValueError: boom/);
    assert.match(bad.stderr, /line 2, in f/);
    assert.equal(bad.exit.error?.name, "ValueError");
    assert.equal(bad.exit.error?.value, "boom");
    const ok = await run(vm, "print(x + 1)");
    assert.equal(ok.stdout, "43\n");
  });

  it("ends the call with SystemExit's code and keeps the REPL", async () => {
    const r = await run(vm, "import sys; sys.exit(3)");
    assert.equal(r.exit.code, 3);
    assert.equal((await run(vm, "print(x)")).stdout, "42\n");
  });

  it("runs bash in a fresh process in the REPL's working directory", async () => {
    await run(
      vm,
      "import os; os.makedirs('/tmp/work', exist_ok=True); os.chdir('/tmp/work'); os.environ['GREETING'] = 'hello'",
    );
    const r = await run(vm, 'echo "$GREETING from $(pwd)"; echo oops >&2; exit 5', {
      language: "bash",
    });
    assert.equal(r.stdout, "hello from /tmp/work\n");
    assert.equal(r.stderr, "oops\n");
    assert.equal(r.exit.code, 5);
  });

  it("interrupts a busy loop on timeout and stays usable", async () => {
    const started = Date.now();
    const r = await run(vm, "while True: pass", { timeoutMs: 1500 });
    assert.equal(r.exit.timed_out, true);
    assert.match(r.stderr, /KeyboardInterrupt/);
    assert.ok(Date.now() - started < 15_000);
    assert.equal((await run(vm, "print('alive', x)")).stdout, "alive 42\n");
  });

  it("streams interleaved stdout and stderr in order", async () => {
    const r = await run(
      vm,
      "import sys\nfor i in range(10):\n    print('out', i, flush=True)\n    print('err', i, file=sys.stderr, flush=True)",
    );
    const sequence = r.events
      .filter((e) => e.type !== "exit")
      .flatMap((e) =>
        "data" in e
          ? e.data
              .split("\n")
              .filter(Boolean)
              .map((l) => `${e.type}:${l}`)
          : [],
      );
    const expected = Array.from({ length: 10 }, (_, i) => [
      `stdout:out ${i}`,
      `stderr:err ${i}`,
    ]).flat();
    assert.deepEqual(sequence, expected);
  });

  it("lets user code and its children use every vCPU", async () => {
    const r = await run(
      vm,
      "import os, subprocess\nprint(len(os.sched_getaffinity(0)), subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip())",
    );
    assert.equal(r.stdout, "2 2\n");
  });

  it("has no network interface but lo", async () => {
    const r = await run(vm, "import os; print(sorted(os.listdir('/sys/class/net')))");
    assert.equal(r.stdout, "['lo']\n");
  });

  it("answers pings while user code runs", async () => {
    const running = run(vm, "import time; time.sleep(2); print('done')");
    const t0 = Date.now();
    await vm.agent.ping(2000);
    assert.ok(Date.now() - t0 < 1500, "ping is not queued behind the exec");
    assert.equal((await running).stdout, "done\n");
  });

  it("leaves no process and no file after destroy", async () => {
    const other = await engine.boot("vm_engine_e2e_gone", { vcpuCount: 1, memSizeMib: 256 });
    const dir = engine.vmDir(other.id);
    const mem = engine.memPath(other.id);
    assert.equal((await qemuPids(dir)).length, 1);
    await other.destroy();
    await eventually("QEMU to be gone", async () => (await qemuPids(dir)).length === 0);
    await assert.rejects(access(dir));
    await assert.rejects(access(mem));
  });
});
