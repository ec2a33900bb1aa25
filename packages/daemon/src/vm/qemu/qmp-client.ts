/**
 * A typed QMP client over any duplex byte stream (here: a socketpair handed to QEMU as a
 * file descriptor, so there is no socket path to wait for). QEMU's replies are treated as
 * hostile input (a compromised QEMU writes what it likes): lines are bounded, every field
 * is read through a bounded accessor, and nothing thrown while handling a line escapes the
 * socket's data handler (that would be an uncaught exception in the daemon).
 */
import { EventEmitter } from "node:events";
import type { Duplex } from "node:stream";
import { count, record, str } from "../../util/untrusted.js";

const MAX_QMP_LINE = 1024 * 1024;
/** Bounds on the text taken from a reply (QEMU's own are far shorter). */
const MAX_EVENT_NAME = 128;
const MAX_ERROR_CLASS = 128;
const MAX_ERROR_DESC = 4096;

export class QmpError extends Error {
  constructor(
    readonly command: string,
    readonly errorClass: string,
    readonly desc: string,
  ) {
    super(`QMP ${command} failed: ${errorClass}: ${desc}`);
    this.name = "QmpError";
  }
}

export class QmpClosedError extends Error {
  constructor(reason: string) {
    super(`QMP connection closed: ${reason}`);
    this.name = "QmpClosedError";
  }
}

export class QmpTimeoutError extends Error {
  constructor(command: string, timeoutMs: number) {
    super(`QMP ${command} got no reply within ${timeoutMs} ms`);
    this.name = "QmpTimeoutError";
  }
}

export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

export interface QmpGreeting {
  version: { qemu: { major: number; minor: number; micro: number }; package: string };
  capabilities: unknown[];
}

/** The commands podflare uses, with their argument and return types. */
export interface QmpCommands {
  qmp_capabilities: { args: Record<string, never>; ret: Record<string, never> };
  "query-status": { args: Record<string, never>; ret: { status: string; running: boolean } };
  stop: { args: Record<string, never>; ret: Record<string, never> };
  cont: { args: Record<string, never>; ret: Record<string, never> };
  "migrate-set-capabilities": {
    args: { capabilities: { capability: string; state: boolean }[] };
    ret: Record<string, never>;
  };
  "migrate-set-parameters": { args: Record<string, unknown>; ret: Record<string, never> };
  migrate: { args: { uri: string }; ret: Record<string, never> };
  "migrate-incoming": { args: { uri: string }; ret: Record<string, never> };
  "block-stream": {
    args: {
      "job-id": string;
      device: string;
      base?: string;
      "base-node"?: string;
      "backing-file"?: string;
    };
    ret: Record<string, never>;
  };
  "add-fd": {
    args: { "fdset-id": number; opaque?: string };
    ret: { "fdset-id": number; fd: number };
  };
  "remove-fd": { args: { "fdset-id": number; fd?: number }; ret: Record<string, never> };
  "query-fdsets": {
    args: Record<string, never>;
    ret: { "fdset-id": number; fds: { fd: number; opaque?: string }[] }[];
  };
  "blockdev-add": { args: Record<string, unknown>; ret: Record<string, never> };
  "blockdev-del": { args: { "node-name": string }; ret: Record<string, never> };
  "blockdev-snapshot": { args: { node: string; overlay: string }; ret: Record<string, never> };
  "xen-save-devices-state": {
    args: { filename: string; live: boolean };
    ret: Record<string, never>;
  };
}

/** Commands whose reply's `return` is a list, not an object. */
const LIST_RETURNS: ReadonlySet<string> = new Set<keyof QmpCommands>(["query-fdsets"]);

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

export class QmpClient extends EventEmitter {
  private buffer = "";
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  private closedReason: string | null = null;
  private greetingResolve!: (g: QmpGreeting) => void;
  private greetingReject!: (e: Error) => void;
  readonly greeting: Promise<QmpGreeting>;

  constructor(private readonly stream: Duplex) {
    super();
    this.greeting = new Promise((resolve, reject) => {
      this.greetingResolve = resolve;
      this.greetingReject = reject;
    });
    this.greeting.catch(() => {}); // observed through connect()
    stream.setEncoding("utf8");
    stream.on("data", (chunk: string) => {
      try {
        this.onData(chunk);
      } catch (err) {
        // Last line of defence: a hostile reply (or a listener tripping over one) must not
        // become an uncaught exception; the connection is no longer trustworthy.
        this.close(
          `handling a QMP message failed: ${err instanceof Error ? err.message.slice(0, 200) : "non-error thrown"}`,
        );
      }
    });
    stream.on("error", (err) => this.close(err.message));
    stream.on("close", () => this.close("stream closed"));
  }

  /** Wait for the greeting and leave capabilities-negotiation mode. */
  async connect(timeoutMs = 10_000): Promise<QmpGreeting> {
    const timer = setTimeout(() => this.close(`no QMP greeting within ${timeoutMs} ms`), timeoutMs);
    try {
      const greeting = await this.greeting;
      await this.execute("qmp_capabilities", {}, timeoutMs);
      return greeting;
    } finally {
      clearTimeout(timer);
    }
  }

  execute<K extends keyof QmpCommands>(
    command: K,
    args: QmpCommands[K]["args"],
    timeoutMs = 10_000,
  ): Promise<QmpCommands[K]["ret"]> {
    return this.executeVia(command, args, timeoutMs, (line) => this.stream.write(line));
  }

  /**
   * Run a command whose line is written by `write` (e.g. with a file descriptor attached,
   * see vm/fd-pass.ts), once none of our own bytes is still queued, so the two writers'
   * lines cannot interleave. The reply is matched by id like any other.
   */
  async executeWith<K extends keyof QmpCommands>(
    command: K,
    args: QmpCommands[K]["args"],
    write: (line: string) => Promise<void>,
    timeoutMs = 10_000,
  ): Promise<QmpCommands[K]["ret"]> {
    if (this.stream.writableLength > 0 && !this.closedReason)
      await new Promise<void>((resolve) => {
        this.stream.once("drain", resolve);
        this.once("closed", resolve);
      });
    let written: Promise<void> = Promise.resolve();
    let sentId = "";
    const reply = this.executeVia(command, args, timeoutMs, (line, id) => {
      sentId = id;
      written = write(line);
    });
    try {
      await written;
    } catch (err) {
      // Nothing reached QEMU: no reply will come.
      reply.catch(() => {});
      const pending = this.pending.get(sentId);
      if (pending) {
        clearTimeout(pending.timer);
        this.pending.delete(sentId);
      }
      throw err;
    }
    return reply;
  }

  private executeVia<K extends keyof QmpCommands>(
    command: K,
    args: QmpCommands[K]["args"],
    timeoutMs: number,
    write: (line: string, id: string) => unknown,
  ): Promise<QmpCommands[K]["ret"]> {
    if (this.closedReason) return Promise.reject(new QmpClosedError(this.closedReason));
    const id = `pf-${this.nextId++}`;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new QmpTimeoutError(command, timeoutMs));
      }, timeoutMs);
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      const message: Record<string, unknown> = { execute: command, id };
      if (Object.keys(args).length > 0) message.arguments = args;
      write(`${JSON.stringify(message)}\n`, id);
    });
  }

  /** Resolve with the first event of that name satisfying `match`, or reject on timeout. */
  waitForEvent(
    name: string,
    timeoutMs: number,
    match: (e: QmpEvent) => boolean = () => true,
  ): Promise<QmpEvent> {
    return new Promise((resolve, reject) => {
      const onEvent = (e: QmpEvent) => {
        if (e.event !== name || !match(e)) return;
        cleanup();
        resolve(e);
      };
      const onClose = (reason: string) => {
        cleanup();
        reject(new QmpClosedError(reason));
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new Error(`no QMP ${name} event within ${timeoutMs} ms`));
      }, timeoutMs);
      const cleanup = () => {
        clearTimeout(timer);
        this.off("event", onEvent);
        this.off("closed", onClose);
      };
      this.on("event", onEvent);
      this.on("closed", onClose);
    });
  }

  get closed(): boolean {
    return this.closedReason !== null;
  }

  close(reason = "closed by host"): void {
    if (this.closedReason) return;
    this.closedReason = reason;
    const err = new QmpClosedError(reason);
    this.greetingReject(err);
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject(err);
    }
    this.pending.clear();
    this.stream.destroy();
    this.emit("closed", reason);
  }

  private onData(chunk: string): void {
    // Only the new chunk is searched for a newline: a long line sent in small pieces costs
    // linear time, not a rescan of everything held per piece.
    let newline = chunk.indexOf("\n");
    if (newline < 0) {
      this.buffer += chunk;
    } else {
      let line = this.buffer + chunk.slice(0, newline);
      for (;;) {
        this.buffer = "";
        if (line.length > MAX_QMP_LINE) {
          this.close(`QMP line longer than ${MAX_QMP_LINE} bytes`);
          return;
        }
        line = line.trim();
        if (line) this.onLine(line);
        if (this.closedReason) return;
        const start = newline + 1;
        newline = chunk.indexOf("\n", start);
        if (newline < 0) {
          this.buffer = chunk.slice(start);
          break;
        }
        line = chunk.slice(start, newline);
      }
    }
    if (this.buffer.length > MAX_QMP_LINE) {
      this.close(`QMP line longer than ${MAX_QMP_LINE} bytes`);
    }
  }

  private onLine(line: string): void {
    let msg: unknown;
    try {
      msg = JSON.parse(line);
    } catch {
      this.close("QMP sent a line that is not JSON");
      return;
    }
    const m = record(msg);
    if (!m) {
      this.close("QMP sent a non-object message");
      return;
    }
    if ("QMP" in m) {
      this.greetingResolve(greetingOf(m.QMP));
      return;
    }
    if (typeof m.event === "string") {
      const event: QmpEvent = {
        event: m.event.slice(0, MAX_EVENT_NAME),
        data: record(m.data) ?? {},
      };
      const ts = record(m.timestamp);
      if (ts)
        event.timestamp = {
          seconds: count(ts.seconds, 0),
          microseconds: count(ts.microseconds, 0),
        };
      this.emit("event", event);
      return;
    }
    const id = typeof m.id === "string" ? m.id : undefined;
    const pending = id ? this.pending.get(id) : undefined;
    if (!pending || !id) return; // a reply to a request that already timed out
    this.pending.delete(id);
    clearTimeout(pending.timer);
    if ("return" in m) {
      // Every command podflare sends returns an object, but the few that return a list;
      // their callers check each element (it is as hostile as the rest).
      const list = LIST_RETURNS.has(pending.command);
      const ret = list ? (Array.isArray(m.return) ? m.return : null) : record(m.return);
      if (ret) pending.resolve(ret);
      else
        pending.reject(
          new QmpError(
            pending.command,
            "ProtocolError",
            `reply's return is not a JSON ${list ? "array" : "object"}`,
          ),
        );
    } else if (record(m.error)) {
      const e = record(m.error) ?? {};
      pending.reject(
        new QmpError(
          pending.command,
          str(e.class, MAX_ERROR_CLASS, "GenericError"),
          str(e.desc, MAX_ERROR_DESC, "(QEMU gave no description)"),
        ),
      );
    } else {
      pending.reject(
        new QmpError(pending.command, "ProtocolError", "reply has neither return nor error"),
      );
    }
  }
}

/** The greeting's fields that podflare reads, each checked (absent ones read as 0 or empty). */
function greetingOf(value: unknown): QmpGreeting {
  const g = record(value) ?? {};
  const qemu = record(record(g.version)?.qemu) ?? {};
  const capabilities = Array.isArray(g.capabilities)
    ? g.capabilities.slice(0, 64).map((c) => str(c, 64))
    : [];
  return {
    version: {
      qemu: {
        major: count(qemu.major, 0),
        minor: count(qemu.minor, 0),
        micro: count(qemu.micro, 0),
      },
      package: str(record(g.version)?.package, 200),
    },
    capabilities,
  };
}
