// Exec round trip of `y = 1` through the engine (vm.agent.exec), agent variants side by side
// in one guest, so that a noisy shared host affects them alike (see docs/guest-isolation.md,
// "Exec latency"). Boots one 2-vCPU, 1 GiB guest like packages/e2e/src/engine.e2e.test.ts;
// per round and variant: uploads the variant (a single-file agent, or a package directory),
// points /opt/podflare/podflare_agent at it (a symlink: the agent starts its worker from the
// realpath of its file or package), resets the cgroup2
// mount options to init's, kills the agent (init restarts it), runs 30 warm-up execs, then
// times N. Needs `npm run build`. Run from the repository root:
//
//   git show 9130358:guest/agent/podflare_agent.py > /tmp/agent_old.py
//   node guest/agent/tests/exec_latency_ab.mjs ROUNDS N old=/tmp/agent_old.py new=guest/agent/podflare_agent
import { readdir, readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { createLogger, prepareEngine } from "../../../packages/daemon/dist/index.js";
import { testConfig } from "../../../packages/e2e/dist/harness.js";

const [rounds, n, ...specs] = process.argv.slice(2);
const variants = await Promise.all(
  specs.map(async (s) => {
    const [name, path] = s.split("=");
    const dir = (await stat(path)).isDirectory();
    const names = dir ? (await readdir(path)).filter((f) => f.endsWith(".py")) : [""];
    const files = await Promise.all(names.map(async (f) => ({ name: f, code: await readFile(dir ? join(path, f) : path) })));
    return { name, dir, files, samples: [] };
  }),
);
const config = await testConfig();
const { engine } = await prepareEngine(config, createLogger("warn"));
const vm = await engine.boot("vm_exec_latency", { vcpuCount: 2, memSizeMib: 1024 });
process.on("SIGTERM", async () => {
  await vm.destroy();
  process.exit(1);
});

async function run(code) {
  let out = "";
  let exit;
  for await (const e of vm.agent.exec(code)) {
    if (e.type === "stdout" || e.type === "stderr") out += e.data;
    if (e.type === "exit") exit = e;
  }
  return { out, exit };
}

// Kills the control process (and, for the single-process agent, the agent itself last).
const KILL = `import os
me = os.getpid()
for p in sorted((p for p in os.listdir('/proc') if p.isdigit()), key=lambda p: int(p) == me):
    try:
        c = open(f'/proc/{p}/cmdline', 'rb').read()
    except OSError:
        continue
    if b'podflare_agent' in c and b'--worker' not in c:
        os.kill(int(p), 9)
`;
const REMOUNT =
  "import ctypes\nctypes.CDLL(None).mount(b'cgroup2', b'/sys/fs/cgroup', b'cgroup2', ctypes.c_ulong(32|2|4|8|(1<<21)), b'')";
const pct = (a, p) => {
  const s = [...a].sort((x, y) => x - y);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
};

try {
  for (let r = 0; r < Number(rounds); r++) {
    for (const v of variants) {
      const path = v.dir ? `/opt/podflare/variant-${v.name}` : `/opt/podflare/variant-${v.name}.py`;
      for (const f of v.files) {
        const target = v.dir ? `${path}/${f.name}` : path;
        await vm.agent.writeFile(target, (async function* () { yield f.code; })(), { maxBytes: 1 << 24, mode: 0o755 });
      }
      // The image's package directory is kept aside once; the link then takes its place.
      await run(`import os\nlink = '/opt/podflare/podflare_agent'\nif not os.path.islink(link):\n    os.rename(link, link + '.image')\nos.symlink(${JSON.stringify(path)}, '/opt/podflare/.l')\nos.replace('/opt/podflare/.l', link)`);
      await run(REMOUNT);
      try {
        await run(KILL);
      } catch {} // agent_restarted
      for (let i = 0; ; i++) {
        await new Promise((res) => setTimeout(res, 300));
        try {
          if ((await run("pass")).exit?.code === 0) break;
        } catch {}
        if (i > 100) throw new Error("the agent did not come back");
      }
      for (let i = 0; i < 30; i++) await run("y = 1");
      const local = [];
      for (let i = 0; i < Number(n); i++) {
        const t0 = performance.now();
        const { exit } = await run("y = 1");
        const dt = performance.now() - t0;
        if (exit?.code !== 0) throw new Error(`exec failed: ${JSON.stringify(exit)}`);
        local.push(dt);
        v.samples.push(dt);
      }
      console.log(`round ${r} ${v.name}: p50 ${pct(local, 50).toFixed(2)} ms, p99 ${pct(local, 99).toFixed(2)} ms`);
    }
  }
  for (const v of variants)
    console.log(`${v.name}: n=${v.samples.length} p50 ${pct(v.samples, 50).toFixed(2)} ms, p90 ${pct(v.samples, 90).toFixed(2)} ms, p99 ${pct(v.samples, 99).toFixed(2)} ms`);
} finally {
  await vm.destroy();
}
