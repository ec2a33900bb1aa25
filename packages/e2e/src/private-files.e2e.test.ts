/**
 * Private files stay private (issue 10, item 5, the database and log part): the daemon
 * runs with umask 077; the database and its -wal and -shm are 0600 (a database an older
 * run left 0644 is narrowed); scripts/start.sh, run as a user runs it, makes the log 0600
 * and the state directory private.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, it } from "node:test";
import { repoRoot } from "@podflare/daemon";
import { eventually, IMAGES_DIR, startTestDaemon, TEMPLATES_DIR } from "./harness.js";

const modeOf = async (p: string) => (await stat(p)).mode & 0o7777;

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const port = (server.address() as { port: number }).port;
  await new Promise((r) => server.close(r));
  return port;
}

describe("private files", () => {
  it("the database, its -wal and -shm are 0600, also when an older run left them 0644", async () => {
    const stateDir = await mkdtemp(join(tmpdir(), "podflare-private-"));
    // An empty file is an empty SQLite database: as an older daemon (umask 022) made it.
    await writeFile(join(stateDir, "podflare.db"), "", { mode: 0o644 });
    assert.equal(await modeOf(join(stateDir, "podflare.db")), 0o644);
    const d = await startTestDaemon({ stateDir, poolSize: 0 });
    try {
      const modes: Record<string, string> = {};
      for (const f of ["podflare.db", "podflare.db-wal", "podflare.db-shm"]) {
        const m = await modeOf(join(stateDir, f));
        modes[f] = m.toString(8);
        assert.equal(m, 0o600, `${f} is the daemon's alone`);
      }
      const dirMode = await modeOf(stateDir);
      console.log(`private-files: ${JSON.stringify(modes)}, state dir ${dirMode.toString(8)}`);
      assert.equal(
        dirMode & 0o066,
        0,
        "the state directory is neither readable nor writable by others",
      );
      const umask = process.umask(0o077); // reads it (and puts it back)
      assert.equal(umask, 0o077, "the daemon's umask");
    } finally {
      await d.close();
    }
  });

  it("scripts/start.sh creates the log 0600 and a private state directory", async () => {
    const base = await mkdtemp(join(tmpdir(), "podflare-start-"));
    const state = join(base, "state"); // does not exist yet: start.sh makes it
    const shm = join("/dev/shm", `podflare-start-${base.slice(-6)}`);
    const port = await freePort();
    const env = {
      ...process.env,
      PODFLARE_STATE_DIR: state,
      PODFLARE_SHM_DIR: shm,
      PODFLARE_TEMPLATES_DIR: TEMPLATES_DIR,
      PODFLARE_IMAGES_DIR: IMAGES_DIR,
      PODFLARE_PORT: String(port),
      PODFLARE_POOL_SIZE: "0",
    };
    let pid = 0;
    try {
      // A umask that would leave the log world-readable: the script must not rely on it.
      const out = await new Promise<string>((resolve, reject) => {
        const child = spawn("bash", ["-c", "umask 022; exec bash scripts/start.sh"], {
          cwd: repoRoot,
          env,
          stdio: ["ignore", "pipe", "pipe"],
        });
        let text = "";
        child.stdout.setEncoding("utf8").on("data", (c: string) => {
          text += c;
        });
        child.stderr.setEncoding("utf8").on("data", (c: string) => {
          text += c;
        });
        child.once("exit", (code) =>
          code === 0
            ? resolve(text)
            : reject(new Error(`start.sh exited ${code}:\n${text.slice(-3000)}`)),
        );
      });
      assert.match(out, new RegExp(`podflared is running at http://127.0.0.1:${port}`));
      pid = Number((await readFile(join(state, "podflared.pid"), "utf8")).trim());
      const log = join(state, "podflared.log");
      assert.ok((await readFile(log, "utf8")).includes("podflared listening"));
      const modes = {
        log: await modeOf(log),
        pid: await modeOf(join(state, "podflared.pid")),
        db: await modeOf(join(state, "podflare.db")),
        state: await modeOf(state),
      };
      console.log(
        `private-files: start.sh ${JSON.stringify(Object.fromEntries(Object.entries(modes).map(([k, v]) => [k, v.toString(8)])))}`,
      );
      assert.equal(modes.log, 0o600, "the log is the daemon's alone");
      assert.equal(modes.pid, 0o600);
      assert.equal(modes.db, 0o600);
      assert.equal(modes.state & 0o066, 0, "the state directory is private (0711 at most)");
    } finally {
      if (pid > 0) {
        try {
          process.kill(pid, "SIGTERM");
        } catch {}
        await eventually("the daemon started by start.sh to exit", async () => {
          try {
            process.kill(pid, 0);
            return false;
          } catch {
            return true;
          }
        });
      }
      await rm(base, { recursive: true, force: true });
      await rm(shm, { recursive: true, force: true });
    }
  });
});
