/**
 * Disk layers: every VM's writable qcow2 overlay, and the frozen overlays forks leave
 * behind, live in one directory and are reference-counted by path. A VM holds a
 * reference to each layer of its chain (its active overlay first); a layer is deleted
 * when the last VM whose chain contains it is gone. Templates keep their own disks.
 */
import { rm, stat } from "node:fs/promises";
import { join } from "node:path";

export class DiskLayers {
  private readonly refs = new Map<string, number>();
  /** Layers a fork froze (read-only now, shared by its lineage). */
  private readonly frozen = new Set<string>();

  constructor(readonly dir: string) {}

  pathFor(name: string): string {
    return join(this.dir, `${name}.qcow2`);
  }

  retain(paths: readonly string[]): void {
    for (const p of paths) this.refs.set(p, (this.refs.get(p) ?? 0) + 1);
  }

  async release(paths: readonly string[]): Promise<void> {
    for (const p of paths) {
      const n = (this.refs.get(p) ?? 0) - 1;
      if (n > 0) {
        this.refs.set(p, n);
        continue;
      }
      this.refs.delete(p);
      this.frozen.delete(p);
      await rm(p, { force: true });
    }
  }

  /** `path`, a referenced layer, was frozen by a fork. */
  markFrozen(path: string): void {
    if (this.refs.has(path)) this.frozen.add(path);
  }

  /** The frozen layers still referenced, and the disk they take (allocated blocks). */
  async frozenUsage(): Promise<{ count: number; bytes: number }> {
    let bytes = 0;
    for (const p of this.frozen) {
      const st = await stat(p).catch(() => null);
      if (st) bytes += st.blocks * 512;
    }
    return { count: this.frozen.size, bytes };
  }

  /** Layers still referenced (diagnostics and tests). */
  get size(): number {
    return this.refs.size;
  }
}
