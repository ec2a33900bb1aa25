/**
 * The agent channel: request ids, the routing of replies to the request that waits for
 * them, hello and ping, and the channel's defences (garbage bounded, guest-triggered
 * warnings rate-limited, everything in flight failed when the channel closes or the agent
 * restarts). Guest twin: dispatch.py (request routing, hello/ping).
 */
import { randomInt } from "node:crypto";
import type { Duplex } from "node:stream";
import { TokenBucket } from "../util/token-bucket.js";
import { str } from "../util/untrusted.js";
import { AgentClosedError, AgentError } from "./errors.js";
import {
  type DecodeProblem,
  encodeFrame,
  type Frame,
  FrameDecoder,
  type FrameHeader,
  PROTOCOL_VERSION,
} from "./frames.js";
import { agentError, headerSummary, helloFields } from "./sanitize.js";

export interface AgentHello {
  version: number;
  agent: string;
  python: string;
  pid: number;
}

/** Where the frames of one request go, and how it learns the channel ended. */
export interface Route {
  onFrame: (frame: Frame) => void;
  onClose: (err: Error) => void;
}

export type AgentLog = (msg: string, extra?: Record<string, unknown>) => void;

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

export class AgentConnection {
  private readonly decoder: FrameDecoder;
  /**
   * The requests waiting for frames, by id. The request modules (exec.ts, files.ts) add
   * and remove their own routes; the connection dispatches to them and fails them all
   * when the channel ends.
   */
  readonly routes = new Map<number, Route>();
  /**
   * Random start: a VM forked mid-call still finishes the parent's call, whose frames
   * carry the parent client's id; this client's ids must not collide with it.
   */
  private nextId = 1 + randomInt(2 ** 47);
  private closedWith: AgentClosedError | null = null;
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
  /** Run when the channel closes or the agent restarts, before the routes are failed. */
  private readonly resetHooks: (() => void)[] = [];

  constructor(
    private readonly stream: Duplex,
    private readonly log: AgentLog = () => {},
  ) {
    this.decoder = new FrameDecoder((p) => this.onDecodeProblem(p));
    stream.on("data", (chunk: Buffer) => {
      if (this.closedWith) return;
      for (const frame of this.decoder.push(chunk)) {
        if (this.closedWith) return; // closed for garbage while decoding this chunk
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
    return this.closedWith !== null;
  }

  /** Why the channel closed, or null while it is open. */
  get closedError(): AgentClosedError | null {
    return this.closedWith;
  }

  /** Requests waiting for the agent (routes): for tests and metrics. */
  get pendingRequests(): number {
    return this.routes.size;
  }

  /** `hook` forgets per-request state: the channel closed or the agent restarted. */
  onReset(hook: () => void): void {
    this.resetHooks.push(hook);
  }

  close(reason = "closed by host"): void {
    if (this.closedWith) return;
    this.closedWith = new AgentClosedError(reason);
    this.decoder.reset();
    if (this.suppressedWarnings > 0) {
      this.safeLog("agent warnings suppressed", { suppressed: this.suppressedWarnings });
      this.suppressedWarnings = 0;
    }
    for (const hook of this.resetHooks) hook();
    for (const route of [...this.routes.values()]) route.onClose(this.closedWith);
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
    this.handshakeDone = true;
    return { version: PROTOCOL_VERSION, ...helloFields(reply.header) };
  }

  async ping(timeoutMs: number): Promise<void> {
    const reply = await this.request({ type: "ping" }, timeoutMs);
    if (reply.header.type !== "pong")
      throw new AgentError("bad_reply", `expected pong, got ${str(reply.header.type, 64)}`);
  }

  /** One request, one reply (an error reply rejects with its AgentError). */
  request(header: { type: string; [key: string]: unknown }, timeoutMs: number): Promise<Frame> {
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

  /**
   * Wait at most `timeoutMs` for a reply: `register` is handed the settle functions (to
   * call from a route), then `sendIt` sends the request.
   */
  awaitReply(
    register: (ok: (f: Frame) => void, fail: (e: Error) => void) => void,
    sendIt: () => void,
    timeoutMs: number,
    what: string,
    onTimeout: () => void = () => {},
  ): Promise<Frame> {
    if (this.closedWith) return Promise.reject(this.closedWith);
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

  allocId(): number {
    const id = this.nextId;
    this.nextId = this.nextId >= Number.MAX_SAFE_INTEGER ? 1 : this.nextId + 1;
    return id;
  }

  send(header: FrameHeader, payload?: Buffer): boolean {
    if (this.closedWith) throw this.closedWith;
    return this.stream.write(encodeFrame(header, payload));
  }

  /** Send, then wait for the channel to drain: at most `timeoutMs` (a guest that stops reading). */
  async sendWithBackpressure(
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
        reject(this.closedWith ?? new AgentClosedError("stream closed"));
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

  /** A warning the guest can trigger: at most WARN_BURST, then one per WARN_REFILL_MS. */
  warn(msg: string, extra?: Record<string, unknown>): void {
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

  /**
   * A (re)started agent process knows nothing of earlier requests. User code runs in a
   * worker process of its own (its deaths are reported as exits), so this is the control
   * agent itself having died and been restarted by init. Fail everything in flight.
   */
  private onAgentStarted(): void {
    if (!this.handshakeDone) return; // the agent's first start, during boot
    const inFlight = [...this.routes.values()];
    this.routes.clear();
    for (const hook of this.resetHooks) hook();
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
    if (this.closedWith) return;
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

  private safeLog(msg: string, extra?: Record<string, unknown>): void {
    try {
      this.log(msg, extra);
    } catch {
      // a logging failure must not take the daemon down
    }
  }
}
