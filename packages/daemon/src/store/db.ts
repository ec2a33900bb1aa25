/**
 * The daemon's durable state in SQLite (better-sqlite3: synchronous, so each statement is
 * atomic with respect to the event loop). Schema migrations are numbered by user_version.
 */
import { chmodSync, closeSync, constants, openSync } from "node:fs";
import Database from "better-sqlite3";
import type { SandboxState } from "../sandboxes/lifecycle.js";
import { lstatOrNull } from "../util/safe-dir.js";

export interface SandboxRow {
  id: string;
  state: SandboxState;
  template: string;
  vcpu_count: number;
  mem_size_mib: number;
  created_at: number;
  expires_at: number;
  ended_at: number | null;
  end_reason: string | null;
  metadata: string;
  pid: number | null;
  /** The API key (tenant) that created it; null when the daemon runs without keys. */
  owner: string | null;
}

const MIGRATIONS: string[] = [
  `CREATE TABLE sandboxes (
     id TEXT PRIMARY KEY,
     state TEXT NOT NULL,
     template TEXT NOT NULL,
     vcpu_count INTEGER NOT NULL,
     mem_size_mib INTEGER NOT NULL,
     created_at INTEGER NOT NULL,
     expires_at INTEGER NOT NULL,
     ended_at INTEGER,
     end_reason TEXT,
     metadata TEXT NOT NULL DEFAULT '{}',
     pid INTEGER
   );
   CREATE INDEX sandboxes_state ON sandboxes(state);`,
  `ALTER TABLE sandboxes ADD COLUMN owner TEXT;
   CREATE INDEX sandboxes_owner ON sandboxes(owner, state);
   CREATE TABLE api_keys (
     id TEXT PRIMARY KEY,
     name TEXT NOT NULL,
     hash BLOB NOT NULL UNIQUE,
     prefix TEXT NOT NULL,
     created_at INTEGER NOT NULL,
     revoked_at INTEGER,
     max_sandboxes INTEGER,
     max_mem_mib INTEGER
   );`,
];

/**
 * The database and its -wal and -shm are the daemon's alone (0600: they hold key hashes
 * and every tenant's sandboxes). The database is created 0600 before SQLite opens it
 * (SQLite gives -wal and -shm the database's mode), and files an older run left with a
 * wider mode are narrowed; a link in their place is refused. Existing files are changed
 * by path, never opened: closing any descriptor of a file drops every POSIX lock this
 * process holds on it, which would break another connection's (SQLite's) locking.
 */
function privateFiles(path: string): void {
  for (const file of [path, `${path}-wal`, `${path}-shm`]) {
    let st = lstatOrNull(file);
    if (!st && file === path) {
      try {
        const { O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW } = constants;
        closeSync(openSync(file, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0o600));
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
      }
      st = lstatOrNull(file);
    }
    if (!st) continue;
    if (!st.isFile())
      throw new Error(`the database file ${file} is not a regular file (a link?): remove it`);
    if ((st.mode & 0o7777) !== 0o600) chmodSync(file, 0o600);
  }
}

export class Store {
  readonly db: Database.Database;

  constructor(path: string) {
    if (path !== ":memory:" && path !== "") privateFiles(path);
    this.db = new Database(path);
    this.db.pragma("journal_mode = WAL");
    this.db.pragma("synchronous = NORMAL");
    this.db.pragma("busy_timeout = 5000");
    this.migrate();
  }

  private migrate(): void {
    const current = this.db.pragma("user_version", { simple: true }) as number;
    for (let v = current; v < MIGRATIONS.length; v++) {
      this.db.transaction(() => {
        this.db.exec(MIGRATIONS[v] as string);
        this.db.pragma(`user_version = ${v + 1}`);
      })();
    }
  }

  insertSandbox(row: SandboxRow): void {
    this.db
      .prepare(
        `INSERT INTO sandboxes (id, state, template, vcpu_count, mem_size_mib, created_at, expires_at, ended_at, end_reason, metadata, pid, owner)
         VALUES (@id, @state, @template, @vcpu_count, @mem_size_mib, @created_at, @expires_at, @ended_at, @end_reason, @metadata, @pid, @owner)`,
      )
      .run(row);
  }

  getSandbox(id: string): SandboxRow | undefined {
    return this.db.prepare("SELECT * FROM sandboxes WHERE id = ?").get(id) as
      | SandboxRow
      | undefined;
  }

  listSandboxes(states: readonly SandboxState[]): SandboxRow[] {
    const marks = states.map(() => "?").join(",");
    return this.db
      .prepare(`SELECT * FROM sandboxes WHERE state IN (${marks}) ORDER BY created_at, id`)
      .all(...states) as SandboxRow[];
  }

  /** One tenant's sandboxes in these states (`owner` null: those created without a key). */
  listOwned(owner: string | null, states: readonly SandboxState[]): SandboxRow[] {
    const marks = states.map(() => "?").join(",");
    return this.db
      .prepare(
        `SELECT * FROM sandboxes WHERE owner IS ? AND state IN (${marks}) ORDER BY created_at, id`,
      )
      .all(owner, ...states) as SandboxRow[];
  }

  setState(
    id: string,
    state: SandboxState,
    extra: { pid?: number | null; endReason?: string } = {},
  ): void {
    const ended = state === "ended" ? Date.now() : null;
    this.db
      .prepare(
        `UPDATE sandboxes SET state = @state,
           pid = CASE WHEN @setPid THEN @pid ELSE pid END,
           ended_at = COALESCE(@ended, ended_at),
           end_reason = COALESCE(@reason, end_reason)
         WHERE id = @id`,
      )
      .run({
        id,
        state,
        setPid: extra.pid !== undefined ? 1 : 0,
        pid: extra.pid ?? null,
        ended,
        reason: extra.endReason ?? null,
      });
  }

  /** The sandbox now runs another VM (merge_into): its shape and process follow. */
  adoptVm(id: string, vm: { vcpu_count: number; mem_size_mib: number; pid: number | null }): void {
    this.db
      .prepare(
        "UPDATE sandboxes SET vcpu_count = @vcpu_count, mem_size_mib = @mem_size_mib, pid = @pid WHERE id = @id",
      )
      .run({ id, ...vm });
  }

  deleteSandbox(id: string): void {
    this.db.prepare("DELETE FROM sandboxes WHERE id = ?").run(id);
  }

  /** Forget sandboxes that ended long ago, so the table does not grow without bound. */
  pruneEnded(olderThanMs: number): number {
    return this.db
      .prepare("DELETE FROM sandboxes WHERE state = 'ended' AND ended_at < ?")
      .run(Date.now() - olderThanMs).changes;
  }

  close(): void {
    this.db.close();
  }
}
