/**
 * Threads that write a fork's captured pages into its children (page-writer.worker.ts),
 * so a child's pages go in while the parent's are still being read on the main thread,
 * instead of after. A small pool, made at the first fork and kept (its threads do not
 * keep the daemon alive); jobs go to the thread with the fewest, one at a time each.
 */
import { availableParallelism } from "node:os";
import { Worker } from "node:worker_threads";
import type { PageJob, PageJobResult } from "./page-stream.js";

interface Pending {
  resolve: (ms: number) => void;
  reject: (err: Error) => void;
}

class Writer {
  readonly pending = new Map<number, Pending>();
  readonly worker: Worker;

  constructor(onDead: (w: Writer) => void) {
    this.worker = new Worker(new URL("./page-writer.worker.js", import.meta.url));
    this.worker.on("message", (r: PageJobResult) => {
      const p = this.pending.get(r.id);
      if (!p) return;
      this.pending.delete(r.id);
      if (this.pending.size === 0) this.worker.unref();
      if (r.ok) p.resolve(r.ms);
      else p.reject(new Error(r.message));
    });
    const dead = (err: Error) => {
      onDead(this);
      for (const p of this.pending.values()) p.reject(err);
      this.pending.clear();
    };
    this.worker.on("error", dead);
    this.worker.on("exit", (code) => dead(new Error(`the page writer thread exited (${code})`)));
    // Idle, the thread does not keep the daemon alive (after the listeners: adding one refs
    // it again); it is ref'd while it has jobs.
    this.worker.unref();
  }
}

export class PageWriters {
  private readonly writers: Writer[] = [];
  private nextId = 1;

  constructor(private readonly size = Math.max(1, Math.min(2, availableParallelism()))) {}

  /** Run one child's write; resolves with its milliseconds once every page is in. */
  write(job: Omit<PageJob, "id">): Promise<number> {
    const writer = this.pick();
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      if (writer.pending.size === 0) writer.worker.ref();
      writer.pending.set(id, { resolve, reject });
      writer.worker.postMessage({ ...job, id } satisfies PageJob);
    });
  }

  private pick(): Writer {
    const idle = this.writers.find((w) => w.pending.size === 0);
    if (idle) return idle;
    if (this.writers.length < this.size) {
      const w = new Writer((dead) => {
        const i = this.writers.indexOf(dead);
        if (i >= 0) this.writers.splice(i, 1);
      });
      this.writers.push(w);
      return w;
    }
    return this.writers.reduce((a, b) => (b.pending.size < a.pending.size ? b : a));
  }
}
