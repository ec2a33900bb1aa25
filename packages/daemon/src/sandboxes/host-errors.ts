/**
 * Host-side failures of a create or a fork as domain errors: a full host disk (errno
 * ENOSPC, better-sqlite3's SQLITE_FULL), told by the error's `code` (or its causes'), and
 * a VM that could not be started (the engine's BootError). The API never sees vm/'s errors.
 */
import { BootError } from "../vm/backend.js";
import { NoCapacityError, VmStartError } from "./errors.js";

const DISK_FULL_CODES: ReadonlySet<unknown> = new Set(["ENOSPC", "SQLITE_FULL"]);

/** Whether `err`, or an error in its `cause` chain, is a full disk. */
export function isDiskFull(err: unknown): boolean {
  for (let e = err, depth = 0; e && depth < 8; depth++) {
    if (DISK_FULL_CODES.has((e as { code?: unknown }).code)) return true;
    e = (e as { cause?: unknown }).cause;
  }
  return false;
}

/** `what`: the operation that failed, as in "cannot <what> now". */
export function translateHostError(err: unknown, what: string): unknown {
  if (isDiskFull(err)) {
    return new NoCapacityError(
      `the host's disk is full: cannot ${what} now; free disk space on the host and retry`,
    );
  }
  if (err instanceof BootError) return new VmStartError(err.message);
  return err;
}
