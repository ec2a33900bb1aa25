/**
 * Fork a running VM n ways without moving its RAM. Every VM of a lineage maps its root
 * template's memory privately; what a sandbox changed since is its own anonymous pages.
 * The parent is paused only to capture itself: its disk is frozen with blockdev-snapshot
 * (it goes on in a new overlay), its devices are saved without RAM
 * (xen-save-devices-state) into a file of the daemon's, and its private pages are read
 * into the daemon's memory (guest-ram.ts). Each child, spawned as soon as the disk is
 * frozen, maps the same root template privately, gets those pages written into its RAM
 * before its devices load, and then is an ordinary restore: its own overlay on the frozen
 * disk, fresh entropy, clock and identity. No file the size of guest RAM is made, and a
 * fork of a fork costs the same: the pages are the sandbox's own, however deep it is.
 */

import { randomBytes } from "node:crypto";
import { closeSync, constants } from "node:fs";
import { chmod, copyFile, rm } from "node:fs/promises";
import { join } from "node:path";
import { CleanupStack } from "../../util/cleanup.js";
import { crashPoint } from "../../util/crash-points.js";
import { createExclusive } from "../../util/safe-file.js";
import type { ForkResult } from "../backend.js";
import { addOverlayNode, settleFdsets } from "./disk-fds.js";
import type { TemplateFiles, VmEngine } from "./engine.js";
import {
  type CapturedPages,
  ramAddress,
  readPages,
  scanPrivatePages,
  writePages,
} from "./guest-ram.js";
import { createOverlayFile, formatOverlay } from "./overlay.js";
import { openStateFd, saveDevicesOnly } from "./snapshot.js";
import { type Vm, type VmLineage, withDisk } from "./vm.js";

type Steps = Record<string, number>;

export async function forkVm(
  engine: VmEngine,
  parent: Vm,
  childIds: readonly string[],
): Promise<ForkResult> {
  const lineage = parent.lineage;
  if (parent.disk.chain.length === 0 || !lineage)
    throw new Error(`VM ${parent.id} was cold-booted and cannot be forked`);
  const started = performance.now();
  const cleanup = new CleanupStack();
  const dir = join(engine.forksDir, `fork_${randomBytes(6).toString("hex")}`);
  engine.makeDir(dir); // the daemon's: no VM uid writes in it
  cleanup.defer("remove the fork's directory", () => rm(dir, { recursive: true, force: true }));
  // The fork's own references on what its children will map and open: the parent may be
  // destroyed (or flattened) before a child has taken its own.
  const memory = lineage.memory;
  if (memory) {
    const release = memory.retain();
    cleanup.defer("release the lineage's template memory", () => release());
  }
  const capture: Steps = {};
  const childSteps: Steps[] = childIds.map(() => ({}));
  try {
    // Root's, 0600, empty until the parent's devices are saved into it. Each child opens it
    // when it spawns (before that) and reads it once its RAM holds the parent's pages.
    const statePath = join(dir, "state");
    createExclusive(statePath, 0o600);
    let captured!: (p: CapturedPages) => void;
    let notCaptured!: (err: unknown) => void;
    const pagesReady = new Promise<CapturedPages>((resolve, reject) => {
      captured = resolve;
      notCaptured = reject;
    });
    pagesReady.catch(() => {});
    let children: Promise<PromiseSettledResult<Vm>[]> = Promise.resolve([]);
    const startChildren = (files: TemplateFiles) => {
      const layers = files.layers ?? [];
      engine.layers.retain(layers);
      cleanup.defer("release the children's disk layers", () => engine.layers.release(layers));
      children = Promise.allSettled(
        childIds.map((id, i) =>
          engine.restore(id, files, 0, {
            steps: childSteps[i] as Steps,
            beforeLoad: async (qemu, ram) => {
              // The pages as soon as they are scanned: the write follows the parent's read.
              const p = await pagesReady;
              const pid = qemu.pid;
              // Checked after the await: an exited (reaped) child's pid may be reused.
              if (!pid || qemu.hasExited) throw new Error(`child ${id} has no QEMU process`);
              await writePages(pid, ramAddress(pid, ram), p);
            },
          }),
        ),
      );
    };
    let pausedMs: number;
    try {
      pausedMs = await withDisk(parent.disk, async () => {
        const r = await captureParent(
          engine,
          parent,
          lineage,
          dir,
          statePath,
          capture,
          startChildren,
          captured,
        );
        return r.pausedMs;
      });
    } catch (err) {
      notCaptured(err);
      await destroyAll(await children);
      throw err;
    }
    const settled = await children;
    const failed = settled.find((r) => r.status === "rejected");
    if (failed) {
      await destroyAll(settled);
      throw failed.reason;
    }
    engine.opts.log.debug(
      {
        vm: parent.id,
        n: childIds.length,
        capture: rounded(capture),
        children: childSteps.map(rounded),
        ms: Math.round(performance.now() - started),
      },
      "fork steps (ms)",
    );
    return { children: settled.map((r) => (r as PromiseFulfilledResult<Vm>).value), pausedMs };
  } finally {
    // The page buffer is only reachable through the children's start, ended now: it goes.
    await cleanup.unwind();
  }
}

async function destroyAll(settled: PromiseSettledResult<Vm>[]): Promise<void> {
  await Promise.all(settled.map((r) => (r.status === "fulfilled" ? r.value.destroy() : null)));
}

function rounded(steps: Steps): Steps {
  return Object.fromEntries(Object.entries(steps).map(([k, v]) => [k, Math.round(v * 10) / 10]));
}

/**
 * Start the children (`startChildren`, given the files they restore from) once the
 * parent's next overlay exists; pause the parent, freeze its disk, save its devices, scan
 * its private pages (handed to `scanned`: the children's writes follow the read) and read
 * them, resume it.
 */
async function captureParent(
  engine: VmEngine,
  parent: Vm,
  lineage: VmLineage,
  dir: string,
  statePath: string,
  steps: Steps,
  startChildren: (files: TemplateFiles) => void,
  scanned: (pages: CapturedPages) => void,
): Promise<{ pages: CapturedPages; pausedMs: number }> {
  // Read inside the disk queue: a flatten that ran before may have changed the chain.
  const frozen = parent.disk.chain[0] as string;
  const qmp = parent.qemu.qmp;
  const pid = parent.qemu.pid;
  if (!pid) throw new Error(`VM ${parent.id} has no QEMU process`);
  const ram = ramAddress(pid, lineage.ram);
  // Made before the pause: the parent's next overlay and the children's clone overlay (both
  // root's, 0600, like every layer: QEMU gets them as fds, see disk-fds.ts).
  const next = engine.layers.pathFor(`${parent.id}-${randomBytes(4).toString("hex")}`);
  const cloneOverlay = join(dir, "clone.qcow2");
  await createOverlayFile(next);
  // One qemu-img: both are the same empty overlay on `frozen`. The copy is made before
  // QEMU gets the node (addOverlayNode waits for `made`), so it is still empty.
  const made = formatOverlay(next, frozen, "qcow2").then(() =>
    copyFile(next, cloneOverlay, constants.COPYFILE_EXCL),
  );
  made.catch(() => {});
  let snapshotted = false;
  let overlay: Awaited<ReturnType<typeof addOverlayNode>> | null = null;
  const stateSet = parent.disk.nextFdset++;
  let t = performance.now();
  const lap = (step: string) => {
    const now = performance.now();
    steps[step] = now - t;
    t = now;
  };
  let started = t;
  let pausedMs = 0;
  try {
    // The state file's and the next overlay's descriptors (one helper), sent before the
    // pause while qemu-img writes the overlay; then the overlay's node.
    const state = openStateFd(stateSet, statePath);
    try {
      overlay = await addOverlayNode(parent.qemu, parent.disk, next, made, [state]);
    } finally {
      closeSync(state.fd);
    }
    lap("prepare");
    // The children start now: their QEMUs spawn while the parent is captured. They open
    // the layer about to be frozen, inactive (an incoming VM takes no image locks and
    // reads the layer afresh when its devices load, after the freeze).
    startChildren({
      key: `fork-${parent.id}`,
      shape: parent.shape,
      memPath: lineage.memPath,
      ...(lineage.memory ? { memory: lineage.memory } : {}),
      statePath,
      cloneOverlay,
      layers: [...parent.disk.chain], // the layer to be frozen and those below it
      baseDisk: parent.disk.base,
    });
    started = t;
    let pages: CapturedPages;
    try {
      // Inside the try: a stop that times out (it drains the disk) may still take effect
      // later, and the finally's cont then resumes the parent (cont on a running VM is a
      // no-op).
      await qmp.execute("stop", {});
      lap("stop");
      crashPoint("fork:parent-paused");
      await qmp.execute("blockdev-snapshot", { node: "root", overlay: overlay.node });
      snapshotted = true;
      engine.layers.retain([next]);
      parent.disk.chain = [next, ...parent.disk.chain];
      parent.disk.nodes = [overlay.node, ...parent.disk.nodes];
      parent.disk.topFdset = overlay.fdset;
      // Frozen now: QEMU reopened it read-only (from its fdset's read-only fd). It stays
      // root's and 0600: the children get it as an fd like the rest of their chain.
      await chmod(frozen, 0o600);
      engine.layers.markFrozen(frozen);
      lap("diskFreeze");
      await saveDevicesOnly(parent.qemu, stateSet, statePath);
      lap("deviceState");
      // A parent that exited (and was reaped) meanwhile: its pid may name another process.
      if (parent.qemu.hasExited) throw new Error(`VM ${parent.id}'s QEMU exited during the fork`);
      pages = scanPrivatePages(pid, ram, lineage.ram.bytes);
      scanned(pages);
      await readPages(pid, ram, pages);
      steps.pagemapScan = pages.scanMs;
      steps.pageRead = pages.readMs;
      steps.privateMib = pages.data.length / 2 ** 20;
      steps.runs = pages.runs.length;
      lap("capture");
    } finally {
      await qmp.execute("cont", {}); // from paused, whatever happened
      lap("cont");
      pausedMs = t - started;
      // Running again: QEMU drops the fds it no longer needs at once (disk-fds.ts), the
      // state file's among them.
      await settleFdsets(qmp, parent.disk).catch(() => {});
    }
    return { pages, pausedMs };
  } catch (err) {
    await made.catch(() => {}); // qemu-img is done with `next` before it is removed
    await qmp.execute("remove-fd", { "fdset-id": stateSet }).catch(() => {});
    if (!snapshotted) {
      await overlay?.undo();
      await rm(next, { force: true });
    }
    throw err;
  }
}
