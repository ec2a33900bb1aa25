/**
 * The host disk under the state directory (VM overlays, fork layers, the database). When
 * it is nearly full, new sandboxes and forks are refused (503) before anything is made.
 * A running VM whose disk write meets a full host disk is paused by QEMU (virtio-blk
 * `werror=enospc`: the write is kept and retried, never failed to the guest); the guard
 * then checks the free space every second and resumes the VM once there is room again,
 * so its memory and disk survive intact. Meanwhile the sandbox is `paused` (lifecycle.ts)
 * and calls on it get a 503 that says so.
 */
import { statfs } from "node:fs/promises";
import type { Logger } from "../util/logger.js";
import type { VmHandle as Vm } from "../vm/backend.js";
import { NoCapacityError } from "./errors.js";

const CHECK_MS = 1000;

/** How the guard tells the service of a VM it saw paused, or resumed. */
export interface DiskPauseHooks {
  /** The sandbox the VM runs for now (for the log). */
  sandboxId(): string | undefined;
  onPause(): void;
  onResume(): void;
}

export class DiskGuard {
  private readonly paused = new Map<Vm, DiskPauseHooks>();
  /** VMs an operation (a fork's capture) has paused itself: not the guard's to resume. */
  private readonly held = new Set<Vm>();
  private timer: NodeJS.Timeout | null = null;

  constructor(
    private readonly dir: string,
    private readonly minFreeMib: number,
    private readonly log: Logger,
  ) {}

  async freeMib(): Promise<number> {
    const s = await statfs(this.dir);
    return Math.floor((s.bavail * s.bsize) / 2 ** 20);
  }

  /** Throws a 503 if the host disk has too little room for a new VM's files. */
  async checkRoom(what: string): Promise<void> {
    const free = await this.freeMib();
    if (free < this.minFreeMib) {
      throw new NoCapacityError(
        `the host's disk is full (${free} MiB free under ${this.dir}, ${this.minFreeMib} MiB needed): cannot ${what} now; free disk space on the host and retry`,
      );
    }
  }

  /**
   * Watch a VM for writes paused on a full host disk. The guard tracks which VMs QEMU
   * paused (to resume them); the sandbox's state is the lifecycle's, told through `hooks`.
   */
  watch(vm: Vm, hooks: DiskPauseHooks): void {
    vm.onDiskFull(() => {
      if (this.paused.has(vm)) return;
      this.paused.set(vm, hooks);
      this.log.warn({ sandbox: hooks.sandboxId(), vm: vm.id }, "host disk full: sandbox paused");
      hooks.onPause();
      this.timer ??= setInterval(() => void this.resumeIfRoom(), CHECK_MS);
    });
    void vm.exited.then(() => this.paused.delete(vm));
  }

  /**
   * Runs `fn` (a fork) with `vm` kept from the guard: a resume in the middle of a fork's
   * capture would save device state, disk and pages from different instants. A VM paused
   * for disk space meanwhile is resumed at the first check after `fn` ends.
   */
  async whileHeld<T>(vm: Vm, fn: () => Promise<T>): Promise<T> {
    this.held.add(vm);
    try {
      return await fn();
    } finally {
      this.held.delete(vm);
    }
  }

  get pausedCount(): number {
    return this.paused.size;
  }

  private async resumeIfRoom(): Promise<void> {
    if (this.paused.size === 0) {
      if (this.timer) clearInterval(this.timer);
      this.timer = null;
      return;
    }
    const free = await this.freeMib().catch(() => 0);
    if (free < this.minFreeMib) return;
    for (const [vm, hooks] of [...this.paused]) {
      if (this.held.has(vm)) continue;
      this.paused.delete(vm);
      const sandboxId = hooks.sandboxId();
      hooks.onResume();
      try {
        await vm.resume();
        this.log.info(
          { sandbox: sandboxId, vm: vm.id, freeMib: free },
          "disk space back: sandbox resumed",
        );
      } catch (err) {
        this.log.error({ sandbox: sandboxId, err: String(err) }, "could not resume a sandbox");
      }
    }
  }

  close(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }
}
