/**
 * Test harness: a real daemon on a random loopback port with its own state directory
 * and memory directory, sharing the built guest image (cached by content hash).
 */
import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtemp, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  type Config,
  createLogger,
  type Daemon,
  daemonDirMode,
  ensureSafeDir,
  loadConfig,
  repoRoot,
  Store,
  startDaemon,
} from "@podflare/daemon";

export const IMAGES_DIR = process.env.PODFLARE_IMAGES_DIR || "/var/lib/podflare/images";
/** Shared by every test daemon of a run: a template is built once (under a lock). */
export const TEMPLATES_DIR =
  process.env.PODFLARE_TEMPLATES_DIR || "/dev/shm/podflare-test-templates";

export async function testConfig(overrides: Partial<Config> = {}): Promise<Config> {
  const stateDir = overrides.stateDir ?? (await mkdtemp(join(tmpdir(), "podflare-test-")));
  const config = loadConfig({
    stateDir,
    imagesDir: IMAGES_DIR,
    // Its own name (a stateDir given by the caller may end in anything, e.g. "/state").
    shmDir: join("/dev/shm", `podflare-test-${randomBytes(4).toString("hex")}`),
    templatesDir: TEMPLATES_DIR,
    poolSize: 2,
    maxConcurrentRestores: 2,
    port: 0,
    logLevel: process.env.PODFLARE_TEST_LOG ?? "warn",
    ...overrides,
  });
  // Their names are known in advance in world-writable /dev/shm: made here, or refused
  // when someone else made them first (a test that plants one passes its own).
  if (!overrides.shmDir) ensureSafeDir(config.shmDir, daemonDirMode(config), "the test shm dir");
  if (!overrides.templatesDir)
    ensureSafeDir(config.templatesDir, daemonDirMode(config), "the shared test templates dir");
  return config;
}

/** Remove a test configuration's state and memory directories. */
export async function removeTestDirs(config: Config): Promise<void> {
  await rm(config.stateDir, { recursive: true, force: true });
  await rm(config.shmDir, { recursive: true, force: true });
}

export interface TestDaemon {
  url: string;
  daemon: Daemon;
  config: Config;
  /** Stop the daemon, then check nothing of any VM is left, then remove the state. */
  close(): Promise<void>;
}

export async function startTestDaemon(overrides: Partial<Config> = {}): Promise<TestDaemon> {
  const config = await testConfig(overrides);
  const daemon = await startDaemon(config, createLogger(config.logLevel));
  return {
    url: daemon.url,
    daemon,
    config,
    close: async () => {
      await daemon.close();
      await removeTestDirs(config);
    },
  };
}

export async function listDir(path: string): Promise<string[]> {
  return readdir(path).catch(() => []);
}

/** Sandbox rows in every state: a create that reached the service leaves one at once. */
export function sandboxRows(d: TestDaemon): number {
  const store = new Store(join(d.config.stateDir, "podflare.db"));
  try {
    return store.listSandboxes(["creating", "ready", "dead", "destroying", "ended"]).length;
  } finally {
    store.close();
  }
}

/** PIDs of QEMU processes whose command line mentions `needle`. */
export async function qemuPids(needle: string): Promise<number[]> {
  const pids: number[] = [];
  for (const entry of await listDir("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    const { readFile } = await import("node:fs/promises");
    const cmd = await readFile(`/proc/${entry}/cmdline`, "utf8").catch(() => "");
    if (cmd.includes("qemu-system") && cmd.includes(needle)) pids.push(Number(entry));
  }
  return pids;
}

/** Wait for a condition that an event elsewhere (a process exit, a timer) makes true. */
export async function eventually<T>(
  what: string,
  probe: () => Promise<T | undefined | false>,
  timeoutMs = 30_000,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value) return value;
    if (Date.now() > deadline)
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** A test configuration as the environment of a `podflare serve` process. */
export async function serveEnv(overrides: Partial<Config> = {}): Promise<{
  config: Config;
  env: NodeJS.ProcessEnv;
  remove: () => Promise<void>;
}> {
  const config = await testConfig(overrides);
  const env = {
    ...process.env,
    PODFLARE_STATE_DIR: config.stateDir,
    PODFLARE_IMAGES_DIR: config.imagesDir,
    PODFLARE_SHM_DIR: config.shmDir,
    PODFLARE_TEMPLATES_DIR: config.templatesDir,
    PODFLARE_POOL_SIZE: String(config.poolSize),
    PODFLARE_PORT: "0",
    PODFLARE_LOG_LEVEL: "info",
  };
  const remove = () => removeTestDirs(config);
  return { config, env, remove };
}

/** `podflare serve` as its own process (for kill -9 tests); resolves once it listens. */
export function serve(env: NodeJS.ProcessEnv): Promise<{ child: ChildProcess; url: string }> {
  const child = spawn(process.execPath, [join(repoRoot, "packages/cli/dist/main.js"), "serve"], {
    env,
    stdio: ["ignore", "ignore", "pipe"],
  });
  return new Promise((resolve, reject) => {
    let log = "";
    child.stderr?.setEncoding("utf8");
    child.stderr?.on("data", (chunk: string) => {
      log += chunk;
      const m = /"address":"(http:\/\/[^"]+)".*podflared listening/.exec(log);
      if (m?.[1]) resolve({ child, url: m[1] });
    });
    child.once("exit", (code) =>
      reject(new Error(`daemon exited (${code}) before listening:\n${log.slice(-3000)}`)),
    );
  });
}
