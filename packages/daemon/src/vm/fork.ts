/**
 * Fork a running VM n ways. The parent is paused for the whole copy (TCG figures in
 * docs/performance.md): its disk is frozen with blockdev-snapshot-sync (the parent goes
 * on in a new overlay), its RAM and devices move into a receiver QEMU holding a new
 * shared memory file, and that receiver is saved as a one-off template. The parent then
 * resumes, and each child is an ordinary restore of the template: private copy-on-write
 * memory, its own overlay on the frozen disk, fresh entropy, clock and identity.
 */

import { randomBytes } from "node:crypto";
import { chmod, chown, rm } from "node:fs/promises";
import { join } from "node:path";
import { crashPoint } from "../util/crash-points.js";
import type { Receiver, TemplateFiles, VmEngine } from "./engine.js";
import { createOverlay } from "./overlay.js";
import { saveDeviceState, transferState } from "./snapshot.js";
import { type Vm, withDisk } from "./vm.js";

export interface ForkResult {
  children: Vm[];
  /** How long the parent was paused. */
  pausedMs: number;
}

export async function forkVm(
  engine: VmEngine,
  parent: Vm,
  childIds: readonly string[],
): Promise<ForkResult> {
  if (parent.disk.chain.length === 0)
    throw new Error(`VM ${parent.id} was cold-booted and cannot be forked`);
  const dir = join(engine.forksDir, `fork_${randomBytes(6).toString("hex")}`);
  engine.makeDir(dir); // the daemon's: the receiver writes only in its socketDir below
  let receiver: Receiver | null = null;
  try {
    const template = await withDisk(parent.disk, async () => {
      const frozen = await freeze(engine, parent, dir);
      receiver = frozen.receiver;
      return frozen;
    });
    const children: Vm[] = [];
    try {
      for (const vm of await Promise.allSettled(
        childIds.map((id) => engine.restore(id, template.files)),
      )) {
        if (vm.status === "fulfilled") children.push(vm.value);
        else throw vm.reason;
      }
    } catch (err) {
      await Promise.all(children.map((c) => c.destroy()));
      throw err;
    }
    return { children, pausedMs: template.pausedMs };
  } finally {
    // The children map the memory privately and have read the state: both may go.
    await (receiver as Receiver | null)?.dispose();
    await rm(dir, { recursive: true, force: true });
  }
}

async function freeze(
  engine: VmEngine,
  parent: Vm,
  dir: string,
): Promise<{ files: TemplateFiles; pausedMs: number; receiver: Receiver }> {
  // Read inside the disk queue: a flatten that ran before may have changed the chain.
  const frozen = parent.disk.chain[0] as string;
  const qmp = parent.qemu.qmp;
  const creds = parent.jail.creds;
  // Made before the pause: the parent's next overlay (its QEMU, under its own uid, creates
  // nothing in the shared layers directory), and the receiver with a throwaway disk (it
  // never runs, and stays off the parent's locked overlay).
  const next = engine.layers.pathFor(`${parent.id}-${randomBytes(4).toString("hex")}`);
  await createOverlay(next, frozen, "qcow2");
  if (creds) {
    await chown(next, creds.uid, creds.gid);
    await chmod(next, 0o600);
  }
  // Its backing file is the template's disk, which every VM uid may read: the parent's
  // overlay is still the parent's alone until it is frozen, and the receiver starts now.
  const receiverDisk = join(dir, "receiver.qcow2");
  await createOverlay(receiverDisk, parent.disk.base, "qcow2");
  const receiver = await engine.spawnReceiver(dir, parent.shape, receiverDisk, join(dir, "mem"));
  let snapshotted = false;
  const started = performance.now();
  try {
    await qmp.execute("stop", {});
    crashPoint("fork:parent-paused");
    try {
      // mode "existing": QEMU opens the overlay made above instead of creating one.
      const snapshot = { device: "root", "snapshot-file": next, format: "qcow2", mode: "existing" };
      await qmp.execute("blockdev-snapshot-sync", snapshot);
      snapshotted = true;
      engine.layers.retain([next]);
      parent.disk.chain = [next, ...parent.disk.chain];
      // The frozen layer is now read-only for everyone: the daemon's, readable by the
      // children's uids, and no longer writable by the parent's.
      await chown(frozen, 0, 0).catch(() => {});
      await chmod(frozen, 0o644);

      await receiver.qemu.qmp.connect();
      await transferState(
        qmp,
        receiver.qemu.qmp,
        join(receiver.socketDir, "transfer.sock"),
        120_000,
        creds,
        receiver.creds?.uid ?? null,
      );
      await saveDeviceState(
        receiver.qemu.qmp,
        join(dir, "state"),
        join(dir, "save.sock"),
        30_000,
        receiver.creds,
      );
    } finally {
      await qmp.execute("cont", {}); // from paused or post-migration alike
    }
    await receiver.finish(); // killed, and its memory sealed against writes
  } catch (err) {
    await receiver.dispose();
    if (!snapshotted) await rm(next, { force: true });
    throw err;
  }
  const pausedMs = performance.now() - started;
  const cloneOverlay = join(dir, "clone.qcow2");
  await createOverlay(cloneOverlay, frozen, "qcow2");
  return {
    files: {
      key: `fork-${parent.id}`,
      shape: parent.shape,
      memPath: join(dir, "mem"),
      ...(receiver.memfd ? { memFd: receiver.memfd.fd } : {}),
      statePath: join(dir, "state"),
      cloneOverlay,
      layers: parent.disk.chain.slice(1), // the frozen layer and those below it
      baseDisk: parent.disk.base,
    },
    pausedMs,
    receiver,
  };
}
