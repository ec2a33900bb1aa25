/**
 * Templates: a VM booted once, warmed (interpreter started, common modules imported),
 * and frozen as a memory file plus device state. Every sandbox of that shape is a restore
 * of it. A template is keyed by everything a snapshot depends on (image, the backend's
 * version and accelerator, shape) and built at most once per key: concurrent callers in this process
 * share one build, other processes wait on a lock file.
 *
 * Templates are bounded (shapes are the callers' choice): at most `maxTemplates` exist for
 * this daemon, each charged to the memory budget from its build on (template-cache.ts says
 * how much), and a build holds the budget of its VM too. A new shape past the cap evicts
 * the least recently used template that nothing uses (no restore, build or live VM of this
 * daemon; the pool's shape is pinned); when every one is in use the create gets a 503.
 * One tenant builds at most `tenantMaxBuilds` templates at a time (429 past it).
 *
 * Several daemons may share the directory (tests do). Each keeps a lease file
 * (`.users-<key>-<pid>`) on every template it holds, made and checked under the key's
 * lock: eviction deletes a template only when no other live process holds a lease on it
 * (otherwise it only drops its own lease and charge). The cap and the charges are this
 * daemon's: they count the templates it holds.
 */
import { createHash } from "node:crypto";
import { existsSync, rmSync } from "node:fs";
import { access, readdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { AgentClient } from "../guest/agent-client.js";
import type { GuestImage } from "../image/build.js";
import type { Admission } from "../sandboxes/admission.js";
import { NoCapacityError, OverLimitError } from "../sandboxes/errors.js";
import { DEFAULT_TEMPLATE, templateSpec } from "../templates/registry.js";
import { alive, withFileLock } from "../util/lock.js";
import type { Logger } from "../util/logger.js";
import type { Accel, VmBackend, VmShape, VmTemplate } from "../vm/backend.js";
import {
  type CachedTemplate,
  evictable,
  evictionChoice,
  templateBoundMib,
  templateChargeMib,
} from "./template-cache.js";

/** Bump when the warm-up or the template layout changes. */
export const TEMPLATE_VERSION = 3;

/** Run in the REPL of the template: it must leave no names in the user's globals. */
function warmUpPython(modules: readonly string[]): string {
  return `for _podflare_m in ${JSON.stringify(modules)}:
    __import__(_podflare_m)
del _podflare_m
print("podflare: template warm")`;
}

export interface TemplateKeyInput {
  /** A template other than the default (whose keys predate named templates: none). */
  template?: string;
  imageKey: string;
  /** The backend's version (named for QEMU, the first backend: keys stay as they were). */
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

const exists = (path: string) =>
  access(path).then(
    () => true,
    () => false,
  );

export interface TemplateLimits {
  /** Templates this daemon holds at once (default 4). */
  maxTemplates?: number;
  /** Template builds one tenant may have running at once (default 1). */
  tenantMaxBuilds?: number;
  /** Charges templates and their builds to the host's memory budget. */
  admission?: Admission;
  onEvicted?: () => void;
}

/** A template in use: give it back with `release` once the VM made from it is gone. */
export interface TemplateLease {
  files: VmTemplate;
  release(): void;
}

interface Entry extends CachedTemplate {
  shape: VmShape;
  /** MiB charged to the budget for its memory. */
  chargeMib: number;
}

export class TemplateManager {
  private readonly building = new Map<string, Promise<VmTemplate>>();
  private readonly entries = new Map<string, Entry>();
  private readonly buildsByOwner = new Map<string, number>();
  private readonly evicting = new Set<Promise<void>>();
  builds = 0;
  evictions = 0;
  /** Runs a template build in one of the restore slots (the warm pool sets it). */
  buildSlot: <T>(build: () => Promise<T>) => Promise<T> = (build) => build();

  constructor(
    private readonly backend: VmBackend,
    private readonly dir: string,
    /** The guest image of each template (templates/registry.ts), by name. */
    private readonly images: (template: string) => GuestImage,
    private readonly log: Logger,
    private readonly onBuilt: () => void = () => {},
    private readonly limits: TemplateLimits = {},
  ) {
    limits.admission?.attachReclaimer((mib) => this.reclaim(mib));
  }

  get maxTemplates(): number {
    return Math.max(1, this.limits.maxTemplates ?? 4);
  }

  keyOf(shape: VmShape, template = DEFAULT_TEMPLATE): string {
    return templateKey({
      ...(template === DEFAULT_TEMPLATE ? {} : { template }),
      imageKey: this.images(template).key,
      qemuVersion: this.backend.identity.version,
      accel: this.backend.identity.accel,
      shape,
    });
  }

  filesOf(key: string, shape: VmShape): VmTemplate {
    return this.backend.template(join(this.dir, key), key, shape);
  }

  /** Templates held, in use, and the MiB they are charged (capacity and metrics). */
  stats(): { count: number; inUse: number; max: number; chargedMib: number } {
    let inUse = 0;
    let chargedMib = 0;
    for (const e of this.entries.values()) {
      if (!evictable(e)) inUse++; // used, being built, or pinned
      chargedMib += e.chargeMib;
    }
    return { count: this.entries.size, inUse, max: this.maxTemplates, chargedMib };
  }

  /** The template of this name and shape, built first if needed (at most once per key). */
  ensure(
    shape: VmShape,
    owner: string | null = null,
    template = DEFAULT_TEMPLATE,
  ): Promise<VmTemplate> {
    const key = this.keyOf(shape, template);
    let pending = this.building.get(key);
    const known = this.entries.get(key);
    // Held already (our lease keeps other daemons from deleting it): nothing to load.
    if (!pending && known && existsSync(join(this.dir, key, "meta.json"))) {
      known.lastUsed = Date.now();
      return Promise.resolve(this.filesOf(key, shape));
    }
    if (!pending) {
      const building = !existsSync(join(this.dir, key, "meta.json"));
      if (building) this.checkTenantBuilds(owner); // before anything is evicted for it
      const entry = known ?? this.admitNew(key, shape);
      entry.loading = true;
      const release = building ? this.startBuild(key, shape, owner) : () => {};
      // A build boots a VM: it waits for one of the restore slots (set by the warm pool).
      const load = () => this.load(key, shape, template);
      const loaded = building ? this.buildSlot(load) : load();
      pending = loaded
        .then(async (files) => {
          await this.measure(entry, files);
          return files;
        })
        .catch((err) => {
          this.forget(key); // a failed load leaves neither a charge nor a lease
          throw err;
        })
        .finally(() => {
          release();
          entry.loading = false;
          entry.lastUsed = Date.now();
          this.building.delete(key);
        });
      this.building.set(key, pending);
    }
    return pending;
  }

  /** Keep this template whatever happens (the pool's own). */
  async pin(shape: VmShape, template = DEFAULT_TEMPLATE): Promise<VmTemplate> {
    const files = await this.ensure(shape, null, template);
    const entry = this.entries.get(files.key);
    if (entry) entry.pinned = true;
    return files;
  }

  /**
   * The template for this shape, marked in use until `release` (a restore and the VM it
   * makes). Throws 503 when the cap is met and every template is in use, or the budget
   * cannot take a new one; 429 when `owner` has too many builds running.
   */
  async acquire(
    shape: VmShape,
    owner: string | null = null,
    template = DEFAULT_TEMPLATE,
  ): Promise<TemplateLease> {
    const key = this.keyOf(shape, template);
    const entry = this.entries.get(key);
    if (entry) entry.users++;
    let files: VmTemplate;
    try {
      files = await this.ensure(shape, owner, template);
    } catch (err) {
      if (entry) entry.users--;
      throw err;
    }
    const held = entry ?? this.entries.get(key);
    if (!held) throw new Error(`template ${key} vanished while it was acquired`);
    if (!entry) held.users++;
    return { files, release: this.releaser(held) };
  }

  /**
   * Evict unused templates, least recently used first, until about `mib` of their charge
   * is given back (the memory budget needs it for a sandbox or another template).
   */
  reclaim(mib: number): void {
    let freed = 0;
    while (freed < mib) {
      const victim = evictionChoice([...this.entries.values()], 0);
      if (victim === null || victim === "full") return;
      freed += this.entries.get(victim.key)?.chargeMib ?? 0;
      this.evict(victim.key, "the memory budget needs its room");
    }
  }

  /** Mark the template of a running VM in use until `release` (fork children). */
  retain(shape: VmShape, template = DEFAULT_TEMPLATE): () => void {
    const entry = this.entries.get(this.keyOf(shape, template));
    if (!entry) return () => {};
    entry.users++;
    return this.releaser(entry);
  }

  private releaser(entry: Entry): () => void {
    let done = false;
    return () => {
      if (done) return;
      done = true;
      entry.users--;
      entry.lastUsed = Date.now();
    };
  }

  /** Drop every lease this daemon holds (shutdown); the templates stay for the next run. */
  async close(): Promise<void> {
    // Builds in flight (a create's new shape) finish or fail before their files are left.
    await Promise.allSettled([...this.building.values()]);
    await Promise.all(this.evicting);
    for (const key of [...this.entries.keys()]) this.forget(key);
  }

  /** Room for one more template: the cap (evicting one unused) and the budget. */
  private admitNew(key: string, shape: VmShape): Entry {
    const choice = evictionChoice([...this.entries.values()], this.maxTemplates);
    if (choice === "full") {
      throw new NoCapacityError(
        `this host keeps at most ${this.maxTemplates} VM templates (one per shape: vcpu_count, mem_size_mib) and all are in use; use a shape already running (the default: omit vcpu_count and mem_size_mib) or retry when sandboxes of other shapes end`,
      );
    }
    if (choice) this.evict(choice.key, "the template cap is met");
    const sealed = this.backend.sealedTemplateMemory;
    const chargeMib = templateBoundMib(shape, sealed);
    this.limits.admission?.hold(`template:${key}`, "template", chargeMib);
    const entry: Entry = {
      key,
      shape,
      users: 0,
      loading: true,
      pinned: false,
      lastUsed: Date.now(),
      chargeMib,
    };
    this.entries.set(key, entry);
    return entry;
  }

  /** 429 when `owner` runs as many template builds as it may. */
  private checkTenantBuilds(owner: string | null): void {
    const max = Math.max(1, this.limits.tenantMaxBuilds ?? 1);
    const running = this.buildsByOwner.get(owner ?? "") ?? 0;
    if (running >= max) {
      throw new OverLimitError(
        `your key is building ${running} VM template(s) for new shapes already (at most ${max} at once); wait for it to finish, or use a shape in use already (the default: omit vcpu_count and mem_size_mib)`,
      );
    }
  }

  /** The tenant's build count and the building VM's memory; returns their release. */
  private startBuild(key: string, shape: VmShape, owner: string | null): () => void {
    const ownerKey = owner ?? "";
    const running = this.buildsByOwner.get(ownerKey) ?? 0;
    const admission = this.limits.admission;
    try {
      admission?.hold(`template_build:${key}`, "template_build", admission.chargeMib(shape));
    } catch (err) {
      this.forget(key);
      throw err;
    }
    this.buildsByOwner.set(ownerKey, running + 1);
    return () => {
      admission?.unhold(`template_build:${key}`);
      const n = (this.buildsByOwner.get(ownerKey) ?? 1) - 1;
      if (n > 0) this.buildsByOwner.set(ownerKey, n);
      else this.buildsByOwner.delete(ownerKey);
    };
  }

  /** Charge a loaded template what its memory file really holds (template-cache.ts). */
  private async measure(entry: Entry, files: VmTemplate): Promise<void> {
    const residentMib = (await this.backend.templateResidentMib(files)) ?? entry.shape.memSizeMib;
    const charge = templateChargeMib(entry.shape, residentMib, this.backend.sealedTemplateMemory);
    if (!this.entries.has(entry.key)) return;
    entry.chargeMib = charge;
    // Smaller than (or equal to) the bound held so far: this never fails for the budget.
    this.limits.admission?.unhold(`template:${entry.key}`);
    this.limits.admission?.hold(`template:${entry.key}`, "template", charge);
  }

  /** Forget a template at once (charge, cap) and delete its files unless another process holds it. */
  private evict(key: string, why: string): void {
    this.evictions++;
    this.limits.onEvicted?.();
    this.log.info({ template: key, why }, "evicting the least recently used unused template");
    this.forget(key, false);
    const done = withFileLock(join(this.dir, `.lock-${key}`), async () => {
      await rm(this.leasePath(key), { force: true });
      if (await this.heldElsewhere(key)) return;
      const doomed = join(this.dir, `.evict-${key}-${process.pid}`);
      // Renamed first: a reader never sees a half-deleted template.
      await rename(join(this.dir, key), doomed).catch(() => {});
      await rm(doomed, { recursive: true, force: true });
    })
      .catch((err) =>
        this.log.error({ template: key, err: String(err) }, "template eviction failed"),
      )
      .finally(() => this.evicting.delete(done));
    this.evicting.add(done);
  }

  private forget(key: string, dropLease = true): void {
    this.entries.delete(key);
    this.limits.admission?.unhold(`template:${key}`);
    if (dropLease) rmSync(this.leasePath(key), { force: true });
  }

  private leasePath(key: string, pid = process.pid): string {
    return join(this.dir, `.users-${key}-${pid}`);
  }

  /** Whether another live process holds a lease on this template. */
  private async heldElsewhere(key: string): Promise<boolean> {
    const prefix = `.users-${key}-`;
    for (const entry of await readdir(this.dir).catch(() => [] as string[])) {
      if (!entry.startsWith(prefix)) continue;
      const pid = Number(entry.slice(prefix.length));
      if (!Number.isSafeInteger(pid) || pid === process.pid) continue;
      if (alive(pid)) return true;
      await rm(join(this.dir, entry), { force: true }); // its holder is gone
    }
    return false;
  }

  private async load(key: string, shape: VmShape, template: string): Promise<VmTemplate> {
    await Promise.all(this.evicting); // an eviction of this key finishes before it is rebuilt
    const files = this.filesOf(key, shape);
    const ready = join(this.dir, key, "meta.json");
    // Checked before anything in it is trusted (util/safe-dir.ts): a template planted in a
    // directory someone else made would hand every clone their memory and device state.
    // VMs under their own uids (the template's own, while it is built) pass through it.
    this.backend.makeDir(this.dir, "the templates directory (PODFLARE_TEMPLATES_DIR)");
    return withFileLock(join(this.dir, `.lock-${key}`), async () => {
      // The lease first, under the lock: another daemon's eviction sees it and keeps the files.
      await writeFile(this.leasePath(key), "", { mode: 0o600 });
      if (!(await exists(ready))) {
        await this.build(key, shape, template);
        await this.prune();
      }
      await this.backend.exposeTemplate(join(this.dir, key));
      return files;
    });
  }

  private async build(key: string, shape: VmShape, template: string): Promise<void> {
    const spec = templateSpec(template);
    const image = this.images(template);
    const started = performance.now();
    const final = join(this.dir, key);
    const work = join(this.dir, `.build-${key}-${process.pid}`);
    this.log.info(
      { template: key, name: template, shape, accel: this.backend.identity.accel },
      "building template: booting its VM",
    );
    await rm(work, { recursive: true, force: true });
    try {
      await this.backend.snapshot(`tpl_${key}`, shape, image, work, final, async (agent) => {
        await this.warm(agent, spec.warmModules);
        this.log.info(
          { template: key, ms: Math.round(performance.now() - started) },
          "building template: warm, saving its state",
        );
      });
      // Everything is complete before one atomic rename, so a reader (or another
      // daemon's prune) never sees half a template.
      const { version, accel } = this.backend.identity;
      await writeFile(
        join(work, "meta.json"),
        `${JSON.stringify({ key, ...(template === DEFAULT_TEMPLATE ? {} : { template }), shape, image: image.key, qemu: version, accel, builtAt: new Date().toISOString() })}\n`,
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

  private async warm(agent: AgentClient, modules: readonly string[]): Promise<void> {
    for (const [code, language] of [
      [warmUpPython(modules), "python"],
      ["true", "bash"],
    ] as const) {
      for await (const event of agent.exec(code, { language, timeoutMs: 120_000 })) {
        if (event.type === "exit" && event.code !== 0)
          throw new Error(`template warm-up (${language}) failed with code ${event.code}`);
      }
    }
  }

  /** The image key of a template, or null for a name the registry no longer has. */
  private imageKeyOf(template: string): string | null {
    try {
      return this.images(template).key;
    } catch {
      return null;
    }
  }

  /**
   * Remove templates of another image, backend version or accelerator, unless another live process
   * holds a lease on one (it may be about to restore from it). Running clones keep their
   * mappings and open files, so this is safe at any time; only new restores need them.
   */
  private async prune(): Promise<void> {
    for (const entry of await readdir(this.dir).catch(() => [] as string[])) {
      // Left by a process that died mid-way: a build's or an eviction's files, a lease.
      const leftover = /^\.(?:build|evict|users)-[0-9a-f]{16}-(\d+)$/.exec(entry);
      if (leftover) {
        if (!alive(Number(leftover[1])))
          await rm(join(this.dir, entry), { recursive: true, force: true });
        continue;
      }
      if (entry.startsWith(".")) continue;
      const meta = await readFile(join(this.dir, entry, "meta.json"), "utf8").catch(() => null);
      let stale = meta === null;
      if (meta) {
        const m = JSON.parse(meta) as {
          template?: string;
          image?: string;
          qemu?: string;
          accel?: string;
        };
        stale =
          m.image !== this.imageKeyOf(m.template ?? DEFAULT_TEMPLATE) ||
          m.qemu !== this.backend.identity.version ||
          m.accel !== this.backend.identity.accel;
      }
      if (stale && !this.building.has(entry) && !(await this.heldElsewhere(entry)))
        await rm(join(this.dir, entry), { recursive: true, force: true });
    }
  }
}
