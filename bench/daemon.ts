/**
 * What every benchmark needs: a real daemon as its own process (private state and memory
 * directories, the image built by setup), percentiles, and the host-side view of a
 * process (PSS, CPU ticks, RSS, open files).
 */
import { type ChildProcess, spawn } from "node:child_process";
import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { daemonDirMode, ensureSafeDir, loadConfig, repoRoot } from "@podflare/daemon";

export interface BenchDaemon {
  child: ChildProcess;
  url: string;
  stop(): Promise<void>;
}

/**
 * Private directories for one benchmark run (templates too, unless `templatesDir` names
 * shared ones); `remove()` deletes them.
 */
export async function benchDirs(
  prefix = "podflare-bench",
  templatesDir?: string,
): Promise<{
  env: Record<string, string>;
  state: string;
  shm: string;
  remove(): Promise<void>;
}> {
  const state = await mkdtemp(join(tmpdir(), `${prefix}-`));
  const shm = join("/dev/shm", `${prefix}-${state.slice(-6)}`);
  // A name known in advance in world-writable /dev/shm: made here, or refused when someone
  // else made it first (the daemon checks it again, and the templates directory).
  const mode = daemonDirMode(loadConfig());
  ensureSafeDir(state, mode, "the bench state dir");
  ensureSafeDir(shm, mode, "the bench shm dir");
  if (templatesDir) ensureSafeDir(templatesDir, mode, "the shared bench templates dir");
  return {
    state,
    shm,
    env: {
      PODFLARE_STATE_DIR: state,
      PODFLARE_SHM_DIR: shm,
      PODFLARE_IMAGES_DIR: loadConfig().imagesDir,
      PODFLARE_TEMPLATES_DIR: templatesDir ?? join(shm, "templates"),
    },
    remove: async () => {
      await rm(state, { recursive: true, force: true });
      await rm(shm, { recursive: true, force: true });
    },
  };
}

export async function startDaemon(env: Record<string, string>): Promise<BenchDaemon> {
  const child = spawn(process.execPath, [join(repoRoot, "packages/cli/dist/main.js"), "serve"], {
    env: { ...process.env, PODFLARE_PORT: "0", PODFLARE_LOG_LEVEL: "info", ...env },
    stdio: ["ignore", "ignore", "pipe"],
  });
  const url = await new Promise<string>((resolve, reject) => {
    let log = "";
    child.stderr?.setEncoding("utf8");
    child.stderr?.on("data", (c: string) => {
      log = (log + c).slice(-20_000);
      const m = /"address":"(http:\/\/[^"]+)".*podflared listening/.exec(log);
      if (m?.[1]) resolve(m[1]);
    });
    child.once("exit", (code) =>
      reject(new Error(`daemon exited (${code}):\n${log.slice(-3000)}`)),
    );
  });
  return {
    child,
    url,
    stop: async () => {
      const exited = new Promise((r) => child.once("exit", r));
      child.kill("SIGTERM");
      await exited;
    },
  };
}

/** Wait until the warm pool is full and no refill is running. */
export async function poolFull(url: string): Promise<void> {
  for (;;) {
    const cap = (await (await fetch(`${url}/v1/capacity`)).json()) as {
      pool: { target: number; ready: number; refilling: number };
    };
    if (cap.pool.ready >= cap.pool.target && cap.pool.refilling === 0) return;
    await new Promise((r) => setTimeout(r, 25));
  }
}

export function pct(samples: number[], p: number): number {
  const s = [...samples].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] ?? Number.NaN;
}

export const fmt = (ms: number) => (ms >= 100 ? ms.toFixed(0) : ms.toFixed(1));

/** PSS (KiB) and CPU ticks of a process. */
export async function procStats(pid: number): Promise<{ pssKiB: number; ticks: number }> {
  const rollup = await readFile(`/proc/${pid}/smaps_rollup`, "utf8");
  const stat = (await readFile(`/proc/${pid}/stat`, "utf8")).split(") ")[1]?.split(" ") ?? [];
  return {
    pssKiB: Number(/^Pss:\s+(\d+)/m.exec(rollup)?.[1] ?? 0),
    ticks: Number(stat[11]) + Number(stat[12]),
  };
}

/** Resident memory (MiB) and open file descriptors of a process. */
export async function rssAndFds(pid: number): Promise<{ rssMib: number; fds: number }> {
  const status = await readFile(`/proc/${pid}/status`, "utf8");
  const rssKiB = Number(/^VmRSS:\s+(\d+)/m.exec(status)?.[1] ?? 0);
  return { rssMib: rssKiB / 1024, fds: (await readdir(`/proc/${pid}/fd`)).length };
}

export async function qemuPidsUnder(dir: string): Promise<number[]> {
  const pids: number[] = [];
  for (const e of await readdir("/proc")) {
    if (!/^\d+$/.test(e)) continue;
    const cmd = await readFile(`/proc/${e}/cmdline`, "utf8").catch(() => "");
    if (cmd.includes("qemu-system") && cmd.includes(dir)) pids.push(Number(e));
  }
  return pids;
}
