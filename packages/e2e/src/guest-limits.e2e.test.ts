/**
 * Abuse inside a real guest: twice its memory, fork bombs, a full disk, an endless loop,
 * 1 GiB of output. Throughout each, the agent must answer every ping (within 5 s: a
 * liveness bound, not a latency target), and the next call must work. The worst ping
 * latency is a figure, printed beside the idle baseline measured in the same run: this
 * host is shared and noisy, so latencies are reported, not asserted (docs/reliability.md). See
 * docs/guest-isolation.md for the layout these tests exercise and the figures.
 */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { type Config, createLogger, type ExecEvent, prepareEngine } from "@podflare/daemon";
import { removeTestDirs, testConfig } from "./harness.js";

type Engine = Awaited<ReturnType<typeof prepareEngine>>["engine"];
type BootedVm = Awaited<ReturnType<Engine["boot"]>>;

const MEM_MIB = 1024;
const PING_LIVENESS_MS = 5000;
const PING_GAP_MS = 50;

type Exit = Extract<ExecEvent, { type: "exit" }>;

async function run(
  vm: BootedVm,
  code: string,
  opts: { language?: "python" | "bash"; timeoutMs?: number; maxOutputBytes?: number } = {},
) {
  let stdout = "";
  let stderr = "";
  let last: unknown;
  for await (const e of vm.agent.exec(code, opts)) {
    if (e.type === "stdout") stdout += e.data;
    else if (e.type === "stderr") stderr += e.data;
    last = e;
  }
  const exit = last as Exit;
  assert.equal(exit?.type, "exit", "every exec ends with one exit event");
  return { stdout, stderr, exit };
}

/**
 * Runs `work` while pinging the agent back to back (PING_GAP_MS apart); returns its result
 * and the worst ping latency seen. A ping unanswered after PING_LIVENESS_MS fails the test.
 */
async function withPings<T>(vm: BootedVm, work: () => Promise<T>) {
  let done = false;
  let worstMs = 0;
  let pings = 0;
  const pinger = (async () => {
    while (!done) {
      const t0 = performance.now();
      await vm.agent.ping(PING_LIVENESS_MS);
      worstMs = Math.max(worstMs, performance.now() - t0);
      pings++;
      if (!done) await new Promise((r) => setTimeout(r, PING_GAP_MS));
    }
  })();
  const started = performance.now();
  try {
    const result = await work();
    return { result, worstMs, pings, ms: performance.now() - started };
  } finally {
    done = true;
    await pinger;
  }
}

/** The idle baseline's worst ping, measured first in the same run: the reference. */
let idleWorstMs: number | undefined;

function report(name: string, m: { worstMs: number; pings: number; ms: number }, extra = "") {
  const reference = idleWorstMs === undefined ? "" : ` (idle: ${idleWorstMs.toFixed(0)} ms)`;
  console.log(
    `guest-limits: ${name}: worst ping ${m.worstMs.toFixed(0)} ms${reference} over ${m.pings} pings, ` +
      `${(m.ms / 1000).toFixed(1)} s${extra ? `; ${extra}` : ""}`,
  );
}

async function nextCallWorks(vm: BootedVm) {
  const r = await run(vm, "print(6 * 7)");
  assert.equal(r.stdout, "42\n");
  assert.equal(r.exit.code, 0);
}

describe("guest limits: the agent outlives abusive code", () => {
  let engine: Engine;
  let vm: BootedVm;

  let config: Config | undefined;

  before(async () => {
    config = await testConfig();
    ({ engine } = await prepareEngine(config, createLogger("warn")));
    vm = await engine.boot("vm_guest_limits_e2e", { vcpuCount: 2, memSizeMib: MEM_MIB });
  });

  after(async () => {
    await vm?.destroy();
    // Its own state and memory directories, as a test daemon's close() removes them.
    if (config) await removeTestDirs(config);
  });

  it("baseline: pings while idle", async () => {
    const m = await withPings(vm, () => new Promise((r) => setTimeout(r, 3000)));
    report("idle baseline (3 s)", m);
    idleWorstMs = m.worstMs;
  });

  it("lays out the cgroups: agent protected, user code limited, each call in its own", async () => {
    const r = await run(
      vm,
      [
        "import os",
        "cg = '/sys/fs/cgroup'",
        "read = lambda p: open(f'{cg}/{p}').read().strip()",
        "agent = int(read('agent/cgroup.procs').split()[0])",
        "print(os.getppid() == agent, open(f'/proc/{agent}/oom_score_adj').read().strip())",
        "print(read('agent/cpu.weight'), read('user/cpu.weight'), read('user/pids.max'), int(read('user/memory.max')) >> 20)",
        "print(open('/proc/self/cgroup').read().strip())",
      ].join("\n"),
    );
    console.log(`guest-limits: layout: ${r.stdout.trim().replaceAll("\n", " | ")}`);
    const [first = "", second = "", third = ""] = r.stdout.trim().split("\n");
    assert.equal(first, "True -1000");
    const [agentWeight, userWeight, pidsMax, memMaxMib = 0] = second.split(" ").map(Number);
    assert.deepEqual([agentWeight, userWeight, pidsMax], [10000, 10, 1024]);
    assert.ok(
      memMaxMib > MEM_MIB * 0.7 && memMaxMib < MEM_MIB * 0.9,
      `memory.max ${memMaxMib} MiB`,
    );
    assert.match(third, /^0::\/user\/exec-\d+$/);
  });

  it("allocating twice its memory: a MemoryError, or the REPL is OOM-killed and replaced", async () => {
    await run(vm, "marker = 1");
    // One huge allocation is refused at once (overcommit heuristics): the REPL survives.
    const single = await run(vm, `x = bytearray(${2 * MEM_MIB} << 20)`);
    assert.equal(single.exit.error?.name, "MemoryError");
    assert.equal((await run(vm, "print(marker)")).stdout, "1\n");
    // Touched 64 MiB at a time, it is the OOM killer's business.
    const m = await withPings(vm, () =>
      run(
        vm,
        `chunks = []\nfor _ in range(${(2 * MEM_MIB) / 64}):\n    chunks.append(b'x' * (64 << 20))`,
        {
          timeoutMs: 60_000,
        },
      ),
    );
    report(
      "memory (2x, 64 MiB chunks)",
      m,
      `exit ${JSON.stringify(m.result.exit.error?.name)} code ${m.result.exit.code}`,
    );
    assert.equal(m.result.exit.error?.name, "OutOfMemory");
    assert.match(m.result.exit.error?.value ?? "", /out of memory.*state.*lost/);
    assert.equal(m.result.exit.code, 137);
    assert.match(m.result.stderr, /podflare: the sandbox ran out of memory/);
    const next = await run(vm, "print('marker' in globals(), 6 * 7)");
    assert.equal(next.stdout, "False 42\n", "a fresh REPL");
  });

  it("a Python fork bomb: timed out, every fork killed", async () => {
    const m = await withPings(vm, () =>
      run(
        vm,
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        {
          timeoutMs: 10_000,
        },
      ),
    );
    report(
      "python fork bomb (os.fork loop, 10 s timeout)",
      m,
      `exit ${JSON.stringify(m.result.exit)}`,
    );
    assert.notEqual(m.result.exit.code, 0);
    await nextCallWorks(vm);
  });

  it("a bash fork bomb left in the background is killed at the pids limit", async () => {
    const cg = "/sys/fs/cgroup/user";
    const before = await run(vm, `print(open('${cg}/pids.events').read().split()[1])`);
    const m = await withPings(vm, async () => {
      const bomb = await run(vm, ":(){ :|:& };:", { language: "bash", timeoutMs: 10_000 });
      // It returns at once and grows in the background. Wait (in the guest) until it has
      // hit the limit, then until the agent has killed it; print peak and remaining tasks.
      const settle = await run(
        vm,
        [
          "import time",
          `read = lambda f: open('${cg}/' + f).read()`,
          "deadline = time.monotonic() + 40",
          `while int(read('pids.events').split()[1]) == ${before.stdout.trim()} and time.monotonic() < deadline:`,
          "    time.sleep(0.1)",
          "peak = int(read('pids.peak')) if __import__('os').path.exists('/sys/fs/cgroup/user/pids.peak') else -1",
          "while int(read('pids.current')) >= 64 and time.monotonic() < deadline:",
          "    time.sleep(0.1)",
          "print(int(read('pids.events').split()[1]) > " +
            before.stdout.trim() +
            ", peak, int(read('pids.current')))",
        ].join("\n"),
        { timeoutMs: 60_000 },
      );
      return { bomb, settle };
    });
    report(
      "bash fork bomb (:(){ :|:& };:)",
      m,
      `bomb exit ${m.result.bomb.exit.code}; limit hit, peak tasks, tasks after: ${m.result.settle.stdout.trim()}`,
    );
    assert.equal(m.result.settle.exit.code, 0, JSON.stringify(m.result.settle));
    const [hit, , remaining] = m.result.settle.stdout.trim().split(" ");
    assert.equal(hit, "True", "the bomb reached the pids limit");
    assert.ok(Number(remaining) < 64, "the bomb is gone");
    await nextCallWorks(vm);
  });

  it("a full disk", async () => {
    const m = await withPings(vm, () =>
      run(
        vm,
        [
          // fallocate takes every free block (root may use the reserved ones too) in well
          // under a second; what it cannot get, the writes below then fail to get.
          "free=$(( $(stat -f -c '%f' /) * $(stat -f -c '%S' /) ))",
          "fallocate -l $free /root/fill 2>&1 | sed 's/^/fallocate: /'",
          "dd if=/dev/zero of=/root/more bs=1M count=64 2>&1 | grep -o 'No space left on device'",
          "python3 -c \"open('/root/small', 'w').write('x' * 100000)\" 2>&1 | tail -n 1",
          "df -h / | tail -n 1",
        ].join("\n"),
        { language: "bash", timeoutMs: 60_000 },
      ),
    );
    report("disk full (fallocate + writes)", m, m.result.stdout.trim().replaceAll("\n", " | "));
    assert.match(m.result.stdout, /\/dev\/vda.* 100% \//);
    assert.match(m.result.stdout, /OSError: \[Errno 28\] No space left on device/);
    await nextCallWorks(vm);
    const files = await run(vm, "import os\nprint('fill' in os.listdir('/root'))");
    assert.equal(files.stdout, "True\n");
    await run(vm, "rm -f /root/fill /root/more /root/small", { language: "bash" });
  });

  it("an endless loop: interrupted at its timeout", async () => {
    const m = await withPings(vm, () => run(vm, "while True: pass", { timeoutMs: 5000 }));
    report("while True: pass (5 s timeout)", m);
    assert.equal(m.result.exit.timed_out, true);
    assert.equal(m.result.exit.error?.name, "KeyboardInterrupt");
    await nextCallWorks(vm);
  });

  it("a timeout kills processes that left the session; a finished call's children live on", async () => {
    const survivor = await run(
      vm,
      "import subprocess, time\nkeeper = subprocess.Popen(['sleep', '1000'], start_new_session=True)\nprint(keeper.pid)",
    );
    const r = await run(
      vm,
      "subprocess.run(['bash', '-c', 'setsid sleep 1000 & echo $! > /tmp/escapee; disown'])\ntime.sleep(100)",
      { timeoutMs: 2000 },
    );
    assert.equal(r.exit.timed_out, true);
    const check = await run(
      vm,
      `def alive(pid):\n    try:\n        return open(f'/proc/{pid}/stat').read().split()[2] != 'Z'\n    except OSError:\n        return False\nprint(alive(int(open('/tmp/escapee').read())), alive(${survivor.stdout.trim()}))\nkeeper.kill()\n_ = keeper.wait()`,
    );
    assert.equal(check.stdout, "False True\n");
  });

  it("1 GiB printed from Python: capped, flagged, quick", async () => {
    const m = await withPings(vm, () =>
      run(
        vm,
        "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)",
        {
          timeoutMs: 60_000,
        },
      ),
    );
    report("1 GiB stdout from Python", m, `received ${m.result.stdout.length} bytes`);
    assert.equal(m.result.exit.truncated, true);
    assert.equal(m.result.exit.code, 0);
    assert.equal(m.result.stdout.length, 16 << 20);
    await nextCallWorks(vm);
  });

  it("1 GiB printed by a child process: capped, flagged, agent memory bounded", async () => {
    const m = await withPings(vm, () =>
      run(
        vm,
        "import os, time\nt = time.monotonic()\nrc = os.system('head -c 1G /dev/zero')\nelapsed = round(time.monotonic() - t, 1)",
        {
          timeoutMs: 60_000,
          maxOutputBytes: 1 << 20,
        },
      ),
    );
    const rss = await run(
      vm,
      "import os\nagent = int(open('/sys/fs/cgroup/agent/cgroup.procs').read().split()[0])\nrss = lambda pid: int(open(f'/proc/{pid}/statm').read().split()[1]) * 4096 >> 20\nprint(rss(agent), rss(os.getpid()), rc, elapsed)",
    );
    report(
      "1 GiB stdout from a child (head -c 1G /dev/zero)",
      m,
      `received ${m.result.stdout.length} bytes, agent RSS, worker RSS (MiB), exit status, seconds: ${rss.stdout.trim()}`,
    );
    assert.equal(m.result.exit.truncated, true);
    assert.equal(m.result.stdout.length, 1 << 20);

    const [agentRss = 0, workerRss = 0, rc = -1] = rss.stdout.trim().split(" ").map(Number);
    assert.equal(rc, 0);
    assert.ok(agentRss < 64 && workerRss < 128, `RSS ${rss.stdout}`);
    await nextCallWorks(vm);
  });
});
