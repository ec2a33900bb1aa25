/**
 * The threads that move a fork's pages (page-io.worker.ts): one reader, which copies the
 * parent's private pages into the shared buffer, and a small pool of writers, which copy
 * them into the children as the reader passes them. Both run off the daemon's event loop
 * (a read on it would hold back the children's own start, which runs meanwhile), and a
 * read never queues behind a write: a write waits on the reader's progress, so a reader
 * behind it would never come. Made at the first fork and kept; idle threads do not keep
 * the daemon alive.
 */
import { availableParallelism } from "node:os";
import { Worker } from "node:worker_threads";
import type { PageJob, PageJobResult } from "./page-stream.js";

interface Pending {
  resolve: (ms: number) => void;
  reject: (err: Error) => void;
}

/** One thread and the jobs it was given (it runs them one at a time, in order). */
class PageThread {
  readonly pending = new Map<number, Pending>();
  readonly worker: Worker;

  constructor(onDead: (t: PageThread) => void) {
    this.worker = new Worker(new URL("./page-io.worker.js", import.meta.url));
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
    this.worker.on("exit", (code) => dead(new Error(`a page thread exited (${code})`)));
    // Idle, the thread does not keep the daemon alive (after the listeners: adding one refs
    // it again); it is ref'd while it has jobs.
    this.worker.unref();
  }

  run(job: PageJob): Promise<number> {
    return new Promise((resolve, reject) => {
      if (this.pending.size === 0) this.worker.ref();
      this.pending.set(job.id, { resolve, reject });
      this.worker.postMessage(job);
    });
  }
}

export class PageThreads {
  private reader: PageThread | null = null;
  private readonly writers: PageThread[] = [];
  private nextId = 1;

  constructor(private readonly writerCount = Math.max(1, Math.min(2, availableParallelism()))) {}

  /** Run a job (a read on the reader thread, a write on a writer); resolves with its ms. */
  run(job: Omit<PageJob, "id">): Promise<number> {
    const thread = job.kind === "read" ? this.readerThread() : this.pickWriter();
    return thread.run({ ...job, id: this.nextId++ });
  }

  private readerThread(): PageThread {
    this.reader ??= new PageThread(() => {
      this.reader = null;
    });
    return this.reader;
  }

  private pickWriter(): PageThread {
    const idle = this.writers.find((w) => w.pending.size === 0);
    if (idle) return idle;
    if (this.writers.length < this.writerCount) {
      const w = new PageThread((dead) => {
        const i = this.writers.indexOf(dead);
        if (i >= 0) this.writers.splice(i, 1);
      });
      this.writers.push(w);
      return w;
    }
    return this.writers.reduce((a, b) => (b.pending.size < a.pending.size ? b : a));
  }
}
