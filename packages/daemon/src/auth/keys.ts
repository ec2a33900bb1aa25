/**
 * API keys in SQLite. A key is shown once, when it is created; only its SHA-256 digest is
 * stored (keys are 256 random bits, so a fast hash is as good as a slow one here). Each
 * key is a tenant: the sandboxes it creates are its own. Revoked keys stay as rows, so
 * the daemon never falls back to open access once a key has existed.
 */
import { createHash, randomBytes } from "node:crypto";
import type Database from "better-sqlite3";

export const KEY_PREFIX = "pf_";

export interface KeyQuota {
  /** Sandboxes the key may hold at once; null: the host's per-tenant default. */
  maxSandboxes: number | null;
  /** Guest memory (MiB) its sandboxes may hold at once; null: the host's default. */
  maxMemMib: number | null;
}

export interface ApiKeyRecord extends KeyQuota {
  id: string;
  name: string;
  /** The first characters of the secret, to recognise a key in a list. */
  prefix: string;
  createdAt: number;
  revokedAt: number | null;
}

interface KeyRow {
  id: string;
  name: string;
  hash: Buffer;
  prefix: string;
  created_at: number;
  revoked_at: number | null;
  max_sandboxes: number | null;
  max_mem_mib: number | null;
}

export const hashKey = (secret: string): Buffer => createHash("sha256").update(secret).digest();

/** Bad input to a key operation: the message says what to change. */
export class KeyError extends Error {
  override name = "KeyError";
}

const NAME_RE = /^[\w .@:-]{1,64}$/;

export class KeyStore {
  constructor(private readonly db: Database.Database) {}

  /** A new key; the secret is returned here and never again. */
  create(name: string, quota: KeyQuota): { record: ApiKeyRecord; secret: string } {
    if (!NAME_RE.test(name)) {
      throw new KeyError(
        "a key name is 1 to 64 letters, digits, spaces or . _ @ : - (for example: ci-runner)",
      );
    }
    for (const [field, value] of Object.entries(quota)) {
      if (value !== null && (!Number.isSafeInteger(value) || value < 1))
        throw new KeyError(`${field} must be a positive integer`);
    }
    const secret = `${KEY_PREFIX}${randomBytes(32).toString("base64url")}`;
    const row: KeyRow = {
      id: `key_${randomBytes(6).toString("hex")}`,
      name,
      hash: hashKey(secret),
      prefix: secret.slice(0, KEY_PREFIX.length + 6),
      created_at: Date.now(),
      revoked_at: null,
      max_sandboxes: quota.maxSandboxes,
      max_mem_mib: quota.maxMemMib,
    };
    this.db
      .prepare(
        `INSERT INTO api_keys (id, name, hash, prefix, created_at, revoked_at, max_sandboxes, max_mem_mib)
         VALUES (@id, @name, @hash, @prefix, @created_at, @revoked_at, @max_sandboxes, @max_mem_mib)`,
      )
      .run(row);
    return { record: toRecord(row), secret };
  }

  list(): ApiKeyRecord[] {
    return (
      this.db.prepare("SELECT * FROM api_keys ORDER BY created_at, id").all() as KeyRow[]
    ).map(toRecord);
  }

  /** True if the key was active and is now revoked; false if it was revoked already. */
  revoke(id: string): boolean {
    const row = this.db.prepare("SELECT revoked_at FROM api_keys WHERE id = ?").get(id) as
      | { revoked_at: number | null }
      | undefined;
    if (!row)
      throw new KeyError(`no key ${JSON.stringify(id)}; list them with: podflare keys list`);
    if (row.revoked_at !== null) return false;
    this.db.prepare("UPDATE api_keys SET revoked_at = ? WHERE id = ?").run(Date.now(), id);
    return true;
  }

  /** Whether any key was ever created (revoked ones count: access never reopens). */
  any(): boolean {
    return this.db.prepare("SELECT 1 FROM api_keys LIMIT 1").get() !== undefined;
  }

  /** Digests and quotas of the keys that may be used. */
  active(): { id: string; hash: Buffer; quota: KeyQuota }[] {
    return (
      this.db
        .prepare(
          "SELECT id, hash, max_sandboxes, max_mem_mib FROM api_keys WHERE revoked_at IS NULL",
        )
        .all() as KeyRow[]
    ).map((r) => ({
      id: r.id,
      hash: r.hash,
      quota: { maxSandboxes: r.max_sandboxes, maxMemMib: r.max_mem_mib },
    }));
  }
}

function toRecord(row: KeyRow): ApiKeyRecord {
  return {
    id: row.id,
    name: row.name,
    prefix: row.prefix,
    createdAt: row.created_at,
    revokedAt: row.revoked_at,
    maxSandboxes: row.max_sandboxes,
    maxMemMib: row.max_mem_mib,
  };
}
