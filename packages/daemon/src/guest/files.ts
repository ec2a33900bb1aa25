/**
 * File transfer with backpressure in both directions: uploads wait for the channel to
 * drain; downloads are credit-windowed, so a slow HTTP client never makes the daemon
 * buffer a whole file, and carry exactly the size declared at their start. Guest twin:
 * files.py (write_begin/chunk/end/abort, read/read_ack/read_abort).
 */
import { Readable } from "node:stream";
import { PodflareError } from "../sandboxes/errors.js";
import { count } from "../util/untrusted.js";
import type { AgentConnection } from "./connection.js";
import { AgentError } from "./errors.js";
import { type Frame, MAX_PAYLOAD_BYTES } from "./frames.js";
import { agentError } from "./sanitize.js";

const READ_WINDOW = 4 * 1024 * 1024;
/** The agent's largest data frame: the most a download may overrun its window by. */
const READ_FRAME_SLACK = 256 * 1024;
const UPLOAD_CHUNK = MAX_PAYLOAD_BYTES;
/** A download whose reader waits this long for the guest's next bytes is failed. */
const DOWNLOAD_STALL_MS = 60_000;

/**
 * A download's stream carried more or fewer bytes than the size declared at its start
 * (the file changed while it was read, or a hostile guest). The stream fails with it.
 */
export class DownloadSizeError extends PodflareError {
  constructor(message: string) {
    super("internal", message);
  }
}

export interface WriteOptions {
  maxBytes: number;
  mode?: number;
  timeoutMs?: number;
}

/**
 * Upload: stream `source` into `path` in the guest, atomically. Resolves with the size
 * written. `maxBytes` is enforced while streaming; exceeding it aborts the write in the
 * guest and throws AgentError("too_large").
 */
export async function writeFile(
  conn: AgentConnection,
  path: string,
  source: AsyncIterable<Buffer | Uint8Array>,
  opts: WriteOptions,
): Promise<number> {
  const id = conn.allocId();
  let earlyError: Error | null = null;
  let endReply: ((f: Frame) => void) | null = null;
  let endFail: ((e: Error) => void) | null = null;
  let beginReply: ((f: Frame) => void) | null = null;
  let beginFail: ((e: Error) => void) | null = null;
  conn.routes.set(id, {
    onFrame: (frame) => {
      const err = frame.header.type === "error" ? agentError(frame.header) : null;
      if (beginReply) {
        const [ok, fail] = [beginReply, beginFail];
        beginReply = beginFail = null;
        err ? fail?.(err) : ok(frame);
      } else if (endReply) {
        const [ok, fail] = [endReply, endFail];
        endReply = endFail = null;
        err ? fail?.(err) : ok(frame);
      } else if (err) {
        earlyError = err; // e.g. disk full while chunks are still streaming
      }
    },
    onClose: (err) => {
      earlyError = err;
      beginFail?.(err);
      endFail?.(err);
    },
  });
  const timeoutMs = opts.timeoutMs ?? 30_000;
  try {
    await conn.awaitReply(
      (ok, fail) => {
        beginReply = ok;
        beginFail = fail;
      },
      () => conn.send({ type: "write_begin", id, path, mode: opts.mode ?? null }),
      timeoutMs,
      "write_begin",
    );
    let size = 0;
    try {
      for await (const piece of source) {
        const buf = Buffer.isBuffer(piece)
          ? piece
          : Buffer.from(piece.buffer, piece.byteOffset, piece.byteLength);
        size += buf.length;
        if (size > opts.maxBytes)
          throw new AgentError("too_large", `upload exceeds the limit of ${opts.maxBytes} bytes`);
        for (let off = 0; off < buf.length; off += UPLOAD_CHUNK) {
          if (earlyError) throw earlyError;
          await conn.sendWithBackpressure(
            { type: "write_chunk", id },
            buf.subarray(off, off + UPLOAD_CHUNK),
            timeoutMs,
          );
        }
      }
      if (earlyError) throw earlyError;
    } catch (err) {
      if (!conn.closed) conn.send({ type: "write_abort", id });
      throw err;
    }
    const reply = await conn.awaitReply(
      (ok, fail) => {
        endReply = ok;
        endFail = fail;
      },
      () => conn.send({ type: "write_end", id, size }),
      timeoutMs,
      "write_end",
    );
    return count(reply.header.size, size);
  } finally {
    // Late frames for an aborted write are dropped; keep the route briefly so the
    // agent's ok to write_abort is not logged as unknown.
    setTimeout(() => conn.routes.delete(id), 5_000).unref();
  }
}

/**
 * Download: resolves once the agent has opened the file, with its size and a stream.
 * The stream carries exactly `size` bytes or fails: bytes past the declared size (the
 * file grew, or a hostile guest) fail it before any excess is pushed, and a read_end
 * short of it fails it too, so a consumer that announced `size` (an HTTP content-length)
 * never sends more or fewer bytes than it announced.
 */
export function readFile(
  conn: AgentConnection,
  path: string,
  timeoutMs: number,
): Promise<{ size: number; stream: Readable }> {
  const id = conn.allocId();
  let consumedAcked = 0;
  let received = 0;
  let size = 0;
  let finished = false;
  let begun = false;
  // Armed while the reader waits for bytes (the guest then always has credit): a guest
  // that stops sending mid-download does not hold the reader and the route forever.
  let stall: NodeJS.Timeout | null = null;
  const unstall = () => {
    if (stall) clearTimeout(stall);
    stall = null;
  };
  const stream = new Readable({
    highWaterMark: 1024 * 1024,
    read() {
      const consumed = received - this.readableLength;
      if (consumed - consumedAcked >= READ_WINDOW / 4 && !conn.closed && !finished) {
        consumedAcked = consumed;
        conn.send({ type: "read_ack", id, bytes: consumed });
      }
      if (!stall && !finished && begun) {
        stall = setTimeout(() => {
          stall = null;
          fail(
            new AgentError(
              "timeout",
              `the guest sent no data for ${path} within ${DOWNLOAD_STALL_MS} ms (${received} of ${size} bytes received)`,
            ),
            true,
          );
        }, DOWNLOAD_STALL_MS);
        stall.unref();
      }
    },
    destroy(err, cb) {
      unstall();
      if (!finished && !conn.closed) conn.send({ type: "read_abort", id });
      finished = true;
      conn.routes.delete(id);
      cb(err);
    },
  });
  // A failure may come in the same chunk as read_begin, before the caller has attached
  // its listeners: the error stays on the stream (`errored`, and every consumer gets it)
  // instead of being emitted to nobody, which would be an uncaught exception.
  stream.on("error", () => {});
  let timer: NodeJS.Timeout | undefined;
  let reject: (err: Error) => void = () => {};
  /** End the download with `err`; `abortGuest`: tell the agent to stop sending. */
  const fail = (err: Error, abortGuest = err instanceof AgentError && err.code === "bad_reply") => {
    clearTimeout(timer);
    unstall();
    const abort = abortGuest && !finished && !conn.closed;
    finished = true;
    conn.routes.delete(id);
    if (abort) conn.send({ type: "read_abort", id });
    // Before read_begin the caller holds no stream yet: the rejection is the report.
    if (begun) stream.destroy(err);
    else reject(err);
  };
  return new Promise((resolve, rejectPromise) => {
    reject = rejectPromise;
    timer = setTimeout(() => {
      conn.routes.delete(id);
      reject(new AgentError("timeout", `the guest did not open ${path} within ${timeoutMs} ms`));
    }, timeoutMs);
    conn.routes.set(id, {
      onFrame: ({ header, payload }) => {
        switch (header.type) {
          case "read_begin":
            if (begun) break;
            clearTimeout(timer);
            begun = true;
            size = count(header.size, 0);
            resolve({ size, stream });
            break;
          case "data":
            if (!begun) {
              fail(
                new AgentError("bad_reply", "the guest sent data for a download it never began"),
              );
              break;
            }
            unstall();
            if (received + payload.length > size) {
              // The real agent streams to EOF: a file growing while it is read ends here.
              fail(
                new DownloadSizeError(
                  `${path} grew while it was downloaded: the guest sent more than the ${size} bytes it had when opened; the download was cut (${size === 0 ? "a file whose size is not known in advance, such as one in /proc, cannot be downloaded: read it with exec" : "retry once the file stops changing"})`,
                ),
                true,
              );
              break;
            }
            received += payload.length;
            // The agent may not send past the window; a hostile one must not make the
            // host buffer the whole file.
            if (received - consumedAcked > READ_WINDOW + READ_FRAME_SLACK) {
              fail(new AgentError("bad_reply", "the guest sent past the download window"));
              break;
            }
            stream.push(payload);
            break;
          case "read_end":
            if (!begun) {
              fail(new AgentError("bad_reply", "the guest ended a download it never began"));
              break;
            }
            if (received !== size) {
              fail(
                new DownloadSizeError(
                  `${path} shrank while it was downloaded: the guest sent ${received} of the ${size} bytes it had when opened; the download was cut (retry once the file stops changing)`,
                ),
              );
              break;
            }
            unstall();
            finished = true;
            conn.routes.delete(id);
            stream.push(null);
            break;
          case "error":
            fail(agentError(header));
            break;
        }
      },
      onClose: (err) => {
        clearTimeout(timer);
        unstall();
        if (begun) stream.destroy(err);
        else reject(err);
      },
    });
    conn.send({ type: "read", id, path, window: READ_WINDOW });
  });
}
