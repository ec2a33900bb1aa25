/**
 * The VM engine: boots guests from the image and gives back `Vm`s. Every resource a boot
 * acquires registers its undo step at once, so a failed boot leaves nothing behind.
 */
import { randomBytes } from "node:crypto";
import { closeSync, openSync } from "node:fs";
import { copyFile, mkdir, rm } from "node:fs/promises";
import { dirname, join } from "node:path";
import { AgentClient, AgentError } from "../guest/agent-client.js";
import type { GuestImage } from "../image/build.js";
import { CleanupStack } from "../util/cleanup.js";
import type { Logger } from "../util/logger.js";
import { DiskLayers } from "./layers.js";
import { createOverlay } from "./overlay.js";
import { type Accel, buildQemuArgs, type VmShape } from "./qemu-args.js";
import { QemuProcess } from "./qemu-process.js";
import { loadDeviceState } from "./snapshot.js";
import { Vm, type VmDisk, withDisk } from "./vm.js";

export interface EngineOptions {
  stateDir: string;
  shmDir: string;
  qemuBinary: string;
  consoleLogMaxBytes: number;
  bootTimeoutMs: number;
  image: GuestImage;
  accel: Accel;
  tscKhz: number;
  log: Logger;
}

export class BootError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "BootError";
  }
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
  /** The template's own frozen disk, at the bottom of every clone's chain. */
  baseDisk: string;
}

export interface BootOptions {
  accel?: Accel;
  timeoutMs?: number;
  /** Keep the VM's directory and memory file after destroy (a template in the making). */
  keepFiles?: { dir: string; memPath: string };
}

export class VmEngine {
  readonly layers: DiskLayers;

  constructor(readonly opts: EngineOptions) {
    this.layers = new DiskLayers(join(opts.stateDir, "layers"));
  }

  get vmsDir(): string {
    return join(this.opts.stateDir, "vms");
  }

  /** Memory files of cold-booted VMs (clones have none: they map their template's). */
  get vmMemDir(): string {
    return join(this.opts.shmDir, "vms");
  }

  /** Working files of forks in progress (memory on a tmpfs). */
  get forksDir(): string {
    return join(this.opts.shmDir, "forks");
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
      async (cleanup, dir) => {
        const memPath = options.keepFiles?.memPath ?? this.memPath(id);
        await mkdir(dirname(memPath), { recursive: true, mode: 0o700 });
        if (!options.keepFiles)
          cleanup.defer("remove memory file", () => rm(memPath, { force: true }));
        const overlay = join(dir, "root.qcow2");
        await createOverlay(overlay, this.opts.image.rootfs, "raw");
        const qemu = this.spawn(dir, {
          ...shape,
          accel,
          rootDisk: overlay,
          memPath,
          memShared: true,
        });
        cleanup.defer("kill QEMU", async () => void (await qemu.kill()));
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
  async restore(id: string, template: TemplateFiles, nice = 0): Promise<Vm> {
    const accel = this.opts.accel;
    return this.launch(id, template.shape, accel, async (cleanup, dir, disk) => {
      const overlay = this.layers.pathFor(id);
      await mkdir(this.layers.dir, { recursive: true, mode: 0o700 });
      disk.chain = [overlay, ...(template.layers ?? [])];
      disk.base = template.baseDisk;
      this.layers.retain(disk.chain);
      // The chain at destroy time: a fork may have grown it by then.
      cleanup.defer("release disk layers", () => this.layers.release(disk.chain));
      await copyFile(template.cloneOverlay, overlay);
      const stateFd = openSync(template.statePath, "r");
      let qemu: QemuProcess;
      try {
        qemu = this.spawn(
          dir,
          {
            ...template.shape,
            accel,
            rootDisk: overlay,
            memPath: template.memPath,
            memShared: false,
            incoming: true,
          },
          [stateFd],
          nice,
        );
      } finally {
        closeSync(stateFd);
      }
      cleanup.defer("kill QEMU", async () => void (await qemu.kill()));
      const agent = this.attachAgent(id, qemu, cleanup);
      agent.assumeHandshake(); // the restored agent is the template's, already greeted
      try {
        await qemu.qmp.connect();
        await loadDeviceState(qemu.qmp);
        await qemu.qmp.execute("cont", {});
      } catch (err) {
        await Promise.race([qemu.exited, new Promise((r) => setTimeout(r, 100))]);
        throw new BootError(`restore failed: ${(err as Error).message}\n${qemu.diagnostics()}`);
      }
      return { qemu, agent };
    });
  }

  private async launch(
    id: string,
    shape: VmShape,
    accel: Accel,
    start: (
      cleanup: CleanupStack,
      dir: string,
      disk: VmDisk,
    ) => Promise<{ qemu: QemuProcess; agent: AgentClient }>,
    keepDir?: string,
  ): Promise<Vm> {
    if (!VM_ID.test(id)) throw new RangeError(`invalid VM id ${JSON.stringify(id)}`);
    const { log } = this.opts;
    const started = performance.now();
    const cleanup = new CleanupStack();
    const dir = keepDir ?? this.vmDir(id);
    try {
      await mkdir(dir, { recursive: true, mode: 0o700 });
      if (!keepDir)
        cleanup.defer("remove VM directory", () => rm(dir, { recursive: true, force: true }));
      const disk: VmDisk = { chain: [], base: "", queue: Promise.resolve() };
      const { qemu, agent } = await start(cleanup, dir, disk);
      await agent.restore(
        {
          entropy: randomBytes(64),
          timeNs: BigInt(Date.now()) * 1_000_000n,
          hostname: id.replaceAll("_", "-").slice(0, 63),
          machineId: randomBytes(16).toString("hex"),
        },
        10_000,
      );
      const vm = new Vm(id, dir, disk, shape, accel, qemu, agent, cleanup, (name, error) =>
        log.error({ vm: id, step: name, err: String(error) }, "VM cleanup step failed"),
      );
      log.debug(
        { vm: id, pid: qemu.pid, accel, ms: Math.round(performance.now() - started) },
        "VM started",
      );
      return vm;
    } catch (err) {
      await cleanup.unwind();
      if (err instanceof BootError) throw err;
      throw new BootError(`VM ${id} failed to start: ${(err as Error).message}`);
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
      await qmp.execute("block-stream", { "job-id": job, device: "root", base: vm.disk.base });
      const event = await done;
      if (event.data.error)
        throw new Error(`flattening ${vm.id}'s disk failed: ${String(event.data.error)}`);
      const merged = vm.disk.chain.slice(1);
      vm.disk.chain = vm.disk.chain.slice(0, 1);
      await this.layers.release(merged);
      this.opts.log.info({ vm: vm.id, merged: merged.length }, "disk chain flattened");
    });
  }

  /** A QEMU that only receives a VM's state into its own shared memory file (fork). */
  spawnReceiver(dir: string, shape: VmShape, rootDisk: string, memPath: string): QemuProcess {
    return this.spawn(dir, {
      ...shape,
      accel: this.opts.accel,
      rootDisk,
      memPath,
      memShared: true,
      incoming: true,
    });
  }

  private spawn(
    dir: string,
    vm: VmShape & {
      accel: Accel;
      rootDisk: string;
      memPath: string;
      memShared: boolean;
      incoming?: boolean;
    },
    extraFds: number[] = [],
    nice = 0,
  ): QemuProcess {
    const { image } = this.opts;
    const args = buildQemuArgs({
      ...vm,
      kernel: image.kernel,
      initrd: image.initrd,
      rootDiskFormat: "qcow2",
      tscKhz: this.opts.tscKhz,
      pidFile: join(dir, "qemu.pid"),
    });
    return QemuProcess.spawn(
      this.opts.qemuBinary,
      args,
      join(dir, "console.log"),
      this.opts.consoleLogMaxBytes,
      extraFds,
      nice,
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
          throw new BootError(`${(err as Error).message}\n${qemu.diagnostics()}`);
        }
      }
    }
    throw new BootError(
      `the guest agent did not answer within ${timeoutMs} ms.\n${qemu.diagnostics()}`,
    );
  }
}
