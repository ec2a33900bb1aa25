/**
 * podflare soak: N create -> exec -> destroy cycles through the TypeScript SDK, P at a
 * time, against a daemon running as its own process. Prints the errors (must be 0), the
 * rate, the daemon's open file descriptors and RSS over the run, and what is left
 * afterwards: files in the daemon's vms/, layers/ and shm directories and QEMU processes.
 *
 *   node bench/dist/soak.js [--cycles 1000] [--parallel 8]
 */
import { readdir } from "node:fs/promises";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { Sandbox } from "podflare";
import { benchDirs, poolFull, qemuPidsUnder, rssAndFds, startDaemon } from "./daemon.js";

const { values: argv } = parseArgs({
  options: {
    cycles: { type: "string", default: "1000" },
    parallel: { type: "string", default: "8" },
    "sample-every": { type: "string", default: "100" },
  },
});
const CYCLES = Number(argv.cycles);
const PARALLEL = Number(argv.parallel);
const EVERY = Number(argv["sample-every"]);
if (!(CYCLES > 0 && PARALLEL > 0 && EVERY > 0)) {
  console.error("usage: soak [--cycles N] [--parallel P] [--sample-every K]");
  process.exit(2);
}

interface Sample {
  at: string;
  cycles: number;
  fds: number;
  rssMiB: number;
  vms: number;
}

async function count(dir: string): Promise<number> {
  return (await readdir(dir).catch(() => [])).length;
}

async function filesUnder(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const e of await readdir(dir, { withFileTypes: true, recursive: true }).catch(() => []))
    if (!e.isDirectory())
      out.push(join(e.parentPath ?? (e as { path?: string }).path ?? "", e.name));
  return out;
}

async function sample(pid: number, at: string, cycles: number, vmsDir: string): Promise<Sample> {
  const { rssMib, fds } = await rssAndFds(pid);
  return { at, cycles, fds, rssMiB: rssMib, vms: await count(vmsDir) };
}

async function main(): Promise<void> {
  // Templates are keyed by content and built under a lock: share the tests' ones.
  const templates = process.env.PODFLARE_TEMPLATES_DIR || "/dev/shm/podflare-test-templates";
  const dirs = await benchDirs("podflare-soak", templates);
  const { state, shm, env } = dirs;
  const vmsDir = join(state, "vms");
  console.log(`podflare soak: ${CYCLES} create -> exec -> destroy cycles, ${PARALLEL} in parallel`);
  const d = await startDaemon(env);
  const pid = d.child.pid as number;
  const samples: Sample[] = [];
  const errors: string[] = [];
  const print = (s: Sample) =>
    console.log(
      `  ${s.at.padEnd(8)} cycles ${String(s.cycles).padStart(5)}  fds ${String(s.fds).padStart(4)}  rss ${s.rssMiB.toFixed(1).padStart(6)} MiB  vm dirs ${s.vms}`,
    );
  let left: { vms: string[]; layers: string[]; shm: string[]; qemu: number[] } | null = null;
  let elapsed = 0;
  try {
    // Warm-up, not counted: one cycle per worker opens the HTTP keep-alive connections the
    // run then reuses, so the start's fd count already includes them.
    await Promise.all(
      Array.from({ length: PARALLEL }, async () => {
        const s = await Sandbox.create({ host: d.url });
        await s.runCode("1");
        await s.close();
      }),
    );
    await poolFull(d.url);
    samples.push(await sample(pid, "start", 0, vmsDir));
    print(samples[0] as Sample);

    let started = 0;
    let done = 0;
    let nextSample = EVERY;
    const t0 = performance.now();
    const worker = async () => {
      for (;;) {
        const k = started++;
        if (k >= CYCLES) return;
        try {
          const s = await Sandbox.create({ host: d.url });
          try {
            const r = await s.runCode(`print(${k} * 2)`);
            if (r.exitCode !== 0 || r.stdout !== `${k * 2}\n`)
              throw new Error(
                `exec: code ${r.exitCode}, stdout ${JSON.stringify(r.stdout).slice(0, 100)}, stderr ${r.stderr.slice(0, 200)}`,
              );
          } finally {
            await s.close();
          }
        } catch (err) {
          errors.push(`cycle ${k}: ${(err as Error).message}`);
        }
        done++;
        if (done >= nextSample && done < CYCLES) {
          nextSample += EVERY;
          const s = await sample(pid, "during", done, vmsDir);
          samples.push(s);
          print(s);
        }
      }
    };
    await Promise.all(Array.from({ length: PARALLEL }, worker));
    elapsed = (performance.now() - t0) / 1000;
    // Comparable with the start: every sandbox destroyed and its cleanup finished, the
    // pool refilled.
    await poolFull(d.url);
    const running = (await Sandbox.list({ host: d.url })).length;
    if (running !== 0) errors.push(`${running} sandboxes still listed after the run`);
    const end = await sample(pid, "end", done, vmsDir);
    samples.push(end);
    print(end);
  } finally {
    await d.stop();
    left = {
      vms: await filesUnder(vmsDir),
      layers: await filesUnder(join(state, "layers")),
      shm: (await filesUnder(shm)).filter((f) => !f.startsWith(templates)),
      qemu: await qemuPidsUnder(state),
    };
    await dirs.remove();
  }

  const first = samples[0] as Sample;
  const last = samples.at(-1) as Sample;
  const maxRss = Math.max(...samples.map((s) => s.rssMiB));
  console.log("");
  console.log(`errors: ${errors.length}`);
  for (const e of errors.slice(0, 20)) console.log(`  ${e}`);
  console.log(
    `cycles/s: ${(CYCLES / elapsed).toFixed(2)} (${CYCLES} cycles in ${elapsed.toFixed(1)} s)`,
  );
  console.log(
    `daemon fds: start ${first.fds}, end ${last.fds} (max ${Math.max(...samples.map((s) => s.fds))})`,
  );
  console.log(
    `daemon RSS: start ${first.rssMiB.toFixed(1)} MiB, end ${last.rssMiB.toFixed(1)} MiB (max ${maxRss.toFixed(1)})`,
  );
  console.log(`VM directories with the pool refilled: start ${first.vms}, end ${last.vms}`);
  console.log(
    `left after the daemon stopped: vms/ ${left.vms.length} files, layers/ ${left.layers.length} files, shm ${left.shm.length} files, QEMU processes ${left.qemu.length}`,
  );
  for (const f of [...left.vms, ...left.layers, ...left.shm].slice(0, 20))
    console.log(`  left: ${f}`);
  if (
    errors.length > 0 ||
    left.vms.length + left.layers.length + left.shm.length + left.qemu.length > 0
  )
    process.exitCode = 1;
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
