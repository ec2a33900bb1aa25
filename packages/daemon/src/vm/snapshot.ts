/**
 * Saving and loading a VM's device state with QEMU 7.2's migration. Guest RAM is never
 * copied: it lives in a shared memory file (x-ignore-shared), which becomes the frozen
 * template that clones map privately, copy-on-write.
 */
import { createWriteStream } from "node:fs";
import { rm, stat } from "node:fs/promises";
import { createServer } from "node:net";
import { pipeline } from "node:stream/promises";
import type { QmpClient } from "../qmp/client.js";
import { FD_INCOMING } from "./qemu-args.js";

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
): Promise<number> {
  await qmp.execute("stop", {});
  await qmp.execute("migrate-set-capabilities", { capabilities: CAPABILITIES });
  // QEMU 7.2 has no file: target, and exec: is barred under its seccomp sandbox; it
  // connects to our unix socket and we write what arrives to the file.
  await rm(socketPath, { force: true });
  const server = createServer();
  try {
    const received = new Promise<void>((resolve, reject) => {
      server.once("connection", (conn) => {
        pipeline(conn, createWriteStream(statePath, { mode: 0o600 })).then(resolve, reject);
      });
      server.once("error", reject);
    });
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(socketPath, resolve);
    });
    await migrate(
      qmp,
      () => qmp.execute("migrate", { uri: `unix:${socketPath}` }),
      timeoutMs,
      "saving",
    );
    await received;
  } finally {
    server.close();
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
