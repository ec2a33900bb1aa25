/**
 * The VM engine: boots guests from the image and gives back `Vm`s. Every resource a boot
 * acquires registers its undo step at once, so a failed boot leaves nothing behind.
 */

import { randomBytes } from "node:crypto";
import { closeSync, constants, openSync, rmSync, statSync } from "node:fs";
import {
  chmod,
  chown,
  copyFile,
  lchown,
  lstat,
  readdir,
  rm,
  truncate,
  writeFile,
} from "node:fs/promises";
import { dirname, join } from "node:path";
import type { DaemonPaths } from "../../config/paths.js";
import { AgentClient, AgentError } from "../../guest/agent-client.js";
import type { GuestImage } from "../../image/build.js";
import { CgroupManager, cgroupScopeOf, vmCgroupLimits } from "../../jail/cgroup.js";
import { sharedUidAllocator, type UidAllocator } from "../../jail/uids.js";
import { CleanupStack } from "../../util/cleanup.js";
import type { Logger } from "../../util/logger.js";
import { ensureSafeDir } from "../../util/safe-dir.js";
import { createExclusive } from "../../util/safe-file.js";
import { BootError } from "../backend.js";
import {
  closeFds,
  deleteMergedNodes,
  newDiskState,
  openDiskFds,
  settleFdsets,
  withDiskFds,
} from "./disk-fds.js";
import { type RamSource, ramSource } from "./guest-ram.js";
import { DiskLayers } from "./layers.js";
import { type MemFd, type SharedMemFd, sealedCopy, useHostPython } from "./memfd.js";
import { createOverlay } from "./overlay.js";
import {
  type Accel,
  BASE_NODE,
  buildQemuArgs,
  MEMFD_PATH,
  type QemuCredentials,
  type VmShape,
} from "./qemu-args.js";
import { QemuProcess } from "./qemu-process.js";
import { QEMU_OVERHEAD_MIB } from "./sizing.js";
import { loadDeviceState } from "./snapshot.js";
import { Vm, type VmDisk, type VmJail, type VmLineage, withDisk } from "./vm.js";

/** Host-wide claims of VM uids (several daemons may share the range). */

export interface EngineOptions {
  /** Where the engine's files go (config/paths.ts resolves them). */
  paths: Pick<
    DaemonPaths,
    "stateDir" | "shmDir" | "vmsDir" | "vmMemDir" | "forksDir" | "layersDir" | "uidClaimsDir"
  >;
  /** Host Python for the fd helpers (memfd.ts, fd-pass.ts). */
  hostPython: string;
  qemuBinary: string;
  consoleLogMaxBytes: number;
  bootTimeoutMs: number;
  image: GuestImage;
  accel: Accel;
  tscKhz: number;
  log: Logger;
  /**
   * First uid of the range VMs run under when the daemon is root (each VM its own uid and
   * the gid of the same number); 0 or absent: QEMU keeps the daemon's uid.
   */
  vmUidBase?: number;
  vmUidCount?: number;
  /** Per-VM cgroup limits (memory, pids, CPU) where the host allows (default on). */
  vmCgroups?: boolean;
  /** QEMU's memory beyond guest RAM allowed by the VM's cgroup. */
  vmMemOverheadMib?: number;
}

const VM_ID = /^[a-z0-9_]{1,64}$/;

/** The files of a frozen template: what every clone restores from. */
export interface TemplateFiles {
  key: string;
  shape: VmShape;
  /** Guest RAM at the snapshot instant; clones map it privately (copy-on-write). */
  memPath: string;
  /** Device state (about 70 KB). */
  statePath: string;
  /** An empty qcow2 overlay whose backing file is the template's frozen disk. */
  cloneOverlay: string;
  /** Frozen layers (from forks) below the clone overlay, which each clone must keep alive. */
  layers?: string[];
  /**
   * The sealed memfd of `memPath` a running VM of the lineage holds already (a fork's
   * children share their parent's); clones under their own uids take a reference to it.
   */
  memory?: SharedMemFd;
  /** The template's own frozen disk, at the bottom of every clone's chain. */
  baseDisk: string;
}

/** A fork child's start (fork.ts): its RAM gets the parent's pages before devices load. */
export interface ForkLoad {
  /** Once the child's QEMU answers, before its device state loads: write its RAM. */
  beforeLoad(qemu: QemuProcess, ram: RamSource): Promise<void>;
  /** Milliseconds of each step of the child's start, filled in as it goes. */
  steps: Record<string, number>;
}

export interface BootOptions {
  accel?: Accel;
  timeoutMs?: number;
  /** Boot from this image rather than the engine's (a template of another name). */
  image?: GuestImage;
  /** Keep the VM's directory and memory file after destroy (a template in the making). */
  keepFiles?: { dir: string; memPath: string };
}

/** A sealed memfd copy of a template's memory file, shared by the clones that map it. */
interface TemplateMem {
  memfd: Promise<MemFd>;
  refs: number;
  timer?: NodeJS.Timeout;
}

export class VmEngine {
  readonly layers: DiskLayers;
  /** Allocates VM uids; null when QEMU keeps the daemon's uid (not root, or turned off). */
  readonly uids: UidAllocator | null;
  private cgroupsReady: Promise<CgroupManager | null> | null = null;
  private dirsReady: Promise<void> | null = null;
  private readonly templateMems = new Map<string, TemplateMem>();

  constructor(readonly opts: EngineOptions) {
    useHostPython(opts.hostPython);
    this.layers = new DiskLayers(opts.paths.layersDir);
    const base = opts.vmUidBase ?? 0;
    const root = process.getuid?.() === 0;
    this.uids =
      root && base > 0
        ? sharedUidAllocator({ base, count: opts.vmUidCount ?? 65_536 }, opts.paths.uidClaimsDir)
        : null;
    if (!this.uids)
      opts.log.info(
        { root, vmUidBase: base },
        "VMs run under the daemon's uid (per-VM uids need root and a uid base)",
      );
  }

  /** The cgroup scope of this daemon: its state directory, hashed. */
  get cgroupScope(): string {
    return cgroupScopeOf(this.opts.paths.stateDir);
  }

  /** Per-VM cgroups, found once (null where the host offers none we can write). */
  cgroups(): Promise<CgroupManager | null> {
    this.cgroupsReady ??=
      this.opts.vmCgroups === false
        ? Promise.resolve(null)
        : CgroupManager.detect(this.cgroupScope, this.opts.log);
    return this.cgroupsReady;
  }

  /**
   * The mode of our directories: private (0700), or traversable but not listable (0711)
   * where VMs under their own uids must reach their files below them.
   */
  get dirMode(): number {
    return this.uids ? 0o711 : 0o700;
  }

  /**
   * A directory of the daemon's (see util/safe-dir.ts: created with `dirMode`, or refused
   * when what is there is a link, someone else's, or writable by others). No VM uid can
   * create, rename or remove anything in it, so nothing the daemon writes there can be
   * redirected by a link a compromised QEMU planted.
   */
  makeDir(dir: string, what?: string): string {
    return ensureSafeDir(dir, this.dirMode, what);
  }

  /** Our directories. Nothing is writable by anyone but the daemon. */
  private ensureDirs(): Promise<void> {
    this.dirsReady ??= (async () => {
      this.makeDir(this.opts.paths.stateDir, "the state directory (PODFLARE_STATE_DIR)");
      this.makeDir(this.opts.paths.shmDir, "the shm directory (PODFLARE_SHM_DIR)");
      for (const dir of [this.vmsDir, this.vmMemDir, this.forksDir]) this.makeDir(dir);
      // Disk layers hold tenants' data and reach QEMU as fds (disk-fds.ts): root's alone.
      ensureSafeDir(this.layers.dir, 0o700);
    })();
    this.dirsReady.catch(() => {
      this.dirsReady = null;
    });
    return this.dirsReady;
  }

  /**
   * A uid and a cgroup for one QEMU, each with its undo step (run after QEMU's kill,
   * which is deferred later). Cgroup failures degrade to no limits, logged.
   */
  private async confine(
    cleanup: CleanupStack,
    name: string,
    shape: VmShape,
    nice = 0,
  ): Promise<VmJail> {
    await this.ensureDirs();
    let creds: QemuCredentials | null = null;
    if (this.uids) {
      const uids = this.uids;
      const uid = uids.allocate();
      cleanup.defer("release VM uid", () => uids.release(uid));
      creds = { uid, gid: uid };
    }
    let cgroup: VmJail["cgroup"] = null;
    const manager = await this.cgroups();
    if (manager) {
      try {
        cgroup = await manager.create(
          name,
          vmCgroupLimits(shape, this.opts.vmMemOverheadMib ?? QEMU_OVERHEAD_MIB),
        );
        const group = cgroup;
        cleanup.defer("remove cgroup", () => group.remove());
        if (nice > 0) await group.setNice(nice);
      } catch (err) {
        this.opts.log.warn({ vm: name, err: String(err) }, "VM runs without cgroup limits");
      }
    }
    return { creds, cgroup };
  }

  /** Put a just-spawned QEMU into its group and let renice follow into it. */
  private async enter(jail: VmJail, qemu: QemuProcess): Promise<void> {
    const group = jail.cgroup;
    if (!group || !qemu.pid) return;
    qemu.onRenice = (nice) => group.setNice(nice);
    await group.attach(qemu.pid);
  }

  /** A file or directory for the VM's uid alone. */
  private async giveTo(path: string, creds: QemuCredentials | null, mode: number): Promise<void> {
    if (!creds) return;
    await chown(path, creds.uid, creds.gid);
    await chmod(path, mode);
  }

  /**
   * The sealed memfd of a template's memory file (one copy per file version, shared by its
   * clones and their forks: `retain` takes one more reference to the same copy).
   */
  private async templateMem(memPath: string): Promise<SharedMemFd> {
    const st = statSync(memPath);
    const key = `${memPath}:${st.ino}:${st.mtimeMs}`;
    let entry = this.templateMems.get(key);
    if (!entry) {
      const created: TemplateMem = { memfd: sealedCopy(memPath), refs: 0 };
      entry = created;
      this.templateMems.set(key, created);
      created.memfd.catch(() => this.templateMems.delete(key));
    }
    const e = entry;
    const retain = () => {
      e.refs++;
      if (e.timer) clearTimeout(e.timer);
      e.timer = undefined;
      let released = false;
      return () => {
        if (released) return;
        released = true;
        if (--e.refs > 0) return;
        // Kept a little while: pool refills come one after another.
        e.timer = setTimeout(() => {
          if (e.refs > 0) return;
          this.templateMems.delete(key);
          e.memfd.then((m) => m.close()).catch(() => {});
        }, 10_000);
        e.timer.unref();
      };
    };
    const release = retain();
    try {
      return { fd: (await e.memfd).fd, retain, release };
    } catch (err) {
      release();
      throw err;
    }
  }

  get vmsDir(): string {
    return this.opts.paths.vmsDir;
  }

  /** Memory files of cold-booted VMs (clones have none: they map their template's). */
  get vmMemDir(): string {
    return this.opts.paths.vmMemDir;
  }

  /** Working files of forks in progress (memory on a tmpfs). */
  get forksDir(): string {
    return this.opts.paths.forksDir;
  }

  vmDir(id: string): string {
    return join(this.vmsDir, id);
  }

  memPath(id: string): string {
    return join(this.vmMemDir, `${id}.mem`);
  }

  /** Cold-boot a VM from the image and wait until its agent answers. */
  async boot(id: string, shape: VmShape, options: BootOptions = {}): Promise<Vm> {
    const accel = options.accel ?? this.opts.accel;
    const timeoutMs = options.timeoutMs ?? this.opts.bootTimeoutMs;
    return this.launch(
      id,
      shape,
      accel,
      async (cleanup, dir, _disk, jail) => {
        const memPath = options.keepFiles?.memPath ?? this.memPath(id);
        this.makeDir(dirname(memPath));
        if (!options.keepFiles)
          cleanup.defer("remove memory file", () => rm(memPath, { force: true }));
        // Made here, in the VM's size, and handed to its uid: QEMU creates nothing in a
        // shared directory.
        await writeFile(memPath, "", { mode: 0o600 });
        await truncate(memPath, shape.memSizeMib * 1024 * 1024);
        await this.giveTo(memPath, jail.creds, 0o600);
        const overlay = join(dir, "root.qcow2");
        const image = options.image ?? this.opts.image;
        await createOverlay(overlay, image.rootfs, "raw");
        // Root's, 0600: QEMU gets it as an fd (disk-fds.ts); the image below is public.
        const diskFds = openDiskFds(overlay, []);
        let qemu: QemuProcess;
        try {
          qemu = this.spawn(
            dir,
            { ...shape, accel, lowerDisks: 0, memPath, memShared: true },
            withDiskFds([], diskFds),
            0,
            jail.creds,
            image,
          );
        } finally {
          closeFds(diskFds);
        }
        cleanup.defer("kill QEMU", async () => void (await qemu.kill()));
        await this.enter(jail, qemu);
        const agent = this.attachAgent(id, qemu, cleanup);
        qemu.qmp.connect().catch(() => {}); // a dead QEMU shows in `exited`
        await this.waitForAgent(agent, qemu, timeoutMs);
        return { qemu, agent };
      },
      options.keepFiles?.dir,
    );
  }

  /**
   * Restore a VM from a template: a new QEMU maps the template's memory privately, its
   * disk is a fresh overlay on the template's frozen one, and the guest resumes exactly
   * where the template stopped. Then it gets its own entropy, clock and identity.
   * `nice` > 0 restores at low CPU priority (pool refills yield to sandboxes in use);
   * the pool renices the VM to 0 when it hands it out.
   */
  async restore(id: string, template: TemplateFiles, nice = 0, fork?: ForkLoad): Promise<Vm> {
    const accel = this.opts.accel;
    let lineage: VmLineage | null = null;
    const vm = await this.launch(
      id,
      template.shape,
      accel,
      async (cleanup, dir, disk, jail) => {
        const started = performance.now();
        const overlay = this.layers.pathFor(id);
        disk.chain = [overlay, ...(template.layers ?? [])];
        disk.base = template.baseDisk;
        this.layers.retain(disk.chain);
        // The chain at destroy time: a fork may have grown it by then.
        cleanup.defer("release disk layers", () => this.layers.release(disk.chain));
        disk.nodes = disk.chain.map(() => null);
        await copyFile(template.cloneOverlay, overlay, constants.COPYFILE_EXCL);
        // Root's, 0600, like every layer: QEMU gets the chain as fds (disk-fds.ts).
        await chmod(overlay, 0o600);
        // A VM under its own uid maps the memory from a write-sealed memfd (see memfd.ts).
        let memPath = template.memPath;
        let memory: SharedMemFd | null = null;
        if (jail.creds) {
          memPath = MEMFD_PATH;
          if (template.memory) {
            const shared = template.memory;
            const release = shared.retain();
            memory = { fd: shared.fd, retain: shared.retain, release };
          } else memory = await this.templateMem(template.memPath);
          const held = memory;
          cleanup.defer("release template memory", () => held.release());
        }
        const bytes = template.shape.memSizeMib * 1024 * 1024;
        lineage = {
          memPath: template.memPath,
          memory,
          ram: ramSource(memory ? { fd: memory.fd } : { path: template.memPath }, bytes),
        };
        const lower = [...disk.chain.slice(1), disk.base];
        const diskFds = openDiskFds(overlay, lower);
        let stateFd: number | null = null;
        let qemu: QemuProcess;
        try {
          stateFd = openSync(template.statePath, "r");
          qemu = this.spawn(
            dir,
            {
              ...template.shape,
              accel,
              lowerDisks: lower.length,
              memPath,
              memShared: false,
              incoming: true,
              deviceStateOnly: fork !== undefined,
            },
            withDiskFds(memory === null ? [stateFd] : [stateFd, memory.fd], diskFds),
            nice,
            jail.creds,
          );
        } finally {
          if (stateFd !== null) closeSync(stateFd);
          closeFds(diskFds);
        }
        cleanup.defer("kill QEMU", async () => void (await qemu.kill()));
        await this.enter(jail, qemu);
        const agent = this.attachAgent(id, qemu, cleanup);
        agent.assumeHandshake(); // the restored agent is the template's, already greeted
        try {
          await qemu.qmp.connect();
          let t = performance.now();
          if (fork) {
            fork.steps.spawn = t - started; // overlay copy, spawn, cgroup entry, QMP greeting
            await fork.beforeLoad(qemu, lineage.ram);
            fork.steps.pageWrite = performance.now() - t;
            t = performance.now();
          }
          await loadDeviceState(qemu.qmp);
          await qemu.qmp.execute("cont", {});
          if (fork) fork.steps.deviceLoad = performance.now() - t;
          t = performance.now();
          await settleFdsets(qemu.qmp, disk);
          if (fork) fork.steps.settleFds = performance.now() - t;
        } catch (err) {
          await Promise.race([qemu.exited, new Promise((r) => setTimeout(r, 100))]);
          throw new BootError(`restore failed: ${(err as Error).message}\n${qemu.diagnostics()}`, {
            cause: err,
          });
        }
        return { qemu, agent };
      },
      undefined,
      nice,
      fork?.steps,
    );
    vm.lineage = lineage;
    return vm;
  }

  private async launch(
    id: string,
    shape: VmShape,
    accel: Accel,
    start: (
      cleanup: CleanupStack,
      dir: string,
      disk: VmDisk,
      jail: VmJail,
    ) => Promise<{ qemu: QemuProcess; agent: AgentClient }>,
    keepDir?: string,
    nice = 0,
    steps?: Record<string, number>,
  ): Promise<Vm> {
    if (!VM_ID.test(id)) throw new RangeError(`invalid VM id ${JSON.stringify(id)}`);
    const { log } = this.opts;
    const started = performance.now();
    const cleanup = new CleanupStack();
    const dir = keepDir ?? this.vmDir(id);
    try {
      await this.ensureDirs();
      // The daemon's, not the VM's: QEMU needs no directory it can write (its pid file is
      // made for it below), so the console log, saves and the removal of the directory
      // cannot be redirected by a link it planted.
      this.makeDir(dir);
      if (!keepDir)
        cleanup.defer("remove VM directory", () => rm(dir, { recursive: true, force: true }));
      const jail = await this.confine(cleanup, id, shape, nice);
      if (steps) steps.confine = performance.now() - started;
      if (keepDir && jail.creds) {
        // A template in the making: its files go back to the daemon when the VM ends.
        cleanup.defer("return the VM's files to the daemon", () => chownTree(dir, 0, 0));
      }
      const disk: VmDisk = { chain: [], base: "", queue: Promise.resolve(), ...newDiskState() };
      const { qemu, agent } = await start(cleanup, dir, disk, jail);
      const restoreStarted = performance.now();
      await agent.restore(
        {
          entropy: randomBytes(64),
          timeNs: BigInt(Date.now()) * 1_000_000n,
          hostname: id.replaceAll("_", "-").slice(0, 63),
          machineId: randomBytes(16).toString("hex"),
        },
        // Part of the VM's start, bounded like a boot (PODFLARE_BOOT_TIMEOUT_MS): on a
        // loaded TCG host a restore's first guest work has taken more than 10 s.
        this.opts.bootTimeoutMs,
      );
      if (steps) steps.restoreRequest = performance.now() - restoreStarted;
      const vm = new Vm(
        id,
        dir,
        disk,
        shape,
        accel,
        qemu,
        agent,
        cleanup,
        (name, error) =>
          log.error({ vm: id, step: name, err: String(error) }, "VM cleanup step failed"),
        jail,
      );
      log.debug(
        {
          vm: id,
          pid: qemu.pid,
          uid: jail.creds?.uid,
          cgroup: jail.cgroup !== null,
          accel,
          ms: Math.round(performance.now() - started),
        },
        "VM started",
      );
      return vm;
    } catch (err) {
      await cleanup.unwind();
      if (err instanceof BootError) throw err;
      throw new BootError(`VM ${id} failed to start: ${(err as Error).message}`, { cause: err });
    }
  }

  /**
   * Merge a running VM's fork layers into its active overlay (QMP block-stream down to the
   * template's disk), so chains stay short however often a line of sandboxes forks. The
   * merged layers are released: other VMs may still hold them.
   */
  flatten(vm: Vm, timeoutMs = 300_000): Promise<void> {
    return withDisk(vm.disk, async () => {
      if (vm.disk.chain.length < 2 || !vm.alive) return;
      const job = `flatten-${randomBytes(4).toString("hex")}`;
      const qmp = vm.qemu.qmp;
      const done = qmp.waitForEvent("BLOCK_JOB_COMPLETED", timeoutMs, (e) => e.data.device === job);
      done.catch(() => {});
      // By node (the chain's files are fdsets, not names); the header gets the real path.
      await qmp.execute("block-stream", {
        "job-id": job,
        device: "root",
        "base-node": BASE_NODE,
        "backing-file": vm.disk.base,
      });
      const event = await done;
      if (event.data.error)
        throw new Error(`flattening ${vm.id}'s disk failed: ${String(event.data.error)}`);
      const merged = vm.disk.chain.slice(1);
      const mergedNodes = vm.disk.nodes.slice(1);
      vm.disk.chain = vm.disk.chain.slice(0, 1);
      vm.disk.nodes = vm.disk.nodes.slice(0, 1);
      await deleteMergedNodes(qmp, mergedNodes).catch((err) =>
        this.opts.log.warn({ vm: vm.id, err: String(err) }, "merged disk nodes not deleted"),
      );
      await this.layers.release(merged);
      this.opts.log.info({ vm: vm.id, merged: merged.length }, "disk chain flattened");
    });
  }

  private spawn(
    dir: string,
    vm: VmShape & {
      accel: Accel;
      lowerDisks: number;
      memPath: string;
      memShared: boolean;
      incoming?: boolean;
      deviceStateOnly?: boolean;
    },
    extraFds: (number | "ignore")[] = [],
    nice = 0,
    creds: QemuCredentials | null = null,
    image: GuestImage = this.opts.image,
  ): QemuProcess {
    // QEMU opens its pid file without creating it: made here, exclusively (no link is
    // followed), and given to the VM's uid by descriptor.
    const pidFile = join(dir, "qemu.pid");
    rmSync(pidFile, { force: true });
    createExclusive(pidFile, 0o600, creds);
    const args = buildQemuArgs({
      ...vm,
      kernel: image.kernel,
      initrd: image.initrd,
      tscKhz: this.opts.tscKhz,
      pidFile,
    });
    return QemuProcess.spawn(
      this.opts.qemuBinary,
      args,
      join(dir, "console.log"),
      this.opts.consoleLogMaxBytes,
      extraFds,
      nice,
      creds,
    );
  }

  private attachAgent(id: string, qemu: QemuProcess, cleanup: CleanupStack): AgentClient {
    const agent = new AgentClient(qemu.agentStream, (msg, extra) =>
      this.opts.log.warn({ vm: id, ...extra }, msg),
    );
    cleanup.defer("close agent channel", () => agent.close());
    return agent;
  }

  /** Send hello until the agent answers; fail fast if QEMU exits. */
  private async waitForAgent(
    agent: AgentClient,
    qemu: QemuProcess,
    timeoutMs: number,
  ): Promise<void> {
    const deadline = performance.now() + timeoutMs;
    let exited = false;
    qemu.exited.then(() => {
      exited = true;
    });
    while (performance.now() < deadline) {
      if (exited) throw new BootError(`QEMU exited during boot.\n${qemu.diagnostics()}`);
      try {
        // Until the guest opens its port, QEMU holds our bytes; the retry covers a hello
        // lost while the port was being opened.
        await Promise.race([
          agent.hello(Math.min(2_000, Math.max(1, deadline - performance.now()))),
          qemu.exited,
        ]);
        if (exited) continue;
        return;
      } catch (err) {
        if (!(err instanceof AgentError && err.code === "timeout")) {
          await Promise.race([qemu.exited, new Promise((r) => setTimeout(r, 200))]);
          throw new BootError(`${(err as Error).message}\n${qemu.diagnostics()}`, { cause: err });
        }
      }
    }
    throw new BootError(
      `the guest agent did not answer within ${timeoutMs} ms.\n${qemu.diagnostics()}`,
    );
  }
}

/** chown -R (no symlinks followed). */
async function chownTree(path: string, uid: number, gid: number): Promise<void> {
  const st = await lstat(path).catch(() => null);
  if (!st) return;
  if (st.isDirectory())
    for (const entry of await readdir(path)) await chownTree(join(path, entry), uid, gid);
  if (!st.isSymbolicLink()) await lchown(path, uid, gid);
}
