/**
 * A VM's own guest-RAM pages, read from one QEMU and written into another (fork). A
 * restored VM's RAM is a private (copy-on-write) mapping of its lineage's template
 * memory: the pages it changed are anonymous in that mapping (kernel pagemap: present and
 * not a file page, or swapped), every other page still equals the template. The daemon
 * (root) reads and writes them through /proc/<pid>/mem, QEMU's uid notwithstanding.
 * Everything here stays in the daemon's memory: no file holds the pages. The children's
 * read and the children's writes run on other threads (page-threads.ts), the writes
 * following the read as it goes.
 */
import {
  closeSync,
  constants,
  fstatSync,
  openSync,
  readFileSync,
  readSync,
  statSync,
} from "node:fs";
import { finish, newProgress, type PageRun } from "./page-stream.js";
import { PageThreads } from "./page-threads.js";

export const PAGE = 4096;
/** pagemap entry bits, in the entry's high 32 bits: present, swapped, file-page/shared-anon. */
const PRESENT = 0x8000_0000;
const SWAPPED = 0x4000_0000;
const FILE = 0x2000_0000;
/** Pagemap is read this many entries at a time (2 MiB: a 1 GiB guest in one read). */
const SCAN_CHUNK = 1 << 18;
/** What identifies the template memory a VM maps privately. */
export interface RamSource {
  /** The memory file's device ("major:minor" in hex, as /proc/<pid>/maps spells it). */
  dev: string;
  /** Its inode (the template's file, or its sealed memfd). */
  inode: number;
  bytes: number;
}

/** The RAM source of a memory file given by path or by an open descriptor of ours. */
export function ramSource(where: { path: string } | { fd: number }, bytes: number): RamSource {
  const st = "fd" in where ? fstatSync(where.fd) : statSync(where.path);
  const major = Math.floor(st.dev / 256) & 0xfff;
  const minor = (st.dev & 0xff) | (Math.floor(st.dev / 4096) & ~0xff);
  const hex = (n: number) => n.toString(16).padStart(2, "0");
  return { dev: `${hex(major)}:${hex(minor)}`, inode: st.ino, bytes };
}

/**
 * The host address of QEMU `pid`'s guest-RAM mapping: its mapping of the memory file at
 * offset 0, `bytes` long (contiguous pieces of one mapping are joined).
 */
export function ramAddress(pid: number, source: RamSource): number {
  const maps = readFileSync(`/proc/${pid}/maps`, "utf8");
  let start = -1;
  let end = -1;
  for (const line of maps.split("\n")) {
    const m = /^([0-9a-f]+)-([0-9a-f]+) \S+ ([0-9a-f]+) ([0-9a-f:]+) (\d+)/.exec(line);
    if (!m || m[4] !== source.dev || Number(m[5]) !== source.inode) continue;
    const lo = Number.parseInt(m[1] as string, 16);
    const hi = Number.parseInt(m[2] as string, 16);
    const offset = Number.parseInt(m[3] as string, 16);
    if (offset === 0 && start < 0) {
      start = lo;
      end = hi;
    } else if (start >= 0 && lo === end && offset === end - start) end = hi;
  }
  if (start < 0 || end - start < source.bytes)
    throw new Error(`QEMU ${pid} has no mapping of its guest RAM (inode ${source.inode})`);
  return start;
}

/**
 * The private pages of a guest's RAM: runs (offsets into RAM) and their bytes, back to
 * back in shared memory, filled by the reader while writers (other threads) follow it.
 */
export interface CapturedPages {
  runs: PageRun[];
  data: Buffer;
  /** page-stream.ts's progress words over `data`. */
  progress: Int32Array;
  scanMs: number;
  readMs: number;
}

/** Runs of pages in [addr, addr + bytes) that `pid` holds privately (pagemap). */
function privateRuns(pid: number, addr: number, bytes: number): PageRun[] {
  const runs: PageRun[] = [];
  const pages = bytes / PAGE;
  const fd = openSync(`/proc/${pid}/pagemap`, constants.O_RDONLY);
  try {
    const buf = Buffer.allocUnsafe(Math.min(pages, SCAN_CHUNK) * 8);
    let runStart = -1;
    for (let first = 0; first < pages; first += SCAN_CHUNK) {
      const n = Math.min(SCAN_CHUNK, pages - first);
      const got = readSync(fd, buf, 0, n * 8, (addr / PAGE + first) * 8);
      if (got !== n * 8) throw new Error(`short pagemap read for QEMU ${pid}`);
      const words = new Uint32Array(buf.buffer, buf.byteOffset, n * 2);
      for (let i = 0; i < n; i++) {
        const hi = words[i * 2 + 1] as number; // little-endian: bits 32..63
        const own = ((hi & PRESENT) !== 0 && (hi & FILE) === 0) || (hi & SWAPPED) !== 0;
        const page = first + i;
        if (own && runStart < 0) runStart = page;
        else if (!own && runStart >= 0) {
          runs.push({ offset: runStart * PAGE, length: (page - runStart) * PAGE });
          runStart = -1;
        }
      }
    }
    if (runStart >= 0) runs.push({ offset: runStart * PAGE, length: (pages - runStart) * PAGE });
  } finally {
    closeSync(fd);
  }
  return runs;
}

/**
 * Which pages QEMU `pid` (stopped) holds privately in its guest RAM at `addr`, and the
 * shared buffer they are read into: nothing is read yet (readPages), so the children's
 * writes can be started on it first.
 */
export function scanPrivatePages(pid: number, addr: number, bytes: number): CapturedPages {
  const t0 = performance.now();
  const runs = privateRuns(pid, addr, bytes);
  const total = runs.reduce((sum, r) => sum + r.length, 0);
  return {
    runs,
    data: Buffer.from(new SharedArrayBuffer(total)),
    progress: newProgress(),
    scanMs: performance.now() - t0,
    readMs: 0,
  };
}

let threads: PageThreads | null = null;

/** A job on the page threads over `pages` (their whole buffer, from its start). */
function pageJob(kind: "read" | "write", pid: number, addr: number, pages: CapturedPages) {
  threads ??= new PageThreads();
  return threads.run({
    kind,
    dataOffset: 0,
    pid,
    addr,
    page: PAGE,
    runs: pages.runs,
    data: pages.data.buffer as SharedArrayBuffer,
    progress: pages.progress.buffer as SharedArrayBuffer,
  });
}

/**
 * Read the scanned pages from QEMU `pid` (stopped) on the reader thread, advancing
 * `pages.progress` as it goes; writers waiting on it are released whether it ends or
 * fails.
 */
export async function readPages(pid: number, addr: number, pages: CapturedPages): Promise<void> {
  const t0 = performance.now();
  try {
    await pageJob("read", pid, addr, pages);
  } catch (err) {
    finish(pages.progress, false); // the thread itself died: release the writers
    throw err;
  } finally {
    pages.readMs = performance.now() - t0;
  }
}

/** scanPrivatePages, then readPages. */
export async function capturePrivatePages(
  pid: number,
  addr: number,
  bytes: number,
): Promise<CapturedPages> {
  const pages = scanPrivatePages(pid, addr, bytes);
  await readPages(pid, addr, pages);
  return pages;
}

/**
 * Write captured pages into QEMU `pid`'s guest RAM at `addr` (before its devices load),
 * on a writer thread, each chunk as soon as the reader has it: it may start before
 * readPages. Resolves with the milliseconds the write took once every page is in.
 */
export function writePages(pid: number, addr: number, pages: CapturedPages): Promise<number> {
  return pageJob("write", pid, addr, pages);
}
