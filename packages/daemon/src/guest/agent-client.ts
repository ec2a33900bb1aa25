/**
 * Host side of the guest-agent protocol, as one object per VM: the facade the rest of the
 * daemon (vm/, sandboxes/, pool/) holds. It owns nothing itself; each job is a module
 * named after its twin in the guest agent's package (guest/agent/):
 *   frames.ts      framing                                   (protocol.py)
 *   connection.ts  the channel, request ids, replies, hello/ping (dispatch.py)
 *   exec.ts        exec FIFO and streams, cancel             (scheduler.py, output.py)
 *   files.ts       upload and download, with backpressure    (files.py)
 *   identity.ts    a restored clone's identity               (identity.py)
 *   sanitize.ts    bounded readers of the guest's hostile fields
 *   errors.ts      AgentError (the agent's code, as sent), AgentClosedError
 */
import type { Duplex, Readable } from "node:stream";
import { AgentConnection, type AgentHello, type AgentLog } from "./connection.js";
import { type ExecEvent, type ExecOptions, ExecScheduler } from "./exec.js";
import { readFile, type WriteOptions, writeFile } from "./files.js";
import { type RestoreIdentity, restoreIdentity } from "./identity.js";

export { type AgentHello, GARBAGE_LIMIT, WARN_BURST } from "./connection.js";
export { AgentClosedError, AgentError } from "./errors.js";
export {
  type ExecEvent,
  type ExecOptions,
  ExecQueueFullError,
  type Language,
  MAX_AGENT_EXECS,
  MAX_QUEUED_EXECS,
  type OutputGate,
} from "./exec.js";
export { DownloadSizeError } from "./files.js";

export class AgentClient {
  private readonly conn: AgentConnection;
  private readonly execs: ExecScheduler;
  /**
   * Resolves (never rejects) with the reason when this client closes the channel because
   * the guest broke the protocol: the VM is no longer usable and should be ended.
   */
  readonly violation: Promise<string>;

  constructor(stream: Duplex, log?: AgentLog) {
    this.conn = new AgentConnection(stream, log);
    this.execs = new ExecScheduler(this.conn);
    this.violation = this.conn.violation;
  }

  get closed(): boolean {
    return this.conn.closed;
  }

  /** Requests waiting for the agent (routes): for tests and metrics. */
  get pendingRequests(): number {
    return this.conn.pendingRequests;
  }

  close(reason?: string): void {
    this.conn.close(reason);
  }

  /** For a restored VM: its agent was greeted when the template was made. */
  assumeHandshake(): void {
    this.conn.assumeHandshake();
  }

  hello(timeoutMs: number): Promise<AgentHello> {
    return this.conn.hello(timeoutMs);
  }

  ping(timeoutMs: number): Promise<void> {
    return this.conn.ping(timeoutMs);
  }

  restore(args: RestoreIdentity, timeoutMs: number): Promise<void> {
    return restoreIdentity(this.conn, args, timeoutMs);
  }

  /**
   * Start an exec; events arrive on the returned iterable, ending with exactly one exit
   * event. Abandoning the iteration early cancels the exec in the guest. Execs run in
   * call order: past MAX_AGENT_EXECS in the guest they wait in a host FIFO; past its
   * bounds this throws ExecQueueFullError.
   */
  exec(code: string, opts?: ExecOptions): AsyncIterable<ExecEvent> & { id: number } {
    return this.execs.exec(code, opts);
  }

  /** Ask the agent to stop exec `target` (queued or running). Fire and forget. */
  cancel(target: number): void {
    this.execs.cancel(target);
  }

  /**
   * Upload `source` into `path` in the guest, atomically; resolves with the size written
   * (files.ts). Past `maxBytes` the write is aborted with AgentError("too_large").
   */
  writeFile(
    path: string,
    source: AsyncIterable<Buffer | Uint8Array>,
    opts: WriteOptions,
  ): Promise<number> {
    return writeFile(this.conn, path, source, opts);
  }

  /** Download: once the guest opened `path`, its size and a stream of exactly that many bytes (files.ts). */
  readFile(path: string, timeoutMs = 30_000): Promise<{ size: number; stream: Readable }> {
    return readFile(this.conn, path, timeoutMs);
  }
}
