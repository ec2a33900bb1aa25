/**
 * A running QEMU microVM: its agent, its QEMU, and one idempotent destroy that undoes
 * everything the VM acquired, in reverse order. The rest of the daemon sees it as a
 * VmHandle (vm/backend.ts).
 */
import type { AgentClient } from "../../guest/agent-client.js";
import type { VmCgroup } from "../../jail/cgroup.js";
import type { CleanupStack } from "../../util/cleanup.js";
import type { VmHandle } from "../backend.js";
import type { RamSource } from "./guest-ram.js";
import type { SharedMemFd } from "./memfd.js";
import type { Accel, QemuCredentials, VmShape } from "./qemu-args.js";
import type { QemuExit, QemuProcess } from "./qemu-process.js";

/** A VM's disk chain in the layers directory: its active overlay first (empty for cold boots). */
export interface VmDisk {
  chain: string[];
  /** The template's frozen disk below the chain (the floor a flatten streams down to). */
  base: string;
  /** Operations on the chain (fork's freeze, flatten) run one at a time. */
  queue: Promise<void>;
  /**
   * QEMU's block nodes of the chain, parallel to `chain`: a name for an overlay a fork
   * added with blockdev-add (monitor-owned: deleted by name once merged), null for the
   * layers QEMU was started with. See disk-fds.ts.
   */
  nodes: (string | null)[];
  /** The fdset holding the active overlay's read-only descriptor (kept for its freeze). */
  topFdset: number;
  /** The next fdset id free for an overlay added at run time. */
  nextFdset: number;
}

/** Run `op` on a VM's disk chain after the operations already queued on it. */
export function withDisk<T>(disk: VmDisk, op: () => Promise<T>): Promise<T> {
  const result = disk.queue.then(op);
  disk.queue = result.then(
    () => {},
    () => {},
  );
  return result;
}

/** What confines a VM's QEMU besides its seccomp filter (null: not available here). */
export interface VmJail {
  /** The VM's own uid/gid (when the daemon runs as root). */
  creds: QemuCredentials | null;
  cgroup: VmCgroup | null;
}

/**
 * The template memory a restored VM maps privately: its lineage's root template (a fork's
 * children map the same, plus the pages their parent owned).
 */
export interface VmLineage {
  /** The root template's memory file. */
  memPath: string;
  /** Its sealed memfd (VMs under their own uids), or null: the file itself is mapped. */
  memory: SharedMemFd | null;
  /** How to find the mapping in QEMU's address space (guest-ram.ts). */
  ram: RamSource;
}

export class Vm implements VmHandle {
  private destroying: Promise<void> | null = null;
  /** Set by restore (null: a cold boot, which cannot be forked). */
  lineage: VmLineage | null = null;

  constructor(
    readonly id: string,
    readonly dir: string,
    readonly disk: VmDisk,
    readonly shape: VmShape,
    readonly accel: Accel,
    readonly qemu: QemuProcess,
    readonly agent: AgentClient,
    private readonly cleanup: CleanupStack,
    private readonly onCleanupFailure: (name: string, error: unknown) => void,
    readonly jail: VmJail = { creds: null, cgroup: null },
  ) {}

  get pid(): number | undefined {
    return this.qemu.pid;
  }

  get alive(): boolean {
    return !this.qemu.hasExited && !this.agent.closed;
  }

  get hasExited(): boolean {
    return this.qemu.hasExited;
  }

  /** Resolves when QEMU exits for any reason (crash, guest poweroff, kill). */
  get exited(): Promise<QemuExit> {
    return this.qemu.exited;
  }

  get diskChain(): readonly string[] {
    return this.disk.chain;
  }

  /**
   * virtio-blk `werror=enospc`: QEMU stops the VM and reports the write it keeps. Also
   * told of a stop that came before (a pooled VM stopped while idle or starting).
   */
  onDiskFull(listener: () => void): void {
    this.qemu.onDiskFull(listener);
  }

  get stoppedForDisk(): boolean {
    return this.qemu.stoppedForDisk;
  }

  async resume(): Promise<void> {
    await this.qemu.qmp.execute("cont", {});
  }

  renice(nice: number): Promise<void> {
    return this.qemu.renice(nice);
  }

  destroy(): Promise<void> {
    this.destroying ??= this.cleanup.unwind().then((failures) => {
      for (const f of failures) this.onCleanupFailure(f.name, f.error);
    });
    return this.destroying;
  }
}
