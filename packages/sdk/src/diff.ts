/**
 * `diff` compares the files of two sandboxes. Each sandbox lists its files with a small
 * walker run as its own python3 process (through bash, so the REPL's globals, cwd and
 * imports are untouched); the listings are compared here.
 */
import { InvalidArgumentError } from "./errors.js";

export interface DiffResult {
  /** In the other sandbox, not in this one. */
  added: string[];
  /** In this sandbox, not in the other. */
  removed: string[];
  /** In both, with different contents (or a symlink with another target). */
  modified: string[];
}

export const DEFAULT_DIFF_PATHS = ["/root", "/tmp"];

/** The bash command that prints a JSON object: path -> sha256 (or "link:<target>"). */
export function listingCommand(paths: string[]): string {
  for (const p of paths) {
    if (!p.startsWith("/") || p.includes("\0"))
      throw new InvalidArgumentError(`diff paths must be absolute, got ${JSON.stringify(p)}`);
  }
  return `python3 - <<'PODFLARE_DIFF_EOF'
import hashlib, json, os, stat
out = {}
for root in ${JSON.stringify(paths)}:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    out[path] = "link:" + os.readlink(path)
                elif stat.S_ISREG(st.st_mode):
                    digest = hashlib.sha256()
                    with open(path, "rb") as f:
                        for block in iter(lambda: f.read(1 << 20), b""):
                            digest.update(block)
                    out[path] = digest.hexdigest()
            except OSError:
                pass
print(json.dumps(out))
PODFLARE_DIFF_EOF`;
}

export function compareListings(
  mine: Record<string, string>,
  theirs: Record<string, string>,
): DiffResult {
  const added = Object.keys(theirs).filter((p) => !(p in mine));
  const removed = Object.keys(mine).filter((p) => !(p in theirs));
  const modified = Object.keys(mine).filter((p) => p in theirs && mine[p] !== theirs[p]);
  return { added: added.sort(), removed: removed.sort(), modified: modified.sort() };
}
