/**
 * The sandbox operations. Transports (HTTP today) call these methods and nothing else;
 * this module never sees HTTP. State lives in SQLite; the live VMs in `live`.
 */
import { randomBytes } from "node:crypto";
import { finished, type Readable } from "node:stream";
import type { Tenant } from "../auth/authenticator.js";
import type { KeyQuota } from "../auth/keys.js";
import {
  AgentClosedError,
  AgentError,
  type ExecEvent,
  type Language,
} from "../guest/agent-client.js";
import type { Metrics } from "../metrics/metrics.js";
import type { SandboxRow, Store } from "../store/db.js";
import { crashPoint } from "../util/crash-points.js";
import type { Logger } from "../util/logger.js";
import type { VmHandle as Vm, VmShape } from "../vm/backend.js";
import type { Admission } from "./admission.js";
import type { DiskGuard } from "./disk-guard.js";
import { chainUsageMib, mayFork } from "./disk-quota.js";
import {
  BadRequestError,
  FileNotFoundError,
  NoCapacityError,
  OverLimitError,
  PodflareError,
  SandboxDeadError,
  SandboxNotFoundError,
  TooLargeError,
  WrongStateError,
} from "./errors.js";
import { canTransition, type SandboxState } from "./lifecycle.js";
import { validateGuestPath } from "./paths.js";
import type { StreamBudget, StreamLease } from "./stream-budget.js";

export interface SandboxLimits {
  maxVcpuCount: number;
  maxMemSizeMib: number;
  defaultSandboxTimeoutMs: number;
  maxSandboxTimeoutMs: number;
  maxUploadBytes: number;
  /** Host disk (MiB) one sandbox may hold: its overlay plus its fork layers (disk-quota.ts). */
  maxDiskMib?: number;
}

/**
 * Who asks: a tenant (an API key) or, when the daemon requires no key, null. A sandbox
 * owned by someone else is reported exactly as one that does not exist.
 */
export type Caller = Tenant | null;

const ownerOf = (caller: Caller): string | null => caller?.id ?? null;
const NO_QUOTA: KeyQuota = { maxSandboxes: null, maxMemMib: null };

export interface CreateRequest {
  template?: string;
  vcpu_count?: number;
  mem_size_mib?: number;
  timeout_ms?: number;
  metadata?: Record<string, string>;
}

export interface SandboxInfo {
  id: string;
  state: SandboxState;
  template: string;
  vcpu_count: number;
  mem_size_mib: number;
  created_at: string;
  expires_at: string;
  metadata: Record<string, string>;
}

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

export const MAX_FORK_CHILDREN = 32;

/** What the transport tells exec() about the stream it sends (api/server.ts). */
export interface ExecTransport {
  /** Aborted when the client has gone (the response closed): the exec is dropped. */
  signal?: AbortSignal;
  /** Bytes of this stream the transport holds unsent (its buffers, the socket's). */
  heldBytes?: () => number;
}

/**
 * Charged to a download while it runs: the most it can hold in the host, its credit
 * window (guest/agent-client.ts READ_WINDOW, 4 MiB) plus one data frame and the socket's
 * buffer.
 */
export const DOWNLOAD_HELD_BYTES = 4 * 1024 * 1024 + 512 * 1024;

interface Live {
  vm: Vm;
  expiry: NodeJS.Timeout;
  destroying?: Promise<void>;
}

const MAX_TIMER_MS = 2 ** 31 - 1;

export class SandboxService {
  private readonly live = new Map<string, Live>();

  constructor(
    private readonly store: Store,
    private readonly source: VmSource,
    private readonly limits: SandboxLimits,
    private readonly admission: Admission,
    private readonly log: Logger,
    private readonly metrics?: Metrics,
    private readonly disk?: DiskGuard,
    private readonly streams?: StreamBudget,
  ) {}

  async create(caller: Caller, req: CreateRequest): Promise<SandboxInfo> {
    const template = req.template ?? "default";
    if (!this.source.templateNames().includes(template)) {
      throw new BadRequestError(
        `unknown template ${JSON.stringify(template).slice(0, 80)}; available: ${this.source.templateNames().join(", ")}`,
      );
    }
    const shape = this.shapeOf(req, this.source.defaultShape(template));
    const timeoutMs = req.timeout_ms ?? this.limits.defaultSandboxTimeoutMs;
    if (timeoutMs < 1 || timeoutMs > this.limits.maxSandboxTimeoutMs) {
      throw new BadRequestError(
        `timeout_ms must be between 1 and ${this.limits.maxSandboxTimeoutMs}`,
      );
    }
    await this.disk?.checkRoom("create a sandbox");
    const id = newSandboxId();
    this.admission.admit([id], ownerOf(caller), caller?.quota ?? NO_QUOTA, shape);
    const now = Date.now();
    const row: SandboxRow = {
      id,
      state: "creating",
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
      this.store.insertSandbox(row);
      crashPoint("create:admitted");
      ({ vm, pooled } = await this.source.acquire(template, shape, ownerOf(caller)));
      crashPoint("create:vm-started");
    } catch (err) {
      this.admission.release(id);
      ignoreFailure(() => this.store.deleteSandbox(id)); // a failed create leaves no trace
      throw hostDiskError(err, "create a sandbox");
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
    return this.info(caller, id);
  }

  list(caller: Caller): SandboxInfo[] {
    // A destroying sandbox is gone for its user; only the host is still cleaning up.
    return this.store.listOwned(ownerOf(caller), ["creating", "ready", "dead"]).map(toInfo);
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
    if (req.timeout_ms !== undefined && (req.timeout_ms < 1 || req.timeout_ms > 24 * 3600_000)) {
      throw new BadRequestError("timeout_ms must be between 1 and 86400000");
    }
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
    return this.guardExecStream(id, vm, events, lease);
  }

  private async *guardExecStream(
    id: string,
    vm: Vm,
    events: AsyncIterable<ExecEvent>,
    lease?: StreamLease,
  ): AsyncGenerator<ExecEvent> {
    // Once the stream has started, a failure can only be reported in-band: the stream
    // still ends with exactly one exit event.
    try {
      yield* events;
    } catch (err) {
      const died = err instanceof AgentClosedError || !vm.alive;
      const restarted = err instanceof AgentError && err.code === "agent_restarted";
      this.log.warn({ sandbox: id, err: String(err) }, "exec ended abnormally");
      yield {
        type: "exit",
        code: -1,
        error: {
          name: died ? "SandboxDied" : restarted ? "SandboxRestarted" : "SandboxError",
          value: died ? `sandbox ${id} stopped while the code ran` : (err as Error).message,
          traceback: "",
        },
        ...(lease?.dropped ? { truncated: true } : {}),
      };
    } finally {
      lease?.close();
    }
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
      if (row.state !== "ended" && row.state !== "destroying") this.transitionToEnded(row, reason);
      this.admission.release(id);
      return;
    }
    if (live.destroying) return;
    if (row.state !== "destroying") this.transition(id, "destroying");
    crashPoint("destroy:marked");
    clearTimeout(live.expiry);
    live.destroying = live.vm
      .destroy() // synchronously closes the channel and sends SIGKILL before its first await
      .then(() => {
        crashPoint("destroy:vm-gone");
        this.live.delete(id);
        this.admission.release(id); // its memory is free only once QEMU has exited
        this.reportRunning();
        this.transition(id, "ended", { endReason: reason });
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
    if (!Number.isInteger(n) || n < 1 || n > MAX_FORK_CHILDREN) {
      throw new BadRequestError(`n must be an integer from 1 to ${MAX_FORK_CHILDREN}`);
    }
    const parent = this.readyVm(caller, id, "fork");
    await this.disk?.checkRoom("fork");
    await this.checkDiskLimit(id, parent);
    const row = this.store.getSandbox(id) as SandboxRow;
    const ids = Array.from({ length: n }, newSandboxId);
    // The fork's memory file lives until its last child is gone (vm/qemu/fork.ts): its tenant's.
    const forkHold = `fork:${ids[0]}`;
    this.admission.admit(ids, row.owner, caller?.quota ?? NO_QUOTA, parent.shape, {
      id: forkHold,
      kind: "fork",
      mib: parent.shape.memSizeMib,
    });
    const now = Date.now();
    for (const childId of ids) {
      this.store.insertSandbox({
        ...row,
        id: childId,
        state: "creating",
        created_at: now,
        ended_at: null,
        end_reason: null,
        pid: null,
      });
    }
    let children: Vm[];
    try {
      crashPoint("fork:admitted");
      const result = await this.source.fork(parent, n);
      crashPoint("fork:children-started");
      children = result.children;
      this.log.info({ sandbox: id, n, pausedMs: Math.round(result.pausedMs) }, "forked");
    } catch (err) {
      for (const childId of ids) {
        this.admission.release(childId);
        ignoreFailure(() => this.store.deleteSandbox(childId));
      }
      this.admission.unhold(forkHold); // the children are destroyed: the memory is gone
      throw hostDiskError(err, "fork");
    }
    // Each child maps the memory; it is freed once every child's QEMU has exited.
    void Promise.all(children.map((vm) => vm.exited)).then(() => {
      this.admission.unhold(forkHold);
      this.log.info({ sandbox: id, forkHold }, "fork memory released: its last child ended");
    });
    for (const [i, vm] of children.entries()) this.goLive(ids[i] as string, vm, row.expires_at);
    return ids;
  }

  /**
   * A fork freezes the parent's disk into a layer its children share; past the per-sandbox
   * disk limit the parent's layers are merged first (which frees those only it held), and
   * if it is still over, the fork is refused: nothing is made.
   */
  private async checkDiskLimit(id: string, vm: Vm): Promise<void> {
    const limit = this.limits.maxDiskMib;
    if (limit === undefined) return;
    let usage = await chainUsageMib(vm.diskChain);
    if (!mayFork(usage, limit) && vm.diskChain.length > 1 && this.source.flatten) {
      await this.source.flatten(vm);
      usage = await chainUsageMib(vm.diskChain);
    }
    if (!mayFork(usage, limit)) {
      this.log.warn({ sandbox: id, usageMib: usage, limitMib: limit }, "fork refused: disk limit");
      throw new OverLimitError(
        `sandbox ${id} holds ${usage} MiB of host disk (its overlay plus the fork layers it keeps), over the per-sandbox limit of ${limit} MiB: it cannot be forked; write less to its disk, or fork from a sandbox that holds less`,
      );
    }
  }

  /**
   * After this, sandbox `id` runs the winner's VM (its REPL, files and processes) and keeps
   * its own id, lifetime and metadata; the winner's id is gone, and id's former VM is
   * destroyed. Siblings are untouched.
   */
  async mergeInto(caller: Caller, id: string, winnerId: string): Promise<void> {
    if (id === winnerId)
      throw new BadRequestError(
        "a sandbox cannot be merged into itself; name another sandbox as the winner",
      );
    const loserVm = this.readyVm(caller, id, "merge_into");
    const winnerVm = this.readyVm(caller, winnerId, "merge_into");
    const target = this.live.get(id);
    const winner = this.live.get(winnerId);
    if (!target || !winner) throw new SandboxNotFoundError(target ? winnerId : id);
    // Synchronous from here: no other operation sees a half-merged pair.
    clearTimeout(winner.expiry);
    this.live.delete(winnerId);
    this.transition(winnerId, "destroying");
    this.transition(winnerId, "ended", { endReason: `merged into ${id}` });
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
    await Promise.all([...this.live.values()].map((l) => l.destroying));
  }

  /** Destroy every live sandbox (daemon shutdown). */
  async destroyAll(reason: string): Promise<void> {
    for (const id of [...this.live.keys()]) this.end(id, reason);
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
    for (const l of this.live.values()) if (!l.destroying && l.vm.alive) n++;
    return n;
  }

  private goLive(id: string, vm: Vm, expiresAt: number): void {
    this.transition(id, "ready", { pid: vm.pid ?? null });
    const expiry = setTimeout(
      () => this.end(id, "expired"),
      Math.min(Math.max(0, expiresAt - Date.now()), MAX_TIMER_MS),
    );
    expiry.unref();
    this.live.set(id, { vm, expiry });
    this.disk?.watch(id, vm);
    vm.exited.then(() => this.onVmExit(vm));
    // A guest that breaks the protocol (its agent channel was closed for it) is ended too.
    void vm.agent.violation.then((reason) =>
      this.onVmExit(vm, `its guest agent broke the protocol: ${reason}`),
    );
    this.reportRunning();
  }

  private onVmExit(vm: Vm, endReason = "the VM exited unexpectedly"): void {
    // Looked up by VM, not by the id it was created for: merge_into moves VMs.
    const id = [...this.live].find(([, l]) => l.vm === vm)?.[0];
    if (!id) return;
    const row = this.store.getSandbox(id);
    if (row?.state !== "ready") return; // an ordinary destroy
    this.transition(id, "dead", { endReason });
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
    this.disk?.assertRunning(id, live.vm);
    return live.vm;
  }

  private shapeOf(req: CreateRequest, fallback: VmShape): VmShape {
    const vcpuCount = req.vcpu_count ?? fallback.vcpuCount;
    const memSizeMib = req.mem_size_mib ?? fallback.memSizeMib;
    if (!Number.isInteger(vcpuCount) || vcpuCount < 1 || vcpuCount > this.limits.maxVcpuCount) {
      throw new BadRequestError(
        `vcpu_count must be an integer from 1 to ${this.limits.maxVcpuCount}`,
      );
    }
    if (
      !Number.isInteger(memSizeMib) ||
      memSizeMib < 128 ||
      memSizeMib > this.limits.maxMemSizeMib
    ) {
      throw new BadRequestError(
        `mem_size_mib must be an integer from 128 to ${this.limits.maxMemSizeMib}`,
      );
    }
    return { vcpuCount, memSizeMib };
  }

  private transition(
    id: string,
    to: SandboxState,
    extra: { pid?: number | null; endReason?: string } = {},
  ): void {
    const row = this.store.getSandbox(id);
    if (!row) throw new SandboxNotFoundError(id);
    if (!canTransition(row.state, to)) {
      throw new PodflareError(
        "internal",
        `illegal sandbox transition ${row.state} -> ${to} for ${id}`,
      );
    }
    this.store.setState(id, to, extra);
  }

  private transitionToEnded(row: SandboxRow, reason: string): void {
    if (row.state === "ready" || row.state === "dead") this.transition(row.id, "destroying");
    this.store.setState(row.id, "ended", { endReason: reason });
  }
}

function ignoreFailure(fn: () => void): void {
  try {
    fn();
  } catch {
    // best effort on a path that is already failing; reconciliation covers the rest
  }
}

/** A full host disk (ENOSPC, or SQLite's "database or disk is full") becomes a clear 503. */
function hostDiskError(err: unknown, what: string): unknown {
  const text = `${(err as { code?: unknown })?.code ?? ""} ${(err as Error)?.message ?? ""}`;
  if (/ENOSPC|No space left on device|SQLITE_FULL|disk is full/i.test(text)) {
    return new NoCapacityError(
      `the host's disk is full: cannot ${what} now; free disk space on the host and retry`,
    );
  }
  return err;
}

function newSandboxId(): string {
  return `sbx_${randomBytes(8).toString("hex")}`;
}

function toInfo(row: SandboxRow): SandboxInfo {
  return {
    id: row.id,
    state: row.state,
    template: row.template,
    vcpu_count: row.vcpu_count,
    mem_size_mib: row.mem_size_mib,
    created_at: new Date(row.created_at).toISOString(),
    expires_at: new Date(row.expires_at).toISOString(),
    metadata: JSON.parse(row.metadata) as Record<string, string>,
  };
}

function mapAgentError(err: unknown, id: string, path?: string): Error {
  if (err instanceof PodflareError) return err;
  if (err instanceof AgentClosedError) return new SandboxDeadError(id, "its agent channel closed");
  if (err instanceof AgentError) {
    switch (err.code) {
      case "not_found":
        return new FileNotFoundError(path ?? "");
      case "is_directory":
        return new BadRequestError(`${path} is a directory in the sandbox; give a file path`);
      case "bad_path":
      case "bad_request":
        return new BadRequestError(err.message);
      case "too_large":
        return new TooLargeError(err.message);
      case "io_error":
        if (/is not a regular file/.test(err.message))
          return new BadRequestError(`${err.message}; give the path of a regular file`);
        if (/No space left on device/i.test(err.message))
          return new TooLargeError(
            `the sandbox's disk is full (${err.message}); delete files in it or upload less`,
          );
        return new PodflareError(
          "internal",
          `the sandbox could not complete the file operation: ${err.message}`,
        );
    }
  }
  return err as Error;
}
