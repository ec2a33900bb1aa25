/**
 * Host side of the guest-agent protocol: matches replies to request ids, turns exec
 * events into an async stream, and moves files with backpressure in both directions
 * (uploads wait for the channel to drain; downloads are credit-windowed, so a slow HTTP
 * client never makes the daemon buffer a whole file).
 */

import { randomInt } from "node:crypto";
import type { Duplex } from "node:stream";
import { Readable } from "node:stream";
import { OverLimitError, PodflareError } from "../sandboxes/errors.js";
import { TokenBucket } from "../util/token-bucket.js";
import { count, str } from "../util/untrusted.js";
import {
  type DecodeProblem,
  encodeFrame,
  type Frame,
  FrameDecoder,
  type FrameHeader,
  MAX_PAYLOAD_BYTES,
  PROTOCOL_VERSION,
} from "./frames.js";

export type Language = "python" | "bash";

export type ExecEvent =
  | { type: "stdout" | "stderr"; data: string }
  | {
      type: "exit";
      code: number;
      error?: { name: string; value: string; traceback: string };
      timed_out?: boolean;
      truncated?: boolean;
      cancelled?: boolean;
    };

export interface ExecOptions {
  language?: Language;
  timeoutMs?: number | null;
  maxOutputBytes?: number | null;
  /** Bounds the output held for a reader that lags (sandboxes/stream-budget.ts). */
  output?: OutputGate;
  /** The reader went away: stop (unqueue or cancel the exec) even if never iterated. */
  signal?: AbortSignal;
}

/**
 * Decides whether output arriving for an exec is kept for its reader. Once `admit`
 * refuses, the exec's later output is dropped too and its exit says `truncated`.
 */
export interface OutputGate {
  admit(bytes: number): boolean;
  /** `bytes` of admitted output were handed to the reader. */
  taken(bytes: number): void;
}

export interface AgentHello {
  version: number;
  agent: string;
  python: string;
  pid: number;
}

/** An error the agent reported, with its protocol code (not_found, bad_path, ...). */
export class AgentError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = "AgentError";
  }
}

export class AgentClosedError extends Error {
  constructor(reason: string) {
    super(`guest agent channel closed: ${reason}`);
    this.name = "AgentClosedError";
  }
}

interface Route {
  onFrame: (frame: Frame) => void;
  onClose: (err: Error) => void;
}

const READ_WINDOW = 4 * 1024 * 1024;
/** The agent's largest data frame: the most a download may overrun its window by. */
const READ_FRAME_SLACK = 256 * 1024;
const UPLOAD_CHUNK = MAX_PAYLOAD_BYTES;
/** The agent's default max_output_bytes (spec/guest-protocol.md). */
const DEFAULT_MAX_OUTPUT_BYTES = 16 * 1024 * 1024;
/**
 * Execs sent to the agent and not yet ended. The agent queues at most 64 (it answers
 * `busy` beyond), and a VM forked mid-call also still holds the parent's queued calls, so
 * the host keeps only a few outstanding (enough that the next exec is already in the guest
 * when one ends) and holds the rest in its own FIFO, in arrival order.
 */
export const MAX_AGENT_EXECS = 4;
/** The host FIFO's bounds per sandbox; past either, exec() throws ExecQueueFullError (429). */
export const MAX_QUEUED_EXECS = 256;
export const MAX_QUEUED_EXEC_BYTES = 64 * 1024 * 1024;
const utf8 = new TextDecoder("utf-8", { fatal: false });

/**
 * A download's stream carried more or fewer bytes than the size declared at its start
 * (the file changed while it was read, or a hostile guest). The stream fails with it.
 */
export class DownloadSizeError extends PodflareError {
  constructor(message: string) {
    super("internal", message);
  }
}

/** Too many execs already waiting for one sandbox. */
export class ExecQueueFullError extends OverLimitError {}

/** What may be logged of a hostile header: a few bounded fields, never the whole object. */
function headerSummary(h: FrameHeader): Record<string, unknown> {
  return {
    type: str(h.type, 64),
    id: typeof h.id === "number" ? h.id : null,
    code: str(h.code, 40),
    message: str(h.message, 500),
  };
}

/**
 * Warnings a guest can trigger are rate-limited per client (per VM): a burst, then one per
 * WARN_REFILL_MS; the number suppressed rides on the next line logged and on the close.
 */
export const WARN_BURST = 20;
const WARN_REFILL_MS = 10_000;
/**
 * Garbage a working agent never sends: bytes skipped to resynchronise (each resync counts
 * at least GARBAGE_MIN_COST) and frames with undecodable headers (GARBAGE_BAD_FRAME_COST
 * each). Past GARBAGE_LIMIT (refilled at GARBAGE_PER_SECOND) the channel is closed. The
 * limit is several maximal frames: a VM forked while its agent was writing may begin with
 * the tail of a frame.
 */
export const GARBAGE_LIMIT = 4 * 1024 * 1024;
const GARBAGE_PER_SECOND = 64 * 1024;
const GARBAGE_MIN_COST = 256;
const GARBAGE_BAD_FRAME_COST = 64 * 1024;
/** How long a cancel's route waits for the agent's ok before it is dropped. */
const CANCEL_ROUTE_MS = 30_000;
/**
 * How long an abandoned (cancelled) exec keeps its slot in the agent waiting for its exit:
 * the agent kills a cancelled exec within its KILL_GRACE (10 s); a guest that never
 * reports it does not keep the slot and the route forever.
 */
const ABANDONED_EXEC_MS = 60_000;
/** A download whose reader waits this long for the guest's next bytes is failed. */
const DOWNLOAD_STALL_MS = 60_000;

interface QueuedExec {
  id: number;
  header: FrameHeader;
  code: Buffer;
}

export class AgentClient {
  private readonly decoder: FrameDecoder;
  private readonly routes = new Map<number, Route>();
  /**
   * Random start: a VM forked mid-call still finishes the parent's call, whose frames
   * carry the parent client's id; this client's ids must not collide with it.
   */
  private nextId = 1 + randomInt(2 ** 47);
  private closedError: Error | null = null;
  private readonly warnings = new TokenBucket(WARN_BURST, 1000 / WARN_REFILL_MS);
  private suppressedWarnings = 0;
  private readonly garbage = new TokenBucket(GARBAGE_LIMIT, GARBAGE_PER_SECOND);
  private garbageSeen = { bytes: 0, badFrames: 0 };
  private violationResolve!: (reason: string) => void;
  /**
   * Resolves (never rejects) with the reason when this client closes the channel because
   * the guest broke the protocol: the VM is no longer usable and should be ended.
   */
  readonly violation = new Promise<string>((resolve) => {
    this.violationResolve = resolve;
  });
  /** Set by the first answered hello: a `started` frame after it means a restart. */
  private handshakeDone = false;
  /** Ids of execs sent to the agent whose exit (or error) has not arrived yet. */
  private readonly agentExecs = new Set<number>();
  /** Execs waiting for a slot in the agent, in arrival order. */
  private readonly execQueue: QueuedExec[] = [];
  private execQueueBytes = 0;

  constructor(
    private readonly stream: Duplex,
    private readonly log: (msg: string, extra?: Record<string, unknown>) => void = () => {},
  ) {
    this.decoder = new FrameDecoder((p) => this.onDecodeProblem(p));
    stream.on("data", (chunk: Buffer) => {
      if (this.closedError) return;
      for (const frame of this.decoder.push(chunk)) {
        if (this.closedError) return; // closed for garbage while decoding this chunk
        // Last line of defence: a throw here would be an uncaught exception in the daemon.
        try {
          this.dispatch(frame);
        } catch (err) {
          this.warn("agent frame handling failed", {
            header: headerSummary(frame.header),
            err: err instanceof Error ? err.message : "non-error thrown",
          });
        }
      }
    });
    stream.on("error", (err) => this.close(err.message));
    stream.on("close", () => this.close("stream closed"));
  }

  get closed(): boolean {
    return this.closedError !== null;
  }

  /** Requests waiting for the agent (routes): for tests and metrics. */
  get pendingRequests(): number {
    return this.routes.size;
  }

  close(reason = "closed by host"): void {
    if (this.closedError) return;
    this.closedError = new AgentClosedError(reason);
    this.decoder.reset();
    if (this.suppressedWarnings > 0) {
      this.safeLog("agent warnings suppressed", { suppressed: this.suppressedWarnings });
      this.suppressedWarnings = 0;
    }
    this.execQueue.length = 0;
    this.execQueueBytes = 0;
    this.agentExecs.clear();
    for (const route of [...this.routes.values()]) route.onClose(this.closedError);
    this.routes.clear();
    this.stream.destroy();
  }

  /** For a restored VM: its agent was greeted when the template was made. */
  assumeHandshake(): void {
    this.handshakeDone = true;
  }

  async hello(timeoutMs: number): Promise<AgentHello> {
    const reply = await this.request({ type: "hello", version: PROTOCOL_VERSION }, timeoutMs);
    if (reply.header.type !== "hello" || reply.header.version !== PROTOCOL_VERSION) {
      throw new AgentError(
        "unsupported_version",
        `agent answered hello with ${JSON.stringify(headerSummary(reply.header))}`,
      );
    }
    const h = reply.header;
    this.handshakeDone = true;
    return {
      version: PROTOCOL_VERSION,
      agent: str(h.agent, 100),
      python: str(h.python, 40),
      pid: count(h.pid, 0),
    };
  }

  async ping(timeoutMs: number): Promise<void> {
    const reply = await this.request({ type: "ping" }, timeoutMs);
    if (reply.header.type !== "pong")
      throw new AgentError("bad_reply", `expected pong, got ${str(reply.header.type, 64)}`);
  }

  async restore(
    args: { entropy: Buffer; timeNs: bigint; hostname: string; machineId: string },
    timeoutMs: number,
  ): Promise<void> {
    await this.request(
      {
        type: "restore",
        entropy: args.entropy.toString("base64"),
        time_ns: Number(args.timeNs),
        hostname: args.hostname,
        machine_id: args.machineId,
      },
      timeoutMs,
    );
  }

  /**
   * Start an exec; events arrive on the returned iterable, ending with exactly one exit
   * event. Abandoning the iteration early cancels the exec in the guest. Execs run in
   * call order: past MAX_AGENT_EXECS in the guest they wait in a host FIFO; past its
   * bounds this throws ExecQueueFullError.
   */
  exec(code: string, opts: ExecOptions = {}): AsyncIterable<ExecEvent> & { id: number } {
    const codeBytes = Buffer.from(code, "utf8");
    if (codeBytes.length > MAX_PAYLOAD_BYTES) {
      throw new AgentError(
        "too_large",
        `code is ${codeBytes.length} bytes; the limit is ${MAX_PAYLOAD_BYTES} (upload a file and run it instead)`,
      );
    }
    if (this.closedError) throw this.closedError;
    const mustWait = this.agentExecs.size >= MAX_AGENT_EXECS || this.execQueue.length > 0;
    if (
      mustWait &&
      (this.execQueue.length >= MAX_QUEUED_EXECS ||
        this.execQueueBytes + codeBytes.length > MAX_QUEUED_EXEC_BYTES)
    ) {
      throw new ExecQueueFullError(
        `${this.execQueue.length} execs (${this.execQueueBytes} bytes of code) are already waiting for this sandbox; the limit is ${MAX_QUEUED_EXECS} (${MAX_QUEUED_EXEC_BYTES} bytes): wait for some to finish`,
      );
    }
    const id = this.allocId();
    const queue: { event: ExecEvent; bytes: number }[] = [];
    const gate = opts.output;
    let aborted = false;
    let started = false;
    let wake: (() => void) | null = null;
    let failure: Error | null = null;
    let done = false;
    // The agent enforces max_output_bytes; a hostile one must not make the host buffer more.
    const outputCap = (opts.maxOutputBytes ?? DEFAULT_MAX_OUTPUT_BYTES) + MAX_PAYLOAD_BYTES;
    let outputBytes = 0;
    let truncated = false;
    const notify = () => {
      wake?.();
      wake = null;
    };
    this.routes.set(id, {
      onFrame: ({ header, payload }) => {
        if (header.type === "output") {
          outputBytes += payload.length;
          if (outputBytes > outputCap || (gate && !gate.admit(payload.length))) {
            truncated = true;
            return;
          }
          const stream = header.stream === "stderr" ? "stderr" : "stdout";
          queue.push({
            event: { type: stream, data: utf8.decode(payload) },
            bytes: payload.length,
          });
        } else if (header.type === "exit") {
          this.execEnded(id);
          const event = exitEvent(header);
          if (truncated && event.type === "exit") event.truncated = true;
          queue.push({ event, bytes: 0 });
        } else if (header.type === "error") {
          this.execEnded(id);
          failure = agentError(header);
        }
        notify();
      },
      onClose: (err) => {
        failure = err;
        notify();
      },
    });
    const header: FrameHeader = {
      type: "exec",
      id,
      language: opts.language ?? "python",
      timeout_ms: opts.timeoutMs ?? null,
      max_output_bytes: opts.maxOutputBytes ?? null,
    };
    this.execQueue.push({ id, header, code: codeBytes });
    this.execQueueBytes += codeBytes.length;
    this.pumpExecs();
    const client = this;
    opts.signal?.addEventListener(
      "abort",
      () => {
        aborted = true;
        queue.length = 0; // nobody will read it
        if (!started && !done && !client.closed) client.abandonExec(id);
        notify();
      },
      { once: true },
    );
    const iterable = {
      id,
      async *[Symbol.asyncIterator](): AsyncGenerator<ExecEvent> {
        started = true;
        try {
          for (;;) {
            if (aborted) return;
            const item = queue.shift();
            if (item) gate?.taken(item.bytes);
            const event = item?.event;
            if (event) {
              yield event;
              if (event.type === "exit") {
                done = true;
                return;
              }
              continue;
            }
            if (failure) throw failure;
            await new Promise<void>((resolve) => {
              wake = resolve;
            });
          }
        } finally {
          if (!done && !client.closed) client.abandonExec(id);
        }
      },
    };
    return iterable;
  }

  /** The caller stopped listening to exec `id`: drop it if it still waits, else cancel it. */
  private abandonExec(id: number): void {
    if (this.unqueueExec(id)) {
      this.routes.delete(id);
      return;
    }
    if (!this.agentExecs.has(id)) return; // already ended (an error reply)
    // Its slot in the agent stays taken until the agent reports its end, or at most
    // ABANDONED_EXEC_MS: a guest that never answers does not hold it (and the route) forever.
    const grace = setTimeout(() => {
      if (this.routes.get(id) !== route) return;
      this.warn("guest never ended a cancelled exec; its slot is released", { exec: id });
      this.execEnded(id);
    }, ABANDONED_EXEC_MS);
    grace.unref();
    const route: Route = {
      onFrame: ({ header }) => {
        if (header.type !== "exit" && header.type !== "error") return;
        clearTimeout(grace);
        this.execEnded(id);
      },
      onClose: () => clearTimeout(grace),
    };
    this.routes.set(id, route);
    this.cancel(id);
  }

  private unqueueExec(id: number): boolean {
    const i = this.execQueue.findIndex((q) => q.id === id);
    if (i < 0) return false;
    const [q] = this.execQueue.splice(i, 1);
    this.execQueueBytes -= q?.code.length ?? 0;
    return true;
  }

  /** Exec `id` has ended (exit or error reply): free its slot and send the next. */
  private execEnded(id: number): void {
    this.routes.delete(id);
    this.unqueueExec(id); // a hostile agent may answer an exec it was never sent
    if (this.agentExecs.delete(id)) this.pumpExecs();
  }

  private pumpExecs(): void {
    while (!this.closedError && this.agentExecs.size < MAX_AGENT_EXECS) {
      const next = this.execQueue.shift();
      if (!next) return;
      this.execQueueBytes -= next.code.length;
      this.agentExecs.add(next.id);
      this.send(next.header, next.code);
    }
  }

  /** Ask the agent to stop exec `target` (queued or running). Fire and forget. */
  cancel(target: number): void {
    if (this.closed) return;
    const id = this.allocId();
    // Dropped at the agent's answer, or after CANCEL_ROUTE_MS if it never answers.
    const timer = setTimeout(() => this.routes.delete(id), CANCEL_ROUTE_MS);
    timer.unref();
    this.routes.set(id, {
      onFrame: () => {
        clearTimeout(timer);
        this.routes.delete(id);
      },
      onClose: () => clearTimeout(timer),
    });
    this.send({ type: "cancel", id, target });
  }

  /**
   * Upload: stream `source` into `path` in the guest, atomically. Resolves with the size
   * written. `maxBytes` is enforced while streaming; exceeding it aborts the write in the
   * guest and throws AgentError("too_large").
   */
  async writeFile(
    path: string,
    source: AsyncIterable<Buffer | Uint8Array>,
    opts: { maxBytes: number; mode?: number; timeoutMs?: number },
  ): Promise<number> {
    const id = this.allocId();
    let earlyError: Error | null = null;
    let endReply: ((f: Frame) => void) | null = null;
    let endFail: ((e: Error) => void) | null = null;
    let beginReply: ((f: Frame) => void) | null = null;
    let beginFail: ((e: Error) => void) | null = null;
    this.routes.set(id, {
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
      await this.awaitReply(
        (ok, fail) => {
          beginReply = ok;
          beginFail = fail;
        },
        () => this.send({ type: "write_begin", id, path, mode: opts.mode ?? null }),
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
            await this.sendWithBackpressure(
              { type: "write_chunk", id },
              buf.subarray(off, off + UPLOAD_CHUNK),
              timeoutMs,
            );
          }
        }
        if (earlyError) throw earlyError;
      } catch (err) {
        if (!this.closed) this.send({ type: "write_abort", id });
        throw err;
      }
      const reply = await this.awaitReply(
        (ok, fail) => {
          endReply = ok;
          endFail = fail;
        },
        () => this.send({ type: "write_end", id, size }),
        timeoutMs,
        "write_end",
      );
      return count(reply.header.size, size);
    } finally {
      // Late frames for an aborted write are dropped; keep the route briefly so the
      // agent's ok to write_abort is not logged as unknown.
      setTimeout(() => this.routes.delete(id), 5_000).unref();
    }
  }

  /**
   * Download: resolves once the agent has opened the file, with its size and a stream.
   * The stream carries exactly `size` bytes or fails: bytes past the declared size (the
   * file grew, or a hostile guest) fail it before any excess is pushed, and a read_end
   * short of it fails it too, so a consumer that announced `size` (an HTTP content-length)
   * never sends more or fewer bytes than it announced.
   */
  readFile(path: string, timeoutMs = 30_000): Promise<{ size: number; stream: Readable }> {
    const id = this.allocId();
    let consumedAcked = 0;
    let received = 0;
    let size = 0;
    const client = this;
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
        if (consumed - consumedAcked >= READ_WINDOW / 4 && !client.closed && !finished) {
          consumedAcked = consumed;
          client.send({ type: "read_ack", id, bytes: consumed });
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
        if (!finished && !client.closed) client.send({ type: "read_abort", id });
        finished = true;
        client.routes.delete(id);
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
    const fail = (
      err: Error,
      abortGuest = err instanceof AgentError && err.code === "bad_reply",
    ) => {
      clearTimeout(timer);
      unstall();
      const abort = abortGuest && !finished && !this.closed;
      finished = true;
      this.routes.delete(id);
      if (abort) this.send({ type: "read_abort", id });
      // Before read_begin the caller holds no stream yet: the rejection is the report.
      if (begun) stream.destroy(err);
      else reject(err);
    };
    return new Promise((resolve, rejectPromise) => {
      reject = rejectPromise;
      timer = setTimeout(() => {
        this.routes.delete(id);
        reject(new AgentError("timeout", `the guest did not open ${path} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.routes.set(id, {
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
              this.routes.delete(id);
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
      this.send({ type: "read", id, path, window: READ_WINDOW });
    });
  }

  private request(
    header: { type: string; [key: string]: unknown },
    timeoutMs: number,
  ): Promise<Frame> {
    const id = this.allocId();
    return this.awaitReply(
      (ok, fail) =>
        this.routes.set(id, {
          onFrame: (frame) => {
            this.routes.delete(id);
            frame.header.type === "error" ? fail(agentError(frame.header)) : ok(frame);
          },
          onClose: fail,
        }),
      () => this.send({ ...header, id } as FrameHeader),
      timeoutMs,
      header.type,
      () => this.routes.delete(id),
    );
  }

  private awaitReply(
    register: (ok: (f: Frame) => void, fail: (e: Error) => void) => void,
    sendIt: () => void,
    timeoutMs: number,
    what: string,
    onTimeout: () => void = () => {},
  ): Promise<Frame> {
    if (this.closedError) return Promise.reject(this.closedError);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        onTimeout();
        reject(
          new AgentError(
            "timeout",
            `the guest agent did not answer ${what} within ${timeoutMs} ms`,
          ),
        );
      }, timeoutMs);
      register(
        (f) => {
          clearTimeout(timer);
          resolve(f);
        },
        (e) => {
          clearTimeout(timer);
          reject(e);
        },
      );
      sendIt();
    });
  }

  /**
   * A (re)started agent process knows nothing of earlier requests. User code runs in a
   * worker process of its own (its deaths are reported as exits), so this is the control
   * agent itself having died and been restarted by init. Fail everything in flight.
   */
  private onAgentStarted(): void {
    if (!this.handshakeDone) return; // the agent's first start, during boot
    const inFlight = [...this.routes.values()];
    this.routes.clear();
    this.agentExecs.clear();
    this.execQueue.length = 0;
    this.execQueueBytes = 0;
    if (inFlight.length === 0) return;
    this.warn("guest agent restarted; failing requests in flight", {
      requests: inFlight.length,
    });
    const err = new AgentError(
      "agent_restarted",
      "the sandbox's guest agent restarted (it crashed or was killed inside the guest); its REPL state is lost",
    );
    for (const route of inFlight) route.onClose(err);
  }

  private allocId(): number {
    const id = this.nextId;
    this.nextId = this.nextId >= Number.MAX_SAFE_INTEGER ? 1 : this.nextId + 1;
    return id;
  }

  private send(header: FrameHeader, payload?: Buffer): boolean {
    if (this.closedError) throw this.closedError;
    return this.stream.write(encodeFrame(header, payload));
  }

  /** Send, then wait for the channel to drain: at most `timeoutMs` (a guest that stops reading). */
  private async sendWithBackpressure(
    header: FrameHeader,
    payload: Buffer,
    timeoutMs: number,
  ): Promise<void> {
    if (this.send(header, payload)) return;
    await new Promise<void>((resolve, reject) => {
      const done = () => {
        clearTimeout(timer);
        this.stream.off("drain", onDrain);
        this.stream.off("close", onClose);
      };
      const onDrain = () => {
        done();
        resolve();
      };
      const onClose = () => {
        done();
        reject(this.closedError ?? new AgentClosedError("stream closed"));
      };
      const timer = setTimeout(() => {
        done();
        reject(
          new AgentError("timeout", `the guest agent read none of the upload for ${timeoutMs} ms`),
        );
      }, timeoutMs);
      this.stream.once("drain", onDrain);
      this.stream.once("close", onClose);
    });
  }

  private dispatch(frame: Frame): void {
    if (frame.header.type === "started") {
      this.onAgentStarted();
      return;
    }
    const id = frame.header.id;
    const route = typeof id === "number" ? this.routes.get(id) : undefined;
    if (route) route.onFrame(frame);
    else if (frame.header.type === "error")
      this.warn("agent error without a request", { header: headerSummary(frame.header) });
  }

  /** A decoder problem: logged (rate-limited) and charged; past the bound, the channel closes. */
  private onDecodeProblem(p: DecodeProblem): void {
    if (this.closedError) return;
    let cost: number;
    if (p.kind === "resync") {
      this.garbageSeen.bytes += p.skipped;
      cost = Math.max(p.skipped, GARBAGE_MIN_COST);
    } else {
      this.garbageSeen.badFrames++;
      cost = GARBAGE_BAD_FRAME_COST;
    }
    if (this.garbage.take(cost)) {
      this.warn("agent frame problem", p);
      return;
    }
    const reason = `the guest agent kept sending garbage (${this.garbageSeen.bytes} bytes skipped, ${this.garbageSeen.badFrames} undecodable frames); a working agent sends none`;
    this.safeLog("guest agent channel closed for garbage", { ...this.garbageSeen });
    this.close(reason);
    this.violationResolve(reason);
  }

  /** A warning the guest can trigger: at most WARN_BURST, then one per WARN_REFILL_MS. */
  private warn(msg: string, extra?: Record<string, unknown>): void {
    if (!this.warnings.take()) {
      this.suppressedWarnings++;
      return;
    }
    if (this.suppressedWarnings > 0) {
      extra = { ...extra, suppressed: this.suppressedWarnings };
      this.suppressedWarnings = 0;
    }
    this.safeLog(msg, extra);
  }

  private safeLog(msg: string, extra?: Record<string, unknown>): void {
    try {
      this.log(msg, extra);
    } catch {
      // a logging failure must not take the daemon down
    }
  }
}

function agentError(header: FrameHeader): AgentError {
  return new AgentError(
    str(header.code, 40, "error"),
    str(header.message, 2000, "the guest agent reported an error"),
  );
}

function exitEvent(h: FrameHeader): ExecEvent {
  const event: ExecEvent = {
    type: "exit",
    code: Number.isSafeInteger(h.code) ? (h.code as number) : -1,
  };
  if (h.error && typeof h.error === "object") {
    const e = h.error as Record<string, unknown>;
    event.error = {
      name: str(e.name, 200),
      value: str(e.value, 10_000),
      traceback: str(e.traceback, 100_000),
    };
  }
  if (h.timed_out === true) event.timed_out = true;
  if (h.truncated === true) event.truncated = true;
  if (h.cancelled === true) event.cancelled = true;
  return event;
}
