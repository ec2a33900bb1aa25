/**
 * What the daemon holds for clients that read slowly or never: open streams (exec
 * responses and downloads in progress) and the bytes they keep in the host, bounded per
 * stream, per tenant and per daemon.
 *
 * - Opening a stream past a count or bytes bound throws TooManyStreamsError (429
 *   too_many_streams); the message names the bound and what to do.
 * - An exec stream is charged what waits unread in the host for it: its queued events
 *   plus what the transport holds (set `heldElsewhere`: the response stream's buffer and
 *   the socket's unsent bytes). Output that would take it past its own bound, its
 *   tenant's or the daemon's is refused, and so is all of its later output (the client
 *   gets a prefix and an exit event with `truncated`). Bounds are checked as output
 *   arrives; what an event grows by as it becomes a JSON line in the response (and the
 *   exit line) is charged when it moves there, so a stream can pass a bound by one line.
 * - A download is charged a fixed reservation (its credit window bounds what it holds).
 *
 * Pure bookkeeping: no I/O, no timers; release is idempotent.
 */
import { TooManyStreamsError } from "./errors.js";

export interface StreamLimits {
  /** Bytes one exec stream may hold unread in the host before its output is dropped. */
  streamMaxBufferedBytes: number;
  /** Streams one tenant may have open at once. */
  tenantMaxStreams: number;
  /** Bytes one tenant's streams may hold at once. */
  tenantMaxBufferedBytes: number;
  /** Streams open at once on this daemon. */
  maxStreams: number;
  /** Bytes all streams may hold at once. */
  maxBufferedBytes: number;
}

export type StreamKind = "exec" | "download";
/** Which bound refused a stream or dropped its output. */
export type StreamBound = "stream" | "tenant" | "daemon";

export interface StreamUsage {
  streams: number;
  bytes: number;
}

/** Told of every change (metrics); must not throw. */
export interface StreamBudgetHooks {
  onUsage?(total: StreamUsage): void;
  onRefused?(bound: Exclude<StreamBound, "stream">): void;
  onTruncated?(bound: StreamBound): void;
  onDropped?(bytes: number): void;
  onClosed?(kind: StreamKind, peakBytes: number): void;
}

/** The anonymous caller (no keys configured) is one tenant of its own. */
const ANONYMOUS = "\0anonymous";
const mib = (bytes: number): string => (bytes / 2 ** 20).toFixed(1);

interface TenantUsage extends StreamUsage {
  key: string;
}

export class StreamBudget {
  private readonly tenants = new Map<string, TenantUsage>();
  private readonly total: StreamUsage = { streams: 0, bytes: 0 };

  constructor(
    readonly limits: StreamLimits,
    readonly hooks: StreamBudgetHooks = {},
  ) {}

  /** Current usage: the daemon's, or one tenant's (null: the anonymous caller). */
  usage(tenant?: string | null): StreamUsage {
    const u = tenant === undefined ? this.total : this.tenants.get(tenant ?? ANONYMOUS);
    return { streams: u?.streams ?? 0, bytes: u?.bytes ?? 0 };
  }

  /**
   * Open a stream for `tenant`, charging `reserveBytes` at once (a download's window);
   * throws TooManyStreamsError past a bound. Release it with `close()`.
   */
  open(tenant: string | null, kind: StreamKind, reserveBytes = 0): StreamLease {
    const key = tenant ?? ANONYMOUS;
    const mine = this.tenants.get(key) ?? { key, streams: 0, bytes: 0 };
    const l = this.limits;
    const what = kind === "exec" ? "exec" : "download";
    if (mine.streams >= l.tenantMaxStreams) {
      this.hooks.onRefused?.("tenant");
      throw new TooManyStreamsError(
        `this API key already has ${mine.streams} streams open (exec responses and downloads not yet fully read); the limit per key is ${l.tenantMaxStreams} (PODFLARE_TENANT_MAX_STREAMS): read or close your open streams before starting another ${what}`,
      );
    }
    if (
      mine.bytes + reserveBytes > l.tenantMaxBufferedBytes ||
      mine.bytes >= l.tenantMaxBufferedBytes
    ) {
      this.hooks.onRefused?.("tenant");
      throw new TooManyStreamsError(
        `this API key's open streams already hold ${mib(mine.bytes)} MiB of unread output in the daemon; the limit per key is ${mib(l.tenantMaxBufferedBytes)} MiB (PODFLARE_TENANT_STREAM_BUFFER_MIB): read or close your open streams before starting another ${what}`,
      );
    }
    if (this.total.streams >= l.maxStreams) {
      this.hooks.onRefused?.("daemon");
      throw new TooManyStreamsError(
        `the daemon already has ${this.total.streams} streams open (exec responses and downloads not yet fully read); its limit is ${l.maxStreams} (PODFLARE_MAX_STREAMS): retry when other streams have ended`,
      );
    }
    if (
      this.total.bytes + reserveBytes > l.maxBufferedBytes ||
      this.total.bytes >= l.maxBufferedBytes
    ) {
      this.hooks.onRefused?.("daemon");
      throw new TooManyStreamsError(
        `the daemon's open streams already hold ${mib(this.total.bytes)} MiB of unread output; its limit is ${mib(l.maxBufferedBytes)} MiB (PODFLARE_STREAM_BUFFER_MIB): retry when other streams have been read`,
      );
    }
    this.tenants.set(key, mine);
    mine.streams++;
    this.total.streams++;
    const lease = new StreamLease(this, mine, kind);
    if (reserveBytes > 0) lease.charge(reserveBytes);
    this.hooks.onUsage?.(this.usage());
    return lease;
  }

  /**
   * @internal Move a lease's charge by `delta` (its new total `streamTotal`); with `check`,
   * an increase past a bound is refused: returns that bound and changes nothing.
   */
  adjust(
    mine: StreamUsage,
    delta: number,
    streamTotal: number,
    check: boolean,
  ): StreamBound | null {
    if (check && delta > 0) {
      if (streamTotal > this.limits.streamMaxBufferedBytes) return "stream";
      if (mine.bytes + delta > this.limits.tenantMaxBufferedBytes) return "tenant";
      if (this.total.bytes + delta > this.limits.maxBufferedBytes) return "daemon";
    }
    mine.bytes += delta;
    this.total.bytes += delta;
    this.hooks.onUsage?.(this.usage());
    return null;
  }

  /** @internal */
  release(mine: TenantUsage, lease: StreamLease): void {
    mine.streams--;
    this.total.streams--;
    if (mine.streams === 0 && mine.bytes === 0) this.tenants.delete(mine.key);
    this.hooks.onUsage?.(this.usage());
    this.hooks.onClosed?.(lease.kind, lease.peakBytes);
  }
}

/**
 * One open stream's charge. For an exec stream the agent client calls `admit` for each
 * piece of output as it arrives and `taken` as the reader takes it from the queue.
 */
export class StreamLease {
  /** Bytes of this stream held past the queue (the transport's buffers); set by it. */
  heldElsewhere: () => number = () => 0;
  /** The bound that dropped this stream's output, once one has. */
  dropped: StreamBound | null = null;
  /** The most this stream held at once (a normal reader's figure is in the metrics). */
  peakBytes = 0;
  private queued = 0;
  private charged = 0;
  private closed = false;

  constructor(
    private readonly budget: StreamBudget,
    private readonly mine: TenantUsage,
    readonly kind: StreamKind,
  ) {}

  /** Bytes charged to this stream now. */
  get bytes(): number {
    return this.charged;
  }

  /**
   * `bytes` of output arrived: keep them (true, charged) or drop them (false). Once one
   * piece is dropped every later one is too, so the reader gets an unbroken prefix.
   */
  admit(bytes: number): boolean {
    if (this.closed || this.dropped) {
      if (!this.closed) this.budget.hooks.onDropped?.(bytes);
      return false;
    }
    const target = this.queued + bytes + this.outside();
    const refused = this.budget.adjust(this.mine, target - this.charged, target, true);
    if (refused) {
      this.dropped = refused;
      this.budget.hooks.onTruncated?.(refused);
      this.budget.hooks.onDropped?.(bytes);
      // Still charge what the transport took since the last update.
      this.resync();
      return false;
    }
    this.queued += bytes;
    this.charged = target;
    this.peakBytes = Math.max(this.peakBytes, target);
    return true;
  }

  /** The reader took `bytes` of admitted output off the queue (into the transport). */
  taken(bytes: number): void {
    if (this.closed) return;
    this.queued = Math.max(0, this.queued - bytes);
    this.resync();
  }

  /** @internal A fixed charge (a download's reservation). */
  charge(bytes: number): void {
    this.queued += bytes;
    this.resync();
  }

  /** The stream ended or its reader went away: give back everything. Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.budget.adjust(this.mine, -this.charged, 0, false);
    this.charged = 0;
    this.queued = 0;
    this.budget.release(this.mine, this);
  }

  private resync(): void {
    const target = this.queued + this.outside();
    if (target !== this.charged)
      this.budget.adjust(this.mine, target - this.charged, target, false);
    this.charged = target;
    this.peakBytes = Math.max(this.peakBytes, target);
  }

  private outside(): number {
    try {
      const n = this.heldElsewhere();
      return Number.isFinite(n) && n > 0 ? n : 0;
    } catch {
      return 0;
    }
  }
}
