/**
 * A VM's disk chain reaches QEMU as file descriptors, never paths. Every layer file (a
 * VM's active overlay, the frozen layers forks leave, the template's disk below) is
 * opened by the daemon (root) and inherited or sent over QMP, so the files can be
 * root's and 0600 in a directory only root enters: no other local user, and no other
 * VM's uid, can open another tenant's disk, and /proc/<qemu>/cmdline names none of them.
 *
 * QEMU keeps each descriptor it was given in an fdset and opens `/dev/fdset/N` by
 * duplicating it. Those originals would keep each file's image locks and its space alive
 * after QEMU closed the layer (a flatten), so once the VM runs they are removed, except
 * the active overlay's read-only one: when a fork freezes that overlay QEMU reopens it
 * read-only from its fdset, and then the old read-write descriptor, whose locks would
 * bar the children from opening the frozen layer, is gone already.
 */
import { closeSync, constants, openSync } from "node:fs";
import { FD_DISK, FD_INCOMING, TOP_FDSET } from "./qemu-args.js";
import type { QemuProcess } from "./qemu-process.js";
import type { QmpClient } from "./qmp-client.js";
import type { VmDisk } from "./vm.js";

/** Fdset ids for overlays added at run time start here (those of the start are below). */
const RUNTIME_FDSET_BASE = 100;

// Node opens every file close-on-exec: QEMU gets only what it is handed.
const NOFOLLOW = constants.O_NOFOLLOW;

/**
 * Open a chain for QEMU: `top` read-write and read-only, then each of `lower` read-only,
 * in the order qemu-args.ts expects them from FD_DISK on. The caller closes them (after
 * the spawn: QEMU holds its own copies).
 */
export function openDiskFds(top: string, lower: readonly string[]): number[] {
  const fds: number[] = [];
  try {
    fds.push(openSync(top, constants.O_RDWR | NOFOLLOW));
    fds.push(openSync(top, constants.O_RDONLY | NOFOLLOW));
    for (const p of lower) fds.push(openSync(p, constants.O_RDONLY | NOFOLLOW));
    return fds;
  } catch (err) {
    closeFds(fds);
    throw err;
  }
}

export function closeFds(fds: readonly number[]): void {
  for (const fd of fds) {
    try {
      closeSync(fd);
    } catch {}
  }
}

/**
 * QEMU's inherited fds from FD_INCOMING on: `extra` (device state, memory), padded with
 * "ignore" up to FD_DISK, then the disk chain's.
 */
export function withDiskFds(extra: (number | "ignore")[], disk: readonly number[]) {
  const fds = [...extra];
  while (fds.length < FD_DISK - FD_INCOMING) fds.push("ignore");
  return [...fds, ...disk];
}

/** A fresh VM's disk bookkeeping (chain empty until the engine fills it). */
export function newDiskState(): Pick<VmDisk, "nodes" | "topFdset" | "nextFdset"> {
  return { nodes: [], topFdset: TOP_FDSET, nextFdset: RUNTIME_FDSET_BASE };
}

/**
 * Drop every descriptor QEMU keeps in its fdsets but the active overlay's read-only one
 * (the layers it opened hold their own duplicates). Call it with the VM running: QEMU
 * closes a removed descriptor at once only then.
 */
export async function settleFdsets(qmp: QmpClient, disk: VmDisk): Promise<void> {
  // QEMU's reply is hostile like everything it sends: only well-formed entries count.
  const sets: unknown[] = await qmp.execute("query-fdsets", {});
  for (const set of sets) {
    const s = set as { "fdset-id"?: unknown; fds?: unknown } | null;
    const id = s?.["fdset-id"];
    if (typeof id !== "number" || !Number.isSafeInteger(id) || !Array.isArray(s?.fds)) continue;
    for (const entry of s.fds as unknown[]) {
      const e = entry as { fd?: unknown; opaque?: unknown } | null;
      if (typeof e?.fd !== "number" || !Number.isSafeInteger(e.fd)) continue;
      if (id === disk.topFdset && e.opaque === "ro") continue;
      await qmp.execute("remove-fd", { "fdset-id": id, fd: e.fd });
    }
  }
}

/**
 * Make the overlay at `path` a block node of a running QEMU, not yet attached: its file
 * sent over QMP read-write and read-only in a new fdset, then, once `formatted` resolves
 * (the file may still be being written when its descriptors go), the node. Returns the
 * node's name and the fdset for `blockdev-snapshot`; `undo` removes both if the snapshot
 * does not happen. `before` are other files to hand over first, by the same helper (a
 * fork's device-state file); removing their fdsets is the caller's.
 */
export async function addOverlayNode(
  qemu: QemuProcess,
  disk: VmDisk,
  path: string,
  formatted: Promise<unknown> = Promise.resolve(),
  before: readonly { fdset: number; fd: number; opaque: string }[] = [],
): Promise<{ node: string; fdset: number; undo: () => Promise<void> }> {
  const fdset = disk.nextFdset++;
  const node = `layer${fdset}`;
  const qmp = qemu.qmp;
  const fds = openDiskFds(path, []);
  let added = false;
  const undo = async () => {
    if (added) await qmp.execute("blockdev-del", { "node-name": node }).catch(() => {});
    await qmp.execute("remove-fd", { "fdset-id": fdset }).catch(() => {});
  };
  try {
    await qemu.addFds([
      ...before,
      { fdset, fd: fds[0] as number, opaque: "rw" },
      { fdset, fd: fds[1] as number, opaque: "ro" },
    ]);
    await formatted;
    await qmp.execute("blockdev-add", {
      driver: "qcow2",
      "node-name": node,
      file: { driver: "file", filename: `/dev/fdset/${fdset}`, "auto-read-only": false },
      backing: null,
    });
    added = true;
  } catch (err) {
    await undo();
    throw err;
  } finally {
    closeFds(fds);
  }
  return { node, fdset, undo };
}

/** Delete the monitor-owned nodes among layers a flatten merged (QEMU closes their files). */
export async function deleteMergedNodes(
  qmp: QmpClient,
  nodes: readonly (string | null)[],
): Promise<void> {
  for (const node of nodes) if (node) await qmp.execute("blockdev-del", { "node-name": node });
}
