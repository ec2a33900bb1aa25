/**
 * The page writer's thread (page-writer.ts): writes a fork's captured pages into a child's
 * guest RAM through /proc/<pid>/mem while the daemon's main thread is still reading them
 * from the parent, each chunk as soon as the reader has passed it (the two share the page
 * buffer and a progress counter, pages.ts's PageProgress layout).
 */
import { closeSync, constants, openSync, writeSync } from "node:fs";
import { parentPort } from "node:worker_threads";
import { type PageJob, type PageJobResult, progressState, WRITE_CHUNK } from "./page-stream.js";

function write(job: PageJob): void {
  const data = Buffer.from(job.data);
  const progress = new Int32Array(job.progress);
  const fd = openSync(`/proc/${job.pid}/mem`, constants.O_WRONLY);
  try {
    let at = 0;
    for (const run of job.runs) {
      for (let done = 0; done < run.length; ) {
        const len = Math.min(WRITE_CHUNK, run.length - done);
        // Wait until the reader has these bytes (its count is in bytes / PAGE).
        const need = (at + len) / job.page;
        for (let have = Atomics.load(progress, 0); have < need; have = Atomics.load(progress, 0)) {
          const state = progressState(progress);
          if (state === "failed") throw new Error("the parent's pages could not be read");
          if (state === "done") throw new Error("the parent's pages ended short");
          Atomics.wait(progress, 0, have, 1000);
        }
        const n = writeSync(fd, data, at, len, job.addr + run.offset + done);
        if (n <= 0) throw new Error(`QEMU ${job.pid}'s guest RAM: write stopped short`);
        done += n;
        at += n;
      }
    }
  } finally {
    closeSync(fd);
  }
}

parentPort?.on("message", (job: PageJob) => {
  const started = performance.now();
  let result: PageJobResult;
  try {
    write(job);
    result = { id: job.id, ok: true, ms: performance.now() - started };
  } catch (err) {
    result = { id: job.id, ok: false, message: err instanceof Error ? err.message : String(err) };
  }
  parentPort?.postMessage(result);
});
