/**
 * Exec streams: the host's FIFO of execs (at most a few in the guest at once), each exec's
 * output and exit turned into an async stream with bounded buffering, and the cancel of an
 * exec its reader abandoned. Guest twins: scheduler.py (the exec queue, timeouts, cancel)
 * and output.py (the output and exit frames read here).
 */
import { OverLimitError } from "../sandboxes/errors.js";
import type { AgentConnection, Route } from "./connection.js";
import { AgentError } from "./errors.js";
import { type FrameHeader, MAX_PAYLOAD_BYTES } from "./frames.js";
import { agentError, exitEvent } from "./sanitize.js";

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
const MAX_QUEUED_EXEC_BYTES = 64 * 1024 * 1024;
/** How long a cancel's route waits for the agent's ok before it is dropped. */
const CANCEL_ROUTE_MS = 30_000;
/**
 * How long an abandoned (cancelled) exec keeps its slot in the agent waiting for its exit:
 * the agent kills a cancelled exec within its KILL_GRACE (10 s); a guest that never
 * reports it does not keep the slot and the route forever.
 */
const ABANDONED_EXEC_MS = 60_000;
const utf8 = new TextDecoder("utf-8", { fatal: false });

/** Too many execs already waiting for one sandbox. */
export class ExecQueueFullError extends OverLimitError {}

interface QueuedExec {
  id: number;
  header: FrameHeader;
  code: Buffer;
}

export class ExecScheduler {
  /** Ids of execs sent to the agent whose exit (or error) has not arrived yet. */
  private readonly agentExecs = new Set<number>();
  /** Execs waiting for a slot in the agent, in arrival order. */
  private readonly execQueue: QueuedExec[] = [];
  private execQueueBytes = 0;

  constructor(private readonly conn: AgentConnection) {
    // The channel closed or the agent restarted: nothing queued or in the guest remains.
    conn.onReset(() => {
      this.execQueue.length = 0;
      this.execQueueBytes = 0;
      this.agentExecs.clear();
    });
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
    const conn = this.conn;
    if (conn.closedError) throw conn.closedError;
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
    const id = conn.allocId();
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
    conn.routes.set(id, {
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
    const scheduler = this;
    opts.signal?.addEventListener(
      "abort",
      () => {
        aborted = true;
        queue.length = 0; // nobody will read it
        if (!started && !done && !conn.closed) scheduler.abandonExec(id);
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
          if (!done && !conn.closed) scheduler.abandonExec(id);
        }
      },
    };
    return iterable;
  }

  /** Ask the agent to stop exec `target` (queued or running). Fire and forget. */
  cancel(target: number): void {
    const conn = this.conn;
    if (conn.closed) return;
    const id = conn.allocId();
    // Dropped at the agent's answer, or after CANCEL_ROUTE_MS if it never answers.
    const timer = setTimeout(() => conn.routes.delete(id), CANCEL_ROUTE_MS);
    timer.unref();
    conn.routes.set(id, {
      onFrame: () => {
        clearTimeout(timer);
        conn.routes.delete(id);
      },
      onClose: () => clearTimeout(timer),
    });
    conn.send({ type: "cancel", id, target });
  }

  /** The caller stopped listening to exec `id`: drop it if it still waits, else cancel it. */
  private abandonExec(id: number): void {
    const routes = this.conn.routes;
    if (this.unqueueExec(id)) {
      routes.delete(id);
      return;
    }
    if (!this.agentExecs.has(id)) return; // already ended (an error reply)
    // Its slot in the agent stays taken until the agent reports its end, or at most
    // ABANDONED_EXEC_MS: a guest that never answers does not hold it (and the route) forever.
    const grace = setTimeout(() => {
      if (routes.get(id) !== route) return;
      this.conn.warn("guest never ended a cancelled exec; its slot is released", { exec: id });
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
    routes.set(id, route);
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
    this.conn.routes.delete(id);
    this.unqueueExec(id); // a hostile agent may answer an exec it was never sent
    if (this.agentExecs.delete(id)) this.pumpExecs();
  }

  private pumpExecs(): void {
    while (!this.conn.closed && this.agentExecs.size < MAX_AGENT_EXECS) {
      const next = this.execQueue.shift();
      if (!next) return;
      this.execQueueBytes -= next.code.length;
      this.agentExecs.add(next.id);
      this.conn.send(next.header, next.code);
    }
  }
}
