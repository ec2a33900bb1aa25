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
 * Move a paused VM's whole state, RAM included, into `receiver` (started with
 * `-incoming defer` and its own `share=on` memory file). Used by fork: a clone's RAM is a
 * private mapping, which `x-ignore-shared` cannot skip.
 */
export async function transferState(
  source: QmpClient,
  receiver: QmpClient,
  socketPath: string,
  timeoutMs = 120_000,
  /** The source QEMU's uid/gid: the receiver's listening socket is handed to it alone. */
  sourceCreds: QemuCredentials | null = null,
  /** The receiver's uid: the socket must be its (the directory it listens in is its own). */
  receiverUid: number | null = null,
): Promise<void> {
  await receiver.execute("migrate-set-capabilities", {
    capabilities: [{ capability: "events", state: true }],
  });
  const received = receiver.waitForEvent(
    "MIGRATION",
    timeoutMs,
    (e) => e.data.status === "completed" || e.data.status === "failed",
  );
  received.catch(() => {});
  await receiver.execute("migrate-incoming", { uri: `unix:${socketPath}` });
  if (sourceCreds) allowConnect(socketPath, sourceCreds, receiverUid ?? sourceCreds.uid);
  await source.execute("migrate-set-capabilities", {
    capabilities: [
      { capability: "x-ignore-shared", state: false },
      { capability: "events", state: true },
    ],
  });
  // The default cap is 32 MiB/s; the VM is paused, so there is no reason to throttle.
  await source.execute("migrate-set-parameters", { "max-bandwidth": 64 * 1024 * 1024 * 1024 });
  await migrate(
    source,
    () => source.execute("migrate", { uri: `unix:${socketPath}` }),
    timeoutMs,
    "copying",
  );
  const event = await received;
  if (event.data.status !== "completed")
    throw new Error(`the receiving VM failed to load the state (${String(event.data.status)})`);
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
