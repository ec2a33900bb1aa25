/**
 * Saving and loading a VM's device state with QEMU 7.2's migration. Guest RAM is never
 * copied: it lives in a shared memory file (x-ignore-shared), which becomes the frozen
 * template that clones map privately, copy-on-write.
 */
import { closeSync, constants, createWriteStream, openSync } from "node:fs";
import { rm, stat } from "node:fs/promises";
import { createServer } from "node:net";
import { pipeline } from "node:stream/promises";
import { handSocketTo } from "../../util/safe-file.js";
import { FD_INCOMING, type QemuCredentials } from "./qemu-args.js";
import type { QemuProcess } from "./qemu-process.js";
import type { QmpClient } from "./qmp-client.js";

/**
 * Let only the QEMU running as `creds` connect to a unix socket (no-op without creds),
 * made by `madeBy` (a uid): a link or anything else put in its place is refused, never
 * followed.
 */
function allowConnect(socketPath: string, creds: QemuCredentials | null, madeBy: number): void {
  if (!creds) return;
  handSocketTo(socketPath, creds, 0o600, madeBy);
}

const CAPABILITIES = [
  { capability: "x-ignore-shared", state: true },
  { capability: "events", state: true },
];

/** Pause the VM (QEMU drains and flushes I/O on stop) and write its device state. */
export async function saveDeviceState(
  qmp: QmpClient,
  statePath: string,
  socketPath: string,
  timeoutMs = 30_000,
  /** The saving QEMU's uid/gid: our socket is made connectable for it alone. */
  creds: QemuCredentials | null = null,
): Promise<number> {
  await qmp.execute("stop", {});
  await qmp.execute("migrate-set-capabilities", { capabilities: CAPABILITIES });
  // QEMU 7.2 has no file: target, and exec: is barred under its seccomp sandbox; it
  // connects to our unix socket and we write what arrives to the file.
  await rm(socketPath, { force: true });
  await rm(statePath, { force: true });
  // Created here, exclusively and without following a link.
  const { O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW } = constants;
  const out = openSync(statePath, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0o600);
  let streaming = false; // from the connection on, the write stream closes `out`
  const server = createServer();
  try {
    const received = new Promise<void>((resolve, reject) => {
      server.once("connection", (conn) => {
        streaming = true;
        pipeline(conn, createWriteStream("", { fd: out })).then(resolve, reject);
      });
      server.once("error", reject);
    });
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(socketPath, resolve);
    });
    allowConnect(socketPath, creds, process.geteuid?.() ?? 0);
    await migrate(
      qmp,
      () => qmp.execute("migrate", { uri: `unix:${socketPath}` }),
      timeoutMs,
      "saving",
    );
    await received;
  } finally {
    server.close();
    if (!streaming) closeSync(out);
    await rm(socketPath, { force: true });
  }
  return (await stat(statePath)).size;
}

/** Load the device state QEMU inherited on FD_INCOMING; the VM stays paused. */
export async function loadDeviceState(qmp: QmpClient, timeoutMs = 30_000): Promise<void> {
  await qmp.execute("migrate-set-capabilities", { capabilities: CAPABILITIES });
  await migrate(
    qmp,
    () => qmp.execute("migrate-incoming", { uri: `fd:${FD_INCOMING}` }),
    timeoutMs,
    "loading",
  );
}

/**
 * Write a stopped VM's device state, without RAM, into `statePath` (a fork: its RAM is
 * captured page by page, guest-ram.ts). The file, made by the caller and the daemon's
 * (0600), reaches QEMU as a write-only descriptor in fdset `fdset`, which QEMU opens as
 * `/dev/fdset/N`: it never opens a path. `live: false` keeps the disks active (the VM goes
 * on); the state records the VM as running, so its loader starts paused (-S).
 */
export async function saveDevicesOnly(
  qemu: QemuProcess,
  fdset: number,
  statePath: string,
): Promise<void> {
  const qmp = qemu.qmp;
  await qmp.execute("xen-save-devices-state", { filename: `/dev/fdset/${fdset}`, live: false });
  if ((await stat(statePath)).size === 0) throw new Error("the device state came back empty");
}

/**
 * The file a VM's devices are saved into, opened write-only for QEMU (fdset `fdset`,
 * handed over with addOverlayNode's `before`); the caller closes the fd once it is sent.
 */
export function openStateFd(fdset: number, statePath: string) {
  return {
    fdset,
    fd: openSync(statePath, constants.O_WRONLY | constants.O_NOFOLLOW),
    opaque: "state",
  };
}

/** Start a migration and wait for its end (the `events` capability reports it). */
async function migrate(
  qmp: QmpClient,
  start: () => Promise<unknown>,
  timeoutMs: number,
  what: string,
): Promise<void> {
  const ended = qmp.waitForEvent(
    "MIGRATION",
    timeoutMs,
    (e) => e.data.status === "completed" || e.data.status === "failed",
  );
  try {
    await start();
  } catch (err) {
    ended.catch(() => {}); // it would reject at its timeout with nobody listening
    throw err;
  }
  const event = await ended;
  if (event.data.status !== "completed")
    throw new Error(`${what} the VM state failed (${String(event.data.status)})`);
}
