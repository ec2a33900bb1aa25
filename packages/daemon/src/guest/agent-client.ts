/**
 * Host side of the guest-agent protocol: matches replies to request ids, turns exec
 * events into an async stream, and moves files with backpressure in both directions
 * (uploads wait for the channel to drain; downloads are credit-windowed, so a slow HTTP
 * client never makes the daemon buffer a whole file).
 */

import { randomInt } from "node:crypto";
import type { Duplex } from "node:stream";
import { Readable } from "node:stream";
import {
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
const UPLOAD_CHUNK = MAX_PAYLOAD_BYTES;
const utf8 = new TextDecoder("utf-8", { fatal: false });

export class AgentClient {
  private readonly decoder: FrameDecoder;
  private readonly routes = new Map<number, Route>();
  /**
   * Random start: a VM forked mid-call still finishes the parent's call, whose frames
   * carry the parent client's id; this client's ids must not collide with it.
   */
  private nextId = 1 + randomInt(2 ** 47);
  private closedError: Error | null = null;
  /** Set by the first answered hello: a `started` frame after it means a restart. */
  private handshakeDone = false;

  constructor(
    private readonly stream: Duplex,
    private readonly log: (msg: string, extra?: Record<string, unknown>) => void = () => {},
  ) {
    this.decoder = new FrameDecoder((p) => this.log("agent frame problem", p));
    stream.on("data", (chunk: Buffer) => {
      for (const frame of this.decoder.push(chunk)) this.dispatch(frame);
    });
    stream.on("error", (err) => this.close(err.message));
    stream.on("close", () => this.close("stream closed"));
  }

  get closed(): boolean {
    return this.closedError !== null;
  }

  close(reason = "closed by host"): void {
    if (this.closedError) return;
    this.closedError = new AgentClosedError(reason);
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
        `agent answered hello with ${JSON.stringify(reply.header).slice(0, 200)}`,
      );
    }
    const h = reply.header;
    this.handshakeDone = true;
    return {
      version: PROTOCOL_VERSION,
      agent: String(h.agent ?? "").slice(0, 100),
      python: String(h.python ?? "").slice(0, 40),
      pid: Number(h.pid) || 0,
    };
  }

  async ping(timeoutMs: number): Promise<void> {
    const reply = await this.request({ type: "ping" }, timeoutMs);
    if (reply.header.type !== "pong")
      throw new AgentError("bad_reply", `expected pong, got ${reply.header.type}`);
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
   * event. Abandoning the iteration early cancels the exec in the guest.
   */
  exec(code: string, opts: ExecOptions = {}): AsyncIterable<ExecEvent> & { id: number } {
    const codeBytes = Buffer.from(code, "utf8");
    if (codeBytes.length > MAX_PAYLOAD_BYTES) {
      throw new AgentError(
        "too_large",
        `code is ${codeBytes.length} bytes; the limit is ${MAX_PAYLOAD_BYTES} (upload a file and run it instead)`,
      );
    }
    const id = this.allocId();
    const queue: ExecEvent[] = [];
    let wake: (() => void) | null = null;
    let failure: Error | null = null;
    let done = false;
    const notify = () => {
      wake?.();
      wake = null;
    };
    this.routes.set(id, {
      onFrame: ({ header, payload }) => {
        if (header.type === "output") {
          const stream = header.stream === "stderr" ? "stderr" : "stdout";
          queue.push({ type: stream, data: utf8.decode(payload) });
        } else if (header.type === "exit") {
          this.routes.delete(id);
          queue.push(exitEvent(header));
        } else if (header.type === "error") {
          this.routes.delete(id);
          failure = new AgentError(
            String(header.code ?? "error"),
            String(header.message ?? "agent error").slice(0, 2000),
          );
        }
        notify();
      },
      onClose: (err) => {
        failure = err;
        notify();
      },
    });
    this.send(
      {
        type: "exec",
        id,
        language: opts.language ?? "python",
        timeout_ms: opts.timeoutMs ?? null,
        max_output_bytes: opts.maxOutputBytes ?? null,
      },
      codeBytes,
    );
    const client = this;
    const iterable = {
      id,
      async *[Symbol.asyncIterator](): AsyncGenerator<ExecEvent> {
        try {
          for (;;) {
            const event = queue.shift();
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
          if (!done && !client.closed) {
            client.routes.delete(id);
            client.cancel(id);
          }
        }
      },
    };
    return iterable;
  }

  /** Ask the agent to stop exec `target` (queued or running). Fire and forget. */
  cancel(target: number): void {
    if (this.closed) return;
    const id = this.allocId();
    this.routes.set(id, { onFrame: () => this.routes.delete(id), onClose: () => {} });
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
      return Number(reply.header.size ?? size);
    } finally {
      // Late frames for an aborted write are dropped; keep the route briefly so the
      // agent's ok to write_abort is not logged as unknown.
      setTimeout(() => this.routes.delete(id), 5_000).unref();
    }
  }

  /** Download: resolves once the agent has opened the file, with its size and a stream. */
  readFile(path: string, timeoutMs = 30_000): Promise<{ size: number; stream: Readable }> {
    const id = this.allocId();
    let consumedAcked = 0;
    let received = 0;
    const client = this;
    let finished = false;
    let begun = false;
    const stream = new Readable({
      highWaterMark: 1024 * 1024,
      read() {
        const consumed = received - this.readableLength;
        if (consumed - consumedAcked >= READ_WINDOW / 4 && !client.closed && !finished) {
          consumedAcked = consumed;
          client.send({ type: "read_ack", id, bytes: consumed });
        }
      },
      destroy(err, cb) {
        if (!finished && !client.closed) client.send({ type: "read_abort", id });
        finished = true;
        client.routes.delete(id);
        cb(err);
      },
    });
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.routes.delete(id);
        reject(new AgentError("timeout", `the guest did not open ${path} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.routes.set(id, {
        onFrame: ({ header, payload }) => {
          switch (header.type) {
            case "read_begin":
              clearTimeout(timer);
              begun = true;
              resolve({ size: Number(header.size) || 0, stream });
              break;
            case "data":
              received += payload.length;
              stream.push(payload);
              break;
            case "read_end":
              finished = true;
              this.routes.delete(id);
              stream.push(null);
              break;
            case "error": {
              clearTimeout(timer);
              finished = true;
              this.routes.delete(id);
              const err = agentError(header);
              // Before read_begin the caller holds no stream yet: the rejection is the report.
              if (begun) stream.destroy(err);
              else reject(err);
              break;
            }
          }
        },
        onClose: (err) => {
          clearTimeout(timer);
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
   * A (re)started agent process knows nothing of earlier requests: the OOM killer may have
   * ended it together with the user code inside it. Fail everything in flight.
   */
  private onAgentStarted(): void {
    if (!this.handshakeDone) return; // the agent's first start, during boot
    const inFlight = [...this.routes.values()];
    this.routes.clear();
    if (inFlight.length === 0) return;
    this.log("guest agent restarted; failing requests in flight", { requests: inFlight.length });
    const err = new AgentError(
      "agent_restarted",
      "the sandbox's Python process restarted (most likely killed for using too much memory); its REPL state is lost",
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

  private async sendWithBackpressure(header: FrameHeader, payload: Buffer): Promise<void> {
    if (this.send(header, payload)) return;
    await new Promise<void>((resolve, reject) => {
      const onDrain = () => {
        this.stream.off("close", onClose);
        resolve();
      };
      const onClose = () => {
        this.stream.off("drain", onDrain);
        reject(this.closedError ?? new AgentClosedError("stream closed"));
      };
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
      this.log("agent error without a request", { header: frame.header });
  }
}

function agentError(header: FrameHeader): AgentError {
  return new AgentError(
    String(header.code ?? "error").slice(0, 40),
    String(header.message ?? "the guest agent reported an error").slice(0, 2000),
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
      name: String(e.name ?? "").slice(0, 200),
      value: String(e.value ?? "").slice(0, 10_000),
      traceback: String(e.traceback ?? "").slice(0, 100_000),
    };
  }
  if (h.timed_out === true) event.timed_out = true;
  if (h.truncated === true) event.truncated = true;
  if (h.cancelled === true) event.cancelled = true;
  return event;
}
