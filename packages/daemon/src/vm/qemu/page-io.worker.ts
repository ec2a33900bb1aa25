/**
 * A page thread (page-threads.ts): reads a fork's parent's private pages into the shared
 * buffer, advancing the progress counter, or writes them into a child's guest RAM, each
 * chunk as soon as the reader has passed it (page-stream.ts: the buffer and counter
 * layout). Both go through /proc/<pid>/mem, off the daemon's event loop.
 */
import { closeSync, constants, openSync, readSync, writeSync } from "node:fs";
import { parentPort } from "node:worker_threads";
import {
  advance,
  finish,
  IO_CHUNK,
  type PageJob,
  type PageJobResult,
  progressState,
} from "./page-stream.js";

/** Every chunk of the job's runs: (offset in the buffer, length, address in the process). */
function* chunks(job: PageJob): Generator<[number, number, number]> {
  let at = job.dataOffset;
  for (const run of job.runs) {
    for (let done = 0; done < run.length; ) {
      const len = Math.min(IO_CHUNK, run.length - done);
      yield [at, len, job.addr + run.offset + done];
      done += len;
      at += len;
    }
  }
}

function read(job: PageJob, data: Buffer, progress: Int32Array): void {
  let ok = false;
  const fd = openSync(`/proc/${job.pid}/mem`, constants.O_RDONLY);
  try {
    for (const [at, len, position] of chunks(job)) {
      const n = readSync(fd, data, at, len, position);
      if (n !== len) throw new Error(`QEMU ${job.pid}'s guest RAM: read stopped short`);
      advance(progress, (at + len) / job.page);
    }
    ok = true;
  } finally {
    closeSync(fd);
    finish(progress, ok);
  }
}

function write(job: PageJob, data: Buffer, progress: Int32Array): void {
  const fd = openSync(`/proc/${job.pid}/mem`, constants.O_WRONLY);
  try {
    for (const [at, len, position] of chunks(job)) {
      // Wait until the reader has these bytes (its count is in pages).
      const need = (at + len) / job.page;
      for (let have = Atomics.load(progress, 0); have < need; have = Atomics.load(progress, 0)) {
        const state = progressState(progress);
        if (state === "failed") throw new Error("the parent's pages could not be read");
        if (state === "done") throw new Error("the parent's pages ended short");
        Atomics.wait(progress, 0, have, 1000);
      }
      for (let done = 0; done < len; ) {
        const n = writeSync(fd, data, at + done, len - done, position + done);
        if (n <= 0) throw new Error(`QEMU ${job.pid}'s guest RAM: write stopped short`);
        done += n;
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
    const data = Buffer.from(job.data);
    const progress = new Int32Array(job.progress);
    if (job.kind === "read") read(job, data, progress);
    else write(job, data, progress);
    result = { id: job.id, ok: true, ms: performance.now() - started };
  } catch (err) {
    result = { id: job.id, ok: false, message: err instanceof Error ? err.message : String(err) };
  }
  parentPort?.postMessage(result);
});
