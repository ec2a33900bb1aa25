/**
 * The VM engine: boots guests from the image and gives back `Vm`s. Every resource a boot
 * acquires registers its undo step at once, so a failed boot leaves nothing behind.
 */
import { randomBytes } from "node:crypto";
import { mkdir, rm } from "node:fs/promises";
import { join } from "node:path";
import { AgentClient, AgentError } from "../guest/agent-client.js";
import type { GuestImage } from "../image/build.js";
import { CleanupStack } from "../util/cleanup.js";
import type { Logger } from "../util/logger.js";
import { run } from "../util/run.js";
import { type Accel, buildQemuArgs, type VmShape } from "./qemu-args.js";
import { QemuProcess } from "./qemu-process.js";
import { Vm } from "./vm.js";

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

export class VmEngine {
  constructor(readonly opts: EngineOptions) {}

  get vmsDir(): string {
    return join(this.opts.stateDir, "vms");
  }

  vmDir(id: string): string {
    return join(this.vmsDir, id);
  }

  memPath(id: string): string {
    return join(this.opts.shmDir, `${id}.mem`);
  }

  /** Cold-boot a VM from the image and wait until its agent answers. */
  async boot(
    id: string,
    shape: VmShape,
    accel: Accel = this.opts.accel,
    timeoutMs = this.opts.bootTimeoutMs,
  ): Promise<Vm> {
    if (!VM_ID.test(id)) throw new RangeError(`invalid VM id ${JSON.stringify(id)}`);
    const { image, log } = this.opts;
    const started = performance.now();
    const cleanup = new CleanupStack();
    const dir = this.vmDir(id);
    const memPath = this.memPath(id);
    try {
      await mkdir(dir, { recursive: true, mode: 0o700 });
      cleanup.defer("remove VM directory", () => rm(dir, { recursive: true, force: true }));
      await mkdir(this.opts.shmDir, { recursive: true, mode: 0o700 });
      cleanup.defer("remove memory file", () => rm(memPath, { force: true }));
      const overlay = join(dir, "root.qcow2");
      await run("qemu-img", [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        image.rootfs,
        overlay,
      ]);

      const args = buildQemuArgs({
        ...shape,
        accel,
        kernel: image.kernel,
        initrd: image.initrd,
        rootDisk: overlay,
        rootDiskFormat: "qcow2",
        memPath,
        tscKhz: this.opts.tscKhz,
      });
      const qemu = QemuProcess.spawn(
        this.opts.qemuBinary,
        args,
        join(dir, "console.log"),
        this.opts.consoleLogMaxBytes,
      );
      cleanup.defer("kill QEMU", async () => {
        await qemu.kill();
      });
      const agent = new AgentClient(qemu.agentStream, (msg, extra) =>
        log.warn({ vm: id, ...extra }, msg),
      );
      cleanup.defer("close agent channel", () => agent.close());
      qemu.qmp.connect().catch(() => {}); // negotiated in the background; a dead QEMU shows in exited

      await this.waitForAgent(agent, qemu, timeoutMs);
      await agent.restore(
        {
          entropy: randomBytes(64),
          timeNs: BigInt(Date.now()) * 1_000_000n,
          hostname: id.replaceAll("_", "-").slice(0, 63),
          machineId: randomBytes(16).toString("hex"),
        },
        10_000,
      );
      const vm = new Vm(id, dir, shape, accel, qemu, agent, cleanup, (name, error) =>
        log.error({ vm: id, step: name, err: String(error) }, "VM cleanup step failed"),
      );
      log.info(
        { vm: id, pid: qemu.pid, accel, ms: Math.round(performance.now() - started) },
        "VM booted",
      );
      return vm;
    } catch (err) {
      await cleanup.unwind();
      if (err instanceof BootError) throw err;
      throw new BootError(`VM ${id} failed to boot: ${(err as Error).message}`);
    }
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
