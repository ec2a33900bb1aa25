/**
 * What the reader of a fork's pages and their writers (page-io.worker.ts threads) share:
 * the pages, back to back in a SharedArrayBuffer, and a progress word pair in another:
 * [0] how many pages are read so far, [1] the reader's state. Writers wait on [0]
 * (Atomics.wait) and write what is read.
 */

/** A run of pages: offset into guest RAM and length, both page multiples. */
export interface PageRun {
  offset: number;
  length: number;
}

/**
 * A read of the parent's pages (`runs`, from QEMU `pid`'s RAM at `addr`) into `data`, or
 * a child's write of them (into its RAM at `addr`). `runs` may be a part of the whole: its
 * bytes start at `dataOffset` in `data`.
 */
export interface PageJob {
  id: number;
  kind: "read" | "write";
  dataOffset: number;
  pid: number;
  addr: number;
  page: number;
  runs: PageRun[];
  data: SharedArrayBuffer;
  progress: SharedArrayBuffer;
}

export type PageJobResult =
  | { id: number; ok: true; ms: number }
  | { id: number; ok: false; message: string };

/** A run is read or written at most this many bytes at a time (the writers' unit). */
export const IO_CHUNK = 1 << 20;

const DONE = 1;
const FAILED = 2;

export function newProgress(): Int32Array {
  return new Int32Array(new SharedArrayBuffer(8));
}

export function progressState(p: Int32Array): "reading" | "done" | "failed" {
  const s = Atomics.load(p, 1);
  return s === DONE ? "done" : s === FAILED ? "failed" : "reading";
}

/** The reader has `pages` pages in the buffer: writers waiting for them go on. */
export function advance(p: Int32Array, pages: number): void {
  Atomics.store(p, 0, pages);
  Atomics.notify(p, 0);
}

/** The reader is done (`ok`) or gave up: writers waiting for more stop waiting. */
export function finish(p: Int32Array, ok: boolean): void {
  Atomics.store(p, 1, ok ? DONE : FAILED);
  Atomics.notify(p, 0);
}
