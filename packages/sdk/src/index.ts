export type { DiffResult } from "./diff.js";
export * from "./errors.js";
export type { ConnectionOptions } from "./http.js";
export { DEFAULT_HOST } from "./http.js";
export type {
  ExecError,
  ExecEvent,
  ExecResult,
  RunCodeOptions,
  SandboxCreateOptions,
  SandboxInfo,
  UploadData,
} from "./sandbox.js";
export { Sandbox } from "./sandbox.js";
