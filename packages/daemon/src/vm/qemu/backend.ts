/**
 * The QEMU backend (vm/backend.ts's VmBackend): microVMs booted by the engine, templates
 * frozen as a memory file plus device state (snapshot.ts), forks by device state plus the
 * parent's private pages (fork.ts). Built by daemon.ts, the one module outside this folder
 * that imports it.
 */
import { chmod, stat } from "node:fs/promises";
import { dirname, join } from "node:path";
import type { AgentClient } from "../../guest/agent-client.js";
import type { GuestImage } from "../../image/build.js";
import type { Logger } from "../../util/logger.js";
import { run } from "../../util/run.js";
import type {
  BootOptions,
  ForkResult,
  LeftoversReport,
  VmBackend,
  VmHandle,
  VmShape,
  VmTemplate,
} from "../backend.js";
import type { TemplateFiles, VmEngine } from "./engine.js";
import { forkVm } from "./fork.js";
import { removeLeftovers } from "./leftovers.js";
import { createOverlay } from "./overlay.js";
import { QEMU_OVERHEAD_MIB } from "./sizing.js";
import { saveDeviceState } from "./snapshot.js";
import { Vm } from "./vm.js";

/** The first line of `qemu --version`: part of every template's cache key. */
export async function qemuVersion(qemuBinary: string): Promise<string> {
  const out = await run(qemuBinary, ["--version"]);
  return out.split("\n")[0]?.trim() ?? "unknown";
}

function qemuVm(vm: VmHandle): Vm {
  if (!(vm instanceof Vm)) throw new TypeError(`VM ${vm.id} is not a QEMU VM`);
  return vm;
}

function templateFiles(template: VmTemplate): TemplateFiles {
  const t = template as Partial<TemplateFiles>;
  if (typeof t.memPath !== "string" || typeof t.statePath !== "string")
    throw new TypeError(`template ${template.key} is not a QEMU template`);
  return template as TemplateFiles;
}

export class QemuBackend implements VmBackend {
  readonly identity: VmBackend["identity"];

  constructor(
    readonly engine: VmEngine,
    version: string,
  ) {
    this.identity = { version, accel: engine.opts.accel };
  }

  get memOverheadMib(): number {
    return this.engine.opts.vmMemOverheadMib ?? QEMU_OVERHEAD_MIB;
  }

  get sealedTemplateMemory(): boolean {
    return this.engine.uids !== null;
  }

  makeDir(dir: string, what?: string): string {
    return this.engine.makeDir(dir, what);
  }

  removeLeftovers(log: Logger): Promise<LeftoversReport> {
    return removeLeftovers(this.engine.opts.paths, log);
  }

  boot(id: string, shape: VmShape, options?: BootOptions): Promise<Vm> {
    return this.engine.boot(id, shape, options);
  }

  restore(id: string, template: VmTemplate, nice = 0): Promise<Vm> {
    return this.engine.restore(id, templateFiles(template), nice);
  }

  async snapshot(
    id: string,
    shape: VmShape,
    image: GuestImage,
    workDir: string,
    finalDir: string,
    warm: (agent: AgentClient) => Promise<void>,
  ): Promise<void> {
    const vm = await this.engine.boot(id, shape, {
      image,
      keepFiles: { dir: workDir, memPath: join(workDir, "mem") },
    });
    try {
      await warm(vm.agent);
      await saveDeviceState(
        vm.qemu.qmp,
        join(workDir, "state"),
        join(workDir, "migrate.sock"),
        30_000,
        vm.jail.creds,
      );
    } finally {
      await vm.destroy(); // kills QEMU; the files stay, now frozen
    }
    // The clones' overlay names its backing file by the final, absolute path (-u: that
    // path does not exist yet).
    await createOverlay(join(workDir, "clone.qcow2"), join(finalDir, "root.qcow2"), "qcow2");
  }

  template(dir: string, key: string, shape: VmShape): TemplateFiles {
    return {
      key,
      shape,
      memPath: join(dir, "mem"),
      statePath: join(dir, "state"),
      cloneOverlay: join(dir, "clone.qcow2"),
      baseDisk: join(dir, "root.qcow2"),
    };
  }

  async templateResidentMib(template: VmTemplate): Promise<number | null> {
    const st = await stat(templateFiles(template).memPath).catch(() => null);
    return st ? (st.blocks * 512) / 2 ** 20 : null;
  }

  /**
   * File modes of a frozen template, owned by the daemon. When VMs run under uids of their
   * own, they must read its disk (the bottom of every clone's chain) by path: the
   * directories are traversable but not listable (0711) and the disk read-only for all.
   * Memory and device state stay the daemon's alone (clones get them as fds).
   */
  async exposeTemplate(dir: string): Promise<void> {
    const open = this.engine.uids !== null;
    await chmod(dirname(dir), open ? 0o711 : 0o700);
    await chmod(dir, open ? 0o711 : 0o700);
    for (const [file, mode] of [
      ["root.qcow2", 0o444],
      ["clone.qcow2", 0o600],
      ["mem", 0o600],
      ["state", 0o600],
      ["meta.json", 0o444],
      ["console.log", 0o600],
    ] as const)
      await chmod(join(dir, file), mode).catch(() => {});
  }

  fork(parent: VmHandle, childIds: readonly string[]): Promise<ForkResult> {
    return forkVm(this.engine, qemuVm(parent), childIds);
  }

  flatten(vm: VmHandle): Promise<void> {
    return this.engine.flatten(qemuVm(vm));
  }

  forkLayers(): Promise<{ count: number; bytes: number }> {
    return this.engine.layers.frozenUsage();
  }
}
