/**
 * The live VMs: which VM runs each sandbox now, its expiry timer, and the host-side
 * cleanup of one being destroyed. A sandbox's state is its row's (lifecycle.ts), not here.
 */
import type { VmHandle as Vm } from "../vm/backend.js";

export interface LiveSandbox {
  vm: Vm;
  expiry: NodeJS.Timeout;
  /** Set once its destroy has begun: resolves when its VM is gone and its files removed. */
  teardown?: Promise<void>;
}

export class LiveRegistry {
  private readonly live = new Map<string, LiveSandbox>();

  add(id: string, vm: Vm, expiry: NodeJS.Timeout): void {
    this.live.set(id, { vm, expiry });
  }

  get(id: string): LiveSandbox | undefined {
    return this.live.get(id);
  }

  /** Forget a sandbox's VM (its expiry timer is cleared). */
  remove(id: string): void {
    const entry = this.live.get(id);
    if (entry) clearTimeout(entry.expiry);
    this.live.delete(id);
  }

  /** The sandbox a VM runs for now: looked up by VM, since merge_into moves VMs. */
  idOf(vm: Vm): string | undefined {
    for (const [id, entry] of this.live) if (entry.vm === vm) return id;
    return undefined;
  }

  ids(): string[] {
    return [...this.live.keys()];
  }

  entries(): [string, LiveSandbox][] {
    return [...this.live];
  }

  teardowns(): Promise<void>[] {
    return [...this.live.values()].flatMap((l) => (l.teardown ? [l.teardown] : []));
  }
}
