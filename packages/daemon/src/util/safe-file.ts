/**
 * Files root creates or hands over where it must not be tricked into following a link:
 * a new file is created exclusively without following one (O_CREAT|O_EXCL|O_NOFOLLOW),
 * then given away by its descriptor, never by path; a socket another process made is
 * pinned with O_PATH|O_NOFOLLOW and changed through /proc/self/fd (Node has no fchownat).
 */
import {
  chmodSync,
  chownSync,
  closeSync,
  constants,
  fchmodSync,
  fchownSync,
  fstatSync,
  lchownSync,
  lstatSync,
  openSync,
  readdirSync,
} from "node:fs";
import { join } from "node:path";

/** Linux's O_PATH (not exported by Node): a descriptor that pins an inode without opening it. */
const O_PATH = 0o10000000;

export interface FileOwner {
  uid: number;
  gid: number;
}

/**
 * Create `path` (which must not exist: a link or file there is an error, EEXIST), empty,
 * with `mode`, owned by `owner` (default: the daemon). Returns nothing: the file is closed.
 */
export function createExclusive(path: string, mode: number, owner: FileOwner | null = null): void {
  const fd = openSync(
    path,
    constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW,
    mode,
  );
  try {
    if (owner) fchownSync(fd, owner.uid, owner.gid);
    fchmodSync(fd, mode); // the umask applied at creation
  } finally {
    closeSync(fd);
  }
}

/**
 * Give the unix socket at `path` to `owner` with `mode`, refusing anything that is not a
 * socket (a link planted in its place is not followed) or, with `expectUid`, a socket
 * made by someone else.
 */
export function handSocketTo(
  path: string,
  owner: FileOwner,
  mode = 0o600,
  expectUid: number | null = null,
): void {
  const fd = openSync(path, O_PATH | constants.O_NOFOLLOW);
  try {
    const st = fstatSync(fd);
    if (!st.isSocket())
      throw new Error(`${path} is not a socket (something replaced it): refusing to hand it over`);
    if (expectUid !== null && st.uid !== expectUid)
      throw new Error(
        `${path} belongs to uid ${st.uid}, not ${expectUid}: refusing to hand it over`,
      );
    // The magic link names exactly the inode pinned above, whatever happens to `path`.
    chownSync(`/proc/self/fd/${fd}`, owner.uid, owner.gid);
    chmodSync(`/proc/self/fd/${fd}`, mode);
  } finally {
    closeSync(fd);
  }
}

/**
 * Take a directory another uid could write back before removing it: owned by the daemon,
 * mode 0700, top-down, so that nothing can add, rename or swap an entry while `rm -r`
 * walks it (a live process of that uid would otherwise race the removal). `dir` must sit
 * in a directory of the daemon's (its entry cannot be swapped); links are never followed.
 */
export function seizeTree(dir: string): void {
  let st: ReturnType<typeof lstatSync>;
  try {
    st = lstatSync(dir);
  } catch {
    return;
  }
  if (!st.isDirectory()) return; // a file or link is unlinked by the removal, not followed
  lchownSync(dir, process.geteuid?.() ?? 0, process.getegid?.() ?? 0);
  chmodSync(dir, 0o700); // a real directory whose entry cannot be swapped: nothing followed
  for (const entry of readdirSync(dir)) seizeTree(join(dir, entry));
}
