/**
 * Fork a running VM n ways. The parent is paused for the whole copy (TCG figures in
 * docs/performance.md): its disk is frozen with blockdev-snapshot-sync (the parent goes
 * on in a new overlay), its RAM and devices move into a receiver QEMU holding a new
 * shared memory file, and that receiver is saved as a one-off template. The parent then
 * resumes, and each child is an ordinary restore of the template: private copy-on-write
 * memory, its own overlay on the frozen disk, fresh entropy, clock and identity.
 */
import { randomBytes } from "node:crypto";
import { mkdir, rm } from "node:fs/promises";
import { join } from "node:path";
import type { TemplateFiles, VmEngine } from "./engine.js";
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
  await mkdir(dir, { recursive: true, mode: 0o700 });
  try {
    const template = await withDisk(parent.disk, () => freeze(engine, parent, dir));
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
    // The children map the memory file privately and have read the state: both may go.
    await rm(dir, { recursive: true, force: true });
  }
}

async function freeze(
  engine: VmEngine,
  parent: Vm,
  dir: string,
): Promise<{ files: TemplateFiles; pausedMs: number }> {
  // Read inside the disk queue: a flatten that ran before may have changed the chain.
  const frozen = parent.disk.chain[0] as string;
  const qmp = parent.qemu.qmp;
  const started = performance.now();
  await qmp.execute("stop", {});
  try {
    const next = engine.layers.pathFor(`${parent.id}-${randomBytes(4).toString("hex")}`);
    await qmp.execute("blockdev-snapshot-sync", {
      device: "root",
      "snapshot-file": next,
      format: "qcow2",
    });
    engine.layers.retain([next]);
    parent.disk.chain = [next, ...parent.disk.chain];

    // The receiver never runs; its throwaway overlay keeps it off the parent's locked one.
    const receiverDisk = join(dir, "receiver.qcow2");
    await createOverlay(receiverDisk, frozen, "qcow2");
    const receiver = engine.spawnReceiver(dir, parent.shape, receiverDisk, join(dir, "mem"));
    try {
      await receiver.qmp.connect();
      await transferState(qmp, receiver.qmp, join(dir, "transfer.sock"));
      await saveDeviceState(receiver.qmp, join(dir, "state"), join(dir, "save.sock"));
    } finally {
      await receiver.kill();
    }
  } finally {
    await qmp.execute("cont", {}); // from paused or post-migration alike
  }
  const pausedMs = performance.now() - started;
  const cloneOverlay = join(dir, "clone.qcow2");
  await createOverlay(cloneOverlay, frozen, "qcow2");
  return {
    files: {
      key: `fork-${parent.id}`,
      shape: parent.shape,
      memPath: join(dir, "mem"),
      statePath: join(dir, "state"),
      cloneOverlay,
      layers: parent.disk.chain.slice(1), // the frozen layer and those below it
      baseDisk: parent.disk.base,
    },
    pausedMs,
  };
}
