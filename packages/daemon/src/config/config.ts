/**
 * Daemon configuration, resolved once into a frozen object:
 * explicit option > PODFLARE_* environment variable > default.
 */
import { existsSync } from "node:fs";
import { availableParallelism, homedir, totalmem } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { defaultPoolSize } from "../pool/plan.js";
import { defaultTemplate } from "../templates/default.js";
import { CRASH_POINTS, type CrashPoint } from "../util/crash-points.js";
import { type DaemonPaths, resolvePaths } from "./paths.js";

/**
 * The default of PODFLARE_VM_MEM_OVERHEAD_MIB: what a VM of the QEMU backend costs beyond
 * guest RAM (vm/qemu/sizing.ts derives it; its unit test checks the two agree).
 */
export const DEFAULT_VM_MEM_OVERHEAD_MIB = 256;

export type AccelChoice = "auto" | "kvm" | "tcg";

export interface Config {
  /** Built images, database, VM working directories. */
  readonly stateDir: string;
  /** Built guest images, shareable between daemons (and test runs): cached by content hash. */
  readonly imagesDir: string;
  /** Guest memory files (must be on a tmpfs for speed). */
  readonly shmDir: string;
  /** Template snapshots (memory files: on a tmpfs too); shareable between daemons. */
  readonly templatesDir: string;
  /** Warm VMs of the default shape kept ready. */
  readonly poolSize: number;
  /** Restores running at once (misses first, then pool refills). */
  readonly maxConcurrentRestores: number;
  /** Disk layers a VM may stack up through forks before they are merged into one. */
  readonly maxDiskChain: number;
  /** The repository's guest/ folder: the image recipe and the agent. */
  readonly guestDir: string;
  readonly qemuBinary: string;
  /**
   * When the daemon runs as root, each VM's QEMU runs as a uid (and gid) of its own from
   * [vmUidBase, vmUidBase + vmUidCount); no account needs to exist. 0 turns it off.
   */
  readonly vmUidBase: number;
  readonly vmUidCount: number;
  /** Per-VM cgroup limits (memory, pids, CPU) where the host's cgroups are writable. */
  readonly vmCgroups: boolean;
  /** QEMU's memory allowed beyond guest RAM in a VM's cgroup (MiB; docs/hardening.md). */
  readonly vmMemOverheadMib: number;
  readonly accel: AccelChoice;
  readonly defaultVcpuCount: number;
  readonly defaultMemSizeMib: number;
  readonly maxVcpuCount: number;
  readonly maxMemSizeMib: number;
  /** Upper bound of a VM's console log; older output is dropped. */
  readonly consoleLogMaxBytes: number;
  readonly bootTimeoutMs: number;
  readonly host: string;
  readonly port: number;
  readonly apiKeys: readonly string[];
  readonly maxUploadBytes: number;
  readonly defaultSandboxTimeoutMs: number;
  readonly maxSandboxTimeoutMs: number;
  readonly maxSandboxes: number;
  /**
   * Host memory (MiB) sandboxes and the warm pool may hold, each VM charged its cgroup
   * memory limit (guest memory + vmMemOverheadMib).
   */
  readonly memoryBudgetMib: number;
  /** Per-key limits for keys that set none of their own. */
  readonly tenantMaxSandboxes: number;
  readonly tenantMaxMemMib: number;
  /** VM templates (one per shape) a daemon holds at once; unused ones go first. */
  readonly maxTemplates: number;
  /** Template builds (a new shape's cold boot) one tenant may have running at once. */
  readonly tenantMaxTemplateBuilds: number;
  /** Host disk (MiB) one sandbox may hold: its overlay plus the fork layers below it. */
  readonly maxDiskMib: number;
  /** Free space (MiB) under the state directory below which creates and forks get 503. */
  readonly minFreeDiskMib: number;
  /**
   * Bytes one exec stream may hold unread in the daemon (queued output plus the response's
   * buffers); past it the stream's further output is dropped and its exit says truncated.
   */
  readonly streamMaxBufferedBytes: number;
  /** Open streams (exec responses and downloads in progress) per key and per daemon. */
  readonly tenantMaxStreams: number;
  readonly maxStreams: number;
  /** Bytes (MiB) one key's open streams, and all streams, may hold unread at once. */
  readonly tenantStreamBufferMib: number;
  readonly streamBufferMib: number;
  /** Listen on a non-loopback address with no API key configured (refused otherwise). */
  readonly allowUnauthenticated: boolean;
  /** Names (besides loopback ones) a request's Host may carry while no key exists. */
  readonly allowedHosts: readonly string[];
  /** HTTP: receiving a request's headers (ms; slowloris). */
  readonly httpHeadersTimeoutMs: number;
  /** HTTP: receiving a whole request, body included (ms; 0: no limit). Not the response. */
  readonly httpRequestTimeoutMs: number;
  /** HTTP: a request body with no byte arriving while the daemon waits for one (ms; 0: off). */
  readonly httpBodyIdleTimeoutMs: number;
  /** HTTP: an idle keep-alive connection between requests (ms). */
  readonly httpKeepAliveTimeoutMs: number;
  /** HTTP: connections open at once (0: no cap). */
  readonly httpMaxConnections: number;
  /**
   * HTTP: an exec stream whose code prints nothing gets an empty line this often (ms; 0:
   * never), so no client or proxy cuts a quiet call; its headers leave at once regardless.
   */
  readonly httpStreamHeartbeatMs: number;
  readonly logLevel: string;
  /**
   * Host Python for the QEMU backend's fd helpers (PODFLARE_PYTHON; default Debian's
   * /usr/bin/python3, which setup installs: a version manager's shim on PATH costs about
   * 250 ms a start under load; else `python3` from PATH).
   */
  readonly hostPython: string;
  /** Fault tests only (PODFLARE_CRASH_AT): the crash point where the daemon kills itself. */
  readonly crashAt: CrashPoint | null;
  /** Every path, derived once from the directories above (config/paths.ts). */
  readonly paths: DaemonPaths;
}

const here = dirname(fileURLToPath(import.meta.url));
/** packages/daemon/dist/config -> repository root. */
export const repoRoot = resolve(here, "../../../..");

function envInt(name: string, fallback: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw === "") return fallback;
  const value = Number(raw);
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new Error(`${name}=${raw} is not a non-negative integer; unset it or fix its value`);
  }
  return value;
}

function envBool(name: string): boolean {
  const raw = (process.env[name] ?? "").toLowerCase();
  if (raw === "" || raw === "0" || raw === "false" || raw === "no") return false;
  if (raw === "1" || raw === "true" || raw === "yes") return true;
  throw new Error(`${name}=${raw} is not a boolean; use 1 or 0`);
}

/** The host's memory minus what the host itself keeps: 10%, at least 1 GiB. */
export function defaultMemoryBudgetMib(totalBytes = totalmem()): number {
  const totalMib = Math.floor(totalBytes / 2 ** 20);
  return Math.max(0, totalMib - Math.max(1024, Math.ceil(totalMib / 10)));
}

function envAccel(): AccelChoice {
  const raw = process.env.PODFLARE_ACCEL ?? "auto";
  if (raw === "auto" || raw === "kvm" || raw === "tcg") return raw;
  throw new Error(`PODFLARE_ACCEL=${raw} is not one of auto, kvm, tcg`);
}

function envCrashPoint(): CrashPoint | null {
  const raw = process.env.PODFLARE_CRASH_AT || null;
  if (raw === null || (CRASH_POINTS as readonly string[]).includes(raw))
    return raw as CrashPoint | null;
  throw new Error(`PODFLARE_CRASH_AT=${raw} is not one of ${CRASH_POINTS.join(", ")}`);
}

function defaultHostPython(): string {
  return existsSync("/usr/bin/python3") ? "/usr/bin/python3" : "python3";
}

function defaultStateDir(): string {
  if (process.getuid?.() === 0) return "/var/lib/podflare";
  return join(process.env.XDG_DATA_HOME ?? join(homedir(), ".local/share"), "podflare");
}

export function loadConfig(overrides: Partial<Omit<Config, "paths">> = {}): Config {
  const env = process.env;
  const stateDir = overrides.stateDir ?? (env.PODFLARE_STATE_DIR || defaultStateDir());
  const shmDir = overrides.shmDir ?? (env.PODFLARE_SHM_DIR || "/dev/shm/podflare");
  const maxSandboxes = overrides.maxSandboxes ?? envInt("PODFLARE_MAX_SANDBOXES", 64);
  const memoryBudgetMib =
    overrides.memoryBudgetMib ?? envInt("PODFLARE_MEMORY_BUDGET_MIB", defaultMemoryBudgetMib());
  const config: Omit<Config, "paths"> = {
    stateDir,
    imagesDir: env.PODFLARE_IMAGES_DIR || join(stateDir, "images"),
    shmDir,
    templatesDir: env.PODFLARE_TEMPLATES_DIR || join(shmDir, "templates"),
    poolSize: envInt("PODFLARE_POOL_SIZE", defaultPoolSize(availableParallelism())),
    maxDiskChain: Math.max(2, envInt("PODFLARE_MAX_DISK_CHAIN", 8)),
    maxConcurrentRestores: Math.max(
      1,
      envInt("PODFLARE_MAX_CONCURRENT_RESTORES", availableParallelism()),
    ),
    guestDir: env.PODFLARE_GUEST_DIR || join(repoRoot, "guest"),
    qemuBinary: env.PODFLARE_QEMU || "qemu-system-x86_64",
    vmUidBase: envInt("PODFLARE_VM_UID_BASE", 2_000_000_000),
    vmUidCount: Math.max(1, envInt("PODFLARE_VM_UID_COUNT", 65_536)),
    vmCgroups: env.PODFLARE_VM_CGROUPS !== "0",
    vmMemOverheadMib: envInt("PODFLARE_VM_MEM_OVERHEAD_MIB", DEFAULT_VM_MEM_OVERHEAD_MIB),
    accel: envAccel(),
    defaultVcpuCount: envInt("PODFLARE_VCPU_COUNT", defaultTemplate.defaultShape.vcpuCount),
    defaultMemSizeMib: envInt("PODFLARE_MEM_SIZE_MIB", defaultTemplate.defaultShape.memSizeMib),
    maxVcpuCount: envInt("PODFLARE_MAX_VCPU_COUNT", 4),
    maxMemSizeMib: envInt("PODFLARE_MAX_MEM_SIZE_MIB", 4096),
    consoleLogMaxBytes: envInt("PODFLARE_CONSOLE_LOG_MAX_BYTES", 256 * 1024),
    bootTimeoutMs: envInt("PODFLARE_BOOT_TIMEOUT_MS", 60_000),
    host: env.PODFLARE_BIND_HOST || "127.0.0.1",
    port: envInt("PODFLARE_PORT", 7070),
    apiKeys: (env.PODFLARE_API_KEYS ?? "")
      .split(",")
      .map((k) => k.trim())
      .filter(Boolean),
    maxUploadBytes: envInt("PODFLARE_MAX_UPLOAD_BYTES", 1024 * 1024 * 1024),
    defaultSandboxTimeoutMs: envInt("PODFLARE_SANDBOX_TIMEOUT_MS", 5 * 60_000),
    maxSandboxTimeoutMs: envInt("PODFLARE_MAX_SANDBOX_TIMEOUT_MS", 24 * 3600_000),
    maxSandboxes,
    memoryBudgetMib,
    tenantMaxSandboxes: envInt("PODFLARE_TENANT_MAX_SANDBOXES", maxSandboxes),
    tenantMaxMemMib: envInt("PODFLARE_TENANT_MAX_MEM_MIB", memoryBudgetMib),
    minFreeDiskMib: envInt("PODFLARE_MIN_FREE_DISK_MIB", 512),
    streamMaxBufferedBytes: Math.max(
      1024 * 1024,
      envInt("PODFLARE_STREAM_MAX_BUFFERED_BYTES", 4 * 1024 * 1024),
    ),
    tenantMaxStreams: envInt("PODFLARE_TENANT_MAX_STREAMS", 64),
    maxStreams: envInt("PODFLARE_MAX_STREAMS", 256),
    tenantStreamBufferMib: envInt("PODFLARE_TENANT_STREAM_BUFFER_MIB", 64),
    streamBufferMib: envInt("PODFLARE_STREAM_BUFFER_MIB", 256),
    maxTemplates: Math.max(1, envInt("PODFLARE_MAX_TEMPLATES", 4)),
    tenantMaxTemplateBuilds: Math.max(1, envInt("PODFLARE_TENANT_MAX_TEMPLATE_BUILDS", 1)),
    maxDiskMib: Math.max(1, envInt("PODFLARE_MAX_DISK_MIB", 4096)),
    allowUnauthenticated: envBool("PODFLARE_ALLOW_UNAUTHENTICATED"),
    allowedHosts: (env.PODFLARE_ALLOWED_HOSTS ?? "")
      .split(",")
      .map((h) => h.trim().toLowerCase())
      .filter(Boolean),
    httpHeadersTimeoutMs: envInt("PODFLARE_HTTP_HEADERS_TIMEOUT_MS", 20_000),
    httpRequestTimeoutMs: envInt("PODFLARE_HTTP_REQUEST_TIMEOUT_MS", 3_600_000),
    httpBodyIdleTimeoutMs: envInt("PODFLARE_HTTP_BODY_IDLE_TIMEOUT_MS", 60_000),
    httpKeepAliveTimeoutMs: envInt("PODFLARE_HTTP_KEEP_ALIVE_TIMEOUT_MS", 10_000),
    httpMaxConnections: envInt("PODFLARE_HTTP_MAX_CONNECTIONS", 1024),
    httpStreamHeartbeatMs: envInt("PODFLARE_HTTP_STREAM_HEARTBEAT_MS", 15_000),
    logLevel: env.PODFLARE_LOG_LEVEL || "info",
    hostPython: env.PODFLARE_PYTHON || defaultHostPython(),
    crashAt: envCrashPoint(),
    ...overrides,
  };
  if (
    config.httpRequestTimeoutMs > 0 &&
    config.httpHeadersTimeoutMs > config.httpRequestTimeoutMs
  ) {
    throw new Error(
      `PODFLARE_HTTP_HEADERS_TIMEOUT_MS (${config.httpHeadersTimeoutMs}) exceeds PODFLARE_HTTP_REQUEST_TIMEOUT_MS (${config.httpRequestTimeoutMs}); the headers are part of the request: lower the first or raise the second`,
    );
  }
  return Object.freeze({ ...config, paths: resolvePaths(config) });
}
