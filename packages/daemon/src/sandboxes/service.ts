/**
 * The sandbox operations: the one entry transports (HTTP today) and the daemon call; this
 * module never sees HTTP. State lives in SQLite and changes only through the lifecycle
 * (lifecycle.ts); the live VMs are in the registry (registry.ts).
 */
import { randomBytes } from "node:crypto";
import { finished, type Readable } from "node:stream";
import type { Tenant } from "../auth/authenticator.js";
import type { KeyQuota } from "../auth/keys.js";
import type { ExecEvent, Language } from "../guest/agent-client.js";
import type { Metrics } from "../metrics/metrics.js";
import type { SandboxRow, Store } from "../store/db.js";
import { crashPoint } from "../util/crash-points.js";
import type { Logger } from "../util/logger.js";
import type { VmHandle as Vm, VmShape } from "../vm/backend.js";
import type { Admission } from "./admission.js";
import { mapAgentError } from "./agent-errors.js";
import type { DiskGuard } from "./disk-guard.js";
import { checkForkDiskLimit } from "./disk-quota.js";
import {
  SandboxDeadError,
  SandboxNotFoundError,
  SandboxPausedError,
  TooLargeError,
  WrongStateError,
} from "./errors.js";
import { guardExecStream } from "./exec-stream.js";
import { armExpiry } from "./expiry.js";
import { translateHostError } from "./host-errors.js";
import { Lifecycle } from "./lifecycle.js";
import {
  type CreateRequest,
  checkExecTimeout,
  checkForkCount,
  checkMergePair,
  normalizeCreate,
  type SandboxLimits,
} from "./normalize.js";
import { validateGuestPath } from "./paths.js";
import { LiveRegistry } from "./registry.js";
import type { StreamBudget } from "./stream-budget.js";
import { LISTED_STATES, type SandboxInfo, toInfo } from "./views.js";

export type { CreateRequest, SandboxLimits } from "./normalize.js";
export type { SandboxInfo } from "./views.js";

/**
 * Who asks: a tenant (an API key) or, when the daemon requires no key, null. A sandbox
 * owned by someone else is reported exactly as one that does not exist.
 */
export type Caller = Tenant | null;

const ownerOf = (caller: Caller): string | null => caller?.id ?? null;
const NO_QUOTA: KeyQuota = { maxSandboxes: null, maxMemMib: null };

export interface ExecRequest {
  code: string;
  language?: Language;
  timeout_ms?: number;
}

export interface AcquiredVm {
  vm: Vm;
  /** Taken ready from the warm pool (a hit) rather than restored on demand. */
  pooled: boolean;
}

/** Where VMs come from (the warm pool). */
export interface VmSource {
  /** `owner`: the tenant asking (a new shape's template build is bounded per tenant). */
  acquire(template: string, shape: VmShape, owner?: string | null): Promise<AcquiredVm>;
  /** The shape of a create of this template that names none. */
  defaultShape(template: string): VmShape;
  fork(parent: Vm, n: number): Promise<{ children: Vm[]; pausedMs: number }>;
  /** Merge a VM's fork layers into its overlay (frees the layers only it held). */
  flatten?(vm: Vm): Promise<void>;
  templateNames(): readonly string[];
}

/** What the transport tells exec() about the stream it sends (api/server.ts). */
export interface ExecTransport {
  /** Aborted when the client has gone (the response closed): the exec is dropped. */
  signal?: AbortSignal;
  /** Bytes of this stream the transport holds unsent (its buffers, the socket's). */
  heldBytes?: () => number;
}

/**
 * Charged to a download while it runs: the most it can hold in the host, its credit
 * window (guest/files.ts READ_WINDOW, 4 MiB) plus one data frame and the socket's
 * buffer.
 */
export const DOWNLOAD_HELD_BYTES = 4 * 1024 * 1024 + 512 * 1024;

export class SandboxService {
  private readonly live = new LiveRegistry();
  private readonly lifecycle: Lifecycle;
  /** Sandboxes ended while still `creating`, with why: ended once their VM is live. */
  private readonly doomed = new Map<string, string>();

  constructor(
    private readonly store: Store,
    private readonly source: VmSource,
    private readonly limits: SandboxLimits,
    private readonly admission: Admission,
    private readonly log: Logger,
    private readonly metrics?: Metrics,
    private readonly disk?: DiskGuard,
    private readonly streams?: StreamBudget,
  ) {
    this.lifecycle = new Lifecycle(store);
  }

  async create(caller: Caller, req: CreateRequest): Promise<SandboxInfo> {
    const { template, shape, timeoutMs } = normalizeCreate(req, this.limits, {
      names: this.source.templateNames(),
      defaultShape: (name) => this.source.defaultShape(name),
    });
    await this.disk?.checkRoom("create a sandbox");
    const id = newSandboxId();
    this.admission.admit([id], ownerOf(caller), caller?.quota ?? NO_QUOTA, shape);
    const now = Date.now();
    const row: Omit<SandboxRow, "state"> = {
      id,
      template,
      vcpu_count: shape.vcpuCount,
      mem_size_mib: shape.memSizeMib,
      created_at: now,
      expires_at: now + timeoutMs,
      ended_at: null,
      end_reason: null,
      metadata: JSON.stringify(req.metadata ?? {}),
      pid: null,
      owner: ownerOf(caller),
    };
    let vm: Vm;
    let pooled: boolean;
    try {
      this.lifecycle.begin(row);
      crashPoint("create:admitted");
      ({ vm, pooled } = await this.source.acquire(template, shape, ownerOf(caller)));
      crashPoint("create:vm-started");
    } catch (err) {
      this.admission.release(id);
      this.doomed.delete(id);
      ignoreFailure(() => this.lifecycle.abandon(id)); // a failed create leaves no trace
      throw translateHostError(err, "create a sandbox");
    }
    this.goLive(id, vm, now + timeoutMs);
    crashPoint("create:live");
    this.metrics?.createSeconds.observe(
      { result: pooled ? "hit" : "miss" },
      (Date.now() - now) / 1000,
    );
    this.log.info(
      { sandbox: id, vm: vm.id, template, pooled, owner: row.owner },
      "sandbox created",
    );
    // Destroyed meanwhile (by another call of its tenant): the answer says so.
    return toInfo(this.store.getSandbox(id) as SandboxRow);
  }

  list(caller: Caller): SandboxInfo[] {
    return this.store.listOwned(ownerOf(caller), LISTED_STATES).map(toInfo);
  }

  info(caller: Caller, id: string): SandboxInfo {
    return toInfo(this.ownedRow(caller, id));
  }

  /**
   * The caller's sandbox, or not found: another tenant's sandbox, an unknown id and one
   * already destroyed all give the same answer.
   */
  private ownedRow(caller: Caller, id: string): SandboxRow {
    const row = this.store.getSandbox(id);
    if (
      !row ||
      row.owner !== ownerOf(caller) ||
      row.state === "ended" ||
      row.state === "destroying"
    )
      throw new SandboxNotFoundError(id);
    return row;
  }

  /**
   * Run code. Checks happen now (so a caller can answer with an error status); the events
   * then stream as they happen and always end with exactly one exit event.
   */
  exec(
    caller: Caller,
    id: string,
    req: ExecRequest,
    transport: ExecTransport = {},
  ): AsyncIterable<ExecEvent> {
    const vm = this.readyVm(caller, id, "exec");
    checkExecTimeout(req.timeout_ms);
    // Counted from now until the response ends or its client goes (429 past a bound).
    const lease = this.streams?.open(ownerOf(caller), "exec");
    if (lease && transport.heldBytes) lease.heldElsewhere = transport.heldBytes;
    transport.signal?.addEventListener("abort", () => lease?.close(), { once: true });
    let events: AsyncIterable<ExecEvent>;
    try {
      events = vm.agent.exec(req.code, {
        language: req.language ?? "python",
        timeoutMs: req.timeout_ms ?? null,
        output: lease,
        signal: transport.signal,
      });
    } catch (err) {
      lease?.close();
      throw mapAgentError(err, id);
    }
    return guardExecStream(id, vm, events, this.log, lease);
  }

  async upload(
    caller: Caller,
    id: string,
    rawPath: unknown,
    body: AsyncIterable<Buffer>,
    declaredLength?: number,
  ): Promise<number> {
    const path = validateGuestPath(rawPath);
    const vm = this.readyVm(caller, id, "upload");
    if (declaredLength !== undefined && declaredLength > this.limits.maxUploadBytes) {
      throw new TooLargeError(
        `the upload is ${declaredLength} bytes; the limit is ${this.limits.maxUploadBytes}`,
      );
    }
    try {
      return await vm.agent.writeFile(path, body, { maxBytes: this.limits.maxUploadBytes });
    } catch (err) {
      throw mapAgentError(err, id, path);
    }
  }

  async download(
    caller: Caller,
    id: string,
    rawPath: unknown,
  ): Promise<{ size: number; stream: Readable }> {
    const path = validateGuestPath(rawPath);
    const vm = this.readyVm(caller, id, "download");
    // A download counts as a stream until it ends or its client goes (429 past a bound).
    const lease = this.streams?.open(ownerOf(caller), "download", DOWNLOAD_HELD_BYTES);
    try {
      const result = await vm.agent.readFile(path);
      if (lease) finished(result.stream, () => lease.close());
      return result;
    } catch (err) {
      lease?.close();
      throw mapAgentError(err, id, path);
    }
  }

  /**
   * Idempotent: destroying an ended sandbox succeeds; an unknown id is not found.
   * Returns once the sandbox is unusable (agent channel closed, SIGKILL sent) and gone
   * from the user's view; waiting for QEMU to exit and removing its files continue in
   * the background (`settled()` awaits them; start-up reconciliation covers a crash).
   */
  async destroy(caller: Caller, id: string): Promise<void> {
    const row = this.store.getSandbox(id);
    if (!row || row.owner !== ownerOf(caller)) throw new SandboxNotFoundError(id);
    this.end(id, "destroyed");
  }

  /** End a sandbox for any reason (a user's destroy, expiry, shutdown). */
  private end(id: string, reason: string): void {
    const row = this.store.getSandbox(id);
    if (!row) return;
    const live = this.live.get(id);
    if (!live) {
      if (row.state === "creating") {
        // Its create or fork still runs and holds its charge: the sandbox is ended the
        // moment its VM is live (goLive), or by that operation's own failure path.
        this.doomed.set(id, reason);
        return;
      }
      if (row.state !== "destroying") this.lifecycle.end(id, reason);
      this.admission.release(id);
      return;
    }
    if (row.state === "destroying") return; // its teardown is under way
    this.lifecycle.move(id, "destroying");
    crashPoint("destroy:marked");
    clearTimeout(live.expiry);
    live.teardown = live.vm
      .destroy() // synchronously closes the channel and sends SIGKILL before its first await
      .then(() => {
        crashPoint("destroy:vm-gone");
        this.live.remove(id);
        this.admission.release(id); // its memory is free only once QEMU has exited
        this.reportRunning();
        this.lifecycle.move(id, "ended", { endReason: reason });
        this.log.info({ sandbox: id, reason }, "sandbox ended");
      });
  }

  /**
   * Fork a ready sandbox n ways. Each child starts from the parent's state at one paused
   * instant (REPL, files, processes; a call running at that instant goes on in every
   * child, unheard) and is a full sandbox with the parent's template, metadata and
   * expiry. The parent keeps running. Returns the children's ids.
   */
  async fork(caller: Caller, id: string, n: number): Promise<string[]> {
    checkForkCount(n);
    const parent = this.readyVm(caller, id, "fork");
    await this.disk?.checkRoom("fork");
    await checkForkDiskLimit(
      id,
      parent,
      this.limits.maxDiskMib,
      this.source.flatten?.bind(this.source),
      this.log,
    );
    const row = this.store.getSandbox(id) as SandboxRow;
    const ids = Array.from({ length: n }, newSandboxId);
    // What the fork itself holds while it runs: the parent's private pages, read into the
    // daemon's memory until every child has its copy (vm/qemu/fork.ts), at most the
    // parent's guest memory; its tenant's. After the call nothing is left of it in memory:
    // each child's copy is its own charge, and the template memory the lineage maps is
    // charged as its template (kept in use while any VM maps it).
    const forkHold = `fork:${ids[0]}`;
    this.admission.admit(ids, row.owner, caller?.quota ?? NO_QUOTA, parent.shape, {
      id: forkHold,
      kind: "fork",
      mib: parent.shape.memSizeMib,
    });
    const now = Date.now();
    for (const childId of ids) {
      this.lifecycle.begin({
        ...row,
        id: childId,
        created_at: now,
        ended_at: null,
        end_reason: null,
        pid: null,
      });
    }
    let children: Vm[];
    try {
      crashPoint("fork:admitted");
      const fork = () => this.source.fork(parent, n);
      const result = await (this.disk ? this.disk.whileHeld(parent, fork) : fork());
      crashPoint("fork:children-started");
      children = result.children;
      this.log.info({ sandbox: id, n, pausedMs: Math.round(result.pausedMs) }, "forked");
    } catch (err) {
      for (const childId of ids) {
        this.admission.release(childId);
        this.doomed.delete(childId);
        ignoreFailure(() => this.lifecycle.abandon(childId));
      }
      throw translateHostError(err, "fork");
    } finally {
      this.admission.unhold(forkHold); // the page buffer is gone with the call
    }
    for (const [i, vm] of children.entries()) this.goLive(ids[i] as string, vm, row.expires_at);
    return ids;
  }

  /**
   * After this, sandbox `id` runs the winner's VM (its REPL, files and processes) and keeps
   * its own id, lifetime and metadata; the winner's id is gone, and id's former VM is
   * destroyed. Siblings are untouched.
   */
  async mergeInto(caller: Caller, id: string, winnerId: string): Promise<void> {
    checkMergePair(id, winnerId);
    const loserVm = this.readyVm(caller, id, "merge_into");
    const winnerVm = this.readyVm(caller, winnerId, "merge_into");
    const target = this.live.get(id);
    const winner = this.live.get(winnerId);
    if (!target || !winner) throw new SandboxNotFoundError(target ? winnerId : id);
    // Synchronous from here: no other operation sees a half-merged pair.
    this.live.remove(winnerId);
    this.lifecycle.move(winnerId, "destroying");
    this.lifecycle.move(winnerId, "ended", { endReason: `merged into ${id}` });
    target.vm = winnerVm;
    this.store.adoptVm(id, {
      vcpu_count: winnerVm.shape.vcpuCount,
      mem_size_mib: winnerVm.shape.memSizeMib,
      pid: winnerVm.pid ?? null,
    });
    this.admission.reshape(id, winnerVm.shape);
    this.reportRunning();
    this.log.info({ sandbox: id, winner: winnerId, vm: winnerVm.id }, "merged");
    try {
      await loserVm.destroy();
    } finally {
      this.admission.release(winnerId); // the winner's charge covered the VM now destroyed
    }
  }

  /** Resolves when every destroy already started has finished its host-side cleanup. */
  async settled(): Promise<void> {
    await Promise.all(this.live.teardowns());
  }

  /** Destroy every live sandbox (daemon shutdown). */
  async destroyAll(reason: string): Promise<void> {
    for (const id of this.live.ids()) this.end(id, reason);
    await this.settled();
  }

  /** The QEMU pid behind a live sandbox (diagnostics and tests). */
  vmPid(id: string): number | undefined {
    return this.live.get(id)?.vm.pid;
  }

  /** How many disk layers the sandbox's VM stacks (diagnostics and tests). */
  diskChainLength(id: string): number | undefined {
    return this.live.get(id)?.vm.diskChain.length;
  }

  private reportRunning(): void {
    this.metrics?.sandboxesRunning.set(this.liveCount);
  }

  /** Sandboxes running for their users (not one being destroyed, not a dead one). */
  get liveCount(): number {
    let n = 0;
    for (const [id, l] of this.live.entries()) {
      if (l.vm.alive && this.store.getSandbox(id)?.state !== "destroying") n++;
    }
    return n;
  }

  private goLive(id: string, vm: Vm, expiresAt: number): void {
    this.lifecycle.move(id, "ready", { pid: vm.pid ?? null });
    this.registerLive(id, vm, expiresAt);
    const doomed = this.doomed.get(id);
    if (doomed !== undefined) {
      this.doomed.delete(id);
      this.end(id, doomed); // destroyed (or expired, shut down) while it was being created
    }
  }

  private registerLive(id: string, vm: Vm, expiresAt: number): void {
    this.live.add(
      id,
      vm,
      armExpiry(expiresAt, () => this.end(id, "expired")),
    );
    this.disk?.watch(vm, {
      sandboxId: () => this.live.idOf(vm),
      onPause: () => this.movePaused(vm, "ready", "paused"),
      onResume: () => this.movePaused(vm, "paused", "ready"),
    });
    vm.exited.then(() => this.onVmExit(vm));
    // A guest that breaks the protocol (its agent channel was closed for it) is ended too.
    void vm.agent.violation.then((reason) =>
      this.onVmExit(vm, `its guest agent broke the protocol: ${reason}`),
    );
    this.reportRunning();
  }

  /** The disk guard saw `vm` paused or resumed: its sandbox follows if it is still `from`. */
  private movePaused(vm: Vm, from: "ready" | "paused", to: "ready" | "paused"): void {
    const id = this.live.idOf(vm);
    if (id && this.lifecycle.state(id) === from) this.lifecycle.move(id, to);
  }

  private onVmExit(vm: Vm, endReason = "the VM exited unexpectedly"): void {
    const id = this.live.idOf(vm);
    if (!id) return;
    const state = this.lifecycle.state(id);
    if (state !== "ready" && state !== "paused") return; // an ordinary destroy
    this.lifecycle.move(id, "dead", { endReason });
    // Its memory is free once QEMU has exited: at once after an exit, after destroy's
    // kill for a VM ended for its agent.
    if (vm.hasExited) this.admission.release(id);
    this.reportRunning();
    this.log.warn({ sandbox: id, vm: vm.id, reason: endReason }, "sandbox VM died");
    // Free its files now; the row stays until the user deletes it.
    void vm.destroy().finally(() => this.admission.release(id));
  }

  private readyVm(caller: Caller, id: string, operation: string): Vm {
    const row = this.ownedRow(caller, id);
    if (row.state === "dead") throw new SandboxDeadError(id, row.end_reason ?? "its VM exited");
    const live = this.live.get(id);
    if (row.state !== "ready" || !live) throw new WrongStateError(id, row.state, operation);
    if (!live.vm.alive) throw new SandboxDeadError(id, "its VM exited");
    if (this.lifecycle.stateOf(row) === "paused") throw new SandboxPausedError(id);
    return live.vm;
  }
}

function ignoreFailure(fn: () => void): void {
  try {
    fn();
  } catch {
    // best effort on a path that is already failing; reconciliation covers the rest
  }
}

function newSandboxId(): string {
  return `sbx_${randomBytes(8).toString("hex")}`;
}
