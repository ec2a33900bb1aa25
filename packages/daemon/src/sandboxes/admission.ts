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
 *
 * Memory that is not a sandbox's VM but lives because of one is charged too, as holds:
 * templates' memory files in /dev/shm and the VMs that build them (pool/templates.ts),
 * and the parent's pages a fork buffers while it runs (the children's copies are theirs,
 * and the template memory a lineage maps is its template's hold). A hold counts
 * against the budget like a sandbox, and against its owner's memory quota when it has
 * one (a fork's memory is its tenant's), but is no sandbox.
 */
import type { KeyQuota } from "../auth/keys.js";
import type { VmShape } from "../vm/backend.js";
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

/** What a hold is for (reported apart in /v1/capacity). */
export type HoldKind = "template" | "template_build" | "fork";

interface Hold {
  owner: string | null;
  kind: HoldKind;
  mib: number;
}

export class Admission {
  private readonly charges = new Map<string, Charge>();
  private readonly holds_ = new Map<string, Hold>();
  private poolMib: () => number = () => 0;
  /** Frees unused holds (idle templates) worth about `mib`, at once (see attachReclaimer). */
  private reclaim: (mib: number) => void = () => {};

  constructor(readonly limits: AdmissionLimits) {}

  /** What a VM of this shape costs the host. */
  chargeMib(shape: VmShape): number {
    return shape.memSizeMib + this.limits.vmOverheadMib;
  }

  /**
   * Templates nothing uses give their charge back when sandboxes or a new template need
   * the room (their files are deleted right after; pool/templates.ts).
   */
  attachReclaimer(reclaim: (mib: number) => void): void {
    this.reclaim = reclaim;
  }

  /** MiB by which `more` would put sandboxes and holds over the budget, after reclaiming. */
  private overBy(more: number, replacing = 0): number {
    const over = () =>
      this.usage().chargedMib + this.heldMib() - replacing + more - this.limits.memoryBudgetMib;
    if (over() > 0) this.reclaim(over());
    return over();
  }

  /** The warm pool tells how much it holds (ready and being restored). */
  attachPool(poolMib: () => number): void {
    this.poolMib = poolMib;
  }

  /**
   * Hold charges for new sandboxes `ids`, all of one shape and owner, or throw saying
   * which limit they would cross. Nothing is held if any limit fails.
   */
  admit(
    ids: readonly string[],
    owner: string | null,
    quota: KeyQuota,
    shape: VmShape,
    hold?: { id: string; kind: HoldKind; mib: number },
  ): void {
    const n = ids.length;
    const extra = hold?.mib ?? 0;
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
    const mineHeld = this.heldMib({ owner, kind: "fork" });
    if (mine.memMib + mineHeld + n * shape.memSizeMib + extra > maxMem) {
      const forks = mineHeld > 0 ? ` (${mineHeld} MiB of it buffered by forks in progress)` : "";
      const more = extra > 0 ? ` plus ${extra} MiB for the fork's memory` : "";
      throw new OverLimitError(
        `your key may hold ${maxMem} MiB of sandbox memory and holds ${mine.memMib + mineHeld} MiB${forks}; ${n} more of ${shape.memSizeMib} MiB${more} would exceed it: destroy some or ask for smaller ones (mem_size_mib)`,
      );
    }
    const need = n * this.chargeMib(shape) + extra;
    if (this.overBy(need) > 0) {
      const held = this.heldMib();
      throw new NoCapacityError(
        `the host's memory budget (${this.limits.memoryBudgetMib} MiB) cannot take ${n} more sandbox(es) of ${shape.memSizeMib} MiB now (${host.chargedMib} MiB held by sandboxes, ${held} MiB by templates and forks); retry later or ask for less memory`,
      );
    }
    if (hold) this.holds_.set(hold.id, { owner, kind: hold.kind, mib: hold.mib });
    for (const id of ids) this.charges.set(id, { owner, memMib: shape.memSizeMib });
  }

  /**
   * Hold `mib` of the budget for something that is no sandbox (a template, its build),
   * or throw 503 if sandboxes and holds would exceed the budget. `id` replaces a hold of
   * the same id (its size is then what is checked in addition).
   */
  hold(id: string, kind: HoldKind, mib: number, owner: string | null = null): void {
    const before = this.holds_.get(id)?.mib ?? 0;
    if (this.overBy(mib, before) > 0) {
      const used = this.usage().chargedMib + this.heldMib() - before;
      throw new NoCapacityError(
        `the host's memory budget (${this.limits.memoryBudgetMib} MiB, ${used} MiB held by sandboxes, templates and forks) cannot take ${mib} MiB more for a ${kind.replace("_", " ")} now; retry later or ask for a shape (vcpu_count, mem_size_mib) in use already`,
      );
    }
    this.holds_.set(id, { owner, kind, mib });
  }

  unhold(id: string): void {
    this.holds_.delete(id);
  }

  /** MiB of holds, over all or those of one owner or kind. */
  heldMib(filter: { owner?: string | null; kind?: HoldKind } = {}): number {
    let mib = 0;
    for (const h of this.holds_.values()) {
      if (filter.owner !== undefined && h.owner !== filter.owner) continue;
      if (filter.kind !== undefined && h.kind !== filter.kind) continue;
      mib += h.mib;
    }
    return mib;
  }

  release(id: string): void {
    this.charges.delete(id);
  }

  /** Sandbox `id` now runs a VM of another shape (merge_into). */
  reshape(id: string, shape: VmShape): void {
    const charge = this.charges.get(id);
    if (charge) charge.memMib = shape.memSizeMib;
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
    return (
      this.usage().chargedMib + this.heldMib() + this.poolMib() + chargeMib <=
      this.limits.memoryBudgetMib
    );
  }

  /** MiB by which sandboxes plus pool exceed the budget (the pool gives back that much). */
  excessMib(): number {
    return Math.max(
      0,
      this.usage().chargedMib + this.heldMib() + this.poolMib() - this.limits.memoryBudgetMib,
    );
  }
}
