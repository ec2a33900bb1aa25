/**
 * Guest memory that VMs under their own uids can map but never write. QEMU 7.2 opens a
 * memory-backend-file path read-write even for a private (share=off) mapping, so a
 * template memory file shared by many VMs would have to be writable by all of them. A
 * memfd sealed against writes can be opened read-write (it is mode 0777) but no write,
 * shared writable mapping or resize ever succeeds; a private copy-on-write mapping of it
 * works. QEMU gets it as an inherited fd and maps `/proc/self/fd/N`.
 *
 * Node has neither memfd_create nor F_ADD_SEALS, so a short Python helper (python3 is a
 * host dependency) makes the memfd; the daemon opens it through /proc/<helper>/fd/N and
 * the helper exits.
 */
import { spawn } from "node:child_process";
import { closeSync, constants, openSync } from "node:fs";
import { createInterface } from "node:readline";

const HELPER = `
import fcntl, os, sys
fd = os.memfd_create("podflare-mem", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
# Copy only the data extents (SEEK_DATA/SEEK_HOLE): the file is sparse.
src = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(src).st_size
os.ftruncate(fd, size)
off = 0
while off < size:
    try:
        data = os.lseek(src, off, os.SEEK_DATA)
    except OSError:
        break
    hole = os.lseek(src, data, os.SEEK_HOLE)
    while data < hole:
        buf = os.pread(src, min(hole - data, 4 << 20), data)
        if not buf:
            break
        os.pwrite(fd, buf, data)
        data += len(buf)
    off = hole
os.close(src)
fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
print("ready", fd, flush=True)
sys.stdin.read()  # alive until the daemon has opened the memfd and closes our stdin
`;

/** A sealed memfd held by the daemon; `fd` is ours to pass to QEMU. */
export interface MemFd {
  fd: number;
  close(): void;
}

/** A template's sealed memfd shared by its clones and their forks (reference counted). */
export interface SharedMemFd {
  fd: number;
  /** One more reference to the same memfd; call what it returns to drop it. */
  retain(): () => void;
  /** Drop the reference this handle was given with. */
  release(): void;
}

let hostPython: string | null = null;

/** The host Python the fd helpers run (config.hostPython: PODFLARE_PYTHON, resolved once). */
export function useHostPython(path: string): void {
  hostPython = path;
}

/** Set by the engine from the configuration; its default lives in config.ts only. */
export function python(): string {
  if (hostPython === null)
    throw new Error("the host Python for the fd helpers is not set (useHostPython)");
  return hostPython;
}

/** A sealed copy of a (sparse) memory file: what clones of a template map. */
export async function sealedCopy(path: string): Promise<MemFd> {
  const child = spawn(python(), ["-c", HELPER, path], { stdio: ["pipe", "pipe", "pipe"] });
  let stderr = "";
  child.stderr.on("data", (c: Buffer) => {
    stderr = (stderr + c.toString()).slice(-2000);
  });
  const exited = new Promise<void>((resolve) => child.once("close", () => resolve()));
  child.on("error", () => {});
  const lines = createInterface({ input: child.stdout })[Symbol.asyncIterator]();
  try {
    const r = await lines.next();
    if (r.done) {
      await exited;
      throw new Error(`memfd helper: no 'ready' (${stderr.trim() || "it exited"})`);
    }
    const ready = /^ready (\d+)$/.exec(r.value);
    if (!ready) throw new Error("memfd helper: unexpected answer");
    // Node opens every fd close-on-exec.
    const fd = openSync(`/proc/${child.pid}/fd/${ready[1]}`, constants.O_RDONLY);
    let closed = false;
    return {
      fd,
      close: () => {
        if (closed) return;
        closed = true;
        closeSync(fd);
      },
    };
  } catch (err) {
    child.kill("SIGKILL");
    throw err;
  } finally {
    child.stdin.end(); // the helper exits
  }
}
