/**
 * Fork a running VM n ways. The parent is paused for the whole copy (TCG figures in
 * docs/performance.md): its disk is frozen with blockdev-snapshot (the parent goes
 * on in a new overlay), its RAM and devices move into a receiver QEMU holding a new
 * shared memory file, and that receiver is saved as a one-off template. The parent then
 * resumes, and each child is an ordinary restore of the template: private copy-on-write
 * memory, its own overlay on the frozen disk, fresh entropy, clock and identity.
 */

import { randomBytes } from "node:crypto";
import { chmod, rm } from "node:fs/promises";
import { join } from "node:path";
import { crashPoint } from "../../util/crash-points.js";
import type { ForkResult } from "../backend.js";
import { addOverlayNode, settleFdsets } from "./disk-fds.js";
import type { Receiver, TemplateFiles, VmEngine } from "./engine.js";
import { createOverlay } from "./overlay.js";
import { saveDeviceState, transferState } from "./snapshot.js";
import { type Vm, withDisk } from "./vm.js";

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
  // Made before the pause: the parent's next overlay (root's, 0600, like every layer:
  // QEMU gets it as an fd, see disk-fds.ts), and the receiver with a throwaway disk on the
  // template's (it never runs, and stays off the parent's locked overlay).
  const next = engine.layers.pathFor(`${parent.id}-${randomBytes(4).toString("hex")}`);
  await createOverlay(next, frozen, "qcow2");
  const receiverDisk = join(dir, "receiver.qcow2");
  await createOverlay(receiverDisk, parent.disk.base, "qcow2");
  let receiver: Receiver;
  try {
    receiver = await engine.spawnReceiver(
      dir,
      parent.shape,
      receiverDisk,
      parent.disk.base,
      join(dir, "mem"),
    );
  } catch (err) {
    await rm(next, { force: true });
    throw err;
  }
  let snapshotted = false;
  let overlay: Awaited<ReturnType<typeof addOverlayNode>> | null = null;
  const started = performance.now();
  try {
    // The next overlay's node, opened before the pause (sent over QMP as an fd).
    overlay = await addOverlayNode(parent.qemu, parent.disk, next);
    await qmp.execute("stop", {});
    crashPoint("fork:parent-paused");
    try {
      await qmp.execute("blockdev-snapshot", { node: "root", overlay: overlay.node });
      snapshotted = true;
      engine.layers.retain([next]);
      parent.disk.chain = [next, ...parent.disk.chain];
      parent.disk.nodes = [overlay.node, ...parent.disk.nodes];
      parent.disk.topFdset = overlay.fdset;
      // Frozen now: QEMU reopened it read-only (from its fdset's read-only fd). It stays
      // root's and 0600: the children get it as an fd like the rest of their chain.
      await chmod(frozen, 0o600);

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
      // Running again: QEMU drops the fds it no longer needs at once (disk-fds.ts).
      await settleFdsets(qmp, parent.disk).catch(() => {});
    }
    await receiver.finish(); // killed, and its memory sealed against writes
  } catch (err) {
    await receiver.dispose();
    if (!snapshotted) {
      await overlay?.undo();
      await rm(next, { force: true });
    }
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
