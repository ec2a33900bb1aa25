/**
 * Unprivileged uids for VMs. When the daemon runs as root, each QEMU runs as a uid (and
 * the gid of the same number) of its own, taken from a range that no account uses (no
 * /etc/passwd entry is needed). Several daemons on one host (tests, other users) share
 * the range, so a uid is claimed with a file created exclusively in a host-wide
 * directory; a claim whose daemon has died is taken over.
 */
import { closeSync, openSync, readFileSync, unlinkSync, writeSync } from "node:fs";
import { join } from "node:path";
import { ensureSafeDir } from "../util/safe-dir.js";

/** A VM's own unprivileged uid and gid (the daemon runs as root). */
export interface VmCredentials {
  uid: number;
  gid: number;
}

export interface UidRange {
  base: number;
  count: number;
}

/** Claims a uid across processes; returns false when someone else holds it. */
export interface UidClaims {
  claim(uid: number): boolean;
  unclaim(uid: number): void;
}

export class UidExhaustedError extends Error {
  constructor(range: UidRange) {
    super(`no free VM uid in [${range.base}, ${range.base + range.count})`);
    this.name = "UidExhaustedError";
  }
}

function validateUidRange(range: UidRange): void {
  if (!Number.isSafeInteger(range.base) || range.base < 1000)
    throw new RangeError(`VM uid base ${range.base} must be an integer >= 1000`);
  if (!Number.isSafeInteger(range.count) || range.count < 1)
    throw new RangeError(`VM uid count ${range.count} must be a positive integer`);
  // 2^32-1 is (uid_t)-1; 2^31 and up confuse some tools but are valid for the kernel.
  if (range.base + range.count > 2 ** 32 - 1)
    throw new RangeError("VM uid range goes past 4294967294");
}

/**
 * Lowest-first allocation after the last one handed out (a released uid is not reused at
 * once, so a late signal or file of the old VM cannot reach the new one).
 */
export class UidAllocator {
  private readonly held = new Set<number>();
  private next = 0;

  constructor(
    readonly range: UidRange,
    private readonly claims: UidClaims,
  ) {
    validateUidRange(range);
  }

  allocate(): number {
    const { base, count } = this.range;
    for (let i = 0; i < count; i++) {
      const uid = base + ((this.next + i) % count);
      if (this.held.has(uid)) continue;
      if (!this.claims.claim(uid)) continue;
      this.held.add(uid);
      this.next = (uid - base + 1) % count;
      return uid;
    }
    throw new UidExhaustedError(this.range);
  }

  release(uid: number): void {
    if (!this.held.delete(uid)) return;
    this.claims.unclaim(uid);
  }

  owns(uid: number): boolean {
    return uid >= this.range.base && uid < this.range.base + this.range.count;
  }

  get inUse(): number {
    return this.held.size;
  }
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** Claims as files `<dir>/<uid>` holding the claiming daemon's pid. */
class FileUidClaims implements UidClaims {
  constructor(private readonly dir: string) {
    ensureSafeDir(dir, 0o700, "the VM uid claims directory");
  }

  claim(uid: number): boolean {
    const path = join(this.dir, String(uid));
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        const fd = openSync(path, "wx", 0o600);
        writeSync(fd, `${process.pid}\n`);
        closeSync(fd);
        return true;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
      }
      const owner = Number(readFileSync(path, "utf8").trim() || "0");
      // Our own pid: another engine of this process holds it (process-wide allocators
      // are shared, so this is a leftover only if that engine leaked it: leave it).
      if (owner === process.pid || (owner > 0 && pidAlive(owner))) return false;
      try {
        unlinkSync(path); // the claiming daemon is gone: take the uid over
      } catch {}
    }
    return false;
  }

  unclaim(uid: number): void {
    try {
      unlinkSync(join(this.dir, String(uid)));
    } catch {}
  }
}

const shared = new Map<string, UidAllocator>();

/** One allocator per range and claim directory in this process (tests run several daemons). */
export function sharedUidAllocator(range: UidRange, claimDir: string): UidAllocator {
  const key = `${range.base}:${range.count}:${claimDir}`;
  let alloc = shared.get(key);
  if (!alloc) {
    alloc = new UidAllocator(range, new FileUidClaims(claimDir));
    shared.set(key, alloc);
  }
  return alloc;
}
