/**
 * A request body that stops arriving is cut. The clock runs only while the daemon is
 * waiting for the client (its reader asked for more and nothing came): a body held back
 * by the daemon's own back-pressure (a guest slow to take an upload) never counts. A
 * total bound on receiving a request is Node's requestTimeout; this one lets a large
 * upload take as long as it needs as long as it keeps moving.
 */
import { Transform, type TransformCallback } from "node:stream";

export class BodyIdleGuard extends Transform {
  private timer: NodeJS.Timeout | null = null;

  constructor(
    private readonly idleMs: number,
    private readonly onIdle: () => void,
  ) {
    super();
  }

  override _read(size: number): void {
    if (this.timer === null && !this.writableFinished) {
      this.timer = setTimeout(() => {
        this.timer = null;
        this.onIdle();
      }, this.idleMs);
    }
    super._read(size);
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, done: TransformCallback): void {
    this.stop();
    done(null, chunk);
  }

  override _flush(done: TransformCallback): void {
    this.stop();
    done();
  }

  override _destroy(err: Error | null, done: (error?: Error | null) => void): void {
    this.stop();
    done(err);
  }

  private stop(): void {
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
  }
}
