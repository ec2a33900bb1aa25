/**
 * A request's fields checked against the host's limits and given their defaults, before
 * the service acts on them. Bounds shared with the HTTP schemas are in limits.ts.
 */

import { unknownTemplateError } from "../templates/registry.js";
import type { VmShape } from "../vm/backend.js";
import { BadRequestError } from "./errors.js";
import { MAX_EXEC_TIMEOUT_MS, MAX_FORK_CHILDREN, MIN_MEM_SIZE_MIB } from "./limits.js";

/** The host's limits on what a sandbox may be (config.ts sets them). */
export interface SandboxLimits {
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
  templates: { names: readonly string[]; defaultShape(template: string): VmShape },
): NormalCreate {
  const template = req.template ?? "default";
  if (!templates.names.includes(template)) throw unknownTemplateError(template, templates.names);
  const shape = shapeOf(req, limits, templates.defaultShape(template));
  const timeoutMs = req.timeout_ms ?? limits.defaultSandboxTimeoutMs;
  if (timeoutMs < 1 || timeoutMs > limits.maxSandboxTimeoutMs) {
    throw new BadRequestError(`timeout_ms must be between 1 and ${limits.maxSandboxTimeoutMs}`);
  }
  return { template, shape, timeoutMs };
}

/** The shape asked for, each field missing taken from the template's default shape. */
function shapeOf(req: CreateRequest, limits: SandboxLimits, fallback: VmShape): VmShape {
  const vcpuCount = req.vcpu_count ?? fallback.vcpuCount;
  const memSizeMib = req.mem_size_mib ?? fallback.memSizeMib;
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
