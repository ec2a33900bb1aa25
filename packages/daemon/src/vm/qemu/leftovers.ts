/**
 * What an earlier run of the QEMU backend left on this host: QEMU processes still running
 * from our directories, their VM cgroups, VM directories, memory files, disk layers and
 * fork directories. A VM cannot outlive the daemon that ran it (QEMU dies with its parent
 * and the host channels were socketpairs), so all of it is removed at start-up.
 */
import { readdir, readFile, rm } from "node:fs/promises";
import { dirname, join } from "node:path";
import { CgroupManager, cgroupScopeOf } from "../../jail/cgroup.js";
import type { Logger } from "../../util/logger.js";
import type { LeftoversReport } from "../backend.js";

/**
 * QEMU processes whose command line points into one of our directories (a VM's
 * directory; a fork's, for receivers of runs before issue 12): their -pidfile is there. They run under
 * per-VM uids, so the uid tells nothing; the path does.
 */
export async function findStrayQemus(...dirs: string[]): Promise<number[]> {
  const pids: number[] = [];
  for (const entry of await readdir("/proc").catch(() => [] as string[])) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    const cmdline = await readFile(`/proc/${entry}/cmdline`, "utf8").catch(() => "");
    const argv = cmdline.split("\0");
    if (
      argv.some((a) => a.includes("qemu-system")) &&
      argv.some((a) => dirs.some((d) => a.startsWith(`${d}/`)))
    ) {
      pids.push(Number(entry));
    }
  }
  return pids;
}

export async function removeLeftovers(
  dirs: { vmsDir: string; vmMemDir: string; layersDir: string; forksDir: string },
  log: Logger,
): Promise<LeftoversReport> {
  const report: LeftoversReport = { processesKilled: 0, filesRemoved: 0, cgroupsRemoved: 0 };
  for (const pid of await findStrayQemus(dirs.vmsDir, dirs.forksDir)) {
    try {
      process.kill(pid, "SIGKILL");
      report.processesKilled++;
    } catch {}
  }
  // This state directory's VM groups (what is left in one is killed first).
  const cgroups = await CgroupManager.detect(cgroupScopeOf(dirname(dirs.vmsDir)), log);
  if (cgroups) {
    const stale = await cgroups.removeStale();
    report.cgroupsRemoved += stale.groups;
    report.processesKilled += stale.killed;
  }
  for (const dir of [dirs.vmsDir, dirs.vmMemDir, dirs.layersDir, dirs.forksDir]) {
    for (const entry of await readdir(dir).catch(() => [] as string[])) {
      await rm(join(dir, entry), { recursive: true, force: true });
      report.filesRemoved++;
    }
  }
  return report;
}
