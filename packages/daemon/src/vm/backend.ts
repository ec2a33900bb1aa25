/**
 * What the rest of the daemon may know about a VM: a backend that boots, restores,
 * snapshots and forks VMs, and the handle of one running VM. Everything else (QEMU's
 * arguments and process, QMP, device-state migration, memory files, disk overlays,
 * accelerator probing, the memory QEMU needs beyond guest RAM) lives behind it, in one
 * backend folder (vm/qemu/, built in daemon.ts and imported nowhere else). The jail
 * (jail/: per-VM uids and cgroups) is shared by backends.
 */
import type { AgentClient } from "../guest/agent-client.js";
import type { GuestImage } from "../image/build.js";
import type { Logger } from "../util/logger.js";

/** A VM's size: the callers' choice, bounded by the configuration. */
export interface VmShape {
  vcpuCount: number;
  memSizeMib: number;
}

/** Hardware virtualisation, or emulation. */
export type Accel = "kvm" | "tcg";

/** A VM did not come up (boot, restore or fork); api/ maps it to an HTTP status. */
export class BootError extends Error {
  /** `cause`: the error that stopped the VM, if any (a host disk full is told by its code). */
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "BootError";
  }
}

/** How a VM's process ended. */
export interface VmExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** One running VM. */
export interface VmHandle {
  readonly id: string;
  readonly shape: VmShape;
  /** The guest agent's channel. */
  readonly agent: AgentClient;
  /** The host process behind the VM (diagnostics, tests, the store's row). */
  readonly pid: number | undefined;
  /** Its process runs and its agent channel is open. */
  readonly alive: boolean;
  /** Its process has exited (its memory is free on the host). */
  readonly hasExited: boolean;
  /** Resolves when the VM's process exits for any reason (crash, poweroff, kill). */
  readonly exited: Promise<VmExit>;
  /** The files the VM's disk stacks, its own writable layer first (disk accounting). */
  readonly diskChain: readonly string[];
  /**
   * `listener` runs when the VM paused itself because a disk write met a full host disk
   * (the write is kept and retried once it resumes); at once if it is paused so already.
   */
  onDiskFull(listener: () => void): void;
  /** Paused by a full host disk now (not to be handed out from a pool). */
  readonly stoppedForDisk: boolean;
  /** Let a VM paused by a full disk run again. */
  resume(): Promise<void>;
  /** CPU priority of the VM (a nice level: > 0 yields to others). */
  renice(nice: number): Promise<void>;
  /** Idempotent: undoes everything the VM acquired. */
  destroy(): Promise<void>;
}

/** A frozen VM every clone restores from; opaque outside its backend. */
export interface VmTemplate {
  readonly key: string;
  readonly shape: VmShape;
}

export interface ForkResult {
  children: VmHandle[];
  /** How long the parent was paused. */
  pausedMs: number;
}

export interface BootOptions {
  timeoutMs?: number;
}

/** What removeLeftovers() found and removed. */
export interface LeftoversReport {
  processesKilled: number;
  filesRemoved: number;
  cgroupsRemoved: number;
}

export interface VmBackend {
  /** What a snapshot depends on besides the image and the shape (template cache keys). */
  readonly identity: { version: string; accel: Accel };
  /** Host memory a VM costs beyond its guest RAM (admission charges guest RAM + this). */
  readonly memOverheadMib: number;
  /**
   * Clones map a sealed copy of a template's memory rather than its file (VMs under uids
   * of their own): a template then holds its memory twice (pool/template-cache.ts).
   */
  readonly sealedTemplateMemory: boolean;
  /**
   * A directory of the daemon's for files VMs use (util/safe-dir.ts, with the mode VMs
   * of this backend need to pass through it).
   */
  makeDir(dir: string, what?: string): string;
  /**
   * Remove what an earlier run of the daemon left (its VMs' processes, directories,
   * memory files, cgroups): at start-up, before any VM of this run exists.
   */
  removeLeftovers(log: Logger): Promise<LeftoversReport>;
  /** Cold-boot a VM and wait until its agent answers. */
  boot(id: string, shape: VmShape, options?: BootOptions): Promise<VmHandle>;
  /** A VM resumed from a template; `nice` > 0 restores at low CPU priority. */
  restore(id: string, template: VmTemplate, nice?: number): Promise<VmHandle>;
  /**
   * Boot a VM from `image`, let `warm` prepare it through its agent, and freeze it into
   * template files in `workDir`; the caller then renames `workDir` to `finalDir` (the
   * files may name it).
   */
  snapshot(
    id: string,
    shape: VmShape,
    image: GuestImage,
    workDir: string,
    finalDir: string,
    warm: (agent: AgentClient) => Promise<void>,
  ): Promise<void>;
  /** The template frozen in `dir` by snapshot(). */
  template(dir: string, key: string, shape: VmShape): VmTemplate;
  /** MiB of host memory a template's memory holds now (null: unknown). */
  templateResidentMib(template: VmTemplate): Promise<number | null>;
  /** Give a frozen template's files the modes its clones need. */
  exposeTemplate(dir: string): Promise<void>;
  /** n children of a running VM, each its own copy; the parent keeps running. */
  fork(parent: VmHandle, childIds: readonly string[]): Promise<ForkResult>;
  /** Merge a VM's stacked disk layers into its own (frees the layers only it held). */
  flatten(vm: VmHandle): Promise<void>;
  /**
   * The disk layers forks froze that VMs still stack (each lives until the last VM of its
   * lineage that stacks it is gone): how many, and the host disk they take.
   */
  forkLayers(): Promise<{ count: number; bytes: number }>;
}
