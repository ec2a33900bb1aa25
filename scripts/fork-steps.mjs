#!/usr/bin/env node
/**
 * One fork's per-step breakdown, from the daemon's own debug log ("fork steps (ms)",
 * vm/qemu/fork.ts) and the client's view (fork request until the child answers an exec).
 * Boots VMs: run it under the VM lock.
 *
 *   node scripts/fork-steps.mjs [--rounds N] [--n N] [--root <checkout>]
 *
 * --root runs another checkout's built daemon (a before/after comparison: a build without
 * the breakdown still gives the end-to-end figures and the parent's pause).
 */
import { join } from "node:path";
import { parseArgs } from "node:util";

const { values: argv } = parseArgs({
  options: {
    rounds: { type: "string", default: "5" },
    n: { type: "string", default: "1" },
    root: { type: "string", default: new URL("..", import.meta.url).pathname },
  },
});
const root = argv.root;
const { benchDirs, startDaemon, pct } = await import(join(root, "bench/dist/daemon.js"));
const { Sandbox } = await import(join(root, "packages/sdk/dist/index.js"));

const dirs = await benchDirs("podflare-forksteps");
const d = await startDaemon({ ...dirs.env, PODFLARE_LOG_LEVEL: "debug", PODFLARE_POOL_SIZE: "1" });
const logs = [];
let buf = "";
d.child.stderr.on("data", (c) => {
  buf += c;
  for (let i = buf.indexOf("\n"); i >= 0; i = buf.indexOf("\n")) {
    const line = buf.slice(0, i);
    buf = buf.slice(i + 1);
    if (line.includes('"fork steps') || line.includes('"msg":"forked"')) logs.push(JSON.parse(line));
  }
});
const samples = {};
const add = (k, v) => {
  if (typeof v === "number") (samples[k] ??= []).push(v);
};
try {
  const parent = await Sandbox.create({ host: d.url });
  await parent.runCode("x = 41\nblob = bytearray(range(256)) * (40 * 4096)\nprint(len(blob))");
  const n = Number(argv.n);
  for (let r = 0; r < Number(argv.rounds); r++) {
    logs.length = 0;
    const t0 = performance.now();
    const children = await parent.fork(n);
    const forked = performance.now();
    await Promise.all(
      children.map(async (c) => {
        const t = performance.now();
        const out = await c.runCode("print(x)");
        if (out.stdout !== "41\n") throw new Error(`child said ${JSON.stringify(out)}`);
        add("child first exec", performance.now() - t);
      }),
    );
    add("fork request until every child answered an exec", performance.now() - t0);
    add("fork request until the API answered", forked - t0);
    await new Promise((res) => setTimeout(res, 100)); // the log lines are in
    for (const l of logs) {
      if (l.msg === "forked") add("parent paused (pausedMs)", l.pausedMs);
      if (l.capture) {
        for (const [k, v] of Object.entries(l.capture)) add(`capture: ${k}`, v);
        for (const c of l.children) for (const [k, v] of Object.entries(c)) add(`child: ${k}`, v);
        add("backend fork total", l.ms);
      }
    }
    await Promise.all(children.map((c) => c.close()));
  }
  await parent.close();
  console.log(`fork n=${n}, ${argv.rounds} rounds, ${root}`);
  for (const [k, v] of Object.entries(samples))
    console.log(`  ${k}: p50 ${pct(v, 50).toFixed(1)}, max ${Math.max(...v).toFixed(1)} (n=${v.length})`);
} finally {
  await d.stop();
  await dirs.remove();
}
