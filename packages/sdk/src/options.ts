/**
 * The SDK's camelCase names for the wire's fields (the Python SDK uses the wire's own
 * snake_case names). Each table is typed against both sides; `wire.unit.test.ts` checks
 * that it covers the spec's fields exactly.
 */
import type { ConnectionOptions } from "./http.js";
import type { CreateSandboxBody, ExecBody, ExecError, ExecExitEvent } from "./wire.js";

export interface SandboxCreateOptions extends ConnectionOptions {
  template?: string;
  vcpuCount?: number;
  memSizeMib?: number;
  /** Lifetime; the daemon destroys the sandbox after it. */
  timeoutMs?: number;
  metadata?: Record<string, string>;
}

/** Sandbox.create's options (beside host and apiKey) -> the fields of CreateSandbox. */
export const CREATE_OPTIONS = {
  template: "template",
  vcpuCount: "vcpu_count",
  memSizeMib: "mem_size_mib",
  timeoutMs: "timeout_ms",
  metadata: "metadata",
} as const satisfies {
  [K in Exclude<keyof SandboxCreateOptions, keyof ConnectionOptions>]-?: keyof CreateSandboxBody;
};

export interface RunCodeOptions {
  language?: "python" | "bash";
  timeoutMs?: number;
}

/** runCode's options -> the fields of Exec (beside `code`, its first argument). */
export const RUN_CODE_OPTIONS = {
  language: "language",
  timeoutMs: "timeout_ms",
} as const satisfies { [K in keyof RunCodeOptions]-?: Exclude<keyof ExecBody, "code"> };

export interface ExecResult {
  stdout: string;
  stderr: string;
  exitCode: number;
  error?: ExecError;
  timedOut?: boolean;
  truncated?: boolean;
  /** The daemon cancelled the exec (code 130). */
  cancelled?: boolean;
}

/** The fields of the exit event -> those of ExecResult (flags are set only when true). */
export const EXIT_RESULT = {
  code: "exitCode",
  error: "error",
  timed_out: "timedOut",
  truncated: "truncated",
  cancelled: "cancelled",
} as const satisfies {
  [K in Exclude<keyof ExecExitEvent, "type" | "seq" | "ts">]-?: Exclude<
    keyof ExecResult,
    "stdout" | "stderr"
  >;
};

/** The request body for `opts`, with the wire's names; options left undefined are not sent. */
export function wireBody<N extends Record<string, string>>(
  opts: { [K in keyof N]?: unknown },
  names: N,
  body: Record<string, unknown> = {},
): Record<string, unknown> {
  for (const [key, wire] of Object.entries(names)) {
    if (opts[key] !== undefined) body[wire] = opts[key];
  }
  return body;
}
