/**
 * Per-VM control groups: a memory limit, a pids limit and a CPU limit (quota and weight)
 * for each QEMU, with what the host offers: cgroup v2 when the unified hierarchy holds
 * the memory, pids and cpu controllers for us, else cgroup v1 (one hierarchy per
 * controller). VM groups live under the daemon's own group, per controller:
 * `<own path>/podflare/<scope>/<vm id>` (scope: a hash of the state directory, so
 * daemons sharing a parent group never touch each other's). Where nothing is writable
 * the daemon logs once and carries on without limits.
 */
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { mkdir, readdir, readFile, rmdir, writeFile } from "node:fs/promises";
import { join, resolve } from "node:path";
import type { Logger } from "../util/logger.js";
import type { VmShape } from "../vm/backend.js";

const MiB = 1024 * 1024;

/**
 * QEMU threads: the main loop, RCU, one per vCPU, the block I/O thread pool (up to 64
 * workers by default), a migration thread during saves and forks, and a few more.
 */
const PIDS_BASE = 96;
const CFS_PERIOD_US = 100_000;

export interface CgroupLimits {
  memoryBytes: number;
  pidsMax: number;
  /** CPU bandwidth: `quotaUs` per `periodUs` (vCPUs × period: at most its vCPUs' worth). */
  cpuQuotaUs: number;
  cpuPeriodUs: number;
  /** v1 cpu.shares (1024 per vCPU) and v2 cpu.weight (100 per vCPU), at nice 0. */
  cpuShares: number;
  cpuWeight: number;
}

/**
 * Memory: a clone maps its template's memory copy-on-write, and a page the template never
 * touched is a hole in that (shmem) file. The first clone to fault such a page in makes
 * the kernel allocate it in the shared file, charged to that clone's group, and then
 * copies it into the clone's private memory, charged again. So a clone that touches all
 * its guest RAM is charged up to twice it (measured: an OOM kill at guest + overhead,
 * with 600 MiB of shmem charged beside 680 MiB of private memory), though only the
 * private half is its own; the shared pages serve every later clone of the template.
 */
/** `overheadMib`: the VM process's own memory beyond guest RAM (the backend's figure). */
export function vmCgroupLimits(shape: VmShape, overheadMib: number): CgroupLimits {
  return {
    memoryBytes: (2 * shape.memSizeMib + overheadMib) * MiB,
    pidsMax: PIDS_BASE + shape.vcpuCount,
    cpuQuotaUs: shape.vcpuCount * CFS_PERIOD_US,
    cpuPeriodUs: CFS_PERIOD_US,
    cpuShares: 1024 * shape.vcpuCount,
    cpuWeight: Math.min(10_000, 100 * shape.vcpuCount),
  };
}

/**
 * The kernel's nice-to-weight table (sched_prio_to_weight) at the points we use, as a
 * factor of nice 0's weight: nice alone does not compete across groups, so a VM restored
 * at refill priority gets a group weight scaled the same way.
 */
export function niceFactor(nice: number): number {
  const n = Math.max(-20, Math.min(19, Math.round(nice)));
  // 1.25 per nice step is the scheduler's rule (weights 1024 / 1.25^nice).
  return 1 / 1.25 ** n;
}

export function scaledShares(
  limits: CgroupLimits,
  nice: number,
): { shares: number; weight: number } {
  const f = niceFactor(nice);
  return {
    shares: Math.max(2, Math.round(limits.cpuShares * f)),
    weight: Math.max(1, Math.min(10_000, Math.round(limits.cpuWeight * f))),
  };
}

/** /proc/self/cgroup: controller (v1) or "" (v2) -> path. */
export function parseProcCgroup(text: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const line of text.split("\n")) {
    const m = /^\d+:([^:]*):(.*)$/.exec(line.trim());
    if (!m) continue;
    const [, controllers = "", path = "/"] = m;
    if (controllers === "") out.set("", path);
    for (const c of controllers.split(",")) if (c) out.set(c, path);
  }
  return out;
}

export interface CgroupMount {
  type: "cgroup" | "cgroup2";
  mountPoint: string;
  /** The group the mount's root is (not "/" inside a cgroup namespace bind mount). */
  root: string;
  controllers: string[];
}

/** The cgroup mounts of /proc/self/mountinfo. */
export function parseMountinfo(text: string): CgroupMount[] {
  const out: CgroupMount[] = [];
  for (const line of text.split("\n")) {
    const parts = line.split(" - ");
    if (parts.length < 2) continue;
    const left = (parts[0] ?? "").split(" ");
    const right = (parts[1] ?? "").split(" ");
    const type = right[0];
    if (type !== "cgroup" && type !== "cgroup2") continue;
    const superOpts = (right[2] ?? "").split(",");
    out.push({
      type,
      mountPoint: (left[4] ?? "").replace(/\\040/g, " "),
      root: left[3] ?? "/",
      controllers: type === "cgroup" ? superOpts.filter((o) => o !== "rw" && o !== "ro") : [],
    });
  }
  return out;
}

function within(mount: CgroupMount, path: string): string {
  const rel =
    mount.root !== "/" && path.startsWith(mount.root) ? path.slice(mount.root.length) : path;
  const dir = join(mount.mountPoint, rel);
  return dir.length > 1 ? dir.replace(/\/+$/, "") : dir;
}

export type CgroupLayout =
  | { version: 2; base: string }
  | { version: 1; bases: { memory: string; pids: string; cpu: string } };

/** Where the daemon's own groups are, from mountinfo and /proc/self/cgroup (pure). */
export function cgroupLayout(
  mounts: CgroupMount[],
  self: Map<string, string>,
  v2Controllers: (dir: string) => string[],
): CgroupLayout | { none: string } {
  const unified = mounts.find((m) => m.type === "cgroup2");
  const own2 = self.get("");
  if (unified && own2 !== undefined) {
    const dir = within(unified, own2);
    const have = v2Controllers(dir);
    if (["memory", "pids", "cpu"].every((c) => have.includes(c))) return { version: 2, base: dir };
  }
  const bases: Partial<Record<"memory" | "pids" | "cpu", string>> = {};
  for (const c of ["memory", "pids", "cpu"] as const) {
    const mount = mounts.find((m) => m.type === "cgroup" && m.controllers.includes(c));
    const own = self.get(c);
    if (mount && own !== undefined) bases[c] = within(mount, own);
  }
  if (bases.memory && bases.pids && bases.cpu)
    return { version: 1, bases: bases as { memory: string; pids: string; cpu: string } };
  const missing = ["memory", "pids", "cpu"].filter((c) => !bases[c as "memory"]);
  return {
    none: `no cgroup v2 with memory, pids and cpu, and no v1 hierarchy for ${missing.join(", ")}`,
  };
}

function readControllers(dir: string): string[] {
  try {
    return readFileSync(join(dir, "cgroup.controllers"), "utf8").trim().split(/\s+/);
  } catch {
    return [];
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** One VM's group (one directory per v1 controller, one in v2). */
export class VmCgroup {
  constructor(
    readonly version: 1 | 2,
    /** v1: memory, pids, cpu directories; v2: one directory. */
    readonly dirs: string[],
    readonly limits: CgroupLimits,
  ) {}

  /** Move the process (all its threads) into the group. */
  async attach(pid: number): Promise<void> {
    for (const dir of this.dirs) await writeFile(join(dir, "cgroup.procs"), String(pid));
  }

  /** Follow the VM's nice level (refills run at a lower weight until handed out). */
  async setNice(nice: number): Promise<void> {
    const { shares, weight } = scaledShares(this.limits, nice);
    if (this.version === 2)
      await writeFile(join(this.dirs[0] as string, "cpu.weight"), String(weight));
    else await writeFile(join(this.dirs[2] as string, "cpu.shares"), String(shares));
  }

  /** Remove the group once its processes have exited (a reaped process may linger briefly). */
  async remove(): Promise<void> {
    for (const dir of this.dirs) await removeGroup(dir);
  }
}

async function removeGroup(dir: string): Promise<void> {
  for (let attempt = 0; ; attempt++) {
    try {
      await rmdir(dir);
      return;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === "ENOENT") return;
      if (code !== "EBUSY" || attempt >= 50) throw err;
      await sleep(20);
    }
  }
}

/** Kill what is left in a group and remove it (start-up reconciliation). */
async function killAndRemove(dir: string): Promise<number> {
  let killed = 0;
  const procs = await readFile(join(dir, "cgroup.procs"), "utf8").catch(() => "");
  for (const pid of procs.split("\n").filter(Boolean)) {
    try {
      process.kill(Number(pid), "SIGKILL");
      killed++;
    } catch {}
  }
  await removeGroup(dir).catch(() => {});
  return killed;
}

export class CgroupManager {
  private constructor(
    readonly layout: CgroupLayout,
    /** Per controller (v1) or the one (v2) parent of this daemon's VM groups. */
    readonly parents: string[],
  ) {}

  get version(): 1 | 2 {
    return this.layout.version;
  }

  /**
   * Find the hierarchy and make `<own>/podflare/<scope>` in it; null (after one log
   * line) when the host has no usable cgroups or they are not writable.
   */
  static async detect(scope: string, log: Logger): Promise<CgroupManager | null> {
    if (!/^[a-z0-9_-]{1,64}$/.test(scope)) throw new RangeError(`bad cgroup scope ${scope}`);
    let layout: CgroupLayout | { none: string };
    try {
      layout = cgroupLayout(
        parseMountinfo(await readFile("/proc/self/mountinfo", "utf8")),
        parseProcCgroup(await readFile("/proc/self/cgroup", "utf8")),
        readControllers,
      );
    } catch (err) {
      layout = { none: String(err) };
    }
    if ("none" in layout) {
      log.warn({ reason: layout.none }, "per-VM cgroup limits are off");
      return null;
    }
    const bases = layout.version === 2 ? [layout.base] : Object.values(layout.bases);
    const parents = bases.map((b) => join(b, "podflare", scope));
    try {
      for (const p of parents) await mkdir(p, { recursive: true });
      if (layout.version === 2) {
        // Controllers must be enabled on the way down; a group that holds processes
        // (our own, usually) cannot delegate them, and then v2 is not usable for us.
        for (const dir of [layout.base, join(layout.base, "podflare"), parents[0] as string])
          await writeFile(join(dir, "cgroup.subtree_control"), "+memory +pids +cpu");
      }
    } catch (err) {
      log.warn(
        { err: String(err), version: layout.version, at: parents },
        "per-VM cgroup limits are off: the cgroup hierarchy is not writable here",
      );
      return null;
    }
    log.info({ version: layout.version, at: parents }, "per-VM cgroup limits are on");
    return new CgroupManager(layout, parents);
  }

  /** Create the VM's group with its limits (not yet holding any process). */
  async create(name: string, limits: CgroupLimits): Promise<VmCgroup> {
    const dirs = this.parents.map((p) => join(p, name));
    for (const d of dirs) await mkdir(d);
    const group = new VmCgroup(this.version, dirs, limits);
    try {
      const w = (dir: string, file: string, value: string | number) =>
        writeFile(join(dir, file), String(value));
      if (this.layout.version === 2) {
        const [dir] = dirs as [string];
        await w(dir, "memory.max", limits.memoryBytes);
        await w(dir, "memory.swap.max", 0).catch(() => {}); // absent without swap accounting
        await w(dir, "pids.max", limits.pidsMax);
        await w(dir, "cpu.max", `${limits.cpuQuotaUs} ${limits.cpuPeriodUs}`);
        await w(dir, "cpu.weight", limits.cpuWeight);
      } else {
        const [memory, pids, cpu] = dirs as [string, string, string];
        await w(memory, "memory.limit_in_bytes", limits.memoryBytes);
        await w(pids, "pids.max", limits.pidsMax);
        await w(cpu, "cpu.cfs_period_us", limits.cpuPeriodUs);
        await w(cpu, "cpu.cfs_quota_us", limits.cpuQuotaUs);
        await w(cpu, "cpu.shares", limits.cpuShares);
      }
    } catch (err) {
      await group.remove().catch(() => {});
      throw err;
    }
    return group;
  }

  /** Shutdown: remove this daemon's (by then empty) parent groups; best effort. */
  async close(): Promise<void> {
    for (const parent of this.parents) await rmdir(parent).catch(() => {});
  }

  /** Start-up: kill whatever a previous run left in our groups and remove them. */
  async removeStale(): Promise<{ groups: number; killed: number }> {
    let groups = 0;
    let killed = 0;
    for (const parent of this.parents) {
      for (const entry of await readdir(parent, { withFileTypes: true }).catch(() => [])) {
        if (!entry.isDirectory()) continue;
        killed += await killAndRemove(join(parent, entry.name));
        groups++;
      }
    }
    return { groups, killed };
  }
}

/** The cgroup scope of a daemon: its state directory, hashed. */
export function cgroupScopeOf(stateDir: string): string {
  return createHash("sha256").update(resolve(stateDir)).digest("hex").slice(0, 12);
}
