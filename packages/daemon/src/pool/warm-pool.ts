/**
 * The warm pool: restored, warmed VMs of the default shape waiting to be handed out, so
 * `create` takes one without waiting on a VM. A miss (empty pool, or another shape)
 * restores on demand; a burst only gets slower, never fails for lack of pool. Restores
 * share a small number of slots so a burst does not starve the host; misses get slots
 * before refills. A pooled VM that dies is dropped and replaced, never handed out.
 * The pool lives inside the host's memory budget (sandboxes/admission.ts) and yields to
 * sandboxes: it refills only into memory they do not hold, and when a create needs
 * memory the pool holds, pooled VMs are destroyed to make room.
 */
import { randomBytes } from "node:crypto";
import type { Metrics } from "../metrics/metrics.js";
import type { Admission } from "../sandboxes/admission.js";
import type { AcquiredVm, VmSource } from "../sandboxes/service.js";
import { DEFAULT_TEMPLATE, templateNames, templateSpec } from "../templates/registry.js";
import type { Logger } from "../util/logger.js";
import type { ForkResult, VmHandle as Vm, VmBackend, VmShape } from "../vm/backend.js";
import { backoffMs, refillsToStart } from "./plan.js";
import type { TemplateManager } from "./templates.js";

export interface PoolOptions {
  target: number;
  maxConcurrentRestores: number;
  /** The shape of the pool's VMs (of the default template) and of a default create. */
  defaultShape: VmShape;
  /** Disk layers a VM may stack up through forks before they are merged. */
  maxDiskChain: number;
}

// The first call after a restore pays for TCG translating the exec path; a pooled VM
// pays it here, so the user's first call is as fast as any later one.
const WARM_UP = "print('podflare: warm-up')";

const newVmId = () => `vm_${randomBytes(6).toString("hex")}`;

/** Pool refills run at this nice level, so they yield the CPU to sandboxes in use. */
const REFILL_NICE = 10;

const sameShape = (a: VmShape, b: VmShape) =>
  a.vcpuCount === b.vcpuCount && a.memSizeMib === b.memSizeMib;

export class WarmPool implements VmSource {
  private readonly ready: Vm[] = [];
  /** Creates waiting for a refill to land, because the memory it holds is theirs. */
  private readonly handoff: ((vm: Vm | null) => void)[] = [];
  private refilling = 0;
  private restoring = 0;
  private readonly missQueue: (() => void)[] = [];
  private readonly refillQueue: (() => void)[] = [];
  private failures = 0;
  private backoffUntil = 0;
  private backoffTimer: NodeJS.Timeout | null = null;
  private closed = false;
  /** Refills in flight: close() waits for them, so shutdown leaves no VM behind. */
  private readonly inFlight = new Set<Promise<void>>();
  /** The template each VM this pool made was restored from (fork children: the parent's). */
  private readonly templateOf = new WeakMap<Vm, string>();

  constructor(
    private readonly backend: VmBackend,
    private readonly templates: TemplateManager,
    private readonly admission: Admission,
    private readonly opts: PoolOptions,
    private readonly metrics: Metrics,
    private readonly log: Logger,
  ) {
    metrics.poolTarget.set(opts.target);
    admission.attachPool(() => this.chargedMib());
    // Template builds boot a VM: they share the restore slots, as misses do.
    templates.buildSlot = async (build) => {
      await this.takeSlot("miss");
      try {
        return await build();
      } finally {
        this.releaseSlot();
      }
    };
  }

  /** Host memory the pool holds: its ready VMs and those being restored for it. */
  chargedMib(): number {
    return (this.ready.length + this.refilling) * this.admission.chargeMib(this.opts.defaultShape);
  }

  /** Build (or find) the default template, then start filling the pool. */
  async start(): Promise<void> {
    await this.templates.pin(this.opts.defaultShape);
    this.refill();
  }

  templateNames(): readonly string[] {
    return templateNames();
  }

  /** The shape of a create that names none: the pool's for the default template. */
  defaultShape(template: string): VmShape {
    return template === DEFAULT_TEMPLATE
      ? this.opts.defaultShape
      : templateSpec(template).defaultShape;
  }

  stats(): { target: number; ready: number; refilling: number } {
    return { target: this.opts.target, ready: this.ready.length, refilling: this.refilling };
  }

  /** PIDs of the pooled VMs' QEMU processes (for tests and diagnostics). */
  readyPids(): number[] {
    return this.ready.flatMap((vm) => (vm.pid ? [vm.pid] : []));
  }

  async acquire(
    template: string,
    shape: VmShape,
    owner: string | null = null,
  ): Promise<AcquiredVm> {
    if (template === DEFAULT_TEMPLATE && sameShape(shape, this.opts.defaultShape)) {
      // Synchronous from here to the return: no two callers can take the same VM.
      while (this.ready.length > 0) {
        const vm = this.ready.shift() as Vm;
        if (!vm.alive || vm.stoppedForDisk) {
          void vm.destroy();
          continue;
        }
        this.metrics.poolReady.set(this.ready.length);
        return { vm: this.handOver(vm), pooled: true };
      }
    }
    const takenOver = await this.makeRoom(template === DEFAULT_TEMPLATE ? shape : null);
    if (takenOver) return { vm: this.handOver(takenOver), pooled: true };
    const vm = await this.restore(shape, "miss", owner, template);
    this.refill();
    return { vm, pooled: false };
  }

  /** n children of a running VM (see VmBackend.fork); the parent keeps running. */
  async fork(parent: Vm, n: number): Promise<ForkResult> {
    const ids = Array.from({ length: n }, newVmId);
    await this.makeRoom(null); // children are restores of the fork: nothing to take over
    const result = await this.backend.fork(parent, ids);
    const template = this.templateOf.get(parent) ?? DEFAULT_TEMPLATE;
    // The children's disks rest on the template's: it stays while any of them runs.
    for (const child of result.children) {
      this.templateOf.set(child, template);
      const release = this.templates.retain(child.shape, template);
      void child.exited.then(release);
    }
    // Every fork adds a layer to these chains; past the bound, merge them in the background.
    for (const vm of [parent, ...result.children]) {
      if (vm.diskChain.length > this.opts.maxDiskChain) {
        this.backend
          .flatten(vm)
          .catch((err) => this.log.error({ vm: vm.id, err: String(err) }, "flatten failed"));
      }
    }
    return result;
  }

  flatten(vm: Vm): Promise<void> {
    return this.backend.flatten(vm);
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.backoffTimer) clearTimeout(this.backoffTimer);
    await Promise.all(this.inFlight); // each destroys its VM once it sees `closed`
    const vms = this.ready.splice(0);
    this.metrics.poolReady.set(0);
    await Promise.all(vms.map((vm) => vm.destroy()));
  }

  private refill(): void {
    if (this.closed) return;
    const toStart = refillsToStart({
      target: this.opts.target,
      ready: this.ready.length,
      refilling: this.refilling,
      restoring: this.restoring,
      waitingMisses: this.missQueue.length,
      maxConcurrent: this.opts.maxConcurrentRestores,
      backoffUntil: this.backoffUntil,
      now: Date.now(),
    });
    const charge = this.admission.chargeMib(this.opts.defaultShape);
    for (let i = 0; i < toStart; i++) {
      if (!this.admission.poolMayGrow(charge)) break; // sandboxes come first
      const refill = this.refillOne();
      this.inFlight.add(refill);
      void refill.finally(() => this.inFlight.delete(refill));
    }
  }

  private async refillOne(): Promise<void> {
    this.refilling++;
    this.metrics.poolRefilling.set(this.refilling);
    const started = performance.now();
    let handedOff = false;
    try {
      const vm = await this.restore(this.opts.defaultShape, "refill");
      try {
        for await (const _ of vm.agent.exec(WARM_UP, { timeoutMs: 60_000 })) {
          // drained: the output is of no interest
        }
      } catch (err) {
        await vm.destroy();
        throw err;
      }
      if (this.closed || !vm.alive || vm.stoppedForDisk) {
        await vm.destroy(); // a VM stopped on a full host disk would hang its first call
        return;
      }
      const waiter = this.handoff.shift();
      if (waiter) {
        handedOff = true;
        waiter(vm); // a create needs this memory: it takes the VM itself
        return;
      }
      if (this.admission.excessMib() > 0) {
        // Sandboxes took the memory while this VM was being restored.
        await vm.destroy();
        return;
      }
      this.failures = 0;
      this.ready.push(vm);
      this.metrics.poolReady.set(this.ready.length);
      this.metrics.refillSeconds.observe((performance.now() - started) / 1000);
      vm.exited.then(() => this.onPooledVmExit(vm));
      vm.onDiskFull(() => this.onPooledVmDiskFull(vm));
    } catch (err) {
      this.failures++;
      this.backoffUntil = Date.now() + backoffMs(this.failures);
      this.log.error(
        { err: String(err), failures: this.failures },
        "pool refill failed; backing off",
      );
      this.backoffTimer = setTimeout(() => this.refill(), backoffMs(this.failures));
      this.backoffTimer.unref();
    } finally {
      this.refilling--;
      this.metrics.poolRefilling.set(this.refilling);
      // Waiters re-check the budget: this restore no longer holds memory for the pool.
      if (!handedOff) for (const wake of this.handoff.splice(0)) wake(null);
      this.refill();
    }
  }

  private handOver(vm: Vm): Vm {
    // Off the hand-over's path: starting the next VM forks this process, and the
    // renice (it was restored at refill priority) is a handful of syscalls.
    setImmediate(() => {
      void vm.renice(0);
      this.refill();
    });
    return vm;
  }

  /**
   * Before a VM is started for a sandbox: if sandboxes and pool together exceed the memory
   * budget, pooled VMs give way, and restores the pool has in flight are taken over (when
   * of the shape wanted) or waited out, so the host never holds more than its budget.
   */
  private async makeRoom(shape: VmShape | null): Promise<Vm | null> {
    this.yieldMemory();
    while (this.admission.excessMib() > 0 && this.refilling > 0) {
      const vm = await new Promise<Vm | null>((resolve) => this.handoff.push(resolve));
      if (vm && shape && sameShape(shape, this.opts.defaultShape)) return vm;
      if (vm) void vm.destroy();
      this.yieldMemory();
    }
    return null;
  }

  /** Destroy pooled VMs while sandboxes and pool together exceed the memory budget. */
  private yieldMemory(): void {
    while (this.ready.length > 0 && this.admission.excessMib() > 0) {
      const vm = this.ready.pop() as Vm;
      this.metrics.poolReady.set(this.ready.length);
      this.log.info({ vm: vm.id }, "pooled VM destroyed to free memory for a sandbox");
      void vm.destroy();
    }
  }

  /**
   * A pooled VM stopped on a full host disk (an idle guest's own write): it holds nothing
   * of a user's, so it goes (without a refill, which would meet the same full disk; the
   * next create refills).
   */
  private onPooledVmDiskFull(vm: Vm): void {
    const at = this.ready.indexOf(vm);
    if (at < 0) return; // handed out already: the sandbox's disk guard has it
    this.ready.splice(at, 1);
    this.metrics.poolReady.set(this.ready.length);
    this.log.warn({ vm: vm.id }, "a pooled VM stopped on a full host disk; destroyed");
    void vm.destroy();
  }

  private onPooledVmExit(vm: Vm): void {
    const at = this.ready.indexOf(vm);
    if (at < 0) return; // handed out already: the sandbox watches it now
    this.ready.splice(at, 1);
    this.metrics.poolReady.set(this.ready.length);
    this.log.warn({ vm: vm.id }, "a pooled VM died; replacing it");
    void vm.destroy();
    this.refill();
  }

  /**
   * Restore a VM of this shape, holding one of the restore slots while doing it (a build
   * of the shape's template, when there is none yet, takes a slot of its own first). The
   * VM keeps its template in use until it exits.
   */
  private async restore(
    shape: VmShape,
    why: "miss" | "refill",
    owner: string | null = null,
    name = DEFAULT_TEMPLATE,
  ): Promise<Vm> {
    const template = await this.templates.acquire(shape, owner, name);
    try {
      this.yieldMemory(); // a new template's charge may need room the pool holds
      await this.takeSlot(why);
      let vm: Vm;
      try {
        vm = await this.backend.restore(
          newVmId(),
          template.files,
          why === "refill" ? REFILL_NICE : 0,
        );
      } finally {
        this.releaseSlot();
      }
      this.templateOf.set(vm, name);
      void vm.exited.then(template.release);
      this.metrics.restores.inc({ result: "ok" });
      return vm;
    } catch (err) {
      template.release();
      this.metrics.restores.inc({ result: "error" });
      throw err;
    }
  }

  private takeSlot(why: "miss" | "refill"): Promise<void> {
    if (
      this.restoring < this.opts.maxConcurrentRestores &&
      (why === "miss" || this.missQueue.length === 0)
    ) {
      this.restoring++;
      return Promise.resolve();
    }
    return new Promise((resolve) =>
      (why === "miss" ? this.missQueue : this.refillQueue).push(resolve),
    );
  }

  private releaseSlot(): void {
    const next = this.missQueue.shift() ?? this.refillQueue.shift();
    if (next)
      next(); // the slot passes straight to the next waiter
    else this.restoring--;
  }
}
