/**
 * Wiring of podflared: configuration -> image -> accelerator -> engine -> store ->
 * reconciliation -> service -> HTTP. Each part is built here and nowhere else; this is
 * the one module outside vm/qemu/ that imports it (the rest knows vm/backend.ts).
 */

import { join } from "node:path";
import { buildServer } from "./api/server.js";
import { Authenticator, isLoopback } from "./auth/authenticator.js";
import { KeyStore } from "./auth/keys.js";
import type { Config } from "./config/config.js";
import { ensureImage, type GuestImage } from "./image/build.js";
import { Metrics } from "./metrics/metrics.js";
import { TemplateManager } from "./pool/templates.js";
import { WarmPool } from "./pool/warm-pool.js";
import { Admission } from "./sandboxes/admission.js";
import { DiskGuard } from "./sandboxes/disk-guard.js";
import { reconcile } from "./sandboxes/reconcile.js";
import { SandboxService } from "./sandboxes/service.js";
import { StreamBudget } from "./sandboxes/stream-budget.js";
import { Store } from "./store/db.js";
import { DEFAULT_TEMPLATE, TEMPLATES } from "./templates/registry.js";
import { armCrashPoint } from "./util/crash-points.js";
import type { Logger } from "./util/logger.js";
import { ensureSafeDir } from "./util/safe-dir.js";
import { type AccelDecision, chooseAccel, hostProbe, hostTscKhz } from "./vm/qemu/accel.js";
import { QemuBackend, qemuVersion } from "./vm/qemu/backend.js";
import { VmEngine } from "./vm/qemu/engine.js";

export interface Daemon {
  url: string;
  accel: AccelDecision;
  service: SandboxService;
  engine: VmEngine;
  backend: QemuBackend;
  pool: WarmPool;
  templates: TemplateManager;
  metrics: Metrics;
  close(): Promise<void>;
}

export async function prepareEngine(
  config: Config,
  log: Logger,
): Promise<{ engine: VmEngine; accel: AccelDecision }> {
  ensureStateDir(config);
  const image = await ensureImage({ imagesDir: config.imagesDir, guestDir: config.guestDir }, (m) =>
    log.info({ image: true }, m),
  );
  const base = {
    paths: config.paths,
    hostPython: config.hostPython,
    qemuBinary: config.qemuBinary,
    consoleLogMaxBytes: config.consoleLogMaxBytes,
    bootTimeoutMs: config.bootTimeoutMs,
    image,
    tscKhz: await hostTscKhz(),
    log,
    vmUidBase: config.vmUidBase,
    vmUidCount: config.vmUidCount,
    vmCgroups: config.vmCgroups,
    vmMemOverheadMib: config.vmMemOverheadMib,
  };
  const probeEngine = new VmEngine({ ...base, accel: "kvm" });
  const accel = await chooseAccel(
    config.accel,
    hostProbe(async () => {
      try {
        const vm = await probeEngine.boot(
          "probe_kvm",
          { vcpuCount: 1, memSizeMib: 256 },
          { accel: "kvm", timeoutMs: 20_000 },
        );
        await vm.destroy();
        return true;
      } catch {
        return false;
      }
    }),
  );
  log.info({ accel: accel.accel, reason: accel.reason }, "accelerator chosen");
  return { engine: new VmEngine({ ...base, accel: accel.accel }), accel };
}

/**
 * The state directory, the daemon's own (util/safe-dir.ts): 0711 when VMs run under uids
 * of their own (they reach their disks below it by path, as the engine's directories),
 * else 0700.
 */
function ensureStateDir(config: Config): void {
  ensureSafeDir(config.stateDir, daemonDirMode(config), "the state directory (PODFLARE_STATE_DIR)");
}

/** The mode of the daemon's directories for this configuration (the engine's `dirMode`). */
export function daemonDirMode(config: Pick<Config, "vmUidBase">): number {
  return process.getuid?.() === 0 && (config.vmUidBase ?? 0) > 0 ? 0o711 : 0o700;
}

/** The guest image of every template in the registry (the default's is the engine's). */
async function templateImages(
  config: Config,
  defaultImage: GuestImage,
  log: Logger,
): Promise<(template: string) => GuestImage> {
  const images = new Map([[DEFAULT_TEMPLATE, defaultImage]]);
  for (const { name } of TEMPLATES) {
    if (images.has(name)) continue;
    const opts = { imagesDir: config.imagesDir, guestDir: config.guestDir, template: name };
    images.set(name, await ensureImage(opts, (m) => log.info({ image: name }, m)));
  }
  return (template) => {
    const image = images.get(template);
    if (!image) throw new Error(`no guest image for template ${JSON.stringify(template)}`);
    return image;
  };
}

/** Opens the database; refuses to expose an unauthenticated API beyond this host. */
function openStore(config: Config): { store: Store; auth: Authenticator } {
  const store = new Store(config.paths.database);
  const auth = new Authenticator(new KeyStore(store.db), config.apiKeys);
  if (!isLoopback(config.host) && !auth.required() && !config.allowUnauthenticated) {
    store.close();
    throw new Error(
      `refusing to listen on ${config.host} without API keys: anyone who can reach it could run code here. ` +
        "Create a key first (podflare keys create --name <name>), or set PODFLARE_ALLOW_UNAUTHENTICATED=1 if the network is trusted.",
    );
  }
  return { store, auth };
}

export async function startDaemon(config: Config, log: Logger): Promise<Daemon> {
  // Nothing the daemon creates is for anyone else unless it says so: the database, its
  // -wal and -shm, the log (when it is a file), sockets, VM files. What VM uids must read
  // (directories they pass, template disks, the image) gets its mode explicitly.
  process.umask(0o077);
  armCrashPoint(config.crashAt);
  ensureStateDir(config);
  const { store, auth } = openStore(config);
  let engine: VmEngine;
  let accel: AccelDecision;
  try {
    ({ engine, accel } = await prepareEngine(config, log));
    // Refuse to start over a planted or foreign shm or templates directory.
    engine.makeDir(config.shmDir, "the shm directory (PODFLARE_SHM_DIR)");
    engine.makeDir(config.templatesDir, "the templates directory (PODFLARE_TEMPLATES_DIR)");
  } catch (err) {
    store.close();
    throw err;
  }
  const backend = new QemuBackend(engine, await qemuVersion(config.qemuBinary));
  await reconcile(store, backend, log);
  const metrics = new Metrics();
  const admission = new Admission({
    maxSandboxes: config.maxSandboxes,
    memoryBudgetMib: config.memoryBudgetMib,
    vmOverheadMib: backend.memOverheadMib,
    tenantMaxSandboxes: config.tenantMaxSandboxes,
    tenantMaxMemMib: config.tenantMaxMemMib,
  });
  const templates = new TemplateManager(
    backend,
    config.templatesDir,
    await templateImages(config, engine.opts.image, log),
    log,
    () => metrics.templateBuilds.inc(),
    {
      maxTemplates: config.maxTemplates,
      tenantMaxBuilds: config.tenantMaxTemplateBuilds,
      admission,
      onEvicted: () => metrics.templateEvictions.inc(),
    },
  );
  metrics.holds = () => ({
    templates: templates.stats().count,
    templatesMib:
      admission.heldMib({ kind: "template" }) + admission.heldMib({ kind: "template_build" }),
    forksMib: admission.heldMib({ kind: "fork" }),
  });
  metrics.forkLayers = () => backend.forkLayers();
  const pool = new WarmPool(
    backend,
    templates,
    admission,
    {
      target: config.poolSize,
      maxConcurrentRestores: config.maxConcurrentRestores,
      maxDiskChain: config.maxDiskChain,
      defaultShape: { vcpuCount: config.defaultVcpuCount, memSizeMib: config.defaultMemSizeMib },
    },
    metrics,
    log,
  );
  await pool.start();
  const disk = new DiskGuard(config.stateDir, config.minFreeDiskMib, log);
  const streams = new StreamBudget(
    {
      streamMaxBufferedBytes: config.streamMaxBufferedBytes,
      tenantMaxStreams: config.tenantMaxStreams,
      tenantMaxBufferedBytes: config.tenantStreamBufferMib * 2 ** 20,
      maxStreams: config.maxStreams,
      maxBufferedBytes: config.streamBufferMib * 2 ** 20,
    },
    {
      onUsage: (u) => {
        metrics.streamsOpen.set(u.streams);
        metrics.streamBufferedBytes.set(u.bytes);
      },
      onRefused: (bound) => metrics.streamsRefused.inc({ bound }),
      onTruncated: (bound) => metrics.streamsTruncated.inc({ bound }),
      onDropped: (bytes) => metrics.streamDroppedBytes.inc(bytes),
      onClosed: (kind, peak) => {
        if (kind === "exec") metrics.streamPeakBytes.observe(peak);
      },
    },
  );
  const service = new SandboxService(store, pool, config, admission, log, metrics, disk, streams);
  const app = buildServer({
    service,
    auth,
    log,
    hostRule: { bindHost: config.host, allowedHosts: config.allowedHosts },
    http: {
      headersTimeoutMs: config.httpHeadersTimeoutMs,
      requestTimeoutMs: config.httpRequestTimeoutMs,
      bodyIdleTimeoutMs: config.httpBodyIdleTimeoutMs,
      keepAliveTimeoutMs: config.httpKeepAliveTimeoutMs,
      maxConnections: config.httpMaxConnections,
      streamHeartbeatMs: config.httpStreamHeartbeatMs,
    },
    metrics: () => metrics.render(),
    capacity: async (caller) => {
      const diskFreeMib = await disk.freeMib().catch(() => null);
      const layers = await backend.forkLayers();
      const host = admission.usage();
      const mine = admission.usage(caller?.id ?? null);
      const streamsHost = streams.usage();
      const streamsMine = streams.usage(caller?.id ?? null);
      return {
        accelerator: accel.accel,
        accelerator_reason: accel.reason,
        running: service.liveCount,
        pool: pool.stats(),
        disk: {
          free_mib: diskFreeMib,
          min_free_mib: config.minFreeDiskMib,
          paused_sandboxes: disk.pausedCount,
          fork_layers: layers.count,
          fork_layers_mib: Math.ceil(layers.bytes / 2 ** 20),
        },
        memory: {
          budget_mib: config.memoryBudgetMib,
          sandboxes_mib: host.chargedMib,
          pool_mib: pool.chargedMib(),
          templates_mib:
            admission.heldMib({ kind: "template" }) + admission.heldMib({ kind: "template_build" }),
          forks_mib: admission.heldMib({ kind: "fork" }),
          vm_overhead_mib: backend.memOverheadMib,
        },
        templates: {
          count: templates.stats().count,
          in_use: templates.stats().inUse,
          max: templates.maxTemplates,
        },
        tenant: {
          sandboxes: mine.sandboxes,
          mem_mib: mine.memMib,
          forks_mib: admission.heldMib({ owner: caller?.id ?? null, kind: "fork" }),
          max_sandboxes: caller?.quota.maxSandboxes ?? config.tenantMaxSandboxes,
          max_mem_mib: caller?.quota.maxMemMib ?? config.tenantMaxMemMib,
          streams: streamsMine.streams,
          stream_buffered_bytes: streamsMine.bytes,
          max_streams: config.tenantMaxStreams,
          max_stream_buffered_bytes: config.tenantStreamBufferMib * 2 ** 20,
        },
        streams: {
          open: streamsHost.streams,
          buffered_bytes: streamsHost.bytes,
          max_streams: config.maxStreams,
          max_buffered_bytes: config.streamBufferMib * 2 ** 20,
          stream_max_buffered_bytes: config.streamMaxBufferedBytes,
        },
        limits: {
          max_sandboxes: config.maxSandboxes,
          max_vcpu_count: config.maxVcpuCount,
          max_mem_size_mib: config.maxMemSizeMib,
          max_upload_bytes: config.maxUploadBytes,
        },
      };
    },
  });
  const address = await app.listen({ host: config.host, port: config.port });
  log.info({ address, accel: accel.accel, pool: config.poolSize }, "podflared listening");
  let closing: Promise<void> | null = null;
  return {
    url: address,
    accel,
    service,
    engine,
    backend,
    pool,
    templates,
    metrics,
    close: () => {
      closing ??= (async () => {
        await app.close();
        await pool.close();
        await templates.close(); // waits for builds in flight, then drops this daemon's leases
        await service.destroyAll("the daemon stopped");
        await (await engine.cgroups())?.close();
        disk.close();
        store.close();
      })();
      return closing;
    },
  };
}
