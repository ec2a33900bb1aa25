/**
 * Admission control: a sandbox is admitted only if it fits every limit at once, and its
 * charge is held from admission until its VM is gone. The ledger is the counter: each
 * charge is an entry keyed by sandbox id, added before a VM is sought and removed on every
 * way out (failed create, destroy, VM death, merge), so the totals are always sums over
 * what really holds (or is about to hold) a VM.
 *
 * Limits:
 * - host sandbox count (429, over_limit);
 * - per-tenant sandbox count and memory quota (429, over_limit);
 * - host memory budget (503, no_capacity): guest memory plus a fixed per-VM overhead,
 *   summed over sandboxes and the warm pool, never above the budget. The pool yields:
 *   it does not refill into memory sandboxes need, and gives pooled VMs back when a
 *   create needs the room.
 */
import type { KeyQuota } from "../auth/keys.js";
import type { VmShape } from "../vm/qemu-args.js";
import { NoCapacityError, OverLimitError } from "./errors.js";

export interface AdmissionLimits {
  maxSandboxes: number;
  /** Host memory (MiB) that sandboxes and the pool may hold at once. */
  memoryBudgetMib: number;
  /** Host memory a VM costs beyond its guest memory (QEMU, TCG buffers, page tables). */
  vmOverheadMib: number;
  /** Defaults for a tenant whose key sets no quota of its own. */
  tenantMaxSandboxes: number;
  tenantMaxMemMib: number;
}

interface Charge {
  owner: string | null;
  memMib: number;
}

export interface Usage {
  sandboxes: number;
  memMib: number;
  chargedMib: number;
}

export class Admission {
  private readonly charges = new Map<string, Charge>();
  private poolMib: () => number = () => 0;

  constructor(readonly limits: AdmissionLimits) {}

  /** What a VM of this shape costs the host. */
  chargeMib(shape: VmShape): number {
    return shape.memSizeMib + this.limits.vmOverheadMib;
  }

  /** The warm pool tells how much it holds (ready and being restored). */
  attachPool(poolMib: () => number): void {
    this.poolMib = poolMib;
  }

  /**
   * Hold charges for new sandboxes `ids`, all of one shape and owner, or throw saying
   * which limit they would cross. Nothing is held if any limit fails.
   */
  admit(ids: readonly string[], owner: string | null, quota: KeyQuota, shape: VmShape): void {
    const n = ids.length;
    const host = this.usage();
    if (host.sandboxes + n > this.limits.maxSandboxes) {
      throw new OverLimitError(
        `this host runs at most ${this.limits.maxSandboxes} sandboxes; ${host.sandboxes} are running and ${n} more would not fit: destroy some first`,
      );
    }
    const mine = this.usage(owner);
    const maxSandboxes = quota.maxSandboxes ?? this.limits.tenantMaxSandboxes;
    if (mine.sandboxes + n > maxSandboxes) {
      throw new OverLimitError(
        `your key may hold ${maxSandboxes} sandboxes at once and holds ${mine.sandboxes}; ${n} more would exceed it: destroy some first`,
      );
    }
    const maxMem = quota.maxMemMib ?? this.limits.tenantMaxMemMib;
    if (mine.memMib + n * shape.memSizeMib > maxMem) {
      throw new OverLimitError(
        `your key may hold ${maxMem} MiB of sandbox memory and holds ${mine.memMib} MiB; ${n} more of ${shape.memSizeMib} MiB would exceed it: destroy some or ask for smaller ones (mem_size_mib)`,
      );
    }
    const need = n * this.chargeMib(shape);
    if (host.chargedMib + need > this.limits.memoryBudgetMib) {
      throw new NoCapacityError(
        `the host's memory budget (${this.limits.memoryBudgetMib} MiB) cannot take ${n} more sandbox(es) of ${shape.memSizeMib} MiB now (${host.chargedMib} MiB held by sandboxes); retry later or ask for less memory`,
      );
    }
    for (const id of ids) this.charges.set(id, { owner, memMib: shape.memSizeMib });
  }

  release(id: string): void {
    this.charges.delete(id);
  }

  /** Sandbox `id` now runs a VM of another shape (merge_into). */
  reshape(id: string, shape: VmShape): void {
    const charge = this.charges.get(id);
    if (charge) charge.memMib = shape.memSizeMib;
  }

  holds(id: string): boolean {
    return this.charges.has(id);
  }

  /** Totals over the host's sandboxes, or over one owner's. */
  usage(owner?: string | null): Usage {
    let sandboxes = 0;
    let memMib = 0;
    for (const c of this.charges.values()) {
      if (owner !== undefined && c.owner !== owner) continue;
      sandboxes++;
      memMib += c.memMib;
    }
    return { sandboxes, memMib, chargedMib: memMib + sandboxes * this.limits.vmOverheadMib };
  }

  /** Whether the pool may start restoring one more VM of this charge. */
  poolMayGrow(chargeMib: number): boolean {
    return this.usage().chargedMib + this.poolMib() + chargeMib <= this.limits.memoryBudgetMib;
  }

  /** MiB by which sandboxes plus pool exceed the budget (the pool gives back that much). */
  excessMib(): number {
    return Math.max(0, this.usage().chargedMib + this.poolMib() - this.limits.memoryBudgetMib);
  }
}
