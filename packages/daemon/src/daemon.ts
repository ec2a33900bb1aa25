/**
 * Wiring of podflared: configuration -> image -> accelerator -> engine -> store ->
 * reconciliation -> service -> HTTP. Each part is built here and nowhere else.
 */
import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { buildServer } from "./api/server.js";
import type { Config } from "./config/config.js";
import { ensureImage } from "./image/build.js";
import { Metrics } from "./metrics/metrics.js";
import { qemuVersion, TemplateManager } from "./pool/templates.js";
import { WarmPool } from "./pool/warm-pool.js";
import { reconcile } from "./sandboxes/reconcile.js";
import { SandboxService } from "./sandboxes/service.js";
import { Store } from "./store/db.js";
import type { Logger } from "./util/logger.js";
import { type AccelDecision, chooseAccel, hostProbe, hostTscKhz } from "./vm/accel.js";
import { VmEngine } from "./vm/engine.js";

export interface Daemon {
  url: string;
  accel: AccelDecision;
  service: SandboxService;
  engine: VmEngine;
  pool: WarmPool;
  templates: TemplateManager;
  metrics: Metrics;
  close(): Promise<void>;
}

export async function prepareEngine(
  config: Config,
  log: Logger,
): Promise<{ engine: VmEngine; accel: AccelDecision }> {
  await mkdir(config.stateDir, { recursive: true, mode: 0o700 });
  const image = await ensureImage({ imagesDir: config.imagesDir, guestDir: config.guestDir }, (m) =>
    log.info({ image: true }, m),
  );
  const base = {
    stateDir: config.stateDir,
    shmDir: config.shmDir,
    qemuBinary: config.qemuBinary,
    consoleLogMaxBytes: config.consoleLogMaxBytes,
    bootTimeoutMs: config.bootTimeoutMs,
    image,
    tscKhz: await hostTscKhz(),
    log,
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

export async function startDaemon(config: Config, log: Logger): Promise<Daemon> {
  const { engine, accel } = await prepareEngine(config, log);
  const store = new Store(join(config.stateDir, "podflare.db"));
  await reconcile(
    store,
    {
      vmsDir: engine.vmsDir,
      vmMemDir: engine.vmMemDir,
      layersDir: engine.layers.dir,
      forksDir: engine.forksDir,
    },
    log,
  );
  const metrics = new Metrics();
  const templates = new TemplateManager(
    engine,
    config.templatesDir,
    engine.opts.image,
    await qemuVersion(config.qemuBinary),
    log,
    () => metrics.templateBuilds.inc(),
  );
  const pool = new WarmPool(
    engine,
    templates,
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
  const service = new SandboxService(store, pool, config, log, metrics);
  const app = buildServer({
    service,
    apiKeys: config.apiKeys,
    log,
    metrics: () => metrics.render(),
    capacity: () => ({
      accelerator: accel.accel,
      accelerator_reason: accel.reason,
      running: service.liveCount,
      pool: pool.stats(),
      limits: {
        max_sandboxes: config.maxSandboxes,
        max_vcpu_count: config.maxVcpuCount,
        max_mem_size_mib: config.maxMemSizeMib,
        max_upload_bytes: config.maxUploadBytes,
      },
    }),
  });
  const address = await app.listen({ host: config.host, port: config.port });
  log.info({ address, accel: accel.accel, pool: config.poolSize }, "podflared listening");
  let closing: Promise<void> | null = null;
  return {
    url: address,
    accel,
    service,
    engine,
    pool,
    templates,
    metrics,
    close: () => {
      closing ??= (async () => {
        await app.close();
        await pool.close();
        await service.destroyAll("the daemon stopped");
        store.close();
      })();
      return closing;
    },
  };
}
