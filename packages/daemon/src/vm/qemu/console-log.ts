/**
 * A size-bounded console log: the guest's serial output goes to <dir>/console.log; when
 * that file reaches half the bound it becomes console.log.1 (replacing the older one),
 * so at most `maxBytes` are on disk. The last few KiB are also kept in memory for
 * error messages (a boot that fails says why).
 *
 * The daemon writes the file (QEMU sends the console on fd 5 and never sees it), in the
 * VM's directory, which is the daemon's alone; the opens do not follow a link all the
 * same, and the file after a rotation is created exclusively.
 */
import { closeSync, constants, openSync, renameSync, writeSync } from "node:fs";

const { O_WRONLY, O_CREAT, O_TRUNC, O_EXCL, O_NOFOLLOW } = constants;

export class ConsoleLog {
  private fd: number | null;
  private written = 0;
  private tailText = "";

  constructor(
    private readonly path: string,
    private readonly maxBytes: number,
  ) {
    this.fd = openSync(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW, 0o600);
  }

  write(chunk: Buffer): void {
    this.tailText = (this.tailText + chunk.toString("utf8")).slice(-4096);
    if (this.fd === null) return;
    try {
      if (this.written + chunk.length > this.maxBytes / 2) {
        closeSync(this.fd);
        this.fd = null;
        renameSync(this.path, `${this.path}.1`);
        this.fd = openSync(this.path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0o600);
        this.written = 0;
      }
      const part = chunk.subarray(0, Math.floor(this.maxBytes / 2));
      writeSync(this.fd, part);
      this.written += part.length;
    } catch {
      // A full host disk (ENOSPC) must not take the daemon down: the log loses lines,
      // the in-memory tail keeps the last ones.
    }
  }

  tail(): string {
    return this.tailText;
  }

  close(): void {
    if (this.fd !== null) closeSync(this.fd);
    this.fd = null;
  }
}
