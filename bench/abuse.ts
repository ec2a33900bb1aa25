/**
 * A misbehaving sandbox and its neighbour: while one sandbox allocates twice its memory,
 * runs fork bombs, fills its disk, loops forever and prints 1 GiB, a neighbouring sandbox
 * keeps executing `print(1)`; its latency is compared with the same measurement while the
 * abuser is idle (the same-run reference), and the daemon's RSS and open files are
 * sampled throughout. Everything goes through the TypeScript SDK to a daemon process.
 *
 *   node bench/dist/abuse.js [--samples N]
 */
import { parseArgs } from "node:util";
import { Sandbox } from "podflare";
import { benchDirs, fmt, pct, rssAndFds, startDaemon } from "./daemon.js";

const { values: argv } = parseArgs({ options: { samples: { type: "string", default: "40" } } });
const SAMPLES = Number(argv.samples);

const CASES: { name: string; code: string; language?: "python" | "bash"; timeoutMs: number }[] = [
  {
    name: "idle (reference)",
    code: "import time; time.sleep(8)",
    timeoutMs: 60_000,
  },
  {
    name: "allocate twice its memory",
    code: "chunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))",
    timeoutMs: 60_000,
  },
  {
    name: "fork bomb (os.fork)",
    code: "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    timeoutMs: 10_000,
  },
  { name: "fork bomb (bash)", code: ":(){ :|:& };:", language: "bash", timeoutMs: 10_000 },
  {
    name: "fill the disk",
    code: "fallocate -l $(( $(df --output=avail -B1 / | tail -1) - 4096 )) /fill; dd if=/dev/zero of=/more bs=1M count=64; rm -f /fill /more",
    language: "bash",
    timeoutMs: 60_000,
  },
  { name: "loop forever", code: "while True: pass", timeoutMs: 8_000 },
  {
    name: "print 1 GiB",
    code: "import sys\nblock = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(block)",
    timeoutMs: 120_000,
  },
];

async function main(): Promise<void> {
  const dirs = await benchDirs();
  const d = await startDaemon({ ...dirs.env, PODFLARE_POOL_SIZE: "2" });
  const pid = d.child.pid as number;
  console.log("abuse beside a neighbour (TypeScript SDK over HTTP, one daemon process)");
  console.log(
    "case | abuser outcome | neighbour exec p50 / p99 ms | daemon RSS max MiB | daemon fds max",
  );
  try {
    const abuser = await Sandbox.create({ host: d.url });
    const neighbour = await Sandbox.create({ host: d.url });
    await neighbour.runCode("print(1)");
    const start = await rssAndFds(pid);
    console.log(`(daemon at start: RSS ${start.rssMib} MiB, ${start.fds} fds)`);
    for (const c of CASES) {
      let done = false;
      let outcome = "";
      const abuse = abuser
        .runCode(c.code, { language: c.language ?? "python", timeoutMs: c.timeoutMs })
        .then((r) => {
          outcome = `exit ${r.exitCode}${r.error ? ` ${r.error.name}` : ""}${r.truncated ? " truncated" : ""}`;
        })
        .catch((err: Error) => {
          outcome = `error: ${err.message.slice(0, 80)}`;
        })
        .finally(() => {
          done = true;
        });
      const lat: number[] = [];
      let rssMax = 0;
      let fdsMax = 0;
      while (lat.length < SAMPLES || !done) {
        const t0 = performance.now();
        const r = await neighbour.runCode("print(1)");
        lat.push(performance.now() - t0);
        if (r.stdout !== "1\n") throw new Error(`neighbour answered ${JSON.stringify(r)}`);
        const s = await rssAndFds(pid);
        rssMax = Math.max(rssMax, s.rssMib);
        fdsMax = Math.max(fdsMax, s.fds);
        if (lat.length >= 4 * SAMPLES && done) break;
      }
      await abuse;
      const next = await abuser.runCode("print('next')");
      console.log(
        `${c.name} | ${outcome}; next call: ${next.stdout.trim() === "next" ? "ok" : JSON.stringify(next)} | ${fmt(pct(lat, 50))} / ${fmt(pct(lat, 99))} (n=${lat.length}) | ${Math.round(rssMax)} | ${fdsMax}`,
      );
    }
    await abuser.close();
    await neighbour.close();
  } finally {
    await d.stop();
    await dirs.remove();
  }
}

await main();
