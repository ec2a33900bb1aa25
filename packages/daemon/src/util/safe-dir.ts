/**
 * Directories the daemon (often root) writes in must be its own: a directory someone else
 * can write, or a symbolic link planted where it should be (`/dev/shm` and `/tmp` are
 * world-writable, `/dev/shm` is emptied at boot), would let that someone redirect what
 * root creates, truncates or removes. `ensureSafeDir` creates a directory with the mode
 * asked for, or checks the one that is there, and refuses with a message that says what
 * to fix. Every parent on the way must be owned by root or the daemon and writable by
 * nobody else (a sticky directory like /tmp is fine: nobody can rename our entry in it).
 */
import { chmodSync, lstatSync, mkdirSync, readlinkSync, realpathSync, type Stats } from "node:fs";
import { dirname, isAbsolute, join, resolve, sep } from "node:path";

export class UnsafeDirError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "UnsafeDirError";
  }
}

const euid = (): number => process.geteuid?.() ?? 0;
const octal = (mode: number) => `0${(mode & 0o7777).toString(8)}`;

/** lstat, or null when nothing is there. */
export function lstatOrNull(path: string): Stats | null {
  try {
    return lstatSync(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return null;
    throw err;
  }
}

/** Why a parent directory (or a link on the way) lets someone else replace what is below. */
function parentProblem(st: Stats): string | null {
  if (st.uid !== 0 && st.uid !== euid())
    return `is owned by uid ${st.uid} (neither root nor this daemon's uid ${euid()})`;
  if (st.isSymbolicLink()) return null;
  if (!st.isDirectory()) return "is not a directory";
  if ((st.mode & 0o022) !== 0 && (st.mode & 0o1000) === 0)
    return `is writable by group or others (mode ${octal(st.mode)}) and not sticky`;
  return null;
}

/** Check (and create where missing, with `mode`) every directory above `path`; returns its real parent. */
function safeParent(path: string, mode: number, what: string, seen = 0): string {
  if (seen > 40) throw new UnsafeDirError(`${what}: too many symbolic links on the way to ${path}`);
  const parts = dirname(path).split(sep).filter(Boolean);
  let cur = "/";
  for (const part of parts) {
    const next = join(cur, part);
    let st = lstatOrNull(next);
    if (!st) {
      try {
        mkdirSync(next, { mode });
        chmodSync(next, mode);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
      }
      st = lstatSync(next);
    }
    const problem = parentProblem(st);
    if (problem)
      throw new UnsafeDirError(
        `refusing to use ${path} (${what}): its parent ${next} ${problem}, so someone else could replace what the daemon creates there. Fix the owner or mode of ${next}, or choose a directory elsewhere.`,
      );
    if (st.isSymbolicLink()) {
      const target = resolve(cur, readlinkSync(next));
      // The link is ours and sits in a checked directory; what it points to is checked too.
      safeParent(join(target, "x"), mode, what, seen + 1);
      cur = realpathSync(next);
    } else cur = next;
  }
  return cur;
}

/**
 * Make `path` a directory owned by this process's euid with exactly `mode`: created if
 * missing; if it exists it must be a real directory (not a symbolic link), ours, and not
 * writable by group or others (anything in it may then have been planted), otherwise
 * this throws an UnsafeDirError naming what to remove or fix. `what` names the setting
 * ("the shm directory (PODFLARE_SHM_DIR)"). Returns the directory's real path.
 */
export function ensureSafeDir(path: string, mode: number, what = "a daemon directory"): string {
  if (!isAbsolute(path)) path = resolve(path);
  if ((mode & 0o022) !== 0)
    throw new RangeError(`mode ${octal(mode)} for ${path} would let others write in it`);
  const parent = safeParent(path, mode, what);
  const real = join(parent, path.split(sep).filter(Boolean).pop() ?? "");
  let st = lstatOrNull(real);
  if (!st) {
    try {
      mkdirSync(real, { mode });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
    }
    st = lstatSync(real);
  }
  if (st.isSymbolicLink())
    throw new UnsafeDirError(
      `refusing to use ${path} (${what}): it is a symbolic link (to ${readlinkSync(real)}), which someone may have planted. Remove it (rm ${real}) and start again.`,
    );
  if (!st.isDirectory())
    throw new UnsafeDirError(
      `refusing to use ${path} (${what}): it exists and is not a directory. Remove it (rm ${real}) and start again.`,
    );
  if (st.uid !== euid())
    throw new UnsafeDirError(
      `refusing to use ${path} (${what}): it is owned by uid ${st.uid}, not by this daemon's uid ${euid()}, so its files may have been planted. Remove it (rm -r ${real}) if nothing in it is needed, and start again.`,
    );
  if ((st.mode & 0o022) !== 0)
    throw new UnsafeDirError(
      `refusing to use ${path} (${what}): it is writable by group or others (mode ${octal(st.mode)}), so its files may have been planted. Remove it (rm -r ${real}) if nothing in it is needed, and start again.`,
    );
  // Ours, a real directory in a checked parent: nobody else can swap it while we chmod.
  if ((st.mode & 0o7777) !== mode) chmodSync(real, mode);
  return real;
}
