/**
 * The request and response shapes of spec/openapi.yaml, as the SDK sends and reads them,
 * each with a table of its fields (`required` or `optional`, as the spec says). The
 * `satisfies` clauses tie every table to its type at compile time; `wire.unit.test.ts`
 * checks every table against the spec, and the Python SDK's twin (python/podflare/_wire.py)
 * against these tables, so a field added, renamed or removed on one side fails a test.
 */

type Presence<T> = { [K in keyof T]-?: object extends Pick<T, K> ? "optional" : "required" };

/** components.schemas.Sandbox: what create, connect, list and getInfo answer. */
export interface SandboxInfo {
  id: string;
  state: string;
  template: string;
  vcpu_count: number;
  mem_size_mib: number;
  created_at: string;
  expires_at: string;
  metadata: Record<string, string>;
}
export const SANDBOX_INFO_FIELDS = {
  id: "required",
  state: "required",
  template: "required",
  vcpu_count: "required",
  mem_size_mib: "required",
  created_at: "required",
  expires_at: "required",
  metadata: "required",
} as const satisfies Presence<SandboxInfo>;

/** components.schemas.CreateSandbox: the body of POST /v1/sandboxes. */
export interface CreateSandboxBody {
  template?: string;
  vcpu_count?: number;
  mem_size_mib?: number;
  timeout_ms?: number;
  metadata?: Record<string, string>;
}
export const CREATE_SANDBOX_FIELDS = {
  template: "optional",
  vcpu_count: "optional",
  mem_size_mib: "optional",
  timeout_ms: "optional",
  metadata: "optional",
} as const satisfies Presence<CreateSandboxBody>;

/** components.schemas.Exec: the body of POST /v1/sandboxes/{id}/exec. */
export interface ExecBody {
  code: string;
  language?: "python" | "bash";
  timeout_ms?: number;
}
export const EXEC_FIELDS = {
  code: "required",
  language: "optional",
  timeout_ms: "optional",
} as const satisfies Presence<ExecBody>;

/** The `error` of an exit event: the uncaught exception. */
export interface ExecError {
  name: string;
  value: string;
  traceback: string;
}
export const EXEC_ERROR_FIELDS = {
  name: "required",
  value: "required",
  traceback: "required",
} as const satisfies Presence<ExecError>;

/** components.schemas.ExecEvent, its first form: output. */
export interface ExecOutputEvent {
  type: "stdout" | "stderr";
  data: string;
  seq: number;
  ts: number;
}
export const EXEC_OUTPUT_EVENT_FIELDS = {
  type: "required",
  data: "required",
  seq: "required",
  ts: "required",
} as const satisfies Presence<ExecOutputEvent>;

/** components.schemas.ExecEvent, its second form: the last event of every stream. */
export interface ExecExitEvent {
  type: "exit";
  code: number;
  error?: ExecError;
  timed_out?: boolean;
  truncated?: boolean;
  cancelled?: boolean;
  seq: number;
  ts: number;
}
export const EXEC_EXIT_EVENT_FIELDS = {
  type: "required",
  code: "required",
  error: "optional",
  timed_out: "optional",
  truncated: "optional",
  cancelled: "optional",
  seq: "required",
  ts: "required",
} as const satisfies Presence<ExecExitEvent>;

export type ExecEvent = ExecOutputEvent | ExecExitEvent;

/** components.schemas.Error: every error answer's body. */
export interface ErrorBody {
  error: string;
  code: string;
}
export const ERROR_FIELDS = {
  error: "required",
  code: "required",
} as const satisfies Presence<ErrorBody>;

/** The body of POST /v1/sandboxes/{id}/fork. */
export interface ForkBody {
  n?: number;
}
export const FORK_FIELDS = { n: "optional" } as const satisfies Presence<ForkBody>;

/** The answer of POST /v1/sandboxes/{id}/fork (201). */
export interface ForkResponse {
  children: string[];
}
export const FORK_RESPONSE_FIELDS = {
  children: "optional",
} as const satisfies Record<keyof ForkResponse, "optional">;

/** The answer of GET /v1/sandboxes (200). */
export interface ListResponse {
  sandboxes: SandboxInfo[];
}
export const LIST_RESPONSE_FIELDS = {
  sandboxes: "optional",
} as const satisfies Record<keyof ListResponse, "optional">;

/** The path of a sandbox, or of one of its routes; every id is URL-encoded here. */
export function sandboxPath(id: string, ...rest: string[]): string {
  return ["/v1/sandboxes", ...[id, ...rest].map(encodeURIComponent)].join("/");
}
