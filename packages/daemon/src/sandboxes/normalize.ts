/**
 * A request's fields checked against the host's limits and given their defaults, before
 * the service acts on them. Bounds shared with the HTTP schemas are in limits.ts.
 */
import type { VmShape } from "../vm/qemu-args.js";
import { BadRequestError } from "./errors.js";
import { MAX_EXEC_TIMEOUT_MS, MAX_FORK_CHILDREN, MIN_MEM_SIZE_MIB } from "./limits.js";

/** The host's limits on what a sandbox may be (config.ts sets them). */
export interface SandboxLimits {
  defaultVcpuCount: number;
  defaultMemSizeMib: number;
  maxVcpuCount: number;
  maxMemSizeMib: number;
  defaultSandboxTimeoutMs: number;
  maxSandboxTimeoutMs: number;
  maxUploadBytes: number;
  /** Host disk (MiB) one sandbox may hold: its overlay plus its fork layers (disk-quota.ts). */
  maxDiskMib?: number;
}

export interface CreateRequest {
  template?: string;
  vcpu_count?: number;
  mem_size_mib?: number;
  timeout_ms?: number;
  metadata?: Record<string, string>;
}

export interface NormalCreate {
  template: string;
  shape: VmShape;
  timeoutMs: number;
}

export function normalizeCreate(
  req: CreateRequest,
  limits: SandboxLimits,
  templateNames: readonly string[],
): NormalCreate {
  const template = req.template ?? "default";
  if (!templateNames.includes(template)) {
    throw new BadRequestError(
      `unknown template ${JSON.stringify(template).slice(0, 80)}; available: ${templateNames.join(", ")}`,
    );
  }
  const shape = shapeOf(req, limits);
  const timeoutMs = req.timeout_ms ?? limits.defaultSandboxTimeoutMs;
  if (timeoutMs < 1 || timeoutMs > limits.maxSandboxTimeoutMs) {
    throw new BadRequestError(`timeout_ms must be between 1 and ${limits.maxSandboxTimeoutMs}`);
  }
  return { template, shape, timeoutMs };
}

function shapeOf(req: CreateRequest, limits: SandboxLimits): VmShape {
  const vcpuCount = req.vcpu_count ?? limits.defaultVcpuCount;
  const memSizeMib = req.mem_size_mib ?? limits.defaultMemSizeMib;
  if (!Number.isInteger(vcpuCount) || vcpuCount < 1 || vcpuCount > limits.maxVcpuCount) {
    throw new BadRequestError(`vcpu_count must be an integer from 1 to ${limits.maxVcpuCount}`);
  }
  if (
    !Number.isInteger(memSizeMib) ||
    memSizeMib < MIN_MEM_SIZE_MIB ||
    memSizeMib > limits.maxMemSizeMib
  ) {
    throw new BadRequestError(
      `mem_size_mib must be an integer from ${MIN_MEM_SIZE_MIB} to ${limits.maxMemSizeMib}`,
    );
  }
  return { vcpuCount, memSizeMib };
}

/** An exec's own timeout, if it gives one. */
export function checkExecTimeout(timeoutMs: number | undefined): void {
  if (timeoutMs !== undefined && (timeoutMs < 1 || timeoutMs > MAX_EXEC_TIMEOUT_MS)) {
    throw new BadRequestError(`timeout_ms must be between 1 and ${MAX_EXEC_TIMEOUT_MS}`);
  }
}

export function checkForkCount(n: number): void {
  if (!Number.isInteger(n) || n < 1 || n > MAX_FORK_CHILDREN) {
    throw new BadRequestError(`n must be an integer from 1 to ${MAX_FORK_CHILDREN}`);
  }
}

export function checkMergePair(id: string, winnerId: string): void {
  if (id === winnerId)
    throw new BadRequestError(
      "a sandbox cannot be merged into itself; name another sandbox as the winner",
    );
}
