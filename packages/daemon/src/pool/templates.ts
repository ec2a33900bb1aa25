/**
 * Templates: a VM booted once, warmed (interpreter started, common modules imported),
 * and frozen as a memory file plus device state. Every sandbox of that shape is a restore
 * of it. A template is keyed by everything a snapshot depends on (image, QEMU build,
 * accelerator, shape) and built at most once per key: concurrent callers in this process
 * share one build, other processes wait on a lock file.
 */
import { createHash } from "node:crypto";
import { access, chmod, readdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { AgentClient } from "../guest/agent-client.js";
import type { GuestImage } from "../image/build.js";
import { withFileLock } from "../util/lock.js";
import type { Logger } from "../util/logger.js";
import { run } from "../util/run.js";
import type { TemplateFiles, VmEngine } from "../vm/engine.js";
import { createOverlay } from "../vm/overlay.js";
import type { Accel, VmShape } from "../vm/qemu-args.js";
import { saveDeviceState } from "../vm/snapshot.js";

/** Bump when the warm-up or the template layout changes. */
export const TEMPLATE_VERSION = 3;

/** Imported while the template is made, so no sandbox pays for them. */
const WARM_MODULES = [
  "json",
  "re",
  "os",
  "sys",
  "math",
  "random",
  "time",
  "datetime",
  "collections",
  "itertools",
  "functools",
  "pathlib",
  "subprocess",
  "io",
  "base64",
  "hashlib",
  "string",
  "textwrap",
  "typing",
  "dataclasses",
  "decimal",
  "fractions",
  "statistics",
  "csv",
  "tempfile",
  "shutil",
  "glob",
  "struct",
  "copy",
  "pprint",
  "traceback",
  "enum",
  "uuid",
  "heapq",
  "bisect",
  "operator",
  "contextlib",
  "threading",
  "queue",
  "signal",
  "socket",
  "urllib.parse",
  "asyncio",
  "sqlite3",
  "zlib",
  "gzip",
];

// Runs in the REPL of the template: it must leave no names in the user's globals.
const WARM_UP_PYTHON = `for _podflare_m in ${JSON.stringify(WARM_MODULES)}:
    __import__(_podflare_m)
del _podflare_m
print("podflare: template warm")`;

export interface TemplateKeyInput {
  imageKey: string;
  qemuVersion: string;
  accel: Accel;
  shape: VmShape;
}

export function templateKey(input: TemplateKeyInput): string {
  return createHash("sha256")
    .update(
      JSON.stringify({
        v: TEMPLATE_VERSION,
        ...input,
        shape: [input.shape.vcpuCount, input.shape.memSizeMib],
      }),
    )
    .digest("hex")
    .slice(0, 16);
}

export async function qemuVersion(qemuBinary: string): Promise<string> {
  const out = await run(qemuBinary, ["--version"]);
  return out.split("\n")[0]?.trim() ?? "unknown";
}

const exists = (path: string) =>
  access(path).then(
    () => true,
    () => false,
  );

export class TemplateManager {
  private readonly building = new Map<string, Promise<TemplateFiles>>();
  builds = 0;

  constructor(
    private readonly engine: VmEngine,
    private readonly dir: string,
    private readonly image: GuestImage,
    private readonly qemu: string,
    private readonly log: Logger,
    private readonly onBuilt: () => void = () => {},
  ) {}

  keyOf(shape: VmShape): string {
    return templateKey({
      imageKey: this.image.key,
      qemuVersion: this.qemu,
      accel: this.engine.opts.accel,
      shape,
    });
  }

  filesOf(key: string, shape: VmShape): TemplateFiles {
    const dir = join(this.dir, key);
    return {
      key,
      shape,
      memPath: join(dir, "mem"),
      statePath: join(dir, "state"),
      cloneOverlay: join(dir, "clone.qcow2"),
      baseDisk: join(dir, "root.qcow2"),
    };
  }

  /** The template for this shape, built first if needed (at most once per key). */
  ensure(shape: VmShape): Promise<TemplateFiles> {
    const key = this.keyOf(shape);
    let pending = this.building.get(key);
    if (!pending) {
      pending = this.load(key, shape).finally(() => this.building.delete(key));
      this.building.set(key, pending);
    }
    return pending;
  }

  private async load(key: string, shape: VmShape): Promise<TemplateFiles> {
    const files = this.filesOf(key, shape);
    const ready = join(this.dir, key, "meta.json");
    // Checked before anything in it is trusted (util/safe-dir.ts): a template planted in a
    // directory someone else made would hand every clone their memory and device state.
    // VMs under their own uids (the template's own, while it is built) pass through it.
    this.engine.makeDir(this.dir, "the templates directory (PODFLARE_TEMPLATES_DIR)");
    if (await exists(ready)) {
      await this.exposeTemplate(key);
      return files;
    }
    return withFileLock(join(this.dir, `.lock-${key}`), async () => {
      if (!(await exists(ready))) {
        await this.build(key, shape);
        await this.prune();
      }
      await this.exposeTemplate(key);
      return files;
    });
  }

  private async build(key: string, shape: VmShape): Promise<void> {
    const started = performance.now();
    const final = join(this.dir, key);
    const work = join(this.dir, `.build-${key}-${process.pid}`);
    this.log.info(
      { template: key, shape, accel: this.engine.opts.accel },
      "building template: booting its VM",
    );
    await rm(work, { recursive: true, force: true });
    try {
      const vm = await this.engine.boot(`tpl_${key}`, shape, {
        keepFiles: { dir: work, memPath: join(work, "mem") },
      });
      try {
        await this.warm(vm.agent);
        this.log.info(
          { template: key, ms: Math.round(performance.now() - started) },
          "building template: warm, saving its state",
        );
        await saveDeviceState(
          vm.qemu.qmp,
          join(work, "state"),
          join(work, "migrate.sock"),
          30_000,
          vm.jail.creds,
        );
      } finally {
        await vm.destroy(); // kills QEMU; the files stay, now frozen
      }
      // Everything is complete before one atomic rename, so a reader (or another
      // daemon's prune) never sees half a template. The clones' overlay names its backing
      // file by the final, absolute path (-u: that path does not exist yet).
      await createOverlay(join(work, "clone.qcow2"), join(final, "root.qcow2"), "qcow2");
      await writeFile(
        join(work, "meta.json"),
        `${JSON.stringify({ key, shape, image: this.image.key, qemu: this.qemu, accel: this.engine.opts.accel, builtAt: new Date().toISOString() })}\n`,
      );
      await rm(final, { recursive: true, force: true });
      await rename(work, final);
      this.builds++;
      this.onBuilt();
      this.log.info(
        { template: key, ms: Math.round(performance.now() - started) },
        "template ready",
      );
    } catch (err) {
      await rm(work, { recursive: true, force: true });
      await rm(final, { recursive: true, force: true });
      throw err;
    }
  }

  /**
   * File modes of a frozen template, owned by the daemon. When VMs run under uids of their
   * own, they must read its disk (the bottom of every clone's chain) by path: the
   * directories are traversable but not listable (0711) and the disk read-only for all.
   * Memory and device state stay the daemon's alone (clones get them as fds).
   */
  private async exposeTemplate(key: string): Promise<void> {
    const open = this.engine.uids !== null;
    const dir = join(this.dir, key);
    await chmod(this.dir, open ? 0o711 : 0o700);
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

  private async warm(agent: AgentClient): Promise<void> {
    for (const [code, language] of [
      [WARM_UP_PYTHON, "python"],
      ["true", "bash"],
    ] as const) {
      for await (const event of agent.exec(code, { language, timeoutMs: 120_000 })) {
        if (event.type === "exit" && event.code !== 0)
          throw new Error(`template warm-up (${language}) failed with code ${event.code}`);
      }
    }
  }

  /**
   * Remove templates of another image, QEMU or accelerator. Running clones keep their
   * mappings and open files, so this is safe at any time; only new restores need them.
   */
  private async prune(): Promise<void> {
    for (const entry of await readdir(this.dir).catch(() => [] as string[])) {
      if (entry.startsWith(".")) continue;
      const meta = await readFile(join(this.dir, entry, "meta.json"), "utf8").catch(() => null);
      let stale = meta === null;
      if (meta) {
        const m = JSON.parse(meta) as { image?: string; qemu?: string; accel?: string };
        stale =
          m.image !== this.image.key || m.qemu !== this.qemu || m.accel !== this.engine.opts.accel;
      }
      if (stale && !this.building.has(entry))
        await rm(join(this.dir, entry), { recursive: true, force: true });
    }
  }
}
