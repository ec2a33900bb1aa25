/**
 * The arithmetic of the template cache (pool/templates.ts), kept pure for unit tests:
 * what a template costs the memory budget, and which template goes when the cap is met.
 *
 * A template's memory is a file in /dev/shm (tmpfs). Clones map it privately, and a
 * private read fault on a tmpfs hole allocates the page in the file, so the file can grow
 * to the guest's size as clones touch pages: it is charged its guest size. When VMs run
 * under uids of their own, clones map a sealed memfd copy of the file instead (vm/qemu/memfd.ts):
 * the file then never grows past what the template's build wrote (measured after the build)
 * while the copy can grow to the guest's size; both are charged.
 */
import type { VmShape } from "../vm/backend.js";

/** What a template may cost before its file exists (the build holds this much). */
export function templateBoundMib(shape: VmShape, sealedCopies: boolean): number {
  return sealedCopies ? 2 * shape.memSizeMib : shape.memSizeMib;
}

/** What a built template costs, given the file's resident size (tmpfs blocks). */
export function templateChargeMib(
  shape: VmShape,
  residentMib: number,
  sealedCopies: boolean,
): number {
  const resident = Math.ceil(Math.max(0, residentMib));
  return sealedCopies
    ? Math.min(resident, shape.memSizeMib) + shape.memSizeMib
    : Math.max(resident, shape.memSizeMib);
}

export interface CachedTemplate {
  key: string;
  /** Restores, builds and live VMs using it now. */
  users: number;
  /** Being built or loaded. */
  loading: boolean;
  /** Kept whatever happens (the warm pool's shape). */
  pinned: boolean;
  /** When a user last took or gave it back (ms). */
  lastUsed: number;
}

/** Whether nothing uses a template, so it may be evicted. */
export function evictable(t: CachedTemplate): boolean {
  return t.users === 0 && !t.loading && !t.pinned;
}

/**
 * Which template to evict so that one more fits under `max`: null when there is room
 * already; "full" when every template is in use; else the least recently used unused one.
 */
export function evictionChoice(
  templates: readonly CachedTemplate[],
  max: number,
): CachedTemplate | null | "full" {
  if (templates.length < max) return null;
  let best: CachedTemplate | null = null;
  for (const t of templates)
    if (evictable(t) && (best === null || t.lastUsed < best.lastUsed)) best = t;
  return best ?? "full";
}
